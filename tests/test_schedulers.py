import math

import pytest
import torch

from common.schedulers import StopAndGo
from common.weighting import GradNormWeights, UncertaintyWeights

TASKS = ["a", "b"]


def feed(rule, seq):
    """seq: list of (score_a, score_b); returns the transitions after each evaluation."""
    return [rule.observe(dict(zip(TASKS, s))) for s in seq]


def test_improving_task_never_stops_and_flat_task_stops_after_patience():
    rule = StopAndGo(TASKS, improve=0.001, restart=0.005, patience=2, stop_gap=4)
    out = feed(rule, [(0.50, 0.50), (0.55, 0.50), (0.60, 0.5004), (0.65, 0.50)])
    # b: 0.5004 beats 0.50 by only 0.08% (< 0.1%): not an improvement; second flat eval -> stop
    assert out == [[], [], [("b", "stop")], []]
    assert rule.stopped == [False, True]


def test_a_real_improvement_resets_the_count():
    rule = StopAndGo(TASKS, patience=2)
    feed(rule, [(0.5, 0.5), (0.5, 0.5)])  # b: one non-improving eval
    feed(rule, [(0.5, 0.51)])              # improved by 2%: count reset
    assert rule.no_improve[1] == 0 and not rule.stopped[1]
    assert rule.stopped[0]                 # a: two flat evaluations


def test_stopped_task_is_updated_every_stop_gap_steps():
    rule = StopAndGo(TASKS, patience=1, stop_gap=4)
    feed(rule, [(0.5, 0.5), (0.6, 0.5)])
    assert rule.states() == {"a": "go", "b": "stop"}
    schedule = [rule.active(step).tolist() for step in range(8)]
    assert [s[0] for s in schedule] == [True] * 8
    assert [s[1] for s in schedule] == [True, False, False, False, True, False, False, False]


def test_stopped_task_that_degrades_returns_to_go():
    rule = StopAndGo(TASKS, restart=0.005, patience=1)
    feed(rule, [(0.5, 0.8), (0.6, 0.8)])
    assert rule.stopped[1]
    assert feed(rule, [(0.7, 0.798)]) == [[]]                 # -0.25%: stays stopped
    assert feed(rule, [(0.8, 0.79)]) == [[("b", "go")]]       # -1.25% below best: back to go
    assert rule.active(1).tolist() == [True, True]


def test_state_round_trip():
    rule = StopAndGo(TASKS, patience=1)
    feed(rule, [(0.5, 0.5), (0.6, 0.5)])
    other = StopAndGo(TASKS, patience=1)
    other.load_state_dict(rule.state_dict())
    assert other.states() == rule.states() and other.best == rule.best


def test_uncertainty_gradient_matches_closed_form():
    w = UncertaintyWeights(3)
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.0, 0.5, -1.0]))
    losses = torch.tensor([0.7, 2.0, 0.1])
    w(losses).backward()
    expected = 1 - torch.exp(-w.log_vars.detach()) * losses   # d/ds (e^-s L + s)
    assert torch.allclose(w.log_vars.grad, expected, atol=1e-6)


def test_gradnorm_raises_weight_of_task_below_target_and_keeps_sum():
    gn = GradNormWeights(2, alpha=1.5, lr=0.05)
    # first call fixes L(0); equal rates, task 0 has a smaller gradient norm -> below its target
    losses = torch.tensor([1.0, 1.0])
    norms = torch.tensor([0.2, 1.0])
    for _ in range(3):
        gn.update(losses, norms)
        assert gn.w.sum().item() == pytest.approx(2.0, abs=1e-5)
    assert gn.w[0] > 1.0 > gn.w[1]


def test_gradnorm_favours_the_slower_task():
    gn = GradNormWeights(2, alpha=1.5, lr=0.05)
    gn.update(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))  # L(0)
    w_before = gn.w.detach().clone()
    # task 1's loss fell less (slower training rate r > 1): its target rises, so its weight rises
    targets = gn.update(torch.tensor([0.5, 0.9]), torch.tensor([1.0, 1.0]))
    assert targets[1] > targets[0]
    assert gn.w[1] > w_before[1] and gn.w[0] < w_before[0]
    assert not math.isnan(gn.w.sum().item())


def test_negative_scores_such_as_minus_loss_are_judged_the_right_way():
    rule = StopAndGo(TASKS, improve=0.001, restart=0.005, patience=1)
    feed(rule, [(-2.0, -2.0), (-1.5, -2.0)])           # a improves (loss 2 -> 1.5), b flat -> stop
    assert rule.states() == {"a": "go", "b": "stop"}
    assert feed(rule, [(-1.4, -1.995)]) == [[]]         # b slightly better: stays stopped
    assert feed(rule, [(-1.3, -2.02)]) == [[("b", "go")]]  # b 1% worse than its best: back to go
