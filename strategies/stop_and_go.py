"""stop_and_go: Dynamic Stop-and-Go (Lu et al., CVPR 2020, "12-in-1: Multi-Task Vision and Language
Representation Learning"), following facebookresearch/vilbert-multi-task (vilbert/utils.py
MultiTaskStopOnPlateau, driven by train_tasks.py).

Every task is in go or stop. After each validation of a task (once per epoch, as 12-in-1 does):
  - a task whose validation score did not beat its best so far by more than --improve (0.1%, relative)
    in --patience (2) evaluations goes to STOP;
  - otherwise, a stopped task whose score falls more than --restart (0.5%) below its best goes back to GO;
  - after a stop or a restart the next evaluation does not count (--cooldown 1), so a restarted task
    needs three non-improving evaluations to stop again; a stopped task that improves stays stopped.
A go task is trained on every step; a stopped task only on every --stop-gap-th step (4), so it keeps its
level without taking the shared trunk's capacity. At every learning-rate drop (ReduceLROnPlateau on the
mean validation score) all tasks go back to GO and their best scores are forgotten, as 12-in-1 resets
its controllers at its LR drops; --reset-at adds resets at fixed epochs. The exact rule, and how it was
checked against the reference, is in common/schedulers.py (StopAndGo) and tests/test_stop_and_go.py.

Intended differences from 12-in-1: there each task had its own dataset, its own forward and optimizer
step and its own epoch length; here every clip carries all five labels, so one forward of the trunk
serves all active tasks on a step (no T-fold cost) and one epoch is every task's epoch. The rule judges
the tasks at every validation. This script validates 4 times per epoch by default (--evals-per-epoch 4), so
that the main job shows its first transitions within minutes (a task can stop at the 3rd validation,
about 3/4 of an epoch in) instead of in its 3rd epoch; --evals-per-epoch 1 is 12-in-1's cadence (once per
epoch), and --eval-every N judges every N steps. For a negative score (minus a loss when
pretraining) the thresholds are relative to |best| (the reference's best * 1.001 would lie below it).

    python strategies/stop_and_go.py                          # default data, prints the go/stop timeline
    python strategies/stop_and_go.py --weighting uncertainty  # combined with a loss weighting
    python strategies/stop_and_go.py --aggregator pcgrad      # or with a gradient aggregation
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change
# make compare --grid full tunes this flag with the learning rate (the default value first)
TUNE_GRID = ("--improve", ["0.001", "0.01"])

from tabulate import tabulate  # noqa: E402

from common.multitask import add_update_args, make_update  # noqa: E402
from common.schedulers import StopAndGo  # noqa: E402
from common.arguments import build_parser  # noqa: E402
from common.train import Run  # noqa: E402


def main(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument("--improve", type=float, default=0.001, help="relative gain over the best that improves")
    parser.add_argument("--restart", type=float, default=0.005, help="relative drop below the best that restarts")
    parser.add_argument("--patience", type=int, default=2, help="non-improving evaluations that stop a task")
    parser.add_argument("--cooldown", type=int, default=1, help="evaluations ignored after a stop or a restart")
    parser.add_argument("--stop-gap", type=int, default=4, help="a stopped task is trained every N steps")
    parser.add_argument("--reset-at", default="", help="epochs at which every task also goes back to go, e.g. 10,20")
    parser.add_argument("--no-lr-reset", dest="lr_reset", action="store_false",
                        help="do not reset the controller when the learning rate drops")
    add_update_args(parser)
    # the main job: 6 epochs judged 4 times each (12-in-1's once per epoch: --evals-per-epoch 1)
    parser.set_defaults(epochs=6, evals_per_epoch=4)
    args = parser.parse_args(argv)
    reset_epochs = {int(e) for e in args.reset_at.split(",") if e}

    run = Run(args, strategy="stop_and_go")
    rule = StopAndGo(run.tasks, args.improve, args.restart, args.patience, args.stop_gap, args.cooldown)
    update = make_update(run, args)
    run.start(rule=rule, update=update)

    for batch in run.batches():
        if run.epoch in reset_epochs and run.batch_in_epoch == 1:
            reset(run, rule, "reset-at epoch")
        active = rule.active(run.step_count)          # stopped tasks only every stop-gap-th step
        losses = update.step(batch, active)
        run.log_step(losses, states=rule.states(), **update.decisions())
        if run.at_eval():
            metrics = run.validate(states=rule.states())
            for task, state in rule.observe({t: metrics["per_task"][t]["score"] for t in run.tasks}):
                run.say(f"step {run.step_count}: {task} -> {state.upper()}")
                run.log({"event": "transition", "step": run.step_count, "task": task, "state": state})
            if rule.skipped:
                run.say(f"step {run.step_count}: non-finite validation score, not judged: {rule.skipped}")
            if args.lr_reset and run.lr_dropped:
                reset(run, rule, "learning-rate drop")
            run.log({"event": "states", "step": run.step_count, "states": rule.states()})
            run.eval_checkpoint()

    timeline = print_timeline(run.dir / "metrics.jsonl", run.tasks)
    stopped_fraction = {t: sum(row[t] == "stop" for row in timeline) / max(len(timeline), 1) for t in run.tasks}
    return run.finish(decisions={"stopped_fraction_of_evals": stopped_fraction, "final_states": rule.states()})


def reset(run, rule, why):
    """12-in-1's reset: every task back to go, best scores forgotten."""
    stopped = [t for t, s in rule.states().items() if s == "stop"]
    rule.reset()
    run.say(f"step {run.step_count}: reset ({why}): every task back to GO" + (f" (was STOP: {stopped})" * bool(stopped)))
    run.log({"event": "reset", "step": run.step_count, "why": why, "was_stopped": stopped})


def print_timeline(metrics_path, tasks):
    """The go/stop state of every task after each validation, read back from metrics.jsonl."""
    records = [json.loads(line) for line in open(metrics_path)]
    scores = {r["step"]: r["per_task"] for r in records if r["event"] == "val"}
    resets = {r["step"] for r in records if r["event"] == "reset"}
    timeline = [{"step": r["step"], **r["states"]} for r in records if r["event"] == "states"]
    rows = [[row["step"]] + [f"{'STOP' if row[t] == 'stop' else 'go  '} {fmt(scores[row['step']][t]['score'])}"
                             for t in tasks] + ["reset" if row["step"] in resets else ""] for row in timeline]
    print("\ngo/stop timeline (state after each validation, and the task's validation score)")
    print(tabulate(rows, headers=["step"] + list(tasks) + [""]))
    return timeline


def fmt(score):
    return f"{score:.3f}" if isinstance(score, (int, float)) else str(score)


if __name__ == "__main__":
    main()
