"""make bench, trunks section: samples per second of a training step (forward, backward, Adam) of each
--trunk at the small size, same batches from the default synthetic set, interleaved repeats in one process.

    python tests/bench/bench_trunks.py [--batches 4] [--repeats 3] [--batch-size 16]

tests/bench/bench.py calls trunk_bench(); alone this file prints the same table.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from common.data import H5Dataset, collate, feature_stats  # noqa: E402
from common.model import MODEL_SIZES  # noqa: E402
from common.trunks import TRUNK_NAMES, build_model  # noqa: E402
from common.data import DEFAULT_DATA, epoch_batches  # noqa: E402
from common.objectives import losses_from_logits  # noqa: E402
from common.train import adam  # noqa: E402
from data_prep.synthesize import ensure_data  # noqa: E402


def trunk_bench(data=DEFAULT_DATA, size="small", batch_size=16, n_batches=4, repeats=3, trunks=TRUNK_NAMES):
    """Rows [trunk, parameters, samples/s (median of repeats), relative to hca]. The repeats are interleaved
    (trunk A, B, ..., then A, B, ... again), so a slow phase of a shared machine hits every trunk."""
    data = ensure_data(data)
    dataset = H5Dataset(data / "train.h5", feature_stats(data / "train.h5"))
    plan = epoch_batches(len(dataset), batch_size, seed=0, epoch=0, lengths=dataset.text_lengths())[:n_batches]
    batches = [collate([dataset[i] for i in b]) for b in plan]
    models, optimizers = {}, {}
    for trunk in trunks:
        torch.manual_seed(0)
        models[trunk] = build_model(MODEL_SIZES[size], trunk).train()
        optimizers[trunk] = adam(models[trunk].parameters(), lr=1e-4)

    def steps(trunk):
        model, opt = models[trunk], optimizers[trunk]
        t0 = time.perf_counter()
        for batch in batches:
            loss = losses_from_logits(model(batch), batch["labels"]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    for trunk in trunks:  # warm-up
        steps(trunk)
    seconds = {t: [] for t in trunks}
    for _ in range(repeats):
        for trunk in trunks:
            seconds[trunk].append(steps(trunk))
    samples = sum(len(b["labels"]) for b in batches)
    rate = {t: samples / statistics.median(s) for t, s in seconds.items()}
    base = rate.get("hca")
    return [[t, f"{sum(p.numel() for p in models[t].parameters()):,}", f"{rate[t]:.1f}",
             f"{rate[t] / base:.2f}" if base else "-"] for t in trunks]


HEADERS = ["trunk", "parameters", "samples/s (train step)", "vs hca"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--size", default="small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    rows = trunk_bench(a.data, a.size, a.batch_size, a.batches, a.repeats)
    print(f"\nTrunks at the {a.size} size: training step, batch {a.batch_size}, {a.batches} batches, "
          f"median of {a.repeats} interleaved repeats, torch threads {torch.get_num_threads()}")
    print(tabulate(rows, headers=HEADERS))


if __name__ == "__main__":
    main()
