"""Per-task gradients of the shared parameters -> one update: Gram matrix and combination.

Every gradient aggregator here is a *weighting* of the T x T Gram matrix of the
per-task gradients followed by one shared *combination*:

    G = gram(buf)                       # one pass over the T x P gradients
    w = aggregator(G)                   # tiny T x T problem (common/aggregators.py)
    combine(buf, w, out=flat_grad)      # one pass, written straight into .grad

`buf` is one float32 buffer [T, P] (row t = task t's flattened shared gradient;
rows may be padded, see TaskGradBuffer). GradNorm's per-task norms are
sqrt(diag(G)). Every aggregator (PCGrad, MGDA, CAGrad, Nash-MTL, IMTL-G,
Aligned-MTL, UPGrad) only needs G -> weights, then the same combine.

Backends, all giving the same results (tests/test_gradagg.py):
  "cpp"   compiled CPU kernel (csrc/gradagg_cpu.cpp, OpenMP over P)
  "cuda"  compiled CUDA kernel (csrc/gradagg_cuda.cu), for CUDA tensors
  "torch" pure PyTorch, used when the extension is not built (one-line notice)
Build the extension with `python csrc/build.py` (make build).

Accuracy: the Gram matrix is float64, summed in fp32 over short blocks and in
fp64 across blocks (relative error ~1e-7 at any P; one fp32 mm over 1e7 values
is ~1e-3 off).
"""

import importlib.util
import sys
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parents[1] / "csrc"
_BUILD = _CSRC / "build"
_BUILD_HINT = "run `python csrc/build.py` (make build)"

# Columns per fp32 torch.mm in the PyTorch path: short enough to stay accurate
# (the sums across chunks are fp64) and cache-friendly on the CPU.
_TORCH_CHUNK_CPU = 1 << 16
_TORCH_CHUNK_CUDA = 1 << 22

_CPU_EXT = None   # module _gradagg (csrc/build/cpu), or None
_CUDA_EXT = None  # module _gradagg_cuda (csrc/build/cuda), or None
_LOAD_ERRORS = {}  # module name -> why it did not load
_NOTICED = set()   # device types whose fallback notice was printed
BACKEND = "torch"  # best backend of this process: "cuda", "cpp" or "torch"


def load_built_module(name, subdir, sources):
    """Import a built extension module from csrc/build/<subdir>/<name>.so, or None."""
    path = _BUILD / subdir / f"{name}.so"
    if not path.exists():
        _LOAD_ERRORS[name] = f"{path} not found"
        return None
    stale = [s for s in sources if (_CSRC / s).exists() and (_CSRC / s).stat().st_mtime > path.stat().st_mtime]
    if stale:
        _LOAD_ERRORS[name] = f"{path} is older than csrc/{stale[0]}"
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as exc:  # e.g. built against another torch
        _LOAD_ERRORS[name] = f"{path} failed to import ({exc})"
        return None
    _LOAD_ERRORS.pop(name, None)
    return module


def load_extensions():
    """(Re)load the compiled modules, e.g. after a build; returns BACKEND."""
    global _CPU_EXT, _CUDA_EXT, BACKEND
    _CPU_EXT = load_built_module("_gradagg", "cpu", ["gradagg_cpu.cpp"])
    _CUDA_EXT = None
    if torch.cuda.is_available():
        _CUDA_EXT = load_built_module("_gradagg_cuda", "cuda",
                                 ["gradagg_cuda.cu", "gradagg_cuda.h", "gradagg_cuda_binding.cpp"])
    BACKEND = "cuda" if _CUDA_EXT is not None else "cpp" if _CPU_EXT is not None else "torch"
    return BACKEND


load_extensions()


def _notice_fallback(device_type):
    if device_type in _NOTICED:
        return
    _NOTICED.add(device_type)
    name = "_gradagg_cuda" if device_type == "cuda" else "_gradagg"
    why = _LOAD_ERRORS.get(name, "not built")
    print(f"gradagg: compiled {device_type.upper()} kernel unavailable ({why}); using the pure "
          f"PyTorch path, {_BUILD_HINT}", file=sys.stderr)


def _pick(buf, backend):
    """The module that runs on buf (None = the PyTorch path)."""
    if backend not in (None, "torch", "cpp", "cuda"):
        raise ValueError(f"gradagg: unknown backend {backend!r}; use None, 'torch', 'cpp' or 'cuda'")
    if backend == "torch":
        return None
    device_type = buf.device.type
    ext = {"cpu": _CPU_EXT, "cuda": _CUDA_EXT}.get(device_type)
    if backend is not None:
        wanted = "cuda" if backend == "cuda" else "cpu"
        if wanted != device_type:
            raise ValueError(f"gradagg: backend {backend!r} needs a {wanted} buffer, got {buf.device}")
        if ext is None:
            name = "_gradagg_cuda" if backend == "cuda" else "_gradagg"
            raise RuntimeError(f"gradagg: backend {backend!r} requested but "
                               f"{_LOAD_ERRORS.get(name, 'not built')}; {_BUILD_HINT}")
        return ext
    if buf.dtype != torch.float32:
        return None  # the kernels are float32; other dtypes (e.g. fp64 references) use PyTorch
    if ext is None:
        _notice_fallback(device_type)
    return ext


def _check_buffer(buf, fn):
    if not isinstance(buf, torch.Tensor) or buf.dim() != 2:
        shape = tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__
        raise ValueError(f"gradagg.{fn}: gradient buffer must be a 2-D tensor [T, P], got {shape}")
    if not buf.is_floating_point():
        raise ValueError(f"gradagg.{fn}: gradient buffer must be floating point, got {buf.dtype}")
    if buf.shape[1] > 1 and buf.stride(1) != 1:
        raise ValueError(f"gradagg.{fn}: gradient buffer rows must be contiguous "
                         f"(stride(1) == 1), got strides {buf.stride()}")


def gram(buf, backend=None, check=True):
    """Gram matrix G[i, j] = <g_i, g_j> of the rows of buf [T, P], as float64 [T, T] on buf.device.
    check=False: a non-finite G is returned, not raised (a block of columns whose sum over ranks is checked)."""
    _check_buffer(buf, "gram")
    ext = _pick(buf, backend)
    if ext is not None:
        G = ext.gram(buf)
    else:
        G = _gram_torch(buf)
    if check and not torch.isfinite(G).all():
        raise FloatingPointError("gradagg.gram: the Gram matrix is not finite "
                                 "(a task gradient holds NaN or inf)")
    return G


def _gram_torch(buf):
    T, P = buf.shape
    G = torch.zeros(T, T, dtype=torch.float64, device=buf.device)
    chunk = _TORCH_CHUNK_CUDA if buf.is_cuda else _TORCH_CHUNK_CPU
    for start in range(0, P, chunk):
        block = buf[:, start:start + chunk]
        G += (block @ block.T).double()
    return G.triu() + G.triu(1).T  # BLAS gives a not quite symmetric product


def combine(buf, coeffs, out=None, backend=None):
    """out[p] = sum_t coeffs[t] * buf[t, p]; written into out (float, [P], buf's device) and returned."""
    _check_buffer(buf, "combine")
    T, P = buf.shape
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64).detach()
    if coeffs.shape != (T,):
        raise ValueError(f"gradagg.combine: coeffs must have shape ({T},), got {tuple(coeffs.shape)}")
    if not torch.isfinite(coeffs).all():
        raise FloatingPointError(f"gradagg.combine: coefficients are not finite: {coeffs.tolist()}")
    if out is None:
        out = torch.empty(P, dtype=buf.dtype, device=buf.device)
    if out.shape != (P,) or out.device != buf.device or not out.is_contiguous():
        raise ValueError(f"gradagg.combine: out must be a contiguous [{P}] tensor on {buf.device}, "
                         f"got {tuple(out.shape)} on {out.device}")
    ext = _pick(buf, backend)
    if ext is not None and out.dtype == torch.float32:
        return ext.combine(buf, coeffs, out)
    if T == 0:
        return out.zero_()
    # buf.T @ c without copying buf (BLAS reads the transposed view in place).
    return torch.mv(buf.T, coeffs.to(device=buf.device, dtype=buf.dtype), out=out)


def _copy_or_zero(view, grad):
    """One parameter's slot of a task row: its gradient, or zeros where the task gives it none."""
    if grad is None:
        view.zero_()
    else:
        view.copy_(grad)


class TaskGradBuffer:
    """Per-task gradients of the shared parameters in one float32 buffer, and .grad as views of one flat vector.

    Layout (no copy per aggregator):
      self.grads       [T, P] view of a [T, P_pad] allocation (rows padded to 64 bytes,
                       so the CUDA kernel's float4 loads stay aligned); row t = task t.
      self.flat_grad   [P]; every shared parameter's .grad is a view into it, so
                       combine() writes the update straight into .grad.
    fill_from_losses is the only place gradients are materialised; each parameter's
    gradient is copied into its row slice. Two ways, same rows (tests/test_perf_equivalence.py):
      batched=False  one autograd.grad per task (T backward passes)
      batched=True   one backward of the T one-hot cotangents at once
                     (autograd.grad(..., is_grads_batched=True), vmap over the VJP); where an op
                     cannot be batched (random ops in a forward recomputed by gradient
                     checkpointing, .item() in a backward) it falls back to the T passes, with a
                     one-line notice; batch_fallback keeps the reason.
    The T vector-Jacobian products cost T times the backward's FLOPs either way: batching only
    widens the matrix products. On 2 CPU cores it was slower (vmap copies; the oneDNN LSTM
    backward has no batching rule and runs once per task), so the default is the loop; `make bench`
    prints both.
    """

    def __init__(self, params, num_tasks, batched=False):
        self.params = list(params)
        if not self.params:
            raise ValueError("TaskGradBuffer: no shared parameters given")
        if num_tasks < 1:
            raise ValueError(f"TaskGradBuffer: num_tasks must be >= 1, got {num_tasks}")
        for k, p in enumerate(self.params):
            if not p.requires_grad:
                raise ValueError(f"TaskGradBuffer: shared parameter {k} {tuple(p.shape)} does not require grad")
            if p.dtype != torch.float32 or p.device != self.params[0].device:
                raise ValueError(f"TaskGradBuffer: shared parameter {k} is {p.dtype} on {p.device}; all "
                                 f"must be float32 on {self.params[0].device}")
        self.num_tasks = num_tasks
        self.batched = batched
        self.batch_fallback = None  # why the batched backward last fell back to the loop (None: it did not)
        device = self.params[0].device
        sizes = [p.numel() for p in self.params]
        self.num_params = P = sum(sizes)
        padded = (P + 15) // 16 * 16
        self.grads = torch.zeros(num_tasks, padded, device=device)[:, :P]
        self.flat_grad = torch.zeros(P, device=device)
        self._offsets = [0]
        for n in sizes:
            self._offsets.append(self._offsets[-1] + n)
        self._grad_views = self._views(self.flat_grad)
        self._row_views = [self._views(self.grads[t]) for t in range(num_tasks)]
        self.attach_grads()

    def _views(self, flat):
        return [flat[a:b].view_as(p) for p, a, b in zip(self.params, self._offsets, self._offsets[1:])]

    def row(self, t):
        """Task t's flattened gradient, a [P] view of the buffer."""
        return self.grads[t]

    def fill_from_losses(self, losses, retain_graph=True, batched=None):
        """Row t = d losses[t] / d shared params (zeros where a param gets none, and for an inactive task:
        None, or a loss that does not require grad). batched: None = self.batched (see the class).

        The graph is kept between the passes; retain_graph applies to the last one
        (keep it True to backpropagate the heads afterwards).
        """
        losses = list(losses)
        if len(losses) != self.num_tasks:
            raise ValueError(f"TaskGradBuffer.fill_from_losses: expected {self.num_tasks} losses, got {len(losses)}")
        active = [t for t, loss in enumerate(losses) if isinstance(loss, torch.Tensor) and loss.requires_grad]
        for t in range(self.num_tasks):
            if t not in active:
                self.grads[t].zero_()  # e.g. a task absent from this batch
        if not active:
            return self.grads
        if self.batched if batched is None else batched:
            grads = self._batched_grads([losses[t] for t in active])
            if grads is not None:
                with torch.no_grad():
                    for k, g in enumerate(grads):
                        for i, t in enumerate(active):
                            _copy_or_zero(self._row_views[t][k], None if g is None else g[i])
                return self.grads
        for n, t in enumerate(active):
            keep = retain_graph or n < len(active) - 1
            grads = torch.autograd.grad(losses[t], self.params, retain_graph=keep, allow_unused=True)
            with torch.no_grad():
                for view, g in zip(self._row_views[t], grads):
                    _copy_or_zero(view, g)
        return self.grads

    def _batched_grads(self, losses):
        """Per-parameter gradients [A, *shape] (or None) of A scalar losses in one batched backward, or None
        where an op of the graph cannot be batched (then the caller runs one pass per task). The graph is
        always kept (retain_graph does not apply), so that the fallback can still run through it."""
        vector = torch.stack([loss.reshape(()) for loss in losses])
        eye = torch.eye(len(losses), dtype=vector.dtype, device=vector.device)
        try:
            return torch.autograd.grad(vector, self.params, grad_outputs=eye, is_grads_batched=True,
                                       retain_graph=True, allow_unused=True)
        except RuntimeError as exc:  # e.g. dropout recomputed under gradient checkpointing, .item() in a backward
            why = str(exc).strip().splitlines()[0][:200]
            if self.batch_fallback != why:
                print(f"gradagg.TaskGradBuffer: batched backward not supported here ({why}); "
                      f"one backward per task instead", file=sys.stderr)
            self.batch_fallback = why
            return None

    def attach_grads(self):
        """Make every shared parameter's .grad the view into flat_grad (again, after zero_grad(set_to_none=True))."""
        for p, view in zip(self.params, self._grad_views):
            if p.grad is None or p.grad.data_ptr() != view.data_ptr() or p.grad.shape != view.shape:
                p.grad = view

    def write_combined(self, coeffs, backend=None):
        """Shared update sum_t coeffs[t] * g_t, written into the parameters' .grad; returns flat_grad."""
        self.attach_grads()
        with torch.no_grad():
            combine(self.grads, coeffs, out=self.flat_grad, backend=backend)
        return self.flat_grad

    def gram(self, backend=None):
        """Gram matrix [T, T] (float64) of the per-task gradients."""
        return gram(self.grads, backend=backend)
