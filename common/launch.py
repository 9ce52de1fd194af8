"""Where the runs of make compare go: processes on this machine, one per GPU, or Slurm jobs (submitit).

    launcher = LocalLauncher(jobs=2)                    # today's behaviour: JOBS processes at once
    launcher = LocalLauncher(gpus="0,1,2,3")            # one run per GPU (CUDA_VISIBLE_DEVICES), --device cuda
    launcher = SlurmLauncher(partition="gpu", time="4:00:00", gpus_per_job=1, account="lab", folder=...)
    launcher.run(runs, on_update)                       # returns when every run has ended

A GridRun holds the arguments of execute (which starts the strategy script, reuses a finished run and
resumes a started one with --resume) and the run's index entry so far. on_update(run, entry) is called in
the calling thread whenever a run's entry changes (running or submitted, then ok or failed), so the caller
can write its index at once: an interrupted `make compare` then resumes the runs it had started.

Slurm: the runs not finished yet go out as one job array; each job is a checkpointable callable (GridJob).
When Slurm preempts it or its time is nearly up, Slurm sends USR2 (sbatch --signal, set by submitit);
submitit calls GridJob.checkpoint, which has the script checkpoint after its current step (one SIGTERM),
resubmits the same run marked as started, and requeues the job: the new attempt runs the script with
--resume from that checkpoint. Without --signal (scancel, a preemption or time limit that sends SIGTERM,
which submitit itself only logs), GridJob forwards the SIGTERM to the script, which checkpoints, and then
requeues through the same path. Slurm's own requeue (a node failure: SLURM_RESTART_COUNT > 0) reruns the first
submission, which then resumes too. The table is written when the last job has ended;
finished runs are reused, so running `make compare` again only collects. Without a cluster, cluster="local"
runs the same jobs through submitit's local executor (tests/test_launch.py).
"""
import dataclasses
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path

import submitit

from common.records import make_lean
from common.versions import REPO, record_stale, repo_relative


@dataclasses.dataclass
class GridRun:
    """One run of the grid: the arguments of execute, and its index entry so far (or None)."""
    key: str
    cmd_tail: list  # [script, *flags], without --out and --threads
    root: str       # the script's --out
    settings: list  # what makes a finished run reusable
    log_dir: str
    entry: dict = None
    data_fingerprint: str = None  # the current data's (common/versions.py); None: not checked

    def finished(self):
        """Finished with the same settings, by the current code and on the current data: reused, nothing is
        started (execute's rule)."""
        e = self.entry or {}
        return (e.get("settings") == self.settings and e.get("status") == "ok"
                and record_stale(e["summary"], self.data_fingerprint) is None)

    def started(self):
        """The same run marked as started: execute then continues it with --resume."""
        return dataclasses.replace(self, entry={"status": "running", "settings": self.settings})


def execute_run(run, threads, device=None):
    """Run (or reuse) one run here; returns its index entry. device: a --device for the script."""
    tail = list(run.cmd_tail)
    if device and "--device" not in tail:
        tail += ["--device", device]
    index = {run.key: run.entry} if run.entry else {}
    return execute(run.key, tail, Path(run.root), run.settings, threads, index, Path(run.log_dir),
                   run.data_fingerprint)


def failed_entry(run, error, **extra):
    """The index entry of a run that ended without an entry of its own (its job or worker died)."""
    lines = [x for x in str(error).splitlines() if x.strip()] or [type(error).__name__]
    return {"status": "failed", "error": lines[-1][:300], "settings": run.settings, **extra}


# ---------------------------------------------------------------- this machine
def _pin_gpu(gpu):
    """Initializer of a GPU's worker process: the scripts it starts see that GPU only."""
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu


class LocalLauncher:
    """JOBS runs at once on this machine; with gpus ("0,1,2,3"), one run per GPU instead: a free GPU takes
    the next run, which sees only that GPU (CUDA_VISIBLE_DEVICES) and trains with --device cuda."""

    def __init__(self, jobs=1, gpus=None, work=execute_run, stopping=lambda: False):
        self.gpus = [g.strip() for g in (gpus or "").split(",") if g.strip()]
        for g in self.gpus:
            if not g.isdigit():
                raise SystemExit(f"--gpus {gpus!r}: expected GPU numbers separated by commas, e.g. 0,1,2,3")
        self.jobs = len(self.gpus) or max(jobs, 1)
        self.threads = max(1, (os.cpu_count() or 1) // self.jobs)  # parallel runs share the cores
        self.work = work  # work(run, threads, device) -> entry; replaceable in tests
        self.stopping = stopping  # true once make compare must end (--max-hours, a signal): start nothing new

    def run(self, runs, on_update):
        todo = []
        for r in runs:
            if r.finished():
                on_update(r, r.entry)
            else:
                todo.append(r)
        if not todo:
            return
        if self.gpus:
            # a process per GPU with its CUDA_VISIBLE_DEVICES (threads share one environment); spawn: no
            # fork of a process with threads
            ctx = multiprocessing.get_context("spawn")
            pools = {g: ProcessPoolExecutor(1, mp_context=ctx, initializer=_pin_gpu, initargs=(g,)) for g in self.gpus}
            submit = lambda g, r: pools[g].submit(self.work, r, self.threads, "cuda")  # noqa: E731
        else:
            pool = ThreadPoolExecutor(max_workers=self.jobs)
            pools = {"all": pool}
            submit = lambda slot, r: pool.submit(self.work, r, self.threads)  # noqa: E731
        try:
            slots = self.gpus or list(range(self.jobs))
            free, running = list(slots), {}
            while todo or running:
                while free and todo and not self.stopping():
                    slot, r = free.pop(0), todo.pop(0)
                    on_update(r, r.started().entry)
                    running[submit(slot, r)] = (slot, r)
                if not running:  # stopping: nothing more is started
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    slot, r = running.pop(future)
                    free.append(slot)
                    try:
                        entry = future.result()
                    except Exception as e:  # a worker process died: that run failed, the others go on
                        entry = failed_entry(r, e)
                    on_update(r, entry)
        finally:
            for p in pools.values():
                p.shutdown(wait=True)


# ---------------------------------------------------------------- Slurm (submitit)
class GridJob(submitit.helpers.Checkpointable):
    """One run as a Slurm job. Requeued by submitit when preempted or timed out; the new attempt resumes."""

    def __init__(self, threads, device=None):
        self.threads, self.device = threads, device

    def __call__(self, run, resume=False):
        # resume: requeued through checkpoint(); SLURM_RESTART_COUNT: requeued by Slurm itself (e.g. a node
        # failure), which reruns the first submission
        if resume or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            run = run.started()
        print(f"[launch] {run.key}: pid {os.getpid()}" + (", resuming" if run.entry else ""), flush=True)
        terminated = []

        def on_sigterm(signum, _frame):  # submitit itself only logs a SIGTERM ("Bypassing signal SIGTERM")
            terminated.append(signum)
            STOP.set()
        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            entry = execute_run(run, self.threads, self.device)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if terminated and entry.get("status") == "interrupted":
            # scancel, or a preemption or time limit without --signal: Slurm sent SIGTERM; the script has
            # checkpointed. Requeue exactly as submitit does on its own signal (USR2): it calls checkpoint()
            # below, counts the timeouts and exits; the next attempt resumes from that checkpoint.
            print(f"[launch] {run.key}: SIGTERM; the script checkpointed; requeueing", flush=True)
            signal.raise_signal(submitit.JobEnvironment()._usr_sig())
        return entry

    def checkpoint(self, run, resume=False):
        # called by submitit on USR2 while the script runs: the script checkpoints now (one SIGTERM, after its
        # current step) so that the requeued attempt resumes from there and loses no step
        checkpoint_running_scripts()
        return submitit.helpers.DelayedSubmission(self, run, resume=True)


def slurm_minutes(text):
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise SystemExit(f"--slurm-time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:   # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:   # MM:SS
        seconds = a * 60 + b
    else:                 # minutes
        seconds = a * 60
    return max(1, -(-seconds // 60))


class SlurmLauncher:
    """The runs as a Slurm job array through submitit: each job one run, with gpus_per_job GPUs (0 or 1:
    a run on several GPUs is a torchrun launch, see the README), cpus_per_job CPU threads, and the time
    limit `time`. cluster="local" runs the same jobs through submitit's local executor (no cluster)."""

    def __init__(self, folder, partition=None, time="4:00:00", gpus_per_job=1, account=None, cpus_per_job=4,
                 mem_gb=None, max_timeouts=3, array_parallelism=None, setup=(), options=None, cluster="slurm",
                 poll_s=None):
        if gpus_per_job not in (0, 1):
            raise SystemExit(f"--slurm-gpus-per-job {gpus_per_job}: a run of make compare uses one GPU (or 0 for "
                             "CPU); to train one run on several GPUs use torchrun (README)")
        self.folder, self.cluster = Path(folder), cluster
        self.threads = max(1, cpus_per_job)
        self.device = "cuda" if gpus_per_job else None
        self.poll_s = poll_s if poll_s is not None else (30 if cluster == "slurm" else 0.5)
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster=cluster, slurm_max_num_timeout=max_timeouts,
                                              local_max_num_timeout=max_timeouts)
        repo = Path(__file__).resolve().parents[1]
        # the job unpickles common.launch: the repository must be importable wherever the job starts
        setup = [f"export PYTHONPATH={repo}${{PYTHONPATH:+:$PYTHONPATH}}", *setup]
        self.executor.update_parameters(
            name="compare", timeout_min=slurm_minutes(time), gpus_per_node=gpus_per_job, cpus_per_task=cpus_per_job,
            tasks_per_node=1, nodes=1, mem_gb=mem_gb, slurm_partition=partition, slurm_account=account,
            slurm_array_parallelism=array_parallelism, slurm_setup=setup, local_setup=setup,
            slurm_additional_parameters=dict(options or {}) or None)

    def run(self, runs, on_update):
        waiting, todo = {}, []
        for r in runs:
            if r.finished():
                on_update(r, r.entry)
            elif (job := self._queued(r)) is not None:  # submitted by an earlier make compare, not ended yet
                waiting[job] = r
            else:
                todo.append(r)
        if todo:
            jobs = self.executor.map_array(GridJob(self.threads, self.device), todo)
            for job, r in zip(jobs, todo):
                on_update(r, {"status": "submitted", "settings": r.settings, "job_id": job.job_id})
                waiting[job] = r
            print(f"[launch] {len(todo)} run(s) submitted ({self.cluster}: job {jobs[0].job_id.split('_')[0]}); logs in "
                  f"{self.folder}", flush=True)
        while waiting:
            for job, r in list(waiting.items()):
                if job.done():
                    del waiting[job]
                    on_update(r, self._entry(job, r))
            if waiting:
                time.sleep(self.poll_s)

    def _queued(self, run):
        """The Slurm job an earlier make compare submitted for this run, if it is still pending or running
        (so that a second `make compare` waits for it instead of starting the same run twice)."""
        e = run.entry or {}
        if self.cluster != "slurm" or e.get("status") != "submitted" or e.get("settings") != run.settings:
            return None
        job = submitit.SlurmJob(folder=self.folder, job_id=e["job_id"])
        return None if job.done() else job

    @staticmethod
    def _entry(job, run):
        try:
            entry = job.result()
        except Exception as e:  # the job itself failed (e.g. timed out too many times, cancelled)
            return failed_entry(run, e, job_id=job.job_id)
        return {**entry, "job_id": job.job_id}


# set by --max-hours or a SIGINT/SIGTERM of make compare: the running scripts checkpoint and stop
# (status "interrupted", resumed by the next make compare), nothing new starts, finished runs are kept
STOP = threading.Event()


RUNNING = set()  # the scripts running now (Popen), for checkpoint_running_scripts


def slug(text):
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[-150:]


# what a script prints when it continues earlier work: Run.start's checkpoint, single_task's finished tasks
RESUMED_MARKS = ("] resumed from ", ": finished earlier, kept")


def execute(key, cmd_tail, root, settings, threads, index, log_dir, fingerprint=None):
    """Run one strategy script (or reuse its finished run); returns its index entry.
    cmd_tail: [script, *flags] without --out/--threads; settings: what makes a run reusable; fingerprint:
    the current data's (a record made on other data, or by code whose versions changed, is run again)."""
    entry = index.get(key)
    if entry and entry.get("settings") != settings:
        entry = None  # made with other settings (profile, data): not reusable, and not resumable either
    if entry and entry.get("status") == "ok":
        if record_stale(entry["summary"], fingerprint) is None:
            return entry
        entry = None  # stale: trained again from the start, never mixed into a table
    script, flags = cmd_tail[0], cmd_tail[1:]
    cmd = [sys.executable, str(REPO / "strategies" / f"{script}.py"), "--out", str(root), "--quiet",
           "--threads", str(threads), *flags]
    if entry:  # started before and not finished: continue it
        cmd.append("--resume")
    log = log_dir / (slug(key) + ".log")
    attempt_starts = log.stat().st_size if entry and log.exists() else 0  # this attempt's lines start here
    t0 = time.time()
    index[key] = {"status": "running", "settings": settings}
    with open(log, "a" if entry else "w") as f:  # a resumed run's log keeps its earlier attempts
        # its own session: a Ctrl-C of make compare reaches the scripts only through STOP (one SIGTERM each)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        RUNNING.add(proc)
        try:
            returncode, cpu_seconds = wait_with_cpu(proc)
        finally:
            RUNNING.discard(proc)
    text = log.read_bytes()
    lines = [x for x in text.decode().splitlines() if x.strip()]
    # every script ends by printing "summary: <path>" (Run.finish)
    written = [x.split("summary: ", 1)[1] for x in lines if x.startswith("summary: ")]
    # a run resumed from its checkpoint: its time is the sum over its attempts (an interrupted entry holds the
    # earlier ones'); one that found no checkpoint started fresh, and its time is this attempt's
    attempt = text[attempt_starts:].decode(errors="replace")
    resumed = bool(entry) and any(mark in attempt for mark in RESUMED_MARKS)
    earlier = {k: entry.get(k, 0.0) if resumed else 0.0 for k in ("seconds", "cpu_seconds")}
    spent = {"seconds": round(earlier["seconds"] + time.time() - t0, 1),
             "cpu_seconds": round(earlier["cpu_seconds"] + cpu_seconds, 1)}
    if returncode == 0 and written and Path(written[-1]).exists():
        make_lean(Path(written[-1]).parent)  # the committed form (common/records.py): tables read the same
        done = {"status": "ok", "summary": written[-1], **spent, "log": str(log), "settings": settings}
        if resumed:
            done["resumed"] = True
            if "seconds" not in entry:  # the earlier attempt kept no time (older code, a failed attempt, a
                # Slurm requeue): this entry holds only this attempt's
                done["seconds_partial"] = True
        return done
    if STOP.is_set():
        return {"status": "interrupted", **spent, "log": str(log), "settings": settings}
    error = lines[-1] if lines else f"exit code {returncode}"
    if returncode == 0:
        error = "finished without printing its summary path"
    # the command as one reruns it from the repository root (a committed index holds no machine's paths)
    rerun = ["python"] + [repo_relative(a) if a.startswith("/") else a for a in cmd[1:]]
    return {"status": "failed", "error": error[:300], "log": str(log), "cmd": rerun, "settings": settings}


def checkpoint_running_scripts(timeout=300):
    """From a signal handler (a Slurm job's USR2, common/launch.py): set STOP, send each running script one
    SIGTERM (it checkpoints after its current step and exits) and wait for them, so that a requeued job
    resumes where this one stopped."""
    STOP.set()
    for proc in list(RUNNING):
        proc.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout
    for proc in list(RUNNING):
        try:
            proc.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            print(f"[compare] pid {proc.pid} did not stop within {timeout} s of SIGTERM", flush=True)


def wait_with_cpu(proc):
    """Wait for a script (sending it one SIGTERM once STOP is set: it checkpoints after its step and exits);
    returns its exit code and the CPU seconds it used, its threads included (os.wait4: this child alone,
    even with other runs going on in parallel)."""
    signalled = False
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by checkpoint_running_scripts (a signal handler)
            return proc.returncode, 0.0
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if STOP.is_set() and not signalled:
            proc.send_signal(signal.SIGTERM)
            signalled = True
        time.sleep(0.5)
