"""bench/gpu_check.sh in its CPU mode (what CI can run of the GPU validation), plus the pieces it is built from:
bench/real_shape.py's 7B-shaped config and bench/make_videos.py's test videos."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402
import make_videos  # noqa: E402
import real_shape  # noqa: E402


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_gpu_check_cpu_mode_passes_every_check(tmp_path):
    out = tmp_path / "rows.json"
    t0 = time.time()
    p = _run("--device=cpu", f"--json_out={out}")
    wall = time.time() - t0
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    bad = [r for r in rows if r["status"] in ("FAIL", "SKIP")]   # here PyAV and torchvision exist: nothing skipped
    assert not bad, bad
    passed = {}
    for r in rows:
        if r["status"] == "PASS":
            passed.setdefault(r["section"], []).append(r["check"])
    # every check of every section ran and passed: 5 attention cases at world 1 and again on 2 gloo processes,
    # 3 balance rows, the data path, and per model the 6 checks (chunked encode, encode, log-probs, SFT, rollouts, RL)
    assert sum("world 1" in c for c in passed["attention"]) == 5
    assert sum("world 2" in c and "gloo" in c for c in passed["attention"]) == 5
    assert sum("causal balance" in c for c in passed["kernel"]) == 3
    assert len(passed["data"]) == 1
    for model in ("tiny", "real"):
        assert len(passed[model]) == 6, (model, passed[model])
        assert any(c.startswith("RL step") for c in passed[model]) and any(c.startswith("SFT") for c in passed[model])
    assert [r["status"] for r in rows if r["section"] == "share"] == ["INFO", "INFO"]
    assert "| section | check | status |" in p.stdout and "0 FAIL" in p.stdout
    print(f"gpu_check --device=cpu: {len(rows)} rows in {wall:.0f} s")


def test_gpu_check_attention_rows_catch_a_wrong_kernel(monkeypatch):
    """The tolerance is tight enough to fail: an output off by 1e-3 (fp32) is reported, not passed."""
    shape = gpu_check.SHAPES["cpu"]["attn"]
    cases = [("ring", torch.float32, True)]
    dev = torch.device("cpu")
    assert gpu_check.attn_rows(cases, shape, dev)[0]["ok"]
    ring = gpu_check.spa.ring_attn
    monkeypatch.setattr(gpu_check.spa, "ring_attn", lambda *a, **k: ring(*a, **k) + 1e-3)
    row = gpu_check.attn_rows(cases, shape, dev)[0]
    assert not row["ok"] and "max err 1.0e-03" in row["value"], row


@pytest.mark.parametrize("flag, message", [("--device=tpu", "expected auto, cuda or cpu"),
                                           ("--part=nope", "expected all")])
def test_gpu_check_bad_flags_name_the_flag(flag, message):
    p = _run(flag, timeout=120)
    assert p.returncode != 0 and message in p.stderr and flag.split("=")[0] in p.stderr, p.stderr[-2000:]


def test_real_shape_config_is_the_7b_but_for_layers_and_vocab():
    """bench/real_shape.py's widths against mrsp's independent transcription of the released config.json."""
    tok = real_shape.make_tokenizer()
    cfg = real_shape.real_config(tok, layers=2)
    _, ours = gpu_check.estimate.load_estimate_config(cfg.to_dict())
    _, ref = gpu_check.estimate.load_estimate_config(gpu_check.estimate.QWEN25_VL_7B)
    for part, skip in (("text", ("num_hidden_layers", "vocab_size")), ("vision", ())):
        assert {k: v for k, v in ours[part].items() if k not in skip} == \
            {k: v for k, v in ref[part].items() if k not in skip}, part
    assert ours["text"]["num_hidden_layers"] == 2 and ours["text"]["vocab_size"] % 64 == 0
    assert cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert cfg.vision_config.window_size == 112 and cfg.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    vp = real_shape.real_processor(tok).video_processor
    assert (vp.size["shortest_edge"], vp.size["longest_edge"]) == (3136, 12845056)
    assert (vp.patch_size, vp.merge_size, vp.temporal_patch_size) == (14, 2, 2)
    assert list(vp.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    with pytest.raises(ValueError, match="--layers=0"):
        real_shape.real_config(tok, layers=0)


def test_make_videos_is_deterministic_with_the_asked_gop(tmp_path):
    a, b = str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")
    info = make_videos.make_video(a, seconds=2.0, height=64, width=96, fps=25.0, gop=12, seed=3)
    make_videos.make_video(b, seconds=2.0, height=64, width=96, fps=25.0, gop=12, seed=3)
    assert info["frames"] == 50 and open(a, "rb").read() == open(b, "rb").read()
    assert make_videos.keyframe_interval(a) == [12]
    make_videos.make_video(b, seconds=2.0, height=64, width=96, fps=25.0, gop=12, seed=4)
    assert open(a, "rb").read() != open(b, "rb").read()
    # not trivially compressible: grain and motion cost real bits (a static flat clip is ~1 kB)
    assert info["bytes"] > 20_000
    with pytest.raises(ValueError, match="--height=62"):
        make_videos.make_video(a, seconds=1.0, height=62, width=96)


def test_gpu_check_data_section_skips_without_pyav(monkeypatch, tmp_path):
    """The GPU box may have only torch + transformers: the data section says what is missing and the model sections
    fall back to the in-memory tiny config (they need neither PyAV nor torchvision)."""
    monkeypatch.setitem(sys.modules, "av", None)   # `import av` now raises ModuleNotFoundError(name="av")
    report = gpu_check.Report()
    assert gpu_check.check_data(report, torch.device("cpu"), str(tmp_path)) == ""
    (row,) = report.rows
    assert row["status"] == "SKIP" and "av is not installed" in row["value"], row
    cfg = gpu_check.model_config("tiny", real_shape.make_tokenizer(), torch.device("cpu"))
    assert (cfg.text_config.hidden_size, cfg.vision_config.depth) == (128, 2)
