"""Gradient aggregators as pure functions of the Gram matrix (TorchJD's split of weighting and combine).

Each method maps the T x T Gram matrix G (float64, G[i, j] = <g_i, g_j> of the per-task gradients of the
shared part) to T weights w; the shared update is sum_t w_t g_t, formed by gradagg.combine (the csrc/
kernel) straight into .grad. No model and no gradients are seen here, so each rule is tested on
hand-made matrices (tests/test_aggregators.py).

AGGREGATORS[name](G, ctx) -> w. ctx is a small dict the caller keeps between steps (and checkpoints):
ctx["generator"] (PCGrad's random order), ctx["nash_alpha"] (Nash-MTL's warm start).
"""
import math

import torch

from common import gradagg


def _nonzero(G, eps=1e-20):
    """Indices of the tasks whose gradient is not zero: a zero gradient takes no part and gets weight 0."""
    return (G.diagonal() > eps).nonzero().flatten()


def _on_nonzero(G, solve):
    """Run solve on the Gram matrix of the non-zero gradients; zero gradients get weight 0."""
    G = torch.as_tensor(G, dtype=torch.float64)
    keep = _nonzero(G)
    w = torch.zeros(G.shape[0], dtype=torch.float64)
    if keep.numel():
        w[keep] = solve(G[keep][:, keep])
    return w


def pcgrad_weights(G, ctx):
    """PCGrad (Yu et al., NeurIPS 2020) in coefficient space: see gradagg.pcgrad_coefficients."""
    G = torch.as_tensor(G, dtype=torch.float64)
    return gradagg.pcgrad_coefficients(G, gradagg.pcgrad_order(G.shape[0], ctx.get("generator")))


def mgda_weights(G, ctx=None, iterations=500, tol=1e-12):
    """MGDA (Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull of the gradients,
    w = argmin_{w in simplex} w^T G w, by Frank-Wolfe with exact line search (the paper's Algorithm 2).
    Applied to the Gram matrix of representation gradients this is MGDA-UB. Weights sum to 1."""
    def solve(G):
        T = G.shape[0]
        w = torch.full((T,), 1.0 / T, dtype=torch.float64)
        for _ in range(iterations):
            Gw = G @ w
            t = int(torch.argmin(Gw))
            aa, ab, bb = float(w @ Gw), float(Gw[t]), float(G[t, t])
            denom = aa - 2 * ab + bb
            if denom <= tol:
                break
            gamma = min(max((aa - ab) / denom, 0.0), 1.0)   # step from w towards vertex t
            if gamma <= tol:
                break
            w = (1 - gamma) * w
            w[t] += gamma
        return w
    return _on_nonzero(G, solve)


def _project_simplex(v):
    """Euclidean projection onto the probability simplex (Duchi et al. 2008)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1
    k = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    rho = int((u - css / k > 0).nonzero().max())
    return torch.clamp(v - css[rho] / (rho + 1), min=0)


def cagrad_weights(G, ctx=None, c=0.5, rescale=1, iterations=2000):
    """CAGrad (Liu et al., NeurIPS 2021; official code Cranial-XIX/CAGrad, c = 0.5, rescale = 1).
    With g0 the mean gradient and phi = c ||g0||: w = argmin_{w in simplex} w^T G 1/T + phi ||g_w||
    (projected gradient descent with backtracking, float64), then
    d = g0 + phi / ||g_w|| g_w, divided by (1 + c^2) when rescale = 1 (the official default).
    Returned as the weights of d: (1/T + phi / ||g_w|| w) / (1 + c^2). c = 0 gives the mean."""
    G = torch.as_tensor(G, dtype=torch.float64)
    T = G.shape[0]
    mean = torch.full((T,), 1.0 / T, dtype=torch.float64)
    phi = c * math.sqrt(max(float(mean @ G @ mean), 0.0))
    scale = {0: 1.0, 1: 1 + c * c, 2: 1 + c}[rescale]
    if phi == 0:
        return mean / scale
    Gb = G @ mean

    def objective(w):
        return float(w @ Gb) + phi * math.sqrt(max(float(w @ G @ w), 0.0) + 1e-12)

    w, step = mean.clone(), 1.0 / max(float(G.diagonal().max()), 1e-12)
    f = objective(w)
    for _ in range(iterations):
        grad = Gb + phi * (G @ w) / math.sqrt(max(float(w @ G @ w), 0.0) + 1e-12)
        while True:  # backtracking: a step that does not decrease the objective is halved
            cand = _project_simplex(w - step * grad)
            fc = objective(cand)
            if fc <= f - 1e-4 * float(grad @ (w - cand)) or step < 1e-12:
                break
            step *= 0.5
        if float((cand - w).abs().max()) < 1e-12:
            break
        w, f, step = cand, fc, step * 2
    gw_norm = math.sqrt(max(float(w @ G @ w), 0.0))
    lam = phi / (gw_norm + 1e-8)
    return (mean + lam * w) / scale


def nash_mtl_weights(G, ctx=None, iterations=100):
    """Nash-MTL (Navon et al., ICML 2022): alpha > 0 with G alpha = 1 / alpha, the Nash bargaining
    solution. As the official code, G is first divided by its Frobenius norm. Solved by Newton's method on
    the strictly convex phi(a) = a^T G a / 2 - sum log a (its stationary point is the condition), with a
    backtracking line search that keeps a > 0; warm started from ctx["nash_alpha"]. Zero gradients get 0.
    Scaling one task's gradient by k scales its alpha by 1/k: the update is unchanged."""
    G = torch.as_tensor(G, dtype=torch.float64)
    keep = _nonzero(G)
    alpha_all = torch.zeros(G.shape[0], dtype=torch.float64)
    if not keep.numel():
        return alpha_all
    Gk = G[keep][:, keep]
    Gn = Gk / torch.linalg.norm(Gk)
    warm = (ctx or {}).get("nash_alpha")
    a = warm[keep].clone() if warm is not None and warm.shape == alpha_all.shape and (warm[keep] > 0).all() \
        else torch.ones(keep.numel(), dtype=torch.float64)

    def phi(x):
        return float(0.5 * x @ Gn @ x - torch.log(x).sum())
    for _ in range(iterations):
        grad = Gn @ a - 1 / a
        if float(grad.abs().max()) < 1e-10:
            break
        hess = Gn + torch.diag(1 / a ** 2)
        step = torch.linalg.solve(hess, grad)
        t, f0 = 1.0, phi(a)
        while (a - t * step <= 0).any() or phi(a - t * step) > f0 - 1e-4 * t * float(grad @ step):
            t *= 0.5
            if t < 1e-12:
                break
        a = a - t * step
    alpha_all[keep] = a
    if ctx is not None:
        ctx["nash_alpha"] = alpha_all.clone()
    return alpha_all


def imtl_weights(G, ctx=None):
    """IMTL-G (Liu et al., ICLR 2021): the update d = sum_t a_t g_t has equal projections onto every
    unit gradient u_t = g_t / ||g_t||. With D rows g_1 - g_t and U rows u_1 - u_t (t >= 2):
    a_{2..T} = g_1 U^T (D U^T)^{-1}, a_1 = 1 - sum a_{2..T}; every product is read from G. Invariant
    to scaling a task's loss."""
    def solve(G):
        T = G.shape[0]
        if T == 1:
            return torch.ones(1, dtype=torch.float64)
        n = G.diagonal().sqrt()
        # <g_i, u_j> = G[i, j] / n_j
        P = G / n[None, :]
        gU = P[0, 0] - P[0, 1:]                                       # g_1 . (u_1 - u_t)
        DU = (P[0, 0] - P[0, 1:])[None, :] - (P[1:, 0][:, None] - P[1:, 1:])  # (g_1 - g_s) . (u_1 - u_t)
        a_rest = gU @ torch.linalg.pinv(DU)
        return torch.cat([1 - a_rest.sum()[None], a_rest])
    return _on_nonzero(G, solve)


def aligned_mtl_weights(G, ctx=None):
    """Aligned-MTL (Senushkin et al., CVPR 2023; as LibMTL's Aligned_MTL): with G = V diag(l) V^T over
    its numerically non-zero eigenvalues, B = sqrt(l_min) V diag(l^-1/2) V^T and w = B.sum(0): the aligned
    task gradients (rows of B applied to the gradients) have condition number 1."""
    G = torch.as_tensor(G, dtype=torch.float64)
    lam, V = torch.linalg.eigh(G)
    tol = float(lam.max()) * G.shape[0] * torch.finfo(torch.float32).eps
    keep = lam > tol
    if not keep.any():
        return torch.zeros(G.shape[0], dtype=torch.float64)
    lam, V = lam[keep], V[:, keep]
    B = lam.min().sqrt() * (V @ torch.diag(lam.rsqrt()) @ V.T)
    return B.sum(0)


AGGREGATORS = {
    "pcgrad": pcgrad_weights,
    "mgda": mgda_weights,
    "cagrad": cagrad_weights,
    "nash_mtl": nash_mtl_weights,
    "imtl": imtl_weights,
    "aligned_mtl": aligned_mtl_weights,
}
