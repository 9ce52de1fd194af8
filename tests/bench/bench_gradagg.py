"""Benchmark of one PCGrad aggregation (T per-task gradients -> one update), side by side in one run.

    python tests/bench/bench_gradagg.py [--sizes 1e6,1e7,1.1e8] [--device cpu|cuda] [--tasks 5] [--json PATH]

Methods, all on the same fp32 buffer [T, P] and the same random order:
  naive      the textbook loop of pairwise projections in PyTorch (pcgrad_reference)
  torch.mm   Gram matrix from one fp32 torch.mm, PCGrad in coefficient space, torch.mv combination
  chunked    the PyTorch path of common/gradagg.py (fp32 mm over 65536-column chunks, fp64 sums)
  kernel     the compiled kernel (cpp on the CPU, cuda on a GPU): gram + combine
Time is the median ms per update (one repetition of the naive loop at P >= 1e8).
Bandwidth counts 2 passes over the T x P fp32 values (Gram, then combination),
as a percentage of a measured device copy (read + write of a large tensor).
Gram error: max |G - G64| / sqrt(G64_ii G64_jj) against an fp64 reference;
update error: ||u - u64|| / ||u64|| against the textbook loop run in fp64.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import aggregators as agg  # noqa: E402
from common import gradagg as ga  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, reps, device, warmup=True):
    """Median seconds of fn() over reps runs."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, nbytes=1 << 30):
    """Bytes per second of a large device copy (counting read + write)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 5, device)
    return 2 * nbytes / t


def gram_fp64(buf, chunk=1 << 20):
    T, P = buf.shape
    G = torch.zeros(T, T, dtype=torch.float64, device=buf.device)
    for s in range(0, P, chunk):
        b = buf[:, s:s + chunk].double()
        G += b @ b.T
    return G


def gram_error(G, ref):
    d = ref.diagonal().sqrt()
    return ((G - ref).abs() / (d[:, None] * d[None, :])).max().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,1e7,1.1e8", help="comma-separated P values")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--reps", type=int, default=0, help="repetitions (default: by size)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gradagg: --device cuda but torch sees no CUDA device")
    kernel = "cuda" if device.type == "cuda" else "cpp"
    have_kernel = (ga._CUDA_EXT if kernel == "cuda" else ga._CPU_EXT) is not None
    T = args.tasks
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# PCGrad aggregation, T = {T}, fp32, {name}; backend of the kernel column: "
          f"{kernel if have_kernel else 'NOT BUILT (torch path shown instead)'}; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s")

    rows = []
    for P in sizes:
        gen = torch.Generator().manual_seed(0)
        order = agg.pcgrad_order(T, gen)
        buf = torch.empty(T, (P + 15) // 16 * 16, device=device)[:, :P]
        for t in range(T):  # conflicting tasks: a shared direction with alternating signs
            buf[t].normal_(generator=None)
        buf[1::2] -= buf[0]
        out = torch.empty(P, device=device)
        reps = args.reps or (20 if P <= 2_000_000 else 5 if P <= 20_000_000 else 3)

        kept = {}

        def naive():
            kept["naive"] = agg.pcgrad_reference(buf, order)

        def mm():
            G = (buf @ buf.T).double()
            w = agg.pcgrad_coefficients(G, order)
            return torch.mv(buf.T, w.to(device=device, dtype=torch.float32), out=out)

        def chunked():
            w = agg.pcgrad_coefficients(ga.gram(buf, backend="torch"), order)
            return ga.combine(buf, w, out=out, backend="torch")

        def fused():
            w = agg.pcgrad_coefficients(ga.gram(buf, backend=kernel if have_kernel else "torch"), order)
            return ga.combine(buf, w, out=out, backend=kernel if have_kernel else "torch")

        big = P >= 100_000_000
        t_naive = timed(naive, 1 if big else reps, device, warmup=not big)
        t_mm = timed(mm, reps, device)
        t_chunked = timed(chunked, reps, device)
        t_kernel = timed(fused, reps, device)

        ref = gram_fp64(buf)
        err_mm = gram_error((buf @ buf.T).double(), ref)
        err_kernel = gram_error(ga.gram(buf, backend=kernel if have_kernel else "torch"), ref)
        truth = agg.pcgrad_reference(buf.double(), order)  # fp64 textbook loop
        upd_err = ((fused().double() - truth).norm() / truth.norm()).item()
        naive_err = ((kept.pop("naive").double() - truth).norm() / truth.norm()).item()
        gbs = 2 * T * P * 4 / t_kernel / 1e9
        rows.append(dict(P=P, naive_ms=t_naive * 1e3, torch_mm_ms=t_mm * 1e3, chunked_ms=t_chunked * 1e3,
                         kernel_ms=t_kernel * 1e3, speedup_vs_naive=t_naive / t_kernel,
                         speedup_vs_mm=t_mm / t_kernel, kernel_GBps=gbs, pct_of_copy_bw=100 * gbs * 1e9 / bw,
                         gram_err_mm=err_mm, gram_err_kernel=err_kernel, update_err_kernel=upd_err,
                         update_err_naive=naive_err))
        buf = out = ref = truth = None  # free before the next size (the closures above bind late)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    header = ["P", "naive ms", "torch.mm ms", "chunked ms", "kernel ms", "x naive", "x mm",
              "kernel GB/s", "% copy bw", "Gram err mm", "Gram err kernel",
              "update err naive", "update err kernel"]
    table = [[f"{r['P']:.3g}", f"{r['naive_ms']:.1f}", f"{r['torch_mm_ms']:.1f}", f"{r['chunked_ms']:.1f}",
              f"{r['kernel_ms']:.1f}", f"{r['speedup_vs_naive']:.1f}", f"{r['speedup_vs_mm']:.1f}",
              f"{r['kernel_GBps']:.1f}", f"{r['pct_of_copy_bw']:.0f}", f"{r['gram_err_mm']:.1e}",
              f"{r['gram_err_kernel']:.1e}", f"{r['update_err_naive']:.1e}", f"{r['update_err_kernel']:.1e}"]
             for r in rows]
    try:
        from tabulate import tabulate
        print(tabulate(table, headers=header, tablefmt="github"))
    except ImportError:
        print(" | ".join(header))
        for line in table:
            print(" | ".join(line))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(device=name, tasks=T, copy_GBps=bw / 1e9, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
