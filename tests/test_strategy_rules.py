"""The rules of the strategy scripts, on small deterministic cases (no model)."""
import math

import pytest
import torch

from strategies.curriculum import curriculum_order, entered
from strategies.dynamic_sampling import DifficultySampler, compose_batch, sampling_probabilities
from strategies.round_robin import task_of_step
from strategies.sequential import Phases, forgetting  # noqa: E402


def test_sampling_probabilities_from_difficulties():
    p = sampling_probabilities([0.2, 0.4, 0.4], tau=0.2)
    e = [math.exp(1.0), math.exp(2.0), math.exp(2.0)]
    assert p.tolist() == pytest.approx([x / sum(e) for x in e])
    assert p[1] > p[0]                                      # harder task drawn more often
    assert sampling_probabilities([1.0, 1.0], tau=0.5).tolist() == pytest.approx([0.5, 0.5])


def test_composed_batches_match_the_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.07, 0.03], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    masks = torch.cat([compose_batch(probs, 16, g) for _ in range(2000)])
    assert masks.shape == (32000, 5)
    assert (masks.sum(1) == 1).all()                         # each clip serves exactly one task
    freq = masks.float().mean(0)
    assert torch.allclose(freq, probs.float(), atol=0.01)


def test_loss_difficulty_is_ratio_to_first_interval():
    s = DifficultySampler(2, tau=0.2, seed=0)
    for loss in ([1.0, 2.0], [1.0, 2.0]):
        s.record(torch.tensor(loss), torch.tensor([True, True]))
    assert s.loss_difficulty().tolist() == pytest.approx([1.0, 1.0])   # first interval defines L(0)
    s.record(torch.tensor([0.5, 1.8]), torch.tensor([True, True]))
    d = s.loss_difficulty()
    assert d.tolist() == pytest.approx([0.5, 0.9])
    probs = s.update(d)
    assert probs[1] > probs[0]                                # the task whose loss fell less


def test_sampler_state_round_trip_continues_the_same_draws():
    a = DifficultySampler(3, tau=0.2, seed=1)
    a.update([0.1, 0.5, 0.9])
    compose_batch(a.probs, 8, a.generator)
    b = DifficultySampler(3, tau=0.2, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(compose_batch(a.probs, 8, a.generator), compose_batch(b.probs, 8, b.generator))


def test_round_robin_cycles_through_tasks():
    assert [int(task_of_step(k, 3).nonzero()) for k in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_curriculum_order_follows_measured_difficulty():
    difficulty = {"binary": 0.3, "mature": 0.1, "gory": 0.6, "slapstick": 0.2, "sarcasm": 0.5}
    assert curriculum_order(difficulty, "easy") == ["mature", "slapstick", "binary", "sarcasm", "gory"]
    assert curriculum_order(difficulty, "hard") == ["gory", "sarcasm", "binary", "slapstick", "mature"]


def test_tasks_enter_at_planned_steps():
    tasks = ["binary", "mature", "gory"]
    order = ["gory", "binary", "mature"]
    assert entered(0, tasks, order, 10).tolist() == [False, False, True]
    assert entered(9, tasks, order, 10).tolist() == [False, False, True]
    assert entered(10, tasks, order, 10).tolist() == [True, False, True]
    assert entered(20, tasks, order, 10).tolist() == [True, True, True]


def test_forgetting_from_recorded_metrics():
    order = ["a", "b", "c"]
    after = {"a": {"a": 0.80, "b": 0.50, "c": 0.40},
             "b": {"a": 0.70, "b": 0.75, "c": 0.45},
             "c": {"a": 0.60, "b": 0.74, "c": 0.90}}
    assert forgetting(after, order) == pytest.approx({"a": 0.20, "b": 0.01})


def test_sequential_phase_ends_on_plateau_or_cap():
    ph = Phases(["a", "b"], patience=2, max_steps=100)
    assert not ph.observe(0.5, 10) and not ph.observe(0.6, 20)
    assert not ph.observe(0.6, 30)           # one evaluation without improvement
    assert ph.observe(0.55, 40)              # second: phase ends
    ph.next({"a": 0.6, "b": 0.1}, 40)
    assert ph.task == "b" and ph.start_step == 40
    assert ph.observe(0.9, 140)              # the cap ends it too


def test_affinity_of_a_task_with_itself_is_positive_on_a_convex_toy():
    from strategies.task_grouping import lookahead_affinity
    # three quadratic tasks on a shared 2-d parameter: a and b pull the same way, c the opposite way
    theta = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    targets = torch.tensor([[1.0, 1.0], [1.0, 0.8], [-1.0, -1.0]])

    def losses():
        return ((theta[None] - targets) ** 2).sum(1)
    grads = torch.stack([torch.autograd.grad(losses()[t], theta)[0] for t in range(3)])
    Z = lookahead_affinity(losses, [theta], grads, lr=0.1)
    assert (Z.diagonal() > 0).all()
    assert Z[0, 1] > 0 and Z[1, 0] > 0          # aligned tasks help each other
    assert Z[0, 2] < 0 and Z[2, 0] < 0          # opposed tasks hurt each other
    assert torch.equal(theta.detach(), torch.zeros(2))  # theta restored


def test_partitions_are_exhaustive():
    from strategies.task_grouping import partitions
    parts = list(partitions(list("abcde")))
    assert len(parts) == 52                      # Bell number B5
    assert len({tuple(sorted(tuple(sorted(g)) for g in p)) for p in parts}) == 52


def test_grouping_search_finds_the_planted_grouping():
    from strategies.task_grouping import best_groupings
    tasks = ["binary", "mature", "gory", "slapstick", "sarcasm"]
    planted = [["binary", "mature", "sarcasm"], ["gory", "slapstick"]]
    Z = torch.full((5, 5), -0.05)
    for g in planted:
        for i in g:
            for j in g:
                Z[tasks.index(i), tasks.index(j)] = 0.1
    best = best_groupings(Z, tasks)
    score, part = best[2]
    assert sorted(sorted(g) for g in part) == sorted(sorted(g) for g in planted)
    assert max(best, key=lambda k: best[k][0]) == 2


def test_modality_curriculum_phases_then_all():
    from strategies.modality_curriculum import curriculum_modalities
    order = ["text", "video", "audio"]
    got = [curriculum_modalities(step, order, 10) for step in (0, 9, 10, 25, 29, 30, 100)]
    assert got == [("text",), ("text",), ("video",), ("audio",), ("audio",), None, None]


def test_modality_dropout_never_drops_everything_and_drops_at_the_rate():
    from strategies.modality_curriculum import dropout_modalities
    g = torch.Generator().manual_seed(0)
    draws = [dropout_modalities(0.3, g) for _ in range(3000)]
    assert all(d is None or len(d) >= 1 for d in draws)
    kept_text = sum(d is None or "text" in d for d in draws) / len(draws)
    # P(keep) = 0.7, conditioned on not dropping all three: 0.7 / (1 - 0.3^3)
    assert kept_text == pytest.approx(0.7 / (1 - 0.027), abs=0.03)


def test_dwa_weights_follow_the_loss_ratio_of_the_last_two_epochs():
    from common.weighting import DWAWeights
    dwa = DWAWeights(2, tau=2.0)
    on = torch.tensor([True, True])
    for epoch, losses in enumerate([[1.0, 1.0], [0.5, 0.9], [0.4, 0.9]]):
        dwa.observe(torch.tensor(losses), on, epoch)
        if epoch < 2:
            assert dwa.weights().tolist() == [1.0, 1.0]     # fewer than two finished epochs
    r = torch.tensor([0.5 / 1.0, 0.9 / 1.0])
    expected = 2 * torch.softmax(r / 2.0, 0)
    assert torch.allclose(dwa.weights(), expected)
    assert dwa.weights()[1] > dwa.weights()[0]             # the slower task gets more weight


def test_famo_moves_weight_to_the_task_whose_loss_falls_slower():
    from common.weighting import FAMOWeights
    famo = FAMOWeights(2, lr=0.1, gamma=0.0)
    on = torch.tensor([True, True])
    loss = torch.tensor([1.0, 1.0])
    for _ in range(5):
        famo.observe(loss, on, 0)
        loss = loss * torch.tensor([0.5, 0.95])           # task 0 improves fast, task 1 slowly
    assert famo.weights()[1] > famo.weights()[0]
