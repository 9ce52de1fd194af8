"""Which conclusions of one comparison survive in another (issue 25: the quick profile against the standard).

For each row in both compare.csv files: its mean test AP minus the baseline's (all_at_once), paired by seed
and averaged, in each table; "kept" when both differences have the same sign, "flipped" when not; and the
row's rank by mean test AP in each table (1 = best, among the rows both tables have).

    python tests/bench/flips.py results/compare_quick.csv results/compare.csv
"""
import argparse
import csv
from collections import defaultdict

import numpy as np
from tabulate import tabulate

BASELINE = "all_at_once"


def mean_ap_by_seed(path):
    """{strategy: {seed: mean test AP}} of a compare.csv (finished runs only)."""
    out = defaultdict(dict)
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["status"] == "ok" and row.get("mean_ap") not in (None, ""):
                out[row["strategy"]][row["seed"]] = float(row["mean_ap"])
    return out


def paired_difference(by_seed, strategy):
    base = by_seed.get(BASELINE, {})
    seeds = [s for s in by_seed[strategy] if s in base]
    return float(np.mean([by_seed[strategy][s] - base[s] for s in seeds])) if seeds else float("nan"), len(seeds)


def ranks(by_seed, names):
    means = {n: np.mean(list(by_seed[n].values())) for n in names}
    return {n: i + 1 for i, n in enumerate(sorted(names, key=lambda n: -means[n]))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    args = parser.parse_args(argv)
    before, after = mean_ap_by_seed(args.before), mean_ap_by_seed(args.after)
    common = sorted(set(before) & set(after))
    rank_before, rank_after = ranks(before, common), ranks(after, common)
    rows, flipped = [], 0
    for name in sorted(common, key=lambda n: rank_after[n]):
        if name == BASELINE:
            rows.append([name, "-", "-", "baseline", rank_before[name], rank_after[name]])
            continue
        (d0, n0), (d1, n1) = paired_difference(before, name), paired_difference(after, name)
        verdict = "kept" if np.sign(d0) == np.sign(d1) else "flipped"
        flipped += verdict == "flipped"
        rows.append([name, f"{d0:+.3f} ({n0})", f"{d1:+.3f} ({n1})", verdict, rank_before[name], rank_after[name]])
    print(tabulate(rows, headers=["strategy", f"Δ mean AP, {args.before} (seeds)", f"Δ mean AP, {args.after} (seeds)",
                                  "sign", "rank before", "rank after"], tablefmt="github"))
    print(f"\n{flipped} of {len(common) - 1} rows changed the sign of their difference from {BASELINE}")


if __name__ == "__main__":
    main()
