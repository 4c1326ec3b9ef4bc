"""Tiny checkpoint, prompts, SFT labels, collation, model loading, the gloo helper and the CLIs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from data import (INSTRUCTION, SampleTooLongError, collate_rl, collate_sft, encode_sample, format_target,
                  load_records, load_video, model_inputs)
from dist_utils import run_distributed
from mrsp import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    return model, AutoProcessor.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def samples(synth_dir, loaded):
    _, processor = loaded
    recs = load_records(os.path.join(synth_dir, "val.jsonl"))[:2]
    out = []
    for r in recs:
        frames, info = load_video(r["video"], num_frames=8)
        out.append((r, frames, info))
    return out


def test_tiny_checkpoint_is_a_standard_hf_checkpoint(tiny_ckpt, loaded):
    model, processor = loaded
    files = set(os.listdir(tiny_ckpt))
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "processor_config.json"} <= files
    cfg = json.load(open(os.path.join(tiny_ckpt, "config.json")))
    assert cfg["model_type"] == "qwen2_5_vl" and cfg["text_config"]["num_key_value_heads"] == 2
    n = sum(p.numel() for p in model.parameters())
    assert 0.3e6 < n < 3e6, n
    tok = processor.tokenizer
    specials = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>",
                "<|endoftext|>")
    ids = [tok.convert_tokens_to_ids(t) for t in specials]
    assert len(set(ids)) == len(specials)                      # each a real, distinct vocabulary entry
    for t, i in zip(specials, ids):
        assert tok(t, add_special_tokens=False).input_ids == [i]   # never split by the BPE
    assert model.config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    # byte-level BPE: arbitrary text round-trips
    s = "Ünïcode & <think>x</think> 123"
    assert tok.decode(tok(s).input_ids) == s


def test_chat_template_and_video_tokens(samples, loaded):
    from data import build_prompt
    _, processor = loaded
    rec, frames, info = samples[0]
    text = build_prompt(processor, rec)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|video_pad|><|vision_end|>" + rec["question"])
    assert "\n".join(rec["options"]) in text and INSTRUCTION in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    s = encode_sample(processor, rec, frames, info, with_target=False)
    n_video = int((s["input_ids"] == processor.video_token_id).sum())
    assert n_video == (8 // 2) * (56 // 28) ** 2          # T/2 * (H/28) * (W/28) at 56x56
    assert s["video_grid_thw"].tolist() == [[4, 4, 4]]
    assert (s["mm_token_type_ids"] == 2).sum() == n_video
    # mrope time scale comes from the real sampling rate (8 of 256 frames over 32 s -> 0.25 fps)
    assert s["second_per_grid_ts"].item() == pytest.approx(2 / info["sampled_fps"])


def test_sft_labels_cover_exactly_the_assistant_target(samples, loaded):
    _, processor = loaded
    tok = processor.tokenizer
    rec, frames, info = samples[0]
    s = encode_sample(processor, rec, frames, info)
    ids, labels, p = s["input_ids"], s["labels"], s["prompt_len"]
    assert (labels[:p] == -100).all() and (labels[p:] == ids[p:]).all()
    assert tok.decode(ids[labels != -100]) == format_target(rec) + "<|im_end|>"
    assert tok.decode(ids[:p]).endswith("<|im_start|>assistant\n")
    assert (s["mm_token_type_ids"][p:] == 0).all()


def test_forward_runs_and_positions_are_3d(samples, loaded):
    model, processor = loaded
    rec, frames, info = samples[0]
    batch = collate_sft([encode_sample(processor, rec, frames, info)], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**model_inputs(batch, "cpu"))
    V = model.config.text_config.vocab_size
    assert out.logits.shape == (1, batch["input_ids"].shape[1], V)
    assert torch.isfinite(out.loss) and abs(out.loss.item() - torch.log(torch.tensor(float(V)))) < 1.0
    pos, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                        video_grid_thw=batch["video_grid_thw"],
                                        second_per_grid_ts=batch["second_per_grid_ts"])
    vid = batch["mm_token_type_ids"][0] == 2
    assert not torch.equal(pos[1, 0, vid], pos[2, 0, vid])       # h and w positions differ on video tokens
    assert pos[0, 0, vid].unique().numel() == 4                  # 4 temporal patches
    # the trap of transformers 5.24: dropping mm_token_type_ids silently changes the logits
    with torch.no_grad():
        inputs = model_inputs(batch, "cpu")
        inputs.pop("mm_token_type_ids")
        out_1d = model(**inputs)
    assert (out_1d.logits - out.logits).abs().max() > 1e-4


def test_padded_batch_equals_single_samples(samples, loaded):
    """Right-padded SFT collation changes nothing for the real tokens (masks and positions right)."""
    model, processor = loaded
    pad = processor.tokenizer.pad_token_id
    enc = [encode_sample(processor, r, f, i) for r, f, i in samples]
    assert enc[0]["input_ids"].numel() != enc[1]["input_ids"].numel()   # so padding really happens
    batch = collate_sft(enc, pad)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    with torch.no_grad():
        both = model(**{k: v for k, v in model_inputs(batch, "cpu").items() if k != "labels"}).logits
        for b, s in enumerate(enc):
            one = model(**{k: v for k, v in model_inputs(collate_sft([s], pad), "cpu").items()
                           if k != "labels"}).logits[0]
            n = s["input_ids"].numel()
            assert (both[b, :n] - one).abs().max() < 1e-4
    rl = collate_rl([encode_sample(processor, r, f, i, with_target=False) for r, f, i in samples], pad)
    assert rl["prompt_lens"].tolist() == [int(m.sum()) for m in rl["attention_mask"]]
    assert (rl["attention_mask"][:, -1] == 1).all() and "labels" not in rl     # left-padded


def test_over_long_samples(samples, loaded):
    _, processor = loaded
    rec, frames, info = samples[0]
    full = encode_sample(processor, rec, frames, info)
    p, n = full["prompt_len"], full["input_ids"].numel()
    with pytest.raises(SampleTooLongError, match=f"{rec['id']}.*max_length={n - 1}"):
        encode_sample(processor, rec, frames, info, max_length=n - 1)
    cut = encode_sample(processor, rec, frames, info, max_length=p + 3, truncate=True)
    assert cut["truncated"] and cut["input_ids"].numel() == p + 3 and (cut["labels"] != -100).sum() == 3
    with pytest.raises(SampleTooLongError, match="prompt"):
        encode_sample(processor, rec, frames, info, max_length=p - 1, truncate=True)
    assert not encode_sample(processor, rec, frames, info, max_length=n)["truncated"]


def test_load_model_real_style_checkpoints(tmp_path, tiny_ckpt):
    """The loader takes any local Qwen2-VL / Qwen2.5-VL directory and names what is wrong otherwise."""
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    model, processor = load_model(tiny_ckpt)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    # a Qwen2-VL checkpoint (the older family) loads through the same code
    t = model.config.text_config
    cfg = Qwen2VLConfig(text_config=dict(vocab_size=t.vocab_size, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                              mrope_section=[4, 6, 6])),
                        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2),
                        image_token_id=model.config.image_token_id, video_token_id=model.config.video_token_id)
    q2 = tmp_path / "qwen2vl"
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(q2)
    AutoProcessor.from_pretrained(tiny_ckpt).save_pretrained(q2)
    m2, _ = load_model(str(q2))
    assert type(m2).__name__ == "Qwen2VLForConditionalGeneration"
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path / "missing"))
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        load_model(str(bad))
    with pytest.raises(ValueError, match="--dtype"):
        load_model(tiny_ckpt, dtype="float99")


# ----------------------------------------------------------------------------- gloo helper
def _allreduce_rank():
    import torch.distributed as dist
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _fail_on_rank1():
    import torch.distributed as dist
    if dist.get_rank() == 1:
        raise KeyError("boom on rank 1")
    return 0


def test_run_distributed_helper():
    assert run_distributed(_allreduce_rank, 3) == [(0, 3, 6.0), (1, 3, 6.0), (2, 3, 6.0)]
    with pytest.raises(RuntimeError, match="(?s)rank 1 of 2 failed.*boom on rank 1"):
        run_distributed(_fail_on_rank1, 2, timeout=60)


# ----------------------------------------------------------------------------- command lines
def _run(cmd, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def test_cli_torchrun_forward_check(tiny_ckpt, synth_dir, tmp_path):
    """The whole input path (decode, size, process, encode, prompt, generate) data-parallel on 2 processes."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = _run([torchrun, "--standalone", "--nproc_per_node=2", "eval.py", f"--model={tiny_ckpt}",
              f"--data={synth_dir}/val.jsonl", "--frames=16", "--max_samples=4", "--max_new_tokens=4",
              f"--out_dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy" in r.stdout and "over 4 items" in r.stdout
    items = [json.loads(line) for line in open(tmp_path / "frames_16" / "items.jsonl")]
    assert len(items) == 4 and all(it["frames"] == 16 for it in items)


def test_cli_errors_are_clear(tmp_path, tiny_ckpt):
    r = _run([sys.executable, "eval.py", "--model=/no/such/dir", "--data=x.jsonl"])
    assert r.returncode != 0 and "x.jsonl: no such data file" in r.stderr
    r = _run([sys.executable, "prepare.py", "--out=" + str(tmp_path), "--bogus=1"])
    assert r.returncode != 0 and "unknown config key 'bogus'" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "video": "missing.mp4", "question": "Q", "options": ["a", "b"], "answer": "A"}\n')
    r = _run([sys.executable, "eval.py", f"--model={tiny_ckpt}", f"--data={bad}"])
    assert r.returncode != 0 and f"{tmp_path}/missing.mp4: no such file" in r.stderr and "Traceback" not in r.stderr
    good = tmp_path / "good.jsonl"
    good.write_text(bad.read_text().replace("missing.mp4", os.path.join(tmp_path, "v.mp4")))
    open(tmp_path / "v.mp4", "wb").write(b"x")
    r = _run([sys.executable, "eval.py", "--model=/no/such/dir", f"--data={good}"])
    assert r.returncode != 0 and "--model=/no/such/dir: expected a local HF checkpoint directory" in r.stderr


def test_encode_sample_matches_the_processor(samples, loaded):
    """Our split (pixels via the video processor, tokens from the grid alone) equals one processor call: the same
    tokens, grid and time scale exactly; the pixels up to the resize kernel (we resize once with qwen-vl-utils'
    torchvision call, the processor with its own uint8 kernel: a level or two apart, never more than 8 of 255)."""
    from data import build_prompt, video_metadata
    _, processor = loaded
    for rec, frames, info in samples:
        ref = processor(text=[build_prompt(processor, rec)], videos=[frames], video_metadata=[video_metadata(info)],
                        return_tensors="pt")
        s = encode_sample(processor, rec, frames, info, with_target=False)
        assert torch.equal(s["input_ids"], ref["input_ids"][0])
        assert torch.equal(s["mm_token_type_ids"], ref["mm_token_type_ids"][0].long())
        assert torch.equal(s["video_grid_thw"], ref["video_grid_thw"])
        assert s["pixel_values_videos"].shape == ref["pixel_values_videos"].shape
        level = 1 / 255 / min(processor.video_processor.image_std)     # one uint8 level, normalised
        diff = (s["pixel_values_videos"] - ref["pixel_values_videos"]).abs()
        assert diff.max() <= 8 * level and diff.mean() <= 0.5 * level, (diff.max() / level, diff.mean() / level)
        assert s["second_per_grid_ts"].item() == pytest.approx(float(ref["second_per_grid_ts"][0]))


def test_tiny_variant_heads_and_rope_base(tmp_path, synth_dir):
    """--tiny_heads / --tiny_rope_theta / --tiny_layers (the demo's 8-head, theta-3, 3-layer tiny): config, mrope
    sections, a forward."""
    from data import load_records
    from mrsp import build_seq, sp_logprobs
    from prepare import init_tiny
    out = str(tmp_path / "tiny8")
    init_tiny(out, synth_dir, heads=8, rope_theta=3, layers=3)
    model, processor = load_model(out)
    t = model.config.text_config
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (8, 4, 16)
    assert t.rope_parameters["rope_theta"] == 3 and sum(t.rope_parameters["mrope_section"]) == 8
    assert t.num_hidden_layers == 3 and len(model.model.language_model.layers) == 3
    rec = load_records(os.path.join(synth_dir, "val.jsonl"))[0]
    seq = build_seq(rec, processor, model, frames=16)
    lp = sp_logprobs(model, seq)
    assert torch.isfinite(lp).all() and int(seq["loss_mask"].sum()) > 0 and (lp[seq["loss_mask"]] < 0).all()
    with pytest.raises(ValueError, match="tiny_heads"):
        init_tiny(str(tmp_path / "bad"), synth_dir, heads=3)
    with pytest.raises(ValueError, match="tiny_layers"):
        init_tiny(str(tmp_path / "bad"), synth_dir, layers=0)
