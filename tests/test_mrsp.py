"""mrsp.py: (dp, sp) mesh, parallel video encoding, embedding cache, HF rollout engine."""
import os

import pytest
import torch

from data import (VideoError, collate_rl, encode_sample, encode_text, load_records, load_video, model_inputs,
                  process_video)
from dist_utils import run_distributed
from mrsp import (EmbeddingCache, embed_with_video, encode_videos, get_video_embeds, hf_rollout, load_model,
                  mrope_positions, rope_index, setup_mesh)


def _perturbed(ckpt):
    """The random-init tiny model repeats one token greedily; noise on the LM makes outputs diverse,
    so equality tests below compare real, varied sequences."""
    model, processor = load_model(ckpt)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.15)
    return model.eval(), processor


def _video_inputs(ckpt, synth_dir, frame_counts):
    _, processor = load_model(ckpt)
    recs = load_records(os.path.join(synth_dir, "val.jsonl"))
    procs = [process_video(processor, *load_video(r["video"], num_frames=n)) for r, n in zip(recs, frame_counts)]
    return (torch.cat([p["pixel_values_videos"] for p in procs]), torch.cat([p["video_grid_thw"] for p in procs]))


# ----------------------------------------------------------------------------- mesh
def test_setup_mesh_world1_without_torchrun():
    m = setup_mesh(1)
    assert (m.dp_size, m.sp_size, m.sp_group, m.dp_group) == (1, 1, None, None)
    with pytest.raises(ValueError, match="--sp=2 must be a positive divisor of the world size 1"):
        setup_mesh(2)


def _mesh_worker(sp):
    m = setup_mesh(sp)
    return (m.dp_size, m.sp_size, m.dp_rank, m.sp_rank)


def _mesh_bad(sp):
    try:
        setup_mesh(sp)
    except ValueError as e:
        return str(e)
    return "no error"


def test_setup_mesh_2d_on_4_ranks():
    assert run_distributed(_mesh_worker, 4, args=(2,)) == [(2, 2, 0, 0), (2, 2, 0, 1), (2, 2, 1, 0), (2, 2, 1, 1)]
    assert all("--sp=3 must be a positive divisor of the world size 4" in e
               for e in run_distributed(_mesh_bad, 4, args=(3,)))


# ----------------------------------------------------------------------------- parallel encoding
def _encode_worker(ckpt, pix, grid):
    import torch.distributed as dist
    model, _ = load_model(ckpt)
    with torch.no_grad():
        return encode_videos(model, pix, grid, group=dist.group.WORLD)


@pytest.mark.parametrize("world,frames", [(2, [8, 6]), (3, [8]), (3, [2, 4]), (2, [10])])
def test_parallel_encoding_equals_one_rank(tiny_ckpt, synth_dir, world, frames):
    """Temporal patches split over ranks, including counts that do not divide (and idle ranks)."""
    pix, grid = _video_inputs(tiny_ckpt, synth_dir, frames)
    model, _ = load_model(tiny_ckpt)
    with torch.no_grad():
        ref = torch.cat(model.model.get_video_features(pix, grid).pooler_output)
    outs = run_distributed(_encode_worker, world, args=(tiny_ckpt, pix, grid))
    for o in outs:
        assert o.shape == ref.shape
        assert (o - ref).abs().max() <= 1e-5


def _encode_grad_worker(ckpt, pix, grid):
    import torch.distributed as dist
    model, _ = load_model(ckpt)
    emb = encode_videos(model, pix, grid, group=dist.group.WORLD)
    (emb.square().sum() * (dist.get_rank() + 1)).backward()   # rank-dependent loss: exercises the reduction
    g = torch.cat([p.grad.flatten() for p in model.model.visual.parameters()])
    dist.all_reduce(g)
    return g


def test_parallel_encoding_gradients_match(tiny_ckpt, synth_dir):
    """Trainable vision tower (SFT): gradients through the autograd all-gather equal one rank's."""
    pix, grid = _video_inputs(tiny_ckpt, synth_dir, [8])
    model, _ = load_model(tiny_ckpt)
    emb = torch.cat(model.model.get_video_features(pix, grid).pooler_output)
    (emb.square().sum() * 3).backward()                            # sum over ranks of (rank+1) = 1 + 2
    ref = torch.cat([p.grad.flatten() for p in model.model.visual.parameters()])
    g = run_distributed(_encode_grad_worker, 2, args=(tiny_ckpt, pix, grid))[0]
    assert (g - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def _decode_share_worker(ckpt, synth_dir, n_recs, frames, fail_rank=None):
    """get_video_embeds over all ranks; records which frames this rank decoded."""
    import torch.distributed as dist
    import data
    model, processor = load_model(ckpt)
    recs = load_records(os.path.join(synth_dir, "val.jsonl"))[:n_recs]
    decoded, load = [], data.load_video

    def spy(path, num_frames=None, subset=None, **kw):
        if dist.get_rank() == fail_rank:
            raise VideoError(f"{path}: truncated (injected)")
        decoded.append((recs.index(next(r for r in recs if r["video"] == path)), subset))
        return load(path, num_frames=num_frames, subset=subset, **kw)

    data.load_video = spy
    try:
        vals, n = get_video_embeds(model, processor, recs, EmbeddingCache(), num_frames=frames, group=dist.group.WORLD)
    except VideoError as e:
        return str(e)
    return vals, n, decoded


@pytest.mark.parametrize("world,n_recs,frames", [(2, 3, 6), (3, 2, 2)])
def test_parallel_decoding_equals_one_rank(tiny_ckpt, synth_dir, world, n_recs, frames):
    """Each rank decodes only its share of the frames; embeddings, grids and time scales equal one rank's, including
    videos a rank has no frame of (their grid comes from the others) and idle ranks (3 ranks, 2 patches)."""
    model, processor = load_model(tiny_ckpt)
    recs = load_records(os.path.join(synth_dir, "val.jsonl"))[:n_recs]
    ref, n_ref = get_video_embeds(model, processor, recs, None, num_frames=frames)
    outs = run_distributed(_decode_share_worker, world, args=(tiny_ckpt, synth_dir, n_recs, frames))
    for vals, n, _ in outs:
        assert n == n_ref == n_recs
        for v, r in zip(vals, ref):
            assert torch.equal(v["video_grid_thw"], r["video_grid_thw"])
            assert torch.equal(v["second_per_grid_ts"], r["second_per_grid_ts"])
            assert v["embeds"].shape == r["embeds"].shape and (v["embeds"] - r["embeds"]).abs().max() <= 1e-5
    # the decoded frames: disjoint shares covering every sampled frame exactly once
    seen = sorted((i, f) for _, _, dec in outs for i, (s, e) in dec for f in range(s, e))
    assert seen == [(i, f) for i in range(n_recs) for f in range(frames)]
    assert max(sum(e - s for _, (s, e) in dec) for _, _, dec in outs) <= -(-n_recs * frames // (2 * world)) * 2


def test_parallel_decoding_error_on_one_rank_stops_all(tiny_ckpt, synth_dir):
    """A file that fails in one rank's frames raises on every rank (naming it), instead of hanging the others."""
    outs = run_distributed(_decode_share_worker, 2, args=(tiny_ckpt, synth_dir, 2, 8, 1), timeout=120)
    assert "truncated (injected)" in outs[1] and outs[1].endswith(".mp4: truncated (injected)")
    assert outs[0].startswith("SP rank 1 could not decode its share of the frames: VideoError:") and ".mp4" in outs[0]


def _diverged_cache_worker(ckpt, synth_dir):
    """Rank 0's cache already holds the first video (e.g. from an eval loop that split records over all ranks),
    rank 1's does not: their to-do lists differ, so a parallel decode would meet in mismatched collectives."""
    import torch.distributed as dist
    model, processor = load_model(ckpt)
    recs = load_records(os.path.join(synth_dir, "val.jsonl"))[:2]
    cache = EmbeddingCache()
    if dist.get_rank() == 0:
        get_video_embeds(model, processor, recs[:1], cache, num_frames=8)      # no group: this rank alone
    try:
        get_video_embeds(model, processor, recs, cache, num_frames=8, group=dist.group.WORLD)
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_diverged_sp_caches_fail_loudly_instead_of_hanging(tiny_ckpt, synth_dir):
    for rank, msg in enumerate(run_distributed(_diverged_cache_worker, 2, args=(tiny_ckpt, synth_dir), timeout=120)):
        assert msg.startswith("get_video_embeds: the ranks of a sequence-parallel group disagree"), msg
        assert f"this rank is {rank}" in msg
        assert "group rank 0: cache_history=" in msg and "to_encode=1" in msg and "to_encode=2" in msg


def test_cache_history_is_the_key_sequence():
    a, b = EmbeddingCache(), EmbeddingCache()
    for c in (a, b):
        c.get("x"); c.put("x", _val(2)); c.get("x")
    assert a.history == b.history != 0
    b.get("y")                                      # one more look-up: the histories differ, contents do not
    assert a.history != b.history and a.summary()["entries"] == b.summary()["entries"]
    c = EmbeddingCache()
    c.put("x", _val(2)); c.get("x"); c.get("x")     # same keys, other order: another history
    assert c.history != a.history


# a frame-count-dependent pixel budget: the processor's own cap switched on, and a stage total_pixels that binds.
# Sized from the whole 16-frame sampling, frames are 28x28 (grid h, w = 2); sized from an 8-frame share (what each
# SP=2 rank holds) they would be 56x56 -- the bug where SP=2 silently encoded another resolution than SP=1.
BUDGET = dict(min_pixels=28 * 28, total_pixels=32 * 28 * 28 * 0.9)


def _capped(processor):
    vp = processor.video_processor
    vp.size = {"shortest_edge": 28 * 28, "longest_edge": 768 * 28 * 28}
    vp.cap_pixels_per_frame, vp.max_video_tokens = True, 32
    return processor


def _budget_worker(ckpt, synth_dir):
    import torch.distributed as dist
    model, processor = load_model(ckpt)
    rec = load_records(os.path.join(synth_dir, "val.jsonl"))[0]
    (v,), _ = get_video_embeds(model, _capped(processor), [rec], None, num_frames=16, group=dist.group.WORLD, **BUDGET)
    return v


def test_parallel_decoding_sizes_every_share_from_the_whole_video(tiny_ckpt, synth_dir):
    model, processor = load_model(tiny_ckpt)
    rec = load_records(os.path.join(synth_dir, "val.jsonl"))[0]
    (ref,), _ = get_video_embeds(model, _capped(processor), [rec], None, num_frames=16, **BUDGET)
    assert ref["video_grid_thw"].tolist() == [[8, 2, 2]]
    for v in run_distributed(_budget_worker, 2, args=(tiny_ckpt, synth_dir), timeout=120):
        assert torch.equal(v["video_grid_thw"], ref["video_grid_thw"])
        assert (v["embeds"] - ref["embeds"]).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- cache
def _val(n_tokens, d=8):
    return dict(embeds=torch.zeros(n_tokens, d), video_grid_thw=torch.tensor([[2, 4, 4]]),
                second_per_grid_ts=torch.tensor([1.0]))


def test_cache_hits_misses_and_lru_eviction(tmp_path):
    per = EmbeddingCache.nbytes(_val(10))
    c = EmbeddingCache(budget_bytes=2 * per)
    assert c.get("a") is None
    c.put("a", _val(10)); c.put("b", _val(10))
    assert c.get("a") is not None                 # a is now most recent
    c.put("c", _val(10))                          # over budget: evicts b (least recently used)
    assert c.get("b") is None and c.get("a") is not None and c.get("c") is not None
    assert c.summary() == dict(hits=3, disk_hits=0, misses=2, evictions=1, spills=0, entries=2, bytes=2 * per,
                               on_disk=0)
    s = EmbeddingCache(budget_bytes=per, spill_dir=str(tmp_path / "spill"))
    s.put("x", _val(10)); s.put("y", _val(10))     # x spills to disk
    assert s.stats["spills"] == 1 and len(os.listdir(tmp_path / "spill")) == 1
    v = s.get("x")
    assert v is not None and s.stats["disk_hits"] == 1 and torch.equal(v["embeds"], torch.zeros(10, 8))
    assert s.bytes <= per


def test_cache_key_separates_sampling_and_version():
    k = EmbeddingCache.key
    n32 = dict(num_frames=32)
    assert k("v.mp4", n32) == k("./v.mp4", n32)
    assert len({k("v.mp4", n32), k("v.mp4", dict(num_frames=64)), k("v.mp4", n32, version=1), k("w.mp4", n32),
                k("v.mp4", dict(n32, total_pixels=1e6))}) == 5


def test_get_video_embeds_encodes_once(tiny_ckpt, synth_dir):
    model, processor = load_model(tiny_ckpt)
    recs = load_records(os.path.join(synth_dir, "val.jsonl"))[:3]
    cache = EmbeddingCache()
    vals, n = get_video_embeds(model, processor, recs + recs[:1], cache, num_frames=8)
    assert n == 3 and torch.equal(vals[0]["embeds"], vals[3]["embeds"])       # duplicate video: one encode
    for _ in range(4):                                                          # G rollouts, prefills, train...
        again, n = get_video_embeds(model, processor, recs, cache, num_frames=8)
        assert n == 0
    assert cache.stats["misses"] == 3 and cache.stats["hits"] == 12
    _, n = get_video_embeds(model, processor, recs, cache, num_frames=8, version=1)   # vision weights changed
    assert n == 3
    frames, info = load_video(recs[0]["video"], num_frames=8)
    p = process_video(processor, frames, info)
    with torch.no_grad():
        direct = torch.cat(model.model.get_video_features(p["pixel_values_videos"], p["video_grid_thw"]).pooler_output)
    assert torch.equal(vals[0]["embeds"], direct)
    bad = dict(recs[0], video=os.path.join(synth_dir, "nope.mp4"))
    with pytest.raises(VideoError, match="nope.mp4: no such file"):
        get_video_embeds(model, processor, [bad], cache, num_frames=8)


# ----------------------------------------------------------------------------- rollout engine
def _prompts(model, processor, recs, num_frames=8, embeds=None):
    vals, _ = get_video_embeds(model, processor, recs, None, num_frames=num_frames)
    out = []
    for i, (r, v) in enumerate(zip(recs, vals)):
        t = encode_text(processor, r, v["video_grid_thw"], with_target=False)
        out.append(dict(t, embeds=v["embeds"] if embeds is None else embeds[i], video_grid_thw=v["video_grid_thw"],
                        second_per_grid_ts=v["second_per_grid_ts"]))
    return out


# ----------------------------------------------------------------------------- mrope positions
def _cfg_model(model_type, merge=2, tps=2):
    from types import SimpleNamespace
    extra = {"tokens_per_second": tps} if model_type == "qwen2_5_vl" else {}   # Qwen2-VL has no time scale
    vision = SimpleNamespace(spatial_merge_size=merge, **extra)
    return SimpleNamespace(config=SimpleNamespace(model_type=model_type, vision_config=vision))


def test_canonical_rope_index_by_hand():
    """Hand-written positions: 3 text tokens, one video of llm grid 2x2x2 (video_grid_thw (2, 4, 4), merge 2), 2 text.
    Qwen2.5-VL: temporal ids t * tokens_per_second (2) * second_per_grid_ts (1.5) = 0, 3; the text after the video
    continues at max(video positions) + 1 = 3 + 3 + 1 = 7. Qwen2-VL: no time scaling, text after at 3 + 1 + 1 = 5.
    Row 0 is left-padded by 2 (attention_mask 0: positions 0); row 1 has 5 leading text tokens instead of 3."""
    T, V = 0, 2
    types = torch.tensor([[T, T] + [T] * 3 + [V] * 8 + [T] * 2,      # row 0: 2 pads, 3 text, video, 2 text
                          [T] * 5 + [V] * 8 + [T] * 2])               # row 1: 5 text, video, 2 text
    mask = torch.tensor([[0, 0] + [1] * 13, [1] * 15])
    ids = torch.zeros_like(types)
    grid = torch.tensor([[2, 4, 4], [2, 4, 4]])
    sps = torch.tensor([1.5, 1.5])
    vt = [3, 3, 3, 3, 6, 6, 6, 6]          # Qwen2.5-VL temporal
    vh = [3, 3, 4, 4, 3, 3, 4, 4]
    vw = [3, 4, 3, 4, 3, 4, 3, 4]
    want25 = torch.tensor([[0, 1, 2] + vt + [7, 8], [0, 1, 2] + vh + [7, 8], [0, 1, 2] + vw + [7, 8]])
    pos, delta = rope_index(_cfg_model("qwen2_5_vl"), ids, types, grid, sps, attention_mask=mask)
    assert torch.equal(pos[:, 0, 2:], want25) and torch.equal(pos[:, 0, :2], torch.zeros(3, 2, dtype=torch.long))
    # row 1: 5 leading text tokens, so everything after them shifts by 2
    want25_row1 = torch.cat([torch.arange(5).expand(3, 5), want25[:, 3:] + 2], 1)
    assert torch.equal(pos[:, 1], want25_row1)
    assert delta.tolist() == [[9 - 13], [11 - 15]]                  # max + 1 - number of real tokens
    vt2 = [3, 3, 3, 3, 4, 4, 4, 4]          # Qwen2-VL: temporal index t, no time scaling
    want2 = torch.tensor([[0, 1, 2] + vt2 + [5, 6], [0, 1, 2] + vh + [5, 6], [0, 1, 2] + vw + [5, 6]])
    pos2, _ = rope_index(_cfg_model("qwen2_vl"), ids[:1, 2:], types[:1, 2:], grid[:1], sps[:1])
    assert torch.equal(pos2[:, 0], want2)
    with pytest.raises(ValueError, match="more video tokens than video_grid_thw rows"):
        rope_index(_cfg_model("qwen2_5_vl"), ids, types, grid[:1], sps)
    with pytest.raises(ValueError, match="rope rule 'x'"):
        rope_index(_cfg_model("qwen2_5_vl"), ids, types, grid, sps, rule="x")


def test_canonical_positions_on_a_real_sample_and_vs_transformers(tiny_ckpt, synth_dir):
    """4 frames of a synthetic video (256 frames at 8 fps = 32 s): grid (2, 4, 4) -> llm grid 2x2x2 after the 2x2
    merge, second_per_grid_ts = 2 frames / (4 frames / 32 s) = 16 s, so temporal ids 0 and 16 * 2 = 32."""
    model, processor = load_model(tiny_ckpt)
    r = load_records(os.path.join(synth_dir, "val.jsonl"))[0]
    (v,), _ = get_video_embeds(model, processor, [r], None, num_frames=4)
    t = encode_text(processor, r, v["video_grid_thw"], with_target=True)
    assert v["video_grid_thw"].tolist() == [[2, 4, 4]] and v["second_per_grid_ts"].tolist() == [16.0]
    ids, mm = t["input_ids"][None], t["mm_token_type_ids"][None]
    S, vid = ids.shape[1], (mm[0] == 2).nonzero()[:, 0]
    P = int(vid[0])                                               # text tokens before the video
    assert vid.tolist() == list(range(P, P + 8))                  # one block of 8 video tokens
    A = S - P - 8                                                 # text tokens after it
    want = torch.tensor([list(range(P)) + [P] * 4 + [P + 32] * 4 + list(range(P + 33, P + 33 + A)),
                         list(range(P)) + [P, P, P + 1, P + 1] * 2 + list(range(P + 33, P + 33 + A)),
                         list(range(P)) + [P, P + 1] * 4 + list(range(P + 33, P + 33 + A))])
    pos, delta = mrope_positions(model, ids, mm, v["video_grid_thw"], v["second_per_grid_ts"])   # default rule
    assert torch.equal(pos[:, 0], want) and int(delta) == P + 33 + A - S
    # transformers 5.x (the installed get_rope_index) agrees up to the end of the video, then restarts the text
    # at P + max(h, w)/merge = P + 2 instead of P + 33: the text after the video reuses the video's time positions.
    hf, _ = mrope_positions(model, ids, mm, v["video_grid_thw"], v["second_per_grid_ts"], rule="hf")
    assert torch.equal(hf[:, 0, :P + 8], want[:, :P + 8])
    assert torch.equal(hf[:, 0, P + 8:], want[:, P + 8:] - 31)


# ----------------------------------------------------------------------------- rollout engine
def test_hf_engine_greedy_equals_generate(tiny_ckpt, synth_dir):
    """rope_rule="hf": our engine == model.generate (both on transformers' own positions). Canonical rule (the
    default, as vLLM): our engine == a plain teacher-forced forward with canonical positions."""
    model, processor = _perturbed(tiny_ckpt)
    recs = load_records(os.path.join(synth_dir, "val.jsonl"))[:3]
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = _prompts(model, processor, recs)
    out = hf_rollout(model, prompts, n=2, temperature=0, max_new_tokens=20, eos_id=eos, rope_rule="hf")
    seen = set()
    for i, r in enumerate(recs):
        frames, info = load_video(r["video"], num_frames=8)
        b = collate_rl([encode_sample(processor, r, frames, info, with_target=False)], processor.tokenizer.pad_token_id)
        inputs = {k: v for k, v in model_inputs(b, "cpu").items()}
        ref = model.generate(**inputs, do_sample=False, max_new_tokens=20, eos_token_id=eos,
                             pad_token_id=processor.tokenizer.pad_token_id)[0, b["input_ids"].shape[1]:].tolist()
        if eos in ref:
            ref = ref[:ref.index(eos) + 1]
        assert out["token_ids"][2 * i] == ref and out["token_ids"][2 * i + 1] == ref   # both greedy copies
        assert out["finish_reasons"][2 * i] == ("stop" if ref[-1] == eos else "length")
        seen.update(ref)
    assert len(seen) >= 5, "degenerate outputs would make this test vacuous"
    can = hf_rollout(model, prompts, n=1, temperature=0.7, max_new_tokens=20, eos_id=eos,
                     generator=torch.Generator().manual_seed(3))
    greedy = hf_rollout(model, prompts, n=1, temperature=0, max_new_tokens=20, eos_id=eos)
    assert greedy["token_ids"] != [out["token_ids"][2 * i] for i in range(3)]   # the rules differ visibly here
    for i, p in enumerate(prompts):
        for res, T in ((can, 0.7), (greedy, 1.0)):
            is_greedy = res is greedy
            toks = torch.tensor(res["token_ids"][i])
            vp = (toks == model.config.video_token_id).nonzero()
            if len(vp):   # a sampled <|video_pad|> would be taken for a video slot (the RL trap): check the prefix
                toks, res = toks[:int(vp[0])], dict(res, logprobs=[lp[:int(vp[0])] for lp in res["logprobs"]])
            ids = torch.cat([p["input_ids"], toks])[None]
            mm = torch.cat([p["mm_token_type_ids"], torch.zeros_like(toks)])[None]
            pos, _ = mrope_positions(model, ids, mm, p["video_grid_thw"], p["second_per_grid_ts"])
            with torch.no_grad():
                logits = model(inputs_embeds=embed_with_video(model, ids, p["embeds"]), position_ids=pos).logits[0]
            S = p["input_ids"].numel()
            lp = torch.log_softmax(logits[S - 1:-1] / T, -1)
            if is_greedy:                                        # teacher-forced argmax == the engine's tokens
                assert torch.equal(lp.argmax(-1), toks)
            else:                                                # and the engine's T-scaled log-probs
                assert (lp.gather(-1, toks[:, None])[:, 0] - torch.tensor(res["logprobs"][i])).abs().max() < 1e-4


def test_hf_engine_sampling_logprobs_and_stop(tiny_ckpt, synth_dir):
    model, processor = _perturbed(tiny_ckpt)
    recs = load_records(os.path.join(synth_dir, "val.jsonl"))[:2]
    prompts = _prompts(model, processor, recs)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    kw = dict(n=4, temperature=1.0, top_p=0.95, top_k=40, max_new_tokens=12, eos_id=eos)
    a = hf_rollout(model, prompts, generator=torch.Generator().manual_seed(0), tokenizer=processor.tokenizer, **kw)
    b = hf_rollout(model, prompts, generator=torch.Generator().manual_seed(0), **kw)
    c = hf_rollout(model, prompts, generator=torch.Generator().manual_seed(1), **kw)
    assert a["token_ids"] == b["token_ids"] and a["token_ids"] != c["token_ids"]
    assert len(a["token_ids"]) == 8 and len(a["texts"]) == 8
    assert len({tuple(t) for t in a["token_ids"][:4]}) > 1          # the 4 samples of one prompt differ
    # returned logprobs are the temperature-1 log-probs of the sampled tokens: recompute with a forward
    from mrsp import embed_with_video
    p, toks = prompts[0], a["token_ids"][0]
    ids = torch.cat([p["input_ids"], torch.tensor(toks)])[None]
    mm = torch.cat([p["mm_token_type_ids"], torch.zeros(len(toks), dtype=torch.long)])[None]
    pos, _ = mrope_positions(model, ids, mm, p["video_grid_thw"], p["second_per_grid_ts"])
    with torch.no_grad():
        logits = model(inputs_embeds=embed_with_video(model, ids, p["embeds"]), position_ids=pos).logits[0]
    S = p["input_ids"].numel()
    ref = torch.log_softmax(logits[S - 1:-1], -1).gather(-1, torch.tensor(toks)[:, None])[:, 0]
    assert (ref - torch.tensor(a["logprobs"][0])).abs().max() < 1e-4
    for t, f in zip(a["token_ids"], a["finish_reasons"]):
        assert (f == "stop") == (t[-1] == eos) and (f == "stop" or len(t) == 12)


def _cached_rollout_worker(ckpt, synth_dir):
    """Embeddings encoded in parallel over 2 ranks through the cache, then sampled rollouts."""
    import torch.distributed as dist
    model, processor = _perturbed(ckpt)
    recs = load_records(os.path.join(synth_dir, "val.jsonl"))[:2]
    cache = EmbeddingCache()
    vals, _ = get_video_embeds(model, processor, recs, cache, num_frames=8, group=dist.group.WORLD)
    prompts = _prompts(model, processor, recs, embeds=[v["embeds"] for v in vals])
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return hf_rollout(model, prompts, n=3, temperature=1.0, max_new_tokens=10, eos_id=eos,
                      generator=torch.Generator().manual_seed(5))["token_ids"]


def test_rollouts_from_cache_equal_rollouts_from_pixels(tiny_ckpt, synth_dir):
    model, processor = _perturbed(tiny_ckpt)
    recs = load_records(os.path.join(synth_dir, "val.jsonl"))[:2]
    embeds = []
    for r in recs:  # the naive path: the vision tower on this prompt's own pixels
        p = process_video(processor, *load_video(r["video"], num_frames=8))
        with torch.no_grad():
            embeds.append(torch.cat(model.model.get_video_features(p["pixel_values_videos"],
                                                                   p["video_grid_thw"]).pooler_output))
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ref = hf_rollout(model, _prompts(model, processor, recs, embeds=embeds), n=3, temperature=1.0, max_new_tokens=10,
                     eos_id=eos, generator=torch.Generator().manual_seed(5))["token_ids"]
    for out in run_distributed(_cached_rollout_worker, 2, args=(tiny_ckpt, synth_dir)):
        assert out == ref


def test_too_long_for_the_model_is_a_clear_error(tiny_ckpt, synth_dir):
    model, processor = load_model(tiny_ckpt)
    model.config.text_config.max_position_embeddings = 64
    recs = load_records(os.path.join(synth_dir, "val.jsonl"))[:1]
    with pytest.raises(ValueError, match="max_position_embeddings=64.*fewer frames"):
        hf_rollout(model, _prompts(model, processor, recs), n=1, temperature=0, max_new_tokens=2)
    p = _prompts(model, processor, recs)[0]
    p["embeds"] = p["embeds"][:-1]
    model.config.text_config.max_position_embeddings = 32768
    with pytest.raises(ValueError, match="<|video_pad|> tokens but .* video embeddings"):
        hf_rollout(model, [p], n=1, temperature=0, max_new_tokens=2)


# ----------------------------------------------------------------------------- sequence-parallel forward
def _sft_seq(ckpt, synth_dir, i=0, frames=8):
    model, processor = load_model(ckpt)
    r = load_records(os.path.join(synth_dir, "val.jsonl"))[i]
    (v,), _ = get_video_embeds(model, processor, [r], None, num_frames=frames)
    t = encode_text(processor, r, v["video_grid_thw"], with_target=True)
    return dict(input_ids=t["input_ids"], mm_token_type_ids=t["mm_token_type_ids"], embeds=v["embeds"],
                video_grid_thw=v["video_grid_thw"], second_per_grid_ts=v["second_per_grid_ts"],
                loss_mask=t["labels"] != -100)


def _one_rank_reference(ckpt, seq, temperature=1.0):
    """Plain HF forward on the whole sequence (full logits), loss = mean NLL over the scored tokens."""
    from mrsp import embed_with_video
    model, _ = load_model(ckpt)
    model.model.visual.requires_grad_(False)
    ids = seq["input_ids"][None]
    pos, _ = mrope_positions(model, ids, seq["mm_token_type_ids"][None], seq["video_grid_thw"],
                             seq["second_per_grid_ts"])
    logits = model(inputs_embeds=embed_with_video(model, ids, seq["embeds"]), position_ids=pos).logits[0] / temperature
    logp_all = torch.log_softmax(logits[:-1].float(), -1)
    lp = torch.cat([torch.zeros(1), logp_all.gather(-1, ids[0, 1:, None])[:, 0]])
    m = seq["loss_mask"]
    lp = torch.where(m, lp, torch.zeros_like(lp))
    ent = torch.cat([torch.zeros(1), -(logp_all.exp() * logp_all).sum(-1)])
    loss = -(lp.sum() / m.sum())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), torch.where(m, ent, torch.zeros_like(ent)).detach(), loss.item(), grads


def _sp_worker(ckpt, seq, impl, temperature):
    import torch.distributed as dist
    from mrsp import sp_logprobs
    model, _ = load_model(ckpt)
    model.model.visual.requires_grad_(False)
    lp, ent = sp_logprobs(model, seq, group=dist.group.WORLD, impl=impl, logit_chunk=7, temperature=temperature,
                          return_entropy=True)
    loss = -(lp.sum() / seq["loss_mask"].sum())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)   # each SP rank holds the gradient of its own tokens
    return lp.detach(), ent, loss.item(), grads


@pytest.mark.parametrize("world,impl", [(2, "ring"), (3, "ring"), (2, "ulysses")])
def test_sp_logprobs_loss_and_grads_equal_one_rank(tiny_ckpt, synth_dir, world, impl):
    seq = _sft_seq(tiny_ckpt, synth_dir)
    T = 0.7   # rollout temperature is applied to the recomputed log-probs too
    ref_lp, ref_ent, ref_loss, ref_g = _one_rank_reference(tiny_ckpt, seq, T)
    assert int(seq["loss_mask"].sum()) > 20 and len(ref_g) > 10
    for lp, ent, loss, grads in run_distributed(_sp_worker, world, args=(tiny_ckpt, seq, impl, T)):
        assert (lp - ref_lp).abs().max() <= 1e-5
        assert (ent - ref_ent).abs().max() <= 1e-4
        assert abs(loss - ref_loss) <= 1e-5
        assert set(grads) == set(ref_g)
        for n in ref_g:
            assert (grads[n] - ref_g[n]).abs().max() <= 1e-5, n


def _fsdp_worker(ckpt, seq, sp):
    from mrsp import prepare_model, sp_logprobs
    model, _ = load_model(ckpt)
    mesh = setup_mesh(sp)
    prepare_model(model, mesh, freeze_vision=True, activation_checkpointing=True)
    lp = sp_logprobs(model, seq, group=mesh.sp_group)
    # global token-mean: SP ranks share one sequence; with DP=2 both ranks see this sequence -> 2x tokens
    loss = -(lp.sum() / (seq["loss_mask"].sum() * mesh.dp_size))
    loss.backward()
    frozen = all(p.grad is None for p in model.model.visual.parameters())
    return {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}, frozen


def _untied_worker(ckpt, seq):
    """SP=2 + FSDP2 with an untied LM head (as the 7B): the response sits in rank 0's last zigzag chunk, so rank 1
    scores no token -- its head must still get a (zero) gradient, or the ranks' reduce-scatters differ in size."""
    from mrsp import prepare_model, sp_logprobs
    model, _ = load_model(ckpt)
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())   # its own parameter now
    mesh = setup_mesh(2)
    prepare_model(model, mesh, freeze_vision=True)
    lp = sp_logprobs(model, seq, group=mesh.sp_group)
    (-lp.sum()).backward()
    g = model.lm_head.weight.grad
    return float(g.full_tensor().abs().sum())


def test_untied_head_with_no_scored_token_on_a_rank(tiny_ckpt, synth_dir):
    seq = _sft_seq(tiny_ckpt, synth_dir)
    n = seq["input_ids"].numel()
    seq["loss_mask"] = torch.zeros(n, dtype=torch.bool)
    seq["loss_mask"][-2:] = True                                   # two scored tokens, both in rank 0's last chunk
    for head_grad in run_distributed(_untied_worker, 2, args=(tiny_ckpt, seq), timeout=180):
        assert head_grad > 0                                       # rank 0's tokens reach the (summed) head gradient


@pytest.mark.parametrize("sp", [2, 1])
def test_fsdp2_sp2_and_dp2_match_one_rank(tiny_ckpt, synth_dir, sp):
    """FSDP2 over the (dp, sp) mesh + activation checkpointing: gradients equal the one-rank gradients."""
    seq = _sft_seq(tiny_ckpt, synth_dir)
    _, _, _, ref_g = _one_rank_reference(tiny_ckpt, seq)
    for grads, frozen in run_distributed(_fsdp_worker, 2, args=(tiny_ckpt, seq, sp)):
        assert frozen and set(grads) == set(ref_g)
        for n in ref_g:
            assert (grads[n] - ref_g[n]).abs().max() <= 1e-5, n


def _accumulate(model, seqs, group, gathered, scale):
    """Two SGD steps, each accumulating over the 3 sequences as rl.py / sft.py do. -> (step-0 grads of the optimizer's
    params, the losses of both steps, what the first micro-batch left behind: (layer weight still gathered, any grad
    reduced))."""
    from mrsp import fsdp_gathered, sp_logprobs
    params = [p for p in model.parameters() if p.requires_grad]   # what the optimizer holds (sharded under FSDP)
    opt = torch.optim.SGD(params, lr=0.5)
    w = lambda: model.model.language_model.layers[0].mlp.up_proj.weight   # noqa: E731 (the registered parameter)
    losses, after_first = [], None
    for step in range(2):
        with fsdp_gathered(model, gathered) as grad_sync:
            for k, seq in enumerate(seqs):
                loss = -sp_logprobs(model, seq, group=group).sum() / scale
                grad_sync(last=k == len(seqs) - 1)
                loss.backward()
                losses.append(loss.item())
                if step == 0 and k == 0:
                    after_first = (not hasattr(w(), "full_tensor"), any(p.grad is not None for p in params))
        if step == 0:
            grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grads, losses, after_first


def _gathered_worker(ckpt, seqs, sp, gathered):
    from mrsp import prepare_model
    model, _ = load_model(ckpt)
    mesh = setup_mesh(sp)
    prepare_model(model, mesh, freeze_vision=True)
    scale = sum(int(s["loss_mask"].sum()) for s in seqs) * mesh.dp_size   # DP=2: both ranks see all 3 sequences
    grads, losses, after_first = _accumulate(model, seqs, mesh.sp_group, gathered, scale)
    return grads, [x * mesh.dp_size for x in losses], after_first        # each DP rank holds half of each loss


@pytest.mark.parametrize("sp", [2, 1])
def test_fsdp_gathered_accumulation_matches_one_rank(tiny_ckpt, synth_dir, sp):
    """fsdp_gathered (params all-gathered once, grads reduce-scattered once per accumulation): the same gradients and
    the same next-step losses as one unsharded rank (a stale gathered copy after opt.step would change the losses),
    and it really skips the per-micro-batch collectives (FSDP's default reshards and reduces after each backward)."""
    seqs = [_sft_seq(tiny_ckpt, synth_dir, i) for i in range(3)]
    model, _ = load_model(tiny_ckpt)
    model.model.visual.requires_grad_(False)
    ref_g, ref_losses, _ = _accumulate(model, seqs, None, True, sum(int(s["loss_mask"].sum()) for s in seqs))
    assert min(abs(a - b) for a, b in zip(ref_losses[:3], ref_losses[3:])) > 1e-3   # the step moved every loss
    for gathered in (True, False):
        results = run_distributed(_gathered_worker, 2, args=(tiny_ckpt, seqs, sp, gathered))
        for grads, losses, (kept, reduced) in results:
            assert kept == gathered and reduced == (not gathered)
            assert len(grads) == len(ref_g)
            for g, r in zip(grads, ref_g):
                assert (g - r).abs().max() <= 1e-5
            assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-5


def _sync_worker(ckpt, seq):
    from mrsp import prepare_model, sp_logprobs, sync_weights
    model, _ = load_model(ckpt)
    engine, _ = load_model(ckpt)                       # the rollout copy (unsharded, every rank)
    mesh = setup_mesh(2)
    prepare_model(model, mesh, freeze_vision=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = -sp_logprobs(model, seq, group=mesh.sp_group).sum()
    loss.backward()
    opt.step()
    before = engine.lm_head.weight.clone()
    n = sync_weights(model, engine)
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    diff = max((engine.state_dict()[k] - full[k]).abs().max().item() for k in full)
    # a copy that holds only the vision tower (rl.py --engine=vllm): the gathers still run on every rank, only the
    # tensors it holds are copied
    vis, _ = load_model(ckpt)
    vis.model.language_model.to("meta")
    vis.lm_head.to("meta")
    n_vis = sync_weights(model, vis)
    held = [k for k, v in vis.state_dict().items() if not v.is_meta]
    vis_diff = max((vis.state_dict()[k] - full[k]).abs().max().item() for k in held)
    return n, diff, (engine.lm_head.weight - before).abs().max().item(), n_vis, len(held), vis_diff


def test_sync_weights_from_fsdp_policy(tiny_ckpt, synth_dir):
    seq = _sft_seq(tiny_ckpt, synth_dir)
    for n, diff, moved, n_vis, held, vis_diff in run_distributed(_sync_worker, 2, args=(tiny_ckpt, seq)):
        assert n > 20 and diff == 0.0 and moved > 1e-4      # the copy changed and now equals the policy
        assert 0 < n_vis == held < n and vis_diff == 0.0
