"""make compare's launchers (common/launch.py): the Slurm path through submitit's local executor, with one
job preempted and requeued, gives the local launcher's table; the GPU queue of the local launcher."""
import csv
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from common import launch

pytestmark = pytest.mark.slow  # minutes: left out by -m "not slow"

GRID = ["--only", "round_robin,dwa", "--seeds", "2",
        "--extra", "--model-size tiny --epochs 1 --batch-size 8 --eval-every 2 --checkpoint-minutes 0"]
SLURM = ["--launcher", "slurm", "--slurm-cluster", "local", "--slurm-gpus-per-job", "0", "--slurm-cpus-per-job", "1",
         "--slurm-time", "10"]
TIMING = ("train_seconds", "seconds_per_step")  # wall-clock: differs from run to run


def table(out):
    """compare.csv without its timing columns, and compare.md without its Budget section and cost line (wall-clock)."""
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(open(out / "compare.csv"))]
    md = (out / "compare.md").read_text()
    head, _, rest = md.partition("## Budget")
    head = "\n".join(x for x in head.splitlines() if not x.startswith("- measured cost:"))  # run times
    return rows, head + rest.partition("\n## ")[2]


def proc_cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def proc_parent_and_state(pid):
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()  # after "pid (name)": state, ppid, ...
    return int(fields[1]), fields[0]


def find_script(script, out, seed):
    """The pid of the strategy script running with this --out and --seed, or None."""
    for p in Path("/proc").iterdir():
        cmd = proc_cmdline(p.name) if p.name.isdigit() else []
        if any(c.endswith(f"{script}.py") for c in cmd) and str(out) in cmd and cmd[cmd.index("--seed") + 1] == str(seed):
            return int(p.name)
    return None


def preempt_when_checkpointed(out, script, seed, deadline, sig=signal.SIGUSR2):
    """Wait until the run's script has written a checkpoint; freeze the script (so that it cannot finish
    meanwhile), send the preemption signal to its submitit job, as Slurm does (USR2 with --signal, SIGTERM
    without), then let the script go on: the job has it checkpoint and requeues. Returns the step of the
    checkpoint before the signal."""
    while time.time() < deadline:
        pid = find_script(script, out, seed)
        if pid and (out / script / f"seed{seed}" / "checkpoint.pt").exists():
            os.kill(pid, signal.SIGSTOP)
            for _ in range(200):  # a signal is delivered asynchronously: wait for the stop
                job, state = proc_parent_and_state(pid)
                if state != "R":
                    break
                time.sleep(0.01)
            assert state == "T", f"the run ended before it could be preempted (state {state})"
            assert "submitit.core._submit" in proc_cmdline(job)
            import torch
            before = torch.load(out / script / f"seed{seed}" / "checkpoint.pt", weights_only=True)["progress"]["step"]
            os.kill(job, sig)
            time.sleep(1.0)  # the job's handler runs (and sends the script its SIGTERM) while the script is frozen
            os.kill(pid, signal.SIGCONT)
            return before
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint of {script} seed {seed} appeared in {out} in time")


@pytest.fixture(scope="module")
def local_grid(tiny_data, tmp_path_factory):
    """The table of the local launcher, which every Slurm variant must give."""
    from common import compare
    local_out = tmp_path_factory.mktemp("local")
    # --jobs = the core count: one thread per run, as the Slurm jobs here (--slurm-cpus-per-job 1)
    compare.main(GRID + ["--data", str(tiny_data), "--out", str(local_out), "--jobs", str(os.cpu_count() or 1)])
    launch.STOP.clear()
    return table(local_out)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the job's processes through /proc")
@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM], ids=["USR2", "TERM"])
def test_slurm_grid_with_a_requeued_job_equals_the_local_grid(sig, local_grid, tiny_data, tmp_path):
    """Preempted with --signal (USR2) or without it (SIGTERM, also scancel): the script checkpoints at the
    signal, the job is requeued, the next attempt resumes from that checkpoint, and the table is the local one."""
    from common import compare
    data = ["--data", str(tiny_data)]
    slurm_out = tmp_path / "slurm"

    errors = []

    def submit():
        try:
            compare.main(GRID + data + SLURM + ["--out", str(slurm_out)])
        except BaseException as e:  # noqa: B902 -- reported in the test thread
            errors.append(e)
    grid = threading.Thread(target=submit)
    grid.start()
    try:
        before = preempt_when_checkpointed(slurm_out / "runs/quick", "round_robin", 1, time.time() + 120, sig)
    finally:
        grid.join(300)
    assert not grid.is_alive() and not errors, errors

    # the preempted job was requeued by submitit and its second attempt resumed the run with --resume
    job_logs = [p.read_text() for p in (slurm_out / "runs/quick/slurm").glob("*_log.out")]
    preempted = [t for t in job_logs if "round_robin seed1" in t]
    assert len(preempted) == 1 and "Requeued job" in (preempted[0] + "".join(
        p.read_text() for p in (slurm_out / "runs/quick/slurm").glob("*_log.err")))
    starts = [x for x in preempted[0].splitlines() if x.startswith("[launch] final: round_robin seed1: pid")]
    assert len(starts) == 2 and not starts[0].endswith("resuming") and starts[1].endswith(", resuming")
    run_log = next((slurm_out / "runs/quick/logs").glob("*round_robin_seed1*.log")).read_text()
    resumed = [x for x in run_log.splitlines() if "resumed from" in x]
    assert resumed, run_log
    step = int(resumed[0].rsplit("at step ", 1)[1])
    assert 0 < step < 8, run_log  # 8 steps in all
    # the script checkpointed at the signal, after the step it was frozen in, and resumed from there: equal to
    # the best-model checkpoint's step where it was frozen between writing that and its stop check
    assert f"stopped at step {step}; rerun with --resume" in run_log and step >= before, (before, run_log)

    assert table(slurm_out) == local_grid

    # make compare again only collects: nothing is submitted, no run is touched
    before = {p: p.stat().st_mtime for p in (slurm_out / "runs/quick/slurm").iterdir()}  # submitit's folder
    summaries = {p: p.stat().st_mtime for p in slurm_out.glob("runs/quick/*/seed*/summary.json")}
    compare.main(GRID + data + SLURM + ["--out", str(slurm_out)])
    assert {p: p.stat().st_mtime for p in before} == before
    assert set((slurm_out / "runs/quick/slurm").iterdir()) == set(before)
    assert {p: p.stat().st_mtime for p in summaries} == summaries and len(summaries) == 4


def where_am_i(run, threads, device):
    """A stand-in for launch.execute_run, run in the GPU's worker process."""
    start = time.time()
    time.sleep(0.2)
    return {"status": "ok", "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": device, "pid": os.getpid(),
            "start": start, "end": time.time()}


def test_local_launcher_runs_one_job_per_gpu_at_a_time():
    runs = [launch.GridRun(f"run{i}", ["x"], "/nonexistent", [], "/nonexistent") for i in range(5)]
    updates = []
    launch.LocalLauncher(jobs=8, gpus="3,5", work=where_am_i).run(runs, lambda r, e: updates.append((r.key, e)))
    ended = {k: e for k, e in updates if e["status"] == "ok"}
    assert sorted(ended) == [f"run{i}" for i in range(5)]
    assert [e["status"] for k, e in updates].count("running") == 5  # each marked started before it ran
    assert {e["gpu"] for e in ended.values()} == {"3", "5"} and {e["device"] for e in ended.values()} == {"cuda"}
    for gpu in ("3", "5"):
        mine = sorted((e["start"], e["end"], e["pid"]) for e in ended.values() if e["gpu"] == gpu)
        assert len({pid for _, _, pid in mine}) == 1  # one worker process per GPU
        assert all(a[1] <= b[0] for a, b in zip(mine, mine[1:]))  # never two runs on one GPU at once


def test_slurm_time_formats_and_bad_options(tmp_path):
    assert [launch.slurm_minutes(t) for t in ("90", "1:30:00", "5:30", "2-00:00:00", "1-2", "1-0:30")] == \
        [90, 90, 6, 2880, 1560, 1470]
    with pytest.raises(SystemExit, match="slurm-time"):
        launch.slurm_minutes("4h")
    with pytest.raises(SystemExit, match="torchrun"):
        launch.SlurmLauncher(tmp_path, gpus_per_job=2, cluster="local")
    with pytest.raises(SystemExit, match="--gpus"):
        launch.LocalLauncher(gpus="cuda:0")


def test_a_job_slurm_requeued_itself_resumes_its_run(monkeypatch):
    """Slurm's own requeue (a node failure: SLURM_RESTART_COUNT > 0) reruns the first submission; the job then
    continues the run (--resume) instead of starting it afresh over its checkpoint."""
    seen = []
    monkeypatch.setattr(launch, "execute_run", lambda run, threads, device: seen.append(run.entry) or {"status": "ok"})
    job = launch.GridJob(threads=1)
    run = launch.GridRun("final: x seed0", ["x"], "/nonexistent", ["--lr", "1"], "/nonexistent")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    job(run)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    job(run)
    assert seen == [None, {"status": "running", "settings": ["--lr", "1"]}]
