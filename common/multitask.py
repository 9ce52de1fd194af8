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
from common import aggregators
from common.train import Run, build_parser
from common.weighting import (DWAWeights, EqualWeights, FAMOWeights, GradNormWeights, LearnedWeights, RandomWeights,
                              UncertaintyWeights)

WEIGHTINGS = ("equal", "learned", "uncertainty", "gradnorm", "dwa", "rlw", "famo")
AGGREGATORS = ("sum",) + tuple(aggregators.AGGREGATORS)  # pcgrad, mgda, cagrad, nash_mtl, imtl, aligned_mtl


def add_update_args(parser, weighting="equal", aggregator="sum", grad_space="representation"):
    g = parser.add_argument_group("loss weighting and gradient aggregation")
    g.add_argument("--weighting", choices=WEIGHTINGS, default=weighting)
    g.add_argument("--aggregator", choices=AGGREGATORS, default=aggregator)
    g.add_argument("--grad-space", choices=("params", "representation"), default=grad_space,
                   help="where per-task gradients are taken for pcgrad and gradnorm")
    g.add_argument("--gradnorm-alpha", type=float, default=1.5)
    g.add_argument("--gradnorm-lr", type=float, default=0.025)
    g.add_argument("--dwa-tau", type=float, default=2.0)
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
    if name == "dwa":
        return DWAWeights(num_tasks, tau=getattr(args, "dwa_tau", 2.0))
    if name == "rlw":
        return RandomWeights(num_tasks, seed=getattr(args, "seed", 0))
    if name == "famo":
        return FAMOWeights(num_tasks)
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
        self.head_and_rule_params = run.head_parameters() + list(self.weighting.parameters())
        self.needs_task_grads = aggregator != "sum" or weighting == "gradnorm"
        if self.needs_task_grads and grad_space == "params":
            # aggregators need all shared parameters; GradNorm only the last shared layer (as the paper)
            params = self.shared if aggregator != "sum" else model.last_shared_parameters()
            self.task_grads = gradagg.TaskGradBuffer(params, self.T)
        # what an aggregator keeps between steps: PCGrad's random order generator, Nash-MTL's warm start
        self.ctx = {"generator": torch.Generator().manual_seed(getattr(args, "seed", 0) + 7919)}
        self.last = {}
        self.conflicts_total = 0  # conflicting gradient pairs summed over steps (PCGrad), checkpointed

    # -- the step
    def step(self, batch, task_mask=None):
        """task_mask: None (all tasks, all samples), bool [T] (these tasks), or bool [B, T] (sample b
        counts for task t: batches composed per sampling ratios). Returns the per-task losses."""
        run = self.run
        fused, per_item, valid = run.per_item_losses(batch)        # [B, 3H], [B, T], [B, T]
        if task_mask is None:
            task_mask = torch.ones(self.T, dtype=torch.bool)
        task_mask = task_mask.to(per_item.device)
        if task_mask.dim() == 1:
            task_mask = task_mask.expand_as(per_item)
        task_mask = task_mask & valid
        counts = task_mask.sum(0)
        active = counts > 0
        losses = (per_item * task_mask).sum(0) / counts.clamp(min=1)
        if not run.check_finite(losses.masked_fill(~active, 0.0), batch):
            run.skip_step()
            return losses.detach()
        if hasattr(self.weighting, "observe"):  # DWA, RLW, FAMO follow the losses over time
            self.weighting.observe(losses.detach(), active, run.epoch)
        terms = self.weighting.terms(losses, active)

        if self.weighting_name == "gradnorm":
            norms = self._task_grad_norms(losses, active, fused)
            self.last["gradnorm_targets"] = self.weighting.update(losses, norms, active)
            terms = self.weighting.terms(losses, active)

        run.optimizer.zero_grad(set_to_none=True)
        if self.aggregator == "sum":
            terms.sum().backward()
        else:
            self._aggregate_backward(terms, active, fused)
        # an inactive task's head gets no gradient at all: with a zero gradient Adam would still move it
        # by its momentum, and a "stopped" task would keep changing
        for t in (~active).nonzero().flatten().tolist():
            for p in run.head_parameters(run.tasks[t]):
                p.grad = None
        run.step(None, batch=batch)
        self.last["weights"] = self.weighting.weights()
        self.last["active"] = active.cpu()
        return losses.detach()

    # -- per-task gradients
    def _task_gradients(self, terms, active, fused):
        """The T x P per-task gradient matrix in the chosen space (inactive tasks: zero rows)."""
        if self.grad_space == "params":
            self.task_grads.fill_from_losses([terms[t] if active[t] else None for t in range(self.T)])
            return self.task_grads.grads
        rows = torch.zeros(self.T, fused.numel(), device=fused.device)
        for t in range(self.T):
            if active[t]:
                (g,) = torch.autograd.grad(terms[t], fused, retain_graph=True)
                rows[t] = g.reshape(-1)
        return rows

    def _task_grad_norms(self, losses, active, fused):
        grads = self._task_gradients(losses, active, fused)   # of the unweighted losses: n_t = ||grad L_t||
        return gradagg.gram(grads).diagonal().clamp(min=0).sqrt()

    def _aggregate_backward(self, terms, active, fused):
        grads = self._task_gradients(terms, active, fused)
        G = gradagg.gram(grads)
        idx = active.nonzero().flatten().cpu()
        coeffs = torch.zeros(self.T, dtype=torch.float64)
        # the aggregator sees only the active tasks' Gram matrix (a scheduler may have switched some off)
        coeffs[idx] = aggregators.AGGREGATORS[self.aggregator](G[idx][:, idx].cpu(), self.ctx)
        self.last["aggregator_weights"] = coeffs.float()
        self.last["conflicts"] = int((G[idx][:, idx] < 0).sum().item() // 2)
        self.conflicts_total += self.last["conflicts"]
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
        return {"weighting": w, "ctx": {k: (v.get_state() if k == "generator" else v) for k, v in self.ctx.items()},
                "conflicts_total": self.conflicts_total}

    def load_state_dict(self, state):
        self.weighting.load_state_dict(state["weighting"])
        for k, v in state["ctx"].items():
            if k == "generator":
                self.ctx["generator"].set_state(v)
            else:
                self.ctx[k] = v
        self.conflicts_total = state["conflicts_total"]


def run_every_task(strategy, doc, argv=None, **defaults):
    """The whole script of a loss-weighting or gradient-aggregation strategy: every task on every
    batch; the rule is the update's (--weighting / --aggregator, defaults given by the script).

        for batch in run.batches():
            losses = update.step(batch)     # weighting.terms -> backward, or per-task grads -> aggregator
            ...
    """
    parser = add_update_args(build_parser(doc), **defaults)
    args = parser.parse_args(argv)
    run = Run(args, strategy=strategy)
    update = MultiTaskUpdate(run, args.weighting, args.aggregator, args.grad_space, args)
    run.start(update=update)

    for batch in run.batches():
        losses = update.step(batch)
        run.log_step(losses, **update.decisions())          # weights, aggregator weights, conflicts
        if run.at_eval():
            run.validate(weights=update.weighting.weights())
            run.save_checkpoint()

    decisions = {"final_weights": dict(zip(run.tasks, update.weighting.weights().tolist())),
                 "weighting": args.weighting, "aggregator": args.aggregator}
    if args.aggregator != "sum":
        decisions.update(grad_space=args.grad_space, conflicting_pairs_per_step=update.conflicts_total / max(run.step_count, 1))
    return run.finish(decisions=decisions)
