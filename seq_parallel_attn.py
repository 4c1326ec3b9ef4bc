"""Sequence-parallel attention, LightSeq style: exact, causally balanced, communication overlapped.

The sequence is split over the P ranks of a process group. Every rank keeps its queries; keys and values
travel around a ring (rank r sends to r+1, receives from r-1), and each rank merges the partial results
with their log-sum-exp (lse). Works for MHA, GQA and MQA alike (the head count never has to divide P).

    import seq_parallel_attn as spa
    x = spa.shard_seq(x_full, group)                       # (B, N, ...) -> (B, S_local, ...), zigzag layout
    pos = spa.shard_seq(position_ids, group, dim=-1)       # positions follow their tokens (mrope: (3, B, N), dim=2)
    out = spa.ring_attn(q, k, v, causal=True, group=group, total_len=N)   # q (B, S_local, Hq, D), k/v (B, S_local, Hkv, D)
    y = spa.gather_seq(out, N, group)                      # back to (B, N, Hq, D) on every rank
    spa.register_hf("ring", group)                         # then model.set_attn_implementation("ring")

Layout ("zigzag", the default): the (padded) sequence is cut into 2P chunks of c tokens; rank r holds chunks
r and 2P-1-r, so every rank gets the same amount of causal work. Padding (to 2P*c tokens) only ever sits at the
end of the global sequence; pass total_len=N and padded keys are never attended, padded query rows give 0.
"contiguous" (rank r holds chunk r of P) is kept for comparison: causal work then grows with r.

Other pieces: ulysses_attn (all-to-all over heads), remat_contexts() / remat_aware() (activation checkpointing
without re-running the ring forward, LightSeq's rematerialization-aware checkpointing), register_hf (transformers
AttentionInterface), check_same (what must agree across the group, checked once per sequence: ring_attn itself only
checks its local inputs, the cross-rank comparison costs a collective per call and runs only with check=True).
Only causal or full (no padding) masks are supported: that is what sequence-parallel training needs.

    python -m pytest -q tests/test_seq_parallel_attn.py       # CPU, gloo, 1-4 processes
    python bench/bench_seq_parallel_attn.py                   # balance, bytes, overlap, bf16 error (CPU)
"""
import contextlib
import inspect
import math
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F

OVERLAP = True      # post the next K/V transfer before computing on the current block (False: comm, then compute)
BACKEND = "auto"    # kernel: "auto" | "flash_attn" | "cuda_flash" | "cpu_flash" | "math"
STATS = {"ring_fwd": 0, "ring_bwd": 0, "remat_hits": 0, "bytes_sent": 0}   # counters for tests and the bench
LAYOUTS = ("zigzag", "contiguous")


def reset_stats():
    for key in STATS:
        STATS[key] = 0


# ----------------------------------------------------------------------------------------------------------
# groups and layout

def _world(group):
    """(P, rank) of this process in `group`; (1, 0) when running locally."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(f"group={group} given but torch.distributed is not initialized")
        return 1, 0
    if group is None:
        if dist.get_world_size() > 1:
            raise ValueError(f"group=None but torch.distributed runs {dist.get_world_size()} processes: pass the "
                             "sequence-parallel group explicitly (e.g. group=dist.group.WORLD)")
        return 1, 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of group {group}")
    return dist.get_world_size(group), rank


def _chunk(total_len, P, layout):
    """Tokens per chunk: zigzag cuts the padded sequence in 2P chunks, contiguous in P."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}, expected one of {LAYOUTS}")
    return math.ceil(total_len / (2 * P if layout == "zigzag" else P))


def _positions(total_len, P, rank, layout):
    if P == 1:
        return torch.arange(total_len)
    c = _chunk(total_len, P, layout)
    if layout == "contiguous":
        return torch.arange(rank * c, (rank + 1) * c)
    j = 2 * P - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange(j * c, (j + 1) * c)])


def local_positions(total_len, group=None, layout="zigzag", rank=None):
    """Global positions of this rank's local tokens, (S_local,) long. Positions >= total_len are padding."""
    P, r = _world(group)
    return _positions(total_len, P, r if rank is None else rank, layout)


def _n_valid(total_len, P, rank, layout):
    """How many local tokens are real (not padding). They always form a prefix of the local shard:
    padding is a suffix of the global sequence and a rank's chunks are in increasing global order."""
    pos = _positions(total_len, P, rank, layout)
    n = int((pos < total_len).sum())
    assert bool((pos[:n] < total_len).all()), "valid tokens must be a prefix of the shard"
    return n


def shard_seq(x, group=None, dim=1, layout="zigzag", pad_value=0):
    """Split a full sequence (length N along `dim`) into this rank's shard: pad to P*S_local, pick local tokens."""
    P, r = _world(group)
    dim = dim % x.dim()
    N = x.shape[dim]
    pos = _positions(N, P, r, layout).to(x.device)
    pad = P * pos.numel() - N if P > 1 else 0
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_full(shape, pad_value)], dim)
    return x.index_select(dim, pos)


class _AllGatherSeq(torch.autograd.Function):
    """all_gather along `dim` in rank order. Backward keeps this rank's slice: the loss computed after a
    gather is the same on every rank, so each rank owns the gradient of its own tokens (no reduction)."""

    @staticmethod
    def forward(ctx, x, group, P, rank, dim):
        ctx.rank, ctx.dim, ctx.n = rank, dim, x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(P)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.rank * ctx.n, ctx.n), None, None, None, None


def gather_seq(x_local, total_len, group=None, dim=1, layout="zigzag"):
    """Undo shard_seq: all-gather the shards, put tokens back in global order, drop the padding."""
    P, r = _world(group)
    dim = dim % x_local.dim()
    want = _positions(total_len, P, r, layout).numel()
    if x_local.shape[dim] != want:
        raise ValueError(f"gather_seq: local length {x_local.shape[dim]} along dim {dim}, expected {want} "
                         f"for total_len={total_len} over {P} ranks ({layout})")
    if P == 1:
        return x_local.narrow(dim, 0, total_len)
    x = _AllGatherSeq.apply(x_local, group, P, r, dim)                     # rank-major order
    perm = torch.cat([_positions(total_len, P, j, layout) for j in range(P)])
    return x.index_select(dim, torch.argsort(perm).to(x.device)).narrow(dim, 0, total_len)


# ----------------------------------------------------------------------------------------------------------
# kernel layer: fwd(q, k, v) -> (out, lse) and its backward, on (B, S, H, D) tensors

def _backend(q, name=None):
    name = name or BACKEND
    if name != "auto":
        return name
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # the flash kernels need sm80+ (A100/H100 class) and head_dim a multiple of 8 up to 256; else the reference
        if torch.cuda.get_device_capability(q.device) < (8, 0) or q.shape[-1] % 8 or q.shape[-1] > 256:
            return "math"
        try:
            import flash_attn  # noqa: F401  (optional, CUDA only)
            return "flash_attn"
        except ImportError:
            return "cuda_flash"
    return "math" if q.is_cuda else "cpu_flash"   # CUDA fp32/fp64: no flash kernel, use the reference


def _expand_kv(x, groups):
    # (B, S, Hkv, D) -> (B, S, Hkv*groups, D); query head h uses kv head h // groups (as HF repeat_kv)
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _reduce_kv(dx, groups):
    # gradient of _expand_kv: sum over the query heads that shared a kv head
    B, S, H, D = dx.shape
    return dx if groups == 1 else dx.view(B, S, H // groups, groups, D).sum(3)


def _math_scores(q, k, scale, causal):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale    # (B, H, Sq, Sk)
    if causal:  # top-left aligned, as SDPA; the ring only calls causal on square blocks
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _math_fwd(q, k, v, causal, scale):
    s = _math_scores(q, k, scale, causal)
    lse = torch.logsumexp(s, -1)                                          # (B, H, Sq)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)                     # fully masked row: 0, not NaN
    out = torch.einsum("bhqk,bkhd->bqhd", p, v.to(p.dtype))
    return out.to(q.dtype), lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _math_bwd(dout, q, k, v, out, lse, causal, scale):
    s = _math_scores(q, k, scale, causal)
    p = torch.exp(s - lse.to(s.dtype)[..., None]).nan_to_num(0.0)        # probabilities under the FINAL lse
    do = dout.to(s.dtype)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, v.to(s.dtype))
    delta = (do * out.to(s.dtype)).sum(-1).transpose(1, 2)               # (B, H, Sq): rowsum(dO * O)
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.to(s.dtype)) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.to(s.dtype)) * scale
    return dq, dk, dv


def _flash_attn_bwd(dout, q, k, v, out, lse, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_backward   # signature moved across 2.x: by name
    # from 2.7 on it is a torch.library custom op whose own signature is (*args, **kwargs): read the wrapped function
    params = inspect.signature(getattr(_flash_attn_backward, "_init_fn", _flash_attn_backward)).parameters
    kw = dict(dropout_p=0.0, softmax_scale=scale, causal=causal, alibi_slopes=None, deterministic=False)
    if "window_size" in params:
        kw["window_size"] = (-1, -1)
    else:
        kw.update(window_size_left=-1, window_size_right=-1)
    if "softcap" in params:
        kw["softcap"] = 0.0
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _flash_attn_backward(dout.contiguous(), q, k, v, out, lse, dq, dk, dv, **kw)
    return dq, dk, dv


def attn_fwd(q, k, v, causal, scale, backend=None):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D) in q.dtype, lse (B, Hq, Sq) fp32."""
    name, groups = _backend(q, backend), q.shape[2] // k.shape[2]
    if name == "flash_attn":   # takes (B, S, H, D) and GQA natively
        from flash_attn import flash_attn_func
        out, lse, _ = flash_attn_func(q, k, v, 0.0, softmax_scale=scale, causal=causal, return_attn_probs=True)
        return out, lse.float()
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    if name == "math":
        return _math_fwd(q, k, v, causal, scale)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))                  # aten wants (B, H, S, D)
    if name == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, causal, scale=scale)
    elif name == "cuda_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=scale)[:2]
    else:
        raise ValueError(f"backend={name!r}, expected auto, flash_attn, cuda_flash, cpu_flash or math")
    return out.transpose(1, 2), lse[..., :q.shape[1]].float()


def attn_bwd(dout, q, k, v, out, lse, causal, scale, backend=None):
    """Gradients of one block given the FINAL out and lse of the rows: exact block contributions."""
    name, groups = _backend(q, backend), q.shape[2] // k.shape[2]
    if name == "flash_attn":
        return _flash_attn_bwd(dout, q, k, v, out, lse, causal, scale)
    ke, ve = _expand_kv(k, groups), _expand_kv(v, groups)
    if name == "math":
        dq, dk, dv = _math_bwd(dout, q, ke, ve, out, lse, causal, scale)
    else:
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        if name == "cpu_flash":
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                t(dout), t(q), t(ke), t(ve), t(out), lse, 0.0, causal, scale=scale)
        else:  # cuda_flash: dense, no dropout -> cum_seq None (as the forward returns them: a defined tensor,
            # even an empty one, selects the varlen kernel) and a dummy rng state (read only with dropout)
            seed, offset = torch.zeros(2, dtype=torch.uint64, device=q.device), q.new_empty(0, dtype=torch.uint64)
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                t(dout), t(q), t(ke), t(ve), t(out), lse, None, None, q.shape[1], k.shape[1], 0.0, causal,
                seed, offset, scale=scale)
        dq, dk, dv = t(dq), t(dk), t(dv)
    return dq, _reduce_kv(dk, groups), _reduce_kv(dv, groups)


def merge_attn(out, lse, out_b, lse_b):
    """Merge two partial softmax results of the same query rows, in fp32 (fp64 stays fp64).
    out (B, S, H, D), lse (B, H, S). out <- out - sigmoid(L_b - L)*(out - out_b);
    L <- L - logsigmoid(L - L_b) = max(L, L_b) - logsigmoid(|L - L_b|) (same value, finite when one side
    is -inf). Rows where both are -inf (nothing attended yet) stay out=0, L=-inf: never NaN."""
    empty = torch.isneginf(lse) & torch.isneginf(lse_b)
    L, Lb = lse.masked_fill(empty, 0.0), lse_b.masked_fill(empty, 0.0)   # any finite value: result masked below
    w = torch.sigmoid(Lb - L).masked_fill(empty, 0.0)                     # weight of the new block, (B, H, S)
    out = out - w.transpose(1, 2)[..., None] * (out - out_b)
    new = torch.maximum(L, Lb) - F.logsigmoid((L - Lb).abs())
    return out, new.masked_fill(empty, float("-inf"))


# ----------------------------------------------------------------------------------------------------------
# which (query, key) slices a rank computes at each ring step

def block_plan(rank, src, P, c, nq, nk, causal, layout="zigzag"):
    """Kernel calls for queries of `rank` against the K/V shard of `src`: list of (q0, q1, k0, k1, causal).
    c: tokens per chunk; nq/nk: real (non-padding) tokens of rank/src, always a prefix of the shard."""
    if src == rank:
        plan = [(0, nq, 0, nk, causal)]          # diagonal: local order = global order, so causal is square
    elif not causal:
        plan = [(0, nq, 0, nk, False)]
    elif layout == "contiguous":
        plan = [(0, nq, 0, nk, False)] if src < rank else []
    elif src < rank:                             # zigzag: src's first chunk precedes both of mine, its second
        plan = [(0, nq, 0, min(c, nk), False)]   # chunk follows both -> all my queries, its first half
    else:                                        # src > rank: src's two chunks sit between my two chunks
        plan = [(c, nq, 0, nk, False)]           # -> my second-half queries, all of src
    return [p for p in plan if p[1] > p[0] and p[3] > p[2]]


def work_per_rank(total_len, P, causal=True, layout="zigzag"):
    """Attended (q, k) pairs per rank, from the same plan the ring executes (for the balance check)."""
    c = _chunk(total_len, P, layout) if P > 1 else total_len
    n = [_n_valid(total_len, P, r, layout) for r in range(P)]
    work = []
    for r in range(P):
        pairs = 0
        for s in range(P):
            for q0, q1, k0, k1, cz in block_plan(r, s, P, c, n[r], n[s], causal, layout):
                pairs += (q1 - q0) * (q1 - q0 + 1) // 2 if cz else (q1 - q0) * (k1 - k0)
        work.append(pairs)
    return work


# ----------------------------------------------------------------------------------------------------------
# ring communication: send to r+1, receive from r-1 (group ranks translated to global ranks)

def _ring_post(send, recv, group, P, rank, tag):
    """Non-blocking send of `send` to the next rank and receive into `recv` from the previous one, posted as ONE
    batch. Two NCCL traps: a lone send and a lone receive between the same two ranks (P=2: next == previous) can
    deadlock, so they go out together; and NCCL matches the messages of a rank pair by posting order (tags are
    ignored; gloo honours them), so every rank must post the same sequence of batches (the ring loops do)."""
    ops = []
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send, dist.get_global_rank(group, (rank + 1) % P), group=group, tag=tag))
        STATS["bytes_sent"] += send.numel() * send.element_size()
    if recv is not None:
        ops.append(dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, (rank - 1) % P), group=group, tag=tag))
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works):
    for w in works:
        w.wait()
    return []


_KV, _DKV = 0, 1    # message tags: K/V blocks and travelling dK/dV partial sums


def _ring_forward(q, k, v, causal, scale, group, P, rank, N, layout, overlap, backend):
    B, S, H, D = q.shape
    c = _chunk(N, P, layout) if P > 1 else N
    n = [_n_valid(N, P, j, layout) for j in range(P)]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, S, H, D, dtype=acc, device=q.device)
    lse = torch.full((B, H, S), float("-inf"), dtype=acc, device=q.device)
    kv = torch.stack([k, v])                                             # (2, B, S, Hkv, D): travels the ring
    for t in range(P):
        src = (rank - t) % P
        works, nxt = [], None
        if t < P - 1:                                                    # double buffer: next block in flight
            nxt = torch.empty_like(kv)
            works = _ring_post(kv, nxt, group, P, rank, _KV)
            if not overlap:
                works = _wait(works)
        for q0, q1, k0, k1, cz in block_plan(rank, src, P, c, n[rank], n[src], causal, layout):
            o_b, l_b = attn_fwd(q[:, q0:q1], kv[0, :, k0:k1], kv[1, :, k0:k1], cz, scale, backend)
            out[:, q0:q1], lse[:, :, q0:q1] = merge_attn(out[:, q0:q1], lse[:, :, q0:q1], o_b.to(acc), l_b.to(acc))
        _wait(works)
        kv = nxt if nxt is not None else kv
    STATS["ring_fwd"] += 1
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, causal, scale, group, P, rank, N, layout, overlap, backend):
    """K/V go around the ring again. The dK/dV partial sums of a block travel one step behind it: the
    owner keeps its own contribution, the sum starts at rank owner+1 and arrives back at the owner last.
    Every rank posts the same sequence: step t: K/V batch (t < P-1); end of step t >= 1: one dK/dV batch (send my
    partial sum on, receive the next step's from rank-1, or at the last step my own block's total)."""
    c = _chunk(N, P, layout) if P > 1 else N
    n = [_n_valid(N, P, j, layout) for j in range(P)]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    own, dkv_in, dkv_out, dkv_works = None, None, None, []
    for t in range(P):
        src = (rank - t) % P
        works, nxt = [], None
        if t < P - 1:
            nxt = torch.empty_like(kv)
            works = _ring_post(kv, nxt, group, P, rank, _KV)
        if not overlap:
            works = _wait(works)
        dkv = torch.zeros((2,) + k.shape, dtype=acc, device=q.device)   # this rank's share for block src
        for q0, q1, k0, k1, cz in block_plan(rank, src, P, c, n[rank], n[src], causal, layout):
            dq_b, dk_b, dv_b = attn_bwd(dout[:, q0:q1], q[:, q0:q1], kv[0, :, k0:k1], kv[1, :, k0:k1],
                                        out[:, q0:q1], lse[:, :, q0:q1].contiguous(), cz, scale, backend)
            dq[:, q0:q1] += dq_b
            dkv[0, :, k0:k1] += dk_b
            dkv[1, :, k0:k1] += dv_b
        _wait(works)
        if t == 0:
            own = dkv
        else:
            if dkv_in is not None:                                       # block src's partial sum from rank-1
                dkv_works = _wait(dkv_works)
                dkv += dkv_in
            dkv_in, dkv_out = torch.empty_like(dkv), dkv                 # dkv_out: kept alive until its send is done
            dkv_works = _ring_post(dkv_out, dkv_in, group, P, rank, _DKV)   # on to the next rank (owner at the end)
            if not overlap:
                dkv_works = _wait(dkv_works)
        kv = nxt if nxt is not None else kv
    if P > 1:                                                            # my block's sum, back from rank-1
        _wait(dkv_works)
        own += dkv_in
    STATS["ring_bwd"] += 1
    return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype)


# ----------------------------------------------------------------------------------------------------------
# rematerialization-aware checkpointing (LightSeq): the checkpoint sits at the attention output
#
# Activation checkpointing re-runs a layer's forward in backward to rebuild its saved tensors. For a ring layer that
# would mean P-1 more K/V transfers and the kernels again. Instead the forward keeps the attention's (out, lse) and
# the recompute returns them: the ring forward runs once per layer per step. Memory is honest: the kept output is one
# (B, S_local, Hq, D) tensor + an fp32 (B, Hq, S_local) lse per layer -- in LightSeq's scheme this IS the checkpoint's
# own saved activation (the checkpoint is at the attention output, next to the layer input), not a copy: `out` is
# the tensor the forward returned, kept alive until the recompute consumes it.

REMAT = True        # False: checkpointed layers re-run the ring forward in backward (plain checkpointing, to compare)
_REMAT = None       # (slot, phase) while a remat context is entered; see _RematSlot
_SLOTS = weakref.WeakSet()   # every slot still alive, for remat_kept()


class _RematSlot:
    """The attention outputs one forward keeps for its recompute: {("ring", remat_key): (out, lse, out._version)}.
    remat_contexts() makes one slot per checkpointed call, held by that checkpoint's recompute closure, i.e. by the
    autograd graph: consumed entries are popped, and a forward never followed by its backward (an exception, a
    dropped loss) frees its slot with its graph. Slots are never shared, so no later forward can see a stale entry."""
    __slots__ = ("kept", "__weakref__")

    def __init__(self):
        self.kept = {}
        _SLOTS.add(self)


class _RematPhase:
    """Makes `slot` current: phase "forward" keeps outputs, "recompute" reuses them, "auto" (remat_aware) tells the
    two apart by whether the autograd engine is running. A class, not @contextmanager: checkpoint enters the same
    recompute context again on each backward through a retained graph."""

    def __init__(self, slot, phase, hf_config=None):
        self.slot, self.phase, self.saved = slot, phase, []
        # HF picks the attention function by config name at CALL time, and the recompute runs inside
        # loss.backward(), after the block that selected the SP attention has exited: replay the forward's choice
        self.hf_config = hf_config
        self.attn = hf_config._attn_implementation if hf_config is not None else None

    def __enter__(self):
        global _REMAT
        self.saved.append((_REMAT, self.hf_config._attn_implementation if self.hf_config is not None else None))
        _REMAT = (self.slot, self.phase)
        if self.hf_config is not None:
            self.hf_config._attn_implementation = self.attn

    def __exit__(self, *exc):
        global _REMAT
        _REMAT, attn = self.saved.pop()
        if self.hf_config is not None:
            self.hf_config._attn_implementation = attn
        return False


def remat_contexts(hf_config=None):
    """context_fn for torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False, context_fn=remat_contexts):
    inside fn, ring_attn(..., remat_key=k) keeps its (out, lse) in the forward and the recompute reuses them instead
    of running the ring again. checkpoint calls this once per checkpointed call, so every call gets its own slot
    (layers cannot collide, nothing outlives the graph). hf_config: a transformers config whose
    _attn_implementation the recompute must see as the forward saw it (functools.partial it in). With HF:
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(use_reentrant=False,
    context_fn=functools.partial(remat_contexts, hf_config=model.config)))."""
    slot = _RematSlot()
    return _RematPhase(slot, "forward"), _RematPhase(slot, "recompute", hf_config)


@contextlib.contextmanager
def remat_aware():
    """Scoped variant for code that calls checkpoint itself without a context_fn: inside this block, ring_attn(...,
    remat_key=k) keeps its output and a recompute (detected as running inside the autograd engine) reuses it. Run
    the forward AND its backward inside the block, one forward per key before its backward; the kept outputs are
    dropped on exit. Training code should prefer remat_contexts (per-checkpoint, survives the forward's scope)."""
    slot = _RematSlot()
    with _RematPhase(slot, "auto"):
        yield slot.kept


def remat_kept():
    """Attention outputs kept for a recompute that has not run yet, over all live slots (0 between steps)."""
    return sum(len(s.kept) for s in _SLOTS)


def _in_backward():
    return torch._C._current_graph_task_id() != -1   # checkpoint recomputes from inside the autograd engine


def _remat_plan(q, k, v, remat_key):
    """-> (kept, keep): the (out, lse) to return instead of running the ring (a recompute), or the (dict, key) where
    this forward keeps its output. Only a forward whose backward will come keeps anything: grad enabled (checked
    here, outside the autograd.Function, where grad mode is still the caller's) and an input that requires grad."""
    if remat_key is None or _REMAT is None or not REMAT:
        return None, None
    slot, phase = _REMAT
    key = ("ring", remat_key)                   # namespaced: other attention kinds may keep outputs too
    if phase == "recompute" or (phase == "auto" and _in_backward()):
        hit = slot.kept.pop(key, None)          # freed once consumed
        if hit is None:                         # e.g. a second backward through a retained graph: run the ring
            return None, None
        out, lse, version = hit
        if out._version != version or out.shape != q.shape:
            raise RuntimeError(f"ring_attn(remat_key={remat_key!r}): the attention output kept by the forward was "
                               f"modified in place (or reshaped to {tuple(out.shape)}, q is {tuple(q.shape)}) before "
                               "the recompute; do not modify attention outputs in place under remat")
        return (out, lse), None
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
        return None, None                       # no-grad prefill / rollout: no backward will consume it
    if key in slot.kept:
        raise ValueError(f"ring_attn: remat_key={remat_key!r} used twice before its recompute (keys must be unique "
                         "within one checkpointed call, and under remat_aware() each forward needs its backward "
                         "before the next forward)")
    return None, (slot.kept, key)


class _RingAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group, P, rank, N, layout, overlap, backend, kept=None, keep=None):
        if kept is not None:                    # recompute under remat: the forward's output, no ring pass
            out, lse = kept
            STATS["remat_hits"] += 1
        else:
            out, lse = _ring_forward(q, k, v, causal, scale, group, P, rank, N, layout, overlap, backend)
            if keep is not None:                # the same storage the forward returns: no copy
                keep[0][keep[1]] = (out.detach(), lse, out._version)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, group, P, rank, N, layout, overlap, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return (dq, dk, dv) + (None,) * 11


# ----------------------------------------------------------------------------------------------------------
# input checks: the local ones on every call (no communication); the cross-rank comparison only when asked

CHECK_RANKS = False   # True: every ring/Ulysses call all-gathers its input metadata (a collective + a host sync per
                      # layer per forward; a debugging aid). Off, a bad shard on one rank raises there while its
                      # peers wait in the ring: callers check what must agree once per sequence (check_same)

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _local_error(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            return f"{name} must be 4-D (B, S_local, heads, head_dim), got shape {tuple(x.shape)}"
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, S_local and head_dim"
    if q.shape[2] % k.shape[2]:
        return f"query heads Hq={q.shape[2]} must be a multiple of key/value heads Hkv={k.shape[2]}"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        return f"q/k/v dtypes must match and be one of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"q/k/v must be on one device, got {q.device}, {k.device}, {v.device}"
    return None


def _gather_ints(values, group, P, device):
    """all_gather of a few ints -> P rows (lists), in group rank order. CPU (gloo) unless the group is NCCL-only."""
    on = (device if device is not None and device.type == "cuda" else "cuda") if dist.get_backend(group) == "nccl" \
        else "cpu"
    mine = torch.tensor(values, dtype=torch.long, device=on)
    rows = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(rows, mine, group=group)
    return torch.stack(rows).tolist()


def _check_ranks(q, k, err, causal, N, group, P):
    """Every rank sees every rank's metadata: a mismatch, or a local error on another rank, raises on EVERY rank
    instead of leaving the peers waiting in the ring."""
    fields = ["error", "q.shape", "k.shape", "dtype", "device", "causal", "total_len"]
    meta = [int(err is not None)]
    meta += list(q.shape) + list(k.shape) if err is None else [0] * 8
    meta += [_DTYPES.index(q.dtype) if err is None else -1, q.device.type == "cuda", int(causal), N]
    rows = _gather_ints(meta, group, P, q.device)
    if err is None and any(r[0] for r in rows):
        bad = [i for i, r in enumerate(rows) if r[0]]
        raise ValueError(f"bad attention inputs on rank(s) {bad} of the group (see their error)")
    if err is None:
        spans = [(0, 1), (1, 5), (5, 9), (9, 10), (10, 11), (11, 12), (12, 13)]
        for i, r in enumerate(rows):
            for f, (a, b) in zip(fields, spans):
                if r[a:b] != rows[0][a:b]:
                    raise ValueError(f"{f} differs between ranks: rank 0 has {rows[0][a:b]}, rank {i} has "
                                     f"{r[a:b]}; every rank must hold an equal-size shard (use shard_seq)")


def _check_inputs(q, k, v, causal, N, layout, group, P, check):
    err = _local_error(q, k, v)
    if P > 1 and (CHECK_RANKS if check is None else check):
        _check_ranks(q, k, err, causal, N, group, P)
    if err is not None:
        raise ValueError(err)
    want = _positions(N, P, 0, layout).numel()
    if q.shape[1] != want or N < 1:
        raise ValueError(f"S_local={q.shape[1]} does not fit total_len={N} over {P} ranks with layout={layout!r} "
                         f"(expected S_local={want}); shard inputs with shard_seq")


def check_same(group, what, device=None, **values):
    """ValueError on every rank unless each int in `values` is equal on all ranks of `group`, naming the field, the
    ranks and their values. One small all_gather (every rank must call it): for what must agree across the
    sequence-parallel group, checked once per sequence instead of in every attention call. device: the tensor's
    device when the group is NCCL-only (gloo and mixed groups take CPU tensors)."""
    P, _ = _world(group)
    if P == 1 or not values:
        return
    rows = _gather_ints([int(x) for x in values.values()], group, P, device)
    for j, name in enumerate(values):
        col = [r[j] for r in rows]
        if len(set(col)) > 1:
            have = ", ".join(f"rank {i} has {x}" for i, x in enumerate(col))
            raise ValueError(f"{what}: {name} differs across the {P} ranks of the sequence-parallel group ({have}); "
                             "every rank of the group must get the same sequence")


def ring_attn(q, k, v, causal=True, group=None, scale=None, total_len=None, return_lse=False,
              layout="zigzag", overlap=None, backend=None, remat_key=None, check=None):
    """Exact attention of local queries against the whole (sharded) sequence.
    q (B, S_local, Hq, D), k/v (B, S_local, Hkv, D) from shard_seq -> out (B, S_local, Hq, D)
    [, lse (B, Hq, S_local) fp32]. total_len: real sequence length (default P*S_local, no padding).
    remat_key: keep/reuse the output under remat_contexts() / remat_aware() (e.g. the layer index).
    check: also compare the inputs' metadata across ranks (one all_gather; default CHECK_RANKS, off)."""
    P, rank = _world(group)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}, expected one of {LAYOUTS}")
    N = P * q.shape[1] if total_len is None else int(total_len)
    _check_inputs(q, k, v, causal, N, layout, group, P, check)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    overlap = OVERLAP if overlap is None else overlap
    kept, keep = _remat_plan(q, k, v, remat_key)
    out, lse = _RingAttn.apply(q, k, v, bool(causal), scale, group, P, rank, N, layout, overlap, backend, kept, keep)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------------
# Ulysses: all-to-all from sequence shards to head shards, full attention, and back

def _a2a(x, group, P, to_heads):
    if to_heads:   # (B, S_l, H, D) -> (B, P*S_l, H/P, D), rank-major token order
        B, S, H, D = x.shape
        send = x.reshape(B, S, P, H // P, D).permute(2, 0, 1, 3, 4).contiguous()       # (P, B, S_l, H/P, D)
    else:          # (B, P*S_l, H/P, D) -> (B, S_l, H, D)
        B, PS, Hp, D = x.shape
        send = x.reshape(B, P, PS // P, Hp, D).permute(1, 0, 2, 3, 4).contiguous()     # (P, B, S_l, H/P, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    STATS["bytes_sent"] += send.numel() * send.element_size() * (P - 1) // P          # own slice stays
    if to_heads:
        return recv.permute(1, 0, 2, 3, 4).reshape(B, P * S, H // P, D)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, PS // P, P * Hp, D)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, P, to_heads):
        ctx.args = (group, P, to_heads)
        return _a2a(x, group, P, to_heads)

    @staticmethod
    def backward(ctx, grad):
        group, P, to_heads = ctx.args
        return _a2a(grad.contiguous(), group, P, not to_heads), None, None, None


def ulysses_attn(q, k, v, causal=True, group=None, scale=None, total_len=None, layout="zigzag", backend=None,
                 check=None):
    """Same inputs and outputs as ring_attn, computed with two all-to-alls per tensor: each rank attends over
    the whole sequence for Hq/P query heads and Hkv/P kv heads (so both must divide by P). Not remat-aware: a
    checkpoint recompute re-runs its all-to-alls and attention (its backward needs the head-sharded q, k, v and
    output: keeping them would cost 2-4x what the ring keeps)."""
    P, rank = _world(group)
    N = P * q.shape[1] if total_len is None else int(total_len)
    _check_inputs(q, k, v, causal, N, layout, group, P, check)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if P == 1:
        return _RingAttn.apply(q, k, v, bool(causal), scale, None, 1, 0, N, layout, False, backend, None)[0]
    if q.shape[2] % P or k.shape[2] % P:
        raise ValueError(f"ulysses_attn needs head counts divisible by the group size P={P}: got Hq={q.shape[2]}, "
                         f"Hkv={k.shape[2]}; use ring_attn (any head count) or a smaller group")
    perm = torch.cat([_positions(N, P, j, layout) for j in range(P)]).to(q.device)   # rank-major -> global
    inv = torch.argsort(perm)
    qh, kh, vh = (_AllToAll.apply(x, group, P, True)[:, inv] for x in (q, k, v))    # (B, P*S_l, H/P, D), global order
    out = _RingAttn.apply(qh, kh, vh, bool(causal), scale, None, 1, 0, N, layout, False, backend, None)[0]
    return _AllToAll.apply(out[:, perm], group, P, False)                            # (B, S_l, Hq, D)


# ----------------------------------------------------------------------------------------------------------
# transformers integration

def _hf_mask(*args, attention_mask=None, **kwargs):
    """Mask builder registered next to the attention: SP attention needs no mask. A 2-D padding mask cannot
    be honoured on local shards, so refuse it instead of silently dropping it."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("sequence-parallel attention supports causal (or full) attention without padding: got an "
                         "attention_mask with zeros. Pass attention_mask=None; shard_seq's own padding at the end "
                         "of the sequence is handled by total_len (register_hf(total_len=...) or sp_total_len=N)")
    return None


def register_hf(name="ring", group=None, impl="ring", total_len=None, layout="zigzag"):
    """Register sequence-parallel attention with transformers under `name`; then
    model.set_attn_implementation(name) (or model.config._attn_implementation = name) and feed the model local
    shards: input_ids/inputs_embeds and position_ids from shard_seq. total_len (or the per-call model kwarg
    sp_total_len=N) is the real sequence length when shard_seq padded. Under remat_contexts() (the checkpoint's
    context_fn) or remat_aware(), a checkpointed layer's recompute reuses the ring output its forward kept (key:
    module.layer_idx); Ulysses re-runs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    if impl not in ("ring", "ulysses"):
        raise ValueError(f"impl={impl!r}, expected 'ring' or 'ulysses'")

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        if attention_mask is not None:   # our mask builder returns None: this is a user-made 4-D mask
            raise ValueError(f"{name!r} attention got a {tuple(attention_mask.shape)} attention_mask; only causal "
                             "attention without padding masks is supported under sequence parallelism")
        if dropout:
            raise ValueError(f"{name!r} attention does not support attention dropout (got {dropout})")
        if kw.get("sliding_window"):
            raise ValueError(f"{name!r} attention does not support sliding windows (got {kw['sliding_window']})")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        N = kw.get("sp_total_len", total_len)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))     # (B, H, S, D) -> (B, S, H, D)
        if torch.is_autocast_enabled(q.device.type):
            # under autocast HF's rotary step returns fp32 q/k (its cos/sin follow the fp32 embeddings) next to a
            # bf16 v; SDPA would cast all three to the autocast dtype, so do the same (a custom Function is not
            # autocast by torch)
            dt = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if impl == "ulysses":
            out = ulysses_attn(q, k, v, causal=causal, group=group, scale=scaling, total_len=N, layout=layout)
        else:
            out = ring_attn(q, k, v, causal=causal, group=group, scale=scaling, total_len=N, layout=layout,
                            remat_key=getattr(module, "layer_idx", None))
        return out, None                                                # (B, S_local, H, D)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _hf_mask)
    return attention
