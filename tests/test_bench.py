"""bench/bench_mrsp.py's memory read-out: frames that fit a per-rank budget, from measured (frames, peak) points."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from bench_mrsp import frames_under, print_memory  # noqa: E402


def test_frames_under_interpolates_the_first_crossing():
    pts = [(256, 1.0), (512, 1.1), (1024, 1.3), (2048, 1.7)]
    assert frames_under(pts, 0.9) is None                      # even the shortest run is over
    assert frames_under(pts, 1.2) == pytest.approx(768)        # halfway between 512 (1.1) and 1024 (1.3)
    assert frames_under(pts, 1.7) == 2048 and frames_under(pts, 5.0) == 2048   # fits the longest measured run
    # a peak that dips later does not count: the first crossing stops the run
    assert frames_under([(256, 1.0), (512, 1.4), (1024, 1.2)], 1.2) == pytest.approx(256 + 256 * 0.5)


def test_print_memory_reports_budgets_over_the_measured_range(capsys):
    res = [dict(frames=f, naive=dict(peak_gb=a), mrsp=dict(peak_gb=b))
           for f, a, b in [(256, 1.0, 1.0), (512, 1.2, 1.1), (1024, 1.6, 1.3)]]
    rows = print_memory(res)
    budgets = [r for r in rows if "budget_gb" in r]
    assert [round(r["budget_gb"], 2) for r in budgets] == [1.12, 1.24, 1.36, 1.48, 1.6]
    b = budgets[1]                                             # 1.24 GB: naive 512 + 512*0.04/0.4, MR-SP 512 + 512*0.14/0.2
    assert b["naive_frames"] == pytest.approx(563.2) and b["mrsp_frames"] == pytest.approx(870.4)
    assert budgets[-1]["naive_frames"] == 1024
    out = capsys.readouterr().out
    assert "| 1.24 | 563 | 870 | 1.55x |" in out and "| 1.48 | 870 | >= 1024 | >= 1.18x |" in out


def test_rope_resolution_sees_the_demo_models_blind_axes():
    """bench/probe_tiny.py's M-RoPE resolution: at rope base 1e4 and head_dim 16 (sections 2,3,3) the w axis gets
    frequencies too slow to tell the two token columns apart (the old demo model); base 3 resolves every axis."""
    from types import SimpleNamespace
    from probe_tiny import rope_resolution

    def cfg(theta, heads):
        return SimpleNamespace(hidden_size=128, num_attention_heads=heads, head_dim=128 // heads,
                               rope_parameters=dict(rope_theta=theta, mrope_section=[2, 3, 3] if heads == 8 else
                                                    [4, 6, 6]))
    old, _ = rope_resolution(cfg(1e4, 8), t_step=8.0)
    new, geom = rope_resolution(cfg(3.0, 8), t_step=8.0)
    assert old["w"] < 0.01 and old["h"] < 0.2 and geom["head_dim"] == 16
    assert min(new.values()) > 0.4
    # a frequency that aliases on the axis counts as blind: step 2*pi rotates a full turn
    alias, _ = rope_resolution(SimpleNamespace(hidden_size=4, num_attention_heads=1, head_dim=4,
                                               rope_parameters=dict(rope_theta=1.0, mrope_section=[1, 0, 1])),
                               t_step=2 * math.pi)
    assert alias["t"] < 1e-9
