"""The csrc/ extension builds: CUDA kernels compile with nvcc alone, the CPU module builds and loads.

Slow optional check: GRADAGG_CHECK_BINDING=1 also compiles (syntax only) the
torch glue of the CUDA path, which the CPU wheel of torch cannot link (~20 s).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
sys.path.insert(0, str(ROOT))

from common import gradagg as ga  # noqa: E402


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    return nvcc


def test_cuda_sources_are_free_of_torch_headers():
    for name in ("gradagg_cuda.cu", "gradagg_cuda.h"):
        text = (CSRC / name).read_text()
        assert "#include <torch" not in text and "#include <ATen" not in text and "#include <c10" not in text, name


def test_cuda_kernels_compile(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit)")
    obj = tmp_path / "gradagg_cuda.o"
    cmd = [nvcc, "-c", str(CSRC / "gradagg_cuda.cu"), "-o", str(obj), "-O3", "-std=c++17",
           "-arch=sm_90", "-Xptxas", "-warn-spills"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert obj.stat().st_size > 0
    assert "spill" not in r.stderr.lower(), r.stderr  # registers hold every pair sum


def test_cuda_binding_compiles(tmp_path):
    if os.environ.get("GRADAGG_CHECK_BINDING") != "1":
        pytest.skip("slow (~20 s): set GRADAGG_CHECK_BINDING=1 to compile the CUDA binding")
    nvcc = find_nvcc()
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if nvcc is None or cxx is None:
        pytest.skip("needs nvcc (for the CUDA headers) and a C++ compiler")
    from torch.utils import cpp_extension

    homes = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, str(Path(nvcc).resolve().parents[1]),
             "/usr/local/cuda"]
    cuda_include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()),
                        None)
    if cuda_include is None:
        pytest.skip("cuda_runtime.h not found (set CUDA_HOME)")
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"], str(cuda_include)]
    # The CPU wheel of torch ships c10/cuda headers but not this generated one.
    stub = tmp_path / "stub"
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(p) / macros).exists() for p in includes):
        (stub / macros).parent.mkdir(parents=True)
        (stub / macros).write_text("#pragma once\n")
        includes.append(str(stub))
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_gradagg_cuda",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *(f"-I{p}" for p in includes),
           str(CSRC / "gradagg_cuda_binding.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def test_cpu_extension_builds_and_loads():
    so = CSRC / "build" / "cpu" / "_gradagg.so"
    if ga._CPU_EXT is None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler: the PyTorch path is used (tested in test_gradagg.py)")
        r = subprocess.run([sys.executable, str(CSRC / "build.py")], capture_output=True, text=True,
                           timeout=900, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
    assert ga.load_extensions() in ("cpp", "cuda"), ga._LOAD_ERRORS
    assert so.exists()
    buf = torch.randn(3, 1001, generator=torch.Generator().manual_seed(0))
    ref = buf.double() @ buf.double().T
    assert (ga._CPU_EXT.gram(buf) - ref).abs().max() < 1e-6 * ref.diagonal().max()
    # Rerunning the build is a no-op: ninja finds nothing to do, the module is not relinked.
    mtime = so.stat().st_mtime_ns
    r = subprocess.run([sys.executable, str(CSRC / "build.py")], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert so.stat().st_mtime_ns == mtime


def test_dropout_module_builds_and_loads():
    import common.dropout as cd
    so = CSRC / "build" / "dropout" / "_dropout.so"
    if cd._EXT is None and shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the PyTorch fallback is used (tested in test_model.py)")
    if cd._EXT is None:
        r = subprocess.run([sys.executable, str(CSRC / "build.py")], capture_output=True, text=True,
                           timeout=900, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
    assert cd.load_kernel() is not None and so.exists()
    y, keep = cd._EXT.forward(torch.ones(1000), 26, 256 / 230, 7)
    assert keep.dtype == torch.bool and torch.equal(y, keep.float() * (256 / 230))
    assert torch.equal(keep, cd.random_bytes(1000, 7) >= 26)
