"""
estimate.py -- what one rank of `rl.py` holds in memory, per phase, written as plain arithmetic from a model config:
every copy the loop keeps (policy shard, AdamW state, the HF rollout copy or the vLLM engine, the reference, the one
shared frozen vision tower, the video-embedding cache), the working set of each phase (video decode + encode and the
rollouts in `collect`, the old-policy / reference log-prob forwards in `prefill`, forward + backward + AdamW in
`update`, the weight sync in `sync`), and the sequence-parallel communication per layer (ring vs Ulysses vs Megatron).
The phase names are rl.py's phase() names: its metrics.jsonl logs the measured peak of each as mem_<phase>_gb.

    python estimate.py --frames=3600 --world=8 --sp=8 --prompts_per_step=1   # 7B recipe (below), 8x 80 GB: FITS
    python estimate.py --frames=3600 --world=8 --sp=8     # 8 prompts per SP group: the collect phase does not fit
    python estimate.py --frames=3600 --world=8 --sp=1     # no sequence parallelism: the update does not fit
    python estimate.py --model=/ckpt/Qwen2.5-VL-7B-Instruct --frames=3600 --vllm_memory=0.3   # a checkpoint dir
    python estimate.py --model=/tmp/est/tiny --device=cpu --engine=hf --activation_checkpointing=0 \
        --keep_gathered=1 --max_new_tokens=32 --group_size=2 --prompts_per_step=1 --world=1 --sp=1 \
        --frames=64 --height=112 --width=112 --runtime_gb=0.8 --videos_seen=2   # a CPU run, as estimate_check does
    python bench/estimate_check.py                                   # predicted vs measured (rl.py on CPU), per phase

Flags carry rl.py's names and meaning (engine, vllm_memory, vllm_sleep_level, kl_coef, group_size, prompts_per_step,
max_new_tokens, activation_checkpointing, keep_gathered, logit_chunk, cache_bytes, sp, attn, frames, min_pixels,
max_pixels, total_pixels); world is the torchrun world size (--gpus: the same). Four defaults differ from rl.py's,
to be the 8-GPU recipe of its docstring: --engine=vllm --activation_checkpointing=1 --keep_gathered=0
--max_new_tokens=1024 (G=5, k3 KL on, --prompts_per_step=8 as rl.py). And --vllm_memory=0 (the default here) picks
the smallest gpu_memory_utilization that holds the weights and ONE prompt's KV cache + its G responses; the output
says which value rl.py then needs (rl.py's own default is 0.3). Pass rl.py's values to model any other run.

Frame sizes come from data.py (qwen-vl-utils rules: data.frame_size, then the checkpoint processor's per-frame
range as data.processed_frame_size applies it) for a height x width source video and rl.py's frame flags; so 3,600
frames of a 336x336 video are 308x308 (121 tokens per 2 frames: the per-frame floor beats the total budget), 217,800
video tokens. --resized_height/--resized_width (both) or --tokens_per_frame_pair override that.

Devices. device="cuda" (default): torch.cuda.max_memory_allocated-style bytes: the policy in fp32 (FSDP2 over all
ranks), the frozen copies (rollout LLM, reference, vision tower) in bf16, the policy's forwards under bf16 autocast.
device="cpu" (validation, bench/estimate_check.py): everything fp32, no autocast, plus `runtime_gb`, the Python +
torch + transformers process RSS before any model loads (measured by the check script, never a constant here), as
rl.py's phase_memory reports peak RSS on CPU. Terms that exist only on a GPU: the autocast bf16 copies of the
policy's weights (autocast caches a bf16 cast of every fp32 leaf weight for a whole forward), the fp32 copy of the
cached video embeddings that the SP forward makes, the vLLM engine (on CPU it cannot sleep, and vLLM-CPU sizes its KV
cache from VLLM_CPU_KVCACHE_SPACE: not modelled, device="cpu" refuses engine="vllm"). Host memory on a GPU machine
(decoded frames, vLLM's CPU copy of the embeddings, sleep level 1's parked weights) is not device memory: listed only
for device="cpu".

Each phase is its resident copies plus its largest sub-step ("working set [sub-step]: ..."), e.g. the update's
backward with one layer recomputed. Steady state: from the second step on (AdamW allocates its state at the first
opt.step, so step 1's collect and prefill peaks lack it); the eval and checkpoint phases are not modelled. Per rank,
the fullest one (phase_memory's MAX over ranks). GB = 1e9 bytes, GiB = 2^30. Checked on CPU by
bench/estimate_check.py (docs/estimate_results.md); the GPU-only terms are not measured yet.
"""
import json
import math
import os
import sys

from common import apply_overrides

# -----------------------------------------------------------------------------
# config (override with --key=value); rl.py's flag names, the 8-GPU 7B recipe's values
model = "qwen2.5-vl-7b"    # a preset (qwen2.5-vl-7b, tiny), a checkpoint directory or its config.json
frames = 3600              # rl.py --frames
world = 8                  # torchrun world size (GPUs or CPU processes)
gpus = 0                   # the old name of --world (0 = unset)
sp = 8                     # rl.py --sp
attn = "ring"              # rl.py --attn (ring | ulysses)
engine = "vllm"            # rl.py --engine (hf | vllm)
vllm_memory = 0.0          # rl.py --vllm_memory (gpu_memory_utilization); 0 = the smallest that holds one prompt
vllm_sleep_level = 2       # rl.py --vllm_sleep_level
kl_coef = 1e-2             # rl.py --kl_coef (0: no reference model)
group_size = 5             # rl.py --group_size (G)
prompts_per_step = 8       # rl.py --prompts_per_step (global)
max_new_tokens = 1024      # rl.py --max_new_tokens (the estimate assumes every response uses the whole budget)
prompt_tokens = 256        # text tokens of a prompt besides its video (system, question, options, chat template)
activation_checkpointing = True   # rl.py --activation_checkpointing
keep_gathered = False      # rl.py --keep_gathered
logit_chunk = 1024         # rl.py --logit_chunk
cache_bytes = 1 << 30      # rl.py --cache_bytes
videos_seen = 0            # distinct videos a rank has encoded so far (2 steps x 1 prompt: 2); 0 = a long run, the
                           # embedding cache full
height = 336               # source video frame size (data.py sizes the frames from it)
width = 336
min_pixels = 0             # rl.py --min_pixels / --max_pixels / --total_pixels (0 = data.py's default)
max_pixels = 0
total_pixels = 0
resized_height = 0         # fixed frame size (both, as a record's resized_height/width); 0 = unset
resized_width = 0
device = "cuda"            # cuda | cpu (see the docstring)
runtime_gb = 0.0           # device=cpu: the process RSS before the model loads (GB)
gpu_mem_gib = 80.0         # memory per GPU
reserve = 0.10             # of gpu_mem_gib kept free: CUDA context, NCCL, allocator fragmentation, CUDA graphs

# -----------------------------------------------------------------------------
GiB, GB = 1024 ** 3, 1e9
# Qwen2.5-VL-7B-Instruct's released config.json (flat legacy layout: text keys at the top level).
QWEN25_VL_7B = dict(
    model_type="qwen2_5_vl", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
    torch_dtype="bfloat16",
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], in_chans=3))
# The embedded tiny model (prepare.py --tiny), nested layout as transformers 5 writes it.
QWEN25_VL_TINY = dict(
    model_type="qwen2_5_vl", tie_word_embeddings=False, dtype="float32",
    text_config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=384, vocab_size=576),
    vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128))
# per-frame pixel range of each preset's video processor (the 7B's preprocessor_config.json; prepare.py's 56x56)
PRESET_PIXELS = {"qwen2.5-vl-7b": (3136, 12845056), "tiny": (3136, 3136)}
PRESETS = {"qwen2.5-vl-7b": ("Qwen2.5-VL-7B", QWEN25_VL_7B), "tiny": ("Qwen2.5-VL-tiny", QWEN25_VL_TINY)}
DEFAULT_SIZE = 336
TEXT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "patch_size", "spatial_merge_size",
               "temporal_patch_size")
VLLM_BATCHED_TOKENS = 8192   # vLLM's profiling forward (max_num_batched_tokens) sizes its activation workspace
VLLM_MAX_SEQS = 64           # mrsp.vllm_start's max_num_seqs: the sampler's logits in the profiling run


def load_estimate_config(model):
    """dict | preset name | dir with config.json | config.json path -> (name, normalized dict). The dict also
    carries `pixels`: the video processor's per-frame (min, max) pixel range when the checkpoint has one."""
    name = where = None
    pixels = None
    if isinstance(model, dict):
        raw = model
    elif str(model).lower() in PRESETS:
        name, raw = PRESETS[str(model).lower()]
        pixels = PRESET_PIXELS[str(model).lower()]
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
        pixels = processor_pixels(os.path.dirname(os.path.abspath(path)))
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
    v["deepstack"] = v["pos_embeddings"] = 0
    t["qk_norm"] = False
    if raw.get("model_type") == "qwen3_vl":
        # Qwen3-VL: a GELU vision MLP with LayerNorms, a learned position table and a biased patch conv, plus one
        # merger per DeepStack layer whose features ride along with each video token (the cache keeps D*(1+L) per
        # token); its LLM has q/k RMSNorms and no q/k/v bias
        v.update(gated=False, deepstack=len(vis.get("deepstack_visual_indexes") or ()),
                 pos_embeddings=vis.get("num_position_embeddings", 0))
        t["qk_norm"] = True
    dtype = raw.get("dtype") or raw.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return name or raw.get("model_type", "model"), dict(text=t, vision=v, pixels=pixels, dtype=dtype)


def processor_pixels(ckpt_dir):
    """The video processor's per-frame (min, max) pixels from a checkpoint dir (processor_config.json as
    transformers 5 writes it, or video_preprocessor_config.json / preprocessor_config.json), None if absent."""
    for fname, key in (("processor_config.json", "video_processor"), ("video_preprocessor_config.json", None),
                       ("preprocessor_config.json", None)):
        path = os.path.join(ckpt_dir, fname)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            cfg = json.load(f)
        cfg = cfg.get(key, {}) if key else cfg
        size = cfg.get("size") or {}
        lo, hi = size.get("shortest_edge", cfg.get("min_pixels")), size.get("longest_edge", cfg.get("max_pixels"))
        if lo and hi:
            return int(lo), int(hi)
    return None


def frame_hw(frames, height=DEFAULT_SIZE, width=DEFAULT_SIZE, factor=28, pixels=None, min_pixels=0, max_pixels=0,
             total_pixels=0, resized_height=0, resized_width=0):
    """(h, w) of every frame rl.py feeds the vision tower for `frames` frames of a height x width video: data.py's
    frame_size (qwen-vl-utils: per-frame floor, share of the total budget, max_pixels; or resized_height/width),
    then clamped into the processor's per-frame `pixels` range -- data.processed_frame_size without a processor."""
    from data import frame_size, smart_resize
    opt = lambda x: x or None   # noqa: E731  (rl.py: 0 = unset)
    h, w = frame_size(height, width, int(frames), factor, opt(min_pixels), opt(max_pixels), opt(total_pixels),
                      opt(resized_height), opt(resized_width))
    return smart_resize(h, w, factor, *pixels) if pixels else (h, w)


def video_tokens(frames, height=DEFAULT_SIZE, width=DEFAULT_SIZE, patch=14, merge=2, temporal=2):
    """LLM tokens of one video whose frames are resized to height x width (a record's resized_height/width: data.py's
    smart_resize, multiples of patch*merge): (T/2)·(h/28)·(w/28), T padded up to a multiple of 2."""
    from data import smart_resize
    f = patch * merge
    h, w = smart_resize(height, width, f)
    return math.ceil(frames / temporal) * (h // f) * (w // f)


def param_counts(c):
    """(text LLM params, vision tower params incl. merger, one decoder layer, V·d), counted like the HF modules."""
    t, v = c["text"], c["vision"]
    d, I, V = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    q, kv = t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    layer = d * q + q + 2 * (d * kv + kv) + q * d + 3 * d * I + 2 * d   # q/k/v (bias), o, SwiGLU, 2 RMSNorm
    if t.get("qk_norm"):   # Qwen3: no q/k/v bias, an RMSNorm over head_dim on q and on k
        layer += 2 * t["head_dim"] - q - 2 * kv
    text = V * d * (1 if t["tie_word_embeddings"] else 2) + t["num_hidden_layers"] * layer + d
    h, Iv, m2 = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"] ** 2
    mlp = 3 * h * Iv + 2 * Iv + h if v["gated"] else 2 * h * Iv + Iv + h
    block = h * 3 * h + 3 * h + h * h + h + mlp + 2 * h * (1 if v["gated"] else 2)   # qkv, proj, MLP, norms
    out = v["out_hidden_size"]   # merger: norm, Linear(h·m², h·m²), GELU, Linear(h·m², out), with biases
    merger = h * (1 if v["gated"] else 2) + (h * m2) ** 2 + h * m2 + h * m2 * out + out
    vision = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2 * h + v["depth"] * block + merger
    if v.get("deepstack") or v.get("pos_embeddings"):   # Qwen3-VL: conv bias, position table, DeepStack mergers
        vision += h + v["pos_embeddings"] * h + v["deepstack"] * (merger + 2 * h * m2 - 2 * h)   # their LayerNorm: h·m²
    return text, vision, layer, V * d


def layer_saved_bytes(t, device):
    """Bytes per token that autograd keeps for ONE HF Qwen2.5-VL decoder layer of the policy (no checkpointing), as
    counted with saved_tensors_hooks on the real module (tests/test_estimate.py re-counts them).
    fp32 (CPU): norm 1 (input, normalized, weighted: 3d) + q, k, v after rotary (q + 2kv) + attention lse (Hq) +
    o_proj input (q) + norm 2 (3d) + MLP gate, silu, up, product (4I), +2 rsqrt; times 4 bytes.
    bf16 autocast (GPU): the residual stream stays fp32 (the policy's embeddings are fp32), so each norm keeps its
    fp32 input and normalized output (8d) and every Linear its OWN bf16 cast of its input (q, k, v: 3 x 2d;
    gate, up: 2 x 2d); q, k, v, o_proj input, MLP in bf16; lse fp32."""
    d, I, Hq = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"]
    q, kv = Hq * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    if device == "cpu":
        return 4 * (6 * d + 2 * q + 2 * kv + Hq + 4 * I + 2)
    return 8 * d + 6 * d + 2 * q + 4 * kv + 4 * Hq + 2 * q + 8 * d + 4 * d + 8 * I + 8


def _tokens(c, frames, height, width, tokens_per_frame_pair, sizing):
    """-> (video tokens, frame (h, w) or None, LLM tokens per temporal patch)."""
    v = c["vision"]
    p, m, tp = v["patch_size"], v["spatial_merge_size"], v["temporal_patch_size"]
    if tokens_per_frame_pair:
        return math.ceil(frames / tp) * tokens_per_frame_pair, None, tokens_per_frame_pair
    h, w = frame_hw(frames, height, width, p * m, c.get("pixels"), **sizing)
    per_pair = (h // (p * m)) * (w // (p * m))
    return math.ceil(frames / tp) * per_pair, (h, w), per_pair


def estimate_memory(cfg, frames, world=None, sp=8, *, engine="vllm", vllm_memory=None, vllm_sleep_level=2,
                    kl_coef=1e-2, group_size=5, prompts_per_step=8, max_new_tokens=1024, prompt_tokens=256,
                    activation_checkpointing=True, keep_gathered=False, logit_chunk=1024, cache_bytes=1 << 30,
                    videos_seen=None, attn="ring", height=DEFAULT_SIZE, width=DEFAULT_SIZE, min_pixels=0,
                    max_pixels=0, total_pixels=0, resized_height=0, resized_width=0, tokens_per_frame_pair=None,
                    device="cuda", runtime_gb=0.0, gpu_mem_gib=80.0, reserve=0.10,
                    gpus=None, group=None, kl=None, response_tokens=None, grad_dtype="fp32", prefill_chunk=None):
    """Per-rank bytes of every copy and working set of rl.py, per phase (collect, prefill, update, sync), steady
    state, plus the SP communication per layer. Keyword names are rl.py's flags; world = torchrun's world size.
    videos_seen: distinct videos this rank has encoded so far (None: a long run, the embedding cache full).
    Old names still accepted: gpus (world), group (group_size), kl (kl_coef > 0), response_tokens (max_new_tokens),
    prefill_chunk (vLLM's batched tokens); grad_dtype must be fp32 (FSDP2 keeps the fp32 params' dtype).
    -> dict: phases {phase: {term: bytes}}, peaks {phase: bytes}, peak, fits, budget, vllm (engine sizing), comm, ...;
       train / rollout (+ _peak): the update and collect phases under their old names."""
    world = world if world is not None else (gpus if gpus is not None else 8)
    group_size = group if group is not None else group_size
    kl_coef = (1e-2 if kl else 0.0) if kl is not None else kl_coef
    R = response_tokens if response_tokens is not None else max_new_tokens
    batched = prefill_chunk or VLLM_BATCHED_TOKENS
    name, c = cfg if isinstance(cfg, tuple) else load_estimate_config(cfg)
    if sp < 1 or world % sp:
        raise ValueError(f"sp={sp} must divide world={world}")
    if engine not in ("hf", "vllm"):
        raise ValueError(f"engine={engine!r}: expected hf or vllm")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: expected cuda or cpu")
    if device == "cpu" and engine == "vllm":
        raise ValueError("device='cpu' models the HF engine only: vLLM-CPU cannot sleep and sizes its KV cache from "
                         "VLLM_CPU_KVCACHE_SPACE, which this estimate does not model")
    if grad_dtype != "fp32":
        raise ValueError(f"grad_dtype={grad_dtype!r}: rl.py's FSDP2 keeps gradients in the params' fp32")
    t, v = c["text"], c["vision"]
    L, d, I, V = t["num_hidden_layers"], t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    Hq = t["num_attention_heads"]
    qw, kv = Hq * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    p, m, tp, D = v["patch_size"], v["spatial_merge_size"], v["temporal_patch_size"], v["out_hidden_size"]
    hv, Iv = v["hidden_size"], v["intermediate_size"]
    sizing = dict(min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels,
                  resized_height=resized_height, resized_width=resized_width)
    n_video, hw, per_pair = _tokens(c, frames, height, width, tokens_per_frame_pair, sizing)
    S = n_video + prompt_tokens                            # a prompt (what the rollout engine prefills)
    N = S + R                                              # a training sequence: prompt + one response
    n = math.ceil(N / sp)                                  # tokens per SP rank in the prefill / update
    M = R if sp == 1 else min(R, math.ceil(N / (2 * sp)))  # scored tokens on the fullest rank (zigzag layout)
    chunk = min(logit_chunk, M)                            # LM-head rows at once
    P_text, P_vis, P_layer, P_emb = param_counts(c)
    P_root = P_text - L * P_layer                          # FSDP root unit: embeddings, final norm, LM head
    P_cast = P_text - (0 if t["tie_word_embeddings"] else P_emb)   # weights a Linear casts (all but the embedding)
    biggest = max(P_emb, d * I)                            # the largest single tensor (streamed one at a time)
    cpu, W, dp = device == "cpu", world, world // sp
    wb = 4 if cpu else 2          # frozen copies (rollout LLM, reference, vision tower, embeddings): fp32 CPU, bf16 GPU
    lb = 4 if cpu else 2          # the policy's Linear outputs: fp32 on CPU, bf16 under GPU autocast
    fsdp = W > 1                  # prepare_model applies FSDP2 only with more than one rank
    gathered_all = keep_gathered and fsdp
    per_rank_prompts = math.ceil(prompts_per_step / dp)    # prompts (videos) a rank holds each step
    seqs_per_update = per_rank_prompts * group_size
    # parallel encoding: the misses of all of the SP group's prompts are decoded + encoded together, each rank an
    # equal share of their temporal patches, then all-gathered: every rank ends with all of them
    pairs_local = math.ceil(per_rank_prompts * math.ceil(frames / tp) / sp)
    patches_local = pairs_local * per_pair * m * m         # vision patches (before the 2x2 merge)
    pix_row = 3 * tp * p * p                               # values per patch row (1176)
    emb_video = n_video * D * (1 + v["deepstack"]) * wb    # one video's cached embeddings (+ DeepStack features)

    # --- resident in every phase (steady state: AdamW state exists from the first opt.step on)
    resident = {}
    if cpu:
        resident["runtime (process RSS before the model loads)"] = runtime_gb * GB
    resident["policy LLM fp32 (FSDP2 shard, /world)"] = 4 * P_text / W
    resident[f"vision tower ({'fp32' if cpu else 'bf16'}, frozen, ONE copy shared)"] = wb * P_vis
    if cpu and fsdp and c.get("dtype") == "float32":
        # CPU only: an fp32 checkpoint loads as views into its mmap'ed file; the frozen tower's weights stay views
        # into the policy's file, which keeps it mapped, and the pages FSDP2 read to copy this rank's shard stay in
        # the RSS (/proc/self/smaps shows them as the model.safetensors mapping)
        resident["policy checkpoint pages read while sharding (mmap kept by the tower)"] = 4 * P_text / W
    resident["AdamW exp_avg + exp_avg_sq fp32 (/world)"] = 8 * P_text / W
    if engine == "hf":
        resident[f"HF rollout copy: LLM ({'fp32' if cpu else 'bf16'}, unsharded)"] = wb * P_text
    if kl_coef > 0:
        resident[f"reference LLM ({'fp32' if cpu else 'bf16'}, FSDP2 shard, /world)"] = wb * P_text / W
    # The step's videos come out of ONE encode as views of one concatenated tensor (a "batch"), referenced by the
    # step's video list until the next step's collect, and by the cache while it keeps any of them: a kept entry pins
    # its whole batch. The cache keeps its newest entries up to cache_bytes (at least one).
    batch = per_rank_prompts * emb_video
    fit = max(1, int(cache_bytes // emb_video)) if emb_video else 1
    kept = min(fit, videos_seen) if videos_seen is not None else fit
    batches = max(1, math.ceil(kept / per_rank_prompts))
    resident[f"video embeddings ({batches} step(s) x {per_rank_prompts} video(s), {'fp32' if cpu else 'bf16'})"] = \
        batches * batch

    # --- the vLLM engine (GPU): gpu_memory_utilization x the GPU = weights + profiled workspace + KV pool
    total = gpu_mem_gib * GiB
    kv_tok_vllm = 2 * L * kv * 2                           # K and V, every layer, bf16
    # the LLM only (fed embeddings); for Qwen3-VL vLLM must build its vision tower to apply DeepStack (idle weights)
    vllm_w = 2 * P_text + (2 * P_vis if v["deepstack"] else 0)
    # profiling forward of `batched` tokens, no grad, one layer at a time (hidden + residual, qkv, attention out,
    # gate_up, silu*up) + the sampler's fp32 logits for max_num_seqs
    vllm_ws = batched * (3 * d + qw + 2 * kv + 3 * I) * 2 + VLLM_MAX_SEQS * V * 4 * 2
    kv_need = kv_tok_vllm * (S + group_size * R)           # one prompt, its G samples share its KV (prefix caching)
    need = (vllm_w + vllm_ws + kv_need) / total
    util = need if vllm_memory is None else vllm_memory
    vllm = dict(weights=vllm_w, workspace=vllm_ws, kv_needed=kv_need, kv_tokens_per_byte=1 / kv_tok_vllm,
                needed_memory=need, vllm_memory=util, kv_pool=util * total - vllm_w - vllm_ws,
                max_model_len=S + R)
    vllm["holds_one_prompt"] = vllm["kv_pool"] >= kv_need
    engine_terms = {}
    if engine == "vllm":
        engine_terms = {"vLLM weights (bf16 LLM, no vision tower)": vllm_w,
                        "vLLM profiled workspace": vllm_ws,
                        f"vLLM KV pool (gpu_memory_utilization {util:.3f})": max(0.0, vllm["kv_pool"])}
    asleep = engine_terms if vllm_sleep_level == 0 else {}   # level 1/2 free the GPU (level 1: weights to host)

    def worst(points):
        """points {name: {term: bytes}} -> (name, terms) of the largest total: a phase's peak sub-step."""
        top = max(points, key=lambda k: sum(points[k].values()))
        return top, points[top]

    def add(phase, points, label):
        top, terms = worst(points)
        phase.update({f"{label} [{top}]: {k}": b for k, b in terms.items() if b})
        return phase

    # --- collect: decode + encode this step's videos (cache misses), then the rollouts
    pts = {}
    if cpu:   # host work: uint8 source + resized frames, the processor's float frames, normalized, patch rows
        resized = hw[0] * hw[1] * 3 if hw else per_pair * m * m * p * p * 3
        pts["decode"] = {"uint8 frames (source + resized)": pairs_local * tp * (height * width * 3 + resized),
                         "processor float frames, normalized, patch rows (3x)": 3 * patches_local * pix_row * 4}
    # the pixel rows stay referenced through the encode; first the vision tower runs (one block at a time, no grad:
    # max(attention: residual, norm out, qkv, fp32 rotary q/k; MLP: residual, norm out, gate, up, product)), then the
    # step's embeddings are all-gathered (the gathered parts + their concatenation; one rank: outputs + concatenation)
    pix = {"pixel rows fp32" + ("" if cpu else " + bf16 cast"): patches_local * pix_row * (4 if cpu else 6)}
    pts["encode: vision tower"] = dict(pix, **{"one vision block (1/sp of the patches)": patches_local * max(
        6 * hv * wb + 2 * hv * 4, (2 * hv + 3 * Iv) * wb)})
    pts["encode: all-gather"] = dict(pix, **{"this step's embeddings: parts + their concatenation": 2 * batch})
    if engine == "hf":   # one prompt at a time: prefill (KV + one layer), KV replicated G times, G decodes
        kv_tok = 2 * L * kv * wb
        layer = S * max((2 * d + 3 * I) * wb, (d + 2 * qw + 2 * kv) * wb)
        pts["HF prefill"] = {"prompt KV": S * kv_tok, "inputs_embeds + masked_scatter": 2 * S * d * wb,
                             "one layer, no grad": layer}
        pts["HF KV x G"] = {f"prompt KV x G={group_size}": group_size * S * kv_tok,
                            "one layer's copy in flight": S * kv_tok / L, "prefill hidden states": S * d * wb}
        pts["HF decode end"] = {f"KV x G of prompt + {R} tokens": group_size * (S + R) * kv_tok,
                                "one layer's cat in flight": group_size * (S + R) * kv_tok / L}
    else:
        pts["vLLM rollout"] = {"the video embeddings inside vLLM": n_video * D * (1 + v["deepstack"]) * 2}
    collect = add(dict(resident, **engine_terms), pts, "working set")

    # --- the sequence forward shared by prefill and update
    ring = sp > 1 and attn == "ring"

    def fwd_inputs(resid_b):
        # inputs_embeds + the gathered video rows (n, d); ids, targets, masks, mrope positions of all N tokens
        return n * d * resid_b * 2 + 64 * N

    # GPU: the cached bf16 embeddings are cast to fp32 whole before this rank's rows are picked (a moment, before
    # the layers run)
    emb_cast = 0 if cpu else n_video * D * 4

    def nograd_layer(resid_b, lin_b):
        # one decoder layer, no grad: MLP (residual, norm out, gate/silu, up, product) vs attention (residual, q, k, v,
        # out + ring K/V double buffers, GQA-expanded K/V and the fp32 merge accumulator under SP)
        mlp = 2 * d * resid_b + 3 * I * lin_b + (0 if cpu else 2 * 2 * d)   # GPU: gate/up's bf16 input casts
        att = d * resid_b + (2 * qw + 2 * kv) * lin_b + ((4 * kv + 2 * qw) * lin_b + 4 * qw if ring else 0)
        return n * max(mlp, att)

    head_fwd = chunk * V * (12 if cpu else 14) + n * d * 4   # logits (bf16 -> fp32 on GPU), /T, log_softmax; final h
    unit = lambda b: b * (P_root + 2 * P_layer)            # noqa: E731  root + current + prefetched layer unit
    pol_gather = (4 * P_text if gathered_all else unit(4)) if fsdp else 0
    gather_name = "FSDP gathered params" + (" (all: keep_gathered)" if gathered_all else " (root + 2 units)")
    # a unit's all-gather output exists next to the unsharded params it is copied into: in every forward without
    # keep_gathered, in the mini-batch's first forward with it (then the params stay gathered: none in the update
    # from its 2nd sequence on, where the gradients peak)
    ag = P_layer if fsdp else 0
    casts = 0 if cpu else 2 * P_cast                       # autocast's bf16 copy of every fp32 policy weight

    # --- prefill: old-policy log-probs (policy, fp32 + autocast) then reference log-probs, one model at a time
    def forward(gathered, ag_bytes, cast, resid_b, lin_b):
        x = {gather_name: gathered, "one unit's all-gather output": ag_bytes,
             "autocast bf16 weight copies": cast, "inputs + index tensors": fwd_inputs(resid_b),
             "largest of: one layer (no grad), LM-head chunk, fp32 embeddings cast": max(
                 nograd_layer(resid_b, lin_b), head_fwd, emb_cast if resid_b == 4 else 0)}
        return x

    pts = {"old-policy forward": forward(pol_gather, 4 * ag, casts, 4, lb)}
    if kl_coef > 0:
        pts["reference forward"] = forward((wb * P_text if gathered_all else unit(wb)) if fsdp else 0, wb * ag, 0,
                                           wb, wb)
    prefill = add(dict(resident, **asleep), pts, "working set")

    # --- update: forward + backward of each sequence (gradients accumulate over the mini-batch), then AdamW.
    # From the mini-batch's second sequence on, every gradient exists during the forward and backward.
    # keep_gathered (or one rank: no FSDP): unsharded gradients accumulate, all of them exist from the 2nd sequence
    # on. Else each backward reduce-scatters: the shard accumulates, and during a backward the root's LM-head
    # gradient (computed first, reduced last) and the current unit's unsharded gradient + reduce-scatter input exist.
    full_grads = gathered_all or not fsdp
    grads_fwd = 4 * P_text if full_grads else 4 * P_text / W
    grads_bwd = 4 * P_text if full_grads else 4 * P_text / W + 4 * P_emb + 2 * 4 * P_layer
    g_name = "gradients fp32, accumulated" + (", unsharded" if full_grads else " (shard)")
    g_name_bwd = g_name if full_grads else "gradients fp32 (shard + LM head's + one unit's unsharded)"
    saved = layer_saved_bytes(t, device)
    bwd_layer = n * (2 * d * 4 + 3 * I * lb)               # one layer's backward: residual grads + MLP grads
    ring_bwd = n * ((4 * kv + 2 * qw) * lb + (4 * kv + 3 * qw) * 4) if ring else 0   # K/V, fp32 dK/dV, dQ
    head_bwd = chunk * V * 16 + M * d * 4                  # a chunk's logits recomputed + log_softmax + their grads
    rope = 2 * n * t["head_dim"] * 4                       # cos/sin, shared by every layer
    ag_upd = 0 if gathered_all else 4 * ag
    base = {gather_name: pol_gather, "one unit's all-gather output": ag_upd, g_name: grads_fwd}        # a forward
    bbase = {gather_name: pol_gather, "one unit's all-gather output": ag_upd, g_name_bwd: grads_bwd}   # a backward
    if not activation_checkpointing:
        pts = {"backward start": dict(bbase, **{
            "autocast bf16 weight copies (saved for backward)": casts,
            f"activations: {L} layers x {n:,} tokens x {saved:,} B + final norm": L * n * saved + 2 * n * d * 4 + rope,
            "LM-head chunk backward": head_bwd, "one layer's backward": max(bwd_layer, ring_bwd)})}
    else:
        # per layer its fp32 input; under ring SP the remat-aware checkpoint also keeps the attention output + lse
        ck = L * n * (4 * d + ((qw * lb + 4 * Hq) if ring else 0)) + rope
        ck_name = f"checkpointed layer inputs{' + kept ring outputs' if ring else ''} ({L} layers x {n:,} tokens)"
        pts = {"forward end": dict(base, **{ck_name: ck, "autocast bf16 weight copies (cached)": casts,
                                            "final hidden states": n * d * 4}),
               "backward, one layer recomputed": dict(bbase, **{
                   ck_name: ck, f"one layer's saved activations ({saved:,} B/token)": n * saved,
                   "its autocast weight copies": 0 if cpu else 2 * P_layer,
                   "one layer's backward": max(bwd_layer, ring_bwd)}),
               "backward start (LM head)": dict(bbase, **{ck_name: ck, "LM-head chunk backward": head_bwd})}
    # AdamW on the sharded gradients: foreach on GPU (one fp32 temporary the size of the shard), per tensor on CPU
    pts["optimizer step"] = {"gradients fp32 (shard)": 4 * P_text / W,
                             "AdamW temporaries": 8 * biggest if cpu else 4 * P_text / W}
    upd = add(dict(resident, **asleep), pts, "working set")

    # --- sync: the step starts by waking vLLM (weights back, new weights streamed tensor by tensor, KV back); after
    # the update the HF copy takes the new weights tensor by tensor (each all-gathered in full, cast to its dtype)
    sync = dict(resident)
    if engine == "vllm":   # the KV pool comes back after the stream; the workspace is only used by forwards
        stream = biggest * (4 + 2)                         # one full fp32 tensor + its bf16 cast
        sync.update({k: b for k, b in engine_terms.items() if "workspace" not in k})
        if stream > max(0.0, vllm["kv_pool"]):
            sync["weight stream (one full tensor, beyond the KV pool)"] = stream - max(0.0, vllm["kv_pool"])
    else:
        one = biggest * ((4 if fsdp else 0) + (0 if cpu else 2))
        if one:
            sync["weight sync: one full tensor gathered + cast"] = one

    phases = dict(collect=collect, prefill=prefill, update=upd, sync=sync)
    peaks = {k: sum(x.values()) for k, x in phases.items()}
    budget = gpu_mem_gib * GiB * (1 - reserve)
    peak = max(peaks.values())
    P = sp
    comm = {  # per layer per rank, forward, bf16 bytes
        "ring K/V (P-1)·2·(N/P)·kv": (P - 1) * 2 * n * kv * 2,
        # backward: K/V travel again (bf16) + dK/dV partial sums in fp32 (as seq_parallel_attn.py accumulates them)
        "ring backward K/V + fp32 dK/dV": (P - 1) * 2 * n * kv * (2 + 4),
        # Ulysses: q, k, v scattered by head + out gathered back = 4·N·d/P per rank for MHA (a bound with GQA)
        "Ulysses all-to-all 4·N·d/P": 4 * n * d * 2 if P > 1 else 0,
        # Megatron TP + sequence parallel on P ranks: per layer 2 all-gathers + 2 reduce-scatters of (N, d)
        "Megatron TP-SP 2 AG + 2 RS": 4 * (P - 1) / P * N * d * 2,
    }
    return dict(name=name, device=device, engine=engine, frames=frames, height=height, width=width, frame_hw=hw,
                tokens_per_frame_pair=per_pair, video_tokens=n_video, text_tokens=prompt_tokens + R, prompt_len=S,
                seq_tokens=N, local_tokens=n, scored_tokens=M, world=W, gpus=W, sp=sp, dp=dp, group_size=group_size,
                seqs_per_update=seqs_per_update, params_text=P_text, params_vision=P_vis, phases=phases, peaks=peaks,
                peak=peak, budget=budget, gpu_mem_gib=gpu_mem_gib, reserve=reserve,
                fits=None if cpu else peak <= budget and (engine == "hf" or vllm["holds_one_prompt"]),
                vllm=vllm if engine == "vllm" else None, vllm_sizing=vllm, comm=comm,
                ulysses_ok=P <= t["num_key_value_heads"] and t["num_key_value_heads"] % P == 0,
                train=upd, rollout=collect, train_peak=peaks["update"], rollout_peak=peaks["collect"])


def format_estimate(r):
    """Readable per-rank table: GiB (GB on CPU, as rl.py's metrics), per phase, then vLLM sizing and comm (MB)."""
    cpu = r["device"] == "cpu"
    unit, div = ("GB", GB) if cpu else ("GiB", GiB)
    small = r["peak"] < div
    g = (lambda b: f"{b / div:9.3f}") if small or cpu else (lambda b: f"{b / div:7.1f}")
    size = (f"{r['frame_hw'][0]}x{r['frame_hw'][1]} frames" if r["frame_hw"] else "") + \
        f" ({r['tokens_per_frame_pair']} tok/2 frames)"
    pc = lambda x: f"{x / 1e9:.2f}B" if x >= 1e8 else f"{x / 1e6:.2f}M"   # noqa: E731
    out = [f"model {r['name']} ({pc(r['params_text'])} LLM + {pc(r['params_vision'])} vision), {r['frames']} frames"
           f"{' of ' + str(r['height']) + 'x' + str(r['width']) if r['frame_hw'] else ''} -> {size.strip()} -> "
           f"{r['video_tokens']:,} video tokens (+{r['text_tokens']:,} text) = {r['seq_tokens']:,}; world "
           f"{r['world']}, sp {r['sp']}, dp {r['dp']}, {r['local_tokens']:,} tokens/rank; engine {r['engine']}, "
           f"device {r['device']}"]
    names = dict(collect="collect (rollouts)", prefill="prefill (old + ref log-probs)", update="update (fwd+bwd+AdamW)",
                 sync="sync (weights to the engine)")
    for ph, terms in r["phases"].items():
        out.append(f"  {names[ph]:<78} {unit}/rank")
        out += [f"    {k:<76} {g(b)}" for k, b in terms.items()]
        out.append(f"    {'= ' + ph + ' peak':<76} {g(r['peaks'][ph])}")
    if not cpu:
        out.append(f"  peak {g(r['peak']).strip()} GiB vs budget {g(r['budget']).strip()} GiB "
                   f"({r['gpu_mem_gib']:g} GiB - {r['reserve']:.0%} reserve): " + ("FITS" if r["fits"] else
                                                                                   "DOES NOT FIT"))
    vs = r["vllm_sizing"]
    if r["engine"] == "vllm":
        out.append(f"  vLLM: --vllm_memory >= {vs['needed_memory']:.3f} of {r['gpu_mem_gib']:g} GiB holds its weights "
                   f"{vs['weights'] / GiB:.1f} + workspace {vs['workspace'] / GiB:.1f} + the KV of one prompt + "
                   f"{r['group_size']} responses {vs['kv_needed'] / GiB:.1f} GiB; at {vs['vllm_memory']:.3f} the KV "
                   f"pool is {max(0.0, vs['kv_pool']) / GiB:.1f} GiB"
                   + ("" if vs["holds_one_prompt"] else " -- TOO SMALL for one prompt")
                   + f"; --vllm_max_model_len >= {vs['max_model_len']:,}")
    out.append("  communication per layer per rank, forward unless noted (MB)")
    out += [f"    {k:<40} {b / 1e6:10.1f}" for k, b in r["comm"].items()]
    ring = next(iter(r["comm"].values()))
    if ring:
        out.append(f"    Megatron / ring forward = {r['comm']['Megatron TP-SP 2 AG + 2 RS'] / ring:.1f}x")
    if r["sp"] > 1 and not r["ulysses_ok"]:
        out.append(f"    (Ulysses needs sp | kv heads: sp={r['sp']} would replicate K/V)")
    return "\n".join(out)


def cli_kwargs(g):
    """The CLI's globals -> estimate_memory keyword arguments."""
    keys = ("engine", "vllm_sleep_level", "kl_coef", "group_size", "prompts_per_step", "max_new_tokens",
            "prompt_tokens", "activation_checkpointing", "keep_gathered", "logit_chunk", "cache_bytes", "attn",
            "height", "width", "min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width",
            "device", "runtime_gb", "gpu_mem_gib", "reserve")
    kw = {k: g[k] for k in keys}
    kw["vllm_memory"] = g["vllm_memory"] or None
    kw["videos_seen"] = g["videos_seen"] or None
    return kw


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    try:
        r = estimate_memory(model, frames, world=gpus or world, sp=sp, **cli_kwargs(globals()))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"estimate.py: {e}") from None
    print(format_estimate(r))
