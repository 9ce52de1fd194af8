"""The methods that need more than the Gram matrix (issue 26): the T x P gradient rules of
common/gradient_rules.py (GradDrop, TrimmedMean, MoCo, DB-MTL, ExcessMTL) and the loss-level weightings
GLS and STCH (common/weighting.py), each against its reference:

  torchjd 0.18 (installed): torchjd.aggregation.GradDrop and TrimmedMean run on the same random Jacobians
  (T = 2..6; GradDrop with the same random draws), ExcessMTLWeighting for the documented difference.
  LibMTL (median-research-group/LibMTL @ 4336804847eaa5e0b924b743d76beec7ac3fdc97; not installable): each
  weighting's backward ported below as the oracle, comment naming its file, run on recorded losses and
  gradients over several steps, state included (MoCo's y and lambda, DB-MTL's EMA, ExcessMTL's sums).

Tolerance: 1e-6 relative (max |ours - oracle| / max |oracle|) unless a difference is documented.
Then: bad inputs name the method, exact resume through a checkpoint (weights_only), one flag per
hyper-parameter, and MultiTaskUpdate's capability path on tiny data (shared .grad and heads).
"""
import argparse
import inspect
import io

import pytest
import torch
import torch.nn.functional as F

from common import gradient_rules as R
from common.weighting import GLS, STCH

TOL = 1e-6


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    scale = b.abs().max().clamp(min=1e-30)
    return float((a - b).abs().max() / scale)


def jacobian(T, P, seed, zeros=True):
    """Random Jacobian with spread row norms, some exact zeros and an all-zero column."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=g) * torch.logspace(-1, 1, T)[:, None]
    if zeros and P > 3:
        J[torch.rand(T, P, generator=g) < 0.05] = 0.0
        J[:, 1] = 0.0
    return J


def recorded(T, P, steps, seed):
    """A recorded sequence of (losses [T], gradients [T, P]): losses falling with noise, gradients drifting."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(T, P, generator=g)
    out = []
    for k in range(steps):
        losses = (torch.rand(T, generator=g) + 0.3) * 0.9 ** k
        grads = (base + 0.5 * torch.randn(T, P, generator=g)) * torch.linspace(0.2, 3.0, T)[:, None] * 0.9 ** k
        out.append((losses, grads))
    return out


# ----------------------------------------------------------------------------- torchjd: GradDrop, TrimmedMean

tj = pytest.importorskip("torchjd.aggregation")


@pytest.mark.parametrize("T", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("P", [1, 9, 1000, (1 << 16) + 37])
@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_is_torchjd_graddrop_with_the_same_draws(T, P, leak):
    J = jacobian(T, P, seed=T * 100 + P)
    rule = R.GradDrop(leak=leak)
    for draw in range(3):
        torch.manual_seed(1000 + draw)                  # torchjd draws U from the global RNG
        ref = tj.GradDrop(leak=torch.full((T,), leak))(J)
        rule.generator.manual_seed(1000 + draw)         # ours from its own generator, same seed
        ours = rule(J)
        assert rel(ours, ref) <= TOL, (T, P, leak, draw, rel(ours, ref))
    if leak == 0.0 and P > 1:
        assert torch.equal(ours, ref)


def test_graddrop_keeps_a_sign_per_coordinate_at_the_purity_rate():
    """Statistics of the rule itself: with leak 0 every coordinate keeps only one sign, and the positive
    sign survives with probability P_p (the purity)."""
    J = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-3.0, 2.0, 1.0, -0.5]])
    purity = 0.5 * (1 + J.sum(0) / J.abs().sum(0))                      # [0.25, 0.5, 1.0, 0.5]
    rule = R.GradDrop(seed=3)
    kept_pos = torch.zeros(4)
    n = 4000
    for _ in range(n):
        d = rule(J)
        pos, neg = J.clamp(min=0).sum(0), J.clamp(max=0).sum(0)
        assert all(bool(torch.isclose(d[p], pos[p]) or torch.isclose(d[p], neg[p])) for p in range(4))
        kept_pos += torch.isclose(d, pos).float() * (pos != 0)
    rate = kept_pos / n
    assert torch.allclose(rate, purity, atol=0.03), rate


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("P", [1, 10, (1 << 16) + 5])
def test_trimmed_mean_is_torchjd_trimmed_mean(T, P):
    J = jacobian(T, P, seed=T + P)
    for trim in range((T - 1) // 2 + 1):
        ref = tj.TrimmedMean(trim_number=trim)(J)
        ours = R.TrimmedMean(trim=trim)(J)
        assert rel(ours, ref) <= TOL, (T, P, trim)   # bit-equal but for the summation order of a block's mean


def test_trimmed_mean_short_of_active_tasks_shrinks_the_trim():
    J = jacobian(5, 50, seed=1)
    rule = R.TrimmedMean(trim=2)
    active = torch.tensor([True, False, True, True, False])
    d = rule(J, active=active)
    assert torch.equal(d, R.trimmed_mean(J[active], 1)) and rule.report == {"trimmed_mean_short": 1}
    with pytest.raises(ValueError, match="TrimmedMean: trimming 2 from each side needs at least 5 task rows"):
        R.trimmed_mean(J[:3], 2)


# ----------------------------------------------------------------------------- LibMTL oracles

class LibMTLMoCo:
    """Oracle: LibMTL/weighting/MoCo.py (MoCo.init_param, MoCo.backward), ported; _compute_grad's result is
    passed in as `grads`, _reset_grad's argument returned."""

    def __init__(self, task_num, grad_dim):
        self.task_num = task_num
        self.step = 0
        self.y = torch.zeros(task_num, grad_dim)
        self.lambd = torch.ones([task_num, ]) / task_num

    def backward(self, losses, grads, MoCo_beta, MoCo_beta_sigma, MoCo_gamma, MoCo_gamma_sigma, MoCo_rho):
        self.step += 1
        beta, beta_sigma = MoCo_beta, MoCo_beta_sigma
        gamma, gamma_sigma = MoCo_gamma, MoCo_gamma_sigma
        rho = MoCo_rho
        grads = grads.clone()
        with torch.no_grad():
            for tn in range(self.task_num):
                grads[tn] = grads[tn] / (grads[tn].norm() + 1e-8) * losses[tn]
        self.y = self.y - (beta / self.step ** beta_sigma) * (self.y - grads)
        self.lambd = F.softmax(self.lambd - (gamma / self.step ** gamma_sigma) * (
            self.y @ self.y.t() + rho * torch.eye(self.task_num)) @ self.lambd, -1)
        new_grads = self.y.t() @ self.lambd
        return new_grads


class LibMTLDBMTL:
    """Oracle: LibMTL/weighting/DB_MTL.py (DB_MTL.init_param, DB_MTL.backward), ported; `batch_grads` are the
    gradients of torch.log(losses + 1e-8) (what _compute_grad returns there)."""

    def __init__(self, task_num, grad_dim):
        self.task_num = task_num
        self.step = 0
        self.grad_buffer = torch.zeros(task_num, grad_dim)

    def backward(self, batch_grads, DB_beta, DB_beta_sigma):
        self.step += 1
        beta, beta_sigma = DB_beta, DB_beta_sigma
        self.grad_buffer = batch_grads + (beta / self.step ** beta_sigma) * (self.grad_buffer - batch_grads)
        u_grad = self.grad_buffer.norm(dim=-1)
        alpha = u_grad.max() / (u_grad + 1e-8)
        new_grads = sum([alpha[i] * self.grad_buffer[i] for i in range(self.task_num)])
        return new_grads


class LibMTLExcessMTL:
    """Oracle: LibMTL/weighting/ExcessMTL.py (= uiuctml/ExcessMTL LibMTL/LibMTL/weighting/ExcessMTL.py),
    ported; _get_grads' result passed in, and the shared gradient of loss = sum(loss_weight * losses)
    returned as sum_t loss_weight_t g_t."""

    def __init__(self, task_num):
        self.task_num = task_num
        self.loss_weight = torch.tensor([1.0] * task_num, requires_grad=False)
        self.grad_sum = None
        self.first_epoch = True

    def backward(self, grads, robust_step_size):
        if self.grad_sum is None:
            self.grad_sum = torch.zeros_like(grads)
        w = torch.zeros(self.task_num)
        for i in range(self.task_num):
            self.grad_sum[i] += grads[i] ** 2
            grad_i = grads[i]
            h_i = torch.sqrt(self.grad_sum[i] + 1e-7)
            w[i] = grad_i * (1 / h_i) @ grad_i.t()
        if self.first_epoch:
            self.initial_w = w
            self.first_epoch = False
        else:
            w = w / self.initial_w
            self.loss_weight = self.loss_weight * torch.exp(w * robust_step_size)
            self.loss_weight = self.loss_weight / self.loss_weight.sum() * self.task_num
            self.loss_weight = self.loss_weight.detach().clone()
        return self.loss_weight @ grads, self.loss_weight


def libmtl_gls_loss(losses, task_num):
    """Oracle: LibMTL/weighting/GLS.py, GLS.backward: the loss it backpropagates."""
    return torch.pow(losses.prod(), 1. / task_num)


class LibMTLSTCH:
    """Oracle: LibMTL/weighting/STCH.py (STCH.init_param, STCH.backward), ported; returns the loss it
    backpropagates (self.epoch is the trainer's 0-based epoch)."""

    def __init__(self, task_num):
        self.task_num = task_num
        self.step = 0
        self.nadir_vector = None
        self.average_loss = 0.0
        self.average_loss_count = 0

    def backward(self, losses, epoch, STCH_mu, STCH_warmup_epoch):
        self.step += 1
        mu, warmup_epoch = STCH_mu, STCH_warmup_epoch
        if epoch < warmup_epoch:
            return torch.mul(torch.log(losses + 1e-20), torch.ones_like(losses)).sum()
        elif epoch == warmup_epoch:
            loss = torch.mul(torch.log(losses + 1e-20), torch.ones_like(losses)).sum()
            self.average_loss += losses.detach()
            self.average_loss_count += 1
            return loss
        else:
            if self.nadir_vector is None:
                self.nadir_vector = self.average_loss / self.average_loss_count
            losses = torch.log(losses / self.nadir_vector + 1e-20)
            max_term = torch.max(losses.data).detach()
            reg_losses = losses - max_term
            return mu * torch.log(torch.sum(torch.exp(reg_losses / mu))) * self.task_num


@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("hp", [dict(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0),
                                dict(beta=0.3, beta_sigma=0.2, gamma=0.4, gamma_sigma=0.1, rho=0.05)])
def test_moco_is_libmtl_moco_with_its_state(T, hp):
    P, steps = 300, 8
    ours, ref = R.MoCo(**hp), LibMTLMoCo(T, P)
    for losses, grads in recorded(T, P, steps, seed=T):
        losses = losses * 8.0                            # large enough for lambda to move far from 1/T
        d = ours(grads, losses=losses)
        expected = ref.backward(losses, grads, hp["beta"], hp["beta_sigma"], hp["gamma"], hp["gamma_sigma"], hp["rho"])
        assert rel(ours.y, ref.y) <= TOL
        assert rel(ours.lambd, ref.lambd) <= TOL
        assert rel(d, expected) <= TOL
    assert ours.step == ref.step == steps
    assert not torch.allclose(ours.lambd, torch.full((T,), 1.0 / T, dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("hp", [dict(beta=0.9, beta_sigma=0.0), dict(beta=0.5, beta_sigma=0.5)])
def test_db_mtl_is_libmtl_db_mtl_with_its_ema(T, hp):
    P, steps = 300, 8
    ours, ref = R.DBMTL(**hp), LibMTLDBMTL(T, P)
    for losses, grads in recorded(T, P, steps, seed=10 + T):
        log_grads = grads / (losses[:, None] + 1e-8)     # the rows of log(L_t + 1e-8): d log L = dL / L
        d = ours(log_grads, losses=losses)
        expected = ref.backward(log_grads, hp["beta"], hp["beta_sigma"])
        assert rel(ours.buffer, ref.grad_buffer) <= TOL
        assert rel(d, expected) <= TOL


def test_db_mtl_transform_is_the_log_loss_libmtl_backpropagates():
    """LibMTL: self._compute_grad(torch.log(losses + 1e-8)); the transform gives that value and gradient,
    0 for an inactive task, and refuses a negative term (no log)."""
    rule = R.DBMTL()
    L = torch.tensor([0.5, 2.0, 1e-3], requires_grad=True)
    out = rule.transform_terms(L, torch.tensor([True, True, True]))
    assert torch.allclose(out, torch.log(L.detach() + 1e-8))
    (g,) = torch.autograd.grad(out.sum(), L)
    assert torch.allclose(g, 1 / (L.detach() + 1e-8))
    out = rule.transform_terms(L, torch.tensor([True, False, True]))
    assert out[1] == 0.0
    with pytest.raises(ValueError, match="DB-MTL: the task losses must be >= 0"):
        rule.transform_terms(torch.tensor([0.5, -1.0, 1.0]))
    with pytest.raises(FloatingPointError, match="DB-MTL: the task losses are not finite"):
        rule.transform_terms(torch.tensor([0.5, float("nan"), 1.0]))


@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("eta", [1e-2, 0.5])
def test_excess_mtl_is_the_official_and_libmtl_rule(T, eta):
    P, steps = 300, 8
    ours, ref = R.ExcessMTL(robust_step_size=eta), LibMTLExcessMTL(T)
    for _, grads in recorded(T, P, steps, seed=20 + T):
        d = ours(grads)
        expected, weights = ref.backward(grads.clone(), eta)
        assert rel(ours.sq_sum, ref.grad_sum) <= TOL
        assert rel(ours.weights, weights) <= TOL
        assert rel(ours.head_weights, weights) <= TOL
        assert rel(d, expected) <= TOL
    assert rel(ours.initial, ref.initial_w) <= TOL
    assert not torch.allclose(ours.weights, torch.ones(T, dtype=torch.float64), atol=1e-4)


def test_excess_mtl_differs_from_torchjd_only_as_documented():
    """torchjd 0.18's ExcessMTLWeighting starts at 1/T (sum 1) and moves the weights on its first call with
    the raw excess e0 (ours: the first call only sets the baseline), and divides by e0 + 1e-7. So its
    weights are ours / T reweighted once by exp(eta e0): softmax(log(ours / T) + eta e0), at every step."""
    T, P, eta = 4, 300, 1e-2
    ours, theirs = R.ExcessMTL(robust_step_size=eta), tj.ExcessMTLWeighting(robust_step_size=eta)
    worst_plain = 0.0
    for k, (_, grads) in enumerate(recorded(T, P, 8, seed=5)):
        ours(grads)
        w_tj = theirs(grads)
        e0 = ours.initial
        predicted = torch.softmax(torch.log(ours.weights / T) + eta * e0, dim=0)
        assert rel(w_tj, predicted) <= TOL, k
        worst_plain = max(worst_plain, rel(w_tj, ours.weights / T))
    assert worst_plain > 1e-3      # the difference is real, and it is only that one


@pytest.mark.parametrize("T", [2, 3, 5])
def test_gls_is_libmtl_geometric_mean(T):
    g = torch.Generator().manual_seed(T)
    gls = GLS(T)
    on = torch.ones(T, dtype=torch.bool)
    for _ in range(6):
        L = (torch.rand(T, generator=g, dtype=torch.float64) * 3 + 0.05).requires_grad_()
        ref = libmtl_gls_loss(L, T)
        (ref_grad,) = torch.autograd.grad(ref, L)
        terms = gls.terms(L, on)
        (grad,) = torch.autograd.grad(terms.sum(), L)
        assert rel(terms.sum().detach(), ref.detach()) <= TOL
        assert rel(grad, ref_grad) <= TOL
        assert rel(gls.weights(), ref_grad) <= TOL          # logged weights = dL/dL_t


@pytest.mark.parametrize("mu,warmup", [(1.0, 2), (0.3, 0), (2.0, 1)])
def test_stch_is_libmtl_stch_through_warmup_and_nadir(mu, warmup):
    T, steps_per_epoch = 3, 4
    g = torch.Generator().manual_seed(int(mu * 10) + warmup)
    ours, ref = STCH(T, mu=mu, warmup_epoch=warmup), LibMTLSTCH(T)
    on = torch.ones(T, dtype=torch.bool)
    phases = set()
    for epoch in range(warmup + 3):
        for _ in range(steps_per_epoch):
            L = ((torch.rand(T, generator=g, dtype=torch.float64) + 0.2) * torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
                 * 0.8 ** epoch).requires_grad_()
            loss = ref.backward(L, epoch, mu, warmup)
            (ref_grad,) = torch.autograd.grad(loss, L)
            ours.observe(L.detach(), on, epoch)
            terms = ours.terms(L, on)
            (grad,) = torch.autograd.grad(terms.sum(), L)
            assert rel(terms.sum().detach(), loss.detach()) <= TOL, (epoch, terms.sum(), loss)
            assert rel(grad, ref_grad) <= TOL, (epoch, grad, ref_grad)
            assert rel(ours.weights(), ref_grad) <= TOL
            phases.add(ref.nadir_vector is None)
    assert rel(ours.nadir, ref.nadir_vector) <= TOL
    assert phases == {True, False}


# ----------------------------------------------------------------------------- bad inputs name the method

RULES = {"graddrop": lambda: R.GradDrop(), "trimmed_mean": lambda: R.TrimmedMean(trim=0), "moco": lambda: R.MoCo(),
         "db_mtl": lambda: R.DBMTL(), "excess_mtl": lambda: R.ExcessMTL()}
LABEL = {"graddrop": "GradDrop", "trimmed_mean": "TrimmedMean", "moco": "MoCo", "db_mtl": "DB-MTL",
         "excess_mtl": "ExcessMTL"}


@pytest.mark.parametrize("name", sorted(RULES))
def test_bad_gradient_matrix_raises_naming_the_method(name):
    label, losses = LABEL[name], torch.ones(3)
    bad = torch.randn(3, 8)
    bad[1, 4] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"{label}: the per-task gradient matrix is not finite .*\[1\]"):
        RULES[name]()(bad, losses=losses)
    inf = torch.randn(3, 8)
    inf[2, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=rf"{label}: .*not finite"):
        RULES[name]()(inf, losses=losses)
    for empty in (torch.zeros(0, 8), torch.zeros(3, 0)):
        with pytest.raises(ValueError, match=rf"{label}: the per-task gradient matrix is empty"):
            RULES[name]()(empty, losses=losses)
    with pytest.raises(ValueError, match=rf"{label}: the per-task gradients must be a 2-D matrix"):
        RULES[name]()(torch.randn(8), losses=losses)
    with pytest.raises(ValueError, match=rf"{label}: active must be a bool mask of shape \(3,\)"):
        RULES[name]()(torch.randn(3, 8), losses=losses, active=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"{label}: no active task"):
        RULES[name]()(torch.randn(3, 8), losses=losses, active=torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize("name", ["moco", "db_mtl", "excess_mtl"])
def test_stateful_rules_refuse_a_matrix_of_another_shape(name):
    rule = RULES[name]()
    rule(torch.randn(3, 8), losses=torch.ones(3))
    with pytest.raises(ValueError, match=rf"{LABEL[name]}: the per-task gradient matrix has 4 rows, expected 3"):
        rule(torch.randn(4, 8), losses=torch.ones(4))
    with pytest.raises(ValueError, match=rf"{LABEL[name]}: its state has shape \(3, 8\) but the per-task gradient "
                                         r"matrix is 3 x 9"):
        rule(torch.randn(3, 9), losses=torch.ones(3))


def test_moco_needs_finite_losses_of_the_right_shape():
    with pytest.raises(ValueError, match=r"MoCo: losses must have shape \(3,\)"):
        R.MoCo()(torch.randn(3, 8), losses=torch.ones(2))
    with pytest.raises(FloatingPointError, match="MoCo: the task losses are not finite"):
        R.MoCo()(torch.randn(3, 8), losses=torch.tensor([1.0, float("inf"), 1.0]))
    with pytest.raises(ValueError, match="MoCo: needs the task losses"):
        R.MoCo()(torch.randn(3, 8))


def test_loss_weightings_refuse_bad_losses_naming_the_method():
    on = torch.ones(3, dtype=torch.bool)
    for cls, label in ((GLS, "GLS"), (STCH, "STCH")):
        with pytest.raises(ValueError, match=rf"{label}: losses must be a tensor of shape \(3,\)"):
            cls(3).terms(torch.ones(4), torch.ones(4, dtype=torch.bool))
        with pytest.raises(FloatingPointError, match=rf"{label}: the task losses are not finite"):
            cls(3).terms(torch.tensor([1.0, float("nan"), 1.0]), on)
        with pytest.raises(ValueError, match=rf"{label}: losses must be a tensor of shape \(3,\)"):
            cls(3).terms(torch.ones(0), None)
    with pytest.raises(ValueError, match="GLS: the task losses must be positive"):
        GLS(3).terms(torch.tensor([1.0, 0.0, 1.0]), on)
    # an inactive task's loss is not looked at (a scheduler's masked loss)
    terms = GLS(3).terms(torch.tensor([1.0, float("nan"), 4.0]), torch.tensor([True, False, True]))
    assert torch.allclose(terms, torch.tensor([1.0, 0.0, 1.0]))        # sqrt(1 * 4) = 2 = 1 + 1


def test_a_zero_task_loss_stops_gls_training_naming_the_step(started_update):
    """A task's loss of exactly 0 (float32 underflow of a very confident head; seen in the standard grid at
    lr 1e-3) has no geometric mean: the step raises, saying which step, before any parameter moves."""
    run, update = started_update("--weighting", "gls", strategy="gls_zero_loss_probe")
    per_item_losses = run.per_item_losses

    def gory_solved(batch):
        fused, per_item, valid = per_item_losses(batch)
        return fused, per_item * torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]), valid
    run.per_item_losses = gory_solved
    before = [p.detach().clone() for p in run.model.parameters()]
    with pytest.raises(ValueError, match=r"step 0: GLS: the task losses must be positive, got \[.*, 0\.0, .*\]"):
        update.step(next(iter(run.batches())))
    assert all(torch.equal(a, p) for a, p in zip(before, run.model.parameters()))


# ----------------------------------------------------------------------------- state: exact resume, checkpoint-safe

def _plain(obj):
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return isinstance(obj, (torch.Tensor, int, float, bool, str))


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_state_round_trip_through_a_checkpoint_continues_identically(name):
    T, P = 4, 50
    seq = recorded(T, P, 7, seed=7)
    a = RULES[name]()
    active = torch.tensor([True, True, False, True])
    for k, (losses, grads) in enumerate(seq[:4]):
        a(grads, losses=losses, active=active if k == 2 else None)
    state = a.state_dict()
    assert _plain(state), state
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = RULES[name]()
    b.load_state_dict(torch.load(buf, weights_only=True))
    for losses, grads in seq[4:]:
        assert torch.equal(a(grads, losses=losses), b(grads, losses=losses))


@pytest.mark.parametrize("cls", [GLS, STCH])
def test_weighting_state_round_trip_through_a_checkpoint(cls):
    T = 3
    a = cls(T) if cls is GLS else cls(T, warmup_epoch=1)
    on = torch.ones(T, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    seq = [(torch.rand(T, generator=g) + 0.1, e) for e in (0, 0, 1, 1, 2, 2, 3)]
    for L, e in seq[:3]:
        a.observe(L, on, e)
        a.terms(L, on)
    state = a.state_dict()
    assert _plain(state), state
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = cls(T) if cls is GLS else cls(T, warmup_epoch=1)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(a.weights(), b.weights())
    for L, e in seq[3:]:
        for w in (a, b):
            w.observe(L, on, e)
        assert torch.equal(a.terms(L, on), b.terms(L, on)) and torch.equal(a.weights(), b.weights())


def test_every_rule_hyper_parameter_has_one_flag_with_the_init_default():
    from common.multitask import add_update_args
    args = add_update_args(argparse.ArgumentParser()).parse_args([])
    args.seed = 0
    for name, cls in R.GRADIENT_RULES.items():
        assert cls.version == 1 and cls.rule_kind == "aggregator" and cls.needs_task_grad_matrix
        built = cls.from_args(args)
        for pname, p in inspect.signature(cls.__init__).parameters.items():
            if pname in ("self", "seed"):
                continue
            assert getattr(built, pname) == p.default, (name, pname)
    for cls in (GLS, STCH):
        assert vars(cls)["version"] == 1 and cls.rule_kind == "weighting"


def test_representation_space_is_refused_for_rules_with_state_on_the_gradients(tiny_data, tmp_path):
    from common.multitask import add_update_args, make_update
    from common.arguments import build_parser
    from common.train import Run
    for name in ("moco", "db_mtl", "excess_mtl"):
        args = add_update_args(build_parser()).parse_args(
            ["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--batch-size", "8",
             "--epochs", "1", "--quiet", "--aggregator", name, "--grad-space", "representation"])
        run = Run(args, strategy=f"{name}_rep_probe")
        with pytest.raises(ValueError, match=rf"{name}: keeps state on the per-task parameter gradients"):
            make_update(run, args)


# ----------------------------------------------------------------------------- MultiTaskUpdate's capability path

def _oracle_update(name, T, P, rule):
    """The reference of one step: (rows [T, P] of the task losses' gradients, losses [T]) -> (shared update,
    the factor of each head's plain gradient)."""
    if name == "graddrop":
        def step(rows, losses):
            saved = torch.get_rng_state()
            torch.set_rng_state(rule.generator.get_state())   # the draw the rule is about to make
            try:
                return tj.GradDrop()(rows), torch.ones(T)
            finally:
                torch.set_rng_state(saved)
        return step
    if name == "trimmed_mean":
        return lambda rows, losses: (tj.TrimmedMean(trim_number=1)(rows), torch.ones(T))
    if name == "moco":
        moco = LibMTLMoCo(T, P)
        return lambda rows, losses: (moco.backward(losses, rows, 0.5, 0.5, 0.1, 0.5, 0.0), torch.ones(T))
    if name == "db_mtl":
        db = LibMTLDBMTL(T, P)
        # LibMTL backpropagates log(L_t + 1e-8): rows and heads get d log L = dL / (L + 1e-8)
        return lambda rows, losses: (db.backward(rows / (losses[:, None] + 1e-8), 0.9, 0.0), 1 / (losses + 1e-8))
    if name == "excess_mtl":
        ex = LibMTLExcessMTL(T)
        return lambda rows, losses: ex.backward(rows.clone(), 1e-2)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["graddrop", "trimmed_mean", "moco", "db_mtl", "excess_mtl"])
def test_update_hands_the_rows_to_the_rule_and_writes_its_update(name, tiny_data, tmp_path):
    """Two steps of MultiTaskUpdate (--aggregator <rule>) against the reference on the same batches: the
    shared parameters' .grad is the reference's update of the per-task gradient rows (computed here with
    autograd), each head's .grad its plain gradient times the reference's factor (DB-MTL: of log L_t;
    ExcessMTL: w_t)."""
    from common.multitask import add_update_args, make_update
    from common.arguments import build_parser
    from common.objectives import masked_mean
    from common.train import Run
    args = add_update_args(build_parser()).parse_args(
        ["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--batch-size", "8",
         "--epochs", "1", "--quiet", "--zero-dropout", "--aggregator", name])
    run = Run(args, strategy=f"{name}_update_probe")
    update = make_update(run, args)
    assert update.rule_rows and update.task_grads is not None
    run.start(update=update)
    shared = update.task_grads.params
    T = len(run.tasks)
    oracle = _oracle_update(name, T, update.task_grads.num_params, update.aggregator)
    seen = {}
    run.step = lambda *a, **k: seen.update({n: p.grad.clone() for n, p in run.model.named_parameters()
                                            if p.grad is not None}) or True
    for k, batch in enumerate(run.batches()):
        _, per_item, valid = run.per_item_losses(batch)
        losses = masked_mean(per_item, valid)
        rows = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t], shared,
                                                                                  retain_graph=True)])
                            for t in range(T)])
        heads = [torch.autograd.grad(losses[t], run.head_parameters(run.tasks[t]), retain_graph=True)
                 for t in range(T)]
        expected, factor = oracle(rows.detach(), losses.detach())
        seen.clear()
        update.step(batch)
        got = torch.cat([seen[n].reshape(-1) for n, p in run.model.named_parameters()
                         if any(p is q for q in shared)])
        assert rel(got, expected) <= 1e-5, (name, k, rel(got, expected))
        names = {id(p): n for n, p in run.model.named_parameters()}
        for t in range(T):
            for p, g in zip(run.head_parameters(run.tasks[t]), heads[t]):
                assert rel(seen[names[id(p)]], g * float(factor[t])) <= 1e-5, (name, k, t)
        assert "conflicts" in update.decisions()
        if k == 1:
            break


@pytest.mark.parametrize("name", ["upgrad", "krum", "trimmed_mean"])
def test_a_step_with_no_active_task_leaves_the_trunk_unmoved(name, tiny_data, tmp_path):
    """A scheduler may switch every task off on a batch (or no clip has a label): the aggregator is not asked
    (an empty Gram matrix is an error for it) and the shared parameters get a zero update."""
    from common.multitask import add_update_args, make_update
    from common.arguments import build_parser
    from common.train import Run
    args = add_update_args(build_parser()).parse_args(
        ["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--batch-size", "8",
         "--epochs", "1", "--quiet", "--aggregator", name])
    run = Run(args, strategy=f"{name}_empty_probe")
    update = make_update(run, args)
    run.start(update=update)
    seen = {}
    run.step = lambda *a, **k: seen.update({n: p.grad.clone() for n, p in run.model.named_parameters()
                                            if p.grad is not None}) or True
    batch = next(iter(run.batches()))
    update.step(batch, task_mask=torch.zeros(len(run.tasks), dtype=torch.bool))
    shared = {id(p) for p in update.task_grads.params}
    trunk = [seen[n] for n, p in run.model.named_parameters() if id(p) in shared and n in seen]
    assert trunk and all(float(g.abs().max()) == 0 for g in trunk)


def test_records_of_gradient_rules_are_checked_against_their_version():
    """A record that used a gradient rule stays reusable while the rule's version is the code's, and goes stale
    when it differs (common/versions.py looks the rule up in GRADIENT_RULES as well as AGGREGATORS)."""
    from common.versions import PROTOCOL_VERSION, run_versions, stale_reason
    for name, cls in R.GRADIENT_RULES.items():
        record = run_versions(name, {f"aggregator:{name}": cls.version})
        assert record["protocol"] == PROTOCOL_VERSION and stale_reason(record) is None, name
        record["rules"][f"aggregator:{name}"] = cls.version + 1
        assert f"aggregator:{name} version" in stale_reason(record), name
