"""Dynamic difficulty sampling (strategies/dynamic_sampling.py) on scripted inputs; one tiny model for the
update's task_scale (--apply weights)."""
import json

import pytest
import torch

from strategies.dynamic_sampling import (DifficultySampler, compose_batch, gap_difficulty, rank_rows,
                                         sampling_probabilities, single_task_references)


def test_probabilities_are_proportional_to_the_difficulty_not_a_softmax():
    assert sampling_probabilities([0.1, 0.3]).tolist() == pytest.approx([0.25, 0.75])
    # a task at or above its single-task level (gap <= 0) is not drawn
    assert sampling_probabilities([0.2, 0.0, -0.1, 0.2]).tolist() == pytest.approx([0.5, 0.0, 0.0, 0.5])
    assert sampling_probabilities([0.0, -0.3, 0.0]).tolist() == pytest.approx([1 / 3] * 3)   # no gap: uniform


def test_gap_is_single_task_minus_multi_task_score():
    refs = {"a": 0.80, "b": 0.60, "c": 0.70}
    d = gap_difficulty(refs, {"a": 0.70, "b": 0.58, "c": 0.75})
    assert d == pytest.approx([0.10, 0.02, -0.05])
    assert sampling_probabilities(d).tolist() == pytest.approx([0.10 / 0.12, 0.02 / 0.12, 0.0])


def test_default_keeps_every_label_and_weights_tasks_by_T_p():
    s = DifficultySampler(4, seed=0)
    mask, scale = s.draw("weights", batch_size=8)
    assert mask.tolist() == [True] * 4 and scale.tolist() == [1.0] * 4     # first epoch: uniform = all_at_once
    s.probs = sampling_probabilities([0.1, 0.3, 0.0, 0.0])
    mask, scale = s.draw("weights", batch_size=8)
    assert mask.all()                                                      # every task on every clip
    assert scale.tolist() == pytest.approx([1.0, 3.0, 0.0, 0.0]) and scale.sum().item() == pytest.approx(4.0)


def test_task_scale_multiplies_the_terms_of_the_update(tiny_data, tmp_path):
    """update.step(batch, task_scale=s) trains on sum_t s_t * w_t * L_t (what --apply weights passes)."""
    from common.multitask import add_update_args, make_update
    from common.arguments import build_parser
    from common.objectives import masked_mean
    from common.train import Run
    args = add_update_args(build_parser()).parse_args(
        ["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--batch-size", "8",
         "--epochs", "1", "--quiet", "--zero-dropout"])
    run = Run(args, strategy="task_scale_probe")
    update = make_update(run, args)
    run.start(update=update)
    batch = next(iter(run.batches()))
    s = torch.tensor([0.5, 2.0, 0.0, 1.0, 1.5])
    _, per_item, valid = run.per_item_losses(batch)
    run.optimizer.zero_grad(set_to_none=True)
    (masked_mean(per_item, valid) * s).sum().backward()
    expected = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    seen = {}
    run.step = lambda *a, **k: seen.update({n: p.grad.clone() for n, p in run.model.named_parameters()
                                            if p.grad is not None}) or True
    update.step(batch, task_scale=s)
    assert seen.keys() == expected.keys() and len(seen) > 10
    for n in expected:
        torch.testing.assert_close(seen[n], expected[n], rtol=1e-5, atol=1e-8, msg=n)
    with pytest.raises(ValueError, match=r"task_scale must have shape \(5,\)"):
        update.step(batch, task_scale=torch.ones(4))


def test_clips_are_composed_for_the_global_batch_and_each_rank_takes_its_rows():
    """torchrun: every rank draws the global batch's mask from the same generator; the ranks' rows put
    together are one process's mask, and a ghost rank gets a row of the right shape."""
    from common.distributed import shard, shard_start
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    whole = compose_batch(probs, 7, torch.Generator().manual_seed(3))
    parts = []
    for r in range(2):
        mask = compose_batch(probs, 7, torch.Generator().manual_seed(3))   # each rank's own sampler, same state
        clips, ghost = shard(list(range(7)), r, 2)
        parts.append(rank_rows(mask, {"clip_ids": clips, "global_batch_size": 7, "shard_start": shard_start(7, r, 2),
                                      "ghost": ghost}))
    assert [len(p) for p in parts] == [4, 3] and torch.equal(torch.cat(parts), whole)
    ghost = rank_rows(compose_batch(probs, 1, torch.Generator()), {"clip_ids": [0], "global_batch_size": 1,
                                                                   "shard_start": 1, "ghost": True})
    assert ghost.shape == (1, 3)
    with pytest.raises(ValueError, match="a mask of 7 clips for a global batch of 8"):
        rank_rows(whole, {"clip_ids": [0, 1], "global_batch_size": 8, "shard_start": 0})


def test_one_task_per_step_follows_the_probabilities():
    s = DifficultySampler(3, seed=0)
    s.probs = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    draws = [s.draw("task", 8) for _ in range(6000)]
    assert all(mask.shape == (3,) and mask.sum() == 1 and scale is None for mask, scale in draws)
    freq = torch.stack([m for m, _ in draws]).float().mean(0)
    assert torch.allclose(freq, s.probs.float(), atol=0.02)


def test_one_task_per_clip_follows_the_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.07, 0.03], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    masks = torch.cat([compose_batch(probs, 16, g) for _ in range(2000)])
    assert masks.shape == (32000, 5) and (masks.sum(1) == 1).all()          # each clip serves one task
    assert torch.allclose(masks.float().mean(0), probs.float(), atol=0.01)


def test_loss_difficulty_is_the_ratio_to_the_first_interval():
    s = DifficultySampler(2, seed=0)
    on = torch.tensor([True, True])
    for loss in ([1.0, 2.0], [1.0, 2.0]):
        s.record(torch.tensor(loss), on)
    assert s.loss_difficulty().tolist() == pytest.approx([1.0, 1.0])       # the first interval defines L(0)
    s.record(torch.tensor([0.5, 1.8]), on)
    d = s.loss_difficulty()
    assert d.tolist() == pytest.approx([0.5, 0.9])
    assert sampling_probabilities(d).tolist() == pytest.approx([0.5 / 1.4, 0.9 / 1.4])
    s.record(torch.tensor([0.4, 9.0]), torch.tensor([True, False]))        # task 1 not trained this interval
    assert s.loss_difficulty().tolist() == pytest.approx([0.4, 1.0])


def test_loss_share_is_the_interval_mean_loss():
    s = DifficultySampler(3, seed=0)
    on = torch.tensor([True, True, True])
    s.record(torch.tensor([1.0, 2.0, 1.0]), on)
    s.record(torch.tensor([1.0, 4.0, 3.0]), on)
    mean = s.interval_losses()
    assert mean.tolist() == pytest.approx([1.0, 3.0, 2.0])
    assert sampling_probabilities(mean).tolist() == pytest.approx([1 / 6, 3 / 6, 2 / 6])   # L_t / sum_s L_s
    assert torch.isnan(s.interval_losses()).all()                          # started anew


def test_sampler_state_round_trip_continues_the_same_draws():
    a = DifficultySampler(3, seed=1)
    a.probs = sampling_probabilities([0.1, 0.5, 0.9])
    a.draw("clips", 8)
    b = DifficultySampler(3, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.draw("clips", 8)[0], b.draw("clips", 8)[0])
    assert torch.equal(a.draw("task", 8)[0], b.draw("task", 8)[0])


def test_single_task_references_name_what_is_missing(tmp_path):
    tasks = ["binary", "gory"]
    refs, why = single_task_references(tmp_path, 0, tasks, "ap")
    assert refs is None and "summary.json" in why
    path = tmp_path / "single_task" / "seed0" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"val": {"per_task": {"binary": {"ap": 0.8, "f1_macro": 0.7},
                                                     "gory": {"ap": None, "f1_macro": 0.6}}}}))
    refs, why = single_task_references(tmp_path, 0, tasks, "ap")
    assert refs is None and "gory" in why                                   # AP undefined: not a reference
    refs, _ = single_task_references(tmp_path, 0, tasks, "f1_macro")
    assert refs == {"binary": 0.7, "gory": 0.6}


def test_loss_share_keeps_the_last_loss_of_a_task_not_trained():
    """--difficulty loss_share: a task with no loss in the interval keeps its last measured mean loss (a task
    never measured yet: the mean of the interval's measured losses); it is never given 0."""
    s = DifficultySampler(3, seed=0)
    s.record(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([True, True, False]))   # task 2 never measured
    d, carried = s.loss_share_difficulty()
    assert d.tolist() == pytest.approx([1.0, 2.0, 1.5]) and carried.tolist() == [False, False, True]
    s.record(torch.tensor([0.5, 7.0, 3.0]), torch.tensor([True, False, True]))   # task 1 not trained
    d, carried = s.loss_share_difficulty()
    assert d.tolist() == pytest.approx([0.5, 2.0, 3.0]) and carried.tolist() == [False, True, False]
    d, carried = s.loss_share_difficulty()                                       # an interval with no step
    assert d.tolist() == pytest.approx([0.5, 2.0, 3.0]) and carried.all()
    s.record(torch.tensor([float("nan"), 1.0, 1.0]), torch.tensor([True, True, True]))
    d, _ = s.loss_share_difficulty()                                             # a non-finite loss stays NaN
    assert torch.isnan(d[0]) and d[1:].tolist() == pytest.approx([1.0, 1.0])     # (main keeps the old probs)
    s.record(torch.tensor([4.0, 1.0, 1.0]), torch.tensor([False, True, True]))
    assert s.loss_share_difficulty()[0][0].item() == pytest.approx(0.5)          # the last finite loss
    b = DifficultySampler(3, seed=5)
    b.load_state_dict(s.state_dict())                                            # checkpointed
    assert torch.equal(b.last_loss, s.last_loss)


@pytest.mark.parametrize("apply", ["task", "clips"])
def test_loss_share_simulation_no_probability_stuck_at_zero(apply):
    """200 scripted intervals of 2 steps (--apply task: one task per step; clips: 4 clips per step over 5
    tasks), positive losses that fall at different rates: no probability is ever 0, every task keeps being
    drawn. (The rule before the fix gave an undrawn task difficulty 0, then probability 0, forever.)"""
    g = torch.Generator().manual_seed(11)
    T, s = 5, DifficultySampler(5, seed=3)
    base, rate = torch.tensor([0.7, 0.5, 0.9, 0.3, 0.6]), torch.tensor([0.01, 0.002, 0.02, 0.0, 0.005])
    drawn_late = torch.zeros(T)
    for interval in range(200):
        for _ in range(2):
            mask, _ = s.draw(apply, 4)
            trained = mask.any(0) if mask.dim() == 2 else mask
            losses = base * torch.exp(-rate * interval) * (1 + 0.2 * torch.rand(T, generator=g)) + 0.01
            s.record(losses, trained)
            if interval >= 100:
                drawn_late += trained.float()
        d, _ = s.loss_share_difficulty()
        assert torch.isfinite(d).all() and (d > 0).all(), (interval, d)
        s.probs = sampling_probabilities(d.tolist())
        assert (s.probs > 0).all(), (interval, s.probs)
    assert (drawn_late > 0).all(), drawn_late


def test_loss_share_run_never_sets_a_probability_to_zero(tiny_data, tmp_path):
    """The script itself, --difficulty loss_share --apply task --interval 1 (one task trained per interval):
    every logged probability stays positive (before the fix the first update gave four tasks 0 for good)."""
    from strategies.dynamic_sampling import main
    main(["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--batch-size", "8",
          "--max-steps", "6", "--eval-every", "6", "--quiet", "--difficulty", "loss_share", "--apply", "task",
          "--interval", "1"])
    records = [json.loads(line) for line in (tmp_path / "dynamic_sampling" / "seed0" / "metrics.jsonl").open()]
    sampling = [r for r in records if r["event"] == "sampling"]
    assert len(sampling) == 6
    assert all(p > 0 for r in sampling for p in r["probs"].values()), [r["probs"] for r in sampling]
    assert all(len(r["carried"]) == 4 for r in sampling)                          # one task trained per step
