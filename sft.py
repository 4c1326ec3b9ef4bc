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
import json
import math
import os
import random
import sys

import numpy as np
import torch
from tqdm import tqdm

from common import (apply_overrides, autocast, batch_indices, check_seconds, clip_grad, config_of, export_hf,
                    gather_rows, load_checkpoint, metrics_logger, phase, phase_memory, print0, reduce_sum,
                    save_checkpoint, setup_dist, teardown, tick, watchdog)
from data import VideoError, check_videos, load_records, set_decode_backend, video_flags
from mrsp import (EmbeddingCache, accuracy_metrics, build_seq, evaluate, fsdp_gathered, load_model, load_models,
                  setup_mesh, sp_logprobs, sync_weights)

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
micro_batch = 1             # sequences per forward/backward on a rank, right-padded into one batch (same loss; more
                            # memory). 1 = one sequence at a time, what long videos need; short ones run faster batched
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
eval_every = 50             # validation loss + answer accuracy every N steps (and at the end); 0 = only at the end
eval_samples = 64
max_new_tokens = 160        # generation budget for validation accuracy
save_every = 50
keep_checkpoints = 2
resume = False
stop_after = 0              # stop after this many steps of this run, as if killed (tests); 0 = never
cache_bytes = 1 << 30       # video-embedding cache budget (frozen vision only)
decode_backend = ""         # pyav | decord | pyav-seq (no seeking): the only decoder; "": PyAV, then decord
seed = 0
log_every = 1
wandb_project = ""          # set to log to Weights & Biases
dist_timeout = 60           # minutes a collective may wait for the other ranks before it fails
phase_timeout = 3600.0      # seconds one phase may take; past it every rank dumps its stacks to out_dir/hang_rank*.txt
                            # and the job ends, instead of hanging without a word
check_phases = True         # ranks compare phase fingerprints (one small all-gather per phase) and fail loudly


# -----------------------------------------------------------------------------
# helpers
def lr_at(step):
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
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


@torch.no_grad()
def validate(val, processor, policy, rollout_model, cache, answer_cache, mesh, device, world, rank):
    """Validation loss (SP forward, DP-split) and greedy answer accuracy (the rollout copy, records split over all
    ranks: mrsp.evaluate, the answers eval.py scores). -> metrics on rank 0, {} elsewhere.
    cache: the training cache -- the loss pass runs in lockstep over the SP group, so its SP ranks keep identical
    cache histories. answer_cache: this rank's own cache for the answers, which split the records over ALL ranks:
    putting those in the training cache would leave SP ranks with different contents, and their next parallel
    decode would meet in mismatched collectives (get_video_embeds checks the histories and says so)."""
    policy.eval()
    n = len(val) - len(val) % mesh.dp_size                 # equal work per DP rank: FSDP collectives match
    nll, n_tok = 0.0, 0
    for rec in val[mesh.dp_rank:n:mesh.dp_size]:
        seq = make_seq(rec, processor, policy, cache, mesh.sp_group, device)
        with autocast(device):                              # as training (and SP flash kernels want bf16)
            lp = sp_logprobs(policy, seq, group=mesh.sp_group, impl=attn)
        nll, n_tok = nll - lp.sum().item(), n_tok + int(seq["loss_mask"].sum())
    tot = reduce_sum(dict(nll=nll, n=n_tok), mesh.dp_group)
    sync_weights(policy, rollout_model)                     # collective under FSDP
    rows = evaluate(rollout_model, processor, val, frames, max_new_tokens=max_new_tokens, cache=answer_cache,
                    rank=rank, world=world, device=device, desc="val", video=video_kw())
    rows = gather_rows(rows, world)                         # a sync point: every rank calls it
    policy.train()
    if rows is None:
        return {}
    return dict(val_loss=tot["nll"] / max(tot["n"], 1), **accuracy_metrics(rows))


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    cfg = config_of(globals())
    set_decode_backend(decode_backend)

    # --- init
    rank, local_rank, world, device = setup_dist(dist_timeout)
    master_process = rank == 0
    mesh = setup_mesh(sp)
    if micro_batch < 1:
        raise SystemExit(f"--micro_batch={micro_batch}: expected sequences per forward >= 1")
    if batch_size % mesh.dp_size:
        raise SystemExit(f"--batch_size={batch_size} must be divisible by the data-parallel size {mesh.dp_size} "
                         f"(world {world} / sp {sp})")
    torch.manual_seed(seed); np.random.seed(seed); random.seed(seed)
    print0("config:", json.dumps(cfg))
    if master_process:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    watchdog(out_dir, phase_timeout, check_phases)   # no silent hangs (common.py)

    # --- data
    train = load_records(data)
    val = load_records(val_data)[:eval_samples] if val_data else []
    try:   # a missing video or image file stops here, before any model work (named: data file, line, field)
        check_videos(train, where=f"--data={data}")
        check_videos(val, where=f"--val_data={val_data}")
    except VideoError as e:
        raise SystemExit(f"sft.py: {e}") from None
    print0(f"data: {len(train)} train / {len(val)} val records; dp={mesh.dp_size} sp={mesh.sp_size}")

    # --- model: the policy (fp32 master weights, FSDP2 over the mesh; bf16 autocast on GPU) and an unsharded rollout
    # copy for the greedy val answers and the HF export; a frozen vision tower exists once, shared
    try:
        policy, processor, rollout_model, _ = load_models(model, device, mesh, freeze_vision=freeze_vision,
                                                          activation_checkpointing=activation_checkpointing,
                                                          rollout=bool(val))
    except (FileNotFoundError, ValueError) as e:   # a wrong --model: say so, no traceback
        raise SystemExit(f"sft.py: {e}") from None
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
        # --- TRAINING STEP BEGIN
        t0 = tick()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = batch_indices(step, len(train), batch_size, seed)[mesh.dp_rank::mesh.dp_size]
        phase("train", step, mesh.sp_group, seqs=len(idx), cache=None if cache is None else cache.history)
        seqs = [make_seq(train[i], processor, policy, cache, mesh.sp_group, device) for i in idx]
        # the loss is a token mean over the GLOBAL batch: every sequence divides by the same global count, so the
        # per-sequence backwards add up to the whole batch's gradient for any DP / SP / accumulation split
        n_tok = reduce_sum(dict(n=sum(int(s["loss_mask"].sum()) for s in seqs)), mesh.dp_group)["n"]
        loss_sum, seq_tokens = 0.0, 0
        with fsdp_gathered(policy, keep_gathered) as grad_sync:
            for k in range(0, len(seqs), micro_batch):
                mb = seqs[k:k + micro_batch]
                with autocast(device):
                    lps = sp_logprobs(policy, mb, group=mesh.sp_group, impl=attn)   # [(S_i,)] 0 outside the target
                loss = -sum(lp.sum() for lp in lps) / n_tok
                grad_sync(last=k + micro_batch >= len(seqs))   # one reduce-scatter per step, after the last backward
                loss.backward()
                loss_sum += loss.item()
                seq_tokens += sum(s["input_ids"].numel() for s in mb)
        grad_norm = clip_grad(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = tick() - t0   # (tick synchronizes: the clip and optimizer-step kernels belong to this step's time)
        # --- TRAINING STEP END
        stats = reduce_sum(dict(loss=loss_sum, tokens=seq_tokens), mesh.dp_group)
        row = dict(step=step + 1, loss=stats["loss"], lr=lr_at(step), grad_norm=grad_norm,
                   tokens_per_s=stats["tokens"] / dt, step_time=dt, t_checks=check_seconds())
        if cache is not None:
            row.update(cache_hits=cache.stats["hits"], cache_misses=cache.stats["misses"])
        if val and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == steps):
            phase("eval", step + 1)
            row.update(validate(val, processor, policy, rollout_model, cache, answer_cache, mesh, device, world, rank))
        mem = phase_memory()   # per phase, the fullest rank (a sync point)
        row.update(peak_mem_gb=max(mem.values()), **{f"mem_{k}_gb": v for k, v in mem.items()})
        log(row)
        if master_process and (step + 1) % log_every == 0:
            msg = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step" and isinstance(v, float))
            tqdm.write(f"step {step + 1}/{steps}: {msg}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            phase("checkpoint", step + 1)
            save_checkpoint(out_dir, step + 1, policy, opt, cfg, world, rank, keep=keep_checkpoints)
        done_here += 1
        if stop_after and done_here >= stop_after:
            print0(f"stop_after={stop_after}: stopping at step {step + 1} (simulated interruption)")
            break
    else:
        # --- export a standard HF checkpoint (model + processor) for eval.py / rl.py / vLLM
        phase("checkpoint", steps)
        if rollout_model is None:   # no validation: the export copy is made only now
            rollout_model = load_model(model, "bfloat16" if device.type == "cuda" else "float32", device,
                                       vision=policy.model.visual if freeze_vision else None)[0]
        sync_weights(policy, rollout_model)   # gathers the FSDP shards: a collective, every rank calls it
        if master_process:
            export_hf(rollout_model, processor, out_dir, cfg)
    teardown(world)
