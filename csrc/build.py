"""Build the gradient-aggregation extension (called by `make build`).

    python csrc/build.py            # build (or check, a no-op when nothing changed)
    python csrc/build.py --clean    # remove csrc/build/ first
    python csrc/build.py --require-cuda   # fail if the CUDA module cannot be built

Three modules, each built with torch.utils.cpp_extension.load (ninja) into a
fixed directory that common/gradagg.py (and common/dropout.py) load from:
  csrc/build/cpu/_gradagg.so        always: gradagg_cpu.cpp, -O3, OpenMP when the compiler has it
  csrc/build/dropout/_dropout.so    always: dropout_cpu.cpp (one-pass CPU dropout), the same flags
  csrc/build/cuda/_gradagg_cuda.so  only with a CUDA build of torch and a CUDA toolkit
                                    (gradagg_cuda.cu + gradagg_cuda_binding.cpp)
They are separate so that a failing CUDA build (say, nvcc and torch disagree on
the CUDA version) still leaves the CPU module usable. Ninja only recompiles what
changed, so a second run takes the time of importing torch.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parent
BUILD = CSRC / "build"
CPU_DIR = BUILD / "cpu"
DROPOUT_DIR = BUILD / "dropout"
CUDA_DIR = BUILD / "cuda"


def compiler():
    return os.environ.get("CXX", "c++")


def has_openmp():
    """True when the C++ compiler builds and links a program with -fopenmp."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "omp.cpp"
        src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            r = subprocess.run([compiler(), "-fopenmp", str(src), "-o", str(Path(tmp) / "omp")],
                               capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0


def _load(name, sources, build_dir, **kwargs):
    build_dir.mkdir(parents=True, exist_ok=True)
    # A build killed half-way leaves torch's lock file behind, and the next
    # load() would wait for it forever; `make build` is the only builder.
    (build_dir / "lock").unlink(missing_ok=True)
    return cpp_extension.load(name=name, sources=[str(s) for s in sources],
                              build_directory=str(build_dir), **kwargs)


def cpu_flags():
    """(cflags, ldflags) of the CPU modules: -O3, and OpenMP when the compiler has it."""
    if has_openmp():
        return ["-O3", "-fopenmp"], ["-fopenmp"]
    print("build: the compiler has no OpenMP; the CPU kernels will run on one thread")
    return ["-O3"], []


def build_cpu(verbose=False, flags=None):
    cflags, ldflags = flags or cpu_flags()
    return _load("_gradagg", [CSRC / "gradagg_cpu.cpp"], CPU_DIR, extra_cflags=cflags,
                 extra_ldflags=ldflags, verbose=verbose)


def build_dropout(verbose=False, flags=None):
    cflags, ldflags = flags or cpu_flags()
    return _load("_dropout", [CSRC / "dropout_cpu.cpp"], DROPOUT_DIR, extra_cflags=cflags,
                 extra_ldflags=ldflags, verbose=verbose)


def cuda_reason():
    """Why the CUDA module is not built here, or None when it can be."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    return None


def build_cuda(verbose=False):
    return _load("_gradagg_cuda", [CSRC / "gradagg_cuda_binding.cpp", CSRC / "gradagg_cuda.cu"],
                 CUDA_DIR, extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                 with_cuda=True, verbose=verbose)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clean", action="store_true", help="remove csrc/build/ before building")
    ap.add_argument("--require-cuda", action="store_true",
                    help="exit with an error when the CUDA module cannot be built")
    ap.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = ap.parse_args(argv)

    if args.clean and BUILD.exists():
        shutil.rmtree(BUILD)
    t0 = time.perf_counter()
    flags = cpu_flags()
    mod = build_cpu(args.verbose, flags)
    print(f"build: CPU module ready ({CPU_DIR / '_gradagg.so'}, OpenMP={mod.openmp}, "
          f"{time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    build_dropout(args.verbose, flags)
    print(f"build: CPU dropout module ready ({DROPOUT_DIR / '_dropout.so'}, {time.perf_counter() - t0:.1f} s)")

    reason = cuda_reason()
    if reason is not None:
        print(f"build: CUDA module skipped: {reason}")
        if args.require_cuda:
            return 1
        return 0
    t0 = time.perf_counter()
    try:
        build_cuda(args.verbose)
    except Exception as exc:  # the CPU module stays usable; say why the GPU one is not
        print(f"build: CUDA module FAILED ({type(exc).__name__}: {exc}); CUDA tensors will use "
              "the PyTorch path", file=sys.stderr)
        return 1 if args.require_cuda else 0
    print(f"build: CUDA module ready ({CUDA_DIR / '_gradagg_cuda.so'}, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
