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

    def forward(self, losses, active=None):
        return _masked(losses, active).sum()

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

    def forward(self, losses, active=None):
        return (self.weights().to(losses.device) * _masked(losses, active)).sum()


class UncertaintyWeights(nn.Module):
    """Kendall, Gal, Cipolla (CVPR 2018): L = sum_t exp(-s_t) L_t + s_t, s_t = log sigma_t^2 learned.
    dL/ds_t = 1 - exp(-s_t) L_t, so s_t settles at log L_t: noisy (high-loss) tasks get small weights."""

    def __init__(self, num_tasks):
        super().__init__()
        self.num_tasks = num_tasks
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))

    def weights(self):
        return torch.exp(-self.log_vars)

    def forward(self, losses, active=None):
        s = self.log_vars.to(losses.device)
        terms = torch.exp(-s) * losses + s
        return _masked(terms, active).sum()


def _masked(values, active):
    """Keep only the active tasks' terms (a bool mask [T]); inactive ones contribute exactly 0."""
    if active is None:
        return values
    return torch.where(active.to(values.device), values, torch.zeros_like(values))
