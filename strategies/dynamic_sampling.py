"""dynamic_sampling: dynamic difficulty sampling (Gottumukkala, Dua, Singh, Gardner, ACL 2020, "Dynamic
Sampling Strategies for Multi-Task Reading Comprehension").

Once per epoch (or every --interval steps) each task gets a sampling probability proportional to how far
it is behind:

    p_t = d_t / sum_s d_s          (all d_t = 0: uniform; the first epoch is uniform)

with d_t its difficulty:
  --difficulty gap         max(S_t - M_t, 0): its single-task validation score minus the multi-task model's
                           current one (Gottumukkala et al.; needs results/single_task/seed<seed>, same --metric)
  --difficulty loss        L_t / L_t(0): its mean training loss over the last interval relative to the first
                           interval's (the fallback where no single-task reference exists)
  --difficulty loss_share  L_t: the mean training loss itself, so p_t = L_t / sum_s L_s (the rule of the student
                           code the research plan refers to, cullena20/IRESComicMischief train.py). A task that
                           was not trained in the interval (--apply task or clips) has no loss there: it keeps
                           its last measured L_t (the mean of this interval's measured L_s if it has none yet, its
                           share at the uniform start), never 0, which would stop drawing it for good. The
                           student code cannot starve a task either: every batch holds at least 2 clips of each.
  --difficulty auto        gap where every single-task reference exists, loss otherwise; the log says which.

How p acts on training (--apply). In the paper every dataset has its own instances and p decides how many of
each an epoch draws; here every clip carries all five labels, so drawing "instances of task t" would throw
labels away. The default keeps every label:
  weights (default)  every clip trains every task; task t's loss is weighted T * p_t (sum T): the share of
                     task t's instances a batch sampled by p would hold, without discarding any label
  task               one task drawn from p per step trains on the whole batch (homogeneous batches)
  clips              each clip of a batch is handed to one task drawn from p (the paper's heterogeneous
                     batches, and the student code's batches): a task sees about p_t of its labels
torchrun: every rank draws for the whole global batch from the same generator and takes its own rows
(rank_rows), and the probabilities come from the global losses, so a run equals the one-process run.

    python strategies/dynamic_sampling.py
    python strategies/dynamic_sampling.py --difficulty loss --apply task --weighting uncertainty
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import distributed  # noqa: E402
from common.multitask import add_update_args, make_update  # noqa: E402
from common.arguments import build_parser  # noqa: E402
from common.summaries import single_task_references  # noqa: E402
from common.train import Run  # noqa: E402

# the version of this strategy's rule, stored in run records: bumped when what the rule decides changes
RULE_VERSION = 1
# make compare --grid full tunes this flag with the learning rate (the default value first)
TUNE_GRID = ("--difficulty", ["gap", "loss"])


def sampling_probabilities(difficulty):
    """p_t proportional to max(d_t, 0); uniform when no task has a positive difficulty."""
    d = torch.as_tensor(difficulty, dtype=torch.float64).clamp(min=0)
    if d.sum() <= 0:
        return torch.full_like(d, 1.0 / len(d))
    return d / d.sum()


def gap_difficulty(references, scores):
    """Gottumukkala et al.: single-task score minus current multi-task score, per task."""
    return [references[t] - scores[t] for t in references]


def compose_batch(probs, batch_size, generator):
    """--apply clips: hand each clip of the batch to one task drawn from probs; a bool mask [B, T]."""
    tasks = torch.multinomial(probs.float(), batch_size, replacement=True, generator=generator)
    return torch.nn.functional.one_hot(tasks, len(probs)).bool()


class DifficultySampler:
    """The probabilities and the training losses they are computed from; checkpointed with the run."""

    def __init__(self, num_tasks, seed):
        self.T = num_tasks
        self.probs = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        self.initial_loss = torch.full((num_tasks,), float("nan"), dtype=torch.float64)
        self.loss_sum = torch.zeros(num_tasks, dtype=torch.float64)
        self.loss_count = torch.zeros(num_tasks, dtype=torch.float64)
        self.last_loss = torch.full((num_tasks,), float("nan"), dtype=torch.float64)  # loss_share: last measured
        self.generator = torch.Generator().manual_seed(seed + 104729)

    def record(self, losses, active):
        """Accumulate the training losses of the tasks trained on this step."""
        active = active.cpu()
        self.loss_sum[active] += losses.detach().double().cpu()[active]
        self.loss_count[active] += 1

    def interval_losses(self):
        """Mean training loss per task since the last call (NaN for a task not trained), then start anew."""
        mean = torch.where(self.loss_count > 0, self.loss_sum / self.loss_count.clamp(min=1),
                           torch.full_like(self.loss_sum, float("nan")))
        self.loss_sum.zero_()
        self.loss_count.zero_()
        return mean

    def loss_difficulty(self):
        """L_t / L_t(0); L_t(0) is the task's first interval mean. A task not trained in the interval: 1."""
        mean = self.interval_losses()
        first = ~torch.isnan(mean) & torch.isnan(self.initial_loss)
        self.initial_loss[first] = mean[first]
        return torch.nan_to_num(mean / self.initial_loss, nan=1.0)

    def loss_share_difficulty(self):
        """--difficulty loss_share: (L_t [T], carried bool [T]). L_t is the task's mean training loss over the
        interval; a task with no loss in the interval (not drawn) keeps its last measured L_t, or, never measured
        yet, gets the mean of this interval's measured losses (the uniform start gave every task the same
        share). carried says which tasks were not measured. Missing data never gives a task 0 (p_t = 0 under
        --apply task / clips would never draw it again). A NaN mean (a non-finite loss recorded) stays NaN."""
        measured = self.loss_count > 0
        mean = self.interval_losses()
        finite = measured & torch.isfinite(mean)
        self.last_loss[finite] = mean[finite]
        fallback = mean[finite].mean() if finite.any() else torch.tensor(float("nan"), dtype=torch.float64)
        carried = ~measured
        d = torch.where(measured, mean, torch.where(torch.isnan(self.last_loss), fallback, self.last_loss))
        return d, carried

    def draw(self, apply, batch_size):
        """What the probabilities decide on one step: (bool mask [T] or [B, T], loss scale [T] or None)."""
        if apply == "weights":
            return torch.ones(self.T, dtype=torch.bool), (self.T * self.probs).float()
        if apply == "task":
            task = torch.multinomial(self.probs.float(), 1, generator=self.generator)[0]
            return torch.nn.functional.one_hot(task, self.T).bool(), None
        return compose_batch(self.probs, batch_size, self.generator), None

    def state_dict(self):
        return {k: getattr(self, k) for k in ("probs", "initial_loss", "loss_sum", "loss_count", "last_loss")} | {
            "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        for k in ("probs", "initial_loss", "loss_sum", "loss_count"):
            setattr(self, k, state[k].clone())
        if "last_loss" in state:  # absent from checkpoints written before RULE_VERSION 1
            self.last_loss = state["last_loss"].clone()
        self.generator.set_state(state["generator"])


def rank_rows(mask, batch):
    """This rank's rows of a mask [N, T] drawn for the whole global batch (torchrun: every rank draws the same
    N = batch["global_batch_size"] clips' tasks from the same generator, so the composition is one process's;
    its clips are rows shard_start .. shard_start + B). A ghost rank's borrowed clip scores nothing: any row."""
    B = len(batch["clip_ids"])
    n, start = batch.get("global_batch_size", B), batch.get("shard_start", 0)
    if mask.shape[0] != n:
        raise ValueError(f"dynamic_sampling: a mask of {mask.shape[0]} clips for a global batch of {n}")
    return mask[:B] if batch.get("ghost") else mask[start:start + B]


def main(argv=None):
    parser = add_update_args(build_parser(__doc__))
    parser.add_argument("--difficulty", choices=("auto", "gap", "loss", "loss_share"), default="auto",
                        help="gap to the single-task score, loss relative to its first value, or the loss itself; "
                             "auto: gap where every single-task reference exists, else loss")
    parser.add_argument("--apply", choices=("weights", "task", "clips"), default="weights",
                        help="how the probabilities act: loss weights T*p (every label kept), one task per step, "
                             "or one task per clip")
    parser.add_argument("--interval", type=int, default=0, help="steps between updates (0 = once per epoch)")
    args = parser.parse_args(argv)

    run = Run(args, strategy="dynamic_sampling")
    interval = args.interval or run.steps_per_epoch
    refs, mode, why = None, args.difficulty, "chosen with --difficulty"
    if args.difficulty in ("auto", "gap"):
        refs, why = (None, "pretraining has no single-task references") if args.stage == "pretrain" else \
            single_task_references(args.out, args.seed, run.tasks, args.metric)
        if args.difficulty == "gap" and refs is None:
            raise SystemExit(f"--difficulty gap: {why}; run strategies/single_task.py first (same --metric "
                             f"{args.metric}), or use --difficulty loss")
        mode, why = ("gap", why) if refs is not None else ("loss", f"fallback: {why}")
    sampler = DifficultySampler(len(run.tasks), args.seed)
    update = make_update(run, args)
    run.start(sampler=sampler, update=update)
    run.say(f"difficulty: {mode} ({why}); probabilities applied as {args.apply}, updated every {interval} steps")
    run.log({"event": "difficulty", "mode": mode, "why": why, "references": refs, "apply": args.apply})

    for batch in run.batches():
        # --apply clips: drawn for the global batch (torchrun: identically on every rank), then this rank's rows
        mask, scale = sampler.draw(args.apply, batch.get("global_batch_size", len(batch["clip_ids"])))
        trained = mask.any(0) if mask.dim() == 2 else mask      # over the global batch: the same on every rank
        losses = update.step(batch, rank_rows(mask, batch) if mask.dim() == 2 else mask, task_scale=scale)
        sampler.record(losses, trained)
        run.log_step(losses, probs=sampler.probs, **update.decisions())
        validated = run.at_eval()
        metrics = run.validate(probs=sampler.probs) if validated else None
        if run.step_count % interval == 0:
            if mode == "gap":  # rank 0's scores on every rank (as run.validate), so the probabilities agree
                metrics = metrics or distributed.broadcast_object(run.evaluate(run.val_set))
                d = gap_difficulty(refs, {t: metrics["per_task"][t]["score"] for t in run.tasks})
            elif mode == "loss":
                d = sampler.loss_difficulty().tolist()
            else:  # loss_share: a task not trained in the interval keeps its last loss (never 0)
                d, carried = sampler.loss_share_difficulty()
                d, carried = d.tolist(), [t for t, c in zip(run.tasks, carried.tolist()) if c]
            bad = [t for t, v in zip(run.tasks, d) if v is None or not math.isfinite(v)]
            if bad:  # an undefined score (e.g. AP without positives): keep the last probabilities, say so
                run.say(f"step {run.step_count}: difficulty not finite for {bad}; probabilities unchanged")
            else:
                sampler.probs = sampling_probabilities(d)
            run.log({"event": "sampling", "step": run.step_count, "mode": mode, "skipped": bad,
                     "difficulty": dict(zip(run.tasks, d)), "probs": dict(zip(run.tasks, sampler.probs.tolist())),
                     **({"carried": carried} if mode == "loss_share" else {})})
        if validated:
            run.eval_checkpoint()

    return run.finish(decisions={"difficulty": mode, "difficulty_source": why, "apply": args.apply,
                                 "final_probs": dict(zip(run.tasks, sampler.probs.tolist()))})


if __name__ == "__main__":
    main()
