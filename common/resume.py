"""What makes a run resumable: its checkpoint (when it is written, the random generators and per-rank state it
holds, reading it back) and its metrics.jsonl (train lines buffered, cut back to the checkpoint on resume).
Run (common/train.py) decides what goes in; these two decide how it is stored.

Resuming is exact on CPU: with the model, optimizer and schedule, the checkpoint holds every random generator
(torch, numpy, python, CUDA where in use) and, under torchrun, each rank's own generators and rule state,
gathered on rank 0, which alone writes files."""
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from common import distributed
from common.checkpoints import load_checkpoint
from common.files import atomic_save, jsonable, to_cpu


def rng_state():
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_initialized():  # CUDA in use: its generators too (a CPU run never initialises CUDA here)
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng):
    torch.set_rng_state(rng["torch"].cpu())  # map_location may have moved it to the GPU
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_initialized():  # a CPU resume of a GPU run leaves CUDA alone
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


class Checkpointer:
    """checkpoint.pt of one run folder, and its cadence: every `every` steps (0: never by count) or every
    `minutes` of wall time since the last checkpoint (0: never by time)."""

    def __init__(self, folder, every, minutes):
        self.path = Path(folder) / "checkpoint.pt"
        self.every, self.minutes = every, minutes
        self.last = time.perf_counter()  # the wall-time cadence counts from here

    def due(self, step):
        """Under torchrun decided alike on every rank, as save() gathers from all of them: the clocks are
        compared every 10 steps, one all-reduce of a flag."""
        if self.every > 0 and step % self.every == 0:
            return True
        if self.minutes <= 0:
            return False
        if distributed.is_distributed() and step % 10 != 0:
            return False
        due = time.perf_counter() - self.last >= self.minutes * 60
        return distributed.any_true(due) if distributed.is_distributed() else due

    def save(self, shared, rule_state):
        """shared(): what every rank holds alike (model, optimizer, ...), built on rank 0 alone; rule_state:
        this rank's {name: state_dict} of the rule's objects, stored with this rank's generators."""
        rng = rng_state()
        ranks = None
        if distributed.is_distributed():  # RNGs and rule state per rank, gathered on rank 0 alone
            ranks = distributed.gather_to_main(to_cpu({"rng": rng, "strategy": rule_state}))
        if distributed.is_main():         # model and optimizer are rank 0's (identical): rank 0 alone builds the file
            state = {**shared(), "rng": rng, "strategy": rule_state}
            if ranks is not None:
                state["world_size"], state["ranks"] = distributed.world_size(), ranks
            atomic_save(state, self.path)
        self.last = time.perf_counter()

    def load(self, map_location):
        """The checkpoint with this rank's generators and rule state in "rng" and "strategy"; the generators
        are set already."""
        state = load_checkpoint(self.path, map_location=map_location)  # restricted unpickler: runs nothing
        saved_world = state.get("world_size", 1)
        if saved_world != distributed.world_size():
            raise SystemExit(f"{self.path}: written by a run of {saved_world} process(es), resumed with "
                             f"{distributed.world_size()}; resume with the same torchrun --nproc_per_node "
                             f"(each rank's shard and random state depend on it)")
        if "ranks" in state:  # this rank's own RNGs and rule state
            state["rng"], state["strategy"] = state["ranks"][distributed.rank()]["rng"], state["ranks"][distributed.rank()]["strategy"]
        set_rng_state(state["rng"])
        return state


class MetricsLog:
    """metrics.jsonl of one run folder, written by rank 0: records at once, train lines buffered until the
    next record, flush or checkpoint."""

    def __init__(self, folder):
        self.path = Path(folder) / "metrics.jsonl"
        self.pending = []

    def write(self, record):
        self.add(record)
        self.flush()

    def add(self, record):
        if distributed.is_main():  # torchrun: rank 0 writes
            self.pending.append(record)

    def flush(self):
        if self.pending:
            with open(self.path, "a") as f:
                for rec in self.pending:
                    f.write(json.dumps(jsonable(rec)) + "\n")
            self.pending = []

    def cut(self, step):
        """Drop lines written after the checkpoint: the resumed run writes them again, identically."""
        if not distributed.is_main() or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if json.loads(line).get("step", 0) <= step and json.loads(line).get("event") != "end"]
        self.path.write_text("".join(line + "\n" for line in keep))
