"""Every model family end to end with MR-SP: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (DeepStack + timestamps), each as a tiny
checkpoint from prepare.py --family. Per family: the prompt equals the HF processor's, parallel encoding SP=2 == SP=1
(DeepStack features included), SP=2 log-probs == SP=1 == the model's own HF forward on pixels, HF engine greedy ==
model.generate, the embedding cache round trip (spill to disk and back), one SFT step and one RL step.

    python -m pytest -q tests/test_families.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from data import encode_sample, encode_text, load_records, load_video, writes_timestamps
from dist_utils import run_distributed
from test_mrsp import _perturbed   # noise on the LM: varied greedy outputs
from mrsp import (EmbeddingCache, build_seq, deepstack_levels, encode_videos, get_video_embeds, hf_rollout,
                  load_model, mrope_positions, rope_index, sp_logprobs, split_vision)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def fam_env(tmp_path_factory):
    """A small synthetic set (16 videos of 64 frames) and the three tiny checkpoints built on its text."""
    from prepare import generate_synthetic, init_tiny
    root = tmp_path_factory.mktemp("families")
    data = str(root / "synth")
    generate_synthetic(data, n_train=16, n_val=0, n_test=0, num_frames=64, fps=8.0, size=112, seed=0, progress=False)
    for split in ("val", "test"):   # empty splits: the tokenizer trainer and the stage scripts read train.jsonl only
        os.remove(os.path.join(data, f"{split}.jsonl"))
    ckpts = {}
    for fam in FAMILIES:
        ckpts[fam] = str(root / fam)
        init_tiny(ckpts[fam], data, seed=0, family=fam)
    return data, ckpts


def _recs(data, n=2):
    return load_records(os.path.join(data, "train.jsonl"))[:n]


@pytest.mark.parametrize("fam", FAMILIES)
def test_family_is_the_checkpoints_and_the_prompt_is_the_processors(fam_env, fam):
    """The family comes from config.model_type; encode_text (from the grid + cached timestamps alone) gives exactly the
    token ids and mm_token_type_ids of the checkpoint's HF processor run on the same frames."""
    from data import _resize_frames, build_prompt, process_video, video_metadata
    data, ckpts = fam_env
    model, processor = load_model(ckpts[fam])
    assert model.config.model_type == fam
    assert deepstack_levels(model) == (2 if fam == "qwen3_vl" else 0)
    assert writes_timestamps(processor) == (fam == "qwen3_vl")
    rec = _recs(data, 1)[0]
    frames, info = load_video(rec["video"], num_frames=8)
    vid = process_video(processor, frames, info)
    t = encode_text(processor, rec, vid["video_grid_thw"], with_target=False, timestamps=vid.get("timestamps"))
    _, h, w = vid["video_grid_thw"][0].tolist()
    ps = processor.video_processor.patch_size
    ref = processor(text=[build_prompt(processor, rec)], videos=[_resize_frames(frames, h * ps, w * ps)],
                    video_metadata=[video_metadata(info)], do_resize=False, do_sample_frames=False,
                    return_tensors="pt")
    assert torch.equal(t["input_ids"], ref["input_ids"][0])
    assert torch.equal(t["mm_token_type_ids"], ref["mm_token_type_ids"][0].long())
    assert torch.equal(vid["pixel_values_videos"], ref["pixel_values_videos"])
    text = processor.tokenizer.decode(t["input_ids"])
    if fam == "qwen3_vl":   # indices 0,9 | 18,27 | ... at 8 fps: the mean time of each frame pair
        assert torch.allclose(vid["timestamps"], torch.tensor([0.5625, 2.8125, 5.0625, 7.3125], dtype=torch.float64))
        assert "<0.6 seconds><|vision_start|><|video_pad|>" in text and "<7.3 seconds>" in text
        with pytest.raises(ValueError, match="timestamp per frame group"):
            encode_text(processor, rec, vid["video_grid_thw"], with_target=False)
    else:
        assert "seconds>" not in text and "timestamps" not in vid


def test_unsupported_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match=r"model_type 'llava' is not supported.*qwen3_vl"):
        load_model(str(tmp_path))


# ----------------------------------------------------------------------------- SP=2: encoding and log-probs
def _pixels(processor, recs, frames):
    from data import process_video
    procs = [process_video(processor, *load_video(r["video"], num_frames=n)) for r, n in zip(recs, frames)]
    return torch.cat([p["pixel_values_videos"] for p in procs]), torch.cat([p["video_grid_thw"] for p in procs])


def _sp2_worker(jobs):
    """Every family's SP=2 work in one pair of gloo processes (starting them is most of the cost): parallel encoding
    of two videos and the SP forward's log-probs of one sequence."""
    import torch.distributed as dist
    out = {}
    for fam, (ckpt, pix, grid, seq) in jobs.items():
        model, _ = load_model(ckpt)
        with torch.no_grad():
            out[fam] = (encode_videos(model, pix, grid, group=dist.group.WORLD),
                        sp_logprobs(model, seq, group=dist.group.WORLD, logit_chunk=7))
    return out


@pytest.fixture(scope="module")
def sp2(fam_env):
    """-> {family: (inputs, [per-rank (features, log-probs)])} for SP=2; inputs = (ckpt, pixels, grid, sequence):
    two videos of 8 and 6 frames (7 temporal patches, split 4/3 over the ranks) and one SFT sequence (8 frames)."""
    data, ckpts = fam_env
    jobs = {}
    for fam in FAMILIES:
        model, processor = load_model(ckpts[fam])
        pix, grid = _pixels(processor, _recs(data), [8, 6])
        with torch.no_grad():
            seq = build_seq(_recs(data, 1)[0], processor, model, frames=8)
        jobs[fam] = (ckpts[fam], pix, grid, seq)
    res = run_distributed(_sp2_worker, 2, args=(jobs,))
    return {fam: (jobs[fam], [r[fam] for r in res]) for fam in FAMILIES}


@pytest.mark.parametrize("fam", FAMILIES)
def test_parallel_encoding_sp2_equals_sp1(sp2, fam):
    """The gathered features carry the DeepStack features side by side with the embeddings (Qwen3-VL), equal to the
    tower's own one-pass output, on both ranks."""
    (ckpt, pix, grid, _), ranks = sp2[fam]
    model, _ = load_model(ckpt)
    with torch.no_grad():
        out = model.model.get_video_features(pix, grid)
        ref = torch.cat(out.pooler_output)
        if fam == "qwen3_vl":
            ref = torch.cat([ref, *(torch.cat(f) for f in out.deepstack_features)], -1)
        one = encode_videos(model, pix, grid)
    assert ref.shape == (7 * 4, 128 * (3 if fam == "qwen3_vl" else 1))
    assert (one - ref).abs().max() <= 1e-5
    for enc, _ in ranks:
        assert enc.shape == ref.shape and (enc - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("fam", FAMILIES)
def test_sp2_logprobs_equal_sp1_and_the_hf_pixel_forward(fam_env, sp2, fam):
    """SP=2 (ring, each rank adding the DeepStack features of its own visual tokens) == SP=1 == the HF model's
    forward on pixels (its own vision pass, DeepStack and, for Qwen3-VL, its own get_rope_index)."""
    data, ckpts = fam_env
    (_, _, _, seq), ranks = sp2[fam]
    base, _ = load_model(ckpts[fam])
    with torch.no_grad():
        lp1 = sp_logprobs(base, seq)
    for _, lp2 in ranks:
        assert (lp2 - lp1).abs().max() <= 1e-5
    # SP=1 vs the HF forward on pixels, on a perturbed model (varied logits): Qwen2/2.5 given the canonical positions
    # (transformers 5.x's differ after the video), Qwen3-VL on its own
    model, processor = _perturbed(ckpts[fam])
    rec = _recs(data, 1)[0]
    with torch.no_grad():
        seq = build_seq(rec, processor, model, frames=8)
        lp1 = sp_logprobs(model, seq)
    m = seq["loss_mask"]
    assert int(m.sum()) > 20
    frames, info = load_video(rec["video"], num_frames=8)
    s = encode_sample(processor, rec, frames, info)
    assert torch.equal(s["input_ids"], seq["input_ids"])
    ids, mm = s["input_ids"][None], s["mm_token_type_ids"][None]
    inputs = dict(input_ids=ids, mm_token_type_ids=mm, pixel_values_videos=s["pixel_values_videos"],
                  video_grid_thw=s["video_grid_thw"])
    if fam == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = s["second_per_grid_ts"]
    pos, _ = mrope_positions(model, ids, mm, s["video_grid_thw"], s["second_per_grid_ts"])
    hf_pos, _ = rope_index(model, ids, mm, s["video_grid_thw"], s["second_per_grid_ts"], rule="hf")
    if fam == "qwen3_vl":   # per-frame-group blocks: the canonical rule and transformers' agree exactly
        assert torch.equal(pos, hf_pos)
    else:
        inputs["position_ids"] = pos
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    ref = torch.cat([torch.zeros(1), torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]])
    assert (lp1[m] - ref[m]).abs().max() <= 1e-5
    if fam == "qwen3_vl":   # DeepStack matters: without its features the log-probs move
        vis, deep = split_vision(model, seq["embeds"])
        with torch.no_grad():
            no_deep = sp_logprobs(model, dict(seq, embeds=torch.cat([vis] + [torch.zeros_like(d) for d in deep], -1)))
        assert (no_deep[m] - lp1[m]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- HF engine, cache
@pytest.mark.parametrize("fam", FAMILIES)
def test_hf_engine_greedy_equals_generate(fam_env, fam):
    """Our engine (cached features, one prefill, DeepStack in the prefill) == model.generate on pixels, both on
    transformers' positions (rope_rule="hf"; for Qwen3-VL the same as the canonical rule)."""
    from data import collate_rl, model_inputs
    data, ckpts = fam_env
    model, processor = _perturbed(ckpts[fam])
    recs = _recs(data, 2)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [build_seq(r, processor, model, frames=8, with_target=False) for r in recs]
    rule = None if fam == "qwen3_vl" else "hf"
    out = hf_rollout(model, prompts, n=2, temperature=0, max_new_tokens=12, eos_id=eos, rope_rule=rule)
    seen = set()
    for i, r in enumerate(recs):
        frames, info = load_video(r["video"], num_frames=8)
        b = collate_rl([encode_sample(processor, r, frames, info, with_target=False)], processor.tokenizer.pad_token_id)
        inputs = model_inputs(b, "cpu")
        if fam != "qwen2_5_vl":
            inputs.pop("second_per_grid_ts")
        ref = model.generate(**inputs, do_sample=False, max_new_tokens=12, eos_token_id=eos,
                             pad_token_id=processor.tokenizer.pad_token_id)[0, b["input_ids"].shape[1]:].tolist()
        if eos in ref:
            ref = ref[:ref.index(eos) + 1]
        assert out["token_ids"][2 * i] == ref and out["token_ids"][2 * i + 1] == ref
        seen.update(ref)
    assert len(seen) >= 4, "degenerate outputs would make this test vacuous"


@pytest.mark.parametrize("fam", FAMILIES)
def test_cache_round_trip(fam_env, fam, tmp_path):
    """Encoded once, then served from memory and, after eviction, from disk -- DeepStack features and Qwen3-VL's
    timestamps included, their bytes counted; a prompt built from the cached value equals one built from pixels."""
    data, ckpts = fam_env
    model, processor = load_model(ckpts[fam])
    recs = _recs(data, 2)
    cache = EmbeddingCache(budget_bytes=1, spill_dir=str(tmp_path / "spill"))   # holds one entry: the other spills
    with torch.no_grad():
        first, n1 = get_video_embeds(model, processor, recs, cache, num_frames=8)
        again, n2 = get_video_embeds(model, processor, recs, cache, num_frames=8)
    assert (n1, n2) == (2, 0)
    assert cache.stats["spills"] >= 1 and cache.stats["disk_hits"] >= 1
    v = first[0]
    keys = {"embeds", "video_grid_thw", "second_per_grid_ts"} | ({"timestamps"} if fam == "qwen3_vl" else set())
    assert set(v) == keys
    assert v["embeds"].shape == (16, 128 * (1 + deepstack_levels(model)))
    assert EmbeddingCache.nbytes(v) == sum(x.numel() * x.element_size() for x in v.values())
    for a, b in zip(first, again):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    seq = build_seq(recs[0], processor, None, frames=8)          # from pixels
    cached = build_seq(recs[0], processor, model, cache, frames=8)
    assert torch.equal(seq["input_ids"], cached["input_ids"])
    assert torch.equal(seq["mm_token_type_ids"], cached["mm_token_type_ids"])


# ----------------------------------------------------------------------------- one SFT step, one RL step
def _stage(script, out_dir, ckpt, data, *args, nproc=1):
    base = [f"--model={ckpt}", f"--data={data}/train.jsonl", "--val_data=", f"--out_dir={out_dir}", "--frames=8",
            "--steps=1"]
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    r = subprocess.run(cmd + [script] + base + list(args), cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen3_vl"])   # Qwen2.5-VL: tests/test_sft.py and tests/test_rl.py
def test_one_sft_step_and_one_rl_step(fam_env, fam, tmp_path):
    """sft.py (frozen tower, cached features) and rl.py (GRPO with MR-SP; Qwen3-VL under torchrun with SP=2: parallel
    decode + encode, DeepStack slices per rank) run a step on each family and export a checkpoint of that family."""
    data, ckpts = fam_env
    sp = ["--sp=2"] if fam == "qwen3_vl" else []
    remat = ["--activation_checkpointing=1"] if fam == "qwen3_vl" else []   # DeepStack adds between checkpointed layers
    nproc = 2 if fam == "qwen3_vl" else 1
    m = _stage("sft.py", tmp_path / "sft", ckpts[fam], data, "--batch_size=2", "--lr=1e-3", "--warmup_steps=1",
               "--freeze_vision=1", *sp, *remat, nproc=nproc)
    assert len(m) == 1 and m[0]["loss"] > 0
    m = _stage("rl.py", tmp_path / "rl", ckpts[fam], data, "--prompts_per_step=1", "--group_size=2",
               "--max_new_tokens=4", "--lr=1e-4", *sp, nproc=nproc)
    assert len(m) == 1 and "reward_mean" in m[0]
    assert json.load(open(tmp_path / "rl" / "hf" / "config.json"))["model_type"] == fam


@pytest.mark.parametrize("fam", FAMILIES)
def test_estimate_counts_each_family(fam_env, fam):
    """estimate.py's parameter counts equal the real modules', and a Qwen3-VL cache entry is (1 + DeepStack layers)
    embeddings wide: what the cache stores (mrsp's encode returns D*(1+L) per token)."""
    import estimate
    from mrsp import load_model
    _, ckpts = fam_env
    model, _ = load_model(ckpts[fam])
    name, c = estimate.load_estimate_config(ckpts[fam])
    text, vision, _, _ = estimate.param_counts(c)
    lm_head = 0 if model.config.tie_word_embeddings else model.lm_head.weight.numel()
    assert text == sum(p.numel() for p in model.model.language_model.parameters()) + lm_head
    assert vision == sum(p.numel() for p in model.model.visual.parameters())
    L = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())
    assert c["vision"]["deepstack"] == L and (L > 0) == (fam == "qwen3_vl")
    # the cached embeddings per video: D * (1 + L) values per token (the same config without DeepStack: D)
    flat = (name, dict(c, vision=dict(c["vision"], deepstack=0)))
    emb = [next(v for k, v in estimate.estimate_memory(cfg, 16, world=1, sp=1, engine="hf", device="cpu",
                                                         videos_seen=1, prompts_per_step=1)
                ["phases"]["update"].items() if k.startswith("video embeddings")) for cfg in ((name, c), flat)]
    assert emb[0] == (1 + L) * emb[1] > 0


def test_qwen3_vl_text_only_and_two_video_records(fam_env, tmp_path):
    """The record kinds of data.py on Qwen3-VL: a text-only record (no DeepStack features, nothing to split) and a
    two-video record (each video's own timestamps text, both videos' DeepStack features), MR-SP log-probs == the
    HF forward (on pixels for the videos, at transformers' own Qwen3-VL positions)."""
    from data import collate_sft, model_inputs, video_inputs
    data, ckpts = fam_env
    model, processor = _perturbed(ckpts["qwen3_vl"])
    vids = [r["video"] for r in _recs(data, 2)]
    path = tmp_path / "kinds.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "t", "question": "What is 2 + 3?", "answer": "5", "answer_type": "math", "reasoning": "2 + 3 = 5."},
        {"id": "v2", "videos": vids, "question": "Which video is longer?", "options": ["first", "second"],
         "answer": "A", "reasoning": "Both are."}]) + "\n")
    text_rec, two_rec = load_records(str(path))
    seq = build_seq(text_rec, processor, model)
    batch = collate_sft([encode_text(processor, text_rec, None)], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        lp = sp_logprobs(model, seq)
        hf = model(**model_inputs(batch, "cpu")).loss
    assert float(-lp.sum() / seq["loss_mask"].sum()) == pytest.approx(float(hf), abs=1e-5)

    seq = build_seq(two_rec, processor, model, frames=8)
    vx = video_inputs(processor, two_rec, num_frames=8)
    assert len(vx["timestamps"]) == 2 and len(seq["timestamps"]) == 2
    t = encode_text(processor, two_rec, vx["video_grid_thw"], with_target=True, timestamps=vx["timestamps"])
    assert torch.equal(t["input_ids"], seq["input_ids"])
    assert processor.tokenizer.decode(t["input_ids"]).count(" seconds>") == int(vx["video_grid_thw"][:, 0].sum())
    ids, mm = t["input_ids"][None], t["mm_token_type_ids"][None]
    with torch.no_grad():
        lp = sp_logprobs(model, seq)
        logits = model(input_ids=ids, mm_token_type_ids=mm, pixel_values_videos=vx["pixel_values_videos"],
                       video_grid_thw=vx["video_grid_thw"]).logits[0].float()
    ref = torch.cat([torch.zeros(1), torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]])
    m = seq["loss_mask"]
    assert (lp[m] - ref[m]).abs().max() <= 1e-5
