"""
data.py -- long-video QA data, as a library: video decoding (decord, GOP-aware PyAV; an on-disk frame cache), frame
sampling and sizing with qwen-vl-utils' rules (what Qwen2-VL / Qwen2.5-VL checkpoints were trained with), dataset
records (LongVideo-Reason as released, our JSONL, Video-MME), prompts and targets, answer extraction, and SFT/RL
collation. numpy + PyAV/decord; torch/torchvision only to process frames and collate; copy it into another project
alone.

    from data import load_records, video_options, load_video, process_video, decode_opts, size_opts
    recs = load_records("data/synth/train.jsonl")          # LongVideo-Reason / ours / Video-MME rows
    opts = video_options(recs[0], num_frames=32)           # stage defaults + the record's own qwen-vl-utils keys
    frames, info = load_video(recs[0]["video"], **decode_opts(opts))   # (T, H, W, 3) uint8, source resolution
    pixels = process_video(processor, frames, info, **size_opts(opts)) # sized from the whole sampling

Records, all normalised to one dict:
    {id, video (absolute path), question, options ["A. ...", ...], answer "B", reasoning, category,
     duration, domain, task_type, source, video_opts {qwen-vl-utils per-sample keys}}
The synthetic set and the tiny checkpoint are made by prepare.py.
"""
import json
import math
import os
import re
import time
import unicodedata

import numpy as np

# -----------------------------------------------------------------------------
# constants (qwen-vl-utils 0.0.14 conventions, the frame pipeline Qwen2-VL / Qwen2.5-VL were trained with)
FRAME_FACTOR = 2          # Qwen2.5-VL's temporal patch: frame counts are multiples of 2
FPS = 2.0                 # default sampling rate when no frame count is given
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
COUNTS = dict(decodes=0, decoded_frames=0, processor_runs=0, decode_s=0.0, decode_cpu_s=0.0, process_s=0.0,
              process_cpu_s=0.0)   # this process's decode / pre-process work, wall and CPU s (rl.py's metrics)
DECODE_THREADS = 0        # codec threads per decode (0: one per core, at most 16: libavcodec's auto)
SEEK_SLACK = 8            # decode on rather than seek when the next keyframe is at most this many frames ahead
# frame sizes are counted in merged tokens of factor x factor pixels (factor = patch 14 x merge 2 = 28 for Qwen2.5-VL)
VIDEO_MIN_TOKENS = 128    # per-frame pixel floor: 128 * 28 * 28
VIDEO_MAX_TOKENS = 768    # per-frame pixel ceiling: 768 * 28 * 28
IMAGE_MIN_TOKENS, IMAGE_MAX_TOKENS = 4, 16384   # smart_resize's own default range (used for resized_height/width)
MODEL_SEQ_LEN = 128000    # total video budget: 90% of this many tokens' pixels, shared by all frames
MAX_RATIO = 200           # the widest aspect ratio smart_resize accepts
LETTERS = "ABCDEFGHIJ"
CATEGORIES = ("temporal", "goal", "spatial", "plot")  # LongVideo-Reason-eval categories
INSTRUCTION = ("Think step by step inside <think> </think> tags, then give only the letter of the "
               "correct option inside <answer> </answer> tags.")


class VideoError(ValueError):
    """A video could not be read: names the path and the cause."""


class SamplingError(VideoError):
    """The requested frames do not fit this video (too few frames, a clip outside it, ...): every decoder would say
    the same, so load_video raises it at once instead of trying the next backend."""


class RecordError(ValueError):
    """A dataset record is malformed: names the file, line and field."""


class SampleTooLongError(ValueError):
    """A tokenised sample exceeds max_length (and truncation was not asked for)."""


# -----------------------------------------------------------------------------
# frame sampling (qwen-vl-utils rules)
def _round_by(x, f): return round(x / f) * f
def _floor_by(x, f): return math.floor(x / f) * f
def _ceil_by(x, f): return math.ceil(x / f) * f


def frame_range(total_frames, video_fps, video_start=None, video_end=None):
    """(first, last) frame, inclusive, of the clip video_start..video_end seconds (None: the video's start / end),
    as qwen-vl-utils' calculate_video_frame_range: both times clamped to the video, the start rounded up to a
    frame and the end down; a clip of fewer than 2 frames is an error."""
    if video_start is None and video_end is None:
        return 0, total_frames - 1
    if video_fps is None or video_fps <= 0:
        raise SamplingError(f"cannot cut video_start={video_start} / video_end={video_end} (seconds): "
                         f"the video's fps is unknown ({video_fps})")
    duration = total_frames / video_fps
    first = 0 if video_start is None else math.ceil(max(0.0, min(video_start, duration)) * video_fps)
    last = (total_frames - 1 if video_end is None else
            min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1))
    if first >= last:
        raise SamplingError(f"video_start={video_start} / video_end={video_end} s select frames {first}..{last} of a "
                         f"{total_frames}-frame video at {video_fps:g} fps ({duration:.2f} s): expected a clip of at "
                         f"least {FRAME_FACTOR} frames")
    return first, last


def _num_sampled(count, video_fps, num_frames, fps, min_frames, max_frames):
    """qwen-vl-utils' smart_nframes for a clip of `count` frames."""
    if num_frames is not None:
        n = _round_by(num_frames, FRAME_FACTOR)
        if not FRAME_FACTOR <= n <= count:
            raise SamplingError(f"num_frames={num_frames} (rounded to {n}) must lie in "
                             f"[{FRAME_FACTOR}, total_frames={count}]")
        return n
    if video_fps is None or video_fps <= 0:
        raise SamplingError(f"cannot sample at fps={fps}: the video's fps is unknown ({video_fps})")
    lo = _ceil_by(min_frames, FRAME_FACTOR)
    hi = _floor_by(min(max_frames, count), FRAME_FACTOR)   # floor2(min(a, b)) == min(floor2(a), floor2(b)): as theirs
    n = _floor_by(min(max(count / video_fps * fps, lo), hi), FRAME_FACTOR)
    if n < FRAME_FACTOR:
        raise SamplingError(f"cannot sample {n} frames from a {count}-frame video")
    return n


def sample_frame_indices(total_frames, video_fps, num_frames=None, fps=FPS, min_frames=FPS_MIN_FRAMES,
                         max_frames=FPS_MAX_FRAMES, video_start=None, video_end=None):
    """Indices of the frames to decode, uniform over the clip video_start..video_end s (default: the whole video).

    num_frames given: rounded to a multiple of 2 (LongVILA-R1 style fixed frame count).
    Otherwise: n = floor2(clamp(count / video_fps * fps, ceil2(min_frames), floor2(min(max_frames, count)))),
    count = the clip's frames. Indices = linspace(first, last, n) rounded half to even.
    qwen-vl-utils computes that linspace in float32 (torch.linspace), which misrounds a value lying within float32
    precision of .5 by one frame (e.g. 768 of 12,342 frames, 512 of 16,481: one index each); float64 gives the
    exact rounding here, so we keep it.
    """
    if total_frames < FRAME_FACTOR:
        raise SamplingError(f"video has {total_frames} frame(s); at least {FRAME_FACTOR} are needed")
    first, last = frame_range(total_frames, video_fps, video_start, video_end)
    n = _num_sampled(last - first + 1, video_fps, num_frames, fps, min_frames, max_frames)
    return np.linspace(first, last, n).round().astype(int).tolist()


def sampled_fps(n, total_frames, video_fps, video_start=None, video_end=None):
    """Frames per second of an n-frame sampling of the clip: qwen-vl-utils' sample_fps (n / clip frames * video fps),
    which sets the mrope time scale second_per_grid_ts = temporal_patch_size / sampled_fps. None if fps is unknown."""
    if not video_fps:
        return None
    first, last = frame_range(total_frames, video_fps, video_start, video_end)
    return n / (last - first + 1) * video_fps


def smart_resize(height, width, factor=28, min_pixels=None, max_pixels=None):
    """(h, w): multiples of `factor` with h * w within [min_pixels, max_pixels] (default: IMAGE_MIN_TOKENS ..
    IMAGE_MAX_TOKENS factor-squares), aspect ratio kept as well as possible -- qwen-vl-utils' smart_resize, except
    where it floors a side to 0 (a very wide frame under a small max_pixels, e.g. 30x5000 under 128 * 28^2): we clamp
    that side to `factor`, as transformers' smart_resize does, so the frame may exceed max_pixels by less than one
    factor-wide strip instead of crashing the resize. Bad sizes raise ValueError naming them."""
    min_pixels = IMAGE_MIN_TOKENS * factor ** 2 if min_pixels is None else min_pixels
    max_pixels = IMAGE_MAX_TOKENS * factor ** 2 if max_pixels is None else max_pixels
    if not (height > 0 and width > 0):
        raise ValueError(f"frame size {height}x{width}: expected positive height and width")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels={max_pixels} < min_pixels={min_pixels}: expected max_pixels >= min_pixels")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"frame size {height}x{width}: aspect ratio {max(height, width) / min(height, width):.1f} "
                         f"is over {MAX_RATIO}, the most Qwen-VL's smart_resize accepts")
    h, w = max(factor, _round_by(height, factor)), max(factor, _round_by(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, _floor_by(height / beta, factor)), max(factor, _floor_by(width / beta, factor))
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = _ceil_by(height * beta, factor), _ceil_by(width * beta, factor)
    return h, w


def frame_size(height, width, nframes, factor=28, min_pixels=None, max_pixels=None, total_pixels=None,
               resized_height=None, resized_width=None):
    """(h, w) of every frame of an nframes-frame sampling of height x width video, as qwen-vl-utils' fetch_video:
    per frame at least min_pixels (default VIDEO_MIN_TOKENS factor-squares) and at most the smallest of
    VIDEO_MAX_TOKENS factor-squares, an even share of total_pixels per temporal patch (total_pixels / nframes * 2,
    default 90% of MODEL_SEQ_LEN tokens' pixels; floored at 1.05 * min_pixels) and max_pixels (which can only lower
    it). resized_height/resized_width (both or neither) replace all of that: smart_resize of them alone.

    nframes is the whole sampling's frame count, never one SP rank's share of it: the size must not depend on who
    processes the frames. qwen-vl-utils reads MODEL_SEQ_LEN from the environment; here total_pixels is an explicit
    option, so a run's frame sizes follow from its flags and records alone."""
    if (resized_height is None) != (resized_width is None):
        raise ValueError(f"resized_height={resized_height}, resized_width={resized_width}: give both or neither")
    if resized_height is not None:
        return smart_resize(resized_height, resized_width, factor)
    if not (isinstance(nframes, (int, np.integer)) and nframes >= 1):
        raise ValueError(f"nframes={nframes!r}: expected the sampled frame count, a positive integer")
    min_pixels = VIDEO_MIN_TOKENS * factor ** 2 if min_pixels is None else min_pixels
    total_pixels = MODEL_SEQ_LEN * factor ** 2 * 0.9 if total_pixels is None else total_pixels
    cap = max(min(VIDEO_MAX_TOKENS * factor ** 2, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = cap if max_pixels is None else min(max_pixels, cap)
    return smart_resize(height, width, factor, min_pixels, max_pixels)


# -----------------------------------------------------------------------------
# decoding: decord first, PyAV fallback. Both decode only the GOPs the sampled frames touch (decord's get_batch seeks
# across GOPs only; our PyAV reader plans it: gop_plan), codec threads on (bench/bench_decode.py, docs/BENCHMARKS.md)
class _timed:
    """Adds a block's wall and CPU (process, all threads) seconds to COUNTS[f"{name}_s"], COUNTS[f"{name}_cpu_s"]."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        COUNTS[f"{self.name}_s"] += time.perf_counter() - self.w
        COUNTS[f"{self.name}_cpu_s"] += time.process_time() - self.c


def _check_file(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(f"{path}: no such file")
    if os.path.isdir(path):
        raise VideoError(f"{path}: is a directory, expected a video file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")
    return path


def _part(seq, subset, path=""):
    """seq[start:end] for subset=(start, end), all of seq for None."""
    if subset is not None and subset[1] > len(seq):
        raise SamplingError(f"{path}: subset={tuple(subset)} reaches past the {len(seq)} sampled frame(s)")
    return seq if subset is None else seq[subset[0]:subset[1]]


def _decord_open(path):
    """-> (reader, total frames, fps) from the header."""
    import decord  # optional dependency
    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=DECODE_THREADS)
    return vr, len(vr), float(vr.get_avg_fps())


def _sample(path, total, video_fps, sampling):
    """sample_frame_indices(total, video_fps, **sampling), its errors naming the file."""
    try:
        return sample_frame_indices(total, video_fps, **sampling)
    except SamplingError as e:
        raise SamplingError(f"{path}: {e}") from None


def _decord_read(path, sampling, subset):
    vr, total, video_fps = _decord_open(path)
    idx = _sample(path, total, video_fps, sampling)
    frames = vr.get_batch(_part(idx, subset, path)).asnumpy()
    return frames, total, video_fps, idx


def _pyav_count(container, stream):
    """Frame count without decoding: the header's count, else count the video packets."""
    if stream.frames and stream.frames > 0:
        return stream.frames
    n = sum(1 for p in container.demux(stream) if p.size > 0)
    container.seek(0)
    return n


def _pyav_header(container, path):
    """-> (video stream, total frames, fps or None) of an open container."""
    if not container.streams.video:
        raise VideoError(f"{path}: no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    return stream, _pyav_count(container, stream), (float(rate) if rate else None)


def _pyav_read_sequential(container, stream, path, sel, total):
    """Decode from the start, keeping the frames at positions `sel` (presentation order, as counted by decode()).
    The fallback of _pyav_read for streams without usable timestamps."""
    want, i = {}, -1
    for j, k in enumerate(sel):
        want.setdefault(k, []).append(j)
    out = [None] * len(sel)
    last = max(sel)
    for i, frame in enumerate(container.decode(stream)):
        if i in want:
            arr = frame.to_ndarray(format="rgb24")
            for j in want[i]:
                out[j] = arr
        if i >= last:
            break
    if i < last:
        raise VideoError(f"{path}: truncated: header/packets say {total} frames but only "
                         f"{i + 1} decoded (needed frame {last})")
    return out


def pyav_index(container, stream):
    """The frame table of a stream from its packets alone (demuxing, no decoding): -> (pts of every frame in
    presentation order, presentation positions of the keyframes, sorted), or None when some packet has no pts or two
    share one (then frames cannot be told apart by timestamp and only sequential decoding is exact). Rewinds."""
    pts, key_pts = [], []
    try:
        for p in container.demux(stream):
            if p.size == 0:
                continue
            if p.pts is None:
                return None
            pts.append(p.pts)
            if p.is_keyframe:
                key_pts.append(p.pts)
    finally:
        container.seek(0)
    order = sorted(pts)
    if len(set(order)) != len(order) or not key_pts:
        return None
    pos = {t: i for i, t in enumerate(order)}
    return order, sorted(pos[t] for t in key_pts)


def gop_plan(targets, keyframes, slack=SEEK_SLACK):
    """Where to seek when decoding the frames `targets` (sorted presentation positions) of a stream whose keyframes
    sit at `keyframes` (sorted positions, the first normally 0). -> [(seek_to or None, [targets...]), ...]: each
    segment starts by seeking to keyframe `seek_to` (None: carry on from where the previous one stopped, i.e. from
    the start for the first) and decodes forward until its last target.

    A target whose GOP begins after the frame last decoded starts a new segment with a seek to that GOP's keyframe,
    which skips every frame in between; otherwise (same GOP, or the next keyframe is at most `slack` frames ahead,
    where a seek and the decoder's threading pipeline refill would cost more than the few frames it skips) decoding
    just continues. So every decoded frame lies in a GOP that holds a target, from its keyframe up to the target:
    N sampled frames never cost more than one sequential decode of the GOPs they touch."""
    import bisect
    plan, cur = [], -1            # cur: the position of the last frame decoded
    for t in targets:
        k = keyframes[max(0, bisect.bisect_right(keyframes, t) - 1)]   # this target's GOP starts at frame k
        if not plan or k > cur + 1 + slack:
            plan.append((k if (plan or k > slack) else None, [t]))
        else:
            plan[-1][1].append(t)
        cur = t
    return plan


def _pyav_read(path, sampling, subset, threads=None):
    """PyAV, GOP-aware: seek to a keyframe only where that skips work (gop_plan), codec threading on (threads: 0 =
    one per core). Frames are matched by their timestamp against the packet table (pyav_index), so they are exactly
    those a sequential decode yields at the same positions; streams without a usable table decode sequentially."""
    import av
    with av.open(path) as container:
        stream, total, video_fps = _pyav_header(container, path)
        idx = _sample(path, total, video_fps, sampling)
        sel = _part(idx, subset, path)
        stream.thread_type = "AUTO"                  # frame + slice threads: same pixels, less wall time
        stream.codec_context.thread_count = DECODE_THREADS if threads is None else threads
        table = pyav_index(container, stream)
        if table is None:
            return np.stack(_pyav_read_sequential(container, stream, path, sel, total)), total, video_fps, idx
        order, keyframes = table
        pos = {t: i for i, t in enumerate(order)}
        if max(sel) >= len(order):
            raise VideoError(f"{path}: truncated: header says {total} frames but the packets hold {len(order)} "
                             f"(needed frame {max(sel)})")
        got = {}
        for seek_to, targets in gop_plan(sorted(set(sel)), keyframes):
            if seek_to is not None:
                container.seek(order[seek_to], stream=stream, backward=True, any_frame=False)
            need, last = set(targets), targets[-1]
            for frame in container.decode(stream):
                i = pos.get(frame.pts)
                if i is None:
                    break                            # a frame the table does not know: trust only a full decode
                if i in need:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
            if not need <= got.keys():
                break
        if not set(sel) <= got.keys():   # a decoder that dropped or retimed frames (open GOP leads, ...): redo exactly
            container.seek(0)
            return np.stack(_pyav_read_sequential(container, stream, path, sel, total)), total, video_fps, idx
    return np.stack([got[k] for k in sel]), total, video_fps, idx


def load_video(path, num_frames=None, fps=FPS, min_frames=FPS_MIN_FRAMES, max_frames=FPS_MAX_FRAMES,
               backend=None, subset=None, video_start=None, video_end=None):
    """load_video (below), its time added to COUNTS["decode_s"] / ["decode_cpu_s"]."""
    with _timed("decode"):
        return _load_video(path, num_frames, fps, min_frames, max_frames, backend, subset, video_start, video_end)


def _load_video(path, num_frames=None, fps=FPS, min_frames=FPS_MIN_FRAMES, max_frames=FPS_MAX_FRAMES,
                backend=None, subset=None, video_start=None, video_end=None):
    """Decode the sampled frames of a video (sampling: sample_frame_indices; video_start/video_end in seconds
    restrict it to a clip, as qwen-vl-utils' per-sample keys do). Frames come at the source resolution:
    process_video sizes them.

    Returns frames (T, H, W, 3) uint8 and info {video_fps, total_frames, indices, duration (of the whole video),
    sampled_fps, backend, subset}. backend: None (decord, then PyAV), "decord" or "pyav".
    subset=(start, end): decode only sampled frames start..end-1 (MR-SP: each SP rank decodes its share);
    info still describes the whole sampling (indices, sampled_fps), so the time scale and the frame size stay
    those of the whole video.
    Raises VideoError (a ValueError) naming the path for missing/empty/corrupt/truncated files.
    """
    path = _check_file(path)
    if subset is not None:
        start, end = subset
        if not 0 <= start < end:
            raise ValueError(f"{path}: subset={subset}: expected (start, end) with 0 <= start < end")
    sampling = dict(num_frames=num_frames, fps=fps, min_frames=min_frames, max_frames=max_frames,
                    video_start=video_start, video_end=video_end)
    errors = []
    for name in ([backend] if backend else ["decord", "pyav"]):
        reader = {"decord": _decord_read, "pyav": _pyav_read}.get(name)
        if reader is None:
            raise ValueError(f"backend={name!r}: expected 'decord' or 'pyav'")
        try:
            frames, total, video_fps, idx = reader(path, sampling, subset)
        except SamplingError:
            raise                     # the request does not fit this video: the next backend would say the same
        except ImportError as e:
            errors.append(f"{name}: not installed ({e})")
            continue
        except Exception as e:  # noqa: BLE001 - decoders raise many types (ours: VideoError); we name the file
            errors.append(f"{name}: {e}" if isinstance(e, VideoError) else f"{name}: {type(e).__name__}: {e}")
            continue
        n = len(_part(idx, subset))
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != n:
            raise VideoError(f"{path}: decoder returned frames of shape {frames.shape}, expected "
                             f"({n}, H, W, 3)")
        COUNTS["decodes"] += 1
        COUNTS["decoded_frames"] += n
        info = dict(video_fps=video_fps, total_frames=total, indices=idx,
                    duration=total / video_fps if video_fps else None,
                    sampled_fps=sampled_fps(len(idx), total, video_fps, video_start, video_end),
                    backend=name, subset=subset)
        return frames, info
    raise VideoError(f"{path}: cannot decode video ({'; '.join(errors)})")


def sampled_frame_count(path, num_frames=None, fps=FPS, min_frames=FPS_MIN_FRAMES, max_frames=FPS_MAX_FRAMES,
                        video_start=None, video_end=None):
    """How many frames load_video samples from this video (same options), read from the header (nothing decoded):
    the plan of MR-SP's parallel decoding, made before any rank decodes its share."""
    path = _check_file(path)
    try:
        _, total, video_fps = _decord_open(path)
    except Exception:  # noqa: BLE001 - no decord, or decord cannot read it: PyAV (load_video does the same)
        import av
        try:
            with av.open(path) as container:
                _, total, video_fps = _pyav_header(container, path)
        except VideoError:
            raise
        except Exception as e:  # noqa: BLE001
            raise VideoError(f"{path}: cannot read the video header ({type(e).__name__}: {e})") from e
    return len(_sample(path, total, video_fps, dict(num_frames=num_frames, fps=fps, min_frames=min_frames,
                                                    max_frames=max_frames, video_start=video_start,
                                                    video_end=video_end)))


class FrameCache:
    """On-disk cache of decoded + resized frames (Long-RL's `cache_dir` idea), for datasets read again every epoch:
    a hit skips decoding and resizing. One .npz per entry, named by the sha1 of its key, written to a temporary
    name and renamed (atomic: a crash or a concurrent writer never leaves a half file; ranks may share the folder).
    Key (frame_key): data.video_key of the path + decode and size options, the processor's factor and range, the
    SP share (subset), and the file's size and mtime (a replaced video is a miss, never stale frames).
    stats: hits, misses, writes, bytes_written; hit_rate()."""

    def __init__(self, root):
        self.root = os.fspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.stats = dict(hits=0, misses=0, writes=0)
        self.bytes_written = 0

    def _file(self, key):
        import hashlib
        return os.path.join(self.root, hashlib.sha1(key.encode()).hexdigest() + ".npz")

    def get(self, key):
        """-> (frames (T, h, w, 3) uint8, info dict) or None."""
        f = self._file(key)
        try:
            with np.load(f) as z:
                if bytes(z["key"]).decode() != key:      # a sha1 collision or a foreign file: treat as a miss
                    raise KeyError(key)
                frames, info = z["frames"], json.loads(bytes(z["info"]).decode())
        except (OSError, KeyError, ValueError):
            self.stats["misses"] += 1
            return None
        self.stats["hits"] += 1
        info["subset"] = tuple(info["subset"]) if info.get("subset") is not None else None
        return frames, info

    def put(self, key, frames, info):
        f = self._file(key)
        tmp = f"{f}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, frames=frames, key=np.frombuffer(key.encode(), np.uint8),
                     info=np.frombuffer(json.dumps(info).encode(), np.uint8))
        os.replace(tmp, f)
        self.stats["writes"] += 1
        self.bytes_written += os.path.getsize(f)

    def hit_rate(self):
        n = self.stats["hits"] + self.stats["misses"]
        return self.stats["hits"] / n if n else None


FRAME_CACHE = None   # the process's FrameCache (a stage's --frame_cache_dir sets it); None: no frame cache


def frame_key(path, opts, processor=None, subset=None):
    """The frame cache's key: video_key(path, opts) (decode + size options) + the processor's factor and per-frame
    range (they change the resized size) + the SP share + the file's size and mtime."""
    path = os.fspath(path)
    st = os.stat(path)
    vp = getattr(processor, "video_processor", None)
    proc = "" if vp is None else f"|proc={vp.patch_size * vp.merge_size},{getattr(vp, 'size', None)}"
    share = tuple(subset) if subset else None
    return f"{video_key(path, opts)}{proc}|subset={share}|file={st.st_size},{st.st_mtime_ns}"


def load_frames(processor, path, opts, subset=None, cache=None, backend=None):
    """load_video + the resize of process_video, through the on-disk frame cache. opts: video_options (decode and
    size options). -> (frames (T, h, w, 3) uint8, already at the size process_video gives them, info with
    source_size (H, W)): process_video(processor, frames, info, **size_opts(opts)) then skips its resize and yields
    exactly the pixels it yields from load_video's frames. cache: a FrameCache, default FRAME_CACHE (None: none)."""
    cache = FRAME_CACHE if cache is None else cache
    key = frame_key(path, opts, processor, subset) if cache is not None else None
    if cache is not None:
        got = cache.get(key)
        if got is not None:
            return got
    frames, info = load_video(path, **decode_opts(opts), subset=subset, backend=backend)
    H, W = frames.shape[1:3]
    h, w = processed_frame_size(processor, H, W, len(info["indices"]), **size_opts(opts))
    with _timed("process"):
        frames = _resize_frames(frames, h, w).permute(0, 2, 3, 1).numpy()     # (T, h, w, 3) uint8
    info = dict(info, source_size=[int(H), int(W)])
    if cache is not None:
        cache.put(key, np.ascontiguousarray(frames), info)
    return frames, info


def load_video_cached(path, cache, backend=None, subset=None, **decode):
    """Decoded frames at the source size through a FrameCache (no processor needed): for benchmarks and tools."""
    opts = {k: v for k, v in decode.items() if v is not None}
    key = frame_key(path, opts, None, subset)
    got = cache.get(key)
    if got is not None:
        return got
    frames, info = load_video(path, backend=backend, subset=subset, **opts)
    cache.put(key, frames, info)
    return frames, info


# -----------------------------------------------------------------------------
# records: LongVideo-Reason (released), our normalised JSONL, Video-MME rows
_OPTION_RE = re.compile(r"^\s*\(?([A-J])[\.\):]\s*(.*\S)\s*$")
_ANSWER_TAG_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)
_CATEGORY_ALIASES = {"temporal": "temporal", "goal": "goal", "purpose": "goal", "spatial": "spatial",
                     "plot": "plot", "narrative": "plot"}


def _norm_category(c):
    if c is None:
        return None
    c = str(c).strip().lower()
    for key, cat in _CATEGORY_ALIASES.items():
        if key in c:
            return cat
    return c or None


def _split_problem(problem):
    """LongVideo-Reason embeds options in the problem text as lines 'A. ...'."""
    q, opts = [], []
    for line in problem.splitlines():
        m = _OPTION_RE.match(line)
        if m and m.group(1) == LETTERS[len(opts)]:
            opts.append(f"{m.group(1)}. {m.group(2)}")
        elif opts:
            opts[-1] += " " + line.strip()  # an option spilling over lines
        else:
            q.append(line)
    return "\n".join(q).strip(), opts


def _norm_options(opts):
    """Options as ["A. text", ...]; accepts bare texts, "A. text", "(A) text"."""
    out = []
    for i, o in enumerate(opts):
        o = str(o).strip()
        m = _OPTION_RE.match(o)
        text = m.group(2) if (m and m.group(1) == LETTERS[i]) else o
        out.append(f"{LETTERS[i]}. {text}")
    return out


# per-sample video options: qwen-vl-utils' per-video keys, which a record may carry -> our option names
_VIDEO_FIELDS = {  # record field: (option name, whole number?, smallest allowed value; video_start alone may be 0)
    "nframes": ("num_frames", True, FRAME_FACTOR), "fps": ("fps", False, 0), "min_frames": ("min_frames", True, 1),
    "max_frames": ("max_frames", True, FRAME_FACTOR), "video_start": ("video_start", False, 0),
    "video_end": ("video_end", False, 0), "min_pixels": ("min_pixels", False, 0),
    "max_pixels": ("max_pixels", False, 0), "total_pixels": ("total_pixels", False, 0),
    "resized_height": ("resized_height", True, 1), "resized_width": ("resized_width", True, 1)}
_FIELD_OF = {opt: field for field, (opt, _, _) in _VIDEO_FIELDS.items()}
DECODE_OPTS = ("num_frames", "fps", "min_frames", "max_frames", "video_start", "video_end")   # load_video's
SIZE_OPTS = ("min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width")   # process_video's


def _value_problem(field, v):
    """What is wrong with one video option value (None if nothing)."""
    _, whole, least = _VIDEO_FIELDS[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return f"expected a number, got {v!r}"
    if whole and v != int(v):
        return f"expected a whole number, got {v!r}"
    if field == "video_start":
        return None if v >= 0 else f"expected seconds >= 0, got {v!r}"
    if v <= 0 or v < least:
        return f"expected {'a number > 0' if least == 0 else f'at least {least}'}, got {v!r}"
    return None


def _options_problem(opts):
    """(field, what is wrong) for options that contradict each other (record field names), else None."""
    if "nframes" in opts:
        clash = [k for k in ("fps", "min_frames", "max_frames") if k in opts]
        if clash:
            return clash[0], f"a fixed nframes={opts['nframes']} cannot go with {clash[0]} (fps sampling only)"
    for lo, hi in (("min_frames", "max_frames"), ("min_pixels", "max_pixels"), ("video_start", "video_end")):
        if lo in opts and hi in opts and (opts[hi] < opts[lo] or (lo == "video_start" and opts[hi] == opts[lo])):
            return hi, f"{hi}={opts[hi]} must be {'above' if lo == 'video_start' else 'at least'} {lo}={opts[lo]}"
    if ("resized_height" in opts) != ("resized_width" in opts):
        return "resized_height", "resized_height and resized_width go together: give both or neither"
    return None


def _record_video_opts(row, where):
    """The qwen-vl-utils per-sample video keys of a raw row, validated (RecordError naming where and the field)."""
    opts = {}
    for field in _VIDEO_FIELDS:
        if row.get(field) is None:
            continue
        problem = _value_problem(field, row[field])
        if problem:
            raise RecordError(f"{where}: field {field!r}: {problem}")
        opts[field] = int(row[field]) if _VIDEO_FIELDS[field][1] else row[field]
    bad = _options_problem(opts)
    if bad:
        raise RecordError(f"{where}: field {bad[0]!r}: {bad[1]}")
    return opts


def normalize_record(row, root=None, where="record"):
    """One raw row (any supported format) -> the normalised dict. `where` names it in errors.
    qwen-vl-utils' optional per-sample video keys (nframes, fps, min_frames, max_frames, video_start, video_end,
    min_pixels, max_pixels, total_pixels, resized_height, resized_width) are validated and kept in
    rec["video_opts"] (empty when none); video_options() merges them with a stage's defaults."""
    def need(field):
        if field not in row or row[field] in (None, ""):
            raise RecordError(f"{where}: missing field {field!r}")
        return row[field]

    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
    extra = {}
    if "problem" in row:  # LongVideo-Reason as released
        source = "longvideo-reason"
        rid = row.get("problem_id", row.get("id"))
        video = need("videos")
        if isinstance(video, list):
            if len(video) != 1:
                raise RecordError(f"{where}: field 'videos': expected one video, got {len(video)}")
            video = video[0]
        problem = need("problem")
        if not isinstance(problem, str):
            raise RecordError(f"{where}: field 'problem': expected a string")
        question, options = _split_problem(problem)
        if "options" in row and row["options"]:
            options = _norm_options(row["options"])
        answer = need("answer")
        reasoning = row.get("reasoning") or ""
        category = row.get("category", row.get("question_type"))
    elif "videoID" in row or "question_id" in row:  # Video-MME
        source = "videomme"
        rid = row.get("question_id", row.get("id"))
        vid = row.get("videoID") or row.get("video_id")
        if not vid:
            raise RecordError(f"{where}: missing field 'videoID'")
        video = row.get("video") or (vid if str(vid).lower().endswith((".mp4", ".mkv", ".webm", ".avi")) else f"{vid}.mp4")
        question, options = need("question"), need("options")
        answer, reasoning = need("answer"), ""
        category = row.get("task_type")
        extra = {k: row.get(k) for k in ("duration", "domain", "sub_category", "task_type")}
    else:  # ours
        source = "normalized"
        rid = row.get("id")
        video, question, options, answer = need("video"), need("question"), need("options"), need("answer")
        reasoning = row.get("reasoning") or ""
        category = row.get("category")
        extra = {k: row.get(k) for k in ("duration", "domain", "task_type") if k in row}

    if rid is None:
        raise RecordError(f"{where}: missing field 'id' (or problem_id/question_id)")
    if not isinstance(options, list) or len(options) < 2:
        raise RecordError(f"{where}: field 'options': expected a list of at least 2 options, got {options!r}")
    if len(options) > len(LETTERS):
        raise RecordError(f"{where}: field 'options': at most {len(LETTERS)} options, got {len(options)}")
    options = _norm_options(options)
    ans = str(answer).strip()
    m = _ANSWER_TAG_RE.search(ans)
    ans = (m.group(1) if m else ans).strip().rstrip(".").strip("()").upper()
    if len(ans) != 1 or ans not in LETTERS[:len(options)]:
        raise RecordError(f"{where}: field 'answer': expected a letter in {LETTERS[:len(options)]!r} "
                          f"(or <answer>X</answer>), got {answer!r}")
    if not isinstance(question, str) or not question.strip():
        raise RecordError(f"{where}: field 'question': expected non-empty text")
    video = os.fspath(video)
    if root is not None and not os.path.isabs(video):
        video = os.path.normpath(os.path.join(root, video))
    rec = dict(id=str(rid), video=video, question=question.strip(), options=options, answer=ans,
               reasoning=str(reasoning).strip(), category=_norm_category(category), source=source)
    rec.update({k: v for k, v in extra.items() if k not in rec})
    rec["video_opts"] = _record_video_opts(row, where)
    return rec


def load_records(path, video_root=None, on_error=None):
    """Read a .jsonl / .json dataset file into normalised records.

    Video paths resolve relative to `video_root` (default: the data file's folder).
    Errors name the file, the line (JSONL) or item index (JSON), and the field. A bad row raises RecordError,
    or, with on_error given, is passed to on_error(row_id_or_where, RecordError) and skipped (eval --skip_bad).
    A missing, unparseable (.json) or empty file always raises."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RecordError(f"{path}: no such data file")
    root = video_root or os.path.dirname(os.path.abspath(path))

    def bad(where, row, err):
        if on_error is None:
            raise err
        rid = next((row[k] for k in ("id", "problem_id", "question_id") if isinstance(row, dict) and k in row), None)
        on_error(str(rid) if rid is not None else where, err)

    rows = []
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
            if isinstance(data, dict):
                data = data.get("data") or data.get("records")
            if not isinstance(data, list):
                raise RecordError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
            rows = [(f"{path}: item {i}", r) for i, r in enumerate(data)]
        else:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    bad(f"{path}:{lineno}", None, RecordError(f"{path}:{lineno}: invalid JSON: {e.msg}"))
    recs, seen = [], set()
    for where, row in rows:
        try:
            r = normalize_record(row, root, where)
            if r["id"] in seen:
                raise RecordError(f"{where}: field 'id': duplicate id {r['id']!r}")
        except RecordError as e:
            bad(where, row, e)
            continue
        seen.add(r["id"])
        recs.append(r)
    if not recs:
        raise RecordError(f"{path}: no records")
    return recs


def check_videos(records, where="", skip_bad=False):
    """Missing video files, found before any model work. -> (records with a video, bad rows {"id", "reason"}).
    Without skip_bad the first missing one raises VideoError naming `where` (e.g. "--data=train.jsonl"), the record
    and the file."""
    good, bad = [], []
    for r in records:
        if os.path.isfile(r["video"]):
            good.append(r)
        elif skip_bad:
            bad.append(dict(id=r["id"], reason=f"{r['video']}: no such video file"))
        else:
            n = sum(not os.path.isfile(x["video"]) for x in records)
            raise VideoError(f"{where + ': ' if where else ''}{n} record(s) name a missing video, e.g. record "
                             f"{r['id']!r}: {r['video']}: no such file (fix the data file or the video folder; "
                             f"eval.py can skip and count such items with --skip_bad=1)")
    return good, bad


# -----------------------------------------------------------------------------
# video options: stage-level defaults merged with a record's own qwen-vl-utils keys
def video_options(record=None, **defaults):
    """One dict of video options for a record: the stage's defaults (num_frames, fps, min_frames, max_frames,
    video_start, video_end, min_pixels, max_pixels, total_pixels, resized_height, resized_width; None = unset)
    overridden by the record's own video_opts, as a qwen-vl-utils per-sample dict overrides its defaults. A record
    that asks for fps sampling (fps / min_frames / max_frames) drops the stage's fixed num_frames, and one with its
    own nframes drops the stage's fps options. Split it with decode_opts (load_video, sampled_frame_count) and
    size_opts (process_video); video_key(path, opts) is its cache key. ValueError for bad defaults."""
    unknown = sorted(set(defaults) - set(_FIELD_OF))
    if unknown:
        raise ValueError(f"video_options: unknown option(s) {', '.join(unknown)}; known: {', '.join(_FIELD_OF)}")
    opts = {}
    for name, v in defaults.items():
        if v is None:
            continue
        problem = _value_problem(_FIELD_OF[name], v)
        if problem:
            raise ValueError(f"video option {name}={v!r}: {problem}")
        opts[name] = v
    own = {_VIDEO_FIELDS[f][0]: v for f, v in ((record or {}).get("video_opts") or {}).items()}
    if own.keys() & {"fps", "min_frames", "max_frames"}:
        opts.pop("num_frames", None)
    if "num_frames" in own:
        for k in ("fps", "min_frames", "max_frames"):
            opts.pop(k, None)
    opts.update(own)
    bad = _options_problem({_FIELD_OF[k]: v for k, v in opts.items()})
    if bad:
        rid = (record or {}).get("id")
        raise ValueError(f"video options{f' of record {rid!r}' if rid is not None else ''} {opts}: {bad[1]}")
    return opts


def video_flags(**flags):
    """A stage's video flags (--min_pixels=0 ...) -> video_options defaults: 0 (the flag's "unset") dropped."""
    return {k: v for k, v in flags.items() if v}


def decode_opts(opts):
    """The options of video_options() that choose the frames: load_video / sampled_frame_count keyword arguments."""
    return {k: opts[k] for k in DECODE_OPTS if opts.get(k) is not None}


def size_opts(opts):
    """The options of video_options() that size the frames: process_video / encode_sample keyword arguments."""
    return {k: opts[k] for k in SIZE_OPTS if opts.get(k) is not None}


def video_key(path, opts):
    """A stable string naming the frames (and their size) that `opts` takes from the video at `path`: equal
    options give equal keys whatever their order or int/float spelling (256 == 256.0); any option that changes a
    frame or its size changes the key. For embedding caches (add the vision weights' version yourself)."""
    def num(v):
        return repr(int(v)) if isinstance(v, float) and v.is_integer() else repr(v)
    parts = [os.path.abspath(os.fspath(path))]
    parts += [f"{k}={num(opts[k])}" for k in sorted(opts) if opts[k] is not None]
    return "|".join(parts)


# -----------------------------------------------------------------------------
# prompts and targets
def build_messages(record):
    """Chat messages for one QA record: a video, then question + lettered options + instruction."""
    text = record["question"] + "\n" + "\n".join(record["options"]) + "\n" + INSTRUCTION
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]


def build_prompt(processor, record):
    """The chat-template text up to and including the assistant header."""
    return processor.apply_chat_template(build_messages(record), tokenize=False, add_generation_prompt=True)


def format_target(record):
    """SFT target and the format rewarded in RL: <think>reasoning</think><answer>X</answer>."""
    return f"<think>{record['reasoning']}</think><answer>{record['answer']}</answer>"


FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>(?P<answer>.*?)</answer>", re.S)   # that format


def follows_format(text, num_options=4, options=None):
    """The format RL rewards (and eval reports): <think>...</think><answer>...</answer>, and the answer tag names
    exactly one option as extract_choice reads it (an empty tag, "B or C" or a refusal in the tag is not the format)."""
    m = FORMAT_RE.fullmatch(text.strip())
    return m is not None and extract_choice(m["answer"], num_options, options) is not None


# ---- answer extraction: which option a free-form answer names (tests/test_extract.py, its corpus and the lmms-eval
# comparison: bench/extract_vs_lmms.py). A letter "as an answer writes it": "(C)", "[C]", an upper-case C anywhere
# but inside a word, a lower-case c only before punctuation or the end ("the answer is a dog" names no option) --
# and never the first of a list ("B or C", "A, B and D" decide nothing).
_LIST = r"(?!\s*(?:,|/|、|\bor\b|\band\b|或|和)\s*\(?[A-J]\b)"
_LETTER = rf"(?P<x>\(\s*[A-Ja-j]\s*\)|\[\s*[A-Ja-j]\s*\]|[A-J](?![A-Za-z])|[a-j](?=\s*[.,;:!?)]|\s*$)){_LIST}"
# after a weaker cue an upper-case letter must also end its clause: "it's A man" and "so A person" are no answers
_SOFT_LETTER = (r"(?P<x>\(\s*[A-Ja-j]\s*\)|[A-J](?=\s*(?:[^\w\s]|$)|\s+(?:because|since|as|given)\b)"
                rf"|[a-j](?=\s*[.,;:!?)]|\s*$)){_LIST}")
_BEFORE_LETTER = r"\s*[:=\-–—]?\s*(?i:(?:(?:la|el|a|die|der|le|the)\s+)?(?:option|opci[oó]n|opção|choice|letter)?\s*)"
_ANSWER_PHRASES = "|".join([     # say "this is my answer", in the languages models answer in
    r"\b(?:final|correct|right|best|my)?\s*answer(?:'s|\s+(?:is|would\s+be|should\s+be|must\s+be|will\s+be))?",
    r"\b(?:correct|right|best|final|my)\s+(?:option|choice|pick|one)(?:\s+is)?", r"\b(?:option|choice)\s+is",
    r"\bI(?:'ll|'d|\s+will|\s+would)?\s+(?:choose|select|pick|opt\s+for)", r"\bgo(?:ing)?\s+with",
    r"答案(?:应该|应|就)?(?:是|为)?", r"选项(?:是|为)", r"选择?(?!项)", r"答えは", r"正解は?", r"정답은?", r"답은", r"답\s*:",
    r"respuesta(?:\s+correcta)?\s+es", r"r[ée]ponse\s+est", r"antwort\s+(?:ist|lautet)", r"risposta\s+[èe]",
    r"resposta(?:\s+correta)?\s+[ée]", r"ответ"])
_SOFT_PHRASES = "|".join([       # first-person, contracted and concluding statements: "I think it's B", "So, C."
    r"\b(?:it|that|this)(?:'s|'d\s+be)", r"\b(?:is|was)", r"\b(?:gotta|would|must|should|ha(?:s|ve)\s+to)\s+be",
    r"\bI(?:'d|'ll|\s+would|\s+will)?\s+(?:say|guess|think|believe)", r"\b(?:corresponds|points|refers)\s+to",
    r"\b(?:so|thus|hence|therefore|leaving|definitely|clearly|probably|certainly)\s*,?"])
_ECHO_RE = re.compile(r"^\s*\(?([A-J])[.):]", re.M)   # lines that start like a listed option: "B. 4"

# The rules, in order; the first that finds a valid letter decides. Within the answer and soft rules the LAST match
# wins, because a final answer follows the options it weighed ("At first I thought C, ... the answer is A").
# 1. the whole answer is a letter: "C", "(c)", "[B]", "Option B", "Answer: D." (markdown/LaTeX already removed)
_BARE_RE = re.compile(r"(?i:(?:final\s+)?(?:answer|option|choice)\s*[:\-]?\s*)?"
                      r"[(\[{'\"]?\s*([A-Ja-j])\s*[)\]}'\"]?[.!]?")
# 2. LaTeX's final answer: what the last \boxed{} holds is read on its own ("\boxed{B. She lost her keys}")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
# 3. an answer phrase, then the letter: "the answer is (D)", "Answer: c", "I'd go with C", "答案：C", "选B"; a negated
#    letter never follows one directly ("the answer is not A" matches nothing)
_ANSWER_RE = re.compile(rf"(?i:{_ANSWER_PHRASES}){_BEFORE_LETTER}{_LETTER}")
# 4. a softer statement: "it's B", "I'd say C.", "So, C.", "not A, but C", "B is correct", "C best describes ..."
_SOFT_RES = [re.compile(rf"(?i:{_SOFT_PHRASES}){_BEFORE_LETTER}{_SOFT_LETTER}"),
             re.compile(rf"(?i:\bnot)\s+\(?[A-J]\)?\s*[,;]?\s*(?i:but|rather)\s+(?i:it's\s+)?{_SOFT_LETTER}"),
             re.compile(r"(?P<x>\(\s*[A-J]\s*\)|\b[A-J])\s*(?i:(?:is|seems|looks)\s+(?:to\s+be\s+)?(?:the\s+|my\s+)?"
                        r"(?:most\s+|more\s+)?(?:correct|right|best|answer|likely|accurate)"
                        r"|(?:best\s+)?(?:describes|matches|fits))\b")]
# 5. the answer starts with the option as the prompt lists it: "C. Blue sky", "(C) ...", "C) ...", "C, ...", "C - ...",
#    "C is ...", "C" alone on the first line -- unless the answer just echoes the option list ("A. 3\nB. 4 ...")
_HEAD_RE = re.compile(rf"\s*(?:[(\[]([A-Ja-j])[)\]]|([A-Ja-j]){_LIST}\s*[.),:](?!\d)|([A-J])\s+(?:is|-|–|—)\s"
                      r"|([A-J])[ \t]*\n)")
# 6. the answer ends with a lone letter after a line break, a colon or a full stop: "**Answer**\n\nD", "Not D. A."
_TAIL_RE = re.compile(r"(?:^|\n|:|[.!?]\s)\s*(?i:option\s+)?[(\[]?([A-J])[)\]]?\s*[.!]?\s*$")
# 7. the text of exactly one option: "The answer is the red ball" (done in _read, from `options`)


def _clean(text):
    """The text as the rules read it: full-width forms folded ("Ｂ", "（B）", "答案：B"), LaTeX wrappers and markdown
    emphasis dropped ("$\\boxed{\\text{B}}$" -> "\\boxed{B}"; "**B**", "_B_", "`B`", "### Answer")."""
    t = unicodedata.normalize("NFKC", text)
    t = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", t)
    t = re.sub(r"\$|\\[()\[\]]", " ", t)
    return re.sub(r"\*+|`+|^\s*#+\s*|(?<!\w)__?(?=\S)|(?<=\S)__?(?!\w)", "", t, flags=re.M)


def _last_letter(regexes, t, valid):
    """The valid letter of the last match (by position) of any of `regexes` in t, or None."""
    hits = [(m.start("x"), re.search(r"[A-Ja-j]", m["x"]).group().upper()) for r in regexes for m in r.finditer(t)]
    hits = [h for h in hits if h[1] in valid]
    return max(hits)[1] if hits else None


def _read(t, valid, texts):
    """The option one piece of an answer (an answer tag, a box, the text after </think>, the whole text) names."""
    t = t.strip()
    m = _BARE_RE.fullmatch(t)
    if m:
        return m.group(1).upper() if m.group(1).upper() in valid else None
    boxed = _BOXED_RE.findall(t)
    if boxed and boxed[-1].strip():
        got = _read(boxed[-1], valid, texts)
        if got:
            return got
    got = _last_letter([_ANSWER_RE], t, valid) or _last_letter(_SOFT_RES, t, valid)
    if got:
        return got
    echo = len(set(_ECHO_RE.findall(t))) > 1
    for m in ((None if echo else _HEAD_RE.match(t)), _TAIL_RE.search(t)):
        letter = next((g for g in m.groups() if g), "").upper() if m else ""
        if letter and letter in valid:
            return letter
    if texts:
        low = t.rstrip(".!").strip().lower()
        hits = [i for i, o in enumerate(texts) if o and (low == o or re.search(rf"\b{re.escape(o)}\b", low))]
        if len(hits) == 1:
            return valid[hits[0]]
    return None


def extract_choice(text, num_options=4, options=None):
    """The option letter a model's answer names, or None.

    Where: the last <answer>...</answer> alone when there is one (the answer the model declared; an empty or
    unreadable tag is no answer); else the text after the last </think>, then the whole text. An unclosed <think>
    is a response cut off mid-reasoning: None. What (the rules above, in order): the whole answer being a letter
    ("C", "(c)", "**B**", "Option B"); the last \\boxed{}; the last answer phrase ("the answer is C", "Answer: (c)",
    "I choose B", "答案是B", "La respuesta es C"); the last softer statement ("I think it's B", "that's D",
    "not A, but C", "B is correct", "So, C."); a leading "C. Blue sky" / "C) ..."; a trailing lone letter; else the
    text of exactly one option (options=["A. Candles", ...] -> "candles" gives "A"). Never the first capital of a
    word: "Based on the video, the answer is C." is C (a first-capital regex says B) and "A person walks." is None."""
    if not isinstance(text, str):
        return None
    valid = LETTERS[:num_options]
    # option texts without their label and leading article: "B. A red ball" -> "red ball"
    texts = [re.sub(r"^(?:a|an|the)\s+(?=\S)", "", re.sub(r"^\(?[A-J][.):]\s*", "", o.strip()).lower()).rstrip(".")
             for o in options[:num_options]] if options else None
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        return _read(_clean(tags[-1]), valid, texts)
    if "<think>" in text and "</think>" not in text:
        return None
    parts = [text.rsplit("</think>", 1)[1]] if "</think>" in text else []
    for part in parts + [text]:
        got = _read(_clean(part), valid, texts)
        if got:
            return got
    return None


def video_metadata(info):
    """transformers' VideoMetadata for already-sampled frames; sets the mrope time scale right
    (without it the processor assumes 24 fps and second_per_grid_ts is wrong)."""
    from transformers.video_utils import VideoMetadata
    return VideoMetadata(total_num_frames=info["total_frames"], fps=info["video_fps"],
                         frames_indices=list(_part(info["indices"], info.get("subset"))),
                         duration=info["duration"])


def processed_frame_size(processor, height, width, nframes, min_pixels=None, max_pixels=None, total_pixels=None,
                         resized_height=None, resized_width=None):
    """(h, w) of the frames process_video gives the vision tower for an nframes-frame sampling of a height x width
    video: frame_size (qwen-vl-utils' sizing, factor = the processor's patch x merge), then clamped into the video
    processor's own per-frame range size["shortest_edge"]..size["longest_edge"] by smart_resize -- the composition
    of the reference pipeline, where qwen-vl-utils resizes and the HF processor resizes again only frames outside its
    range (a range holds a multiple-of-factor size unchanged). The processor's frame-count cap
    (cap_pixels_per_frame) is not applied: the total budget is total_pixels, spread over the whole sampling."""
    vp = processor.video_processor
    factor = vp.patch_size * vp.merge_size
    h, w = frame_size(height, width, nframes, factor, min_pixels, max_pixels, total_pixels,
                      resized_height, resized_width)
    size = vp.size   # a SizeDict (attributes) or, in older processors, a plain dict
    lo, hi = ((size.get("shortest_edge"), size.get("longest_edge")) if isinstance(size, dict) else
              (getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None)))
    if not lo or not hi:
        raise ValueError(f"video processor size={size}: expected a per-frame pixel range {{'shortest_edge': "
                         "min pixels, 'longest_edge': max pixels} (a Qwen2-VL / Qwen2.5-VL processor)")
    return smart_resize(h, w, factor, lo, hi)


def _resize_frames(frames, h, w, chunk_bytes=1 << 28):
    """(T, H, W, 3) uint8 -> (T, 3, h, w) uint8 torch, bicubic with antialias through torchvision's (v1) resize on
    uint8 frames in this layout: the very call qwen-vl-utils makes (float math, then rounded and clamped to uint8),
    so the pixels are bit-identical to its output and memory stays at one byte per value. (The v2 uint8 kernel that
    the HF processor uses rounds its own way: up to 4 levels off downscaling, more upscaling.) Frames go through in
    chunks of ~chunk_bytes of float intermediates."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvF
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)   # (T, 3, H, W), a view
    T, _, H, W = x.shape
    if (H, W) == (h, w):
        return x   # bicubic to the same size is the identity
    step = max(1, chunk_bytes // (3 * 4 * max(H * W, h * w)))
    out = torch.empty((T, 3, h, w), dtype=torch.uint8)   # (T, 3, h, w)
    for t in range(0, T, step):
        out[t:t + step] = tvF.resize(x[t:t + step], [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return out


def process_video(processor, frames, info, min_pixels=None, max_pixels=None, total_pixels=None,
                  resized_height=None, resized_width=None):
    """_process_video (below), its time added to COUNTS["process_s"] / ["process_cpu_s"]."""
    with _timed("process"):
        return _process_video(processor, frames, info, min_pixels, max_pixels, total_pixels, resized_height,
                              resized_width)


def _process_video(processor, frames, info, min_pixels=None, max_pixels=None, total_pixels=None,
                   resized_height=None, resized_width=None):
    """Pixels for the vision tower: pixel_values_videos (N_patches, C*2*14*14), video_grid_thw (1, 3)
    and second_per_grid_ts (1,) (mrope time scale = temporal_patch / sampled fps, qwen-vl-utils' sample fps).

    frames (T, H, W, 3) uint8 at the source resolution, all of the sampled frames or one SP rank's share of them
    (info["subset"]). The frame size is computed once, by processed_frame_size from the source size and the WHOLE
    sampling's frame count len(info["indices"]) (never len(frames)), with the sizing options (size_opts of
    video_options: min_pixels, max_pixels, total_pixels, resized_height, resized_width); the frames are resized
    once, as qwen-vl-utils does, and the processor runs with do_resize=False, so no processor option can make a
    share's grid differ from the whole video's: each share's patches are exactly its rows of the whole video's."""
    import torch
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"process_video: frames of shape {frames.shape} and dtype {frames.dtype}: expected "
                         "(T, H, W, 3) uint8 as load_video returns")
    vp = processor.video_processor
    n = len(info["indices"])
    if len(frames) != len(_part(info["indices"], info.get("subset"))):
        raise ValueError(f"process_video: {len(frames)} frames for info describing "
                         f"{len(_part(info['indices'], info.get('subset')))} (subset={info.get('subset')})")
    H, W = info.get("source_size") or frames.shape[1:3]   # load_frames' frames come resized: size from the source
    h, w = processed_frame_size(processor, H, W, n, min_pixels, max_pixels, total_pixels, resized_height,
                                resized_width)
    if frames.shape[1:3] not in ((H, W), (h, w)):
        raise ValueError(f"process_video: frames of {frames.shape[1]}x{frames.shape[2]} for a {H}x{W} source: "
                         f"expected the source size or the processed size {h}x{w}")
    COUNTS["processor_runs"] += 1
    pixels = _resize_frames(frames, h, w)   # (T, 3, h, w) uint8
    out = vp(videos=[pixels], video_metadata=[video_metadata(info)], do_resize=False, do_sample_frames=False,
             return_tensors="pt")
    grid = out["video_grid_thw"]
    tp = vp.temporal_patch_size
    assert grid.tolist() == [[-(-len(frames) // tp), h // vp.patch_size, w // vp.patch_size]], (grid, h, w)
    fps = info.get("sampled_fps") or FPS   # unknown video fps (some headers): assume the default 2 fps sampling
    return dict(pixel_values_videos=out["pixel_values_videos"], video_grid_thw=grid,
                second_per_grid_ts=torch.tensor([tp / fps], dtype=torch.float32))


def video_inputs(processor, record, **defaults):
    """Decode + process a record's video with the stage's option defaults (num_frames, min_pixels, ...) and the
    record's own fields: process_video's dict (pixel_values_videos, video_grid_thw, second_per_grid_ts)."""
    opts = video_options(record, **defaults)
    return process_video(processor, *load_video(record["video"], **decode_opts(opts)), **size_opts(opts))


def encode_text(processor, record, video_grid_thw, with_target=True, max_length=None, truncate=False):
    """Token ids for one sample given only its video grid (no pixels: this is how cached video
    embeddings are reused): the chat prompt with <|video_pad|> expanded to t*h*w/merge^2 tokens,
    then (optionally) the target + <|im_end|>. Returns input_ids (S,), labels (S,) (-100 outside the
    target), mm_token_type_ids (S,) (0 text, 2 video), prompt_len, truncated.

    Over-long samples: SampleTooLongError unless truncate=True, which cuts the *target* only
    (the prompt holds the video tokens, which cannot be cut without breaking the model input)."""
    import torch
    tok = processor.tokenizer
    merge = processor.video_processor.merge_size
    n_video = int(torch.as_tensor(video_grid_thw).reshape(-1, 3)[0].prod()) // merge ** 2
    prompt = build_prompt(processor, record).replace("<|video_pad|>", "<|video_pad|>" * n_video, 1)
    ids = torch.tensor(tok(prompt, add_special_tokens=False)["input_ids"])
    prompt_len = ids.numel()
    labels = torch.full_like(ids, -100)
    truncated = False
    if with_target:
        tgt = torch.tensor(tok(format_target(record) + "<|im_end|>", add_special_tokens=False)["input_ids"])
        total = prompt_len + tgt.numel()
        if max_length is not None and total > max_length:
            if not truncate or prompt_len >= max_length:
                why = ("the prompt alone (video tokens) is longer; use fewer frames or a smaller frame size"
                       if prompt_len >= max_length else "pass truncate=True (--truncate=1) to cut the target")
                raise SampleTooLongError(f"sample {record['id']!r}: {total} tokens ({prompt_len} prompt + "
                                         f"{tgt.numel()} target) > max_length={max_length}: {why}")
            tgt, truncated = tgt[:max_length - prompt_len], True
        ids = torch.cat([ids, tgt])
        labels = torch.cat([labels, tgt])
    elif max_length is not None and prompt_len > max_length:
        raise SampleTooLongError(f"sample {record['id']!r}: prompt of {prompt_len} tokens > "
                                 f"max_length={max_length}; use fewer frames or a smaller frame size")
    video_id = tok.convert_tokens_to_ids("<|video_pad|>")
    assert int((ids == video_id).sum()) == n_video, "the prompt text must hold exactly one video"
    mm = (ids == video_id).long() * 2
    return dict(input_ids=ids, labels=labels, mm_token_type_ids=mm, prompt_len=prompt_len, truncated=truncated,
                id=record["id"], answer=record["answer"])


def encode_sample(processor, record, frames, info, with_target=True, max_length=None, truncate=False, **sizing):
    """One training/eval sample from decoded frames: process_video (with the sizing options) + encode_text."""
    vid = process_video(processor, frames, info, **sizing)
    return dict(encode_text(processor, record, vid["video_grid_thw"], with_target, max_length, truncate), **vid)


def _pad(seqs, value, left=False):
    n = max(s.numel() for s in seqs)
    out = seqs[0].new_full((len(seqs), n), value)
    for i, s in enumerate(seqs):
        if left:
            out[i, n - s.numel():] = s
        else:
            out[i, :s.numel()] = s
    return out


def _collate(samples, pad_id, left):
    import torch
    ids = [s["input_ids"] for s in samples]
    batch = dict(
        input_ids=_pad(ids, pad_id, left),                                  # (B, S)
        attention_mask=_pad([torch.ones_like(i) for i in ids], 0, left),   # (B, S)
        mm_token_type_ids=_pad([s["mm_token_type_ids"] for s in samples], 0, left),
        pixel_values_videos=torch.cat([s["pixel_values_videos"] for s in samples]),  # (sum N, C)
        video_grid_thw=torch.cat([s["video_grid_thw"] for s in samples]),            # (B, 3)
        second_per_grid_ts=torch.cat([s["second_per_grid_ts"] for s in samples]),    # (B,)
        ids=[s["id"] for s in samples], answers=[s["answer"] for s in samples],
    )
    return batch


def collate_sft(samples, pad_id):
    """Right-padded SFT batch; labels are -100 everywhere but the assistant target."""
    batch = _collate(samples, pad_id, left=False)
    batch["labels"] = _pad([s["labels"] for s in samples], -100)
    return batch


def collate_rl(samples, pad_id):
    """Left-padded prompt batch for generation (no targets); prompt_lens are the unpadded lengths."""
    import torch
    batch = _collate(samples, pad_id, left=True)
    batch["prompt_lens"] = torch.tensor([s["input_ids"].numel() for s in samples])
    return batch


def model_inputs(batch, device):
    """The tensors of a data.py batch that the HF forward takes. mm_token_type_ids must be passed:
    without it Qwen2.5-VL silently falls back to 1-D positions (transformers 5.24; logits off by ~1e-2)."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
            "second_per_grid_ts", "labels")
    return {k: batch[k].to(device) for k in keys if k in batch}
