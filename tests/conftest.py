import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))



def pytest_configure(config):
    # `make test` runs everything; `python -m pytest tests -m "not slow"` leaves out the few-minute modules
    config.addinivalue_line("markers", "slow: a test module that takes minutes (torchrun launches, every "
                                       "strategy script, the Slurm launcher through submitit)")


# big enough for a few batches of 8 and a validation set with a positive of every task
TINY_SIZES = {"train": 64, "val": 24, "test": 24}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny synthetic dataset (default knobs, seed 0): <dir>/train.h5, val.h5, test.h5, and the
    source in <dir>/raw (train/val/test_features.json, features/*.npy, synth_config.json)."""
    from data_prep.build_h5 import build_all
    from data_prep.synthesize import synthesize

    root = tmp_path_factory.mktemp("tiny_data")
    synthesize(root / "raw", sizes=TINY_SIZES, seed=0, verbose=False)
    build_all(root / "raw", root / "raw" / "features", root, verbose=False)
    return root
