"""
data.py -- long-video QA data, as a library: video decoding (GOP-aware PyAV, decord; an on-disk frame cache), frame
sampling and sizing with qwen-vl-utils' rules (what Qwen2-VL / Qwen2.5-VL checkpoints were trained with), dataset
records (LongVideo-Reason as released, our JSONL, Video-MME, GSM8K, MATH; one video, none, images or several videos;
multiple-choice, open-ended or math answers), prompts and targets, and SFT/RL collation. What a response answered and
whether it is right (the reward) is reward.py. numpy + PyAV/decord; torch/torchvision only to process frames and
collate; copy it into another project with reward.py (the answer types, option letters and MATH's \\boxed answers).

    from data import load_records, video_options, load_video, process_video, decode_opts, size_opts
    recs = load_records("data/synth/train.jsonl")          # LongVideo-Reason / ours / Video-MME rows
    opts = video_options(recs[0], num_frames=32)           # stage defaults + the record's own qwen-vl-utils keys
    frames, info = load_video(recs[0]["video"], **decode_opts(opts))   # (T, H, W, 3) uint8, source resolution
    pixels = process_video(processor, frames, info, **size_opts(opts)) # sized from the whole sampling

Records, all normalised to one dict:
    {id, video (absolute path of the one video; None for text-only, image and several-video records), videos [paths],
     images [paths], question, answer_type "choice" | "open" | "math", options ["A. ...", ...] ([] unless choice),
     answer ("B", a short text, or a final math answer), answers [every acceptable answer], reasoning, category,
     duration, domain, task_type, source, video_opts {qwen-vl-utils per-sample keys}, where (file:line, for errors)}
The synthetic set and the tiny checkpoint are made by prepare.py.
"""
import json
import math
import os
import re
import time
import warnings

import numpy as np

from reward import ANSWER_TAG_RE, ANSWER_TYPES, LETTERS, last_boxed   # the answer types and MATH's \boxed answers

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
DECODE_BACKEND = None     # load_video's backend when none is passed: None = PyAV, then decord (set_decode_backend)
DECODE_ORDER = ("pyav", "decord")   # the default order: our reader first (2-10% faster here, docs/BENCHMARKS.md)
DECODE_BACKENDS = ("pyav", "decord", "pyav-seq")   # --decode_backend's names; pyav-seq: every frame from the start
# frame sizes are counted in merged tokens of factor x factor pixels (factor = patch 14 x merge 2 = 28 for Qwen2.5-VL)
VIDEO_MIN_TOKENS = 128    # per-frame pixel floor: 128 * 28 * 28
VIDEO_MAX_TOKENS = 768    # per-frame pixel ceiling: 768 * 28 * 28
IMAGE_MIN_TOKENS, IMAGE_MAX_TOKENS = 4, 16384   # smart_resize's own default range (used for resized_height/width)
MODEL_SEQ_LEN = 128000    # total video budget: 90% of this many tokens' pixels, shared by all frames
MAX_RATIO = 200           # the widest aspect ratio smart_resize accepts
CATEGORIES = ("temporal", "goal", "spatial", "plot")  # LongVideo-Reason-eval categories
INSTRUCTION = ("Think step by step inside <think> </think> tags, then give only the letter of the "
               "correct option inside <answer> </answer> tags.")
OPEN_INSTRUCTION = ("Think step by step inside <think> </think> tags, then give only a short answer (a few words) "
                    "inside <answer> </answer> tags.")
MATH_INSTRUCTION = ("Think step by step inside <think> </think> tags, then give only the final answer (a number or "
                    "an expression) inside <answer> </answer> tags.")


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
# decoding: our PyAV reader first, decord the fallback. Both decode only the GOPs the sampled frames touch (our
# reader plans it: gop_plan; decord's get_batch seeks across GOPs only), codec threads on (bench/bench_decode.py),
# and write each frame straight into one (T, H, W, 3) array (_put): a decode holds the sampled frames once
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


def _decord_read(path, sampling, subset, chunk=16):
    """get_batch in chunks of `chunk` frames, written into one output: the same frames as one call (the reader keeps
    its place between sorted chunks), but held once, not as decord's whole batch + its numpy copy (2x at the peak)."""
    vr, total, video_fps = _decord_open(path)
    idx = _sample(path, total, video_fps, sampling)
    sel, out = _part(idx, subset, path), None
    for s in range(0, len(sel), chunk):
        batch = vr.get_batch(sel[s:s + chunk]).asnumpy()          # (<= chunk, H, W, 3) uint8
        out = _put(out, slice(s, s + len(batch)), batch, len(sel))
    return out, total, video_fps, idx


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


def _slots(sel):
    """{frame position: [output rows]} for sampled positions `sel` (a position can be sampled more than once)."""
    slots = {}
    for j, k in enumerate(sel):
        slots.setdefault(k, []).append(j)
    return slots


def _put(out, rows, arr, n):
    """Write decoded frames ((H, W, 3), or a batch (b, H, W, 3)) into rows of the (n, H, W, 3) output, allocated at
    the first write. Frames go straight to their rows, so a decode holds the sampled frames once: a list + np.stack
    held them twice at the end (2x the raw bytes: 2.9 GB for 2,048 frames of 360p), which set a rank's peak in the
    collect phase."""
    if out is None:
        out = np.empty((n, *arr.shape[-3:]), dtype=arr.dtype)
    out[rows] = arr        # a frame of another size (a mid-stream resolution change) raises here, as np.stack did
    return out


def _pyav_read_sequential(container, stream, path, sel, total):
    """Decode from the start, keeping the frames at positions `sel` (presentation order, as counted by decode()).
    The fallback of _pyav_read for streams without usable timestamps. -> (len(sel), H, W, 3) uint8."""
    want, i, out = _slots(sel), -1, None
    last = max(sel)
    for i, frame in enumerate(container.decode(stream)):
        if i in want:
            out = _put(out, want[i], frame.to_ndarray(format="rgb24"), len(sel))
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


def _pyav_read(path, sampling, subset, threads=None, seek=True):
    """PyAV, GOP-aware: seek to a keyframe only where that skips work (gop_plan), codec threading on (threads: 0 =
    one per core). Frames are matched by their timestamp against the packet table (pyav_index), so they are exactly
    those a sequential decode yields at the same positions; streams without a usable table decode sequentially.
    seek=False (backend "pyav-seq") always decodes sequentially from frame 0 to the last sampled one: a cost flat in
    the number of frames sampled, like a read_video-style reader's (qwen-vl-utils' torchvision path, which also
    converts every frame), for ablations of the paper's baseline; same frames, never faster."""
    import av
    with av.open(path) as container:
        stream, total, video_fps = _pyav_header(container, path)
        idx = _sample(path, total, video_fps, sampling)
        sel = _part(idx, subset, path)
        stream.thread_type = "AUTO"                  # frame + slice threads: same pixels, less wall time
        stream.codec_context.thread_count = DECODE_THREADS if threads is None else threads
        table = pyav_index(container, stream) if seek else None
        if table is None:
            return _pyav_read_sequential(container, stream, path, sel, total), total, video_fps, idx
        order, keyframes = table
        pos = {t: i for i, t in enumerate(order)}
        if max(sel) >= len(order):
            raise VideoError(f"{path}: truncated: header says {total} frames but the packets hold {len(order)} "
                             f"(needed frame {max(sel)})")
        slots, got, out = _slots(sel), set(), None
        for seek_to, targets in gop_plan(sorted(slots), keyframes):
            if seek_to is not None:
                container.seek(order[seek_to], stream=stream, backward=True, any_frame=False)
            need, last = set(targets), targets[-1]
            for frame in container.decode(stream):
                i = pos.get(frame.pts)
                if i is None:
                    break                            # a frame the table does not know: trust only a full decode
                if i in need:
                    out = _put(out, slots[i], frame.to_ndarray(format="rgb24"), len(sel))
                    got.add(i)
                if i >= last:
                    break
            if not need <= got:
                break
        if got != slots.keys():   # a decoder that dropped or retimed frames (open GOP leads, ...): redo exactly
            del out
            container.seek(0)
            return _pyav_read_sequential(container, stream, path, sel, total), total, video_fps, idx
    return out, total, video_fps, idx


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
    sampled_fps, backend, subset}. backend: None (DECODE_BACKEND, else PyAV then decord), "pyav", "decord" or
    "pyav-seq" (PyAV without seeking: decodes every frame up to the last sampled one).
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
    for name in _readers(backend):
        reader = {"decord": _decord_read, "pyav": _pyav_read,
                  "pyav-seq": lambda *a: _pyav_read(*a, seek=False)}.get(name)
        if reader is None:
            raise ValueError(f"backend={name!r}: expected one of {DECODE_BACKENDS}")
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


def _readers(backend=None):
    """The readers load_video tries, in order: the one named (the call's, else --decode_backend's), else DECODE_ORDER.
    sampled_frame_count reads its header from the same list, so MR-SP's plan counts the frames load_video decodes."""
    backend = backend or DECODE_BACKEND
    return (backend,) if backend else DECODE_ORDER


def set_decode_backend(name):
    """A stage's --decode_backend: "" keeps the default order (PyAV, then decord where PyAV cannot read a file),
    "pyav", "decord" or "pyav-seq" makes it the only decoder of this process (every rank sets the same)."""
    global DECODE_BACKEND
    if name not in ("",) + DECODE_BACKENDS:
        raise SystemExit(f"--decode_backend={name!r}: expected '' (PyAV, then decord), 'pyav', 'decord' or "
                         f"'pyav-seq' (PyAV, no seeking)")
    DECODE_BACKEND = name or None


def sampled_frame_count(path, num_frames=None, fps=FPS, min_frames=FPS_MIN_FRAMES, max_frames=FPS_MAX_FRAMES,
                        video_start=None, video_end=None):
    """How many frames load_video samples from this video (same options), read from the header (nothing decoded):
    the plan of MR-SP's parallel decoding, made before any rank decodes its share."""
    path = _check_file(path)
    errors = []
    for name in _readers():           # the header of the reader load_video uses, in the same order
        try:
            if name.startswith("pyav"):
                import av
                with av.open(path) as container:
                    _, total, video_fps = _pyav_header(container, path)
            else:
                _, total, video_fps = _decord_open(path)
            break
        except Exception as e:  # noqa: BLE001 - any reader's failure: the next one (load_video does the same)
            errors.append(f"{name}: {e}" if isinstance(e, VideoError) else f"{name}: {type(e).__name__}: {e}")
    else:
        raise VideoError(f"{path}: cannot read the video header ({'; '.join(errors)})")
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


_GSM8K_RE = re.compile(r"^(?P<reasoning>.*)####\s*(?P<answer>.+?)\s*$", re.S)


def _where_id(where):
    """An id for a row of a dataset that has none (GSM8K, MATH): "line12" (JSONL) / "item3" (JSON), else None."""
    m = re.search(r"(?::(\d+)|: item (\d+))$", str(where))
    return None if m is None else f"line{m[1]}" if m[1] else f"item{m[2]}"


def _paths(row, field, where):
    """A media field of a raw row (one path or a list of paths) -> list of path strings ([] when absent)."""
    v = row.get(field)
    if v is None or v == []:
        return []
    items = [v] if isinstance(v, (str, os.PathLike)) else v
    if not isinstance(items, list) or any(not isinstance(p, (str, os.PathLike)) or not os.fspath(p).strip()
                                          for p in items):
        raise RecordError(f"{where}: field {field!r}: expected a path or a list of paths, got {v!r}")
    return [os.fspath(p) for p in items]


def _answers(v, where, field="answer"):
    """An open-ended answer: one non-empty text or a list of acceptable texts -> list of strings."""
    items = v if isinstance(v, list) else [v]
    if not items or any(isinstance(a, bool) or not isinstance(a, (str, int, float)) or not str(a).strip()
                        for a in items):
        raise RecordError(f"{where}: field {field!r}: expected a non-empty text (or a list of acceptable texts), "
                          f"got {v!r}")
    return [str(a).strip() for a in items]


def normalize_record(row, root=None, where="record"):
    """One raw row (any supported format) -> the normalised dict. `where` names it in errors.

    Formats (README "Record formats" has one example line each): LongVideo-Reason as released, Video-MME rows, our
    JSONL (video / several videos / images / text only; answer_type "choice" (default), "open" or "math"), GSM8K rows
    {"question", "answer": "... #### 42"} and MATH rows {"problem", "solution" with \\boxed{}}.
    The normalised dict: id, question, answer_type, options (["A. ...", ...]; [] unless "choice"), answer (a letter;
    the first acceptable text for "open"; the final answer for "math"), answers (every acceptable answer), reasoning,
    category, source, videos (absolute paths), images (absolute paths), video (the path when the record has exactly
    one video and no image -- the MR-SP path --, else None), video_opts (qwen-vl-utils per-sample video keys:
    nframes, fps, min_frames, max_frames, video_start, video_end, min_pixels, max_pixels, total_pixels,
    resized_height, resized_width, validated; video_options() merges them with a stage's defaults), where (`where`:
    file:line, named by errors found after loading, e.g. a missing image file)."""
    def need(field):
        if field not in row or row[field] in (None, ""):
            raise RecordError(f"{where}: missing field {field!r}")
        return row[field]

    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
    extra, images, answer_type = {}, [], "choice"
    if "problem" in row and "solution" in row and not row.get("videos"):  # MATH (Hendrycks) rows: no media
        source, answer_type = "math", "math"
        rid = row.get("id", row.get("problem_id", row.get("unique_id")))
        rid = rid if rid is not None else _where_id(where)   # MATH's files carry no id: the line number
        question, reasoning = need("problem"), need("solution")
        if not isinstance(reasoning, str):
            raise RecordError(f"{where}: field 'solution': expected text, got {reasoning!r}")
        answer = row.get("answer") or last_boxed(reasoning)
        if answer is None or not str(answer).strip():
            raise RecordError(f"{where}: field 'solution': expected a final answer in \\boxed{{...}} (or an 'answer' "
                              f"field), got {reasoning[-80:]!r}")
        videos, options = [], []
        category = row.get("type", row.get("category"))
        extra = {k: row.get(k) for k in ("level",) if k in row}
    elif "problem" in row:  # LongVideo-Reason as released
        source = "longvideo-reason"
        rid = row.get("problem_id", row.get("id"))
        videos = _paths(row, "videos", where) if "videos" in row else []
        if not videos:
            raise RecordError(f"{where}: missing field 'videos'")
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
        videos = [row.get("video") or (vid if str(vid).lower().endswith((".mp4", ".mkv", ".webm", ".avi"))
                                       else f"{vid}.mp4")]
        question, options = need("question"), need("options")
        answer, reasoning = need("answer"), ""
        category = row.get("task_type")
        extra = {k: row.get(k) for k in ("duration", "domain", "sub_category", "task_type")}
    else:  # ours (and GSM8K rows, which are ours without media, options or answer_type)
        source = "normalized"
        rid = row.get("id")
        if "video" in row and "videos" in row:
            raise RecordError(f"{where}: fields 'video' and 'videos': give one of them")
        videos = _paths(row, "video", where) + _paths(row, "videos", where)
        images = _paths(row, "image", where) + _paths(row, "images", where)
        question, answer = need("question"), row.get("answer")
        reasoning = row.get("reasoning") or ""
        answer_type = row.get("answer_type")
        gsm8k = (answer_type in (None, "math") and not videos and not images and not row.get("options")
                 and isinstance(answer, str) and _GSM8K_RE.match(answer))
        if gsm8k:   # GSM8K: "<solution with <<48/2=24>> calculator notes>\n#### 72"
            source, answer_type = ("gsm8k" if answer_type is None else source), "math"
            reasoning = reasoning or re.sub(r"<<[^<>]*>>", "", gsm8k["reasoning"]).strip()
            answer = gsm8k["answer"]
            rid = rid if rid is not None else _where_id(where)   # GSM8K's files carry no id: the line number
        if answer_type is None:
            if not row.get("options"):
                raise RecordError(f"{where}: missing field 'options' (a multiple-choice record; set answer_type to "
                                  f"'open' or 'math' for other answers)")
            if not videos and not images:
                # a video QA record that lost its video (a typo in the key) must not turn into a text question:
                # text-only multiple choice says so with answer_type "choice"
                raise RecordError(f"{where}: missing field 'video' (or 'videos' / 'images'; a text-only "
                                  f"multiple-choice record sets answer_type 'choice')")
            answer_type = "choice"
        if answer_type not in ANSWER_TYPES:
            raise RecordError(f"{where}: field 'answer_type': expected one of {', '.join(ANSWER_TYPES)}, "
                              f"got {answer_type!r}")
        options = need("options") if answer_type == "choice" else []
        if answer_type != "choice" and row.get("options"):
            raise RecordError(f"{where}: field 'options': a record with answer_type {answer_type!r} has no options "
                              f"(drop them, or use answer_type 'choice')")
        if answer is None or answer == "":
            raise RecordError(f"{where}: missing field 'answer'")
        category = row.get("category")
        extra = {k: row.get(k) for k in ("duration", "domain", "task_type") if k in row}

    if rid is None:
        raise RecordError(f"{where}: missing field 'id' (or problem_id/question_id)")
    if not isinstance(question, str) or not question.strip():
        raise RecordError(f"{where}: field 'question': expected non-empty text")
    if answer_type == "choice":
        if not isinstance(options, list) or len(options) < 2:
            raise RecordError(f"{where}: field 'options': expected a list of at least 2 options, got {options!r}")
        if len(options) > len(LETTERS):
            raise RecordError(f"{where}: field 'options': at most {len(LETTERS)} options, got {len(options)}")
        options = _norm_options(options)
        ans = str(answer).strip()
        m = ANSWER_TAG_RE.search(ans)
        ans = (m.group(1) if m else ans).strip().rstrip(".").strip("()").upper()
        if len(ans) != 1 or ans not in LETTERS[:len(options)]:
            raise RecordError(f"{where}: field 'answer': expected a letter in {LETTERS[:len(options)]!r} "
                              f"(or <answer>X</answer>), got {answer!r}")
        answers = [ans]
    elif answer_type == "open":
        answers = _answers(answer, where)
    else:   # math: one final answer (a number or an expression), as text
        answers = _answers(answer, where)
        if len(answers) != 1:
            raise RecordError(f"{where}: field 'answer': a math record has one final answer, got {answer!r}")
    def resolve(p):
        return os.path.normpath(os.path.join(root, p)) if root is not None and not os.path.isabs(p) else p
    videos, images = [resolve(p) for p in videos], [resolve(p) for p in images]
    rec = dict(id=str(rid), video=videos[0] if len(videos) == 1 and not images else None, videos=videos,
               images=images, question=question.strip(), answer_type=answer_type, options=options, answer=answers[0],
               answers=answers, reasoning=str(reasoning).strip(), category=_norm_category(category), source=source)
    rec.update({k: v for k, v in extra.items() if k not in rec})
    rec["video_opts"] = _record_video_opts(row, where)
    rec["where"] = where   # file:line (JSON: file: item i), for errors found after loading (a missing image file)
    return rec


def record_videos(rec):
    """A normalised record's video paths, in order ([] for none)."""
    return list(rec.get("videos") or ([rec["video"]] if rec.get("video") else []))


def record_media(rec):
    """What a normalised record shows the model: "text" (nothing), "video" (exactly one video: the MR-SP path),
    "images", "videos" (several) or "mixed" (images and videos)."""
    nv, ni = len(record_videos(rec)), len(rec.get("images") or [])
    return "text" if not nv and not ni else "video" if nv == 1 and not ni else "mixed" if nv and ni else \
        "images" if ni else "videos"


def most_videos(records):
    """The most videos one record holds (at least 1): vllm_start's max_videos. Every record kind -- text only, one or
    several videos, one or several images, images beside videos -- goes through sft.py, rl.py (--loop=mrsp) and
    eval.py with either engine; vLLM (0.32) counts a prompt's video embeddings against its per-prompt limit when it
    builds its own vision tower (Qwen3-VL), so the engine is started with room for the data's largest record."""
    return max([1] + [len(record_videos(r)) for r in records])


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
    """Missing video (and image) files, found before any model work. -> (records whose files all exist -- text-only
    records always --, bad rows {"id", "reason"}). Without skip_bad the first missing one raises VideoError naming
    `where` (e.g. "--data=train.jsonl"), the record and the file."""
    def missing(r):
        return [p for p in (r.get("videos") or []) + (r.get("images") or []) if not os.path.isfile(p)]

    def field(r, p):   # the field a path came from, and where the record is (file:line)
        return (f"{r.get('where', '?')}, field {'images' if p in (r.get('images') or []) else 'video(s)'!r}")
    good, bad = [], []
    for r in records:
        gone = missing(r)
        if not gone:
            good.append(r)
        elif skip_bad:
            bad.append(dict(id=r["id"], reason=f"{gone[0]}: no such {'image' if gone[0] in r['images'] else 'video'}"
                                               f" file ({field(r, gone[0])})"))
        else:
            n = sum(bool(missing(x)) for x in records)
            raise VideoError(f"{where + ': ' if where else ''}{n} record(s) name a missing video or image, e.g. "
                             f"record {r['id']!r}: {gone[0]}: no such file ({field(r, gone[0])}; fix the data file "
                             f"or the video folder; eval.py can skip and count such items with --skip_bad=1)")
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
    """Chat messages for one record: its images, then its videos (none for a text-only record), then the question,
    the lettered options (multiple choice) and the instruction of its answer type."""
    kind = record.get("answer_type", "choice")
    if kind == "choice":
        text = record["question"] + "\n" + "\n".join(record["options"]) + "\n" + INSTRUCTION
    else:   # open / math: no options; the instruction asks for a short text / the final answer in the tag
        text = record["question"] + "\n" + (OPEN_INSTRUCTION if kind == "open" else MATH_INSTRUCTION)
    videos = record.get("videos") or ([record["video"]] if record.get("video") else [])
    media = [{"type": "image"}] * len(record.get("images") or []) + [{"type": "video"}] * len(videos)
    return [{"role": "user", "content": media + [{"type": "text", "text": text}]}]


def build_prompt(processor, record):
    """The chat-template text up to and including the assistant header."""
    return processor.apply_chat_template(build_messages(record), tokenize=False, add_generation_prompt=True)


def format_target(record):
    """SFT target and the format rewarded in RL: <think>reasoning</think><answer>X</answer> (X: the letter, the
    short text or the final math answer)."""
    return f"<think>{record['reasoning']}</think><answer>{record['answer']}</answer>"


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
    (cap_pixels_per_frame) is not applied: the total budget is total_pixels, spread over the whole sampling.
    A size asked for explicitly (resized_height/width) that the range changes is re-sized as the reference pipeline
    does, with a warning that names the asked and the given size (once per pair): never a silent other size."""
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
    got = smart_resize(h, w, factor, lo, hi)
    if resized_height is not None and got != (h, w):
        warnings.warn(f"resized_height x resized_width = {resized_height}x{resized_width} ({h}x{w} = {h * w:,} "
                      f"pixels a frame) is outside the checkpoint's video processor range {lo:,}..{hi:,} pixels "
                      f"(processor_config.json / preprocessor_config.json: video_processor size shortest_edge.."
                      f"longest_edge): frames reach the model at {got[0]}x{got[1]}, as the HF processor re-sizes "
                      "them; widen that range in the checkpoint's processor config to keep the asked size",
                      stacklevel=2)
    return got


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


def writes_timestamps(processor):
    """Whether the checkpoint's processor writes "<t seconds>" text before each frame group (Qwen3-VL; Qwen2-VL and
    Qwen2.5-VL put the time into the mrope positions instead). Read from the processor the checkpoint ships."""
    return hasattr(processor, "_calculate_timestamps")


def video_timestamps(processor, info):
    """Seconds of each frame group (temporal patch) of a sampling, as the Qwen3-VL processor writes them: the mean of
    the group's first and last frame time, index / video fps (24 fps when the header has none, as transformers
    assumes), from the WHOLE sampling's indices (info["indices"]), never one SP rank's share.
    -> float64 tensor (t_groups,), or None for a processor that writes no timestamps."""
    import torch
    if not writes_timestamps(processor):
        return None
    tp = processor.video_processor.temporal_patch_size
    ts = processor._calculate_timestamps(list(info["indices"]), info.get("video_fps") or 24, tp)
    return torch.tensor(ts, dtype=torch.float64)


def process_video(processor, frames, info, min_pixels=None, max_pixels=None, total_pixels=None,
                  resized_height=None, resized_width=None):
    """_process_video (below), its time added to COUNTS["process_s"] / ["process_cpu_s"]."""
    with _timed("process"):
        return _process_video(processor, frames, info, min_pixels, max_pixels, total_pixels, resized_height,
                              resized_width)


def _process_video(processor, frames, info, min_pixels=None, max_pixels=None, total_pixels=None,
                   resized_height=None, resized_width=None):
    """Pixels for the vision tower: pixel_values_videos (N_patches, C*2*14*14), video_grid_thw (1, 3)
    and second_per_grid_ts (1,) (mrope time scale = temporal_patch / sampled fps, qwen-vl-utils' sample fps), plus
    timestamps (t,) float64 for a processor that writes them (Qwen3-VL: video_timestamps).

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
    vid = dict(pixel_values_videos=out["pixel_values_videos"], video_grid_thw=grid,
               second_per_grid_ts=torch.tensor([tp / fps], dtype=torch.float32))
    ts = video_timestamps(processor, info)
    if ts is not None:   # Qwen3-VL: the prompt's "<t seconds>" texts (encode_text); always the WHOLE video's
        vid["timestamps"] = ts
    return vid


def video_inputs(processor, record, **defaults):
    """Decode + process a record's video(s) with the stage's option defaults (num_frames, min_pixels, ...) and the
    record's own fields: process_video's dict (pixel_values_videos, video_grid_thw, second_per_grid_ts), one grid row
    per video in the record's order (a several-video record: rows concatenated; every video takes the same options)."""
    import torch
    opts = video_options(record, **defaults)
    paths = record.get("videos") or [record["video"]]
    procs = [process_video(processor, *load_video(p, **decode_opts(opts)), **size_opts(opts)) for p in paths]
    if len(procs) == 1:
        return procs[0]
    # timestamps (Qwen3-VL) stay one tensor per video: each video's text is written from its own
    return {k: [p[k] for p in procs] if k == "timestamps" else torch.cat([p[k] for p in procs]) for k in procs[0]}


def video_text(processor, video_grid_thw, timestamps=None):
    """What the processor puts in place of the prompt's one <|video_pad|>: t*h*w/merge^2 <|video_pad|> tokens, or for
    a processor that writes timestamps (Qwen3-VL) "<t seconds><|vision_start|>" + h*w/merge^2 pads + "<|vision_end|>"
    per frame group (transformers 5.x keeps the prompt's outer <|vision_start|>/<|vision_end|> around it, and so does
    vLLM with a 5.x processor). timestamps: (t,) seconds, process_video's / the cache's."""
    import torch
    merge = processor.video_processor.merge_size
    t, h, w = (int(x) for x in torch.as_tensor(video_grid_thw).reshape(-1, 3)[0])
    if not writes_timestamps(processor):
        return "<|video_pad|>" * (t * h * w // merge ** 2)
    if timestamps is None or len(timestamps) != t:
        raise ValueError(f"{type(processor).__name__} writes a timestamp per frame group: expected {t} timestamps for "
                         f"grid {[t, h, w]}, got {None if timestamps is None else len(timestamps)} (pass the "
                         "video's `timestamps` from process_video or the embedding cache)")
    pads = "<|video_pad|>" * (h * w // merge ** 2)
    return "".join(f"<{float(x):.1f} seconds><|vision_start|>{pads}<|vision_end|>" for x in timestamps)


def no_video():
    """The video part of a sample without a video (a text-only record): zero grid rows, zero embeddings. Every
    consumer (encode_text, mrsp's positions, forwards and rollout engines) treats it as "nothing to fill"."""
    import torch
    return dict(embeds=torch.zeros(0, 0), video_grid_thw=torch.zeros(0, 3, dtype=torch.long),
                second_per_grid_ts=torch.zeros(0))


def image_key(path, processor):
    """A stable string naming an image as the vision tower sees it: its path and every image-processor setting that
    changes its pixels' size (min / max pixels, patch, merge, temporal patch). For embedding caches (add the vision
    weights' version yourself); images take the processor's own sizes, never the stage's video flags."""
    ip = processor.image_processor
    size = {k: v for k, v in dict(ip.size).items() if v is not None}
    parts = [os.path.abspath(os.fspath(path))] + [f"{k}={size[k]}" for k in sorted(size)]
    parts += [f"{k}={getattr(ip, k, None)}" for k in ("min_pixels", "max_pixels", "patch_size", "merge_size",
                                                         "temporal_patch_size")]
    return "image|" + "|".join(parts)


def image_inputs(processor, record):
    """A record's images through the processor's image path -> dict(pixel_values (N_patches, C*2*14*14),
    image_grid_thw (n_images, 3)), the images in the record's order at the processor's own sizes (its min_pixels /
    max_pixels). VideoError naming the file, the record, its line and field for an unreadable image."""
    from PIL import Image
    imgs = []
    for p in record["images"]:
        try:
            with Image.open(p) as im:
                imgs.append(im.convert("RGB"))
        except (OSError, ValueError) as e:   # missing, truncated or not an image
            raise VideoError(f"{p}: cannot read image of record {record.get('id')!r} ({record.get('where', '?')}, "
                             f"field 'images'): {e}") from None
    out = processor.image_processor(images=imgs, return_tensors="pt")
    return dict(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])


def _expand(prompt, pad, texts, rid):
    """Each <|..._pad|> placeholder of the chat text replaced by its item's text (its pads, video_text), in order."""
    parts = prompt.split(pad)
    if len(parts) - 1 != len(texts):
        raise ValueError(f"record {rid!r}: the prompt holds {len(parts) - 1} {pad} but {len(texts)} grid row(s) "
                         f"were given")
    return parts[0] + "".join(t + rest for t, rest in zip(texts, parts[1:]))


def encode_text(processor, record, video_grid_thw, with_target=True, max_length=None, truncate=False,
                image_grid_thw=None, timestamps=None):
    """Token ids for one sample given only its grids (no pixels: this is how cached video embeddings are reused):
    the chat prompt with each <|image_pad|> / <|video_pad|> expanded to t*h*w/merge^2 tokens (grid rows in the
    record's order; video_grid_thw None or zero rows for a record without a video; video_text: with Qwen3-VL's
    "<t seconds>" text per frame group, from `timestamps`: (t,) for one video, a list of them for several), then
    (optionally) the target + <|im_end|>. Returns input_ids (S,), labels (S,) (-100 outside the target),
    mm_token_type_ids (S,) (0 text, 1 image, 2 video), prompt_len, truncated.

    Over-long samples: SampleTooLongError unless truncate=True, which cuts the *target* only
    (the prompt holds the video tokens, which cannot be cut without breaking the model input)."""
    import torch
    tok = processor.tokenizer

    def rows(grid):
        return [] if grid is None else list(torch.as_tensor(grid).reshape(-1, 3))
    vrows, irows = rows(video_grid_thw), rows(image_grid_thw)
    merge_v, merge_i = processor.video_processor.merge_size, processor.image_processor.merge_size
    n_videos = [int(g.prod()) // merge_v ** 2 for g in vrows]
    n_images = [int(g.prod()) // merge_i ** 2 for g in irows]
    stamps = [None] * len(vrows) if timestamps is None else [timestamps] if len(vrows) == 1 else list(timestamps)
    if len(stamps) != len(vrows):
        raise ValueError(f"record {record['id']!r}: {len(vrows)} videos but timestamps for {len(stamps)}")
    prompt = _expand(build_prompt(processor, record), "<|image_pad|>", ["<|image_pad|>" * c for c in n_images],
                     record["id"])
    prompt = _expand(prompt, "<|video_pad|>", [video_text(processor, g, ts) for g, ts in zip(vrows, stamps)],
                     record["id"])
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
    video_id, image_id = tok.convert_tokens_to_ids("<|video_pad|>"), tok.convert_tokens_to_ids("<|image_pad|>")
    # the text itself (question, reasoning) must not hold a pad token: it would be taken for a vision slot
    assert int((ids == video_id).sum()) == sum(n_videos), "the prompt text must hold exactly its videos' tokens"
    assert int((ids == image_id).sum()) == sum(n_images), "the prompt text must hold exactly its images' tokens"
    mm = (ids == video_id).long() * 2 + (ids == image_id).long()
    return dict(input_ids=ids, labels=labels, mm_token_type_ids=mm, prompt_len=prompt_len, truncated=truncated,
                id=record["id"], answer=record["answer"])


def encode_sample(processor, record, frames, info, with_target=True, max_length=None, truncate=False, **sizing):
    """One training/eval sample from decoded frames: process_video (with the sizing options) + encode_text."""
    vid = process_video(processor, frames, info, **sizing)
    return dict(encode_text(processor, record, vid["video_grid_thw"], with_target, max_length, truncate,
                            timestamps=vid.get("timestamps")), **vid)


def _pad(seqs, value, left=False):
    n = max(s.numel() for s in seqs)
    out = seqs[0].new_full((len(seqs), n), value)
    for i, s in enumerate(seqs):
        if left:
            out[i, n - s.numel():] = s
        else:
            out[i, :s.numel()] = s
    return out


VISION_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "pixel_values", "image_grid_thw")


def _collate(samples, pad_id, left):
    import torch
    ids = [s["input_ids"] for s in samples]
    batch = dict(
        input_ids=_pad(ids, pad_id, left),                                  # (B, S)
        attention_mask=_pad([torch.ones_like(i) for i in ids], 0, left),   # (B, S)
        mm_token_type_ids=_pad([s["mm_token_type_ids"] for s in samples], 0, left),
        ids=[s["id"] for s in samples], answers=[s["answer"] for s in samples],
    )
    # vision inputs, concatenated in sample order: pixel_values_videos (sum N, C), video_grid_thw (n_videos, 3),
    # second_per_grid_ts (n_videos,), pixel_values / image_grid_thw for images; a kind no sample has is left out
    # (a text-only batch has none: the HF forward then runs on text alone)
    for k in VISION_KEYS:
        parts = [s[k] for s in samples if k in s and s[k] is not None and s[k].numel()]
        if parts:
            batch[k] = torch.cat(parts)
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
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", *VISION_KEYS, "labels")
    return {k: batch[k].to(device) for k in keys if k in batch}
