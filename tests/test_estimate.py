"""Memory / communication estimator (estimate.py): token arithmetic, the paper's fit claim, configs."""
import os
import json

import pytest

from estimate import (GiB, QWEN25_VL_7B, QWEN25_VL_TINY, estimate_memory as estimate, format_estimate,
                      load_estimate_config, param_counts, video_tokens)


def test_video_tokens_match_design():
    assert video_tokens(512, 56, 56) == 1024          # the tiny model's 56x56 frames: 4 tokens per 2 frames
    assert video_tokens(256, 112, 112) == 2048
    assert video_tokens(3600, 336, 336) == 259_200    # the default: ~256k tokens like the paper
    assert video_tokens(3, 56, 56) == 2 * 4           # odd frame count padded to a temporal pair
    assert video_tokens(2, 60, 50) == 4               # 60, 50 round to 56 (multiples of 28)
    assert video_tokens(2, 10, 10) == 1               # at least one 28x28 cell
    r = estimate("qwen2.5-vl-7b", 3600, tokens_per_frame_pair=142)
    assert r["video_tokens"] == 1800 * 142


def test_param_counts_7b():
    text, vision, _, _ = param_counts(load_estimate_config("qwen2.5-vl-7b")[1])
    assert text == 7_615_616_512 and vision == 676_550_144   # equal to HF's module count (8.29B total)


def test_7b_3600_frames_fits_with_sp8_not_sp1():
    r8 = estimate("qwen2.5-vl-7b", 3600, gpus=8, sp=8, gpu_mem_gib=80)
    r1 = estimate("qwen2.5-vl-7b", 3600, gpus=8, sp=1, gpu_mem_gib=80)
    assert r8["fits"] and not r1["fits"]
    assert r8["dp"] == 1 and r1["dp"] == 8
    # checkpointed inputs at SP=1: 28 layers x 260,480 tokens x 3584 x 2 B ~ 52 GB
    assert r1["train"]["act: checkpointed inputs"] == 28 * 260_480 * 3584 * 2
    # rollout KV of the full prompt (every rank): 2 x 28 x 4 x 128 x 2 B = 56 KiB a token
    kv = r8["rollout"]["vLLM KV cache (prompt + G responses)"]
    assert kv == 57_344 * (259_200 + 256 + 5 * 1024) and 14 * GiB < kv < 15 * GiB
    # per-layer comm: ring forward (P-1)*2*(N/P)*kv*2 B; Megatron is 2d/kv = 14x more for this GQA model
    assert r8["comm"]["ring K/V (P-1)·2·(N/P)·kv"] == 7 * 2 * 32_560 * 512 * 2
    assert r8["comm"]["Megatron TP-SP 2 AG + 2 RS"] / r8["comm"]["ring K/V (P-1)·2·(N/P)·kv"] == pytest.approx(14.0)
    assert all(b == 0 for b in r1["comm"].values())
    table = format_estimate(r8)
    assert "259,200 video tokens" in table and "FITS" in table and "DOES NOT FIT" in format_estimate(r1)


def test_monotonic_in_frames_and_sp():
    peaks = [estimate("qwen2.5-vl-7b", f, sp=8)["peak"] for f in (256, 1024, 3600, 7200)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    acts = []
    for sp in (1, 2, 4, 8):
        r = estimate("qwen2.5-vl-7b", 3600, gpus=8, sp=sp)
        acts.append(sum(b for k, b in r["train"].items() if k.startswith("act: checkpointed")
                        or k.startswith("act: recomputed")))
    assert acts == sorted(acts, reverse=True) and len(set(acts)) == 4
    with pytest.raises(ValueError, match="must divide"):
        estimate("qwen2.5-vl-7b", 3600, gpus=8, sp=3)


def _flat_to_nested(raw):
    text = {k: v for k, v in raw.items() if k not in ("vision_config", "model_type", "tie_word_embeddings")}
    return dict(model_type=raw["model_type"], tie_word_embeddings=raw["tie_word_embeddings"], text_config=text,
                vision_config=raw["vision_config"])


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_reads_config_dir_and_file(tmp_path, layout):
    raw = QWEN25_VL_7B if layout == "flat" else _flat_to_nested(QWEN25_VL_7B)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ref = estimate("qwen2.5-vl-7b", 3600)
    for model in (str(tmp_path), str(tmp_path / "config.json")):
        r = estimate(model, 3600)
        assert r["name"] == tmp_path.name and r["peak"] == ref["peak"] and r["train"] == ref["train"]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_estimate_config(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_estimate_config(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model preset 'qwen-13b'"):
        load_estimate_config("qwen-13b")
    bad = dict(QWEN25_VL_7B)
    del bad["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="intermediate_size"):
        load_estimate_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in QWEN25_VL_7B.items() if k != "vision_config"}))
    with pytest.raises(ValueError, match="vision_config"):
        load_estimate_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_estimate_config(str(tmp_path))


def test_tiny_is_sub_gb():
    _, c = load_estimate_config(QWEN25_VL_TINY)
    assert sum(param_counts(c)[:2]) == 541_824 + 257_344                  # ~0.8M params
    for frames, size, gpus, sp in ((3600, 336, 8, 8), (256, 112, 2, 2), (512, 56, 1, 1)):
        r = estimate("tiny", frames, gpus=gpus, sp=sp, height=size, width=size)
        assert r["fits"] and r["peak"] < GiB
        assert all(b < GiB for b in list(r["train"].values()) + list(r["rollout"].values()))
    assert "Qwen2.5-VL-tiny" in format_estimate(r)


def test_estimate_cli_reproduces_the_paper_claim():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = lambda sp: subprocess.run([sys.executable, "estimate.py", "--model=qwen2.5-vl-7b", "--frames=3600",  # noqa: E731
                                     "--gpus=8", f"--sp={sp}"], cwd=root, capture_output=True, text=True, timeout=120)
    r8, r1 = run(8), run(1)
    assert r8.returncode == 0 and "259,200 video tokens" in r8.stdout and ": FITS" in r8.stdout
    assert r1.returncode == 0 and "DOES NOT FIT" in r1.stdout
