"""Files a run writes, written atomically (temporary file, fsync, rename: a crash never leaves half a file);
under torchrun rank 0 alone writes. And the conversions to JSON and to CPU they need."""
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from common import distributed
from common.checkpoints import to_safe


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint. The object
    goes through common.checkpoints.to_safe first: numpy values become plain data and anything the restricted
    loader would refuse is an error here, so that every checkpoint we write loads with weights_only=True."""
    if not distributed.is_main():  # torchrun: rank 0 alone writes files, so it alone serialises them
        return
    path = Path(path)
    obj = to_safe(obj, path.name)
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_bytes(path, data):
    if not distributed.is_main():  # torchrun: rank 0 alone writes files (checkpoints, best.pt, summaries)
        return
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())


def write_json(path, obj):
    """Atomically write JSON; NaN becomes null so that the file stays valid JSON."""
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2))


def to_cpu(x):
    """A copy of nested dicts/lists with every tensor on the CPU (to gather state from other ranks)."""
    if isinstance(x, dict):
        return {k: to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_cpu(v) for v in x)
    return x.detach().cpu() if torch.is_tensor(x) else x


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if torch.is_tensor(x):
        return jsonable(x.detach().cpu().tolist())
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    return x
