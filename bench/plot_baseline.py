"""Tables and a figure from bench/bench_baseline.py's results (results_p1.json, results_p2.json): speed-up over the
faithful baseline against frames (with the paper's points) and against the decode share, plus the markdown tables
for docs/BENCHMARKS.md.

    python bench/plot_baseline.py --inputs=out/bench_baseline/results_p1.json,out/bench_baseline_p2/results_p2.json \
        --png=docs/baseline_speedup.png
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import apply_overrides  # noqa: E402

inputs = "out/bench_baseline/results_p1.json,out/bench_baseline_p2/results_p2.json"
png = "docs/baseline_speedup.png"
# the paper's stage-1 table (Qwen2.5-VL-7B, 8 GPUs): frames -> (baseline s, stage 1 s) per step
PAPER = {8: (119, 30), 128: (201, 65), 256: (320, 110), 512: (439, 205)}


def load():
    """Rows of every input, each tagged with its video (file name without .mp4, the reader where the run named one,
    the model's frame size where not 56, the generation budget where not 32 and the seed where not 0: the plot's
    series are per video, reader, size, budget, seed and process count)."""
    rows = []
    for p in inputs.split(","):
        if os.path.isfile(p):
            with open(p) as f:
                res = json.load(f)
            cfg = res.get("config", {})
            video = os.path.splitext(os.path.basename(res.get("video", "")))[0] or "video"
            backend = cfg.get("decode_backend")
            video += f" {backend}" if backend else ""        # a non-default reader is its own series
            size = cfg.get("frame_size", 56)
            video += f" seen at {size}px" if size != 56 else ""   # so is a non-default model input size
            new = cfg.get("max_new_tokens", 32)
            video += f", {new} new tokens" if new != 32 else ""   # and a generation budget other than 32
            seed = cfg.get("seed", 0)
            video += f", seed {seed}" if seed else ""              # and a repeat with another seed
            rows += [dict(r, video=video) for r in res["rows"]]
    return rows


def _split(s):
    """' (prefill / decode)' of the HF engine's rollout, where the run recorded it (rl.py's t_rollout_prefill /
    t_rollout_decode; results from before they existed show the total only)."""
    if not s.get("t_rollout_prefill") and not s.get("t_rollout_decode"):
        return ""
    return f" ({s['t_rollout_prefill']:.2f} / {s['t_rollout_decode']:.2f})"


def _spread(s):
    """'n: min-max' of the timed steps' wall time (results from before bench_baseline recorded it: '-')."""
    return f"{s['timed_steps']}: {s['step_min']:.2f}-{s['step_max']:.2f}" if "step_min" in s else "-"


def _paired(b, s):
    """' [min-max]' of the per-step wall speed-ups baseline step k / arm step k (step k of every arm runs the same
    prompts and tokens), where the run recorded its step times and timed more than one step."""
    if len(b.get("step_times", [])) < 2 or len(b["step_times"]) != len(s.get("step_times", [])) or b is s:
        return ""
    r = [x / y for x, y in zip(b["step_times"], s["step_times"])]
    return f" [{min(r):.2f}-{max(r):.2f}]"


def tables(rows):
    out = []
    hdr = ("| video | procs | frames | arm | s/step wall / CPU | speed-up wall / CPU [per step] | decode s wall / CPU | "
           "pre-process s | vision (collect) s | rollout s (prefill / decode) | actor prep s | old s | ref s | "
           "update s | decodes | processor runs | vision passes | rollout prefills | peak GB/rank | same tokens | "
           "timed steps: wall min-max s |")
    # phases: rank 0's wall s (pre-process: the processor incl. the resize; actor prep: the baseline's per-sequence
    # decode + pre-process, also inside the decode / pre-process columns; old / ref / update include their vision
    # passes); counts per step, rank 0 (each DP rank decodes its own prompts); CPU s/step: all ranks
    out += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    rows = sorted(rows, key=lambda r: (r["video"], r["nproc"], r["frames"]))
    for r in rows:
        b = r["arms"].get("baseline")
        for a in ("baseline", "compute-only", "stage1", "stage1+2"):
            if a not in r["arms"]:
                continue
            s = r["arms"][a]
            if not s:
                out.append(f"| {r['video']} | {r['nproc']} | {r['frames']} | {a} | failed |")
                continue
            up = (f"{b['step_time'] / s['step_time']:.2f} / {b['cpu_s'] / s['cpu_s']:.2f}{_paired(b, s)}" if b else "-")
            out.append(
                f"| {r['video']} | {r['nproc']} | {r['frames']} | {a} | {s['step_time']:.2f} / {s['cpu_s']:.2f} | "
                f"{up} | {s['decode_s_step']:.2f} / {s['decode_cpu_s_step']:.2f} | {s['process_s_step']:.2f} | "
                f"{s['t_vision_collect']:.2f} | {s['t_rollout']:.2f}{_split(s)} | {s['t_actor_prep']:.2f} | "
                f"{s['t_old']:.2f} | {s['t_ref']:.2f} | {s['t_train']:.2f} | {s['decodes_step']:.0f} | "
                f"{s['processor_runs_step']:.0f} | {s['vision_passes']:.0f} | {s['rollout_prefills']:.0f} | "
                f"{s['peak_gb']:.2f} | {r['same_tokens']} | {_spread(s)} |")
    return "\n".join(out)


def plot(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 6))
    series = sorted({(r["video"], r["nproc"]) for r in rows})
    for k, (video, nproc) in enumerate(series):
        mk, alpha = "osD^v<>"[k % 7], 1 if nproc == 1 else 0.6
        rs = sorted([r for r in rows if (r["video"], r["nproc"]) == (video, nproc) and r["arms"].get("baseline")],
                    key=lambda r: r["frames"])
        for arm, c in (("stage1", "C0"), ("stage1+2", "C1"), ("compute-only", "C2")):
            pts = [(r["frames"], r["arms"]["baseline"]["cpu_s"] / r["arms"][arm]["cpu_s"],
                    # decode CPU is rank 0's (each DP rank decodes its own prompts); step CPU is all ranks'
                    r["arms"]["baseline"]["decode_cpu_s_step"] * r["nproc"] / r["arms"]["stage1"]["cpu_s"])
                   for r in rs if r["arms"].get(arm) and r["arms"].get("stage1")]
            if not pts:
                continue
            lab = f"baseline / {arm}, {video}, {nproc} proc"
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], mk + "-", color=c, label=lab, alpha=alpha)
            ax2.plot([p[2] for p in pts], [p[1] for p in pts], mk, color=c, label=lab, alpha=alpha)
    ax1.plot(list(PAPER), [b / s for b, s in PAPER.values()], "k*--", ms=10, label="paper, stage 1 (7B, 8 GPUs)")
    ax1.axhline(2.1, color="gray", lw=0.8, ls=":")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("frames")
    ax1.set_ylabel("speed-up over the EasyR1-style baseline (CPU s/step)")
    ax1.set_title("speed-up vs frames")
    ax2.set_xlabel("decode share = baseline decode CPU s / stage-1 step CPU s")
    ax2.set_ylabel("speed-up (CPU s/step)")
    ax2.set_title("speed-up vs decode share (the ratio that transfers)")
    ax2.axhline(2.1, color="gray", lw=0.8, ls=":")
    # the paper does not give its decode share, so its speed-ups are levels here: where a level meets a measured
    # curve is the decode share that curve needs to reach the paper's figure
    for F, (b, s) in PAPER.items():
        ax2.axhline(b / s, color="k", lw=0.6, ls="--", alpha=0.5)
        ax2.annotate(f"paper, {F} frames", (1, b / s), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                     fontsize=7, alpha=0.7)
    # one legend for both panels (same colours and markers), below them: the paper's low points stay visible
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7)
    fig.tight_layout(rect=(0, 0.03 + 0.022 * ((len(labels) + 1) // 2), 1, 1))   # room for the legend's rows
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    fig.savefig(png + ".tmp.png", dpi=110)
    os.replace(png + ".tmp.png", png)
    plt.close(fig)


if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    rows = load()
    print(tables(rows))
    plot(rows)
    print(f"wrote {png}")
