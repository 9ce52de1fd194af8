"""Runs several strategy scripts one after the other in one process (under torchrun: in one process group),
for tests/test_distributed.py: one torchrun launch serves every strategy of the comparison.

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py runs.json
    python tests/dist_worker.py runs.json          # the same runs in one process (the reference)

runs.json: [["strategies/all_at_once.py", ["--data", ...]], ...]; each script runs as `python script argv`.
The entry ["@gram", [out.pt, argv...]] instead computes the Gram matrices of one global batch (gram_check).
"""
import json
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    run_all(json.loads(Path(sys.argv[1]).read_text()))
    from common import distributed
    if distributed.is_distributed():
        import torch.distributed as dist
        dist.destroy_process_group()


def run_all(runs):
    saved = sys.argv
    for script, argv in runs:
        if script in ("@gram", "@traffic"):
            {"@gram": gram_check, "@traffic": traffic_check}[script](argv[0], argv[1:])
            continue
        sys.argv = [str(REPO / script), *argv]
        runpy.run_path(str(REPO / script), run_name="__main__")
    sys.argv = saved


def gram_check(out, argv):
    """The first global batch's per-task gradients in both spaces, reduced as common/distributed.py says:
    the representation-space Gram matrix (sum of local ones), the parameter-space one (after the T x P
    all-reduce), the parameter gradients after a combination sent back through the local trunk, and TAG's
    affinity Z after one optimizer step. Rank 0 saves them to out; the other ranks their Z beside it."""
    import torch
    from common import distributed, gradagg
    from common.arguments import build_parser
    from common.train import Run
    from strategies.task_grouping import affinity_on_batch
    run = Run(build_parser().parse_args(argv), strategy="gram_check")
    batch = next(iter(run.batches()))
    fused, per_item, valid = run.per_item_losses(batch)
    losses, counts = distributed.global_task_losses(per_item, valid)
    T = len(run.tasks)
    rows = torch.stack([torch.autograd.grad(losses[t], fused, retain_graph=True)[0].reshape(-1) for t in range(T)])
    G_repr = distributed.all_reduce_gram(gradagg.gram(rows))
    shared = run.model.shared_parameters()
    buf = gradagg.TaskGradBuffer(shared, T)
    buf.fill_from_losses([losses[t] for t in range(T)])
    distributed.all_reduce_task_grads(buf.grads)
    G_params = gradagg.gram(buf.grads)
    # representation space, as an aggregator step: weights from the global Gram (here: each task's gradient
    # normalised, 1 / ||g_t||), the combination back through the local trunk
    coeffs = 1.0 / G_repr.diagonal().clamp(min=1e-24).sqrt()
    run.optimizer.zero_grad(set_to_none=True)
    fused.backward(gradagg.combine(rows, coeffs.to(rows.dtype)).view_as(fused))
    distributed.average_gradients(run._trained_parameters())
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    # TAG's lookahead affinity on the same global batch after that step (Adam's moments no longer zero)
    run.optimizer.step()
    Z = affinity_on_batch(run, batch, [p for p in shared if p.requires_grad])
    if distributed.is_main():
        torch.save({"G_repr": G_repr, "G_params": G_params, "losses": losses.detach(), "counts": counts,
                    "grads": grads, "Z": Z}, out)
    else:  # the other ranks' Z, for the test: every rank must have measured the same
        torch.save({"Z": Z}, out.replace(".pt", f".rank{distributed.rank()}.pt"))


def traffic_check(out, argv):
    """For make bench: the bytes each rank sends per step of a multi-task update (common.distributed.TRAFFIC,
    by collective) and the step times; rank 0 writes them as JSON to out."""
    import time
    from common import distributed
    from common.multitask import add_update_args, make_update
    from common.arguments import build_parser
    from common.train import Run
    run = Run(add_update_args(build_parser()).parse_args(argv), strategy="traffic")
    update = make_update(run, run.args)
    run.start(update=update)
    times, sent = [], {}
    for batch in run.batches():
        before, t0 = dict(distributed.TRAFFIC), time.perf_counter()
        update.step(batch)
        times.append(time.perf_counter() - t0)
        sent = {k: v - before.get(k, 0) for k, v in distributed.TRAFFIC.items()}
    if distributed.is_main():
        Path(out).write_text(json.dumps({"T": update.T, "P": update.task_grads.num_params, "times": times,
                                         "sent_last_step": sent}))


if __name__ == "__main__":
    main()
