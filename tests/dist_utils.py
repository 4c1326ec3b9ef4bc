"""Run a function on N CPU processes joined by a gloo process group (for distributed tests).

    from dist_utils import run_distributed
    outs = run_distributed(my_fn, world_size=2, args=(x,))   # list: my_fn's return value per rank

`my_fn` must be defined at module level (it is pickled into `spawn`ed children). Inside it,
`torch.distributed` is initialised (gloo, WORLD group) and RANK/WORLD_SIZE are set. The first
exception on any rank is re-raised here with that rank's traceback; a hang becomes a TimeoutError.

Trap: gloo children can abort at exit ("terminate called without an active
exception") when a peer has already gone. Each child therefore ends with a barrier, flushes, and
leaves with os._exit.
"""
import io
import os
import queue
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, fn, args, kwargs, q, threads):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)  # N processes on 2 cores: oversubscription makes tests crawl
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(*args, **kwargs)
        # by value: torch would share tensors as fds, which die with this process (os._exit below)
        buf = io.BytesIO()
        torch.save(out, buf)
        q.put((rank, True, buf.getvalue()))
        dist.barrier()
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt/SystemExit
        q.put((rank, False, traceback.format_exc()))
        code = 1
    q.close()
    q.join_thread()  # os._exit skips the queue's feeder thread: flush the result first or it is lost
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)


def run_distributed(fn, world_size, args=(), kwargs=None, timeout=300, threads=1):
    """Run fn(*args, **kwargs) on `world_size` gloo ranks; return the list of per-rank results."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, kwargs or {}, q, threads))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = [None] * world_size
    try:
        for _ in range(world_size):
            try:
                rank, ok, out = q.get(timeout=timeout)
            except queue.Empty:
                dead = [f"rank {r} exit={p.exitcode}" for r, p in enumerate(procs)]
                raise TimeoutError(f"run_distributed({fn.__name__}, world_size={world_size}) "
                                   f"got no result within {timeout}s ({', '.join(dead)})") from None
            if not ok:
                # the first failure is the cause; peers then fail in communication: report them after it
                errors = [(rank, out)]
                for _ in range(world_size - 1):
                    try:
                        r2, ok2, out2 = q.get(timeout=10)
                    except queue.Empty:
                        break
                    if not ok2:
                        errors.append((r2, out2))
                msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors)
                raise RuntimeError(f"rank {rank} of {world_size} failed in {fn.__name__}:\n{msg}")
            results[rank] = torch.load(io.BytesIO(out), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return results
