"""Loss weightings: a vector of T task losses -> one scalar. They never see the model (LibMTL's split),
so any scheduler can use any of them. Each is an nn.Module, so its learned parameters go to the
optimizer (run.add_parameters) and its state to the checkpoint (state_dict)."""
import torch
from torch import nn


class EqualWeights(nn.Module):
    """L = sum_t L_t."""

    def __init__(self, num_tasks):
        super().__init__()
        self.num_tasks = num_tasks

    def terms(self, losses, active=None):
        return _masked(losses, active)

    def forward(self, losses, active=None):
        return self.terms(losses, active).sum()

    def weights(self):
        return torch.ones(self.num_tasks)


class LearnedWeights(nn.Module):
    """L = sum_t w_t L_t with w = T * softmax(a): learned, but constrained to sum to T.
    Unconstrained weights would all shrink to 0; even constrained, gradient descent on w moves
    weight to the task with the smallest loss, which the logged weights make visible."""

    def __init__(self, num_tasks):
        super().__init__()
        self.num_tasks = num_tasks
        self.logits = nn.Parameter(torch.zeros(num_tasks))

    def weights(self):
        return self.num_tasks * torch.softmax(self.logits, dim=0)

    def terms(self, losses, active=None):
        return self.weights().to(losses.device) * _masked(losses, active)

    def forward(self, losses, active=None):
        return self.terms(losses, active).sum()


class UncertaintyWeights(nn.Module):
    """Kendall, Gal, Cipolla (CVPR 2018): L = sum_t exp(-s_t) L_t + s_t, s_t = log sigma_t^2 learned.
    dL/ds_t = 1 - exp(-s_t) L_t, so s_t settles at log L_t: noisy (high-loss) tasks get small weights."""

    def __init__(self, num_tasks):
        super().__init__()
        self.num_tasks = num_tasks
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))

    def weights(self):
        return torch.exp(-self.log_vars)

    def terms(self, losses, active=None):
        s = self.log_vars.to(losses.device)
        return _masked(torch.exp(-s) * losses + s, active)

    def forward(self, losses, active=None):
        return self.terms(losses, active).sum()


def _masked(values, active):
    """Keep only the active tasks' terms (a bool mask [T]); inactive ones contribute exactly 0."""
    if active is None:
        return values
    return torch.where(active.to(values.device), values, torch.zeros_like(values))


class GradNormWeights:
    """GradNorm (Chen et al., ICML 2018). Task weights w_t (sum T) are moved so that the gradient norms
    G_t = ||grad_W w_t L_t|| on the last shared layer W follow the tasks' relative training rates:

        r_t  = (L_t / L_t(0)) / mean_s (L_s / L_s(0))
        G_t* = mean_s(G_s) * r_t ** alpha          (a constant: no gradient flows through it)
        w   <- w - lr * Adam(grad_w sum_t |G_t - G_t*|),  then w <- T * w / sum(w)

    Since G_t = w_t ||grad_W L_t||, the per-task norms n_t = ||grad_W L_t|| are all that is needed:
    the caller computes them once (the diagonal of the per-task Gram matrix) and passes them to update().
    L_t(0) is the task's first loss seen while it is active (schedulers may start a task late).
    Not an nn.Module: it has its own optimizer, and both go into state_dict().
    """

    def __init__(self, num_tasks, alpha=1.5, lr=0.025):
        self.num_tasks = num_tasks
        self.alpha = alpha
        self.w = torch.ones(num_tasks, requires_grad=True)
        self.initial_losses = torch.full((num_tasks,), float("nan"))
        self.optimizer = torch.optim.Adam([self.w], lr=lr)

    def weights(self):
        return self.w.detach().clone()

    def terms(self, losses, active=None):
        """Weighted per-task terms w_t L_t with the weights held fixed."""
        return self.w.detach().to(losses.device) * _masked(losses, active)

    def forward(self, losses, active=None):
        return self.terms(losses, active).sum()

    __call__ = forward

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

    def parameters(self):
        return []  # trained by its own optimizer, not the model's

    def state_dict(self):
        return {"w": self.w.detach().clone(), "initial_losses": self.initial_losses.clone(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.initial_losses = state["initial_losses"].clone()
        self.optimizer.load_state_dict(state["optimizer"])


class DWAWeights(nn.Module):
    """Dynamic Weight Average (Liu, Johns, Davison, CVPR 2019, "End-to-End Multi-Task Learning with
    Attention"): w_t = T exp(r_t / tau) / sum_s exp(r_s / tau), r_t = L_t(k-1) / L_t(k-2), where L(k)
    is the task's mean training loss over epoch k; w = 1 for the first two epochs. A task whose loss
    falls slowly gets more weight."""

    def __init__(self, num_tasks, tau=2.0):
        super().__init__()
        self.num_tasks, self.tau = num_tasks, tau
        self.register_buffer("epoch_means", torch.zeros(0, num_tasks))  # one row per finished epoch
        self.register_buffer("sums", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("epoch", torch.tensor(0))

    def observe(self, losses, active, epoch):
        """Accumulate this step's losses; a new epoch closes the previous one's means."""
        if epoch != int(self.epoch):
            means = (self.sums / self.counts.clamp(min=1)).float()
            self.epoch_means = torch.cat([self.epoch_means, means[None]])
            self.sums.zero_()
            self.counts.zero_()
            self.epoch.fill_(epoch)
        active = active.cpu()
        self.sums[active] += losses.detach().double().cpu()[active]
        self.counts[active] += 1

    def weights(self):
        if self.epoch_means.shape[0] < 2:
            return torch.ones(self.num_tasks)
        r = self.epoch_means[-1] / self.epoch_means[-2].clamp(min=1e-12)
        return self.num_tasks * torch.softmax(r / self.tau, dim=0)

    def terms(self, losses, active=None):
        return self.weights().to(losses.device) * _masked(losses, active)

    def forward(self, losses, active=None):
        return self.terms(losses, active).sum()


class RandomWeights(nn.Module):
    """Random Loss Weighting (Lin et al., TMLR 2022, "Reasonable Effectiveness of Random Weighting"):
    each step w = softmax(z), z ~ N(0, I). Scaled by T here (sum T, like equal weights) so that the
    learning rate means the same as for the other weightings; the paper's weights sum to 1."""

    def __init__(self, num_tasks, seed=0):
        super().__init__()
        self.num_tasks = num_tasks
        self.generator = torch.Generator().manual_seed(seed + 15485863)
        self.current = torch.ones(num_tasks)

    def observe(self, losses, active, epoch):
        self.current = self.num_tasks * torch.softmax(torch.randn(self.num_tasks, generator=self.generator), dim=0)

    def weights(self):
        return self.current.clone()

    def terms(self, losses, active=None):
        return self.current.to(losses.device) * _masked(losses, active)

    def forward(self, losses, active=None):
        return self.terms(losses, active).sum()

    def state_dict(self, *args, **kwargs):
        return {"generator": self.generator.get_state(), "current": self.current.clone()}

    def load_state_dict(self, state, strict=True):
        self.generator.set_state(state["generator"])
        self.current = state["current"].clone()


class FAMOWeights:
    """FAMO (Liu, Liang, Liu, Yu, Gong, NeurIPS 2023, "FAMO: Fast Adaptive Multitask Optimization"):
    weights z = softmax(xi) on the log-losses, loss = sum_t z_t log(L_t - m_t + eps) / c with
    c = sum_t z_t / (L_t - m_t + eps) (a constant), so every task's log-loss falls at a similar rate in
    O(1) extra cost. xi is moved by Adam (lr 0.025, weight decay gamma 0.01) along the observed change of
    the log-losses, delta_t = log L_t(before) - log L_t(after), pushed through the softmax's Jacobian.
    The official code measures L(after) with a second forward on the same batch; here L(after) is the
    next step's loss (one forward per step; documented deviation). m_t = 0 (known minimum losses)."""

    def __init__(self, num_tasks, lr=0.025, gamma=0.01, eps=1e-8):
        self.num_tasks, self.eps = num_tasks, eps
        self.xi = torch.zeros(num_tasks, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.xi], lr=lr, weight_decay=gamma)
        self.prev_losses = None

    def observe(self, losses, active, epoch):
        losses = losses.detach().double().cpu()
        if self.prev_losses is not None:
            both = active.cpu() & self.prev_active
            delta = torch.where(both, (self.prev_losses + self.eps).log() - (losses + self.eps).log(),
                                torch.zeros_like(losses))
            with torch.enable_grad():
                z = torch.softmax(self.xi, dim=0)
                (grad,) = torch.autograd.grad(z, self.xi, grad_outputs=delta.float())
            self.optimizer.zero_grad()
            self.xi.grad = grad
            self.optimizer.step()
        self.prev_losses, self.prev_active = losses, active.cpu().clone()

    def weights(self):
        return torch.softmax(self.xi.detach(), dim=0)

    def terms(self, losses, active=None):
        z = self.weights().to(losses.device)
        d = losses + self.eps
        keep = torch.ones_like(z, dtype=torch.bool) if active is None else active.to(losses.device)
        c = (torch.where(keep, z / d, torch.zeros_like(z))).sum().detach()
        return _masked(z * torch.log(d) / c, active)

    def forward(self, losses, active=None):
        return self.terms(losses, active).sum()

    __call__ = forward

    def parameters(self):
        return []

    def state_dict(self):
        return {"xi": self.xi.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "prev_losses": self.prev_losses, "prev_active": getattr(self, "prev_active", None)}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.xi.copy_(state["xi"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.prev_losses, self.prev_active = state["prev_losses"], state["prev_active"]
