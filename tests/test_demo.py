"""demo.sh's command line (the README's main command): --key=value flags, clear errors before any stage starts, the
stage commands a real checkpoint/dataset run would launch (--dry_run=1); prepare.py never overwrites a foreign dataset.

    python -m pytest -q tests/test_demo.py
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo(*args, cwd=ROOT):
    return subprocess.run(["bash", os.path.join(ROOT, "demo.sh"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def real_dataset(tmp_path):
    ckpt, data = tmp_path / "ckpt", tmp_path / "lvr"
    ckpt.mkdir()
    data.mkdir()
    for split in ("train", "val", "test"):
        (data / f"{split}.jsonl").write_text("{}\n")
    return ckpt, data


def test_unknown_flag_and_stray_argument_are_refused():
    p = demo("--model_path=/x")
    assert p.returncode == 2 and "unknown flag --model_path" in p.stderr and "--model" in p.stderr
    p = demo("/ckpt/qwen")
    assert p.returncode == 2 and "expected --key=value" in p.stderr


def test_missing_checkpoint_or_split_is_a_clear_error(tmp_path):
    ckpt, data = real_dataset(tmp_path)
    p = demo(f"--model={tmp_path}/nope", f"--data={data}", f"--out={tmp_path}/out")
    assert p.returncode == 2 and f"--model={tmp_path}/nope: no such checkpoint directory" in p.stderr
    os.remove(data / "val.jsonl")
    p = demo(f"--model={ckpt}", f"--data={data}", f"--out={tmp_path}/out")
    assert p.returncode == 2 and f"{data}/val.jsonl not found" in p.stderr
    assert not (tmp_path / "out").exists()                       # nothing ran


def test_synthetic_demo_runs_micro_batches(tmp_path):
    """The tiny model's short sequences run 4 (SFT) / 8 (RL) to a forward; a real checkpoint's (above) one at a time."""
    p = demo("--dry_run=1", f"--out={tmp_path}/out", f"--data={tmp_path}/synth")
    assert p.returncode == 0, p.stderr
    cmds = [line[2:].split() for line in p.stdout.splitlines() if line.startswith("+ ")]
    assert "--micro_batch=4" in next(c for c in cmds if "sft.py" in c)
    assert "--micro_batch=8" in next(c for c in cmds if "rl.py" in c)
    # SFT imitates the teacher's traces (train_sft.jsonl); RL is rewarded by the answer key (train.jsonl)
    assert f"--data={tmp_path}/synth/train_sft.jsonl" in next(c for c in cmds if "sft.py" in c)
    assert f"--data={tmp_path}/synth/train.jsonl" in next(c for c in cmds if "rl.py" in c)


def test_flags_reach_the_stage_commands(tmp_path):
    ckpt, data = real_dataset(tmp_path)
    p = demo("--dry_run=1", f"--model={ckpt}", f"--data={data}", "--nproc=8", "--sp=4", "--frames=256",
             f"--out={tmp_path}/out", "--rl_args=--engine=vllm --lr=1e-6")
    assert p.returncode == 0, p.stderr
    cmds = [line[2:] for line in p.stdout.splitlines() if line.startswith("+ ")]
    rl = [c for c in cmds if " rl.py " in c]
    assert len(rl) == 1 and rl[0].startswith("torchrun --standalone --nproc_per_node=8 rl.py")
    for want in (f"--data={data}/train.jsonl", "--sp=4", "--frames=256", f"--out_dir={tmp_path}/out/rl"):
        assert want in rl[0].split(), (want, rl[0])
    assert rl[0].endswith("--engine=vllm --lr=1e-6")               # the user's args come last: they win
    assert f"--model={ckpt}" in [c for c in cmds if " sft.py " in c][0].split()
    assert f"--data={data}/train.jsonl" in [c for c in cmds if " sft.py " in c][0].split()   # no train_sft here
    assert not any("prepare.py" in c for c in cmds)                  # a real checkpoint: no synthetic stages
    sft = [c for c in cmds if " sft.py " in c][0].split()
    assert "--micro_batch=1" in sft and "--micro_batch=1" in rl[0].split()   # long videos one at a time
    assert sum(" eval.py " in c and f"--data={data}/test.jsonl" in c.split() for c in cmds) == 5   # before, SFT x2, RL x2
    assert not (tmp_path / "out").exists()


def test_data_cli_never_overwrites_a_foreign_dataset(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"id": "mine"}\n')
    p = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), f"--out={tmp_path}", "--n_train=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "refusing to overwrite a dataset it did not generate" in p.stderr
    assert (tmp_path / "train.jsonl").read_text() == '{"id": "mine"}\n' and not (tmp_path / "videos").exists()
