"""No silent hangs (common.watchdog / common.phase): rl.py under torchrun on 2 gloo processes with a fault injected on
one rank (MRSP_FAULT) -- a different sequence count, a cache that evicted differently, an exception inside the prefill,
a rank that sleeps past the phase budget. Each must end the job within seconds, on every rank, with a message that
names the rank and the phase; never hang. Normal runs (every other rl/sft/eval test) keep the checks on."""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _rl_with_fault(out_dir, tiny_ckpt, synth_dir, fault, *args, sp=1):
    """-> (CompletedProcess, seconds). The job is killed after 240 s: a hang fails the test instead of CI."""
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "rl.py", f"--model={tiny_ckpt}",
           f"--data={synth_dir}/train.jsonl", "--val_data=", f"--out_dir={out_dir}", "--frames=8",
           "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=8", "--steps=2", f"--sp={sp}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", MRSP_FAULT=fault)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    return p, time.time() - t0


def test_a_rank_with_another_sequence_count_fails_on_every_rank(tmp_path, tiny_ckpt, synth_dir):
    p, dt = _rl_with_fault(tmp_path, tiny_ckpt, synth_dir, "rank=1,phase=prefill,do=seqs")
    assert p.returncode != 0
    for rank in (0, 1):   # both ranks raise, each with the table
        assert f"phase 'prefill' (step 0): the ranks disagree -- rank(s) [1] differ from the others (this is rank " \
               f"{rank})" in p.stderr, p.stderr[-3000:]
    assert "rank  phase       step   seqs" in p.stderr


def test_a_cache_that_evicted_differently_fails_within_the_sp_group(tmp_path, tiny_ckpt, synth_dir):
    p, dt = _rl_with_fault(tmp_path, tiny_ckpt, synth_dir, "rank=1,phase=collect,do=cache", sp=2)
    assert p.returncode != 0
    assert "phase 'collect' (step 0): the ranks disagree -- rank(s) [0, 1]" in p.stderr, p.stderr[-3000:]


def test_an_exception_on_one_rank_ends_every_rank_with_its_message(tmp_path, tiny_ckpt, synth_dir):
    p, dt = _rl_with_fault(tmp_path, tiny_ckpt, synth_dir, "rank=1,phase=prefill,do=raise", "--dist_timeout=30")
    assert p.returncode != 0
    assert "RuntimeError: MRSP_FAULT: injected failure on rank 1 in phase 'prefill'" in p.stderr
    # rank 0 waits in a collective for rank 1; its watchdog reads rank 1's message from the store and says it
    assert "[rank 0] stopping the job: rank 1 failed in phase 'prefill' (step 0): RuntimeError" in p.stderr, \
        p.stderr[-3000:]
    assert dt < 120, dt   # seconds, not the 30-minute collective timeout


def test_a_rank_past_the_phase_budget_dumps_stacks_and_ends_the_job(tmp_path, tiny_ckpt, synth_dir):
    t_budget = 8
    p, dt = _rl_with_fault(tmp_path, tiny_ckpt, synth_dir, "rank=1,phase=update,do=sleep",
                           f"--phase_timeout={t_budget}")
    assert p.returncode != 0
    # both ranks' budgets run out (rank 0 waits for rank 1 in the update's first collective); the message names rank
    # 1 as the one still computing, and where, on every rank
    for rank in (0, 1):
        line = next((s for s in p.stderr.splitlines() if f"[rank {rank}] stopping the job:" in s), "")
        assert f"phase 'update' (step 0) ran past its budget of {t_budget} s" in line, p.stderr[-3000:]
        assert "rank(s) [1] still computing (rank 1 at common.py:" in line and "in phase)" in line, line
    for rank in (0, 1):   # every rank dumps its Python stacks and the last fingerprints
        report = (tmp_path / f"hang_rank{rank}.txt").read_text()
        assert "ran past its budget" in report and "last phase fingerprints" in report
        assert 'File "' in report and "rl.py" in report, report[:2000]
    assert "hang_rank1.txt" in p.stderr


def test_phase_checks_cost_is_logged_and_small(tmp_path, tiny_ckpt, synth_dir):
    """A normal run with the checks on: every step logs the seconds spent in the fingerprint all-gathers (including
    the wait for the slowest rank, which the next collective would otherwise absorb: their own cost is measured side
    by side in docs/BENCHMARKS.md) and the peak memory of each phase."""
    p, dt = _rl_with_fault(tmp_path, tiny_ckpt, synth_dir, "")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["t_checks"] < r["step_time"], (r["t_checks"], r["step_time"])
        assert {"mem_collect_gb", "mem_prefill_gb", "mem_update_gb", "mem_sync_gb"} <= set(r), sorted(r)
        assert r["peak_mem_gb"] == max(v for k, v in r.items() if k.startswith("mem_"))
