"""Compare two runs' records for tests/gpu_check.sh; exit 1 (and say where) when they differ beyond a tolerance.

    python tests/gpu_compare.py metrics A/metrics.jsonl B/metrics.jsonl --rtol 0    # identical numbers
    python tests/gpu_compare.py summary A/summary.json B/summary.json --rtol 1e-3  # CPU against GPU

Timing fields (seconds, it/s, wall-clock) are left out; every other number is compared, the largest relative
difference printed."""
import argparse
import json
import math
import sys

TIMING = ("seconds", "time", "wall", "it_s", "per_step", "per_epoch", "_path", "data")


def numbers(obj, prefix=""):
    """{dotted path: float} of every number in a JSON value, timing fields left out."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not any(t in str(k) for t in TIMING):
                out.update(numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(numbers(v, f"{prefix}[{i}]"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def load(kind, path):
    with open(path) as f:
        if kind == "summary":
            return numbers(json.load(f))
        rows = [json.loads(line) for line in f if line.strip()]
    return numbers([r for r in rows if r.get("event") != "start"])  # the start line holds paths and args


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("metrics", "summary"))
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rtol", type=float, default=0.0)
    p.add_argument("--atol", type=float, default=1e-12)
    args = p.parse_args(argv)
    a, b = load(args.kind, args.a), load(args.kind, args.b)
    if set(a) != set(b):
        print(f"different fields: only in A {sorted(set(a) - set(b))[:5]}, only in B {sorted(set(b) - set(a))[:5]}")
        return 1
    worst, where = 0.0, None
    for k in a:
        x, y = a[k], b[k]
        if math.isnan(x) and math.isnan(y):
            continue
        diff = abs(x - y) / max(abs(x), abs(y), args.atol)
        if not diff <= worst:  # nan differences count as the worst
            worst, where = diff if not math.isnan(diff) else math.inf, k
    ok = worst <= args.rtol
    print(f"{len(a)} numbers compared; largest relative difference {worst:.3g} at {where} "
          f"({'within' if ok else 'BEYOND'} rtol {args.rtol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
