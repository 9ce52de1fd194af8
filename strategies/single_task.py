"""single_task: one model per task, same trunk, same budget (epochs, batch size, learning rate).

Each task gets its own HCA model with one head, trained on that task's loss alone. The per-task runs
are written to results/single_task/seed<seed>/<task>/, and their test and validation metrics are
gathered in results/single_task/seed<seed>/summary.json: the single-task references of the multi-task
gain Delta_m in `make compare`, and the difficulty references of dynamic_sampling and curriculum.

    python strategies/single_task.py                 # all five tasks in turn
    python strategies/single_task.py --task gory
    python strategies/single_task.py --resume        # finished tasks are kept, the interrupted one resumes
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change
# make compare: the reference row (Delta_m is measured against it; it runs first, as dynamic_sampling and
# curriculum read its validation metrics)
COMPARE_ROLE = "reference"

from common.data import TASKS  # noqa: E402
from common.arguments import build_parser, parse_tasks  # noqa: E402
from common.evaluate import format_metrics  # noqa: E402
from common.files import write_json  # noqa: E402
from common.summaries import merge_summaries, train_sum_of_losses  # noqa: E402
from common.train import Run  # noqa: E402


def main(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument("--task", default=None, help="train only this task (default: every task of --tasks)")
    args = parser.parse_args(argv)
    tasks = parse_tasks(args.task or args.tasks)
    root = Path(args.out) / "single_task" / f"seed{args.seed}"

    summaries = {}
    for task in tasks:
        done = root / task / "summary.json"
        if args.resume and done.exists():
            print(f"[single_task] {task}: finished earlier, kept ({done})")
            summaries[task] = json.loads(done.read_text())
        else:
            # one model with one head, trained on that task's loss alone
            run = Run(args, strategy="single_task", tasks=[task], run_name=f"seed{args.seed}/{task}")
            summaries[task] = train_sum_of_losses(run)

    # the combined summary: every task trained so far for this seed (a --task run adds its task)
    for task_dir in sorted(p for p in root.iterdir() if (p / "summary.json").exists()):
        summaries.setdefault(task_dir.name, json.loads((task_dir / "summary.json").read_text()))
    all_tasks = [t for t in TASKS if t in summaries]
    summary = merge_summaries(summaries, all_tasks, "single_task")
    write_json(root / "summary.json", summary)
    print(format_metrics(summary["test"], all_tasks, title="single_task: test metrics, one model per task"))
    print(f"summary: {root / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
