"""What the larger synthetic test split buys (issue 25), measured on committed records of the standard grid.

The standard protocol tests on 3200 synthetic clips, four times the real split's 800. For each row given
(default: every row with 2+ seeds paired with all_at_once), it prints
- the seed SD of the paired difference of mean test AP (row minus all_at_once, one value per seed) on all
  3200 clips, and on random 800-clip subsets (the old size; mean over 20 subsets);
- the test-clip bootstrap SD of the seed-mean difference (the test-set noise that the verdict's
  hierarchical bootstrap adds), on 3200 clips and on 800-clip subsets.
No training: the records' test scores (ranks, common/records.py) and the test labels are all it reads.

    python tests/bench/split_size.py [--runs results/runs/standard] [--data data_prep/synthetic] [row ...]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import compare, stats  # noqa: E402
from common.data import TASKS, H5Dataset  # noqa: E402


def paired_diffs(a, b, labels, clips):
    """[S] mean-AP differences over the tasks, one per seed, on the given clips."""
    ones = np.ones(len(clips))
    return np.array([np.nanmean([stats.weighted_average_precision(x[clips, t], labels[clips, t], ones)
                                 - stats.weighted_average_precision(y[clips, t], labels[clips, t], ones)
                                 for t in range(labels.shape[1])]) for x, y in zip(a, b)])


def bootstrap_sd(a, b, labels, clips, rng, n_boot=300):
    """SD over test-clip resamples of the seed-mean difference of mean AP."""
    w = stats.clip_weights(len(clips), n_boot, rng)
    d = [np.nanmean(stats.bootstrap_task_ap(x[clips], labels[clips], w)
                    - stats.bootstrap_task_ap(y[clips], labels[clips], w), axis=0) for x, y in zip(a, b)]
    return float(np.std(np.mean(d, axis=0)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="results/runs/standard")
    parser.add_argument("--data", default="data_prep/synthetic")
    parser.add_argument("rows", nargs="*")
    args = parser.parse_args(argv)
    root = Path(args.runs)
    labels = H5Dataset(Path(args.data) / "test.h5").labels
    rng = np.random.default_rng(0)
    subsets = [rng.permutation(len(labels))[:800] for _ in range(20)]
    everything = np.arange(len(labels))

    def scores(row, seed):
        path = root / row / f"seed{seed}" / "summary.json"
        return compare.test_scores({**json.loads(path.read_text()), "_path": str(path)}, TASKS) if path.exists() else None

    rows = args.rows or sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ("tune", "logs", "all_at_once"))
    print(f"test positives per task ({', '.join(TASKS)}): 3200 clips {labels.sum(0).astype(int).tolist()}, "
          f"an 800-clip subset {labels[subsets[0]].sum(0).astype(int).tolist()}")
    for row in rows:
        pairs = [(scores(row, s), scores("all_at_once", s)) for s in range(100)]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if len(pairs) < 2:
            continue
        a, b = zip(*pairs)
        full = np.std(paired_diffs(a, b, labels, everything), ddof=1)
        small = np.mean([np.std(paired_diffs(a, b, labels, ix), ddof=1) for ix in subsets])
        print(f"{row} ({len(pairs)} seeds): seed SD of the paired difference {full:.4f} on 3200 clips, {small:.4f} on "
              f"800; test-clip bootstrap SD of the seed-mean difference {bootstrap_sd(a, b, labels, everything, rng):.4f} "
              f"on 3200, {np.mean([bootstrap_sd(a, b, labels, ix, rng) for ix in subsets[:5]]):.4f} on 800")


if __name__ == "__main__":
    main()
