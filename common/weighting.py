"""Loss weightings: a vector of T task losses -> T weighted terms whose sum is the loss to minimise.
They never see the model (LibMTL's split of weighting and architecture), so any scheduler can use any of
them (common.multitask). The contract, one small class per method:

    weighting = Uncertainty(num_tasks)             # or Uncertainty.from_args(num_tasks, args)
    terms = weighting.terms(losses, active)        # [T]; an inactive task's term is exactly 0
    weighting.weights()                            # [T], for the log
    weighting.observe(losses, active, epoch, counts)  # optional: follow the losses over time (DWA, RLW, FAMO);
                                                   # counts [T] = clips behind each loss (None: 1 per active task)
    weighting.parameters()                         # learned parameters for the run's optimizer (or [])
    weighting.state_dict() / load_state_dict(s)    # everything that changes over time
    Weighting.add_args(group) / from_args(T, args) # one flag per hyper-parameter, the default in __init__

Capabilities, declared as class flags; the update asks for them, never for a name:
    needs_grad_norms       update(losses, grad_norms, active) is called after terms() (the step's loss
                           keeps the weights it started with) with the norms of the per-task gradients
                           of the same batch (GradNorm: of the last shared layer); its new weights apply
                           from the next step
    needs_loss_after_step  observe_after_step(losses_after, active) is called after the optimizer step
                           with the losses of the same batch, recomputed without grad (FAMO)

Every class declares `version` (an int, the version of its rule, stored in run records): bump it in a
class whose rule changes what a run computes.
"""
import inspect
import math

import torch
from torch import nn

from common.state import Stateless


def _masked(values, active):
    """Keep only the active tasks' terms (a bool mask [T]); inactive ones contribute exactly 0."""
    if active is None:
        return values
    return torch.where(active.to(values.device), values, torch.zeros_like(values))


def _default(cls, name):
    return inspect.signature(cls.__init__).parameters[name].default


class Weighting(Stateless):
    """Equal weights, and the defaults of the contract: L = sum_t L_t."""
    name = "equal"
    rule_kind = "weighting"  # run records store kind, name and version (common/versions.py)
    version = 1
    needs_grad_norms = False
    needs_loss_after_step = False

    def __init__(self, num_tasks):
        self.num_tasks = num_tasks

    def weights(self):
        return torch.ones(self.num_tasks)

    def terms(self, losses, active=None):
        return self.weights().to(losses.device) * _masked(losses, active)

    def __call__(self, losses, active=None):
        return self.terms(losses, active).sum()

    def observe(self, losses, active, epoch, counts=None):
        pass

    @classmethod
    def add_args(cls, group):
        pass

    @classmethod
    def from_args(cls, num_tasks, args):
        return cls(num_tasks)


Equal = Weighting


class Constant(Weighting):
    """Fixed weights given by the user: L = sum_t c_t L_t (TorchJD's Constant aggregator; with all c_t = 1 it
    is `equal`, TorchJD's Sum; TorchJD's Mean is c_t = 1/T, the same direction at 1/T of the size)."""
    name = "constant"
    version = 1

    def __init__(self, num_tasks, constant_weights=None):
        super().__init__(num_tasks)
        self.constant_weights = constant_weights
        try:
            values = [1.0] * num_tasks if constant_weights is None else [float(w) for w in constant_weights]
        except ValueError as exc:
            raise ValueError(f"constant weighting: --constant-weights must be numbers, got {constant_weights}") from exc
        if len(values) != num_tasks:
            raise ValueError(f"constant weighting: --constant-weights needs {num_tasks} values (one per task), "
                             f"got {len(values)}: {values}")
        if not all(math.isfinite(w) and w >= 0 for w in values):
            raise ValueError(f"constant weighting: --constant-weights must be finite and >= 0, got {values}")
        self.constant = torch.tensor(values)

    def weights(self):
        return self.constant.clone()

    @classmethod
    def add_args(cls, group):
        group.add_argument("--constant-weights", default=None,
                           help="constant weighting: one weight per task, comma-separated (default all 1)")

    @classmethod
    def from_args(cls, num_tasks, args):
        text = args.constant_weights
        return cls(num_tasks, None if text is None else [x for x in text.split(",") if x.strip()])


class _LearnedParameter(Weighting):
    """A weighting whose parameter [T] is trained by the run's optimizer (run.add_parameters)."""
    version = 1

    def __init__(self, num_tasks):
        super().__init__(num_tasks)
        self.param = nn.Parameter(torch.zeros(num_tasks))

    def parameters(self):
        return [self.param]

    def to(self, device):
        self.param.data = self.param.data.to(device)
        return self

    def state_dict(self):
        return {"param": self.param.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.param.copy_(state["param"])


class Learned(_LearnedParameter):
    """L = sum_t w_t L_t with w = T * softmax(a): learned, but constrained to sum to T.
    Unconstrained weights would all shrink to 0; even constrained, gradient descent on w moves
    weight to the task with the smallest loss, which the logged weights make visible."""
    name = "learned"
    version = 1

    def weights(self):
        return self.num_tasks * torch.softmax(self.param.detach(), dim=0)

    def terms(self, losses, active=None):
        w = self.num_tasks * torch.softmax(self.param, dim=0)   # with grad: the weights are learned
        return w.to(losses.device) * _masked(losses, active)


class Uncertainty(_LearnedParameter):
    """Kendall, Gal, Cipolla (CVPR 2018), exactly as LibMTL (LibMTL/weighting/UW.py): the paper's
    regression form for every task,

        L = sum_t L_t / (2 e^s_t) + s_t / 2,     s_t = log sigma_t^2 learned, starting at s_t = -0.5

    dL/ds_t = 1/2 - L_t / (2 e^s_t), so s_t settles at log L_t and the effective weight 1 / (2 e^s_t) at
    1 / (2 L_t): noisy (high-loss) tasks get small weights. weights() reports these effective weights
    (dL/dL_t), as LibMTL returns them. Not the shortcut e^-s L + s (twice the regulariser, settled weights
    1 / L_t). An inactive task's term, regulariser included, is exactly 0."""
    name = "uncertainty"
    version = 1

    def __init__(self, num_tasks):
        super().__init__(num_tasks)
        with torch.no_grad():
            self.param.fill_(-0.5)   # LibMTL UW.init_param: loss_scale = [-0.5] * task_num

    def weights(self):
        return 1 / (2 * torch.exp(self.param.detach()))

    def terms(self, losses, active=None):
        s = self.param.to(losses.device)
        return _masked(losses / (2 * s.exp()) + s / 2, active)


class GradNorm(Weighting):
    """GradNorm (Chen et al., ICML 2018). Task weights w_t (sum T) are moved so that the gradient norms
    G_t = ||grad_W w_t L_t|| on the last shared layer W follow the tasks' relative training rates:

        r_t  = (L_t / L_t(0)) / mean_s (L_s / L_s(0))
        G_t* = mean_s(G_s) * r_t ** alpha          (a constant: no gradient flows through it)
        w   <- w - lr * Adam(grad_w sum_t |G_t - G_t*|),  then w <- T * w / sum(w)

    Since G_t = w_t ||grad_W L_t||, the per-task norms n_t = ||grad_W L_t|| are all that is needed:
    the update computes them once (the diagonal of the per-task Gram matrix) and passes them to update().
    L_t(0) is the task's first loss seen while it is active (schedulers may start a task late).
    Convention: with a scheduler that switches tasks off, the mean and the renormalisation run over the
    active tasks, and all T weights are rescaled to sum T. The weights have their own Adam (not the
    model's optimizer), as in the paper's reference implementations.
    Order within a step (paper, LibMTL, the TAG code): the step's loss uses w(t) (terms() is formed
    before update()); update() gives w(t+1), which applies from the next step.
    """
    name = "gradnorm"
    version = 1
    needs_grad_norms = True

    def __init__(self, num_tasks, alpha=1.5, lr=0.025):
        super().__init__(num_tasks)
        self.alpha = alpha
        self.w = torch.ones(num_tasks, requires_grad=True)
        self.initial_losses = torch.full((num_tasks,), float("nan"))
        self.optimizer = torch.optim.Adam([self.w], lr=lr)

    def weights(self):
        return self.w.detach().clone()

    def update(self, losses, grad_norms, active=None):
        """One GradNorm step on the weights. losses [T] and grad_norms [T] (n_t = ||grad_W L_t||) are
        detached values; returns the targets G_t* for logging."""
        losses = losses.detach().float().cpu()
        n = grad_norms.detach().float().cpu()
        active = torch.ones(self.num_tasks, dtype=torch.bool) if active is None else active.cpu()
        first = active & torch.isnan(self.initial_losses)
        self.initial_losses[first] = losses[first]
        idx = active.nonzero().flatten()
        if idx.numel() < 2:  # with one task there is nothing to balance
            return torch.full((self.num_tasks,), float("nan"))
        ratio = losses[idx] / self.initial_losses[idx]
        r = ratio / ratio.mean()
        G = self.w[idx] * n[idx]
        target = (G.mean() * r ** self.alpha).detach()
        self.optimizer.zero_grad()
        torch.sum(torch.abs(G - target)).backward()
        self.optimizer.step()
        with torch.no_grad():
            self.w.clamp_(min=1e-6)  # keep weights positive
            self.w.mul_(self.num_tasks / self.w.sum())
        out = torch.full((self.num_tasks,), float("nan"))
        out[idx] = target
        return out

    def state_dict(self):
        return {"w": self.w.detach().clone(), "initial_losses": self.initial_losses.clone(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.initial_losses = state["initial_losses"].clone()
        self.optimizer.load_state_dict(state["optimizer"])

    @classmethod
    def add_args(cls, group):
        group.add_argument("--gradnorm-alpha", type=float, default=_default(cls, "alpha"))
        group.add_argument("--gradnorm-lr", type=float, default=_default(cls, "lr"), help="lr of GradNorm's weights")

    @classmethod
    def from_args(cls, num_tasks, args):
        return cls(num_tasks, alpha=args.gradnorm_alpha, lr=args.gradnorm_lr)


class DWA(Weighting):
    """Dynamic Weight Average (Liu, Johns, Davison, CVPR 2019, "End-to-End Multi-Task Learning with
    Attention"), as LibMTL (LibMTL/weighting/DWA.py): w_t = T exp(r_t / tau) / sum_s exp(r_s / tau),
    r_t = L_t(k-1) / L_t(k-2), where L_t(k) is the task's mean training loss over epoch k, averaged over
    its clips as LibMTL's AbsLoss._average_loss (each step's loss weighted by the clips behind it,
    observe(counts=...); without counts, by 1 per step); w = 1 for the first two epochs. A task whose
    loss falls slowly gets more weight. Where every task trains in every epoch this is LibMTL's rule.

    Rested tasks (a scheduler that switches a task off for a whole epoch): an epoch in which a task had
    no loss records NaN for it (no mean, never 0). A task's ratio uses its last two epochs with a loss,
    however far back; a task that does not have two yet gets r_t = 1, the ratio of an unchanged loss
    (neutral). The weights stay finite, positive and sum to T; they are all 1 until some task has two
    epochs with a loss."""
    name = "dwa"
    version = 1

    def __init__(self, num_tasks, tau=2.0):
        super().__init__(num_tasks)
        self.tau = tau
        self.epoch_means = torch.zeros(0, num_tasks, dtype=torch.float64)  # one row per finished epoch, NaN: no loss
        self.sums = torch.zeros(num_tasks, dtype=torch.float64)
        self.counts = torch.zeros(num_tasks, dtype=torch.float64)
        self.epoch = 0

    def observe(self, losses, active, epoch, counts=None):
        """Accumulate this step's losses (weighted by counts, the clips behind each loss); a new epoch
        closes the previous one's means."""
        if epoch != self.epoch:
            means = torch.where(self.counts > 0, self.sums / self.counts, torch.full_like(self.sums, float("nan")))
            self.epoch_means = torch.cat([self.epoch_means, means[None]])
            self.sums.zero_()
            self.counts.zero_()
            self.epoch = epoch
        active = active.cpu()
        n = torch.ones(self.num_tasks, dtype=torch.float64) if counts is None else counts.detach().double().cpu()
        self.sums[active] += (losses.detach().double().cpu() * n)[active]
        self.counts[active] += n[active]

    def ratios(self):
        """r_t from each task's last two epochs with a loss; 1 where a task has fewer than two."""
        r = torch.ones(self.num_tasks, dtype=torch.float64)
        for t in range(self.num_tasks):
            seen = self.epoch_means[:, t][~torch.isnan(self.epoch_means[:, t])]
            if seen.numel() >= 2:
                r[t] = seen[-1] / seen[-2].clamp(min=1e-12)
        return r

    def weights(self):
        has_two = (~torch.isnan(self.epoch_means)).sum(0) >= 2
        if not has_two.any():
            return torch.ones(self.num_tasks)
        return self.num_tasks * torch.softmax(self.ratios().float() / self.tau, dim=0)

    def state_dict(self):
        return {"epoch_means": self.epoch_means.clone(), "sums": self.sums.clone(),
                "counts": self.counts.clone(), "epoch": self.epoch}

    def load_state_dict(self, state):
        self.epoch_means, self.sums = state["epoch_means"].clone().double(), state["sums"].clone()
        self.counts, self.epoch = state["counts"].clone(), int(state["epoch"])

    @classmethod
    def add_args(cls, group):
        group.add_argument("--dwa-tau", type=float, default=_default(cls, "tau"))

    @classmethod
    def from_args(cls, num_tasks, args):
        return cls(num_tasks, tau=args.dwa_tau)


class RLW(Weighting):
    """Random Loss Weighting (Lin et al., TMLR 2022, "Reasonable Effectiveness of Random Weighting"), as
    LibMTL (LibMTL/weighting/RLW.py): each step w = softmax(z), z ~ N(0, I), so the weights sum to 1
    (--rlw-scale sum1, the default). z comes from the rule's own generator (seeded from --seed) instead of
    the global RNG. --rlw-scale sumT gives the earlier T * softmax(z) (sum T, like equal weights); the two
    differ by the factor T on the loss, which is not neutral: it changes the effective learning rate and
    how often the global gradient-norm clip acts."""
    name = "rlw"
    version = 1

    def __init__(self, num_tasks, seed=0, scale="sum1"):
        super().__init__(num_tasks)
        if scale not in ("sum1", "sumT"):
            raise ValueError(f"RLW: scale must be 'sum1' or 'sumT', got {scale!r}")
        self.scale = scale
        self.factor = 1.0 if scale == "sum1" else float(num_tasks)
        self.generator = torch.Generator().manual_seed(seed + 15485863)
        self.current = torch.full((num_tasks,), self.factor / num_tasks)

    def observe(self, losses, active, epoch, counts=None):
        self.current = self.factor * torch.softmax(torch.randn(self.num_tasks, generator=self.generator), dim=0)

    def weights(self):
        return self.current.clone()

    def state_dict(self):
        return {"generator": self.generator.get_state(), "current": self.current.clone()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.current = state["current"].clone()

    @classmethod
    def add_args(cls, group):
        group.add_argument("--rlw-scale", choices=("sum1", "sumT"), default=_default(cls, "scale"),
                           help="RLW's weights sum to 1 (LibMTL, the paper) or to T")

    @classmethod
    def from_args(cls, num_tasks, args):
        return cls(num_tasks, seed=args.seed, scale=args.rlw_scale)


class FAMO(Weighting):
    """FAMO (Liu, Liang, Liu, Yu, Gong, NeurIPS 2023, "FAMO: Fast Adaptive Multitask Optimization";
    official code Cranial-XIX/FAMO, methods/weight_methods.py FAMO and experiments/*/trainer.py).

        loss = sum_t z_t log(L_t - m_t + eps) / c,   z = softmax(xi),   c = sum_t z_t / (L_t - m_t + eps)
    with c a constant (detached), eps = 1e-8, m_t = 0 (the official default minimum losses). After the
    optimizer step, the losses of the SAME batch are recomputed without grad (the official trainer's
    second forward, in train mode as there) and xi takes one Adam step (lr 0.025, weight decay
    gamma = 0.01, the official defaults) along J_softmax(xi)^T delta,
        delta_t = log(L_t(before) + eps) - log(L_t(after) + eps).
    The cost is that second forward (no backward). With a scheduler, a task inactive on this step
    gets delta_t = 0."""
    name = "famo"
    version = 1
    needs_loss_after_step = True

    def __init__(self, num_tasks, lr=0.025, gamma=0.01, eps=1e-8):
        super().__init__(num_tasks)
        self.eps = eps
        self.xi = torch.zeros(num_tasks, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.xi], lr=lr, weight_decay=gamma)
        self.before = None

    def weights(self):
        return torch.softmax(self.xi.detach(), dim=0)

    def observe(self, losses, active, epoch, counts=None):
        self.before = losses.detach().double().cpu()

    def observe_after_step(self, losses_after, active):
        """One step on xi from the change of the log-losses of this batch over the optimizer step."""
        after = losses_after.detach().double().cpu()
        active = active.cpu()
        delta = torch.where(active, (self.before + self.eps).log() - (after + self.eps).log(),
                            torch.zeros_like(after))
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(torch.softmax(self.xi, dim=0), self.xi, grad_outputs=delta.float())
        self.optimizer.zero_grad()
        self.xi.grad = grad
        self.optimizer.step()
        return delta

    def terms(self, losses, active=None):
        z = self.weights().to(losses.device)
        d = losses + self.eps
        keep = torch.ones_like(z, dtype=torch.bool) if active is None else active.to(losses.device)
        c = (torch.where(keep, z / d, torch.zeros_like(z))).sum().detach()
        return _masked(z * torch.log(d) / c, active)

    def state_dict(self):
        return {"xi": self.xi.detach().clone(), "optimizer": self.optimizer.state_dict(), "before": self.before}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.xi.copy_(state["xi"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.before = state["before"]

    @classmethod
    def add_args(cls, group):
        group.add_argument("--famo-lr", type=float, default=_default(cls, "lr"), help="lr of FAMO's logits")
        group.add_argument("--famo-gamma", type=float, default=_default(cls, "gamma"), help="FAMO's weight decay")

    @classmethod
    def from_args(cls, num_tasks, args):
        return cls(num_tasks, lr=args.famo_lr, gamma=args.famo_gamma)


def _check_losses(method, losses, num_tasks, active, positive=False):
    """losses must be a tensor [T] whose active entries are finite (and > 0 where positive)."""
    if not isinstance(losses, torch.Tensor) or losses.shape != (num_tasks,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"{method}: losses must be a tensor of shape ({num_tasks},) (one per task), got {shape}")
    act = torch.ones(num_tasks, dtype=torch.bool) if active is None else torch.as_tensor(active).bool().cpu()
    if act.shape != (num_tasks,):
        raise ValueError(f"{method}: active must be a bool mask of shape ({num_tasks},), got {tuple(act.shape)}")
    values = losses.detach().cpu()[act]
    if not torch.isfinite(values).all():
        raise FloatingPointError(f"{method}: the task losses are not finite: {losses.detach().cpu().tolist()}")
    if positive and (values <= 0).any():
        raise ValueError(f"{method}: the task losses must be positive, got {losses.detach().cpu().tolist()}")
    return act


class GLS(Weighting):
    """Geometric Loss Strategy (Chennupati et al., CVPR 2019 workshops, "MultiNet++"), as LibMTL
    (LibMTL/weighting/GLS.py): the loss is the geometric mean of the task losses,

        L = (prod_t L_t) ^ (1/T),     dL/dL_t = L / (T L_t)

    Written as terms w_t L_t with w_t = L / (T L_t) taken as constants: their sum is L and their gradient
    is exactly dL (so an aggregator still sees one term per task). L is computed as exp(mean log L_t) in
    float64 (LibMTL: pow(prod, 1/T), which under- or overflows for many tasks; the same number otherwise).
    weights() reports these effective weights dL/dL_t (LibMTL's returned batch_weight, L_t / (T prod_s L_s),
    is only a log value). With a scheduler the mean runs over the active tasks. A loss <= 0 has no geometric
    mean (an infinite gradient): an error."""
    name = "gls"
    version = 1

    def __init__(self, num_tasks):
        super().__init__(num_tasks)
        self.current = torch.ones(num_tasks)

    def weights(self):
        return self.current.clone()

    def terms(self, losses, active=None):
        act = _check_losses("GLS", losses, self.num_tasks, active, positive=True)
        if not act.any():
            return torch.zeros_like(losses)
        with torch.no_grad():
            logs = losses.detach().double().cpu()[act].log()
            w = torch.zeros(self.num_tasks, dtype=torch.float64)
            w[act] = logs.mean().exp() / (act.sum() * logs.exp())
        self.current = w.float()
        return _masked(w.to(losses) * losses, act)

    def state_dict(self):
        return {"current": self.current.clone()}

    def load_state_dict(self, state):
        self.current = state["current"].clone()


class STCH(Weighting):
    """Smooth Tchebycheff scalarisation (Lin et al., ICML 2024, "Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization"), as LibMTL (LibMTL/weighting/STCH.py, modified from Xi-L/STCH):

        epoch <  warmup_epoch:  L = sum_t log(L_t + 1e-20)
        epoch == warmup_epoch:  the same, and the losses are averaged over the epoch's steps (per step)
        epoch >  warmup_epoch:  nadir n = that average (fixed at the first step after), l_t = log(L_t / n_t + 1e-20),
                                L = T mu log sum_t exp((l_t - max_s l_s) / mu)

    mu = 1 and warmup_epoch = 4 (LibMTL's defaults); epochs count from 0 as LibMTL's trainer. The STCH loss
    is written as terms T p_t l_t plus a constant share (p = softmax(l / mu), taken as constants): their
    sum is LibMTL's value and their gradient exactly its gradient (so an aggregator sees one term per task).
    weights() reports the effective weights dL/dL_t of the last terms() call. Scheduler convention (LibMTL
    has every task every step): the average, the max and the softmax run over the active tasks, and a task
    with no loss in the warmup epoch takes its first loss after it as its nadir."""
    name = "stch"
    version = 1
    log_eps = 1e-20

    def __init__(self, num_tasks, mu=1.0, warmup_epoch=4):
        super().__init__(num_tasks)
        if not mu > 0:
            raise ValueError(f"STCH: mu must be positive, got {mu}")
        self.mu, self.warmup_epoch = mu, warmup_epoch
        self.epoch = 0
        self.loss_sum = torch.zeros(num_tasks, dtype=torch.float64)
        self.loss_count = torch.zeros(num_tasks, dtype=torch.float64)
        self.nadir = torch.full((num_tasks,), float("nan"), dtype=torch.float64)
        self.nadir_set = False
        self.current = torch.ones(num_tasks)

    def observe(self, losses, active, epoch, counts=None):
        self.epoch = int(epoch)
        if self.epoch == self.warmup_epoch:
            act = _check_losses("STCH", losses, self.num_tasks, active)
            self.loss_sum[act] += losses.detach().double().cpu()[act]
            self.loss_count[act] += 1

    def weights(self):
        return self.current.clone()

    def terms(self, losses, active=None):
        act = _check_losses("STCH", losses, self.num_tasks, active)
        act_d = act.to(losses.device)
        safe = torch.where(act_d, losses, torch.ones_like(losses))
        if self.epoch <= self.warmup_epoch:
            self.current = torch.where(act, 1 / (safe.detach().cpu() + self.log_eps), torch.zeros(()))
            return _masked(torch.log(safe + self.log_eps), act_d)
        if not self.nadir_set:
            seen = self.loss_count > 0
            self.nadir[seen] = self.loss_sum[seen] / self.loss_count[seen]
            self.nadir_set = True
        first = act & torch.isnan(self.nadir)
        self.nadir[first] = losses.detach().double().cpu()[first]   # no loss in the warmup epoch
        if not act.any():
            return torch.zeros_like(losses)
        nadir = self.nadir.to(device=losses.device, dtype=losses.dtype)
        nadir = torch.where(act_d, nadir, torch.ones_like(nadir))
        logs = torch.log(safe / nadir + self.log_eps)
        T = self.num_tasks
        with torch.no_grad():   # p = softmax over the active tasks; LibMTL's value of the loss
            la = logs.detach()[act_d]
            reg = la - la.max()
            p = torch.zeros_like(logs)
            p[act_d] = torch.softmax(reg / self.mu, dim=0)
            value = self.mu * torch.log(torch.exp(reg / self.mu).sum()) * T
            const = (value - T * (p[act_d] * la).sum()) / la.numel()
            self.current = (T * p / nadir / (safe.detach() / nadir + self.log_eps)).cpu()
        return _masked(T * p * logs + const, act_d)

    def state_dict(self):
        return {"epoch": self.epoch, "loss_sum": self.loss_sum.clone(), "loss_count": self.loss_count.clone(),
                "nadir": self.nadir.clone(), "nadir_set": int(self.nadir_set), "current": self.current.clone()}

    def load_state_dict(self, state):
        self.epoch = int(state["epoch"])
        self.loss_sum, self.loss_count = state["loss_sum"].clone().double(), state["loss_count"].clone().double()
        self.nadir, self.nadir_set = state["nadir"].clone().double(), bool(state["nadir_set"])
        self.current = state["current"].clone()

    @classmethod
    def add_args(cls, group):
        group.add_argument("--stch-mu", type=float, default=_default(cls, "mu"), help="STCH's smoothing mu")
        group.add_argument("--stch-warmup-epoch", type=int, default=_default(cls, "warmup_epoch"),
                           help="STCH: epochs of log-loss warm-up; the nadir is the mean loss of this epoch")

    @classmethod
    def from_args(cls, num_tasks, args):
        return cls(num_tasks, mu=args.stch_mu, warmup_epoch=args.stch_warmup_epoch)


WEIGHTINGS = {cls.name: cls for cls in (Equal, Constant, Learned, Uncertainty, GradNorm, DWA, RLW, FAMO, GLS, STCH)}
