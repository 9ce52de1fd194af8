"""Aggregators on hand-made gradient sets where the answer is known, and their invariances."""
import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch

from common.aggregators import (AGGREGATORS, NoBargainingSolution, aligned_mtl_weights, cagrad_weights, imtl_weights,
                                mgda_weights, nash_mtl_weights, upgrad_weights)


def gram(g):
    g = torch.as_tensor(g, dtype=torch.float64)
    return g @ g.T, g


CONFLICT2 = [[1.0, 0.0], [-0.5, 1.0]]
CONFLICT3 = [[1.0, 0.2, 0.0], [-0.6, 1.0, 0.3], [0.1, -0.8, 1.0]]


def test_mgda_min_norm_point_of_two_gradients_closed_form():
    G, g = gram(CONFLICT2)
    w = mgda_weights(G)
    gamma = float((G[1, 1] - G[0, 1]) / (G[0, 0] + G[1, 1] - 2 * G[0, 1]))   # min-norm on the segment
    assert w.tolist() == pytest.approx([gamma, 1 - gamma], abs=1e-9)
    d = w @ g
    assert ((g @ d) >= d @ d - 1e-9).all()          # a common descent direction


def test_mgda_three_tasks_matches_a_grid_search():
    G, g = gram(CONFLICT3)
    w = mgda_weights(G)
    assert w.sum().item() == pytest.approx(1.0) and (w >= 0).all()
    best = min(((a / 100, b / 100) for a in range(101) for b in range(101 - a)),
               key=lambda ab: float(torch.tensor([ab[0], ab[1], 1 - sum(ab)], dtype=torch.float64) @ G
                                    @ torch.tensor([ab[0], ab[1], 1 - sum(ab)], dtype=torch.float64)))
    grid = torch.tensor([best[0], best[1], 1 - sum(best)], dtype=torch.float64)
    assert float(w @ G @ w) <= float(grid @ G @ grid) + 1e-9


def test_cagrad_with_c_zero_is_the_mean_and_c_positive_helps_the_worst_task():
    G, g = gram(CONFLICT3)
    assert cagrad_weights(G, c=0.0).tolist() == pytest.approx([1 / 3] * 3)
    w = cagrad_weights(G, c=0.5, rescale=0)
    d, g0 = w @ g, g.mean(0)
    assert (g @ d).min() > (g @ g0).min()
    assert float((d - g0).norm()) <= 0.5 * float(g0.norm()) + 1e-6     # stays in the ball
    assert cagrad_weights(G, c=0.5).tolist() == pytest.approx((w / 1.25).tolist())  # rescale=1: / (1 + c^2)


def test_nash_mtl_optimality_and_scale_invariance():
    G, g = gram(CONFLICT3)
    a = nash_mtl_weights(G, max_norm=0)           # the raw solution, before the official norm clip
    assert (a > 0).all()
    assert torch.allclose(G @ a, 1 / a, rtol=1e-6)
    d = nash_mtl_weights(G) @ g                   # with the clip: ||d|| <= max_norm = 1
    assert float(d.norm()) <= 1.0 + 1e-9
    scaled = g.clone()
    scaled[1] *= 10.0
    G2, _ = gram(scaled)
    a2 = nash_mtl_weights(G2)
    d1, d2 = a @ g, a2 @ scaled
    assert torch.allclose(d1 / d1.norm(), d2 / d2.norm(), atol=1e-6)


def test_imtl_equal_projections_and_scale_invariance():
    G, g = gram(CONFLICT3)
    a = imtl_weights(G)
    d = a @ g
    proj = (g @ d) / g.norm(dim=1)
    assert torch.allclose(proj, proj[0].expand(3), atol=1e-9)
    scaled = g.clone()
    scaled[2] *= 7.0
    d2 = imtl_weights(gram(scaled)[0]) @ scaled
    assert torch.allclose(d / d.norm(), d2 / d2.norm(), atol=1e-9)


def test_aligned_mtl_equal_weights_for_orthogonal_equal_gradients_and_unit_condition_number():
    G, _ = gram(torch.eye(3) * 2.0)
    assert aligned_mtl_weights(G).tolist() == pytest.approx([1.0, 1.0, 1.0])
    G, g = gram(CONFLICT3)
    lam, V = torch.linalg.eigh(G)
    B = lam.min().sqrt() * (V @ torch.diag(lam.rsqrt()) @ V.T)
    aligned = B @ g                                      # the aligned task gradients
    s = torch.linalg.svdvals(aligned)
    assert float(s.max() / s.min()) == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(aligned_mtl_weights(G) @ g, aligned.sum(0))


def make(name):
    return AGGREGATORS[name]()


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_permuting_tasks_permutes_weights(name):
    rng = torch.Generator().manual_seed(3)
    g = torch.randn(4, 6, generator=rng, dtype=torch.float64)
    g[1] = -0.7 * g[0] + 0.3 * g[1]                     # a conflicting pair
    G = g @ g.T
    perm = torch.tensor([2, 0, 3, 1])
    if name == "pcd":      # not symmetric by design: the first task is the primary one
        pytest.skip("PCD's first task is the primary one (torchjd _pcd.py)")
    if name in ("pcgrad", "gradvac"):   # their random order is part of the input: permute the order too
        from common.aggregators import gradvac_coefficients, pcgrad_coefficients, pcgrad_order
        order = pcgrad_order(4, torch.Generator().manual_seed(0))
        inverse = torch.argsort(perm)
        order_p = inverse[order[perm]]                   # the same projections, renamed
        if name == "pcgrad":
            w, wp = pcgrad_coefficients(G, order), pcgrad_coefficients(G[perm][:, perm], order_p)
        else:
            phi = torch.zeros(4, 4, dtype=torch.float64)
            w, _ = gradvac_coefficients(G, order, phi)
            wp, _ = gradvac_coefficients(G[perm][:, perm], order_p, phi)
    elif name == "krum":   # with T - f - 2 = 1 mutual nearest neighbours tie (krum_weights); f = 0 has no tie
        w, wp = AGGREGATORS[name](n_byzantine=0)(G), AGGREGATORS[name](n_byzantine=0)(G[perm][:, perm])
    else:
        w, wp = make(name)(G), make(name)(G[perm][:, perm])
    assert torch.allclose(wp, w[perm], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("grads", [[[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]], [[1.0, 1.0], [2.0, 2.0], [0.5, 0.5]]],
                         ids=["zero", "parallel"])
def test_finite_for_zero_and_parallel_gradients(name, grads):
    G, g = gram(grads)
    w = make(name)(G)
    assert torch.isfinite(w).all()
    if name in ("mgda", "imtl", "nash_mtl") and g[1].norm() == 0:
        assert w[1] == 0                     # a zero gradient takes no part
    if name == "mgda":
        d = w @ g
        assert ((g @ d) >= d @ d - 1e-9)[g.norm(dim=1) > 0].all()


def random_gradients(seed, T, P, spread):
    """T gradients in R^P with norms spread log-uniformly over [1, spread], in a random task order."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((T, P))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return g * np.logspace(0, np.log10(spread), T)[rng.permutation(T)][:, None]


@pytest.mark.parametrize("name", ["mgda", "imtl", "upgrad"])
@pytest.mark.parametrize("spread", [1.0, 1e3, 1e6])
def test_update_never_increases_a_task_loss_to_first_order(name, spread):
    """<g_t, d> >= 0 for every task, measured relative to the problem's own scale."""
    for seed in range(40):
        T = 2 + seed % 4
        g = random_gradients(seed, T, T + seed % 3, spread)
        w = make(name)(torch.tensor(g @ g.T)).numpy()
        d = w @ g
        norms = np.linalg.norm(g, axis=1)
        scale = norms * max(np.linalg.norm(d), 1e-300)
        assert ((g @ d) >= -1e-7 * scale).all(), (seed, (g @ d) / scale)


def _exact_solve(K, b):
    """Gaussian elimination in exact rational arithmetic; None if singular."""
    n = len(K)
    A = [row[:] + [b[i]] for i, row in enumerate(K)]
    for c in range(n):
        pivot = next((r for r in range(c, n) if A[r][c] != 0), None)
        if pivot is None:
            return None
        A[c], A[pivot] = A[pivot], A[c]
        for r in range(n):
            if r != c and A[r][c] != 0:
                f = A[r][c] / A[c][c]
                A[r] = [x - f * y for x, y in zip(A[r], A[c])]
    return [A[i][n] / A[i][i] for i in range(n)]


def brute_force_min_norm(G):
    """min_{w in simplex} w^T G w by every support, in exact rational arithmetic on the float G."""
    T = G.shape[0]
    F = [[Fraction(float(G[i, j])) for j in range(T)] for i in range(T)]
    best = None
    for k in range(1, T + 1):
        for S in itertools.combinations(range(T), k):
            K = [[F[i][j] for j in S] + [Fraction(1)] for i in S] + [[Fraction(1)] * k + [Fraction(0)]]
            x = _exact_solve(K, [Fraction(0)] * k + [Fraction(1)])
            if x is None or min(x[:k]) < 0:
                continue
            w = [Fraction(0)] * T
            for i, s in zip(S, x):
                w[i] = s
            value = sum(w[i] * F[i][j] * w[j] for i in range(T) for j in range(T))
            if best is None or value < best:
                best = value
    return float(best)


@pytest.mark.parametrize("spread", [1e3, 1e5, 1e6])
def test_mgda_reaches_the_brute_force_min_norm_with_norms_spread_to_1e6(spread):
    """An absolute tolerance on the objective picked wrong supports at such spreads (issue 13: 14 of
    160 cases at 1e5 increased a task's loss); the optimality test is relative."""
    for seed in range(30):
        g = random_gradients(seed, 4 + seed % 2, 4 + seed % 4, spread)
        G = g @ g.T
        w = mgda_weights(torch.tensor(G)).numpy()
        assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
        exact = brute_force_min_norm(G)
        ours = float(w @ G @ w)
        smallest = float(np.diag(G).min())
        assert ours <= exact * (1 + 1e-6) + 1e-12 * smallest, (seed, ours, exact)


def test_upgrad_projections_lie_in_the_dual_cone_and_are_the_projections():
    rng = torch.Generator().manual_seed(5)
    for _ in range(20):
        g = torch.randn(4, 7, generator=rng, dtype=torch.float64)
        g[2] = -g[0] + 0.2 * g[2]
        G = g @ g.T
        A = G / torch.trace(G)
        for i in range(4):                   # each row's projection, reg_eps = 0: the exact one
            pref = torch.zeros(4, dtype=torch.float64)
            pref[i] = 1.0
            v = upgrad_weights(G, reg_eps=0.0, pref=pref)
            x = v @ g                        # proj of g_i onto {x : g_j . x >= 0}
            assert (g @ x >= -1e-9 * g.norm(dim=1) * x.norm()).all()
            # a projection: g_i - x is orthogonal to x and no cone direction gets closer (KKT of the QP)
            assert abs(float((g[i] - x) @ x)) < 1e-9 * float(g[i] @ g[i])
            assert (v >= pref - 1e-12).all()
        w = upgrad_weights(G, reg_eps=0.0)
        assert (g @ (w @ g) >= -1e-9).all()
        assert torch.allclose(A, A.T)


def test_upgrad_leaves_non_conflicting_gradients_as_their_mean():
    g = torch.tensor([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.0, 0.4, 2.0]], dtype=torch.float64)
    G = g @ g.T
    assert (G >= 0).all()
    for reg in (0.0, 1e-4):
        assert torch.allclose(upgrad_weights(G, reg_eps=reg), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_nash_mtl_on_opposite_gradients_falls_back_to_the_previous_weights_and_reports_it():
    nash = AGGREGATORS["nash_mtl"](max_norm=1.0)
    G_ok, _ = gram([[1.0, 0.0], [0.0, 2.0]])
    first = nash(G_ok)
    assert nash.report == {"nash_no_solution": 0}
    G_bad, g_bad = gram([[1.0, 0.0], [-2.0, 0.0]])  # antiparallel: no d helps both
    with pytest.raises(NoBargainingSolution):
        nash_mtl_weights(G_bad)
    w = nash(G_bad)
    assert nash.report == {"nash_no_solution": 1}
    d = w @ g_bad
    assert float(d.norm()) <= 1.0 + 1e-12                       # the clip still applies
    assert torch.allclose(w / w.norm(), first / first.norm())  # the previous alpha's direction
    cold = AGGREGATORS["nash_mtl"](max_norm=0.0)
    assert torch.equal(cold(G_bad), torch.ones(2, dtype=torch.float64))  # first step: ones, official


def test_aggregator_state_round_trip_continues_identically():
    G, _ = gram(CONFLICT3)
    for name in ("pcgrad", "nash_mtl"):
        a = make(name)
        a(G)
        b = make(name)
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(G), b(G))


def test_every_hyper_parameter_gets_one_flag_with_the_init_default():
    import argparse
    import inspect
    from common.multitask import add_update_args
    args = add_update_args(argparse.ArgumentParser()).parse_args(["--aggregator", "cagrad"])
    args.seed = 0
    for cls in AGGREGATORS.values():
        built = cls.from_args(args)
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name not in ("self", "seed") and p.default is not inspect.Parameter.empty:
                assert getattr(built, name) == p.default, (cls.name, name)


# ----------------------------------------------------------------------------- issue 26: opposite gradients

def opposite_pair(seed, T, P=20, k=None):
    """T standard normal gradients in R^P where one is a negative multiple of another: g_j = -k g_i with
    k drawn from [0.2, 5] (or given), i != j at random."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((T, P))
    i, j = rng.choice(T, 2, replace=False)
    g[j] = -(rng.uniform(0.2, 5.0) if k is None else k) * g[i]
    return g


def dual_cone_projection(g, y):
    """The projection of y onto the dual cone {x : <g_j, x> >= 0 for every j}, from the gradients themselves
    (not from G): by Moreau's decomposition y = proj_K(y) + proj_K°(y), the polar cone being
    K° = {-g^T lam : lam >= 0}, so proj_K(y) = y + g^T lam with lam = argmin_{lam >= 0} ||y + g^T lam||
    (scipy's NNLS, Lawson-Hanson active sets)."""
    from scipy.optimize import nnls
    lam, _ = nnls(g.T, -y, maxiter=100 * g.shape[0])
    return y + g.T @ lam


def test_upgrad_with_opposite_gradients_is_the_exact_projection_and_conflicts_with_no_task():
    """Issue 26: with g_1 = -1.5 g_0 the projection of g_0 is 0; the exact split's d was rounding noise
    (v^T A v ~ -2e-18, its norm floored at 1e-150), its cosine with a task ranked it last, and a wrong
    split won whose update had cosine -0.83 with a task. T = 2..5, each with one opposite pair."""
    cases = [np.array([[1.0, 2.0, -0.5], [-1.5, -3.0, 0.75]])]
    cases += [opposite_pair(seed, 2 + seed % 4, k=1.5 if seed % 3 == 0 else None) for seed in range(40)]
    for n, g in enumerate(cases):
        d = upgrad_weights(torch.tensor(g @ g.T)).numpy() @ g
        exact = np.mean([dual_cone_projection(g, g[i]) for i in range(len(g))], axis=0)
        norms = np.linalg.norm(g, axis=1)
        scale = norms.max()
        assert np.linalg.norm(d - exact) <= 1e-9 * scale, (n, np.linalg.norm(d - exact) / scale)
        assert ((g @ d) >= -1e-12 * norms * scale).all(), (n, (g @ d) / (norms * scale))


def cagrad_dual_reference(g, c, starts=10, seed=0):
    """CAGrad's dual min_{w in simplex} F(w) = <g_w, g0> + c ||g0|| ||g_w|| solved on the gradients
    themselves by SLSQP (the official code's solver) from every vertex, the centre and `starts` random
    points of the simplex; returns the best w."""
    from scipy.optimize import minimize
    T = g.shape[0]
    g0 = g.mean(0)
    r, b = c * np.linalg.norm(g0), g @ g0

    def F(w):
        return float(b @ w + r * np.linalg.norm(w @ g))

    def jac(w):
        g_w = w @ g
        n = np.linalg.norm(g_w)
        return b + (r * (g @ g_w) / n if n > 0 else 0.0)

    simplex = [{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(T)}]
    starts = list(np.eye(T)) + [np.full(T, 1.0 / T)] + list(np.random.default_rng(seed).dirichlet(np.ones(T), starts))
    best = None
    for w in starts:
        w = minimize(F, w, jac=jac, method="SLSQP", bounds=[(0.0, 1.0)] * T, constraints=simplex,
                     options={"ftol": 1e-15, "maxiter": 500}).x
        w = np.clip(w, 0.0, None) / np.clip(w, 0.0, None).sum()
        if best is None or F(w) < F(best):
            best = w
    return best


def test_cagrad_with_opposite_gradients_reaches_the_dual_optimum():
    """Issue 26: where g_w = 0 is the dual optimum (0 in the convex hull and nothing better), its root
    nu = 0 came out as ~ -1.4e-15, `nu >= 0` rejected it and another support won: d = g0 + c ||g0|| u
    for a unit u, 0.5 ||g0|| away from the documented d = g0. 50 random cases, T = 2..5, each with one
    opposite pair; the reference solves the dual independently (SLSQP on the gradients, many starts)."""
    c = 0.5
    for seed in range(50):
        g = opposite_pair(1000 + seed, 2 + seed % 4)
        g0 = g.mean(0)
        r = c * np.linalg.norm(g0)
        g_w = cagrad_dual_reference(g, c) @ g
        expected = g0 if np.linalg.norm(g_w) <= 1e-6 * r else g0 + r * g_w / np.linalg.norm(g_w)
        d = cagrad_weights(torch.tensor(g @ g.T), c=c, rescale=0).numpy() @ g
        assert np.linalg.norm(d - expected) <= 1e-6 * np.linalg.norm(g0), (seed, np.linalg.norm(d - expected))


# ----------------------------------------------------------------------------- TorchJD as the oracle (issue 26)
# torchjd 0.18 (`pip install "torchjd[full]==0.18.0"`, requirements.txt) computes each rule on the Jacobian J;
# ours computes weights from G = J J^T and the update is d = w @ J. Each test compares d with torchjd's
# aggregator(J) on random Jacobians (T = 2..6, P = 20..50, float64) of four families and prints the worst
# relative difference per family (pytest -s). Where the two differ by design, the test sets our parameter to
# torchjd's value, or asserts the documented difference with the bound it implies.

def tj_jacobians(family, n=30):
    """'well': unit-norm random rows; 'spread3' / 'spread6': norms log-spread over [1, 1e3] / [1, 1e6] in a
    random order; 'opposite': standard normal rows, one a negative multiple of another."""
    base = {"well": 0, "spread3": 100, "spread6": 200, "opposite": 300}[family]
    for s in range(n):
        T, P = 2 + s % 5, (20, 35, 50)[s % 3]
        if family == "opposite":
            yield torch.tensor(opposite_pair(base + s, T, P))
        else:
            yield torch.tensor(random_gradients(base + s, T, P, {"well": 1.0, "spread3": 1e3, "spread6": 1e6}[family]))


def tj_rel(d, ref, J):
    """||d - ref|| relative to the larger of the two (floored at 1e-9 max_t ||g_t||: both can be ~0)."""
    return float((d - ref).norm() / max(float(ref.norm()), float(d.norm()), 1e-9 * float(J.norm(dim=1).max())))


def tj_report(name, worst):
    print(f"torchjd oracle {name}: worst relative difference " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def test_upgrad_matches_torchjd():
    """TorchJD's UPGrad: quadprog on G / trace + reg_eps I, reg_eps = 1e-4 (ours: 0 by default, documented);
    its norm_eps = 1e-4 (G set to 0 when trace < norm_eps) never acts here (traces >= 1). Ours with
    reg_eps = 1e-4 against its default on all families; our default reg_eps = 0 against its projector with
    reg_eps = 0 where quadprog can take it (full-rank G: not the opposite pairs, whose G is singular)."""
    tj = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    from torchjd._linalg import QuadprogProjector
    worst = {}
    for family in ("well", "spread3", "spread6", "opposite"):
        for J in tj_jacobians(family):
            G = J @ J.T
            diffs = [tj_rel(upgrad_weights(G, reg_eps=1e-4) @ J, tj.UPGrad()(J), J)]
            if family != "opposite":
                exact = tj.UPGrad(projector=QuadprogProjector(reg_eps=0.0))(J)
                diffs.append(tj_rel(upgrad_weights(G) @ J, exact, J))
            worst[family] = max(worst.get(family, 0.0), *diffs)
    tj_report("UPGrad", worst)
    assert max(worst.values()) <= 1e-6, worst


def test_mgda_is_the_exact_min_norm_point_that_torchjd_frank_wolfe_approaches():
    """TorchJD's MGDA is Frank-Wolfe stopped after 100 iterations or a step below 1e-3 (documented in
    mgda_weights); its update lies in the convex hull of the gradients, up to a few percent from the
    min-norm point (measured up to 100% relative where the min-norm point is small). Ours is the exact
    min-norm point d*, so for any point d of the hull ||d - d*||^2 <= ||d||^2 - ||d*||^2 (d* is the
    projection of 0 onto the hull): that inequality is asserted against torchjd's d."""
    tj = pytest.importorskip("torchjd.aggregation")
    worst = {}
    for family in ("well", "spread3", "spread6", "opposite"):
        for J in tj_jacobians(family):
            ours, theirs = mgda_weights(J @ J.T) @ J, tj.MGDA()(J)
            margin = float(theirs @ theirs - ours @ ours - (ours - theirs) @ (ours - theirs))
            scale = float(J.norm(dim=1).max()) ** 2
            assert margin >= -1e-9 * float(theirs @ theirs) - 1e-14 * scale, (family, margin)
            worst[family] = max(worst.get(family, 0.0), tj_rel(ours, theirs, J))
    tj_report("MGDA (Frank-Wolfe, not asserted)", worst)


def test_pcgrad_matches_torchjd_with_the_same_random_order():
    """TorchJD's PCGrad draws torch.randperm(T) from the global generator for each task i and skips i; the
    same draws give our order rows, so the rule is compared exactly (both sum the projected gradients)."""
    tj = pytest.importorskip("torchjd.aggregation")
    from common.aggregators import pcgrad_coefficients
    worst = {}
    for family in ("well", "spread3", "spread6", "opposite"):
        for seed, J in enumerate(tj_jacobians(family)):
            T = J.shape[0]
            torch.manual_seed(seed)
            order = torch.tensor([[j for j in torch.randperm(T).tolist() if j != i] for i in range(T)])
            torch.manual_seed(seed)
            theirs = tj.PCGrad()(J)
            worst[family] = max(worst.get(family, 0.0), tj_rel(pcgrad_coefficients(J @ J.T, order) @ J, theirs, J))
    tj_report("PCGrad", worst)
    assert max(worst.values()) <= 1e-9, worst


def test_cagrad_matches_torchjd():
    """TorchJD's CAGrad (c = 0.5 set, it has no default; weights 1/T + sqrt(phi) / ||g_w|| w: our rescale=0)
    solves the dual with cvxpy's CLARABEL at its default tolerances: its update is off ours by up to ~1e-4
    relative, so the bound is 1e-3, and our dual objective must be at least as low as its. Where ||g_w||
    falls below its norm_eps = 1e-4 (on G / trace) it returns zero weights (d = 0), ours d = g0 (the official
    code's result for g_w = 0, documented): asserted as such. At norm spreads of 1e6 ||g_w|| is below that
    norm_eps in nearly every case, so the spread goes to 1e3 only."""
    tj = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("cvxpy")
    c = 0.5
    worst, zero = {}, 0
    for family in ("well", "spread3", "opposite"):
        for J in tj_jacobians(family):
            T, G = J.shape[0], J @ J.T
            ours_w = cagrad_weights(G, c=c, rescale=0)
            ours, theirs = ours_w @ J, tj.CAGrad(c=c)(J)
            if not theirs.abs().max() > 0:
                zero += 1
                assert torch.allclose(ours_w, torch.full((T,), 1.0 / T, dtype=torch.float64), rtol=0, atol=1e-12)
                continue
            theirs_w = tj.CAGradWeighting(c=c)(G)
            g0 = J.mean(0)

            def dual(weights):   # F(w) = <g_w, g0> + c ||g0|| ||g_w||, w recovered from 1/T + s w
                w = (weights - 1.0 / T) / (weights - 1.0 / T).sum()
                return float((w @ J) @ g0 + c * g0.norm() * (w @ J).norm())
            scale = float(g0.norm() * J.norm(dim=1).max())
            assert dual(ours_w) <= dual(theirs_w) + 1e-10 * scale, family
            worst[family] = max(worst.get(family, 0.0), tj_rel(ours, theirs, J))
    tj_report(f"CAGrad (torchjd zero weights, ours d = g0: {zero} cases)", worst)
    assert max(worst.values()) <= 1e-3, worst


@pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP",
                            "ignore:Solution may be inaccurate")          # cvxpy, inside torchjd's NashMTL
def test_nash_mtl_matches_torchjd_where_its_solver_converges():
    """TorchJD's NashMTL is the official code (ECOS, 20 rounds, stop at ||G a - 1/a|| < 1e-3 or a step
    below 1e-6) with the same max_norm = 1 clip. Its solution is that of the raw G (see nash_mtl_weights),
    so where its own residual ||G a - 1/a|| / ||1/a|| is below 1e-6 the updates must agree to 1e-6; where
    it stopped short (1 of 20 well-conditioned cases here, nearly all with norm spreads of 1e3) ours must
    satisfy the condition instead. Opposite gradients have no bargaining solution (documented): ours raises
    NoBargainingSolution and the class keeps ones at the first step (clipped), what the official code does
    when ECOS fails; torchjd's ECOS mostly does not fail there and returns weights that ran off (> 100)."""
    tj = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    worst, short, ran_off = {}, 0, 0
    for family in ("well", "opposite"):
        for J in tj_jacobians(family, n=20):
            T, G = J.shape[0], J @ J.T
            nash, ours = tj.NashMTL(n_tasks=T), AGGREGATORS["nash_mtl"]()
            theirs, ours_w = nash(J), ours(G)
            a = torch.as_tensor(nash.weighting.prvs_alpha, dtype=torch.float64)
            if family == "opposite":
                ones = torch.ones(T, dtype=torch.float64) @ J
                assert ours.report == {"nash_no_solution": 1}
                assert torch.allclose(ours_w @ J, ones / max(1.0, float(ones.norm())), rtol=1e-12, atol=0)
                ran_off += bool(a.max() > 100)
                if a.max() > 100:
                    continue
            elif float((G @ a - 1 / a).norm() / (1 / a).norm()) > 1e-6:
                short += 1
                b = nash_mtl_weights(G, max_norm=0)
                assert float((G @ b - 1 / b).norm() / (1 / b).norm()) < 1e-8
                continue
            worst[family] = max(worst.get(family, 0.0), tj_rel(ours_w @ J, theirs, J))
    tj_report(f"NashMTL (torchjd stopped short: {short}, ran off on opposite pairs: {ran_off} of 20)", worst)
    assert short <= 3 and max(worst.values()) <= 1e-6, (short, worst)


def test_imtl_matches_torchjd():
    """TorchJD's IMTLG: weights pinv(G) n / sum (n_t = ||g_t||), equal to the paper's closed form (ours)
    where G is regular. Documented differences: (1) where the common projection comes out negative ours
    negates the weights; (2) with two opposite gradients no equal non-zero projection exists: ours gives
    d = 0 (every projection equal, 0), torchjd its least-squares generalisation (unequal projections).
    At norm spreads of 1e6 our closed form (pinv of D U^T) is the less accurate one: its equal projections
    hold to ~1e-7 relative where torchjd's hold to ~1e-13, so the bound there is 1e-4."""
    tj = pytest.importorskip("torchjd.aggregation")
    worst = {}
    for family in ("well", "spread3", "spread6"):
        for J in tj_jacobians(family):
            worst[family] = max(worst.get(family, 0.0), tj_rel(imtl_weights(J @ J.T) @ J, tj.IMTLG()(J), J))
    tj_report("IMTL-G", worst)
    assert worst["well"] <= 1e-6 and worst["spread3"] <= 1e-6 and worst["spread6"] <= 1e-4, worst
    for J in tj_jacobians("opposite"):
        d = imtl_weights(J @ J.T) @ J
        assert float(d.norm()) <= 1e-12 * float(J.norm(dim=1).max())
    J = torch.tensor([[1.5, 1.5, -0.5], [-0.5, 1.0, 0.0], [-1.5, 1.5, 0.5]], dtype=torch.float64)
    theirs = tj.IMTLGWeighting()(J @ J.T)              # its common projection is negative: ours negates
    assert float((J @ (theirs @ J))[0]) < 0
    assert torch.allclose(imtl_weights(J @ J.T), -theirs, rtol=1e-9, atol=0)


def test_aligned_mtl_matches_torchjd():
    """TorchJD's AlignedMTL: preference 1/T (ours reduction="mean"), scale_mode "min" (and "median",
    "rmse" on the well-conditioned family). Documented difference: ours cuts the eigenvalues at
    lambda_max T eps(float32) as the official code, torchjd at eps of G's dtype (float64); the families
    are compared where no eigenvalue falls between the two cuts (all at spreads up to 1e3; none at 1e6,
    whose smallest eigenvalues lie between the cuts, so 1e6 is left out)."""
    tj = pytest.importorskip("torchjd.aggregation")
    worst, compared = {}, 0
    for family in ("well", "spread3", "opposite"):
        for J in tj_jacobians(family):
            G = J @ J.T
            lam, T = torch.linalg.eigvalsh(G), G.shape[0]
            cut32, cut64 = (float(lam.max()) * T * float(torch.finfo(dt).eps) for dt in (torch.float32, torch.float64))
            if ((lam > cut64) & (lam <= cut32)).any():
                continue
            compared += 1
            modes = ("min", "median", "rmse") if family == "well" else ("min",)
            for mode in modes:
                ours = aligned_mtl_weights(G, scale_mode=mode, reduction="mean") @ J
                worst[family] = max(worst.get(family, 0.0), tj_rel(ours, tj.AlignedMTL(scale_mode=mode)(J), J))
    tj_report(f"AlignedMTL ({compared} of 90 compared)", worst)
    assert compared >= 85 and max(worst.values()) <= 1e-6, (compared, worst)
