"""Several processes for one run (torchrun): set-up, shards of the global batches, and the reductions that
make a run with W processes compute what one process computes with the same global batch.

    torchrun --nproc_per_node 4 strategies/pcgrad.py --device cuda ...

Nothing here changes a one-process run: every function is the identity (or the plain local formula) when
the process group is not initialised.

Why the numbers equal one process's (the convention every function below follows):
  losses    global_task_losses(per_item, mask) -> ([T] global mean losses, [T] global counts). Its value is
            the same on every rank: sum over all ranks' clips / global count (an uneven last batch included).
            Its backward gives rank r the gradient of W * (rank r's sum) / (global count), so that the MEAN
            over ranks of the gradients (average_gradients) is exactly the gradient of the global mean.
  rules     a weighting computed from these identical losses (GradNorm, FAMO, DWA, uncertainty, learned) is
            identical on every rank; the gradient of its own parameters is the whole gradient on every rank,
            which the mean over ranks keeps.
  params    per-task gradients of the shared parameters, T x P: all_reduce_task_grads averages them, so that
            every rank holds the global T x P matrix; the Gram matrix, the aggregator's weights and the
            combination are then computed identically everywhere, and the combined .grad is already global
            (Run.step(..., synced=those parameters) does not average it again). The T x T Gram matrix of the
            global gradients is not the sum of local Gram matrices here (g_t = sum_r g_t^r mixes ranks in
            every inner product), so the T x P all-reduce cannot be replaced by a T x T one. It can be
            replaced by a reduce-scatter (--task-grad-sync reduce-scatter): each rank then holds the global
            rows on a block of columns, the Gram matrix is the sum of the blocks' (one T x T all-reduce) and
            the combined gradient is all-gathered: (W-1)/W (T + 1) P sent instead of 2 (W-1)/W T P.
  pretrain  corruption and contrastive negatives are drawn for the global batch: every rank gathers it
            (gather_global_batch), corrupts it with the same generator state and keeps its own rows; the
            negatives of the other ranks come through gather_rows, whose backward sends their gradients home.
  repr.     per-task gradients of the fused representation z: each rank's rows are its own clips, so the
            global Gram matrix is the sum of the local ones; with the W scaling above, all_reduce_gram(G) =
            sum_r G_r / W^2 (one T x T all-reduce). The combination goes back through the local trunk and
            the mean over ranks in Run.step makes it the global gradient.

A global batch with fewer clips than ranks: a rank without clips gets the batch's first clip as a "ghost"
(shard() says so); its rows are masked out of every loss, so it contributes zeros but still takes part in
every collective.
"""
import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""


_CTX = Context()


def setup(device="cpu", collective_timeout=600.0):
    """Initialise the process group once when launched by torchrun (WORLD_SIZE > 1); returns (context,
    device). A CUDA device becomes cuda:<LOCAL_RANK> under torchrun. Backend: nccl for CUDA, gloo for CPU."""
    global _CTX
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda})")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if device.index is not None and device.index != local_rank:
                raise SystemExit(f"--device {device} under torchrun: give --device cuda, each rank takes "
                                 f"cuda:<LOCAL_RANK>")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # a collective waits at most collective_timeout seconds for a rank that died or hangs
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=collective_timeout))
        _CTX = Context(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
    elif device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else torch.device("cuda", 0))
    return _CTX, device


def context():
    return _CTX


def is_distributed():
    return _CTX.world_size > 1


def rank():
    return _CTX.rank


def world_size():
    return _CTX.world_size


def is_main():
    """True in the process that writes files and prints (rank 0; the only process of a plain run)."""
    return _CTX.rank == 0


# ---------------------------------------------------------------- traffic
# bytes each rank sends, per kind of collective, counted as the ring algorithms send them (all-reduce
# 2 (W-1)/W n, reduce-scatter (W-1)/W n of its input, all-gather (W-1)/W n of its output); make bench prints it
TRAFFIC = {}


def _count(kind, nbytes, factor):
    TRAFFIC[kind] = TRAFFIC.get(kind, 0) + int(nbytes * factor * (world_size() - 1) / world_size())


# ---------------------------------------------------------------- a rank lost
_ENTERED = "mtl_collectives_entered/"
_entered = 0  # collectives this rank has entered


def _store():
    """The process group's key-value store (under torchrun hosted by the agent, so it outlives a dead rank)."""
    return dist.distributed_c10d._get_default_store()


def lost_rank_report(exc):
    """Why a collective failed, in words: how many collectives each rank entered (the store's counters), the
    rank(s) that never entered this one named."""
    counts = {}
    try:
        store = _store()
        for r in range(world_size()):
            key = f"{_ENTERED}{r}"
            counts[r] = int(store.get(key)) if store.check([key]) else 0
        behind = [r for r, n in counts.items() if n < _entered]
        lost = (f"rank {', '.join(map(str, behind))} never entered it (dead or hung)" if behind
                else "every rank entered it")
    except Exception as err:  # noqa: BLE001 -- the store itself may be gone: say so, keep the first error
        lost = f"the store is unreachable too ({str(err).splitlines()[0][:120]})"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return (f"rank {rank()}: collective #{_entered} with the other ranks failed: {first}. Collectives entered per "
            f"rank: {counts}: {lost}. Rerun with --resume and the same torchrun --nproc_per_node {world_size()} "
            f"(the last checkpoint holds every rank's state).")


def _names_a_lost_rank(fn):
    """Each collective first counts itself in the store; one that fails (a peer died, or a hang past
    --collective-timeout) ends this rank with a report naming the rank that never entered it, instead of a
    bare backend error or a wait without end."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _entered
        if not is_distributed():
            return fn(*args, **kwargs)
        _entered += 1
        _store().set(f"{_ENTERED}{rank()}", str(_entered))
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # gloo and NCCL errors (DistBackendError included) are RuntimeErrors
            raise SystemExit(lost_rank_report(exc)) from exc
    return wrapper


@_names_a_lost_rank
def barrier():
    if is_distributed():
        dist.barrier()


def rank_seed(seed, r=None):
    """The torch seed of a rank after the model is built (dropout masks of its own clips); rank 0 keeps seed."""
    r = rank() if r is None else r
    return seed + 1_000_033 * r


# ---------------------------------------------------------------- shards of the global batches
def shard_sizes(n, world=None):
    """How many of a global batch's n clips each rank holds: parts differ by at most one, the first ranks
    take the extra ones (0 for a rank that holds a ghost)."""
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def shard_start(n, r=None, world=None):
    """Offset of rank r's part in a global batch of n clips (rows [start, start + len) of the global batch)."""
    r = rank() if r is None else r
    return sum(shard_sizes(n, world)[:r])


def shard(indices, r=None, world=None):
    """Rank r's contiguous part of one global batch (list of clip indices) -> (indices, ghost); a rank left
    without clips gets [indices[0]] with ghost=True (masked out)."""
    r = rank() if r is None else r
    start = shard_start(len(indices), r, world)
    part = list(indices[start:start + shard_sizes(len(indices), world)[r]])
    if not part:
        return [indices[0]], True
    return part, False


# ---------------------------------------------------------------- the global batch, where a rule draws for all of it
BATCH_TENSORS = ("text_ids", "text_mask", "video", "video_mask", "audio", "audio_mask", "present", "labels", "index")
PADDED = {"text_ids": 0, "text_mask": 0, "video": 1, "video_mask": 1, "audio": 2, "audio_mask": 2}  # length slot


def gather_global_batch(batch):
    """torchrun: the global batch from this rank's shard, identical on every rank and equal to the one that
    one process collates (every clip in global order, padded with zeros to the longest): what pretraining
    corrupts, so that it draws one process's swaps and masks. One process: the batch itself. clip_ids stay
    this rank's own."""
    if not is_distributed():
        return batch
    sizes = shard_sizes(batch["global_batch_size"])
    mine = sizes[rank()]  # 0 on a ghost rank: it sends no rows
    lengths = torch.tensor([batch[k].shape[1] if mine else 1 for k in ("text_ids", "video", "audio")],
                           device=_collective_device())
    _all_reduce_max_(lengths)
    lengths = lengths.tolist()
    out = dict(batch)
    for key in BATCH_TENSORS:
        local = batch[key][:mine]
        shape = list(local.shape)
        shape[0] = max(sizes)
        if key in PADDED:
            shape[1] = lengths[PADDED[key]]
        # bool travels as uint8 (gloo has no bool); padding is zeros, as collate's
        send = torch.zeros(shape, dtype=torch.uint8 if local.dtype == torch.bool else local.dtype, device=local.device)
        send[tuple(slice(0, n) for n in local.shape)] = local
        parts = _all_gather(send)
        out[key] = torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(local.dtype)
    return out


class _GatheredRows(torch.autograd.Function):
    """Forward: every rank's rows in rank order, on every rank. Backward: this rank's rows get the sum over
    ranks of their gradients (each rank's loss may use every row), so that with global_task_losses' W
    scaling the mean over ranks in average_gradients is the gradient of the global loss."""

    @staticmethod
    def forward(ctx, rows, sizes):
        ctx.sizes = sizes
        send = rows.new_zeros((max(sizes), *rows.shape[1:]))
        send[:rows.shape[0]] = rows
        return torch.cat([part[:n] for part, n in zip(_all_gather(send), sizes)])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        all_reduce_sum_(grad)
        start = sum(ctx.sizes[:rank()])
        return grad[start:start + ctx.sizes[rank()]], None


def gather_rows(rows, sizes):
    """[sum(sizes), ...]: the rows of every rank (rank r holds sizes[r] of them), differentiable; every rank
    must call it, a rank with no rows too (e.g. the contrastive negatives of the global batch). One process:
    rows."""
    if not is_distributed():
        return rows
    if rows.shape[0] != sizes[rank()]:
        raise ValueError(f"gather_rows: rank {rank()} holds {rows.shape[0]} rows, sizes say {sizes[rank()]}")
    return _GatheredRows.apply(rows, list(sizes))


# ---------------------------------------------------------------- reductions
@_names_a_lost_rank
def all_reduce_sum_(tensor):
    """In-place sum over ranks (identity in one process)."""
    if is_distributed():
        _count("all_reduce", tensor.numel() * tensor.element_size(), 2)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class _GlobalMean(torch.autograd.Function):
    """Value: the global mean (identical on every rank). Gradient: to the local sum, scaled by W / count."""

    @staticmethod
    def forward(ctx, local_sum, global_sum, global_count, world):
        ctx.save_for_backward(global_count)
        ctx.world = world
        return global_sum / global_count.clamp(min=1)

    @staticmethod
    def backward(ctx, grad):
        (count,) = ctx.saved_tensors
        return grad * ctx.world / count.clamp(min=1), None, None, None


def global_task_losses(per_item, mask):
    """Per-task mean losses over the global batch. per_item [B, T] (this rank's clips), mask bool [B, T]
    (which clip counts for which task) -> (losses [T], counts [T] global number of clips per task).
    One process: exactly (per_item * mask).sum(0) / mask.sum(0).clamp(min=1). Several: see the module
    docstring (value global and identical on every rank; gradient W * local sum / global count)."""
    mask = mask.to(per_item.dtype)
    local_sum = (per_item * mask).sum(0)
    counts = mask.sum(0)
    if not is_distributed():
        return local_sum / counts.clamp(min=1), counts
    both = torch.cat([local_sum.detach(), counts]).to(torch.float64)
    all_reduce_sum_(both)
    T = counts.numel()
    global_sum = both[:T].to(per_item.dtype)
    global_count = both[T:].to(per_item.dtype)
    return _GlobalMean.apply(local_sum, global_sum, global_count, world_size()), global_count


@_names_a_lost_rank
def _all_reduce_max_(tensor):
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


@_names_a_lost_rank
def _all_gather(tensor):
    """[rank 0's tensor, rank 1's, ...]: same shape and dtype on every rank."""
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    _count("all_gather", tensor.numel() * tensor.element_size() * world_size(), 1)
    dist.all_gather(parts, tensor.contiguous())
    return parts


def all_reduce_task_grads(grads):
    """Parameter space: the per-task gradients [T, P] (any row stride) averaged over ranks, in place, so
    that every rank holds the global T x P matrix (module docstring). Identity in one process."""
    if not is_distributed():
        return grads
    flat = grads if grads.is_contiguous() else grads.contiguous()
    all_reduce_sum_(flat)
    flat.div_(world_size())
    if flat is not grads:
        grads.copy_(flat)
    return grads


@_names_a_lost_rank
def reduce_scatter_task_grads(grads):
    """Parameter space, sharded (--task-grad-sync reduce-scatter): this rank's block of columns of the global
    T x P matrix (the mean over ranks), [T, ceil(P / W)], the last block padded with zero columns. The sum of
    the blocks' Gram matrices is the global Gram matrix (its inner products add over columns), so each rank
    sends (W-1)/W of T x P instead of the all-reduce's 2 (W-1)/W. One process: grads itself."""
    if not is_distributed():
        return grads
    W, (T, P) = world_size(), grads.shape
    width = -(-P // W)
    send = grads.new_zeros(W * T, width)  # rank r's block: rows r T .. (r + 1) T (gloo splits the first dim)
    for r in range(W):
        cols = grads[:, r * width:(r + 1) * width]
        send[r * T:(r + 1) * T, :cols.shape[1]] = cols
    block = grads.new_empty(T, width)
    _count("reduce_scatter", send.numel() * send.element_size(), 1)
    dist.reduce_scatter_tensor(block, send, op=dist.ReduceOp.SUM)
    return block.div_(W)


@_names_a_lost_rank
def all_gather_columns(part, out):
    """The inverse of reduce_scatter_task_grads for one combined row: every rank's [ceil(P / W)] part
    gathered into out [P] (the padding dropped). One process: out.copy_(part)."""
    if not is_distributed():
        return out.copy_(part)
    full = part.new_empty(world_size() * part.numel())
    _count("all_gather", full.numel() * full.element_size(), 1)
    dist.all_gather_into_tensor(full, part.contiguous())
    return out.copy_(full[:out.numel()])


def all_reduce_gram(G):
    """Representation space: the Gram matrix [T, T] of the global per-task gradients of z from each rank's
    local one, sum_r G_r / W^2 (rows are clips, so the ranks' blocks add; W^2 undoes the W scaling of
    global_task_losses' gradient). Identity in one process. Keeps G's dtype (float64)."""
    if not is_distributed():
        return G
    G = G.clone()
    all_reduce_sum_(G)
    return G / world_size() ** 2


def average_gradients(params, synced=()):
    """Mean over ranks of every .grad (one coalesced all-reduce), except `synced` parameters whose .grad is
    already the global gradient. A parameter with a gradient on some ranks only gets zeros where it has
    none; one without a gradient on every rank keeps .grad None (Adam must not move it)."""
    if not is_distributed():
        return
    skip = {id(p) for p in synced}
    params = [p for p in params if id(p) not in skip and p.requires_grad]
    if not params:
        return
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    all_reduce_sum_(present)
    todo = [p for p, n in zip(params, present.tolist()) if n > 0]
    for p in todo:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype = {}
    for p in todo:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        all_reduce_sum_(flat)
        flat.div_(world_size())
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def any_true(flag):
    """True on every rank when flag is True on any rank (e.g. a stop request that reached one rank first)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    all_reduce_sum_(t)
    return t.item() > 0


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if _CTX.backend == "nccl" else torch.device("cpu")


@_names_a_lost_rank
def broadcast_object(obj, src=0):
    """Rank src's object on every rank (e.g. validation metrics, so that every rank's rule decides alike)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


@_names_a_lost_rank
def gather_objects(obj):
    """[object of rank 0, object of rank 1, ...] on every rank ([obj] in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@_names_a_lost_rank
def gather_to_main(obj):
    """[object of rank 0, object of rank 1, ...] on rank 0, None on the other ranks ([obj] in one process):
    what only rank 0 writes (a checkpoint's per-rank RNG and rule state) travels to rank 0 alone."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out
