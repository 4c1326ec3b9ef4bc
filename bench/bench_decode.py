"""Decoding benchmark: N sampled frames of a long, realistic video (bench/make_videos.py), our readers against
qwen-vl-utils 0.0.14's decord and torchvision readers, on the same files, side by side.

    python bench/bench_decode.py                                       # 180 s 640x360, 8..512 frames (~10 min, 2 cores)
    python bench/bench_decode.py --frames=8,64 --video=out/videos/x.mp4 --seconds=60 --height=720 --width=1280

Arms (each decodes the same sampled indices; the frames of ours are checked equal to the reference decode):
  ours-pyav        data.load_video(backend="pyav"): GOP-aware (seek to a keyframe only where it skips frames,
                   data.gop_plan), codec threads on (data.DECODE_THREADS)
  ours-pyav-half   the same for one SP rank's half of the sampled frames (subset=(0, N/2))
  ours-pyav-seq    data.load_video(backend="pyav-seq"): no seeking, every frame decoded from the start to the last
                   target (only the targets converted to RGB): the read_video-style cost of bench_baseline's
                   --decode_backend=pyav-seq arms, flat in N (not a default arm: --arms=...,ours-pyav-seq)
  ours-decord      data.load_video(backend="decord"): decord's get_batch (decord already seeks only across GOPs),
                   threads = data.DECODE_THREADS
  qvu-decord       qwen_vl_utils.vision_process._read_video_decord (decord.VideoReader default threads, get_batch)
  qvu-torchvision  torchvision.io.read_video as qwen-vl-utils calls it: decodes and converts EVERY frame of the video,
                   then indexes; torchvision 0.29 removed read_video, so its PyAV loop (torchvision 0.24's
                   _read_from_stream: decode every frame, frame.to_rgb().to_ndarray()) is reproduced here, holding only
                   the sampled frames (the original holds all of them: 3.7 GB for 3 minutes of 360p)
  floor            decoded frames: a sequential decode of the GOPs the targets touch (each from its keyframe to its
                   last target), the lower bound for exact decoding; "ours decoded" is what gop_plan decodes

Per N: wall and CPU seconds (time.process_time: all threads of this process), for every arm in one interleaved
round (the order rotates per N; --rounds=R decodes R times per arm and reports the medians), plus the frame-cache
hit read (data.FrameCache, --cache=1). On a shared machine read ratios within a row. Rows also go to
{out}/decode_results.json.
"""
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import data  # noqa: E402
from common import apply_overrides, config_of  # noqa: E402

video = "out/videos/real_180s_360p.mp4"   # made with make_videos.py if missing (--seconds/--height/--width below)
seconds = 180.0
height = 360
width = 640
frames = "8,16,64,128,256,512"
arms = "ours-pyav,ours-pyav-half,ours-decord,qvu-decord,qvu-torchvision"
cache = 1                                  # also time data.FrameCache: a write (miss) and a read (hit)
rounds = 1                                 # decodes per arm and N, back to back: the median wall / CPU is reported
out = "out/bench_decode"


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    r = fn()
    return r, time.perf_counter() - w, time.process_time() - c


def qvu_decord(path, n):
    from qwen_vl_utils.vision_process import _read_video_decord
    v, meta, _ = _read_video_decord({"video": path, "nframes": n})
    return v.permute(0, 2, 3, 1).numpy(), list(meta["frames_indices"])


def torchvision_like(path, n):
    """torchvision.io.read_video's decode loop (every frame decoded and converted), then qwen-vl-utils' indexing."""
    import av
    with av.open(path) as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO"          # torchvision's read_video: thread_type AUTO as well
        total = st.frames
        idx = set(np.linspace(0, total - 1, n).round().astype(int).tolist())
        keep = {}
        for i, f in enumerate(c.decode(st)):
            a = f.to_rgb().to_ndarray()
            if i in idx:
                keep[i] = a
    return np.stack([keep[i] for i in sorted(idx)]), sorted(idx)


def frame_counts(path, n, subset=None):
    """(frames gop_plan decodes, frames of the floor: each touched GOP from its keyframe to its last target)."""
    import av
    import bisect
    with av.open(path) as c:
        st, total, fps = data._pyav_header(c, path)
        order, keys = data.pyav_index(c, st)
    idx = data._part(data.sample_frame_indices(total, fps, num_frames=n), subset)
    targets = sorted(set(idx))
    plan = data.gop_plan(targets, keys)
    ours, start = 0, 0
    for seek_to, ts in plan:
        start = seek_to if seek_to is not None else start
        ours += ts[-1] - start + 1
        start = ts[-1] + 1
    last = {}
    for t in targets:
        last[keys[bisect.bisect_right(keys, t) - 1]] = t
    return ours, sum(t - k + 1 for k, t in last.items()), total


if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    print("config:", json.dumps(config_of(globals())))
    if not os.path.exists(video):
        from make_videos import make_video
        print(make_video(video, seconds, height, width))
    os.makedirs(out, exist_ok=True)
    Ns = [int(x) for x in str(frames).split(",")]
    # warm-up: imports (qwen_vl_utils pulls in torch/transformers) and first-call costs stay out of the timings
    import av  # noqa: F401
    import decord  # noqa: F401
    import qwen_vl_utils.vision_process  # noqa: F401
    data.load_video(video, num_frames=2, backend="pyav"), data.load_video(video, num_frames=2, backend="decord")
    qvu_decord(video, 2)
    names = arms.split(",")
    rows = []
    print(f"{video}: {os.path.getsize(video) / 1e6:.1f} MB, decode threads {data.DECODE_THREADS} (0 = per core), "
          f"{os.cpu_count()} CPUs")
    hdr = ("| N | " + " | ".join(f"{a} wall / CPU s" for a in names) +
           " | ours / qvu-decord wall | half / full (ours) | frames decoded ours / floor / video |"
           + (" frame cache write / hit s |" if cache else ""))
    print(hdr)
    for r, n in enumerate(Ns):
        order = names[r % len(names):] + names[:r % len(names)]      # rotate: drifting load hits every arm
        res, ref = {}, None
        def decode(a):
            """-> (frames, sampled indices, wall s, CPU s) of one decode by arm a."""
            if a == "ours-pyav":
                (fr, info), w, c = timed(lambda: data.load_video(video, num_frames=n, backend="pyav"))
                return fr, info["indices"], w, c
            if a == "ours-pyav-half":
                (fr, info), w, c = timed(lambda: data.load_video(video, num_frames=n, backend="pyav",
                                                                 subset=(0, n // 2)))
                return fr, info["indices"][:n // 2], w, c
            if a == "ours-pyav-seq":
                (fr, info), w, c = timed(lambda: data.load_video(video, num_frames=n, backend="pyav-seq"))
                return fr, info["indices"], w, c
            if a == "ours-decord":
                (fr, info), w, c = timed(lambda: data.load_video(video, num_frames=n, backend="decord"))
                return fr, info["indices"], w, c
            if a == "qvu-decord":
                (fr, idx), w, c = timed(lambda: qvu_decord(video, n))
                return fr, idx, w, c
            if a == "qvu-torchvision":
                (fr, idx), w, c = timed(lambda: torchvision_like(video, n))
                return fr, idx, w, c
            raise ValueError(f"--arms: unknown arm {a!r}; known: {arms}")

        for a in order:
            runs = [decode(a) for _ in range(rounds)]
            fr, idx = runs[-1][:2]
            w, c = float(np.median([x[2] for x in runs])), float(np.median([x[3] for x in runs]))
            res[a] = dict(wall=w, cpu=c, frames=len(fr), indices=list(map(int, idx)))
            if a in ("ours-pyav", "qvu-torchvision", "ours-pyav-half", "ours-pyav-seq"):   # same decoder (PyAV)
                ref = fr if ref is None or len(fr) > len(ref) else ref
                res[a]["frames_data"] = fr
        # exactness: ours-pyav equals torchvision's decode-everything loop at the same indices (same converter)
        same = None
        tv = res.get("qvu-torchvision")
        if "ours-pyav" in res and tv and res["ours-pyav"]["indices"] == tv["indices"]:
            same = bool(np.array_equal(res["ours-pyav"]["frames_data"], res["qvu-torchvision"]["frames_data"]))
        if "ours-pyav-seq" in res and "ours-pyav" in res:
            same = (same is not False) and bool(np.array_equal(res["ours-pyav-seq"]["frames_data"],
                                                               res["ours-pyav"]["frames_data"]))
        if "ours-pyav-half" in res and "ours-pyav" in res:
            same = (same is not False) and bool(np.array_equal(res["ours-pyav-half"]["frames_data"],
                                                               res["ours-pyav"]["frames_data"][:n // 2]))
        for v in res.values():
            v.pop("frames_data", None)
        ours, floor, total = frame_counts(video, n)
        row = dict(n=n, arms=res, same_frames=same, decoded_ours=ours, decoded_floor=floor, video_frames=total)
        if cache:
            with tempfile.TemporaryDirectory(dir=out) as d:
                fc = data.FrameCache(d)
                opts = dict(num_frames=n)
                _, ww, _ = timed(lambda: data.load_video_cached(video, cache=fc, backend="pyav", **opts))
                (fr2, _), wh, _ = timed(lambda: data.load_video_cached(video, cache=fc, backend="pyav", **opts))
                row["cache"] = dict(write_s=ww, hit_s=wh, stats=dict(fc.stats), bytes=fc.bytes_written)
        rows.append(row)
        cells = [f"{res[a]['wall']:.2f} / {res[a]['cpu']:.2f}" if a in res else "-" for a in names]
        ratio = (f"{res['ours-pyav']['wall'] / res['qvu-decord']['wall']:.2f}"
                 if "ours-pyav" in res and "qvu-decord" in res else "-")
        half = (f"{res['ours-pyav-half']['wall'] / res['ours-pyav']['wall']:.2f}"
                if "ours-pyav-half" in res and "ours-pyav" in res else "-")
        line = f"| {n} | " + " | ".join(cells) + f" | {ratio} | {half} | {ours} / {floor} / {total} |"
        if cache:
            line += f" {row['cache']['write_s']:.2f} / {row['cache']['hit_s']:.3f} |"
        print(line + ("" if same is not False else "  FRAMES DIFFER"), flush=True)
        with open(os.path.join(out, "decode_results.json"), "w") as f:
            json.dump(dict(video=video, rows=rows), f, indent=1)
