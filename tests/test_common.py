"""common.py: the torchrun set-up and the collectives the loops share."""
import torch

from dist_utils import run_distributed


def test_setup_dist_gives_cpu_collectives_gloo_on_gpus(monkeypatch):
    """On GPUs the process group must carry gloo next to NCCL: the bookkeeping all-reduces (token counts, metrics,
    eval counts) run on CPU tensors, which an NCCL-only group rejects at the first RL/SFT step. No GPU here, so CUDA
    and the group creation are faked; torch itself parses the backend string."""
    import torch.distributed as dist

    import common
    made = []
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(common.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(common.dist, "init_process_group", lambda backend, timeout: made.append(backend))
    rank, local_rank, world, device = common.setup_dist()
    assert (rank, world, device.type) == (0, 2, "cuda") and len(made) == 1
    backends = dist.distributed_c10d.BackendConfig(dist.Backend(made[0])).get_device_backend_map()
    assert backends == {"cpu": "gloo", "cuda": "nccl"}


def _collectives_worker():
    import torch.distributed as dist
    from common import agree, gather_rows, reduce_sum
    rank = dist.get_rank()
    agree(dist.group.WORLD, "same", a=7, b=8)                              # equal: passes
    try:
        agree(dist.group.WORLD, "phase x", a=7, b=rank)
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    rows = gather_rows([dict(index=i, r=rank) for i in range(rank, 5, 2)], 2)
    return msg, reduce_sum(dict(n=rank + 1), dist.group.WORLD), rows


def test_agree_gather_rows_and_reduce_sum_on_two_ranks():
    (m0, s0, rows0), (m1, s1, rows1) = run_distributed(_collectives_worker, 2, timeout=120)
    for rank, m in enumerate((m0, m1)):
        assert m.startswith("phase x: the ranks of a sequence-parallel group disagree") and f"this rank is {rank}" in m
        assert "group rank 0: a=7, b=0" in m and "group rank 1: a=7, b=1" in m
    assert s0 == s1 == dict(n=3.0)
    assert [r["index"] for r in rows0] == [0, 1, 2, 3, 4] and rows1 is None   # all rows on rank 0, in order


def test_batch_indices_and_sample_seed_are_pure_functions_of_the_position():
    from common import batch_indices, sample_seed
    a = [batch_indices(s, 10, 4, seed=0) for s in range(5)]             # 20 samples = 2 epochs of 10
    assert sorted(a[0] + a[1] + a[2][:2]) == list(range(10))               # epoch 0: each sample once
    assert a == [batch_indices(s, 10, 4, seed=0) for s in range(5)] != [batch_indices(s, 10, 4, seed=1)
                                                                          for s in range(5)]
    assert sample_seed(0, 5) == sample_seed(0, 5) != sample_seed(1, 5) != sample_seed(0, 6)
