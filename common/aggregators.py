"""Gradient aggregators as pure functions of the Gram matrix (TorchJD's split of weighting and combine).

Every method here is a *weighting*: it maps the T x T Gram matrix G of the per-task gradients of the
shared part (float64, G[i, j] = <g_i, g_j>) to T float64 weights w, and the shared update is
d = sum_t w_t g_t, formed elsewhere by gradagg.combine (the csrc/ kernel) straight into .grad:

    G = gradagg.gram(buf)                        # [T, T]
    w = mgda_weights(G)                          # any method below, a tiny T x T problem
    gradagg.combine(buf, w, out=flat_grad)       # one pass over the gradients

No model and no gradient is seen here, so each rule is tested on hand-made matrices
(tests/test_aggregators.py). The solvers work in float64 on the CPU (numpy; T is 2..10) and return a
CPU float64 tensor. Each method is invariant to scaling G as a whole wherever its paper's rule is, because
each solver first divides G by a scalar (its trace, or its Frobenius norm for Nash-MTL as the official
code does) and undoes that where the rule depends on the scale.

A task whose gradient is zero (G[t, t] <= 1e-14 * max_s G[s, s]) cannot be hurt or helped to first order;
MGDA, Nash-MTL and IMTL-G are undefined or degenerate with it (the min-norm point is 0; 1/alpha_t and
u_t = g_t / ||g_t|| do not exist), so they solve on the other tasks and give it weight 0. CAGrad keeps
it in the mean gradient g0 (as the official code) but not in its worst case; Aligned-MTL drops it with
the null eigenvectors; PCGrad skips it as a projection target.

The contract (TorchJD's aggregators, LibMTL's one class per method): an aggregator is a small class,
    aggregator = PCGrad(seed=0)            # or PCGrad.from_args(args): its flags come from add_args
    w = aggregator(G)                      # [T, T] -> [T] float64, CPU
    aggregator.report                      # what the last call noticed (e.g. Nash-MTL had no solution)
    aggregator.state_dict() / load_state_dict(state)   # its state (PCGrad's generator, warm starts)
that owns its hyper-parameters (one default, in one place: its __init__, mirrored by add_args) and its
state. AGGREGATORS = {cls.name: cls}; common.multitask loops over it to add every flag. The pure
functions below (pcgrad_weights, mgda_weights, ...) are the rules themselves, tested on hand-made
matrices; the classes only hold hyper-parameters and state around them.
"""
import inspect
import math

import numpy as np
import torch

from common.state import Stateless


ZERO_GRAD = 1e-14  # G[t, t] <= ZERO_GRAD * max_s G[s, s]: task t's gradient counts as zero


# ----------------------------------------------------------------------------- helpers

def _check_gram(G, who):
    """G as a CPU float64 tensor [T, T], checked: square, at least one task, finite. Otherwise an error that
    names the method (who) and the problem: ValueError for the shape, FloatingPointError for nan / inf."""
    G = torch.as_tensor(G).detach()
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"{who}: the Gram matrix must be square [T, T], got shape {tuple(G.shape)}")
    if G.shape[0] == 0:
        raise ValueError(f"{who}: the Gram matrix is empty (0 tasks): there is nothing to aggregate")
    G = G.to("cpu", torch.float64)
    if not torch.isfinite(G).all():
        raise FloatingPointError(f"{who}: the Gram matrix is not finite (nan or inf): {G.tolist()}")
    return G


def _gram(G, who="aggregators"):
    """G as a symmetric float64 numpy array [T, T] (checked by _check_gram)."""
    G = _check_gram(G, who).numpy()
    return 0.5 * (G + G.T)


def _nonzero(G):
    """Indices of the tasks whose gradient is not zero."""
    d = np.diag(G)
    top = d.max() if d.size else 0.0
    return np.flatnonzero(d > max(ZERO_GRAD * top, 0.0)) if top > 0 else np.zeros(0, dtype=int)


def _weights(w):
    return torch.as_tensor(np.asarray(w, dtype=np.float64).copy())


def _supports(T):
    """Every non-empty subset of the T tasks, as index arrays (2^T - 1 of them: 31 for T = 5)."""
    return [np.flatnonzero([(mask >> t) & 1 for t in range(T)]) for mask in range(1, 2 ** T)]


def _affine_solve(A, rhs):
    """Solve [[A, 1], [1^T, 0]] [x; y] = rhs (rhs [k + 1, m]) and return x [k, m]; None if singular.

    With A the Gram matrix of k points and the weights x constrained to sum to rhs[k], this is the
    stationarity condition of a quadratic on the affine hull of the points; it is singular exactly
    when the points are affinely dependent (then a smaller support holds an optimum)."""
    k = A.shape[0]
    K = np.zeros((k + 1, k + 1))
    K[:k, :k] = A
    K[:k, k] = K[k, :k] = 1.0
    try:
        x = np.linalg.solve(K, rhs)[:k]
    except np.linalg.LinAlgError:
        return None
    return x if np.isfinite(x).all() else None


def _feasible(w, tol=1e-9):
    """w clipped onto the simplex if it is on it up to tol, else None."""
    if w.min() < -tol:
        return None
    w = np.maximum(w, 0.0)
    return w / w.sum()


def _min_norm_simplex(A):
    """argmin_{w in simplex} w^T A w for a PSD A scaled to trace 1: the min-norm point of the convex hull.

    T = 2: the paper's closed form (Algorithm 1, clipped to [0, 1]). T > 2: the paper's Algorithm 2 is
    Frank-Wolfe; this is the exact solve of the same T-dimensional problem by active sets: the optimum
    is the min-norm point of the affine hull of its support S (an affinely independent subset), so each
    of the 2^T - 1 supports gives a candidate from one small linear system (~1 ms for T = 5; the cost
    doubles with each task, fine up to T ~ 12).
    The problem is convex, so a feasible candidate that satisfies the optimality (KKT) condition
        <g_t, d> >= ||d||^2 for every task t   ((A w)_t >= w^T A w)
    is the optimum. Candidates are ranked by their worst violation of it, measured relative to
    ||g_t|| ||d|| (a cosine-like scale), not by their objective value: with gradient norms spread by
    1e5-1e6 the objective values of rival candidates differ by less than any absolute tolerance, and an
    absolute comparison picked updates that increase a small task's loss.
    """
    T = A.shape[0]
    if T == 1:
        return np.ones(1)
    if T == 2:
        denom = A[0, 0] + A[1, 1] - 2 * A[0, 1]            # ||g_1 - g_2||^2
        gamma = 0.5 if denom <= 1e-300 else min(max((A[1, 1] - A[0, 1]) / denom, 0.0), 1.0)
        return np.array([gamma, 1.0 - gamma])
    norms = np.sqrt(np.clip(np.diag(A), 0.0, None))
    best, best_key = np.full(T, 1.0 / T), (np.inf, np.inf)
    for S in _supports(T):
        x = _affine_solve(A[np.ix_(S, S)], np.eye(len(S) + 1)[:, -1])
        if x is None or (x := _feasible(x)) is None:
            continue
        w = np.zeros(T)
        w[S] = x
        Aw = A @ w
        value = max(float(w @ Aw), 0.0)
        violation = float(np.max((value - Aw) / (norms * math.sqrt(value) + 1e-300))) if value > 0 else 0.0
        key = (max(violation, 0.0), value)
        if key < best_key:
            best, best_key = w, key
    return best


# ----------------------------------------------------------------------------- methods

def pcgrad_order(T, generator=None):
    """Random projection order of PCGrad: row i is a permutation of the tasks j != i, LongTensor [T, T-1]."""
    if T < 1:
        raise ValueError(f"pcgrad_order: need at least one task, got T={T}")
    order = torch.empty(T, T - 1, dtype=torch.long)
    for i in range(T):
        others = torch.tensor([j for j in range(T) if j != i], dtype=torch.long)
        order[i] = others[torch.randperm(T - 1, generator=generator)]
    return order


def _check_order(order, T):
    order = torch.as_tensor(order, dtype=torch.long).cpu()
    if order.shape != (T, max(T - 1, 0)):
        raise ValueError(f"PCGrad order must have shape ({T}, {T - 1}), got {tuple(order.shape)}")
    for i, row in enumerate(order.tolist()):
        if sorted(row) != [j for j in range(T) if j != i]:
            raise ValueError(f"PCGrad order row {i} must be a permutation of the other tasks, got {row}")
    return order.tolist()


def pcgrad_coefficients(G, order):
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020) as a weighting:
    Gram matrix [T, T] -> weights [T] (float64) of the shared update.

    Each projected g_i' is a combination C_i . g of the original gradients. For task i, over j in
    order[i]: if <g_i', g_j> = C_i . G[:, j] < 0, then C_i -= <g_i', g_j> / G[j, j] * e_j (a zero g_j,
    G[j, j] == 0, is skipped). The update sum_i g_i' = (sum_i C_i) . g, so the weights are C.sum(0)
    (they sum to about T: the official reduction is the sum of the projected gradients).
    """
    G = _check_gram(G, "pcgrad_coefficients")
    T = G.shape[0]
    order = _check_order(order, T)
    g = G.tolist()  # T is small: plain Python floats are faster than tensor ops here
    weights = [0.0] * T
    for i in range(T):
        c = [0.0] * T
        c[i] = 1.0
        for j in order[i]:
            if g[j][j] <= 0.0:
                continue
            dot = sum(c[k] * g[k][j] for k in range(T))
            if dot < 0.0:
                c[j] -= dot / g[j][j]
        for k in range(T):
            weights[k] += c[k]
    return torch.tensor(weights, dtype=torch.float64)


def pcgrad_reference(grads, order):
    """Plain PyTorch PCGrad (pairwise sequential projections), in grads' dtype: grads [T, P] -> update [P].
    The textbook loop, kept as the reference of the tests and the naive baseline of the benchmark."""
    T = grads.shape[0]
    order = _check_order(order, T)
    update = torch.zeros_like(grads[0])
    for i in range(T):
        g_i = grads[i].clone()
        for j in order[i]:
            g_j = grads[j]
            dot = torch.dot(g_i, g_j)
            if dot < 0:
                g_i -= dot / torch.dot(g_j, g_j) * g_j
        update += g_i
    return update


def mgda_weights(G, normalize="none"):
    """MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018).

    The update is the min-norm point of the convex hull of the task gradients:
        w = argmin_{w in simplex} w^T G w,   d = sum_t w_t g_t,
    a common descent direction (<d, g_t> >= ||d||^2 for every t) unless d = 0 (Pareto-stationary).
    T = 2 in closed form (the paper's Algorithm 1); T > 2 exactly by active sets (_min_norm_simplex)
    where the paper runs Frank-Wolfe (Algorithm 2; the official code and LibMTL a projected-gradient
    variant, 250 iterations, stop at 1e-5; TorchJD Frank-Wolfe, 100 iterations, stop at step 1e-3).
    Returns w on the simplex (sum 1), as LibMTL and the official code; the update is sum_t w_t g_t.
    Zero gradients get weight 0 and take no part (with them the exact min-norm point would be d = 0).
    MGDA-UB (the paper's upper bound) is this same function applied to the Gram matrix of the gradients
    of the shared representation (--grad-space representation), not of the shared parameters.

    normalize: "none" (default, as LibMTL's mgda_gn default) or "l2": the min-norm point of the unit
    gradients g_t / ||g_t||; the weights returned then apply to the original gradients (sol_t / ||g_t||),
    which is LibMTL's convention (it combines the normalised gradients). The official code's "loss" and
    "loss+" normalisers need the losses, which a Gram matrix does not carry.
    """
    G = _gram(G, "mgda_weights")
    w = np.zeros(G.shape[0])
    keep = _nonzero(G)
    if keep.size == 0:
        return _weights(w)
    A = G[np.ix_(keep, keep)]
    norms = np.sqrt(np.diag(A))
    if normalize == "l2":
        A = A / np.outer(norms, norms)
    elif normalize != "none":
        raise ValueError(f"mgda_weights: normalize must be 'none' or 'l2', got {normalize!r}")
    sol = _min_norm_simplex(A / np.trace(A))
    w[keep] = sol / norms if normalize == "l2" else sol
    return _weights(w)


def cagrad_weights(G, c=0.5, rescale=1):
    """CAGrad (Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021; official code Cranial-XIX/CAGrad nyuv2/utils.py cagrad(), c = alpha = 0.5, rescale = 1;
    LibMTL CAGrad.py the same).

    The update maximises the worst task's improvement min_t <d, g_t> in the ball ||d - g0|| <= c ||g0||
    around the mean gradient g0 = sum_t g_t / T. With sqrt(phi) = c ||g0|| its dual is T-dimensional:
        w = argmin_{w in simplex}  F(w) = w^T G b + sqrt(phi) ||g_w||,   b = 1/T,  ||g_w|| = sqrt(w^T G w),
    and then d = g0 + sqrt(phi) / ||g_w|| * g_w, i.e. weights = 1/T + sqrt(phi) / ||g_w|| * w, so that
    ||d - g0|| = c ||g0|| exactly. rescale: 0 returns d, 1 (the official default) d / (1 + c^2),
    2 d / (1 + c). c = 0 gives exactly the mean weights 1/T.
    Solver (the official code: scipy SLSQP from w = 1/T): exact, by active sets. On the support S of the
    optimum, stationarity b + (sqrt(phi) / ||g_w||) G w = lambda 1 with nu = ||g_w|| / sqrt(phi) makes w
    affine in nu, w = w0 + nu w1 (one linear system on S), and ||g_w|| = sqrt(phi) nu is a quadratic
    equation in nu; every support and root with w >= 0 is a candidate and the one with the smallest F is
    the optimum (2^T - 1 supports; ~1 ms for T = 5). The root nu = 0 (g_w = 0 optimal, e.g. with two
    opposite gradients) comes out of the rounding as a tiny number of either sign (~ -1e-15): a negative
    root down to -max(1e-6, 1e-7 / sqrt(phi)) is taken as 0 (on G / trace, ||g_w|| is only known to
    ~sqrt(eps)), and g_w counts as 0 below that same ratio nu (issue 26: a rejected nu = 0 gave
    d = g0 + c ||g0|| u for a unit u, 0.5 ||g0|| away from the optimum's d = g0).
    Deviations from the official code: none of its 1e-8 epsilons (sqrt(mean(G) + 1e-8) etc.), so the
    rule is invariant to the scale of G; the dual is solved over the non-zero gradients only (a zero
    gradient cannot be hurt), g0 is still the mean over all T; where the optimum is g_w = 0 (0 is in
    the convex hull of the gradients and nothing does better: no conflict-averse direction) d = g0, as the
    official code gives for an exact zero; g0 = 0 gives d = 0.
    """
    if c < 0:
        raise ValueError(f"cagrad_weights: c must be >= 0, got {c}")
    if rescale not in (0, 1, 2):
        raise ValueError(f"cagrad_weights: rescale must be 0, 1 or 2, got {rescale}")
    G = _gram(G, "cagrad_weights")
    T = G.shape[0]
    scale = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    mean = np.full(T, 1.0 / T)
    keep = _nonzero(G)
    g0_sq = float(mean @ G @ mean)                        # ||g0||^2
    if c == 0 or keep.size == 0 or g0_sq <= 1e-16 * np.trace(G):
        return _weights(mean / scale)
    trace = np.trace(G)                                   # the dual is scale-free: solve on G / trace
    A = G[np.ix_(keep, keep)] / trace
    b = (G @ mean)[keep] / trace                          # <g_t, g0>
    r = c * math.sqrt(g0_sq / trace)                      # sqrt(phi)

    def F(w):
        return b @ w + r * math.sqrt(max(w @ A @ w, 0.0))

    # nu = ||g_w|| / sqrt(phi) is read from ||g_w||^2 = w^T A w, so on this trace-1 scale ||g_w|| is known
    # only to ~sqrt(float64 eps) ~ 1e-8: a root nu = 0 (g_w = 0) comes out as a tiny number of either sign
    # (-1.4e-15 seen with two opposite gradients). A negative root down to -nu_zero is that root and is
    # clipped to 0; nu_zero also decides, below, when the optimum counts as g_w = 0.
    nu_zero = max(1e-6, 1e-7 / r)
    best, best_value = None, np.inf
    for S in _supports(keep.size):
        A_S = A[np.ix_(S, S)]
        rhs = np.zeros((len(S) + 1, 2))
        rhs[-1, 0], rhs[:-1, 1] = 1.0, -b[S]              # w = w0 + nu * w1
        x = _affine_solve(A_S, rhs)
        if x is None:
            continue
        w0, w1 = x[:, 0], x[:, 1]
        # ||g_w||^2 = (w0 + nu w1)^T A (w0 + nu w1) = r^2 nu^2:  q2 nu^2 + 2 q1 nu + q0 = 0
        q2, q1, q0 = w1 @ A_S @ w1 - r * r, w0 @ A_S @ w1, w0 @ A_S @ w0
        if abs(q2) > 1e-14:
            disc = math.sqrt(max(q1 * q1 - q2 * q0, 0.0))
            roots = [(-q1 + disc) / q2, (-q1 - disc) / q2]
        else:
            roots = [-q0 / (2 * q1)] if q1 != 0 else []
        for nu in roots:
            if -nu_zero <= nu < 0:
                nu = 0.0
            if not nu >= 0 or (w_S := _feasible(w0 + nu * w1)) is None:
                continue
            w = np.zeros(keep.size)
            w[S] = w_S
            if (value := F(w)) < best_value - 1e-15:
                best, best_value = w, value
    weights = mean.copy()
    gw_norm = math.sqrt(max(best @ A @ best, 0.0))        # ||g_w|| / sqrt(trace)
    if gw_norm > nu_zero * r:                             # else: the optimum is g_w = 0, d = g0
        weights[keep] += r / gw_norm * best
    return _weights(weights / scale)


def nash_mtl_weights(G, max_norm=1.0, max_iter=50, state=None, return_state=False, ridge=1e-10):
    """Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022; official code AvivNavon/nash-mtl methods/weight_methods.py NashMTL,
    max_norm = 1.0, optim_niter = 20, update_weights_every = 1; LibMTL Nash_MTL.py is the same).

    The Nash bargaining solution is d = sum_t alpha_t g_t with alpha > 0 solving
        G alpha = 1 / alpha   (elementwise; then <d, g_t> = 1 / alpha_t for every task).
    Scale: the official code divides G by s = ||G||_F before its cvxpy solve, but its constraint
    log(alpha_t * s) + log((G alpha / s)_t) >= 0 puts s back, so the alpha it converges to solves the
    condition on the raw G (not on G / s: that one is alpha * sqrt(s)). This function returns that alpha,
    for which ||d||^2 = alpha^T G alpha = T whatever the scale of the gradients. Then, as the official
    clip_grad_norm_(shared_parameters, max_norm), alpha is multiplied by min(1, max_norm / ||d||) when
    max_norm > 0 (with the default 1.0 and T >= 2, ||d|| = 1 every step, as in the official code);
    max_norm = 0 returns the solution itself. The clip acts on the update in the space G was taken in
    (the official code: the shared parameters).
    Solver: with n_t = ||g_t|| and C = G / (n n^T) the cosine matrix, alpha_t = b_t / n_t where
    C b = 1 / b: this removes the scale of each task exactly (the paper's invariance: scaling g_t by k
    scales alpha_t by 1/k and leaves d unchanged). b is the minimiser of the strictly convex
        f(b) = b^T (C + ridge I) b / 2 - sum_t log b_t,
    found by Newton's method, damped by a backtracking line search that keeps b > 0, until the Newton
    decrement reaches the float64 floor (usually 4-7 steps; at most max_iter), instead of the official
    sequence of convex approximations solved by cvxpy/ECOS (optim_niter = 20 rounds, stopping at
    ||G alpha - 1/alpha|| < 1e-3). Where no solution exists (0 in the convex hull of the unit gradients,
    e.g. two opposite gradients; has_no_bargaining_solution) it raises NoBargainingSolution: the
    Newton iterates would run off to weights near 3e3 with a vanishing update. The NashMTL class then
    does what the official code does when its ECOS solve fails: it keeps the previous step's alpha
    (ones at the first step) and reports the step. The ridge (1e-10 on the unit diagonal of C) keeps
    the Newton system regular near that boundary.
    Warm start: state is the previous solution b (a float64 tensor [T], used when it has length T and is
    positive on the non-zero gradients; None: cold start from b = 1 scaled to b^T C b = T). With
    return_state=True the function returns (alpha, b) to pass as the next state. Zero gradients get 0.
    """
    G = _gram(G, "nash_mtl_weights")
    T = G.shape[0]
    alpha = np.zeros(T)
    b_all = np.zeros(T)
    keep = _nonzero(G)
    if keep.size:
        Gk = G[np.ix_(keep, keep)]
        n = np.sqrt(np.diag(Gk))
        cosines = Gk / np.outer(n, n)
        if has_no_bargaining_solution(cosines):
            raise NoBargainingSolution("Nash-MTL: 0 lies in the convex hull of the unit task gradients "
                                       "(e.g. two opposite gradients): no update helps every task")
        C = cosines + ridge * np.eye(keep.size)
        warm = None if state is None else torch.as_tensor(state, dtype=torch.float64).cpu().numpy()
        if warm is not None and warm.shape == (T,) and np.isfinite(warm).all() and (warm[keep] > 0).all():
            b = warm[keep].copy()
        else:
            b = np.ones(keep.size)
            b *= math.sqrt(keep.size / (b @ C @ b))         # the solution has b^T C b = T

        def f(x):
            return 0.5 * x @ C @ x - np.log(x).sum()

        previous = math.inf
        for _ in range(max_iter):
            grad = C @ b - 1.0 / b
            newton = np.linalg.solve(C + np.diag(1.0 / b ** 2), grad)
            decrement = grad @ newton                        # lambda^2: f(b) - min f ~ lambda^2 / 2
            if decrement < 1e-20 or (decrement < 1e-8 and decrement > 0.5 * previous):
                break                                        # converged, or at the float64 floor
            t = 1.0
            if decrement > 0.0625:                           # damped phase (lambda > 1/4): backtrack
                f0 = f(b)
                while t > 1e-10 and not ((b - t * newton > 0).all()
                                         and f(b - t * newton) <= f0 - 0.25 * t * decrement):
                    t *= 0.5
            b = b - t * newton                               # lambda < 1/4: a full step stays > 0
            previous = decrement
        b_all[keep] = b
        alpha[keep] = b / n
        if max_norm > 0:
            norm = math.sqrt(max(alpha @ G @ alpha, 0.0))    # ||d||
            if norm > max_norm:
                alpha *= max_norm / norm
    if return_state:
        return _weights(alpha), _weights(b_all)
    return _weights(alpha)


class NoBargainingSolution(ArithmeticError):
    """G alpha = 1 / alpha has no positive solution: no direction has <d, g_t> > 0 for every task."""


def has_no_bargaining_solution(cosines, tol=1e-9):
    """By Gordan's theorem a d with <d, g_t> > 0 for every t exists unless 0 is in the convex hull of
    the gradients; for the unit gradients (cosine matrix C, trace T) that is min_{w in simplex} w^T C w = 0.
    tol: below this min-norm value (relative to the unit scale) the solution's weights would exceed
    ~1/sqrt(tol) and the update vanish: treated as none."""
    T = cosines.shape[0]
    if T < 2:
        return False
    w = _min_norm_simplex(cosines / T)
    return float(w @ cosines @ w) < tol


def imtl_weights(G):
    """IMTL-G, the gradient part of IMTL (Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards
    Impartial Multi-task Learning", ICLR 2021; as LibMTL's IMTL.py and SamsungLabs/MTL imtl/balancer.py).

    The update d = sum_t a_t g_t has the same projection onto every task's unit gradient
    u_t = g_t / ||g_t||, with sum_t a_t = 1. With D the rows g_1 - g_t and U the rows u_1 - u_t
    (t = 2..T), the paper's closed form is
        a_{2..T} = g_1 U^T (D U^T)^{-1},   a_1 = 1 - sum_{t>=2} a_t,
    and every product is read from G: <g_i, u_j> = G[i, j] / sqrt(G[j, j]), so
    (g_1 U^T)_t = P_11 - P_1t and (D U^T)_st = P_11 - P_1t - P_s1 + P_st with P[i, j] = <g_i, u_j>.
    A singular D U^T (linearly dependent gradients) uses the pseudo-inverse, where the references use
    torch.inverse (LibMTL) or add 1e-8 I (SamsungLabs); zero gradients get weight 0 (u_t is undefined).
    The direction of d does not change when a task's loss is scaled. Only the gradient part: IMTL-L, the
    learned loss scales, would be a loss weighting. If the equal projection comes out negative (d would
    increase every loss to first order), the weights are negated (a deviation; the closed form is then
    an ascent direction).
    """
    G = _gram(G, "imtl_weights")
    w = np.zeros(G.shape[0])
    keep = _nonzero(G)
    if keep.size == 0:
        return _weights(w)
    Gk = G[np.ix_(keep, keep)] / np.trace(G)
    if keep.size == 1:
        w[keep] = 1.0
        return _weights(w)
    norms = np.sqrt(np.diag(Gk))
    P = Gk / norms[None, :]                              # P[i, j] = <g_i, u_j>
    gU = P[0, 0] - P[0, 1:]                               # g_1 . (u_1 - u_t)
    DU = gU[None, :] - (P[1:, :1] - P[1:, 1:])            # (g_1 - g_s) . (u_1 - u_t)
    a_rest = gU @ np.linalg.pinv(DU, rcond=1e-12)
    a = np.concatenate([[1.0 - a_rest.sum()], a_rest])
    if (Gk @ a)[0] / norms[0] < 0:                        # the common projection <d, u_t>
        a = -a
    w[keep] = a
    return _weights(w)


def aligned_mtl_weights(G, scale_mode="min", reduction="sum"):
    """Aligned-MTL (Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023; official code SamsungLabs/MTL code/optim/aligned/solver.py
    ProcrustesSolver and balancer.py AlignedMTLBalancer, scale_mode = "min"; LibMTL Aligned_MTL.py).

    The task gradients are replaced by aligned ones whose matrix has condition number 1: with the
    eigendecomposition G = V diag(lambda) V^T over the eigenvalues above lambda_max * T * eps(float32)
    (the official rank cut, float32 eps as torch.finfo()), the balance transformation is
        B = sqrt(lambda_min) V diag(lambda^-1/2) V^T     (lambda_min: the smallest kept eigenvalue),
    the aligned gradients are the rows of B g (their Gram matrix B G B = lambda_min * projector: all
    singular values sqrt(lambda_min)), and the update is their sum: weights = B @ 1 (official;
    reduction="mean" gives B @ 1/T, TorchJD's default preference vector). scale_mode "median" and
    "rmse" use the median (lower) and the mean kept eigenvalue instead of lambda_min, as the official
    options. Zero gradients fall in the null space and get weight 0; all-zero G gives zeros.
    """
    G = _gram(G, "aligned_mtl_weights")
    T = G.shape[0]
    if T == 0 or not np.diag(G).max() > 0:
        return _weights(np.zeros(T))
    lam, V = np.linalg.eigh(G)
    keep = lam > lam.max() * T * np.finfo(np.float32).eps
    lam, V = lam[keep], V[:, keep]
    if scale_mode == "min":
        sigma2 = lam.min()
    elif scale_mode == "median":
        sigma2 = np.sort(lam)[(lam.size - 1) // 2]         # torch.median: the lower median
    elif scale_mode == "rmse":
        sigma2 = lam.mean()
    else:
        raise ValueError(f"aligned_mtl_weights: scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
    B = math.sqrt(sigma2) * (V / np.sqrt(lam)) @ V.T
    if reduction == "sum":
        pref = np.ones(T)
    elif reduction == "mean":
        pref = np.full(T, 1.0 / T)
    else:
        raise ValueError(f"aligned_mtl_weights: reduction must be 'sum' or 'mean', got {reduction!r}")
    return _weights(B @ pref)


def upgrad_weights(G, reg_eps=0.0, pref=None):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024; TorchJD's
    aggregation/_upgrad.py and _utils/dual_cone.py).

    Each task gradient g_i (scaled by its preference u_i, 1/T by default) is projected onto the dual cone
    of all task gradients {x : <g_j, x> >= 0 for every j}, and the projections are summed: with
    pref = 1/T the update is the mean of the projected gradients. By the paper's Proposition 1 the
    projection of J^T u is J^T v with
        v = argmin_{v >= u} v^T G v,
    so everything is read from G. Solved exactly by active sets over the 2^T splits of the tasks into
    free (v_j > u_j, (G v)_j = 0) and bound (v_j = u_j, (G v)_j >= 0) ones, where TorchJD calls quadprog;
    the problem is strictly convex, so the split whose solution satisfies these conditions is the
    optimum. Splits are ranked by their worst violation of them: v_j < u_j relative to max(u), and
    <g_j, d> < 0 relative to ||g_j|| ||J^T u||, the norms of the task and of the vector projected (the same
    for every split of one projection), not to ||d||: where the projection is d = 0 (two opposite
    gradients, g_1 = -k g_0) the exact split's d is rounding noise, which a cosine with it ranked
    below a wrong split whose update conflicts with a task (issue 26).
    Consequences: every projected gradient, and so the update, has <g_j, d> >= 0 for every task (no
    conflict to first order); a set of gradients without conflict (G >= 0 entrywise) is left as its mean.
    As TorchJD, G is first divided by its trace. Differences, both intended: TorchJD then adds
    reg_eps * I with reg_eps = 1e-4 so that its QP solver (quadprog) sees a strictly convex problem;
    with gradient norms spread by 1e3 that term dominates the small tasks' entries and the update then
    conflicts with them (tests/test_aggregators.py measures it), so the default here is reg_eps = 0,
    the paper's exact projection, which the active-set solve handles (least squares on singular blocks);
    --upgrad-reg-eps 1e-4 gives TorchJD's. TorchJD also sets G to 0 when its trace is below an absolute
    norm_eps = 1e-4, which would turn UPGrad into the mean whenever gradients are small; here only an
    exactly zero G is treated so (weights 1/T).
    """
    G = _gram(G, "upgrad_weights")
    T = G.shape[0]
    u_all = np.full(T, 1.0 / T) if pref is None else np.asarray(pref, dtype=np.float64)
    if u_all.shape != (T,) or (u_all < 0).any():
        raise ValueError(f"upgrad_weights: pref must be {T} non-negative numbers, got {pref}")
    trace = np.trace(G)
    if T == 0 or not trace > 0:
        return _weights(u_all)
    A = G / trace + reg_eps * np.eye(T)
    total = np.zeros(T)
    for i in range(T):
        u = np.zeros(T)
        u[i] = u_all[i]
        total += _dual_cone_projection(A, u, u_all.max())
    return _weights(total)


def _dual_cone_projection(A, u, u_scale):
    """v = argmin_{v >= u} v^T A v: the weights of the projection of J^T u onto the dual cone of the rows
    of J (A = J J^T, here G / trace + reg_eps I), exactly by active sets over the 2^T splits of the tasks
    into free and bound ones (see upgrad_weights; shared by UPGrad and DualProj). u_scale: the scale of
    the condition v >= u (the largest preference)."""
    T = A.shape[0]
    norms = np.sqrt(np.clip(np.diag(A), 1e-300, None))
    # the scale of the dual conditions: ||J^T u|| (the vector projected), the same for every split
    u_norm = math.sqrt(max(float(u @ A @ u), 0.0))
    best, best_violation = u, np.inf
    for F in [np.zeros(0, dtype=int)] + _supports(T):
        v = u.copy()
        if F.size:
            B = np.setdiff1d(np.arange(T), F)
            # least squares: a singular block (linearly dependent gradients) still has solutions
            v[F] = np.linalg.lstsq(A[np.ix_(F, F)], -A[np.ix_(F, B)] @ u[B], rcond=None)[0]
        Av = A @ v
        bound = np.setdiff1d(np.arange(T), F)
        violation = max(float(np.max(u[F] - v[F], initial=0.0)) / max(u_scale, 1e-300),
                        float(np.max(-Av[bound] / np.maximum(norms[bound] * u_norm, 1e-300), initial=0.0)))
        if violation < best_violation:
            best, best_violation = v, violation
    return best


# ----------------------------------------------------------------------------- the aggregator classes

def _default(cls, name):
    """The default of a hyper-parameter: the one in cls.__init__'s signature (one place)."""
    return inspect.signature(cls.__init__).parameters[name].default


class Aggregator(Stateless):
    """Gram matrix [T, T] -> weights [T] (float64, CPU). Subclasses hold their hyper-parameters (with
    the defaults in __init__'s signature) and their state, and add one flag per hyper-parameter."""
    name = None
    rule_kind = "aggregator"  # run records store kind, name and version (common/versions.py)
    version = 1               # bump in the subclass whose results change
    needs_task_grad_matrix = False  # True: a gradient rule (common/gradient_rules.py) that takes the T x P rows

    def __init__(self):
        self.report = {}  # what the last call noticed, for the run's decisions

    def __call__(self, G):
        raise NotImplementedError

    def check(self, G):
        """G as a CPU float64 tensor [T, T]; an error naming this method where G is not square, is empty
        (0 tasks) or is not finite. Every __call__ starts with it."""
        return _check_gram(G, f"{type(self).__name__} aggregator ({self.name})")

    @classmethod
    def add_args(cls, group):
        pass

    @classmethod
    def from_args(cls, args):
        return cls()


class PCGrad(Aggregator):
    """Projecting conflicting gradients (pcgrad_coefficients). The random projection order is drawn
    from the aggregator's own generator (checkpointed). reduction: "sum" of the projected gradients
    (the official TensorFlow code) or "mean" (the popular PyTorch port's default)."""
    name = "pcgrad"

    def __init__(self, seed=0, reduction="sum"):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"PCGrad: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.generator = torch.Generator().manual_seed(seed + 7919)

    def __call__(self, G):
        G = self.check(G)
        T = G.shape[0]
        w = pcgrad_coefficients(G, pcgrad_order(T, self.generator))
        return w / T if self.reduction == "mean" else w

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    @classmethod
    def add_args(cls, group):
        group.add_argument("--pcgrad-reduction", choices=("sum", "mean"), default=_default(cls, "reduction"))

    @classmethod
    def from_args(cls, args):
        return cls(seed=args.seed, reduction=args.pcgrad_reduction)


class MGDA(Aggregator):
    """Min-norm point of the convex hull of the task gradients (mgda_weights). On the gradients of the
    shared representation (--grad-space representation) this is the paper's MGDA-UB."""
    name = "mgda"

    def __init__(self, normalize="none"):
        super().__init__()
        self.normalize = normalize

    def __call__(self, G):
        return mgda_weights(self.check(G), normalize=self.normalize)

    @classmethod
    def add_args(cls, group):
        group.add_argument("--mgda-normalize", choices=("none", "l2"), default=_default(cls, "normalize"))

    @classmethod
    def from_args(cls, args):
        return cls(normalize=args.mgda_normalize)


class CAGrad(Aggregator):
    """Conflict-averse gradient descent (cagrad_weights); c = 0.5 and rescale = 1 as the official code."""
    name = "cagrad"

    def __init__(self, c=0.5, rescale=1):
        super().__init__()
        self.c, self.rescale = c, rescale

    def __call__(self, G):
        return cagrad_weights(self.check(G), c=self.c, rescale=self.rescale)

    @classmethod
    def add_args(cls, group):
        group.add_argument("--cagrad-c", type=float, default=_default(cls, "c"))
        group.add_argument("--cagrad-rescale", type=int, choices=(0, 1, 2), default=_default(cls, "rescale"))

    @classmethod
    def from_args(cls, args):
        return cls(c=args.cagrad_c, rescale=args.cagrad_rescale)


class NashMTL(Aggregator):
    """Nash bargaining weights (nash_mtl_weights), warm started from the previous step's solution.
    Where no bargaining solution exists the previous step's alpha is kept (ones at the first step), as
    the official code does when its solver fails, clipped to max_norm like any other step; the step is
    reported as report["nash_no_solution"] = 1."""
    name = "nash_mtl"

    def __init__(self, max_norm=1.0, max_iter=50):
        super().__init__()
        self.max_norm, self.max_iter = max_norm, max_iter
        self.warm = None        # the previous solution b (scale-free), for the warm start
        self.previous = None    # the previous alpha, the fallback

    def __call__(self, G):
        G64 = self.check(G)
        T = G64.shape[0]
        try:
            alpha, self.warm = nash_mtl_weights(G64, self.max_norm, self.max_iter, state=self.warm,
                                                return_state=True)
            self.report = {"nash_no_solution": 0}
        except NoBargainingSolution:
            prev = self.previous
            alpha = prev.clone() if prev is not None and prev.shape == (T,) else torch.ones(T, dtype=torch.float64)
            norm = float(alpha @ G64 @ alpha).__abs__() ** 0.5
            if self.max_norm > 0 and norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
            self.report = {"nash_no_solution": 1}
        self.previous = alpha.clone()
        return alpha

    def state_dict(self):
        return {"warm": self.warm, "previous": self.previous}

    def load_state_dict(self, state):
        self.warm, self.previous = state["warm"], state["previous"]

    @classmethod
    def add_args(cls, group):
        group.add_argument("--nash-max-norm", type=float, default=_default(cls, "max_norm"),
                           help="clip of the update's norm (0 = off)")
        group.add_argument("--nash-max-iter", type=int, default=_default(cls, "max_iter"))

    @classmethod
    def from_args(cls, args):
        return cls(max_norm=args.nash_max_norm, max_iter=args.nash_max_iter)


class IMTLG(Aggregator):
    """Impartial MTL, gradient part (imtl_weights): equal projections onto every unit task gradient."""
    name = "imtl"

    def __call__(self, G):
        return imtl_weights(self.check(G))


class AlignedMTL(Aggregator):
    """Aligned-MTL (aligned_mtl_weights): the task gradients aligned to condition number 1."""
    name = "aligned_mtl"

    def __init__(self, scale_mode="min", reduction="sum"):
        super().__init__()
        self.scale_mode, self.reduction = scale_mode, reduction

    def __call__(self, G):
        return aligned_mtl_weights(self.check(G), scale_mode=self.scale_mode, reduction=self.reduction)

    @classmethod
    def add_args(cls, group):
        group.add_argument("--aligned-scale-mode", choices=("min", "median", "rmse"),
                           default=_default(cls, "scale_mode"))
        group.add_argument("--aligned-reduction", choices=("sum", "mean"), default=_default(cls, "reduction"))

    @classmethod
    def from_args(cls, args):
        return cls(scale_mode=args.aligned_scale_mode, reduction=args.aligned_reduction)


class UPGrad(Aggregator):
    """Unconflicting projection of gradients (upgrad_weights); reg_eps = 1e-4 is TorchJD's default."""
    name = "upgrad"

    def __init__(self, reg_eps=0.0):
        super().__init__()
        self.reg_eps = reg_eps

    def __call__(self, G):
        return upgrad_weights(self.check(G), reg_eps=self.reg_eps)

    @classmethod
    def add_args(cls, group):
        group.add_argument("--upgrad-reg-eps", type=float, default=_default(cls, "reg_eps"))

    @classmethod
    def from_args(cls, args):
        return cls(reg_eps=args.upgrad_reg_eps)



# ----------------------------------------------------------------------------- issue 26: the rest of torchjd 0.18
# Every aggregator of torchjd 0.18 (torchjd.aggregation) that the toolkit lacked and that is a function of the
# T x T Gram matrix (with state where torchjd keeps some): DualProj, ConFIG, GradVac, FairGrad, Krum, PCD, MoDo,
# SDMGrad, CR-MOGM. Each rule is written out from torchjd's source (aggregation/_<name>.py), in the same order
# of operations and with the same epsilons, unless its docstring says otherwise; tests/test_aggregators_more.py
# compares d = w @ J with torchjd's aggregator(J) on random Jacobians. Left out: Mean and Sum (the equal
# weighting: --aggregator sum, up to the factor 1/T), Constant (fixed weights need no Gram matrix: a loss
# weighting), Random (softmax of standard normal draws: --weighting rlw), ExcessMTL (its state is T x P
# squared gradients, not a function of G), TrimmedMean and GradDrop (coordinate-wise).

def dualproj_weights(G, reg_eps=0.0, pref=None):
    """DualProj (torchjd aggregation/_dualproj.py; Lopez-Paz & Ranzato, "Gradient Episodic Memory for
    Continual Learning", NeurIPS 2017, Equation 11): the mean gradient J^T u (u = pref, 1/T by default) is
    projected onto the dual cone {x : <g_j, x> >= 0 for every j}; by Proposition 1 of the TorchJD paper
    the projection is J^T v with v = argmin_{v >= u} v^T G v. So the update conflicts with no task to
    first order, and a set of gradients without conflict is left as its mean. UPGrad projects each
    gradient and averages; DualProj averages and projects once.
    Solved exactly by the active sets of upgrad_weights (_dual_cone_projection) on A = G / trace + reg_eps I.
    The same two differences as UPGrad, intended: reg_eps = 0 by default (torchjd's quadprog projector adds
    1e-4 I, which at norm spreads of 1e3 makes the update conflict with the small tasks;
    --dualproj-reg-eps 1e-4 gives torchjd's), and torchjd's norm_eps = 1e-4 (G set to 0 when its trace is
    below 1e-4, so the mean) is not applied: only an exactly zero G gives the mean."""
    G = _gram(G, "dualproj_weights")
    T = G.shape[0]
    u = np.full(T, 1.0 / T) if pref is None else np.asarray(pref, dtype=np.float64)
    if u.shape != (T,) or (u < 0).any():
        raise ValueError(f"dualproj_weights: pref must be {T} non-negative numbers, got {pref}")
    trace = np.trace(G)
    if not trace > 0:
        return _weights(u)
    A = G / trace + reg_eps * np.eye(T)
    return _weights(_dual_cone_projection(A, u, u.max()))


def config_weights(G, pref=None, rcond=1e-12):
    """ConFIG (Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025, Equation 2; torchjd aggregation/_config.py, adapted from tum-pbs/ConFIG).

    torchjd on J: U = the unit gradients u_t = g_t / ||g_t|| (a zero row stays 0), best = pinv(U) @ pref
    (pref = ones), unit = best / max(||best||, 1e-12), d = (sum_t <g_t, unit>) unit: the direction whose
    cosines with the unit gradients are proportional to pref (equal: conflict-free), scaled by the sum of
    the gradients' projections onto it.
    From G: with n_t = ||g_t||, D+ = diag(1/n_t) (0 for a zero gradient) and C = D+ G D+ the cosine matrix
    U U^T, pinv(U) = U^T C+ (an identity of the pseudo-inverse), so best = U^T a with a = C+ pref,
    ||best||^2 = a^T C a, <g_t, best> = n_t (C a)_t, and the update is d = sum_t w_t g_t with
        w = (n^T C a / a^T C a) D+ a.
    Difference, documented: torchjd's pinv cuts the singular values of U below max(T, P) eps sigma_max;
    here C+ is read from the eigenvalues of C, which are known only to ~1e-16 lambda_max, so eigenvalues
    below rcond lambda_max (singular values of U below 1e-6 sigma_max) count as zero. The two agree unless
    the unit gradients are nearly (not exactly) linearly dependent. Where ||best|| <= 1e-12 (pref has no
    component in the span of the unit gradients, e.g. two opposite gradients and pref = ones) d = 0, where
    torchjd divides rounding noise by 1e-12 (its d is then ~0 as well)."""
    G = _gram(G, "config_weights")
    T = G.shape[0]
    u = np.ones(T) if pref is None else np.asarray(pref, dtype=np.float64)
    if u.shape != (T,):
        raise ValueError(f"config_weights: pref must be {T} numbers, got {pref}")
    n = np.sqrt(np.clip(np.diag(G), 0.0, None))
    inv = np.divide(1.0, n, out=np.zeros(T), where=n > 0)
    C = G * np.outer(inv, inv)
    lam, V = np.linalg.eigh(C)
    if not lam.max() > 0:
        return _weights(np.zeros(T))
    keep = lam > rcond * lam.max()
    a = V[:, keep] @ ((V[:, keep].T @ u) / lam[keep])
    Ca = C @ a
    q = float(a @ Ca)                                     # ||best||^2
    if not math.sqrt(max(q, 0.0)) > 1e-12:
        return _weights(np.zeros(T))
    return _weights((n @ Ca) / q * inv * a)


def gradvac_coefficients(G, order, phi, beta=0.5, eps=1e-8):
    """GradVac (Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021; torchjd aggregation/_gradvac.py, whose
    Gram-matrix form this is). Returns (weights [T], the new phi [T, T]).

    Like PCGrad, each modified gradient g_i' = C_i . g stays a combination of the original gradients.
    For task i (C_i = e_i), over j in order[i] (a random permutation of the other tasks):
        phi_ij = <g_i', g_j> / (||g_i'|| ||g_j|| + eps)                 (read from C_i G and G)
        if phi_ij < phi_hat_ij (the EMA target, 0 at the first step):
            w = ||g_i'|| (phi_hat sqrt(1 - phi_ij^2) - phi_ij sqrt(1 - phi_hat^2))
                / (||g_j|| sqrt(1 - phi_hat^2) + eps)
            C_ij += w                                                   (g_i' += w g_j)
        phi_hat_ij = (1 - beta) phi_hat_ij + beta phi_ij                (phi_ij from before the correction)
    and the update is sum_i g_i', so the weights are C.sum(0). The square roots are of max(., 0).
    eps = 0 with a zero gradient gives 0 / 0, nan in torchjd: here that cosine (or correction) counts as 0.
    phi: the EMA targets [T, T] (float64; zeros at the first step), not changed in place."""
    G = _check_gram(G, "gradvac_coefficients")
    T = G.shape[0]
    order = _check_order(order, T)
    if not 0.0 <= beta <= 1.0 or eps < 0:
        raise ValueError(f"gradvac_coefficients: need beta in [0, 1] and eps >= 0, got beta={beta}, eps={eps}")
    phi = torch.as_tensor(phi, dtype=torch.float64).cpu()
    if phi.shape != (T, T):
        raise ValueError(f"gradvac_coefficients: phi must have shape ({T}, {T}), got {tuple(phi.shape)}")
    g, ph = G.tolist(), phi.tolist()
    weights = [0.0] * T
    for i in range(T):
        c = [0.0] * T
        c[i] = 1.0
        cg = list(g[i])                                   # <g_i', g_k> for every k
        for j in order[i]:
            norm_i = math.sqrt(max(sum(cg[k] * c[k] for k in range(T)), 0.0))
            norm_j = math.sqrt(max(g[j][j], 0.0))
            denom = norm_i * norm_j + eps
            phi_ij = cg[j] / denom if denom != 0 else 0.0
            hat = ph[i][j]
            if phi_ij < hat:
                root_ij = math.sqrt(max(1.0 - phi_ij * phi_ij, 0.0))
                root_hat = math.sqrt(max(1.0 - hat * hat, 0.0))
                denom_w = norm_j * root_hat + eps
                w = norm_i * (hat * root_ij - phi_ij * root_hat) / denom_w if denom_w != 0 else 0.0
                c[j] += w
                cg = [cg[k] + w * g[j][k] for k in range(T)]
            ph[i][j] = (1.0 - beta) * hat + beta * phi_ij
        for k in range(T):
            weights[k] += c[k]
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ph, dtype=torch.float64)


def fairgrad_weights(G, alpha=1.0, max_iter=50):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Equation 4 and
    Algorithm 1; official code OptMN-Lab/fairgrad methods/weight_methods.py FairGrad, alpha = 1.0 its class
    default; torchjd aggregation/_fairgrad.py, which has no default alpha).

    The update d = sum_t w_t g_t maximises the alpha-fair utility of the tasks' improvements <g_t, d>;
    its weights w > 0 solve
        G w = w^(-1/alpha)   (elementwise: <g_t, d> = w_t^(-1/alpha)).
    alpha = 1 is the Nash bargaining condition (nash_mtl_weights before its clip); alpha = 0 is linear
    scalarisation: the weights are 1/T (torchjd's special case, kept). The official code and torchjd call
    scipy's least_squares on G w - w^(-1/alpha) from w = 1/T with bounds w >= 0 (tolerances 1e-8, at most
    100 T evaluations). Here, exactly: the solution is the minimiser of the strictly convex
        f(b) = b^T C b / 2 - sum_t c_t h(b_t),   b_t = n_t w_t,  c_t = n_t^(1/alpha - 1),
    (n_t = ||g_t||, C the cosine matrix, h = log for alpha = 1, b^(1 - 1/alpha) / (1 - 1/alpha) otherwise),
    found by damped Newton steps (a backtracking line search keeps b > 0) until the Newton decrement
    reaches the float64 floor, at most max_iter steps; G is first divided by its mean diagonal s and the
    solution multiplied by s^(-alpha / (alpha + 1)) (the same w, better scaled).
    A positive solution exists exactly when some d has <g_t, d> > 0 for every task, i.e. 0 is not in the
    convex hull of the gradients (Gordan; has_no_bargaining_solution): otherwise NoBargainingSolution is
    raised (least_squares then runs off to weights of ~1e3 with a vanishing update; the FairGrad class
    gives d = 0, the limit, and reports the step). Zero gradients get weight 0 and the rest is solved
    without them (in torchjd their weight runs off and adds nothing to d)."""
    G = _gram(G, "fairgrad_weights")
    T = G.shape[0]
    if not alpha >= 0:
        raise ValueError(f"fairgrad_weights: alpha must be >= 0, got {alpha}")
    if alpha == 0:
        return _weights(np.full(T, 1.0 / T))
    w = np.zeros(T)
    keep = _nonzero(G)
    if keep.size == 0:
        return _weights(w)
    Gk = G[np.ix_(keep, keep)]
    s = np.trace(Gk) / keep.size                         # G = s G': w = s^(-alpha / (alpha + 1)) w'
    n = np.sqrt(np.diag(Gk) / s)
    C = Gk / s / np.outer(n, n)
    if has_no_bargaining_solution(C):
        raise NoBargainingSolution("FairGrad: 0 lies in the convex hull of the task gradients (e.g. two "
                                   "opposite gradients): no update improves every task")
    p = 1.0 / alpha
    c = n ** (p - 1.0)

    def f(x):
        h = np.log(x) if alpha == 1 else x ** (1.0 - p) / (1.0 - p)
        return 0.5 * x @ C @ x - c @ h

    ones = np.ones(keep.size)
    b = ones * (c.sum() / (ones @ C @ ones)) ** (alpha / (alpha + 1.0))   # the best multiple of ones
    previous = math.inf
    for _ in range(max_iter):
        grad = C @ b - c * b ** -p
        newton = np.linalg.solve(C + np.diag(p * c * b ** (-p - 1.0)), grad)
        decrement = grad @ newton                        # f(b) - min f ~ decrement / 2
        if decrement < 1e-20 or (decrement < 1e-8 and decrement > 0.5 * previous):
            break                                        # converged, or at the float64 floor
        t = 1.0
        f0 = f(b) if decrement > 1e-6 else None          # damped phase: Armijo backtracking
        while t > 1e-10 and not ((b - t * newton > 0).all()
                                 and (f0 is None or f(b - t * newton) <= f0 - 0.25 * t * decrement)):
            t *= 0.5
        b = b - t * newton
        previous = decrement
    w[keep] = b / n * s ** (-alpha / (alpha + 1.0))
    return _weights(w)


def krum_weights(G, n_byzantine=1, n_selected=1):
    """Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent", NeurIPS 2017; torchjd aggregation/_krum.py).

    Distances from G: ||g_i - g_j|| = sqrt(max(G_ii + G_jj - 2 G_ij, 0)). Each gradient's score is the sum
    of its distances to its T - f - 2 nearest other gradients (f = n_byzantine; the nearest of all, itself
    at distance 0, is left out), and the n_selected gradients with the smallest scores are averaged:
    weights 1 / n_selected on them, 0 elsewhere. Needs T >= f + 3 and T >= n_selected (torchjd raises
    otherwise; so does this function). Ties are broken by torch.topk, as torchjd's: with T - f - 2 = 1 every
    score is a nearest-neighbour distance and two mutual nearest neighbours always tie, so the rule is then not
    symmetric in the tasks (the one torch.topk lists first wins)."""
    G = _check_gram(G, "krum_weights")
    T = G.shape[0]
    if n_byzantine < 0 or n_selected < 1:
        raise ValueError(f"krum_weights: need n_byzantine >= 0 and n_selected >= 1, got {n_byzantine}, {n_selected}")
    if T < n_byzantine + 3 or T < n_selected:
        raise ValueError(f"krum_weights: need at least max(n_byzantine + 3, n_selected) = "
                         f"{max(n_byzantine + 3, n_selected)} tasks, got {T}")
    sq = torch.diagonal(G)
    distances = torch.sqrt((sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * G).clamp(min=0.0))
    smallest, _ = torch.topk(distances, k=T - n_byzantine - 1, largest=False)
    scores = smallest[:, 1:].sum(dim=1)
    _, selected = torch.topk(scores, k=n_selected, largest=False)
    return torch.nn.functional.one_hot(selected, num_classes=T).sum(dim=0).to(torch.float64) / n_selected


def pcd_solve(G, taus, tol=1e-9, dependence_tol=1e-9, max_iters=None):
    """The quadratic program of PCD on the Gram matrix G of the (normalised) gradients, the first being the
    primary one:  min_d ||d - g_1||^2 / 2  s.t.  <g_j, d> >= tau_j ||g_j||^2 for j = 2..T.
    Returns (w, feasible): w = [1, mu_2, ..., mu_T] (the KKT multipliers, >= 0) with d = sum_i w_i g_i, and
    whether the constraints could be met ([1, 0, ..., 0] and False where they cannot).
    The dual active-set method of Goldfarb and Idnani (1983) for an identity Hessian, exactly as torchjd's
    _pcd.py _solve_qp (the same order of operations, tolerances and guard of 10 T iterations): a constraint
    counts as met when violated by at most tol max_i G_ii; a gradient counts as dependent on the active
    ones when its orthogonal part has a squared norm of at most dependence_tol G_pp."""
    T = G.shape[0]
    weights = torch.zeros(T, dtype=G.dtype)
    weights[0] = 1.0
    if T == 1:
        return weights, True
    if max_iters is None:
        max_iters = 10 * T
    Gs = G[1:, 1:]
    b = taus * Gs.diagonal() - G[1:, 0]                   # b_j > 0: g_1 violates constraint j
    mu = torch.zeros(T - 1, dtype=G.dtype)
    atol = tol * max(G.diagonal().max().item(), torch.finfo(G.dtype).tiny)
    active = []
    n_iters = 0
    while n_iters < max_iters:
        slacks = Gs @ mu - b
        slacks[active] = 0.0
        p = int(slacks.argmin())
        if slacks[p] >= -atol:
            break
        slack_p = slacks[p]
        while n_iters < max_iters:
            n_iters += 1
            # dual step +1 on mu_p, -r on the active mu_j; primal step z = g_p - sum_j r_j g_j
            if len(active) > 0:
                r = torch.linalg.solve(Gs[active][:, active], Gs[active, p])
                z_sq_norm = Gs[p, p] - Gs[p, active] @ r
                ratios = torch.where(r > 0.0, mu[active] / r, torch.inf)
                k = int(ratios.argmin())
                partial_step = ratios[k].item()
            else:
                r = torch.zeros(0, dtype=G.dtype)
                z_sq_norm = Gs[p, p]
                k = -1
                partial_step = math.inf
            full_step = (-slack_p / z_sq_norm).item() if z_sq_norm > dependence_tol * Gs[p, p] else math.inf
            step = min(partial_step, full_step)
            if step == math.inf:
                return weights, False                     # the constraints are infeasible
            mu[active] -= step * r
            mu[p] += step
            if full_step <= partial_step:
                active.append(p)
                break
            mu[active[k]] = 0.0                           # drop the constraint whose multiplier hit 0
            del active[k]
            slack_p = Gs[p] @ mu - b[p]
    weights[1:] = mu.clamp(min=0.0)
    return weights, True


def project_onto_simplex(y):
    """Euclidean projection of the vector y onto the probability simplex (torchjd
    aggregation/_utils/simplex.py, from the MoDo code: the same sorted-threshold loop)."""
    m = len(y)
    sorted_y = torch.sort(y, descending=True)[0]
    tmpsum = y.new_zeros(())
    tmax_f = (torch.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum = tmpsum + sorted_y[i]
        tmax = (tmpsum - 1.0) / (i + 1.0)
        if tmax > sorted_y[i + 1]:
            tmax_f = tmax
            break
    return (y - tmax_f).clamp(min=0.0)


def _clone(x):
    return None if x is None else x.detach().clone()


class DualProj(Aggregator):
    """The mean gradient projected onto the dual cone of the task gradients (dualproj_weights): torchjd's
    DualProj with its mean preference. Difference, as UPGrad: reg_eps = 0 by default, where torchjd's
    projector adds 1e-4 I (--dualproj-reg-eps 1e-4 gives torchjd's), and no norm_eps."""
    name = "dualproj"
    version = 1

    def __init__(self, reg_eps=0.0):
        super().__init__()
        if reg_eps < 0:
            raise ValueError(f"DualProj: reg_eps must be >= 0, got {reg_eps}")
        self.reg_eps = reg_eps

    def __call__(self, G):
        return dualproj_weights(self.check(G), reg_eps=self.reg_eps)

    @classmethod
    def add_args(cls, group):
        group.add_argument("--dualproj-reg-eps", type=float, default=_default(cls, "reg_eps"))

    @classmethod
    def from_args(cls, args):
        return cls(reg_eps=args.dualproj_reg_eps)


class ConFIG(Aggregator):
    """ConFIG (config_weights): the direction with equal cosines to every unit task gradient, scaled by
    the sum of the gradients' projections onto it; torchjd's ConFIG with its default preference (ones).
    Named config_agg: "config" is a column of the comparison's tables. Difference, documented in
    config_weights: the pseudo-inverse is read from the cosine matrix, so nearly dependent unit gradients
    (singular values below 1e-6 of the largest) count as dependent."""
    name = "config_agg"
    version = 1

    def __call__(self, G):
        return config_weights(self.check(G))


class GradVac(Aggregator):
    """Gradient Vaccine (gradvac_coefficients): PCGrad-like pairwise corrections towards an EMA of the
    pairwise cosines, torchjd's GradVac (beta = 0.5, eps = 1e-8). The random order of the other tasks is
    drawn, as PCGrad's (pcgrad_order: one torch.randperm(T - 1) per task, in task order), from the
    aggregator's own generator where torchjd uses the global one: the same draws from the same state.
    State: the generator and the EMA targets phi [T, T]; like torchjd, phi restarts from zeros when the
    number of tasks changes (here: when a scheduler rests a task, as the aggregator sees only the active
    tasks; phi is then per position among the active tasks). eps is absolute, as torchjd: with gradient
    norms below ~1e-4 it shrinks the cosines."""
    name = "gradvac"
    version = 1

    def __init__(self, seed=0, beta=0.5, eps=1e-8):
        super().__init__()
        if not 0.0 <= beta <= 1.0 or eps < 0:
            raise ValueError(f"GradVac: need beta in [0, 1] and eps >= 0, got beta={beta}, eps={eps}")
        self.beta, self.eps = beta, eps
        self.generator = torch.Generator().manual_seed(seed + 7927)
        self.phi = None

    def __call__(self, G):
        G = self.check(G)
        T = G.shape[0]
        if self.phi is None or self.phi.shape != (T, T):
            self.phi = torch.zeros(T, T, dtype=torch.float64)
        w, self.phi = gradvac_coefficients(G, pcgrad_order(T, self.generator), self.phi, self.beta, self.eps)
        return w

    def state_dict(self):
        return {"generator": self.generator.get_state(), "phi": _clone(self.phi)}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.phi = _clone(state["phi"])

    @classmethod
    def add_args(cls, group):
        group.add_argument("--gradvac-beta", type=float, default=_default(cls, "beta"),
                           help="EMA rate of the target cosines")
        group.add_argument("--gradvac-eps", type=float, default=_default(cls, "eps"))

    @classmethod
    def from_args(cls, args):
        return cls(seed=args.seed, beta=args.gradvac_beta, eps=args.gradvac_eps)


class FairGrad(Aggregator):
    """alpha-fair weights (fairgrad_weights), solved exactly where torchjd calls least_squares. alpha = 1.0
    is the official code's class default (torchjd has none). Where no positive solution exists (0 in the
    convex hull of the gradients) the weights are 0 (d = 0, the limit the least-squares iterates run off
    towards) and the step is reported as fairgrad_no_solution. max_norm: the official code then clips the
    shared gradient's norm to 1.0 (clip_grad_norm_); torchjd does not, and neither does the default 0 here
    (--fairgrad-max-norm 1 gives the official clip, in the space G was taken in)."""
    name = "fairgrad"
    version = 1

    def __init__(self, alpha=1.0, max_iter=50, max_norm=0.0):
        super().__init__()
        if not alpha >= 0:
            raise ValueError(f"FairGrad: alpha must be >= 0, got {alpha}")
        self.alpha, self.max_iter, self.max_norm = alpha, max_iter, max_norm

    def __call__(self, G):
        G = self.check(G)
        try:
            w = fairgrad_weights(G, alpha=self.alpha, max_iter=self.max_iter)
            self.report = {"fairgrad_no_solution": 0}
        except NoBargainingSolution:
            w = torch.zeros(G.shape[0], dtype=torch.float64)
            self.report = {"fairgrad_no_solution": 1}
        if self.max_norm > 0:
            norm = math.sqrt(max(float(w @ G @ w), 0.0))
            if norm > self.max_norm:
                w = w * (self.max_norm / norm)
        return w

    @classmethod
    def add_args(cls, group):
        group.add_argument("--fairgrad-alpha", type=float, default=_default(cls, "alpha"),
                           help="alpha-fairness (0: equal weights, 1: proportional fairness / Nash)")
        group.add_argument("--fairgrad-max-iter", type=int, default=_default(cls, "max_iter"))
        group.add_argument("--fairgrad-max-norm", type=float, default=_default(cls, "max_norm"),
                           help="clip of the update's norm (0 = off, as torchjd; the official code: 1)")

    @classmethod
    def from_args(cls, args):
        return cls(alpha=args.fairgrad_alpha, max_iter=args.fairgrad_max_iter, max_norm=args.fairgrad_max_norm)


class Krum(Aggregator):
    """Krum / Multi-Krum (krum_weights): the average of the n_selected gradients closest to their
    T - n_byzantine - 2 nearest neighbours. torchjd has no default n_byzantine; 1 is the largest that
    Krum's condition T > 2 f + 2 allows for the 5 tasks here. With fewer tasks than Krum needs
    (T < n_byzantine + 3 or T < n_selected: a scheduler rested some) the weights are 1/T, the mean, where
    torchjd raises; reported as krum_too_few_tasks."""
    name = "krum"
    version = 1

    def __init__(self, n_byzantine=1, n_selected=1):
        super().__init__()
        if n_byzantine < 0 or n_selected < 1:
            raise ValueError(f"Krum: need n_byzantine >= 0 and n_selected >= 1, got {n_byzantine}, {n_selected}")
        self.n_byzantine, self.n_selected = n_byzantine, n_selected

    def __call__(self, G):
        G = self.check(G)
        T = G.shape[0]
        if T < self.n_byzantine + 3 or T < self.n_selected:
            self.report = {"krum_too_few_tasks": 1}
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        self.report = {"krum_too_few_tasks": 0}
        return krum_weights(G, self.n_byzantine, self.n_selected)

    @classmethod
    def add_args(cls, group):
        group.add_argument("--krum-n-byzantine", type=int, default=_default(cls, "n_byzantine"))
        group.add_argument("--krum-n-selected", type=int, default=_default(cls, "n_selected"),
                           help="Multi-Krum: how many of the best-scored gradients are averaged")

    @classmethod
    def from_args(cls, args):
        return cls(n_byzantine=args.krum_n_byzantine, n_selected=args.krum_n_selected)


class PCD(Aggregator):
    """Priority-Constrained Descent (torchjd aggregation/_pcd.py; "Not All Objectives Are Born Equal:
    Priority-Constrained Descent for Hierarchical Multi-Objective Optimization", TMLR; reference code
    DaraVaram/priority-constrained-descent). The first task is the primary objective: the update follows
    its gradient as closely as possible while every other task j gets at least a fraction tau of the
    first-order progress of a step along its own normalised gradient:
        d~ = argmin_d ||d - g~_1||^2 / 2  s.t.  <g~_j, d> >= tau ||g~_j||^2,   g~_i = s_i g_i,
        s_i = 1 / sqrt(v_i + eps),  v_i = the bias-corrected EMA (rate beta) of ||g_i||^2 over the calls,
    solved on s G s by pcd_solve, and d = d~ ||g_1|| / ||d~||. Special cases (torchjd's): g_1 = 0 gives
    d = 0; infeasible constraints (T >= 3, e.g. two opposite secondary gradients) give d = g_1, reported as
    pcd_infeasible; d~ = 0 up to the rounding of G (||d~||^2 <= 10 eps (sum_i |w_i| ||g~_i||)^2) gives 0.
    The order of the tasks matters: the primary one is the first of the run's tasks (--tasks). The
    aggregator sees only the active tasks, so where a scheduler rests the primary task the first active
    one is primary for that step, and the EMA (like torchjd's) restarts when the number of tasks changes.
    tau: one value for every secondary task (torchjd also takes a vector). A non-finite G raises (check)
    before the EMA is touched, where torchjd returns nan weights and leaves the EMA as it was."""
    name = "pcd"
    version = 1

    def __init__(self, tau=0.02, beta=0.999, eps=1e-8):
        super().__init__()
        if not 0.0 <= tau <= 1.0 or not 0.0 <= beta < 1.0 or not eps >= 0.0:
            raise ValueError(f"PCD: need tau in [0, 1], beta in [0, 1) and eps >= 0, got {tau}, {beta}, {eps}")
        self.tau, self.beta, self.eps = tau, beta, eps
        self.sq_norm_ema = None   # float64 [T]
        self.n_steps = 0

    def __call__(self, G):
        G = self.check(G)
        T = G.shape[0]
        if self.sq_norm_ema is None or self.sq_norm_ema.shape != (T,):
            self.sq_norm_ema, self.n_steps = torch.zeros(T, dtype=torch.float64), 0
        sq_norms = G.diagonal()
        self.sq_norm_ema = self.beta * self.sq_norm_ema + (1.0 - self.beta) * sq_norms
        self.n_steps += 1
        denominators = (self.sq_norm_ema / (1.0 - self.beta ** self.n_steps) + self.eps).sqrt()
        scales = torch.where(denominators > 0.0, 1.0 / denominators, 0.0)   # 0: a gradient always zero
        precision = 10.0 * torch.finfo(torch.float64).eps   # the relative precision of G
        weights = torch.zeros(T, dtype=torch.float64)
        feasible = True
        if sq_norms[0] > 0.0:
            normalized = G * torch.outer(scales, scales)
            taus = torch.full([T - 1], self.tau, dtype=torch.float64)
            w, feasible = pcd_solve(normalized, taus, dependence_tol=max(1e-9, precision))
            direction_sq_norm = w @ normalized @ w
            magnitude = (w.abs() @ normalized.diagonal().sqrt()) ** 2
            if direction_sq_norm > precision * magnitude:
                weights = w * scales * (sq_norms[0] / direction_sq_norm).sqrt()
        self.report = {"pcd_infeasible": int(not feasible)}
        return weights

    def state_dict(self):
        return {"sq_norm_ema": _clone(self.sq_norm_ema), "n_steps": self.n_steps}

    def load_state_dict(self, state):
        self.sq_norm_ema, self.n_steps = _clone(state["sq_norm_ema"]), int(state["n_steps"])

    @classmethod
    def add_args(cls, group):
        group.add_argument("--pcd-tau", type=float, default=_default(cls, "tau"),
                           help="fraction of normalised progress guaranteed to every secondary task")
        group.add_argument("--pcd-beta", type=float, default=_default(cls, "beta"))
        group.add_argument("--pcd-eps", type=float, default=_default(cls, "eps"))

    @classmethod
    def from_args(cls, args):
        return cls(tau=args.pcd_tau, beta=args.pcd_beta, eps=args.pcd_eps)


class MoDo(Aggregator):
    """MoDo (Chen, Fernando, Ying, Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", JMLR 2024; torchjd aggregation/_modo.py MoDoWeighting, official
    code heshandevaka/Trade-Off-MOL). One projected gradient step on the task weights per call:
        lambda <- proj_simplex(lambda - gamma (M lambda + rho lambda)),   lambda_0 = 1/T,
    and the weights are lambda (sum 1). Difference, documented: the paper (and torchjd's examples) take
    M = J_1 J_2^T from two independent mini-batches, an unbiased estimate of the Gram matrix; the toolkit
    has one batch per step, so M = J J^T here (torchjd's docstring warns that this breaks the convergence
    guarantee). M is used as given (not symmetrised), so a cross-batch M works too. gamma acts on the raw
    scale of M, as torchjd's and the official code. State: lambda, which restarts from 1/T when the number
    of tasks changes (torchjd's rule; here when a scheduler rests a task)."""
    name = "modo"
    version = 1

    def __init__(self, gamma=0.1, rho=0.1):
        super().__init__()
        if not gamma > 0 or not rho >= 0:
            raise ValueError(f"MoDo: need gamma > 0 and rho >= 0, got gamma={gamma}, rho={rho}")
        self.gamma, self.rho = gamma, rho
        self.lam = None

    def __call__(self, G):
        M = self.check(G)
        T = M.shape[0]
        if self.lam is None or self.lam.shape != (T,):
            self.lam = torch.full((T,), 1.0 / T, dtype=torch.float64)
        self.lam = project_onto_simplex(self.lam - self.gamma * (M @ self.lam + self.rho * self.lam))
        return self.lam.clone()

    def state_dict(self):
        return {"lambda": _clone(self.lam)}

    def load_state_dict(self, state):
        self.lam = _clone(state["lambda"])

    @classmethod
    def add_args(cls, group):
        group.add_argument("--modo-gamma", type=float, default=_default(cls, "gamma"),
                           help="step size of the task-weight update")
        group.add_argument("--modo-rho", type=float, default=_default(cls, "rho"))

    @classmethod
    def from_args(cls, args):
        return cls(gamma=args.modo_gamma, rho=args.modo_rho)


class SDMGrad(Aggregator):
    """SDMGrad (Xiao, Ban, Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms", NeurIPS 2023; torchjd aggregation/_sdmgrad.py SDMGradWeighting, official code
    OptMN-Lab/SDMGrad). Per call: a = M / (mean_t sqrt(max(M_tt, 0))^2 + 1e-8), then n_iter steps of SGD
    with momentum on the simplex, from the previous call's w (1/T at first):
        grad = a (w + lambda_ w~),  v = grad (first) or momentum v + grad,  w <- proj_simplex(w - lr v),
    with w~ = 1/T (the preference: the mean gradient); the weights are (w + lambda_ w~) / (1 + lambda_).
    lambda_ = 0.3 as torchjd and LibMTL (the official class default is 0.6, overridden to 0.3 in its
    experiments). Difference, documented: as MoDo, the paper takes M = J_1 J_2^T from two independent
    batches; here M = J J^T of the step's batch (not symmetrised, so a cross-batch M works too). State: w,
    restarted from 1/T when the number of tasks changes (torchjd's rule)."""
    name = "sdmgrad"
    version = 1

    def __init__(self, lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3):
        super().__init__()
        if not lr > 0 or not 0.0 <= momentum < 1.0 or n_iter < 1 or not lambda_ >= 0:
            raise ValueError(f"SDMGrad: need lr > 0, momentum in [0, 1), n_iter >= 1 and lambda_ >= 0, got "
                             f"{lr}, {momentum}, {n_iter}, {lambda_}")
        self.lr, self.momentum, self.n_iter, self.lambda_ = lr, momentum, n_iter, lambda_
        self.w = None

    def __call__(self, G):
        M = self.check(G)
        T = M.shape[0]
        if self.w is None or self.w.shape != (T,):
            self.w = torch.full((T,), 1.0 / T, dtype=torch.float64)
        w, w_tilde = self.w, torch.full((T,), 1.0 / T, dtype=torch.float64)
        scale = torch.diag(M).clamp(min=0.0).sqrt().mean()
        a = M / (scale.pow(2) + 1e-8)
        velocity = None
        for _ in range(self.n_iter):
            grad = a @ (w + self.lambda_ * w_tilde)
            velocity = grad if velocity is None else self.momentum * velocity + grad
            w = project_onto_simplex(w - self.lr * velocity)
        self.w = w
        return (w + self.lambda_ * w_tilde) / (1.0 + self.lambda_)

    def state_dict(self):
        return {"w": _clone(self.w)}

    def load_state_dict(self, state):
        self.w = _clone(state["w"])

    @classmethod
    def add_args(cls, group):
        group.add_argument("--sdmgrad-lr", type=float, default=_default(cls, "lr"))
        group.add_argument("--sdmgrad-momentum", type=float, default=_default(cls, "momentum"))
        group.add_argument("--sdmgrad-n-iter", type=int, default=_default(cls, "n_iter"))
        group.add_argument("--sdmgrad-lambda", type=float, default=_default(cls, "lambda_"),
                           help="pull towards the mean gradient")

    @classmethod
    def from_args(cls, args):
        return cls(lr=args.sdmgrad_lr, momentum=args.sdmgrad_momentum, n_iter=args.sdmgrad_n_iter,
                   lambda_=args.sdmgrad_lambda)


class CRMOGM(Aggregator):
    """CR-MOGM (Zhou, Zhang, Jiang, Zhang, Kwok, "On the Convergence of Stochastic Multi-Objective Gradient
    Manipulation and Beyond", NeurIPS 2022; torchjd aggregation/_cr_mogm.py CRMOGMWeighting): the weights
    of another aggregator (base), smoothed by an exponential moving average across calls,
        lambda_k = alpha lambda_{k-1} + (1 - alpha) lambda^_k,   lambda_0 = lambda^_1,
    so the first call returns the base's weights. alpha = 0.9 as torchjd (the paper's Corollary 1 lets
    alpha_k grow towards 1 as the learning rate decays; fixed here). torchjd wraps a weighting given in
    code and has no default; base = mgda here (the paper's first instance, CR-MGDA); any other aggregator
    of AGGREGATORS with its own flags. State: lambda and the base's state. Difference: torchjd raises when
    the number of tasks changes; here (a scheduler rested a task) lambda restarts from the base's weights."""
    name = "crmogm"
    version = 1

    def __init__(self, base="mgda", alpha=0.9):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"CRMOGM: alpha must be in [0, 1], got {alpha}")
        if isinstance(base, str):
            if base == self.name or base not in AGGREGATORS:
                raise ValueError(f"CRMOGM: base must be one of {[n for n in AGGREGATORS if n != self.name]}, "
                                 f"got {base!r}")
            base = AGGREGATORS[base]()
        self.inner, self.base, self.alpha = base, base.name, alpha
        self.lam = None

    def __call__(self, G):
        G = self.check(G)
        hat = self.inner(G)
        self.report = dict(self.inner.report)
        previous = hat if self.lam is None or self.lam.shape != hat.shape else self.lam
        self.lam = self.alpha * previous + (1.0 - self.alpha) * hat
        return self.lam.clone()

    def state_dict(self):
        return {"lambda": _clone(self.lam), "base": self.inner.state_dict()}

    def load_state_dict(self, state):
        self.lam = _clone(state["lambda"])
        self.inner.load_state_dict(state["base"])

    @classmethod
    def add_args(cls, group):
        group.add_argument("--crmogm-base", choices=tuple(n for n in AGGREGATORS if n != cls.name),
                           default=_default(cls, "base"), help="the aggregator whose weights are smoothed")
        group.add_argument("--crmogm-alpha", type=float, default=_default(cls, "alpha"),
                           help="EMA coefficient on the previous weights")

    @classmethod
    def from_args(cls, args):
        return cls(base=AGGREGATORS[args.crmogm_base].from_args(args), alpha=args.crmogm_alpha)


AGGREGATORS = {cls.name: cls for cls in (PCGrad, MGDA, CAGrad, NashMTL, IMTLG, AlignedMTL, UPGrad,
                                         DualProj, ConFIG, GradVac, FairGrad, Krum, PCD, MoDo, SDMGrad, CRMOGM)}
