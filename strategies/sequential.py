"""sequential: one task at a time on the multi-task model, in a given order.

The model trains on the first task until its validation score stops improving (early stopping with
--patience evaluations, at most --max-task-epochs epochs), then on the next task, and so on. After each
task's phase every task is evaluated, which shows how much the earlier tasks are forgotten:

    forgetting_t = (score of t when its own phase ended) - (score of t at the end of training)

A positive value means the later tasks overwrote what the trunk had learned for t.

    python strategies/sequential.py
    python strategies/sequential.py --order gory,sarcasm,slapstick,mature,binary
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from common.multitask import add_update_args, make_update  # noqa: E402
from common.arguments import build_parser, parse_tasks  # noqa: E402
from common.train import Run  # noqa: E402


def forgetting(after_phase, order):
    """after_phase: {task whose phase ended: {task: score}} in phase order. Returns {task: drop} for
    every task but the last: its score when its own phase ended minus its final score."""
    final = after_phase[order[-1]]
    return {t: after_phase[t][t] - final[t] for t in order[:-1]}


class Phases:
    """Which task is being trained, and its early-stopping state; checkpointed with the run."""

    def __init__(self, order, patience, max_steps):
        self.order, self.patience, self.max_steps = order, patience, max_steps
        self.index, self.best, self.bad, self.start_step = 0, -1.0, 0, 0
        self.after_phase = {}  # task -> {task: val score} when that task's phase ended

    @property
    def task(self):
        return self.order[self.index] if self.index < len(self.order) else None

    def observe(self, score, step):
        """Early stopping on the current task's score; True when its phase ends."""
        if score > self.best:
            self.best, self.bad = score, 0
        else:
            self.bad += 1
        return self.bad >= self.patience or step - self.start_step >= self.max_steps

    def next(self, scores, step):
        self.after_phase[self.task] = scores
        self.index += 1
        self.best, self.bad, self.start_step = -1.0, 0, step

    def state_dict(self):
        return {k: getattr(self, k) for k in ("index", "best", "bad", "start_step", "after_phase")}

    def load_state_dict(self, state):
        for k, v in state.items():
            setattr(self, k, v)


def main(argv=None):
    parser = add_update_args(build_parser(__doc__))
    parser.add_argument("--order", default=None, help="task order (default: --tasks order)")
    parser.add_argument("--patience", type=int, default=2, help="evaluations without improvement that end a phase")
    parser.add_argument("--max-task-epochs", type=float, default=0, help="cap per phase (default: epochs / T)")
    parser.set_defaults(eval_every=40)
    args = parser.parse_args(argv)

    run = Run(args, strategy="sequential")
    order = parse_tasks(args.order) if args.order else list(run.tasks)
    if sorted(order) != sorted(run.tasks):
        raise SystemExit(f"--order {order} must list the tasks {run.tasks}")
    cap = int((args.max_task_epochs or args.epochs / len(order)) * run.steps_per_epoch)
    phases = Phases(order, args.patience, cap)
    update = make_update(run, args)
    run.start(phases=phases, update=update)

    for batch in run.batches():
        if phases.task is None:
            break                                                   # every phase is done
        active = torch.tensor([t == phases.task for t in run.tasks])
        losses = update.step(batch, active)
        run.log_step(losses, task=phases.task)
        if run.at_eval():
            run.set_hold_early_stop(phases.task != order[-1])  # early stopping waits for the last phase
            metrics = run.validate(task=phases.task)
            scores = {t: metrics["per_task"][t]["score"] for t in run.tasks}
            if phases.observe(scores[phases.task], run.step_count):
                run.say(f"step {run.step_count}: {phases.task} done (val score {scores[phases.task]:.3f})")
                run.log({"event": "phase_end", "step": run.step_count, "task": phases.task, "scores": scores})
                phases.next(scores, run.step_count)
            run.eval_checkpoint()

    while phases.task is not None:  # the step budget ran out first: close the open phases as they are
        scores = {t: m["score"] for t, m in run.evaluate(run.val_set)["per_task"].items()}
        phases.next(scores, run.step_count)
    drops = forgetting(phases.after_phase, order)
    rows = [[t] + [phases.after_phase[p][t] for p in order] + [drops.get(t, 0.0)] for t in order]
    print("\nval score after each phase (columns) and forgetting (own phase end - final)")
    print(tabulate(rows, headers=["task"] + [f"after {p}" for p in order] + ["forgetting"], floatfmt=".3f"))
    return run.finish(decisions={"order": order, "forgetting": drops, "after_phase": phases.after_phase})


if __name__ == "__main__":
    main()
