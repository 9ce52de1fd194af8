"""uncertainty: homoscedastic uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018, "Multi-Task
Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics").

    L = sum_t exp(-s_t) L_t + s_t        s_t = log sigma_t^2, learned with the model

dL/ds_t = 1 - exp(-s_t) L_t, so s_t settles near log L_t: a task with a high, noisy loss gets a small
weight exp(-s_t), and the + s_t term stops every weight from shrinking to zero. The rule itself is
common/weighting.py:UncertaintyWeights (shared with the schedulers' --weighting uncertainty).

    python strategies/uncertainty.py
    python strategies/uncertainty.py --aggregator pcgrad      # uncertainty weights + PCGrad
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.multitask import MultiTaskUpdate, add_update_args  # noqa: E402
from common.train import Run, build_parser  # noqa: E402


def main(argv=None):
    parser = add_update_args(build_parser(__doc__), weighting="uncertainty")
    args = parser.parse_args(argv)

    run = Run(args, strategy="uncertainty")
    update = MultiTaskUpdate(run, args.weighting, args.aggregator, args.grad_space, args)
    run.start(update=update)

    for batch in run.batches():
        losses = update.step(batch)                      # all tasks, weighted by exp(-s_t)
        run.log_step(losses, log_vars=update.weighting.log_vars, **update.decisions())
        if run.at_eval():
            run.validate(weights=update.weighting.weights())
            run.save_checkpoint()

    final = dict(zip(run.tasks, update.weighting.weights().tolist()))
    return run.finish(decisions={"final_weights": final})


if __name__ == "__main__":
    main()
