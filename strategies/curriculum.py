"""curriculum: introduce the tasks one by one, easiest first (or hardest first), then train all together
with Dynamic Stop-and-Go, as in 12-in-1 (Lu et al., CVPR 2020).

1. Difficulty. --difficulty probe (default): a short probe trains a copy of the model on all tasks for
   --probe-steps steps and measures each task's validation score; difficulty = 1 - score. The probe's
   optimizer steps count against the run's step budget (issue 25): the main training gets all_at_once's
   budget minus them (at least 1 step), and the summary's budget_steps and steps include them, with
   extra_steps {"probe": n}.
   --difficulty single_task: 1 - the single-task model's validation score (results/single_task/seed<seed>).
2. Order. --order easy: easiest first (curriculum); --order hard: hardest first (anti-curriculum).
3. Schedule. The k-th task of the order enters at step k * --entry-every (default: all tasks are in by
   half of the budget). Entered tasks train under stop-and-go (common/schedulers.py, the 12-in-1 rule),
   which judges a task only once it has entered: every --eval-every steps (40 here, finer than
   stop_and_go.py's once per epoch, so that it acts within a short budget); all tasks back to go at every
   learning-rate drop.

12-in-1 reports that no curriculum did as well or better; this script is the experiment, not a claim.

    python strategies/curriculum.py --order easy
    python strategies/curriculum.py --order hard --weighting uncertainty
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import distributed  # noqa: E402
from common.multitask import add_update_args, make_update  # noqa: E402
from common.schedulers import StopAndGo  # noqa: E402
from common.arguments import build_parser  # noqa: E402
from common.data import epoch_batches  # noqa: E402
from common.summaries import single_task_references  # noqa: E402
from common.train import Run  # noqa: E402

# the version of this strategy's rule, stored in run records: bumped when what the rule decides changes
RULE_VERSION = 1


def curriculum_order(difficulty, order="easy"):
    """Tasks sorted by difficulty: ascending for "easy" (curriculum), descending for "hard"."""
    return sorted(difficulty, key=lambda t: difficulty[t], reverse=(order == "hard"))


def entered(step, tasks, planned_order, entry_every):
    """Bool [T] over `tasks`: which tasks have entered by this step."""
    return torch.tensor([step >= planned_order.index(t) * entry_every for t in tasks])


def probe_plan(run, steps):
    """The probe's batches: the first `steps` of an epoch of its own (fewer when an epoch is shorter); one
    optimizer step each."""
    return epoch_batches(len(run.train_set), run.args.batch_size, run.args.seed, epoch=-1)[:steps]


def probe_difficulty(run, steps, lr):
    """Train a copy of the model on all tasks for a few steps; difficulty = 1 - its validation score."""
    model, optimizer = run.probe_copy(lr)
    for batch in run.loader(probe_plan(run, steps), run.train_set):
        losses = run.task_losses(batch, model=model)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
    scores = run.evaluate(run.val_set, model=model)["per_task"]
    return {t: 1.0 - scores[t]["score"] for t in run.tasks}


class Plan:
    """The measured difficulties, the resulting order and the probe's optimizer steps: computed once,
    checkpointed."""

    def __init__(self):
        self.difficulty, self.order, self.probe_steps = None, None, 0

    def state_dict(self):
        return {"difficulty": self.difficulty, "order": self.order, "probe_steps": self.probe_steps}

    def load_state_dict(self, state):
        self.difficulty, self.order = state["difficulty"], state["order"]
        self.probe_steps = state.get("probe_steps", 0)  # absent before RULE_VERSION 1 (probe not counted)


def main(argv=None):
    parser = add_update_args(build_parser(__doc__))
    parser.add_argument("--order", choices=("easy", "hard"), default="easy",
                        help="easy: easiest task first (curriculum); hard: hardest first (anti-curriculum)")
    parser.add_argument("--difficulty", choices=("probe", "single_task"), default="probe",
                        help="1 - validation score of a short probe run on all tasks, or of the single-task models")
    parser.add_argument("--probe-steps", type=int, default=60, help="the probe's steps (they count against the budget)")
    parser.add_argument("--entry-every", type=int, default=0, help="steps between task entries (0 = auto)")
    parser.add_argument("--stop-gap", type=int, default=4, help="stop-and-go: a stopped task is trained every N steps")
    parser.set_defaults(eval_every=40)
    args = parser.parse_args(argv)

    run = Run(args, strategy=f"curriculum_{args.order}")
    budget = run.total_steps  # all_at_once's: the probe's steps and the main training's together
    entry_every = args.entry_every or max(budget // (2 * len(run.tasks)), 1)
    plan, rule = Plan(), StopAndGo(run.tasks, stop_gap=args.stop_gap)
    update = make_update(run, args)
    run.start(plan=plan, rule=rule, update=update)

    if plan.order is None:  # not resumed: measure, then fix the order for the whole run
        if args.difficulty == "single_task":
            refs, why = single_task_references(args.out, args.seed, run.tasks, args.metric)
            if refs is None:
                raise SystemExit(f"--difficulty single_task: {why}; run strategies/single_task.py first "
                                 f"(same --seed, --out and --metric)")
            plan.difficulty = {t: 1.0 - refs[t] for t in run.tasks}
        else:
            plan.difficulty = probe_difficulty(run, args.probe_steps, args.lr)
            plan.probe_steps = len(probe_plan(run, args.probe_steps))
        plan.order = curriculum_order(plan.difficulty, args.order)
        run.log({"event": "curriculum", "difficulty": plan.difficulty, "order": plan.order,
                 "entry_steps": {t: plan.order.index(t) * entry_every for t in run.tasks},
                 "probe_steps": plan.probe_steps})
    print(f"[curriculum] order ({args.order} first): {' -> '.join(plan.order)}, one task every {entry_every} steps")
    # issue 25: the probe's steps count against the budget; the main training gets the rest (at least 1)
    main_steps = max(budget - plan.probe_steps, 1)
    run.set_total_steps(main_steps)
    if plan.probe_steps + main_steps > budget:
        print(f"[curriculum] over budget: {plan.probe_steps} probe steps + 1 training step for a budget of {budget}")

    for batch in run.batches():
        step = run.step_count
        is_in = entered(step, run.tasks, plan.order, entry_every)
        active = is_in & rule.active(step)
        losses = update.step(batch, active)
        run.log_step(losses, entered=is_in, states=rule.states(), **update.decisions())
        if run.at_eval():
            run.set_hold_early_stop(not bool(is_in.all()))  # early stopping waits for the last entry
            metrics = run.validate(entered=is_in, states=rule.states())
            scores = {t: metrics["per_task"][t]["score"] for t, on in zip(run.tasks, is_in) if on}
            for task, state in rule.observe(scores):
                run.log({"event": "transition", "step": run.step_count, "task": task, "state": state})
            if run.lr_dropped:  # as in 12-in-1 (strategies/stop_and_go.py): every task back to go
                rule.reset()
                run.log({"event": "reset", "step": run.step_count, "why": "learning-rate drop"})
            run.eval_checkpoint()

    summary = run.finish(decisions={"order": plan.order, "difficulty": plan.difficulty, "entry_every": entry_every,
                                    "final_states": rule.states()})
    # every optimizer update counts (issue 25): the probe's steps on its copy of the model, then the main run's
    summary.update(budget_steps=summary["budget_steps"] + plan.probe_steps, steps=summary["steps"] + plan.probe_steps,
                   extra_steps={"probe": plan.probe_steps})
    if distributed.is_main():
        run.write_summary(summary)
    return summary


if __name__ == "__main__":
    main()
