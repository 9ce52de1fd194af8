"""TAG (strategies/task_grouping.py): the Adam lookahead, the lr-normalised affinity, the official network
selection and the exhaustive partition search, on small hand-checkable cases."""
import copy
import math

import pytest
import torch

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


def test_adam_lookahead_clips_like_the_training_step():
    w, losses = linear_tasks()
    opt = torch.optim.Adam([w], lr=0.01)
    w.grad = torch.tensor([0.3, -0.7])
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    g = torch.tensor([4.0, -3.0])                                  # norm 5, clipped to 1
    (step,) = adam_step(opt, [w], [g], clip=1.0)
    w2 = copy.deepcopy(w)
    opt2 = torch.optim.Adam([w2], lr=0.01)
    opt2.load_state_dict(state)
    w2.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([w2], 1.0)
    opt2.step()
    assert torch.allclose(w2.detach() - w.detach(), step, rtol=1e-5, atol=1e-9)


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
    from common.train import Run, build_parser
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
    Z = affinity_on_batch(run, batch, shared)
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
