"""Gradient rules that need the T x P matrix of per-task gradients itself, not only its Gram matrix.

Most aggregators here are functions of the T x T Gram matrix (common/aggregators.py) and keep that fast
path. The rules below act on the gradients coordinate by coordinate, or keep state on the gradients
themselves, so they receive the rows:

    d = rule(grads, losses=terms, active=active)     # grads [T, P] -> the shared update d [P]

    grads   TaskGradBuffer.grads: row t = d term_t / d shared parameters (already all-reduced under
            torchrun, identical on every rank; zero rows for tasks a scheduler switched off)
    losses  [T] the values of the terms whose gradients the rows are (MoCo scales by them)
    active  bool [T] (None: every task); an inactive task's row is not used, its state is kept

common.multitask.MultiTaskUpdate asks each rule for its capabilities (class flags), never its name:

    needs_task_grad_matrix   True: MultiTaskUpdate hands it the T x P rows and writes the returned d into
                             the shared parameters' .grad (the Gram path is not taken; the Gram matrix is
                             still formed once, for the conflict count of the log)
    transforms_terms         transform_terms(terms, active) is applied to the weighting's terms before
                             the per-task gradients, and the heads get the gradient of the transformed
                             terms (DB-MTL: log(L_t + 1e-8), as LibMTL backpropagates it)
    weights_heads            after a call, rule.head_weights [T]: the heads (and a weighting's own
                             parameters) get the gradient of sum_t head_weights_t * term_t instead of the
                             plain sum (ExcessMTL: LibMTL's loss = sum_t w_t L_t reaches the heads too)
    supports_representation  False: the rule keeps [T, P] state, so --grad-space representation (whose
                             P changes with the batch size) is refused at construction

Every rule: hyper-parameters in __init__'s signature with the reference's defaults, one flag each
(add_args / from_args), `version`, rule_kind "aggregator" (selected with --aggregator like the Gram
aggregators; GRADIENT_RULES below is the registry that common.multitask adds to AGGREGATORS' choices),
state_dict / load_state_dict holding only tensors, numbers, lists and dicts, and `last_weights` ([T]
or None) for the log. A bad input (a non-finite, empty or wrongly shaped gradient matrix, losses or
active mask of the wrong length, a state of another shape) raises an error that names the rule.

Memory: column blocks keep every temporary at O(T x block) or O(P); the stateful rules (MoCo, DB-MTL,
ExcessMTL) hold one [T, P] float32 state, as their references do (it is in the checkpoint).
Tested against their references in tests/test_rules_tp.py (LibMTL's formulas ported as oracles,
torchjd 0.18's GradDrop and TrimmedMean run directly).
"""
import inspect
import math

import torch

from common import gradagg
from common.aggregators import Aggregator

_CHUNK_CPU = 1 << 16   # columns per block: temporaries stay small, every column's arithmetic is unchanged
_CHUNK_CUDA = 1 << 22


def _default(cls, name):
    """The default of a hyper-parameter: the one in cls.__init__'s signature (one place)."""
    return inspect.signature(cls.__init__).parameters[name].default


def _blocks(P, device):
    chunk = _CHUNK_CUDA if device.type == "cuda" else _CHUNK_CPU
    return [(a, min(a + chunk, P)) for a in range(0, P, chunk)]


# ----------------------------------------------------------------------------- input checks

def check_grads(method, grads, num_tasks=None):
    """grads must be a finite, non-empty, floating-point 2-D tensor [T, P] (T = num_tasks if given)."""
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"{method}: the per-task gradients must be a tensor [T, P], got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"{method}: the per-task gradients must be a 2-D matrix [T, P], got shape "
                         f"{tuple(grads.shape)}")
    T, P = grads.shape
    if T == 0 or P == 0:
        raise ValueError(f"{method}: the per-task gradient matrix is empty ({T} x {P})")
    if not grads.is_floating_point():
        raise ValueError(f"{method}: the per-task gradients must be floating point, got {grads.dtype}")
    if num_tasks is not None and T != num_tasks:
        raise ValueError(f"{method}: the per-task gradient matrix has {T} rows, expected {num_tasks} (one per task)")
    finite = torch.ones(T, dtype=torch.bool, device=grads.device)
    for a, b in _blocks(P, grads.device):
        finite &= torch.isfinite(grads[:, a:b]).all(dim=1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        raise FloatingPointError(f"{method}: the per-task gradient matrix is not finite (NaN or inf in the rows "
                                 f"of tasks {rows})")
    return T, P


def check_active(method, active, T, device=None):
    """A bool mask [T] (None: every task) on the CPU."""
    if active is None:
        return torch.ones(T, dtype=torch.bool)
    active = torch.as_tensor(active).detach().cpu()
    if active.shape != (T,):
        raise ValueError(f"{method}: active must be a bool mask of shape ({T},), got {tuple(active.shape)}")
    return active.bool()


def check_losses(method, losses, T, active=None, positive=False, nonnegative=False):
    """losses [T] as a tensor; the active tasks' values must be finite (and > 0 if positive, >= 0 if
    nonnegative)."""
    if losses is None:
        raise ValueError(f"{method}: needs the task losses (losses=[T])")
    losses = torch.as_tensor(losses)
    if losses.shape != (T,):
        raise ValueError(f"{method}: losses must have shape ({T},) (one per task), got {tuple(losses.shape)}")
    act = torch.ones(T, dtype=torch.bool) if active is None else active.cpu()
    values = losses.detach().cpu()[act]
    if not torch.isfinite(values).all():
        raise FloatingPointError(f"{method}: the task losses are not finite: {losses.detach().cpu().tolist()}")
    if positive and (values <= 0).any():
        raise ValueError(f"{method}: the task losses must be positive, got {losses.detach().cpu().tolist()}")
    if nonnegative and (values < 0).any():
        raise ValueError(f"{method}: the task losses must be >= 0, got {losses.detach().cpu().tolist()}")
    return losses


def _state_rows(method, state, T, P, device):
    """A [T, P] state tensor on device (moved once after a checkpoint load), or an error if its shape differs."""
    if state.shape != (T, P):
        raise ValueError(f"{method}: its state has shape {tuple(state.shape)} but the per-task gradient matrix is "
                         f"{T} x {P} (another model or number of tasks than the run it was made in)")
    return state if state.device == device else state.to(device)


# ----------------------------------------------------------------------------- pure rules (stateless)

def graddrop(grads, leak=0.0, generator=None):
    """GradDrop (Chen et al., NeurIPS 2020, "Just Pick a Sign", Algorithm 1 lines 10-15) as torchjd 0.18's
    torchjd.aggregation.GradDrop (f = identity, one leak for every task): per coordinate p,

        P_p = (1 + sum_i g_ip / sum_i |g_ip|) / 2           (positive sign purity)
        U_p ~ Uniform(0, 1)                                  (one draw per coordinate)
        M_ip = (P_p > U_p and g_ip > 0) or (P_p < U_p and g_ip < 0)
        d_p  = sum_i (leak + (1 - leak) M_ip) g_ip

    grads [T, P] -> d [P]. U is drawn in grads' dtype on the CPU (from generator) and moved to grads'
    device, so a run's draws do not depend on its device. A column of zeros has P = 0/0 = NaN and
    contributes 0, as in torchjd."""
    T, P = check_grads("GradDrop", grads)
    U = torch.rand(P, generator=generator, dtype=grads.dtype).to(grads.device)
    out = torch.empty(P, dtype=grads.dtype, device=grads.device)
    for a, b in _blocks(P, grads.device):
        block = grads[:, a:b]
        purity = 0.5 * (torch.ones_like(block[0]) + block.sum(dim=0) / block.abs().sum(dim=0))
        u = U[a:b]
        keep_pos, keep_neg = purity > u, purity < u
        acc = torch.zeros_like(block[0])
        for i in range(T):
            M = keep_pos * (block[i] > 0) + keep_neg * (block[i] < 0)
            acc += (leak + (1 - leak) * M) * block[i]
        out[a:b] = acc
    return out


def trimmed_mean(grads, trim=1):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018) as torchjd 0.18's TrimmedMean(trim_number):
    in every column the `trim` largest and `trim` smallest values are removed and the rest averaged.
    grads [T, P] with T >= 2 trim + 1 -> d [P]. Sorted in column blocks (same result per column)."""
    T, P = check_grads("TrimmedMean", grads)
    if trim < 0:
        raise ValueError(f"TrimmedMean: trim must be >= 0, got {trim}")
    if T < 2 * trim + 1:
        raise ValueError(f"TrimmedMean: trimming {trim} from each side needs at least {2 * trim + 1} task rows, "
                         f"got {T}")
    out = torch.empty(P, dtype=grads.dtype, device=grads.device)
    for a, b in _blocks(P, grads.device):
        ordered, _ = torch.sort(grads[:, a:b], dim=0)
        out[a:b] = torch.narrow(ordered, 0, trim, T - 2 * trim).mean(dim=0)
    return out


# ----------------------------------------------------------------------------- the rule classes

class GradientRule(Aggregator):
    """Per-task gradient rows [T, P] -> the shared update [P]: an aggregator (selected with --aggregator, same
    kind in the run's record, same do-nothing defaults of state and flags) that needs the rows themselves.
    Subclasses hold their hyper-parameters (defaults in __init__'s signature), their state, and one flag
    per hyper-parameter."""
    needs_task_grad_matrix = True   # MultiTaskUpdate hands it the rows (see the module docstring)
    transforms_terms = False
    weights_heads = False
    supports_representation = True

    def __init__(self):
        super().__init__()        # self.report: what the last call noticed (numbers, summed over the run)
        self.last_weights = None  # [T] weights of the last call for the log, or None
        self.head_weights = None  # weights_heads rules: [T] after each call

    def __call__(self, grads, losses=None, active=None):
        raise NotImplementedError

    def _rows(self, grads, active):
        """The active tasks' rows (a copy only when a scheduler switched tasks off)."""
        return grads if bool(active.all()) else grads[active.to(grads.device)]


class GradDrop(GradientRule):
    """Gradient sign dropout (graddrop above), torchjd's coordinate-wise form on the shared parameters'
    gradients. U comes from the rule's own CPU generator (seeded from --seed, checkpointed) instead of
    torchjd's global RNG: the same seed gives torchjd's draws. An inactive task's row is left out.
    LibMTL's GradDrop is a different, representation-only variant (the purity of sign(z) * dz summed
    over the batch, one mask per feature): not this rule (RULE_NOTES)."""
    name = "graddrop"

    def __init__(self, leak=0.0, seed=0):
        super().__init__()
        if not 0.0 <= leak <= 1.0:
            raise ValueError(f"GradDrop: leak must be in [0, 1], got {leak}")
        self.leak = leak
        self.generator = torch.Generator().manual_seed(seed + 104729)

    def __call__(self, grads, losses=None, active=None):
        T, _ = check_grads("GradDrop", grads)
        active = check_active("GradDrop", active, T)
        if not active.any():
            raise ValueError("GradDrop: no active task")
        return graddrop(self._rows(grads, active), self.leak, self.generator)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"].cpu())

    @classmethod
    def add_args(cls, group):
        group.add_argument("--graddrop-leak", type=float, default=_default(cls, "leak"),
                           help="GradDrop's leak (every task): the share of a dropped gradient that still passes")

    @classmethod
    def from_args(cls, args):
        return cls(leak=args.graddrop_leak, seed=args.seed)


class TrimmedMean(GradientRule):
    """Coordinate-wise trimmed mean of the task gradients (trimmed_mean above; torchjd's TrimmedMean).
    torchjd has no default trim_number; here trim = 1 (of T = 5 tasks the middle three are averaged).
    With fewer than 2 trim + 1 active tasks (a scheduler switched some off) the trim shrinks to
    (A - 1) // 2 for that step, reported as trimmed_mean_short = 1."""
    name = "trimmed_mean"

    def __init__(self, trim=1):
        super().__init__()
        if trim < 0:
            raise ValueError(f"TrimmedMean: trim must be >= 0, got {trim}")
        self.trim = trim

    def __call__(self, grads, losses=None, active=None):
        T, _ = check_grads("TrimmedMean", grads)
        active = check_active("TrimmedMean", active, T)
        A = int(active.sum())
        if A == 0:
            raise ValueError("TrimmedMean: no active task")
        trim = min(self.trim, (A - 1) // 2)
        self.report = {"trimmed_mean_short": int(trim < self.trim)}
        return trimmed_mean(self._rows(grads, active), trim)

    @classmethod
    def add_args(cls, group):
        group.add_argument("--trimmed-mean-trim", type=int, default=_default(cls, "trim"),
                           help="values removed from each end of every coordinate (torchjd's trim_number)")

    @classmethod
    def from_args(cls, args):
        return cls(trim=args.trimmed_mean_trim)


class MoCo(GradientRule):
    """MoCo (Fernando et al., ICLR 2023, "Mitigating Gradient Bias in Multi-objective Learning"), as
    LibMTL (LibMTL/weighting/MoCo.py). Each step k (counted from 1):

        g~_t = g_t / (||g_t|| + 1e-8) * L_t                       (normalised, scaled by the loss)
        y_t <- y_t - beta / k^beta_sigma * (y_t - g~_t)           (tracked gradients, from y = 0)
        lambda <- softmax(lambda - gamma / k^gamma_sigma * (Y Y^T + rho I) lambda)   (from 1/T)
        d = Y^T lambda

    Y Y^T is formed in blocks with fp64 sums (gradagg.gram) and lambda kept in fp64, where LibMTL uses one
    fp32 matmul (differences ~1e-7 relative at small P, far less than fp32's error at large P).
    Scheduler convention (LibMTL has every task every step): an inactive task keeps its y_t and lambda_t;
    the lambda step runs over the active tasks, whose new softmax is scaled to the mass they had, and d
    combines the active rows only. heads: the plain gradients of their terms, as in LibMTL."""
    name = "moco"
    supports_representation = False

    def __init__(self, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0):
        super().__init__()
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma, self.rho = beta, beta_sigma, gamma, gamma_sigma, rho
        self.step = 0
        self.y = None        # [T, P] tracked gradients (created at the first call)
        self.lambd = None    # [T] float64

    def __call__(self, grads, losses=None, active=None):
        T, P = check_grads("MoCo", grads, None if self.y is None else self.y.shape[0])
        active = check_active("MoCo", active, T)
        losses = check_losses("MoCo", losses, T, active)
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError("MoCo: no active task")
        if self.y is None:
            self.y = torch.zeros(T, P, dtype=grads.dtype, device=grads.device)
            self.lambd = torch.full((T,), 1.0 / T, dtype=torch.float64)
        self.y = _state_rows("MoCo", self.y, T, P, grads.device)
        self.step += 1
        c_y = self.beta / self.step ** self.beta_sigma
        c_l = self.gamma / self.step ** self.gamma_sigma
        losses = losses.detach().to(device=grads.device, dtype=grads.dtype)
        with torch.no_grad():
            for t in idx.tolist():
                g = grads[t] / (torch.linalg.vector_norm(grads[t]) + 1e-8) * losses[t]
                self.y[t].sub_(self.y[t].sub(g).mul_(c_y))          # y - c (y - g~), LibMTL's order
            ya = self.y if idx.numel() == T else self.y[active.to(grads.device)]
            M = gradagg.gram(ya).cpu() + self.rho * torch.eye(idx.numel(), dtype=torch.float64)
            lam = self.lambd[idx]
            new = torch.softmax(lam - c_l * (M @ lam), dim=-1)
            if idx.numel() < T:
                new = new * lam.sum()
            self.lambd[idx] = new
            coeffs = torch.zeros(T, dtype=torch.float64)
            coeffs[idx] = new
            out = gradagg.combine(self.y, coeffs)
        self.last_weights = self.lambd.float()
        return out

    def state_dict(self):
        return {"step": self.step, "y": torch.zeros(0) if self.y is None else self.y.detach().clone(),
                "lambd": torch.zeros(0, dtype=torch.float64) if self.lambd is None else self.lambd.clone()}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.y = None if state["y"].numel() == 0 else state["y"].clone()
        self.lambd = None if state["lambd"].numel() == 0 else state["lambd"].detach().cpu().double().clone()

    @classmethod
    def add_args(cls, group):
        group.add_argument("--moco-beta", type=float, default=_default(cls, "beta"), help="MoCo: lr of y")
        group.add_argument("--moco-beta-sigma", type=float, default=_default(cls, "beta_sigma"),
                           help="MoCo: decay exponent of beta")
        group.add_argument("--moco-gamma", type=float, default=_default(cls, "gamma"), help="MoCo: lr of lambda")
        group.add_argument("--moco-gamma-sigma", type=float, default=_default(cls, "gamma_sigma"),
                           help="MoCo: decay exponent of gamma")
        group.add_argument("--moco-rho", type=float, default=_default(cls, "rho"),
                           help="MoCo: l2 regularisation of lambda's update")

    @classmethod
    def from_args(cls, args):
        return cls(beta=args.moco_beta, beta_sigma=args.moco_beta_sigma, gamma=args.moco_gamma,
                   gamma_sigma=args.moco_gamma_sigma, rho=args.moco_rho)


class DBMTL(GradientRule):
    """DB-MTL (Lin et al., "Dual-Balancing for Multi-Task Learning", 2023), as LibMTL
    (LibMTL/weighting/DB_MTL.py). Loss scale balance: the per-task gradients are those of
    log(L_t + 1e-8) (transform_terms; the heads get them too, as LibMTL's backward of the log-losses).
    Gradient magnitude balance, each step k (from 1), buffer m from 0:

        m_t <- g_t + beta / k^beta_sigma * (m_t - g_t)            (EMA of the log-loss gradients)
        alpha_t = max_s ||m_s|| / (||m_t|| + 1e-8),    d = sum_t alpha_t m_t

    Scheduler convention (LibMTL has every task every step): an inactive task's log term is 0, its
    buffer row is kept, and the max and the sum run over the active tasks."""
    name = "db_mtl"
    transforms_terms = True
    supports_representation = False
    log_eps = 1e-8

    def __init__(self, beta=0.9, beta_sigma=0.0):
        super().__init__()
        self.beta, self.beta_sigma = beta, beta_sigma
        self.step = 0
        self.buffer = None   # [T, P]

    def transform_terms(self, terms, active=None):
        """log(term_t + 1e-8) for the active tasks (0 for the others), with grad."""
        T = terms.shape[0]
        active = check_active("DB-MTL", active, T).to(terms.device)
        check_losses("DB-MTL", terms, T, active.cpu(), nonnegative=True)   # log(term + 1e-8)
        safe = torch.where(active, terms, torch.ones_like(terms))
        return torch.where(active, torch.log(safe + self.log_eps), torch.zeros_like(terms))

    def __call__(self, grads, losses=None, active=None):
        T, P = check_grads("DB-MTL", grads, None if self.buffer is None else self.buffer.shape[0])
        active = check_active("DB-MTL", active, T)
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError("DB-MTL: no active task")
        if self.buffer is None:
            self.buffer = torch.zeros(T, P, dtype=grads.dtype, device=grads.device)
        self.buffer = _state_rows("DB-MTL", self.buffer, T, P, grads.device)
        self.step += 1
        c = self.beta / self.step ** self.beta_sigma
        with torch.no_grad():
            for t in idx.tolist():
                diff = self.buffer[t].sub(grads[t]).mul_(c)         # g + c (m - g), LibMTL's order
                torch.add(grads[t], diff, out=self.buffer[t])
            u = torch.stack([torch.linalg.vector_norm(self.buffer[t]) for t in idx.tolist()])
            alpha = (u.max() / (u + 1e-8)).double().cpu()
            coeffs = torch.zeros(T, dtype=torch.float64)
            coeffs[idx] = alpha
            out = gradagg.combine(self.buffer, coeffs)
        self.last_weights = coeffs.float()
        return out

    def state_dict(self):
        return {"step": self.step, "buffer": torch.zeros(0) if self.buffer is None else self.buffer.detach().clone()}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.buffer = None if state["buffer"].numel() == 0 else state["buffer"].clone()

    @classmethod
    def add_args(cls, group):
        group.add_argument("--db-mtl-beta", type=float, default=_default(cls, "beta"),
                           help="DB-MTL: EMA factor of the gradient buffer")
        group.add_argument("--db-mtl-beta-sigma", type=float, default=_default(cls, "beta_sigma"),
                           help="DB-MTL: decay exponent of beta")

    @classmethod
    def from_args(cls, args):
        return cls(beta=args.db_mtl_beta, beta_sigma=args.db_mtl_beta_sigma)


class ExcessMTL(GradientRule):
    """ExcessMTL (He et al., ICML 2024, "Robust Multi-Task Learning with Excess Risks"), as its official
    code (uiuctml/ExcessMTL, LibMTL/LibMTL/weighting/ExcessMTL.py) and LibMTL (LibMTL/weighting/ExcessMTL.py,
    the same rule). It needs the gradients' coordinates (an AdaGrad-style diagonal second moment kept per
    task, [T, P]), so it is a T x P rule, although its output is a weighting of the losses:

        S_t <- S_t + g_t^2,     e_t = sum_p g_tp^2 / sqrt(S_tp + 1e-7)         (excess risk proxy)
        first step: e0 = e (the baseline), w unchanged (ones)
        later:      w_t <- w_t exp(eta e_t / e0_t),   w <- T w / sum(w)
        loss = sum_t w_t L_t:  d = sum_t w_t g_t, and the heads get w_t times their gradient (weights_heads)

    eta = robust_step_size = 1e-2 (LibMTL's and the official config). The update is done in log space
    (T softmax(log w + eta e / e0)): the same numbers, but a very large ratio saturates instead of
    overflowing to inf / NaN. torchjd 0.18's ExcessMTL differs (RULE_NOTES, tests/test_rules_tp.py):
    weights start at 1/T (sum 1, not T), its first call already moves them with the raw e (no division),
    and it divides by e0 + 1e-7.
    Scheduler convention (the references have every task every step): an inactive task's S_t and w_t are
    kept, the active weights are renormalised to the mass they had; a task's baseline e0_t is its first
    positive e_t (its weight does not move on that step)."""
    name = "excess_mtl"
    weights_heads = True
    supports_representation = False

    def __init__(self, robust_step_size=1e-2):
        super().__init__()
        if not robust_step_size > 0:
            raise ValueError(f"ExcessMTL: robust_step_size must be positive, got {robust_step_size}")
        self.robust_step_size = robust_step_size
        self.sq_sum = None         # [T, P]
        self.weights = None        # [T] float64, sum T
        self.initial = None        # [T] float64 baselines e0, NaN until set

    def __call__(self, grads, losses=None, active=None):
        T, P = check_grads("ExcessMTL", grads, None if self.sq_sum is None else self.sq_sum.shape[0])
        active = check_active("ExcessMTL", active, T)
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError("ExcessMTL: no active task")
        if self.sq_sum is None:
            self.sq_sum = torch.zeros(T, P, dtype=grads.dtype, device=grads.device)
            self.weights = torch.ones(T, dtype=torch.float64)
            self.initial = torch.full((T,), float("nan"), dtype=torch.float64)
        self.sq_sum = _state_rows("ExcessMTL", self.sq_sum, T, P, grads.device)
        with torch.no_grad():
            excess = torch.zeros(T, dtype=torch.float64)
            for t in idx.tolist():
                g = grads[t]
                self.sq_sum[t] += g ** 2
                h = torch.sqrt(self.sq_sum[t] + 1e-7)
                excess[t] = float(g * (1 / h) @ g)
            step = torch.zeros(T, dtype=torch.float64)
            for t in idx.tolist():
                if math.isnan(self.initial[t]):
                    if excess[t] > 0:
                        self.initial[t] = excess[t]     # the baseline; this task's weight stays this step
                else:
                    step[t] = excess[t] / self.initial[t]
            moving = idx[step[idx] != 0]
            if moving.numel():
                mass = self.weights[idx].sum()
                logits = torch.log(self.weights[idx]) + self.robust_step_size * step[idx]
                self.weights[idx] = mass * torch.softmax(logits, dim=0)
            coeffs = torch.zeros(T, dtype=torch.float64)
            coeffs[idx] = self.weights[idx]
            out = gradagg.combine(grads, coeffs)
        self.head_weights = self.weights.float()
        self.last_weights = self.weights.float()
        return out

    def state_dict(self):
        empty = torch.zeros(0, dtype=torch.float64)
        return {"sq_sum": torch.zeros(0) if self.sq_sum is None else self.sq_sum.detach().clone(),
                "weights": empty if self.weights is None else self.weights.clone(),
                "initial": empty if self.initial is None else self.initial.clone()}

    def load_state_dict(self, state):
        if state["sq_sum"].numel() == 0:
            self.sq_sum = self.weights = self.initial = None
            return
        self.sq_sum = state["sq_sum"].clone()
        self.weights = state["weights"].detach().cpu().double().clone()
        self.initial = state["initial"].detach().cpu().double().clone()

    @classmethod
    def add_args(cls, group):
        group.add_argument("--excess-mtl-robust-step-size", type=float, default=_default(cls, "robust_step_size"),
                           help="ExcessMTL: step size of the exponentiated weight update")

    @classmethod
    def from_args(cls, args):
        return cls(robust_step_size=args.excess_mtl_robust_step_size)


GRADIENT_RULES = {cls.name: cls for cls in (GradDrop, TrimmedMean, MoCo, DBMTL, ExcessMTL)}
