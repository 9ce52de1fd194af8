"""task_grouping: which tasks should share a model? TAG (Fifty, Amid, Zhao, Yu, Anil, Finn, NeurIPS
2021, "Efficiently Identifying Task Groupings for Multi-Task Learning").

1. Affinity. During one joint run (all tasks, equal weights, --affinity-fraction of the budget) every
   --affinity-every steps, for each task i: take a lookahead SGD step (--lookahead-lr) on the shared
   parameters along task i's gradient alone and measure every task's loss on the same batch:
       Z_{i->j} = 1 - L_j(theta - lr * grad L_i) / L_j(theta)
   Z_{i->j} > 0: a step for i helps j. Averaged over the run; the 5 x 5 matrix is printed.
2. Grouping. Every partition of the tasks into k groups (k = 1..T, exhaustive: 52 partitions for 5
   tasks) is scored by the affinity each task receives from its group mates (mean of Z_{i->j} over i in
   its group, i != j; a task alone receives 0). The best partition per k is printed; --groups picks k
   (default: the best score over all k).
3. One model per group (equal weights), same budget as the other strategies; the per-task test metrics
   of the grouped models are gathered into one summary.
--brute-force adds Standley et al. (ICML 2020): every possible group is trained on a smaller budget
(--brute-epochs) and the partition with the best validation F1 found by brute force is compared with
TAG's choice (31 models for 5 tasks: slow).

    python strategies/task_grouping.py
    python strategies/task_grouping.py --groups 2 --brute-force --brute-epochs 1
"""
import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from common.gradagg import TaskGradBuffer  # noqa: E402
from common.train import Run, build_parser, format_metrics, merge_summaries, train_sum_of_losses, write_json  # noqa: E402


def lookahead_affinity(task_losses, params, grads, lr):
    """Z [T, T] with Z[i, j] = 1 - L_j(theta - lr g_i) / L_j(theta). task_losses() evaluates the T
    losses at the current parameters; grads [T, P] are the per-task gradients of params (flattened)."""
    with torch.no_grad():
        base = task_losses()
        Z = torch.zeros(len(base), len(base))
        for i in range(len(base)):
            _shift(params, grads[i], -lr)
            Z[i] = 1.0 - task_losses() / base
            _shift(params, grads[i], lr)  # restore theta exactly (up to float rounding of +/- lr g)
    return Z


def _shift(params, flat, scale):
    offset = 0
    for p in params:
        n = p.numel()
        p.add_(flat[offset:offset + n].view_as(p), alpha=scale)
        offset += n


def partitions(items):
    """Every partition of a list into non-empty groups."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        yield [[first]] + part
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]


def grouping_score(groups, Z, index):
    """Affinity the tasks receive from their group mates: sum over tasks j of mean_{i in group, i != j} Z[i, j]."""
    total = 0.0
    for g in groups:
        for j in g:
            mates = [i for i in g if i != j]
            if mates:
                total += sum(Z[index[i], index[j]].item() for i in mates) / len(mates)
    return total


def best_groupings(Z, tasks):
    """{k: (score, partition)}: the best partition into exactly k groups, by exhaustive search."""
    index = {t: n for n, t in enumerate(tasks)}
    best = {}
    for part in partitions(list(tasks)):
        score = grouping_score(part, Z, index)
        k = len(part)
        if k not in best or score > best[k][0] + 1e-12:
            best[k] = (score, part)
    return dict(sorted(best.items()))


class AffinityAverage:
    """The running mean of Z, checkpointed with the joint run."""

    def __init__(self, T):
        self.sum, self.count = torch.zeros(T, T), 0

    def add(self, Z):
        self.sum += Z
        self.count += 1

    def mean(self):
        return self.sum / max(self.count, 1)

    def state_dict(self):
        return {"sum": self.sum.clone(), "count": self.count}

    def load_state_dict(self, state):
        self.sum, self.count = state["sum"].clone(), state["count"]


def measure_affinity(args):
    """The joint run of step 1: equal-weight training that measures Z on the way."""
    run = Run(args, strategy="task_grouping", run_name=f"seed{args.seed}/affinity")
    run.total_steps = max(int(run.total_steps * args.affinity_fraction), 1)
    shared = run.model.shared_parameters()
    buffer = TaskGradBuffer(shared, len(run.tasks))
    affinity = AffinityAverage(len(run.tasks))
    run.start(affinity=affinity)
    for batch in run.batches():
        if run.step_count % args.affinity_every == 0:
            # no dropout and (when pretraining) the same corruption: the losses differ only by the step taken
            run.model.eval()
            fixed = lambda: torch.Generator().manual_seed(run.step_count)  # noqa: E731
            losses = run.task_losses(batch, generator=fixed())
            buffer.fill_from_losses(list(losses), retain_graph=False)
            Z = lookahead_affinity(lambda: run.task_losses(batch, generator=fixed()), shared, buffer.grads,
                                   args.lookahead_lr)
            affinity.add(Z)
            run.model.train()
            run.log({"event": "affinity", "step": run.step_count, "Z": Z})
        losses = run.task_losses(batch)
        run.step(losses.sum(), losses, batch)
        run.log_step(losses)
        if run.at_eval():
            run.validate()
            run.save_checkpoint()
    run.save_checkpoint()
    return run.tasks, affinity.mean()


def train_group(args, group, name, epochs=None):
    """One model for one group of tasks, equal weights."""
    sub = argparse.Namespace(**vars(args))
    sub.epochs = epochs or args.epochs
    return train_sum_of_losses(Run(sub, strategy="task_grouping", tasks=list(group), run_name=f"seed{args.seed}/{name}"))


def main(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument("--affinity-fraction", type=float, default=0.5, help="share of the budget of the joint run")
    parser.add_argument("--affinity-every", type=int, default=10)
    parser.add_argument("--lookahead-lr", type=float, default=0.1)
    parser.add_argument("--groups", type=int, default=0, help="number of groups (0 = the best over all k)")
    parser.add_argument("--brute-force", action="store_true", help="also search every group (Standley et al.)")
    parser.add_argument("--brute-epochs", type=int, default=1)
    args = parser.parse_args(argv)

    tasks, Z = measure_affinity(args)
    print("\ninter-task affinity Z[i -> j] (row i: the task whose lookahead step; column j: the task measured)")
    print(tabulate([[t] + Z[i].tolist() for i, t in enumerate(tasks)], headers=["i \\ j"] + tasks, floatfmt=".4f"))
    best = best_groupings(Z, tasks)
    print("\nbest partition into k groups:")
    for k, (score, part) in best.items():
        print(f"  k={k}: score {score:.4f}  {part}")
    k = args.groups or max(best, key=lambda k: best[k][0])
    chosen = best[k][1]
    print(f"training one model per group: {chosen}")

    summaries = {"+".join(g): train_group(args, g, "+".join(g)) for g in chosen}
    summary = merge_summaries(summaries, tasks, "task_grouping")
    summary["decisions"].update({"affinity": {t: dict(zip(tasks, Z[i].tolist())) for i, t in enumerate(tasks)},
                                 "groups": chosen, "scores_by_k": {k: s for k, (s, _) in best.items()}})
    if args.brute_force:
        summary["decisions"]["brute_force"] = brute_force(args, tasks, chosen)
    path = Path(args.out) / "task_grouping" / f"seed{args.seed}" / "summary.json"
    write_json(path, summary)
    print(format_metrics(summary["test"], tasks, title=f"task_grouping {chosen}: test metrics"))
    print(f"summary: {path}")
    return summary


def brute_force(args, tasks, chosen):
    """Standley et al.: train every group briefly; the best partition by summed per-task val F1."""
    val = {}
    for r in range(1, len(tasks) + 1):
        for group in itertools.combinations(tasks, r):
            s = train_group(args, group, "brute_" + "+".join(group), epochs=args.brute_epochs)
            val[group] = {t: s["val"]["per_task"][t]["f1_macro"] for t in group}
    scored = [(sum(val[tuple(g)][t] for g in part for t in g), part) for part in partitions(list(tasks))]
    score, part = max(scored, key=lambda x: x[0])
    chosen_score = sum(val[tuple(g)][t] for g in chosen for t in g)
    print(f"brute force best partition {part} (val F1 sum {score:.3f}); TAG's choice scores {chosen_score:.3f}")
    return {"best_partition": part, "best_score": score, "tag_choice_score": chosen_score}


if __name__ == "__main__":
    main()
