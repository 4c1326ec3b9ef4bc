"""Does GRPO lift the SFT model? A controlled measurement: rl.py from one SFT checkpoint, several seeds, against the
SFT checkpoint itself on held-out questions, with sampled answers at the rollout temperature.

    python bench/rl_lift.py --model=out/sft/hf --data=data/synth           # 3 seeds x 20 steps (~15 min, 2 cores)
    python bench/rl_lift.py --model=out/sft/hf --data=data/synth --seeds=0 --steps=2 --prompts_per_step=4 --samples=2
    python bench/rl_lift.py ... --rl_args="--lr=1e-3"                      # any other rl.py flags

What it does: for each seed, `python rl.py --model=MODEL --seed=S ...` (single process: SP=2 gives the same losses,
tests/test_rl.py), then `python eval.py --temperature=T --samples=N` on the held-out split(s) (--splits, default
val) for the SFT checkpoint (once) and for each RL export. Per seed it prints the held-out accuracy and mean reward
(rl.reward_fn: 0.9 accuracy + 0.1 format, the training reward) as avg@N, their change against SFT with a 95%
paired bootstrap interval over the questions (the same questions and per-question sampling seeds on both sides), and
the training reward of the first and last quarter of the steps. Then the mean and spread over seeds, and the pooled
change (each question's change averaged over the seeds, bootstrapped over questions: the recipe's expected lift).
Rows go to {out}/results.json.

Why sampled and paired: greedy accuracy on a few dozen questions moves by +-8 points from noise alone, and the
RL objective is the expected reward at the rollout temperature; avg@N over the same questions before and after,
compared question by question, resolves changes of ~2 points.
"""
import json
import os
import random
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")   # the rl.py / eval.py subprocesses inherit it: one thread each

from common import apply_overrides, config_of  # noqa: E402
from rl import reward_fn  # noqa: E402

# -----------------------------------------------------------------------------
model = "out/sft/hf"          # the SFT export RL starts from
data = "data/synth"           # folder with train.jsonl and the held-out split files (val.jsonl, test.jsonl)
out = "out/rl_lift"
seeds = "0,1,2"               # RL seeds (prompt order and rollout sampling)
steps = 20
prompts_per_step = 32         # large batches: 8 prompts a step did not beat the noise (docs/BENCHMARKS.md)
group_size = 8
lr = 3e-4
frames = 16
max_new_tokens = 80
temperature = 1.0             # rollouts and the held-out samples
samples = 8                   # held-out answers per question (avg@N)
splits = "val"                # held-out splits under --data, comma-separated: "val,test" doubles the questions
rl_args = ""                  # extra rl.py flags, e.g. "--kl_coef=0.01 --agg=seq-mean-token-sum-norm"
apply_overrides(globals(), sys.argv[1:])
cfg = config_of(globals())
# -----------------------------------------------------------------------------


def run(args, log):
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"rl_lift: `{' '.join(args[:2])} ...` failed (exit {r.returncode}); see {log}")


def heldout(model_dir, name):
    """eval.py avg@samples on each held-out split -> {question id: (mean accuracy, mean reward)}."""
    per = {}
    for split in splits.split(","):
        d = os.path.join(out, f"eval_{name}" + ("" if split == "val" else f"_{split}"))
        run(["eval.py", f"--model={model_dir}", f"--data={os.path.join(data, split + '.jsonl')}", f"--frames={frames}",
             f"--temperature={temperature}", f"--samples={samples}", f"--max_new_tokens={max_new_tokens}",
             f"--out_dir={d}"], d + ".log")
        for line in open(os.path.join(d, f"frames_{frames}", "items.jsonl")):
            r = json.loads(line)
            rew = reward_fn(r["prediction"], r["answer"])["total"]
            per.setdefault((split, r["id"]), []).append((float(r["correct"]), rew))
    return {k: (statistics.mean(a for a, _ in v), statistics.mean(w for _, w in v)) for k, v in per.items()}


def paired(base, news, k):
    """Mean change of component k over the questions (each question's change averaged over the runs in news), with a
    95% bootstrap interval over questions (seeded). Several RL seeds: the recipe's expected lift."""
    ids = sorted(base)
    diff = [statistics.mean(new[i][k] for new in news) - base[i][k] for i in ids]
    rng = random.Random(0)
    boot = sorted(statistics.mean(rng.choice(diff) for _ in ids) for _ in range(4000))
    return statistics.mean(diff), boot[99], boot[3899]


def fmt(m, lo, hi, pts=True):
    return f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] pts" if pts else f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"


if __name__ == "__main__":
    os.makedirs(out, exist_ok=True)
    print("config:", json.dumps(cfg))
    base = heldout(model, "sft")
    b_acc, b_rew = (statistics.mean(v[k] for v in base.values()) for k in (0, 1))
    print(f"SFT {model}: held-out accuracy {100 * b_acc:.1f}%, reward {b_rew:.3f} (avg@{samples}, T={temperature}, "
          f"{len(base)} questions)")
    rows, news = [], []
    for s in [int(x) for x in str(seeds).split(",")]:
        rdir = os.path.join(out, f"rl_seed{s}")
        run(["rl.py", f"--model={model}", f"--data={os.path.join(data, 'train.jsonl')}", "--val_data=",
             f"--out_dir={rdir}", "--sp=1", f"--frames={frames}", f"--steps={steps}",
             f"--prompts_per_step={prompts_per_step}", f"--group_size={group_size}", f"--lr={lr}", "--kl_coef=0",
             f"--max_new_tokens={max_new_tokens}", f"--temperature={temperature}", f"--save_every={steps}",
             f"--seed={s}", *rl_args.split()], rdir + ".log")
        train = [json.loads(l)["reward_mean"] for l in open(os.path.join(rdir, "metrics.jsonl"))]
        q = max(1, len(train) // 4)
        news.append(heldout(os.path.join(rdir, "hf"), f"rl_seed{s}"))
        acc, rew = paired(base, news[-1:], 0), paired(base, news[-1:], 1)
        rows.append(dict(seed=s, acc=acc, reward=rew, train_first=statistics.mean(train[:q]),
                         train_last=statistics.mean(train[-q:])))
        print(f"seed {s}: held-out accuracy {fmt(*acc)}, reward {fmt(*rew, pts=False)}; training reward "
              f"{rows[-1]['train_first']:.3f} (first {q} steps) -> {rows[-1]['train_last']:.3f} (last {q})",
              flush=True)
    d_acc = [r["acc"][0] for r in rows]
    d_rew = [r["reward"][0] for r in rows]
    sd = (lambda x: statistics.stdev(x) if len(x) > 1 else 0.0)
    print(f"over {len(rows)} seed(s): held-out accuracy change {100 * statistics.mean(d_acc):+.1f} pts "
          f"(sd {100 * sd(d_acc):.1f}; min {100 * min(d_acc):+.1f}, max {100 * max(d_acc):+.1f}), reward change "
          f"{statistics.mean(d_rew):+.3f} (sd {sd(d_rew):.3f})")
    pooled = dict(acc=paired(base, news, 0), reward=paired(base, news, 1))
    print(f"pooled over the seeds (per-question change averaged over the runs, bootstrap over questions): held-out "
          f"accuracy {fmt(*pooled['acc'])}, reward {fmt(*pooled['reward'], pts=False)}")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(config=cfg, sft=dict(acc=b_acc, reward=b_rew), runs=rows, pooled=pooled), f, indent=1)
