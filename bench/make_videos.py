"""Deterministic, realistic test videos: minutes of H.264 that is NOT trivially compressible, made locally with PyAV.

    python bench/make_videos.py --out=out/videos/real_300s_360p.mp4 --seconds=300 --height=360 --width=640 \
        --fps=30 --gop=250 --seed=0

Why: the synthetic QA videos (prepare.py) are 112x112 flat-coloured shapes, which decode in no time and compress to
almost nothing. Real long videos cost real decoding work: every sampled frame needs its GOP decoded from the last
keyframe, and CABAC/B-frame streams at a realistic bitrate take real time per frame. This generator makes footage
with the statistics that matter for that: a panning "camera" over multi-scale textures (every pixel moves), textured
objects moving on their own paths, per-frame film grain (no two frames equal, even where nothing moves), a
brightness drift, and hard scene cuts every few seconds (new texture, palette, motion). Encoded with libx264 (CABAC,
B-frames: preset superfast by default), a keyframe every `gop` frames and no scene-cut keyframes (the GOP grid is
exactly what was asked), single-threaded: the same arguments give byte-identical files.

Speed (one core of a 2-core CPU, 2026-12-01, docs/BENCHMARKS.md): a 5-minute 640x360 30 fps video in 47 s of CPU
(28 MB, 750 kb/s); 1280x720 costs ~3 min of CPU per 5 minutes (4 Mb/s).
"""
import json
import os
import sys
import time
from fractions import Fraction

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import apply_overrides, config_of  # noqa: E402

GRAIN_BANK = 16          # precomputed grain frames, one drawn per frame (generating fresh noise costs ~3 ms/frame)


# -----------------------------------------------------------------------------
# content, drawn straight into yuv420p planes (the encoder's format: no per-frame colour conversion)
def _interp_matrix(n_out, n_in):
    """(n_out, n_in) linear-interpolation weights, corners aligned: x_up = M @ x."""
    pos = np.linspace(0, n_in - 1, n_out)
    i0 = np.minimum(pos.astype(np.int64), n_in - 2)
    f = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1 - f
    m[np.arange(n_out), i0 + 1] = f
    return m


def _texture(rng, H, W, octaves=(4, 8, 24, 64, 160)):
    """(H, W, 3) uint8 RGB multi-scale value noise in a random palette: coarse shapes down to fine detail, so that
    motion over it leaves the encoder real residuals to code (like foliage, fabric, crowds). Each octave is a small
    random grid upsampled bilinearly as two matrix products (fast: BLAS)."""
    acc = np.zeros((3, H, W), np.float32)
    for i, cells in enumerate(octaves):
        h, w = max(2, cells * H // max(H, W) + 1), max(2, cells * W // max(H, W) + 1)
        grid = rng.standard_normal((3, h, w)).astype(np.float32)
        acc += _interp_matrix(H, h) @ grid @ _interp_matrix(W, w).T * 0.75 ** i     # (3, H, W)
    acc = (acc - acc.mean((1, 2), keepdims=True)) / (acc.std((1, 2), keepdims=True) + 1e-6)
    mix = rng.standard_normal((3, 3)).astype(np.float32) * 0.5 + np.eye(3, dtype=np.float32)   # palette
    base = rng.uniform(60, 190, 3).astype(np.float32)
    rgb = base + 40.0 * np.einsum("chw,cd->hwd", acc, mix)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _to_yuv(rgb):
    """(H, W, 3) uint8 RGB (H, W even) -> Y (H, W), U, V (H/2, W/2) uint8: BT.601 limited range, chroma averaged
    over 2x2 blocks (what swscale does for rgb24 -> yuv420p)."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    half = lambda c: c.reshape(c.shape[0] // 2, 2, c.shape[1] // 2, 2).mean((1, 3))   # noqa: E731
    return [np.clip(np.rint(c), 0, 255).astype(np.uint8) for c in (y, half(u), half(v))]


class _Sprite:
    """A textured ellipse or rectangle moving on a straight path that bounces off the frame edges."""

    def __init__(self, rng, H, W):
        self.h, self.w = 2 * int(rng.integers(H // 16, H // 6)), 2 * int(rng.integers(W // 20, W // 8))   # even
        self.planes = _to_yuv(_texture(rng, self.h, self.w, octaves=(3, 12, 40)))
        yy, xx = np.mgrid[:self.h, :self.w]
        mask = ((yy - self.h / 2) / (self.h / 2)) ** 2 + ((xx - self.w / 2) / (self.w / 2)) ** 2 <= 1
        if rng.random() < 0.4:
            mask[:] = True                                               # a rectangle
        self.masks = [mask, mask[::2, ::2], mask[::2, ::2]]
        self.y, self.x = rng.uniform(0, H - self.h), rng.uniform(0, W - self.w)
        self.vy, self.vx = rng.uniform(-3, 3), rng.uniform(-5, 5)        # px per frame
        self.H, self.W = H, W

    def draw(self, planes):
        y, x = int(self.y) & ~1, int(self.x) & ~1                         # even: chroma stays aligned
        for p, (dst, src, m) in enumerate(zip(planes, self.planes, self.masks)):
            s = 1 if p == 0 else 2
            np.copyto(dst[y // s:y // s + src.shape[0], x // s:x // s + src.shape[1]], src, where=m)

    def step(self):
        self.y, self.vy = _bounce(self.y + self.vy, self.vy, self.H - self.h)
        self.x, self.vx = _bounce(self.x + self.vx, self.vx, self.W - self.w)


def _bounce(pos, vel, hi):
    """Position and velocity after reflecting off [0, hi]."""
    return (pos, vel) if 0 <= pos <= hi else (min(max(pos, 0), hi), -vel)


class _Scene:
    """One shot: a camera panning across a texture 1.5x the frame (bouncing at its borders), with moving sprites."""

    def __init__(self, rng, H, W):
        self.bg = _to_yuv(_texture(rng, 2 * (H * 3 // 4), 2 * (W * 3 // 4)))
        self.sprites = [_Sprite(rng, H, W) for _ in range(int(rng.integers(2, 6)))]
        self.lim_y, self.lim_x = self.bg[0].shape[0] - H, self.bg[0].shape[1] - W
        self.cy, self.cx = rng.uniform(0, self.lim_y), rng.uniform(0, self.lim_x)
        self.vy, self.vx = rng.uniform(-1.5, 1.5), rng.uniform(-3, 3)
        self.H, self.W = H, W

    def frame(self, planes):
        """Render the next frame into planes [Y (H, W), U, V (H/2, W/2)] uint8."""
        y, x = int(self.cy) & ~1, int(self.cx) & ~1
        for p, (dst, src) in enumerate(zip(planes, self.bg)):
            s = 1 if p == 0 else 2
            np.copyto(dst, src[y // s:y // s + dst.shape[0], x // s:x // s + dst.shape[1]])
        for sp in self.sprites:
            sp.draw(planes)
            sp.step()
        self.cy, self.vy = _bounce(self.cy + self.vy, self.vy, self.lim_y)
        self.cx, self.vx = _bounce(self.cx + self.vx, self.vx, self.lim_x)


def yuv_planes(buf, H, W):
    """Views of a yuv420p frame buffer (H * 3/2, W) -- PyAV's ndarray layout -- as [Y (H, W), U, V (H/2, W/2)]."""
    q = H // 4
    return [buf[:H], buf[H:H + q].reshape(H // 2, W // 2), buf[H + q:].reshape(H // 2, W // 2)]


def frames(seconds, height, width, fps, seed=0, grain=3, scene_seconds=(3.0, 12.0)):
    """Yield yuv420p frames, (height * 3/2, width) uint8 arrays (PyAV's layout: Y rows, then U, then V): seconds * fps
    of them, deterministic given the arguments. The same buffer is reused: copy a frame to keep it.
    grain: film-grain std in 8-bit levels (chroma gets half); scene_seconds: range of shot lengths."""
    rng = np.random.default_rng([seed, height, width])
    n = int(round(seconds * fps))
    amp = np.ones((height * 3 // 2, 1), np.float32)
    amp[height:] = 0.5
    bank = np.clip(rng.normal(0, grain, (GRAIN_BANK, height * 3 // 2, width)) * amp, -3 * grain, 3 * grain)
    bank = bank.astype(np.int16)
    buf = np.empty((height * 3 // 2, width), np.uint8)
    tmp = np.empty(buf.shape, np.int16)
    planes = yuv_planes(buf, height, width)
    scene, left = None, 0
    for i in range(n):
        if left <= 0:                                                    # hard cut: a new shot
            scene, left = _Scene(rng, height, width), int(rng.uniform(*scene_seconds) * fps)
        scene.frame(planes)
        np.add(buf, bank[rng.integers(GRAIN_BANK)], out=tmp, dtype=np.int16)
        tmp[:height] += int(round(8 * np.sin(2 * np.pi * i / (fps * 7.3))))   # slow exposure drift (luma)
        np.clip(tmp, 0, 255, out=tmp)
        left -= 1
        yield tmp.astype(np.uint8)


# -----------------------------------------------------------------------------
# encoding
def make_video(path, seconds=300.0, height=360, width=640, fps=30.0, gop=250, seed=0, crf=23, preset="superfast",
               grain=3):
    """Write a deterministic H.264 mp4 (yuv420p, keyframe exactly every `gop` frames, single-threaded x264: the same
    arguments give the same bytes). Written to a temp name and renamed: a failed run leaves no half-written file.
    -> dict(path, frames, seconds, height, width, fps, gop, bytes, kbps, gen_s, cpu_s) (wall / CPU seconds taken)."""
    import av
    for name, v, lo in (("seconds", seconds, 0), ("fps", fps, 0)):
        if not v > lo:
            raise ValueError(f"make_video: --{name}={v}: expected a number > {lo}")
    if height % 4 or width % 2 or height < 32 or width < 32:
        raise ValueError(f"make_video: --height={height} --width={width}: expected height a multiple of 4 and "
                         "width a multiple of 2, both >= 32 (yuv420p planes)")
    if not (isinstance(gop, int) and gop >= 1):
        raise ValueError(f"make_video: --gop={gop}: expected a positive integer (frames between keyframes)")
    if int(round(seconds * fps)) < 2:
        raise ValueError(f"make_video: --seconds={seconds} at --fps={fps} is under 2 frames")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    t0, c0, n = time.time(), time.process_time(), 0
    tmp = path + ".tmp.mp4"
    try:
        with av.open(tmp, "w") as out:
            st = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            st.width, st.height, st.pix_fmt = width, height, "yuv420p"
            # keyint = min-keyint and no scene-cut keyframes: the GOP is exactly `gop` frames, as asked
            st.options = {"crf": str(crf), "preset": preset, "threads": "1",
                          "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
            st.codec_context.thread_count = 1
            for f in frames(seconds, height, width, fps, seed, grain):
                for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="yuv420p")):
                    out.mux(pkt)
                n += 1
            for pkt in st.encode():
                out.mux(pkt)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    size = os.path.getsize(path)
    return dict(path=path, frames=n, seconds=n / fps, height=height, width=width, fps=fps, gop=gop, bytes=size,
                kbps=size * 8 / 1000 / (n / fps), gen_s=time.time() - t0, cpu_s=time.process_time() - c0)


def keyframe_interval(path):
    """Distinct gaps (in frames) between the keyframes of a video: {gop} for a file make_video wrote."""
    import av
    with av.open(path) as c:
        packets = [pkt for pkt in c.demux(c.streams.video[0]) if pkt.size > 0]   # decode order: one per frame
        keys = [i for i, pkt in enumerate(packets) if pkt.is_keyframe]
    return sorted({b - a for a, b in zip(keys, keys[1:])})


# -----------------------------------------------------------------------------
# CLI (--key=value)
out = "out/videos/real_300s_360p.mp4"   # output file
seconds = 300.0            # duration
height = 360               # frame size: height a multiple of 4, width even (720 x 1280 for 720p)
width = 640
fps = 30.0                 # frames per second (24-30 for real footage)
gop = 250                  # keyframe interval, frames
seed = 0
crf = 23                   # x264 quality (23: its default; lower = bigger files)
preset = "superfast"       # x264 preset: superfast keeps CABAC and B-frames (what real files have), fast to encode
grain = 3                  # film grain std, luma levels (chroma half; 0: none): every frame differs, as in real footage

if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    print("config:", json.dumps(config_of(globals())))
    info = make_video(out, seconds, height, width, fps, gop, seed, crf, preset, grain)
    print(f"wrote {info['path']}: {info['frames']} frames ({info['seconds']:.0f} s) {width}x{height} @ {fps:g} fps, "
          f"gop {gop}, {info['bytes'] / 1e6:.1f} MB ({info['kbps']:.0f} kb/s) in {info['gen_s']:.1f} s "
          f"({info['cpu_s']:.1f} s CPU)")
