"""make bench, GPU section (issues 16 and 17): runs only where torch.cuda.is_available().

1. Training step (forward, backward, clip, Adam) of the small and the full model, batch 16, default
   (length-bucketed) batches, fp32 and bf16 autocast side by side (interleaved repeats): samples/s.
2. Peak GPU memory (torch.cuda.max_memory_allocated) of one full-size step at batch 16: fp32, fp32 with
   --grad-checkpointing, bf16.
3. The csrc/ CUDA kernel's gram + combine (PCGrad aggregation, T = 5) at P = 1e7 and 1.1e8 as a fraction
   of the device's measured copy bandwidth, against torch.mm in fp32, errors against fp64
   (tests/bench/bench_gradagg.py --device cuda; it says when the kernel is not built: `make build`).

    python tests/bench/bench_gpu.py [--quick]      # or: python tests/bench/bench.py --only 9
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "bench"))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from common.data import H5Dataset, collate, feature_stats  # noqa: E402
from common.model import MODEL_SIZES  # noqa: E402
from common.trunks import build_model  # noqa: E402
from common.data import DEFAULT_DATA, device_batch, epoch_batches  # noqa: E402
from common.train import adam  # noqa: E402
from data_prep.synthesize import ensure_data  # noqa: E402
from bench import our_step  # noqa: E402

KERNEL_TARGET_PCT = 70  # issue 16: at least 70% of the copy bandwidth at P = 1.1e8


def gpu_batches(data, batch_size, count, device):
    """The first `count` default (length-bucketed) training batches, collated and on the device."""
    dataset = H5Dataset(data / "train.h5", feature_stats(data / "train.h5"))
    plan = epoch_batches(len(dataset), batch_size, seed=0, epoch=0, lengths=dataset.text_lengths())[:count]
    return [device_batch(collate([dataset[i] for i in b]), device) for b in plan]


def gpu_step(model, optimizer, batch, dtype=None):
    """bench.py's step (Run.step's work) on the device, synchronised so that the wall time of a call is the
    step's."""
    our_step(model, optimizer, batch, dtype, device_type="cuda")
    torch.cuda.synchronize()


def step_rates(data, device, repeats):
    rows = []
    for size in ("small", "full"):
        torch.manual_seed(0)
        model = build_model(MODEL_SIZES[size]).to(device)
        optimizer = adam(model.parameters(), lr=1e-5)
        batches = gpu_batches(data, 16, repeats + 1, device)
        fns = {"fp32": None, "bf16": torch.bfloat16}
        for dtype in fns.values():
            gpu_step(model, optimizer, batches[-1], dtype)  # warm-up (cuBLAS handles, autocast caches)
        times = {name: [] for name in fns}
        for r in range(repeats):  # interleaved, the order alternating
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                t0 = time.perf_counter()
                gpu_step(model, optimizer, batches[r], fns[name])
                times[name].append(time.perf_counter() - t0)
        fp32, bf16 = (16 / statistics.median(times[k]) for k in ("fp32", "bf16"))
        rows.append([size, f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M", fp32, bf16, bf16 / fp32])
        del model, optimizer, batches
        torch.cuda.empty_cache()
    print(f"training step, batch 16, median of {repeats} interleaved repeats")
    print(tabulate(rows, headers=["size", "parameters", "fp32 samples/s", "bf16 samples/s", "bf16 / fp32"],
                   floatfmt=".1f"))


def peak_memory(data, device):
    batch = gpu_batches(data, 16, 1, device)[0]
    rows = []
    for label, checkpointing, dtype in (("fp32", False, None), ("fp32, --grad-checkpointing", True, None),
                                        ("bf16", False, torch.bfloat16)):
        torch.manual_seed(0)
        model = build_model(MODEL_SIZES["full"], grad_checkpointing=checkpointing).to(device)
        optimizer = adam(model.parameters(), lr=1e-5)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        gpu_step(model, optimizer, batch, dtype)
        peak = torch.cuda.max_memory_allocated(device)
        rows.append([label, peak / 2**30, (peak - before) / 2**30])
        del model, optimizer
        torch.cuda.empty_cache()
    print(tabulate(rows, headers=["full, batch 16, one step", "peak GiB (max_memory_allocated)",
                                  "GiB above the built model"], floatfmt=".2f"))


def kernel(quick):
    import bench_gradagg
    rows = bench_gradagg.main(["--device", "cuda", "--sizes", "1e7,1.1e8"] + (["--reps", "3"] if quick else []))
    big = [r for r in rows if r["P"] >= 100_000_000]
    if big:
        pct = big[-1]["pct_of_copy_bw"]
        print(f"kernel at P = 1.1e8: {pct:.0f}% of the copy bandwidth (target >= {KERNEL_TARGET_PCT}%: "
              f"{'met' if pct >= KERNEL_TARGET_PCT else 'not met'}); {big[-1]['speedup_vs_mm']:.2f}x torch.mm fp32")


def gpu_section(data=DEFAULT_DATA, quick=False):
    """Every GPU figure; the caller checks torch.cuda.is_available() first."""
    device = torch.device("cuda")
    data = ensure_data(data)
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    step_rates(data, device, 5 if quick else 20)
    peak_memory(data, device)
    kernel(quick)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("GPU section: skipped (no CUDA)")
        return
    gpu_section(quick=a.quick)


if __name__ == "__main__":
    main()
