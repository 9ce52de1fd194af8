"""The lean form of a finished grid run, the form committed under results/runs/ (issue 25: the whole standard
grid stays under about 30 MB). make compare makes each run lean as soon as it finishes, so that the records
of a fresh clone and the committed ones have one form. Nothing that a table or a figure reads changes:

- test_scores.npy: each task's scores are replaced by their dense rank (uint16: 0 for the lowest score,
  equal scores share a rank). Average precision, and so the bootstrap over test clips, reads only the order
  of the scores and their ties, which the ranks keep exactly. The file halves (3200 clips x 5 tasks: 64 ->
  32 KB). The probabilities themselves are in a run made outside make compare.
- metrics.jsonl -> metrics.jsonl.gz: the same lines, gzip-compressed (about 3x smaller; `zcat` reads it).

make_lean is idempotent: it may run again over records that are lean already. read_log reads either form."""
import gzip
import json
import os
from pathlib import Path

import numpy as np

from common.files import atomic_write_bytes, npy_bytes

LOG = "metrics.jsonl"
LEAN_LOG = "metrics.jsonl.gz"


def dense_ranks(scores):
    """[N, T] scores -> [N, T] uint16 dense ranks per column (the same order and the same ties)."""
    scores = np.asarray(scores)
    ranks = np.empty(scores.shape, np.uint16)
    for t in range(scores.shape[1]):
        values, inverse = np.unique(scores[:, t], return_inverse=True)
        if values.size > np.iinfo(np.uint16).max + 1:
            raise ValueError(f"{values.size} distinct test scores do not fit a uint16 rank")
        ranks[:, t] = inverse.reshape(-1)
    return ranks


def make_lean(folder):
    """Every test_scores.npy and metrics.jsonl under a finished run's folder, its sub-runs included."""
    folder = Path(folder)
    for path in sorted(folder.rglob("test_scores.npy")):
        scores = np.load(path)
        if scores.dtype != np.uint16:
            atomic_write_bytes(path, npy_bytes(dense_ranks(scores)))
    for path in sorted(folder.rglob(LOG)):
        atomic_write_bytes(path.with_name(LEAN_LOG), gzip.compress(path.read_bytes(), 9, mtime=0))
        os.remove(path)


def log_path(folder):
    """A run folder's log, plain (a run made here) or lean (a grid record); None when it has none."""
    for name in (LOG, LEAN_LOG):
        if (Path(folder) / name).exists():
            return Path(folder) / name
    return None


def read_log(path):
    """The records of a metrics.jsonl(.gz), up to a line still being written by a running job."""
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records
