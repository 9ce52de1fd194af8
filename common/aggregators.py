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


ZERO_GRAD = 1e-14  # G[t, t] <= ZERO_GRAD * max_s G[s, s]: task t's gradient counts as zero


# ----------------------------------------------------------------------------- helpers

def _gram(G):
    """G as a symmetric float64 numpy array [T, T] (checked square and finite)."""
    G = torch.as_tensor(G).detach().to("cpu", torch.float64).numpy()
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"aggregators: the Gram matrix must be square [T, T], got {G.shape}")
    if not np.isfinite(G).all():
        raise FloatingPointError("aggregators: the Gram matrix is not finite")
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
    G = torch.as_tensor(G).detach().to("cpu", torch.float64)
    T = G.shape[0]
    if G.shape != (T, T):
        raise ValueError(f"pcgrad_coefficients: G must be square, got {tuple(G.shape)}")
    if not torch.isfinite(G).all():
        raise FloatingPointError("pcgrad_coefficients: the Gram matrix is not finite")
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
    G = _gram(G)
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
    G = _gram(G)
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
    G = _gram(G)
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
    G = _gram(G)
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
    G = _gram(G)
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
    G = _gram(G)
    T = G.shape[0]
    u_all = np.full(T, 1.0 / T) if pref is None else np.asarray(pref, dtype=np.float64)
    if u_all.shape != (T,) or (u_all < 0).any():
        raise ValueError(f"upgrad_weights: pref must be {T} non-negative numbers, got {pref}")
    trace = np.trace(G)
    if T == 0 or not trace > 0:
        return _weights(u_all)
    A = G / trace + reg_eps * np.eye(T)
    norms = np.sqrt(np.clip(np.diag(A), 1e-300, None))
    splits = [np.zeros(0, dtype=int)] + _supports(T)
    total = np.zeros(T)
    for i in range(T):
        u = np.zeros(T)
        u[i] = u_all[i]
        # the scale of the dual conditions: ||J^T u|| (the vector projected), the same for every split
        u_norm = math.sqrt(max(float(u @ A @ u), 0.0))
        best, best_violation = u, np.inf
        for F in splits:
            v = u.copy()
            if F.size:
                B = np.setdiff1d(np.arange(T), F)
                # least squares: a singular block (linearly dependent gradients) still has solutions
                v[F] = np.linalg.lstsq(A[np.ix_(F, F)], -A[np.ix_(F, B)] @ u[B], rcond=None)[0]
            Av = A @ v
            bound = np.setdiff1d(np.arange(T), F)
            violation = max(float(np.max(u[F] - v[F], initial=0.0)) / max(u_all.max(), 1e-300),
                            float(np.max(-Av[bound] / np.maximum(norms[bound] * u_norm, 1e-300), initial=0.0)))
            if violation < best_violation:
                best, best_violation = v, violation
        total += best
    return _weights(total)


# ----------------------------------------------------------------------------- the aggregator classes

def _default(cls, name):
    """The default of a hyper-parameter: the one in cls.__init__'s signature (one place)."""
    return inspect.signature(cls.__init__).parameters[name].default


class Aggregator:
    """Gram matrix [T, T] -> weights [T] (float64, CPU). Subclasses hold their hyper-parameters (with
    the defaults in __init__'s signature) and their state, and add one flag per hyper-parameter."""
    name = None
    rule_kind = "aggregator"  # run records store kind, name and version (common/versions.py)
    version = 1               # bump in the subclass whose results change

    def __init__(self):
        self.report = {}  # what the last call noticed, for the run's decisions

    def __call__(self, G):
        raise NotImplementedError

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

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
        T = torch.as_tensor(G).shape[0]
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
        return mgda_weights(G, normalize=self.normalize)

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
        return cagrad_weights(G, c=self.c, rescale=self.rescale)

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
        G64 = torch.as_tensor(G).detach().to("cpu", torch.float64)
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
        return imtl_weights(G)


class AlignedMTL(Aggregator):
    """Aligned-MTL (aligned_mtl_weights): the task gradients aligned to condition number 1."""
    name = "aligned_mtl"

    def __init__(self, scale_mode="min", reduction="sum"):
        super().__init__()
        self.scale_mode, self.reduction = scale_mode, reduction

    def __call__(self, G):
        return aligned_mtl_weights(G, scale_mode=self.scale_mode, reduction=self.reduction)

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
        return upgrad_weights(G, reg_eps=self.reg_eps)

    @classmethod
    def add_args(cls, group):
        group.add_argument("--upgrad-reg-eps", type=float, default=_default(cls, "reg_eps"))

    @classmethod
    def from_args(cls, args):
        return cls(reg_eps=args.upgrad_reg_eps)


AGGREGATORS = {cls.name: cls for cls in (PCGrad, MGDA, CAGrad, NashMTL, IMTLG, AlignedMTL, UPGrad)}
