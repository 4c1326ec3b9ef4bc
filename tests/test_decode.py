"""Fast decoding (GOP-aware PyAV, threaded) and the on-disk frame cache: the frames must be exactly those of a plain
sequential decode, on small generated H.264 videos with B-frames and short GOPs (a few seconds each)."""
import importlib.util
import os
import sys
from fractions import Fraction

import numpy as np
import pytest

import data
from data import gop_plan, load_video

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


def _x264(path, T=150, H=72, W=96, fps=30, params="keyint=25:min-keyint=25:scenecut=0", seed=0):
    """Textured moving frames (real residuals, B-frames), a keyframe every 25 frames unless params say otherwise."""
    import av
    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 256, (H * 2, W * 2, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=Fraction(fps))
        st.width, st.height, st.pix_fmt = W, H, "yuv420p"
        st.options = {"preset": "superfast", "threads": "1", "x264-params": params}
        for i in range(T):
            y, x = (3 * i) % H, (5 * i) % W
            f = tex[y:y + H, x:x + W].copy()
            f[:8, :8] = (7 * i) % 256      # a frame-number tag
            for p in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    return str(path)


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    d = tmp_path_factory.mktemp("dec")
    return {"closed": _x264(d / "closed.mp4"),
            "open": _x264(d / "open.mp4", params="keyint=25:min-keyint=25:scenecut=0:open-gop=1"),
            "mkv": _x264(d / "gop40.mkv", T=130, params="keyint=40:min-keyint=40:scenecut=0:bframes=3")}


def _sequential(path, n, subset=None):
    """The reference: decode from the first frame, keep the sampled positions (the reader before GOP-awareness)."""
    import av
    with av.open(path) as c:
        st, total, fps = data._pyav_header(c, path)
        idx = data.sample_frame_indices(total, fps, num_frames=n)
        sel = data._part(idx, subset)
        return data._pyav_read_sequential(c, st, path, sel, total)


@pytest.mark.parametrize("name", ["closed", "open", "mkv"])
def test_gop_aware_pyav_equals_sequential_decode(vids, name):
    path = vids[name]
    for n in (2, 4, 8, 16, 64, 130):
        ref = _sequential(path, n)
        got, info = load_video(path, num_frames=n, backend="pyav")
        assert np.array_equal(got, ref), (name, n)
        h = n // 2
        for sub in ((0, h), (h, n)):                    # the two SP ranks' halves
            part, _ = load_video(path, num_frames=n, backend="pyav", subset=sub)
            assert np.array_equal(part, ref[sub[0]:sub[1]]), (name, n, sub)


def test_gop_plan_seeks_only_where_it_skips_work():
    keys = [0, 250, 500, 750]
    # two targets in one GOP: no seek between them; the first GOP is read from the start without a seek
    assert gop_plan([10, 200], keys) == [(None, [10, 200])]
    # the next target's GOP starts after the frame last decoded: seek to its keyframe
    assert gop_plan([10, 600], keys) == [(None, [10]), (500, [600])]
    # a first target deep in the file: seek straight to its GOP
    assert gop_plan([300, 320, 760], keys) == [(250, [300, 320]), (750, [760])]
    # the next keyframe is within the slack of the last decoded frame: decode on instead of seeking
    assert gop_plan([245, 260], keys, slack=8) == [(None, [245, 260])]
    assert gop_plan([230, 260], keys, slack=8) == [(None, [230]), (250, [260])]
    # dense sampling touching every GOP: one sequential pass, no seek at all
    dense = list(range(0, 1000, 5))
    assert gop_plan(dense, keys) == [(None, dense)]


def _processor():
    from types import SimpleNamespace

    from transformers import Qwen2VLVideoProcessor
    return SimpleNamespace(video_processor=Qwen2VLVideoProcessor(min_pixels=3136, max_pixels=12845056,
                                                                 cap_pixels_per_frame=False))


def test_frame_cache_serves_the_same_pixels_and_counts_hits(vids, tmp_path):
    """load_frames (decode + resize, through the on-disk cache) then process_video == process_video(load_video):
    a miss, then a hit, for the whole sampling and for an SP rank's share; atomic files; a rewritten video misses."""
    import torch
    proc = _processor()
    path = vids["closed"]
    cache = data.FrameCache(tmp_path / "fc")
    for opts, subset in (({"num_frames": 16, "min_pixels": 3136, "max_pixels": 40 * 28 * 28}, None),
                         ({"num_frames": 16, "min_pixels": 3136, "max_pixels": 40 * 28 * 28}, (8, 16)),
                         ({"num_frames": 8, "resized_height": 56, "resized_width": 84}, None)):
        fr, info = load_video(path, **data.decode_opts(opts), subset=subset)
        ref = data.process_video(proc, fr, info, **data.size_opts(opts))
        for _ in range(2):                                       # miss (decodes and writes), then hit
            got = data.process_video(proc, *data.load_frames(proc, path, opts, subset, cache=cache),
                                     **data.size_opts(opts))
            for k in ref:
                assert torch.equal(got[k], ref[k]), (opts, subset, k)
    assert cache.stats == dict(hits=3, misses=3, writes=3) and cache.hit_rate() == 0.5
    assert not [f for f in os.listdir(cache.root) if not f.endswith(".npz")]   # no temporaries left behind
    # the key names the options, the processor and the share: a different share or size is a miss
    assert data.load_frames(proc, path, {"num_frames": 16, "min_pixels": 3136, "max_pixels": 40 * 28 * 28}, (0, 8),
                            cache=cache)
    assert cache.stats["misses"] == 4
    # a video replaced in place (new mtime / size) is a miss, never stale frames
    os.utime(path, ns=(1, 1))
    data.load_frames(proc, path, {"num_frames": 8, "resized_height": 56, "resized_width": 84}, cache=cache)
    assert cache.stats["misses"] == 5
    # process_video rejects frames that are neither the source size nor the processed size
    fr, info = data.load_frames(proc, path, {"num_frames": 8, "resized_height": 56, "resized_width": 84}, cache=cache)
    with pytest.raises(ValueError, match="expected the source size or the processed size"):
        data.process_video(proc, fr[:, :28], info, resized_height=56, resized_width=84)


def test_decode_backend_flag_picks_the_reader(vids, monkeypatch):
    """The stages' --decode_backend (data.set_decode_backend) makes one reader decode every load_video that names
    none, and sampled_frame_count read that reader's header; "" restores PyAV-then-decord; a wrong name stops."""
    monkeypatch.setattr(data, "DECODE_BACKEND", None)
    path = vids["closed"]
    decord_ok = importlib.util.find_spec("decord") is not None
    _, info = load_video(path, num_frames=8)
    assert info["backend"] == "pyav"                  # the default: our reader first
    data.set_decode_backend("pyav")
    assert data.DECODE_BACKEND == "pyav"
    got, info = load_video(path, num_frames=8)
    assert info["backend"] == "pyav" and np.array_equal(got, _sequential(path, 8))
    with monkeypatch.context() as mp:             # the frame-count plan must not consult decord either
        mp.setattr(data, "_decord_open", lambda p: pytest.fail(f"decord opened {p} under --decode_backend=pyav"))
        assert data.sampled_frame_count(path, num_frames=8) == 8
    if decord_ok:
        data.set_decode_backend("decord")
        fr, info = load_video(path, num_frames=8)
        assert info["backend"] == "decord" and np.array_equal(fr, got)   # H.264 here: the same RGB either way
        with monkeypatch.context() as mp:
            mp.setattr(data, "_pyav_header", lambda *a: pytest.fail("PyAV read a header under --decode_backend=decord"))
            assert data.sampled_frame_count(path, num_frames=8) == 8
    data.set_decode_backend("")
    assert data.DECODE_BACKEND is None
    with pytest.raises(SystemExit, match="--decode_backend='ffmpeg': expected"):
        data.set_decode_backend("ffmpeg")


@pytest.mark.parametrize("name", ["closed", "open", "mkv"])
def test_pyav_seq_decodes_from_the_start_with_the_same_frames(vids, name, monkeypatch):
    """--decode_backend=pyav-seq (the read_video-style cost for baseline ablations): it never consults the packet
    table or plans a seek, yet yields exactly the frames of the GOP-aware reader, whole sampling and SP halves."""
    path = vids[name]
    want = {(n, sub): load_video(path, num_frames=n, backend="pyav", subset=sub)[0]
            for n in (4, 16, 64) for sub in (None, (0, n // 2), (n // 2, n))}
    monkeypatch.setattr(data, "pyav_index", lambda *a: pytest.fail("pyav-seq read the packet table"))
    monkeypatch.setattr(data, "gop_plan", lambda *a, **k: pytest.fail("pyav-seq planned a seek"))
    for (n, sub), ref in want.items():
        got, info = load_video(path, num_frames=n, backend="pyav-seq", subset=sub)
        assert info["backend"] == "pyav-seq" and np.array_equal(got, ref), (n, sub)
    data.set_decode_backend("pyav-seq")
    try:
        assert data.sampled_frame_count(path, num_frames=16) == 16     # the plan reads PyAV's header
        assert load_video(path, num_frames=4)[1]["backend"] == "pyav-seq"
    finally:
        data.set_decode_backend("")


@pytest.fixture(scope="module")
def big_video(tmp_path_factory):
    """320 frames of 320x256 (79 MB sampled): large beside the decoders' own buffers."""
    return _x264(tmp_path_factory.mktemp("big") / "big.mp4", T=320, H=256, W=320)


_PEAK_SCRIPT = """
import sys, data, common
path, backend = sys.argv[1], sys.argv[2]
data.load_video(path, num_frames=2, backend=backend)            # codec and library set-up, outside the measure
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
common._reset_peak()
before = rss()
frames, _ = data.load_video(path, num_frames=320, backend=backend)
print(common._peak_bytes() - before, frames.nbytes)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("backend", ["pyav", "pyav-seq", "decord"])
def test_decode_holds_the_sampled_frames_once(big_video, backend):
    """Decoded frames go straight into the output array, so a decode's peak memory is about the frames' own bytes,
    not the 2x of collecting them and np.stack-ing (decord: its batch + the numpy copy), which set a rank's
    collect-phase peak (2.9 GB for 2,048 frames of 360p). Measured in a fresh process: its peak RSS growth."""
    import subprocess
    if backend == "decord" and importlib.util.find_spec("decord") is None:
        pytest.skip("decord not installed")
    path = big_video
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, path, backend], cwd=root, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    growth, nbytes = (int(float(x)) for x in out.stdout.split()[-2:])
    assert nbytes == 320 * 256 * 320 * 3
    assert growth < 1.5 * nbytes, (backend, growth / nbytes)   # here 1.01x (PyAV) and 1.2-1.3x (decord); was 2.0x


@pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord not installed")
def test_decord_chunks_give_the_frames_of_one_batch(vids):
    """decord's reader fills its output in chunks of get_batch (one copy held): the same frames, in order, as a single
    get_batch, whole sampling and an SP half, with chunk edges that do not divide the frame count."""
    sampling = dict(num_frames=64, fps=2.0, min_frames=4, max_frames=768, video_start=None, video_end=None)
    for sub in (None, (32, 64)):
        one = data._decord_read(vids["closed"], sampling, sub, chunk=10 ** 6)[0]
        for chunk in (1, 5, 32):
            got = data._decord_read(vids["closed"], sampling, sub, chunk=chunk)[0]
            assert got.shape == one.shape and np.array_equal(got, one), (sub, chunk)
    assert one.shape[0] == 32 and not np.array_equal(one[0], one[-1])


def test_decode_counts(vids):
    """load_video / process_video count their runs and time (rl.py's per-step decode and pre-process figures)."""
    before = dict(data.COUNTS)
    fr, info = load_video(vids["closed"], num_frames=8, subset=(0, 4))
    data.process_video(_processor(), fr, info, resized_height=56, resized_width=56)
    assert data.COUNTS["decodes"] - before["decodes"] == 1
    assert data.COUNTS["decoded_frames"] - before["decoded_frames"] == 4
    assert data.COUNTS["processor_runs"] - before["processor_runs"] == 1
    assert data.COUNTS["decode_s"] > before["decode_s"] and data.COUNTS["process_cpu_s"] > before["process_cpu_s"]


def test_baseline_loop_counts_and_same_tokens_as_mrsp(tmp_path, tiny_ckpt, synth_dir):
    """rl.py --loop=baseline (EasyR1 semantics) and its --decode_once control against --loop=mrsp, one step each:
    the same rollouts, rewards and loss (same math), and per prompt G+2 decodes, G+1 processor runs, 3G+1 vision
    passes and one rollout prefill (MR-SP: 1 decode, 1 processor run, 1 vision pass, 1 prefill)."""
    import json
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    P, G = 2, 3
    run = [f"--model={tiny_ckpt}", f"--data={synth_dir}/train.jsonl", "--val_data=", "--frames=8",
           f"--prompts_per_step={P}", f"--group_size={G}", "--max_new_tokens=8", "--lr=1e-4", "--seed=1",
           "--steps=1", "--save_every=100"]
    m = {}
    for name, flags in (("mrsp", ["--loop=mrsp"]), ("baseline", ["--loop=baseline"]),
                        ("compute", ["--loop=baseline", "--decode_once=1"])):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "rl.py", *run, f"--out_dir={out}", *flags], cwd=root, capture_output=True,
                           text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-3000:]
        m[name] = json.loads(open(out / "metrics.jsonl").readline())
    for name in ("baseline", "compute"):
        for k in ("reward_mean", "response_len", "loss", "grad_norm", "kl", "clip_frac"):
            assert abs(m[name][k] - m["mrsp"][k]) <= 1e-5 * max(1.0, abs(m["mrsp"][k])), (name, k)
    keys = ("decodes_step", "processor_runs_step", "vision_passes", "rollout_prefills")
    got = lambda n: [m[n][k] for k in keys]  # noqa: E731
    assert got("baseline") == [P * (G + 2), P * (G + 1), P * (3 * G + 1), P]
    assert got("compute") == [P, P, P * (3 * G + 1), P]
    assert got("mrsp") == [P, P, P, P]
