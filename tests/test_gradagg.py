"""Gram matrix, combination and PCGrad of common/gradagg.py on every backend.

The compiled CPU kernel ("cpp"), the CUDA kernel ("cuda", skipped without a
GPU) and the pure PyTorch path ("torch") must agree with plain fp64 PyTorch:
Gram and norms against buf.double() @ buf.double().T, PCGrad against the
pairwise projection loop pcgrad_reference run in fp64 with the same order.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import aggregators as agg  # noqa: E402
from common import gradagg as ga  # noqa: E402

KINDS = ("conflicting", "aligned", "parallel", "zero")


def require(backend, device="cpu"):
    """Skip when a compiled backend is not available (checked at run time: test_csrc_build may build it)."""
    if backend == "cpp" and ga._CPU_EXT is None:
        pytest.skip(f"CPU extension not loaded ({ga._LOAD_ERRORS.get('_gradagg')}); run python csrc/build.py")
    if device == "cuda" or backend == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if backend == "cuda" and ga._CUDA_EXT is None:
            pytest.skip(f"CUDA extension not loaded ({ga._LOAD_ERRORS.get('_gradagg_cuda')})")


def make_grads(kind, T, P, seed=0, device="cpu"):
    """Per-task gradients [T, P] float32 in a padded buffer (stride(0) > P, as TaskGradBuffer makes them)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(P, generator=gen, dtype=torch.float64)
    if kind == "conflicting":
        # A strong shared direction with random signs plus noise; magnitudes over 4 decades.
        signs = torch.tensor([1.0 if t % 2 == 0 else -1.0 for t in range(T)], dtype=torch.float64)
        scales = 10.0 ** torch.linspace(-2, 2, T, dtype=torch.float64)
        g = (signs[:, None] * 2.0 * u + torch.randn(T, P, generator=gen, dtype=torch.float64)) * scales[:, None]
    elif kind == "aligned":
        g = u + 0.3 * torch.randn(T, P, generator=gen, dtype=torch.float64)
    elif kind == "parallel":
        scales = torch.tensor([1.0, -2.0, 0.5, -1.0, 3.0, -0.25, 1.5, -4.0, 2.0, -1.0], dtype=torch.float64)[:T]
        g = scales[:, None] * u
    elif kind == "zero":
        g = torch.randn(T, P, generator=gen, dtype=torch.float64) - 0.5 * u
        g[1] = 0.0
        if T > 3:
            g[T - 1] = 0.0
    else:
        raise ValueError(kind)
    storage = torch.zeros(T, P + 13, device=device)  # odd padding: rows not 16-byte aligned
    buf = storage[:, :P]
    buf.copy_(g.float())
    return buf


def gram_error(G, ref):
    """max_ij |G_ij - ref_ij| / sqrt(ref_ii ref_jj): error relative to the Cauchy-Schwarz bound."""
    d = ref.diagonal().clamp_min(1e-300).sqrt()
    scale = d[:, None] * d[None, :]
    ok = scale > 0
    return ((G.cpu() - ref).abs()[ok] / scale[ok]).max().item() if ok.any() else (G.cpu() - ref).abs().max().item()


def update_error(update, truth, buf):
    """||update - truth|| relative to max(||truth||, max_t ||g_t||) (the truth may cancel to 0)."""
    scale = max(truth.norm().item(), buf.double().norm(dim=1).max().item())
    if scale == 0.0:
        return update.abs().max().item()
    return (update.cpu().double() - truth).norm().item() / scale


def pcgrad_update(buf, order, backend):
    G = ga.gram(buf, backend=backend)
    w = agg.pcgrad_coefficients(G, order)
    return ga.combine(buf, w, backend=backend)


# ---------------------------------------------------------------- Gram and norms

@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 11])
@pytest.mark.parametrize("P", [1, 7, 1000, 70_001])
def test_gram_matches_fp64(backend, T, P):
    require(backend)
    buf = make_grads("conflicting", T, P, seed=T * 1000 + P)
    ref = buf.double() @ buf.double().T
    G = ga.gram(buf, backend=backend)
    assert G.dtype == torch.float64 and G.shape == (T, T)
    assert torch.equal(G, G.T)
    # fp32 sums over short blocks, fp64 across: the kernel is near fp32 rounding,
    # the PyTorch path (fp32 mm over 65536 columns) near 1e-6.
    tol = 1e-7 if backend == "cpp" else 1e-5
    assert gram_error(G, ref) < tol
    norms = G.diagonal().clamp_min(0).sqrt()  # GradNorm's per-task norms
    torch.testing.assert_close(norms, torch.linalg.vector_norm(buf.double(), dim=1), rtol=tol, atol=0)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_gram_accurate_at_large_p(backend):
    # Positive-mean values are the hard case for one long fp32 sum; the blocked
    # fp32 + fp64 sums must stay near fp32 rounding.
    require(backend)
    gen = torch.Generator().manual_seed(1)
    buf = 1.0 + 0.1 * torch.randn(3, 1 << 21, generator=gen)
    ref = buf.double() @ buf.double().T
    err = gram_error(ga.gram(buf, backend=backend), ref)
    assert err < (1e-7 if backend == "cpp" else 1e-5), err


def test_cpp_results_do_not_depend_on_the_thread_count():
    require("cpp")
    buf = make_grads("conflicting", 5, 300_001, seed=2)
    c = torch.linspace(-1, 1, 5, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        G1, u1 = ga.gram(buf, backend="cpp"), ga.combine(buf, c, backend="cpp")
        torch.set_num_threads(max(2, threads))
        G2, u2 = ga.gram(buf, backend="cpp"), ga.combine(buf, c, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(G1, G2) and torch.equal(u1, u2)


def test_gram_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        ga.gram(torch.zeros(10))
    with pytest.raises(ValueError, match="contiguous"):
        ga.gram(torch.zeros(10, 3).T)
    bad = torch.ones(2, 5)
    bad[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        ga.gram(bad)


# ---------------------------------------------------------------- combine

@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("T", [1, 2, 5, 8, 11])
@pytest.mark.parametrize("P", [1, 5, 4099, 100_003])
def test_combine_matches_fp64(backend, T, P):
    require(backend)
    buf = make_grads("conflicting", T, P, seed=P + T)
    c = torch.linspace(-1.5, 2.0, T, dtype=torch.float64)
    out = torch.full((P,), float("nan"))
    res = ga.combine(buf, c, out=out, backend=backend)
    assert res.data_ptr() == out.data_ptr()  # written in place
    truth = c @ buf.double()
    scale = buf.double().abs().max().item() * c.abs().sum().item()
    assert (out.double() - truth).abs().max().item() <= 1e-6 * scale


def test_combine_rejects_bad_input():
    buf = torch.ones(3, 10)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ga.combine(buf, torch.ones(2))
    with pytest.raises(ValueError, match=r"\[10\]"):
        ga.combine(buf, torch.ones(3), out=torch.empty(9))
    with pytest.raises(FloatingPointError):
        ga.combine(buf, torch.tensor([1.0, float("inf"), 0.0]))


# ---------------------------------------------------------------- PCGrad

def test_pcgrad_coefficients_by_hand():
    # g1 = (1, 0), g2 = (-1, 1): g1' = g1 + g2 / 2 = (.5, .5), g2' = g2 + g1 = (0, 1);
    # the update (.5, 1.5) = 2 g1 + 1.5 g2.
    G = torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    w = agg.pcgrad_coefficients(G, torch.tensor([[1], [0]]))
    torch.testing.assert_close(w, torch.tensor([2.0, 1.5], dtype=torch.float64), rtol=0, atol=1e-15)


def test_pcgrad_aligned_is_plain_sum_and_zero_is_skipped():
    G = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    w = agg.pcgrad_coefficients(G, agg.pcgrad_order(3, torch.Generator().manual_seed(0)))
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.ones(3, dtype=torch.float64), rtol=0, atol=0)


def test_pcgrad_permuting_tasks_permutes_weights():
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    g[2] = -g[0] + 0.1 * g[2]
    order = agg.pcgrad_order(5, gen)
    perm = torch.tensor([3, 0, 4, 1, 2])
    inv = torch.argsort(perm)
    w = agg.pcgrad_coefficients(g @ g.T, order)
    gp = g[perm]
    order_p = inv[order[perm]]  # same projection sequence, tasks renamed
    wp = agg.pcgrad_coefficients(gp @ gp.T, order_p)
    torch.testing.assert_close(wp, w[perm], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(w, torch.ones(5, dtype=torch.float64))  # projections did happen


def test_pcgrad_order_is_a_seeded_permutation_of_the_others():
    order = agg.pcgrad_order(6, torch.Generator().manual_seed(7))
    assert order.shape == (6, 5) and order.dtype == torch.long
    for i, row in enumerate(order.tolist()):
        assert sorted(row) == [j for j in range(6) if j != i]
    assert torch.equal(order, agg.pcgrad_order(6, torch.Generator().manual_seed(7)))
    assert agg.pcgrad_order(1).shape == (1, 0)


def test_pcgrad_rejects_bad_order_and_nan():
    G = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="permutation"):
        agg.pcgrad_coefficients(G, torch.tensor([[1, 1], [0, 2], [0, 1]]))
    with pytest.raises(ValueError, match="shape"):
        agg.pcgrad_coefficients(G, torch.tensor([[1], [0], [0]]))
    with pytest.raises(FloatingPointError):
        agg.pcgrad_coefficients(torch.full((3, 3), float("nan"), dtype=torch.float64), agg.pcgrad_order(3))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [2, 3, 4, 5, 6, 7, 8])
def test_pcgrad_matches_pairwise_reference(backend, kind, T):
    require(backend)
    P = 10_007
    buf = make_grads(kind, T, P, seed=T)
    order = agg.pcgrad_order(T, torch.Generator().manual_seed(T))
    truth = agg.pcgrad_reference(buf.double(), order)
    update = pcgrad_update(buf, order, backend)
    assert torch.isfinite(update).all()
    assert update_error(update, truth, buf) < 1e-5
    # The fp32 textbook loop agrees as well (what the benchmark calls "naive").
    assert update_error(agg.pcgrad_reference(buf, order), truth, buf) < 1e-5
    w = agg.pcgrad_coefficients(ga.gram(buf, backend=backend), order)
    if kind == "aligned":
        assert torch.equal(w, torch.ones(T, dtype=torch.float64))
    if kind in ("conflicting", "parallel"):
        assert not torch.allclose(w, torch.ones(T, dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [2, 5, 8])
def test_pcgrad_matches_reference_at_1e6(kind, T):
    P = 1_000_000
    buf = make_grads(kind, T, P, seed=10 + T)
    order = agg.pcgrad_order(T, torch.Generator().manual_seed(T + 1))
    truth = agg.pcgrad_reference(buf.double(), order)
    assert update_error(pcgrad_update(buf, order, "torch"), truth, buf) < 1e-5
    require("cpp")
    assert update_error(pcgrad_update(buf, order, "cpp"), truth, buf) < 1e-5


def test_backends_agree():
    require("cpp")
    buf = make_grads("conflicting", 5, 123_457, seed=5)
    order = agg.pcgrad_order(5, torch.Generator().manual_seed(0))
    a, b = pcgrad_update(buf, order, "cpp"), pcgrad_update(buf, order, "torch")
    assert update_error(a, b.double(), buf) < 1e-6


# ---------------------------------------------------------------- fallback

def test_fallback_is_used_with_a_notice_when_the_extension_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(ga, "_CPU_EXT", None)
    monkeypatch.setattr(ga, "_NOTICED", set())
    monkeypatch.setitem(ga._LOAD_ERRORS, "_gradagg", "not built (test)")
    buf = make_grads("conflicting", 4, 3001)
    G1 = ga.gram(buf)
    out = ga.combine(buf, torch.ones(4))
    ga.gram(buf)
    err = capsys.readouterr().err
    assert err.count("gradagg:") == 1, err  # printed once
    assert "using the pure PyTorch path" in err and "csrc/build.py" in err
    assert len(err.strip().splitlines()) == 1
    assert gram_error(G1, buf.double() @ buf.double().T) < 1e-6
    torch.testing.assert_close(out.double(), buf.double().sum(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not built"):
        ga.gram(buf, backend="cpp")


def test_backend_argument_is_checked():
    with pytest.raises(ValueError, match="unknown backend"):
        ga.gram(torch.ones(2, 3), backend="fortran")
    with pytest.raises(ValueError, match="needs a cuda buffer"):
        ga.gram(torch.ones(2, 3), backend="cuda")


# ---------------------------------------------------------------- TaskGradBuffer

class TwoLayer(torch.nn.Module):
    """Shared trunk (Linear + tanh, and a scale used by task 0 only), one linear head per task."""

    def __init__(self, T):
        super().__init__()
        self.trunk = torch.nn.Linear(4, 8)
        self.extra = torch.nn.Parameter(torch.tensor([1.5]))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(T))

    def shared_parameters(self):
        return list(self.trunk.parameters()) + [self.extra]

    def losses(self, x, y):
        h = torch.tanh(self.trunk(x))
        out = []
        for t, head in enumerate(self.heads):
            pred = head(h * self.extra if t == 0 else h).squeeze(-1)
            out.append(((pred - y[:, t]) ** 2).mean())
        return out


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_task_grad_buffer_writes_pcgrad_into_dot_grad(backend):
    require(backend)
    torch.manual_seed(0)
    T = 3
    model = TwoLayer(T)
    x, y = torch.randn(16, 4), torch.randn(16, T)
    y[:, 1] = -3 * y[:, 0]  # make tasks 0 and 1 conflict
    shared = model.shared_parameters()
    tgb = ga.TaskGradBuffer(shared, T)
    buffer_ptr = tgb.grads.data_ptr()

    losses = model.losses(x, y)
    manual = [torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True) for loss in losses]
    tgb.fill_from_losses(losses)
    assert tgb.grads.data_ptr() == buffer_ptr  # filled in place
    for t in range(T):
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                          for g, p in zip(manual[t], shared)])
        torch.testing.assert_close(tgb.row(t), flat, rtol=0, atol=0)
    assert tgb.row(1)[-1] == 0.0  # `extra` gets no gradient from task 1: zero slot

    order = agg.pcgrad_order(T, torch.Generator().manual_seed(0))
    w = agg.pcgrad_coefficients(tgb.gram(backend=backend), order)
    assert not torch.allclose(w, torch.ones(T, dtype=torch.float64))
    tgb.write_combined(w, backend=backend)
    truth = agg.pcgrad_reference(tgb.grads.double(), order)
    assert update_error(tgb.flat_grad, truth, tgb.grads) < 1e-5
    base = tgb.flat_grad.data_ptr()
    offset = 0
    for t_param, p in enumerate(shared):
        assert p.grad.data_ptr() == base + 4 * offset  # .grad IS a view of flat_grad
        expected = sum(w[t].item() * (manual[t][t_param] if manual[t][t_param] is not None
                                      else torch.zeros_like(p)) for t in range(T))
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
        offset += p.numel()

    # An optimizer step uses .grad; zero_grad(set_to_none=True) detaches it, write_combined re-attaches.
    opt = torch.optim.SGD(shared, lr=0.1)
    before = [p.detach().clone() for p in shared]
    opt.step()
    for p, b in zip(shared, before):
        torch.testing.assert_close(p.detach(), b - 0.1 * p.grad)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in shared)
    tgb.write_combined(torch.ones(T, dtype=torch.float64), backend=backend)
    assert shared[0].grad.data_ptr() == tgb.flat_grad.data_ptr()
    torch.testing.assert_close(tgb.flat_grad, tgb.grads.sum(0), rtol=1e-6, atol=1e-7)


def test_task_grad_buffer_zero_row_for_a_constant_loss_and_checks():
    model = TwoLayer(2)
    tgb = ga.TaskGradBuffer(model.shared_parameters(), 2)
    tgb.grads.fill_(7.0)
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    losses = model.losses(x, y)
    tgb.fill_from_losses([losses[0], torch.tensor(0.0)])
    assert torch.count_nonzero(tgb.row(1)) == 0
    assert torch.count_nonzero(tgb.row(0)) > 0
    with pytest.raises(ValueError, match="expected 2 losses"):
        tgb.fill_from_losses(losses[:1])
    with pytest.raises(ValueError, match="does not require grad"):
        ga.TaskGradBuffer([torch.zeros(3)], 2)


# ---------------------------------------------------------------- CUDA

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [2, 3, 5, 8, 9, 13])
@pytest.mark.parametrize("P", [3, 1001, 1_000_000])
def test_cuda_matches_reference(kind, T, P):
    require("cuda", "cuda")
    buf_cpu = make_grads(kind, T, P, seed=T + P)
    order = agg.pcgrad_order(T, torch.Generator().manual_seed(T))
    truth = agg.pcgrad_reference(buf_cpu.double(), order)
    ref_G = buf_cpu.double() @ buf_cpu.double().T
    for padded in (P + 13, (P + 15) // 16 * 16):  # unaligned rows (scalar loads) and aligned (float4)
        buf = torch.zeros(T, padded, device="cuda")[:, :P]
        buf.copy_(buf_cpu)
        for backend in ("cuda", "torch"):
            G = ga.gram(buf, backend=backend)
            assert G.is_cuda and gram_error(G, ref_G) < 1e-6
            update = pcgrad_update(buf, order, backend)
            assert update.is_cuda and update_error(update, truth, buf_cpu) < 1e-5


def test_cuda_task_grad_buffer():
    require("cuda", "cuda")
    torch.manual_seed(0)
    model = TwoLayer(3).cuda()
    x, y = torch.randn(16, 4, device="cuda"), torch.randn(16, 3, device="cuda")
    tgb = ga.TaskGradBuffer(model.shared_parameters(), 3)
    tgb.fill_from_losses(model.losses(x, y))
    w = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    tgb.write_combined(w)
    truth = w @ tgb.grads.double().cpu()
    torch.testing.assert_close(tgb.flat_grad.cpu().double(), truth, rtol=1e-5, atol=1e-6)
    assert model.trunk.weight.grad.data_ptr() == tgb.flat_grad.data_ptr()
