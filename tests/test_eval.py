"""eval.py: answer extraction, accuracy arithmetic and reports on hand-made rows, the CLI end to end (frame sweep,
torchrun DP = 1 rank, --compare), Video-MME durations, and bad records / videos with and without --skip_bad.
The tiny checkpoint is random-init: accuracies are arbitrary, so the end-to-end tests check files and consistency.
They sample (--temperature=1, seeded per item) so that predictions differ between items and some parse."""
import json
import os
import re
import subprocess
import sys

import pytest

import eval as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
OPTS = ["A. Candles", "B. A red ball", "C. Blue square", "D. None of these"]


def _eval(*args, nproc=1, check=True):
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    r = subprocess.run(cmd + ["eval.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _table(text):
    """A printed table -> {row label: [cells]} (columns are separated by 2+ spaces)."""
    return {c[0]: c[1:] for c in (re.split(r"\s{2,}", line.strip()) for line in text.splitlines())}


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


# -----------------------------------------------------------------------------
# extraction: the public eval.extract_choice (reward.extract_choice; its full table lives in test_data.py)
@pytest.mark.parametrize("text, want", [
    ("Based on the video, the answer is C.", "C"),          # lmms-eval's Video-MME regex says "B"
    ("A person walks in. The answer: (B)", "B"),            # ... and "A" here
    ("A person walks into the room.", None),                 # a capital starting a word is no answer
    ("<think>Before the ball moves, A is ruled out.</think><answer>D</answer>", "D"),
    ("<answer>(b)</answer>", "B"),
    ("C) Blue square", "C"),
    ("Answer: c.", "C"),
    ("I think it is candles", "A"),                          # the option's text
    ("The answer is E.", None),                              # not one of the 4 options
    ("", None),
])
def test_extract_choice_tricky_outputs(text, want):
    assert ev.extract_choice(text, 4, OPTS) == want


# -----------------------------------------------------------------------------
# arithmetic and reports on hand-made rows
def _row(rid, cat, extracted, answer="A", **kw):
    return dict(id=rid, category=cat, answer=answer, prediction="...", extracted=extracted,
                correct=extracted == answer, **kw)


def test_summarize_arithmetic_table_and_compare():
    rows = [_row("t1", "temporal", "A", duration="short", domain="Sports"),
            _row("t2", "temporal", "B", duration="long", domain="Sports"),
            _row("g1", "goal", None, duration="short", domain="News"),    # unparsed: scored, wrong
            _row("p1", "plot", "A", duration="medium", domain="News"),
            dict(id="x1", bad="videos/x1.mp4: no such video file")]        # skipped: outside the denominator
    res = ev.summarize(rows, frames=16, model="m")
    assert (res["n"], res["correct"], res["n_bad"], res["parse_failures"]) == (4, 2, 1, 1)
    assert res["overall"] == 0.5 and res["overall_incl_bad"] == 0.4 and res["parse_fail_rate"] == 0.25
    assert list(res["by_category"]) == ["temporal", "goal", "plot"]           # canonical order, absent ones left out
    assert res["by_category"]["temporal"] == dict(n=2, correct=1, acc=0.5)
    assert res["by_category"]["plot"]["acc"] == 1.0 and res["by_category"]["goal"]["acc"] == 0.0
    assert list(res["by_duration"]) == ["short", "medium", "long"]
    assert res["by_duration"]["short"] == dict(n=2, correct=1, acc=0.5)
    assert sum(g["n"] for g in res["by_domain"].values()) == 4
    assert res["bad"] == [dict(id="x1", reason="videos/x1.mp4: no such video file")] and res["frames"] == 16
    # synthetic records carry a duration in seconds: no per-duration table for them
    assert "by_duration" not in ev.summarize([_row("a", "goal", "A", duration=32.0)])
    assert ev.summarize([dict(id="x", bad="why")])["overall"] is None

    table = ev.format_table([res, ev.summarize(rows[:2], frames=32)])
    lines = _table(table)
    assert lines["accuracy (%)"][-2:] == ["F=16", "F=32"]
    assert lines["overall"][-2:] == ["50.0", "50.0"] and lines["duration short"][-2:] == ["50.0", "100.0"]
    assert lines["goal"][-2:] == ["0.0", "-"]
    assert lines["overall, bad as wrong"][-2:] == ["40.0", "50.0"] and "not in the denominator" in table

    better = ev.summarize([_row("t1", "temporal", "A"), _row("t2", "temporal", "A"), _row("g1", "goal", "A"),
                           _row("p1", "plot", "B")], frames=16)
    cmp = _table(ev.compare(res, better))
    assert cmp["overall"][-3:] == ["50.0", "75.0", "+25.0"]
    assert cmp["temporal"][-1] == "+50.0" and cmp["plot"][-1] == "-100.0" and cmp["duration short"][-1] == "-"
    assert cmp["unparsed (%)"][-1] == "-25.0"


def test_stages_table_and_reward_curve(tmp_path):
    """The demo's last table (one column per stage, last-minus-first deltas) and the reward-curve PNG."""
    base = ev.summarize([_row("t1", "temporal", "B"), _row("g1", "goal", None), _row("p1", "plot", "A"),
                         _row("s1", "spatial", "C")])
    sft = ev.summarize([_row("t1", "temporal", "A"), _row("g1", "goal", "B"), _row("p1", "plot", "A"),
                        _row("s1", "spatial", "A")])
    t = _table(ev.stages_table([("before SFT", base), ("after SFT", sft)]))
    assert t["overall"] == ["25.0", "75.0", "+50.0"] and t["temporal"] == ["0.0", "100.0", "+100.0"]
    assert t["goal"] == ["0.0", "0.0", "+0.0"] and t["scored items (n)"] == ["4", "4", "-"]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(dict(step=i + 1, reward_mean=0.1 * i, **({"val_acc": 0.5} if i == 2 else {})))
                               + "\n" for i in range(6)))
    png = ev.plot_reward_curve(str(metrics), str(tmp_path / "curve.png"))
    if png is not None:   # matplotlib is optional
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_stages_table_intervals_and_verdicts():
    """With per-question scores every cell carries a bootstrap interval, the change is paired, and the verdicts say
    plainly when a stage is at chance or does not beat the one before it."""
    ids = [f"q{i}" for i in range(40)]
    base = {k: ("plot", 0.0) for k in ids}
    sft = {k: ("plot", float(i % 4 == 0)) for i, k in enumerate(ids)}             # 25%: chance
    rl = {k: ("plot", 1.0 if i % 4 == 0 or i < 20 else 0.0) for i, k in enumerate(ids)}   # 62.5%
    res = ev.summarize([_row(k, "plot", "A", n_options=4) for k in ids])
    assert res["n_options"] == 4
    t = _table(ev.stages_table([("before", res), ("sft", res), ("rl", res)], [base, sft, rl]))
    assert t["overall"][0] == "0.0 [0.0, 0.0]" and t["overall"][-1].startswith("+62.5 [")
    lo, hi = ev.bootstrap_ci([1.0] * 10 + [0.0] * 30)
    assert lo < 0.25 < hi
    v = ev.stage_verdicts([("before", res), ("sft", res), ("rl", res)], [base, sft, rl], chance=0.25)
    assert any(x.startswith("AT CHANCE: sft") for x in v) and not any(x.startswith("AT CHANCE: rl") for x in v)
    assert any(x.startswith("ok: rl vs sft") for x in v)
    v = ev.stage_verdicts([("sft", res), ("rl", res)], [rl, rl], chance=0.25)
    assert any(x.startswith("NO CLEAR GAIN: rl vs sft") for x in v)


# -----------------------------------------------------------------------------
# end to end through the CLI
@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_ckpt, synth_dir):
    out = str(tmp_path_factory.mktemp("eval") / "sweep")
    r = _eval(f"--model={tiny_ckpt}", f"--data={synth_dir}/test.jsonl", "--frames=32,16", "--max_new_tokens=16",
              "--temperature=1.0", f"--out_dir={out}")
    return out, r.stdout


def test_sweep_writes_consistent_outputs(sweep, synth_dir):
    out, stdout = sweep
    n_records = len(_jsonl(f"{synth_dir}/test.jsonl"))
    top = json.load(open(f"{out}/results.json"))
    assert [r["frames"] for r in top["sweep"]] == [16, 32]
    for res in top["sweep"]:
        F = res["frames"]
        items = _jsonl(f"{out}/frames_{F}/items.jsonl")
        assert json.load(open(f"{out}/frames_{F}/results.json")) == res
        assert len(items) == res["n"] == n_records and res["n_bad"] == 0
        assert {r["frames"] for r in items} == {F}
        assert {"id", "category", "prediction", "extracted", "correct"} <= set(items[0])
        assert res["correct"] == sum(r["correct"] for r in items)
        assert res["overall"] == pytest.approx(sum(r["correct"] for r in items) / len(items))
        assert res["parse_failures"] == sum(r["extracted"] is None for r in items)
        assert all(r["correct"] == (r["extracted"] == r["answer"]) for r in items)
        assert sum(g["n"] for g in res["by_category"].values()) == res["n"]
        assert set(res["by_category"]) == {"temporal", "goal", "spatial", "plot"}
        assert {"model", "data", "date", "temperature", "max_new_tokens"} <= set(res)
    assert len({r["prediction"] for r in items}) > 1                    # sampling: items really differ
    # the printed table: one column per frame count
    assert "F=16" in stdout and "F=32" in stdout and "temporal" in stdout
    try:
        import matplotlib  # noqa: F401 - optional dependency
        assert os.path.getsize(f"{out}/sweep.png") > 1000
    except ImportError:
        assert "pip install matplotlib" in stdout


def test_two_ranks_equal_one_rank(sweep, tmp_path, tiny_ckpt, synth_dir):
    out1, _ = sweep
    out2 = str(tmp_path / "dp2")
    _eval(f"--model={tiny_ckpt}", f"--data={synth_dir}/test.jsonl", "--frames=16", "--max_new_tokens=16",
          "--temperature=1.0", f"--out_dir={out2}", nproc=2)
    one, two = _jsonl(f"{out1}/frames_16/items.jsonl"), _jsonl(f"{out2}/frames_16/items.jsonl")
    assert two == one                                                   # item by item, in record order
    res = json.load(open(f"{out2}/results.json"))                        # one frame count: the result itself
    assert res["world"] == 2 and res["frames"] == 16 and res["n"] == len(one)


def test_compare_cli(sweep):
    out, _ = sweep
    r = _eval("--compare", f"{out}/frames_16/results.json", f"{out}/frames_32/results.json")
    rows = _table(r.stdout)
    a, b = (json.load(open(f"{out}/frames_{F}/results.json")) for F in (16, 32))
    assert rows["overall"][-1] == f"{100 * (b['overall'] - a['overall']):+.1f}"
    assert {"temporal", "goal", "spatial", "plot"} <= set(rows)
    text = ev.compare_files(out, out)                                   # two sweeps: matched by frame count
    assert text.count("frames 16 vs 16") == 1 and text.count("frames 32 vs 32") == 1
    assert _table(text)["overall"][-1] == "+0.0"


def test_videomme_per_duration(tmp_path, tiny_ckpt, synth_dir):
    from mrsp import EmbeddingCache, load_model
    durations = ["short", "short", "medium", "medium", "long", "long"]
    rows = [dict(video_id=f"{i // 2:03d}", videoID=f"test_{i // 2:05d}", duration=d, domain="Knowledge",
                 sub_category="Humanity", task_type="Temporal Reasoning", question_id=f"{i // 2:03d}-{i % 2 + 1}",
                 question="Which colour appeared first?", options=["A. red", "B. green", "C. blue", "D. white"],
                 answer="ABCD"[i % 4]) for i, d in enumerate(durations)]     # Video-MME: questions share videos
    path = tmp_path / "videomme.json"
    path.write_text(json.dumps(rows))
    recs, bad = ev.read_records(str(path), os.path.join(synth_dir, "videos"))
    assert bad == [] and recs[0]["duration"] == "short"
    model, processor = load_model(tiny_ckpt)
    cache = EmbeddingCache(1 << 26)
    items = ev.evaluate(model, processor, recs, 16, max_new_tokens=8, cache=cache)
    res = ev.summarize(items, frames=16)
    assert {k: g["n"] for k, g in res["by_duration"].items()} == {"short": 2, "medium": 2, "long": 2}
    assert res["by_category"] == {"temporal": dict(n=6, correct=res["correct"], acc=res["overall"])}
    assert cache.stats["misses"] == 3                                   # one vision pass per video, not per question
    assert "duration long" in ev.format_table(res)
    # an unreadable video found mid-run: a clear error naming the record, or skipped with skip_bad
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    broken = [dict(recs[0], id="rec-empty", video=str(empty))] + recs[1:3]
    with pytest.raises(ev.RecordError, match=r"rec-empty.*empty file.*--skip_bad"):
        ev.evaluate(model, processor, broken, 16, max_new_tokens=4, cache=cache)
    res = ev.summarize(ev.evaluate(model, processor, broken, 16, max_new_tokens=4, cache=cache, skip_bad=True))
    assert res["n"] == 2 and res["n_bad"] == 1 and res["bad"][0]["id"] == "rec-empty"


def test_samples_avg_at_n(tiny_ckpt, synth_dir):
    """--samples=N: N sampled answers per item from one prefill, one row each (sample 0..N-1, record order kept);
    accuracy is the mean over all N x items answers; seeded (same rows again); greedy with N > 1 is refused."""
    from mrsp import EmbeddingCache, load_model
    recs, _ = ev.read_records(os.path.join(synth_dir, "test.jsonl"))
    recs = recs[:2]
    model, processor = load_model(tiny_ckpt)
    cache = EmbeddingCache(1 << 26)
    rows = ev.evaluate(model, processor, recs, 16, max_new_tokens=8, temperature=1.0, cache=cache, samples=3)
    assert [(r["id"], r["sample"]) for r in rows] == [(recs[i]["id"], j) for i in range(2) for j in range(3)]
    assert len({r["prediction"] for r in rows[:3]}) > 1                 # the samples of one item differ
    assert cache.stats["misses"] == 2                                   # one vision pass per item, not per sample
    again = ev.evaluate(model, processor, recs, 16, max_new_tokens=8, temperature=1.0, cache=cache, samples=3)
    assert [r["prediction"] for r in again] == [r["prediction"] for r in rows]
    res = ev.summarize(rows)
    assert res["n"] == 6 and res["overall"] == sum(r["correct"] for r in rows) / 6
    with pytest.raises(ValueError, match="samples=2 needs temperature > 0"):
        ev.evaluate(model, processor, recs, 16, max_new_tokens=4, cache=cache, samples=2)


def test_bad_records_stop_the_run_unless_skip_bad(tmp_path, tiny_ckpt, synth_dir):
    good = [json.loads(line) for line in open(f"{synth_dir}/test.jsonl")][:3]
    missing = dict(good[0], id="rec-missing", video="videos/nope.mp4")
    no_answer = {k: v for k, v in dict(good[1], id="rec-noanswer").items() if k != "answer"}
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    corrupt = dict(good[2], id="rec-empty", video=str(empty))
    # without --skip_bad: a missing video stops the run before any model work, naming the record and the file
    path = tmp_path / "missing.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + [missing]))
    r = _eval(f"--model={tiny_ckpt}", f"--data={path}", f"--video_root={synth_dir}", f"--out_dir={tmp_path}/o1",
              check=False)
    assert r.returncode != 0 and "rec-missing" in r.stderr and "nope.mp4" in r.stderr
    assert "Traceback" not in r.stderr and "--skip_bad" in r.stderr
    # a malformed record: the error names file:line and the field
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + [missing, no_answer, corrupt]) + "{not json\n")
    with pytest.raises(ev.RecordError, match=r"bad.jsonl:7: invalid JSON"):
        ev.read_records(str(path), synth_dir)
    (tmp_path / "noanswer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good + [no_answer]))
    with pytest.raises(ev.RecordError, match=r"noanswer.jsonl:4: missing field 'answer'"):
        ev.read_records(str(tmp_path / "noanswer.jsonl"), synth_dir)
    # --skip_bad: the good ones are scored; the bad ones listed, counted, and kept out of the denominator
    out = tmp_path / "o2"
    r = _eval(f"--model={tiny_ckpt}", f"--data={path}", f"--video_root={synth_dir}", f"--out_dir={out}",
              "--frames=16", "--max_new_tokens=8", "--skip_bad=1")
    res = json.load(open(out / "results.json"))
    assert res["n"] == 3 and res["n_bad"] == 4 and len(_jsonl(out / "frames_16" / "items.jsonl")) == 3
    why = {b["id"]: b["reason"] for b in res["bad"]}
    assert set(why) == {"rec-missing", "rec-noanswer", "rec-empty", f"{path}:7"}
    assert "nope.mp4" in why["rec-missing"] and "answer" in why["rec-noanswer"] and "empty" in why["rec-empty"]
    assert res["overall_incl_bad"] == pytest.approx(res["correct"] / 7)
    assert "bad items skipped" in r.stdout and "rec-missing" in r.stdout
