"""
estimate.py -- a memory / communication estimator for MR-SP RL: bytes per rank of every copy an RL step keeps, per
phase, and the sequence-parallel communication per layer (ring vs Ulysses vs Megatron TP). Paper arithmetic from a
model config; no process group, no weights.

    python estimate.py --model=qwen2.5-vl-7b --frames=3600 --gpus=8 --sp=8    # FITS (8x 80 GB)
    python estimate.py --model=qwen2.5-vl-7b --frames=3600 --gpus=8 --sp=1    # DOES NOT FIT
    python estimate.py --model=out/tiny --frames=512 --height=56 --width=56 --gpus=2 --sp=2
"""
import json
import math
import os
import sys

from common import apply_overrides

# -----------------------------------------------------------------------------
# config (override with --key=value)
model = "qwen2.5-vl-7b"    # a preset (qwen2.5-vl-7b, tiny), a checkpoint directory or its config.json
frames = 3600              # frames sampled per video
gpus = 8                   # GPUs in the job
sp = 8                     # sequence-parallel group size
height = 336               # frame size after resizing (336x336 -> 144 tokens per 2 frames)
width = 336
gpu_mem_gib = 80.0         # memory per GPU

# -----------------------------------------------------------------------------
# the model: bytes per rank of every copy rl.py keeps, per phase
#
# Paper check (LongVILA-R1): 3,600 frames (~256k tokens) of Qwen2.5-VL-7B RL fit on one 8x A100
# 80GB node with SP=8, and not with SP=1. Everything is bytes per rank, computed from the config;
# no constant below is fitted to that claim. Assumptions (conservative where it matters):
#  * policy LLM trained with FSDP over ALL gpus: bf16 weights + fp32 master + AdamW m, v (fp32)
#    + grads (fp32 by default: reduce_dtype fp32); the vision tower (incl. merger) is frozen
#    (the embedding cache relies on it) and replicated in bf16 on every rank: it is ~0.7B params
#    and every rank runs it on its own share of frames (parallel encoding);
#  * the reference model (k3 KL on) is the LLM only, bf16, FSDP-sharded: it never sees pixels;
#  * training: ONE sequence (video + prompt + one response) per micro-batch, split over the SP
#    group, activation checkpointing per decoder layer, LM head chunked over response tokens;
#  * rollout: vLLM on every rank with its own full bf16 copy (TP=1) and the FULL prompt (as in
#    LongVILA-R1; SP does not shard the rollout KV); G responses share the prompt's KV once
#    (prefix caching). During training vLLM sleeps (weights to CPU, KV freed), so the two phases
#    are separate peaks; optimizer and reference shards stay on the GPU in both (no offload);
#  * the video-embedding cache (full video, bf16) lives on every rank in both phases.
# -----------------------------------------------------------------------------
GiB = 1024 ** 3
# Qwen2.5-VL-7B-Instruct's released config.json (flat legacy layout: text keys at the top level).
QWEN25_VL_7B = dict(
    model_type="qwen2_5_vl", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], in_chans=3))
# The embedded tiny model (prepare.py --tiny), nested layout as transformers 5 writes it.
QWEN25_VL_TINY = dict(
    model_type="qwen2_5_vl", tie_word_embeddings=False,
    text_config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=384, vocab_size=576),
    vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128))
PRESETS = {"qwen2.5-vl-7b": ("Qwen2.5-VL-7B", QWEN25_VL_7B), "tiny": ("Qwen2.5-VL-tiny", QWEN25_VL_TINY)}
# 336x336 -> (336/28)^2 = 144 tokens per temporal patch (2 frames): 3,600 frames -> 259,200 video
# tokens, the paper's "around 256k" (~71 tokens a frame). Override with height/width or tokens_per_frame_pair.
DEFAULT_SIZE = 336
TEXT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "patch_size", "spatial_merge_size",
               "temporal_patch_size")


def load_estimate_config(model):
    """dict | preset name | dir with config.json | config.json path -> (name, normalized dict)."""
    name = where = None
    if isinstance(model, dict):
        raw = model
    elif str(model).lower() in PRESETS:
        name, raw = PRESETS[str(model).lower()]
    elif os.path.isdir(model) or os.path.isfile(model):
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in model directory {model!r}")
        try:
            with open(path) as f:
                raw = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        name, where = os.path.basename(os.path.dirname(os.path.abspath(path))), path
    elif os.path.sep in str(model) or str(model).endswith(".json"):   # looks like a path: say it is missing
        raise FileNotFoundError(f"model path {model!r} does not exist")
    else:
        raise ValueError(f"unknown model preset {model!r} (presets: {', '.join(PRESETS)}; or a checkpoint dir)")
    text = raw.get("text_config") or raw          # nested (transformers 5) or flat legacy layout
    vis = raw.get("vision_config")
    where = where or name or "config"
    if vis is None:
        raise ValueError(f"{where}: no 'vision_config' (not a Qwen-VL config)")
    if "embed_dim" in vis:                         # Qwen2-VL: embed_dim = width, hidden_size = LLM width
        vis = dict(vis, hidden_size=vis["embed_dim"], out_hidden_size=vis["hidden_size"],
                   intermediate_size=int(vis["embed_dim"] * vis.get("mlp_ratio", 4)), gated=False)
    for keys, d, part in ((TEXT_KEYS, text, "text"), (VISION_KEYS, vis, "vision_config")):
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"{where}: {part} lacks field(s) {missing}")
    t = {k: text[k] for k in TEXT_KEYS}
    t["num_key_value_heads"] = text.get("num_key_value_heads", text["num_attention_heads"])  # HF default: MHA
    t["head_dim"] = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    t["tie_word_embeddings"] = bool(text.get("tie_word_embeddings", raw.get("tie_word_embeddings", False)))
    v = {k: vis[k] for k in VISION_KEYS}
    v["out_hidden_size"] = vis.get("out_hidden_size", t["hidden_size"])
    v["gated"] = vis.get("gated", True)          # Qwen2.5-VL vision MLP is SwiGLU (gate, up, down)
    return name or raw.get("model_type", "model"), dict(text=t, vision=v)


def video_tokens(frames, height=DEFAULT_SIZE, width=DEFAULT_SIZE, patch=14, merge=2, temporal=2):
    """LLM tokens of one video: (T/2)·(H/28)·(W/28), H, W rounded to multiples of 28 (smart_resize),
    T padded up to a multiple of 2 (Qwen repeats the last frame)."""
    f = patch * merge
    h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
    return math.ceil(frames / temporal) * (h // f) * (w // f)


def param_counts(c):
    """(text LLM params, vision tower params incl. merger), counted layer by layer like the HF modules."""
    t, v = c["text"], c["vision"]
    d, I, V = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    q, kv = t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    layer = d * q + q + 2 * (d * kv + kv) + q * d + 3 * d * I + 2 * d   # q/k/v (bias), o, SwiGLU, 2 RMSNorm
    text = V * d * (1 if t["tie_word_embeddings"] else 2) + t["num_hidden_layers"] * layer + d
    h, Iv, m2 = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"] ** 2
    mlp = 3 * h * Iv + 2 * Iv + h if v["gated"] else 2 * h * Iv + Iv + h
    block = h * 3 * h + 3 * h + h * h + h + mlp + 2 * h * (1 if v["gated"] else 2)   # qkv, proj, MLP, norms
    out = v["out_hidden_size"]   # merger: norm, Linear(h·m², h·m²), GELU, Linear(h·m², out), with biases
    merger = h * (1 if v["gated"] else 2) + (h * m2) ** 2 + h * m2 + h * m2 * out + out
    vision = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2 * h + v["depth"] * block + merger
    return text, vision, layer, V * d


def estimate_memory(cfg, frames, gpus=8, sp=8, height=DEFAULT_SIZE, width=DEFAULT_SIZE, tokens_per_frame_pair=None,
             prompt_tokens=256, response_tokens=1024, group=5, kl=True, grad_dtype="fp32", logit_chunk=1024,
             prefill_chunk=8192, gpu_mem_gib=80.0, reserve=0.10):
    """Per-rank memory (bytes) of the training and rollout phases + per-layer SP communication."""
    name, c = cfg if isinstance(cfg, tuple) else load_estimate_config(cfg)
    if sp < 1 or gpus % sp:
        raise ValueError(f"sp={sp} must divide gpus={gpus}")
    t, v = c["text"], c["vision"]
    L, d, I, V = t["num_hidden_layers"], t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    Hq, kv = t["num_attention_heads"], t["num_key_value_heads"] * t["head_dim"]
    p, m, tp = v["patch_size"], v["spatial_merge_size"], v["temporal_patch_size"]
    n_video = (math.ceil(frames / tp) * tokens_per_frame_pair if tokens_per_frame_pair
               else video_tokens(frames, height, width, p, m, tp))
    N = n_video + prompt_tokens + response_tokens          # one training sequence
    n = math.ceil(N / sp)                                  # tokens per SP rank
    P_text, P_vis, P_layer, P_emb = param_counts(c)
    gb = {"fp32": 4, "bf16": 2}[grad_dtype]
    bf = 2                                                 # bf16 bytes
    unit = max(P_layer, P_emb)                             # largest FSDP unit (a layer, embeddings, LM head)
    resident = {                                           # on the GPU in both phases
        "policy weights (bf16, /gpus)": bf * P_text / gpus,
        "optimizer fp32 master+m+v (/gpus)": 12 * P_text / gpus,
        "reference LLM (bf16, /gpus)": bf * P_text / gpus if kl else 0,
        "vision tower (bf16, replicated)": bf * P_vis,
        "video-embedding cache": bf * n_video * v["out_hidden_size"],   # all-gathered merger output, full video
    }
    train = dict(resident)
    train[f"gradients ({grad_dtype}, /gpus)"] = gb * P_text / gpus
    # FSDP working buffers: two gathered bf16 units (current + prefetched) + one unsharded grad (--keep_gathered=0;
    # =1 would hold every unit gathered plus the full gradient, which this estimate does not model)
    train["FSDP gathered units"] = unit * (2 * bf + gb)
    # checkpointed layer inputs: one (n, d) bf16 tensor per decoder layer
    train["act: checkpointed inputs"] = L * n * d * bf
    # one recomputed layer during backward, peak at the SwiGLU multiply's backward: saved
    # norm-out, q_rot, attn-out, post-attn residual, post-norm (5d) + k_rot, v (2kv) + incoming
    # grad (d); MLP: gate, silu(gate), up kept (3I) + d(product), d(silu), d(up) (3I).
    train["act: recomputed layer"] = n * (6 * d + 2 * kv + 6 * I) * bf
    # attention extras: lse (fp32, per query head); with a ring also K/V double buffers (bf16),
    # dK/dV double buffers travelling in backward (fp32), fp32 out/dq accumulator for the merge.
    ring = (2 * 2 * n * kv * bf + 2 * 2 * n * kv * 4 + n * d * 4) if sp > 1 else 0
    train["act: attention lse + ring buffers"] = Hq * n * 4 + ring
    # LM head on response tokens only, one chunk at a time: fp32 logits, log-softmax, gradient
    train["act: LM-head logits chunk"] = min(logit_chunk, response_tokens) * V * 4 * 3
    kv_tok = 2 * L * kv * bf                               # K and V, every layer, bf16, per token
    per_pair = tokens_per_frame_pair or video_tokens(tp, height, width, p, m, tp)   # LLM tokens / temporal patch
    n_patch = math.ceil(math.ceil(frames / tp) / sp) * per_pair * m * m   # vision patches before the 2x2 merge
    hv, Iv = v["hidden_size"], v["intermediate_size"]
    roll = dict(resident)
    roll["vLLM weights (bf16, full copy)"] = bf * (P_text + P_vis)
    # prefix sharing: the long prompt's KV once + G response KVs (full prompt on every rank)
    roll["vLLM KV cache (prompt + G responses)"] = kv_tok * (n_video + prompt_tokens + group * response_tokens)
    # chunked prefill, no grad: hidden, residual, norm-out, q (4d) + k, v (2kv) + gate, up, product (3I)
    roll["vLLM prefill working set"] = min(prefill_chunk, N) * (4 * d + 2 * kv + 3 * I) * bf
    # parallel encoding, no grad, this rank's 1/sp of the temporal patches: one vision block live
    # (hidden, residual, norm-out: 3h; gate, up, product: 3I_v); conservatively while vLLM is awake
    roll["vision encode (1/sp of frames)"] = n_patch * (3 * hv + 3 * Iv) * bf
    budget = gpu_mem_gib * GiB * (1 - reserve)
    peak_t, peak_r = sum(train.values()), sum(roll.values())
    P = sp
    comm = {  # per layer per rank, forward, bf16 bytes
        "ring K/V (P-1)·2·(N/P)·kv": (P - 1) * 2 * n * kv * bf,
        # backward: K/V travel again (bf16) + dK/dV partial sums in fp32 (as seq_parallel_attn.py
        # accumulates them) = 3x forward; 2x if dK/dV were sent in bf16
        "ring backward K/V + fp32 dK/dV": (P - 1) * 2 * n * kv * (bf + 4),
        # Ulysses: q, k, v scattered by head + out gathered back = 4·N·d/P per rank for
        # MHA; with GQA k, v are kv wide, so exactly (P-1)/P·(N/P)·(2d + 2kv) -- the formula is a bound
        "Ulysses all-to-all 4·N·d/P": 4 * n * d * bf if P > 1 else 0,
        # Megatron TP + sequence parallel on P ranks: per layer 2 all-gathers + 2 reduce-scatters of
        # the (N, d) activations, (P-1)/P·N·d each (same volume as plain TP's 2 all-reduces)
        "Megatron TP-SP 2 AG + 2 RS": 4 * (P - 1) / P * N * d * bf,
    }
    return dict(name=name, frames=frames, height=height, width=width, tokens_per_frame_pair=tokens_per_frame_pair,
                video_tokens=n_video, text_tokens=prompt_tokens + response_tokens, seq_tokens=N, local_tokens=n,
                gpus=gpus, sp=sp, dp=gpus // sp, params_text=P_text, params_vision=P_vis, train=train,
                rollout=roll, train_peak=peak_t, rollout_peak=peak_r, peak=max(peak_t, peak_r), budget=budget,
                gpu_mem_gib=gpu_mem_gib, reserve=reserve, fits=max(peak_t, peak_r) <= budget, comm=comm,
                ulysses_ok=P <= t["num_key_value_heads"] and t["num_key_value_heads"] % P == 0)


def format_estimate(r):
    """Readable per-rank table: GiB with 1 decimal (3 for sub-GiB totals), comm in MB per layer."""
    small = r["peak"] < GiB
    g = (lambda b: f"{b / GiB:9.3f}") if small else (lambda b: f"{b / GiB:7.1f}")
    size = f"{r['tokens_per_frame_pair']} tok/frame-pair" if r["tokens_per_frame_pair"] else \
        f"@{r['height']}x{r['width']}"
    pc = lambda x: f"{x / 1e9:.2f}B" if x >= 1e8 else f"{x / 1e6:.2f}M"
    out = [f"model {r['name']} ({pc(r['params_text'])} LLM + {pc(r['params_vision'])} vision), "
           f"{r['frames']} frames {size} -> {r['video_tokens']:,} video tokens (+{r['text_tokens']:,} text) "
           f"= {r['seq_tokens']:,}; gpus {r['gpus']}, sp {r['sp']}, dp {r['dp']}, "
           f"{r['local_tokens']:,} tokens/rank"]
    for phase, key in (("training phase", "train"), ("rollout phase (vLLM awake)", "rollout")):
        out.append(f"  {phase:<42} GiB/rank")
        out += [f"    {k:<40} {g(b)}" for k, b in r[key].items()]
        out.append(f"    {'= ' + phase + ' peak':<40} {g(r[key + '_peak'])}")
    out.append(f"  peak {g(r['peak']).strip()} GiB vs budget {g(r['budget']).strip()} GiB "
               f"({r['gpu_mem_gib']:g} GiB - {r['reserve']:.0%} reserve): "
               + ("FITS" if r["fits"] else "DOES NOT FIT"))
    out.append("  communication per layer per rank, forward unless noted (MB)")
    out += [f"    {k:<40} {b / 1e6:10.1f}" for k, b in r["comm"].items()]
    ring = next(iter(r["comm"].values()))
    if ring:
        out.append(f"    Megatron / ring forward = {r['comm']['Megatron TP-SP 2 AG + 2 RS'] / ring:.1f}x")
    if r["sp"] > 1 and not r["ulysses_ok"]:
        out.append(f"    (Ulysses needs sp | kv heads: sp={r['sp']} would replicate K/V)")
    return "\n".join(out)

# -----------------------------------------------------------------------------
if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    print(format_estimate(estimate_memory(model, frames, gpus=gpus, sp=sp, height=height, width=width,
                                          gpu_mem_gib=gpu_mem_gib)))
