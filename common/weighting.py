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
