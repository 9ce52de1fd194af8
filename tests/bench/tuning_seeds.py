"""How many tuning seeds the choice needs (issue 25), measured on the committed tuning records.

For each tuned row of the standard grid it reads the validation selection score (mean AP) of every
configuration on each tuning seed, and prints
- how often one tuning seed alone would have chosen what both together chose;
- the seed-to-seed SD of a configuration's validation score (from the two seeds: |a - b| / sqrt 2; median
  over configurations) against the gap between the best and the second-best configuration (mean of the
  seeds), i.e. whether the choice is larger than the noise of one seed.
No training: it reads summary.json of the tuning runs only (their validation metrics; never the test).

    python tests/bench/tuning_seeds.py [--runs results/runs/standard]
"""
import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np


def tuning_scores(root):
    """{row: {config: {seed: mean validation AP}}} from the index's finished tuning runs."""
    index = json.loads((root / "index.json").read_text())
    scores = defaultdict(lambda: defaultdict(dict))
    for key, entry in index.items():
        m = re.fullmatch(r"tune: (.+) seed(\d+)", key)
        if not m or entry.get("status") != "ok" or not (root / entry["summary"]).exists():
            continue
        row_config, seed = m.group(1), int(m.group(2))
        rows = [r for r in index.get("chosen", {}) if row_config.startswith(r + " ")]
        if not rows:
            continue
        row = max(rows, key=len)  # "pcgrad --grad-space representation" before "pcgrad"
        summary = json.loads((root / entry["summary"]).read_text())
        scores[row][row_config[len(row) + 1:]][seed] = summary["val"]["mean"]["ap"]
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="results/runs/standard")
    args = parser.parse_args(argv)
    scores = tuning_scores(Path(args.runs))
    agree, rows, sds, gaps, losses = defaultdict(int), 0, [], [], []
    for row, configs in sorted(scores.items()):
        seeds = sorted(set.intersection(*(set(v) for v in configs.values())))
        if len(seeds) < 2 or len(configs) < 2:
            continue
        rows += 1
        mean = {c: np.mean([v[s] for s in seeds]) for c, v in configs.items()}
        both = max(mean, key=mean.get)
        for s in seeds:
            alone = max(configs, key=lambda c: configs[c][s])
            agree[s] += alone == both
            if alone != both:
                losses.append(mean[both] - mean[alone])
        sds += [abs(v[seeds[0]] - v[seeds[1]]) / np.sqrt(2) for v in configs.values()]
        ranked = sorted(mean.values(), reverse=True)
        gaps.append(ranked[0] - ranked[1])
    print(f"{rows} tuned rows with 2+ configurations on 2 tuning seeds")
    for s, n in sorted(agree.items()):
        print(f"  tuning seed {s} alone chooses what both choose: {n} of {rows} rows ({n / max(rows, 1):.0%})")
    if losses:
        print(f"  where one seed chose otherwise, its choice scores {np.mean(losses):.4f} mean AP below the 2-seed choice "
              f"(mean of 2 seeds; max {max(losses):.4f}; {len(losses)} cases)")
    print(f"  seed-to-seed SD of a configuration's validation mean AP: median {np.median(sds):.4f} "
          f"(quartiles {np.quantile(sds, 0.25):.4f}, {np.quantile(sds, 0.75):.4f}; {len(sds)} configurations)")
    print(f"  gap between the best and the second-best configuration (mean of 2 seeds): median {np.median(gaps):.4f}; "
          f"rows with a gap below one seed SD: {sum(g < np.median(sds) for g in gaps)} of {rows}")


if __name__ == "__main__":
    main()
