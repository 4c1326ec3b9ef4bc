"""Is the demo's outcome robust? The whole demo (demo.sh: SFT then GRPO, evals around each) over several seeds and
numeric variants that stand in for other machines, and one table of the runs with a pooled interval that includes
the seed-to-seed spread.

    python bench/demo_seeds.py                                  # seeds 0-4 x micro-batches 4/8, 2/4 (~10 x 11 min)
    python bench/demo_seeds.py --seeds=0,1 --micro_batches=4/8  # fewer runs
    python bench/demo_seeds.py --threads=1,2 --micro_batches=   # thread counts as the variant instead
    python bench/demo_seeds.py --report_only=1                  # the table from the runs already under --out
    python bench/demo_seeds.py --demo_args="--sft_steps=2000"   # any other demo.sh flags (the recipe under test)

A variant stands in for another machine by changing the order of the floating-point sums and nothing else: the SFT /
RL micro-batch sizes (--micro_batches: sequences per forward; the gradient of a step is summed in another order) and,
with --python=, another interpreter (a venv with another torch minor version: other kernels). Thread counts
(--threads, OMP_NUM_THREADS) are offered too, but at this model's sizes they change nothing: OMP 1 and OMP 2 gave
bit-identical losses over all 2500 SFT and 20 RL steps (docs/BENCHMARKS.md), the kernels split outputs, not sums,
over threads. Each run is `PYTHON demo.sh --seed=S --out=OUT/<variant>_s<S> --data=DATA ...` with the venv's bin
first on PATH (and the variant's --sft_args / --rl_args; --demo_args must not set those two). Runs whose
results exist are skipped (restartable). Per run the table shows SFT val accuracy at the last in-loop eval, greedy
test accuracy after SFT and after RL, RL's objective (held-out avg@8 at T=1) after SFT and after RL, and the paired
change with its 95% interval over the questions. Then the checks the demo is held to:

* SFT greedy test accuracy >= --sft_target (50%) in every run (chance is 25%);
* RL's sampled accuracy above SFT's in every run;
* the pooled change, bootstrap over runs and questions: each draw resamples the runs and one set of questions for all
  of them (the runs share the test set), so the interval carries the run-to-run spread and the question-to-question
  spread, which more runs do not shrink. Its lower end must clear zero.

Rows go to {out}/results.json; the table is what docs/BENCHMARKS.md records.
"""
import json
import os
import statistics
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import apply_overrides, config_of  # noqa: E402
from eval import load_scores  # noqa: E402

# -----------------------------------------------------------------------------
out = "out/demo_seeds"        # one folder per run: {variant}_s{seed}
data = "data/synth"           # the synthetic set (demo.sh makes it once if missing; every run shares it)
seeds = "0,1,2,3,4"
threads = "1"                 # OMP_NUM_THREADS variants (no numeric effect here: see above)
micro_batches = "4/8,2/4"     # SFT/RL micro-batch variants (demo.sh's own is 4/8); "" = the demo's own only
python = ""                   # another venv's python (e.g. one with another torch minor): a further variant family
demo_args = ""                # extra demo.sh flags, the same for every run
sft_target = 0.5              # SFT greedy test accuracy every run must reach
report_only = False           # only print the table of the runs found under --out
n_boot = 4000
# -----------------------------------------------------------------------------


def variants():
    """-> [(name, env, demo flags)]: the thread counts x the micro-batch sizes, and each again with --python's venv."""
    here = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]   # demo.sh runs `python`: this venv's
    # OMP_WAIT_POLICY=PASSIVE with more than one thread: the demo's two processes of two spin-waiting OpenMP threads
    # on two cores starve each other (a sampled eval of 16 questions: 86 s, against 15 s passive or at one thread);
    # the wait policy changes no arithmetic (nor, measured here, does the thread count)
    vs = [(f"omp{t}", {"OMP_NUM_THREADS": str(t), "PATH": here, **({"OMP_WAIT_POLICY": "PASSIVE"} if int(t) > 1 else {})})
          for t in str(threads).split(",") if t]
    mbs = [m.split("/") for m in str(micro_batches).split(",") if m]
    if any(len(m) != 2 or not all(x.isdigit() and int(x) > 0 for x in m) for m in mbs):
        raise SystemExit(f"--micro_batches={micro_batches}: expected SFT/RL pairs of positive integers, e.g. 4/8,2/4")
    # the demo's own 4/8 keeps the plain name (so earlier runs' folders still count); others are named by their sizes
    own = ["4", "8"]
    vs = [(n, e, []) if m == own else
          (f"{n}_mb{m[0]}-{m[1]}", e, [f"--sft_args=--micro_batch={m[0]}", f"--rl_args=--micro_batch={m[1]}"])
          for n, e in vs for m in (mbs or [own])]
    if python:
        bin_dir = os.path.dirname(os.path.abspath(python))
        ver = subprocess.run([python, "-c", "import torch; print(torch.__version__.split('+')[0])"],
                             capture_output=True, text=True, check=True).stdout.strip()
        vs += [(f"{n}_torch{ver}", dict(e, PATH=bin_dir + os.pathsep + os.environ["PATH"]), a) for n, e, a in list(vs)]
    return vs


def run_demo(run_dir, seed, env, args=()):
    log = run_dir + ".log"
    cmd = ["bash", "demo.sh", f"--seed={seed}", f"--out={run_dir}", f"--data={data}", *demo_args.split(), *args]
    print(f"running {' '.join(cmd)} ({' '.join(f'{k}=...' if k == 'PATH' else f'{k}={v}' for k, v in env.items())})"
          f" > {log}", flush=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
    if r.returncode:
        raise SystemExit(f"demo_seeds: the demo failed (exit {r.returncode}); see {log}")


def read_run(run_dir):
    """A finished demo folder -> its figures, or None when its last eval is missing."""
    ev = os.path.join(run_dir, "eval")
    names = ("sft", "rl", "sft_sampled", "rl_sampled")
    if not all(os.path.isfile(os.path.join(ev, n, "results.json")) for n in names):
        return None
    sc = {n: load_scores(os.path.join(ev, n)) for n in names}
    val = [json.loads(l) for l in open(os.path.join(run_dir, "sft", "metrics.jsonl")) if '"val_acc"' in l]
    mean = (lambda s: statistics.mean(v for _, v in s.values()))
    diff = {k: sc["rl_sampled"][k][1] - sc["sft_sampled"][k][1] for k in sc["sft_sampled"] if k in sc["rl_sampled"]}
    return dict(sft_val=val[-1]["val_acc"] if val else None, sft=mean(sc["sft"]), rl=mean(sc["rl"]),
                sft_sampled=mean(sc["sft_sampled"]), rl_sampled=mean(sc["rl_sampled"]), diff=diff,
                sft_cats={c: statistics.mean(v for cc, v in sc["sft"].values() if cc == c)
                          for c in sorted({c for c, _ in sc["sft"].values()})})


def boot_ci(diffs, rng, level=0.95):
    """Bootstrap of the mean change over runs AND questions -> (lo, hi). The runs share one test set, so each draw
    resamples the runs and ONE set of questions applied to every drawn run (a crossed design): the question-to-question
    spread does not shrink with more runs, as it would if each run's questions were resampled on their own."""
    keys = sorted(set.intersection(*(set(d) for d in diffs)))
    if not keys:
        raise SystemExit("demo_seeds: the runs share no test question (were they scored on different test sets?)")
    arr = np.asarray([[d[k] for k in keys] for d in diffs])                  # (runs, questions)
    means = np.empty(n_boot)
    for b in range(n_boot):
        runs_b = rng.integers(0, arr.shape[0], arr.shape[0])
        qs_b = rng.integers(0, arr.shape[1], arr.shape[1])
        means[b] = arr[np.ix_(runs_b, qs_b)].mean()
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def q_ci(d, rng, level=0.95):
    v = np.asarray(list(d.values()))
    m = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    return float(np.quantile(m, (1 - level) / 2)), float(np.quantile(m, (1 + level) / 2))


if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    cfg = config_of(globals())
    print("config:", json.dumps(cfg))
    os.makedirs(out, exist_ok=True)
    runs = [(f"{name}_s{s}", s, env, args) for name, env, args in variants()
            for s in [int(x) for x in str(seeds).split(",")]]
    if not report_only:
        for name, s, env, args in runs:
            if read_run(os.path.join(out, name)) is None:
                run_demo(os.path.join(out, name), s, env, args)
    rows = [(name, read_run(os.path.join(out, name))) for name, *_ in runs]
    rows = [(n, r) for n, r in rows if r is not None]
    if not rows:
        raise SystemExit(f"demo_seeds: no finished runs under {out}")
    rng = np.random.default_rng(0)
    pct = (lambda x: "-" if x is None else f"{100 * x:.1f}")
    print("\n| run | SFT val (last) | SFT test greedy | temporal / goal / spatial / plot | RL test greedy | "
          "avg@8 after SFT | avg@8 after RL | RL - SFT (avg@8, paired 95%) |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in rows:
        lo, hi = q_ci(r["diff"], rng)
        d = statistics.mean(r["diff"].values())
        cats = " / ".join(pct(r["sft_cats"].get(c)) for c in ("temporal", "goal", "spatial", "plot"))
        print(f"| {n} | {pct(r['sft_val'])} | {pct(r['sft'])} | {cats} | {pct(r['rl'])} | {pct(r['sft_sampled'])} | "
              f"{pct(r['rl_sampled'])} | {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    sft = [r["sft"] for _, r in rows]
    lifts = [statistics.mean(r["diff"].values()) for _, r in rows]
    lo, hi = boot_ci([r["diff"] for _, r in rows], rng)
    sd = (lambda x: statistics.stdev(x) if len(x) > 1 else 0.0)
    print(f"\n{len(rows)} run(s). SFT test accuracy: mean {100 * statistics.mean(sft):.1f}% (sd {100 * sd(sft):.1f}, "
          f"min {100 * min(sft):.1f}); RL's sampled lift: mean {100 * statistics.mean(lifts):+.1f} pts "
          f"(sd {100 * sd(lifts):.1f}, min {100 * min(lifts):+.1f}), pooled 95% interval over runs and questions "
          f"[{100 * lo:+.1f}, {100 * hi:+.1f}]")
    checks = [(f"SFT test >= {100 * sft_target:.0f}% in every run", all(x >= sft_target for x in sft)),
              ("RL's sampled accuracy above SFT's in every run", all(x > 0 for x in lifts)),
              ("pooled interval clear of zero", lo > 0)]
    for what, ok in checks:
        print(f"{'ok' if ok else 'NOT MET'}: {what}")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(config=cfg, runs=[dict(run=n, **{k: v for k, v in r.items() if k != "diff"},
                                              lift=statistics.mean(r["diff"].values())) for n, r in rows],
                       pooled=dict(lift=statistics.mean(lifts), lo=lo, hi=hi),
                       checks={w: ok for w, ok in checks}), f, indent=1)
