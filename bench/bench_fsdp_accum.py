"""FSDP accumulation: parameters all-gathered / gradients reduce-scattered once per mini-batch (--keep_gathered=1,
mrsp.fsdp_gathered) vs once per sequence (--keep_gathered=0, plain FSDP2), side by side in one run.

    python bench/bench_fsdp_accum.py --model=out/sft/hf --data=data/synth                 # ~8 min on 2 CPU cores
    python bench/bench_fsdp_accum.py --model=out/sft/hf --data=data/synth --rl_steps=2 --sft_steps=20   # quicker

What runs (torchrun, --nproc processes): rl.py at SP=--nproc (one SP group: FSDP shards over it) for rl_steps steps of
prompts_per_step x group_size rollouts, and sft.py data-parallel for sft_steps steps, each with --keep_gathered=0 and
=1 in alternating order. RL trains on one sequence per micro-batch, so plain FSDP runs an all-gather before every
forward and backward and a reduce-scatter after every backward for each of its 2 * prompts * G / nproc sequences.
Printed: mean step time (step 1 of RL and the first 10 SFT steps are warm-up), the RL split prefill / train, the
speed-up, and whether both runs saw the same losses (same seed: the math is the same; fp32 summation order differs).
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import apply_overrides, config_of  # noqa: E402

# -----------------------------------------------------------------------------
model = "out/sft/hf"          # an HF checkpoint (the SFT export)
data = "data/synth"           # folder with train.jsonl
out = "out/bench_fsdp_accum"
nproc = 2
rl_steps = 3
prompts_per_step = 32
group_size = 8
frames = 16
max_new_tokens = 80
sft_steps = 100
apply_overrides(globals(), sys.argv[1:])
cfg = config_of(globals())
# -----------------------------------------------------------------------------


def run(script, tag, args):
    d = os.path.join(out, tag)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", script, f"--model={model}",
           f"--data={os.path.join(data, 'train.jsonl')}", "--val_data=", f"--out_dir={d}", f"--frames={frames}",
           "--save_every=100000", *args]
    with open(d + ".log", "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"bench_fsdp_accum: {script} ({tag}) failed (exit {r.returncode}); see {d}.log")
    return [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]


def mean(rows, k):
    return sum(r[k] for r in rows) / max(len(rows), 1)


if __name__ == "__main__":
    os.makedirs(out, exist_ok=True)
    print("config:", json.dumps(cfg))
    res = {}
    rl_args = [f"--sp={nproc}", f"--steps={rl_steps}", f"--prompts_per_step={prompts_per_step}",
               f"--group_size={group_size}", f"--max_new_tokens={max_new_tokens}", "--lr=3e-4", "--kl_coef=0"]
    sft_args = ["--sp=1", f"--steps={sft_steps}", "--lr=1e-2", "--warmup_steps=20", "--batch_size=8",
                "--freeze_vision=1", f"--log_every={sft_steps}"]
    for kg in (0, 1):     # alternating: RL off, RL on, SFT off, SFT on
        res[("rl", kg)] = run("rl.py", f"rl_kg{kg}", rl_args + [f"--keep_gathered={kg}"])
    for kg in (0, 1):
        res[("sft", kg)] = run("sft.py", f"sft_kg{kg}", sft_args + [f"--keep_gathered={kg}"])
    rows = []
    print("\n| stage | keep_gathered=0 s/step | keep_gathered=1 s/step | speed-up | split (0 -> 1) | same losses |")
    print("|---|---|---|---|---|---|")
    for stage, warm, split in (("rl", 1, ("t_prefill", "t_train")), ("sft", 10, ())):
        a, b = res[(stage, 0)], res[(stage, 1)]
        t0, t1 = mean(a[warm:], "step_time"), mean(b[warm:], "step_time")
        same = max(abs(x["loss"] - y["loss"]) for x, y in zip(a[:5], b[:5])) <= 1e-4
        parts = ", ".join(f"{k[2:]} {mean(a[warm:], k):.2f} -> {mean(b[warm:], k):.2f}" for k in split) or "-"
        print(f"| {stage} ({'SP' if stage == 'rl' else 'DP'}={nproc}) | {t0:.2f} | {t1:.2f} | **{t0 / t1:.2f}x** | "
              f"{parts} | {'yes' if same else 'NO'} (first 5 steps) |")
        rows.append(dict(stage=stage, off=t0, on=t1, speedup=t0 / t1, same_losses=same))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(config=cfg, rows=rows), f, indent=1)
