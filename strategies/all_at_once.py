"""all_at_once: train every task on every batch with the sum of the task losses.

    L = sum_t w_t L_t
    --weights equal    w_t = 1
    --weights learned  w = T * softmax(a), a learned with the model (weights stay positive and sum to T)

The trunk runs once per batch; each head gets its own cross-entropy. This is the baseline every other
strategy is compared with in `make compare`.

    python strategies/all_at_once.py                      # default synthetic data, small model
    python strategies/all_at_once.py --weights learned --epochs 8
    python strategies/all_at_once.py --resume             # continue an interrupted run
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change
COMPARE_ROLE = "baseline"  # make compare: every row is tested against this one

from common.arguments import build_parser  # noqa: E402
from common.train import Run  # noqa: E402
from common.weighting import Equal, Learned  # noqa: E402


def main(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument("--weights", choices=("equal", "learned"), default="equal",
                        help="equal: w_t = 1; learned: w = T * softmax(a), a trained with the model")
    parser.add_argument("--weights-lr", type=float, default=None, help="learning rate of learned weights (default --lr)")
    args = parser.parse_args(argv)

    run = Run(args, strategy="all_at_once" if args.weights == "equal" else "all_at_once_learned")
    T = len(run.tasks)
    weighting = Equal(T) if args.weights == "equal" else Learned(T)
    run.add_parameters(weighting.to(run.device).parameters(), lr=args.weights_lr)
    run.start(weighting=weighting)

    for batch in run.batches():
        losses = run.task_losses(batch)          # [T], one trunk pass
        loss = weighting(losses)                 # the whole strategy is this line
        run.step(loss, losses, batch)
        run.log_step(losses, weights=weighting.weights())
        if run.at_eval():
            run.validate(weights=weighting.weights())
            run.eval_checkpoint()

    final = dict(zip(run.tasks, weighting.weights().tolist()))
    return run.finish(decisions={"final_weights": final})


if __name__ == "__main__":
    main()
