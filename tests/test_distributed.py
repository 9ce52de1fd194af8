"""torchrun on CPU (gloo, 2 processes, tiny model): a run equals the one-process run with the same global
batch, and a run killed on one rank resumes to the same end (common/distributed.py).

Dropout: each rank draws the masks of its own clips from its own random stream, so with dropout a
2-process run differs from a 1-process one by construction; these runs switch dropout off with the
test-only flag --zero-dropout. Everything else (data order, shards, uneven and empty shards, rule state,
Gram matrices, checkpoints) is exercised as in a real run. Global batch 7 on 2 ranks: shards of 4 and 3,
and the epoch's last batch of 1 clip leaves rank 1 with a masked "ghost" clip.

One torchrun launch runs every strategy (tests/dist_worker.py), one plain process the references.
"""
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common import distributed
from common.objectives import masked_mean
from tests.dist_worker import run_all

pytestmark = pytest.mark.slow  # minutes: left out by -m "not slow"

REPO = Path(__file__).resolve().parents[1]

# the strategies that must agree, as (run name, script, extra flags)
CONFIGS = [
    ("all_at_once", "strategies/all_at_once.py", []),
    ("pcgrad_params", "strategies/pcgrad.py", ["--grad-space", "params"]),
    # with GradNorm's weights from the representation-space norms too (the global Gram matrix's diagonal)
    ("pcgrad_repr", "strategies/pcgrad.py", ["--grad-space", "representation", "--weighting", "gradnorm"]),
    ("gradnorm", "strategies/gradnorm.py", []),
    ("stop_and_go", "strategies/stop_and_go.py", ["--eval-every", "3", "--patience", "1"]),
    # clips composed for the global batch (each rank takes its rows), probabilities from the global losses
    ("dynamic_clips", "strategies/dynamic_sampling.py", ["--apply", "clips", "--difficulty", "loss", "--interval", "3"]),
    # --task-grad-sync reduce-scatter: each rank a block of columns, the Gram matrix summed from the blocks
    ("pcgrad_rs", "strategies/pcgrad.py", ["--grad-space", "params", "--task-grad-sync", "reduce-scatter"]),
    ("gradnorm_rs", "strategies/gradnorm.py", ["--task-grad-sync", "reduce-scatter"]),
    # pretraining: the global batch's corruption and contrastive negatives (gathered from the other ranks);
    # per-task backward passes through the gather in both spaces
    ("pretrain_pcgrad_params", "strategies/pcgrad.py", ["--stage", "pretrain", "--grad-space", "params"]),
    ("pretrain_pcgrad_repr", "strategies/pcgrad.py", ["--stage", "pretrain", "--grad-space", "representation",
                                                      "--pretrain-tasks", "vtm,vam,atm,contrastive"]),
]
# killed on rank 1 after step 7 (checkpoint at step 4), resumed: learned weights, so rule parameters too
CRASH = ("seed0", "strategies/all_at_once.py", ["--weights", "learned"])


def common_args(data, out, name=None):
    # no --run on a torchrun command line: torchrun's own parser takes it for an abbreviation of --run-path
    return ["--data", str(data), "--out", str(out), *(["--run", name] if name else []), "--model-size", "tiny", "--epochs", "1",
            "--batch-size", "7", "--eval-every", "5", "--log-every", "1", "--checkpoint-every", "4", "--quiet",
            "--zero-dropout"]


def torchrun(nproc, *args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """Every config in this process (ref/) and with torchrun on 2 processes (dist/). Launch 1: the Gram
    check, all_at_once, then the run killed on rank 1 (which ends the launch); launch 2: its --resume
    through the script's own command line, then the strategies of common/multitask.py."""
    root = tmp_path_factory.mktemp("dist")
    ref, dist2 = root / "ref", root / "dist"
    gram = lambda out: [["@gram", [str(out / "gram.pt"), *common_args(tiny_data, out, "gram")]],
                        ["@gram", [str(out / "gram_pretrain.pt"), *common_args(tiny_data, out, "gram"), "--stage", "pretrain"]]]
    configs = lambda out, which: [[script, [*common_args(tiny_data, out, name), *extra]] for name, script, extra in which]
    crash = lambda out, *flags: [[CRASH[1], [*common_args(tiny_data, out), *CRASH[2], *flags]]]
    multitask = CONFIGS[1:]
    ref.mkdir()
    with contextlib.redirect_stdout(io.StringIO()):  # the references in this process (no torch import to wait for)
        run_all(gram(ref) + configs(ref, CONFIGS[:1] + multitask) + crash(ref))
    dist2.mkdir()
    (dist2 / "first.json").write_text(json.dumps(
        gram(dist2) + configs(dist2, CONFIGS[:1]) + crash(dist2, "--crash-after-step", "7", "--crash-rank", "1")))
    crashed = torchrun(2, REPO / "tests" / "dist_worker.py", dist2 / "first.json", check=False)
    (dist2 / "second.json").write_text(json.dumps(crash(dist2, "--resume") + configs(dist2, multitask)))
    resumed = torchrun(2, REPO / "tests" / "dist_worker.py", dist2 / "second.json")
    return {"ref": ref, "dist": dist2, "crashed": crashed, "resumed": resumed}


def records(out, strategy, name):
    path = out / strategy / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_close(a, b, tol, where):
    """Same nested structure; numbers within tol (absolute), everything else equal."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_close(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, (int, float)) and not isinstance(a, bool) and b is not None:
        assert abs(a - b) <= tol, f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a} vs {b}"


def compare_runs(ref, dist2, strategy, name):
    a, b = records(ref, strategy, name), records(dist2, strategy, name)
    train = lambda rs: [(r["step"], r["losses"]) for r in rs if r["event"] == "train"]
    val = lambda rs: [(r["step"], r["per_task"], r["mean"]) for r in rs if r["event"] == "val"]
    assert len(train(a)) == 10 and len(val(a)) >= 2
    assert_close(train(a), train(b), 2e-5, f"{name} train losses")
    assert_close(val(a), val(b), 1e-4, f"{name} validation")
    sa = json.loads((ref / strategy / name / "summary.json").read_text())
    sb = json.loads((dist2 / strategy / name / "summary.json").read_text())
    assert (sa["world_size"], sb["world_size"]) == (1, 2)
    assert_close(sa["test"], sb["test"], 1e-4, f"{name} test")
    assert sa["steps"] == sb["steps"] == 10
    return sa, sb


@pytest.mark.parametrize("name,script,extra", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_two_processes_equal_one(runs, name, script, extra):
    folder = Path(script).stem + ("_representation" if "representation" in extra else "")  # run_every_task's suffix
    folder += "_pretrain" if "pretrain" in extra else ""                                       # the objective's
    compare_runs(runs["ref"], runs["dist"], folder, name)


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_aggregated_gram_equals_one_process(runs, stage):
    """The first global batch's losses, clip counts and Gram matrices in both spaces. Pretraining: the corruption
    of the global batch (swaps, masked positions: the counts) and the contrastive negatives of all ranks."""
    name = "gram.pt" if stage == "finetune" else "gram_pretrain.pt"
    a = torch.load(runs["ref"] / name)
    b = torch.load(runs["dist"] / name)
    assert torch.equal(a["counts"], b["counts"]) and a["counts"].min() >= 2
    if stage == "finetune":
        assert a["counts"].min() == 7
    torch.testing.assert_close(b["losses"], a["losses"], rtol=1e-6, atol=1e-7)
    for key in ("G_repr", "G_params"):
        scale = a[key].diagonal().sqrt()  # pretraining, representation space: mfm and mlm have zero rows
        assert ((a[key] - b[key]).abs() / (scale[:, None] * scale[None, :]).clamp(min=1e-30)).max() < 1e-5, key
    assert a["grads"].keys() == b["grads"].keys()
    for n in a["grads"]:
        torch.testing.assert_close(b["grads"][n], a["grads"][n], rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_tag_affinity_is_one_processes_on_every_rank(runs, stage):
    """TAG's lookahead (strategies/task_grouping.py): the all-reduced per-task gradients give every rank the
    same Adam lookahead step, hence one process's Z (a rank-local gradient would change the step's signs).
    Pretraining: every lookahead forward corrupts the global batch alike (one process's draws)."""
    name = "gram.pt" if stage == "finetune" else "gram_pretrain.pt"
    a = torch.load(runs["ref"] / name)["Z"]
    b = torch.load(runs["dist"] / name)["Z"]
    other = torch.load(runs["dist"] / name.replace(".pt", ".rank1.pt"))["Z"]
    assert a.abs().max() > 0
    assert torch.equal(b, other)
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * a.abs().max().item())


def test_a_run_killed_on_one_rank_resumes_to_the_same_end(runs):
    crashed = runs["crashed"]
    assert crashed.returncode != 0 and "exitcode  : 3" in crashed.stderr  # rank 1 exited after step 7
    # the survivor does not wait in its collective: it stops with a report naming the lost rank (issue 28)
    assert "with the other ranks failed" in crashed.stderr and "rank 1 never entered it (dead or hung)" in crashed.stderr, \
        crashed.stderr[-3000:]
    sa, sb = compare_runs(runs["ref"], runs["dist"], "all_at_once_learned", CRASH[0])
    assert sa["decisions"]["final_weights"] != {t: 1.0 for t in sa["tasks"]}  # the weights did learn
    assert_close(sa["decisions"], sb["decisions"], 1e-5, "learned weights")
    # the last checkpoint before the kill: step 5 (validation; --checkpoint-every 4 wrote step 4 before it)
    assert "all_at_once_learned] resumed from" in runs["resumed"].stdout and "at step 5" in runs["resumed"].stdout


def test_a_hung_rank_stops_the_others_after_the_collective_timeout(tiny_data, tmp_path):
    """Rank 1 hangs after step 3 (it never enters the next collective); rank 0 waits --collective-timeout
    seconds, then stops with a report naming rank 1 instead of waiting for ever."""
    argv = [*common_args(tiny_data, tmp_path), "--crash-after-step", "3", "--crash-rank", "1", "--hang",
            "--collective-timeout", "5"]
    t0 = time.perf_counter()
    proc = torchrun(2, REPO / "strategies" / "all_at_once.py", *argv, check=False)
    assert proc.returncode != 0
    assert "rank 1 never entered it (dead or hung)" in proc.stderr, proc.stderr[-3000:]
    assert "Rerun with --resume and the same torchrun --nproc_per_node 2" in proc.stderr
    assert time.perf_counter() - t0 < 120


def test_resume_with_another_world_size_is_refused(runs, tiny_data):
    argv = [*common_args(tiny_data, runs["dist"]), *CRASH[2], "--resume"]
    with pytest.raises(SystemExit, match=r"written by a run of 2 process\(es\), resumed with 1"):
        run_all([[CRASH[1], argv]])


# ---------------------------------------------------------------- one process: the helpers are the identity
def test_shards_cover_the_global_batch_in_order():
    batch = list(range(10, 17))  # 7 clips on 3 ranks: 3, 2, 2
    parts = [distributed.shard(batch, r, 3) for r in range(3)]
    assert [p for p, _ in parts] == [[10, 11, 12], [13, 14], [15, 16]]
    assert [distributed.shard_start(7, r, 3) for r in range(3)] == [0, 3, 5]
    assert distributed.shard([5], 1, 2) == ([5], True)   # no clip left: a masked ghost
    assert distributed.shard([5], 0, 2) == ([5], False)


def test_single_process_reductions_are_the_plain_formulas():
    assert not distributed.is_distributed()
    per_item = torch.rand(6, 3, requires_grad=True)
    mask = torch.rand(6, 3) > 0.3
    losses, counts = distributed.global_task_losses(per_item, mask)
    assert torch.equal(losses, masked_mean(per_item, mask)) and torch.equal(counts, mask.sum(0).float())
    G = torch.rand(3, 3, dtype=torch.float64)
    assert distributed.all_reduce_gram(G) is G
    assert distributed.any_true(True) and not distributed.any_true(False)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.gather_objects(3) == [3]
    batch = {"text_ids": torch.ones(2, 3), "global_batch_size": 2, "shard_start": 0}
    assert distributed.gather_global_batch(batch) is batch
    rows = torch.rand(4, 2)
    assert distributed.gather_rows(rows, [4]) is rows


def test_shard_sizes_match_the_shards():
    for n in range(1, 12):
        for world in (1, 2, 3, 5):
            sizes = distributed.shard_sizes(n, world)
            assert sum(sizes) == n
            for r in range(world):
                part, ghost = distributed.shard(list(range(n)), r, world)
                assert (0 if ghost else len(part)) == sizes[r]
                assert distributed.shard_start(n, r, world) == sum(sizes[:r]) or ghost


def test_reduce_scatter_is_refused_where_the_rule_reads_the_rows(tiny_data, tmp_path):
    from common.multitask import add_update_args, make_update
    from common.arguments import build_parser
    from common.train import Run
    base = ["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--quiet",
            "--task-grad-sync", "reduce-scatter"]
    for flags, why in ((["--aggregator", "graddrop"], "graddrop reads the whole T x P rows"),
                       (["--aggregator", "pcgrad", "--grad-space", "representation"], "--grad-space representation")):
        run = Run(add_update_args(build_parser()).parse_args(base + flags), strategy="rs")
        with pytest.raises(ValueError, match=why):
            make_update(run, run.args)


def test_reduce_scatter_blocks_rebuild_the_rows_and_their_gram():
    """The arithmetic of the sharded path without a process group: the column blocks (padded) of W ranks hold
    the rows, and their Gram matrices add up to the whole one."""
    from common import gradagg
    grads = torch.randn(5, 23, dtype=torch.float32)
    for W in (2, 3, 4):
        width = -(-23 // W)
        blocks = [grads[:, r * width:(r + 1) * width] for r in range(W)]
        G = sum(gradagg.gram(b.contiguous(), check=False) for b in blocks)
        torch.testing.assert_close(G, gradagg.gram(grads), rtol=1e-12, atol=1e-6)


# ---------------------------------------------------------------- fp16 loss scaling of the multi-task update
def scaled_update_grads(data, out, scale, flags, steps=2):
    """The gradients the optimizer receives on the first steps of a common.multitask update, with the fp16
    scaler's machinery at `scale` (on an fp32 forward, so that only the scaling differs) or without one."""
    from common.multitask import add_update_args, make_update
    from common.arguments import build_parser
    from common.train import Run
    args = add_update_args(build_parser()).parse_args(
        ["--data", str(data), "--out", str(out), "--model-size", "tiny", "--batch-size", "8", "--epochs", "1",
         "--quiet", "--zero-dropout", *flags])
    run = Run(args, strategy="scale_probe")
    if scale is not None:
        run.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    update = make_update(run, args)
    run.start(update=update)
    run.initial_params = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    seen, opt_step = [], run.optimizer.step
    def recording_step(*a, **k):
        seen.append({n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None})
        return opt_step(*a, **k)
    run.optimizer.step = recording_step
    for batch in run.batches():
        update.step(batch)
        if run.step_count == steps:
            break
    return seen, run


@pytest.mark.parametrize("flags", [["--aggregator", "nash_mtl", "--weighting", "gradnorm"],
                                   ["--aggregator", "nash_mtl", "--grad-space", "representation"],
                                   ["--weighting", "uncertainty"]], ids=["params", "representation", "sum"])
def test_the_fp16_loss_scale_does_not_change_the_update(tiny_data, tmp_path, flags):
    """Terms x loss_scale, G / loss_scale**2 for the aggregator (Nash-MTL's weights are not scale-invariant)
    and GradNorm, run.step(scaled=True) unscales: the optimizer sees the unscaled run's gradients (2**10 is
    a power of two, so the scaling itself is exact)."""
    plain, _ = scaled_update_grads(tiny_data, tmp_path / "a", None, flags)
    scaled, run = scaled_update_grads(tiny_data, tmp_path / "b", 2.0 ** 10, flags)
    assert len(plain) == len(scaled) == 2 and run.progress.get("fp16_overflow_skips", 0) == 0
    for a, b in zip(plain, scaled):
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-9, msg=n)


def test_an_fp16_overflow_in_the_per_task_gradients_is_the_scalers_skip(tiny_data, tmp_path):
    """Scaled per-task gradients that overflow: no error from the Gram matrix, the aggregator is not asked,
    the step is skipped (the fused Adam is handed found_inf and skips inside: no parameter moves) and the
    scale lowered."""
    seen, run = scaled_update_grads(tiny_data, tmp_path, 2.0 ** 127, ["--aggregator", "pcgrad"], steps=1)
    assert run.progress["fp16_overflow_skips"] == 1 and run.scaler.get_scale() < 2.0 ** 127
    for n, p in run.model.named_parameters():
        assert torch.equal(p.detach(), run.initial_params[n]), n
    states = [s for s in run.optimizer.state.values() if "step" in s]
    assert all(float(s["step"]) == 0 for s in states)


def test_a_hand_written_scaled_backward_works_on_the_first_step(tiny_data, tmp_path):
    """A strategy that writes .grad itself from losses x run.loss_scale and calls run.step(None, scaled=True)
    on the very first step of a fresh scaler: no 'unscale_ before scale' error, and the optimizer sees the
    unscaled gradient (fp32 forward with the scaler's machinery, as above: CPU has no fp16 LSTM)."""
    from common.arguments import build_parser
    from common.train import Run
    args = build_parser().parse_args(["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny",
                                      "--batch-size", "8", "--epochs", "1", "--quiet", "--zero-dropout",
                                      "--clip-grad", "0"])
    run = Run(args, strategy="hand_scaled")
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    run.start()
    batch = next(iter(run.batches()))
    losses = run.task_losses(batch)
    run.optimizer.zero_grad(set_to_none=True)
    (losses.sum() * run.loss_scale).backward()
    p = next(p for p in run.model.parameters() if p.grad is not None and p.grad.abs().sum() > 0)
    expected = p.grad.clone() / 2.0 ** 10
    seen, opt_step = [], run.optimizer.step
    run.optimizer.step = lambda *a, **k: (seen.append(p.grad.clone()), opt_step(*a, **k))[1]
    assert run.step(None, losses, batch, scaled=True) and len(seen) == 1
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-12)


def test_fp16_on_cpu_is_a_clear_error(tiny_data, tmp_path):
    from common.arguments import build_parser
    from common.train import Run
    args = build_parser().parse_args(["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny",
                                      "--quiet", "--precision", "fp16"])
    with pytest.raises(SystemExit, match="fp16 on CPU"):
        Run(args, strategy="fp16_cpu")


def test_bf16_on_cpu_runs_where_the_processor_has_it_else_is_a_clear_error(tiny_data, tmp_path):
    """oneDNN's bf16 LSTM needs AVX512-BF16 or AMX: with it a bf16 step trains (fp32 losses), without it
    the run stops at start-up, saying why, instead of failing inside the first forward."""
    from common.model import cpu_bf16_lstm_problem
    from common.arguments import build_parser
    from common.train import Run
    args = build_parser().parse_args(["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny",
                                      "--quiet", "--precision", "bf16", "--batch-size", "8"])
    if cpu_bf16_lstm_problem():
        with pytest.raises(SystemExit, match="bf16 on this CPU.*AVX512-BF16 or AMX"):
            Run(args, strategy="bf16_cpu")
        return
    run = Run(args, strategy="bf16_cpu")
    run.start()
    batch = next(iter(run.batches()))
    losses = run.task_losses(batch)
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()


def test_evals_per_epoch_below_one_is_a_clear_error(tiny_data, tmp_path):
    from common.arguments import build_parser
    from common.train import Run
    args = build_parser().parse_args(["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny",
                                      "--quiet", "--evals-per-epoch", "0"])
    with pytest.raises(SystemExit, match="--evals-per-epoch 0"):
        Run(args, strategy="evals0")
