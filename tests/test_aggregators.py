"""Aggregators on hand-made gradient sets where the answer is known, and their invariances."""
import pytest
import torch

from common.aggregators import (AGGREGATORS, aligned_mtl_weights, cagrad_weights, imtl_weights, mgda_weights,
                                nash_mtl_weights)


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


@pytest.mark.parametrize("name", sorted(set(AGGREGATORS) - {"pcgrad"}))
def test_permuting_tasks_permutes_weights(name):
    G, _ = gram(CONFLICT3)
    perm = torch.tensor([2, 0, 1])
    w = AGGREGATORS[name](G, {})
    wp = AGGREGATORS[name](G[perm][:, perm], {})
    assert torch.allclose(wp, w[perm], atol=1e-6)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("grads", [[[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]], [[1.0, 1.0], [2.0, 2.0], [0.5, 0.5]]],
                         ids=["zero", "parallel"])
def test_finite_for_zero_and_parallel_gradients(name, grads):
    G, g = gram(grads)
    w = AGGREGATORS[name](G, {"generator": torch.Generator().manual_seed(0)})
    assert torch.isfinite(w).all()
    if name in ("mgda", "imtl", "nash_mtl") and g[1].norm() == 0:
        assert w[1] == 0                     # a zero gradient takes no part
    if name == "mgda":
        d = w @ g
        assert ((g @ d) >= d @ d - 1e-9)[g.norm(dim=1) > 0].all()
