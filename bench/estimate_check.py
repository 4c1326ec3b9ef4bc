"""Does estimate.py describe what rl.py allocates? Predicted vs measured peak memory per phase, on CPU.

    python bench/estimate_check.py       # tiny + mid, 16/64/128 frames, world 1 and 2, + one recipe run (~13 min)
    python bench/estimate_check.py --models=tiny --frames=16 --worlds=1 --recipe=   # one quick run (~35 s)
    python bench/estimate_check.py --models= --worlds= --recipe=mid:2:64,mid:1:128  # the 7B recipe's trainer flags
    python bench/estimate_check.py --mmap_threshold=0          # glibc's default allocator (see below)

For each model (`tiny`: prepare.py's ~0.7M-param checkpoint; `mid`: the same tokenizer and processor with a
random-init 51M-param Qwen2.5-VL -- LLM width 1024, 4 layers, MLP 2816, 16/4 heads; vision width 256, 4 blocks --
and 112x112 frames, 16 tokens per 2 frames), each frame count and each world size (1: one process; 2: torchrun
--nproc_per_node=2 --sp=2), and the `recipe` runs (--activation_checkpointing=1 --keep_gathered=0, the 7B recipe's
trainer flags), this script:
  1. runs `rl.py --engine=hf` for 2 steps (steps=3, stop_after=2: no checkpoint is written) on the synthetic set and
     reads step 2's mem_<phase>_gb from metrics.jsonl (rl.py's phase_memory: peak RSS per phase, max over ranks);
  2. predicts the same phases with estimate.estimate_memory(..., device="cpu", runtime_gb=<measured>), with rl.py's
     flags of that run and the prompt's exact text-token count (data.encode_text on the step's records);
  3. prints predicted vs measured per phase, and exits non-zero if a ratio is outside 1 +- tol.
Step 2, not step 1: AdamW allocates its state at the first opt.step, so step 1's collect and prefill lack it.

The runtime baseline (runtime_gb) is measured once per world size here: the RSS of a process that has imported
everything rl.py imports (rl, transformers' Qwen2.5-VL model and processor code, the video decoders; under torchrun
also the gloo process group), before any model loads. It is passed to the estimator, never hard-coded there.

Allocator. CPU peak RSS counts memory the allocator holds, not only live tensors. glibc's malloc serves blocks below a
dynamic mmap threshold (raised up to 32 MB after the first large free) from heaps that it rarely returns to the OS,
so after step 1 the RSS of every later phase sits near the highest earlier peak. --mmap_threshold=65536 (the default
here) sets MALLOC_MMAP_THRESHOLD_ for the rl.py runs: blocks of 64 KiB and more are mmap'ed and returned on free, so
the RSS follows the live bytes, as torch.cuda.max_memory_allocated does on a GPU. --mmap_threshold=0 keeps glibc's
default to show the difference. Nothing else is tuned: the estimator's terms come from the code, not from these runs.
"""
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT,) if p not in sys.path]

import estimate  # noqa: E402
from common import apply_overrides  # noqa: E402

# -----------------------------------------------------------------------------
# config (override with --key=value)
out = "/tmp/est"             # synthetic data, checkpoints and runs go here
models = "tiny,mid"          # tiny | mid
frames = "16,64,128"         # frame counts (world 1)
sp2_frames = "64"            # frame counts of the world-2 (torchrun, --sp=2) runs
worlds = "1,2"               # 1 and/or 2
recipe = "mid:2:64"          # model:world:frames runs (comma-separated) with the 7B recipe's trainer flags:
                             # --activation_checkpointing=1 --keep_gathered=0 ("" = none)
group_size = 2               # rl.py flags of every run
prompts_per_step = 1
max_new_tokens = 32
kl_coef = 1e-2
mmap_threshold = 65536       # MALLOC_MMAP_THRESHOLD_ for the rl.py runs; 0 = glibc's default (see the docstring)
tol = 0.15                   # allowed |predicted / measured - 1|
timeout = 900                # seconds per rl.py run
json_out = ""                # also write the rows here

PHASES = ("collect", "prefill", "update", "sync")
MID = dict(hidden_size=1024, num_hidden_layers=4, intermediate_size=2816, num_attention_heads=16,
           num_key_value_heads=4, vision_width=256, vision_depth=4, vision_mlp=512, frame=112)
VIDEO_SIZE = 112             # prepare.py's synthetic videos: 112x112


def sh(cmd, env=None, timeout_s=None):
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def build(out_dir):
    """The synthetic set, the tiny checkpoint and the mid checkpoint under out_dir (skipped when present)."""
    py = sys.executable
    data = os.path.join(out_dir, "synth")
    if not os.path.isfile(os.path.join(data, "train.jsonl")):
        sh([py, "prepare.py", f"--out={data}", "--n_train=32", "--n_val=8", "--n_test=8"])
    tiny = os.path.join(out_dir, "tiny")
    if not os.path.isfile(os.path.join(tiny, "config.json")):
        sh([py, "prepare.py", f"--tiny={tiny}", f"--data={data}"])
    mid = os.path.join(out_dir, "mid")
    if not os.path.isfile(os.path.join(mid, "model.safetensors")):
        sh([py, "-c", f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'bench')!r}); import estimate_check; "
                      f"estimate_check.build_mid({tiny!r}, {mid!r})"])
    return data, {"tiny": tiny, "mid": mid}


def build_mid(tiny, mid):
    """A random-init Qwen2.5-VL at MID's widths with the tiny checkpoint's tokenizer; its processor sizes frames to
    MID['frame'] px square (16 tokens per 2 frames at 112)."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    os.makedirs(mid, exist_ok=True)
    for f in os.listdir(tiny):
        if f not in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(tiny, f), mid)
    with open(os.path.join(tiny, "config.json")) as f:
        raw = json.load(f)
    c = MID
    hd = c["hidden_size"] // c["num_attention_heads"]
    widths = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    raw["text_config"].update(
        {k: c[k] for k in widths}, head_dim=hd, layer_types=["full_attention"] * c["num_hidden_layers"],
        rope_parameters=dict(rope_type="default", rope_theta=1e6,
                             mrope_section=[hd // 8, 3 * hd // 16, hd // 2 - hd // 8 - 3 * hd // 16]))
    raw["vision_config"].update(depth=c["vision_depth"], hidden_size=c["vision_width"], num_heads=4,
                                intermediate_size=c["vision_mlp"], out_hidden_size=c["hidden_size"],
                                fullatt_block_indexes=[c["vision_depth"] - 1])
    raw["tie_word_embeddings"] = False
    cfg = Qwen2_5_VLConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version",
                                                                        "dtype")})
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig.from_pretrained(tiny)
    model.save_pretrained(mid)
    path = os.path.join(mid, "processor_config.json")
    with open(path) as f:
        pc = json.load(f)
    for k in ("image_processor", "video_processor"):
        pc[k]["size"] = {"shortest_edge": c["frame"] ** 2, "longest_edge": c["frame"] ** 2}
    with open(path, "w") as f:
        json.dump(pc, f, indent=1)


BASELINE = r"""
import os, sys
sys.path.insert(0, {root!r})
import rl  # torch, numpy, tqdm, common, data, mrsp
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor  # noqa
import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl, transformers.models.qwen2_5_vl.processing_qwen2_5_vl  # noqa
from transformers.models.qwen2_vl import video_processing_qwen2_vl  # noqa
import torchvision.transforms.functional  # noqa
for m in ("decord", "av"):
    try:
        __import__(m)
    except ImportError:
        pass
import torch.distributed as dist
if int(os.environ.get("WORLD_SIZE", 1)) > 1:
    dist.init_process_group("gloo")
with open("/proc/self/status") as f:
    rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
print("RSS", os.environ.get("RANK", 0), rss)
if dist.is_initialized():
    dist.barrier(); dist.destroy_process_group()
"""


def runtime_baseline(world):
    """RSS (GB) of a process that imported what rl.py imports, before any model loads (max over the ranks)."""
    code = BASELINE.format(root=ROOT)
    script = os.path.join(out, "baseline.py")
    with open(script, "w") as f:
        f.write(code)
    cmd = ([sys.executable, script] if world == 1 else
           [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc_per_node={world}",
            script])
    p = sh(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // world))), timeout_s=300)
    return max(int(line.split()[2]) for line in p.stdout.splitlines() if line.startswith("RSS")) / 1e9


def prompt_text_tokens(model_dir, data, n_frames, world, sp):
    """Text tokens of step 2's prompts besides the video (the most over this step's records), exactly as rl.py
    builds them: data.encode_text on a grid of the run's size."""
    import torch
    from transformers import AutoProcessor
    from common import batch_indices
    from data import encode_text, load_records
    proc = AutoProcessor.from_pretrained(model_dir)
    recs = load_records(os.path.join(data, "train.jsonl"))
    dp = world // sp
    idx = [i for r in range(dp) for i in batch_indices(1, len(recs), prompts_per_step, 0)[r::dp]]
    grid = torch.tensor([[n_frames // 2, 2, 2]])   # any grid: its video tokens (T/2 * 2*2 / merge^2) are subtracted
    n_vid = n_frames // 2
    return max(encode_text(proc, recs[i], grid, with_target=False)["input_ids"].numel() - n_vid for i in idx)


def run_rl(model_dir, data, n_frames, world, run_dir, ckpt=False, keep=True):
    """rl.py, 2 steps (no checkpoint: steps=3, stop_after=2) -> step 2's metrics row."""
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = [f"--model={model_dir}", f"--data={os.path.join(data, 'train.jsonl')}", "--val_data=",
             f"--out_dir={run_dir}",
             f"--frames={n_frames}", f"--prompts_per_step={prompts_per_step}", f"--group_size={group_size}",
             f"--max_new_tokens={max_new_tokens}", f"--kl_coef={kl_coef}", "--engine=hf", "--steps=3",
             "--stop_after=2", "--eval_every=0", "--save_every=1000", f"--sp={world}",
             f"--activation_checkpointing={int(ckpt)}", f"--keep_gathered={int(keep)}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // world)))
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = ([sys.executable, "rl.py"] if world == 1 else
           [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc_per_node={world}",
            "rl.py"]) + flags
    t0 = time.time()
    sh(cmd, env=env, timeout_s=timeout)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    row = rows[-1]
    assert row["step"] == 2, row
    row["wall_s"] = time.time() - t0
    return row


def predict(model_dir, data, n_frames, world, runtime_gb, ckpt=False, keep=True):
    sp = world
    r = estimate.estimate_memory(
        model_dir, n_frames, world=world, sp=sp, engine="hf", device="cpu", runtime_gb=runtime_gb,
        kl_coef=kl_coef, group_size=group_size, prompts_per_step=prompts_per_step, max_new_tokens=max_new_tokens,
        prompt_tokens=prompt_text_tokens(model_dir, data, n_frames, world, sp), activation_checkpointing=ckpt,
        keep_gathered=keep, height=VIDEO_SIZE, width=VIDEO_SIZE,
        videos_seen=2 * prompts_per_step * sp // world)   # 2 steps x this rank's prompts (prompts_per_step / dp)
    return r


def check_one(name, model_dir, data, F, w, runtime_gb, run_dir, ckpt=False, keep=True):
    """One rl.py run vs its estimate -> a row per phase (printed as a table row)."""
    row = run_rl(model_dir, data, F, w, run_dir, ckpt, keep)
    r = predict(model_dir, data, F, w, runtime_gb, ckpt, keep)
    label = name + (" (ckpt, keep_gathered=0)" if ckpt else "")
    rows = []
    for ph in PHASES:
        pred, meas = r["peaks"][ph] / 1e9, row.get(f"mem_{ph}_gb")
        ratio = pred / meas if meas else float("nan")
        ok = meas is not None and abs(ratio - 1) <= tol
        rows.append(dict(model=label, world=w, sp=w, frames=F, video_tokens=r["video_tokens"], phase=ph,
                         predicted_gb=pred, measured_gb=meas, ratio=ratio, ok=ok, response_len=row["response_len"],
                         wall_s=row["wall_s"]))
        print(f"| {label} | {w} / {w} | {F} | {r['video_tokens']:,} | {ph} | {pred:.3f} | "
              f"{meas if meas is None else f'{meas:.3f}'} | {ratio:.3f}{'' if ok else ' **OUT**'} |", flush=True)
    if row["response_len"] != max_new_tokens:
        print(f"  (note: mean response {row['response_len']:.1f} tokens < max_new_tokens={max_new_tokens}: the "
              f"estimate assumes full-length responses)")
    return rows


def main():
    data, dirs = build(out)
    rows = []
    base = {w: runtime_baseline(w) for w in map(int, filter(None, str(worlds).split(",")))}
    for spec in filter(None, str(recipe).split(",")):
        w = int(spec.split(":")[1])
        base[w] = base[w] if w in base else runtime_baseline(w)
    print("runtime baseline (RSS after rl.py's imports, before any model): " +
          ", ".join(f"world {w}: {b:.3f} GB" for w, b in base.items()), flush=True)
    print(f"MALLOC_MMAP_THRESHOLD_={mmap_threshold or 'unset (glibc default)'}; step 2 of each run", flush=True)
    hdr = "| model | world / sp | frames | video tok | phase | predicted GB | measured GB | ratio |"
    print(hdr + "\n|---|---|---|---|---|---|---|---|", flush=True)
    for name in filter(None, str(models).split(",")):
        for w in map(int, filter(None, str(worlds).split(","))):
            for F in map(int, str(frames if w == 1 else sp2_frames).split(",")):
                rows += check_one(name, dirs[name], data, F, w, base[w],
                                  os.path.join(out, "runs", f"{name}_w{w}_f{F}"))
    for spec in filter(None, str(recipe).split(",")):
        name, w, F = spec.split(":")
        w, F = int(w), int(F)
        rows += check_one(name, dirs[name], data, F, w, base[w], os.path.join(out, "runs", f"{name}_w{w}_f{F}_recipe"),
                          ckpt=True, keep=False)
    bad = [x for x in rows if not x["ok"]]
    if json_out:
        with open(json_out, "w") as f:
            json.dump(dict(runtime_gb=base, mmap_threshold=mmap_threshold, tol=tol, rows=rows), f, indent=1)
    print(f"{len(rows) - len(bad)}/{len(rows)} phases within +-{tol:.0%}" + (" -- FAIL" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    sys.exit(main())
