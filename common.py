"""
common.py -- the plumbing every stage script repeats: torchrun set-up, print0, the --key=value config, checkpoints
(save / resume / HF export), the metrics log, peak memory, and the few collectives the loops share. Stage files
(sft.py, rl.py, eval.py) import this, data, mrsp and seq_parallel_attn -- never each other.
"""
import ast
import atexit
import contextlib
import datetime
import json
import os
import random
import shutil
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# torchrun set-up
def setup_dist(timeout_min=30):
    """-> (rank, local_rank, world_size, device) from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE). World
    size 1 runs without torchrun or a process group. timeout_min: how long a collective may wait for the other ranks
    before it fails instead of hanging."""
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
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min))
    return rank, local_rank, world, device


def teardown(world, engine=None):
    """The end of a torchrun job: a last barrier, then the rollout engine stopped (engine.stop(): vLLM's teardown
    destroys the default process group too, so it goes after the job's last collective), then the process group."""
    _stop_watchdog()   # before the last collectives: the job is ending, its phase budget with it
    if world > 1:
        dist.barrier()
    if engine is not None:
        engine.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# config: module globals, overridden by --key=value
def apply_overrides(config, argv):
    """Apply `--key=value` args to `config` (a dict, usually globals()). Values are parsed as Python
    literals when possible and must keep the default's type. Unknown keys are an error."""
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"bad argument {arg!r}: expected --key=value")
        key, val = arg[2:].split("=", 1)
        known = config_of(config)
        if key not in known:
            raise SystemExit(f"unknown config key {key!r}; known keys: {', '.join(sorted(known))}")
        default = config[key]
        if isinstance(default, bool):
            if val.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise SystemExit(f"--{key}: expected a boolean (1/0/true/false), got {val!r}")
            val = val.lower() in ("1", "true", "yes")
        elif isinstance(default, str) or default is None:
            pass  # strings and optional paths stay strings
        else:
            try:
                val = ast.literal_eval(val)
            except (ValueError, SyntaxError):
                raise SystemExit(f"--{key}: expected a {type(default).__name__}, got {val!r}") from None
            if isinstance(default, float) and isinstance(val, int):
                val = float(val)
            if type(val) is not type(default):
                raise SystemExit(f"--{key}: expected a {type(default).__name__}, got {val!r}")
        config[key] = val
    return config


def config_of(config):
    """The printable/saveable part of a module's globals: plain values with public names."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k.islower()
            and isinstance(v, (int, float, str, bool, type(None)))}


# -----------------------------------------------------------------------------
# data order and sampling seeds: pure functions of the position, so every rank layout and a resume agree
def batch_indices(step, n, batch_size, seed):
    """Global sample indices of an optimizer step: consecutive slices of per-epoch permutations, so the
    data position is a pure function of the step (what makes --resume exact)."""
    out, perms, pos = [], {}, step * batch_size
    for p in range(pos, pos + batch_size):
        epoch, i = divmod(p, n)
        if epoch not in perms:   # a step spans at most two epochs: at most two permutations
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][i]))
    return out


def sample_seed(seed, pos):
    """Sampling seed of the answers to the item at data position `pos`: a pure function of the position, so samples
    do not depend on the rank layout (SP/DP splits), the batching or a resume."""
    return (seed * 1_000_003 + pos) % (1 << 62)


# -----------------------------------------------------------------------------
# timing, memory, gradients
def tick():
    """Wall clock once the device's queued work is done (this is a sync point on GPU: phase timings stay apart)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


def autocast(device):
    """bf16 autocast on GPUs (the master weights stay fp32); nothing on CPU, where the exactness tests run fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def peak_memory_gb(world=1):
    """Peak memory of the fullest rank in GB: CUDA's max allocated, or on CPU the process's peak RSS. world > 1: a
    max all-reduce over all ranks (this is a sync point: every rank must call it)."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # KiB on Linux -> GB
    if world > 1:
        x = torch.tensor([peak], dtype=torch.float64)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        peak = x.item()
    return peak


def clip_grad(params, max_norm):
    """Clip the gradients' global norm (over all ranks under FSDP) -> the norm before clipping, a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # a DTensor under FSDP2


# -----------------------------------------------------------------------------
# collectives the loops share (each is a sync point: every rank of the group must call it)
def reduce_sum(values, group=None):
    """dict of numbers -> the same dict summed over `group` (one all-reduce; None = no group, nothing to sum)."""
    x = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    if group is not None:
        dist.all_reduce(x, group=group)
    return dict(zip(values, x.tolist()))


def hash56(text):
    """A stable 56-bit hash of a string (Python's hash() differs between processes)."""
    import hashlib
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def agree(group, where, **values):
    """Check that every rank of `group` holds the same integer `values` (one small all-gather: a sync point, every
    rank must call it). A mismatch raises on every rank with a table of what each rank holds, naming `where` --
    instead of letting the ranks walk into mismatched collectives, which under NCCL hang without a word."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    rank, P = dist.get_rank(group), dist.get_world_size(group)
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


def gather_rows(rows, world):
    """All ranks' rows (dicts with an "index") on rank 0, in index order; other ranks get None."""
    if world > 1:
        parts = [None] * world if dist.get_rank() == 0 else None
        dist.gather_object(rows, parts, dst=0)
        if dist.get_rank() != 0:
            return None
        rows = [r for p in parts for r in p]
    return sorted(rows, key=lambda r: r["index"])


# -----------------------------------------------------------------------------
# checkpoints: sharded, atomic, exactly resumable; and the HF export
def save_checkpoint(out_dir, step, policy, opt, cfg, world, rank, keep=2, extra=None):
    """Sharded DCP checkpoint into step_N.tmp, then renamed: a crash mid-save leaves the previous one.
    extra: JSON-able trainer state stored next to the step (rl.py keeps its own counters there)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = os.path.join(out_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world > 1:
        dist.barrier()
    msd, osd = get_state_dict(policy, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    torch.save(dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                    cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None),
               os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(dict(step=step, config=cfg, extra=extra), f)
    if world > 1:
        dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
        old = sorted(d for d in os.listdir(out_dir) if d.startswith("step_") and not d.endswith(".tmp"))
        for d in old[:-keep]:
            shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
    if world > 1:
        dist.barrier()


def load_checkpoint(out_dir, policy, opt, rank):
    """-> (step to continue from, extra trainer state); (0, None) when there is nothing to resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    latest = os.path.join(out_dir, "latest")
    if not os.path.isfile(latest):
        print0(f"--resume: no checkpoint in {out_dir}, starting from scratch")
        return 0, None
    path = os.path.join(out_dir, open(latest).read().strip())
    msd, osd = get_state_dict(policy, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if not os.path.isfile(rng_file):
        raise FileNotFoundError(f"{rng_file}: missing; was the checkpoint written with a different world size?")
    rng = torch.load(rng_file, weights_only=False)
    torch.set_rng_state(rng["torch"]); np.random.set_state(rng["numpy"]); random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer = json.load(open(os.path.join(path, "trainer.json")))
    print0(f"resumed from {path} (step {trainer['step']})")
    return trainer["step"], trainer.get("extra")


def export_hf(model, processor, out_dir, cfg):
    """Write out_dir/hf atomically (hf.tmp, then renamed): a standard HF checkpoint + processor + the training config,
    which eval.py, rl.py and vLLM load. `model` is an unsharded copy holding the trained weights (mrsp.sync_weights
    fills one from the FSDP policy: a collective); call this on one rank."""
    hf, tmp = os.path.join(out_dir, "hf"), os.path.join(out_dir, "hf.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "train_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    shutil.rmtree(hf, ignore_errors=True)
    os.replace(tmp, hf)
    print(f"exported HF checkpoint to {hf}")


# -----------------------------------------------------------------------------
# the metrics log
def metrics_logger(out_dir, cfg, wandb_project, master_process):
    """-> log(row): one JSON line per call in out_dir/metrics.jsonl (appended: a resumed run continues the file),
    and to Weights & Biases when wandb_project is set. Only the master process writes."""
    if not master_process:
        return lambda row: None
    wandb = None
    if wandb_project:
        import wandb
        wandb.init(project=wandb_project, config=cfg)
    f = open(os.path.join(out_dir, "metrics.jsonl"), "a")

    def log(row):
        f.write(json.dumps(row) + "\n")
        f.flush()
        if wandb:
            wandb.log(row, step=row["step"])
    return log


# -----------------------------------------------------------------------------
# no silent hangs. Under NCCL a collective that one rank skips, or calls with another size, waits forever without a
# word. Three guards, all set up by watchdog() once per run:
#  * phase fingerprints: at the start of each collective-heavy phase every rank sends a few integers (phase, step,
#    the sequences it will run, their tokens, its embedding-cache history) and a mismatch raises on EVERY rank with a
#    table of what each holds -- one small all-gather per phase (check=False turns it off);
#  * a per-phase time budget: a phase that outlives it dumps this rank's Python stacks (faulthandler) and the last
#    fingerprints to out_dir/hang_rank{R}.txt and ends the job, instead of waiting;
#  * an exception on one rank reaches all: its message goes to the job's store, the others' watchdogs see it within
#    about a second, print it and exit -- instead of waiting in a collective for a rank that is gone.
# MRSP_FAULT="rank=1,phase=prefill,do=raise|sleep|seqs|cache" injects a fault at a phase (the tests use it).
PHASES = ("init", "collect", "prefill", "update", "sync", "eval", "checkpoint", "train")
_watch = dict(on=False, check=True, phase="init", step=-1, deadline=None, budget=None, out_dir=".", rank=0, world=1,
              last=None, store=None, t_checks=0.0, peaks={})
_ABORT_KEY = "mrsp_abort"


def _peak_bytes():
    """This process's memory high-water mark since the last _reset_peak: CUDA's max allocated, or on CPU the peak
    resident set (VmHWM)."""
    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            return float(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024)
    except (OSError, StopIteration):   # not Linux: the lifetime peak
        import resource
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:   # Linux: "5" resets the peak RSS to the current RSS
            f.write("5")
    except OSError:
        pass


def phase_memory(group=None):
    """Peak memory (GB) of each phase entered since the last call -- the largest over the ranks of `group` (a MAX
    all-reduce: a sync point; None = the world) -- and the current phase's so far. Per-rank numbers of one process:
    CUDA allocated, or peak RSS on CPU (which includes the Python/torch runtime)."""
    w = _watch
    w["peaks"][w["phase"]] = max(w["peaks"].get(w["phase"], 0.0), _peak_bytes())
    x = torch.tensor([w["peaks"].get(p, 0.0) / 1e9 for p in PHASES], dtype=torch.float64)   # fixed length
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    w["peaks"] = {}
    _reset_peak()
    return {p: v for p, v in zip(PHASES, x.tolist()) if v > 0}


def _fault(name, rank):
    """The fault MRSP_FAULT asks for at this phase on this rank, or None."""
    spec = dict(kv.split("=", 1) for kv in os.environ.get("MRSP_FAULT", "").split(",") if "=" in kv)
    if spec.get("phase") == name and int(spec.get("rank", -1)) == rank:
        return spec.get("do")
    return None


def _hang_report(why):
    """Write this rank's stacks + last fingerprints to out_dir/hang_rank{R}.txt; -> the file."""
    import faulthandler
    path = os.path.join(_watch["out_dir"], f"hang_rank{_watch['rank']}.txt")
    os.makedirs(_watch["out_dir"], exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{why}\nlast phase fingerprints (rank: phase, step, seqs, tokens, cache, sp group): "
                f"{_watch['last']}\n\nPython stacks of rank {_watch['rank']}:\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
    return path


def _abort(why):
    """Post `why` for every rank (the first poster wins) and give the others a few seconds to dump their own stacks
    before this process ends (torchrun stops the whole job as soon as one rank exits)."""
    store, world = _watch["store"], _watch["world"]
    if store is None:
        return
    if not store.check([_ABORT_KEY]):
        store.set(_ABORT_KEY, why)
    _wait_for(store, [f"{_ABORT_KEY}_seen_{r}" for r in range(world) if r != _watch["rank"]], seconds=5.0)


def _wait_for(store, keys, seconds):
    """Poll the store until every key is set or `seconds` pass (the other ranks' watchdogs post within ~0.5 s)."""
    t_end = time.time() + seconds
    while time.time() < t_end and not store.check(keys):
        time.sleep(0.1)


def _main_thread_position():
    """-> (waiting, 'file:line in fn'): where this rank's main thread is, and whether it waits inside torch.distributed
    (a collective, or FSDP's gathers) -- a rank that does not is the one the others wait for."""
    f = sys._current_frames().get(threading.main_thread().ident)
    where = f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno} in {f.f_code.co_name}" if f else "?"
    waiting = False
    while f is not None:
        waiting |= f"torch{os.sep}distributed" in f.f_code.co_filename
        f = f.f_back
    return waiting, where


def _who_is_late():
    """This rank's phase ran past its budget: post where it is, give the other ranks' watchdogs (same budget, phases
    entered together) two seconds to post theirs, and -> the message naming the ranks still computing (the likely
    cause) and those waiting for them in a collective."""
    w, store = _watch, _watch["store"]
    waiting, where = _main_thread_position()
    posts = {w["rank"]: f"{int(waiting)}|{where}"}
    if store is not None:
        store.set(f"{_ABORT_KEY}_late_{w['rank']}", posts[w["rank"]])
        keys = {r: f"{_ABORT_KEY}_late_{r}" for r in range(w["world"]) if r != w["rank"]}
        _wait_for(store, list(keys.values()), seconds=2.0)
        posts.update({r: store.get(k).decode() for r, k in keys.items() if store.check([k])})
    busy = {r: p.split("|", 1)[1] for r, p in sorted(posts.items()) if p[0] == "0"}
    idle = sorted(r for r, p in posts.items() if p[0] == "1")
    why = f"phase {w['phase']!r} (step {w['step']}) ran past its budget of {w['budget']:g} s (--phase_timeout)"
    if busy:
        why += f"; rank(s) {sorted(busy)} still computing (" + ", ".join(f"rank {r} at {p}" for r, p in busy.items()) + ")"
    if idle:
        why += f"; rank(s) {idle} waiting in a collective"
    return why


def _watchdog_loop():
    while True:
        time.sleep(0.5)
        w = _watch
        why = None
        if w.get("aborting") or not w["on"]:   # this rank's own exception is on its way out, or the job ended
            return
        if w["store"] is not None:
            try:
                if w["store"].check([_ABORT_KEY]):
                    why = w["store"].get(_ABORT_KEY).decode()
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
                return
        mine = why is None and w["deadline"] is not None and time.time() > w["deadline"]
        if mine:
            why = _who_is_late()
        if why is not None:
            path = _hang_report(why)
            print(f"\n[rank {w['rank']}] stopping the job: {why}\n[rank {w['rank']}] stacks and last fingerprints: "
                  f"{path}", file=sys.stderr, flush=True)
            if mine:
                _abort(why)                                            # the others stop too, naming this rank
            elif w["store"] is not None:
                w["store"].set(f"{_ABORT_KEY}_seen_{w['rank']}", "1")   # this rank's report is written
            os._exit(124)


def watchdog(out_dir, phase_timeout_s=3600.0, check=True):
    """Start the three guards above (call once, after setup_dist, on every rank). phase_timeout_s: the budget of one
    phase (a multi-hour GPU run needs minutes for a long-video rollout; tests use seconds)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    store = None
    if dist.is_initialized() and "MASTER_ADDR" in os.environ:
        # our own client of the job's store (torchrun's / init_process_group's): the watchdog thread polls it
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=60))
        except Exception as e:  # noqa: BLE001 - the guards that need no store still run
            print(f"[rank {rank}] watchdog: no store at MASTER_ADDR:MASTER_PORT ({e}): an error on one rank will "
                  "not be relayed to the others", file=sys.stderr, flush=True)
    _watch.update(on=True, check=check, out_dir=out_dir, rank=rank, store=store, budget=phase_timeout_s,
                  world=dist.get_world_size() if dist.is_initialized() else 1)
    hook = sys.excepthook

    def tell_the_others(kind, err, tb):   # an uncaught exception on this rank: its message to every rank, then die
        _watch["aborting"] = True
        hook(kind, err, tb)
        _abort(f"rank {rank} failed in phase {_watch['phase']!r} (step {_watch['step']}): {kind.__name__}: {err}")
    sys.excepthook = tell_the_others
    _watch["thread"] = threading.Thread(target=_watchdog_loop, daemon=True, name="mrsp-watchdog")
    _watch["thread"].start()
    atexit.register(_stop_watchdog)


def _stop_watchdog():
    """End the watchdog thread before the interpreter (and the store it polls) goes away: a daemon thread still
    inside a C++ store call at interpreter shutdown can abort the process after a successful run."""
    _watch.update(on=False, deadline=None)
    t = _watch.pop("thread", None)
    if t is not None and t is not threading.current_thread():
        t.join(timeout=2.0)


def check_seconds():
    """Seconds spent in phase() fingerprint all-gathers since the last call, logged per step. It includes the wait
    for the slowest rank, which the phase's first collective would otherwise absorb: an upper bound of their cost."""
    t, _watch["t_checks"] = _watch["t_checks"], 0.0
    return t


def phase(name, step, sp_group=None, seqs=None, tokens=None, cache=None):
    """Enter a collective-heavy phase (PHASES): its time budget starts now, and (watchdog's check on) the ranks
    compare fingerprints in one all-gather over the world: phase, step and `seqs` (FSDP runs every rank's forwards in
    lockstep: equal counts everywhere) must match on every rank; `tokens` and `cache` (an EmbeddingCache.history)
    must match within each SP group (its ranks share every sequence). None = not compared. A mismatch raises on
    every rank with the table. Without watchdog() (library use, tests) only MRSP_FAULT and the check run."""
    assert name in PHASES, name
    rank = dist.get_rank() if dist.is_initialized() else 0
    w = _watch
    w["peaks"][w["phase"]] = max(w["peaks"].get(w["phase"], 0.0), _peak_bytes())   # the phase that just ended
    _reset_peak()
    w.update(phase=name, step=step, deadline=time.time() + w["budget"] if w["on"] and w["budget"] else None)
    fault = _fault(name, rank)
    if fault == "raise":
        raise RuntimeError(f"MRSP_FAULT: injected failure on rank {rank} in phase {name!r}")
    if fault == "seqs":
        seqs = (seqs or 0) + 1
    if fault == "cache":
        cache = (cache or 0) + 1
    if fault == "sleep":
        time.sleep(w["budget"] * 3 if w["budget"] else 3600)
    if not (w["check"] and dist.is_initialized() and dist.get_world_size() > 1):
        return
    t0 = time.time()
    group0 = dist.get_process_group_ranks(sp_group)[0] if sp_group is not None else rank
    val = lambda x: -1 if x is None else int(x)   # noqa: E731
    mine = torch.tensor([PHASES.index(name), step, val(seqs), val(tokens), val(cache), group0], dtype=torch.int64)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)   # this is a sync point: every rank enters every phase
    rows = [r.tolist() for r in rows]
    w["last"] = rows
    w["t_checks"] += time.time() - t0
    bad = [i for i, r in enumerate(rows) if r[:3] != rows[0][:3] or
           any(o[5] == r[5] and o[3:5] != r[3:5] for o in rows)]
    if bad:
        head = "rank  phase       step   seqs  tokens  cache               sp group"
        table = "\n".join(f"{i:>4}  {PHASES[r[0]]:<10} {r[1]:>5} {r[2]:>6} {r[3]:>7}  {r[4]:<19} {r[5]}"
                          for i, r in enumerate(rows))
        raise RuntimeError(f"phase {name!r} (step {step}): the ranks disagree -- rank(s) {bad} differ from the "
                           f"others (this is rank {rank}); entering it would mismatch their collectives:\n{head}\n"
                           f"{table}\n(-1: not compared. phase/step/seqs must match on all ranks, tokens/cache within "
                           f"an SP group.)")
