"""Training helpers: exact resume, the NaN/Inf guard, the data order."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.arguments import build_parser
from common.data import epoch_batches
from common.train import NonFiniteError, Run, adam

REPO = Path(__file__).resolve().parents[1]


def args_for(tiny_data, tmp_path, *extra):
    return build_parser().parse_args(
        ["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--epochs", "2",
         "--batch-size", "8", "--eval-every", "5", "--checkpoint-every", "3", "--quiet", *extra])


def test_epoch_batches_depend_only_on_seed_and_epoch():
    a = epoch_batches(50, 8, seed=1, epoch=3)
    assert a == epoch_batches(50, 8, seed=1, epoch=3)
    assert a != epoch_batches(50, 8, seed=1, epoch=4)
    assert sorted(i for b in a for i in b) == list(range(50))
    lengths = [i % 7 for i in range(50)]
    bucketed = epoch_batches(50, 8, seed=1, epoch=0, lengths=lengths)
    assert sorted(i for b in bucketed for i in b) == list(range(50))


def run_script(tiny_data, out, *extra, check=True):
    cmd = [sys.executable, str(REPO / "strategies" / "all_at_once.py"), "--data", str(tiny_data), "--out", str(out),
           "--model-size", "tiny", "--epochs", "2", "--batch-size", "8", "--eval-every", "5",
           "--checkpoint-every", "3", "--quiet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=300)


def summary_of(out):
    return json.loads((out / "all_at_once" / "seed0" / "summary.json").read_text())


def test_fused_adam_matches_the_default_adam():
    """Run's optimizer (common.train.adam, fused) makes the default Adam's updates, weight decay included."""
    torch.manual_seed(0)
    params = [torch.randn(50, 7), torch.randn(7)]
    a = [p.clone().requires_grad_() for p in params]
    b = [p.clone().requires_grad_() for p in params]
    opt_a, opt_b = adam(a, lr=1e-2, weight_decay=0.01), torch.optim.Adam(b, lr=1e-2, weight_decay=0.01)
    for step in range(20):
        grads = [torch.randn_like(p) * (step + 1) for p in params]
        for opt, ps in ((opt_a, a), (opt_b, b)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    assert opt_a.state_dict()["state"][0].keys() == opt_b.state_dict()["state"][0].keys()


def test_interrupted_run_resumes_to_identical_metrics(tiny_data, tmp_path):
    full = tmp_path / "full"
    run_script(tiny_data, full)
    part = tmp_path / "part"
    # killed after step 7 (checkpoints at 3, 5 (eval), 6), then resumed to the end
    crashed = run_script(tiny_data, part, "--crash-after-step", "7", check=False)
    assert crashed.returncode == 3
    ckpt = torch.load(part / "all_at_once" / "seed0" / "checkpoint.pt", weights_only=False)
    assert ckpt["progress"]["step"] == 6
    run_script(tiny_data, part, "--resume")
    a, b = summary_of(full), summary_of(part)
    assert a["steps"] == b["steps"] > 7
    assert a["test"] == b["test"]
    assert a["val"] == b["val"]
    lines = lambda d: [json.loads(x) for x in (d / "all_at_once" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    vals = lambda d: [(r["step"], r["mean"]) for r in lines(d) if r["event"] == "val"]
    assert vals(full) == vals(part)


def test_checkpoint_cadence_in_wall_time_and_at_a_new_best(tiny_data, tmp_path):
    """Without a step cadence: a checkpoint after a validation that made a new best (the first one always does),
    none between evaluations while --checkpoint-minutes has not passed, and one at every step once it has."""
    def last_checkpoint_step(out, *extra):
        crashed = run_script(tiny_data, out, "--checkpoint-every", "0", "--crash-after-step", "7", *extra, check=False)
        assert crashed.returncode == 3, crashed.stderr
        return torch.load(out / "all_at_once" / "seed0" / "checkpoint.pt", weights_only=True)["progress"]["step"]
    assert last_checkpoint_step(tmp_path / "slow", "--checkpoint-minutes", "60") == 5      # the eval at step 5
    assert last_checkpoint_step(tmp_path / "due", "--checkpoint-minutes", "1e-9") == 6     # every step is due
    assert last_checkpoint_step(tmp_path / "off", "--checkpoint-minutes", "0") == 5


def test_sigterm_checkpoints_and_resume_finishes(tiny_data, tmp_path):
    import signal
    import time
    cmd = [sys.executable, str(REPO / "strategies" / "all_at_once.py"), "--data", str(tiny_data), "--out", str(tmp_path),
           "--model-size", "tiny", "--epochs", "50", "--batch-size", "8", "--checkpoint-every", "1000", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt_dir = tmp_path / "all_at_once" / "seed0"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    step = torch.load(ckpt_dir / "checkpoint.pt", weights_only=False)["progress"]["step"]
    assert step > 0
    assert "rerun with --resume" in out


def test_nonfinite_loss_stops_with_report_or_skips(tiny_data, tmp_path):
    run = Run(args_for(tiny_data, tmp_path), strategy="guard")
    run.start()
    batch = next(run.batches())
    with torch.no_grad():  # poison one parameter of the video branch
        name, p = next((n, p) for n, p in run.model.named_parameters() if "video" in n)
        p.fill_(float("nan"))
    losses = run.task_losses(batch)
    with pytest.raises(NonFiniteError) as err:
        run.step(losses.sum(), losses, batch)
    msg = str(err.value)
    assert "step 0" in msg and "binary" in msg and "video" in msg

    run.args.on_nonfinite = "skip"
    before = [p.detach().clone() for p in run.model.parameters()]
    assert run.step(losses.sum(), losses, batch) is False
    assert run.progress["nonfinite_skips"] == 1
    after = list(run.model.parameters())
    assert all(torch.equal(a, b) or torch.isnan(a).all() for a, b in zip(before, after))


def test_all_finite_is_one_fused_check_that_misses_nothing():
    from common.train import all_finite
    grads = [torch.randn(3, 4), torch.randn(5), torch.randn(2, dtype=torch.float64)]
    assert all_finite(grads) and all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        g = [t.clone() for t in grads]
        g[2][1] = bad
        assert not all_finite(g)
    big = [torch.full((4,), 3e38)]   # finite, though its 2-norm overflows: not flagged
    assert all_finite(big)


def test_a_cpu_run_checkpoints_without_touching_cuda(tiny_data, tmp_path, monkeypatch):
    """On a GPU machine a CPU run must not initialise CUDA to save its RNGs (issue 28): only a run that has
    CUDA initialised stores the CUDA generators."""
    run = Run(args_for(tiny_data, tmp_path), strategy="cpu_on_gpu_machine")
    run.start()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def no_cuda(*_a, **_k):
        raise AssertionError("CUDA touched by a CPU run's checkpoint")
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", no_cuda)
    run.save_checkpoint()
    run.load_checkpoint()
    assert "cuda" not in torch.load(run.dir / "checkpoint.pt", weights_only=True)["rng"]


def test_only_rank_0_serialises_a_file(tmp_path, monkeypatch):
    """Under torchrun the ranks above 0 neither build nor serialise the files rank 0 writes (issue 28)."""
    from common import distributed
    from common.files import atomic_save
    monkeypatch.setattr(distributed, "is_main", lambda: False)

    def no_save(*_a, **_k):
        raise AssertionError("a rank above 0 serialised a checkpoint")
    monkeypatch.setattr(torch, "save", no_save)
    atomic_save({"w": torch.zeros(3)}, tmp_path / "checkpoint.pt")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_deterministic_switches_off_the_fused_attention_backends(tiny_data, tmp_path):
    """--deterministic on CUDA: the flash / memory-efficient / cuDNN attention backward passes are not
    deterministic and use_deterministic_algorithms(warn_only=True) lets them run, so the run selects the math
    backend (issue 28). The flags are global; they are restored here."""
    saved = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.cudnn_sdp_enabled(), torch.are_deterministic_algorithms_enabled())
    try:
        Run(args_for(tiny_data, tmp_path, "--deterministic"), strategy="deterministic_probe")
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(saved[0])
        torch.backends.cuda.enable_mem_efficient_sdp(saved[1])
        torch.backends.cuda.enable_cudnn_sdp(saved[2])
        torch.use_deterministic_algorithms(saved[3])


def test_evaluation_is_sharded_across_ranks_and_gives_the_single_process_scores(tiny_data, tmp_path, monkeypatch):
    """Under torchrun each rank predicts every world_size-th batch of the same plan and the ranks exchange
    them (issue 28: every rank evaluated the whole split): the scores equal one process's exactly."""
    from common import distributed
    run = Run(args_for(tiny_data, tmp_path, "--eval-batch-size", "4"), strategy="sharded_eval")
    one_scores, one_labels = run.predict(run.val_set)
    shares = {}

    class Captured(Exception):
        pass

    def capture(parts):
        shares[distributed.rank()] = parts
        raise Captured
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "gather_objects", capture)
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        with pytest.raises(Captured):
            run.predict(run.val_set)
    n_batches = -(-len(run.val_set) // 4)
    assert [k for k, _, _ in shares[0]] == list(range(0, n_batches, 2))
    assert [k for k, _, _ in shares[1]] == list(range(1, n_batches, 2))
    monkeypatch.setattr(distributed, "gather_objects", lambda parts: [shares[0], shares[1]])
    scores, labels = run.predict(run.val_set)
    assert (scores == one_scores).all() and (labels == one_labels).all()


def syntax_nodes(paths):
    """(path, node) for every node of each file's syntax tree: the tests below read the code, not run it."""
    import ast
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            yield path, node


def test_every_strategy_flag_says_what_it_does_in_help():
    """--help lists a strategy's own flags first (issue 27): each of them, and --weighting / --aggregator,
    carries a help text (read from the code, so it needs no start-up of the twenty scripts)."""
    import ast
    silent = []
    for path, node in syntax_nodes(sorted((REPO / "strategies").glob("*.py")) + [REPO / "common" / "multitask.py"]):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" \
                and not any(k.arg == "help" for k in node.keywords):
            silent.append(f"{path.name}:{node.lineno} {ast.literal_eval(node.args[0])}")
    assert not silent, silent


def test_code_outside_run_uses_only_its_documented_surface():
    """Issue 27: the scripts and rules use a Run through the surface common/train.py's docstring lists
    (run.X there), nothing else of it. Read from the code: every run.X and self.run.X outside train.py
    (launch.py and compare.py call their GridRun `run`: left out)."""
    import ast
    import re
    surface = set(re.findall(r"run\.(\w+)", ast.get_docstring(ast.parse((REPO / "common" / "train.py").read_text()))))
    outside = []
    paths = [p for p in sorted((REPO / "strategies").glob("*.py")) + sorted((REPO / "common").glob("*.py"))
             if p.name not in ("train.py", "launch.py", "compare.py")]
    for path, node in syntax_nodes(paths):
        if not isinstance(node, ast.Attribute):
            continue
        v = node.value
        if (isinstance(v, ast.Name) and v.id == "run") or (isinstance(v, ast.Attribute) and v.attr == "run"
                                                             and isinstance(v.value, ast.Name) and v.value.id == "self"):
            if node.attr not in surface:
                outside.append(f"{path.relative_to(REPO)}:{node.lineno} run.{node.attr}")
    assert not outside, outside
