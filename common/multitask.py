"""One multi-task update, shared by every scheduling script so that any scheduler can be combined with
any loss weighting and any gradient aggregation (--weighting, --aggregator, --grad-space).

A scheduler only decides which tasks (or which samples of which tasks) count on this step; this module
turns that into gradients:

    losses  = per-task cross-entropy over the samples assigned to each task      (trunk runs once)
    terms   = weighting.terms(losses, active)      equal / learned / uncertainty / gradnorm
    sum     : backward(terms.sum())
    pcgrad  : per-task gradients of the shared part -> Gram matrix -> PCGrad coefficients -> one combine
              into .grad (common/gradagg.py, the csrc/ kernel on the hot path); heads get their own grads.

Gradient space (PCGrad and GradNorm):
  params          per-task gradients of all shared parameters (exact; T backward passes through the trunk)
  representation  per-task gradients of the fused representation z [B, 3H] (T cheap backward passes
                  through the heads, then one backward through the trunk with the combined gradient)
"""
import torch

from common import gradagg
from common.weighting import EqualWeights, GradNormWeights, LearnedWeights, UncertaintyWeights

WEIGHTINGS = ("equal", "learned", "uncertainty", "gradnorm")
AGGREGATORS = ("sum", "pcgrad")


def add_update_args(parser, weighting="equal", aggregator="sum", grad_space="representation"):
    g = parser.add_argument_group("loss weighting and gradient aggregation")
    g.add_argument("--weighting", choices=WEIGHTINGS, default=weighting)
    g.add_argument("--aggregator", choices=AGGREGATORS, default=aggregator)
    g.add_argument("--grad-space", choices=("params", "representation"), default=grad_space,
                   help="where per-task gradients are taken for pcgrad and gradnorm")
    g.add_argument("--gradnorm-alpha", type=float, default=1.5)
    g.add_argument("--gradnorm-lr", type=float, default=0.025)
    g.add_argument("--weights-lr", type=float, default=None, help="lr of learned / uncertainty weights")
    return parser


def make_weighting(name, num_tasks, args=None):
    if name == "equal":
        return EqualWeights(num_tasks)
    if name == "learned":
        return LearnedWeights(num_tasks)
    if name == "uncertainty":
        return UncertaintyWeights(num_tasks)
    if name == "gradnorm":
        return GradNormWeights(num_tasks, alpha=getattr(args, "gradnorm_alpha", 1.5), lr=getattr(args, "gradnorm_lr", 0.025))
    raise ValueError(f"unknown weighting {name!r}; choose from {WEIGHTINGS}")


class MultiTaskUpdate:
    """Weighting + aggregation of one step. Create after Run, register with run.start(update=...)."""

    def __init__(self, run, weighting="equal", aggregator="sum", grad_space="representation", args=None):
        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}; choose from {AGGREGATORS}")
        self.run = run
        self.T = len(run.tasks)
        self.weighting_name, self.aggregator, self.grad_space = weighting, aggregator, grad_space
        self.weighting = make_weighting(weighting, self.T, args)
        run.add_parameters(self.weighting.parameters(), lr=getattr(args, "weights_lr", None))
        model = run.model
        self.shared = model.shared_parameters()
        self.head_and_rule_params = model.head_parameters() + list(self.weighting.parameters())
        self.needs_task_grads = aggregator == "pcgrad" or weighting == "gradnorm"
        if self.needs_task_grads and grad_space == "params":
            # PCGrad needs all shared parameters; GradNorm only the last shared layer (as the paper)
            params = self.shared if aggregator == "pcgrad" else model.last_shared_parameters()
            self.task_grads = gradagg.TaskGradBuffer(params, self.T)
        self.generator = torch.Generator().manual_seed(getattr(args, "seed", 0) + 7919)  # PCGrad's random order
        self.last = {}
        self.conflicts_total = 0  # conflicting gradient pairs summed over steps (PCGrad), checkpointed

    # -- the step
    def step(self, batch, task_mask=None):
        """task_mask: None (all tasks, all samples), bool [T] (these tasks), or bool [B, T] (sample b
        counts for task t: batches composed per sampling ratios). Returns the per-task losses."""
        run = self.run
        fused, logits = run.forward(batch)
        per_item = run.losses_from_logits(logits, batch, reduction="none")  # [B, T]
        if task_mask is None:
            task_mask = torch.ones(self.T, dtype=torch.bool)
        task_mask = task_mask.to(per_item.device)
        if task_mask.dim() == 1:
            task_mask = task_mask.expand_as(per_item)
        counts = task_mask.sum(0)
        active = counts > 0
        losses = (per_item * task_mask).sum(0) / counts.clamp(min=1)
        if not run.check_finite(losses.masked_fill(~active, 0.0), batch):
            run.skip_step()
            return losses.detach()
        terms = self.weighting.terms(losses, active)

        if self.weighting_name == "gradnorm":
            norms = self._task_grad_norms(losses, active, fused)
            self.last["gradnorm_targets"] = self.weighting.update(losses, norms, active)
            terms = self.weighting.terms(losses, active)

        if self.aggregator == "sum":
            run.step(terms.sum(), batch=batch)
        else:
            self._pcgrad_backward(terms, active, fused)
            run.step(None, batch=batch)
        self.last["weights"] = self.weighting.weights()
        self.last["active"] = active.cpu()
        return losses.detach()

    # -- per-task gradients
    def _task_gradients(self, terms, active, fused):
        """The T x P per-task gradient matrix in the chosen space (inactive tasks: zero rows)."""
        if self.grad_space == "params":
            self.task_grads.fill_from_losses([terms[t] if active[t] else None for t in range(self.T)])
            return self.task_grads.buffer
        rows = torch.zeros(self.T, fused.numel(), device=fused.device)
        for t in range(self.T):
            if active[t]:
                (g,) = torch.autograd.grad(terms[t], fused, retain_graph=True)
                rows[t] = g.reshape(-1)
        return rows

    def _task_grad_norms(self, losses, active, fused):
        grads = self._task_gradients(losses, active, fused)   # of the unweighted losses: n_t = ||grad L_t||
        return gradagg.gram(grads).diagonal().clamp(min=0).sqrt()

    def _pcgrad_backward(self, terms, active, fused):
        run = self.run
        run.optimizer.zero_grad(set_to_none=True)
        grads = self._task_gradients(terms, active, fused)
        G = gradagg.gram(grads)
        order = gradagg.pcgrad_order(self.T, self.generator)
        coeffs = gradagg.pcgrad_coefficients(G, order)
        self.last["pcgrad_conflicts"] = int((G[active][:, active] < 0).sum().item() // 2)
        self.conflicts_total += self.last["pcgrad_conflicts"]
        # heads and rule parameters: the plain gradient of the summed terms (cheap: no trunk backward)
        own = [p for p in self.head_and_rule_params if p.requires_grad]
        head_grads = torch.autograd.grad(terms.sum(), own, retain_graph=True, allow_unused=True)
        if self.grad_space == "params":
            self.task_grads.write_combined(coeffs)
        else:
            combined = gradagg.combine(grads, coeffs.to(grads.dtype))
            fused.backward(combined.view_as(fused))
        for p, g in zip(own, head_grads):
            p.grad = g

    def decisions(self):
        """What the rule decided on the last step, for run.log_step."""
        return {k: v for k, v in self.last.items()}

    def state_dict(self):
        w = self.weighting.state_dict()
        return {"weighting": w, "generator": self.generator.get_state(), "conflicts_total": self.conflicts_total}

    def load_state_dict(self, state):
        self.weighting.load_state_dict(state["weighting"])
        self.generator.set_state(state["generator"])
        self.conflicts_total = state["conflicts_total"]
