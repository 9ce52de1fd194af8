"""Convert a checkpoint you trust into one that loads without running code.

    python data_prep/trust_checkpoint.py IN OUT            # OUT: a .pt that the training scripts accept
    python data_prep/trust_checkpoint.py IN OUT.safetensors  # only the model's tensors, no pickle at all

The training scripts read checkpoints only with PyTorch's restricted unpickler (common/checkpoints.py):
a file holding anything but tensors, numbers, strings, lists, tuples and dicts stops the run, unrun. A
file from before that rule (a checkpoint of an older version of this code, with numpy's RNG state in it),
or one with an argparse.Namespace, a Path or a whole pickled model in it, needs this command once. It is
the one place that unpickles a file in full, which runs any code the file carries: use it only on files
whose origin you trust. The copy holds the same data with those objects turned into plain values:

  argparse.Namespace -> dict of its arguments;  pathlib paths -> str;  enum members -> their value;
  dataclass instances -> dict;  numpy values -> stored as common.checkpoints does (exact, read back as numpy);
  objects with a state_dict() (a whole nn.Module, an optimizer) -> their state_dict();
  anything else -> an error naming where it sits (--drop-unknown leaves it out, listed).

For --resume, replace the run's checkpoint.pt with the copy.
"""
import argparse
import enum
import os
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path, PurePath

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common.checkpoints import MODEL_FILE, load_checkpoint, to_safe  # noqa: E402


def make_converter(drop_unknown, converted, dropped):
    """convert(value, where) for common.checkpoints.to_safe: a plain replacement of a trusted object."""
    dropped_marker = "\0dropped by trust_checkpoint\0"  # plain (to_safe keeps it), then removed

    def convert(value, where):
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        if isinstance(value, argparse.Namespace):
            out = dict(vars(value))
        elif isinstance(value, PurePath):
            out = str(value)
        elif isinstance(value, enum.Enum):
            out = value.value
        elif is_dataclass(value) and not isinstance(value, type):
            out = asdict(value)
        elif hasattr(value, "state_dict") and callable(value.state_dict):
            out = value.state_dict()
        elif isinstance(value, (bool, int, float, str, bytes, tuple, list, dict)):
            # a subclass of a plain type (a defaultdict, a namedtuple, ...): the plain type
            base = next(t for t in (bool, int, float, str, bytes, tuple, list, dict) if isinstance(value, t))
            out = base(value)
        elif drop_unknown:
            dropped.append(f"{where}: {kind}")
            return dropped_marker
        else:
            return None  # to_safe raises, naming where it sits
        converted.append(f"{where}: {kind} -> {type(out).__name__}")
        return out

    return convert, dropped_marker


def remove(obj, marker):
    """obj without the entries that were dropped (--drop-unknown)."""
    if isinstance(obj, dict):
        out = type(obj)((k, remove(v, marker)) for k, v in obj.items() if not (isinstance(v, str) and v == marker))
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if type(obj) in (list, tuple):
        return type(obj)(remove(v, marker) for v in obj if not (isinstance(v, str) and v == marker))
    return obj


def model_tensors(state):
    """The model's state dict inside a checkpoint (ours: "model"; the original code's: "model_state")."""
    for key in ("model", "model_state", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise SystemExit("error: no state dict of tensors in the file (keys model / model_state / state_dict)")
    return state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="the checkpoint you trust")
    p.add_argument("output", help=f"the safe copy (.pt; or .safetensors for the model's tensors only, as {MODEL_FILE})")
    p.add_argument("--drop-unknown", action="store_true",
                   help="leave out objects that have no plain form (listed) instead of stopping")
    args = p.parse_args(argv)
    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        raise SystemExit(f"error: {src}: no such file")
    if src.resolve() == dst.resolve():
        raise SystemExit("error: OUT must differ from IN (the original stays as it is)")
    print(f"[trust] trusting {src}: unpickling it in full (this runs any code the file carries; "
          f"do this only for a file whose origin you know)", flush=True)
    state = torch.load(src, map_location="cpu", weights_only=False)  # the one explicit trust
    converted, dropped = [], []
    convert, marker = make_converter(args.drop_unknown, converted, dropped)
    try:
        safe = to_safe(state, src.name, convert)
    except TypeError as e:
        raise SystemExit(f"error: {e}\n(--drop-unknown leaves such objects out)") from None
    if dropped:
        safe = remove(safe, marker)
    for line in converted:
        print(f"[trust]   converted {line}")
    for line in dropped:
        print(f"[trust]   dropped {line}")
    tmp = Path(str(dst) + ".tmp")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model_tensors(safe).items()}
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    else:
        torch.save(safe, tmp)
    os.replace(tmp, dst)
    load_checkpoint(dst)  # the copy reads back with the restricted loader
    print(f"[trust] wrote {dst}: it loads with the restricted loader; pass it to --init (or, for --resume, "
          f"put it in place of the run's checkpoint.pt)")
    return dst


if __name__ == "__main__":
    main()
