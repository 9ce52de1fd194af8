"""make bench: speed and memory figures measured side by side in one run (issue 17).

The machine may be shared: only compare numbers printed by the same run. The sides alternate (A B, B A,
...) and the load average is printed before and after each section. Section 1 averages over batches picked
at evenly spaced length quantiles of the default epoch (a mean, so it estimates an epoch's throughput);
the other sections give medians over repeats.

1. Training step (forward, backward, clip, Adam) against a baseline that processes like the original code
   (tests/bench/bench_original.py: text padded to 500, no text mask, padded nn.LSTM, BCE on softmax), same
   model and weights, same clips (default length-bucketed batches); small and full size, batch 8 and 16;
   fp32, and bf16 autocast beside it where --precision exists. The baseline uses PyTorch's dropout and
   default (per-tensor) Adam as the original does; ours the cheap dropout and fused Adam.
2. The step of every rule as the strategy scripts run it (common/multitask.py make_update +
   MultiTaskUpdate.step; small model, batch 16) against the equal-weight step: each weighting (gradnorm,
   famo with its no-grad forward on the same batch, dwa, rlw, uncertainty) and each aggregator of
   common/aggregators.py in both gradient spaces (params: one backward per task; pcgrad and mgda also
   batched), with issue 17's targets.
3. Each component's share of a step (forward of text encoder, video/audio branches, cross-attention,
   pooling, heads; backward; clip + optimizer).
4. Peak memory (VmHWM) of one full-size step at batch 16 (random weights), each configuration in a fresh
   process (run before the others, while this process is small): fp32, with --grad-checkpointing (target <= 8 GB), and without --quick bf16 and the
   original-like baseline.
5. Denormals: step time with torch.set_flush_denormal on and off, and a count of subnormal values.
6. Evaluation: no_grad at batch 64 in dataset order (before), inference_mode at batch 128, and Run.predict
   (inference_mode, batch 128, clips in order of text length).
7. Aggregation alone (T = 5): tests/bench/bench_gradagg.py.
8. Trunks (--trunk): samples/s of a training step of each at the small size (tests/bench/bench_trunks.py).
10. Checkpoint cost: Run.save_checkpoint and the restricted (weights_only) load of it at tiny, small and
   full size after one Adam step, and the checkpoint's size (issue 31: why the cadence is in wall time).
11. torchrun traffic of parameter-space aggregation (issue 28): the bytes each rank sends per step with
   --task-grad-sync all-reduce and reduce-scatter (counted by common/distributed.py as ring collectives
   send them), measured on a 2-process gloo run of pcgrad (tiny model), and the same arithmetic for the
   full-size model's shared parameters at 2, 4 and 8 ranks.
9. GPU, only where CUDA is present (tests/bench/bench_gpu.py): small and full model at fp32 and bf16, peak
   memory (max_memory_allocated), the CUDA kernel's gram + combine against the copy bandwidth and
   torch.mm. Without CUDA it prints the one line "GPU section: skipped (no CUDA)".

    python tests/bench/bench.py            # everything (over 25 min on 2 cores: full size in sections 1 and 4)
    python tests/bench/bench.py --quick    # fewer repeats, batch 16 only at full size, smaller aggregation sizes
    python tests/bench/bench.py --only 2,5 # some sections
    python tests/bench/bench.py --only 9   # the GPU section alone (tests/gpu_check.sh runs it on a GPU machine)
"""
import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "bench"))

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from bench_original import original_batch, original_like_step  # noqa: E402
from common.data import H5Dataset, collate, feature_stats  # noqa: E402
from common.model import MODEL_SIZES, cpu_bf16_lstm_problem  # noqa: E402
from common.trunks import build_model  # noqa: E402
from common.multitask import add_update_args, make_update  # noqa: E402
from common.arguments import build_parser  # noqa: E402
from common.data import DEFAULT_DATA, epoch_batches  # noqa: E402
from common.objectives import losses_from_logits  # noqa: E402
from common.train import Run, adam  # noqa: E402
from data_prep.synthesize import ensure_data  # noqa: E402

TASK_COUNT = 5


def has_flag(name):
    """Whether the strategies' parser (common/arguments.py) has this option yet."""
    return hasattr(build_parser().parse_args([]), name.lstrip("-").replace("-", "_"))


def load_avg():
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def interleaved(fns, repeats):
    """{name: [seconds]} of each fn over repeats, the order alternating every repeat. fns: {name: fn(r)}."""
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name](r)
            times[name].append(time.perf_counter() - t0)
    return times


def median_ms(v):
    return 1000 * statistics.median(v)


def datasets(data):
    stats = feature_stats(data / "train.h5")
    return H5Dataset(data / "train.h5", stats), H5Dataset(data / "val.h5", stats)


def bucketed_items(dataset, batch_size, count, seed=0):
    """`count` batches of the default (length-bucketed) epoch, as lists of items, spread over the epoch's
    batch lengths: the batches at the quantiles (i + 0.5) / count of their longest text, in epoch order.
    Their mean step time estimates the epoch's (the first few batches of an epoch can all be short)."""
    lengths = dataset.text_lengths()
    plan = epoch_batches(len(dataset), batch_size, seed=seed, epoch=0, lengths=lengths)
    by_length = sorted(range(len(plan)), key=lambda j: max(lengths[i] for i in plan[j]))
    picked = sorted({by_length[int((i + 0.5) * len(plan) / count)] for i in range(count)})
    return [[dataset[i] for i in plan[j]] for j in picked]


def longest_items(dataset, batch_size, seed=0):
    """The default epoch's batch with the longest text (the one that sets a run's peak memory)."""
    lengths = dataset.text_lengths()
    plan = epoch_batches(len(dataset), batch_size, seed=seed, epoch=0, lengths=lengths)
    return [dataset[i] for i in max(plan, key=lambda b: max(lengths[i] for i in b))]


def our_step(model, optimizer, batch, autocast_dtype=None, device_type="cpu"):
    """This project's step as Run.step does it: cross-entropy on logits, clip 1.0, Adam (pass Run's: fused)."""
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(batch)
    loss = losses_from_logits(logits.float(), batch["labels"]).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------- 1. step against the original-like baseline
def step_vs_original(train, sizes, batch_sizes, repeats):
    bf16 = has_flag("--precision") and not cpu_bf16_lstm_problem()
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        model = build_model(MODEL_SIZES[size])
        # the original's default (per-tensor) Adam, and ours (Run's: fused); same hyper-parameters
        original_optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
        optimizer = adam(model.parameters(), lr=1e-5)
        for bs in batch_sizes:
            items = bucketed_items(train, bs, repeats + 1)
            ours = [collate(b) for b in items]
            orig = [original_batch(b) for b in items]
            our_step(model, optimizer, ours[-1])        # warm-up (Adam state, kernel set-up), both sides
            original_like_step(model, original_optimizer, orig[-1])
            fns = {"original-like": lambda r: original_like_step(model, original_optimizer, orig[r]),
                   "ours fp32": lambda r: our_step(model, optimizer, ours[r])}
            if bf16:
                our_step(model, optimizer, ours[-1], torch.bfloat16)
                fns["ours bf16"] = lambda r: our_step(model, optimizer, ours[r], torch.bfloat16)
            t = interleaved(fns, repeats)   # repeat r runs batch r: the mean over them is the epoch's estimate
            base = statistics.mean(t["original-like"])
            tokens = statistics.mean(b["text_ids"].shape[1] for b in ours[:repeats])
            row = [size, bs, f"{tokens:.0f} / 500", bs / base]
            for name in ("ours fp32", "ours bf16"):
                if name in t:
                    row += [bs / statistics.mean(t[name]), base / statistics.mean(t[name])]
                else:
                    row += ["n/a", "n/a"]
            rows.append(row)
            print(f"  {size} batch {bs}: mean over {repeats} batches of " + ", ".join(
                f"{k} {1000 * statistics.mean(v):.0f} ms" for k, v in t.items()), flush=True)
        model = optimizer = original_optimizer = None  # free before the next size (lambdas bind late)
    headers = ["size", "batch", "text tokens (ours / orig.)", "orig.-like samples/s", "ours fp32 samples/s",
               "x orig.", "ours bf16 samples/s", "x orig."]
    print(tabulate(rows, headers=headers, floatfmt=".2f"))
    if not bf16:
        print(f"(bf16: n/a, {cpu_bf16_lstm_problem() or 'common/arguments.py has no --precision flag yet'})")


# ---------------------------------------------------------------- 2. cost of each rule's step
def update_configs():
    """(label, weighting, aggregator, grad space, batched backward, target) of every rule's step: each
    weighting with the plain sum, each aggregator in both gradient spaces (parameter space one backward
    per task, the default), and PCGrad and MGDA also with the batched backward. Targets: issue 17."""
    from common.aggregators import AGGREGATORS
    from common.gradient_rules import GRADIENT_RULES
    configs = [("equal weights (sum)", "equal", "sum", "-", False, ""),
               ("gradnorm (last shared layer)", "gradnorm", "sum", "params", False, "<= 1.1"),
               ("famo (incl. its no-grad forward on the same batch)", "famo", "sum", "-", False, ""),
               ("dwa", "dwa", "sum", "-", False, ""),
               ("rlw", "rlw", "sum", "-", False, ""),
               ("uncertainty", "uncertainty", "sum", "-", False, ""),
               ("gls", "gls", "sum", "-", False, ""),
               ("stch", "stch", "sum", "-", False, "")]
    for name in AGGREGATORS:
        target = "<= 1.5" if name in ("pcgrad", "mgda") else ""
        configs.append((name, "equal", name, "params", False, target))
        if name in ("pcgrad", "mgda"):
            configs.append((name + ", batched backward", "equal", name, "params", True, target))
        configs.append((name, "equal", name, "representation", False, ""))
    for name, cls in GRADIENT_RULES.items():  # they need the T x P rows themselves (needs_task_grad_matrix)
        configs.append((name + " (T x P rows)", "equal", name, "params", False, ""))
        if cls.supports_representation:
            configs.append((name + " (T x P rows)", "equal", name, "representation", False, ""))
    return configs


def gradient_steps(data, repeats, size="small"):
    """The real step of every rule (common/multitask.py: make_update + MultiTaskUpdate.step, as the
    strategy scripts run it) on one small model, batch 16, interleaved; ratios to the equal-weight step.
    Every update steps the same model (the cost of a step does not depend on the weights' values)."""
    out = tempfile.mkdtemp(prefix="bench_runs_")
    args = build_parser().parse_args(["--data", str(data), "--model-size", size, "--batch-size", "16",
                                      "--out", out, "--quiet"])
    run = Run(args, strategy="bench")
    updates, rows_meta = {}, {}
    for label, weighting, aggregator, space, batched, target in update_configs():
        key = f"{label} [{space}]"
        update_args = add_update_args(build_parser()).parse_args(
            ["--weighting", weighting, "--aggregator", aggregator, "--grad-space", "params" if space == "-" else space])
        update = make_update(run, update_args)
        if batched:
            update.task_grads.batched = True
        updates[key] = update
        rows_meta[key] = (label, space, target)
    plan = epoch_batches(len(run.train_set), 16, seed=0, epoch=0, lengths=run.lengths)[:repeats + 1]
    batches = list(run.loader(plan, run.train_set))

    def forward_no_grad(r):  # FAMO's extra forward alone, to see its part of the famo row
        with torch.no_grad():
            run.per_item_losses(batches[r])
    shared = [p for p in run.model.shared_parameters() if p.requires_grad]

    def t_backward_floor(r):
        """Forward, T backward passes through the shared trunk, clip, Adam, and nothing else: the least
        work of any rule that needs the T exact per-task gradients of the shared parameters."""
        _, per_item, _ = run.per_item_losses(batches[r])
        losses = per_item.mean(dim=0)
        run.optimizer.zero_grad(set_to_none=True)
        for t in range(TASK_COUNT - 1):
            torch.autograd.grad(losses[t], shared, retain_graph=True, allow_unused=True)
        losses.sum().backward()
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
        run.optimizer.step()
    fns = {key: (lambda r, u=u: u.step(batches[r])) for key, u in updates.items()}
    extras = {"(no-grad forward alone: FAMO's extra)": forward_no_grad,
              f"(floor of exact parameter space: forward + {TASK_COUNT} backward passes + Adam)": t_backward_floor}
    for name, fn in extras.items():
        fns[name] = fn
        rows_meta[name] = (name, "-", "")
    for fn in fns.values():
        fn(repeats)  # warm-up on the spare batch
    t = interleaved(fns, repeats)
    base = statistics.median(t["equal weights (sum) [-]"])
    rows = []
    for key, v in t.items():
        label, space, target = rows_meta[key]
        ratio = statistics.median(v) / base
        verdict = "" if not target else ("met" if ratio <= float(target.split()[-1]) else "not met")
        rows.append([label, space, median_ms(v), ratio, f"{target} {verdict}".strip()])
    print(f"{size} model, batch 16, median of {repeats} interleaved repeats; x equal = ms / ms of the equal-weight step")
    print(tabulate(rows, headers=["rule", "gradient space", "ms/step", "x equal", "target (issue 17)"],
                   floatfmt=".2f"))
    floor = statistics.median(t[next(k for k in extras if k.startswith("(floor"))]) / base
    print(f"The floor row is what T = {TASK_COUNT} exact per-task gradients cost on this machine however they are "
          f"combined ({floor:.2f}x): a parameter-space rule cannot be under it, so a target below it cannot be met "
          f"here; batching the T passes does the same arithmetic ({TASK_COUNT}x the backward's FLOPs).")
    fallbacks = {key: u.task_grads.batch_fallback for key, u in updates.items()
                 if u.task_grads is not None and u.task_grads.batch_fallback}
    for key, why in fallbacks.items():
        print(f"  {key}: batched backward fell back to T passes: {why}")
    return run


# ---------------------------------------------------------------- 3. component shares
class ComponentTimer:
    """Forward time of named modules (forward pre/post hooks), summed over calls; nested calls of the same
    module are not double counted."""

    def __init__(self, groups):
        self.seconds = {name: 0.0 for name in groups}
        self.handles = []
        for name, modules in groups.items():
            for m in modules:
                self.handles.append(m.register_forward_pre_hook(self._pre(name, m)))
                self.handles.append(m.register_forward_hook(self._post(name, m)))
        self.started = {}

    def _pre(self, name, module):
        def hook(*_):
            self.started[id(module)] = time.perf_counter()
        return hook

    def _post(self, name, module):
        def hook(*_):
            self.seconds[name] += time.perf_counter() - self.started.pop(id(module))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def component_shares(train, size, batch_size, repeats):
    torch.manual_seed(0)
    model = build_model(MODEL_SIZES[size])
    optimizer = adam(model.parameters(), lr=1e-5)
    branches = list(model.branches.values())
    attn = [b.attn for b in branches]
    groups = {"text encoder": [model.text_encoder], "video branch (BiLSTM + projection)": [model.video_encoder],
              "audio branch (BiLSTM + projection)": [model.audio_encoder], "cross-attention + pooling": branches,
              "heads": list(model.heads.values())}
    batches = [collate(b) for b in bucketed_items(train, batch_size, repeats + 1)]
    our_step(model, optimizer, batches[-1])
    totals = {k: 0.0 for k in list(groups) + ["(of which) cross-attention", "other forward (masks, concat, loss)",
                                             "backward", "clip + Adam"]}
    attn_timer_groups = {"(of which) cross-attention": attn}
    step_total = 0.0
    for r in range(repeats):
        timer, attn_timer = ComponentTimer(groups), ComponentTimer(attn_timer_groups)
        t0 = time.perf_counter()
        loss = losses_from_logits(model(batches[r]), batches[r]["labels"]).sum()
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        t3 = time.perf_counter()
        timer.remove(), attn_timer.remove()
        for k, v in list(timer.seconds.items()) + list(attn_timer.seconds.items()):
            totals[k] += v
        totals["other forward (masks, concat, loss)"] += (t1 - t0) - sum(timer.seconds.values())
        totals["backward"] += t2 - t1
        totals["clip + Adam"] += t3 - t2
        step_total += t3 - t0
    rows = [[k, 1000 * v / repeats, 100 * v / step_total] for k, v in totals.items()]
    rows.append(["step", 1000 * step_total / repeats, 100.0])
    print(f"model {size}, batch {batch_size}, {repeats} steps")
    print(tabulate(rows, headers=["component (forward unless named)", "ms/step", "% of step"], floatfmt=".1f"))


# ---------------------------------------------------------------- 4. peak memory, one process per configuration
def release_memory():
    """Collect, then hand glibc's free heap pages back to the OS (malloc_trim). After sections 1-3 this
    process held 15.7 GB, and the memory probes' children beside it were killed for memory: section 4 now
    runs first, and each section ends with this."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def vm_value(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    return None


def memory_probe(config):
    """Child process: one step of a configuration, then print {"rss_before", "peak"} as JSON."""
    data = ensure_data(DEFAULT_DATA)
    train, _ = datasets(data)
    items = longest_items(train, config["batch_size"])
    torch.manual_seed(0)
    model = build_model(MODEL_SIZES[config["size"]], grad_checkpointing=config.get("grad_checkpointing", False))
    optimizer = (torch.optim.Adam if config.get("original") else adam)(model.parameters(), lr=1e-5)
    before = vm_value("VmRSS")
    t0 = time.perf_counter()
    if config.get("original"):
        original_like_step(model, optimizer, original_batch(items))
    else:
        our_step(model, optimizer, collate(items), torch.bfloat16 if config.get("bf16") else None)
    print(json.dumps({"rss_before": before, "peak": vm_value("VmHWM"), "seconds": time.perf_counter() - t0,
                      "tokens": collate(items)["text_ids"].shape[1]}))


MEMORY_TARGET_GB = 8  # issue 17: a full-size step at batch 16 with --grad-checkpointing


def peak_memory(size, batch_size, quick):
    configs = [("fp32", {})]
    if has_flag("--grad-checkpointing"):
        configs.append(("fp32, --grad-checkpointing", {"grad_checkpointing": True}))
    if not quick:
        if has_flag("--precision") and not cpu_bf16_lstm_problem():
            configs.append(("bf16", {"bf16": True}))
        configs.append(("original-like (fp32)", {"original": True}))
    rows, tokens = [], None
    for label, extra in configs:
        config = dict(size=size, batch_size=batch_size, **extra)
        proc = subprocess.run([sys.executable, __file__, "--memory-probe", json.dumps(config)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append([label, "failed", proc.stderr.strip().splitlines()[-1][:100] if proc.stderr else ""])
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        tokens = result["tokens"]
        target = ""
        if extra.get("grad_checkpointing"):
            target = f"<= {MEMORY_TARGET_GB} GB: " + ("met" if result["peak"] <= MEMORY_TARGET_GB * 1e9 else "not met")
        rows.append([label, result["peak"] / 1e9, result["peak"] / 2**30, (result["peak"] - result["rss_before"]) / 2**30,
                     result["seconds"], target])
        print(f"  {label}: peak {result['peak'] / 1e9:.2f} GB in {result['seconds']:.0f} s", flush=True)
    print(f"one step in a fresh process per row, random weights, the default epoch's longest batch ({tokens} text tokens)")
    print(tabulate(rows, headers=[f"{size}, batch {batch_size}", "peak RSS GB (VmHWM)", "GiB",
                                  "GiB above the built model + data", "step s", "target (issue 17)"],
                   floatfmt=".2f"))
    if not has_flag("--grad-checkpointing"):
        print("(--grad-checkpointing: not in common/arguments.py yet)")


# ---------------------------------------------------------------- 5. denormals
def count_subnormals(model, optimizer, batch):
    """Subnormal float32 values in the outputs of every op of one step (a dispatch mode sees each op's
    outputs; the inside of fused kernels such as oneDNN's LSTM is not visible), and in the Adam state."""
    from torch.utils._python_dispatch import TorchDispatchMode
    tiny = torch.finfo(torch.float32).tiny

    def subnormal(t):
        return int(((t != 0) & (t.abs() < tiny)).sum()) if torch.is_tensor(t) and t.dtype == torch.float32 else 0

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.values, self.total, self.ops = 0, 0, {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func.overloadpacket)
            if "empty" in name:  # uninitialised memory: not a computed value
                return out
            for o in out if isinstance(out, (tuple, list)) else (out,):
                n = subnormal(o)
                self.values += n
                self.total += o.numel() if torch.is_tensor(o) and o.dtype == torch.float32 else 0
                if n:
                    self.ops[name] = self.ops.get(name, 0) + n
            return out

    counter = Count()
    with counter:
        our_step(model, optimizer, batch)
    state = sum(subnormal(s[k]) for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    return counter, state


def denormals(train, repeats):
    torch.manual_seed(0)
    model = build_model(MODEL_SIZES["small"])
    optimizer = adam(model.parameters(), lr=1e-3)
    batches = [collate(b) for b in bucketed_items(train, 16, 8)]
    for k in range(10):  # a few updates first: denormals, if any, come as values shrink
        our_step(model, optimizer, batches[k % 8])

    def step_with(flush):
        def fn(r):
            torch.set_flush_denormal(flush)
            our_step(model, optimizer, batches[r % 8])
        return fn
    if not torch.set_flush_denormal(True):
        print("this CPU does not support flushing denormals (torch.set_flush_denormal returned False)")
        return
    t = interleaved({"flush on": step_with(True), "flush off": step_with(False)}, repeats)
    torch.set_flush_denormal(False)  # the default of --flush-denormal
    ratios = [a / b for a, b in zip(t["flush off"], t["flush on"])]
    print(f"small model, batch 16, {repeats} steps each, alternating: flush off {median_ms(t['flush off']):.0f} ms, "
          f"flush on {median_ms(t['flush on']):.0f} ms; off/on per pair: median {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    counter, state = count_subnormals(model, optimizer, batches[0])
    print(f"subnormal values in one step's op outputs: {counter.values} of {counter.total:.3g} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(counter.ops.items(), key=lambda kv: -kv[1])[:5]) or 'none'}); "
          f"in Adam's state: {state}")


# ---------------------------------------------------------------- 6. evaluation
def evaluation(run, val, repeats):
    model = run.model
    n = len(val)

    def predict(batch_size, context):
        def fn(_):
            model.eval()
            with context():
                for i in range(0, n, batch_size):
                    model(collate([val[j] for j in range(i, min(i + batch_size, n))]))
            model.train()
        return fn
    t = interleaved({"no_grad, batch 64, dataset order (before)": predict(64, torch.no_grad),
                     "inference_mode, batch 128, dataset order": predict(128, torch.inference_mode),
                     f"Run.predict (inference_mode, batch {run.args.eval_batch_size}, by length)":
                         lambda _: run.predict(val)}, repeats)
    rows = [[k, n / statistics.median(v)] for k, v in t.items()]
    print(tabulate(rows, headers=[f"evaluation of {n} clips, small model", "clips/s"], floatfmt=".1f"))


# ---------------------------------------------------------------- 10. checkpoint cost
def checkpoint_cost(data, sizes, repeats):
    """Run.save_checkpoint (model, Adam state, RNGs, progress: what --resume needs) and the restricted load of
    it, at each model size after one optimizer step (so that Adam's moments exist); the file's size."""
    rows = []
    for size in sizes:
        out = tempfile.mkdtemp(prefix="bench_ckpt_")
        args = build_parser().parse_args(["--data", str(data), "--model-size", size, "--batch-size", "8",
                                          "--out", out, "--quiet"])
        run = Run(args, strategy="bench_checkpoint")
        run.start()
        batch = next(iter(run.batches()))
        losses = run.task_losses(batch)
        run.step(losses.sum(), losses, batch)
        path = run.dir / "checkpoint.pt"
        saves, loads = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run.save_checkpoint()
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run.load_checkpoint()
            loads.append(time.perf_counter() - t0)
        n_params = sum(p.numel() for p in run.model.parameters())
        rows.append([size, n_params / 1e6, path.stat().st_size / 1e6, statistics.median(saves),
                     statistics.median(loads)])
        del run
        release_memory()
        subprocess.run(["rm", "-rf", out], check=False)
    print(f"median of {repeats}; the checkpoint of --resume (model + Adam moments + RNGs + progress); written "
          f"atomically (temporary file, then rename) to {tempfile.gettempdir()}")
    print(tabulate(rows, headers=["model size", "parameters (M)", "checkpoint (MB)", "save (s)",
                                  "restricted load (s)"], floatfmt=".3f"))


# ---------------------------------------------------------------- main
def task_grad_traffic(data, steps):
    """Section 11: measured bytes per step on 2 gloo ranks (tiny model) for both --task-grad-sync modes, then
    the ring arithmetic for the full-size model's shared parameters at T = 5."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("all-reduce", "reduce-scatter"):
            out = Path(tmp) / f"{mode}.json"
            argv = ["--data", str(data), "--out", tmp, "--model-size", "tiny", "--batch-size", "16", "--max-steps",
                    str(steps), "--eval-every", "1000", "--quiet", "--aggregator", "pcgrad", "--task-grad-sync", mode]
            (Path(tmp) / "runs.json").write_text(json.dumps([["@traffic", [str(out), *argv]]]))
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(REPO / "tests" / "dist_worker.py"), str(Path(tmp) / "runs.json")], check=True,
                           cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
            r = json.loads(out.read_text())
            sent = r["sent_last_step"]
            rows.append([mode, r["T"], r["P"], *(f"{sent.get(k, 0) / 1e6:.2f}" for k in ("all_reduce", "reduce_scatter",
                         "all_gather")), f"{sum(sent.values()) / 1e6:.2f}", f"{median_ms(r['times'][1:] or r['times']):.0f}"])
    print("measured, 2 gloo processes on this machine, tiny model, pcgrad (the last step; MB each rank sends):")
    print(tabulate(rows, headers=["--task-grad-sync", "T", "P shared", "all-reduce MB", "reduce-scatter MB",
                                  "all-gather MB", "total MB", "step ms (median)"]))
    ratio = float(rows[1][-2]) / float(rows[0][-2])
    print(f"reduce-scatter / all-reduce: {ratio:.2f} (the rest of the step's all-reduces, losses and heads, included)")
    model = build_model(MODEL_SIZES["full"])
    P = sum(p.numel() for p in model.shared_parameters())
    del model
    full = []
    for W in (2, 4, 8):
        ring = (W - 1) / W
        allreduce = 2 * ring * TASK_COUNT * P * 4
        scatter = ring * TASK_COUNT * P * 4 + ring * P * 4 + 2 * ring * TASK_COUNT ** 2 * 8
        full.append([W, f"{allreduce / 1e9:.2f}", f"{scatter / 1e9:.2f}", f"{scatter / allreduce:.2f}"])
    print(f"\nthe arithmetic at full size (T = {TASK_COUNT}, P = {P / 1e6:.1f} M shared parameters, fp32; per-task "
          "rows only):")
    print(tabulate(full, headers=["ranks", "all-reduce GB/step", "reduce-scatter + all-gather GB/step", "ratio"]))


def write_report(path, argv):
    """Run the bench again as a child (so that the lines of its own subprocesses are caught too), show each
    line as it comes and keep them; the file is replaced only when the bench finishes."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    lines = [f"# make bench: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit or '?'}"
             + (f", options {' '.join(argv)}" if argv else ""), "",
             "Made by `make bench` (tests/bench/bench.py); compare only numbers of the same run. Read with "
             "docs/performance.md.", "", "```text"]
    proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    if proc.wait() != 0:
        raise SystemExit(f"bench failed (exit {proc.returncode}); {path} left as it was")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines + ["```", ""]))
    print(f"written {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats; full size at batch 16 only")
    p.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10,11", help="comma-separated sections to run")
    p.add_argument("--skip-full", action="store_true", help="no full-size model (sections 1, 3, 4)")
    p.add_argument("--gradagg-sizes", default=None)
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--write", default=None, metavar="MD",
                   help="also write everything printed (its subprocesses' lines too) to this markdown file, replaced "
                        "only when the bench finishes (make bench: results/bench.md)")
    args = p.parse_args()
    if args.memory_probe:
        return memory_probe(json.loads(args.memory_probe))
    if args.write:
        return write_report(Path(args.write), [a for a in sys.argv[1:] if a != "--write" and a != args.write])
    only = {int(s) for s in args.only.split(",")}
    quick = args.quick
    data = ensure_data(DEFAULT_DATA)
    train, val = datasets(data)
    print(f"# make bench: torch {torch.__version__}, {torch.get_num_threads()} threads, {load_avg()}", flush=True)
    t_start = time.perf_counter()
    sizes = ("small",) if args.skip_full else ("small", "full")

    @contextlib.contextmanager
    def section(number, title):
        print(f"\n== {number}. {title} ==", flush=True)
        t0 = time.perf_counter()
        yield
        release_memory()
        print(f"({time.perf_counter() - t0:.0f} s, {load_avg()}, this process {vm_value('VmRSS') / 1e9:.1f} GB)",
              flush=True)

    if 4 in only and not args.skip_full:  # first: the children need the memory this process frees but keeps
        with section(4, "peak memory of one full-size step at batch 16 (fresh process per row; run first)"):
            peak_memory("full", 16, quick)
    if 1 in only:
        with section(1, "training step against the original-like baseline (samples/s; same model, weights, clips)"):
            step_vs_original(train, ("small",), (8, 16), 3 if quick else 5)
            if not args.skip_full:
                step_vs_original(train, ("full",), (16,) if quick else (8, 16), 1 if quick else 3)
    run = None
    if 2 in only:
        with section(2, "cost of each weighting's and aggregator's step against the equal-weight step"):
            run = gradient_steps(data, 3 if quick else 7)
    if 3 in only:
        with section(3, "each component's share of a step (fp32)"):
            for size in sizes:
                component_shares(train, size, 16, (2 if quick else 4) if size == "small" else 1)
    if 5 in only:
        with section(5, "denormals"):
            denormals(train, 6 if quick else 12)
    if 6 in only:
        with section(6, "evaluation"):
            if run is None:
                args_run = build_parser().parse_args(["--data", str(data), "--out", tempfile.mkdtemp(), "--quiet"])
                run = Run(args_run, strategy="bench")
            evaluation(run, val, 2 if quick else 4)
    if 7 in only:
        with section(7, "aggregation alone (T = 5)"):
            sizes_ga = args.gradagg_sizes or ("1e6,1e7" if quick else "1e6,1e7,1.1e8")
            subprocess.run([sys.executable, str(REPO / "tests" / "bench" / "bench_gradagg.py"), "--sizes", sizes_ga], check=True)
    if 8 in only:
        with section(8, "trunks at the small size (training step, batch 16)"):
            from bench_trunks import HEADERS, trunk_bench
            n_batches, repeats = (2, 2) if quick else (4, 3)
            print(f"{n_batches} batches per repeat, median of {repeats} interleaved repeats")
            print(tabulate(trunk_bench(data, "small", 16, n_batches, repeats), headers=HEADERS))
    if 10 in only:
        with section(10, "checkpoint cost (save and restricted load at each model size)"):
            checkpoint_cost(data, ("tiny",) + sizes, 2 if quick else 3)
    if 11 in only:
        with section(11, "torchrun traffic of parameter-space aggregation (bytes each rank sends per step)"):
            task_grad_traffic(data, 2 if quick else 4)
    if 9 in only:
        if torch.cuda.is_available():
            with section(9, "GPU"):
                from bench_gpu import gpu_section
                gpu_section(data, quick)
        else:
            print("\nGPU section: skipped (no CUDA)")
    print(f"\n# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
