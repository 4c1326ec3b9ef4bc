"""data.py: frame sampling, decoding (containers/codecs/backends/bad files), records, synthetic set, CLI config."""
import json
import os
from fractions import Fraction

import numpy as np
import pytest

import data
import prepare
from common import apply_overrides
from data import (CATEGORIES, LETTERS, RecordError, VideoError, load_records, load_video,
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


# ----------------------------------------------------------------------------- qwen-vl-utils 0.0.14 parity
# Real Qwen2-VL / Qwen2.5-VL checkpoints were trained on frames chosen and sized by qwen-vl-utils: these tests run
# its own code (installed from requirements.txt) on broad grids and require the same frames, sizes and fps.
import sys                                   # noqa: E402
from types import SimpleNamespace            # noqa: E402

from data import (decode_opts, frame_size, process_video, size_opts, smart_resize, video_key,  # noqa: E402
                  video_options)


@pytest.fixture(scope="module")
def qvu():
    from importlib.metadata import version
    from qwen_vl_utils import vision_process
    assert version("qwen-vl-utils") == "0.0.14"
    assert vision_process.MODEL_SEQ_LEN == data.MODEL_SEQ_LEN   # its env override (MODEL_SEQ_LEN) is not set
    return vision_process


class _FakeVideo:
    def __init__(self, n, fps):
        self.n, self.fps = n, fps

    def __len__(self):
        return self.n

    def get_avg_fps(self):
        return self.fps

    def get_batch(self, idx):
        return SimpleNamespace(asnumpy=lambda: np.zeros((len(idx), 2, 2, 3), np.uint8))


class _FakeDecord:
    """Stands in for the decord module: a 'video' of `total` frames at `fps`, so qwen-vl-utils' decord reader and ours
    run their real sampling code on any (length, fps) without encoding videos."""
    def __init__(self):
        self.total, self.fps = 2, 1.0

    def cpu(self, _):
        return None

    def VideoReader(self, path, ctx=None, num_threads=0):  # noqa: N802 - decord's name
        return _FakeVideo(self.total, self.fps)


@pytest.fixture
def fake_decord(monkeypatch, tmp_path):
    fake = _FakeDecord()
    monkeypatch.setitem(sys.modules, "decord", fake)
    path = tmp_path / "fake.mp4"
    path.write_bytes(b"not read: the fake decord answers")
    return fake, str(path)


def _exact_indices(first, last, n):
    """round-half-even(first + i * (last - first) / (n - 1)) in integer arithmetic: the exact linspace indices."""
    i = np.arange(n, dtype=np.int64)
    num, den = i * (last - first), n - 1
    q, r = num // den, num % den
    return (first + q + ((2 * r > den) | ((2 * r == den) & (q % 2 == 1)))).tolist()


FPSS = (1.0, 7.5, 24000 / 1001, 25.0, 30000 / 1001, 30.0, 60.0)
TOTALS = (2, 3, 5, 8, 31, 100, 301, 1000, 1799, 7201, 10800, 12342, 40000)
SAMPLINGS = ({}, {"nframes": 2}, {"nframes": 7}, {"nframes": 16}, {"nframes": 33}, {"nframes": 256},
             {"nframes": 768}, {"fps": 0.5}, {"fps": 1.0}, {"fps": 4.0}, {"min_frames": 8}, {"max_frames": 64},
             {"max_frames": 3}, {"fps": 1.0, "min_frames": 16, "max_frames": 32}, {"video_start": 2.5},
             {"video_end": 5.0}, {"video_start": 1.0, "video_end": 3.3}, {"video_start": 10, "video_end": 100},
             {"video_start": 0.4, "video_end": 0.5}, {"nframes": 16, "video_start": 1.5, "video_end": 9.0})


def test_frame_sampling_matches_qwen_vl_utils(qvu, fake_decord):
    """Indices and sample fps of qwen-vl-utils' decord reader (calculate_video_frame_range + smart_nframes +
    linspace) == load_video's, over lengths x fps x options; the only difference allowed is the documented
    float32-linspace one (one frame, where the exact value lies within float32 precision of .5)."""
    fake, path = fake_decord
    compared = errors = float32_diffs = 0
    for total in TOTALS:
        for fps in FPSS:
            fake.total, fake.fps = total, fps
            for opts in SAMPLINGS:
                try:
                    _, meta, their_fps = qvu._read_video_decord({"video": path, **opts})
                except ValueError:
                    with pytest.raises(VideoError):
                        load_video(path, backend="decord", **decode_opts(video_options({"video_opts": opts})))
                    errors += 1
                    continue
                _, info = load_video(path, backend="decord", **decode_opts(video_options({"video_opts": opts})))
                ours, theirs = info["indices"], meta["frames_indices"]
                first, last = ours[0], ours[-1]
                assert ours == _exact_indices(first, last, len(ours)), (total, fps, opts)
                assert info["sampled_fps"] == their_fps and len(ours) == len(theirs), (total, fps, opts)
                for k in np.flatnonzero(np.array(ours) != np.array(theirs)):
                    x = Fraction(first) + Fraction(int(k) * (last - first), len(ours) - 1)
                    assert abs(ours[k] - theirs[k]) == 1 and abs(x - int(x) - Fraction(1, 2)) < last * 2 ** -23
                    float32_diffs += 1
                compared += 1
    assert compared > 1200 and errors > 50 and float32_diffs > 0   # the grid reaches all three outcomes


def test_float32_linspace_difference_is_one_frame(qvu, fake_decord):
    """The documented difference, pinned: 768 of 12,342 frames differ in exactly one index, by one frame, and ours
    is the exact rounding."""
    fake, path = fake_decord
    fake.total, fake.fps = 12342, 30.0
    _, meta, _ = qvu._read_video_decord({"video": path, "nframes": 768})
    ours = load_video(path, num_frames=768, backend="decord")[1]["indices"]
    diff = [k for k, (a, b) in enumerate(zip(ours, meta["frames_indices"])) if a != b]
    assert len(diff) == 1 and abs(ours[diff[0]] - meta["frames_indices"][diff[0]]) == 1
    assert ours == _exact_indices(0, 12341, 768)


RESOLUTIONS = [(144, 256), (240, 426), (360, 640), (480, 854), (720, 1280), (1080, 1920), (1440, 2560),
               (2160, 3840), (50, 50), (1080, 1080), (333, 777), (100, 3000), (30, 5000)]
RESOLUTIONS += [(w, h) for h, w in RESOLUTIONS if h != w]   # portrait
NFRAMES = (2, 4, 8, 16, 30, 64, 128, 256, 500, 512, 768)
SIZINGS = ({}, {"min_pixels": 3136}, {"min_pixels": 256 * 784}, {"max_pixels": 200000}, {"max_pixels": 50000},
           {"max_pixels": 50000, "min_pixels": 3136}, {"total_pixels": 20_000_000},
           {"total_pixels": 1e6, "min_pixels": 3136}, {"total_pixels": 500_000_000},
           {"resized_height": 300, "resized_width": 500}, {"resized_height": 1000, "resized_width": 64})


def test_frame_size_matches_qwen_vl_utils(qvu, monkeypatch):
    """Per-video frame size of qwen-vl-utils' fetch_video (its own code, run on a zero-copy stand-in video; the
    resize is captured instead of run) == frame_size, 144p..4K, portrait and landscape, 2..768 frames, the pixel
    options, patch 14 (Qwen2.5-VL) and 16 (Qwen3-VL). Where it would floor a side to 0 we give `factor` (documented)."""
    import torch
    shape, got = {}, {}
    monkeypatch.setitem(qvu.VIDEO_READER_BACKENDS, "decord", lambda ele: (
        torch.zeros(1, 3, 1, 1, dtype=torch.uint8).expand(shape["n"], 3, shape["h"], shape["w"]), {}, 2.0))
    monkeypatch.setattr(qvu, "get_video_reader_backend", lambda: "decord")
    monkeypatch.setattr(qvu, "transforms", SimpleNamespace(functional=SimpleNamespace(
        resize=lambda video, size, **kw: got.update(size=tuple(size)) or video[:0])))
    compared = zero_sides = errors = 0
    for patch in (14, 16):
        factor = 2 * patch
        for h, w in RESOLUTIONS:
            for n in NFRAMES:
                for opts in SIZINGS:
                    shape.update(h=h, w=w, n=n)
                    try:
                        qvu.fetch_video({"video": "v.mp4", **opts}, image_patch_size=patch)
                    except (ValueError, AssertionError):   # aspect ratio over 200, max_pixels under min_pixels
                        with pytest.raises(ValueError):
                            frame_size(h, w, n, factor, **opts)
                        errors += 1
                        continue
                    ours = frame_size(h, w, n, factor, **opts)
                    if 0 in got["size"]:
                        assert ours == tuple(v or factor for v in got["size"]), (h, w, n, opts)
                        zero_sides += 1
                    else:
                        assert ours == got["size"], (patch, h, w, n, opts)
                    compared += 1
    assert compared > 5000 and zero_sides > 0 and errors > 0


def test_smart_resize_bad_input_names_the_values():
    with pytest.raises(ValueError, match=r"frame size 10x3000: aspect ratio 300.0 is over 200"):
        smart_resize(10, 3000)
    with pytest.raises(ValueError, match=r"max_pixels=1000 < min_pixels=3136"):
        smart_resize(100, 100, 28, 3136, 1000)
    with pytest.raises(ValueError, match=r"frame size 0x100"):
        smart_resize(0, 100)
    with pytest.raises(ValueError, match="resized_height=300, resized_width=None: give both or neither"):
        frame_size(100, 100, 8, resized_height=300)
    assert smart_resize(30, 5000, 28, 3136, 128 * 784) == (28, 4088)   # qwen-vl-utils: (0, 4088)


@pytest.fixture(scope="module")
def gradient_mp4(tmp_path_factory, T=48, H=360, W=640, fps=24):
    """A moving gradient with hard edges (2 s): resizing it exercises interpolation, rounding and clamping."""
    import av
    path = tmp_path_factory.mktemp("gradient") / "g.mp4"
    yy, xx = np.mgrid[:H, :W]
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = W, H, "yuv420p"
        for t in range(T):
            f = np.stack([(xx + 5 * t) % 256, (yy * 2) % 256, ((xx // 40 + yy // 40 + t) % 2) * 255], -1)
            for p in st.encode(av.VideoFrame.from_ndarray(f.astype(np.uint8), format="rgb24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    return str(path)


def _checkpoint_processor(**kw):
    """A Qwen2.5-VL checkpoint's video processor: per-frame range 3136..12845056 pixels (its min/max_pixels)."""
    from transformers import Qwen2VLVideoProcessor
    return SimpleNamespace(video_processor=Qwen2VLVideoProcessor(
        **dict(dict(min_pixels=3136, max_pixels=12845056, cap_pixels_per_frame=False), **kw)))


def test_processed_frame_size_says_when_the_processor_resizes_an_asked_size():
    """A record's explicit resized_height/width outside the checkpoint's per-frame range is re-sized as the HF
    processor would (the reference pipeline), with a warning naming both sizes; inside the range, or when the size
    comes from the pixel budgets (whose defaults exceed a small checkpoint's range), there is no warning."""
    import warnings
    tiny = _checkpoint_processor(min_pixels=3136, max_pixels=3136)   # the tiny test model's range: 56x56 only
    with pytest.warns(UserWarning, match=r"112x112 \(112x112 = 12,544 pixels a frame\) is outside .* "
                                         r"3,136\.\.3,136 pixels.* reach the model at 56x56"):
        assert data.processed_frame_size(tiny, 360, 640, 8, resized_height=112, resized_width=112) == (56, 56)
    big = _checkpoint_processor(min_pixels=112 * 112)    # below the range: up-sized, ceil(side * sqrt(12544 / 4704))
    with pytest.warns(UserWarning, match=r"56x84 \(56x84 = 4,704 pixels a frame\) .* reach the model at 112x140"):
        assert data.processed_frame_size(big, 360, 640, 8, resized_height=56, resized_width=84) == (112, 140)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.processed_frame_size(tiny, 360, 640, 8, resized_height=56, resized_width=56) == (56, 56)
        assert data.processed_frame_size(tiny, 360, 640, 8) == (28, 56)            # budget-sized: clamped quietly
        assert data.processed_frame_size(_checkpoint_processor(), 360, 640, 8, resized_height=112,
                                         resized_width=112) == (112, 112)           # the 7B's range keeps it


@pytest.mark.parametrize("opts", [{}, {"nframes": 16, "total_pixels": 1_000_000},
                                  {"fps": 4.0, "video_start": 0.5, "video_end": 1.8, "min_pixels": 3136,
                                   "max_pixels": 80000},
                                  {"min_pixels": 400_000}, {"resized_height": 200, "resized_width": 300}])
def test_decoded_video_matches_qwen_vl_utils_pipeline(qvu, monkeypatch, gradient_mp4, opts):
    """A real mp4 through qwen-vl-utils' fetch_video (decord reader) and the checkpoint's processor, the reference
    pipeline, vs load_video + process_video: same frames, size, sample fps, and pixel values."""
    import torch
    monkeypatch.setattr(qvu, "FORCE_QWENVL_VIDEO_READER", "decord")
    qvu.get_video_reader_backend.cache_clear()
    path = gradient_mp4
    try:
        (video, meta), their_fps = qvu.fetch_video({"video": path, **opts}, return_video_sample_fps=True,
                                                   return_video_metadata=True)
    finally:
        qvu.get_video_reader_backend.cache_clear()
    proc = _checkpoint_processor()
    ref = proc.video_processor(videos=[video], return_tensors="pt")   # (float frames, already sized: no resize)
    vopts = video_options({"video_opts": opts})
    frames, info = load_video(path, backend="decord", **decode_opts(vopts))
    ours = process_video(proc, frames, info, **size_opts(vopts))
    assert info["indices"] == meta["frames_indices"] and info["sampled_fps"] == their_fps
    assert (ours["video_grid_thw"][0, 1:] * 14).tolist() == list(video.shape[-2:])
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
    assert ours["second_per_grid_ts"].item() == pytest.approx(2 / their_fps, rel=1e-6)


def _info(n, subset=None, video_fps=8.0, step=4):
    total = n * step
    return dict(video_fps=video_fps, total_frames=total, indices=list(range(0, total, step)),
                duration=total / video_fps, sampled_fps=n / total * video_fps, subset=subset)


def test_720p_512_frames_token_budget():
    """Regression figure: 512 frames of 720p are 420x784 frames, 107,520 video tokens, under qwen-vl-utils' total
    budget, where a checkpoint's plain HF processor (per-frame range only) makes them 560x1008, 184,320 tokens."""
    from transformers import Qwen2VLVideoProcessor
    assert frame_size(720, 1280, 512) == (420, 784)
    plain = Qwen2VLVideoProcessor(cap_pixels_per_frame=False)          # size range 128..768 tokens per frame
    assert plain.get_num_of_video_patches(512, 720, 1280, {}) // 4 == 184_320
    # process_video sizes from the whole sampling even when handed two frames of it (one SP rank's share)
    out = process_video(SimpleNamespace(video_processor=plain), np.zeros((2, 720, 1280, 3), np.uint8),
                        _info(512, subset=(0, 2)))
    t, gh, gw = out["video_grid_thw"][0].tolist()
    assert (t, gh * 14, gw * 14) == (1, 420, 784) and 512 // 2 * gh * gw // 4 == 107_520


def test_process_video_share_gets_the_whole_videos_size():
    """MR-SP parallel decoding: a share of the frames is processed to the whole video's grid h, w and exactly its
    rows of the whole video's patches, even with a processor whose own cap depends on the frame count it is given
    (cap_pixels_per_frame=True; the old process_video gave 8 of these 16 frames a bigger per-frame budget)."""
    import torch
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (16, 360, 640, 3), dtype=np.uint8)
    proc = _checkpoint_processor(max_pixels=768 * 784, cap_pixels_per_frame=True, max_video_tokens=2000)
    full = process_video(proc, frames, _info(16))
    rows = int(full["video_grid_thw"][0, 1:].prod())    # patches per temporal patch
    for s, e in [(0, 8), (8, 16), (2, 6)]:
        part = process_video(proc, frames[s:e], _info(16, subset=(s, e)))
        assert part["video_grid_thw"][0].tolist() == [(e - s) // 2, *full["video_grid_thw"][0, 1:].tolist()]
        assert torch.equal(part["pixel_values_videos"], full["pixel_values_videos"][s // 2 * rows:e // 2 * rows])
        assert torch.equal(part["second_per_grid_ts"], full["second_per_grid_ts"])
    with pytest.raises(ValueError, match=r"3 frames for info describing 4 \(subset=\(0, 4\)\)"):
        process_video(proc, frames[:3], _info(16, subset=(0, 4)))


def test_tiny_checkpoint_keeps_its_grid(tiny_ckpt, synth_dir):
    """The embedded tiny checkpoint (processor range: 56x56 only) still gets 56x56 frames, the grid and token count
    its processor alone gives. Pixels: qwen-vl-utils' resize kernel, within a few levels of the processor's own."""
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(tiny_ckpt)
    for rec in load_records(os.path.join(synth_dir, "val.jsonl"))[:4]:
        frames, info = load_video(rec["video"], num_frames=16)
        out = process_video(proc, frames, info)
        ref = proc.video_processor(videos=[frames], video_metadata=[data.video_metadata(info)], return_tensors="pt")
        assert out["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist() == [[8, 4, 4]]
        levels = (out["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max().item() * 0.27 * 255
        assert levels < 8, levels


# ----------------------------------------------------------------------------- per-sample video options
def _row(**kw):
    return dict({"id": "a", "video": "x.mp4", "question": "Q", "options": ["a", "b"], "answer": "A"}, **kw)


def test_record_video_fields_land_in_video_opts(tmp_path):
    good = dict(nframes=64.0, min_pixels=3136, max_pixels=200000, total_pixels=9e6, resized_height=280,
                resized_width=420, video_start=0, video_end=12.5)
    plain, full, fps = load_records(_jsonl(tmp_path / "o.jsonl", [
        _row(), _row(id="b", **good), _row(id="c", fps=1.0, min_frames=8, max_frames=64)]))
    assert plain["video_opts"] == {}
    assert full["video_opts"] == dict(good, nframes=64) and isinstance(full["video_opts"]["nframes"], int)
    assert fps["video_opts"] == dict(fps=1.0, min_frames=8, max_frames=64)


@pytest.mark.parametrize("bad,field,why", [
    ({"nframes": 0}, "nframes", "at least 2"), ({"nframes": "16"}, "nframes", "expected a number"),
    ({"nframes": 15.5}, "nframes", "whole number"), ({"fps": -1}, "fps", "> 0"),
    ({"fps": float("nan")}, "fps", "number"),
    ({"total_pixels": True}, "total_pixels", "expected a number"), ({"video_start": -1}, "video_start", ">= 0"),
    ({"video_start": 5, "video_end": 3}, "video_end", "above video_start=5"),
    ({"video_start": 5, "video_end": 5}, "video_end", "above video_start=5"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "max_pixels", "at least min_pixels=5000"),
    ({"min_frames": 9, "max_frames": 8}, "max_frames", "at least min_frames=9"),
    ({"resized_height": 100}, "resized_height", "give both or neither"),
    ({"nframes": 16, "fps": 2}, "fps", "cannot go with fps"),
])
def test_bad_record_video_fields_name_file_line_and_field(tmp_path, bad, field, why):
    path = _jsonl(tmp_path / "bad.jsonl", [_row(), _row(id="b", **bad)])
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert f"{path}:2: field {field!r}" in str(e.value) and why in str(e.value), str(e.value)


def test_video_options_merge_record_over_stage_defaults():
    stage = dict(num_frames=64, min_pixels=3136, total_pixels=None)
    assert video_options(None, **stage) == dict(num_frames=64, min_pixels=3136)
    assert video_options({"video_opts": {}}, **stage) == dict(num_frames=64, min_pixels=3136)
    rec = {"id": "r", "video_opts": {"fps": 1.0, "min_pixels": 6272, "video_end": 30}}   # fps sampling wins
    opts = video_options(rec, **stage)
    assert opts == dict(fps=1.0, min_pixels=6272, video_end=30)
    assert decode_opts(opts) == dict(fps=1.0, video_end=30) and size_opts(opts) == dict(min_pixels=6272)
    assert video_options({"video_opts": {"nframes": 16}}, fps=4.0, max_frames=32) == dict(num_frames=16)
    with pytest.raises(ValueError, match=r"video option num_frames=0: expected at least 2"):
        video_options(None, num_frames=0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) frames"):
        video_options(None, frames=8)
    with pytest.raises(ValueError, match=r"record 'r'.*max_pixels=5000 must be at least min_pixels=6272"):
        video_options(rec, max_pixels=5000)


def test_video_key_is_stable_and_tells_options_apart(tmp_path):
    a = video_key("v.mp4", dict(num_frames=256, min_pixels=3136))
    assert a == video_key(os.path.abspath("v.mp4"), dict(min_pixels=3136.0, num_frames=256, max_pixels=None))
    assert a.startswith(os.path.abspath("v.mp4") + "|")
    others = [video_key("v.mp4", o) for o in (dict(num_frames=128, min_pixels=3136), dict(num_frames=256),
                                              dict(num_frames=256, min_pixels=3136, video_start=1.5))]
    assert len({a, *others}) == 4 and a != video_key("w.mp4", dict(num_frames=256, min_pixels=3136))


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
        rgb = np.array(prepare.COLOURS[colour])
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
        prepare.generate_synthetic(out, n_train=6, n_val=2, n_test=0, num_frames=64, fps=8.0, size=56,
                                seed=seed, progress=False, workers=workers)
    read = lambda d, f: open(os.path.join(d, f), "rb").read()  # noqa: E731
    assert read(a, "train.jsonl") == read(b, "train.jsonl") and read(a, "val.jsonl") == read(b, "val.jsonl")
    names = sorted(os.listdir(os.path.join(a, "videos")))
    assert len(names) == 8 and names == sorted(os.listdir(os.path.join(b, "videos")))   # no leftover temp files
    for name in names:
        assert read(a, f"videos/{name}") == read(b, f"videos/{name}")
    assert read(a, "train.jsonl") != read(c, "train.jsonl")


def test_teacher_traces_are_wrong_where_drawn_and_move_nothing_else(tmp_path):
    """train_sft.jsonl: train's questions, videos and order; exactly round(cot_noise * n) traces a teacher's slip (the
    reasoning right, another option's letter); train.jsonl, the videos and the tokenizer's
    text do not depend on cot_noise."""
    clean, noisy = str(tmp_path / "clean"), str(tmp_path / "noisy")
    for out, p in ((clean, 0.0), (noisy, 0.5)):
        prepare.generate_synthetic(out, n_train=16, n_val=1, n_test=1, num_frames=64, fps=8.0, size=56, seed=1,
                                   progress=False, cot_noise=p)
    read = lambda d, f: open(os.path.join(d, f), "rb").read()  # noqa: E731
    assert read(clean, "train.jsonl") == read(noisy, "train.jsonl")
    assert all(read(clean, f"videos/{n}") == read(noisy, f"videos/{n}") for n in os.listdir(f"{clean}/videos"))
    rows = lambda d, f: [json.loads(line) for line in open(os.path.join(d, f))]  # noqa: E731
    key = rows(noisy, "train.jsonl")
    for d, n_wrong in ((clean, 0), (noisy, 8)):
        sft = rows(d, "train_sft.jsonl")
        assert [(r["id"], r["video"], r["question"], r["options"]) for r in sft] == \
            [(r["id"], r["video"], r["question"], r["options"]) for r in key]
        wrong = [(s, k) for s, k in zip(sft, key) if not s["teacher_correct"]]
        assert len(wrong) == n_wrong
        for s, k in zip(sft, key):
            if s["teacher_correct"]:
                assert (s["reasoning"], s["answer"]) == (k["reasoning"], k["answer"])
        for s, k in wrong:   # the reasoning as it was, up to the letter: another option's
            assert s["answer"] != k["answer"] and s["reasoning"] == k["reasoning"][:-2] + s["answer"] + "."
    assert prepare._dataset_texts(clean) == prepare._dataset_texts(noisy)   # the tokenizer reads the splits only


def test_synthetic_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="size"):
        prepare.generate_synthetic(str(tmp_path), n_train=1, n_val=0, n_test=0, size=100, progress=False)
    with pytest.raises(ValueError, match="num_frames"):
        prepare.generate_synthetic(str(tmp_path), n_train=1, n_val=0, n_test=0, num_frames=16, progress=False)


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
    from reward import extract_choice
    assert extract_choice(text, 4, OPTS) == want
