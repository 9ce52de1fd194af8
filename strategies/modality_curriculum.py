"""modality_curriculum: one modality at a time, then all together; or random modality dropout.

--mode curriculum (default): the model trains with one modality branch active at a time, in --order
(text, video, audio), each for an equal share of the first --single-fraction of the budget (default
half), then with all modalities together. A switched-off modality is masked out of attention and
pooling exactly as a clip that lacks it (HCAModel's active_modalities): it is never fed as zeros,
which would still pass through the LayerNorms.
--mode dropout: on every batch each modality is dropped with probability --drop-prob (never all).

The parameters are the same in every phase, so pretrained or original checkpoints load into it
unchanged (--init). At the end the best model is evaluated with each modality alone and with all: the
unimodal ablation table.

    python strategies/modality_curriculum.py --order text,video,audio
    python strategies/modality_curriculum.py --mode dropout --drop-prob 0.3
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from common.data import MODALITIES  # noqa: E402
from common.multitask import add_update_args, make_update  # noqa: E402
from common.arguments import build_parser  # noqa: E402
from common.train import Run  # noqa: E402


def curriculum_modalities(step, order, phase_steps):
    """The modalities active on this step: order[k] alone during phase k, then all (None)."""
    k = step // phase_steps
    return (order[k],) if k < len(order) else None


def dropout_modalities(probability, generator):
    """Each modality kept with probability 1 - p, at least one kept."""
    while True:
        keep = torch.rand(len(MODALITIES), generator=generator) >= probability
        if keep.any():
            return None if keep.all() else tuple(m for m, k in zip(MODALITIES, keep) if k)


class GeneratorState:
    """A torch.Generator with state_dict, so the dropout draws continue exactly after --resume."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self):
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["state"])


def main(argv=None):
    parser = add_update_args(build_parser(__doc__))
    parser.add_argument("--mode", choices=("curriculum", "dropout"), default="curriculum",
                        help="curriculum: one modality at a time, then all; dropout: random modalities off per batch")
    parser.add_argument("--order", default="text,video,audio", help="curriculum: the modalities in training order")
    parser.add_argument("--single-fraction", type=float, default=0.5, help="share of the budget for single modalities")
    parser.add_argument("--drop-prob", type=float, default=0.3,
                        help="dropout: each modality is dropped with this probability (never all)")
    args = parser.parse_args(argv)
    order = [m.strip() for m in args.order.split(",")]
    if any(m not in MODALITIES for m in order):
        raise SystemExit(f"--order: modalities are {MODALITIES}, got {order}")

    run = Run(args, strategy="modality_curriculum" if args.mode == "curriculum" else "modality_dropout")
    phase_steps = max(int(run.total_steps * args.single_fraction / len(order)), 1)
    rng = GeneratorState(args.seed + 3571)
    update = make_update(run, args)
    run.start(update=update, rng=rng)

    for batch in run.batches():
        if args.mode == "curriculum":
            run.set_active_modalities(curriculum_modalities(run.step_count, order, phase_steps))
        else:
            run.set_active_modalities(dropout_modalities(args.drop_prob, rng.generator))
        losses = update.step(batch)
        run.log_step(losses, modalities=list(run.active_modalities or MODALITIES), **update.decisions())
        if run.at_eval():
            # early stopping waits until the curriculum has brought every modality in
            run.set_hold_early_stop(args.mode == "curriculum" and run.active_modalities is not None)
            if args.mode == "dropout":
                run.set_active_modalities(None)  # dropout is a training-time device: validate on all
            run.validate(modalities=list(run.active_modalities or MODALITIES))
            run.eval_checkpoint()

    run.set_active_modalities(None)  # the final model is judged with every modality
    summary = run.finish(decisions={"phase_steps": phase_steps if args.mode == "curriculum" else None})
    summary["decisions"]["unimodal_test_f1_pos"] = unimodal_ablation(run)
    run.write_summary(summary)
    return summary


def unimodal_ablation(run):
    """Per-task test F1 of the best model with each modality alone and with all of them."""
    rows, out = [], {}
    for name, modalities in [(m, (m,)) for m in MODALITIES] + [("all", None)]:
        metrics = run.evaluate(run.test_set, modalities=modalities)
        out[name] = {t: metrics["per_task"][t]["f1_pos"] for t in run.tasks}
        rows.append([name] + [out[name][t] for t in run.tasks] + [metrics["mean"]["f1_pos"]])
    print("\nunimodal ablation: test F1 (positive class) of the best model")
    print(tabulate(rows, headers=["modalities"] + list(run.tasks) + ["mean"], floatfmt=".3f"))
    return out


if __name__ == "__main__":
    main()
