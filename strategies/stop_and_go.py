"""stop_and_go: Dynamic Stop-and-Go (Lu et al., CVPR 2020, "12-in-1: Multi-Task Vision and Language
Representation Learning"; rule details from facebookresearch/vilbert-multi-task, train_tasks.py).

Every task is in go or stop. After each validation:
  - a task whose validation score did not beat its best by more than --improve (0.1%, relative) for
    --patience (2) evaluations in a row goes to STOP;
  - a stopped task whose score falls more than --restart (0.5%) below its best goes back to GO.
A go task is trained on every step; a stopped task only on every --stop-gap-th step (4), so it keeps
its level without using the shared trunk's capacity.

One difference from 12-in-1, on purpose: there each task had its own dataset and its own forward and
optimizer step; here every clip carries all five labels, so one forward of the trunk serves all active
tasks on a step (no T-fold cost).

    python strategies/stop_and_go.py                          # default data, prints the go/stop timeline
    python strategies/stop_and_go.py --weighting uncertainty  # combined with a loss weighting
    python strategies/stop_and_go.py --aggregator pcgrad      # or with a gradient aggregation
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from common.multitask import MultiTaskUpdate, add_update_args  # noqa: E402
from common.schedulers import StopAndGo  # noqa: E402
from common.train import Run, build_parser  # noqa: E402


def main(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument("--improve", type=float, default=0.001, help="relative gain that counts as improving")
    parser.add_argument("--restart", type=float, default=0.005, help="relative drop below best that restarts a task")
    parser.add_argument("--patience", type=int, default=2, help="non-improving evaluations before stop")
    parser.add_argument("--stop-gap", type=int, default=4, help="a stopped task is trained every N steps")
    parser.add_argument("--metric", default="score", choices=("score", "f1_macro", "f1_pos", "accuracy", "ap"),
                        help="per-task validation metric (score = macro F1, or -loss when pretraining)")
    parser.add_argument("--reset-at", default="", help="epochs at which every task goes back to go, e.g. 10,20 (off)")
    add_update_args(parser)
    parser.set_defaults(eval_every=40)  # stop-and-go needs several evaluations per epoch to act
    args = parser.parse_args(argv)
    reset_epochs = {int(e) for e in args.reset_at.split(",") if e}

    run = Run(args, strategy="stop_and_go")
    rule = StopAndGo(run.tasks, args.improve, args.restart, args.patience, args.stop_gap)
    update = MultiTaskUpdate(run, args.weighting, args.aggregator, args.grad_space, args)
    run.start(rule=rule, update=update)

    for batch in run.batches():
        if run.epoch in reset_epochs and run.progress["batch_in_epoch"] == 1:
            rule.reset()                              # 12-in-1's schedule: all tasks back to go
            run.log({"event": "reset", "step": run.step_count})
        active = rule.active(run.step_count)          # stopped tasks only every stop-gap-th step
        losses = update.step(batch, active)
        run.log_step(losses, states=rule.states(), **update.decisions())
        if run.at_eval():
            metrics = run.validate(states=rule.states())
            for task, state in rule.observe({t: metrics["per_task"][t][args.metric] for t in run.tasks}):
                run.say(f"step {run.step_count}: {task} -> {state.upper()}")
                run.log({"event": "transition", "step": run.step_count, "task": task, "state": state})
            run.log({"event": "states", "step": run.step_count, "states": rule.states()})
            run.save_checkpoint()

    timeline = print_timeline(run.dir / "metrics.jsonl", run.tasks, args.metric)
    stopped_fraction = {t: sum(row[t] == "stop" for row in timeline) / max(len(timeline), 1) for t in run.tasks}
    return run.finish(decisions={"stopped_fraction_of_evals": stopped_fraction, "final_states": rule.states()})


def print_timeline(metrics_path, tasks, metric):
    """The go/stop state of every task after each validation, read back from metrics.jsonl."""
    records = [json.loads(line) for line in open(metrics_path)]
    scores = {r["step"]: r["per_task"] for r in records if r["event"] == "val"}
    timeline = [{"step": r["step"], **r["states"]} for r in records if r["event"] == "states"]
    rows = [[row["step"]] + [f"{'STOP' if row[t] == 'stop' else 'go  '} {scores[row['step']][t][metric]:.3f}"
                             for t in tasks] for row in timeline]
    print(f"\ngo/stop timeline (state after each validation, val {metric})")
    print(tabulate(rows, headers=["step"] + list(tasks)))
    return timeline


if __name__ == "__main__":
    main()
