"""TAG (strategies/task_grouping.py): the Adam lookahead, the lr-normalised affinity, the official network
selection and the exhaustive partition search, on small hand-checkable cases."""
import argparse
import copy
import math

import pytest
import torch

from common.train import Run
from strategies.task_grouping import (adam_step, affinity_on_batch, best_partitions, lookahead_affinity, partitions,
                                      select_groups)

TASKS5 = ["binary", "mature", "gory", "slapstick", "sarcasm"]


def linear_tasks():
    """A shared weight w [2] and two squared-error tasks on fixed inputs."""
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0]))
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [-1.0, 0.3]])
    y = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]])          # targets of task 0 and task 1

    def losses():
        return ((x @ w)[None] - y).pow(2).mean(1)                  # [2]
    return w, losses


def grads_of(w, losses):
    return [torch.autograd.grad(losses()[t], [w]) for t in range(2)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_lookahead_equals_the_hand_computed_step_and_the_optimizers_own(weight_decay):
    w, losses = linear_tasks()
    opt = torch.optim.Adam([w], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    g0 = torch.tensor([0.3, -0.7])
    w.grad = g0.clone()
    opt.step()                                                     # one real step: the moments are non-zero
    state_before = copy.deepcopy(opt.state_dict())
    w_before = w.detach().clone()

    (g,) = grads_of(w, losses)[1]
    (step,) = adam_step(opt, [w], [g])

    # by hand, step t = 2 (Adam's L2 weight decay adds wd * w to each gradient)
    g_wd0 = g0 + weight_decay * torch.tensor([0.5, -1.0])
    m1, v1 = 0.1 * g_wd0, 0.001 * g_wd0 ** 2
    g_wd = g + weight_decay * w_before
    m2, v2 = 0.9 * m1 + 0.1 * g_wd, 0.999 * v1 + 0.001 * g_wd ** 2
    by_hand = -0.01 / (1 - 0.9 ** 2) * m2 / (v2.sqrt() / math.sqrt(1 - 0.999 ** 2) + 1e-8)
    assert torch.allclose(step, by_hand, rtol=1e-5, atol=1e-9)

    # the optimizer's own step from the same state
    w2 = copy.deepcopy(w)
    opt2 = torch.optim.Adam([w2], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    opt2.load_state_dict(copy.deepcopy(state_before))
    w2.grad = g.clone()
    opt2.step()
    assert torch.allclose(w2.detach() - w_before, step, rtol=1e-5, atol=1e-9)

    # nothing changed: parameters and optimizer state
    assert torch.equal(w.detach(), w_before)
    after = opt.state_dict()["state"][0]
    assert all(torch.equal(torch.as_tensor(after[k]), torch.as_tensor(state_before["state"][0][k])) for k in after)


class ThreeTaskModel(torch.nn.Module):
    """A shared weight w [2] (tasks a and b: squared errors of x @ w, after a dropout) and a head-only
    parameter h [3] (task c: squared error of dropout(h), independent of w); float64, so that the relative
    loss changes of a huge loss stay exact. Records its mode per forward."""

    def __init__(self, p=0.0, scale=1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
        self.h = torch.nn.Parameter(torch.tensor([0.3, 0.8, -0.2], dtype=torch.float64))
        self.drop = torch.nn.Dropout(p)
        self.x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [-1.0, 0.3]], dtype=torch.float64)
        self.y = scale * torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]], dtype=torch.float64)
        self.modes = []

    def forward(self, batch=None):
        self.modes.append(self.training)
        shared = self.drop(self.x @ self.w)
        return torch.stack([(shared - self.y[0]).pow(2).mean(), (2 * shared - self.y[1]).pow(2).mean(),
                            (self.drop(self.h) - 1.0).pow(2).mean()])


class ScriptedRun:
    """What affinity_on_batch reads of a Run, around ThreeTaskModel; Adam with non-zero moments (one real
    step taken) and the training's gradient clipping set to 1."""

    def __init__(self, model, lr=0.01, clip_grad=1.0):
        self.model, self.tasks, self.step_count, self.device = model, ["a", "b", "c"], 7, torch.device("cpu")
        self.args = argparse.Namespace(seed=0, clip_grad=clip_grad)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.w.grad = torch.tensor([0.3, -0.7], dtype=torch.float64)
        model.h.grad = torch.tensor([0.1, 0.2, -0.1], dtype=torch.float64)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self):
        return float(self.optimizer.param_groups[0]["lr"])

    def task_losses(self, batch, model=None, generator=None):
        return (model or self.model)(batch)

    train_mode = Run.train_mode  # the real one: it reads only self.model


def test_lookahead_applies_no_clip_a_huge_loss_gives_the_unclipped_adam_update():
    """As the official lookahead: the optimizer's update from the raw task gradient (the training clips at
    1 here; a huge loss has a gradient norm above 1e3, which a clip would shrink to 1 and so change Adam's
    step, its moments being non-zero). Oracle: torch.optim.Adam's own step on a copy, no clip."""
    run = ScriptedRun(ThreeTaskModel(scale=1e3))
    state = copy.deepcopy(run.optimizer.state_dict())
    Z = affinity_on_batch(run, None, [run.model.w])
    base = run.model().detach()
    for i in range(3):
        model = copy.deepcopy(run.model)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        opt.load_state_dict(copy.deepcopy(state))
        (g,) = torch.autograd.grad(model()[i], [model.w], allow_unused=True)
        assert i == 2 or g.norm() > 1e3                              # far above the clip
        model.w.grad = torch.zeros_like(model.w) if g is None else g  # task c: no gradient on w
        opt.step()                                                   # h has no grad: Adam leaves it
        expected = ((1 - model().detach() / base) / 0.01).float()
        torch.testing.assert_close(Z[i], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_lookahead_runs_in_train_mode_and_restores_the_mode(mode):
    model = ThreeTaskModel(p=0.5)
    run = ScriptedRun(model)
    model.train(mode == "train")
    model.modes.clear()
    affinity_on_batch(run, None, [model.w])
    assert model.modes == [True] * 5             # the gradients' forward, the base losses, one per task
    assert model.training == (mode == "train")


def test_lookahead_draws_one_dropout_mask_and_leaves_the_training_rng_stream():
    """Dropout is on (train mode) and every forward of a measurement draws the same masks, so task c, whose
    loss does not depend on the shared weight, gets exactly Z[i, c] = 0; the draws come from a forked RNG:
    the training run's next random numbers are the same whether or not the lookahead ran; and Z depends on
    the seed and step only (a resumed run measures the same)."""
    run = ScriptedRun(ThreeTaskModel(p=0.5))
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    Z = affinity_on_batch(run, None, [run.model.w])
    assert torch.equal(torch.rand(4), expected_next)
    assert torch.equal(Z[:, 2], torch.zeros(3))
    assert (Z[:2, :2] != 0).all()
    torch.manual_seed(999)
    assert torch.equal(affinity_on_batch(run, None, [run.model.w]), Z)
    # the masks are live: the lookahead's losses are not the no-dropout ones
    from strategies.task_grouping import lookahead_seed, reseed
    reseed(run.device, lookahead_seed(run))
    dropped = run.model().detach()
    run.model.eval()
    assert not torch.equal(dropped, run.model().detach())


def test_first_adam_step_moves_each_weight_by_about_the_lr():
    w, losses = linear_tasks()
    opt = torch.optim.Adam([w], lr=0.001)
    (g,) = grads_of(w, losses)[0]
    (step,) = adam_step(opt, [w], [g])                             # no state yet: -lr * g / (|g| + eps)
    assert torch.allclose(step, -0.001 * torch.sign(g), rtol=1e-4)
    assert not opt.state                                           # no state was created


def test_affinity_is_the_relative_loss_change_divided_by_the_lr():
    w, losses = linear_tasks()
    opt = torch.optim.Adam([w], lr=0.01)
    grads = grads_of(w, losses)
    steps = [adam_step(opt, [w], g) for g in grads]
    base = losses().detach()
    Z = lookahead_affinity(losses, [w], steps, lr=0.01)
    for i in range(2):
        with torch.no_grad():
            after = ((torch.tensor([[1.0, 2.0], [0.5, -1.0], [-1.0, 0.3]]) @ (w + steps[i][0]))[None]
                     - torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]])).pow(2).mean(1)
        assert torch.allclose(Z[i], (1 - after / base) / 0.01, rtol=1e-5)
    assert (Z.diagonal() > 0).all()                                # a task's own step helps it
    assert torch.equal(w.detach(), torch.tensor([0.5, -1.0]))     # theta restored


def test_binary_helps_itself_on_the_tiny_model(tiny_data, tmp_path):
    from common.arguments import build_parser
    from common.train import Run
    args = build_parser().parse_args(["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny",
                                      "--batch-size", "8", "--quiet"])
    run = Run(args, strategy="tag_test")
    run.start()
    shared = [p for p in run.model.shared_parameters() if p.requires_grad]
    for k, batch in enumerate(run.batches()):
        if k == 3:
            break
        losses = run.task_losses(batch)
        run.step(losses.sum(), losses, batch)
    params = [p.detach().clone() for p in run.model.parameters()]
    state = copy.deepcopy(run.optimizer.state_dict())
    rng = torch.get_rng_state()
    Z = affinity_on_batch(run, batch, shared)
    assert torch.equal(torch.get_rng_state(), rng) and run.model.training   # the training's RNG stream untouched
    b = run.tasks.index("binary")
    assert Z[b, b] > 0
    assert torch.isfinite(Z).all()
    assert all(torch.equal(p, q) for p, q in zip(params, run.model.parameters()))
    assert all(torch.equal(v, state["state"][k][n]) for k, s in run.optimizer.state_dict()["state"].items()
               for n, v in s.items())


def planted(groups, tasks, inside=0.1, outside=-0.05):
    Z = torch.full((len(tasks), len(tasks)), outside)
    for g in groups:
        for i in g:
            for j in g:
                Z[tasks.index(i), tasks.index(j)] = inside
    return Z


def test_selection_returns_the_planted_groups():
    groups = [["binary", "mature", "sarcasm"], ["gory", "slapstick"]]
    value, chosen, serving = select_groups(planted(groups, TASKS5), TASKS5, max_groups=2)
    assert sorted(map(sorted, chosen)) == sorted(map(sorted, groups))
    assert value == pytest.approx(0.1)
    assert sorted(serving["gory"]) == ["gory", "slapstick"] and sorted(serving["mature"]) == sorted(groups[0])
    # more groups allowed: the planted ones stay the best (a third group cannot raise anyone's affinity)
    assert select_groups(planted(groups, TASKS5), TASKS5, max_groups=3)[0] == pytest.approx(0.1)


def test_selection_allows_overlapping_groups_and_serves_each_task_by_its_best_group():
    tasks = ["a", "b", "c"]
    # a helps b and c, b and c hurt each other: {a,b} and {a,c} both beat any partition
    Z = torch.tensor([[0.0, 1.0, 1.0],
                      [1.0, 0.0, -1.0],
                      [1.0, -1.0, 0.0]])
    value, chosen, serving = select_groups(Z, tasks, max_groups=2)
    assert sorted(map(sorted, chosen)) == [["a", "b"], ["a", "c"]]
    assert value == pytest.approx(1.0)
    assert serving["b"] == ["a", "b"] and serving["c"] == ["a", "c"]
    best = best_partitions(Z, tasks)
    assert max(s for s, _ in best.values()) / len(tasks) < value      # a partition must split a from b or c
    assert select_groups(Z, tasks, max_groups=1)[1] == [["a", "b", "c"]]   # one group: all tasks


def test_partitions_are_exhaustive():
    parts = list(partitions(list("abcde")))
    assert len(parts) == 52                      # Bell number B5
    assert len({tuple(sorted(tuple(sorted(g)) for g in p)) for p in parts}) == 52


def test_partition_search_finds_the_planted_grouping():
    groups = [["binary", "mature", "sarcasm"], ["gory", "slapstick"]]
    best = best_partitions(planted(groups, TASKS5), TASKS5)
    score, part = best[2]
    assert sorted(map(sorted, part)) == sorted(map(sorted, groups))
    assert max(best, key=lambda k: best[k][0]) == 2


def test_run_train_mode_restores_the_previous_mode_also_after_an_error():
    """The lookahead trains in train mode and must leave an evaluating model in eval mode, even when it fails."""
    run = ScriptedRun(ThreeTaskModel())
    run.model.eval()
    with pytest.raises(RuntimeError, match="inside"):
        with run.train_mode():
            assert run.model.training
            raise RuntimeError("inside")
    assert not run.model.training
