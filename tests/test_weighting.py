"""Loss weightings: each rule against its closed form or reference semantics on scripted inputs, and the
contract (one flag per hyper-parameter, state round trips, FAMO's signal from the same batch)."""
import argparse
import inspect
import math

import pytest
import torch

from common.weighting import DWA, FAMO, RLW, WEIGHTINGS, GradNorm, Learned, Uncertainty


def test_uncertainty_gradient_matches_closed_form():
    w = Uncertainty(3)
    with torch.no_grad():
        w.param.copy_(torch.tensor([0.0, 0.5, -1.0]))
    losses = torch.tensor([0.7, 2.0, 0.1])
    w(losses).backward()
    expected = 1 - torch.exp(-w.param.detach()) * losses   # d/ds (e^-s L + s)
    assert torch.allclose(w.param.grad, expected, atol=1e-6)


def test_learned_weights_sum_to_T_and_inactive_terms_are_zero():
    w = Learned(4)
    with torch.no_grad():
        w.param.copy_(torch.tensor([0.3, -1.0, 2.0, 0.0]))
    assert float(w.weights().sum()) == pytest.approx(4.0)
    terms = w.terms(torch.ones(4), torch.tensor([True, False, True, True]))
    assert terms[1] == 0 and terms[0] > 0


def test_gradnorm_raises_weight_of_task_below_target_and_keeps_sum():
    gn = GradNorm(2, alpha=1.5, lr=0.05)
    # first call fixes L(0); equal rates, task 0 has a smaller gradient norm -> below its target
    losses = torch.tensor([1.0, 1.0])
    norms = torch.tensor([0.2, 1.0])
    for _ in range(3):
        gn.update(losses, norms)
        assert gn.w.sum().item() == pytest.approx(2.0, abs=1e-5)
    assert gn.w[0] > 1.0 > gn.w[1]


def test_gradnorm_favours_the_slower_task():
    gn = GradNorm(2, alpha=1.5, lr=0.05)
    gn.update(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))  # L(0)
    w_before = gn.w.detach().clone()
    # task 1's loss fell less (slower training rate r > 1): its target rises, so its weight rises
    targets = gn.update(torch.tensor([0.5, 0.9]), torch.tensor([1.0, 1.0]))
    assert targets[1] > targets[0]
    assert gn.w[1] > w_before[1] and gn.w[0] < w_before[0]
    assert not math.isnan(gn.w.sum().item())


def test_dwa_weights_follow_the_loss_ratio_of_the_last_two_epochs():
    dwa = DWA(2, tau=2.0)
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
    famo = FAMO(2, lr=0.1, gamma=0.0)
    on = torch.tensor([True, True])
    loss = torch.tensor([1.0, 1.0])
    for _ in range(5):
        famo.observe(loss, on, 0)
        loss = loss * torch.tensor([0.5, 0.95])           # task 0 improves fast, task 1 slowly
        famo.observe_after_step(loss, on)
    assert famo.weights()[1] > famo.weights()[0]


def test_famo_step_is_the_official_update():
    """xi <- Adam(grad = J_softmax(xi)^T delta), delta = log(L_before + eps) - log(L_after + eps)."""
    famo = FAMO(3, lr=0.025, gamma=0.01)
    on = torch.ones(3, dtype=torch.bool)
    before, after = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.8, 0.5, 1.0])
    xi = torch.zeros(3, requires_grad=True)
    reference = torch.optim.Adam([xi], lr=0.025, weight_decay=0.01)
    famo.observe(before, on, 0)
    famo.observe_after_step(after, on)
    delta = (before + 1e-8).log() - (after + 1e-8).log()
    (grad,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)
    xi.grad = grad
    reference.step()
    assert torch.allclose(famo.xi.detach(), xi.detach(), atol=1e-7)


def test_famo_signal_comes_from_the_same_batch_after_the_step(tiny_data, tmp_path):
    """The update recomputes the losses of the batch it just trained on (the official second forward),
    not the next batch's."""
    from common.multitask import add_update_args, make_update
    from common.train import Run, build_parser
    args = add_update_args(build_parser()).parse_args(
        ["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--batch-size", "8",
         "--weighting", "famo", "--epochs", "1", "--quiet"])
    run = Run(args, strategy="famo_probe")
    update = make_update(run, args)
    run.start(update=update)
    run.model.eval()        # no dropout: the recomputed losses are deterministic
    seen = []
    original = update.weighting.observe_after_step
    update.weighting.observe_after_step = lambda after, active: (seen.append(after.clone()), original(after, active))[1]
    batches = []
    for batch in run.batches():
        update.step(batch)
        with torch.no_grad():
            batches.append(run.task_losses(batch))
        if len(batches) == 2:
            break
    assert len(seen) == 2
    for after, expected in zip(seen, batches):
        assert torch.allclose(after, expected, atol=1e-6)
    assert not torch.allclose(seen[0], batches[1], atol=1e-4)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_state_round_trip_continues_identically(name):
    from common.multitask import add_update_args
    args = add_update_args(argparse.ArgumentParser()).parse_args([])
    args.seed = 0
    a, b = WEIGHTINGS[name].from_args(3, args), WEIGHTINGS[name].from_args(3, args)
    on = torch.ones(3, dtype=torch.bool)
    losses = torch.tensor([0.9, 0.5, 0.7])
    for epoch in range(3):
        a.observe(losses * (epoch + 1), on, epoch)
    b.load_state_dict(a.state_dict())
    for w in (a, b):
        w.observe(losses, on, 3)
        if w.needs_loss_after_step:
            w.observe_after_step(losses * 0.9, on)
        if w.needs_grad_norms:
            w.update(losses, torch.tensor([1.0, 0.5, 2.0]), on)
    assert torch.equal(a.weights(), b.weights())
    assert torch.allclose(a.terms(losses, on), b.terms(losses, on))


def test_every_hyper_parameter_gets_one_flag_with_the_init_default():
    from common.multitask import add_update_args
    args = add_update_args(argparse.ArgumentParser()).parse_args([])
    args.seed = 0
    for cls in WEIGHTINGS.values():
        built = cls.from_args(2, args)
        for pname, p in inspect.signature(cls.__init__).parameters.items():
            if pname in ("self", "num_tasks", "seed", "eps") or p.default is inspect.Parameter.empty:
                continue
            value = getattr(built, pname, None)
            if value is None and hasattr(built, "optimizer"):      # lr / gamma live in the optimizer
                group = built.optimizer.param_groups[0]
                value = group["lr"] if pname == "lr" else group["weight_decay"]
            assert value == p.default, (cls.name, pname)


def test_rlw_draws_softmax_normal_weights_summing_to_T():
    rlw = RLW(4, seed=1)
    rlw.observe(torch.ones(4), torch.ones(4, dtype=torch.bool), 0)
    g = torch.Generator().manual_seed(1 + 15485863)
    assert torch.allclose(rlw.weights(), 4 * torch.softmax(torch.randn(4, generator=g), 0))
