"""round_robin: one task per step, in turn.

Step k updates only task k mod T on its batch: the trunk still runs once per step, and only that task's
loss is back-propagated. Each task sees 1/T of the updates of all_at_once, on every batch in turn.

    python strategies/round_robin.py
    python strategies/round_robin.py --weighting uncertainty        # combinations
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

import torch  # noqa: E402

from common.multitask import add_update_args, make_update  # noqa: E402
from common.arguments import build_parser  # noqa: E402
from common.train import Run  # noqa: E402


def task_of_step(step, num_tasks):
    """The rule: a one-hot mask of the task trained on this step."""
    mask = torch.zeros(num_tasks, dtype=torch.bool)
    mask[step % num_tasks] = True
    return mask


def main(argv=None):
    parser = add_update_args(build_parser(__doc__))
    args = parser.parse_args(argv)

    run = Run(args, strategy="round_robin")
    update = make_update(run, args)
    run.start(update=update)

    for batch in run.batches():
        active = task_of_step(run.step_count, len(run.tasks))
        losses = update.step(batch, active)
        run.log_step(losses, task=run.tasks[int(active.nonzero())], **update.decisions())
        if run.at_eval():
            run.validate()
            run.eval_checkpoint()

    return run.finish(decisions={"updates_per_task": run.step_count / len(run.tasks)})


if __name__ == "__main__":
    main()
