"""Loss weightings: each rule against its closed form or reference semantics on scripted inputs, and the
contract (one flag per hyper-parameter, state round trips, FAMO's signal from the same batch)."""
import argparse
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.weighting import DWA, FAMO, RLW, WEIGHTINGS, GradNorm, Learned, Uncertainty


def test_uncertainty_gradient_matches_closed_form():
    w = Uncertainty(3)
    with torch.no_grad():
        w.param.copy_(torch.tensor([0.0, 0.5, -1.0]))
    losses = torch.tensor([0.7, 2.0, 0.1])
    w(losses).backward()
    s = w.param.detach()
    expected = 0.5 - losses / (2 * torch.exp(s))           # d/ds (L / (2 e^s) + s / 2)
    assert torch.allclose(w.param.grad, expected, atol=1e-6)


# Oracle: LibMTL (median-research-group/LibMTL), LibMTL/weighting/UW.py, class UW:
#   init_param: self.loss_scale = nn.Parameter(torch.tensor([-0.5]*self.task_num))
#   backward:   loss = (losses/(2*self.loss_scale.exp())+self.loss_scale/2).sum()
#               return (1/(2*torch.exp(self.loss_scale))).detach().cpu().numpy()
def _libmtl_uw_init(task_num):
    return torch.nn.Parameter(torch.tensor([-0.5] * task_num))


def _libmtl_uw_loss(losses, loss_scale):
    return (losses / (2 * loss_scale.exp()) + loss_scale / 2).sum()


def _libmtl_uw_weights(loss_scale):
    return (1 / (2 * torch.exp(loss_scale))).detach()


def test_uncertainty_is_libmtl_uw_over_adam_steps():
    """Same init (s = -0.5), same loss, same learned state and reported weights over several Adam steps
    on recorded losses; the reported weights are the effective ones (dL/dL_t = 1 / (2 e^s_t))."""
    T = 3
    g = torch.Generator().manual_seed(0)
    recorded = (torch.rand(8, T, generator=g) + 0.1) * torch.tensor([0.5, 2.0, 0.05])
    ours, ref = Uncertainty(T), _libmtl_uw_init(T)
    assert torch.equal(ours.param.detach(), ref.detach())
    opt_ours = torch.optim.Adam(ours.parameters(), lr=0.05)
    opt_ref = torch.optim.Adam([ref], lr=0.05)
    for losses in recorded:
        assert torch.allclose(ours.weights(), _libmtl_uw_weights(ref), rtol=1e-6, atol=0)
        l_ours = losses.clone().requires_grad_()
        l_ref = losses.clone().requires_grad_()
        loss_ours, loss_ref = ours(l_ours), _libmtl_uw_loss(l_ref, ref)
        assert torch.allclose(loss_ours, loss_ref, rtol=1e-6, atol=1e-7)
        opt_ours.zero_grad()
        opt_ref.zero_grad()
        loss_ours.backward()
        loss_ref.backward()
        assert torch.allclose(l_ours.grad, ours.weights(), rtol=1e-6, atol=0)   # weights() = effective weights
        assert torch.allclose(l_ours.grad, l_ref.grad, rtol=1e-6, atol=0)
        opt_ours.step()
        opt_ref.step()
        assert torch.allclose(ours.param.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ours.param.detach(), torch.full((T,), -0.5))    # it did learn
    # an inactive task contributes exactly 0, regulariser included
    assert ours.terms(recorded[0], torch.tensor([True, False, True]))[1] == 0


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


def test_famo_signal_comes_from_the_same_batch_after_the_step(started_update):
    """The update recomputes the losses of the batch it just trained on (the official second forward),
    not the next batch's."""
    run, update = started_update("--weighting", "famo", strategy="famo_probe")
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


# Oracle: LibMTL (median-research-group/LibMTL), LibMTL/weighting/RLW.py, RLW.backward:
#   batch_weight = F.softmax(torch.randn(self.task_num), dim=-1)
# LibMTL draws z from the global RNG; both sides here take z from the same seeded generator, so the test
# compares the mapping z -> weights.
def _libmtl_rlw_weights(z):
    return F.softmax(z, dim=-1)


def test_rlw_is_libmtl_softmax_of_normal_draws_summing_to_1():
    T = 4
    rlw = RLW(T, seed=1)
    g = torch.Generator().manual_seed(1 + 15485863)      # RLW's own generator, same seed
    on = torch.ones(T, dtype=torch.bool)
    for step in range(5):
        rlw.observe(torch.ones(T), on, 0)
        expected = _libmtl_rlw_weights(torch.randn(T, generator=g))
        assert torch.allclose(rlw.weights(), expected, rtol=1e-6, atol=0)
        assert float(rlw.weights().sum()) == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(rlw.terms(torch.ones(T) * 2.0, on), 2.0 * expected)


def test_rlw_sumT_flag_keeps_the_T_scaled_weights():
    from common.multitask import add_update_args
    args = add_update_args(argparse.ArgumentParser()).parse_args(["--rlw-scale", "sumT"])
    args.seed = 1
    rlw = RLW.from_args(4, args)
    rlw.observe(torch.ones(4), torch.ones(4, dtype=torch.bool), 0)
    g = torch.Generator().manual_seed(1 + 15485863)
    assert torch.allclose(rlw.weights(), 4 * _libmtl_rlw_weights(torch.randn(4, generator=g)))
    default = add_update_args(argparse.ArgumentParser()).parse_args([])
    assert default.rlw_scale == "sum1"


# Oracle: LibMTL (median-research-group/LibMTL), LibMTL/weighting/DWA.py, DWA.backward:
#   if self.epoch > 1:
#       w_i = torch.Tensor(self.train_loss_buffer[:,self.epoch-1]/self.train_loss_buffer[:,self.epoch-2])
#       batch_weight = self.task_num*F.softmax(w_i/T, dim=-1)
#   else:
#       batch_weight = torch.ones_like(losses)
# and the buffer it reads: LibMTL/trainer.py (train_singlelevel: train_loss_buffer[:, epoch] =
# meter.loss_item at the end of each epoch), whose per-task value is LibMTL/loss.py
# AbsLoss._average_loss: (record*bs).sum()/bs.sum() over the epoch's batches (loss.item(), batch size).
def _libmtl_dwa_weights(train_loss_buffer, epoch, task_num, T):
    if epoch > 1:
        w_i = torch.Tensor(train_loss_buffer[:, epoch - 1] / train_loss_buffer[:, epoch - 2])
        return task_num * F.softmax(w_i / T, dim=-1)
    return torch.ones(task_num)


def _libmtl_average_loss(record, bs):
    record, bs = np.array(record), np.array(bs)
    return (record * bs).sum() / bs.sum()


def test_dwa_is_libmtl_dwa_when_every_task_trains_every_epoch():
    """Every step's weights against LibMTL's, on recorded losses with a short last batch (LibMTL averages
    an epoch's losses weighted by batch size): equal for the first two epochs, then the same ratios."""
    T, epochs, tau = 3, 6, 2.0
    batch_sizes = [8, 8, 8, 3]
    g = torch.Generator().manual_seed(0)
    buffer = np.zeros([T, epochs])
    dwa = DWA(T, tau=tau)
    on = torch.ones(T, dtype=torch.bool)
    for epoch in range(epochs):
        record = [[] for _ in range(T)]
        for k, bs in enumerate(batch_sizes):
            # losses vary strongly inside an epoch, so that how the epoch is averaged matters
            scale = torch.tensor([0.9, 0.6, 1.2]) ** epoch * (1.0 + 2.0 * (k == len(batch_sizes) - 1))
            losses = (torch.rand(T, generator=g) + 0.5) * scale
            dwa.observe(losses, on, epoch, counts=torch.full((T,), float(bs)))
            ours, ref = dwa.weights(), _libmtl_dwa_weights(buffer, epoch, T, tau)
            if epoch < 2:
                assert torch.equal(ours, torch.ones(T))
            else:
                assert torch.allclose(ours, ref, rtol=1e-6, atol=0), (epoch, k, ours, ref)
            for t in range(T):
                record[t].append(losses[t].item())
        for t in range(T):
            buffer[t, epoch] = _libmtl_average_loss(record[t], batch_sizes)
    assert not torch.allclose(dwa.weights(), torch.ones(T))


def test_dwa_rested_task_has_no_loss_in_that_epoch_and_gets_finite_weights():
    """A scheduler rests tasks (curriculum: task 2 enters at epoch 1; stop-and-go: task 1 rests in epoch 2).
    An epoch without loss gives NaN, never 0; a task's ratio uses its last two epochs with a loss, and a
    task without two gets r = 1 (the weight of an unchanged loss)."""
    T, tau = 3, 2.0
    plan = [[True, True, False], [True, True, True], [True, False, True], [True, True, True], [True, True, True]]
    loss = lambda e: torch.tensor([1.0, 0.8, 0.6]) * torch.tensor([0.5, 0.9, 0.7]) ** e  # noqa: E731
    dwa = DWA(T, tau=tau)
    seen = {}
    for epoch, act in enumerate(plan):
        active = torch.tensor(act)
        for _ in range(3):
            dwa.observe(loss(epoch), active, epoch)
            w = dwa.weights()
            assert torch.isfinite(w).all() and (w > 0).all(), (epoch, w)
            assert float(w.sum()) == pytest.approx(T, abs=1e-5)
        seen[epoch] = w
    assert torch.isnan(dwa.epoch_means[0, 2]) and torch.isnan(dwa.epoch_means[2, 1])
    L = {e: loss(e) for e in range(5)}
    # epoch 2 (epochs 0, 1 finished): task 2 has one epoch with a loss -> r = 1
    r = torch.tensor([L[1][0] / L[0][0], L[1][1] / L[0][1], 1.0])
    assert torch.allclose(seen[2], T * torch.softmax(r / tau, 0))
    # epoch 3 (0, 1, 2 finished): task 1's last two epochs with a loss are 1 and 0
    r = torch.tensor([L[2][0] / L[1][0], L[1][1] / L[0][1], L[2][2] / L[1][2]])
    assert torch.allclose(seen[3], T * torch.softmax(r / tau, 0))
    # epoch 4: task 1 has epochs 3 and 1
    r = torch.tensor([L[3][0] / L[2][0], L[3][1] / L[1][1], L[3][2] / L[2][2]])
    assert torch.allclose(seen[4], T * torch.softmax(r / tau, 0))


def test_every_weighting_class_declares_rule_version_1():
    import common.weighting as W
    classes = [c for c in vars(W).values() if isinstance(c, type) and issubclass(c, W.Weighting)]
    assert W.Weighting in classes and len(classes) >= len(WEIGHTINGS)
    for cls in classes:
        assert vars(cls).get("version") == 1, cls.__name__


def test_constant_weighting_is_the_fixed_weighted_sum():
    from types import SimpleNamespace

    from common.weighting import WEIGHTINGS
    losses = torch.tensor([0.5, 1.0, 2.0, 0.1, 0.3])
    w = WEIGHTINGS["constant"].from_args(5, SimpleNamespace(constant_weights="1,0,2,1,0.5"))
    assert torch.allclose(w.terms(losses), torch.tensor([0.5, 0.0, 4.0, 0.1, 0.15]))
    active = torch.tensor([True, True, False, True, True])
    assert w.terms(losses, active)[2] == 0                      # a resting task adds nothing
    default = WEIGHTINGS["constant"].from_args(5, SimpleNamespace(constant_weights=None))
    assert torch.equal(default.terms(losses), WEIGHTINGS["equal"](5).terms(losses))
    for bad, why in (("1,2", "needs 5 values"), ("1,1,1,1,-1", ">= 0"), ("1,1,x,1,1", "must be numbers")):
        with pytest.raises(ValueError, match=why):
            WEIGHTINGS["constant"].from_args(5, SimpleNamespace(constant_weights=bad))
