"""data.py: frame sampling, decoding (containers/codecs/backends/bad files), records, synthetic set, CLI config."""
import json
import os
from fractions import Fraction

import numpy as np
import pytest

import data
from data import (CATEGORIES, LETTERS, RecordError, VideoError, apply_overrides, load_records, load_video,
                  sample_frame_indices, sampled_frame_count)


# ----------------------------------------------------------------------------- frame sampling
def test_sample_fixed_count_rounds_to_even_and_is_uniform():
    assert sample_frame_indices(10, 30.0, num_frames=4) == [0, 3, 6, 9]
    assert len(sample_frame_indices(100, 30.0, num_frames=31)) == 32   # round(15.5)*2
    assert len(sample_frame_indices(100, 30.0, num_frames=33)) == 32   # round(16.5)=16: banker's, as qwen-vl-utils
    assert len(sample_frame_indices(100, 30.0, num_frames=35)) == 36
    idx = sample_frame_indices(256, 8.0, num_frames=16)
    assert idx[0] == 0 and idx[-1] == 255 and idx == sorted(set(idx))


def test_sample_fps_rules_match_qwen_vl_utils():
    # 10 s at 30 fps, 2 fps sampling -> 20 frames
    assert len(sample_frame_indices(300, 30.0)) == 20
    # 1 s video -> 2 frames, clamped up to FPS_MIN_FRAMES=4
    assert len(sample_frame_indices(30, 30.0)) == 4
    # 400 s video -> 800, clamped down to FPS_MAX_FRAMES=768
    assert len(sample_frame_indices(10000, 25.0)) == 768
    # short clip: never more frames than the video has (floor2(min(768, 5)) = 4)
    assert sample_frame_indices(5, 1.0) == [0, 1, 3, 4]     # linspace(0, 4, 4) = 0, 1.33, 2.67, 4
    # odd result floors to a multiple of 2: 7 s at 1 fps * 1.0 -> 7 -> 6
    assert len(sample_frame_indices(7, 1.0, fps=1.0)) == 6


@pytest.mark.parametrize("total,kw", [(1, {}), (0, {"num_frames": 2}), (10, {"num_frames": 12}),
                                      (10, {"num_frames": 0})])
def test_sample_bad_requests_raise(total, kw):
    with pytest.raises(VideoError):
        sample_frame_indices(total, 30.0, **kw)


# ----------------------------------------------------------------------------- decoding
def _write(path, codec, fps, T=40, H=60, W=90, pix_fmt="yuv420p", options=None):
    """Solid frames whose brightness encodes the frame index (5*i): we can check *which* frames came back."""
    import av
    with av.open(str(path), "w", options=options or {}) as out:
        st = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        st.width, st.height, st.pix_fmt = W, H, pix_fmt
        for i in range(T):
            f = np.full((H, W, 3), 5 * i, np.uint8)
            for p in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    return str(path)


VIDEO_CASES = [  # (file name, codec, fps, size, pix_fmt)
    ("a.mp4", "libx264", 30000 / 1001, (60, 90), "yuv420p"),     # NTSC fps, non-square odd-ish size
    ("b.mkv", "libx264", 7.5, (76, 100), "yuv420p"),
    ("c.avi", "mjpeg", 25, (64, 48), "yuvj420p"),
    ("d.webm", "libvpx-vp9", 12, (58, 82), "yuv420p"),
    ("e.mp4", "mpeg4", 15, (50, 70), "yuv420p"),
]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {name: (_write(d / name, codec, fps, H=hw[0], W=hw[1], pix_fmt=pf), fps, hw)
            for name, codec, fps, hw, pf in VIDEO_CASES}


@pytest.mark.parametrize("name", [c[0] for c in VIDEO_CASES])
def test_decode_containers_and_backends_agree(videos, name):
    path, fps, (H, W) = videos[name]
    results = {}
    for backend in ("pyav", "decord", None):
        try:
            frames, info = load_video(path, num_frames=8, backend=backend)
        except VideoError as e:
            if backend == "decord" and "cannot decode" in str(e):
                continue  # decord lacks some demuxers/codecs; the default path falls back to PyAV
            raise
        assert frames.dtype == np.uint8 and frames.shape == (8, H, W, 3)
        assert info["total_frames"] == 40
        assert info["video_fps"] == pytest.approx(fps, rel=1e-3)
        assert info["duration"] == pytest.approx(40 / fps, rel=1e-3)
        assert info["indices"] == sample_frame_indices(40, fps, num_frames=8)
        # the right frames: brightness 5*i (lossy codecs: within a few levels)
        means = frames.reshape(8, -1).mean(1)
        np.testing.assert_allclose(means, 5 * np.array(info["indices"]), atol=4)
        results[backend or "auto"] = frames
    assert "pyav" in results and "auto" in results
    if "decord" in results:
        assert np.abs(results["decord"].astype(int) - results["pyav"]).max() <= 2


def test_decode_fps_sampling_path(videos):
    path, fps, _ = videos["b.mkv"]           # 40 frames at 7.5 fps = 5.33 s -> 10.67 -> 10 frames at 2 fps
    frames, info = load_video(path)
    assert len(info["indices"]) == 10 and frames.shape[0] == 10
    assert info["sampled_fps"] == pytest.approx(10 / (40 / 7.5))


@pytest.mark.parametrize("backend", ["pyav", "decord", None])
def test_decode_a_subset_of_the_sampled_frames(videos, backend):
    """subset=(s, e): frames s..e-1 of the sampling (what one MR-SP rank decodes), the sampling itself unchanged."""
    path, fps, _ = videos["a.mp4"]
    full, info = load_video(path, num_frames=8, backend=backend)
    assert sampled_frame_count(path, num_frames=8) == 8 and sampled_frame_count(path) == len(load_video(path)[1]["indices"])
    for s, e in [(0, 2), (2, 6), (6, 8), (0, 8)]:
        part, pinfo = load_video(path, num_frames=8, backend=backend, subset=(s, e))
        assert np.array_equal(part, full[s:e])
        assert pinfo["indices"] == info["indices"] and pinfo["sampled_fps"] == info["sampled_fps"]
        assert pinfo["subset"] == (s, e)
    with pytest.raises(VideoError, match=r"a.mp4: subset=\(6, 10\) reaches past the 8 sampled frame"):
        load_video(path, num_frames=8, backend=backend, subset=(6, 10))
    with pytest.raises(ValueError, match=r"subset=\(4, 4\): expected \(start, end\)"):
        load_video(path, num_frames=8, backend=backend, subset=(4, 4))


def test_sampled_frame_count_names_bad_files(tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(4096))
    with pytest.raises(VideoError, match="corrupt.mp4"):
        sampled_frame_count(tmp_path / "corrupt.mp4", num_frames=8)
    with pytest.raises(VideoError, match="missing.mp4: no such file"):
        sampled_frame_count(tmp_path / "missing.mp4")


def test_bad_video_files_raise_video_error(tmp_path, videos):
    good = open(videos["a.mp4"][0], "rb").read()
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(4096))
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "trunc.mp4").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 50)
    fs = _write(tmp_path / "fs.mp4", "libx264", 30, options={"movflags": "+faststart"})
    (tmp_path / "fs_trunc.mp4").write_bytes(open(fs, "rb").read()[: int(os.path.getsize(fs) * 0.6)])
    (tmp_path / "dir.mp4").mkdir()
    cases = {"corrupt.mp4": "cannot decode", "empty.mp4": "empty", "trunc.mp4": "cannot decode",
             "text.mp4": "cannot decode", "fs_trunc.mp4": "", "dir.mp4": "directory", "missing.mp4": "no such file"}
    for name, why in cases.items():
        for backend in (None, "pyav"):
            with pytest.raises(VideoError) as e:
                load_video(tmp_path / name, num_frames=8, backend=backend)
            assert name in str(e.value) and why in str(e.value), str(e.value)
    assert issubclass(VideoError, ValueError)


def test_single_frame_video_is_an_error(tmp_path):
    p = _write(tmp_path / "one.mp4", "libx264", 10, T=1)
    with pytest.raises(VideoError, match="at least 2"):
        load_video(p)


# ----------------------------------------------------------------------------- records
def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_load_longvideo_reason_released_format(tmp_path):
    row = {"problem_id": 7, "data_type": "video", "videos": "abc.mp4",
           "problem": "What is the man's goal?\nA. Cook dinner\nB. Fix the car\nC. Go home\nD. Sleep",
           "reasoning": "He opens the hood.", "answer": "<answer>B</answer>", "category": "Goal and Purpose"}
    (r,) = load_records(_jsonl(tmp_path / "lvr.jsonl", [row]))
    assert r["id"] == "7" and r["question"] == "What is the man's goal?"
    assert r["options"] == ["A. Cook dinner", "B. Fix the car", "C. Go home", "D. Sleep"]
    assert r["answer"] == "B" and r["reasoning"] == "He opens the hood." and r["category"] == "goal"
    assert r["video"] == str(tmp_path / "abc.mp4")   # relative to the data file's folder
    assert r["source"] == "longvideo-reason"


def test_load_videomme_json_and_jsonl(tmp_path):
    row = {"video_id": "001", "videoID": "fFjv93ACGo8", "duration": "short", "domain": "Knowledge",
           "sub_category": "Humanity & History", "task_type": "Counting Problem", "question_id": "001-1",
           "question": "How many people?", "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "C"}
    (tmp_path / "vm.json").write_text(json.dumps([row]))
    for f in (str(tmp_path / "vm.json"), _jsonl(tmp_path / "vm.jsonl", [row])):
        (r,) = load_records(f)
        assert r["id"] == "001-1" and r["answer"] == "C" and r["duration"] == "short"
        assert r["domain"] == "Knowledge" and r["task_type"] == "Counting Problem"
        assert r["video"] == str(tmp_path / "fFjv93ACGo8.mp4") and r["options"][2] == "C. 3."


def test_load_normalized_format_and_video_root(tmp_path):
    row = {"id": "x", "video": "v/x.mp4", "question": "Q?", "options": ["red", "blue"], "answer": "b"}
    (r,) = load_records(_jsonl(tmp_path / "n.jsonl", [row]), video_root="/videos")
    assert r["options"] == ["A. red", "B. blue"] and r["answer"] == "B" and r["video"] == "/videos/v/x.mp4"


@pytest.mark.parametrize("bad,where", [
    ({"id": "a", "video": "x.mp4", "question": "Q", "options": ["A. a", "B. b"]}, "field 'answer'"),
    ({"id": "a", "video": "x.mp4", "question": "Q", "options": ["A. a", "B. b"], "answer": "E"}, "field 'answer'"),
    ({"id": "a", "video": "x.mp4", "question": "Q", "options": "A. a", "answer": "A"}, "field 'options'"),
    ({"id": "a", "question": "Q", "options": ["a", "b"], "answer": "A"}, "field 'video'"),
    ({"id": "a", "video": "x.mp4", "question": "", "options": ["a", "b"], "answer": "A"}, "field 'question'"),
    ("{not json", "invalid JSON"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_records_name_file_line_and_field(tmp_path, bad, where):
    good = {"id": "ok", "video": "x.mp4", "question": "Q", "options": ["a", "b"], "answer": "A"}
    path = _jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert f"{path}:2" in str(e.value) and where in str(e.value), str(e.value)


def test_duplicate_ids_and_missing_file(tmp_path):
    row = {"id": "a", "video": "x.mp4", "question": "Q", "options": ["a", "b"], "answer": "A"}
    with pytest.raises(RecordError, match="duplicate id"):
        load_records(_jsonl(tmp_path / "d.jsonl", [row, row]))
    with pytest.raises(RecordError, match="no such data file"):
        load_records(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- synthetic set
def test_synthetic_is_balanced_long_and_decodes(synth_dir):
    meta = json.load(open(os.path.join(synth_dir, "meta.json")))
    assert meta["num_frames"] >= 256
    for split, n in (("train", 32), ("val", 16), ("test", 16)):
        recs = load_records(os.path.join(synth_dir, f"{split}.jsonl"))
        assert len(recs) == n
        assert {c: sum(r["category"] == c for r in recs) for c in CATEGORIES} == {c: n // 4 for c in CATEGORIES}
        assert {L: sum(r["answer"] == L for r in recs) for L in "ABCD"} == {L: n // 4 for L in "ABCD"}
        for r in recs:
            assert len(r["options"]) == 4 and len(set(r["options"])) == 4
            assert r["reasoning"].endswith(f"option {r['answer']}.")
    recs = load_records(os.path.join(synth_dir, "val.jsonl"))
    for r in recs[:4]:
        frames, info = load_video(r["video"], num_frames=256)
        assert info["total_frames"] == meta["num_frames"] and frames.shape[1:] == (112, 112, 3)


def test_synthetic_events_span_the_whole_video(synth_dir):
    """The answer needs the whole video: coloured content appears in every quarter of it."""
    for r in load_records(os.path.join(synth_dir, "train.jsonl"))[:8]:
        frames, info = load_video(r["video"], num_frames=256)
        lit = frames.reshape(len(frames), -1).max(1) > 100        # any bright pixel in the frame
        quarters = np.array_split(lit, 4)
        assert all(q.any() for q in quarters), (r["id"], r["category"])
        if r["category"] in ("temporal", "spatial", "plot"):
            assert lit.mean() < 0.9                               # events, not a static picture


def test_synthetic_answer_is_in_the_pixels(synth_dir):
    """Spatial questions: the named colour really is in the answered quadrant (checks the generator)."""
    checked = 0
    for r in load_records(os.path.join(synth_dir, "train.jsonl")):
        if r["category"] != "spatial":
            continue
        colour = r["question"].split("the ")[1].split(" square")[0]
        quad = r["options"][LETTERS.index(r["answer"])][3:]
        frames, _ = load_video(r["video"], num_frames=256)
        rgb = np.array(data.COLOURS[colour])
        hit = (np.abs(frames.astype(int) - rgb).sum(-1) < 60)    # (T, H, W) pixels of that colour
        ys, xs = np.nonzero(hit.any(0))
        assert len(ys) > 0
        top, left = ys.mean() < 56, xs.mean() < 56
        assert quad == f"{'top' if top else 'bottom'}-{'left' if left else 'right'}", r["id"]
        checked += 1
    assert checked >= 4


def test_synthetic_is_deterministic_by_seed(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    for out, seed, workers in ((a, 3, 1), (b, 3, 2), (c, 4, 1)):   # b: the mp4s encoded by 2 worker processes
        data.generate_synthetic(out, n_train=6, n_val=2, n_test=0, num_frames=64, fps=8.0, size=56,
                                seed=seed, progress=False, workers=workers)
    read = lambda d, f: open(os.path.join(d, f), "rb").read()  # noqa: E731
    assert read(a, "train.jsonl") == read(b, "train.jsonl") and read(a, "val.jsonl") == read(b, "val.jsonl")
    names = sorted(os.listdir(os.path.join(a, "videos")))
    assert len(names) == 8 and names == sorted(os.listdir(os.path.join(b, "videos")))   # no leftover temp files
    for name in names:
        assert read(a, f"videos/{name}") == read(b, f"videos/{name}")
    assert read(a, "train.jsonl") != read(c, "train.jsonl")


def test_synthetic_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="size"):
        data.generate_synthetic(str(tmp_path), n_train=1, n_val=0, n_test=0, size=100, progress=False)
    with pytest.raises(ValueError, match="num_frames"):
        data.generate_synthetic(str(tmp_path), n_train=1, n_val=0, n_test=0, num_frames=16, progress=False)


# ----------------------------------------------------------------------------- config overrides
def test_apply_overrides_types_and_errors():
    cfg = dict(lr=1e-3, steps=10, name="x", flag=True, path=None)
    apply_overrides(cfg, ["--lr=2", "--steps=5", "--name=y", "--flag=0", "--path=/a"])
    assert cfg == dict(lr=2.0, steps=5, name="y", flag=False, path="/a")
    for bad in (["--nope=1"], ["--steps=1.5"], ["--flag=maybe"], ["steps=3"], ["--lr=abc"]):
        with pytest.raises(SystemExit):
            apply_overrides(dict(cfg), bad)


# ----------------------------------------------------------------------------- answer extraction
OPTS = ["A. Candles", "B. A red ball", "C. Blue sky", "D. Dogs"]
EXTRACT_CASES = [
    ("<think>The last one is blue.</think><answer>C</answer>", "C"),
    ("<think>x</think><answer>(C) Blue sky</answer>", "C"),
    ("<answer> c </answer>", "C"),
    ("<answer>B</answer> ... <answer>D</answer>", "D"),            # the last tag
    ("C", "C"), ("(C)", "C"), ("C.", "C"), ("c", "C"), ("C) Blue sky", "C"), ("C. Blue sky", "C"),
    ("Answer: C", "C"), ("answer: b", "B"), ("The answer is (D).", "D"), ("the answer is C", "C"),
    ("Based on the video, the answer is C.", "C"),                  # lmms-eval's Video-MME regex returns B
    ("A person walks in, so the answer is D.", "D"),
    ("I think the best option is B because the ball is red.", "B"),
    ("Best option: (A)", "A"),
    ("A person is walking in the park.", None),                    # an article, not an answer
    ("Based on the video, I cannot tell.", None),
    ("The answer is a dog.", None),
    ("E", None), ("The answer is E.", None),                       # only 4 options
    ("<answer></answer>", None), ("", None), (None, None),
    ("candles", "A"), ("<answer>Blue sky</answer>", "C"),          # option text
    ("It could be candles or dogs.", None),                        # two options named: ambiguous
]


@pytest.mark.parametrize("text,want", EXTRACT_CASES)
def test_extract_choice(text, want):
    from data import extract_choice
    assert extract_choice(text, 4, OPTS) == want
