"""
prepare.py -- what the CPU demo and the tests train on, made locally: a synthetic long-video QA set (real H.264 mp4s
of coloured shapes + train/val/test JSONL with a chain of thought) and a tiny random-init Qwen2.5-VL checkpoint (a
standard HF directory: config, weights, byte-level BPE tokenizer trained on the dataset text with the Qwen special
tokens, chat template, processor). Real checkpoints and datasets need none of this: pass their local paths to the
stage scripts. (Like nanoGPT's data/*/prepare.py: data preparation kept apart from training.)

Generate the synthetic set, then the tiny checkpoint on its text:
    python prepare.py --out=data/synth                                  # 640/64/128 questions, 256 frames @ 8 fps
    python prepare.py --out=data/synth --n_train=2000 --num_frames=512 --seed=1
    python prepare.py --tiny=out/tiny --data=data/synth                 # ~0.7M-param Qwen2.5-VL + processor
    python prepare.py --tiny=out/tiny8 --data=data/synth --tiny_heads=8 --tiny_rope_theta=3   # the demo's variant
    python prepare.py --tiny=out/tiny3 --data=data/synth --family=qwen3_vl     # a tiny Qwen3-VL (also qwen2_vl)
Text-only synthetic math (arithmetic, word problems, fractions; answer_type "math"), and a tiny checkpoint on it:
    python prepare.py --out=data/math --task=math && python prepare.py --tiny=out/tiny_math --data=data/math
Image records (PNG pictures of coloured squares, one or two per question, multiple choice):
    python prepare.py --out=data/img --task=image && python prepare.py --tiny=out/tiny_img --data=data/img
"""
import contextlib
import glob
import json
import math
import os
import sys

import numpy as np
import torch

from common import apply_overrides, config_of
from data import CATEGORIES, INSTRUCTION, LETTERS, format_target, load_records

# -----------------------------------------------------------------------------
# config (override with --key=value)
out = ""              # write the synthetic set here (train/val/test.jsonl, videos/, meta.json)
n_train = 640         # training questions (one video each)
n_val = 64            # held-out questions for validation during training
n_test = 128          # test questions for eval
num_frames = 256      # frames per video (long: events spread over all of them)
fps = 8.0             # video frame rate (256 frames -> 32 s)
size = 112            # frame height = width (multiple of 28)
cot_noise = 0.2       # fraction of train_sft.jsonl's CoT traces where the teacher slips (the reasoning right, another
                      #   option's letter given; train.jsonl's answer key stays right): SFT imitates them, RL is
                      #   rewarded by the key
workers = min(2, os.cpu_count() or 1)   # processes encoding the mp4s (the output does not depend on it)
tiny = ""             # write the tiny checkpoint here (its tokenizer is trained on --data's text)
data = "data/synth"   # --tiny: the dataset folder (or one JSONL file) whose text the tokenizer learns
tiny_heads = 4        # --tiny: LM attention heads (the demo uses 8)
tiny_rope_theta = 1e6  # --tiny: LM rope base (the demo uses 3: bench/probe_tiny.py)
tiny_layers = 2       # --tiny: LM layers
family = "qwen2_5_vl"  # --tiny: the model family (transformers model_type): qwen2_vl, qwen2_5_vl or qwen3_vl
seed = 0              # everything is deterministic given the seed
task = "video"        # --out: "video" (the long-video QA set), "math" (text-only arithmetic / word problems) or
                      #   "image" (pictures of coloured squares, one or two per question)

# -----------------------------------------------------------------------------
# synthetic long-video QA: coloured squares and a moving ball; answers need the whole video
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 70, 240), "yellow": (240, 220, 30),
           "magenta": (220, 40, 220), "cyan": (30, 220, 220), "white": (240, 240, 240), "orange": (250, 140, 20)}
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
PALETTE = ("red", "green", "blue", "yellow")   # the colours questions are about (the ball is white)
ORDINALS = ("first", "last")


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _event_times(rng, n_events, T, ev_len):
    """Start frames of n events, one per equal segment of the video: spread over its whole length."""
    seg = T / n_events
    assert seg >= ev_len, f"{n_events} events of {ev_len} frames do not fit in {T} frames"
    return [int(i * seg + rng.integers(0, int(seg - ev_len) + 1)) for i in range(n_events)]


def _quad_box(q, S, margin):
    h = S // 2
    y0 = 0 if q in (0, 1) else h
    x0 = 0 if q in (0, 2) else h
    return y0 + margin, x0 + margin, y0 + h - margin, x0 + h - margin


def _perm_with(rng, items, value, at):
    """A random permutation of items with `value` at position `at`."""
    rest = [x for x in items if x != value]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    return rest[:at] + [value] + rest[at:]


def make_synthetic_sample(rng, category, answer_idx, T=256, S=112, fps=8.0):
    """Build one video (T, S, S, 3) uint8 and its QA record (without id/video) for a category.
    Options come in a fixed order (PALETTE or QUADRANTS), so the letter follows from the content; the
    content is drawn so that the correct option is answer_idx (balanced letters are the caller's job) and
    every colour is equally likely to be the answer (no prior to exploit). The CoT names every event of
    the video in order (the whole video matters), then the deciding fact and the option."""
    frames = np.zeros((T, S, S, 3), np.uint8)
    ev_len = max(T // 12, 4)
    margin = S // 16

    def draw_square(t0, colour, quad):
        y0, x0, y1, x1 = _quad_box(quad, S, margin)
        frames[t0:t0 + ev_len, y0:y1, x0:x1] = COLOURS[colour]

    def flash(t0, colour):  # a full-frame colour flash: the event is seen whatever the spatial resolution
        frames[t0:t0 + ev_len, margin:S - margin, margin:S - margin] = COLOURS[colour]

    options = list(QUADRANTS) if category == "spatial" else list(PALETTE)
    answer = options[answer_idx]
    if category == "temporal":
        which = ORDINALS[rng.integers(0, 2)]
        cols = _perm_with(rng, PALETTE, answer, 0 if which == "first" else 3)
        for t0, c in zip(_event_times(rng, 4, T, ev_len), cols):
            flash(t0, c)
        question = f"Which colour of square appeared {which} in the video?"
        why = [f"Squares in order: {', '.join(cols)}.", f"The {which} one is {answer}."]
    elif category == "spatial":
        cols = [PALETTE[i] for i in rng.permutation(4)]
        k = int(rng.integers(0, 4))
        quads = _perm_with(rng, range(4), answer_idx, k)
        for t0, c, q in zip(_event_times(rng, 4, T, ev_len), cols, quads):
            draw_square(t0, c, q)
        colour = cols[k]
        question = f"Where did the {colour} square appear?"
        why = [f"Squares in order: {', '.join(f'{c} {QUADRANTS[q]}' for c, q in zip(cols, quads))}.",
               f"The {colour} one was {answer}."]
    elif category == "goal":
        # four coloured boxes in the corners; a white ball travels from the centre to one of them
        goal = int(rng.integers(0, 4))
        cols = _perm_with(rng, PALETTE, answer, goal)
        box = S // 6
        corners = [(0, 0), (0, S - box), (S - box, 0), (S - box, S - box)]
        for (y, x), c in zip(corners, cols):
            frames[:, y:y + box, x:x + box] = COLOURS[c]
        r = S // 14
        c0 = np.array([S / 2, S / 2])
        c1 = np.array(corners[goal]) + box / 2
        wobble = rng.normal(0, S / 40, size=2)
        yy, xx = np.ogrid[:S, :S]
        for t in range(T):
            a = t / (T - 1)
            y, x = c0 + a * (c1 - c0) + math.sin(a * math.pi) * wobble
            frames[t][(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = COLOURS["white"]
        question = "A white ball moves through the video. Which coloured box is it heading for?"
        why = [f"Boxes: {', '.join(f'{c} {q}' for c, q in zip(cols, QUADRANTS))}.",
               f"The ball moves to the {QUADRANTS[goal]}, so it heads for {answer}."]
    elif category == "plot":
        # the story: which colour keeps coming back? one colour shows 3 times, the others once each
        seq = [answer] * 3 + [c for c in PALETTE if c != answer]
        seq = [seq[i] for i in rng.permutation(len(seq))]
        for t0, c in zip(_event_times(rng, len(seq), T, ev_len), seq):
            flash(t0, c)
        question = "Which colour of square appeared most often over the whole video?"
        why = [f"Squares in order: {', '.join(seq)}.", f"{answer.capitalize()} appears 3 times."]
    else:
        raise ValueError(f"category={category!r}: expected one of {CATEGORIES}")
    letter = LETTERS[answer_idx]
    why.append(f"That is option {letter}.")
    return frames, dict(question=question, options=[f"{LETTERS[i]}. {o}" for i, o in enumerate(options)],
                        answer=letter, reasoning=" ".join(why), category=category, duration=round(T / fps, 2))


def teacher_traces(recs, cot_noise, seed):
    """The SFT split: train's records with their CoT as a teacher model writes it -- right, except for exactly
    round(cot_noise * n) of them (drawn with their own seed, so the videos and train.jsonl do not move) where the
    teacher slips at the last step: the events and the conclusion right, then another option's letter ("... The
    first one is red. That is option C." where red is A). Model-written CoT data carries such slips; SFT imitates
    them (its sampled letter strays from its own right conclusion about as often), while GRPO is rewarded by the
    answer key (train.jsonl): the room RL has to lift (docs/BENCHMARKS.md, issue 16)."""
    rng = np.random.default_rng([seed, 99])
    slips = set(rng.choice(len(recs), round(cot_noise * len(recs)), replace=False).tolist())
    out = []
    for i, r in enumerate(recs):
        if i in slips:
            w = LETTERS[int(rng.choice([k for k in range(4) if LETTERS[k] != r["answer"]]))]
            said, last = r["reasoning"].rsplit(" ", 1)
            assert last == f"{r['answer']}.", r["reasoning"]   # "... That is option A."
            r = dict(r, reasoning=f"{said} {w}.", answer=w)
        out.append(dict(r, teacher_correct=i not in slips))
    return out


def write_mp4(path, frames, fps):
    """Write frames (T, H, W, 3) uint8 as H.264 mp4 (yuv420p, near-lossless, single-threaded for
    byte-identical output per seed). Written to a temp name and renamed: no half-written videos."""
    import av
    from fractions import Fraction
    tmp = path + ".tmp.mp4"
    with av.open(tmp, "w") as out:
        st = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        st.options = {"crf": "8", "preset": "fast", "threads": "1"}
        st.codec_context.thread_count = 1
        for f in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    os.replace(tmp, path)


def generate_synthetic(out, n_train=640, n_val=64, n_test=128, num_frames=256, fps=8.0, size=112, seed=0,
                       progress=True, workers=1, cot_noise=0.2):
    """Write {out}/videos/*.mp4, {out}/{train,val,test}.jsonl and {out}/train_sft.jsonl (train's questions with
    teacher-written CoT, a fraction cot_noise of it wrong: teacher_traces). Deterministic given the arguments (workers too:
    frames are drawn in order in this process; only the H.264 encoding, ~90% of the time, runs in `workers`
    processes). Categories and answer letters are balanced exactly within each block of 16 samples."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    from tqdm import tqdm
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    if num_frames < 64:
        raise ValueError(f"num_frames={num_frames}: synthetic videos need >= 64 frames for spread-out events")
    if size % 28 or size < 56:
        raise ValueError(f"size={size}: expected a multiple of 28 >= 56 (Qwen-VL patch 14 x merge 2)")
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None
    pending = []   # encodes in flight, bounded: each holds a (T, S, S, 3) video
    with pool or contextlib.nullcontext():   # the pool shuts down on an encoder error too
        for s_i, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
            rng = np.random.default_rng([seed, s_i])
            recs = []
            for i in tqdm(range(n), desc=f"synth {split}", disable=not progress, leave=False, mininterval=1.0):
                cat = CATEGORIES[(i // 4) % 4]
                frames, rec = make_synthetic_sample(rng, cat, answer_idx=i % 4, T=num_frames, S=size, fps=fps)
                vid = f"videos/{split}_{i:05d}.mp4"
                if pool is None:
                    write_mp4(os.path.join(out, vid), frames, fps)
                else:
                    pending.append(pool.submit(write_mp4, os.path.join(out, vid), frames, fps))
                    while len(pending) > 2 * workers:
                        pending.pop(0).result()   # re-raises an encoder error here
                recs.append(dict(id=f"synth-{split}-{i:05d}", video=vid, **rec))
            for f in pending:
                f.result()
            pending = []
            order = rng.permutation(len(recs))
            files = {split: [recs[j] for j in order]}
            if split == "train":
                files["train_sft"] = teacher_traces(files["train"], cot_noise, seed)
            for name, rows in files.items():
                tmp = os.path.join(out, f"{name}.jsonl.tmp")
                with open(tmp, "w") as f:
                    for r in rows:
                        f.write(json.dumps(r) + "\n")
                os.replace(tmp, os.path.join(out, f"{name}.jsonl"))
    meta = dict(n_train=n_train, n_val=n_val, n_test=n_test, num_frames=num_frames, fps=fps, size=size,
                seed=seed, cot_noise=cot_noise, categories=list(CATEGORIES))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


# -----------------------------------------------------------------------------
# synthetic math (text-only records): arithmetic, word problems and fractions with a worked solution, for the CPU
# demo and the tests of the text path (answer_type "math", scored by reward.math_equal)
MATH_KINDS = ("arithmetic", "word", "fraction")
_NAMES = ("Ana", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goran", "Hana")
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils")


def make_math_sample(rng, kind):
    """One text-only math record (without id): question, answer (text), reasoning (the worked steps), category.
    arithmetic: "What is 37 + 48 * 2?"; word: a two-step story ("Ana has 12 apples. She buys 5 more and gives 3 to
    Ben..."); fraction: a sum or difference of two fractions, answered in lowest terms ("7/8", or a whole number)."""
    from fractions import Fraction
    r = lambda lo, hi: int(rng.integers(lo, hi + 1))
    if kind == "arithmetic":
        a, b, c = r(2, 60), r(2, 30), r(2, 9)
        op = ("+", "-")[r(0, 1)]
        val = a + b * c if op == "+" else a - b * c
        question = f"What is {a} {op} {b} * {c}?"
        reasoning = f"Multiplication first: {b} * {c} = {b * c}. Then {a} {op} {b * c} = {val}."
        answer = str(val)
    elif kind == "word":
        name, other, item = _NAMES[r(0, 7)], _NAMES[r(0, 7)], _ITEMS[r(0, 5)]
        other = other if other != name else _NAMES[(_NAMES.index(name) + 1) % len(_NAMES)]
        have, buy, give = r(5, 40), r(2, 20), r(1, 5)
        question = (f"{name} has {have} {item}. {name} buys {buy} more, then gives {give} to {other}. How many "
                    f"{item} does {name} have now?")
        reasoning = f"{name} starts with {have}. After buying: {have} + {buy} = {have + buy}. After giving: " \
                    f"{have + buy} - {give} = {have + buy - give}."
        answer = str(have + buy - give)
    elif kind == "fraction":
        p, q, s, t = r(1, 9), r(2, 9), r(1, 9), r(2, 9)
        op = ("+", "-")[r(0, 1)]
        val = Fraction(p, q) + Fraction(s, t) if op == "+" else Fraction(p, q) - Fraction(s, t)
        question = f"Compute {p}/{q} {op} {s}/{t} and give the result in lowest terms."
        common = q * t
        num = p * t + s * q if op == "+" else p * t - s * q
        reasoning = f"Over a common denominator: {p * t}/{common} {op} {s * q}/{common} = {num}/{common} = {val}."
        answer = str(val)
    else:
        raise ValueError(f"math kind {kind!r}: expected one of {MATH_KINDS}")
    return dict(question=question, answer=answer, answer_type="math", reasoning=reasoning, category=kind)


def generate_math(out, n_train=640, n_val=64, n_test=128, seed=0):
    """Write {out}/{train,val,test}.jsonl of synthetic math records (text only, our JSONL with answer_type "math")
    and {out}/meta.json. Deterministic given the arguments; kinds cycle arithmetic, word, fraction."""
    os.makedirs(out, exist_ok=True)
    for s_i, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        rng = np.random.default_rng([seed, 100 + s_i])
        tmp = os.path.join(out, f"{split}.jsonl.tmp")
        with open(tmp, "w") as f:
            for i in range(n):
                rec = make_math_sample(rng, MATH_KINDS[i % len(MATH_KINDS)])
                f.write(json.dumps(dict(id=f"math-{split}-{i:05d}", **rec)) + "\n")
        os.replace(tmp, os.path.join(out, f"{split}.jsonl"))
    meta = dict(task="math", n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, categories=list(MATH_KINDS))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


# -----------------------------------------------------------------------------
# synthetic image records (the image path of every stage): pictures of coloured squares, multiple choice
IMAGE_KINDS = ("spatial", "pair")


def make_image_sample(rng, kind, answer_idx, S=112):
    """One image record's pictures and fields (without id / paths) -> (list of (S, S, 3) uint8, record fields).
    spatial (one picture): a red square in one quadrant, other colours in others: "In which quadrant is the red
    square?" (answer_idx: the quadrant). pair (two pictures): a red square in exactly one of them, "Which picture
    shows a red square?" (answer_idx % 2: the picture)."""
    def picture(squares):   # {quadrant: colour}
        img = np.full((S, S, 3), 20, dtype=np.uint8)
        for q, c in squares.items():
            y0, x0, y1, x1 = _quad_box(q, S, S // 8)
            img[y0:y1, x0:x1] = COLOURS[c]
        return img
    others = [c for c in PALETTE if c != "red"]
    if kind == "spatial":
        rest = [q for q in range(4) if q != answer_idx]
        squares = {answer_idx: "red", **{q: others[int(rng.integers(len(others)))]
                                         for q in rng.choice(rest, size=int(rng.integers(1, 3)), replace=False)}}
        fields = dict(question="In which quadrant of the picture is the red square?",
                      options=[q.replace("-", " ") for q in QUADRANTS], answer=LETTERS[answer_idx],
                      reasoning=f"The red square is in the {QUADRANTS[answer_idx].replace('-', ' ')} quadrant.")
        return [picture(squares)], dict(fields, category="spatial")
    if kind != "pair":
        raise ValueError(f"image kind {kind!r}: expected one of {IMAGE_KINDS}")
    k = answer_idx % 2
    pics = [picture({int(rng.integers(4)): "red" if j == k else others[int(rng.integers(len(others)))]})
            for j in range(2)]
    fields = dict(question="Which picture shows a red square?", options=["the first picture", "the second picture"],
                  answer=LETTERS[k], reasoning=f"The {('first', 'second')[k]} picture has the red square.")
    return pics, dict(fields, category="pair")


def generate_images(out, n_train=640, n_val=64, n_test=128, size=112, seed=0):
    """Write {out}/images/*.png and {out}/{train,val,test}.jsonl of image records ("images": [paths]; kinds alternate
    spatial (one picture) and pair (two)) and {out}/meta.json. Deterministic given the arguments."""
    from PIL import Image
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    for s_i, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        rng = np.random.default_rng([seed, 200 + s_i])
        tmp = os.path.join(out, f"{split}.jsonl.tmp")
        with open(tmp, "w") as f:
            for i in range(n):
                pics, rec = make_image_sample(rng, IMAGE_KINDS[i % 2], answer_idx=(i // 2) % 4, S=size)
                paths = [f"images/{split}_{i:05d}_{j}.png" for j in range(len(pics))]
                for pth, pic in zip(paths, pics):
                    Image.fromarray(pic).save(os.path.join(out, pth))
                f.write(json.dumps(dict(id=f"img-{split}-{i:05d}", images=paths, **rec)) + "\n")
        os.replace(tmp, os.path.join(out, f"{split}.jsonl"))
    meta = dict(task="image", n_train=n_train, n_val=n_val, n_test=n_test, size=size, seed=seed,
                categories=list(IMAGE_KINDS))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2.5-VL's chat template (system default, <|vision_start|><|video_pad|><|vision_end|> per video).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# The tiny model: ~1M params, a video forward in tens of ms on one CPU core.
TINY_TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[4, 6, 6]))
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[1], tokens_per_second=2)
TINY_PIXELS = 56 * 56  # every frame resized to 56x56 -> 4 video tokens per 2 frames
# The other families' towers (--family): Qwen2-VL's (no window attention; embed_dim in, hidden_size out) and
# Qwen3-VL's (patch 16, learned position grid of num_position_embeddings, DeepStack mergers after the blocks listed
# in deepstack_visual_indexes: their features are added to the first LLM layers' hidden states at visual tokens).
TINY_VISION_QWEN2 = dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=2, num_heads=4, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2)
TINY_VISION_QWEN3 = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                         patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                         deepstack_visual_indexes=[0, 1])
TINY_PIXELS_QWEN3 = 64 * 64  # Qwen3-VL: patch 16 x merge 2 = 32-pixel factor; 64x64 -> 4 video tokens per 2 frames
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


# -----------------------------------------------------------------------------
# tiny checkpoint
def _dataset_texts(data_dir):
    """Every string a prompt or target can contain, to train the tiny tokenizer on."""
    texts = [INSTRUCTION, "You are a helpful assistant.", "system", "user", "assistant"]
    files = sorted(glob.glob(os.path.join(data_dir, "*.jsonl"))) if os.path.isdir(data_dir) else [data_dir]
    # the splits only: train_sft.jsonl re-words train's questions with the same words, and its share of wrong traces
    # must not change the tokenizer (nor the tiny checkpoint the tests draw from)
    files = [f for f in files if not f.endswith("_sft.jsonl")] or files
    if not files:
        raise FileNotFoundError(f"--data={data_dir}: no *.jsonl files to train the tokenizer on")
    for f in files:
        for r in load_records(f):
            texts += [r["question"], "\n".join(r["options"]), format_target(r)]
    return texts


def train_tokenizer(texts, vocab_size=1024):
    """A byte-level BPE in Qwen2's tokenizer class: any text encodes (bytes fall back), specials kept whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          errors="replace", clean_up_tokenization_spaces=False)


def _tiny_text(heads, rope_theta, layers=None):
    """TINY_TEXT with another head count / rope base / layer count; mrope sections scale with head_dim (t:h:w = 2:3:3
    eighths)."""
    if layers is not None and layers != TINY_TEXT["num_hidden_layers"]:
        if layers < 1:
            raise ValueError(f"--tiny_layers={layers}: expected >= 1")
        return dict(_tiny_text(heads, rope_theta), num_hidden_layers=layers)
    hidden = TINY_TEXT["hidden_size"]
    if heads < 2 or hidden % heads or (hidden // heads) % 16:
        raise ValueError(f"--tiny_heads={heads}: expected an even divisor of {hidden} with head_dim a multiple of 16")
    if (heads, rope_theta) == (TINY_TEXT["num_attention_heads"], TINY_TEXT["rope_parameters"]["rope_theta"]):
        return TINY_TEXT
    half = hidden // heads // 2
    sec = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    return dict(TINY_TEXT, num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=hidden // heads,
                rope_parameters=dict(rope_type="default", rope_theta=float(rope_theta), mrope_section=sec))


def _tiny_family(family, text, ids, tokenizer):
    """-> (config, model class, processor) of the tiny checkpoint of one family (transformers' model_type)."""
    import transformers as tf
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                   tie_word_embeddings=True)
    if family == "qwen3_vl":
        # Qwen3-VL: head_dim explicit, interleaved M-RoPE (sections in frequency pairs, t:h:w = 6:5:5 of 16, as the
        # real 24:20:20 of 64); its processor writes "<t seconds>" before each frame group (data.encode_text).
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        half = head_dim // 2
        rope = dict(text["rope_parameters"], mrope_section=[half - 2 * (5 * half // 16), 5 * half // 16,
                                                            5 * half // 16], mrope_interleaved=True)
        config = tf.Qwen3VLConfig(text_config=dict(text, head_dim=head_dim, rope_parameters=rope),
                                  vision_config=TINY_VISION_QWEN3, **special)
        processor = tf.Qwen3VLProcessor(
            image_processor=tf.Qwen2VLImageProcessor(patch_size=16, min_pixels=TINY_PIXELS_QWEN3,
                                                     max_pixels=TINY_PIXELS_QWEN3),
            video_processor=tf.Qwen3VLVideoProcessor(
                size={"shortest_edge": TINY_PIXELS_QWEN3, "longest_edge": TINY_PIXELS_QWEN3},
                cap_pixels_per_frame=True),
            tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
        return config, tf.Qwen3VLForConditionalGeneration, processor
    image_processor = tf.Qwen2VLImageProcessor(min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS)
    video_processor = tf.Qwen2VLVideoProcessor(min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS, cap_pixels_per_frame=True)
    if family == "qwen2_vl":
        processor = tf.Qwen2VLProcessor(image_processor=image_processor, video_processor=video_processor,
                                        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
        config = tf.Qwen2VLConfig(text_config=text, vision_config=TINY_VISION_QWEN2, **special)
        return config, tf.Qwen2VLForConditionalGeneration, processor
    if family != "qwen2_5_vl":
        raise ValueError(f"--family={family!r}: expected one of {FAMILIES}")
    processor = tf.Qwen2_5_VLProcessor(image_processor=image_processor, video_processor=video_processor,
                                       tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=TINY_VISION, **special)
    return config, tf.Qwen2_5_VLForConditionalGeneration, processor


def init_tiny(out_dir, data_dir, seed=0, vocab_size=1024, heads=4, rope_theta=1e6, family="qwen2_5_vl", layers=None):
    """Write a random-init Qwen2_5_VLForConditionalGeneration + processor as a standard HF checkpoint.
    heads / rope_theta: the LM's attention heads (width 128 fixed; head_dim = 128 / heads, KV heads = heads / 2) and
    rope base. The demo uses 8 heads and theta 3: with head_dim 16 each M-RoPE axis gets 2-3 frequencies, and only a
    small base makes them fast enough to tell this model's few positions apart (bench/probe_tiny.py; at 1e4 the w
    axis turns by 0.003 rad between the two token columns). The default (4 heads, theta 1e6, Qwen's) is what the
    tests use (BENCHMARKS.md, "Why SFT learning is fragile"). layers: the LM's layers (None: TINY_TEXT's 2).
    family: qwen2_5_vl (the default), qwen2_vl or qwen3_vl -- the same tiny LM with that family's model class,
    vision tower (TINY_VISION*) and processor."""
    from transformers import GenerationConfig
    tokenizer = train_tokenizer(_dataset_texts(data_dir), vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = (len(tokenizer) + 63) // 64 * 64  # pad the embedding table, as real checkpoints do
    text = dict(vocab_size=vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], **_tiny_text(heads, rope_theta, layers))
    config, model_class, processor = _tiny_family(family, text, ids, tokenizer)
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                                               bos_token_id=ids["<|endoftext|>"])
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    return n

# -----------------------------------------------------------------------------
if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    cfg = config_of(globals())
    if not (out or tiny):
        raise SystemExit("prepare.py: nothing to do: pass --out=DIR (the synthetic set) and/or --tiny=DIR --data=DIR "
                         "(the tiny checkpoint)")
    print("config:", json.dumps(cfg))

    # --- the synthetic set (skipped when DIR already holds it with this config)
    if out:
        mine = os.path.exists(os.path.join(out, "meta.json"))
        theirs = [f for f in ("train.jsonl", "val.jsonl", "test.jsonl") if os.path.exists(os.path.join(out, f))]
        if theirs and not mine:   # a dataset prepare.py did not write: never overwrite it
            raise SystemExit(f"prepare.py: --out={out} already holds {', '.join(theirs)} without the meta.json that "
                             "prepare.py writes: refusing to overwrite a dataset it did not generate (pick another "
                             "--out; to run the demo on it, pass --model=CHECKPOINT too)")
        keys = ("n_train", "n_val", "n_test", "num_frames", "fps", "size", "seed", "cot_noise")
        have = json.load(open(os.path.join(out, "meta.json"))) if mine else {}
        if task not in ("video", "math", "image"):
            raise SystemExit(f"prepare.py: --task={task!r}: expected video, math or image")
        if mine and have.get("task", "video") != task:   # never overwrite one kind of set with the other
            raise SystemExit(f"prepare.py: --out={out} holds a {have.get('task', 'video')} set: pick another --out "
                             f"for --task={task}")
        if task == "math":   # text-only records, no videos: written in well under a second
            generate_math(out, n_train, n_val, n_test, seed)
            print(f"wrote {n_train}/{n_val}/{n_test} train/val/test math questions to {out}")
        elif task == "image":   # PNG pictures, a few ms each
            generate_images(out, n_train, n_val, n_test, size, seed)
            print(f"wrote {n_train}/{n_val}/{n_test} train/val/test image questions to {out}")
        elif mine and all(have.get(k) == cfg[k] for k in keys):
            print(f"{out}: already generated with this config, skipping")
        else:
            if not 0 <= cot_noise < 1:
                raise SystemExit(f"prepare.py: --cot_noise={cot_noise}: expected a fraction in [0, 1)")
            generate_synthetic(out, n_train, n_val, n_test, num_frames, fps, size, seed, workers=workers,
                               cot_noise=cot_noise)
            print(f"wrote {n_train}/{n_val}/{n_test} train/val/test questions to {out}")

    # --- the tiny checkpoint
    if tiny:
        n = init_tiny(tiny, data, seed, heads=tiny_heads, rope_theta=tiny_rope_theta, family=family,
                      layers=tiny_layers)
        print(f"wrote tiny {family} ({n / 1e6:.2f}M params) to {tiny}")
