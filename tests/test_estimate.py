"""Memory / communication estimator (estimate.py): frame sizing through data.py, every copy rl.py keeps per phase
(engines, sleep, reference, SP), the per-layer activation bytes against the real HF layer, the 7B claim, configs,
and one measured run of rl.py on CPU (bench/estimate_check.py)."""
import json
import os
import subprocess
import sys

import pytest

import estimate as E
from estimate import (GiB, QWEN25_VL_7B, QWEN25_VL_TINY, estimate_memory as estimate, format_estimate,
                      load_estimate_config, param_counts, video_tokens)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = dict(engine="hf", device="cpu", activation_checkpointing=False, keep_gathered=True, max_new_tokens=32,
           group_size=2, prompts_per_step=1)   # rl.py's CPU flags as bench/estimate_check.py runs them


def terms(r, phase, word):
    """Bytes of the terms of `phase` whose name contains `word`."""
    return sum(b for k, b in r["phases"][phase].items() if word in k)


def test_video_tokens_match_design():
    assert video_tokens(512, 56, 56) == 1024          # the tiny model's 56x56 frames: 4 tokens per 2 frames
    assert video_tokens(256, 112, 112) == 2048
    assert video_tokens(3600, 336, 336) == 259_200    # frames resized to 336x336: the paper's ~256k tokens
    assert video_tokens(3, 56, 56) == 2 * 4           # odd frame count padded to a temporal pair
    assert video_tokens(2, 60, 50) == 4               # 60, 50 round to 56 (multiples of 28)
    assert video_tokens(2, 10, 10) == 4               # data.smart_resize: at least 4 28x28 cells (56x56)
    r = estimate("qwen2.5-vl-7b", 3600, tokens_per_frame_pair=142)
    assert r["video_tokens"] == 1800 * 142


def test_frame_sizing_is_data_pys():
    """rl.py's frame sizes come from data.py (qwen-vl-utils): the estimator calls it, it does not re-derive it."""
    from data import frame_size
    r = estimate("qwen2.5-vl-7b", 3600)               # 336x336 source, rl.py's default pixel flags
    assert frame_size(336, 336, 3600) == (308, 308) == r["frame_hw"]   # per-frame floor beats the total budget
    assert r["tokens_per_frame_pair"] == 121 and r["video_tokens"] == 217_800
    assert estimate("qwen2.5-vl-7b", 64)["tokens_per_frame_pair"] == 144   # few frames: 336x336 kept
    assert estimate("qwen2.5-vl-7b", 3600, resized_height=336, resized_width=336)["video_tokens"] == 259_200
    small = dict(min_pixels=56 * 56, max_pixels=224 * 224)                 # rl.py --min_pixels / --max_pixels
    assert estimate("qwen2.5-vl-7b", 3600, **small)["frame_hw"] == frame_size(336, 336, 3600, **small) == (224, 224)
    # the checkpoint's processor range clamps as data.processed_frame_size does: the tiny preset is 56x56 always
    assert estimate("tiny", 16, height=112, width=112)["frame_hw"] == (56, 56)


def test_param_counts_7b():
    text, vision, _, _ = param_counts(load_estimate_config("qwen2.5-vl-7b")[1])
    assert text == 7_615_616_512 and vision == 676_550_144   # equal to HF's module count (8.29B total)


def test_every_copy_rl_keeps_7b():
    """The copies of an --engine=vllm run, by phase, and their sizes per rank."""
    r = estimate("qwen2.5-vl-7b", 3600, world=8, sp=8, prompts_per_step=1)
    P, Pv = r["params_text"], r["params_vision"]
    for ph in ("collect", "prefill", "update", "sync"):
        assert terms(r, ph, "policy LLM fp32") == 4 * P / 8
        assert terms(r, ph, "AdamW") == 8 * P / 8
        assert terms(r, ph, "reference LLM (bf16") == 2 * P / 8
        assert terms(r, ph, "vision tower (") == 2 * Pv          # ONE tower: the policy's, shared
        assert terms(r, ph, "HF rollout copy") == 0              # vLLM generates: the HF copy has no LLM
    # vLLM: weights without a vision tower, awake in collect and sync, asleep (level 2) in prefill and update
    for ph in ("collect", "sync"):
        assert terms(r, ph, "vLLM weights") == 2 * P
    for ph in ("prefill", "update"):
        assert terms(r, ph, "vLLM") == 0
    # the update: gradients (shard + the LM head's + a unit's), checkpointed inputs + ring outputs at 1/8 of the tokens
    assert r["local_tokens"] == -(-r["seq_tokens"] // 8)
    assert terms(r, "update", "checkpointed layer inputs") > 0
    # autocast's bf16 copy of every fp32 policy weight but the embedding, on the GPU only
    assert terms(r, "prefill", "autocast bf16 weight copies") == 2 * (P - 152064 * 3584)


def test_vllm_kv_grows_with_vllm_memory():
    lo = estimate("qwen2.5-vl-7b", 3600, vllm_memory=0.3)
    hi = estimate("qwen2.5-vl-7b", 3600, vllm_memory=0.5)
    pool = lambda r, ph: terms(r, ph, "vLLM KV pool")   # noqa: E731
    assert pool(hi, "collect") - pool(lo, "collect") == pytest.approx(0.2 * 80 * GiB)
    assert hi["peaks"]["collect"] - lo["peaks"]["collect"] == pytest.approx(0.2 * 80 * GiB)
    assert hi["peaks"]["update"] == lo["peaks"]["update"] and hi["peaks"]["prefill"] == lo["peaks"]["prefill"]
    # rl.py's default 0.3 cannot hold one 3,600-frame prompt (+ G responses); the auto value is exactly enough
    assert not lo["vllm"]["holds_one_prompt"] and not lo["fits"]
    auto = estimate("qwen2.5-vl-7b", 3600)
    v = auto["vllm"]
    assert v["vllm_memory"] == v["needed_memory"] and v["kv_pool"] == pytest.approx(v["kv_needed"])
    assert v["kv_needed"] == 57_344 * (217_800 + 256 + 5 * 1024)           # 56 KiB a token, prefix shared by G
    assert 0.3 < v["needed_memory"] < 0.4 and v["max_model_len"] == 217_800 + 256 + 1024
    assert "--vllm_memory >= 0.341" in format_estimate(auto)


def test_sleep_removes_vllm_from_prefill_and_update():
    awake = estimate("qwen2.5-vl-7b", 1024, vllm_sleep_level=0)
    asleep = estimate("qwen2.5-vl-7b", 1024, vllm_sleep_level=2)
    footprint = sum(b for k, b in awake["phases"]["collect"].items() if k.startswith("vLLM"))
    assert footprint == pytest.approx(awake["vllm"]["vllm_memory"] * 80 * GiB)
    for ph in ("prefill", "update"):
        assert terms(asleep, ph, "vLLM") == 0 < terms(awake, ph, "vLLM")
        assert awake["peaks"][ph] - asleep["peaks"][ph] == pytest.approx(footprint)
    assert awake["peaks"]["collect"] == asleep["peaks"]["collect"]


def test_hf_engine_keeps_a_full_rollout_copy_and_replicates_the_kv():
    r = estimate("qwen2.5-vl-7b", 256, engine="hf", world=8, sp=8)
    for ph in r["phases"]:
        assert terms(r, ph, "HF rollout copy: LLM (bf16, unsharded)") == 2 * r["params_text"]
        assert terms(r, ph, "vLLM") == 0
    # its rollout replicates the prompt's KV G times (no prefix sharing): more than G prompts' worth
    kv = terms(r, "collect", "KV x G")
    assert kv >= 5 * 57_344 * r["prompt_len"]


def test_sp_divides_activations():
    ck, local = [], []
    for sp in (1, 2, 4, 8):
        r = estimate("qwen2.5-vl-7b", 3600, world=8, sp=sp, prompts_per_step=8, engine="hf",
                     activation_checkpointing=False, keep_gathered=False)
        local.append(r["local_tokens"])
        ck.append(terms(r, "update", "activations"))
    assert local == [-(-219_080 // sp) for sp in (1, 2, 4, 8)]
    saved = E.layer_saved_bytes(load_estimate_config("qwen2.5-vl-7b")[1]["text"], "cuda")
    for a, n in zip(ck, local):
        assert a >= 28 * n * saved                     # every layer's saved activations of this rank's tokens
    assert ck == sorted(ck, reverse=True) and ck[0] / ck[-1] == pytest.approx(8, rel=0.01)
    with pytest.raises(ValueError, match="must divide"):
        estimate("qwen2.5-vl-7b", 3600, world=8, sp=3)


def test_kl_coef_zero_removes_the_reference():
    on = estimate("qwen2.5-vl-7b", 1024, kl_coef=1e-2, world=8, sp=8)
    off = estimate("qwen2.5-vl-7b", 1024, kl_coef=0.0, world=8, sp=8)
    for ph in on["phases"]:
        assert terms(on, ph, "reference") == 2 * on["params_text"] / 8 and terms(off, ph, "reference") == 0
    assert off["peaks"]["update"] == on["peaks"]["update"] - 2 * on["params_text"] / 8
    # the old names still work (bench/bench_mrsp.py, bench/gpu_check.py): gpus, group, kl, response_tokens
    old = estimate("qwen2.5-vl-7b", 1024, gpus=8, sp=8, group=5, kl=False, response_tokens=1024)
    assert old["peaks"] == off["peaks"] and old["train_peak"] == off["peaks"]["update"]


def test_keep_gathered_and_checkpointing_are_rl_pys():
    base = dict(world=8, sp=8, prompts_per_step=1)
    z3 = estimate("qwen2.5-vl-7b", 512, keep_gathered=False, **base)
    kg = estimate("qwen2.5-vl-7b", 512, keep_gathered=True, **base)
    P = z3["params_text"]
    assert terms(kg, "update", "FSDP gathered params (all: keep_gathered)") == 4 * P
    assert terms(kg, "update", "gradients fp32, accumulated, unsharded") == 4 * P
    assert kg["peaks"]["update"] > z3["peaks"]["update"] + 4 * P
    nock = estimate("qwen2.5-vl-7b", 512, activation_checkpointing=False, **base)
    assert nock["peaks"]["update"] > z3["peaks"]["update"]


def test_cpu_mode_adds_the_runtime_baseline_and_fp32_copies():
    a = estimate("tiny", 64, world=1, sp=1, runtime_gb=0.0, height=112, width=112, **CPU)
    b = estimate("tiny", 64, world=1, sp=1, runtime_gb=0.8, height=112, width=112, **CPU)
    for ph in a["phases"]:
        assert b["peaks"][ph] - a["peaks"][ph] == pytest.approx(0.8e9)
        assert terms(a, ph, "autocast") == 0 and terms(a, ph, "vLLM") == 0   # GPU-only terms
        assert terms(a, ph, "HF rollout copy: LLM (fp32") == 4 * a["params_text"]
    assert a["fits"] is None and "GB/rank" in format_estimate(a)
    with pytest.raises(ValueError, match="HF engine only"):
        estimate("tiny", 64, device="cpu", engine="vllm")


def _saved_bytes(cfg, n, autocast):
    """Bytes autograd saves in one forward of decoder layer 0 of a random-init model, positions/params excluded."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    lm = Qwen2_5_VLForConditionalGeneration(cfg).model.language_model
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    x = torch.randn(1, n, cfg.text_config.hidden_size, requires_grad=True)
    pos = torch.arange(n)[None, None].expand(3, 1, n)
    pe = lm.rotary_emb(x, pos)
    skip = params | {t.untyped_storage().data_ptr() for t in pe}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm.layers[0](x, position_embeddings=pe, attention_mask=None, position_ids=pos)
    return sum(seen.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_layer_saved_bytes_match_the_hf_layer(autocast):
    """estimate.layer_saved_bytes (fp32 = CPU, bf16 autocast = GPU) against saved_tensors_hooks on the real HF
    Qwen2.5-VL decoder layer (GQA 4:1, MLP 1.5x: the widths enter separately)."""
    from transformers import Qwen2_5_VLConfig
    text = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                intermediate_size=96, vocab_size=128,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]))
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=32,
                                                                num_heads=2, out_hidden_size=64))
    n1, n2 = 64, 192
    b1, b2 = _saved_bytes(cfg, n1, autocast), _saved_bytes(cfg, n2, autocast)
    per_token = (b2 - b1) / (n2 - n1)
    c = load_estimate_config(cfg.to_dict())[1]
    assert per_token == E.layer_saved_bytes(c["text"], "cuda" if autocast else "cpu")
    if autocast:   # the constant part: the bf16 casts of the layer's Linear weights (not biases, not the norms)
        assert b1 - n1 * per_token == 2 * (param_counts(c)[2] - 2 * 64 - (64 + 2 * 16))


def test_7b_3600_frames_restated_claim():
    """docs/estimate_results.md: 3,600 frames (217,800 video tokens) of Qwen2.5-VL-7B on 8x 80 GB, --engine=vllm with
    the recipe's flags: SP=8 fits with up to 3 prompts per SP group per step (4 is at the budget's edge; collect holds
    every video of the group: 8 do not fit); SP=1 does not fit (the update of a 219k-token sequence on one GPU)."""
    fits = {pps: estimate("qwen2.5-vl-7b", 3600, world=8, sp=8, prompts_per_step=pps)["fits"] for pps in (1, 3, 8)}
    assert fits == {1: True, 3: True, 8: False}
    r8 = estimate("qwen2.5-vl-7b", 3600, world=8, sp=8, prompts_per_step=8)
    assert max(r8["peaks"], key=r8["peaks"].get) == "collect"
    r1 = estimate("qwen2.5-vl-7b", 3600, world=8, sp=1, prompts_per_step=8)
    assert not r1["fits"] and max(r1["peaks"], key=r1["peaks"].get) == "update"
    assert r1["peaks"]["update"] > 2 * 80 * GiB and r1["dp"] == 8 and r8["dp"] == 1
    # checkpointed inputs at SP=1: 28 layers x 219,080 tokens x 3584 x 4 B (fp32 residual stream)
    assert terms(r1, "update", "checkpointed layer inputs") == 28 * 219_080 * 3584 * 4 + 2 * 219_080 * 128 * 4
    # per-layer comm: ring forward (P-1)*2*(N/P)*kv*2 B; Megatron is 2d/kv = 14x more for this GQA model
    assert r8["comm"]["ring K/V (P-1)·2·(N/P)·kv"] == 7 * 2 * 27_385 * 512 * 2
    assert r8["comm"]["Megatron TP-SP 2 AG + 2 RS"] / r8["comm"]["ring K/V (P-1)·2·(N/P)·kv"] == pytest.approx(14.0)
    assert all(b == 0 for b in r1["comm"].values())
    assert "217,800 video tokens" in format_estimate(r8) and "DOES NOT FIT" in format_estimate(r1)


def test_monotonic_in_frames():
    peaks = [estimate("qwen2.5-vl-7b", f, sp=8, prompts_per_step=1)["peak"] for f in (256, 1024, 3600, 7200)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4


def _flat_to_nested(raw):
    text = {k: v for k, v in raw.items() if k not in ("vision_config", "model_type", "tie_word_embeddings")}
    return dict(model_type=raw["model_type"], tie_word_embeddings=raw["tie_word_embeddings"], text_config=text,
                vision_config=raw["vision_config"])


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_reads_config_dir_and_file(tmp_path, layout):
    raw = QWEN25_VL_7B if layout == "flat" else _flat_to_nested(QWEN25_VL_7B)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"video_processor": {"size": {"shortest_edge": 3136, "longest_edge": 12845056}}}))
    ref = estimate("qwen2.5-vl-7b", 3600)
    for model in (str(tmp_path), str(tmp_path / "config.json")):
        r = estimate(model, 3600)
        assert r["name"] == tmp_path.name and r["peak"] == ref["peak"] and r["phases"] == ref["phases"]
    assert E.processor_pixels(str(tmp_path)) == (3136, 12845056)
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"video_processor": {"size": {"shortest_edge": 112 * 112, "longest_edge": 112 * 112}}}))
    assert estimate(str(tmp_path), 3600)["frame_hw"] == (112, 112)      # the processor's range clamps


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
    with pytest.raises(ValueError, match="engine='tgi'"):
        estimate("tiny", 16, engine="tgi")


def test_tiny_is_sub_gb():
    _, c = load_estimate_config(QWEN25_VL_TINY)
    assert sum(param_counts(c)[:2]) == 541_824 + 257_344                  # ~0.8M params
    for frames, size, gpus, sp in ((3600, 336, 8, 8), (256, 112, 2, 2), (512, 56, 1, 1)):
        r = estimate("tiny", frames, gpus=gpus, sp=sp, height=size, width=size, videos_seen=16)
        assert r["fits"] and r["peak"] < GiB
        assert all(b < GiB for ph in r["phases"].values() for b in ph.values())
    assert "Qwen2.5-VL-tiny" in format_estimate(r)
    # a long run: the embedding cache fills to --cache_bytes (whole steps' batches: a kept entry pins its batch)
    for cache in (1 << 28, 1 << 30):
        r = estimate("tiny", 3600, world=8, sp=8, cache_bytes=cache)
        held = terms(r, "update", "video embeddings")
        batch = 8 * r["video_tokens"] * 128 * 2
        assert cache - batch < held <= cache + batch


def test_estimate_cli_restates_the_claim():
    run = lambda *a: subprocess.run([sys.executable, "estimate.py", "--model=qwen2.5-vl-7b", "--frames=3600",  # noqa
                                     *a], cwd=ROOT, capture_output=True, text=True, timeout=120)
    r8, r1, old = run("--world=8", "--sp=8", "--prompts_per_step=1"), run("--world=8", "--sp=1"), run("--gpus=8",
                                                                                                       "--sp=8")
    assert r8.returncode == 0 and "217,800 video tokens" in r8.stdout and ": FITS" in r8.stdout, r8.stderr
    assert r1.returncode == 0 and "DOES NOT FIT" in r1.stdout
    assert old.returncode == 0 and "world 8, sp 8" in old.stdout          # README's --gpus spelling still works
    bad = run("--engine=tgi")
    assert bad.returncode != 0 and "engine='tgi'" in bad.stderr


def test_measured_tiny_run_within_15_percent(tmp_path, monkeypatch):
    """rl.py --engine=hf on the tiny model (CPU, one process, 16 frames, 2 steps): every phase's measured peak RSS
    within +-15% of the estimate (bench/estimate_check.py, the same code path)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import estimate_check as ec
    from prepare import generate_synthetic, init_tiny
    data, tiny = str(tmp_path / "synth"), str(tmp_path / "tiny")
    generate_synthetic(data, n_train=4, n_val=1, n_test=1, num_frames=64, fps=8.0, size=112, seed=0, progress=False)
    init_tiny(tiny, data, seed=0)
    monkeypatch.setattr(ec, "out", str(tmp_path))
    rows = ec.check_one("tiny", tiny, data, 16, 1, ec.runtime_baseline(1), str(tmp_path / "run"))
    assert len(rows) == 4 and all(x["ok"] for x in rows), rows
