"""Benchmark of seq_parallel_attn.py (LightSeq-style ring attention) on CPU with gloo, plus a GPU kernel part.

    python bench/bench_seq_parallel_attn.py            # CPU parts, 1/2/4 gloo processes (~1 min on 2 cores)
    python bench/bench_seq_parallel_attn.py --quick    # smaller sizes, for a smoke run
    python bench/bench_seq_parallel_attn.py --gpu      # ring step vs one flash call, TFLOP/s on one CUDA GPU

Parts: (1) causal balance, zigzag vs contiguous split: attended pairs and measured kernel time per rank;
(2) bytes per layer per rank: formulas for ring / Ulysses / Megatron TP+SP on Llama-like shapes, LightSeq's
4.7x, and bytes counted in a real run; (3) overlap on vs off; (4) rematerialization-aware checkpointing;
(5) bf16 error vs world size. Figures are recorded in docs/BENCHMARKS.md.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import seq_parallel_attn as spa  # noqa: E402
from dist_utils import run_distributed  # noqa: E402  (spawned gloo ranks; tests/dist_utils.py)


def _qkv(seed, B, N, Hq, Hkv, D, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(B, N, Hq, D, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, N, Hkv, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v, do


def _timed_kernels():
    """Wrap the kernel layer so each rank accumulates its own kernel CPU time (thread_time: not inflated when
    4 processes share 2 cores, unlike wall time)."""
    acc = {"s": 0.0}
    fwd, bwd = spa.attn_fwd, spa.attn_bwd

    def wrap(fn):
        def timed(*a, **kw):
            t = time.thread_time()
            out = fn(*a, **kw)
            acc["s"] += time.thread_time() - t
            return out
        return timed
    spa.attn_fwd, spa.attn_bwd = wrap(fwd), wrap(bwd)
    return acc


def _step(q, k, v, do, g, N, **kw):
    ql, kl, vl = (spa.shard_seq(x, g, layout=kw.get("layout", "zigzag")).requires_grad_() for x in (q, k, v))
    out = spa.ring_attn(ql, kl, vl, causal=True, group=g, total_len=N, **kw)
    out.backward(spa.shard_seq(do, g, layout=kw.get("layout", "zigzag")))
    return out, ql.grad, kl.grad, vl.grad


# ---- (1) balance --------------------------------------------------------------------------------------------

def job_balance(N, H, D, reps):
    g, P = dist.group.WORLD, dist.get_world_size()
    q, k, v, do = _qkv(0, 1, N, H, H, D)
    acc, res = _timed_kernels(), {}
    for layout in ("zigzag", "contiguous"):
        _step(q, k, v, do, g, N, layout=layout)                          # warm-up
        kernel, wall = [], []   # kernel: thread CPU time, robust to other load; wall: min over reps
        for _ in range(reps):
            dist.barrier()
            acc["s"], t = 0.0, time.perf_counter()
            _step(q, k, v, do, g, N, layout=layout)
            dist.barrier()
            wall.append(time.perf_counter() - t)
            kernel.append(acc["s"])
        res[layout] = dict(pairs=spa.work_per_rank(N, P, True, layout)[dist.get_rank()],
                           kernel_s=min(kernel), step_s=min(wall))
    return res


def report_balance(P, ranks):
    print(f"\n[1] causal balance, P={P}: per-rank attended (q,k) pairs and kernel CPU time (fwd+bwd)")
    for layout in ("zigzag", "contiguous"):
        pairs = [r[layout]["pairs"] for r in ranks]
        ks = [r[layout]["kernel_s"] for r in ranks]
        print(f"  {layout:10s} pairs {pairs}  max/min {max(pairs) / min(pairs):.3f} | kernel s "
              f"{[round(x, 3) for x in ks]}  max/min {max(ks) / min(ks):.2f} | step wall {ranks[0][layout]['step_s']:.2f} s")


# ---- (2) communication volume -------------------------------------------------------------------------------

def formulas(N, P, d, hq, hkv):
    """Elements sent per rank per transformer layer, forward + backward, training with activation checkpointing.
    ring (ours): fwd (P-1) K/V shards of N/P tokens: 2(P-1)/P*N*d_kv; bwd K/V again + dK/dV: 4(P-1)/P*N*d_kv;
      remat-aware checkpointing -> the forward is not repeated. (Our dK/dV partial sums travel in fp32.)
    Ulysses: a2a of q, k, v and out, each rank keeps 1/P: fwd (P-1)/P*(2d + 2d_kv)*N/P; bwd the same;
      checkpointing repeats the forward a2a.
    Megatron TP+SP (Korthikanti et al.): per layer 6 all-gathers + 4 reduce-scatters of the (N, d) activation
      (fwd 2 AG + 2 RS; bwd 2 RS + 2 AG + 2 AG to re-gather the saved shards), each (P-1)/P*N*d per rank;
      checkpointing repeats the forward's 2 AG + 2 RS -> 14 (P-1)/P*N*d.
    LightSeq (DistFlashAttn App. D) counts totals over all workers for causal MHA: its schedule fetches only
      the K/V a worker needs (fwd Nd, bwd 2Nd -> 3Nd) vs Megatron 10Nd + 4Nd for checkpointing = 14Nd: 4.7x."""
    dkv, f = d * hkv // hq, (P - 1) / P
    return dict(ring=6 * f * N * dkv, ring_bytes_bf16=(4 * 2 + 2 * 4) * f * N * dkv,
                ulysses=3 * f * (2 * d + 2 * dkv) * N / P, megatron=14 * f * N * d,
                lightseq_paper=3 * N * dkv, megatron_paper=14 * N * d)


def report_formulas(N=32768, P=8):
    print(f"\n[2a] per layer per rank, N={N} tokens, P={P}, activation checkpointing; M = 2^20 elements")
    print("  shape               d   Hq/Hkv | ring(ours) ulysses megatron | megatron/ring  megatron/ring  "
          "LightSeq paper")
    print("                                 |   elements                 |  elements      bytes(bf16)*  14Nd/3Nd_kv")
    for name, d, hq, hkv in (("Llama-7B MHA", 4096, 32, 32), ("Llama-GQA 32/8", 4096, 32, 8),
                             ("Llama-2-70B 64/8", 8192, 64, 8)):
        f = formulas(N, P, d, hq, hkv)
        m = lambda x: f"{x / 2**20:7.0f}M"  # noqa: E731
        print(f"  {name:17s} {d:5d} {hq:3d}/{hkv:<3d}| {m(f['ring'])} {m(f['ulysses'])} {m(f['megatron'])} | "
              f"{f['megatron'] / f['ring']:7.2f}x       {2 * f['megatron'] / f['ring_bytes_bf16']:7.2f}x      "
              f"{f['megatron_paper'] / f['lightseq_paper']:6.2f}x")
    print("  * bf16 activations, our dK/dV partial sums in fp32 (4/3 of the all-bf16 bytes)")


def job_bytes(N, Hq, Hkv, D, dtype):
    g, P = dist.group.WORLD, dist.get_world_size()
    q, k, v, do = _qkv(1, 1, N, Hq, Hkv, D, dtype)
    ql, kl, vl = (spa.shard_seq(x, g).requires_grad_() for x in (q, k, v))
    spa.reset_stats()
    out = spa.ring_attn(ql, kl, vl, group=g, total_len=N)
    fwd = spa.STATS["bytes_sent"]
    out.backward(spa.shard_seq(do, g))
    bwd = spa.STATS["bytes_sent"] - fwd
    spa.reset_stats()
    spa.ulysses_attn(ql, kl, vl, group=g, total_len=N).backward(spa.shard_seq(do, g))
    uly = spa.STATS["bytes_sent"]
    el, S = q.element_size(), ql.shape[1]
    return dict(fwd=fwd, bwd=bwd, want_fwd=(P - 1) * 2 * S * Hkv * D * el,
                want_bwd=(P - 1) * 2 * S * Hkv * D * (el + 4),             # dK/dV partial sums travel in fp32
                uly=uly, want_uly=2 * (P - 1) * S // P * (2 * Hq + 2 * Hkv) * D * el)


def report_bytes(P, r, N, Hq, Hkv, D):
    print(f"\n[2b] bytes sent by rank 0 in a run, P={P}, N={N}, Hq/Hkv={Hq}/{Hkv}, D={D}, bf16 (no checkpointing)")
    print(f"  ring fwd {r['fwd']} (formula {r['want_fwd']})  bwd {r['bwd']} (formula {r['want_bwd']}, dK/dV in fp32)"
          f"  | ulysses fwd+bwd {r['uly']} (formula {r['want_uly']})")


# ---- (3) overlap, (4) remat ---------------------------------------------------------------------------------

def job_overlap(configs, reps):
    g, res = dist.group.WORLD, []
    for N, H, D in configs:
        q, k, v, do = _qkv(2, 1, N, H, H, D)
        times = {}
        for overlap in (True, False, True, False):                        # interleaved against drift
            _step(q, k, v, do, g, N, overlap=overlap)
            for _ in range(reps):
                dist.barrier()
                t = time.perf_counter()
                _step(q, k, v, do, g, N, overlap=overlap)
                times.setdefault(overlap, []).append(time.perf_counter() - t)
        kv = torch.stack([spa.shard_seq(k, g), spa.shard_seq(v, g)])      # comm alone: 3(P-1) K/V-size hops
        P, r, comm = dist.get_world_size(), dist.get_rank(), []
        for _ in range(reps):
            dist.barrier()
            t = time.perf_counter()
            for _ in range(3 * (P - 1)):
                spa._wait(spa._ring_post(kv, torch.empty_like(kv), g, P, r, 0))
            comm.append(time.perf_counter() - t)
        res.append(dict(N=N, H=H, D=D, on=min(times[True]), off=min(times[False]), comm=min(comm)))
    return res


def job_remat(N, H, D, layers, reps):
    from torch.utils.checkpoint import checkpoint
    g = dist.group.WORLD
    torch.manual_seed(0)
    x = spa.shard_seq(torch.randn(1, N, H * D), g)
    ws = [torch.randn(H * D, 3 * H * D) * (H * D) ** -0.5 for _ in range(layers)]

    def layer(h, w, i):
        q, k, v = (h @ w).view(1, h.shape[1], 3, H, D).unbind(2)
        return h + spa.ring_attn(q, k, v, group=g, total_len=N, remat_key=i).flatten(2)

    res = {}
    for mode in ("checkpoint", "checkpoint+remat", "checkpoint", "checkpoint+remat"):
        for _ in range(reps):
            spa.reset_stats()
            h = x.clone().requires_grad_()
            dist.barrier()
            t = time.perf_counter()
            with spa.remat_aware() if mode.endswith("remat") else torch.enable_grad():
                y = h
                for i, w in enumerate(ws):
                    y = checkpoint(layer, y, w, i, use_reentrant=False)
                y.square().sum().backward()
            res.setdefault(mode, []).append((time.perf_counter() - t, spa.STATS["ring_fwd"]))
    return {m: dict(s=min(t for t, _ in v), ring_fwd=v[0][1]) for m, v in res.items()}


# ---- (5) bf16 error -----------------------------------------------------------------------------------------

def job_bf16(N, Hq, Hkv, D):
    g = dist.group.WORLD if dist.is_initialized() else None
    q, k, v, do = _qkv(3, 1, N, Hq, Hkv, D)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    ref = t(F.scaled_dot_product_attention(t(qd), t(kd), t(vd), is_causal=True, enable_gqa=True))
    ref.backward(do.double())
    refs = [ref.detach(), qd.grad, kd.grad, vd.grad]
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        got = _step(*(x.to(dtype) for x in (q, k, v, do)), g, N)
        got = [spa.gather_seq(x, N, g).double() for x in got]
        res[str(dtype)[6:]] = [((a - b).abs().max().item(), (a - b).abs().mean().item()) for a, b in zip(got, refs)]
    return res


def job_all(world, quick):
    s = 1 if quick else 2
    out = dict(balance=job_balance(2048 * s, 4, 64, reps=4), bf16=job_bf16(1024 * s, 8, 2, 64),
               bytes=job_bytes(1024, 8, 4, 64, torch.bfloat16))
    if world == 2:
        out["overlap"] = job_overlap([(2048 * s, 4, 64), (256, 32, 128)], reps=5)
        out["remat"] = job_remat(1024 * s, 4, 64, layers=4, reps=2)
    return out


# ---- GPU: ring step vs one flash call -----------------------------------------------------------------------

def bench_gpu(N=32768, P=8, H=32, D=128, dtype=torch.bfloat16, device="cuda", reps=5):
    """One GPU computes, in turn, all P ranks' blocks of the zigzag ring (the same kernel calls and merges the
    ring makes, no communication) and one plain causal flash call over the same N tokens. Same causal FLOPs
    (4*D*H per attended pair forward), so TFLOP/s shows the cost of chunking + lse merging."""
    q, k, v, _ = (x.to(device) for x in _qkv(4, 1, N, H, H, D, dtype))
    c = N // (2 * P)
    shards = [torch.cat([x[:, r * c:(r + 1) * c], x[:, (2 * P - 1 - r) * c:(2 * P - r) * c]], 1)
              for x in (q, k, v) for r in range(P)]
    qs, ks, vs = shards[:P], shards[P:2 * P], shards[2 * P:]
    acc = torch.float32

    def ring_all_ranks():
        for r in range(P):
            out = torch.zeros(qs[r].shape, dtype=acc, device=device)
            lse = torch.full((1, H, 2 * c), float("-inf"), device=device)
            for s in range(P):
                for q0, q1, k0, k1, cz in spa.block_plan(r, s, P, c, 2 * c, 2 * c, True):
                    o, l = spa.attn_fwd(qs[r][:, q0:q1], ks[s][:, k0:k1], vs[s][:, k0:k1], cz, D ** -0.5)
                    out[:, q0:q1], lse[:, :, q0:q1] = spa.merge_attn(out[:, q0:q1], lse[:, :, q0:q1], o.to(acc), l)

    def plain():
        spa.attn_fwd(q, k, v, True, D ** -0.5)

    flops = 4 * D * H * N * (N + 1) / 2
    for name, fn in (("plain flash, N tokens", plain), (f"ring step x {P} ranks", ring_all_ranks)):
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / reps
        print(f"  {name:24s} {dt * 1e3:8.2f} ms  {flops / dt / 1e12:7.1f} TFLOP/s  (backend {spa._backend(q)})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device")
        print(f"[GPU] {torch.cuda.get_device_name()}, torch {torch.__version__}, causal fwd, bf16")
        bench_gpu()
        return
    t0 = time.time()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo; fp32 unless stated; load avg {os.getloadavg()[0]:.2f}")
    res = {w: run_distributed(job_all, w, args=(w, args.quick), timeout=900) for w in (2, 4)}
    for P in (2, 4):
        report_balance(P, [r["balance"] for r in res[P]])
    report_formulas()
    for P in (2, 4):
        report_bytes(P, res[P][0]["bytes"], 1024, 8, 4, 64)
    print("\n[3] overlap on vs off, P=2, fwd+bwd wall time (min of 10, interleaved); saving <= comm alone")
    for r in res[2][0]["overlap"]:
        print(f"  N={r['N']:5d} H={r['H']:2d} D={r['D']}: on {r['on'] * 1e3:7.1f} ms  off {r['off'] * 1e3:7.1f} ms  "
              f"off/on {r['off'] / r['on']:.3f}  (comm alone {r['comm'] * 1e3:.1f} ms)")
    print("\n[4] rematerialization-aware checkpointing, P=2, 4 checkpointed layers, fwd+bwd (min of 4)")
    for mode, r in res[2][0]["remat"].items():
        print(f"  {mode:18s} ring forward passes {r['ring_fwd']}  time {r['s'] * 1e3:7.1f} ms")
    print("\n[5] error vs fp64 single-device reference, causal GQA 8/2, D=64: max abs (mean abs) of out, dq, dk, dv")
    bf = {1: job_bf16(1024 * (1 if args.quick else 2), 8, 2, 64), 2: res[2][0]["bf16"], 4: res[4][0]["bf16"]}
    for dtype in ("float32", "bfloat16"):
        for P, r in bf.items():
            print(f"  {dtype:8s} P={P}: " + "  ".join(f"{a:.1e} ({m:.1e})" for a, m in r[dtype]))
    print(f"\ntotal {time.time() - t0:.0f} s; load avg at the end {os.getloadavg()[0]:.2f} (timings are wall clock on "
          "a shared machine; pairs, bytes, pass counts and errors are exact)")


if __name__ == "__main__":
    main()
