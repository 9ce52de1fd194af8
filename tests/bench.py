"""make bench: speed ratios measured side by side in one run (this machine is noisy: only compare
numbers printed by the same run).

1. Dynamic padding vs padding text to 500 tokens (the original code): samples per second of a full
   training step (forward, backward, Adam), same model, same batches; tiny and full-size model.
2. The whole training step with PCGrad and GradNorm against the equal-weight step, for
   --grad-space params and representation (small model).
3. Aggregation alone (T = 5): naive pairwise PCGrad loop vs torch.mm Gram + combine vs the csrc kernel
   (tests/bench_gradagg.py).

    python tests/bench.py                    # everything (several minutes on 2 cores)
    python tests/bench.py --skip-full        # without the full-size model
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from common.data import collate  # noqa: E402
from common.model import MODEL_SIZES, HCAModel  # noqa: E402
from common.multitask import MultiTaskUpdate  # noqa: E402
from common.train import DEFAULT_DATA, Run, build_parser, ensure_data, epoch_batches, losses_from_logits  # noqa: E402


def timed(fn, repeats):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def padding_bench(dataset, size, batch_size, n_batches):
    torch.manual_seed(0)
    model = HCAModel(MODEL_SIZES[size])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    plan = epoch_batches(len(dataset), batch_size, seed=0, epoch=0)[:n_batches]
    items = [[dataset[i] for i in b] for b in plan]
    rows = []
    for label, pad in (("dynamic (longest in batch)", None), ("fixed 500 tokens (original)", 500)):
        batches = [collate(b, pad_text_to=pad) for b in items]

        def train_steps():
            for batch in batches:
                loss = losses_from_logits(model(batch), batch["labels"]).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        seconds = timed(train_steps, 1)
        tokens = sum(b["text_ids"].shape[1] for b in batches) / len(batches)
        rows.append([label, f"{tokens:.0f}", n_batches * batch_size / seconds])
    ratio = rows[0][2] / rows[1][2]
    return rows, ratio


def step_bench(data, repeats):
    """Seconds per training step of each aggregation, in one process, same batch."""
    configs = [("equal weights (sum)", "equal", "sum", "representation"),
               ("gradnorm, params (last shared layer)", "gradnorm", "sum", "params"),
               ("gradnorm, representation", "gradnorm", "sum", "representation"),
               ("pcgrad, params", "equal", "pcgrad", "params"),
               ("pcgrad, representation", "equal", "pcgrad", "representation")]
    rows = []
    base = None
    for label, weighting, aggregator, space in configs:
        args = build_parser().parse_args(["--data", str(data), "--model-size", "small", "--out", "/tmp/bench_runs",
                                          "--quiet"])
        run = Run(args, strategy="bench")
        update = MultiTaskUpdate(run, weighting, aggregator, space, args)
        plan = epoch_batches(len(run.train_set), args.batch_size, seed=0, epoch=0)[:repeats]
        batches = list(run.loader(plan, run.train_set))
        it = iter(batches * 3)
        seconds = timed(lambda: update.step(next(it)), repeats)
        base = base or seconds
        rows.append([label, seconds * 1000, seconds / base])
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-full", action="store_true", help="skip the full-size model (slow on CPU)")
    p.add_argument("--gradagg-sizes", default="1e6,1e7,1.1e8")
    args = p.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    data = ensure_data(DEFAULT_DATA)
    from common.data import H5Dataset
    train = H5Dataset(data / "train.h5")

    print("== 1. dynamic padding vs padding to 500 tokens: training samples / second ==")
    for size, bs, nb in (("tiny", 16, 8), ("small", 16, 4)) + (() if args.skip_full else (("full", 4, 2),)):
        rows, ratio = padding_bench(train, size, bs, nb)
        print(f"\nmodel {size}, batch {bs}, {nb} batches")
        print(tabulate(rows, headers=["padding", "mean text length", "samples/s"], floatfmt=".2f"))
        print(f"speed-up of dynamic padding: {ratio:.2f}x")

    print("\n== 2. whole training step (small model, batch 16): ms per step, ratio to the equal-weight step ==")
    print(tabulate(step_bench(data, repeats=6), headers=["update", "ms/step", "ratio"], floatfmt=".2f"))

    print("\n== 3. aggregation alone (T = 5) ==", flush=True)
    subprocess.run([sys.executable, str(REPO / "tests" / "bench_gradagg.py"), "--sizes", args.gradagg_sizes], check=True)


if __name__ == "__main__":
    main()
