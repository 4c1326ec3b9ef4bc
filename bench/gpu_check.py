"""GPU validation in one script: the CUDA paths the CPU test suite cannot reach, checked and timed on one GPU.

    bash bench/gpu_check.sh                   # one H100/H200: <= 8 minutes, only torch + transformers needed
    bash bench/gpu_check.sh --device=cpu      # the same checks at small shapes on CPU (CI: tests/test_gpu_check.py)

Everything it needs it builds in a temp dir: a tokenizer, the tiny checkpoint and a small synthetic set (with PyAV
and torchvision present: prepare.generate_synthetic + prepare.init_tiny, then the real decode/process path), and
random-init models at two shapes (the tiny one, and bench/real_shape.py's Qwen2.5-VL-7B widths with --real_layers
decoder layers; on CPU a narrower variant keeping head_dim 128, GQA 7:1, mrope [16, 24, 24] and window attention).
No network.

Sections, one table row per check (PASS / FAIL / SKIP / INFO; exit code 1 on any FAIL):
  attention   ring and Ulysses (world 1, on the device) in fp32 and bf16 vs an fp64 SDPA reference: out, dq, dk, dv,
              tolerance = 2x plain SDPA's own error in that dtype + a floor; the same with `dist_world` processes
              (torchrun subprocess: gloo on CPU; NCCL with one GPU per rank; on ONE GPU NCCL refuses two ranks and
              gloo has no CUDA send/recv -- both are attempted and the refusal is reported, not hidden)
  kernel      TFLOP/s of the ring kernel at world 1 vs plain SDPA (causal, GQA 7:1, head_dim 128, bf16), fwd and
              fwd+bwd (goal >= 90% of SDPA on CUDA); causal balance: attended pairs max/min per rank (zigzag; exact)
              and the measured kernel time max/min when one device runs each rank's zigzag blocks in turn
  data        the tiny checkpoint + synthetic set built by prepare.py, one video through build_seq and
              sp_logprobs on the device
  tiny, real  per model, on the device with bf16 autocast (CUDA), FSDP2 over a 1-rank mesh, activation checkpointing:
              encode in temporal chunks == one pass (fp32: what parallel encoding relies on), encode (bf16),
              SP log-probs with the ring kernel == SDPA, one SFT step, one RL step (HF engine: sync_weights, rollouts
              from cached embeddings, rl.prefill + rl.update, sync back); peak memory per phase
              (torch.cuda.max_memory_allocated, reset per phase) next to estimate.estimate_memory, same config
  share       the vision/LLM cost share r of bench/bench_mrsp.py (one video encode / one no-grad LLM forward over
              video + 256 prompt + 1,024 response tokens), timed on the real-shaped model, the LLM time scaled to the
              7B's 28 layers plus the 7B's LM head timed alone, next to bench_mrsp's FLOP ratio r_7B
"""
import contextlib
import datetime
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "bench")) if p not in sys.path]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402
import estimate  # noqa: E402
import mrsp  # noqa: E402
import prepare  # noqa: E402
import real_shape  # noqa: E402
import rl  # noqa: E402
import seq_parallel_attn as spa  # noqa: E402

# -----------------------------------------------------------------------------
# config (override with --key=value)
device = "auto"            # auto (cuda if available) | cuda | cpu
real_layers = 2            # decoder layers of the real-shaped model (the 7B has 28)
dist_world = 2             # processes for the multi-process attention check
budget_s = 450.0           # past this many seconds the remaining sections are skipped (SKIP rows): fits 8 minutes
json_out = ""              # also write the rows here as JSON
part = "all"               # all | attn_dist (internal: the multi-process attention check, run under torchrun)
dist_backend = ""          # internal, for part=attn_dist: gloo | nccl
pg_timeout_s = 60          # internal, for part=attn_dist: its process-group timeout
seed = 0

# Shapes per device. Attention lengths are odd (not a multiple of 2P: the zigzag padding path runs); the kernel and
# share sizes are the 7B's (28/4 heads x 128) on CUDA, small on CPU (2 shared cores, CI). The kernel length, 32k, is
# one rank's share of the paper's ~256k-token sequence on 8 GPUs.
SHAPES = {
    "cuda": dict(attn=dict(N=2047, Hq=28, Hkv=4, D=128), kernel=dict(N=32768, Hq=28, Hkv=4, D=128, reps=10),
                 balance=dict(N=32768, P=8, Hq=28, Hkv=4, D=128),
                 model=dict(frames=64, size=336, response=64, new_tokens=16),
                 share=dict(frames=(64, 128, 256, 512), size=336, prompt=256, response=1024)),
    "cpu": dict(attn=dict(N=253, Hq=8, Hkv=2, D=32), kernel=dict(N=1024, Hq=7, Hkv=1, D=128, reps=3),
                balance=dict(N=2048, P=4, Hq=4, Hkv=2, D=32),
                model=dict(frames=8, size=112, response=16, new_tokens=4),
                share=dict(frames=(8, 16), size=56, prompt=32, response=32)),
}
# the real-shaped model on CPU: narrower, same head_dim (128), GQA 7:1, mrope sections, vision head_dim 80 + windows
CPU_REAL_TEXT = dict(hidden_size=896, intermediate_size=1024, num_attention_heads=7, num_key_value_heads=1)
CPU_REAL_VISION = dict(depth=4, hidden_size=320, intermediate_size=640, num_heads=4, out_hidden_size=896,
                       fullatt_block_indexes=[1, 3])
TINY_TEXT = dict(prepare.TINY_TEXT,   # real_shape.real_config merges onto the 7B's head_dim 128: state the tiny's
                 head_dim=prepare.TINY_TEXT["hidden_size"] // prepare.TINY_TEXT["num_attention_heads"])
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3}   # attention tolerance floor per dtype (on top of 2x SDPA's)
LP_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # log-prob agreement, nats (bf16: autocast rounding)
KERNEL_GOAL = 0.90          # ring kernel at world 1 vs plain SDPA, TFLOP/s ratio (CUDA)
GiB = 1024 ** 3


# -----------------------------------------------------------------------------
# the table
class Report:
    """Rows: section, check, status (PASS / FAIL / SKIP / INFO), value, limit, seconds, memory GiB."""

    def __init__(self):
        self.rows, self.t0 = [], time.time()

    def add(self, section, check, status, value="", limit="", s=None, mem=None):
        assert status in ("PASS", "FAIL", "SKIP", "INFO"), status
        row = dict(section=section, check=check, status=status, value=value, limit=limit, s=s, mem=mem)
        self.rows.append(row)
        print(f"[{section}] {check}: {status} {value}" + (f" (limit {limit})" if limit else ""), flush=True)
        return row

    def check(self, section, check, ok, value="", limit="", s=None, mem=None):
        return self.add(section, check, "PASS" if ok else "FAIL", value, limit, s, mem)

    def over_budget(self):
        return time.time() - self.t0 > budget_s

    def table(self):
        lines = ["| section | check | status | value | limit | time s | peak mem GiB |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            s = "" if r["s"] is None else f"{r['s']:.2f}"
            m = "" if r["mem"] is None else f"{r['mem']:.2f}"
            lines.append(f"| {r['section']} | {r['check']} | {r['status']} | {r['value']} | {r['limit']} | {s} | {m} |")
        return "\n".join(lines)


@contextlib.contextmanager
def guard(report, section, check):
    """An exception inside a check becomes a FAIL row naming it; the run goes on. Yields a state whose .failed says
    whether the block raised (code after the block that needs its results checks it)."""
    from types import SimpleNamespace
    state = SimpleNamespace(failed=False)
    try:
        yield state
    except Exception as e:  # noqa: BLE001 - every failure is a row in the table
        import traceback
        traceback.print_exc()
        state.failed = True
        report.add(section, check, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Phase:
    """Wall time and peak memory of a block: CUDA max_memory_allocated after reset_peak_memory_stats (GiB);
    on CPU the process's peak RSS so far (monotone: the peak of the run up to this phase)."""

    def __init__(self, dev):
        self.dev, self.s, self.mem = dev, None, None

    def __enter__(self):
        sync(self.dev)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.dev)
        self.s = time.perf_counter() - self.t
        if self.dev.type == "cuda":
            self.mem = torch.cuda.max_memory_allocated(self.dev) / GiB
        else:
            import resource
            self.mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
        return False


def timed(fn, dev, reps):
    """Median seconds of fn() over reps runs after one warm-up. On GPU, CUDA events around the call: the device's
    time from the first kernel to the last, launch gaps included (a launch-bound call is timed as it runs)."""
    fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def autocast(dev):
    """bf16 autocast on CUDA, as sft.py / rl.py train; fp32 on CPU (its bf16 matmuls are slow, exactness tests)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()


def rate(flops, s):
    """FLOP/s, readable on both devices."""
    x = flops / s
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e11 else f"{x / 1e9:.1f} GFLOP/s"


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# -----------------------------------------------------------------------------
# attention: ring / Ulysses vs SDPA (outputs and gradients)
def _qkv(N, Hq, Hkv, D):
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(1, N, Hq, D, generator=g) for _ in range(2))
    k, v = (torch.randn(1, N, Hkv, D, generator=g) for _ in range(2))
    return q, k, v, dout                                                  # (B, N, H, D), CPU fp32


def _sdpa_grads(q, k, v, dout, causal, dtype, dev):
    """Plain SDPA (K/V heads repeated, as HF's repeat_kv) in `dtype` -> [out, dq, dk, dv] in fp64 on the device."""
    q, k, v = (x.to(dev, dtype, copy=True).requires_grad_() for x in (q, k, v))   # copies: the inputs stay clean
    rep = q.shape[2] // k.shape[2]
    t = lambda x: x.transpose(1, 2)                                      # noqa: E731  (B, H, N, D)
    out = t(F.scaled_dot_product_attention(t(q), t(k.repeat_interleave(rep, 2)), t(v.repeat_interleave(rep, 2)),
                                           is_causal=causal))
    out.backward(dout.to(dev, dtype))
    return [x.detach().double() for x in (out, q.grad, k.grad, v.grad)]


def attn_case(impl, dtype, causal, shape, dev, group=None):
    """Ours (ring_attn / ulysses_attn over `group`, each rank its zigzag shard) vs the fp64 reference, and plain SDPA
    in the same dtype vs the same reference. -> (our max abs error over out/dq/dk/dv, SDPA's), on every rank."""
    q, k, v, dout = _qkv(**shape)
    N = shape["N"]
    ref = _sdpa_grads(q, k, v, dout, causal, torch.float64, dev)
    base = _sdpa_grads(q, k, v, dout, causal, dtype, dev)
    ql, kl, vl = (spa.shard_seq(x.to(dev, dtype), group).detach().requires_grad_() for x in (q, k, v))   # leaves
    fn = spa.ring_attn if impl == "ring" else spa.ulysses_attn
    out = fn(ql, kl, vl, causal=causal, group=group, total_len=N)        # (1, S_local, Hq, D)
    out.backward(spa.shard_seq(dout.to(dev, dtype), group))
    ours = [spa.gather_seq(x.detach(), N, group) for x in (out, ql.grad, kl.grad, vl.grad)]
    err = max(max_abs(a, b) for a, b in zip(ours, ref))
    return err, max(max_abs(a, b) for a, b in zip(base, ref))


ATTN_CASES = [("ring", torch.float32, True), ("ring", torch.float32, False), ("ulysses", torch.float32, True),
              ("ring", torch.bfloat16, True), ("ulysses", torch.bfloat16, True)]


def attn_rows(cases, shape, dev, group=None):
    """-> list of row dicts (section, check, ok, value, limit) for each case; the checks of one world size."""
    P = dist.get_world_size(group) if group is not None else 1
    rows = []
    for impl, dtype, causal in cases:
        t = time.perf_counter()
        err, base = attn_case(impl, dtype, causal, shape, dev, group)
        lim = 2 * base + FLOOR[dtype]
        name = (f"{impl} world {P} {str(dtype).split('.')[-1]} {'causal' if causal else 'full'} "
                f"N={shape['N']} {shape['Hq']}/{shape['Hkv']}x{shape['D']}")
        rows.append(dict(check=name, ok=err <= lim, value=f"max err {err:.1e} (SDPA same dtype {base:.1e})",
                         limit=f"{lim:.1e}", s=time.perf_counter() - t))
    return rows


def check_attention_world1(report, dev):
    for r in attn_rows(ATTN_CASES, SHAPES[dev.type]["attn"], dev):
        report.check("attention", r["check"], r["ok"], r["value"], r["limit"], r["s"])


def attn_dist_child():
    """part=attn_dist, one torchrun rank: the attention cases over the whole world; rank 0 writes the rows."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = torch.device("cpu")
    if device == "cuda":
        # one GPU per rank when there are enough; else every rank on GPU 0 (what the caller asked to try)
        dev = torch.device("cuda", rank if torch.cuda.device_count() >= world else 0)
        torch.cuda.set_device(dev)
    dist.init_process_group(dist_backend, timeout=datetime.timedelta(seconds=pg_timeout_s))
    rows = attn_rows(ATTN_CASES, SHAPES[dev.type]["attn"], dev, group=dist.group.WORLD)
    if rank == 0:
        with open(json_out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def run_dist(backend, dev, timeout=150):
    """The multi-process attention check as a torchrun subprocess (its process group times out at timeout / 3).
    -> (rows, None) or (None, why it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={dist_world}",
               os.path.abspath(__file__), "--part=attn_dist", f"--device={dev.type}", f"--dist_backend={backend}",
               f"--json_out={out}", f"--seed={seed}", f"--pg_timeout_s={timeout // 3}"]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return None, f"no result within {timeout}s (hung)"
        if p.returncode == 0 and os.path.isfile(out):
            with open(out) as f:
                return json.load(f), None
        lines = (p.stderr + p.stdout).splitlines()
        # the cause: NCCL's own words if it refused the layout, else the first exception line of any rank
        why = ([ln for ln in lines if "Duplicate GPU" in ln] or
               [ln for ln in lines if re.search(r"\b\w*(Error|Exception): ", ln)] or [f"exit code {p.returncode}"])
        return None, why[0].strip()[:400]


def check_attention_dist(report, dev):
    sec = "attention"
    def real_layout(backend, what):   # a layout people train with: any failure is a FAIL
        rows, why = run_dist(backend, dev)
        if rows is None:
            report.add(sec, f"ring/ulysses world {dist_world} ({what})", "FAIL", why)
        for r in rows or []:
            report.check(sec, r["check"] + f" {backend}", r["ok"], r["value"], r["limit"], r["s"])

    if dev.type == "cpu":
        return real_layout("gloo", "gloo")
    if torch.cuda.device_count() >= dist_world:   # the real layout: one GPU per rank, NCCL
        return real_layout("nccl", f"NCCL, {dist_world} GPUs")
    # one GPU: NCCL refuses two ranks on one device; gloo implements only all_reduce / broadcast for CUDA tensors (no
    # send/recv, no all_to_all), which the ring and Ulysses need. Both are tried (a short timeout: a refusal is quick,
    # a hang must not eat the budget) and what happened is reported. Neither is a layout anyone trains with, so a
    # refusal -- or wrong numbers from a backend that accepted CUDA tensors it cannot carry -- is a SKIP, not a FAIL.
    for backend in ("nccl", "gloo"):
        rows, why = run_dist(backend, dev, timeout=60)
        if rows is not None and all(r["ok"] for r in rows):
            for r in rows:
                report.check(sec, r["check"] + f" {backend}, 1 GPU", True, r["value"], r["limit"], r["s"])
            continue
        if rows is not None:
            bad = next(r for r in rows if not r["ok"])
            why = f"it ran but gave wrong results ({bad['check']}: {bad['value']}, limit {bad['limit']})"
        report.add(sec, f"ring/ulysses world {dist_world} on 1 GPU ({backend})", "SKIP",
                   f"{backend} cannot run {dist_world} ranks on one GPU: {why}")


# -----------------------------------------------------------------------------
# kernel throughput and causal balance
def check_kernel(report, dev):
    sh = SHAPES[dev.type]["kernel"]
    N, Hq, Hkv, D = sh["N"], sh["Hq"], sh["Hkv"], sh["D"]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, k, v, dout = (x.to(dev, dtype) for x in _qkv(N, Hq, Hkv, D))
    t = lambda x: x.transpose(1, 2)                                      # noqa: E731
    leaf = lambda x: x.detach().requires_grad_()                         # noqa: E731

    def ours(bwd):
        a, b, c = (leaf(x) for x in (q, k, v)) if bwd else (q, k, v)
        out = spa.ring_attn(a, b, c, causal=True)                        # world 1: the ring's own kernel calls
        if bwd:
            out.backward(dout)

    rep = Hq // Hkv
    kr, vr = (x.repeat_interleave(rep, 2) for x in (k, v))              # K/V heads repeated once, outside the timing

    def sdpa(bwd, flash):
        """Plain SDPA: the default dispatch with enable_gqa, or the flash backend on repeated K/V heads."""
        args = (q, kr, vr) if flash else (q, k, v)
        a, b, c = (leaf(x) for x in args) if bwd else args
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(t(a), t(b), t(c), is_causal=True, enable_gqa=not flash)
        if bwd:
            out.backward(t(dout))

    fwd_flops = 4 * D * Hq * N * (N + 1) / 2                              # causal pairs x (QK^T + PV) x 2 FLOPs
    for bwd, flops in ((False, fwd_flops), (True, 3.5 * fwd_flops)):     # backward ~2.5x forward (FlashAttention)
        grad = torch.enable_grad() if bwd else torch.no_grad()
        with grad:
            t_ours = timed(lambda: ours(bwd), dev, sh["reps"])
            # the baseline is the faster of the two SDPA spellings: the ratio is never flattered by a slow dispatch
            t_sdpa = min(timed(lambda: sdpa(bwd, flash), dev, sh["reps"]) for flash in (False, True))
        ratio = t_sdpa / t_ours
        name = (f"ring kernel world 1 vs SDPA, {'fwd+bwd' if bwd else 'fwd'}, causal {str(dtype).split('.')[-1]} "
                f"N={N} {Hq}/{Hkv}x{D} (backend {spa._backend(q)})")
        value = f"{rate(flops, t_ours)} vs {rate(flops, t_sdpa)} = {ratio:.0%}"
        if dev.type == "cuda":
            report.check("kernel", name, ratio >= KERNEL_GOAL, value, f">= {KERNEL_GOAL:.0%}", t_ours)
        else:
            report.add("kernel", name, "INFO", value, "(goal checked on CUDA only)", t_ours)
    # causal balance: attended (q, k) pairs per rank, from the plan the ring executes (exact)
    for P in (2, 4, 8):   # arithmetic only: the 7B-scale length on every device; +5 pads (the only imbalance)
        w = spa.work_per_rank(32768 + 5, P)
        c = spa.work_per_rank(32768 + 5, P, layout="contiguous")
        report.check("kernel", f"causal balance P={P}, N={32768 + 5}: attended pairs max/min", max(w) / min(w) <= 1.05,
                     f"zigzag {max(w) / min(w):.4f} (contiguous {max(c) / min(c):.2f})", "<= 1.05")
    b = SHAPES[dev.type]["balance"]
    # ... and measured: one device runs each rank's zigzag forward blocks in turn (no communication)
    P, N, H, D = b["P"], b["N"], b["Hq"], b["D"]
    q, k, v, _ = (x.to(dev, dtype) for x in _qkv(N, H, b["Hkv"], D))
    c = N // (2 * P)
    shard = lambda x, r: torch.cat([x[:, r * c:(r + 1) * c], x[:, (2 * P - 1 - r) * c:(2 * P - r) * c]], 1)  # noqa

    def rank_blocks(r):
        qs = shard(q, r)
        for s in range(P):
            ks, vs = shard(k, s), shard(v, s)
            for q0, q1, k0, k1, cz in spa.block_plan(r, s, P, c, 2 * c, 2 * c, True):
                spa.attn_fwd(qs[:, q0:q1], ks[:, k0:k1], vs[:, k0:k1], cz, D ** -0.5)

    ts = [float("inf")] * P
    with torch.no_grad():
        for _ in range(5):   # ranks interleaved, min of 5 each: drifting load (a shared CPU) hits all alike
            for r in range(P):
                ts[r] = min(ts[r], timed(lambda: rank_blocks(r), dev, 1))
    report.add("kernel", f"causal balance measured, P={P}, N={N}: zigzag kernel time per rank max/min", "INFO",
               f"{max(ts) / min(ts):.3f} ({min(ts) * 1e3:.2f}..{max(ts) * 1e3:.2f} ms)", "", sum(ts))


# -----------------------------------------------------------------------------
# models: random-init Qwen2.5-VL on the device; random pixels and token ids (the shapes are what is checked)
def model_config(kind, tok, dev, tiny_dir=""):
    """Qwen2_5_VLConfig: "tiny" (prepare.init_tiny's, read from its checkpoint when the data section wrote one) or
    "real" (bench/real_shape.py's 7B widths with real_layers layers; narrower on CPU)."""
    if kind == "tiny":
        if tiny_dir:
            from transformers import AutoConfig
            return AutoConfig.from_pretrained(tiny_dir)
        return real_shape.real_config(tok, TINY_TEXT["num_hidden_layers"], text=TINY_TEXT, vision=prepare.TINY_VISION)
    small = dev.type == "cpu"
    return real_shape.real_config(tok, real_layers, text=CPU_REAL_TEXT if small else None,
                                  vision=CPU_REAL_VISION if small else None)


def new_model(config, dev, dtype=torch.float32):
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    with torch.device(dev):   # initialised on the device: a real-shaped model is built in seconds, not minutes
        return Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)


def fsdp_world1(model, dev):
    """FSDP2 over a 1-rank mesh with the units mrsp.prepare_model makes (each decoder layer + the root; the frozen
    vision tower ignored, replicated). prepare_model leaves a 1-process world unwrapped (nothing to shard), but on one
    GPU the FSDP2 code path itself is what this checks: DTensor parameters, root_call's hooks, units under bf16
    autocast, full_tensor in sync_weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(dev.type, (1,), mesh_dim_names=("fsdp",))
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(model.model.visual.parameters()))
    return model


def make_seq(config, frames, size, response, gen, prompt=(16, 48)):
    """A sequence dict as mrsp.build_seq makes (without a video file): random pixels for `frames` frames of
    size x size, [prompt[0] text | <|vision_start|> video pads <|vision_end|> | prompt[1] text | response],
    loss_mask on the response. Text ids are random non-special ids (the model is random-init anyway)."""
    v = config.vision_config
    f = v.patch_size * v.spatial_merge_size
    if size % f or frames % v.temporal_patch_size:
        raise ValueError(f"make_seq: size {size} must be a multiple of {f} and frames {frames} of "
                         f"{v.temporal_patch_size}")
    t, h, w = frames // v.temporal_patch_size, size // v.patch_size, size // v.patch_size
    pix = torch.randn(t * h * w, 3 * v.temporal_patch_size * v.patch_size ** 2, generator=gen)
    n_video = t * h * w // v.spatial_merge_size ** 2
    special = len(prepare.SPECIAL_TOKENS) + 2                                # our tokenizers put the specials first
    text = lambda n: torch.randint(special, config.text_config.vocab_size, (n,), generator=gen)  # noqa: E731
    ids = torch.cat([text(prompt[0]), torch.tensor([config.vision_start_token_id]),
                     torch.full((n_video,), config.video_token_id), torch.tensor([config.vision_end_token_id]),
                     text(prompt[1]), text(response)])
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    mask[ids.numel() - response:] = True
    return dict(input_ids=ids, mm_token_type_ids=(ids == config.video_token_id).long() * 2, loss_mask=mask,
                pixel_values_videos=pix, video_grid_thw=torch.tensor([[t, h, w]]),
                second_per_grid_ts=torch.tensor([1.0]))                   # 2 frames a second


def estimate_for(config, seq, response, group):
    """estimate.estimate_memory for this config and these token counts, 1 GPU, SP 1 -> (train, rollout peak) GiB."""
    g = seq["video_grid_thw"][0].tolist()
    m2 = config.vision_config.spatial_merge_size ** 2
    n_video = int(seq["mm_token_type_ids"].eq(2).sum())
    est = estimate.estimate_memory(config.to_dict(), frames=2 * g[0], gpus=1, sp=1,
                                   tokens_per_frame_pair=g[1] * g[2] // m2, response_tokens=response, group=group,
                                   prompt_tokens=seq["input_ids"].numel() - n_video - response, kl=True)
    return est["train_peak"] / GiB, est["rollout_peak"] / GiB


def check_model(report, kind, dev, tok, tiny_dir=""):
    """Encode, SP log-probs, one SFT step and one RL step of one model config on the device (see the docstring)."""
    sec = kind
    sh = SHAPES[dev.type]["model"]
    config = model_config(kind, tok, dev, tiny_dir)
    gen = torch.Generator().manual_seed(seed)
    seq = make_seq(config, sh["frames"], sh["size"], sh["response"], gen)
    pix, grid = seq["pixel_values_videos"].to(dev), seq["video_grid_thw"].to(dev)
    policy = new_model(config, dev)
    tc = policy.config.text_config   # the model's own (from_config copies): what its attention layers read
    n_vis = sum(p.numel() for p in policy.model.visual.parameters())
    count = lambda n: f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"   # noqa: E731
    report.add(sec, "model", "INFO", f"vision {count(n_vis)} params ({config.vision_config.depth} blocks), LLM "
               f"{count(sum(p.numel() for p in policy.parameters()) - n_vis)} ({tc.num_hidden_layers} layers, "
               f"{tc.num_attention_heads}/{tc.num_key_value_heads} heads x "
               f"{getattr(tc, 'head_dim', None) or tc.hidden_size // tc.num_attention_heads}); {sh['frames']} frames "
               f"{sh['size']}x{sh['size']} -> {seq['input_ids'].numel()} tokens")

    with guard(report, sec, "encode in temporal chunks == one pass (fp32)"), torch.no_grad():
        T = grid[0, 0].item()
        rows = pix.shape[0] // T
        one = mrsp.encode_videos(policy, pix, grid)
        cut = T // 2   # two uneven runs of temporal patches, as two SP ranks would encode them
        parts = [mrsp.encode_videos(policy, pix[a * rows:b * rows], torch.tensor([[b - a, *grid[0, 1:].tolist()]],
                                                                                  device=dev))
                 for a, b in ((0, cut), (cut, T))]
        d = max_abs(torch.cat(parts), one) / one.abs().max().item()
        report.check(sec, "encode in temporal chunks == one pass (fp32)", d <= 1e-4, f"max rel diff {d:.1e}", "1e-04")

    name = "encode (bf16 autocast)" if dev.type == "cuda" else "encode (fp32)"
    with guard(report, sec, name) as g, torch.no_grad(), autocast(dev), Phase(dev) as ph:
        emb = mrsp.encode_videos(policy, pix, grid)
    if g.failed:
        return
    report.check(sec, name, bool(torch.isfinite(emb).all()), f"{tuple(emb.shape)} embeddings", "", ph.s, ph.mem)
    seq = dict(seq, embeds=emb)
    del seq["pixel_values_videos"]
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32

    # freeze + activation checkpointing as prepare_model does, then FSDP2 over a 1-rank mesh
    mrsp.prepare_model(policy, None, freeze_vision=True, activation_checkpointing=True)
    fsdp_world1(policy, dev)
    mem = {}
    with guard(report, sec, "SP log-probs: ring kernel (world 1) == SDPA"), torch.no_grad(), autocast(dev):
        with Phase(dev) as ph:
            lp_sdpa = mrsp.sp_logprobs(policy, seq)
        mem["logprobs"] = ph.mem
        spa.register_hf("gpu_check_ring", group=None)          # the ring's HF attention function at P=1
        old, tc._attn_implementation = tc._attn_implementation, "gpu_check_ring"
        try:
            lp_ring = mrsp.sp_logprobs(policy, seq)
        finally:
            tc._attn_implementation = old
        m = seq["loss_mask"]
        d = max_abs(lp_ring[m], lp_sdpa[m])
        report.check(sec, "SP log-probs: ring kernel (world 1) == SDPA", d <= LP_TOL[dt] and bool(
            torch.isfinite(lp_ring[m]).all()), f"max diff {d:.1e} nats, mean logp {lp_sdpa[m].mean():.3f}",
            f"{LP_TOL[dt]:g}", ph.s, ph.mem)

    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    probe = policy.model.language_model.layers[0].mlp.down_proj.weight
    local = lambda p: (p.to_local() if hasattr(p, "to_local") else p).detach().float().clone()   # noqa: E731
    with guard(report, sec, "SFT step (FSDP2, act. ckpt)") as g, Phase(dev) as ph:
        before = local(probe)
        with autocast(dev):
            lp = mrsp.sp_logprobs(policy, seq)
        loss = -lp[seq["loss_mask"].to(lp.device)].mean()
        loss.backward()
        gn = common.clip_grad(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        moved = max_abs(local(probe), before)
    if not g.failed:
        mem["sft"] = ph.mem
        report.check(sec, "SFT step (FSDP2, act. ckpt)", bool(torch.isfinite(loss)) and 0 < gn < float("inf")
                     and moved > 0, f"loss {loss.item():.3f}, grad norm {gn:.3g}, weights moved {moved:.1e}", "",
                     ph.s, ph.mem)

    with guard(report, sec, "RL step"):
        check_rl_step(report, sec, policy, opt, params, config, seq, dev, mem)
    train_est, roll_est = estimate_for(config, seq, sh["response"], 2)
    got = {k: f"{v:.2f}" for k, v in mem.items()}
    report.add(sec, "peak memory per phase vs estimate.estimate_memory (1 GPU, SP 1)", "INFO",
               f"measured GiB {got}; estimate: train {train_est:.2f}, rollout {roll_est:.2f} (estimate.py's per-phase "
               "model of rl.py, whose engine and flags differ from this check's: compare the order, not the digits)"
               if dev.type == "cuda" else f"CPU peak RSS so far {got}; estimate (GPU): train {train_est:.2f}")
    del policy, opt, params
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def check_rl_step(report, sec, policy, opt, params, config, seq, dev, mem):
    """rl.py's step on one prompt: an HF engine copy (bf16 on CUDA, as rl.py) gets the policy's weights, encodes the
    video and draws G=2 rollouts from the cached embeddings; rl.prefill scores them with the policy (old = reference
    at the first step); rl.update takes one GRPO step; the weights go back to the engine."""
    G, sh = 2, SHAPES[dev.type]["model"]
    engine = new_model(config, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    with Phase(dev) as ph:
        n = mrsp.sync_weights(policy, engine)
        pix = torch.randn(seq["embeds"].shape[0] * config.vision_config.spatial_merge_size ** 2,
                          3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size ** 2,
                          generator=torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():
            emb = mrsp.encode_videos(engine, pix.to(dev), seq["video_grid_thw"].to(dev))
        resp_start = int(seq["loss_mask"].nonzero()[0])
        prompt = dict(input_ids=seq["input_ids"][:resp_start], mm_token_type_ids=seq["mm_token_type_ids"][:resp_start],
                      video_grid_thw=seq["video_grid_thw"], second_per_grid_ts=seq["second_per_grid_ts"])
        gen = torch.Generator(device=dev).manual_seed(seed)
        out = mrsp.hf_rollout(engine, [dict(prompt, embeds=emb)], n=G, temperature=1.0,
                              max_new_tokens=sh["new_tokens"], eos_id=config.text_config.eos_token_id, generator=gen)
    mem["rl rollout"] = ph.mem
    # a sampled <|video_pad|> would be taken for a video slot by every forward: cut there, as rl.finish_response
    vid = config.video_token_id
    resp = [dict(tokens=t[:t.index(vid)] if vid in t else t, logprobs=lp[:t.index(vid)] if vid in t else lp)
            for t, lp in zip(out["token_ids"], out["logprobs"])]
    report.check(sec, f"RL rollouts (HF engine, G={G}, cached embeddings)", n == len(engine.state_dict()) and all(
        r["tokens"] for r in resp), f"synced {n} tensors; " + ", ".join(f"{len(r['tokens'])} tokens" for r in resp),
        "", ph.s, ph.mem)
    real_shape.set_rl_flags(attn="ring", temperature=1.0, keep_gathered=True, agg="token-mean", kl_coef=1e-2,
                            logit_chunk=1024)
    items = [rl.make_item(prompt, r["tokens"], 0, r["logprobs"]) for r in resp]
    videos = [dict(embeds=emb)]
    adv = rl.group_advantages([1.0, 0.0], G)   # stand-in rewards with a spread: a random-init model answers nothing
    mesh = mrsp.setup_mesh(1)
    probe = policy.model.language_model.layers[0].mlp.down_proj.weight
    before = (probe.to_local() if hasattr(probe, "to_local") else probe).detach().float().clone()
    with Phase(dev) as ph:
        old = rl.prefill(policy, items, videos, mesh, from_cache=True)
        acc = rl.update(policy, opt, params, items, videos, adv, old, old, mesh, from_cache=True, first_epoch=True)
        mrsp.sync_weights(policy, engine)
    mem["rl train"] = ph.mem
    after = (probe.to_local() if hasattr(probe, "to_local") else probe).detach().float()
    synced = max_abs(engine.model.language_model.layers[0].mlp.down_proj.weight.float(), after)
    gap = max(max_abs(o, it["engine_logp"].to(o)) for o, it in zip(old, items))
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tol = 0.1 if dt == torch.bfloat16 else 1e-3
    eps = 1e-2 if dt == torch.bfloat16 else 0.0   # the engine holds bf16 copies of the fp32 weights
    report.check(sec, "RL step: rl.prefill + rl.update + sync_weights",
                 gap <= tol and bool(torch.isfinite(torch.tensor(acc["loss"]))) and acc["grad_norm"] > 0
                 and max_abs(after, before) > 0 and synced <= eps * after.abs().max().item(),
                 f"engine vs prefill log-probs max diff {gap:.1e} (tol {tol:g}); loss {acc['loss']:.4f}, grad norm "
                 f"{acc['grad_norm']:.3g}; engine == policy after sync (diff {synced:.1e})", "", ph.s, ph.mem)
    del engine


# -----------------------------------------------------------------------------
# data path: the tiny checkpoint + synthetic set as prepare.py builds them, one real video on the device
def check_data(report, dev, tmp):
    """-> the tiny checkpoint dir, or "" when PyAV / torchvision are missing (SKIP row: the other sections use random
    pixels and token ids and need neither)."""
    try:
        import av  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:
        report.add("data", "synthetic set + tiny checkpoint + build_seq on the device", "SKIP",
                   f"{e.name} is not installed (data.py writes and decodes mp4 with PyAV; the Qwen-VL video processor "
                   "needs torchvision)")
        return ""
    with guard(report, "data", "synthetic set + tiny checkpoint + build_seq") as g, Phase(dev) as ph:
        synth, tiny = os.path.join(tmp, "synth"), os.path.join(tmp, "tiny")
        prepare.generate_synthetic(synth, n_train=4, n_val=1, n_test=1, num_frames=64, size=56, seed=seed,
                                   progress=False)
        prepare.init_tiny(tiny, synth, seed=seed)
        model, processor = mrsp.load_model(tiny, "float32", dev)
        rec = data.load_records(os.path.join(synth, "train.jsonl"))[0]
        seq = mrsp.build_seq(rec, processor, model.eval(), frames=16, device=dev)
        with torch.no_grad(), autocast(dev):
            lp = mrsp.sp_logprobs(model, seq)[seq["loss_mask"]]
    if g.failed:
        return ""
    report.check("data", "synthetic set + tiny checkpoint + build_seq + sp_logprobs", bool(torch.isfinite(lp).all()),
                 f"{seq['input_ids'].numel()} tokens ({int((seq['mm_token_type_ids'] == 2).sum())} video), "
                 f"{lp.numel()} scored, mean logp {lp.mean():.3f}", "", ph.s, ph.mem)
    return tiny


# -----------------------------------------------------------------------------
# the vision/LLM cost share r (bench/bench_mrsp.py's definition), timed on the device
def check_share(report, dev, tok):
    from bench_mrsp import forward_flops, ratio_7b
    sh = SHAPES[dev.type]["share"]
    config = model_config("real", tok, dev)
    model = new_model(config, dev).eval()
    L = config.text_config.num_hidden_layers
    raw = config.to_dict()
    gen = torch.Generator().manual_seed(seed)
    # the 7B's LM head on the response tokens alone (our vocabulary is small): (R, 3584) @ (3584, 152064) + softmax;
    # CUDA only (on CPU its 2 GB weight and seconds of matmul would buy nothing: the CPU rows are a smoke run)
    t_head, scale = 0.0, 1.0
    if dev.type == "cuda":
        d7, v7 = estimate.QWEN25_VL_7B["hidden_size"], estimate.QWEN25_VL_7B["vocab_size"]
        h = torch.randn(sh["response"], d7, device=dev, dtype=torch.bfloat16)
        wt = torch.randn(v7, d7, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            t_head = timed(lambda: torch.log_softmax((h @ wt.T).float(), -1), dev, 3)
        del h, wt
        scale = 28 / L   # the 7B's 28 decoder layers
    for Fr in sh["frames"]:
        if report.over_budget():
            report.add("share", f"r at {Fr} frames", "SKIP", f"time budget {budget_s:.0f}s spent")
            continue
        with guard(report, "share", f"r at {Fr} frames"):
            seq = make_seq(config, Fr, sh["size"], sh["response"], gen, prompt=(sh["prompt"] // 2, sh["prompt"] // 2))
            pix, grid = seq.pop("pixel_values_videos").to(dev), seq["video_grid_thw"].to(dev)
            with torch.no_grad(), autocast(dev):
                t_enc = timed(lambda: mrsp.encode_videos(model, pix, grid), dev, 3)
                seq["embeds"] = mrsp.encode_videos(model, pix, grid)
                t_llm = timed(lambda: mrsp.sp_logprobs(model, seq), dev, 3)
            t_7b = t_llm * scale + t_head
            vis, llm, n_tok = forward_flops(raw, Fr, sh["size"], sh["size"], sh["prompt"], sh["response"])
            report.add("share", f"r at {Fr} frames ({n_tok} video tokens, {sh['size']}x{sh['size']})", "INFO",
                       f"encode {t_enc * 1e3:.1f} ms ({rate(vis, t_enc)}), LLM fwd {L} layers {t_llm * 1e3:.1f} ms "
                       f"({rate(llm, t_llm)})" + (f" -> 28 layers + 7B head {t_7b * 1e3:.1f} ms" if scale != 1 else
                                                 " (CPU: not scaled to the 7B)")
                       + f": r = {t_enc / t_7b:.3f} (7B FLOP ratio {ratio_7b(Fr):.3f})", "", t_enc + t_llm)


# -----------------------------------------------------------------------------
def init_world1(dev, tmp):
    """A 1-process group (FSDP2 needs one): gloo for CPU tensors, NCCL for CUDA ones, as common.setup_dist."""
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'pg')}", rank=0, world_size=1)


def pick_device():
    if device not in ("auto", "cuda", "cpu"):
        raise SystemExit(f"gpu_check: --device={device!r}: expected auto, cuda or cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device=cuda but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def main():
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    dev = pick_device()
    if dev.type == "cuda":
        torch.cuda.set_device(0)
        print(f"device: {torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / GiB:.0f} "
              f"GiB), {torch.cuda.device_count()} GPU(s); torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"device: CPU ({os.cpu_count()} cores); torch {torch.__version__}")
    report = Report()
    sections = [("attention", lambda: check_attention_world1(report, dev)),
                ("attention", lambda: check_attention_dist(report, dev)),
                ("kernel", lambda: check_kernel(report, dev))]
    with tempfile.TemporaryDirectory() as tmp:
        init_world1(dev, tmp)
        tok = real_shape.make_tokenizer()
        tiny = {}
        sections += [("data", lambda: tiny.setdefault("dir", check_data(report, dev, tmp))),
                     ("tiny", lambda: check_model(report, "tiny", dev, tok, tiny.get("dir", ""))),
                     ("real", lambda: check_model(report, "real", dev, tok)),
                     ("share", lambda: check_share(report, dev, tok))]
        for name, fn in sections:
            if report.over_budget():
                report.add(name, "section", "SKIP", f"time budget {budget_s:.0f}s spent")
                continue
            with guard(report, name, "section"):
                fn()
        dist.destroy_process_group()
    total = time.time() - report.t0
    print("\n" + report.table())
    fails = [r for r in report.rows if r["status"] == "FAIL"]
    print(f"\n{len(report.rows)} rows, {len(fails)} FAIL, {sum(r['status'] == 'SKIP' for r in report.rows)} SKIP; "
          f"{total:.0f} s on {dev.type}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(dict(device=str(dev), total_s=total, rows=report.rows), f, indent=1)
    return 1 if fails else 0


if __name__ == "__main__":
    common.apply_overrides(globals(), sys.argv[1:])
    if part == "attn_dist":
        attn_dist_child()
        sys.exit(0)
    if part != "all":
        raise SystemExit(f"gpu_check: --part={part!r}: expected all (attn_dist is internal)")
    sys.exit(main())
