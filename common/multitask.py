"""One multi-task update, shared by every scheduling script so that any scheduler can be combined with
any loss weighting and any gradient aggregation (--weighting, --aggregator, --grad-space).

CONTRACT READY: a weighting is an object of common.weighting (WEIGHTINGS), an aggregator one of
common.aggregators (AGGREGATORS, Gram matrix -> weights), one of common.gradient_rules (GRADIENT_RULES,
T x P rows -> update), or None for the plain sum; MultiTaskUpdate asks them about their capabilities
(needs_grad_norms, needs_loss_after_step; needs_task_grad_matrix, transforms_terms, weights_heads,
supports_representation), never about their names.

A scheduler only decides which tasks (or which samples of which tasks) count on this step; the update
turns that into gradients:

    losses  = per-task losses over the samples assigned to each task       (the trunk runs once)
    terms   = weighting.terms(losses, active)
    no aggregator : backward(terms.sum())
    aggregator    : per-task gradients of the shared part -> Gram matrix G (common/gradagg.py, the csrc/
                    kernel) -> aggregator(G) = T weights -> one combination into .grad; each head gets
                    the plain gradient of its own term.
    gradient rule : (needs_task_grad_matrix) the same per-task gradients; the rule gets the T x P rows
                    themselves and returns the update d, copied into .grad (GradDrop, TrimmedMean, MoCo,
                    DB-MTL, ExcessMTL); G is still formed for the conflict count. transforms_terms: the
                    rule's transform_terms(terms) replaces the terms first (DB-MTL's log-losses);
                    weights_heads: the heads get the gradient of sum_t rule.head_weights_t * term_t.

Gradient space (for aggregators, and for GradNorm's gradient norms):
  params          (default) per-task gradients of the shared parameters: the published methods. For an
                  aggregator all shared parameters; for GradNorm alone the last shared layer, as the paper.
  representation  per-task gradients of the fused representation z [B, 3H]: T cheap backward passes
                  through the heads, then one backward through the trunk with the combined gradient. A
                  cheaper, named variant (Sener & Koltun's MGDA-UB is its published precedent); its
                  per-task gradients are nearly orthogonal here, so conflict-based methods act differently.

torchrun (common/distributed.py; one process: every call below is the identity): the per-task losses are
the global batch's (distributed.global_task_losses), so every rule sees the same numbers on every rank.
  params          the T x P per-task gradients are averaged over the ranks (all_reduce_task_grads) before the
                  Gram matrix: the global Gram matrix is not the sum of local ones (inner products mix ranks).
                  The combined .grad of the shared parameters is then already global: run.step(synced=...).
  representation  each rank's rows of z are its own clips, so the global Gram matrix is the sum of the local
                  ones (all_reduce_gram, one T x T all-reduce); the combination goes back through the local
                  trunk and run.step averages the trunk's gradients like any other.
fp16 (--precision fp16): the terms are multiplied by run.loss_scale before any backward (the per-task
gradients too, so they do not underflow); the aggregator and GradNorm see G / loss_scale**2, and a step
whose scaled gradients overflowed is left to the scaler (run.step(..., scaled=True) skips it).
"""
import torch

from common import distributed, gradagg
from common.aggregators import AGGREGATORS
from common.gradient_rules import GRADIENT_RULES
from common.arguments import build_parser
from common.train import Run
from common.weighting import WEIGHTINGS

if set(AGGREGATORS) & set(GRADIENT_RULES):  # one --aggregator namespace: a name may not mean two rules
    raise ImportError(f"common.multitask: {sorted(set(AGGREGATORS) & set(GRADIENT_RULES))} are both Gram "
                      "aggregators and gradient rules")


def add_update_args(parser, weighting="equal", aggregator="sum", grad_space="params"):
    """--weighting, --aggregator, --grad-space and every method's own hyper-parameter flags."""
    g = parser.add_argument_group("loss weighting and gradient aggregation")
    g.add_argument("--weighting", choices=tuple(WEIGHTINGS), default=weighting,
                   help="how the task losses are weighted (common/weighting.py; docs/strategies.md)")
    g.add_argument("--aggregator", choices=("sum",) + tuple(AGGREGATORS) + tuple(GRADIENT_RULES), default=aggregator,
                   help="how the per-task gradients are combined (sum: the weighted losses' gradient; common/aggregators.py, gradient_rules.py)")
    g.add_argument("--grad-space", choices=("params", "representation"), default=grad_space,
                   help="where per-task gradients are taken (aggregators; GradNorm's norms)")
    g.add_argument("--task-grad-sync", choices=("all-reduce", "reduce-scatter"), default="all-reduce",
                   help="torchrun, parameter space: all-reduce the T x P per-task gradients (every rank holds "
                        "them all), or reduce-scatter them (each rank a block of columns; the Gram matrix "
                        "summed from the blocks, the combined gradient all-gathered: about 40%% less traffic "
                        "at T = 5). Not for rules that read the T x P rows. The same numbers either way")
    g.add_argument("--weights-lr", type=float, default=None,
                   help="lr of weights trained by the run's optimizer (learned, uncertainty; default --lr)")
    for cls in list(WEIGHTINGS.values()) + list(AGGREGATORS.values()) + list(GRADIENT_RULES.values()):
        cls.add_args(g)
    return parser


def make_update(run, args):
    """The update that --weighting, --aggregator and --grad-space ask for."""
    weighting = WEIGHTINGS[args.weighting].from_args(len(run.tasks), args)
    if args.aggregator == "sum":
        aggregator = None
    else:
        aggregator = (AGGREGATORS.get(args.aggregator) or GRADIENT_RULES[args.aggregator]).from_args(args)
    return MultiTaskUpdate(run, weighting, aggregator, args.grad_space, weights_lr=args.weights_lr,
                           task_grad_sync=args.task_grad_sync)


class MultiTaskUpdate:
    """Weighting + aggregation of one step. Create after Run, register with run.start(update=...)."""

    def __init__(self, run, weighting, aggregator=None, grad_space="params", weights_lr=None,
                 task_grad_sync="all-reduce"):
        if grad_space not in ("params", "representation"):
            raise ValueError(f"grad_space must be 'params' or 'representation', got {grad_space!r}")
        if task_grad_sync not in ("all-reduce", "reduce-scatter"):
            raise ValueError(f"task_grad_sync must be 'all-reduce' or 'reduce-scatter', got {task_grad_sync!r}")
        self.run = run
        self.T = len(run.tasks)
        self.weighting, self.aggregator, self.grad_space = weighting, aggregator, grad_space
        # a gradient rule (common/gradient_rules.py) takes the T x P rows, not the Gram matrix
        self.rule_rows = aggregator is not None and aggregator.needs_task_grad_matrix
        if self.rule_rows and grad_space == "representation" and not aggregator.supports_representation:
            raise ValueError(f"{aggregator.name}: keeps state on the per-task parameter gradients [T, P], so it "
                             "needs --grad-space params (representation gradients change size with the batch)")
        past_z = [t for t in run.tasks if t in run.objective.tasks_past_representation]
        if past_z and grad_space == "representation" and (aggregator is not None or weighting.needs_grad_norms):
            # their gradient with respect to z is zero: the rule would see zero rows and the trunk learn nothing from them
            raise ValueError(f"--grad-space representation: the losses of {', '.join(past_z)} do not pass through the "
                             "fused representation z (they read the branch sequences); use --grad-space params")
        # torchrun, parameter space: each rank keeps a block of columns of the global T x P rows
        self.sharded = task_grad_sync == "reduce-scatter"
        if self.sharded and (grad_space != "params" or self.rule_rows):
            raise ValueError("--task-grad-sync reduce-scatter: for Gram-matrix rules in parameter space only "
                             f"(here --grad-space {grad_space}"
                             + (f", and {aggregator.name} reads the whole T x P rows)" if self.rule_rows else ")"))
        run.add_parameters(weighting.to(run.device).parameters(), lr=weights_lr)
        self.shared = run.model.shared_parameters()
        self.own_params = run.head_parameters() + list(weighting.parameters())
        self.needs_task_grads = aggregator is not None or weighting.needs_grad_norms
        self.task_grads = None  # the T x P buffer: only where per-task parameter gradients are needed
        if self.needs_task_grads and grad_space == "params":
            params = self.shared if aggregator is not None else run.model.last_shared_parameters()
            self.task_grads = gradagg.TaskGradBuffer(params, self.T)
        self.last = {}
        self.conflicts_total = 0  # conflicting gradient pairs summed over steps, checkpointed
        self.report_totals = {}   # the aggregator's reports summed over steps (e.g. Nash-MTL's fallbacks)

    # -- the step
    def step(self, batch, task_mask=None, task_scale=None):
        """task_mask: None (all tasks, all samples), bool [T] (these tasks), or bool [B, T] (sample b
        counts for task t: batches composed per sampling ratios). task_scale: None or [T] factors that
        multiply the weighting's terms on this step (a rule that weighs tasks per step, e.g. dynamic
        sampling's --apply weights); the weighting's own state never sees them. Returns the per-task
        losses (under torchrun those of the global batch, identical on every rank)."""
        run = self.run
        fused, per_item, valid = run.per_item_losses(batch)        # [B, 3H], [B, T], [B, T]
        mask = self._sample_mask(task_mask, valid)
        losses, active, counts = self._masked_losses(per_item, mask)
        if not run.check_finite(losses.masked_fill(~active, 0.0), batch):
            run.skip_step()
            return losses.detach()
        self.weighting.observe(losses.detach(), active, run.epoch, counts=counts.detach())
        # fp16: every backward below starts from losses times the scaler's scale (run.scale_loss, which also
        # starts the scaler for run.step's unscale_); 1.0 otherwise
        scale = run.loss_scale
        # the step's loss uses the weights the step starts with, w(t); GradNorm's update (below, from the
        # gradient norms of this batch at w(t)) gives w(t+1) for the next step (paper, LibMTL, TAG code)
        try:
            terms = self.weighting.terms(losses, active)
        except ValueError as error:  # e.g. GLS at a loss of exactly 0: say when it happened
            raise ValueError(f"step {run.step_count}: {error}") from error
        if self.rule_rows and self.aggregator.transforms_terms:  # e.g. DB-MTL: log(term + 1e-8)
            terms = self.aggregator.transform_terms(terms, active)
        if self.weighting.needs_grad_norms:
            _, G = self._task_gradients(run.scale_loss(losses), active, fused, scale)
            if G is None:  # fp16 overflow: this step is the scaler's to skip; the weights wait for the next
                self.last["gradnorm_targets"] = torch.full((self.T,), float("nan"))
            else:
                self.last["gradnorm_targets"] = self.weighting.update(losses, G.diagonal().clamp(min=0).sqrt(), active)
        if task_scale is not None:
            terms = terms * self._check_task_scale(task_scale, terms)

        run.zero_grad()
        synced = ()
        if self.aggregator is None:
            run.scale_loss(terms.sum()).backward()
        else:
            self._aggregate_backward(run.scale_loss(terms), active, fused, scale)
            if self.grad_space == "params":  # their combined .grad came from the all-reduced T x P rows
                synced = self.task_grads.params
        # an inactive task's head gets no gradient at all: with a zero gradient Adam would still move it
        # by its momentum, and a "stopped" task would keep changing
        for t in (~active).nonzero().flatten().tolist():
            for p in run.head_parameters(run.tasks[t]):
                p.grad = None
        stepped = run.step(None, batch=batch, synced=synced, scaled=run.scales_losses)
        if stepped and self.weighting.needs_loss_after_step:
            with torch.no_grad():   # the same batch after the step (FAMO's official second forward)
                _, per_item_after, _ = run.per_item_losses(batch)
                after, _, _ = self._masked_losses(per_item_after, mask)
            self.last["loss_change"] = self.weighting.observe_after_step(after, active)
        self.last["weights"] = self.weighting.weights()
        self.last["active"] = active.cpu()
        return losses.detach()

    def _check_task_scale(self, task_scale, terms):
        scale = torch.as_tensor(task_scale, dtype=terms.dtype, device=terms.device)
        if scale.shape != (self.T,):
            raise ValueError(f"MultiTaskUpdate.step: task_scale must have shape ({self.T},) (one factor per "
                             f"task of {self.run.tasks}), got {tuple(scale.shape)}")
        return scale

    def _sample_mask(self, task_mask, valid):
        if task_mask is None:
            return valid
        task_mask = task_mask.to(valid.device)
        if task_mask.dim() == 1:
            task_mask = task_mask.expand_as(valid)
        if task_mask.shape != valid.shape:
            raise ValueError(f"MultiTaskUpdate.step: task_mask must be [T] or [B, T] = {tuple(valid.shape)} "
                             f"(this rank's clips), got {tuple(task_mask.shape)}")
        return task_mask & valid

    @staticmethod
    def _masked_losses(per_item, mask):
        """Per-task mean losses over the clips each task counts (under torchrun: over the global batch),
        which tasks have any clip, and how many clips each loss averages (identical on every rank)."""
        losses, counts = distributed.global_task_losses(per_item, mask)
        return losses, counts > 0, counts

    # -- per-task gradients
    def _task_gradients(self, losses, active, fused, scale=1.0):
        """The per-task gradients in the chosen space (inactive tasks: zero rows) and the Gram matrix of
        the global ones, divided by scale**2 (fp16: losses came multiplied by the loss scale).
        params: rows T x P, all-reduced, identical on every rank (--task-grad-sync reduce-scatter: this rank's
        block of their columns). representation: this rank's rows
        [T, B * 3H] of z, and G the sum of the ranks' local Gram matrices. G is None where the scaled
        fp16 gradients overflowed on some rank (the scaler then skips the step)."""
        if self.grad_space == "params":
            self.task_grads.fill_from_losses([losses[t] if active[t] else None for t in range(self.T)])
            if self.sharded:  # this rank's block of columns of the global rows; G summed from the blocks
                grads = distributed.reduce_scatter_task_grads(self.task_grads.grads)
            else:
                grads = distributed.all_reduce_task_grads(self.task_grads.grads)
        else:
            grads = torch.zeros(self.T, fused.numel(), device=fused.device)
            for t in range(self.T):
                if active[t]:
                    (g,) = torch.autograd.grad(losses[t], fused, retain_graph=True)
                    grads[t] = g.reshape(-1)
        try:
            G = self._sharded_gram(grads) if self.sharded else gradagg.gram(grads)
        except FloatingPointError:
            if scale == 1.0:  # no loss scale: a real NaN or inf, reported as before
                raise
            G = None          # fp16: the scaled gradients (or their inner products) overflowed
        if scale != 1.0 and distributed.any_true(G is None):  # decided alike on every rank
            return grads, None
        if self.grad_space == "representation":
            G = distributed.all_reduce_gram(G)
        return grads, G / scale ** 2 if scale != 1.0 else G

    @staticmethod
    def _sharded_gram(block):
        """The global Gram matrix from each rank's block of columns (checked once summed, so that every rank
        raises alike)."""
        G = distributed.all_reduce_sum_(gradagg.gram(block, check=False))
        if not torch.isfinite(G).all():
            raise FloatingPointError("the Gram matrix is not finite (a task gradient holds NaN or inf)")
        return G

    def _aggregate_backward(self, terms, active, fused, scale=1.0):
        if self.rule_rows:
            return self._rule_backward(terms, active, fused, scale)
        grads, G = self._task_gradients(terms, active, fused, scale)
        idx = active.nonzero().flatten().cpu()
        coeffs = torch.zeros(self.T, dtype=torch.float64)
        if G is None:  # fp16 overflow: the aggregator is not asked; an inf update makes run.step's scaler skip
            coeffs[idx] = 1.0
        elif idx.numel() == 0:  # no task has a clip in this batch: nothing to aggregate, a zero update
            pass
        else:
            # the aggregator sees only the active tasks' Gram matrix (a scheduler may have switched some off)
            G_active = G[idx][:, idx].cpu()
            coeffs[idx] = self.aggregator(G_active)
            self.last["conflicts"] = int((G_active < 0).sum().item() // 2)
            self.last.update(self.aggregator.report)
            for k, v in self.aggregator.report.items():
                self.report_totals[k] = self.report_totals.get(k, 0) + v
            self.conflicts_total += self.last["conflicts"]
        self.last["aggregator_weights"] = coeffs.float()
        # heads and rule parameters: the plain gradient of the summed terms (cheap: no trunk backward)
        own = [p for p in self.own_params if p.requires_grad]
        head_grads = torch.autograd.grad(terms.sum(), own, retain_graph=True, allow_unused=True)
        if self.sharded:  # combine this rank's columns, gather the whole combined gradient
            self.task_grads.attach_grads()
            combined = distributed.all_gather_columns(gradagg.combine(grads, coeffs), self.task_grads.flat_grad)
            if G is None:
                combined.fill_(float("inf"))
        elif self.grad_space == "params":
            combined = self.task_grads.write_combined(coeffs)
            if G is None:
                combined.fill_(float("inf"))
        else:
            combined = gradagg.combine(grads, coeffs.to(grads.dtype))
            if G is None:
                combined.fill_(float("inf"))
            fused.backward(combined.view_as(fused))
        for p, g in zip(own, head_grads):
            p.grad = g

    def _rule_backward(self, terms, active, fused, scale=1.0):
        """A gradient rule (needs_task_grad_matrix): the T x P rows (params: all-reduced) -> the rule -> d,
        written into the shared parameters' .grad (params) or backpropagated from z (representation).
        fp16: the rows come from terms x scale; the rule sees rows / scale and term values / scale (its state
        must not depend on the loss scale) and d is scaled back for the scaler's unscale_."""
        rule = self.aggregator
        try:
            grads, G = self._task_gradients(terms, active, fused, scale)
        except FloatingPointError as exc:
            raise FloatingPointError(f"{rule.name}: the per-task gradients are not finite ({exc})") from exc
        idx = active.nonzero().flatten().cpu()
        if G is None:  # fp16 overflow: the rule is not asked (its state stays); an inf update makes the scaler skip
            combined = torch.full((grads.shape[1],), float("inf"), dtype=grads.dtype, device=grads.device)
        elif idx.numel() == 0:
            combined = torch.zeros(grads.shape[1], dtype=grads.dtype, device=grads.device)
        else:
            G_active = G[idx][:, idx].cpu()
            self.last["conflicts"] = int((G_active < 0).sum().item() // 2)
            self.conflicts_total += self.last["conflicts"]
            if scale != 1.0:
                grads.div_(scale)  # the buffer's rows are not read again this step
            values = terms.detach() / scale
            combined = rule(grads, losses=values, active=active.cpu())
            if scale != 1.0:
                combined = combined * scale
            self.last.update(rule.report)
            for k, v in rule.report.items():
                self.report_totals[k] = self.report_totals.get(k, 0) + v
            if rule.last_weights is not None:
                self.last["aggregator_weights"] = rule.last_weights.detach().float().cpu()
        # heads and rule parameters: the plain gradient of the summed terms, or of the rule's head weighting
        own = [p for p in self.own_params if p.requires_grad]
        head_terms = terms
        if rule.weights_heads and rule.head_weights is not None and G is not None and idx.numel():
            head_terms = terms * rule.head_weights.to(device=terms.device, dtype=terms.dtype)
        head_grads = torch.autograd.grad(head_terms.sum(), own, retain_graph=True, allow_unused=True)
        if self.grad_space == "params":
            self.task_grads.attach_grads()
            with torch.no_grad():
                self.task_grads.flat_grad.copy_(combined)
        else:
            fused.backward(combined.view_as(fused))
        for p, g in zip(own, head_grads):
            p.grad = g

    def rule_versions(self):
        """{kind:name: version} of the weighting and the aggregator, for the run's record (common/versions.py)."""
        out = {f"weighting:{self.weighting.name}": self.weighting.version}
        if self.aggregator is not None:
            out[f"aggregator:{self.aggregator.name}"] = self.aggregator.version
        return out

    def decisions(self):
        """What the rule decided on the last step, for run.log_step."""
        return dict(self.last)

    def summary(self):
        """What the update did over the run, for run.finish(decisions=...)."""
        out = {"final_weights": dict(zip(self.run.tasks, self.weighting.weights().tolist())),
               "weighting": self.weighting.name,
               "aggregator": self.aggregator.name if self.aggregator is not None else "sum"}
        if self.aggregator is not None:
            out.update(grad_space=self.grad_space,
                       conflicting_pairs_per_step=self.conflicts_total / max(self.run.step_count, 1),
                       **{f"{k}_steps": v for k, v in self.report_totals.items()})
        return out

    def state_dict(self):
        return {"weighting": self.weighting.state_dict(),
                "aggregator": self.aggregator.state_dict() if self.aggregator is not None else {},
                "conflicts_total": self.conflicts_total, "report_totals": dict(self.report_totals)}

    def load_state_dict(self, state):
        self.weighting.load_state_dict(state["weighting"])
        if self.aggregator is not None:
            self.aggregator.load_state_dict(state["aggregator"])
        self.conflicts_total = state["conflicts_total"]
        self.report_totals = dict(state["report_totals"])


def run_every_task(strategy, doc, argv=None, **defaults):
    """The whole script of a loss-weighting or gradient-aggregation strategy: every task on every
    batch; the rule is the update's (--weighting / --aggregator, defaults given by the script).

        for batch in run.batches():
            losses = update.step(batch)     # weighting.terms -> backward, or per-task grads -> aggregator
            ...
    """
    parser = add_update_args(build_parser(doc), **defaults)
    args = parser.parse_args(argv)
    uses_task_grads = args.aggregator != "sum" or WEIGHTINGS[args.weighting].needs_grad_norms
    if uses_task_grads and args.grad_space == "representation":
        strategy += "_representation"       # its own row and run folder (make compare shows both)
    run = Run(args, strategy=strategy)
    update = make_update(run, args)
    run.start(update=update)

    for batch in run.batches():
        losses = update.step(batch)
        run.log_step(losses, **update.decisions())          # weights, aggregator weights, conflicts
        if run.at_eval():
            run.validate(weights=update.weighting.weights())
            run.eval_checkpoint()
    return run.finish(decisions=update.summary())
