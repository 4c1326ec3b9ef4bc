"""What can the tiny model see? Two measurements behind the demo's fragile SFT (docs/BENCHMARKS.md, "Why SFT learning
is fragile"):

    python bench/probe_tiny.py --model=out/tiny --data=data/synth            # probes + RoPE resolution
    python bench/probe_tiny.py --model=out/tiny --probes=0                   # RoPE resolution only (no data)

1. Linear probes on the frozen, randomly initialised vision tower's output (the cached video embeddings: all the LLM
   gets of the pixels). Per video token (temporal patch t, spatial token q) the labels are the colour in that
   token's region in each of its 2 frames (nearest of black/red/green/blue/yellow/white), the token's quadrant q
   and its temporal patch t. A softmax regression (full batch, L2, LBFGS) is fit on train videos, scored on test
   videos. Colour survives the random tower; WHERE and WHEN a token is must come from the LLM's positions.
2. RoPE resolution of the LLM's multimodal positions (M-RoPE: the rotary frequencies split into t, h, w sections;
   the frequencies fall with the index, so w gets the lowest). For each axis with n positions (the demo: 8 temporal
   patches, 2 token rows, 2 token columns): min over position pairs i != j of max over the axis's frequencies of
   |2 sin((i - j) * step * w_f / 2)| -- how far apart the least distinguishable pair is rotated by the best
   frequency. 0 = some pair is invisible to position (too slow a frequency, or aliased), 2 = antipodal. Steps: a
   temporal patch is tokens_per_second * seconds per patch positions, a row/column 1.
"""
import json
import math
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import apply_overrides  # noqa: E402

model = "out/tiny"
data = "data/synth"
frames = 16
n_train = 160        # videos whose tokens train the probes
n_test = 64
probes = True

CLASSES = {"black": (0, 0, 0), "red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 70, 240),
           "yellow": (240, 220, 30), "white": (240, 240, 240)}
REF = np.array(list(CLASSES.values()), np.float32)


def rope_resolution(text_config, t_step, n=(8, 2, 2)):
    """-> {axis: min over pairs of positions of the largest |2 sin(d * step * w / 2)| over the axis's frequencies}."""
    rp = text_config.rope_parameters if hasattr(text_config, "rope_parameters") else text_config.rope_scaling
    theta, sec = float(rp["rope_theta"]), list(rp["mrope_section"])
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    inv = theta ** (-np.arange(0, head_dim, 2) / head_dim)           # (head_dim / 2,), falling
    assert sum(sec) == len(inv), (sec, head_dim)
    bounds = np.cumsum([0] + sec)
    steps = dict(t=t_step, h=1.0, w=1.0)
    res = {}
    for i, ax in enumerate("thw"):
        d = np.arange(1, n[i])[:, None] * steps[ax]                   # (pairs' distances, 1)
        f = inv[None, bounds[i]:bounds[i + 1]]                          # (1, the axis's frequencies)
        res[ax] = float(np.abs(2 * np.sin(d * f / 2)).max(1).min()) if f.size else 0.0
    return res, dict(rope_theta=theta, head_dim=head_dim, mrope_section=sec)


def token_data(net, proc, recs):
    from data import load_video
    from mrsp import get_video_embeds
    X, Y = [], []
    for r in recs:
        (v,), _ = get_video_embeds(net, proc, [r], None, num_frames=frames)
        t, h, w = [int(x) for x in v["video_grid_thw"][0]]
        h, w = h // 2, w // 2                                          # tokens after the 2x2 merge
        e = v["embeds"].float().numpy().reshape(t, h, w, -1)           # (t, h, w, D)
        fr, _ = load_video(r["video"], num_frames=frames)             # (T, H, W, 3) uint8, source size
        H, W = fr.shape[1:3]
        for ti in range(t):
            for yi in range(h):
                for xi in range(w):
                    labs = []
                    for k in range(2):                                 # the centre of the region in both frames
                        y0, y1, x0, x1 = yi * H // h, (yi + 1) * H // h, xi * W // w, (xi + 1) * W // w
                        reg = fr[2 * ti + k, y0:y1, x0:x1].astype(np.float32)
                        c = reg[(y1 - y0) // 4:3 * (y1 - y0) // 4, (x1 - x0) // 4:3 * (x1 - x0) // 4]
                        labs.append(int(np.argmin(((REF - c.reshape(-1, 3).mean(0)) ** 2).sum(1))))
                    X.append(e[ti, yi, xi])
                    Y.append(labs + [yi * w + xi, ti])
    return np.array(X), np.array(Y)


def probe(Xtr, ytr, Xte, yte, l2=1e-3, iters=300):
    """Softmax regression on standardised features -> test accuracy."""
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    A, B = torch.tensor((Xtr - mu) / sd), torch.tensor((Xte - mu) / sd)
    K = int(max(ytr.max(), yte.max())) + 1
    W = torch.zeros(A.shape[1], K, dtype=A.dtype, requires_grad=True)
    b = torch.zeros(K, dtype=A.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=iters, line_search_fn="strong_wolfe")
    yt = torch.tensor(ytr)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(A @ W + b, yt) + l2 * (W ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float(((B @ W + b).argmax(1).numpy() == yte).mean())


if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model)
    text = cfg.text_config if hasattr(cfg, "text_config") else cfg
    # the demo's videos: 16 of 256 frames at 8 fps -> 2 frames per temporal patch = 4 s; tokens_per_second 2
    tps = cfg.vision_config.tokens_per_second
    res, geom = rope_resolution(text, t_step=tps * 4.0)
    out = dict(model=model, **geom, rope_resolution=res)
    if probes:
        from data import load_records
        from mrsp import load_model
        torch.manual_seed(0)
        net, proc = load_model(model)
        net.eval()
        with torch.no_grad():
            Xtr, Ytr = token_data(net, proc, load_records(os.path.join(data, "train.jsonl"))[:n_train])
            Xte, Yte = token_data(net, proc, load_records(os.path.join(data, "test.jsonl"))[:n_test])
        out.update(tokens_train=len(Xtr), tokens_test=len(Xte))
        for k, name, chance in ((0, "colour, first frame", 1 / 6), (1, "colour, second frame", 1 / 6),
                                (2, "quadrant", 1 / 4), (3, "temporal patch", 1 / 8)):
            acc = probe(Xtr, Ytr[:, k], Xte, Yte[:, k])
            out[f"probe {name}"] = f"{100 * acc:.1f}% (chance {100 * chance:.1f}%, majority " \
                                   f"{100 * max((Yte[:, k] == c).mean() for c in np.unique(Yte[:, k])):.1f}%)"
    print(json.dumps(out, indent=1))
