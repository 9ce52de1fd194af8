"""task_grouping: which tasks should share a model? TAG (Fifty, Amid, Zhao, Yu, Anil, Finn, NeurIPS
2021, "Efficiently Identifying Task Groupings for Multi-Task Learning"; google-research tag/).

1. Affinity. During one joint run (all tasks, equal weights, --affinity-fraction of the budget), every
   --affinity-every steps and for each task i: take the step the training optimizer itself would take on
   the shared parameters from task i's gradient alone (Adam with its current moments, at the current
   training learning rate, no gradient clipping: the official lookahead clips nothing; the real optimizer
   state is not touched), and measure every task's loss on the same batch:
       Z_{i->j} = (1 - L_j(theta + step_i) / L_j(theta)) / lr
   Z_{i->j} > 0: a step for i helps j. Divided by the lr as the official code does, averaged over the run.
   The model is in train mode, as in the official lookahead (training=True); every forward of one
   measurement uses the same dropout masks, so the losses differ only by the step taken.
2. Grouping (--selection tag, the official network selection): for every group of two or more tasks, the
   affinity onto each member is the mean of Z_{i->j} over its group mates i; choose at most --groups groups
   (overlapping allowed) covering every task that maximise the mean over tasks of the affinity each task
   gets from its best group; that group serves it. --selection partition: the exhaustive search over
   partitions (52 for 5 tasks) with the same per-task affinity, a task alone receiving 0; --groups 0 takes
   the best number of groups.
3. One model per group (equal weights); each task's test metrics come from the group that serves it.
Budget (issue 25): the whole strategy spends all_at_once's step budget B, counting every optimizer update.
The joint run gets --affinity-fraction of B for its training steps and its lookahead steps together (one
lookahead step per task per measurement counts as one step: each is one update of the shared parameters
from one gradient, like a training step); the group models share the rest equally. The summary records
budget_steps (the total), steps (all updates taken), extra_steps {"affinity": lookahead steps taken} and
decisions.budget (the split). Tiny budgets where the joint run (1 step + its lookahead) and one step per
group do not fit go over B, and decisions.budget.over_budget says so.
--brute-force adds Standley et al. (ICML 2020): every possible group is trained on a smaller budget
(--brute-epochs) and the partition with the best summed validation score is compared with TAG's choice
(an analysis beside the strategy, outside its budget).

    python strategies/task_grouping.py
    python strategies/task_grouping.py --groups 3 --brute-force --brute-epochs 1
"""
import argparse
import contextlib
import itertools
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from common import distributed  # noqa: E402
from common.arguments import build_parser  # noqa: E402
from common.evaluate import format_metrics  # noqa: E402
from common.files import write_json  # noqa: E402
from common.summaries import merge_summaries, train_sum_of_losses  # noqa: E402
from common.train import Run  # noqa: E402

# the version of this strategy's rule, stored in run records: bumped when what the rule decides changes
RULE_VERSION = 1


def adam_step(optimizer, params, grads):
    """The change torch.optim.Adam `optimizer` would make to `params` if it stepped now on `grads` (one
    tensor per parameter), from its current moments and step count; nothing is changed. No gradient
    clipping: the official TAG lookahead applies the optimizer's update to the raw task gradient."""
    if type(optimizer) is not torch.optim.Adam:
        raise TypeError(f"TAG lookahead: written for torch.optim.Adam, got {type(optimizer).__name__}")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    steps = []
    for p, g in zip(params, grads):
        group = group_of[id(p)]
        if group["amsgrad"] or group["maximize"]:
            raise NotImplementedError("TAG lookahead: amsgrad / maximize are not handled")
        beta1, beta2 = group["betas"]
        lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
        state = optimizer.state.get(p) or {"step": 0.0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        t = float(state["step"]) + 1
        g = g + wd * p.detach() if wd else g                          # Adam's L2 weight decay
        m = beta1 * state["exp_avg"] + (1 - beta1) * g
        v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        denom = v.sqrt() / math.sqrt(1 - beta2 ** t) + eps
        steps.append(-(lr / (1 - beta1 ** t)) * m / denom)
    return steps


def lookahead_affinity(task_losses, params, steps, lr):
    """Z [T, T], Z[i, j] = (1 - L_j(theta + steps[i]) / L_j(theta)) / lr. task_losses() evaluates the T losses
    at the current parameters; steps[i] is one tensor per parameter. theta is restored exactly."""
    with torch.no_grad():
        base = task_losses()
        saved = [p.detach().clone() for p in params]
        Z = torch.zeros(len(base), len(base))
        for i, step in enumerate(steps):
            for p, d in zip(params, step):
                p.add_(d)
            Z[i] = ((1.0 - task_losses() / base) / lr).float().cpu()
            for p, s in zip(params, saved):
                p.copy_(s)
    return Z


def global_gradient(grads):
    """torchrun: one task's gradient (one tensor per parameter) averaged over the ranks, which is the global
    batch's gradient (run.task_losses' convention, common/distributed.py), so that every rank takes the same
    lookahead step and measures the same Z. One P-sized all-reduce per task. Identity in one process."""
    if not distributed.is_distributed():
        return grads
    flat = distributed.all_reduce_task_grads(torch.cat([g.reshape(-1) for g in grads])[None])[0]
    return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]


def lookahead_seed(run):
    """The seed of one affinity measurement's dropout masks: a function of --seed, the rank and the step, so
    that a resumed run measures the same Z."""
    return distributed.rank_seed(run.args.seed) * 1_000_003 + run.step_count


@contextlib.contextmanager
def forked_rng(device):
    """torch's CPU generator (and the CUDA generator of `device`) saved on entry and restored on exit: the
    random numbers drawn inside leave the training run's own stream where it was."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        yield


def reseed(device, seed):
    """Seed the generators that dropout draws from on `device` (CPU; and that CUDA device's)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def affinity_on_batch(run, batch, shared):
    """TAG's Z on one training batch, with the run's optimizer and lr and no gradient clipping, the model in
    train mode (the official lookahead runs with training=True). Dropout: every forward of the measurement is
    reseeded with lookahead_seed(run), so all of them draw the same masks and (pretraining: the same
    corruption too) the losses differ only by the step taken; the draws happen inside forked_rng, which saves
    and restores the RNG state, so the training run's subsequent random numbers are the same whether or not
    the lookahead ran. Under torchrun the batch is the global one: its losses are global (run.task_losses),
    the gradients are all-reduced, so Z is the same on every rank and equals one process's (with the same
    dropout masks: the tests use --zero-dropout)."""
    seed = lookahead_seed(run)

    def task_losses():
        reseed(run.device, seed)
        return run.task_losses(batch, generator=torch.Generator().manual_seed(run.step_count))

    with run.train_mode(), forked_rng(run.device):
        losses = task_losses()
        grads = []
        for t in range(len(run.tasks)):
            g = torch.autograd.grad(losses[t], shared, retain_graph=t < len(run.tasks) - 1, allow_unused=True)
            grads.append(global_gradient([torch.zeros_like(p) if x is None else x for p, x in zip(shared, g)]))
        steps = [adam_step(run.optimizer, shared, g) for g in grads]
        return lookahead_affinity(task_losses, shared, steps, run.lr)


def affinity_onto(group, j, Z, index):
    """The affinity task j gets from its group mates: mean of Z[i, j] over i in the group, i != j."""
    mates = [i for i in group if i != j]
    return sum(Z[index[i], index[j]].item() for i in mates) / len(mates) if mates else 0.0


def select_groups(Z, tasks, max_groups):
    """The official TAG network selection: at most max_groups groups of >= 2 tasks (overlapping allowed)
    covering every task, maximising the mean over tasks of the affinity from the task's best group.
    Returns (value, groups, serving {task: group})."""
    if len(tasks) < 2:
        raise ValueError(f"TAG selection needs at least two tasks, got {tasks}")
    index = {t: n for n, t in enumerate(tasks)}
    candidates = [g for r in range(2, len(tasks) + 1) for g in itertools.combinations(tasks, r)]
    onto = {g: {j: affinity_onto(g, j, Z, index) for j in g} for g in candidates}
    best = (-math.inf, None)
    for k in range(1, max_groups + 1):
        for chosen in itertools.combinations(candidates, k):
            per_task = {t: max((onto[g][t] for g in chosen if t in g), default=None) for t in tasks}
            if None in per_task.values():
                continue                                   # some task left uncovered
            value = sum(per_task.values()) / len(tasks)
            if value > best[0] + 1e-12:
                best = (value, chosen)
    value, chosen = best
    serving = {t: max((g for g in chosen if t in g), key=lambda g: onto[g][t]) for t in tasks}
    return value, [list(g) for g in chosen], {t: list(g) for t, g in serving.items()}


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


def best_partitions(Z, tasks):
    """{k: (score, partition)}: the best partition into exactly k groups, by exhaustive search; the score is
    the affinity every task receives from its group mates, summed over tasks (a task alone receives 0)."""
    index = {t: n for n, t in enumerate(tasks)}
    best = {}
    for part in partitions(list(tasks)):
        score, k = sum(affinity_onto(g, j, Z, index) for g in part for j in g), len(part)
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


def joint_run_steps(share, num_tasks, every):
    """Training steps n of the joint run such that they and their lookahead steps, num_tasks at each of the
    ceil(n / every) measurements (steps 0, every, 2 every, ...), fit in `share` steps; at least 1."""
    n = max(int(share), 1)
    while n > 1 and n + num_tasks * math.ceil(n / every) > share:
        n -= 1
    return n


def split_budget(total, k):
    """`total` steps over k models, as evenly as possible (the first ones take the remainder); at least 1 each."""
    return [max(total // k + (i < total % k), 1) for i in range(k)]


def measure_affinity(args):
    """The joint run of step 1: equal-weight training that measures Z on the way. Returns (tasks, mean Z,
    account): account holds the strategy's budget B (all_at_once's), the joint run's training budget and
    lookahead budget (planned), and the training and lookahead steps it took."""
    run = Run(args, strategy="task_grouping", run_name=f"seed{args.seed}/affinity")
    budget, T = run.total_steps, len(run.tasks)
    n = joint_run_steps(max(int(budget * args.affinity_fraction), 1), T, args.affinity_every)
    run.set_total_steps(n)
    shared = [p for p in run.model.shared_parameters() if p.requires_grad]
    affinity = AffinityAverage(len(run.tasks))
    run.start(affinity=affinity)
    for batch in run.batches():
        if run.step_count % args.affinity_every == 0:
            Z = affinity_on_batch(run, batch, shared)
            affinity.add(Z)
            run.log({"event": "affinity", "step": run.step_count, "Z": Z})
        losses = run.task_losses(batch)
        run.step(losses.sum(), losses, batch)
        run.log_step(losses)
        if run.at_eval():
            run.validate()
            run.eval_checkpoint()
    run.save_checkpoint()
    account = {"budget": budget, "joint_budget": n, "lookahead_budget": T * math.ceil(n / args.affinity_every),
               "joint_steps": run.step_count, "lookahead_steps": T * affinity.count}
    return run.tasks, affinity.mean(), account


def train_group(args, group, name, epochs=None, steps=None):
    """One model for one group of tasks, equal weights; steps: its step budget (default: the run's)."""
    sub = argparse.Namespace(**vars(args))
    sub.epochs = epochs or args.epochs
    run = Run(sub, strategy="task_grouping", tasks=list(group), run_name=f"seed{args.seed}/{name}")
    if steps is not None:
        run.set_total_steps(steps)
    return train_sum_of_losses(run)


def main(argv=None):
    parser = build_parser(__doc__)
    parser.add_argument("--affinity-fraction", type=float, default=0.5,
                        help="share of the budget for the joint run, its training and lookahead steps together")
    parser.add_argument("--affinity-every", type=int, default=10, help="steps between affinity measurements (TAG: 10)")
    parser.add_argument("--selection", choices=("tag", "partition"), default="tag",
                        help="tag: the official network selection (groups may overlap); partition: the best partition")
    parser.add_argument("--groups", type=int, default=2,
                        help="tag: at most this many groups; partition: exactly this many (0 = the best k)")
    parser.add_argument("--brute-force", action="store_true", help="also search every group (Standley et al.)")
    parser.add_argument("--brute-epochs", type=int, default=1, help="--brute-force: epochs for each group's model")
    args = parser.parse_args(argv)
    if args.groups < 0 or (args.selection == "tag" and args.groups < 1):
        raise SystemExit(f"--groups {args.groups}: --selection tag needs at least 1 group")

    tasks, Z, account = measure_affinity(args)
    print("\ninter-task affinity Z[i -> j] / lr (row i: the task whose lookahead step; column j: the task measured)")
    print(tabulate([[t] + Z[i].tolist() for i, t in enumerate(tasks)], headers=["i \\ j"] + tasks, floatfmt=".4f"))
    decisions = {"affinity": {t: dict(zip(tasks, Z[i].tolist())) for i, t in enumerate(tasks)}, "selection": args.selection}
    if args.selection == "tag":
        value, chosen, serving = select_groups(Z, tasks, args.groups)
        print(f"\nTAG selection, at most {args.groups} groups: {chosen} (mean affinity onto a task {value:.4f})")
        print("served by: " + ", ".join(f"{t} <- {'+'.join(g)}" for t, g in serving.items()))
        decisions.update(groups=chosen, serving=serving, selection_value=value)
    else:
        best = best_partitions(Z, tasks)
        print("\nbest partition into k groups:")
        for k, (score, part) in best.items():
            print(f"  k={k}: score {score:.4f}  {part}")
        k = args.groups or max(best, key=lambda k: best[k][0])
        chosen = best[k][1]
        serving = {t: g for g in chosen for t in g}
        decisions.update(groups=chosen, serving=serving, scores_by_k={k: s for k, (s, _) in best.items()})
    # issue 25: the groups share what the joint run and its lookahead steps left of all_at_once's budget
    spent = account["joint_budget"] + account["lookahead_budget"]
    group_steps = dict(zip(("+".join(g) for g in chosen), split_budget(account["budget"] - spent, len(chosen))))
    total = spent + sum(group_steps.values())
    print(f"training one model per group: {chosen}; steps: {group_steps} (budget {account['budget']}: joint run "
          f"{account['joint_budget']} + lookahead {account['lookahead_budget']} + groups {sum(group_steps.values())})")
    if total > account["budget"]:
        print(f"[task_grouping] over budget: {total} steps for a budget of {account['budget']} (the joint run needs "
              f"1 step and its lookahead, each group 1 step)")

    trained = {"+".join(g): train_group(args, g, "+".join(g), steps=group_steps["+".join(g)]) for g in chosen}
    served = {name: {**s, "tasks": [t for t in s["tasks"] if "+".join(serving[t]) == name]} for name, s in trained.items()}
    summary = merge_summaries(served, tasks, "task_grouping")
    summary["decisions"].update(decisions)
    # every optimizer update counts: the joint run's training steps and lookahead steps, then the groups'
    summary["steps"] += account["joint_steps"] + account["lookahead_steps"]
    summary["budget_steps"] = total
    summary["extra_steps"] = {"affinity": account["lookahead_steps"]}
    summary["decisions"]["budget"] = {**account, "group_steps": group_steps, "over_budget": total > account["budget"]}
    if args.brute_force:
        summary["decisions"]["brute_force"] = brute_force(args, tasks, serving)
    path = Path(args.out) / "task_grouping" / f"seed{args.seed}" / "summary.json"
    write_json(path, summary)
    print(format_metrics(summary["test"], tasks, title=f"task_grouping {chosen}: test metrics"))
    print(f"summary: {path}")
    return summary


def brute_force(args, tasks, serving):
    """Standley et al.: train every group briefly; the best partition by summed per-task val score, against
    the score of TAG's choice (each task from the group serving it)."""
    val = {}
    for r in range(1, len(tasks) + 1):
        for group in itertools.combinations(tasks, r):
            s = train_group(args, group, "brute_" + "+".join(group), epochs=args.brute_epochs)
            val[group] = {t: s["val"]["per_task"][t]["score"] for t in group}
    scored = [(sum(val[tuple(g)][t] for g in part for t in g), part) for part in partitions(list(tasks))]
    score, part = max(scored, key=lambda x: x[0])
    chosen_score = sum(val[tuple(serving[t])][t] for t in tasks)
    print(f"brute force best partition {part} (val score sum {score:.3f}); TAG's choice scores {chosen_score:.3f}")
    return {"best_partition": part, "best_score": score, "tag_choice_score": chosen_score}


if __name__ == "__main__":
    main()
