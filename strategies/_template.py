"""_template: the script to copy for a new strategy (cp strategies/_template.py strategies/my_rule.py).

The whole loop of a strategy, written out: every task on every batch, updated by any loss weighting
(--weighting) and any gradient aggregator (--aggregator, in --grad-space params or representation; see
`--help`). A rule of your own goes where the comments say: which tasks train on this step (task_mask),
how much each counts (task_scale), what to do at a validation. Its own flags come first in --help.
The copy names itself after its file (results/my_rule/seed0/) and becomes a row of `make compare`;
make compare leaves this file out (names starting with "_").

    python strategies/_template.py
    python strategies/_template.py --weighting uncertainty --aggregator pcgrad
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.arguments import build_parser  # noqa: E402
from common.multitask import add_update_args, make_update  # noqa: E402
from common.train import Run  # noqa: E402


def main(argv=None):
    parser = add_update_args(build_parser(__doc__))
    # your rule's own flags, e.g.: parser.add_argument("--my-threshold", type=float, default=0.5)
    args = parser.parse_args(argv)
    run = Run(args, strategy=Path(__file__).stem)   # results/<this file's name>/seed<seed>/
    update = make_update(run, args)                 # --weighting x --aggregator x --grad-space
    run.start(update=update)                        # its state is checkpointed; --resume continues here

    for batch in run.batches():
        task_mask = None   # your rule: bool [T] of the tasks that train on this step (None: all of them)
        losses = update.step(batch, task_mask=task_mask)   # the per-task losses of this batch [T]
        run.log_step(losses, **update.decisions())          # what the rule decided, in metrics.jsonl
        if run.at_eval():
            run.validate(weights=update.weighting.weights())   # validation metrics, best model, LR schedule
            run.eval_checkpoint()
    return run.finish(decisions=update.summary())          # test metrics of the best model, summary.json


if __name__ == "__main__":
    main()
