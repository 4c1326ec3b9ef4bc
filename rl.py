"""
rl.py -- stage 2: GRPO on long videos with MR-SP (LongVILA-R1, "Scaling RL to Long Videos").

One step: prompts -> each video encoded ONCE (parallel over the SP group, through the embedding cache) -> G
rollouts per prompt from the rollout engine fed the cached embeddings -> rewards (0.9 accuracy + 0.1 format) ->
group advantages -> old-policy and reference log-probs by the sequence-parallel prefill (cached embeddings, the
rollout temperature) -> PPO-style clipped updates with the global token-count normaliser -> optimizer step ->
weight sync to the rollout engine. --mrsp=0 is the naive loop the paper compares against: no cache, the vision
tower re-encodes the video for every rollout and inside every prefill / training forward, no sequence
parallelism; the math is the same (tests/test_rl.py checks equal losses for equal rollouts).

Single process (CPU or one GPU), from an SFT checkpoint:
    python rl.py --model=out/sft/hf --data=data/synth/train.jsonl --val_data=data/synth/val.jsonl --out_dir=out/rl
Data + sequence parallel (here DP=1, SP=2):
    torchrun --standalone --nproc_per_node=2 rl.py --sp=2 --model=out/sft/hf --data=data/synth/train.jsonl
Tiny CPU example (~2 s a step on 2 CPU cores at 16 frames):
    python rl.py --model=out/sft/hf --frames=16 --prompts_per_step=4 --group_size=4 --max_new_tokens=96 \
        --lr=1e-4 --steps=30 --eval_every=10 --eval_samples=16
Naive baseline for the MR-SP speed-up benchmark (same flags plus; needs --sp=1):
    --mrsp=0
Real checkpoint on 8 GPUs (the paper's release settings are the defaults: G=5, clip 0.2/0.3, k3 KL 1e-2, lr 1e-6):
    torchrun --nproc_per_node=8 rl.py --model=/ckpt/LongVILA-R1-7B-SFT --data=/data/lvr/rl.jsonl --sp=4 \
        --frames=512 --prompts_per_step=32 --max_new_tokens=1024 --activation_checkpointing=1 --keep_gathered=0 \
        --engine=vllm
Ablations:
    --kl_coef=0                                            no KL term, no reference model (no ref prefill)
    --clip_high=0.28 --kl_coef=0 --dynamic_sampling=1      DAPO-style (clip-higher, online filtering)
    --adv_norm=none --agg=seq-mean-token-sum               Dr. GRPO (no std, constant normaliser)
    --agg=seq-mean                                         original GRPO sequence mean
    --ppo_epochs=2 --mini_batch=16                         several updates per rollout batch (pi_old != pi_theta)
Resume after an interruption (same command plus):
    --resume=1            # continues from out_dir/latest: same next prompts, same rollouts, same next loss

Design choices (and the traps they avoid):
  * The rollout engine's unsharded HF copy also ENCODES the videos: encoding through the FSDP policy would make DP
    ranks with different cache hits wait on each other's all-gathers. Parallel encoding still runs over the SP group,
    whose ranks share prompts and cache history. A frozen vision tower exists ONCE per rank (build_models): the
    policy's, in bf16 on GPUs, shared as the same module by the rollout copy and the reference.
  * --engine=vllm (VLLMEngine): under torchrun one engine per rank, on its own device (mrsp.vllm_start: vLLM's
    external launcher, the engines data-parallel). They step in lockstep, so every rank calls the engine once per
    prompt draw and once per eval round, even with no prompt of its own. The engine sleeps after the rollouts
    (--vllm_sleep_level, GPU) and wakes before the next rollouts or eval: weights back -> the new weights streamed in
    tensor by tensor -> KV cache back; metrics.jsonl lists each step's engine calls (vllm_calls). vLLM builds no
    vision tower of its own (it is only ever fed embeddings).
  * FSDP lockstep: every rank must run the policy forward/backward equally often. DP ranks always train the same
    number of groups; with dynamic sampling a rank short of informative groups pads with dropped ones at loss
    weight 0 (balance_groups). SP ranks hold the same sequences.
  * A sampled <|video_pad|> would be taken for a video slot by every forward: the response is cut before it and
    rewarded 0 (finish_response).
  * Rollout sampling is seeded by the prompt's data position: SP/DP layouts, --mrsp=0/1 and --resume draw the same
    tokens. Old-policy log-probs are recomputed by the SP prefill (recompute_old=1, as the paper's system);
    --recompute_old=0 reuses logp.detach() when there is one update per batch.
  * Trainable vision (--freeze_vision=0, not the paper's RL setting): rollouts and the old-policy prefill use the
    step's fresh embeddings (cache keyed by step), the training forward and the reference re-encode pixels (cached
    embeddings carry no gradient and are not the reference's).
  * --mrsp=0: every rollout request carries its own freshly encoded video (G encodes + G prefills per prompt, decode
    still batched), and the old/ref prefills and training forwards take pixels; vision_passes in metrics.jsonl.

Outputs in out_dir: metrics.jsonl (one row per step: reward/accuracy/format, KL, clip fraction, entropy, time split
encode/rollout/prefill/train/sync, vision_passes, ...; val_* rows every eval_every), config.json, step_NNNNNN/ (sharded
DCP checkpoints), latest, and hf/ (a standard HF checkpoint + processor).
"""
import contextlib
import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import (CATEGORIES, LETTERS, apply_overrides, config_of, encode_text, extract_choice, load_records,
                  video_flags, video_inputs)
from mrsp import (EmbeddingCache, encode_videos, fsdp_gathered, get_video_embeds, hf_rollout, load_model, prepare_model,
                  print0, setup_dist, setup_mesh, sp_logprobs, sync_weights, vllm_rollout, vllm_sleep, vllm_start,
                  vllm_stop, vllm_sync_weights, vllm_wake)
from sft import batch_indices, export_hf, load_checkpoint, metrics_logger, peak_memory_gb, save_checkpoint

# -----------------------------------------------------------------------------
# config (override with --key=value)
model = "out/sft/hf"        # local HF checkpoint directory (the SFT export); also the reference policy
data = "data/synth/train.jsonl"
val_data = "data/synth/val.jsonl"   # "" to skip held-out evaluation
out_dir = "out/rl"
frames = 32                 # frames sampled uniformly per video
min_pixels = 0              # frame size (qwen-vl-utils rules, what Qwen-VL checkpoints were trained with):
max_pixels = 0              #   per-frame pixel range, 0 = 128*28*28 .. 768*28*28, and a pixel budget for the whole
total_pixels = 0            #   video shared by its frames, 0 = 90% of 128k tokens' pixels; a record's own
                            #   min_pixels/max_pixels/total_pixels/resized_height/resized_width/video_start/... win
sp = 1                      # sequence-parallel group size (divides the world size)
attn = "ring"               # ring | ulysses (LLM attention under SP)
mrsp = True                 # False: the naive loop (no cache, re-encode per rollout/prefill, sp must be 1)
engine = "hf"               # rollout engine: hf (an unsharded copy of the model) | vllm (needs vllm installed)
prompts_per_step = 8        # prompts per RL step, global (divisible by the data-parallel size)
group_size = 5              # G rollouts per prompt (paper release: 5)
temperature = 1.0           # rollout temperature; the log-prob recomputes use the same one
top_p = 1.0
top_k = 0
max_new_tokens = 256        # response budget (also Dr. GRPO's constant normaliser)
ppo_epochs = 1              # passes over each rollout batch
mini_batch = 0              # sequences per optimizer update, global; 0 = the whole step's batch (one update/epoch)
recompute_old = True        # old-policy log-probs by a no-grad prefill (as the paper's system); False reuses
                            # logp.detach() when there is one update per batch (pi_old = pi_theta, one forward less)
lr = 1e-6                   # paper release; constant after warmup
warmup_steps = 0
weight_decay = 1e-2
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
clip_low = 0.2              # ratio clipped to [1 - clip_low, 1 + clip_high]
clip_high = 0.3             # paper release 0.3 ("clip-higher"; DAPO 0.28)
kl_coef = 1e-2              # k3 KL to the reference model; 0 = no reference model at all
agg = "token-mean"          # token-mean | seq-mean | seq-mean-token-sum (Dr. GRPO)
adv_norm = "std"            # std: (r - mean) / (std + eps) | none: r - mean (Dr. GRPO)
dynamic_sampling = False    # drop groups whose rewards are all equal and draw more prompts to refill
max_sample_rounds = 3       # dynamic sampling: at most this many prompt draws per step
reward_acc_weight = 0.9     # total reward = acc_weight * accuracy + format_weight * format (paper release)
reward_format_weight = 0.1
freeze_vision = True        # paper: frozen vision tower in RL, so cached embeddings stay valid across steps
activation_checkpointing = False
keep_gathered = True        # FSDP: all-gather params / reduce-scatter grads once per mini-batch, not once per
                            # sequence (fewer collectives; costs full params + grads per rank: 0 for a 7B on 80 GB)
logit_chunk = 1024          # LM-head chunk (tokens) in the SP prefill
steps = 100                 # RL steps (one optimizer step each, or ppo_epochs * mini-batches)
eval_every = 25             # held-out greedy accuracy every N steps (and at the end); 0 = only at the end
eval_samples = 64
eval_first = False          # also evaluate before the first step (the baseline of a reward curve)
save_every = 25
keep_checkpoints = 2
resume = False
stop_after = 0              # stop after this many steps of this run, as if killed (tests); 0 = never
cache_bytes = 1 << 30       # video-embedding cache budget per rank
vllm_max_model_len = 32768  # --engine=vllm: longest prompt (video tokens) + max_new_tokens
vllm_memory = 0.3           # --engine=vllm: gpu_memory_utilization of the engine
vllm_sleep_level = 2        # --engine=vllm: sleep while the trainer works (GPU): 2 frees weights and KV cache (the
                            # weight sync re-sends the weights at wake), 1 keeps the weights in CPU memory (~15 GB of
                            # host RAM a rank for a 7B), 0 never sleeps
seed = 0
log_every = 1
wandb_project = ""          # set to log to Weights & Biases

AGGS = ("token-mean", "seq-mean", "seq-mean-token-sum")


# -----------------------------------------------------------------------------
# GRPO math (public API: users copy these three)
def group_advantages(rewards, group_size, norm="std", eps=1e-6):
    """(N,) rewards, N = groups * group_size, each group's G rollouts contiguous -> (N,) advantages.
    norm "std": (r - group mean) / (group std + eps), std with Bessel's correction (as TRL / verl);
    norm "none": r - group mean (Dr. GRPO). A group whose rewards are all equal gets exactly 0: no signal, and no
    0/eps blow-up from the rounding of its mean (mean(0.1, 0.1, 0.1) != 0.1 in float)."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"group_advantages: {r.numel()} rewards do not split into groups of {group_size}")
    if norm not in ("std", "none"):
        raise ValueError(f"group_advantages: norm={norm!r}, expected 'std' or 'none'")
    g = r.view(-1, group_size)                                         # (groups, G)
    adv = g - g.mean(-1, keepdim=True)
    if norm == "std" and group_size > 1:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    same = g.max(-1, keepdim=True).values == g.min(-1, keepdim=True).values
    return torch.where(same, torch.zeros_like(adv), adv).view(-1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_low=0.2, clip_high=0.2, kl_coef=0.0,
              agg="token-mean", normalizer=None):
    """Clipped-ratio GRPO objective with an optional k3 KL penalty.

    logp (B, T) current policy log-probs of the sampled tokens (carries the gradient); old_logp, ref_logp (B, T)
    (ref_logp may be None when kl_coef is 0); advantages (B,); mask (B, T) bool, the response tokens.
    Per token: rho = exp(logp - old); l = -min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A) + kl_coef * KL,
    KL = exp(ref - logp) - (ref - logp) - 1 (k3, >= 0).
    agg: "token-mean"          sum of l over all tokens / normalizer (default: this batch's token count);
         "seq-mean"            sum over sequences of (token mean of l) / normalizer (default B);
         "seq-mean-token-sum"  sum of l over all tokens / normalizer (default B * T: a constant length, Dr. GRPO).
    normalizer: the GLOBAL denominator when a batch is split into micro-batches / ranks (each part passes the same
    number, so the parts' gradients add up to the whole batch's).
    -> (loss, stats) with stats (detached, token means over the mask): clip_frac (tokens where the clipped term is
       the active one), kl, ratio_mean, pg_loss (the loss without the KL term, same aggregation), tokens."""
    if agg not in AGGS:
        raise ValueError(f"grpo_loss: agg={agg!r}, expected one of {AGGS}")
    if kl_coef and ref_logp is None:
        raise ValueError("grpo_loss: kl_coef > 0 needs ref_logp")
    m = mask.bool()
    # masked slots may hold anything (padding, -inf): zero them first, or 0 * inf poisons the gradient
    logp = torch.where(m, logp, 0.0)
    old = torch.where(m, old_logp.to(logp.dtype), 0.0).detach()
    A = advantages.to(logp.dtype).detach()[:, None]                  # (B, 1): one advantage per response
    ratio = torch.exp(logp - old)                                     # (B, T)
    pg1 = -A * ratio
    pg2 = -A * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)                                      # = -min(rho*A, clip(rho)*A)
    kl = None
    if ref_logp is not None:
        d = torch.where(m, ref_logp.to(logp.dtype), 0.0).detach() - logp
        kl = torch.exp(d) - d - 1.0                                   # (B, T) k3 estimator
    per_tok = pg + kl_coef * kl if kl_coef else pg

    def aggregate(x):
        x = torch.where(m, x, 0.0)
        if agg == "seq-mean":
            per_seq = x.sum(-1) / m.sum(-1).clamp(min=1)
            return per_seq.sum() / (x.shape[0] if normalizer is None else normalizer)
        if agg == "token-mean":
            return x.sum() / (m.sum().clamp(min=1) if normalizer is None else normalizer)
        return x.sum() / (x.shape[0] * x.shape[1] if normalizer is None else normalizer)

    loss = aggregate(per_tok)
    with torch.no_grad():
        n = m.sum()
        tmean = lambda x: torch.where(m, x, 0.0).sum() / n.clamp(min=1)
        stats = dict(clip_frac=tmean((pg2 > pg1).to(logp.dtype)), ratio_mean=tmean(ratio),
                     kl=tmean(kl) if kl is not None else torch.zeros((), dtype=logp.dtype),
                     pg_loss=aggregate(pg), tokens=n)
    return loss, stats


FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.S)


def reward_fn(text, answer, options=None, acc_weight=0.9, format_weight=0.1):
    """-> dict(accuracy, format, total). accuracy: the option letter named by the response (data.extract_choice,
    the <answer> tag first -- the extraction eval.py uses) equals `answer`; format: the stripped text fullmatches
    <think>...</think><answer>...</answer>; total = acc_weight * accuracy + format_weight * format
    (paper release: 0.9 / 0.1)."""
    n = len(options) if options else len(LETTERS)
    acc = float(extract_choice(text, n, options) == answer)
    fmt = float(FORMAT_RE.fullmatch(text.strip()) is not None)
    return dict(accuracy=acc, format=fmt, total=acc_weight * acc + format_weight * fmt)


# -----------------------------------------------------------------------------
# helpers
def tick():
    """Wall clock once the device's queued work is done (this is a sync point on GPU: phase timings stay apart)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.cuda.is_available() else contextlib.nullcontext()


def lr_at(step):
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


def rollout_seed(pos):
    """Sampling seed of the G rollouts of the prompt drawn at data position `pos`: a pure function of the position,
    so rollouts do not depend on the rank layout (SP=2 == SP=1, DP splits), match between --mrsp=1 and --mrsp=0,
    and resume exactly."""
    return (seed * 1_000_003 + pos) % (1 << 62)


def load_pixels(rec, processor):
    """Decode + process one video: pixel_values_videos, video_grid_thw (1, 3), second_per_grid_ts (1,)."""
    return video_inputs(processor, rec, num_frames=frames, **video_kw())


def video_kw():
    """The frame flags as get_video_embeds keyword arguments (a record's own fields win)."""
    return video_flags(min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels)


def prompt_of(rec, processor, vid):
    """Prompt tokens (video expanded to its grid) + the video's grid: what a rollout engine or prefill needs."""
    t = encode_text(processor, rec, vid["video_grid_thw"], with_target=False)
    return dict(input_ids=t["input_ids"], mm_token_type_ids=t["mm_token_type_ids"],
                video_grid_thw=vid["video_grid_thw"], second_per_grid_ts=vid["second_per_grid_ts"])


def generate(rollout_model, llm, prompts, n, seeds, temp, tokenizer):
    """n samples for each of `prompts` (each carrying `embeds`), prompt i seeded with seeds[i] -> one list of n
    (token_ids, finish_reason, engine logprobs) per prompt.
    vLLM (llm: a VLLMEngine): ONE engine call for them all, made even when this rank has no prompt -- under torchrun
    the ranks' engines are data-parallel replicas that step in lockstep (mrsp.vllm_start), so every rank must call
    the engine equally often whatever its number of prompts. HF: one hf_rollout per prompt, its sampler seeded with
    the prompt's seed (vLLM seeds each request the same way: the samples do not depend on the batching)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    kw = dict(n=n, temperature=temp, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, eos_id=eos)
    assert len(seeds) == len(prompts), (len(seeds), len(prompts))
    if llm is not None:
        out = llm.rollout(prompts, seed=list(seeds), tokenizer=tokenizer, **kw)
        flat = list(zip(out["token_ids"], out["finish_reasons"], out["logprobs"]))
        assert len(flat) == n * len(prompts), (len(flat), n, len(prompts))
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]
    res = []
    device = next(rollout_model.parameters()).device
    for p, s in zip(prompts, seeds):
        gen = torch.Generator(device=device).manual_seed(s)
        out = hf_rollout(rollout_model, [p], generator=gen, pad_id=tokenizer.pad_token_id, **kw)
        res.append(list(zip(out["token_ids"], out["finish_reasons"], out["logprobs"])))
    return res


def naive_generate(rollout_model, llm, prompt, embeds, sample_seed, temp, tokenizer):
    """The naive loop's rollouts of one prompt: G requests, each carrying its OWN freshly encoded video (`embeds`, a
    list of G tensors). HF: mrsp.hf_rollout with per-sample videos -- G prefills in one batched forward (no prefix
    sharing), then the same batched decode and sampling, so for one seed both loops draw the same tokens (up to
    float ties) and only the vision and prefill work differ -- a fair baseline for the speed-up.
    vLLM: G requests of n=1 in one call (every DP rank holds as many prompts: the calls stay in lockstep).
    -> list of (token_ids, finish_reason, logprobs)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if llm is not None:
        out = llm.rollout([dict(prompt, embeds=e) for e in embeds], n=1, temperature=temp, top_p=top_p, top_k=top_k,
                          max_new_tokens=max_new_tokens, eos_id=eos, seed=sample_seed, tokenizer=tokenizer)
        return list(zip(out["token_ids"], out["finish_reasons"], out["logprobs"]))
    return generate(rollout_model, None, [dict(prompt, embeds=list(embeds))], len(embeds), [sample_seed], temp,
                    tokenizer)[0]


def finish_response(tokens, finish, logprobs, rec, tokenizer, video_token_id):
    """One sampled response -> dict(tokens, text, finish, cut, logprobs, accuracy, format, total).

    TRAP: the policy can sample <|video_pad|>. Every MR-SP forward (mrsp.embed_with_video, the SP prefill) fills the
    video slots BY TOKEN ID from the video embeddings, so a sampled one would be counted as video (an embeddings
    mismatch error, or a shifted video). Such a response is cut before its first <|video_pad|>, scored as malformed
    (reward 0), and only the kept prefix -- a valid sample prefix of the policy -- is trained on."""
    cut = video_token_id in tokens
    if cut:
        k = tokens.index(video_token_id)
        tokens, logprobs, finish = tokens[:k], logprobs[:k], "video_pad"
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    r = (dict(accuracy=0.0, format=0.0, total=0.0) if cut else
         reward_fn(text, rec["answer"], rec["options"], reward_acc_weight, reward_format_weight))
    return dict(tokens=list(tokens), text=text, finish=finish, cut=cut, logprobs=list(logprobs), **r)


def make_item(prompt, tokens, video, engine_logp=None, weight=1.0):
    """Prompt + response as one sequence to score: loss_mask True exactly on the response tokens (the SP prefill
    scores those), response mm_token_type_ids 0 (text). `video` indexes the step's video list; weight 0 marks a
    padding sequence (DP lockstep: forward and backward run, nothing is learned from it)."""
    resp = torch.tensor(tokens, dtype=torch.long)
    S = prompt["input_ids"].numel()
    return dict(input_ids=torch.cat([prompt["input_ids"], resp]),                               # (S + L,)
                mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(resp)]),
                loss_mask=torch.cat([torch.zeros(S, dtype=torch.bool), torch.ones(len(tokens), dtype=torch.bool)]),
                video_grid_thw=prompt["video_grid_thw"], second_per_grid_ts=prompt["second_per_grid_ts"],
                video=video, weight=weight,
                engine_logp=torch.tensor(engine_logp if engine_logp is not None else [0.0] * len(tokens)))


def video_source(purpose):
    """Where a forward's video comes from: "embeds" (the cache) or "pixels" (the vision tower runs inside it).
    MR-SP: the cached embeddings everywhere, except forwards whose vision tower is not the one that filled the cache
    -- with a trainable vision tower the training forward needs gradients and the reference keeps its own weights.
    Naive loop: always pixels."""
    if not mrsp:
        return "pixels"
    return "embeds" if (freeze_vision or purpose == "old") else "pixels"


def with_video(item, videos, use):
    v = videos[item["video"]]
    if use == "embeds":
        return dict(item, embeds=v["embeds"])
    return dict(item, pixel_values_videos=v["pixel_values_videos"])


def response_logprobs(model, seq, mesh, entropy=False):
    """(L,) log-probs of the response tokens (and their entropies) by the SP prefill, at the rollout temperature.
    Every rank of the SP group gets the same values; every rank of the mesh must call this equally often (FSDP)."""
    with autocast():
        out = sp_logprobs(model, seq, group=mesh.sp_group, impl=attn, logit_chunk=logit_chunk,
                          temperature=temperature, return_entropy=entropy)
    lp, ent = out if entropy else (out, None)
    m = seq["loss_mask"].to(lp.device)
    return lp[m], (ent[m] if entropy else None)


@torch.no_grad()
def prefill(model, items, videos, use, mesh):
    """Old-policy / reference log-probs of every item (no grad), -> list of (L_i,)."""
    with fsdp_gathered(model, keep_gathered):
        return [response_logprobs(model, with_video(it, videos, use), mesh)[0].float() for it in items]


def global_normaliser(items, idx, mesh):
    """This mini-batch's loss denominator summed over the DP ranks: every sequence's loss is divided by the SAME
    global number, so the per-sequence backward passes accumulate exactly the whole batch's gradient
    (this is a sync point)."""
    real = [i for i in idx if items[i]["weight"] > 0]   # padding sequences count for nothing
    x = torch.tensor([float(sum(int(items[i]["loss_mask"].sum()) for i in real)), float(len(real))],
                     dtype=torch.float64)
    if mesh.dp_group is not None:
        dist.all_reduce(x, group=mesh.dp_group)
    if agg == "token-mean":
        return max(x[0].item(), 1.0)
    if agg == "seq-mean":
        return max(x[1].item(), 1.0)
    return max(x[1].item(), 1.0) * max_new_tokens          # Dr. GRPO: a constant length (the generation budget)


def ppo_update(policy, opt, params, items, videos, adv, old, ref, mesh, step):
    """ppo_epochs passes over the items in mini-batches, one optimizer update each.
    items: this rank's sequences (the SAME count on every DP rank: FSDP collectives run in lockstep; padding items,
    weight 0, run forward and backward but add nothing to the loss, the normaliser or the stats);
    adv (n,); old: list of (L_i,) or None (pi_old = pi_theta: logp.detach(), one update per batch); ref: list or None.
    -> dict of local sums to reduce over DP: loss (per update, summed), clip, kl, ratio (token-weighted, all epochs),
       ent, gap (token-weighted, epoch 0), tokens, tokens0, updates, grad_norm (summed over updates), vision."""
    n = len(items)
    mb = n if mini_batch == 0 else max(1, mini_batch // mesh.dp_size)
    use = video_source("train")
    device = next(policy.parameters()).device
    acc = dict(loss=0.0, clip=0.0, kl=0.0, ratio=0.0, ent=0.0, gap=0.0, tokens=0.0, tokens0=0.0, updates=0,
               grad_norm=0.0, vision=0)
    for epoch in range(ppo_epochs):
        shuffle = ppo_epochs > 1 or mb < n
        order = np.random.default_rng([seed, step, epoch]).permutation(n) if shuffle else np.arange(n)
        for c0 in range(0, n, mb):
            idx = order[c0:c0 + mb]
            norm = global_normaliser(items, idx, mesh)
            loss_sum = 0.0
            with fsdp_gathered(policy, keep_gathered) as grad_sync:
                for k, i in enumerate(idx):
                    it = items[i]
                    lp, ent = response_logprobs(policy, with_video(it, videos, use), mesh, entropy=(epoch == 0))
                    acc["vision"] += use == "pixels"
                    lp = lp.float()
                    o = lp.detach() if old is None else old[i].to(device)
                    r = ref[i].to(device) if ref is not None else None
                    L = lp.numel()
                    loss, st = grpo_loss(lp[None], o[None], r[None] if r is not None else None, adv[i:i + 1].to(device),
                                         torch.ones(1, L, dtype=torch.bool, device=device), clip_low=clip_low,
                                         clip_high=clip_high, kl_coef=kl_coef, agg=agg, normalizer=norm)
                    grad_sync(last=k == len(idx) - 1)   # one reduce-scatter per mini-batch, after its last backward
                    (loss * it["weight"]).backward()   # weight 0 (padding): the backward's collectives still run
                    if not it["weight"]:
                        continue
                    loss_sum += loss.item()
                    acc["clip"] += st["clip_frac"].item() * L       # over every update (epoch 0 alone has ratio 1)
                    acc["kl"] += st["kl"].item() * L
                    acc["ratio"] += st["ratio_mean"].item() * L
                    acc["tokens"] += L
                    if epoch == 0:                                   # the rollout policy's own numbers
                        acc["ent"] += ent.sum().item()
                        acc["gap"] += (o.cpu() - it["engine_logp"]).abs().sum().item()
                        acc["tokens0"] += L
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            opt.step()
            opt.zero_grad(set_to_none=True)
            acc["loss"] += loss_sum
            acc["grad_norm"] += float(grad_norm)
            acc["updates"] += 1
    return acc


# -----------------------------------------------------------------------------
# the vLLM engine through the loop: awake for rollouts and evals, asleep while the trainer works
class VLLMEngine:
    """A vLLM engine (mrsp.vllm_start) with sleep mode around training, fed the policy's new weights before it
    generates again. wake(): weights back -> the policy's weights sent, if training changed them or sleep freed them
    (level 2) -> KV cache back (verl's and TRL's order: vLLM loads into resident weights, and needs no KV cache for
    it). sleep(): after a step's rollouts (level 0: never). wake() and the sync are collectives under FSDP and every
    rollout() is a lockstep engine call under torchrun: all ranks make the same calls in the same order.
    Every engine call is appended to `calls` (rl.py logs them per step as vllm_calls): vLLM refuses sleep mode on
    CPU, so there the calls still run (the engine pauses and resumes its scheduler, frees nothing) and their ORDER is
    what the tests can check."""

    def __init__(self, llm, policy, level):
        assert level in (0, 1, 2), level
        self.llm, self.policy, self.level = llm, policy, level
        self.asleep = self.stale = False
        self.calls, self.t_sync = [], 0.0      # since the last take_log()

    def _call(self, name, fn, *args):
        t0 = tick()
        self.calls.append(name)
        out = fn(self.llm, *args)
        self.t_sync += tick() - t0
        return out

    def wake(self):
        if self.asleep:
            self._call("wake(weights)", vllm_wake, ["weights"])
        if self.stale:
            self._call("sync", vllm_sync_weights, self.policy)
            self.stale = False
        if self.asleep:
            self._call("wake(kv_cache)", vllm_wake, ["kv_cache"])
            self.asleep = False

    def sleep(self):
        if self.level and not self.asleep:
            self._call(f"sleep({self.level})", vllm_sleep, self.level)
            self.asleep = True
            self.stale |= self.level == 2        # the weights are gone: the next wake must send them

    def rollout(self, prompts, **kw):
        assert not (self.asleep or self.stale), "VLLMEngine.rollout: wake() first (asleep or stale weights)"
        self.calls.append("generate")
        return vllm_rollout(self.llm, prompts, **kw)

    def take_log(self):
        """-> (calls, seconds in wake/sync/sleep) since the last take_log."""
        out = (self.calls, self.t_sync)
        self.calls, self.t_sync = [], 0.0
        return out


# -----------------------------------------------------------------------------
# rollouts: encode -> generate -> reward, for this rank's prompts
def collect(recs, positions, processor, rollout_model, llm, cache, mesh, device, version):
    """-> (videos, groups, counters). videos[k]: the video of prompt k for the prefills (embeds and/or
    pixel_values_videos); groups[k]: dict(rec, pos, prompt, video=k, responses=[finish_response dicts]).

    MR-SP: each video is encoded once (parallel over the SP group, through the cache), the G rollouts share it (one
    prefill, KV replicated), and the SP ranks split the prompts for generation, then exchange the results.
    Naive: the engine re-encodes the video for every single rollout request (naive_generate)."""
    tok = processor.tokenizer
    vid_id = rollout_model.config.video_token_id
    c = dict(t_encode=0.0, t_rollout=0.0, vision_passes=0)
    t0 = tick()
    if mrsp:
        vals, n_enc = get_video_embeds(rollout_model, processor, recs, cache, num_frames=frames, group=mesh.sp_group,
                                       **video_kw(),
                                       version=version, device=device)
        videos = [dict(v) for v in vals]
        if not freeze_vision:   # trainable vision: the training forward / reference re-encode pixels
            for v, r in zip(videos, recs):
                v["pixel_values_videos"] = load_pixels(r, processor)["pixel_values_videos"]
        c["vision_passes"] += n_enc
    else:
        videos = [load_pixels(r, processor) for r in recs]
    prompts = [prompt_of(r, processor, v) for r, v in zip(recs, videos)]
    c["t_encode"] += tick() - t0

    t0, t_enc = tick(), 0.0
    outs = [None] * len(recs)
    if mrsp:
        mine = list(range(mesh.sp_rank, len(recs), mesh.sp_size))   # may be none: generate() still runs
        res = generate(rollout_model, llm, [dict(prompts[k], embeds=videos[k]["embeds"]) for k in mine], group_size,
                       [rollout_seed(positions[k]) for k in mine], temperature, tok)
        for k, o in zip(mine, res):
            outs[k] = o
        if mesh.sp_size > 1:
            parts = [None] * mesh.sp_size
            dist.all_gather_object(parts, {k: outs[k] for k in mine}, group=mesh.sp_group)   # this is a sync point
            for p in parts:
                for k, o in p.items():
                    outs[k] = o
    else:
        for k, p in enumerate(prompts):
            embs = []
            for j in range(group_size):   # every rollout request carries its own video: G vision passes
                te = tick()
                with torch.no_grad():
                    embs.append(encode_videos(rollout_model, videos[k]["pixel_values_videos"].to(device),
                                              p["video_grid_thw"].to(device)))
                t_enc += tick() - te
                c["vision_passes"] += 1
            outs[k] = naive_generate(rollout_model, llm, p, embs, rollout_seed(positions[k]), temperature, tok)
    c["t_encode"] += t_enc
    c["t_rollout"] += tick() - t0 - t_enc
    groups = [dict(rec=r, pos=positions[k], prompt=prompts[k], video=k,
                   responses=[finish_response(t, f, lp, r, tok, vid_id) for t, f, lp in outs[k]])
              for k, r in enumerate(recs)]
    return videos, groups, c


def informative(group):
    """Dynamic sampling keeps a group only if its rewards differ (equal rewards -> zero advantages, no signal)."""
    return len({r["total"] for r in group["responses"]}) > 1


def balance_groups(kept, drawn, per_rank, dp_group=None):
    """-> (kept, pad): the groups this rank trains on. Every DP rank must run the same number of sequences (FSDP
    collectives run in lockstep), so all take k = max over ranks of min(len(kept), per_rank) groups; a rank with fewer
    kept groups pads with drawn-but-dropped ones, trained at loss weight 0 (the work runs, nothing is learned).
    Dropping every rank to the minimum instead would waste the signal found elsewhere (this is a sync point)."""
    k = torch.tensor([min(len(kept), per_rank)])
    if dp_group is not None:
        dist.all_reduce(k, op=dist.ReduceOp.MAX, group=dp_group)
    kept = kept[:int(k)]
    taken = {id(g) for g in kept}
    pad = [g for g in drawn if id(g) not in taken][:int(k) - len(kept)]   # drawn >= per_rank >= k: always enough
    return kept, pad


def reduce_sum(values, group):
    """dict of numbers -> the same dict summed over `group` (one all-reduce; a sync point)."""
    x = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    if group is not None:
        dist.all_reduce(x, group=group)
    return dict(zip(values, x.tolist()))


# -----------------------------------------------------------------------------
# held-out accuracy: greedy rollouts on the rollout engine, records split over all ranks
@torch.no_grad()
def evaluate(val, processor, rollout_model, llm, cache, device, world, rank):
    """Greedy accuracy on `val`, record i on rank i % world. All ranks call it (a collective: the vLLM engine's wake
    may sync weights under FSDP, and the counts are all-reduced)."""
    tok = processor.tokenizer
    if llm is not None:
        llm.wake()
    counts = torch.zeros(3 + 2 * len(CATEGORIES), dtype=torch.float64)
    # rounds of one record per rank, the last round short: with vLLM every rank calls generate once per round
    for i in range(0, len(val), world):
        recs = val[i + rank:i + rank + 1]   # [] on the ranks past the end
        prompts = []
        for rec in recs:
            (v,), _ = get_video_embeds(rollout_model, processor, [rec], cache, num_frames=frames, device=device,
                                       **video_kw())
            prompts.append(dict(prompt_of(rec, processor, v), embeds=v["embeds"]))
        for rec, ((t, f, lp),) in zip(recs, generate(rollout_model, llm, prompts, 1, [0] * len(prompts), 0.0, tok)):
            r = finish_response(t, f, lp, rec, tok, rollout_model.config.video_token_id)
            counts[:3] += torch.tensor([r["accuracy"], r["format"], 1.0], dtype=torch.float64)
            if rec["category"] in CATEGORIES:
                c = CATEGORIES.index(rec["category"])
                counts[3 + 2 * c] += r["accuracy"]
                counts[4 + 2 * c] += 1
    if world > 1:
        dist.all_reduce(counts)
    n = counts[2].clamp(min=1)
    res = dict(val_acc=(counts[0] / n).item(), val_format=(counts[1] / n).item())
    for c, name in enumerate(CATEGORIES):
        if counts[4 + 2 * c] > 0:
            res[f"val_acc_{name}"] = (counts[3 + 2 * c] / counts[4 + 2 * c]).item()
    return res


def frozen_dtype_of(device):
    """The dtype of the copies nobody trains (rollout copy, reference, a frozen vision tower): bf16 on GPUs, fp32 on
    CPU (the exactness tests rely on it)."""
    return "bfloat16" if device.type == "cuda" else "float32"


def build_models(device, mesh):
    """-> (policy, processor, rollout_model, ref). The policy: FSDP2 over the mesh, fp32 master weights. The rollout
    copy: unsharded, the HF engine; it also ENCODES the videos (per SP group, so DP ranks with different cache hits
    never wait on each other inside FSDP); with --engine=vllm it keeps only its vision tower (its LLM goes to the
    meta device: ~15 GB a rank less for a 7B in bf16, vLLM holds its own). The reference: frozen, FSDP-sharded, only
    when the KL term is on (else None). Rollout copy and reference are bf16 on GPUs, as verl (their forwards run
    under bf16 autocast anyway; a full fp32 7B copy costs ~30 GB a rank); CPU keeps fp32 (the exactness tests rely
    on it).
    Frozen vision (the default): ONE tower per rank, the policy's, shared as the same module by the rollout copy and
    the reference -- never trained, so no optimizer state and no sharding (FSDP ignores it): in the frozen dtype
    (bf16 on GPUs) it serves the policy's pixel forwards (--mrsp=0, under autocast) as well as the encoding. For a 7B
    (0.68B-parameter tower) that is 1.4 GB instead of 5.4 GB (fp32 + two bf16 copies) a rank. Checkpoints and the
    HF export carry it as part of the policy."""
    frozen_dtype = frozen_dtype_of(device)
    policy, processor = load_model(model, "float32", device)
    tower = None
    if freeze_vision:
        tower = policy.model.visual.to(getattr(torch, frozen_dtype)).requires_grad_(False)
    rollout_model = load_model(model, frozen_dtype, device, vision=tower)[0].eval()
    if engine == "vllm":
        rollout_model.model.language_model.to("meta")
        rollout_model.lm_head.to("meta")
    prepare_model(policy, mesh, freeze_vision=freeze_vision, activation_checkpointing=activation_checkpointing)
    policy.train()
    ref = None
    if kl_coef > 0:
        ref = load_model(model, frozen_dtype, device, vision=tower)[0].eval().requires_grad_(False)
        prepare_model(ref, mesh, freeze_vision=True)
    if tower is not None:
        tower.eval()   # policy.train() reached it through the policy; frozen, it runs as in inference everywhere
        assert rollout_model.model.visual is tower and (ref is None or ref.model.visual is tower)
    return policy, processor, rollout_model, ref


def check_config():
    """Flag errors that need no model: clear messages naming the flag and value."""
    if agg not in AGGS:
        raise SystemExit(f"--agg={agg}: expected one of {', '.join(AGGS)}")
    if adv_norm not in ("std", "none"):
        raise SystemExit(f"--adv_norm={adv_norm}: expected std or none")
    if engine not in ("hf", "vllm"):
        raise SystemExit(f"--engine={engine}: expected hf or vllm")
    if group_size < 2:
        raise SystemExit(f"--group_size={group_size}: GRPO needs at least 2 rollouts per prompt")
    if temperature <= 0:
        raise SystemExit(f"--temperature={temperature}: RL samples need a positive temperature")
    if ppo_epochs < 1 or prompts_per_step < 1 or mini_batch < 0:
        raise SystemExit("--ppo_epochs and --prompts_per_step must be >= 1, --mini_batch >= 0")
    if vllm_sleep_level not in (0, 1, 2):
        raise SystemExit(f"--vllm_sleep_level={vllm_sleep_level}: expected 0 (never sleep), 1 or 2")
    if not mrsp and sp != 1:
        raise SystemExit(f"--mrsp=0 (the naive loop) runs without sequence parallelism: use --sp=1 (got --sp={sp})")


def check_videos(recs, flag, path):
    missing = [r for r in recs if not os.path.isfile(r["video"])]
    if missing:
        r = missing[0]
        raise SystemExit(f"--{flag}={path}: {len(missing)} record(s) name a missing video, e.g. record "
                         f"{r['id']!r}: {r['video']}: no such file")


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    cfg = config_of(globals())
    check_config()

    # --- init
    rank, local_rank, world, device = setup_dist()
    master_process = rank == 0
    try:
        mesh = setup_mesh(sp)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if prompts_per_step % mesh.dp_size or mini_batch % mesh.dp_size:
        raise SystemExit(f"--prompts_per_step={prompts_per_step} and --mini_batch={mini_batch} must be divisible by "
                         f"the data-parallel size {mesh.dp_size} (world {world} / sp {sp})")
    torch.manual_seed(seed); np.random.seed(seed)
    print0("config:", json.dumps(cfg))
    if master_process:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)

    # --- data
    train = load_records(data)
    val = load_records(val_data)[:eval_samples] if val_data else []
    check_videos(train, "data", data)
    check_videos(val, "val_data", val_data)
    print0(f"data: {len(train)} train / {len(val)} val records; dp={mesh.dp_size} sp={mesh.sp_size} "
           f"mrsp={int(mrsp)} engine={engine}")

    # --- models (build_models) and the vLLM engine
    policy, processor, rollout_model, ref = build_models(device, mesh)
    llm = None
    if engine == "vllm":   # one engine per rank (mrsp.vllm_start); its own vision tower is not built
        llm = VLLMEngine(vllm_start(model, max_model_len=vllm_max_model_len, seed=seed,
                                    gpu_memory_utilization=vllm_memory,
                                    enable_sleep_mode=vllm_sleep_level > 0 and device.type == "cuda"), policy,
                         vllm_sleep_level)
    # frozen vision: one cache for the whole run (version 0); trainable: keyed by step (fresh embeddings each step)
    cache = EmbeddingCache(cache_bytes) if mrsp else None
    eval_cache = EmbeddingCache(cache_bytes) if freeze_vision else None   # its own: SP ranks' caches stay identical

    # --- optim
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    start, extra = load_checkpoint(out_dir, policy, opt, rank) if resume else (0, None)
    draws = extra["draws"] if extra else start          # prompt batches drawn so far (> steps with dynamic sampling)

    def sync_engines():   # after every update (collective under FSDP: all ranks call)
        if llm is None or not freeze_vision:   # with vLLM the HF copy holds only the vision tower: synced if trained
            sync_weights(policy, rollout_model)
        if llm is not None:   # sent at its next wake (before the next rollouts or eval): it may be asleep now
            llm.stale = True

    if start:
        sync_engines()    # the rollout engine must generate with the resumed weights

    log = metrics_logger(out_dir, cfg, wandb_project, master_process)

    if val and eval_first and start == 0:
        row = dict(step=0, **evaluate(val, processor, rollout_model, llm, eval_cache, device, world, rank))
        if llm is not None:
            row["vllm_calls"] = llm.take_log()[0]
        log(row)

    # --- loop
    bar = tqdm(range(start, steps), desc="rl", disable=not master_process, initial=start, total=steps)
    done_here = 0
    per_rank = prompts_per_step // mesh.dp_size
    for step in bar:
        t_step = tick()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        version = 0 if freeze_vision else step
        t = dict(t_encode=0.0, t_rollout=0.0, vision_passes=0)
        videos, drawn, kept, rounds = [], [], [], 0
        if llm is not None:
            llm.wake()    # the previous step's weights in (collective)
        while True:   # one prompt draw; dynamic sampling draws again while too few groups carry signal
            idx = batch_indices(draws, len(train), prompts_per_step, seed)[mesh.dp_rank::mesh.dp_size]
            pos = list(range(draws * prompts_per_step, (draws + 1) * prompts_per_step))[mesh.dp_rank::mesh.dp_size]
            vids, groups, c = collect([train[i] for i in idx], pos, processor, rollout_model, llm, cache, mesh,
                                      device, version)
            draws += 1; rounds += 1
            for k in t:
                t[k] += c[k]
            for g in groups:
                g["video"] += len(videos)
            videos += vids
            drawn += groups
            if not dynamic_sampling:
                kept = groups
                break
            kept += [g for g in groups if informative(g)]
            # every rank's quota counts: informative groups beyond one rank's share cannot fill another's
            n_kept = reduce_sum(dict(n=min(len(kept), per_rank)), mesh.dp_group)["n"]
            if n_kept >= prompts_per_step or rounds >= max_sample_rounds:
                break
        if llm is not None:
            llm.sleep()   # GPU memory back to the trainer until the next rollouts
        kept, pad = balance_groups(kept, drawn, per_rank, mesh.dp_group)
        taken = {id(g) for g in kept}

        # rewards of everything sampled this step (the reward curve), kept-group advantages
        resp = [r for g in drawn for r in g["responses"]]
        rs = reduce_sum(dict(reward=sum(r["total"] for r in resp), acc=sum(r["accuracy"] for r in resp),
                             fmt=sum(r["format"] for r in resp), len=sum(len(r["tokens"]) for r in resp),
                             cuts=sum(r["cut"] for r in resp), n=len(resp), drawn=len(drawn), kept=len(kept)),
                        mesh.dp_group)
        items, adv = [], []
        for g in kept + pad:
            w = float(id(g) in taken)
            adv.append(w * group_advantages([r["total"] for r in g["responses"]], group_size, adv_norm))
            items += [make_item(g["prompt"], r["tokens"], g["video"], r["logprobs"], weight=w) for r in g["responses"]]
        adv = torch.cat(adv) if adv else torch.zeros(0)

        # old-policy and reference log-probs: SP prefill, no grad, the rollout temperature
        t0 = tick()
        old = refs = None
        mb = len(items) if mini_batch == 0 else max(1, mini_batch // mesh.dp_size)
        one_update = ppo_epochs == 1 and mb >= len(items)
        if items and (recompute_old or not one_update):
            old = prefill(policy, items, videos, video_source("old"), mesh)
            t["vision_passes"] += len(items) * (video_source("old") == "pixels")
        if items and ref is not None:
            refs = prefill(ref, items, videos, video_source("ref"), mesh)
            t["vision_passes"] += len(items) * (video_source("ref") == "pixels")
        t_prefill = tick() - t0

        # PPO-style updates, then the new weights go to the rollout engine
        t0 = tick()
        acc = dict(loss=0.0, clip=0.0, kl=0.0, ratio=0.0, ent=0.0, gap=0.0, tokens=0.0, tokens0=0.0, updates=0,
                   grad_norm=0.0, vision=0)
        if items:   # the same count on every rank: all train, or all skip
            acc = ppo_update(policy, opt, params, items, videos, adv, old, refs, mesh, step)
            t["vision_passes"] += acc["vision"]
        t_train = tick() - t0
        t0 = tick()
        if items:
            sync_engines()
        t_sync = tick() - t0
        engine_calls = []
        if llm is not None:   # the step's wake / weight sync / sleep time counts as sync time
            engine_calls, t_engine = llm.take_log()
            t_sync += t_engine
        seq_tokens = sum(it["input_ids"].numel() for it in items)

        # SP ranks hold the same sequences: sum over DP only; vision passes counted on SP rank 0, then over SP
        tr = reduce_sum(dict(loss=acc["loss"], clip=acc["clip"], kl=acc["kl"], ratio=acc["ratio"], ent=acc["ent"],
                             gap=acc["gap"], tokens=acc["tokens"], tokens0=acc["tokens0"], seq_tokens=seq_tokens,
                             vision=t["vision_passes"] * (mesh.sp_rank == 0)), mesh.dp_group)
        vision_passes = reduce_sum(dict(v=tr["vision"]), mesh.sp_group)["v"]
        dt = tick() - t_step
        n_resp, ntok, ntok0 = max(rs["n"], 1.0), max(tr["tokens"], 1.0), max(tr["tokens0"], 1.0)
        updates = max(acc["updates"], 1)
        row = dict(step=step + 1, reward_mean=rs["reward"] / n_resp, accuracy=rs["acc"] / n_resp,
                   format_rate=rs["fmt"] / n_resp, response_len=rs["len"] / n_resp, kl=tr["kl"] / ntok,
                   clip_frac=tr["clip"] / ntok, ratio_mean=tr["ratio"] / ntok, entropy=tr["ent"] / ntok0,
                   loss=tr["loss"] / updates, grad_norm=acc["grad_norm"] / updates, lr=lr_at(step),
                   logp_gap=tr["gap"] / ntok0, tokens_per_s=tr["seq_tokens"] / dt, t_encode=t["t_encode"],
                   t_rollout=t["t_rollout"], t_prefill=t_prefill, t_train=t_train, t_sync=t_sync, step_time=dt,
                   vision_passes=int(vision_passes), peak_mem_gb=peak_memory_gb(world),
                   dropped_groups=int(rs["drawn"] - rs["kept"]), trained_groups=int(rs["kept"]), sample_rounds=rounds,
                   video_pad_cuts=int(rs["cuts"]), updates=acc["updates"])
        if cache is not None:
            row.update(cache_hits=cache.stats["hits"], cache_misses=cache.stats["misses"])
        if val and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == steps):
            row.update(evaluate(val, processor, rollout_model, llm, eval_cache, device, world, rank))
        if llm is not None:   # this step's engine calls in order, eval's included (every rank makes the same ones)
            row["vllm_calls"] = engine_calls + llm.take_log()[0]
        log(row)
        if master_process and (step + 1) % log_every == 0:
            keys = ("reward_mean", "accuracy", "format_rate", "response_len", "kl", "clip_frac", "entropy", "loss",
                    "step_time", "val_acc")
            tqdm.write(f"step {step + 1}/{steps}: " + " ".join(f"{k} {row[k]:.4g}" for k in keys if k in row))
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_checkpoint(out_dir, step + 1, policy, opt, cfg, world, rank, keep=keep_checkpoints,
                            extra=dict(draws=draws))
        done_here += 1
        if stop_after and done_here >= stop_after:
            print0(f"stop_after={stop_after}: stopping at step {step + 1} (simulated interruption)")
            break
    else:
        # --- export a standard HF checkpoint (model + processor) for eval.py / vLLM
        if llm is not None:   # the HF copy has no LLM weights: export through a full copy on the CPU
            rollout_model = load_model(model, frozen_dtype_of(device), "cpu")[0]
        export_hf(policy, rollout_model, processor, out_dir, cfg, master_process)
    if world > 1:
        dist.barrier()
    if llm is not None:
        vllm_stop(llm.llm)   # after the last collective: vLLM's teardown destroys the default process group too
    if dist.is_initialized():
        dist.destroy_process_group()
