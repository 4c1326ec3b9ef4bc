"""
rl.py -- stage 2: GRPO on long videos with MR-SP (LongVILA-R1, "Scaling RL to Long Videos").

One step, as the paper's figure draws it and as the loop below reads: (1) collect: each prompt's video decoded and
encoded ONCE (parallel over the SP group, through the embedding cache), G rollouts per prompt from the rollout engine
fed the cached embeddings; (2) old-policy and reference log-probs by the sequence-parallel prefill (cached
embeddings, the rollout temperature); (3) rewards (0.9 accuracy + 0.1 format; minus the KL with --kl_in_reward, which
is why they follow the prefills) -> group advantages; (4) PPO-style clipped updates with the global denominators;
(5) weight sync to the rollout engine. --loop=naive is the loop the paper
compares against: no cache, the vision tower re-encodes the video for every rollout and inside every prefill /
training forward, no sequence parallelism; the math is the same (tests/test_rl.py checks equal losses).

How this departs from the paper's release (EasyR1-based Long-RL): one process group does everything (no Ray; the
rollout engine is an HF copy of the model, or vLLM colocated on every rank); the reference model is the LLM only
(it never sees pixels: the frozen tower's cached embeddings serve it too); rollouts are seeded by the prompt's data
position, so any DP/SP layout and a resume draw the same tokens.

Single process (CPU or one GPU), from an SFT checkpoint:
    python rl.py --model=out/sft/hf --data=data/synth/train.jsonl --val_data=data/synth/val.jsonl --out_dir=out/rl
Data + sequence parallel (here DP=1, SP=2):
    torchrun --standalone --nproc_per_node=2 rl.py --sp=2 --model=out/sft/hf --data=data/synth/train.jsonl
Tiny CPU example (~2 s a step on 2 CPU cores at 16 frames):
    python rl.py --model=out/sft/hf --frames=16 --prompts_per_step=4 --group_size=4 --max_new_tokens=96 \
        --lr=1e-4 --steps=30 --eval_every=10 --eval_samples=16
Naive baseline for the MR-SP speed-up benchmark (same flags plus; needs --sp=1):
    --loop=naive
Real checkpoint on 8 GPUs (the paper's release settings are the defaults: G=5, clip 0.2/0.3, dual clip 3, k3 KL 1e-2,
lr 1e-6):
    torchrun --nproc_per_node=8 rl.py --model=/ckpt/LongVILA-R1-7B-SFT --data=/data/lvr/rl.jsonl --sp=4 \
        --frames=512 --prompts_per_step=32 --max_new_tokens=1024 --activation_checkpointing=1 --keep_gathered=0 \
        --engine=vllm
Ablations (verl's names and scales; the README's table gives TRL's equivalents; docs/rl_options_results.md runs them):
    --kl_coef=0                                            no KL term, no reference model (no ref prefill)
    --clip_high=0.28 --kl_coef=0 --dynamic_sampling=1      DAPO-style (clip-higher, online filtering)
    --adv_estimator=dr_grpo --agg=seq-mean-token-sum-norm  Dr. GRPO (no std; constant normaliser max_new_tokens)
    --agg=seq-mean-token-mean                              original GRPO sequence mean (this repo's old "seq-mean")
    --agg=seq-mean-token-sum                               verl's: response token sums averaged (NOT Dr. GRPO: T x it)
    --clip_ratio_c=0                                       no dual clip (default 3: an A < 0 token's loss <= -3A)
    --tis_cap=2  [--tis_mode=mask]                         truncated (masked) importance sampling pi_old / pi_engine
    --policy_loss=gspo                                     GSPO: sequence ratio, its own clip (--gspo_clip_low/high)
    --kl_type=low_var_kl   (k1 | k2 | abs | k3)            KL estimator (default k3; verl's "k3" is low_var_kl)
    --kl_in_reward=1                                       KL as a reward penalty instead of a loss term
    --entropy_coef=1e-3                                    entropy bonus
    --adv_estimator=rloo   (reinforce_plus_plus, _baseline) RLOO / REINFORCE++ (batch-whitened) advantages
    --ppo_epochs=2 --mini_batch=16                         several updates per rollout batch (pi_old != pi_theta)
Resume after an interruption (same command plus):
    --resume=1            # continues from out_dir/latest: same next prompts, same rollouts, same next loss

Design choices (and the traps they avoid):
  * The rollout engine's unsharded HF copy also ENCODES the videos: encoding through the FSDP policy would make DP
    ranks with different cache hits wait on each other's all-gathers. Parallel encoding still runs over the SP group,
    whose ranks share prompts and cache history. A frozen vision tower exists ONCE per rank: the policy's, in bf16 on
    GPUs, shared as the same module by the rollout copy and the reference.
  * --engine=vllm (mrsp.VLLMEngine): under torchrun one engine per rank, on its own device (vLLM's external
    launcher, the engines data-parallel). They step in lockstep, so every rank calls the engine once per prompt draw
    and once per eval round, even with no prompt of its own. The engine sleeps after the rollouts (--vllm_sleep_level,
    GPU) and wakes before the next rollouts or eval: weights back -> the new weights streamed in tensor by tensor ->
    KV cache back; metrics.jsonl lists each step's engine calls (vllm_calls). vLLM builds no vision tower of its own
    (Qwen3-VL's: built, never run) and takes every record kind: images, several videos, both, or text only.
  * FSDP lockstep: every rank must run the policy forward/backward equally often. DP ranks always train the same
    number of groups; with dynamic sampling a rank short of informative groups pads with dropped ones at loss
    weight 0 (balance_groups). SP ranks hold the same sequences.
  * A sampled <|video_pad|> (or, in a record with images, <|image_pad|>) would be taken for a video (image) slot by
    every forward: the response is cut before it and rewarded 0 (finish_response).
  * Old-policy log-probs are recomputed by the SP prefill (recompute_old=1, as the paper's system); --recompute_old=0
    reuses logp.detach() when there is one update per batch.
  * Trainable vision (--freeze_vision=0, not the paper's RL setting): rollouts and the old-policy prefill use the
    step's fresh embeddings (cache keyed by step), the training forward and the reference re-encode pixels (cached
    embeddings carry no gradient and are not the reference's).
  * --loop=naive: every rollout request carries its own freshly encoded video and images (G encodes + G prefills
    per prompt, decode still batched), and the old/ref prefills and training forwards take pixels; vision_passes in
    metrics.jsonl.
  * --loop=baseline: the paper's baseline as EasyR1 / Long-RL run it (bench/bench_baseline.py documents each step):
    per prompt the dataset decodes the video, the rollout worker decodes + pre-processes it and encodes it once for
    ONE prefill shared by the G samples, the actor decodes + pre-processes it for each of the G sequences, and the
    old/ref/update forwards run the vision tower per sequence: G+2 decodes, G+1 processor runs, 3G+1 vision passes.
    --decode_once=1 keeps the vision passes and decodes once (its compute-only control). metrics.jsonl counts
    decodes_step, processor_runs_step, rollout_prefills and times decode_s_step / process_s_step (+ _cpu_), t_old,
    t_ref, t_actor_prep.

Outputs in out_dir: metrics.jsonl (one row per step: reward/accuracy/format, KL, clip fractions, entropy, the
rollout/trainer mismatch tis_mismatch_mean/max and tis_trunc_frac, time split encode/rollout/prefill/train/sync,
vision_passes, ...; val_* every eval_every), config.json, step_NNNNNN/ (sharded
DCP checkpoints), latest, and hf/ (a standard HF checkpoint + processor).
"""
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common import (apply_overrides, autocast, batch_indices, check_seconds, clip_grad, config_of, export_hf,
                    gather_rows, load_checkpoint, metrics_logger, phase, phase_memory, print0, reduce_sum,
                    sample_seed, save_checkpoint, setup_dist, teardown, tick, watchdog)
import data as data_lib   # its COUNTS (decodes, processor runs) and FRAME_CACHE
import mrsp as mrsp_lib   # its ROLLOUT_TIMES (the HF engine's prefill / decode seconds)
from data import (LETTERS, FrameCache, check_videos, decode_opts, encode_text, image_inputs, load_records, load_video,
                  most_videos, no_video, set_decode_backend, video_flags, video_inputs, video_options)
from reward import extract_choice, follows_format, score_answer
from mrsp import (EmbeddingCache, VLLMEngine, accuracy_metrics, encode_videos, evaluate, fsdp_gathered,
                  get_video_embeds, load_model, load_models, rollout, setup_mesh, sp_logprobs, sync_weights,
                  vllm_start)

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
loop = "mrsp"               # mrsp | naive: the baseline loop (no cache: re-encode per rollout and per prefill; sp 1)
                            # | baseline: EasyR1 / Long-RL semantics (G+2 decodes, G+1 processor runs, 3G+1 vision
                            #   passes per prompt, one shared rollout prefill; sp 1): the paper's baseline
decode_once = False         # --loop=baseline: decode + pre-process each video once (the compute-only control)
frame_cache_dir = ""        # on-disk cache of decoded + resized frames (data.FrameCache), for data reused over epochs
decode_backend = ""         # pyav | decord | pyav-seq (no seeking): the only decoder; "": PyAV, then decord
engine = "hf"               # rollout engine: hf (an unsharded copy of the model) | vllm (needs vllm installed)
prompts_per_step = 8        # prompts per RL step, global (divisible by the data-parallel size)
group_size = 5              # G rollouts per prompt (paper release: 5)
temperature = 1.0           # rollout temperature; the log-prob recomputes use the same one
top_p = 1.0
top_k = 0
max_new_tokens = 256        # response budget (also Dr. GRPO's constant normaliser)
ppo_epochs = 1              # passes over each rollout batch
mini_batch = 0              # sequences per optimizer update, global; 0 = the whole step's batch (one update/epoch)
micro_batch = 1             # sequences per forward (update and prefills) on a rank, right-padded into one batch (verl
                            # ppo_micro_batch_size_per_gpu; same loss, more memory); 1 suits long videos
recompute_old = True        # old-policy log-probs by a no-grad prefill (as the paper's system); False reuses
                            # logp.detach() when there is one update per batch (pi_old = pi_theta, one forward less;
                            # --kl_in_reward needs pi_old before the update: the prefill runs regardless)
lr = 1e-6                   # paper release; constant after warmup
warmup_steps = 0
weight_decay = 1e-2
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
clip_low = 0.2              # ratio clipped to [1 - clip_low, 1 + clip_high]
clip_high = 0.3             # paper release 0.3 ("clip-higher"; DAPO 0.28)
clip_ratio_c = 3.0          # dual clip (verl clip_ratio_c, EasyR1 clip_ratio_dual, TRL delta): a negative-advantage
                            # token's loss is capped at -A * c (> 1; 0 = off); the paper release's and verl's 3.0
policy_loss = "vanilla"     # vanilla: per-token ratio | gspo: the sequence's length-normalised ratio (GSPO; verl
                            # policy_loss.loss_mode=gspo, TRL importance_sampling_level="sequence")
gspo_clip_low = 3e-4        # --policy_loss=gspo: its own clip range (the GSPO paper's 3e-4 / 4e-4), not clip_low/high
gspo_clip_high = 4e-4
kl_coef = 1e-2              # KL to the reference model; 0 = no reference model at all
kl_type = "k3"              # k1 (kl) | abs | k2 (mse) | k3 | low_var_kl (k3 clamped as verl; verl's "k3") -- kl_penalty
kl_in_reward = False        # KL as a reward penalty (verl use_kl_in_reward): each response's reward minus kl_coef *
                            # its summed KL(pi_old || ref), before the advantages; no KL loss term
entropy_coef = 0.0          # entropy bonus (verl entropy_coeff): loss -= entropy_coef * agg(token entropy)
agg = "token-mean"          # verl loss_agg_mode: token-mean | seq-mean-token-sum | seq-mean-token-mean |
                            # seq-mean-token-sum-norm (Dr. GRPO, normaliser max_new_tokens); grpo_loss has the formulas
adv_estimator = "grpo"      # grpo | dr_grpo | rloo | reinforce_plus_plus | reinforce_plus_plus_baseline (verl names)
adv_norm = "std"            # grpo: std: (r - mean) / (std + eps) | none: r - mean (verl norm_adv_by_std_in_grpo)
tis_cap = 0.0               # rollout/trainer mismatch correction: the policy-gradient term of each token weighted by
                            # min(pi_old / pi_rollout, tis_cap), pi_rollout the engine's sampled-token log-probs (TIS;
                            # verl tis_imp_ratio_cap, TRL vllm_importance_sampling_cap); 0 = off (the mismatch is
                            # logged either way)
tis_mode = "truncate"       # truncate: min(w, cap) | mask: w, or 0 where w > cap (TRL token_mask, "MIS")
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
eval_batch_size = 16        # --engine=vllm: held-out prompts per engine call (the HF engine answers one at a time)
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
dist_timeout = 60           # minutes a collective may wait for the other ranks before it fails
phase_timeout = 3600.0      # seconds one phase may take; past it every rank dumps its stacks to out_dir/hang_rank*.txt
                            # and the job ends, instead of hanging without a word
check_phases = True         # ranks compare phase fingerprints (one small all-gather per phase) and fail loudly

# verl's names (loss_agg_mode, kl_penalty, adv_estimator, policy_loss.loss_mode) and scales; the README's ablation
# table maps each to TRL's loss_type / flags
AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
AGG_RENAMED = {"seq-mean": "seq-mean-token-mean"}   # this repo's old name -> verl's (the same loss)
KL_TYPES = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
ADV_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
POLICY_LOSSES = ("vanilla", "gspo")
TIS_MODES = ("truncate", "mask")


# -----------------------------------------------------------------------------
# GRPO math (public API: users copy these four)
def group_advantages(rewards, group_size, norm="std", eps=1e-6, estimator="grpo", lengths=None):
    """(N,) rewards, N = groups * group_size, each group's G rollouts contiguous -> (N,) advantages, one per response
    (shared by its tokens). estimator, by verl's adv_estimator names:
      "grpo"     (r - group mean) / (group std + eps), std with Bessel's correction (verl, TRL); norm "none": r - mean
                 (verl norm_adv_by_std_in_grpo=False, TRL scale_rewards="none")
      "dr_grpo"  r - group mean (Dr. GRPO's advantage; = grpo with norm "none")
      "rloo"     r - mean of the group's OTHER G-1 rewards = G/(G-1) (r - group mean) (verl rloo, TRL RLOOTrainer)
      "reinforce_plus_plus"           no group baseline: r whitened over the BATCH, (r - mu) / sqrt(var + 1e-8), mu and
                 the unbiased var over every response token (verl's masked_whiten of the gamma=1 returns: response i
                 counts lengths[i] times; lengths None = once each)
      "reinforce_plus_plus_baseline"  r - group mean, then the same batch whitening
    The batch estimators see only the rows passed in: rl.py passes the whole step's batch (all DP ranks).
    Under grpo / dr_grpo / rloo a group whose rewards are all equal gets exactly 0: no signal, and no 0/eps blow-up
    from the rounding of its mean (mean(0.1, 0.1, 0.1) != 0.1 in float). Float64 rewards stay float64."""
    r = torch.as_tensor(rewards)
    r = r if r.dtype == torch.float64 else r.float()
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"group_advantages: {r.numel()} rewards do not split into groups of {group_size}")
    if norm not in ("std", "none"):
        raise ValueError(f"group_advantages: norm={norm!r}, expected 'std' or 'none'")
    if estimator not in ADV_ESTIMATORS:
        raise ValueError(f"group_advantages: estimator={estimator!r}, expected one of {ADV_ESTIMATORS}")
    g = r.view(-1, group_size)                                         # (groups, G)
    G, mean = group_size, g.mean(-1, keepdim=True)
    same = g.max(-1, keepdim=True).values == g.min(-1, keepdim=True).values
    if estimator == "reinforce_plus_plus":
        return _batch_whiten(r, lengths)
    adv = g - mean
    if estimator == "grpo" and norm == "std" and G > 1:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    elif estimator == "rloo" and G > 1:
        adv = g * G / (G - 1) - mean * G / (G - 1)                     # verl's form: r - (sum - r) / (G - 1)
    adv = torch.where(same, torch.zeros_like(adv), adv).view(-1)
    return _batch_whiten(adv, lengths) if estimator == "reinforce_plus_plus_baseline" else adv


def _batch_whiten(x, lengths=None):
    """verl_F.masked_whiten of per-response values repeated over their tokens: (x - mu) * rsqrt(var + 1e-8), mu and
    the unbiased var over all tokens (response i weighs lengths[i]); fewer than 2 tokens -> zeros."""
    w = torch.ones_like(x) if lengths is None else torch.as_tensor(lengths, dtype=x.dtype)
    n = w.sum()
    if n < 2:
        return torch.zeros_like(x)
    mu = (w * x).sum() / n
    var = (w * (x - mu) ** 2).sum() / n * (n / (n - 1))                # Bessel's correction, as masked_var
    return (x - mu) * torch.rsqrt(var + 1e-8)


def kl_penalty(logp, ref_logp, kind="k3"):
    """Per-token KL(policy || reference) estimate at the sampled tokens, by verl's kl_penalty names:
      "k1" / "kl"   logp - ref                              (unbiased, can be negative)
      "abs"         |logp - ref|
      "k2" / "mse"  (logp - ref)^2 / 2
      "k3"          exp(ref - logp) - (ref - logp) - 1      (>= 0; TRL's GRPO KL; this repo's only one before)
      "low_var_kl"  k3 with ref - logp clamped to [-20, 20] and the result to [-10, 10] (verl's low_var_kl -- which
                    verl also calls "k3": a verl "k3" config is --kl_type=low_var_kl here; they differ only past
                    those clamps)"""
    d = logp - ref_logp
    if kind in ("k1", "kl"):
        return d
    if kind == "abs":
        return d.abs()
    if kind in ("k2", "mse"):
        return 0.5 * d.square()
    if kind == "k3":
        return torch.exp(-d) + d - 1.0
    if kind == "low_var_kl":
        x = (-d).clamp(-20.0, 20.0)
        return (torch.exp(x) - x - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"kl_penalty: kind={kind!r}, expected one of {KL_TYPES}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_low=0.2, clip_high=0.2, kl_coef=0.0,
              agg="token-mean", clip_ratio_c=0.0, policy_loss="vanilla", kl_type="k3", entropy=None,
              entropy_coef=0.0, rollout_logp=None, tis_cap=0.0, tis_mode="truncate", batch_num_tokens=None,
              global_batch_size=None, loss_scale_factor=None):
    """Clipped-ratio policy loss (verl's compute_policy_loss_vanilla / _gspo + agg_loss, TRL's GRPOTrainer loss)
    with an optional KL term and entropy bonus.

    logp (B, T) current policy log-probs of the sampled tokens (carries the gradient); old_logp (B, T); ref_logp
    (B, T) or None (needed when kl_coef > 0; also gives the kl stat); advantages (B,); mask (B, T) bool, the
    response tokens; entropy (B, T) the policy's per-token entropies (with gradient) when entropy_coef != 0;
    rollout_logp (B, T) the rollout engine's log-probs of the sampled tokens (TIS, and the mismatch stats).
    Per token, rho = exp(logp - old):
      vanilla  l = max(-A*rho, -A*clip(rho, 1-clip_low, 1+clip_high)); dual clip (clip_ratio_c = c > 1, verl's
               clip_ratio_c, TRL's delta): for A < 0, l = min(l, -A*c). 0 = off.
      gspo     rho_i = exp(mean over response i of (logp - old)), the same for its tokens; per token
               exp(sg[log rho_i] + logp - sg[logp]) (value rho_i, gradient rho_i * grad logp_t), log clamped at 10;
               then the vanilla clip without dual clip; aggregated "seq-mean-token-mean" whatever `agg` (as verl)
      TIS      (tis_cap > 0) l *= w, w = pi_old / pi_rollout = exp(old - rollout) per token, "truncate": min(w, cap)
               (verl tis_imp_ratio_cap, TRL vllm_importance_sampling_mode="token_truncate"), "mask": w, or 0 where
               w > cap (TRL "token_mask"). Only the policy-gradient term is weighted.
    loss = agg(l) + kl_coef * agg(kl_penalty(logp, ref, kl_type)) - entropy_coef * agg(entropy).
    agg (verl's loss_agg_mode; n_i = response i's token count; the denominators default to this batch's):
      "token-mean"               sum l / batch_num_tokens                       TRL "dapo" ("bnpo" per micro-batch)
      "seq-mean-token-sum"       sum_i (sum_t l) / global_batch_size            (no TRL equivalent)
      "seq-mean-token-mean"      sum_i (sum_t l / n_i) / global_batch_size      TRL "grpo"
      "seq-mean-token-sum-norm"  sum l / (global_batch_size * loss_scale_factor) TRL "dr_grpo" (Dr. GRPO)
    batch_num_tokens, global_batch_size (sequences, empty ones included), loss_scale_factor (default T; rl.py: the
    generation budget): the GLOBAL numbers when a batch is split into micro-batches / ranks -- every part passes the
    same ones, so the parts' losses and gradients add up to the whole batch's (verl's global-batch agg_loss).
    -> (loss, stats) with stats (detached, token means over the mask): clip_frac (tokens where the clipped term is
       the active one), clip_frac_lower (dual clip active), kl, ratio_mean, pg_loss (the policy-gradient term alone),
       tokens; with rollout_logp: tis_mismatch_mean / tis_mismatch_max (|log pi_old - log pi_rollout|),
       tis_trunc_frac (w > tis_cap); with entropy: entropy."""
    if agg not in AGGS:
        hint = f" (renamed: verl's name is {AGG_RENAMED[agg]!r})" if agg in AGG_RENAMED else ""
        raise ValueError(f"grpo_loss: agg={agg!r}, expected one of {AGGS}{hint}")
    if policy_loss not in POLICY_LOSSES or tis_mode not in TIS_MODES:
        raise ValueError(f"grpo_loss: policy_loss={policy_loss!r} / tis_mode={tis_mode!r}, expected one of "
                         f"{POLICY_LOSSES} / {TIS_MODES}")
    if kl_coef and ref_logp is None:
        raise ValueError("grpo_loss: kl_coef > 0 needs ref_logp")
    if entropy_coef and entropy is None:
        raise ValueError("grpo_loss: entropy_coef != 0 needs entropy")
    if tis_cap and rollout_logp is None:
        raise ValueError("grpo_loss: tis_cap > 0 needs rollout_logp")
    m = mask.bool()
    B, T = m.shape
    # masked slots may hold anything (padding, -inf): zero them first, or 0 * inf poisons the gradient
    logp = torch.where(m, logp, 0.0)
    given = lambda x: torch.where(m, x.to(logp.dtype), 0.0).detach()   # noqa: E731  (no gradient through these)
    old = given(old_logp)
    A = advantages.to(logp.dtype).detach()[:, None]                  # (B, 1): one advantage per response
    n_i = m.sum(-1)                                                   # (B,) response lengths

    def aggregate(x, mode):
        x = torch.where(m, x, 0.0)
        seqs = B if global_batch_size is None else global_batch_size
        if mode == "token-mean":
            return x.sum() / (m.sum().clamp(min=1) if batch_num_tokens is None else batch_num_tokens)
        if mode == "seq-mean-token-mean":                             # an empty response counts, with loss 0
            return (x.sum(-1) / n_i.clamp(min=1)).sum() / seqs
        if mode == "seq-mean-token-sum":
            return x.sum() / seqs
        return x.sum() / (seqs * (T if loss_scale_factor is None else loss_scale_factor))   # -norm: Dr. GRPO

    log_ratio = logp - old                                            # (B, T)
    if policy_loss == "gspo":                                         # the sequence's length-normalised ratio
        seq = log_ratio.sum(-1, keepdim=True) / n_i.clamp(min=1)[:, None]
        log_ratio = (logp - logp.detach() + seq.detach()).clamp(max=10.0)
    ratio = torch.exp(log_ratio)
    pg1 = -A * ratio
    pg2 = -A * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)                                      # = -min(rho*A, clip(rho)*A)
    lower = torch.zeros_like(m)
    if clip_ratio_c and policy_loss == "vanilla":                     # dual clip: a negative-advantage token's
        pg3 = -A * clip_ratio_c                                       # loss is capped at -A*c (ratio beyond c:
        lower = (pg > pg3) & (A < 0)                                  # no gradient)
        pg = torch.where(A < 0, torch.minimum(pg, pg3), pg)
    if rollout_logp is not None:
        gap = old - given(rollout_logp)                               # log(pi_old / pi_rollout)
        w = torch.exp(gap)
        trunc = (w > tis_cap) if tis_cap else torch.zeros_like(m)
        if tis_cap:                                                   # truncated / masked importance sampling
            pg = pg * (w.clamp(max=tis_cap) if tis_mode == "truncate" else torch.where(trunc, 0.0, w))
    pg_loss = aggregate(pg, "seq-mean-token-mean" if policy_loss == "gspo" else agg)
    loss = pg_loss
    kl = kl_penalty(logp, given(ref_logp), kl_type) if ref_logp is not None else None
    if kl_coef:
        loss = loss + kl_coef * aggregate(kl, agg)
    if entropy_coef:
        loss = loss - entropy_coef * aggregate(entropy.to(logp.dtype), agg)   # the bonus: higher entropy, lower loss
    with torch.no_grad():
        n = m.sum()
        tmean = lambda x: torch.where(m, x.to(logp.dtype), 0.0).sum() / n.clamp(min=1)   # noqa: E731
        stats = dict(clip_frac=tmean(pg2 > pg1), clip_frac_lower=tmean(lower), ratio_mean=tmean(ratio),
                     kl=tmean(kl) if kl is not None else torch.zeros((), dtype=logp.dtype),
                     pg_loss=pg_loss.detach(), tokens=n)
        if rollout_logp is not None:
            stats.update(tis_mismatch_mean=tmean(gap.abs()), tis_trunc_frac=tmean(trunc),
                         tis_mismatch_max=torch.where(m, gap.abs(), 0.0).amax() if B * T else tmean(gap))
        if entropy is not None:
            stats["entropy"] = tmean(entropy)
    return loss, stats


def reward_fn(text, answer, options=None, acc_weight=0.9, format_weight=0.1, answer_type="choice"):
    """-> dict(accuracy, format, total). accuracy: the option letter named by the response (reward.extract_choice: the
    last <answer> tag alone when there is one -- the extraction eval.py uses) equals `answer`; format:
    <think>...</think><answer>...</answer> with one option named in the tag, read by the same parser
    (reward.follows_format); total = acc_weight * accuracy + format_weight * format (paper release: 0.9 / 0.1).
    answer_type "open" (answer: a text or a list of acceptable texts; normalised match) or "math" (answer: the final
    answer; reward.math_equal, math-verify when installed): reward.score_answer, the scoring eval.py uses."""
    if answer_type != "choice":
        s = score_answer(text, dict(answer_type=answer_type, answer=answer if isinstance(answer, str) else answer[0],
                                    answers=[answer] if isinstance(answer, str) else list(answer), options=[]))
        acc, fmt = float(s["correct"]), float(s["format"])
        return dict(accuracy=acc, format=fmt, total=acc_weight * acc + format_weight * fmt)
    n = len(options) if options else len(LETTERS)
    acc = float(extract_choice(text, n, options) == answer)
    fmt = float(follows_format(text, n, options))
    return dict(accuracy=acc, format=fmt, total=acc_weight * acc + format_weight * fmt)


# -----------------------------------------------------------------------------
# helpers: prompts and responses
def lr_at(step):
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


def video_kw():
    """The frame flags as get_video_embeds keyword arguments (a record's own fields win)."""
    return video_flags(min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels)


def load_pixels(rec, processor):
    """Decode + process a record's video(s): pixel_values_videos, video_grid_thw (n_videos, 3), second_per_grid_ts
    (n_videos,); zero rows for a record without a video; + pixel_values, image_grid_thw (n_images, 3) for images."""
    if not rec.get("video") and not rec.get("videos"):   # no video: no pixels (zero grid rows; nothing to fill)
        px = dict(video_grid_thw=no_video()["video_grid_thw"], second_per_grid_ts=no_video()["second_per_grid_ts"],
                  pixel_values_videos=torch.zeros(0, 0))
    else:
        px = video_inputs(processor, rec, num_frames=frames, **video_kw())
    if rec.get("images"):
        px.update(image_inputs(processor, rec))
    return px


def prompt_of(rec, processor, vid):
    """Prompt tokens (images and video expanded to their grids) + the grids: what a rollout engine or prefill needs."""
    t = encode_text(processor, rec, vid["video_grid_thw"], with_target=False, timestamps=vid.get("timestamps"),
                    image_grid_thw=vid.get("image_grid_thw"))
    prompt = dict(input_ids=t["input_ids"], mm_token_type_ids=t["mm_token_type_ids"],
                  video_grid_thw=vid["video_grid_thw"], second_per_grid_ts=vid["second_per_grid_ts"])
    if "timestamps" in vid:   # Qwen3-VL: the vLLM engine rebuilds the "<t seconds>" text from them
        prompt["timestamps"] = vid["timestamps"]
    if "image_grid_thw" in vid:   # a record with images: their slots' positions
        prompt["image_grid_thw"] = vid["image_grid_thw"]
    return prompt


def with_features(prompt, vid):
    """A prompt (or item) with its cached vision features: the video's `embeds` and, for images, `image_embeds`."""
    return dict(prompt, embeds=vid["embeds"], **({"image_embeds": vid["image_embeds"]} if "image_embeds" in vid else {}))


def naive_rollouts(rollout_model, llm, prompt, px, seed_, tokenizer, device):
    """The naive loop's G rollouts of one prompt: every request carries its OWN freshly encoded video and images (G
    vision passes). px: load_pixels' dict. HF: the G prefixes prefilled as one batch (no prefix sharing), then the
    same batched decode and sampling as MR-SP's, so for one seed both loops draw the same tokens (up to float ties)
    and only the vision and prefill work differ -- a fair baseline for the speed-up. vLLM: G requests of n=1 in one
    engine call. -> (list of G (token_ids, finish_reason, logprobs), seconds spent encoding)."""
    feats, t_enc = [], 0.0
    for _ in range(group_size):
        t0 = tick()
        with torch.no_grad():
            f = dict(embeds=encode_videos(rollout_model, px["pixel_values_videos"].to(device),
                                          prompt["video_grid_thw"].to(device)))
            if "image_grid_thw" in prompt:   # an image is a one-patch "video" to the tower (mrsp.get_image_embeds)
                f["image_embeds"] = encode_videos(rollout_model, px["pixel_values"].to(device),
                                                  prompt["image_grid_thw"].to(device))
        feats.append(f)
        t_enc += tick() - t0
    if llm is not None:
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        out = llm.rollout([dict(prompt, **f) for f in feats], n=1, temperature=temperature, top_p=top_p,
                          top_k=top_k, max_new_tokens=max_new_tokens, eos_id=eos, seed=seed_, tokenizer=tokenizer)
        return list(zip(out["token_ids"], out["finish_reasons"], out["logprobs"])), t_enc
    per_sample = {k: [f[k] for f in feats] for k in feats[0]}   # lists of G copies: hf_rollout prefills G prefixes
    (outs,) = rollout([dict(prompt, **per_sample)], group_size, [seed_], temperature, max_new_tokens, tokenizer,
                      model=rollout_model, top_p=top_p, top_k=top_k)
    return outs, t_enc


def finish_response(tokens, finish, logprobs, rec, tokenizer, video_token_id):
    """One sampled response -> dict(tokens, text, finish, cut, logprobs, accuracy, format, total).

    TRAP: the policy can sample <|video_pad|>. Every MR-SP forward (mrsp.embed_with_video, the SP prefill) fills the
    video slots BY TOKEN ID from the video embeddings, so a sampled one would be counted as video (an embeddings
    mismatch error, or a shifted video). Such a response is cut before its first <|video_pad|>, scored as malformed
    (reward 0), and only the kept prefix -- a valid sample prefix of the policy -- is trained on. The same holds for
    <|image_pad|> in a record with images (image slots are filled by id there; mrsp.vision_slots): video_token_id may
    be a tuple of pad ids (finish "video_pad")."""
    pads = set(video_token_id) if isinstance(video_token_id, (tuple, list, set)) else {video_token_id}
    cut = bool(pads & set(tokens))
    if cut:
        k = next(i for i, t in enumerate(tokens) if t in pads)
        tokens, logprobs, finish = tokens[:k], logprobs[:k], "video_pad"
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    r = (dict(accuracy=0.0, format=0.0, total=0.0) if cut else
         reward_fn(text, rec["answer"] if rec.get("answer_type", "choice") == "choice" else rec["answers"],
                   rec["options"], reward_acc_weight, reward_format_weight, rec.get("answer_type", "choice")))
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
                engine_logp=torch.tensor(engine_logp if engine_logp is not None else [0.0] * len(tokens)),
                **({"image_grid_thw": prompt["image_grid_thw"]} if "image_grid_thw" in prompt else {}))


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


# -----------------------------------------------------------------------------
# helpers: log-probs (prefills and the update) and one optimizer update
def logprobs(model, items, videos, mesh, from_cache, entropy=False):
    """[(L_i,)] log-probs of the items' response tokens (and their entropies, else None) by ONE SP prefill over the
    list (a micro-batch: right-padded rows), at the rollout temperature; videos from the cache (from_cache: their
    embeddings) or from pixels (the vision tower runs inside this forward). entropy: True (no grad) or "grad" (with
    gradient, for --entropy_coef). Every rank of the SP group gets the same values; every rank of the mesh must call
    this equally often (FSDP)."""
    seqs = []
    for it in items:
        v = videos[it["video"]]
        seqs.append(with_features(it, v) if from_cache else dict(
            it, pixel_values_videos=v["pixel_values_videos"],
            **({"pixel_values": v["pixel_values"]} if "pixel_values" in v else {})))
    with autocast(next(model.parameters()).device):
        out = sp_logprobs(model, seqs, group=mesh.sp_group, impl=attn, logit_chunk=logit_chunk,
                          temperature=temperature, return_entropy=entropy)
    lps, ents = out if entropy else (out, [None] * len(seqs))
    masks = [s["loss_mask"].to(lp.device) for s, lp in zip(seqs, lps)]
    return [(lp[m].float(), None if ent is None else ent[m]) for lp, ent, m in zip(lps, ents, masks)]


def micro_batches(items):
    """items in runs of --micro_batch (the last may be shorter): one forward each."""
    return [items[k:k + micro_batch] for k in range(0, len(items), micro_batch)]


@torch.no_grad()
def prefill(model, items, videos, mesh, from_cache):
    """Old-policy / reference log-probs of every item (no grad), -> list of (L_i,)."""
    with fsdp_gathered(model, keep_gathered):
        return [lp for mb in micro_batches(items) for lp, _ in logprobs(model, mb, videos, mesh, from_cache)]


def update(policy, opt, params, items, videos, adv, old, ref, mesh, from_cache, first_epoch):
    """ONE optimizer update on a mini-batch: a forward + backward per micro-batch (the global denominators make them
    add up to the whole mini-batch's gradient), clip, step. items: this rank's sequences -- the SAME count on every DP rank
    (FSDP collectives run in lockstep); padding items (weight 0) run forward and backward but add nothing to the
    loss, the denominators or the stats. adv (n,); old: list of (L_i,) or None (pi_old = pi_theta: logp.detach(), one
    update per batch); ref: list or None. first_epoch: also measure entropy and the engine / trainer mismatch
    (tis_*: old vs the engine's log-probs, fixed for the batch). --entropy_coef: entropies with gradient, every epoch.
    -> dict of this rank's sums: loss, clip, clip_lower, kl, ratio (token-weighted), ent, gap, tis_trunc (epoch 0),
       tokens, tokens0, grad_norm; gap_max (a max)."""
    device = next(policy.parameters()).device
    # the loss denominators, summed over the DP ranks (a sync point): the SAME global numbers for every sequence
    real = [it for it in items if it["weight"] > 0]
    tot = reduce_sum(dict(tokens=sum(int(it["loss_mask"].sum()) for it in real), seqs=len(real)), mesh.dp_group)
    denominators = dict(batch_num_tokens=max(tot["tokens"], 1.0), global_batch_size=max(tot["seqs"], 1.0),
                        loss_scale_factor=max_new_tokens)   # Dr. GRPO: a constant length (the generation budget)
    gspo = policy_loss == "gspo"
    kw = dict(clip_low=gspo_clip_low if gspo else clip_low, clip_high=gspo_clip_high if gspo else clip_high,
              kl_coef=0.0 if kl_in_reward else kl_coef, agg=agg, clip_ratio_c=clip_ratio_c, policy_loss=policy_loss,
              kl_type=kl_type, entropy_coef=entropy_coef, tis_cap=tis_cap, tis_mode=tis_mode, **denominators)
    acc = dict(loss=0.0, clip=0.0, clip_lower=0.0, kl=0.0, ratio=0.0, ent=0.0, gap=0.0, gap_max=0.0, tis_trunc=0.0,
               tokens=0.0, tokens0=0.0)
    with fsdp_gathered(policy, keep_gathered) as grad_sync:
        k0 = 0
        for mb in micro_batches(items):
            outs = logprobs(policy, mb, videos, mesh, from_cache, entropy="grad" if entropy_coef else first_epoch)
            total, stats = 0.0, []
            for k, (it, (lp, ent)) in enumerate(zip(mb, outs), start=k0):   # k: the item's index in `items`
                assert not entropy_coef or ent.requires_grad   # the bonus's gradient flows through the entropies
                o = lp.detach() if old is None else old[k].to(device)
                r = ref[k].to(device) if ref is not None else None
                L = lp.numel()
                loss, st = grpo_loss(lp[None], o[None], r[None] if r is not None else None, adv[k:k + 1].to(device),
                                     torch.ones(1, L, dtype=torch.bool, device=device),
                                     entropy=ent[None] if entropy_coef else None,
                                     rollout_logp=it["engine_logp"].to(device)[None], **kw)
                total = total + loss * it["weight"]   # weight 0 (padding): the backward's collectives still run
                stats.append((it, loss, st, ent, L))
            k0 += len(mb)
            grad_sync(last=k0 == len(items))   # one reduce-scatter per mini-batch, after its last backward
            total.backward()
            for it, loss, st, ent, L in (x for x in stats if x[0]["weight"]):
                acc["loss"] += loss.item()
                acc["clip"] += st["clip_frac"].item() * L     # over every update (epoch 0 alone has ratio 1)
                acc["clip_lower"] += st["clip_frac_lower"].item() * L
                acc["kl"] += st["kl"].item() * L
                acc["ratio"] += st["ratio_mean"].item() * L
                acc["tokens"] += L
                if first_epoch:                                # the rollout policy's own numbers
                    acc["ent"] += ent.detach().sum().item()
                    acc["gap"] += st["tis_mismatch_mean"].item() * L      # |log pi_old - log pi_engine|
                    acc["gap_max"] = max(acc["gap_max"], st["tis_mismatch_max"].item())
                    acc["tis_trunc"] += st["tis_trunc_frac"].item() * L
                    acc["tokens0"] += L
    acc["grad_norm"] = clip_grad(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return acc


def batch_advantages(groups, old, ref, dp_group=None):
    """Step 3: the advantages of this rank's trained groups (n,) and their summed reward KL penalty (--kl_in_reward).
    groups: dicts with responses (each total, tokens) and weight (0: DP padding, advantage 0); old / ref: the
    prefills' log-probs, one (L_i,) per response in order (used with --kl_in_reward only). With --kl_in_reward each
    response's reward is total - kl_coef * sum_t kl_penalty(old, ref, kl_type) (verl's token-level reward summed
    over the response, as its outcome estimators do). The reinforce_plus_plus estimators whiten over the whole
    step's batch: every DP rank's trained groups, gathered (a sync point)."""
    rewards, lens, pen, k = [], [], 0.0, 0
    for g in groups:
        for r in g["responses"]:
            x = r["total"]
            if kl_in_reward and g["weight"]:
                kl_sum = kl_penalty(old[k], ref[k], kl_type).sum().item()
                x, pen = x - kl_coef * kl_sum, pen + kl_sum
            rewards.append(x)
            lens.append(len(r["tokens"]))
            k += 1
    trained = [i for i, g in enumerate(groups) if g["weight"]]
    G = group_size
    pick = lambda xs: [x for i in trained for x in xs[i * G:(i + 1) * G]]   # noqa: E731
    mine_r, mine_l = pick(rewards), pick(lens)
    batch_r, batch_l, offset = mine_r, mine_l, 0
    if adv_estimator.startswith("reinforce_plus_plus") and dp_group is not None:
        parts = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(parts, (mine_r, mine_l), group=dp_group)
        offset = sum(len(p[0]) for p in parts[:dist.get_rank(dp_group)])
        batch_r, batch_l = [x for p in parts for x in p[0]], [x for p in parts for x in p[1]]
    a = (group_advantages(torch.tensor(batch_r, dtype=torch.float32), G, adv_norm, estimator=adv_estimator,
                          lengths=batch_l)
         if batch_r else torch.zeros(0))[offset:offset + len(mine_r)]
    adv = torch.zeros(len(rewards))
    for j, i in enumerate(trained):
        adv[i * G:(i + 1) * G] = a[j * G:(j + 1) * G]
    return adv, pen


def check_config():
    """Flag errors that need no model: clear messages naming the flag and value. Also maps this repo's old --agg name
    to verl's (with a note), so config.json records the name in force."""
    global agg
    if agg in AGG_RENAMED:
        print0(f"note: --agg={agg} is now --agg={AGG_RENAMED[agg]} (verl's name, the same loss)")
        agg = AGG_RENAMED[agg]
    elif agg == "seq-mean-token-sum":
        print0("note: --agg=seq-mean-token-sum is verl's: each response's token SUM, averaged over responses -- "
               "max_new_tokens times the loss this repo's old seq-mean-token-sum gave; that one (Dr. GRPO) is now "
               "--agg=seq-mean-token-sum-norm")
    if agg not in AGGS:
        raise SystemExit(f"--agg={agg}: expected one of {', '.join(AGGS)}")
    if adv_norm not in ("std", "none"):
        raise SystemExit(f"--adv_norm={adv_norm}: expected std or none")
    if adv_estimator not in ADV_ESTIMATORS:
        raise SystemExit(f"--adv_estimator={adv_estimator}: expected one of {', '.join(ADV_ESTIMATORS)}")
    if policy_loss not in POLICY_LOSSES:
        raise SystemExit(f"--policy_loss={policy_loss}: expected one of {', '.join(POLICY_LOSSES)}")
    if kl_type not in KL_TYPES:
        raise SystemExit(f"--kl_type={kl_type}: expected one of {', '.join(KL_TYPES)}")
    if tis_mode not in TIS_MODES:
        raise SystemExit(f"--tis_mode={tis_mode}: expected one of {', '.join(TIS_MODES)}")
    if clip_ratio_c and clip_ratio_c <= 1:
        raise SystemExit(f"--clip_ratio_c={clip_ratio_c}: the dual-clip bound must be > 1 (verl's default 3.0), "
                         f"or 0 for no dual clip")
    if tis_cap and tis_cap < 1:
        raise SystemExit(f"--tis_cap={tis_cap}: the importance-weight cap must be >= 1 (2 is usual), or 0 for no "
                         f"correction")
    if min(clip_low, clip_high, gspo_clip_low, gspo_clip_high) < 0 or max(clip_low, gspo_clip_low) >= 1:
        raise SystemExit("--clip_low / --clip_high / --gspo_clip_low / --gspo_clip_high must be >= 0, the low ones "
                         "< 1")
    if kl_in_reward and kl_coef <= 0:
        raise SystemExit("--kl_in_reward=1 needs --kl_coef > 0 (the penalty's coefficient; it loads the reference)")
    if kl_in_reward and adv_estimator.startswith("reinforce_plus_plus"):
        raise SystemExit(f"--kl_in_reward=1 with --adv_estimator={adv_estimator}: verl spreads the KL penalty "
                         f"as a per-token reward-to-go there; rewards here are per response: use it with grpo, "
                         f"dr_grpo or rloo, or put the KL in the loss (--kl_in_reward=0)")
    if engine not in ("hf", "vllm"):
        raise SystemExit(f"--engine={engine}: expected hf or vllm")
    if loop not in ("mrsp", "naive", "baseline"):
        raise SystemExit(f"--loop={loop}: expected mrsp, naive or baseline")
    set_decode_backend(decode_backend)   # a bad name stops here, before any model is loaded
    if decode_once and loop != "baseline":
        raise SystemExit(f"--decode_once=1 is the compute-only control of --loop=baseline (got --loop={loop})")
    if group_size < 2:
        raise SystemExit(f"--group_size={group_size}: GRPO needs at least 2 rollouts per prompt")
    if temperature <= 0:
        raise SystemExit(f"--temperature={temperature}: RL samples need a positive temperature")
    if ppo_epochs < 1 or prompts_per_step < 1 or mini_batch < 0 or micro_batch < 1:
        raise SystemExit(f"--ppo_epochs={ppo_epochs}, --prompts_per_step={prompts_per_step} and --micro_batch="
                         f"{micro_batch} must be >= 1, --mini_batch={mini_batch} >= 0")
    if vllm_sleep_level not in (0, 1, 2):
        raise SystemExit(f"--vllm_sleep_level={vllm_sleep_level}: expected 0 (never sleep), 1 or 2")
    if loop in ("naive", "baseline") and sp != 1:
        raise SystemExit(f"--loop={loop} runs without sequence parallelism: use --sp=1 (got --sp={sp})")


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    check_config()
    cfg = config_of(globals())
    # where each forward's video comes from, decided once: the cached embeddings, or pixels (the vision tower runs
    # inside the forward). MR-SP takes the cache everywhere the tower that filled it is the right one: the old policy
    # always; the update and the reference only with a frozen tower (a trainable one needs its gradient, and the
    # reference keeps its own weights). The naive loop always takes pixels.
    naive = loop in ("naive", "baseline")   # the baseline's old/ref/update forwards take pixels too
    baseline = loop == "baseline"
    old_from_cache = not naive
    train_from_cache = ref_from_cache = not naive and freeze_vision

    # --- init
    rank, local_rank, world, device = setup_dist(dist_timeout)
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
    watchdog(out_dir, phase_timeout, check_phases)   # no silent hangs (common.py)

    # --- data
    try:
        train = load_records(data)
        val = load_records(val_data)[:eval_samples] if val_data else []
        check_videos(train, where=f"--data={data}")
        check_videos(val, where=f"--val_data={val_data}")
        if loop == "baseline":   # the benchmark arm models EasyR1's per-consumer decodes of ONE video per prompt
            odd = next((r for r in train if not r.get("video")), None)
            if odd is not None:
                raise ValueError(f"--data={data}: record {odd['id']!r} has no single video (text only, images or "
                                 f"several videos): --loop=baseline takes one-video records; use --loop=mrsp or naive")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print0(f"data: {len(train)} train / {len(val)} val records; dp={mesh.dp_size} sp={mesh.sp_size} "
           f"loop={loop} engine={engine}")

    # --- models: the policy (FSDP2), an unsharded rollout copy that also encodes the videos (its LLM on the meta
    # device with vLLM, which holds its own), the reference when the KL term is on; ONE frozen vision tower, shared
    try:
        policy, processor, rollout_model, ref = load_models(
            model, device, mesh, freeze_vision=freeze_vision, activation_checkpointing=activation_checkpointing,
            reference=kl_coef > 0, rollout_llm=engine == "hf")
    except (FileNotFoundError, ValueError) as e:   # a wrong --model: say so, no traceback
        raise SystemExit(f"rl.py: {e}") from None
    llm = None
    if engine == "vllm":   # one engine per rank (mrsp.vllm_start); its own vision tower is not built (but Qwen3-VL's)
        llm = VLLMEngine(vllm_start(model, max_model_len=vllm_max_model_len, seed=seed,
                                    gpu_memory_utilization=vllm_memory, max_videos=most_videos(train + val),
                                    enable_sleep_mode=vllm_sleep_level > 0 and device.type == "cuda"), policy,
                         vllm_sleep_level)
    # frozen vision: one cache for the whole run (version 0); trainable: keyed by step (fresh embeddings each step)
    cache = None if naive else EmbeddingCache(cache_bytes)
    if frame_cache_dir:   # every load_frames (mrsp's decoding) reads / fills it; the baseline's own decodes bypass it
        data_lib.FRAME_CACHE = FrameCache(frame_cache_dir)
    eval_cache = EmbeddingCache(cache_bytes) if freeze_vision else None   # its own: SP ranks' caches stay identical

    def held_out(step_):
        """Greedy held-out accuracy (mrsp.evaluate, records split over all ranks): metrics on rank 0, {} elsewhere."""
        phase("eval", step_)
        if llm is not None:
            llm.wake()      # the engine must hold the current weights (a collective under FSDP)
        rows = evaluate(rollout_model, processor, val, frames, max_new_tokens=max_new_tokens, cache=eval_cache,
                        rank=rank, world=world, device=device, desc="val", llm=llm, batch_size=eval_batch_size,
                        version=0 if freeze_vision else step_, video=video_kw())
        rows = gather_rows(rows, world)   # a sync point: every rank calls it
        return accuracy_metrics(rows) if rows is not None else {}

    # --- optim
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    start, extra = load_checkpoint(out_dir, policy, opt, rank) if resume else (0, None)
    draws = extra["draws"] if extra else start          # prompt batches drawn so far (> steps with dynamic sampling)
    if start:   # the rollout engine must generate with the resumed weights
        if llm is None or not freeze_vision:
            sync_weights(policy, rollout_model)
        if llm is not None:
            llm.mark_stale()

    log = metrics_logger(out_dir, cfg, wandb_project, master_process)
    if val and eval_first and start == 0:
        row = dict(step=0, **held_out(0))
        if llm is not None:
            row["vllm_calls"] = llm.take_log()[0]
        log(row)

    # --- loop
    bar = tqdm(range(start, steps), desc="rl", disable=not master_process, initial=start, total=steps)
    done_here = 0
    per_rank = prompts_per_step // mesh.dp_size
    tok = processor.tokenizer
    # pads cut from responses: <|video_pad|> always, <|image_pad|> from image records' (mrsp.vision_slots fills image
    # slots only in sequences with images; elsewhere a sampled image pad is a token, as in the HF forward)
    vid_id = (rollout_model.config.video_token_id, rollout_model.config.image_token_id)
    for step in bar:
        # --- TRAINING STEP BEGIN
        t_step = tick()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        version = 0 if freeze_vision else step
        t = dict(encode=0.0, rollout=0.0, actor_prep=0.0)
        vision_passes = rollout_prefills = 0
        counts0 = dict(data_lib.COUNTS)   # decodes / processor runs / their seconds this step: the delta at the end
        roll0 = dict(mrsp_lib.ROLLOUT_TIMES)   # HF engine: rollout prefill / decode seconds, the delta at the end
        phase("sync", step)
        if llm is not None:
            llm.wake()    # the previous step's weights in (collective)
        phase("collect", step, mesh.sp_group, cache=None if cache is None else cache.history)

        # --- 1. collect: each video decoded + encoded ONCE (parallel over the SP group, through the cache), G rollouts
        # per prompt from the cached embeddings. Dynamic sampling draws again while too few groups carry signal.
        videos, drawn, kept, rounds = [], [], [], 0
        while True:
            idx = batch_indices(draws, len(train), prompts_per_step, seed)[mesh.dp_rank::mesh.dp_size]
            pos = list(range(draws * prompts_per_step, (draws + 1) * prompts_per_step))[mesh.dp_rank::mesh.dp_size]
            recs = [train[i] for i in idx]
            t0 = tick()
            if baseline:
                # EasyR1 / Long-RL, per prompt: the dataset (RLHFDataset.__getitem__) decodes the video to build the
                # prompt (its frames give the video token count): decode 1. The rollout worker decodes it again and
                # vLLM runs its processor on the frames (mm processor cache off): decode 2, processor run 1. The
                # pixels are the same each time (deterministic decoding), so the math is unchanged.
                # --decode_once (compute-only control): only the rollout worker's decode + processor run.
                if not decode_once:
                    for r in recs:
                        load_video(r["video"], **decode_opts(video_options(r, num_frames=frames, **video_kw())))
                vids = [load_pixels(r, processor) for r in recs]
            elif naive:   # pixels only: the engine re-encodes them for every rollout request below
                vids = [load_pixels(r, processor) for r in recs]
            else:
                vals, n_encoded = get_video_embeds(rollout_model, processor, recs, cache, num_frames=frames,
                                                   group=mesh.sp_group, version=version, device=device, **video_kw())
                vids = [dict(v) for v in vals]
                if not freeze_vision:   # trainable vision: the update and the reference re-encode pixels
                    for v, r in zip(vids, recs):
                        px = load_pixels(r, processor)
                        v.update({k: px[k] for k in ("pixel_values_videos", "pixel_values") if k in px})
                vision_passes += n_encoded
            prompts = [prompt_of(r, processor, v) for r, v in zip(recs, vids)]
            t["encode"] += tick() - t0
            t0 = tick()
            outs = [None] * len(recs)
            if baseline:
                # vLLM with n=G: the request's video encoded once (1 vision pass) and ONE prefill shared by the G
                # samples (prefix caching); the same engine call as MR-SP's, so the same sampled tokens
                for k, p in enumerate(prompts):
                    t1 = tick()
                    with torch.no_grad():
                        emb = encode_videos(rollout_model, vids[k]["pixel_values_videos"].to(device),
                                            p["video_grid_thw"].to(device))
                    t_enc = tick() - t1
                    t["encode"] += t_enc
                    t["rollout"] -= t_enc
                    (outs[k],) = rollout([dict(p, embeds=emb)], group_size, [sample_seed(seed, pos[k])], temperature,
                                         max_new_tokens, tok, model=rollout_model, llm=llm, top_p=top_p, top_k=top_k)
                    vision_passes += 1
                    rollout_prefills += 1
            elif naive:
                for k, p in enumerate(prompts):
                    outs[k], t_enc = naive_rollouts(rollout_model, llm, p, vids[k], sample_seed(seed, pos[k]), tok,
                                                    device)
                    t["encode"] += t_enc
                    t["rollout"] -= t_enc
                    vision_passes += group_size
                    rollout_prefills += group_size
            else:
                # the SP ranks split the prompts for generation (one engine call each, none included), then swap
                mine = list(range(mesh.sp_rank, len(recs), mesh.sp_size))
                res = rollout([with_features(prompts[k], vids[k]) for k in mine], group_size,
                              [sample_seed(seed, pos[k]) for k in mine], temperature, max_new_tokens, tok,
                              model=rollout_model, llm=llm, top_p=top_p, top_k=top_k)
                for k, o in zip(mine, res):
                    outs[k] = o
                rollout_prefills += len(mine)   # one prefill per prompt, its KV shared by the G samples
                if mesh.sp_size > 1:
                    parts = [None] * mesh.sp_size
                    dist.all_gather_object(parts, dict(zip(mine, res)), group=mesh.sp_group)   # a sync point
                    for part in parts:
                        for k, o in part.items():
                            outs[k] = o
            t["rollout"] += tick() - t0
            groups = [dict(rec=r, pos=pos[k], prompt=prompts[k], video=len(videos) + k,
                           responses=[finish_response(tk, f, lp, r, tok, vid_id if r.get("images") else vid_id[0])
                                      for tk, f, lp in outs[k]])
                      for k, r in enumerate(recs)]
            videos += vids
            drawn += groups
            draws += 1; rounds += 1
            if not dynamic_sampling:
                kept = groups
                break
            kept += [g for g in groups if informative(g)]
            # every rank's quota counts: informative groups beyond one rank's share cannot fill another's
            n_kept = reduce_sum(dict(n=min(len(kept), per_rank)), mesh.dp_group)["n"]
            if n_kept >= prompts_per_step or rounds >= max_sample_rounds:
                break
        counts_collect = {k: data_lib.COUNTS[k] - counts0[k] for k in counts0}   # decode / pre-process in collect
        if llm is not None:
            llm.sleep()   # GPU memory back to the trainer until the next rollouts
        kept, pad = balance_groups(kept, drawn, per_rank, mesh.dp_group)

        # --- 2. the sequences to train on (padding groups, DP lockstep, at weight 0), and their old-policy and
        # reference log-probs: the SP prefill, no grad, at the rollout temperature
        taken = {id(g) for g in kept}
        groups = [dict(g, weight=float(id(g) in taken)) for g in kept + pad]
        items = [make_item(g["prompt"], r["tokens"], g["video"], r["logprobs"], weight=g["weight"])
                 for g in groups for r in g["responses"]]
        n, n_tok = len(items), sum(it["input_ids"].numel() for it in items)
        if baseline and not decode_once:
            # EasyR1 / Long-RL's actor input preparation: each of the G repeated rows of a prompt decodes and
            # pre-processes its video (G decodes, G processor runs per prompt), kept for the step's old / ref /
            # update forwards, which run the vision tower per sequence (vision passes counted there)
            t0 = tick()
            for g in groups:
                for _ in g["responses"]:
                    px = load_pixels(g["rec"], processor)["pixel_values_videos"]
                    assert torch.equal(px, videos[g["video"]]["pixel_values_videos"])   # deterministic: same pixels
            t["actor_prep"] += tick() - t0
        phase("prefill", step, mesh.sp_group, seqs=n, tokens=n_tok)   # FSDP: every rank the same sequence count
        t0 = tick()
        mb = n if mini_batch == 0 else max(1, mini_batch // mesh.dp_size)
        old = refs = None
        if items and (recompute_old or ppo_epochs > 1 or mb < n or kl_in_reward):   # else pi_old = pi_theta:
            old = prefill(policy, items, videos, mesh, old_from_cache)             # logp.detach()
            vision_passes += n * (not old_from_cache)
        t_old = tick() - t0
        if items and ref is not None:
            refs = prefill(ref, items, videos, mesh, ref_from_cache)
            vision_passes += n * (not ref_from_cache)
        t_prefill = tick() - t0

        # --- 3. rewards -> advantages, one per response shared by its tokens; GRPO: A_i = (r_i - mean(r)) /
        # (std(r) + eps) within each prompt's G rollouts (--adv_estimator for the others; --kl_in_reward subtracts
        # the KL to the reference from the rewards first, which is why this follows the prefills)
        adv, reward_kl = batch_advantages(groups, old, refs, mesh.dp_group)

        # --- 4. PPO update: ppo_epochs passes over the items in mini-batches, one optimizer update each
        phase("update", step, mesh.sp_group, seqs=n, tokens=n_tok)
        t0 = tick()
        acc = dict(loss=0.0, clip=0.0, clip_lower=0.0, kl=0.0, ratio=0.0, ent=0.0, gap=0.0, gap_max=0.0,
                   tis_trunc=0.0, tokens=0.0, tokens0=0.0, grad_norm=0.0)
        updates = 0
        for epoch in range(n and ppo_epochs):   # the same item count on every rank: all train, or all skip
            shuffle = ppo_epochs > 1 or mb < n
            order = np.random.default_rng([seed, step, epoch]).permutation(n) if shuffle else np.arange(n)
            for c0 in range(0, n, mb):
                sel = order[c0:c0 + mb]
                pick = lambda xs: None if xs is None else [xs[i] for i in sel]   # noqa: E731
                st = update(policy, opt, params, pick(items), videos, adv[sel], pick(old), pick(refs), mesh,
                            train_from_cache, first_epoch=epoch == 0)
                acc = {k: max(acc[k], st[k]) if k == "gap_max" else acc[k] + st[k] for k in acc}
                updates += 1
                vision_passes += len(sel) * (not train_from_cache)
        t_train = tick() - t0

        # --- 5. weight sync: the new weights to the rollout engine (collectives under FSDP: all ranks call)
        phase("sync", step)
        t0 = tick()
        if updates:
            if llm is None or not freeze_vision:   # with vLLM the HF copy holds only the vision tower: synced if
                                                   # it trains
                sync_weights(policy, rollout_model)
            if llm is not None:
                llm.mark_stale()   # sent at its next wake (before the next rollouts or eval): it may be asleep now
        t_sync = tick() - t0
        engine_calls = []
        if llm is not None:   # the step's wake / weight sync / sleep time counts as sync time
            engine_calls, t_engine = llm.take_log()
            t_sync += t_engine
        dt = tick() - t_step
        # --- TRAINING STEP END

        # rewards of everything sampled this step (the reward curve); SP ranks hold the same sequences: sums over DP
        # only, vision passes counted on SP rank 0 then summed over SP
        resp = [r for g in drawn for r in g["responses"]]
        rs = reduce_sum(dict(reward=sum(r["total"] for r in resp), acc=sum(r["accuracy"] for r in resp),
                             fmt=sum(r["format"] for r in resp), len=sum(len(r["tokens"]) for r in resp),
                             cuts=sum(r["cut"] for r in resp), n=len(resp), drawn=len(drawn), kept=len(kept)),
                        mesh.dp_group)
        tr = reduce_sum(dict(acc, seq_tokens=n_tok, reward_kl=reward_kl,
                             vision=vision_passes * (mesh.sp_rank == 0)), mesh.dp_group)
        tr["vision"] = reduce_sum(dict(v=tr["vision"]), mesh.sp_group)["v"]
        gap_max = torch.tensor([acc["gap_max"]], dtype=torch.float64)
        if mesh.dp_group is not None:
            dist.all_reduce(gap_max, op=dist.ReduceOp.MAX, group=mesh.dp_group)
        n_resp, ntok, ntok0 = max(rs["n"], 1.0), max(tr["tokens"], 1.0), max(tr["tokens0"], 1.0)
        row = dict(step=step + 1, reward_mean=rs["reward"] / n_resp, accuracy=rs["acc"] / n_resp,
                   format_rate=rs["fmt"] / n_resp, response_len=rs["len"] / n_resp, kl=tr["kl"] / ntok,
                   clip_frac=tr["clip"] / ntok, ratio_mean=tr["ratio"] / ntok, entropy=tr["ent"] / ntok0,
                   loss=tr["loss"] / max(updates, 1), grad_norm=acc["grad_norm"] / max(updates, 1), lr=lr_at(step),
                   logp_gap=tr["gap"] / ntok0, tokens_per_s=tr["seq_tokens"] / dt, t_encode=t["encode"],
                   t_rollout=t["rollout"], t_prefill=t_prefill, t_train=t_train, t_sync=t_sync, step_time=dt,
                   vision_passes=int(tr["vision"]), t_checks=check_seconds(),
                   # per-phase detail of this rank (decode / pre-process from data.COUNTS, wall and CPU s; counts
                   # per rank: an SP rank's decodes are of its share of the frames)
                   t_old=t_old, t_ref=t_prefill - t_old, t_actor_prep=t["actor_prep"],
                   rollout_prefills=rollout_prefills,
                   t_vision_collect=t["encode"] - counts_collect["decode_s"] - counts_collect["process_s"],
                   **{f"{k}_step": data_lib.COUNTS[k] - counts0[k] for k in counts0},
                   **{f"t_rollout_{k[:-2]}": mrsp_lib.ROLLOUT_TIMES[k] - roll0[k] for k in roll0},
                   dropped_groups=int(rs["drawn"] - rs["kept"]), trained_groups=int(rs["kept"]), sample_rounds=rounds,
                   video_pad_cuts=int(rs["cuts"]), updates=updates, clip_frac_lower=tr["clip_lower"] / ntok,
                   # rollout / trainer mismatch |log pi_old - log pi_engine| (= logp_gap) and the TIS truncation
                   tis_mismatch_mean=tr["gap"] / ntok0, tis_mismatch_max=gap_max.item(),
                   tis_trunc_frac=tr["tis_trunc"] / ntok0)
        if kl_in_reward:   # the penalty's KL(pi_old || ref), a token mean over the trained responses
            row["reward_kl"] = tr["reward_kl"] / ntok0
        if cache is not None:
            row.update(cache_hits=cache.stats["hits"], cache_misses=cache.stats["misses"])
        if data_lib.FRAME_CACHE is not None:
            row.update(frame_cache_hits=data_lib.FRAME_CACHE.stats["hits"],
                       frame_cache_misses=data_lib.FRAME_CACHE.stats["misses"])
        if val and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == steps):
            row.update(held_out(step + 1))
        if llm is not None:   # this step's engine calls in order, eval's included (every rank makes the same ones)
            row["vllm_calls"] = engine_calls + llm.take_log()[0]
        mem = phase_memory()   # per phase, the fullest rank (a sync point)
        row.update(peak_mem_gb=max(mem.values()), **{f"mem_{k}_gb": v for k, v in mem.items()})
        log(row)
        if master_process and (step + 1) % log_every == 0:
            keys = ("reward_mean", "accuracy", "format_rate", "response_len", "kl", "clip_frac", "entropy", "loss",
                    "step_time", "val_acc")
            tqdm.write(f"step {step + 1}/{steps}: " + " ".join(f"{k} {row[k]:.4g}" for k in keys if k in row))
        if (step + 1) % save_every == 0 or step + 1 == steps:
            phase("checkpoint", step + 1)
            save_checkpoint(out_dir, step + 1, policy, opt, cfg, world, rank, keep=keep_checkpoints,
                            extra=dict(draws=draws))
        done_here += 1
        if stop_after and done_here >= stop_after:
            print0(f"stop_after={stop_after}: stopping at step {step + 1} (simulated interruption)")
            break
    else:
        # --- export a standard HF checkpoint (model + processor) for eval.py / vLLM
        phase("checkpoint", steps)
        if llm is not None:   # the HF copy has no LLM weights: export through a full copy on the CPU
            rollout_model = load_model(model, "float32", "cpu")[0]
        sync_weights(policy, rollout_model)   # gathers the FSDP shards: a collective, every rank calls it
        if master_process:
            export_hf(rollout_model, processor, out_dir, cfg)
    teardown(world, llm)
