"""Do rl.py's RL options (issue #20) train? The same short run once per option from one checkpoint, the reward curves
side by side, and a table of mean training reward over the first and last 3 steps.

    python bench/rl_options.py --model=out/sft/hf --data=data/synth                  # 7 options x 10 steps
    python bench/rl_options.py --model=out/sft/hf --data=data/synth --only=grpo,gspo --steps=4
    python bench/rl_options.py ... --rl_args="--kl_coef=0"                         # any other rl.py flags, for all

Each option is `python rl.py --model=MODEL --data=DATA/train.jsonl --val_data= <common flags> <the option's flags>`
in its own out_dir under --out (single process; the same seed, so step 1 draws the same prompts and, from the same
weights, the same rollouts for every option: the curves share their first point and part from step 2). Writes
{out}/results.json, {out}/reward_curves.png (all options; per option rl_<name>/reward_curve.png by
eval.plot_reward_curve) and, with --doc=PATH, a markdown section: the command, the table, the per-step rewards
(between the file's "bench/rl_options.py: begin / end" markers when it has them, else the whole file).

What it can and cannot show: that every option runs end to end and moves the policy. With a tiny model, a few
prompts a step and ~10 steps the reward curves are noisy (16 sampled answers a step: the standard error of a step's
mean reward is ~0.1); differences between options here are not evidence that one trains better than another
(bench/rl_lift.py measures a lift with confidence intervals).
"""
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")   # the rl.py subprocesses inherit it: one thread each

from common import apply_overrides, config_of  # noqa: E402

# -----------------------------------------------------------------------------
model = "out/sft/hf"          # the checkpoint every option starts from (an SFT export: rewards with some spread)
data = "data/synth"           # folder with train.jsonl
out = "out/rl_options"
steps = 10
prompts_per_step = 4
group_size = 4
max_new_tokens = 64
frames = 16
lr = 1e-3
seed = 0
only = ""                     # comma-separated option names to run (default: all of OPTIONS)
rl_args = ""                  # extra rl.py flags for every run
doc = ""                      # write the markdown results here (e.g. docs/rl_options_results.md)
machine = "2-core CPU"        # for the doc
date = ""                     # for the doc (default: today)
apply_overrides(globals(), sys.argv[1:])
cfg = config_of(globals())
# -----------------------------------------------------------------------------

# name -> rl.py flags on top of the common ones (defaults: GRPO, token-mean, dual clip 3, k3 KL 1e-2 in the loss)
OPTIONS = {
    "grpo": "",
    "dr_grpo": "--adv_estimator=dr_grpo --agg=seq-mean-token-sum-norm",
    "rloo": "--adv_estimator=rloo",
    "reinforce_plus_plus": "--adv_estimator=reinforce_plus_plus",
    "gspo": "--policy_loss=gspo",
    "dual_clip_tis": "--clip_ratio_c=3 --tis_cap=2 --ppo_epochs=2",
    "kl_in_reward_low_var": "--kl_in_reward=1 --kl_type=low_var_kl --kl_coef=0.05",
}
WINDOW = 3


def common_flags():
    return [f"--model={model}", f"--data={os.path.join(data, 'train.jsonl')}", "--val_data=", f"--steps={steps}",
            f"--prompts_per_step={prompts_per_step}", f"--group_size={group_size}",
            f"--max_new_tokens={max_new_tokens}", f"--frames={frames}", f"--lr={lr}", f"--seed={seed}",
            f"--save_every={steps}", "--keep_checkpoints=1", *shlex.split(rl_args)]


def run_option(name, flags):
    d = os.path.join(out, f"rl_{name}")
    os.makedirs(d, exist_ok=True)
    args = ["rl.py", *common_flags(), f"--out_dir={d}", *shlex.split(flags)]
    t0 = time.time()
    with open(os.path.join(d, "log.txt"), "w") as f:
        r = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"rl_options: {name} failed (exit {r.returncode}); see {d}/log.txt")
    rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if line.strip()]
    rew = [x["reward_mean"] for x in rows]
    res = dict(name=name, flags=flags, seconds=time.time() - t0, reward=rew,
               first=sum(rew[:WINDOW]) / len(rew[:WINDOW]), last=sum(rew[-WINDOW:]) / len(rew[-WINDOW:]),
               accuracy_last=sum(x["accuracy"] for x in rows[-WINDOW:]) / len(rows[-WINDOW:]),
               format_last=sum(x["format_rate"] for x in rows[-WINDOW:]) / len(rows[-WINDOW:]),
               kl_last=rows[-1]["kl"], clip_frac_mean=sum(x["clip_frac"] for x in rows) / len(rows),
               clip_frac_lower_mean=sum(x.get("clip_frac_lower", 0.0) for x in rows) / len(rows),
               tis_mismatch_max=max(x.get("tis_mismatch_max", 0.0) for x in rows),
               tis_trunc_frac=max(x.get("tis_trunc_frac", 0.0) for x in rows),
               grad_norm_mean=sum(x["grad_norm"] for x in rows) / len(rows))
    try:
        from eval import plot_reward_curve
        plot_reward_curve(os.path.join(d, "metrics.jsonl"), os.path.join(d, "reward_curve.png"), window=WINDOW)
    except Exception as e:  # noqa: BLE001  (a plot must not lose the run)
        print(f"rl_options: no per-option plot ({e})")
    print(f"{name}: reward first {WINDOW} steps {res['first']:.3f} -> last {WINDOW} {res['last']:.3f} "
          f"({res['seconds']:.0f} s)", flush=True)
    return res


def plot_all(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from eval import save_png
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(range(1, len(r["reward"]) + 1), r["reward"], "-o", ms=3, lw=1.2, label=r["name"])
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean training reward")
    ax.set_title(f"{prompts_per_step} prompts x G={group_size} a step (noisy: see the table)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, path)


def markdown(results, png):
    cmd = "python bench/rl_options.py " + " ".join(f"--{k}={v}" for k, v in cfg.items()
                                                    if k in ("model", "data", "steps", "doc") or
                                                    (k in ("only", "rl_args") and v))
    lines = [f"Command: `{cmd}` (each run: `python rl.py {' '.join(common_flags())} <flags>`). Machine: {machine}, "
             f"{date or time.strftime('%Y-%m-%d')}. Reward = 0.9 accuracy + 0.1 format, the mean over the step's "
             f"{prompts_per_step * group_size} sampled answers; first / last = mean over steps 1-{WINDOW} / "
             f"{max(1, steps - WINDOW + 1)}-{steps}.", "",
             "| option | flags | reward, first 3 steps | reward, last 3 steps | change | accuracy, last 3 | "
             "format, last 3 | KL (last) | grad norm | clip frac | dual-clip frac | TIS max mismatch | s |",
             "|---" * 13 + "|"]
    for r in results:
        lines.append(f"| {r['name']} | `{r['flags'] or '(defaults)'}` | {r['first']:.3f} | {r['last']:.3f} | "
                     f"{r['last'] - r['first']:+.3f} | {r['accuracy_last']:.3f} | {r['format_last']:.2f} | "
                     f"{r['kl_last']:.2g} | {r['grad_norm_mean']:.2f} | {r['clip_frac_mean']:.3f} | "
                     f"{r['clip_frac_lower_mean']:.4f} | {r['tis_mismatch_max']:.1e} | {r['seconds']:.0f} |")
    lines += ["", "Per-step mean reward:", "", "| option | " + " | ".join(str(i + 1) for i in range(steps)) + " |",
              "|---|" + "---|" * steps]
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(f"{x:.2f}" for x in r["reward"]) + " |")
    if png:
        lines += ["", f"Curves: `{png}` (not committed; rerun the command to draw it)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.makedirs(out, exist_ok=True)
    names = [n.strip() for n in only.split(",") if n.strip()] or list(OPTIONS)
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"--only: unknown option(s) {unknown}; known: {', '.join(OPTIONS)}")
    results = [run_option(n, OPTIONS[n]) for n in names]
    png = plot_all(results, os.path.join(out, "reward_curves.png"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(config=cfg, results=results), f, indent=1)
    md = markdown(results, png)
    print(md)
    if doc:   # between the markers when the file has them (the prose around stays), else the whole file
        begin, end = "<!-- bench/rl_options.py: begin -->\n", "<!-- bench/rl_options.py: end -->"
        text = open(doc).read() if os.path.exists(doc) else ""
        if begin in text and end in text:
            md = text[:text.index(begin) + len(begin)] + md + text[text.index(end):]
        with open(doc, "w") as f:
            f.write(md)
        print(f"wrote {doc}")
