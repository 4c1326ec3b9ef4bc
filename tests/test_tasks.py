"""Tasks beyond one video + one letter: text-only math records (GSM8K / MATH / ours), the math verifier, open-ended
answers, image and several-video records, bad-record errors, and one SFT step, one RL step and an eval on text-only
records through the stage scripts' command lines."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import reward
from data import RecordError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# -----------------------------------------------------------------------------
# records
def test_record_formats_normalise(tmp_path):
    rows = [
        {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
         "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"},
        {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
         "solution": "Add: $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$."},
        {"id": "m1", "question": "What is 2 + 3?", "answer": "5", "answer_type": "math", "reasoning": "2 + 3 = 5."},
        {"id": "o1", "video": "videos/a.mp4", "question": "What colour is the ball?", "answer": ["red", "crimson"],
         "answer_type": "open"},
        {"id": "c1", "video": "videos/a.mp4", "question": "Which?", "options": ["x", "y"], "answer": "B"},
        {"id": "i1", "images": ["img/a.png", "img/b.png"], "question": "Same shape?", "answer": "yes",
         "answer_type": "open"},
        {"id": "v2", "videos": ["videos/a.mp4", "videos/b.mp4"], "question": "Which video is longer?",
         "options": ["the first", "the second"], "answer": "A"},
    ]
    gsm, mth, ours, op, mc, img, multi = data.load_records(_write(tmp_path / "d.jsonl", rows))
    assert (gsm["id"], gsm["source"], gsm["answer_type"], gsm["answer"]) == ("line1", "gsm8k", "math", "72")
    assert "<<" not in gsm["reasoning"] and "#### " not in gsm["reasoning"] and gsm["video"] is None
    assert (mth["id"], mth["source"], mth["answer"], mth["category"]) == ("line2", "math", "\\frac{3}{4}", "prealgebra")
    assert ours["answer"] == "5" and ours["options"] == [] and ours["videos"] == [] and ours["images"] == []
    assert op["answers"] == ["red", "crimson"] and op["video"] == str(tmp_path / "videos/a.mp4")
    assert mc["answer_type"] == "choice" and mc["options"] == ["A. x", "B. y"]
    assert img["images"] == [str(tmp_path / "img/a.png"), str(tmp_path / "img/b.png")] and img["video"] is None
    assert len(multi["videos"]) == 2 and multi["video"] is None
    assert [data.record_media(r) for r in (gsm, op, img, multi)] == ["text", "video", "images", "videos"]
    # text-only records need no file: check_videos keeps them; the stage scripts take every kind with either engine,
    # a vLLM engine started with room for the most videos one record holds
    assert data.check_videos([gsm, ours])[0] == [gsm, ours]
    assert data.most_videos([gsm, ours, op, img, multi]) == 2 and data.most_videos([gsm, img]) == 1


@pytest.mark.parametrize("row, where", [
    ({"id": "a", "question": "q", "answer": "5", "answer_type": "maths"}, "field 'answer_type': expected one of"),
    ({"id": "a", "question": "q", "answer": "x", "answer_type": "open", "options": ["p", "q"]},
     "field 'options': a record with answer_type 'open' has no options"),
    ({"id": "a", "question": "q", "answer_type": "math"}, "missing field 'answer'"),
    ({"id": "a", "question": "q", "answer": ["1", "2"], "answer_type": "math"}, "field 'answer': a math record has one"),
    ({"id": "a", "question": "q", "answer": [""], "answer_type": "open"}, "field 'answer': expected a non-empty text"),
    ({"problem": "What is 1+1?", "solution": "It is two."}, "field 'solution': expected a final answer in \\\\boxed"),
    ({"id": "a", "question": "q", "answer": "B", "options": ["x", "y"], "images": [3]}, "field 'images': expected a path"),
    ({"id": "a", "question": "q", "answer": "B", "options": ["x", "y"], "video": "a.mp4", "videos": ["b.mp4"]},
     "fields 'video' and 'videos': give one of them"),
    ({"id": "a", "question": "q", "answer": "42"}, "missing field 'options' \\(a multiple-choice record; set answer_type"),
])
def test_bad_records_name_file_line_and_field(tmp_path, row, where):
    good = {"id": "g", "question": "What is 1 + 1?", "answer": "2", "answer_type": "math"}
    path = _write(tmp_path / "bad.jsonl", [good, "", row])   # the bad row is on line 3 (blank line 2 counts)
    with pytest.raises(RecordError, match=rf"bad\.jsonl:3: {where}"):
        data.load_records(path)


# -----------------------------------------------------------------------------
# the verifier and open-ended matching
EQUAL = [("72", "72"), ("72.00", "72"), ("$1,000", "1000"), ("18 dollars", "18"), ("x = 5", "5"), ("0.5", "1/2"),
         ("\\frac{3}{4}", "3/4"), ("\\dfrac{3}{4}", "\\frac34"), ("50\\%", "50"), ("-7", "-7.0"),
         ("2x+2", "2(x+1)"), ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}"), ("\\frac{\\pi}{2}", "\\pi/2")]
UNEQUAL = [("71", "72"), ("0.33", "1/3"), ("1000", "100"), ("2x", "x^2"), ("-5", "5"), ("", "5"), (None, "5"),
           ("\\frac{3}{5}", "3/4"), ("exit()", "1"), ("__import__('os')", "0"), ("12", "1/2"),
           ("1 1/2", "1/2")]


@pytest.mark.parametrize("use_mv", [True, False], ids=["math-verify-if-installed", "fallback-rules"])
def test_math_equal_true_and_false_pairs(use_mv):
    for pred, gold in EQUAL:
        assert reward.math_equal(pred, gold, use_math_verify=use_mv), (pred, gold)
    for pred, gold in UNEQUAL:
        assert not reward.math_equal(pred, gold, use_math_verify=use_mv), (pred, gold)


def test_extract_math():
    assert reward.extract_math("<think>2+3</think><answer>5</answer>") == "5"
    assert reward.extract_math("<think>..</think><answer>so \\boxed{\\frac{1}{2}}</answer>") == "\\frac{1}{2}"
    assert reward.extract_math("She has 12 + 6 = 18 apples left.") == "18"                 # the last number
    assert reward.extract_math("The answer is 1,200 dollars.\nCheck: 3 items") == "1,200 dollars"
    assert reward.extract_math("#### 72") == "72"
    assert reward.extract_math("<think>.</think><answer>The final answer is 7.</answer>") == "7"
    assert reward.extract_math("<think>so 4 then 5") is None                               # cut off mid-thought
    assert reward.extract_math("<think>x</think><answer></answer>") is None
    assert reward.extract_math("no number here") is None


def test_open_normalisation_and_scoring():
    n = reward.normalize_open
    assert n("The Red Ball.") == n("red ball") == "red ball"
    assert n("Twenty-one") == n("21") == "21" and n("three cats") == "3 cats" and n("1,000") == "1000"
    assert n("An apple") == "apple" and n("A B C") == "b c"   # articles go, the rest stays
    rec = dict(id="o", answer_type="open", answer="red", answers=["red", "crimson"], options=[])
    ok = reward.score_answer("<think>the ball</think><answer>Crimson.</answer>", rec)
    assert ok == dict(extracted="Crimson.", correct=True, format=True)
    assert reward.score_answer("<think>x</think><answer>a red ball</answer>", rec)["correct"] is False   # exact match
    assert reward.score_answer("I think the answer is: Red!", rec) == dict(extracted="Red!", correct=True, format=False)
    assert reward.score_answer("<think>x</think><answer> </answer>", rec)["format"] is False


def test_reward_and_eval_rows_dispatch_on_answer_type():
    from mrsp import answer_row
    from rl import reward_fn
    good, bad = "<think>6 * 7</think><answer>42</answer>", "<think>6 * 7</think><answer>41</answer>"
    assert reward_fn(good, "42", answer_type="math") == dict(accuracy=1.0, format=1.0, total=1.0)
    assert reward_fn(bad, "42", answer_type="math") == pytest.approx(dict(accuracy=0.0, format=1.0, total=0.1))
    assert reward_fn("<think>.</think><answer>Two dogs</answer>", ["2 dogs"], answer_type="open")["accuracy"] == 1.0
    assert reward_fn("<think>.</think><answer>B</answer>", "B", ["A. x", "B. y"])["total"] == 1.0   # unchanged
    row = answer_row(dict(id="m", answer_type="math", answer="42", answers=["42"], options=[], category="word"),
                     0, "so it is \\boxed{42.0}", "stop")
    assert (row["correct"], row["extracted"], row["format"], row["answer_type"], row["n_options"]) == \
        (True, "42.0", False, "math", None)


# -----------------------------------------------------------------------------
# prompts, tokens and the plain HF forward: text only, images, several videos
@pytest.fixture(scope="module")
def math_dir(tmp_path_factory):
    from prepare import generate_math
    out = str(tmp_path_factory.mktemp("math"))
    generate_math(out, n_train=12, n_val=4, n_test=4, seed=0)
    return out


@pytest.fixture(scope="module")
def tiny_math(math_dir, tmp_path_factory):
    from prepare import init_tiny
    out = str(tmp_path_factory.mktemp("tiny_math"))
    init_tiny(out, math_dir, seed=0)
    return out


def test_math_generator_is_deterministic_and_verifiable(math_dir, tmp_path):
    from prepare import generate_math
    generate_math(str(tmp_path), n_train=12, n_val=4, n_test=4, seed=0)
    for split in ("train", "val", "test"):
        assert open(f"{math_dir}/{split}.jsonl").read() == open(tmp_path / f"{split}.jsonl").read()
    generate_math(str(tmp_path / "s1"), n_train=12, n_val=4, n_test=4, seed=1)
    assert open(f"{math_dir}/train.jsonl").read() != open(tmp_path / "s1" / "train.jsonl").read()
    recs = data.load_records(f"{math_dir}/train.jsonl")
    assert {r["category"] for r in recs} == {"arithmetic", "word", "fraction"}
    for r in recs:   # the worked solution ends in the answer, which the verifier accepts
        assert reward.math_equal(reward.extract_math(r["reasoning"]), r["answer"]), r
        assert reward.score_answer(data.format_target(r), r) == dict(extracted=r["answer"], correct=True, format=True)


def test_text_only_tokens_and_forward(tiny_math, math_dir):
    from mrsp import build_seq, load_model, sp_logprobs
    model, processor = load_model(tiny_math)
    rec = data.load_records(f"{math_dir}/train.jsonl")[0]
    t = data.encode_text(processor, rec, None)
    tok = processor.tokenizer
    assert not (t["mm_token_type_ids"] != 0).any()
    assert "<|video_pad|>" not in tok.decode(t["input_ids"]) and data.MATH_INSTRUCTION in tok.decode(t["input_ids"])
    batch = data.collate_sft([t], tok.pad_token_id)
    assert not set(data.VISION_KEYS) & set(batch)
    with torch.no_grad():
        hf = model(**data.model_inputs(batch, "cpu"))
    assert torch.isfinite(hf.loss)
    # the MR-SP path (cached or pixel route) on the same record: the target's log-probs equal HF's loss
    for m in (model, None):
        seq = build_seq(rec, processor, m)
        assert seq["video_grid_thw"].shape == (0, 3)
        with torch.no_grad():
            lp = sp_logprobs(model, seq)
        assert float(-lp.sum() / seq["loss_mask"].sum()) == pytest.approx(float(hf.loss), abs=1e-5)


def _png(path, colour):
    from PIL import Image
    Image.fromarray(np.full((60, 50, 3), colour, dtype=np.uint8)).save(path)
    return str(path)


def test_image_and_several_video_records_plain_forward(tiny_math, tmp_path):
    from mrsp import build_seq, load_model, rope_index
    from prepare import write_mp4
    model, processor = load_model(tiny_math)
    tok = processor.tokenizer
    _png(tmp_path / "a.png", (200, 0, 0)), _png(tmp_path / "b.png", (0, 0, 200))
    rng = np.random.default_rng(0)
    for name in ("v1.mp4", "v2.mp4"):
        write_mp4(str(tmp_path / name), rng.integers(0, 255, (8, 56, 56, 3), dtype=np.uint8), 4.0)
    path = _write(tmp_path / "mm.jsonl", [
        {"id": "img", "images": ["a.png", "b.png"], "question": "Which is red?", "answer": "the first",
         "answer_type": "open", "reasoning": "colours"},
        {"id": "vids", "videos": ["v1.mp4", "v2.mp4"], "question": "Which?", "options": ["one", "two"],
         "answer": "A"}])
    img_rec, vids_rec = data.load_records(path)
    # images: the processor's image path, <|image_pad|> expanded per image, mm_token_type_ids 1
    px = data.image_inputs(processor, img_rec)
    assert px["image_grid_thw"].shape == (2, 3)
    t = data.encode_text(processor, img_rec, None, image_grid_thw=px["image_grid_thw"])
    merge2 = processor.image_processor.merge_size ** 2
    assert int((t["mm_token_type_ids"] == 1).sum()) == int(px["image_grid_thw"].prod(-1).sum()) // merge2
    # several videos: one grid row per video, in order, mm_token_type_ids 2
    vx = data.video_inputs(processor, vids_rec, num_frames=4)
    assert vx["video_grid_thw"].shape == (2, 3) and vx["second_per_grid_ts"].shape == (2,)
    tv = data.encode_text(processor, vids_rec, vx["video_grid_thw"])
    assert int((tv["mm_token_type_ids"] == 2).sum()) == int(vx["video_grid_thw"].prod(-1).sum()) // merge2
    batch = data.collate_sft([dict(t, **px), dict(tv, **vx)], tok.pad_token_id)
    assert batch["image_grid_thw"].shape == (2, 3) and batch["video_grid_thw"].shape == (2, 3)
    with torch.no_grad():
        out = model(**data.model_inputs(batch, "cpu"))
    assert torch.isfinite(out.loss)
    # positions: our canonical rule agrees with transformers' for images (no temporal scaling involved)
    ours, _ = rope_index(model, t["input_ids"][None], t["mm_token_type_ids"][None], image_grid_thw=px["image_grid_thw"])
    hf, _ = rope_index(model, t["input_ids"][None], t["mm_token_type_ids"][None], image_grid_thw=px["image_grid_thw"],
                       rule="hf")
    assert torch.equal(ours, hf)
    # the MR-SP path takes images (tests/test_images.py checks their log-probs) ...
    img_seq = build_seq(img_rec, processor, model)
    assert torch.equal(img_seq["input_ids"], t["input_ids"]) and torch.equal(img_seq["image_grid_thw"],
                                                                             px["image_grid_thw"])
    # ... and several videos: each encoded and cached on its own, embeddings concatenated in order. Its target
    # log-probs equal a plain HF forward from pixels at the same (canonical) positions.
    from mrsp import EmbeddingCache, mrope_positions, sp_logprobs
    cache = EmbeddingCache(1 << 26)
    seq = build_seq(vids_rec, processor, model, cache, frames=4)
    assert seq["video_grid_thw"].shape == (2, 3) and cache.stats["misses"] == 2
    assert torch.equal(seq["input_ids"], tv["input_ids"])
    with torch.no_grad():
        lp = sp_logprobs(model, seq)
        pos, _ = mrope_positions(model, tv["input_ids"][None], tv["mm_token_type_ids"][None], vx["video_grid_thw"],
                                 vx["second_per_grid_ts"])
        logits = model(input_ids=tv["input_ids"][None], pixel_values_videos=vx["pixel_values_videos"],
                       video_grid_thw=vx["video_grid_thw"], second_per_grid_ts=vx["second_per_grid_ts"],
                       mm_token_type_ids=tv["mm_token_type_ids"][None], position_ids=pos).logits[0]
    ref = torch.log_softmax(logits[:-1].float(), -1).gather(-1, tv["input_ids"][1:, None])[:, 0]
    m = seq["loss_mask"]
    assert torch.allclose(lp[m], ref[m[1:]], atol=1e-5)
    build_seq(vids_rec, processor, model, cache, frames=4)
    assert cache.stats["hits"] == 2   # both videos served from the cache the second time


# -----------------------------------------------------------------------------
# the stage scripts on text-only records: one SFT step, one RL step, an eval
def _run(script, *args, check=True):
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def sft_rl_eval(model, data_dir, out):
    """One SFT step, one RL step from its export, an eval of the RL export (test_images uses it too) -> (the SFT
    step's metrics, the RL step's metrics, eval's results.json); each checked to have trained / run."""
    _run("sft.py", f"--model={model}", f"--data={data_dir}/train.jsonl", "--val_data=", f"--out_dir={out}/sft",
         "--steps=1", "--batch_size=2", "--warmup_steps=1")
    sft_m = [json.loads(x) for x in open(out / "sft" / "metrics.jsonl")][-1]
    assert sft_m["step"] == 1 and np.isfinite(sft_m["loss"]) and sft_m["grad_norm"] > 0
    _run("rl.py", f"--model={out}/sft/hf", f"--data={data_dir}/train.jsonl", "--val_data=", f"--out_dir={out}/rl",
         "--steps=1", "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=6", "--kl_coef=0")
    rl_m = [json.loads(x) for x in open(out / "rl" / "metrics.jsonl")][-1]
    assert rl_m["step"] == 1 and "reward_mean" in rl_m
    _run("eval.py", f"--model={out}/rl/hf", f"--data={data_dir}/test.jsonl", f"--out_dir={out}/eval",
         "--max_new_tokens=6")
    return sft_m, rl_m, json.load(open(out / "eval" / "results.json"))


def test_sft_rl_eval_on_text_only_records(tiny_math, math_dir, tmp_path):
    out = tmp_path
    _, m, res = sft_rl_eval(tiny_math, math_dir, out)
    assert m["t_encode"] >= 0
    assert res["n"] == 4 and res["n_bad"] == 0 and res["by_answer_type"]["math"]["n"] == 4
    assert set(res["by_category"]) == {"arithmetic", "word", "fraction"}
    rows = [json.loads(x) for x in open(out / "eval" / "frames_32" / "items.jsonl")]
    assert all(r["answer_type"] == "math" and r["n_options"] is None for r in rows)
    # what a stage does not take stops it before any model work, naming the file and the record: an image record
    # under rl.py --loop=baseline (it models EasyR1's decodes of one video per prompt; --loop=mrsp / naive take it)
    _png(tmp_path / "a.png", (9, 9, 9))
    bad = _write(tmp_path / "img.jsonl", [{"id": "pic", "images": ["a.png"], "question": "What?", "answer": "x",
                                           "answer_type": "open"}])
    r = _run("rl.py", f"--model={out}/rl/hf", f"--data={bad}", "--val_data=", f"--out_dir={out}/rl2", "--loop=baseline",
             check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"--data={bad}: record 'pic' has no single video" in r.stderr and "--loop=baseline takes one-video" in r.stderr


def test_text_only_multiple_choice_is_explicit(tmp_path):
    row = {"id": "t", "question": "2 + 2?", "options": ["3", "4"], "answer": "B"}
    with pytest.raises(RecordError, match=r"t\.jsonl:1: missing field 'video' .*answer_type 'choice'"):
        data.load_records(_write(tmp_path / "t.jsonl", [row]))   # a lost video key is not a text question
    (r,) = data.load_records(_write(tmp_path / "t.jsonl", [dict(row, answer_type="choice")]))
    assert data.record_media(r) == "text" and r["answer"] == "B"
    assert reward.score_answer("<think>.</think><answer>B</answer>", r) == dict(extracted="B", correct=True, format=True)
