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


@pytest.fixture
def started_update(tiny_data, tmp_path):
    """started_update("--weighting", "famo") -> (run, update): a started Run of the tiny model on the tiny
    data (batch 8, one epoch) with its MultiTaskUpdate, for tests that drive update.step themselves."""
    def start(*flags, strategy="update_probe"):
        from common.arguments import build_parser
        from common.multitask import add_update_args, make_update
        from common.train import Run
        args = add_update_args(build_parser()).parse_args(
            ["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--batch-size", "8",
             "--epochs", "1", "--quiet", *flags])
        run = Run(args, strategy=strategy)
        update = make_update(run, args)
        run.start(update=update)
        return run, update
    return start
