"""
sft.py -- stage 1: chain-of-thought SFT of a Qwen2-VL / Qwen2.5-VL model on long-video QA.

The loss is on the assistant target only (<think>...</think><answer>X</answer><|im_end|>), a token
mean over the GLOBAL batch (every micro-batch, data-parallel rank and sequence-parallel shard divides
by the same global count, so accumulation, DP and SP give the same gradient). Long videos go through
MR-SP: parallel video encoding over the SP group and the sequence-parallel forward (mrsp.py).

Single process (CPU or one GPU):
    python sft.py --model=out/tiny --data=data/synth/train.jsonl --val_data=data/synth/val.jsonl
Data + sequence parallel (here DP=1, SP=2):
    torchrun --standalone --nproc_per_node=2 sft.py --sp=2 --model=out/tiny --data=data/synth/train.jsonl
Tiny CPU example (a couple of minutes):
    python sft.py --model=out/tiny --data=data/synth/train.jsonl --steps=40 --batch_size=8 --frames=16
Resume after an interruption (same command plus):
    --resume=1            # continues from out_dir/latest: same next batch, same next loss
Real checkpoint on 8 GPUs:
    torchrun --nproc_per_node=8 sft.py --model=/ckpt/Qwen2.5-VL-7B-Instruct --data=/data/lvr/train.jsonl \
        --sp=4 --frames=256 --lr=1e-5 --freeze_vision=1 --activation_checkpointing=1 --keep_gathered=0 --batch_size=32

Outputs in out_dir: metrics.jsonl, config.json, step_NNNNNN/ (sharded DCP checkpoints, written
atomically), latest, and hf/ (a standard HF checkpoint + processor that eval.py / rl.py load).
"""
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import CATEGORIES, apply_overrides, config_of, encode_text, extract_choice, load_records, video_flags
from mrsp import (EmbeddingCache, build_seq, fsdp_gathered, get_video_embeds, hf_rollout, load_model, prepare_model,
                  print0, setup_dist, setup_mesh, sp_logprobs, sync_weights)

# -----------------------------------------------------------------------------
# config (override with --key=value)
model = "out/tiny"          # local HF checkpoint directory
data = "data/synth/train.jsonl"
val_data = "data/synth/val.jsonl"   # "" to skip validation
out_dir = "out/sft"
frames = 32                 # frames sampled uniformly per video
min_pixels = 0              # frame size (qwen-vl-utils rules, what Qwen-VL checkpoints were trained with):
max_pixels = 0              #   per-frame pixel range, 0 = 128*28*28 .. 768*28*28, and a pixel budget for the whole
total_pixels = 0            #   video shared by its frames, 0 = 90% of 128k tokens' pixels; a record's own
                            #   min_pixels/max_pixels/total_pixels/resized_height/resized_width/video_start/... win
sp = 1                      # sequence-parallel group size (divides the world size)
attn = "ring"               # ring | ulysses
batch_size = 8              # sequences per optimizer step, global (divisible by the DP size)
steps = 100                 # optimizer steps
lr = 2e-3
min_lr_ratio = 0.1          # cosine decays to lr * min_lr_ratio
warmup_steps = 5
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
freeze_vision = False       # True: vision tower frozen, video embeddings cached across epochs
activation_checkpointing = False
keep_gathered = True        # FSDP: all-gather params / reduce-scatter grads once per step, not once per sequence
                            # (fewer collectives; costs full params + grads per rank: 0 for a 7B on 80 GB)
max_length = 16384          # longer samples are an error ...
truncate = False            # ... unless truncate=True, which cuts the target (never the video)
eval_every = 50             # validation loss + answer accuracy every N steps (and at the end)
eval_samples = 64
max_new_tokens = 160        # generation budget for validation accuracy
save_every = 50
keep_checkpoints = 2
resume = False
stop_after = 0              # stop after this many steps of this run, as if killed (tests); 0 = never
cache_bytes = 1 << 30       # video-embedding cache budget (frozen vision only)
seed = 0
log_every = 1
wandb_project = ""          # set to log to Weights & Biases


# -----------------------------------------------------------------------------
# helpers
def batch_indices(step, n, batch_size, seed):
    """Global sample indices of an optimizer step: consecutive slices of per-epoch permutations, so the
    data position is a pure function of the step (what makes --resume exact)."""
    out, perms, pos = [], {}, step * batch_size
    for p in range(pos, pos + batch_size):
        epoch, i = divmod(p, n)
        if epoch not in perms:   # a step spans at most two epochs: at most two permutations
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][i]))
    return out


def lr_at(step):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def video_kw():
    """The frame flags as get_video_embeds / build_seq keyword arguments (a record's own fields win)."""
    return video_flags(min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels)


def make_seq(rec, processor, policy, cache, group, device, with_target=True):
    """One training sequence: cached video embeddings (frozen vision) or pixels (trainable), plus tokens."""
    return build_seq(rec, processor, policy if freeze_vision else None, cache, frames=frames, group=group,
                     device=device, with_target=with_target, max_length=max_length, truncate=truncate, **video_kw())


def peak_memory_gb(world=1):
    """Peak memory of the fullest rank in GB: CUDA's max allocated, or on CPU the process's peak RSS. world > 1: a
    max all-reduce over all ranks (this is a sync point: every rank must call it)."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # KiB on Linux -> GB
    if world > 1:
        x = torch.tensor([peak], dtype=torch.float64)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        peak = x.item()
    return peak


def save_checkpoint(out_dir, step, policy, opt, cfg, world, rank, keep=2, extra=None):
    """Sharded DCP checkpoint into step_N.tmp, then renamed: a crash mid-save leaves the previous one.
    extra: JSON-able trainer state stored next to the step (rl.py keeps its own counters there)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = os.path.join(out_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world > 1:
        dist.barrier()
    msd, osd = get_state_dict(policy, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    torch.save(dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                    cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None),
               os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(dict(step=step, config=cfg, extra=extra), f)
    if world > 1:
        dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
        old = sorted(d for d in os.listdir(out_dir) if d.startswith("step_") and not d.endswith(".tmp"))
        for d in old[:-keep]:
            shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
    if world > 1:
        dist.barrier()


def load_checkpoint(out_dir, policy, opt, rank):
    """-> (step to continue from, extra trainer state); (0, None) when there is nothing to resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    latest = os.path.join(out_dir, "latest")
    if not os.path.isfile(latest):
        print0(f"--resume: no checkpoint in {out_dir}, starting from scratch")
        return 0, None
    path = os.path.join(out_dir, open(latest).read().strip())
    msd, osd = get_state_dict(policy, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if not os.path.isfile(rng_file):
        raise FileNotFoundError(f"{rng_file}: missing; was the checkpoint written with a different world size?")
    rng = torch.load(rng_file, weights_only=False)
    torch.set_rng_state(rng["torch"]); np.random.set_state(rng["numpy"]); random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer = json.load(open(os.path.join(path, "trainer.json")))
    print0(f"resumed from {path} (step {trainer['step']})")
    return trainer["step"], trainer.get("extra")


def metrics_logger(out_dir, cfg, wandb_project, master_process):
    """-> log(row): one JSON line per call in out_dir/metrics.jsonl (appended: a resumed run continues the file),
    and to Weights & Biases when wandb_project is set. Only the master process writes."""
    if not master_process:
        return lambda row: None
    wandb = None
    if wandb_project:
        import wandb
        wandb.init(project=wandb_project, config=cfg)
    f = open(os.path.join(out_dir, "metrics.jsonl"), "a")

    def log(row):
        f.write(json.dumps(row) + "\n")
        f.flush()
        if wandb:
            wandb.log(row, step=row["step"])
    return log


def export_hf(policy, export, processor, out_dir, cfg, master_process):
    """Gather the (sharded) policy into the unsharded `export` model and write out_dir/hf atomically: a
    standard HF checkpoint + processor that eval.py, rl.py and vLLM load. Collective under FSDP: all ranks call."""
    sync_weights(policy, export)
    if master_process:
        hf, tmp = os.path.join(out_dir, "hf"), os.path.join(out_dir, "hf.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        export.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "train_config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        shutil.rmtree(hf, ignore_errors=True)
        os.replace(tmp, hf)
        print(f"exported HF checkpoint to {hf}")


@torch.no_grad()
def validate(val, processor, policy, engine, cache, answer_cache, mesh, device, world, rank):
    """Validation loss (SP forward, DP-split) and greedy answer accuracy (rollout copy, all ranks split).
    cache: the training cache -- the loss pass runs in lockstep over the SP group, so its SP ranks keep identical
    cache histories. answer_cache: this rank's own cache for the answers, which split the records over ALL ranks:
    putting those in the training cache would leave SP ranks with different contents, and their next parallel
    decode would meet in mismatched collectives (get_video_embeds checks the histories and says so)."""
    policy.eval()
    n = len(val) - len(val) % mesh.dp_size                 # equal work per DP rank: FSDP collectives match
    tot = torch.zeros(2, dtype=torch.float64)
    for rec in val[mesh.dp_rank:n:mesh.dp_size]:
        seq = make_seq(rec, processor, policy, cache, mesh.sp_group, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):   # as training (and
            lp = sp_logprobs(policy, seq, group=mesh.sp_group, impl=attn)      # SP flash kernels want bf16)
        tot += torch.tensor([-lp.sum().item(), seq["loss_mask"].sum().item()], dtype=torch.float64)
    if mesh.dp_group is not None:
        dist.all_reduce(tot, group=mesh.dp_group)
    sync_weights(policy, engine)                            # collective under FSDP
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    counts = torch.zeros(2 * len(CATEGORIES) + 2, dtype=torch.float64)
    for rec in val[rank::world]:                            # generation is per rank: no lockstep needed
        vals, _ = get_video_embeds(engine, processor, [rec], answer_cache, num_frames=frames, device=device,
                                   **video_kw())
        t = encode_text(processor, rec, vals[0]["video_grid_thw"], with_target=False)
        out = hf_rollout(engine, [dict(t, **vals[0])], n=1, temperature=0, max_new_tokens=max_new_tokens, eos_id=eos,
                         tokenizer=processor.tokenizer)
        ok = extract_choice(out["texts"][0], len(rec["options"]), rec["options"]) == rec["answer"]
        counts[0] += ok; counts[1] += 1
        if rec["category"] in CATEGORIES:
            c = CATEGORIES.index(rec["category"])
            counts[2 + 2 * c] += ok; counts[3 + 2 * c] += 1
    if world > 1:
        dist.all_reduce(counts)
    policy.train()
    res = dict(val_loss=(tot[0] / tot[1].clamp(min=1)).item(), val_acc=(counts[0] / counts[1].clamp(min=1)).item())
    for c, name in enumerate(CATEGORIES):
        if counts[3 + 2 * c] > 0:
            res[f"val_acc_{name}"] = (counts[2 + 2 * c] / counts[3 + 2 * c]).item()
    return res


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    cfg = config_of(globals())

    # --- init
    rank, local_rank, world, device = setup_dist()
    master_process = rank == 0
    mesh = setup_mesh(sp)
    if batch_size % mesh.dp_size:
        raise SystemExit(f"--batch_size={batch_size} must be divisible by the data-parallel size {mesh.dp_size} "
                         f"(world {world} / sp {sp})")
    torch.manual_seed(seed); np.random.seed(seed); random.seed(seed)
    print0("config:", json.dumps(cfg))
    if master_process:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())

    # --- data
    train = load_records(data)
    val = load_records(val_data)[:eval_samples] if val_data else []
    print0(f"data: {len(train)} train / {len(val)} val records; dp={mesh.dp_size} sp={mesh.sp_size}")

    # --- model (fp32 master weights; bf16 autocast on GPU)
    policy, processor = load_model(model, "float32", device)
    # unsharded rollout copy for the greedy val answers: bf16 on GPUs (a full fp32 7B copy is ~30 GB a rank)
    engine = load_model(model, "bfloat16" if device.type == "cuda" else "float32", device)[0].eval() if val else None
    prepare_model(policy, mesh, freeze_vision=freeze_vision, activation_checkpointing=activation_checkpointing)
    policy.train()
    cache = EmbeddingCache(cache_bytes) if freeze_vision else None
    answer_cache = EmbeddingCache(cache_bytes) if freeze_vision and val else None   # per rank: see validate

    # --- optim
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    start = load_checkpoint(out_dir, policy, opt, rank)[0] if resume else 0

    log = metrics_logger(out_dir, cfg, wandb_project, master_process)

    # --- loop
    bar = tqdm(range(start, steps), desc="sft", disable=not master_process, initial=start, total=steps)
    done_here = 0
    for step in bar:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = batch_indices(step, len(train), batch_size, seed)[mesh.dp_rank::mesh.dp_size]
        seqs = [make_seq(train[i], processor, policy, cache, mesh.sp_group, device) for i in idx]
        # global token count: every rank divides by the same number (SP ranks hold the same sequences)
        n_tok = torch.tensor([float(sum(int(s["loss_mask"].sum()) for s in seqs))])
        if mesh.dp_group is not None:
            dist.all_reduce(n_tok, group=mesh.dp_group)   # this is a sync point
        loss_sum, seq_tokens = 0.0, 0
        with fsdp_gathered(policy, keep_gathered) as grad_sync:
            for k, s in enumerate(seqs):
                with autocast:
                    lp = sp_logprobs(policy, s, group=mesh.sp_group, impl=attn)
                loss = -lp.sum() / n_tok.item()
                grad_sync(last=k == len(seqs) - 1)   # one reduce-scatter per step, after the last backward
                loss.backward()
                loss_sum += loss.item()
                seq_tokens += s["input_ids"].numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = torch.tensor([loss_sum, float(seq_tokens)])
        if mesh.dp_group is not None:
            dist.all_reduce(stats, group=mesh.dp_group)
        if device.type == "cuda":
            torch.cuda.synchronize()   # the clip and optimizer-step kernels belong to this step's time
        dt = time.time() - t0
        row = dict(step=step + 1, loss=stats[0].item(), lr=lr_at(step), grad_norm=float(grad_norm),
                   tokens_per_s=stats[1].item() / dt, step_time=dt, peak_mem_gb=peak_memory_gb(world))
        if cache is not None:
            row.update(cache_hits=cache.stats["hits"], cache_misses=cache.stats["misses"])
        if val and ((step + 1) % eval_every == 0 or step + 1 == steps):
            row.update(validate(val, processor, policy, engine, cache, answer_cache, mesh, device, world, rank))
        log(row)
        if master_process and (step + 1) % log_every == 0:
            msg = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step" and isinstance(v, float))
            tqdm.write(f"step {step + 1}/{steps}: {msg}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_checkpoint(out_dir, step + 1, policy, opt, cfg, world, rank, keep=keep_checkpoints)
        done_here += 1
        if stop_after and done_here >= stop_after:
            print0(f"stop_after={stop_after}: stopping at step {step + 1} (simulated interruption)")
            break
    else:
        # --- export a standard HF checkpoint (model + processor) for eval.py / rl.py / vLLM
        export = engine if engine is not None else load_model(model, "float32", device)[0]
        export_hf(policy, export, processor, out_dir, cfg, master_process)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
