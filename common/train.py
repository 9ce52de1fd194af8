"""The run loop every strategy script drives: Run (seeding, batches, the step with its NaN/Inf guard,
evaluation, checkpoints, logging, the summary). Not a framework: a strategy script owns its loop. The command
line is common/arguments.py, what a run trains on common/objectives.py, how its checkpoint and log are stored
common/resume.py, its other files common/files.py.

A typical script reads:

    args = build_parser(__doc__).parse_args()
    run = Run(args, strategy="all_at_once")
    run.start(weighting=weighting)                 # resumes here with --resume, rule state included
    for batch in run.batches():
        losses = run.task_losses(batch)            # trunk once, one loss per task
        loss = weighting(losses)                   # the strategy's rule
        run.step(loss, losses)                     # NaN/Inf guard, backward, clip, optimizer step
        run.log_step(losses, weights=...)          # what the rule decided
        if run.at_eval():
            run.validate()                         # val metrics, LR schedule, best model
            run.eval_checkpoint()                  # at a new best, or when the cadence is due
    run.finish()                                   # test metrics of the best model, summary.json

Resuming is exact on CPU: the data order is a function of (seed, epoch), the checkpoint holds the model,
optimizer, scheduler, every RNG and the position inside the epoch, and metrics.jsonl is cut back to
the checkpoint's step. A run checkpoints after an evaluation that made a new best model, every
--checkpoint-minutes of wall time (and every --checkpoint-every steps where set), on SIGINT/SIGTERM, and
where a script asks (run.save_checkpoint()).

What a strategy script may use of a Run (its public surface; everything else is internal):
  read      run.args, run.tasks, run.model, run.device, run.dir, run.objective, run.optimizer,
            run.train_set, run.val_set, run.test_set, run.steps_per_epoch,
            run.step_count, run.epoch, run.batch_in_epoch, run.total_steps, run.active_modalities,
            run.lr (the learning rate now), run.lr_dropped (True right after a validate() at which the LR
            schedule lowered the LR), run.loss_scale, run.scales_losses (fp16's gradient scaler)
  change    run.set_total_steps(n), run.set_active_modalities(names or None), run.add_parameters(...),
            run.set_hold_early_stop(bool) (early stopping waits while a schedule still brings tasks in)
  train     run.start(**stateful), run.batches(), run.per_item_losses(batch), run.task_losses(batch),
            run.step(loss, losses, batch), run.skip_step(), run.check_finite(losses, batch),
            run.zero_grad() and run.scale_loss(loss) (before a hand-written backward whose .grad reaches
            run.step(None, scaled=True)), run.head_parameters(task)
  probe     run.probe_copy(lr) (a copy of the model and a fresh Adam: trains without touching the run),
            with run.train_mode(): (train mode inside, the previous mode restored: lookaheads)
  evaluate  run.at_eval(), run.validate(**extra), run.evaluate(dataset, model, modalities),
            run.predict(dataset, model, modalities), run.loader(plan, dataset)
  record    run.log_step(losses, **decisions), run.log(record), run.say(text), run.save_checkpoint(),
            run.eval_checkpoint() (after validate() and the rule's reaction: saves when due),
            run.load_checkpoint() (start() calls it under --resume),
            run.finish(decisions), run.write_summary(summary)
What the run trains on is its objective (FinetuneObjective: the Comic Mischief tasks;
common.pretrain.PretrainObjective with --stage pretrain): the objective turns a batch into per-item
task losses and evaluates a split; Run never asks which one it has.
"""
import contextlib
import copy
import math
import os
import random
import signal
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

from common import devices, distributed
from common.arguments import parse_tasks, recorded_args
from common.checkpoints import MODEL_CONFIG_FILE, MODEL_FILE, load_checkpoint, load_init, write_model_files
from common.data import H5Dataset, collate, device_batch, epoch_batches, feature_stats
from common.evaluate import format_metrics
from common.files import atomic_save, atomic_write_bytes, jsonable, npy_bytes, write_json
from common.model import model_config
from common.trunks import model_from_args
from common.objectives import FinetuneObjective, masked_mean
from common.pretrain import PRETRAIN_TASKS, PretrainObjective
from common.resume import Checkpointer, MetricsLog
from common.versions import data_fingerprint, repo_relative, rule_versions_of, run_versions
from data_prep.synthesize import ensure_data


# ---------------------------------------------------------------- seeding
def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- numerics guard
class NonFiniteError(FloatingPointError):
    pass


def all_finite(tensors):
    """True when no tensor holds a NaN or an inf: one fused max-abs per tensor (NaN and inf propagate
    through it, and a finite tensor's max-abs is finite), then a single host sync (was one per tensor)."""
    if not tensors:
        return True
    by_device = {}
    for t in tensors:
        by_device.setdefault((t.device, t.dtype), []).append(t)
    return all(bool(torch.isfinite(torch.stack(torch._foreach_norm(group, float("inf")))).all())
               for group in by_device.values())


def first_nonfinite_module(model, batch, active_modalities=None):
    """Rerun the forward with hooks and name the first module whose output is not finite."""
    found = []

    def hook(module, _inputs, output):
        outs = output if isinstance(output, (tuple, list)) else (output,)
        for o in outs:
            if torch.is_tensor(o) and o.is_floating_point() and not torch.isfinite(o).all() and not found:
                found.append(name_of[module])

    name_of = {m: n or "<model>" for n, m in model.named_modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(batch, active_modalities=active_modalities)
    finally:
        for h in handles:
            h.remove()
    bad_params = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    where = f"first non-finite output: {found[0]}" if found else "all module outputs finite on rerun"
    if bad_params:
        where += f"; non-finite parameters: {bad_params[:3]}"
    return where


# ---------------------------------------------------------------- the run

def adam(params, lr, weight_decay=0.0):
    """torch.optim.Adam with the fused implementation (one kernel over all parameters; about 3x faster
    than the default per-tensor loop on CPU, same update within float rounding: tests/test_train.py).
    Its state (step, exp_avg, exp_avg_sq) is the default Adam's, so checkpoints load either way."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)

class Run:
    """Model, optimizer, data and bookkeeping of one training run (see the module docstring)."""

    def __init__(self, args, strategy, tasks=None, run_name=None, objective=None):
        """objective: what to train (default: from --stage; FinetuneObjective on --tasks, or the
        pretraining objective on --pretrain-tasks). tasks overrides --tasks / --pretrain-tasks."""
        self.args = args
        config = model_config(args.model_size, args.text_encoder)  # the width follows --text-encoder
        if args.zero_dropout:  # test-only (see build_parser)
            config = replace(config, **{f.name: 0.0 for f in fields(config) if f.name.endswith("dropout")})
        # seeded first: the pretraining heads are initialised here (fine-tuning draws nothing before the model)
        set_seed(args.seed)
        if objective is None:
            if args.stage == "pretrain":
                pre_tasks = tasks or parse_tasks(args.pretrain_tasks, PRETRAIN_TASKS, "--pretrain-tasks")
                objective = PretrainObjective(config, pre_tasks, seed=args.seed)
            else:
                objective = FinetuneObjective(tasks or parse_tasks(args.tasks), metric=args.metric,
                                              select_metric=args.select_metric)
        self.objective = objective
        self.tasks = list(objective.tasks)
        self.strategy = strategy + objective.strategy_suffix
        # where and in what precision it computes (torchrun ranks, autocast, fp16's scaler, deterministic kernels)
        self.device, self.autocast_dtype, self.scaler = devices.setup(args)
        self.dir = Path(args.out) / self.strategy / (run_name or args.run or f"seed{args.seed}")
        self.dir.mkdir(parents=True, exist_ok=True)
        if args.threads:
            torch.set_num_threads(args.threads)
        data = ensure_data(args.data)
        # video/audio standardised with the training split's statistics (see common.data.feature_stats)
        stats = feature_stats(data / "train.h5") if args.feature_norm == "train" else None
        self.train_set = H5Dataset(data / "train.h5", stats)
        self.val_set = H5Dataset(data / "val.h5", stats)
        self.test_set = H5Dataset(data / "test.h5", stats)
        # the objective says which fine-tuning heads the model has (pretraining keeps all of them, so
        # that its checkpoint is a whole model)
        # --trunk / --text-encoder; the stored token ids are checked against the encoder's tokenizer
        self.model = model_from_args(args, config, objective.model_tasks, data).to(self.device)
        if args.init:
            self.init_report = load_init(self.model, args.init)
        self.optimizer = adam(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        # as the original: halve the LR when the mean validation score stops improving for 2 evaluations
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="max", factor=0.5, patience=2)
        self.objective.to(self.device)
        self.add_parameters(self.objective.parameters())  # e.g. the pretraining heads
        if distributed.is_distributed():  # same initial weights everywhere; each rank its own dropout masks
            torch.manual_seed(distributed.rank_seed(args.seed))
        self.lengths = self.train_set.text_lengths() if args.bucket else None
        self.steps_per_epoch = math.ceil(len(self.train_set) / args.batch_size)
        evals_per_epoch = getattr(args, "evals_per_epoch", 1)
        if args.eval_every < 0 or evals_per_epoch < 1:
            raise SystemExit(f"--eval-every {args.eval_every} / --evals-per-epoch {evals_per_epoch}: expected "
                             "--eval-every >= 0 (0: use --evals-per-epoch) and --evals-per-epoch >= 1")
        self.eval_every = args.eval_every or max(self.steps_per_epoch // evals_per_epoch, 1)
        self._total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps:
            self._total_steps = min(self._total_steps, args.max_steps)
        self._active_modalities = None  # a strategy may switch modalities off (modality_curriculum)
        self.lr_dropped = False
        self.stateful = {}
        self.progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val": -math.inf, "best_step": 0,
                         "nonfinite_skips": 0, "train_seconds": 0.0, "evals": 0,
                         "evals_without_best": 0, "stopped_at": 0}  # early stopping (validate)
        # a strategy sets this while its schedule still brings tasks in (curriculum entries, sequential
        # phases): early stopping waits, and its count of evaluations without a new best restarts
        self._hold_early_stop = False
        self.metrics_log = MetricsLog(self.dir)
        self.checkpointer = Checkpointer(self.dir, args.checkpoint_every, getattr(args, "checkpoint_minutes", 0))
        self._stop_requested = False
        self._last_improved = False                # did the last validate() make a new best model
        self._last_val = None
        self._t_start = None

    # -- extra trainable parameters of a rule (learned loss weights, uncertainty's log-variances)
    def add_parameters(self, params, lr=None, weight_decay=0.0):
        params = [p for p in params]
        if params:
            self.optimizer.add_param_group({"params": params, "lr": lr or self.args.lr, "weight_decay": weight_decay})

    def start(self, **stateful):
        """Register the objects of the rule that carry state (anything with state_dict/load_state_dict),
        then resume from the last checkpoint when --resume was given."""
        self.stateful.update(stateful)
        self.stateful["objective"] = self.objective  # the pretraining heads and corruption generator
        ckpt_path = self.checkpointer.path
        if self.args.resume and ckpt_path.exists():
            self.load_checkpoint()
            self.metrics_log.cut(self.progress["step"])
            print(f"[{self.strategy}] resumed from {ckpt_path} at step {self.progress['step']}", flush=True)
        else:
            if ckpt_path.exists():
                print(f"[{self.strategy}] starting fresh in {self.dir} (use --resume to continue it)", flush=True)
            distributed.barrier()  # every rank has seen whether a checkpoint exists before rank 0 removes it
            for f in ("checkpoint.pt", "best.pt", "metrics.jsonl", "metrics.jsonl.gz", "summary.json", "test_scores.npy", MODEL_FILE,
                      MODEL_CONFIG_FILE):
                if distributed.is_main():
                    (self.dir / f).unlink(missing_ok=True)
            self.log({"event": "start", "strategy": self.strategy, "tasks": self.tasks, "args": recorded_args(self.args),
                      "train_clips": len(self.train_set), "steps_per_epoch": self.steps_per_epoch})
        # a SIGINT/SIGTERM finishes the current step, checkpoints and exits: nothing is lost
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request_stop)
        return self

    def _request_stop(self, signum, _frame):
        # a second Ctrl-C leaves at once; a second SIGTERM does not (Slurm signals every process of a job, and
        # make compare forwards one more: the checkpoint must still be written)
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_requested = True
        print(f"\n[{self.strategy}] signal {signum}: checkpointing after this step", file=sys.stderr, flush=True)

    # -- data
    def loader(self, batches, dataset):
        """Yield the batches of a plan (one list of clip indices per batch) of `dataset`, on the run's device."""
        # an own generator: a DataLoader otherwise draws its worker seed from the global RNG, which
        # would shift the dropout masks of a resumed run
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                             num_workers=self.args.num_workers, generator=torch.Generator(),
                                             pin_memory=self.device.type == "cuda")  # for non_blocking copies
        for batch in loader:
            yield device_batch(batch, self.device)

    def batches(self):
        """Yield training batches on the device until the step budget is spent, resuming mid-epoch."""
        self._t_start = time.perf_counter()
        while self.progress["step"] < self.total_steps:
            epoch = self.progress["epoch"]
            plan = epoch_batches(len(self.train_set), self.args.batch_size, self.args.seed, epoch, self.lengths)
            # torchrun: this rank's part of each global batch (same global batches and order as one process)
            plan = plan[self.progress["batch_in_epoch"]:]
            shards = [distributed.shard(b) for b in plan]
            for (indices, ghost), global_batch, batch in zip(shards, plan, self.loader([i for i, _ in shards], self.train_set)):
                if self.progress["step"] >= self.total_steps:
                    break
                # counted before the strategy's step, so a checkpoint taken inside it resumes after this batch
                self.progress["batch_in_epoch"] += 1
                # where this rank's rows sit in the global batch (a rule that draws per clip draws for all of
                # them and takes its rows); a ghost rank's one borrowed clip is masked in per_item_losses
                batch.update(global_batch_size=len(global_batch), shard_start=distributed.shard_start(len(global_batch)),
                             ghost=ghost)
                yield batch
                self._show_progress()
                if self.args.crash_after_step and self.progress["step"] >= self.args.crash_after_step \
                        and self.args.crash_rank in (-1, distributed.rank()):
                    while self.args.hang and not self._stop_requested:
                        time.sleep(0.1)
                    os._exit(3)
                if distributed.is_distributed():  # a signal may reach the ranks at different steps: stop together
                    self._stop_requested = distributed.any_true(self._stop_requested)
                if self._stop_requested:
                    self.save_checkpoint()
                    print(f"[{self.strategy}] stopped at step {self.progress['step']}; rerun with --resume",
                          flush=True)
                    sys.exit(130)
                if not self.at_eval() and self.checkpointer.due(self.progress["step"]):  # at an evaluation the script decides
                    self.save_checkpoint()
            else:
                self.progress["epoch"] += 1
                self.progress["batch_in_epoch"] = 0
        self.flush_log()
        distributed.barrier()  # torchrun: metrics.jsonl is complete before any rank reads it back

    @property
    def step_count(self):
        return self.progress["step"]

    @property
    def epoch(self):
        return self.progress["epoch"]

    @property
    def batch_in_epoch(self):
        """Batches of the current epoch handed out so far (1 while the epoch's first batch is trained)."""
        return self.progress["batch_in_epoch"]

    @property
    def total_steps(self):
        """The step budget; after early stopping, the step at which the run stopped (checkpointed)."""
        stopped = self.progress.get("stopped_at", 0)
        return min(self._total_steps, stopped) if stopped else self._total_steps

    def set_total_steps(self, n):
        """Change the step budget (e.g. a probe or lookahead phase that uses part of it)."""
        if n < 1:
            raise ValueError(f"set_total_steps: need at least one step, got {n}")
        self._total_steps = int(n)

    @property
    def active_modalities(self):
        """None (every modality) or the tuple of modalities the trunk sees on this step."""
        return self._active_modalities

    def set_active_modalities(self, modalities):
        """Switch modality branches off (masked, never zero-filled); None switches all back on.
        Checkpointed, so a resumed run continues with the same modalities."""
        self._active_modalities = None if modalities is None else tuple(modalities)

    def set_hold_early_stop(self, hold):
        """While held (a curriculum still bringing tasks in, a sequential phase not yet at its last task),
        early stopping waits and its count of evaluations without a new best restarts."""
        self._hold_early_stop = bool(hold)

    def at_eval(self):
        s = self.progress["step"]
        return s > 0 and (s % self.eval_every == 0 or s == self.total_steps)

    # -- forward and losses
    def per_item_losses(self, batch, model=None, generator=None):
        """Trunk once -> fused representation z [B, 3H] and per-clip task losses [B, T], with which of
        them are scored (bool [B, T]; all of them when fine-tuning). Cross-entropy on logits, not BCE on
        softmax: it does not saturate. The objective decides (pretraining corrupts the batch first).
        --precision bf16/fp16: the forward runs under autocast; z and the losses come back in fp32."""
        with self.autocast():
            fused, per_item, valid = self.objective.per_item_losses(model or self.model, batch,
                                                                    self.active_modalities, generator)
        if self.autocast_dtype is not None:
            fused = fused.float() if torch.is_tensor(fused) else fused
            per_item = per_item.float()
        if batch.get("ghost"):  # torchrun: a rank without clips in this global batch scores none
            valid = torch.zeros_like(valid)
        return fused, per_item, valid

    def autocast(self):
        """The forward's autocast context (--precision; a no-op at fp32)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def task_losses(self, batch, model=None, generator=None):
        """The per-task losses [T] of a batch: the mean over the clips each task scores (under torchrun
        over the global batch, identical on every rank: common.distributed.global_task_losses)."""
        _, per_item, valid = self.per_item_losses(batch, model, generator)
        if distributed.is_distributed():
            return distributed.global_task_losses(per_item, valid)[0]
        return masked_mean(per_item, valid)

    def head_parameters(self, task=None):
        """The parameters that belong to one task (or to all tasks): its head, not the trunk."""
        return self.objective.task_parameters(self.model, task)

    def skip_step(self):
        """Count a step that made no update (a skipped non-finite batch), so schedules stay aligned."""
        self.progress["step"] += 1

    def check_finite(self, losses, batch=None):
        """True when every loss is finite. Otherwise stop with a report (or count a skip)."""
        if torch.isfinite(losses).all():
            return True
        bad = [t for t, v in zip(self.tasks, losses.detach().reshape(-1, len(self.tasks)).T) if not torch.isfinite(v).all()]
        where = ""
        if batch is not None:
            with self.autocast():  # the forward that failed ran under autocast
                where = first_nonfinite_module(self.model, batch, self.active_modalities)
        if distributed.is_distributed():  # the losses are global; each rank reruns its own clips
            where = "; ".join(f"rank {r}: {w}" for r, w in enumerate(distributed.gather_objects(where)))
        return self._nonfinite(f"non-finite loss at step {self.progress['step']} for task(s) {bad}; {where}")

    def check_finite_grads(self):
        named = [(name, p.grad) for name, p in self.model.named_parameters() if p.grad is not None]
        if all_finite([g for _, g in named]):  # one fused reduction and one sync a step
            return True
        name = next(name for name, g in named if not torch.isfinite(g).all())
        return self._nonfinite(f"non-finite gradient at step {self.progress['step']} in {name}")

    def _nonfinite(self, report):
        self.log({"event": "nonfinite", "step": self.progress["step"], "report": report})
        if self.args.on_nonfinite == "stop":
            self.flush_log()
            raise NonFiniteError(report + " (use --on-nonfinite skip to skip such batches)")
        self.progress["nonfinite_skips"] += 1
        print(f"\n[{self.strategy}] skipped batch: {report}", file=sys.stderr, flush=True)
        self.zero_grad()
        return False

    def step(self, loss=None, losses=None, batch=None, synced=(), scaled=False):
        """One optimizer step. With loss: zero grads, backward, guard, clip, step. With loss=None the
        strategy has already written the .grad fields (gradient aggregation) and only the guard, clip
        and step run. The step counter advances even for a skipped batch, so schedules stay aligned.
        torchrun: every gradient is averaged over the ranks here, except those of `synced` parameters
        (already global: parameter-space aggregation all-reduced the per-task gradients).
        fp16: the loss is multiplied by the scaler's scale; with loss=None, scaled=True says the strategy
        wrote .grad from losses multiplied by run.loss_scale. A step whose scaled gradients overflowed is
        skipped and the scale lowered (counted as fp16_overflow_skips, not an error)."""
        ok = True
        if losses is not None:
            ok = self.check_finite(losses, batch)
        if ok and loss is not None:
            self.zero_grad()
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if ok:
            distributed.average_gradients(self._trained_parameters(), synced)
        if ok and self.scaler is not None and (loss is not None or scaled):
            if loss is None:  # the scaler creates its scale on its first scale(); unscale_ needs it
                self.scaler.scale(torch.ones((), device=self.device))
            self.scaler.unscale_(self.optimizer)
            if not self._grads_finite():  # overflow of the scaled fp16 gradients: the scaler's business
                self.scaler.step(self.optimizer)  # skips the update
                self.scaler.update()
                self.progress["fp16_overflow_skips"] = self.progress.get("fp16_overflow_skips", 0) + 1
                self.log({"event": "fp16_overflow", "step": self.progress["step"],
                          "loss_scale": self.scaler.get_scale()})
                self.zero_grad()
                self.progress["step"] += 1
                return False
        if ok:
            ok = self.check_finite_grads()
        if ok:
            if self.args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
            if self.scaler is not None and (loss is not None or scaled):
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.progress["step"] += 1
        return ok

    @property
    def loss_scale(self):
        """The fp16 scaler's current scale (1.0 without one): multiply losses by it before a backward whose
        gradients reach run.step(None, scaled=True)."""
        return self.scaler.get_scale() if self.scaler is not None else 1.0

    @property
    def scales_losses(self):
        """True where losses must be scaled before a hand-written backward (fp16's gradient scaler)."""
        return self.scaler is not None

    def scale_loss(self, loss):
        """The loss times the fp16 scaler's scale (which also starts the scaler for run.step's unscale_), or
        the loss itself without a scaler."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    @property
    def lr(self):
        """The learning rate now (--lr after the schedule's drops)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def zero_grad(self):
        """Clear the gradients of every trained parameter (before a hand-written backward)."""
        self.optimizer.zero_grad(set_to_none=True)

    def probe_copy(self, lr):
        """A copy of the model and a fresh Adam over all its parameters at `lr`: for a probe that trains
        without touching the run (the curriculum's difficulty probe). The Adam is torch's default (unfused)
        implementation, the one the probe's records were made with: the run's fused kernel rounds differently."""
        model = copy.deepcopy(self.model)
        return model, torch.optim.Adam(model.parameters(), lr=lr)

    @contextlib.contextmanager
    def train_mode(self):
        """The run's model in train mode inside the block, its previous mode restored after, also on an
        error (a lookahead measured at an evaluation must leave the model as it found it)."""
        was_training = self.model.training
        self.model.train()
        try:
            yield self.model
        finally:
            self.model.train(was_training)

    def _trained_parameters(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _grads_finite(self):
        return all_finite([p.grad for p in self._trained_parameters() if p.grad is not None])

    # -- evaluation
    @torch.inference_mode()  # no autograd bookkeeping at all (cheaper than no_grad); issue 17
    def predict(self, dataset, model=None, modalities="current"):
        """Positive-class probabilities [N, T] and labels [N, T] of a dataset, model in eval mode.
        modalities: "current" (the run's active modalities), None (all) or a tuple of modalities."""
        model = model or self.model
        modalities = self.active_modalities if modalities == "current" else modalities
        model.eval()
        size = self.args.eval_batch_size
        # clips in order of text length, so that a batch pads little (padding changes no score: tested);
        # the rows come back in the dataset's order
        order = (np.argsort(dataset.text_lengths(), kind="stable") if hasattr(dataset, "text_lengths")
                 else np.arange(len(dataset)))
        plan = [order[i:i + size].tolist() for i in range(0, len(dataset), size)]
        # torchrun: each rank predicts every world_size-th batch of the same plan and the ranks exchange them,
        # so that every batch (and hence every score) is the one a single process computes
        mine = list(range(distributed.rank(), len(plan), distributed.world_size()))
        parts = []
        for k, batch in zip(mine, self.loader([plan[k] for k in mine], dataset)):
            logits = model(batch, active_modalities=modalities)
            parts.append((k, torch.softmax(logits.float(), dim=-1)[..., 1].cpu(), self.objective.labels(batch).cpu()))
        model.train()
        if distributed.is_distributed():
            parts = sorted((p for rank_parts in distributed.gather_objects(parts) for p in rank_parts),
                           key=lambda p: p[0])
        scores, labels = [p[1] for p in parts], [p[2] for p in parts]
        rows = torch.from_numpy(np.argsort(order, kind="stable"))  # position of each clip in `order`
        return torch.cat(scores)[rows].numpy(), torch.cat(labels)[rows].numpy()

    def evaluate(self, dataset, model=None, modalities="current", **options):
        """Per-task and mean metrics of a split, as the objective defines them; each per-task dict and
        the mean carry a "score" (higher is better) that the rules read: --metric when fine-tuning, minus
        the loss when pretraining; model selection reads the mean's "selection" (--select-metric) where
        there is one. modalities: "current", None (all) or a tuple. options go to the objective
        (thresholds= when fine-tuning)."""
        modalities = self.active_modalities if modalities == "current" else modalities
        return self.objective.evaluate(self, dataset, model or self.model, modalities, **options)

    def validate(self, **extra):
        """Validate, step the LR schedule on the selection score (mean --select-metric; minus the loss
        when pretraining), keep the best model, stop early after --early-stop-patience evaluations
        without a new best (the budget ends at this step), log. Sets run.lr_dropped. Returns the metrics."""
        # torchrun: rank 0's metrics on every rank, so that every rank's rule and schedule decide alike
        metrics = distributed.broadcast_object(self.evaluate(self.val_set))
        score = metrics["mean"].get("selection", metrics["mean"]["score"])
        lr_before = self.lr
        self.scheduler.step(score)
        self.lr_dropped = self.lr < lr_before
        self.progress["evals"] += 1
        improved = score > self.progress["best_val"]  # a nan score is never a new best
        self._last_improved = improved
        if improved:
            self.progress["best_val"] = score
            self.progress["best_step"] = self.progress["step"]
            best = {"model": self.model.state_dict(), "step": self.progress["step"], "stage": self.args.stage}
            best["objective"] = self.objective.state_dict()
            atomic_save(best, self.dir / "best.pt")
        stopping = self._early_stop(improved)
        self._last_val = score
        self.log({"event": "val", "step": self.progress["step"], "epoch": self.progress["epoch"],
                  "lr": self.lr, "best": improved,
                  "evals_without_best": self.progress["evals_without_best"], "early_stop": stopping,
                  **metrics, **extra})
        return metrics

    def _early_stop(self, improved):
        """Count evaluations without a new best; True (and the budget ends now) when they reach the patience."""
        patience = getattr(self.args, "early_stop_patience", 0)
        self.progress["evals_without_best"] = 0 if improved or self._hold_early_stop else (
            self.progress.get("evals_without_best", 0) + 1)
        if patience and self.progress["evals_without_best"] >= patience:
            self.progress["stopped_at"] = self.progress["step"]
            return True
        return False

    # -- logging
    def log(self, record):
        self.metrics_log.write(record)

    def log_step(self, losses=None, **decisions):
        """Record the losses and what the rule decided; written every --log-every steps."""
        s = self.progress["step"]
        if s % self.args.log_every == 0 or s == self.total_steps:
            rec = {"event": "train", "step": s, "epoch": self.progress["epoch"]}
            if losses is not None:
                rec["losses"] = dict(zip(self.tasks, losses.detach().float().cpu().tolist()))
            rec.update(decisions)
            self.metrics_log.add(rec)

    def flush_log(self):
        self.metrics_log.flush()

    def say(self, message):
        """Print a line of the strategy's own (a decision), over the progress line when there is one."""
        if not self.args.quiet and sys.stderr.isatty():
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        print(f"[{self.strategy}] {message}", flush=True)

    def _select_name(self):
        """What the progress line's validation number is: the mean selection metric (or -loss, pretraining)."""
        name = getattr(self.objective, "select_metric", None)
        return f"mean {name}" if name else "-loss"

    def _show_progress(self):
        if self.args.quiet or not sys.stderr.isatty() or not distributed.is_main():
            return
        s, tot = self.progress["step"], self.total_steps
        rate = s / max(time.perf_counter() - self._t_start, 1e-9) if self._t_start else 0
        val = f" val {self._select_name()} {self._last_val:.3f}" if self._last_val is not None else ""
        print(f"\r[{self.strategy}] epoch {self.progress['epoch'] + 1}/{self.args.epochs} step {s}/{tot}"
              f"{val} {rate:.1f} it/s   ", end="", file=sys.stderr, flush=True)

    # -- checkpoints (how they are stored and when: common/resume.py)
    def save_checkpoint(self):
        self.flush_log()
        now = time.perf_counter()
        if self._t_start is not None:
            self.progress["train_seconds"] += now - self._t_start
            self._t_start = now
        self.checkpointer.save(self._shared_state, {k: v.state_dict() for k, v in self.stateful.items()})

    def _shared_state(self):
        """What every rank holds alike: model, optimizer, schedule, progress, modalities, the fp16 scaler."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "progress": dict(self.progress),
                 "active_modalities": self._active_modalities}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def eval_checkpoint(self):
        """After validate() and the rule's own reaction to it: checkpoint when that validation made a new best
        model (best.pt and the checkpoint then describe the same point) or when the cadence is due."""
        if self._last_improved or self.checkpointer.due(self.progress["step"]):
            self.save_checkpoint()

    def load_checkpoint(self):
        """Continue from the run folder's checkpoint.pt (start() does it under --resume)."""
        state = self.checkpointer.load(self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress.update(state["progress"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self._active_modalities = state.get("active_modalities")
        missing = set(self.stateful) - set(state["strategy"])
        if missing:
            raise RuntimeError(f"{self.checkpointer.path}: checkpoint has no state for {sorted(missing)}")
        for k, obj in self.stateful.items():
            obj.load_state_dict(state["strategy"][k])

    # -- the end
    def write_summary(self, summary):
        write_json(self.dir / "summary.json", summary)

    def finish(self, decisions=None):
        """Evaluate the best model on val and test, write summary.json, print the per-task test table."""
        self.flush_log()
        if self._t_start is not None:
            self.progress["train_seconds"] += time.perf_counter() - self._t_start
            self._t_start = None
        if not sys.stderr.isatty() or self.args.quiet:
            pass
        else:
            print(file=sys.stderr)
        distributed.barrier()  # torchrun: rank 0 has written best.pt
        best = self.dir / "best.pt"
        if best.exists():
            state = load_checkpoint(best, map_location=self.device)
            self.model.load_state_dict(state["model"])
            if "objective" in state:
                self.objective.load_state_dict(state["objective"])
        if distributed.is_main():  # the evaluated model without a pickle: model.safetensors + model_config.json
            write_model_files(self.model, self.dir, stage=self.args.stage, strategy=self.strategy,
                              feature_norm=getattr(self.args, "feature_norm", None),
                              best_step=self.progress["best_step"], source="best.pt" if best.exists() else "last step")
        val = self.evaluate(self.val_set)
        # F1 at a tuned threshold: each task's threshold is chosen on validation, then applied to test
        thresholds = ({t: m["threshold"] for t, m in val["per_task"].items()}
                      if all("threshold" in m for m in val["per_task"].values()) else None)  # none when pretraining
        test = (self.evaluate(self.test_set, thresholds=thresholds, keep_scores=True) if thresholds
                else self.evaluate(self.test_set))
        # the test probabilities per clip (dataset order): what make compare's bootstrap over test clips reads
        test_scores = test.pop("scores", None)
        if test_scores is not None and distributed.is_main():
            atomic_write_bytes(self.dir / "test_scores.npy", npy_bytes(np.asarray(test_scores, np.float32)))
        steps = max(self.progress["step"], 1)
        summary = {
            "strategy": self.strategy, "run": self.dir.name, "tasks": self.tasks, "seed": self.args.seed,
            "model_size": self.args.model_size, "data": repo_relative(self.args.data), "lr": self.args.lr,
            "steps": self.progress["step"], "epochs": self.progress["step"] / self.steps_per_epoch,
            "best_step": self.progress["best_step"], "train_seconds": self.progress["train_seconds"],
            # budget and model selection (issue 14): the same budget for every strategy; steps_to_best is
            # the step of the selected model, stopped_early says whether patience or the budget ended it
            "budget_steps": self._total_steps, "stopped_early": bool(self.progress.get("stopped_at", 0)),
            "steps_to_best": self.progress["best_step"], "evals": self.progress["evals"],
            "metric": getattr(self.args, "metric", None),
            "select_metric": getattr(self.args, "select_metric", None) or getattr(self.args, "metric", None),
            "best_val_selection": self.progress["best_val"], "thresholds": thresholds,
            "seconds_per_step": self.progress["train_seconds"] / steps,
            "seconds_per_epoch": self.progress["train_seconds"] / steps * self.steps_per_epoch,
            "nonfinite_skips": self.progress["nonfinite_skips"],
            "val": val, "test": test, "decisions": decisions or {},
        }
        # how it ran (issue 16): processes, precision, fp16 steps the scaler skipped
        summary.update(world_size=distributed.world_size(), precision=self.args.precision,
                       fp16_overflow_skips=self.progress.get("fp16_overflow_skips", 0),
                       trunk=self.args.trunk, text_encoder=self.args.text_encoder)
        # issue 25: what made this record (a committed record is reused only while these match the code)
        summary.update(
            versions=run_versions(Path(sys.argv[0]).stem, rule_versions_of(self.stateful.values())),
            data_fingerprint=data_fingerprint((self.train_set, self.val_set, self.test_set)),
            test_scores=({t: ["test_scores.npy", i] for i, t in enumerate(self.tasks)}
                         if test_scores is not None else None))
        summary = jsonable(summary)
        self.write_summary(summary)
        self.log({"event": "end", "step": self.progress["step"], "test_mean": test["mean"]})
        print(format_metrics(test, self.tasks, title=f"{self.strategy} {self.dir.name}: test metrics (best val model)"))
        print(f"summary: {self.dir / 'summary.json'}")
        distributed.barrier()  # torchrun: no rank reads the summary before rank 0 has written it
        return summary
