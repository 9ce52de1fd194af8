"""dynamic_sampling: dynamic difficulty sampling (Gottumukkala, Dua, Singh, Gardner, ACL 2020, "Dynamic
Sampling Strategies for Multi-Task Reading Comprehension").

Every --interval steps (default: once per epoch) the task sampling probabilities become

    p_t  proportional to  exp(d_t / tau)

with d_t the task's current difficulty:
  --difficulty gap   the relative gap between its single-task validation score and its current
                     multi-task validation score, (S_t - M_t) / S_t  (needs results/single_task/seed<seed>)
  --difficulty loss  its training loss relative to its initial loss, L_t / L_t(0)
  --difficulty auto  gap where the single-task references exist, loss otherwise (the log says which)
Batches are composed per these ratios: every clip of a batch is assigned one task drawn from p, and each
task's loss is taken over its own clips (--compose batch); or one task is drawn per step (--compose task).

    python strategies/dynamic_sampling.py
    python strategies/dynamic_sampling.py --difficulty loss --tau 0.1 --weighting uncertainty
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.multitask import MultiTaskUpdate, add_update_args  # noqa: E402
from common.train import Run, build_parser  # noqa: E402


def sampling_probabilities(difficulty, tau):
    """p_t = softmax(d_t / tau): harder tasks are drawn more often."""
    return torch.softmax(torch.as_tensor(difficulty, dtype=torch.float64) / tau, dim=0)


def compose_batch(probs, batch_size, generator):
    """Assign each clip of the batch one task drawn from probs: a bool mask [B, T]."""
    tasks = torch.multinomial(probs.float(), batch_size, replacement=True, generator=generator)
    return torch.nn.functional.one_hot(tasks, len(probs)).bool()


class DifficultySampler:
    """Keeps the probabilities and what they are computed from; checkpointed with the run."""

    def __init__(self, num_tasks, tau, seed):
        self.T, self.tau = num_tasks, tau
        self.probs = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)
        self.initial_loss = torch.full((num_tasks,), float("nan"), dtype=torch.float64)
        self.loss_sum = torch.zeros(num_tasks, dtype=torch.float64)
        self.loss_count = torch.zeros(num_tasks, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed + 104729)

    def record(self, losses, active):
        """Accumulate the training losses of the tasks that were trained on this step."""
        active = active.cpu()
        self.loss_sum[active] += losses.detach().double().cpu()[active]
        self.loss_count[active] += 1

    def loss_difficulty(self):
        """L_t / L_t(0) over the last interval; the first interval's mean defines L_t(0)."""
        mean = self.loss_sum / self.loss_count.clamp(min=1)
        seen = self.loss_count > 0
        first = seen & torch.isnan(self.initial_loss)
        self.initial_loss[first] = mean[first]
        ratio = torch.where(seen, mean / self.initial_loss, torch.ones_like(mean))  # unseen: neutral
        self.loss_sum.zero_()
        self.loss_count.zero_()
        return torch.nan_to_num(ratio, nan=1.0)

    def update(self, difficulty):
        self.probs = sampling_probabilities(difficulty, self.tau)
        return self.probs

    def state_dict(self):
        return {k: getattr(self, k) for k in ("probs", "initial_loss", "loss_sum", "loss_count")} | {
            "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        for k in ("probs", "initial_loss", "loss_sum", "loss_count"):
            setattr(self, k, state[k].clone())
        self.generator.set_state(state["generator"])


def single_task_references(out, seed, tasks, metric):
    """{task: single-task val score} from results/single_task/seed<seed>/summary.json, or None."""
    path = Path(out) / "single_task" / f"seed{seed}" / "summary.json"
    if not path.exists():
        return None
    per_task = json.loads(path.read_text())["val"]["per_task"]
    return {t: per_task[t][metric] for t in tasks} if all(t in per_task for t in tasks) else None


def main(argv=None):
    parser = add_update_args(build_parser(__doc__))
    parser.add_argument("--difficulty", choices=("auto", "gap", "loss"), default="auto")
    parser.add_argument("--tau", type=float, default=0.2, help="temperature of p = softmax(d / tau)")
    parser.add_argument("--interval", type=int, default=0, help="steps between updates (0 = once per epoch)")
    parser.add_argument("--compose", choices=("batch", "task"), default="batch")
    parser.add_argument("--metric", default="f1_macro", help="validation metric of the gap difficulty")
    args = parser.parse_args(argv)

    run = Run(args, strategy="dynamic_sampling")
    interval = args.interval or run.steps_per_epoch
    refs = single_task_references(args.out, args.seed, run.tasks, args.metric)
    if args.difficulty == "gap" and refs is None:
        raise SystemExit("--difficulty gap needs results/single_task/seed<seed>/summary.json: "
                         "run strategies/single_task.py first, or use --difficulty loss")
    mode = "gap" if args.difficulty == "gap" or (args.difficulty == "auto" and refs) else "loss"
    sampler = DifficultySampler(len(run.tasks), args.tau, args.seed)
    update = MultiTaskUpdate(run, args.weighting, args.aggregator, args.grad_space, args)
    run.start(sampler=sampler, update=update)
    run.log({"event": "difficulty", "mode": mode, "references": refs})

    for batch in run.batches():
        if args.compose == "batch":
            mask = compose_batch(sampler.probs, len(batch["clip_ids"]), sampler.generator)
        else:
            task = torch.multinomial(sampler.probs.float(), 1, generator=sampler.generator)
            mask = torch.nn.functional.one_hot(task[0], len(run.tasks)).bool()
        losses = update.step(batch, mask)
        active = mask.any(0) if mask.dim() == 2 else mask
        sampler.record(losses, active)
        if run.step_count % interval == 0:
            if mode == "gap":
                scores = run.evaluate(run.val_set)["per_task"]
                d = [(refs[t] - scores[t][args.metric]) / max(refs[t], 1e-8) for t in run.tasks]
            else:
                d = sampler.loss_difficulty().tolist()
            sampler.update(d)
            run.log({"event": "sampling", "step": run.step_count, "mode": mode,
                     "difficulty": dict(zip(run.tasks, d)), "probs": dict(zip(run.tasks, sampler.probs.tolist()))})
        run.log_step(losses, probs=sampler.probs, **update.decisions())
        if run.at_eval():
            run.validate(probs=sampler.probs)
            run.save_checkpoint()

    return run.finish(decisions={"difficulty": mode, "final_probs": dict(zip(run.tasks, sampler.probs.tolist()))})


if __name__ == "__main__":
    main()
