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


def _fake_demo_run(root, seed, lift, n=40):
    """A finished demo folder as bench/demo_seeds.py reads it: the four evals' results + items, SFT metrics. Every
    question's sampled score rises by `lift` from SFT to RL (0.25 steps: 4 of 8 samples -> 4 + 8 * lift)."""
    import json
    for name in ("sft", "rl", "sft_sampled", "rl_sampled"):
        d = os.path.join(root, "eval", name)
        os.makedirs(os.path.join(d, "frames_16"))
        json.dump({"frames": 16, "n": n}, open(os.path.join(d, "results.json"), "w"))
        k = round(8 * (0.5 + (lift if name == "rl_sampled" else 0)))
        rows = [dict(id=f"q{i}", category="temporal" if i % 2 else "plot", correct=j < (k if "sampled" in name else
                     (1 if i % 4 else 0))) for i in range(n) for j in range(8 if "sampled" in name else 1)]
        with open(os.path.join(d, "frames_16", "items.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    os.makedirs(os.path.join(root, "sft"))
    with open(os.path.join(root, "sft", "metrics.jsonl"), "w") as f:
        f.write(json.dumps(dict(step=10, loss=1.0)) + "\n" + json.dumps(dict(step=20, val_acc=0.5 + seed / 100)) + "\n")


def test_demo_seeds_pools_over_runs_and_questions(tmp_path):
    """read_run reads a demo folder; the bootstrap over runs and questions carries the run-to-run spread: runs that lift by +1/8 and
    +3/8 on every question give an interval as wide as the runs (a question-only bootstrap of the pooled change
    would be a point), and an unfinished run reads as None."""
    import numpy as np
    from demo_seeds import boot_ci, read_run
    for s, lift in ((0, 1 / 8), (1, 3 / 8)):
        _fake_demo_run(str(tmp_path / f"omp1_s{s}"), s, lift)
    runs = [read_run(str(tmp_path / f"omp1_s{s}")) for s in (0, 1)]
    assert runs[0]["sft_val"] == 0.5 and runs[0]["sft"] == pytest.approx(0.75)   # 3 of 4 greedy answers right
    assert runs[0]["sft_cats"] == {"plot": 0.5, "temporal": 1.0}
    assert [sorted(set(r["diff"].values())) for r in runs] == [[0.125], [0.375]]
    lo, hi = boot_ci([r["diff"] for r in runs], np.random.default_rng(0))
    assert lo == pytest.approx(0.125) and hi == pytest.approx(0.375)
    # the runs share one test set: repeating the same run does not narrow the question-to-question spread (resampling
    # each run's questions on its own would halve it for four runs)
    d = {f"q{i}": (0.25 if i % 3 == 0 else 0.0) for i in range(60)}
    (lo1, hi1), (lo4, hi4) = (boot_ci([d] * k, np.random.default_rng(1)) for k in (1, 4))
    assert hi1 - lo1 > 0.04 and abs((hi4 - lo4) / (hi1 - lo1) - 1) < 0.15
    with pytest.raises(SystemExit, match="share no test question"):
        boot_ci([{"a": 0.1}, {"b": 0.2}], np.random.default_rng(0))
    os.remove(tmp_path / "omp1_s1" / "eval" / "rl_sampled" / "results.json")
    assert read_run(str(tmp_path / "omp1_s1")) is None


def test_demo_seeds_variants(monkeypatch):
    """The variants: thread counts x SFT/RL micro-batch sizes (the demo's own 4/8 keeps the plain name, so runs made
    before the option still count), each carried to demo.sh as --sft_args / --rl_args; a bad pair is named."""
    import demo_seeds
    monkeypatch.setattr(demo_seeds, "threads", "1,2")
    monkeypatch.setattr(demo_seeds, "micro_batches", "4/8,2/4")
    vs = demo_seeds.variants()
    assert [n for n, _, _ in vs] == ["omp1", "omp1_mb2-4", "omp2", "omp2_mb2-4"]
    assert vs[1][2] == ["--sft_args=--micro_batch=2", "--rl_args=--micro_batch=4"] and vs[0][2] == []
    assert vs[2][1]["OMP_NUM_THREADS"] == "2" and vs[2][1]["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setattr(demo_seeds, "micro_batches", "")
    assert [n for n, _, a in demo_seeds.variants()] == ["omp1", "omp2"]
    monkeypatch.setattr(demo_seeds, "micro_batches", "4/8,2")
    with pytest.raises(SystemExit, match="--micro_batches=4/8,2: expected SFT/RL pairs"):
        demo_seeds.variants()


def test_cot_check_reads_both_synthetic_formats():
    from cot_check import listed
    assert listed("<think>Squares in order: yellow, green, blue, red. The first one is yellow.") == \
        ["yellow", "green", "blue", "red"]
    assert listed("Squares in order: first yellow, then green, then blue, last red. The last one is red.") == \
        ["yellow", "green", "blue", "red"]
    assert listed("Squares in order: red top-left, green bottom-right.") == ["red top-left", "green bottom-right"]
    assert listed("<think>Boxes: red top-left.</think>") is None


def test_plot_baseline_tables_pair_steps_and_tag_the_reader(tmp_path, monkeypatch):
    """bench/plot_baseline.py: the speed-up bracket is the range of baseline step k / arm step k (the same prompts and
    tokens), absent for results without step times; a run with a non-default reader is its own series."""
    import json
    import plot_baseline

    def arm(steps, cpu):
        s = dict(step_time=sum(steps) / len(steps), cpu_s=cpu, decode_s_step=1.0, decode_cpu_s_step=1.0,
                 process_s_step=0.1, t_vision_collect=0.0, t_rollout=0.1, t_actor_prep=0.0, t_old=0.1, t_ref=0.1,
                 t_train=0.1, decodes_step=1, processor_runs_step=1, vision_passes=1, rollout_prefills=1, peak_gb=1.0,
                 timed_steps=len(steps), step_min=min(steps), step_max=max(steps), step_times=steps)
        return s

    row = dict(frames=8, nproc=1, same_tokens=True,
               arms={"baseline": arm([10.0, 12.0], 20.0), "stage1": arm([2.0, 4.0], 5.0)})
    old = json.loads(json.dumps(row))
    for k in ("step_times", "step_min", "step_max", "timed_steps"):
        old["arms"]["stage1"].pop(k)
    out = plot_baseline.tables([dict(row, video="v pyav-seq"), dict(old, video="v")]).splitlines()
    new_line = next(x for x in out if x.startswith("| v pyav-seq | 1 | 8 | stage1 |"))
    assert "| 3.67 / 4.00 [3.00-5.00] |" in new_line and new_line.endswith("| 2: 2.00-4.00 |")   # 10/2=5, 12/4=3
    old_line = next(x for x in out if x.startswith("| v | 1 | 8 | stage1 |"))
    assert "| 3.67 / 4.00 |" in old_line and old_line.endswith("| - |")
    assert "[" not in next(x for x in out if x.startswith("| v pyav-seq | 1 | 8 | baseline |"))
    for name, backend, size, new, seed in (("a", "pyav-seq", 56, 32, 0), ("b", "", 56, 32, 0),
                                           ("c", "pyav-seq", 168, 32, 0), ("d", "pyav-seq", 112, 1024, 0),
                                           ("e", "pyav-seq", 112, 1024, 1)):
        cfg = dict(decode_backend=backend, frame_size=size, max_new_tokens=new, seed=seed)
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(config=cfg, rows=[row], video="/x/real_180s_360p.mp4")))
    monkeypatch.setattr(plot_baseline, "inputs", ",".join(str(tmp_path / f"{n}.json") for n in "abcde"))
    # load(): the reader, a model frame size other than the default 56, a budget other than 32 and a seed other
    # than 0 join the series' name
    assert [r["video"] for r in plot_baseline.load()] == ["real_180s_360p pyav-seq", "real_180s_360p",
                                                          "real_180s_360p pyav-seq seen at 168px",
                                                          "real_180s_360p pyav-seq seen at 112px, 1024 new tokens",
                                                          "real_180s_360p pyav-seq seen at 112px, 1024 new tokens, "
                                                          "seed 1"]


def test_bench_baseline_frame_size_reaches_the_model(tiny_ckpt, tmp_path, monkeypatch):
    """--frame_size sets every record's resized_height/width, and allow_frame_size lifts the bench model's processor
    cap (the tiny model's is 56x56), so the vision tower really gets frame_size x frame_size frames, not 56x56."""
    import json
    import shutil
    import warnings
    import bench_baseline as bb
    from transformers import AutoProcessor
    from data import processed_frame_size
    video = tmp_path / "real.mp4"
    video.write_bytes(b"not decoded here")
    monkeypatch.setattr(bb, "frame_size", 168)
    rows = [json.loads(x) for x in open(bb.make_data(str(tmp_path / "data"), str(video), 3))]
    assert [(r["resized_height"], r["resized_width"]) for r in rows] == [(168, 168)] * 3
    assert len({r["video"] for r in rows}) == 3                  # a distinct name (cache key) per record
    model_dir = str(tmp_path / "model")
    shutil.copytree(tiny_ckpt, model_dir)
    size = dict(resized_height=168, resized_width=168)
    with pytest.warns(UserWarning, match="168x168 .* reach the model at 56x56"):   # re-sized, and said so
        assert processed_frame_size(AutoProcessor.from_pretrained(model_dir), 360, 640, 64, **size) == (56, 56)
    bb.allow_frame_size(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # the lifted cap keeps the size: no warning
        assert processed_frame_size(AutoProcessor.from_pretrained(model_dir), 360, 640, 64, **size) == (168, 168)


def test_bench_baseline_picks_the_fastest_arm_that_fits_the_budget(monkeypatch):
    """bench_baseline --mem_budget_gb: per stage, the fastest of the plain and -ckpt arms whose measured peak fits;
    OOM (with the peaks) when neither does. The -ckpt arms add activation checkpointing, stage1+2 spans nproc."""
    import bench_baseline as bb
    monkeypatch.setattr(bb, "nproc", 4)
    assert bb.arm_flags("stage1+2-ckpt") == ["--loop=mrsp", "--sp=4", "--activation_checkpointing=1"]
    assert bb.arm_flags("stage1+2") == ["--loop=mrsp", "--sp=4"]
    assert "--activation_checkpointing=1" in bb.arm_flags("stage1-ckpt") and "--sp=1" in bb.arm_flags("stage1-ckpt")

    def arm(t, peak, budget):
        return dict(step_time=t, peak_gb=peak, over_budget=peak > budget)

    budget = 2.0
    sums = {"stage1": arm(10.0, 2.5, budget), "stage1-ckpt": arm(13.0, 1.9, budget),
            "stage1+2": arm(11.0, 1.8, budget), "stage1+2-ckpt": arm(14.0, 1.5, budget)}
    assert bb.fit_at_budget(sums, "stage1").startswith("stage1-ckpt 13.00 s/step")      # the plain arm is over
    assert bb.fit_at_budget(sums, "stage1+2").startswith("stage1+2 11.00 s/step")       # both fit: the faster
    sums["stage1-ckpt"] = arm(13.0, 2.2, budget)
    assert bb.fit_at_budget(sums, "stage1") == "OOM at budget (peaks {'stage1': 2.5, 'stage1-ckpt': 2.2})"
