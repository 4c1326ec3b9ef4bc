"""Image records (one or several images, and images beside a video) through every stage: the cached image features
and the pixel path give the model's own HF forward on pixels (Qwen2.5-VL, and Qwen3-VL with DeepStack), SP=2 == SP=1
(parallel encode of the images, each rank's DeepStack slice), positions against transformers' get_rope_index, HF engine
greedy == model.generate, the per-image cache round trip, bad image paths, and one SFT step, one RL step and an eval
on prepare.py's synthetic image set through the stage scripts' command lines (the vLLM engine on image records:
tests/test_vllm_engine.py).

    python -m pytest -q tests/test_images.py
"""
import json
import os

import numpy as np
import pytest
import torch

import data
import reward
from data import VideoError
from dist_utils import run_distributed
from mrsp import (EmbeddingCache, build_seq, get_video_embeds, hf_rollout, load_model, mrope_positions, rope_index,
                  sp_logprobs, split_vision)
from test_mrsp import _perturbed   # noise on the LM: varied log-probs and greedy outputs

FAMS = ("qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def img_env(tmp_path_factory):
    """prepare.py's image set (4/2/2 questions: one picture or two), the tiny Qwen2.5-VL and Qwen3-VL on its text, and
    three records: one image, two images, and one image beside an 8-frame video (mixed)."""
    from prepare import generate_images, init_tiny, write_mp4
    root = tmp_path_factory.mktemp("images")
    d = str(root / "img")
    generate_images(d, n_train=4, n_val=2, n_test=2, seed=0)
    ckpts = {f: str(root / f) for f in FAMS}
    for f in FAMS:
        init_tiny(ckpts[f], d, seed=0, family=f)
    write_mp4(str(root / "v.mp4"), np.random.default_rng(0).integers(0, 255, (8, 56, 56, 3), dtype=np.uint8), 4.0)
    one, two = data.load_records(f"{d}/train.jsonl")[:2]
    (mixed,) = data.load_records(_write(root / "mixed.jsonl", [dict(
        id="mx", images=[one["images"][0]], video=str(root / "v.mp4"), question=one["question"],
        options=[o[3:] for o in one["options"]], answer=one["answer"], reasoning=one["reasoning"])]))
    assert [len(r["images"]) for r in (one, two, mixed)] == [1, 2, 1] and data.record_media(mixed) == "mixed"
    return d, ckpts, dict(one=one, two=two, mixed=mixed)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _hf_inputs(processor, rec, fam):
    """The model's own inputs from pixels (images, and the video of a mixed record)."""
    out = dict(data.image_inputs(processor, rec))
    if rec["videos"]:
        vx = data.video_inputs(processor, rec, num_frames=4)
        out.update(pixel_values_videos=vx["pixel_values_videos"], video_grid_thw=vx["video_grid_thw"])
        if fam == "qwen2_5_vl":
            out["second_per_grid_ts"] = vx["second_per_grid_ts"]
    return out


# ----------------------------------------------------------------------------- one process: HF forward, positions
@pytest.mark.parametrize("fam", FAMS)
def test_image_logprobs_equal_the_hf_pixel_forward(img_env, fam):
    """build_seq from cached image features and from pixels (the trainable-tower path: images and video in one tower
    call) give the log-probs of the model's own HF forward on pixels; positions equal transformers' get_rope_index for
    image records (and for Qwen3-VL's mixed one; Qwen2.5-VL's differ only after the video: transformers 5.x's rule)."""
    _, ckpts, recs = img_env
    model, processor = _perturbed(ckpts[fam])
    for name, rec in recs.items():
        cache = EmbeddingCache(1 << 26)
        with torch.no_grad():
            seq = build_seq(rec, processor, model, cache, frames=4)
            pix = build_seq(rec, processor, None, frames=4)
            lp, lp_pix = sp_logprobs(model, seq), sp_logprobs(model, pix)
        assert torch.equal(seq["input_ids"], pix["input_ids"]) and "pixel_values" in pix
        assert seq["image_grid_thw"].shape == (len(rec["images"]), 3)
        assert cache.stats["misses"] == len(rec["images"]) + len(rec["videos"])
        ids, mm = seq["input_ids"][None], seq["mm_token_type_ids"][None]
        hf = _hf_inputs(processor, rec, fam)
        assert torch.equal(hf["image_grid_thw"], seq["image_grid_thw"])
        pos, _ = mrope_positions(model, ids, mm, seq["video_grid_thw"], seq["second_per_grid_ts"],
                                 image_grid_thw=seq["image_grid_thw"])
        hf_pos, _ = rope_index(model, ids, mm, hf.get("video_grid_thw"), seq["second_per_grid_ts"] if rec["videos"]
                               else None, image_grid_thw=hf["image_grid_thw"], rule="hf")
        if name == "mixed" and fam == "qwen2_5_vl":   # equal up to the video's last token, shifted after it
            last = int((ids[0] == model.config.video_token_id).nonzero().max())
            assert torch.equal(pos[..., :last + 1], hf_pos[..., :last + 1]) and not torch.equal(pos, hf_pos)
        else:
            assert torch.equal(pos, hf_pos), name
        with torch.no_grad():
            logits = model(input_ids=ids, mm_token_type_ids=mm, position_ids=pos, **hf).logits[0].float()
        ref = torch.cat([torch.zeros(1), torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]])
        m = seq["loss_mask"]
        assert int(m.sum()) > 10
        assert (lp[m] - ref[m]).abs().max() <= 1e-5, name
        assert (lp_pix[m] - ref[m]).abs().max() <= 1e-5, name
    # the pixel path's one tower call takes whatever media a record has: its video alone too
    vid = dict(recs["mixed"], id="v", images=[], video=recs["mixed"]["videos"][0])
    with torch.no_grad():
        a, b = (build_seq(vid, processor, m, frames=4) for m in (model, None))
        assert (sp_logprobs(model, a) - sp_logprobs(model, b)).abs().max() <= 1e-5
    # the pictures matter (another image moves the log-probs), and for Qwen3-VL so do their DeepStack features
    rec = recs["one"]
    with torch.no_grad():
        seq = build_seq(rec, processor, model, frames=4)
        lp = sp_logprobs(model, seq)
        other = sp_logprobs(model, dict(seq, image_embeds=seq["image_embeds"].flip(0)))
        assert (other - lp)[seq["loss_mask"]].abs().max() > 1e-4
        if fam == "qwen3_vl":
            vis, deep = split_vision(model, seq["image_embeds"])
            no_deep = sp_logprobs(model, dict(seq, image_embeds=torch.cat([vis] + [torch.zeros_like(d) for d in deep],
                                                                          -1)))
            assert (no_deep - lp)[seq["loss_mask"]].abs().max() > 1e-4


# ----------------------------------------------------------------------------- SP=2
def _sp2_worker(jobs):
    """Both families' SP=2 work in one pair of gloo processes: build_seq with the images encoded in parallel over the
    group (through a cache), then the SP forward."""
    import torch.distributed as dist
    out = {}
    for fam, (ckpt, recs) in jobs.items():
        model, processor = load_model(ckpt)
        cache = EmbeddingCache(1 << 26)
        with torch.no_grad():
            for name, rec in recs.items():
                seq = build_seq(rec, processor, model, cache, frames=4, group=dist.group.WORLD)
                out[fam, name] = (seq["image_embeds"], sp_logprobs(model, seq, group=dist.group.WORLD, logit_chunk=7))
        out[fam, "cache"] = cache.summary()
    return out


def test_sp2_image_logprobs_equal_sp1(img_env):
    """SP=2: the images are encoded in parallel (one rank each for the two-image record; features all-gathered) and
    each rank fills, and adds the DeepStack features of, exactly its own image slots: == SP=1 on both ranks."""
    _, ckpts, recs = img_env
    res = run_distributed(_sp2_worker, 2, args=({f: (ckpts[f], recs) for f in FAMS},))
    for fam in FAMS:
        model, processor = load_model(ckpts[fam])
        for name, rec in recs.items():
            with torch.no_grad():
                seq = build_seq(rec, processor, model, frames=4)
                lp1 = sp_logprobs(model, seq)
            for r in res:
                emb, lp2 = r[fam, name]
                assert emb.shape == seq["image_embeds"].shape and (emb - seq["image_embeds"]).abs().max() <= 1e-5
                assert (lp2 - lp1).abs().max() <= 1e-5, (fam, name)
        # the one-image and mixed records share their picture: encoded once, on both ranks' caches alike
        assert res[0][fam, "cache"] == res[1][fam, "cache"] and res[0][fam, "cache"]["hits"] == 1


# ----------------------------------------------------------------------------- micro-batches (sft.py --micro_batch)
def _batch_seqs(model, processor, recs, pixels=False):
    """Sequences of every kind and length, for one right-padded forward: one image, two images, image + video, the
    video alone with a stray <|image_pad|> in its answer (a token there: the sequence has no image features), and
    text only. pixels: the trainable-tower path (each sequence's pixels encoded in the forward)."""
    out = [build_seq(r, processor, None if pixels else model, EmbeddingCache(1 << 26), frames=4)
           for r in (recs["one"], recs["two"], recs["mixed"], dict(recs["mixed"], images=[]),
                     dict(recs["one"], images=[]))]
    stray = out[3]["input_ids"].clone()
    stray[-3] = model.config.image_token_id
    out[3]["input_ids"] = stray
    assert len({int(s["input_ids"].numel()) for s in out}) >= 3   # really padded
    return out


def _batch_vs_each(model, seqs, group=None):
    """-> (log-probs one sequence at a time, in one micro-batch; the two loss gradients)"""
    grads, lps = [], []
    for batched in (False, True):
        model.zero_grad(set_to_none=True)
        lp = sp_logprobs(model, seqs, group=group, logit_chunk=7) if batched else [
            sp_logprobs(model, s, group=group, logit_chunk=7) for s in seqs]
        (-sum(x.sum() for x in lp) / sum(int(s["loss_mask"].sum()) for s in seqs)).backward()   # sft.py's token mean
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        lps.append([x.detach() for x in lp])
    return lps, grads


def _micro_batch_worker(jobs):
    import torch.distributed as dist
    out = {}
    for fam, (ckpt, recs) in jobs.items():
        model, processor = _perturbed(ckpt)
        model.model.visual.requires_grad_(False)
        (one, batch), (g1, gb) = _batch_vs_each(model, _batch_seqs(model, processor, recs), group=dist.group.WORLD)
        for g in (g1, gb):
            for v in g.values():
                dist.all_reduce(v)   # each SP rank holds the gradient of its own tokens
        out[fam] = (one, batch, g1, gb)
    return out


def test_micro_batch_logprobs_and_grads_equal_one_sequence_at_a_time(img_env):
    """sp_logprobs on a LIST of sequences (one right-padded forward; sft.py --micro_batch) == each sequence alone, in
    log-probs and gradients: images, two images, image + video, video alone with a stray <|image_pad|> that stays
    text, text only; cached features (frozen tower) and pixels (trainable tower, its gradients too); Qwen2.5-VL and
    Qwen3-VL (each row's DeepStack features at its own slots); SP=1 and SP=2 (a batch sharded over the ring)."""
    _, ckpts, recs = img_env
    ref = {}
    for fam in FAMS:
        model, processor = _perturbed(ckpts[fam])
        for pixels in (False, True):
            model.model.visual.requires_grad_(pixels)
            (one, batch), (g1, gb) = _batch_vs_each(model, _batch_seqs(model, processor, recs, pixels))
            assert [x.shape for x in one] == [x.shape for x in batch]
            assert max((a - b).abs().max() for a, b in zip(one, batch)) <= 1e-5, (fam, pixels)
            assert set(g1) == set(gb) and any("visual" in n for n in g1) == pixels
            for n in g1:
                assert (g1[n] - gb[n]).abs().max() <= 1e-5, (fam, pixels, n)
            if not pixels:
                ref[fam] = one
        # not vacuous: the batch holds distinct answers, and a row reading another row's features would move them
        assert len({round(float(x.sum()), 3) for x in ref[fam]}) == len(ref[fam])
    res = run_distributed(_micro_batch_worker, 2, args=({f: (ckpts[f], recs) for f in FAMS},))
    for fam in FAMS:
        for one, batch, g1, gb in (r[fam] for r in res):
            assert max((a - b).abs().max() for a, b in zip(batch, ref[fam])) <= 1e-5, fam   # SP=2 batch == SP=1
            for n in g1:
                assert (g1[n] - gb[n]).abs().max() <= 1e-5, (fam, n)


# ----------------------------------------------------------------------------- HF engine, cache, errors
@pytest.mark.parametrize("fam", FAMS)
def test_hf_engine_greedy_equals_generate(img_env, fam):
    """Our engine (cached image features, one prefill with DeepStack, KV replicated) == model.generate on pixels."""
    _, ckpts, recs = img_env
    model, processor = _perturbed(ckpts[fam])
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    seen = set()
    for rec in (recs["one"], recs["two"]):
        prompt = build_seq(rec, processor, model, frames=4, with_target=False)
        out = hf_rollout(model, [prompt], n=2, temperature=0, max_new_tokens=12, eos_id=eos)
        ids = prompt["input_ids"][None]
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=
                             prompt["mm_token_type_ids"][None], **data.image_inputs(processor, rec), do_sample=False,
                             max_new_tokens=12, eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        ref = ref.tolist()
        if eos in ref:
            ref = ref[:ref.index(eos) + 1]
        assert out["token_ids"] == [ref, ref]
        seen.update(ref)
    assert len(seen) >= 4, "degenerate outputs would make this test vacuous"


def test_image_cache_round_trip(img_env, tmp_path):
    """Each image is one cache entry keyed by its file + the image processor's size settings: encoded once, served
    from memory and, after eviction, from disk; bytes counted; a record's images concatenated in its order."""
    _, ckpts, recs = img_env
    model, processor = load_model(ckpts["qwen3_vl"])
    two = recs["two"]
    cache = EmbeddingCache(budget_bytes=1, spill_dir=str(tmp_path / "spill"))   # holds one entry: the other spills
    with torch.no_grad():
        first, n1 = get_video_embeds(model, processor, [two, recs["one"]], cache)
        again, n2 = get_video_embeds(model, processor, [two], cache)
    assert (n1, n2) == (3, 0) and cache.stats["spills"] >= 1 and cache.stats["disk_hits"] >= 1
    v = first[0]
    assert set(v) == {"embeds", "video_grid_thw", "second_per_grid_ts", "image_embeds", "image_grid_thw"}
    assert v["video_grid_thw"].shape == (0, 3) and v["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
    assert v["image_embeds"].shape == (8, 128 * 3)   # 4 tokens per picture, embedding + 2 DeepStack features
    for a, b in zip(first[:1], again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    entry = cache.get(f"{data.image_key(two['images'][1], processor)}|v=0")
    assert torch.equal(entry["image_embeds"], v["image_embeds"][4:])   # the second picture: the record's rows 4..7
    assert EmbeddingCache.nbytes(entry) == sum(x.numel() * x.element_size() for x in entry.values())
    # the key: the file and the processor's image size settings (another size, another entry)
    key = data.image_key(two["images"][0], processor)
    assert key.startswith("image|" + two["images"][0]) and "longest_edge=" in key
    processor.image_processor.size["longest_edge"] *= 4
    assert data.image_key(two["images"][0], processor) != key


def test_bad_image_paths(img_env, tmp_path):
    """A missing image stops before any model work naming the data file, the line, the field and the file; an
    unreadable one when it is read, naming the same."""
    d, _, recs = img_env
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = _write(tmp_path / "bad.jsonl", [
        {"id": "ok", "images": [f"{d}/images/train_00000_0.png"], "question": "What?", "options": ["x", "y"],
         "answer": "A"},
        {"id": "gone", "images": ["nope.png"], "question": "What?", "options": ["x", "y"], "answer": "A"},
        {"id": "broken", "images": ["broken.png"], "question": "What?", "options": ["x", "y"], "answer": "A"}])
    ok, gone, broken = data.load_records(path)
    with pytest.raises(VideoError, match=rf"record 'gone': {tmp_path}/nope.png: no such file \({path}:2, field "
                                         rf"'images'"):
        data.check_videos([ok, gone], where=f"--data={path}")
    assert data.check_videos([gone], skip_bad=True)[1][0]["reason"].endswith(f"({path}:2, field 'images')")
    processor = load_model(img_env[1]["qwen2_5_vl"])[1]
    with pytest.raises(VideoError, match=rf"broken.png: cannot read image of record 'broken' \({path}:3, field "
                                         rf"'images'\)"):
        build_seq(broken, processor, None)


def test_sampled_image_pad_is_cut_from_a_response(img_env):
    """A sampled <|image_pad|> would be taken for an image slot by every forward: rl.py cuts the response before it
    and scores it 0, as a sampled <|video_pad|>."""
    import rl
    _, ckpts, recs = img_env
    model, processor = load_model(ckpts["qwen2_5_vl"])
    tok = processor.tokenizer
    good = tok("<think>x</think><answer>A</answer>", add_special_tokens=False)["input_ids"]
    pads = (model.config.video_token_id, model.config.image_token_id)
    r = rl.finish_response(good[:3] + [model.config.image_token_id] + good[3:], "stop", [0.0] * (len(good) + 1),
                           recs["one"], tok, pads)
    assert r["cut"] and r["tokens"] == good[:3] and r["total"] == 0.0 and r["finish"] == "video_pad"
    assert not rl.finish_response(good, "stop", [0.0] * len(good), recs["one"], tok, pads)["cut"]


def test_image_pad_fills_a_slot_only_in_a_sequence_with_images(img_env):
    """mrsp.vision_slots: without image features (a video or text record) an <|image_pad|> id is a text token, as in
    the HF forward without pixel_values -- a video record's response that samples one is neither cut nor an error;
    with image features every <|image_pad|> is a slot and the counts must match."""
    from mrsp import embed_with_video
    _, ckpts, _ = img_env
    model, _ = load_model(ckpts["qwen2_5_vl"])
    c = model.config
    ids = torch.tensor([[5, c.video_token_id, c.video_token_id, 7, c.image_token_id, 9]])
    vid, img = torch.randn(2, c.text_config.hidden_size), torch.randn(1, c.text_config.hidden_size)
    plain = model.model.get_input_embeddings()(ids)
    e = embed_with_video(model, ids, vid)                       # no images: the image pad keeps its token embedding
    assert torch.equal(e[0, 4], plain[0, 4]) and torch.equal(e[0, 1:3], vid)
    e = embed_with_video(model, ids, vid, img)                  # with images: it is a slot
    assert torch.equal(e[0, 4], img[0]) and torch.equal(e[0, 1:3], vid)
    with pytest.raises(ValueError, match="1 <.image_pad.> tokens but 2 image embeddings"):
        embed_with_video(model, ids, vid, torch.cat([img, img]))


def test_image_generator_is_deterministic(img_env, tmp_path):
    from prepare import generate_images
    d = img_env[0]
    generate_images(str(tmp_path), n_train=4, n_val=2, n_test=2, seed=0)
    for split in ("train", "val", "test"):
        assert open(f"{d}/{split}.jsonl").read() == open(tmp_path / f"{split}.jsonl").read()
    for f in os.listdir(f"{d}/images"):
        assert open(f"{d}/images/{f}", "rb").read() == open(tmp_path / "images" / f, "rb").read()
    recs = data.load_records(f"{d}/train.jsonl")
    assert [r["category"] for r in recs] == ["spatial", "pair"] * 2 and {r["answer"] for r in recs} == {"A", "B"}
    assert all(reward.score_answer(data.format_target(r), r)["correct"] for r in recs)


# ----------------------------------------------------------------------------- the stage scripts
def test_sft_rl_eval_on_image_records(img_env, tmp_path):
    """One SFT step (trainable tower: image pixels encoded in the forward), one RL step (MR-SP loop, HF engine, frozen
    tower: cached image features) and an eval on one- and two-picture records (eval.py --engine=vllm refusing an image
    record by name: tests/test_tasks.py)."""
    from test_tasks import sft_rl_eval
    d, ckpts, _ = img_env
    _, m, res = sft_rl_eval(ckpts["qwen2_5_vl"], d, tmp_path)
    assert m["cache_misses"] >= 2 and m["vision_passes"] >= 2
    assert res["n"] == 2 and res["n_bad"] == 0 and set(res["by_category"]) == {"spatial", "pair"}


def test_naive_loop_reencodes_images_per_request(img_env, monkeypatch, tmp_path):
    """--loop=naive with image records: every rollout request encodes its own pictures (and video), yet the same seed
    draws the same tokens as MR-SP's cached features with one shared prefill; then one naive RL step end to end (old /
    ref / update forwards from image pixels)."""
    import rl
    from mrsp import rollout
    from test_tasks import _run
    d, ckpts, recs = img_env
    for k, v in dict(group_size=3, max_new_tokens=10, temperature=1.0, top_p=1.0, top_k=0, frames=4).items():
        monkeypatch.setattr(rl, k, v)
    model, processor = _perturbed(ckpts["qwen2_5_vl"])
    tok, seen = processor.tokenizer, set()
    for rec in (recs["two"], recs["mixed"]):
        px = rl.load_pixels(rec, processor)
        prompt = rl.prompt_of(rec, processor, px)
        naive, _ = rl.naive_rollouts(model, None, prompt, px, 11, tok, "cpu")
        (vals,), _ = get_video_embeds(model, processor, [rec], EmbeddingCache(), num_frames=4)
        (cached,) = rollout([rl.with_features(prompt, vals)], 3, [11], 1.0, 10, tok, model=model)
        assert [t for t, _, _ in naive] == [t for t, _, _ in cached]
        assert max(abs(a - b) for (_, _, x), (_, _, y) in zip(naive, cached) for a, b in zip(x, y)) <= 1e-5
        seen.update(tuple(t) for t, _, _ in naive)
    assert len(seen) == 6                                                   # sampled, all different
    _run("rl.py", f"--model={ckpts['qwen2_5_vl']}", f"--data={d}/train.jsonl", "--val_data=", f"--out_dir={tmp_path}",
         "--steps=1", "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=6", "--kl_coef=0.05", "--loop=naive")
    m = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")][-1]
    assert m["step"] == 1 and m["vision_passes"] >= 2 * 2 and np.isfinite(m["loss"])
