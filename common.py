"""
common.py -- the plumbing every stage script repeats: torchrun set-up, print0, the --key=value config, checkpoints
(save / resume / HF export), the metrics log, peak memory, and the few collectives the loops share. Stage files
(sft.py, rl.py, eval.py) import this, data, mrsp and seq_parallel_attn -- never each other.
"""
import ast
import contextlib
import datetime
import json
import os
import random
import shutil
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
