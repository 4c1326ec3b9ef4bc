"""Session fixtures shared by the test files: a small synthetic set and the tiny checkpoint built on it."""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from prepare import generate_synthetic
    out = tmp_path_factory.mktemp("synth")
    # 16-sample blocks balance categories and letters exactly; 256-frame videos are the real default
    generate_synthetic(str(out), n_train=32, n_val=16, n_test=16, num_frames=256, fps=8.0, size=112,
                       seed=0, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def tiny_ckpt(synth_dir, tmp_path_factory):
    from prepare import init_tiny
    out = str(tmp_path_factory.mktemp("tiny"))
    init_tiny(out, synth_dir, seed=0)
    return out
