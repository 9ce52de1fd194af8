"""Reading checkpoints without running code from them, and writing ours so that they read back that way.

A .pt file is a pickle, and a pickle can call any function while it is read. Every checkpoint this
toolkit reads (--init, --resume, best.pt, pretraining checkpoints, the original code's files) goes through
`load_checkpoint`, which uses PyTorch's restricted unpickler (torch.load(weights_only=True)): tensors,
numbers, strings, bytes, None, lists, tuples, sets and dicts, and nothing that can run code. A file that
holds anything else stops the run (UnsafeCheckpointError) with the file's name, the objects it refused
(the pickle globals, e.g. `builtins.exec`, `argparse.Namespace`) and what to do; none of its code runs.

    state = load_checkpoint(path)                        # our checkpoints, best.pt, the original code's
    atomic_save(state, path)   (common/files.py)         # writes through to_safe(): only what loads back

Our own checkpoints hold only what that loader accepts. NumPy values (numpy's RNG state, a rule's numpy
float) are stored as small tagged dicts {"__numpy__": ..., "dtype": ..., "shape": ..., "data": bytes}
(to_safe) and turned back into the same NumPy objects on loading (from_safe), bit for bit, so that a
resumed run continues exactly. Any other object (a class of the project, an argparse.Namespace, a Path)
is an error when the checkpoint is written, naming where it sits, rather than a file that later cannot
be read.

A file you trust (an older checkpoint with an argparse.Namespace in it, one written before this module
existed): `python data_prep/trust_checkpoint.py IN OUT` unpickles it in full, once, and writes a safe copy.
The training scripts themselves never trust a file.

Exchange format without pickle: a finished run writes its best model's weights as model.safetensors with
model_config.json (trunk, sizes, text encoder, tasks; the same JSON is in the safetensors header), and
--init takes a .safetensors file; its configuration is checked against the run's model field by field
(check_model_config).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections import OrderedDict
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import numpy as np
import torch

from common.model import HCAConfig, MultiTaskModel

NUMPY_TAG = "__numpy__"
TRUST_COMMAND = "python data_prep/trust_checkpoint.py"
MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
MODEL_FORMAT = "hca-mtl-model"
MODEL_FORMAT_VERSION = 1
# values that the restricted unpickler accepts as they are
# (exact types: a subclass such as numpy.float64 or an IntEnum pickles as its own class, which is refused)
_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_TORCH_PLAIN = (torch.Tensor, torch.nn.Parameter, torch.Size, torch.dtype, torch.device)
# numpy dtypes a tagged array may have (no object or structured dtypes: those are pickles again)
_NUMPY_KINDS = set("biufcSUmM")


class UnsafeCheckpointError(SystemExit):
    """A checkpoint holds objects the restricted loader refuses (it stops the run: a SystemExit with the
    message). .path: the file; .refused: the pickle globals it refused (module.name)."""

    def __init__(self, path, refused, detail=""):
        self.path, self.refused = str(path), list(refused)
        what = ", ".join(self.refused) if self.refused else "an object the restricted loader does not accept"
        message = (
            f"error: {path}: refused to load it. It holds {what}: pickled objects that could run code when "
            f"unpickled, so this file is read only with PyTorch's restricted loader (torch.load "
            f"weights_only=True), which accepts tensors, numbers, strings, lists, tuples and dicts. Nothing from "
            f"the file was run. To proceed: if you trust the file (you know who made it, e.g. a checkpoint of "
            f"an older version of this code or of the original code), convert it once with\n"
            f"    {TRUST_COMMAND} {path} SAFE_COPY.pt\n"
            f"and pass SAFE_COPY.pt instead (for --resume, replace the run's checkpoint.pt with it); otherwise "
            f"ask its author for the model as {MODEL_FILE} + {MODEL_CONFIG_FILE} (written by every finished run), "
            f"or start without it.")
        if detail:
            message += f"\n(restricted loader: {detail})"
        super().__init__(message)


# ---------------------------------------------------------------------------------------------------------
# what our checkpoints may hold: to_safe on writing, from_safe on reading
def _encode_numpy(value, where):
    array = np.asarray(value)
    if array.dtype.kind not in _NUMPY_KINDS or array.dtype.fields is not None:
        raise TypeError(f"{where}: a numpy value of dtype {array.dtype} cannot be stored in a checkpoint "
                        f"(only numeric, bool, string and datetime dtypes)")
    return {NUMPY_TAG: "scalar" if isinstance(value, np.generic) else "ndarray", "dtype": array.dtype.str,
            "shape": list(array.shape), "data": np.ascontiguousarray(array).tobytes()}


def _decode_numpy(tag, where="checkpoint"):
    dtype = np.dtype(str(tag["dtype"]))
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None:
        raise ValueError(f"{where}: a stored numpy value of dtype {dtype} is not accepted")
    array = np.frombuffer(bytes(tag["data"]), dtype=dtype).reshape(tuple(int(n) for n in tag["shape"])).copy()
    return array[()] if tag[NUMPY_TAG] == "scalar" else array


def _rebuild(container, items):
    """A container of the same type with new items; an OrderedDict keeps its _metadata (module versions,
    which load_state_dict reads)."""
    if isinstance(container, dict):
        out = OrderedDict(items) if isinstance(container, OrderedDict) else dict(items)
        if hasattr(container, "_metadata"):
            out._metadata = container._metadata
        return out
    return type(container)(items)


def to_safe(obj, where="checkpoint", convert=None):
    """obj with every NumPy value turned into a tagged dict of plain values: what torch.load(weights_only=True)
    reads back (from_safe undoes it exactly). Containers without NumPy values are returned as they are.
    Anything else that the restricted loader would refuse is a TypeError naming where it sits in obj.
    convert(value, where) -> replacement or None: a hook for data_prep/trust_checkpoint.py (Namespace,
    Path, ...); None (the default) converts nothing."""
    if type(obj) in _PLAIN or type(obj) in _TORCH_PLAIN:
        return obj
    if isinstance(obj, (np.ndarray, np.generic)):
        return _encode_numpy(obj, where)
    if type(obj) in (dict, OrderedDict):
        if NUMPY_TAG in obj:
            raise TypeError(f"{where}: a dict with the key {NUMPY_TAG!r} (reserved for stored numpy values)")
        items, changed = [], False
        for k, v in obj.items():
            if type(k) not in _PLAIN:
                raise TypeError(f"{where}: dict key {k!r} of type {type(k).__name__} cannot be stored in a checkpoint")
            new = to_safe(v, f"{where}[{k!r}]", convert)
            changed |= new is not v
            items.append((k, new))
        return _rebuild(obj, items) if changed else obj
    if type(obj) in (list, tuple, set):
        items = [to_safe(v, f"{where}[{i}]", convert) for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        if type(obj) is set:
            raise TypeError(f"{where}: a set holding numpy values cannot be stored in a checkpoint (use a list)")
        return type(obj)(items)
    if convert is not None:
        replacement = convert(obj, where)
        if replacement is not None:
            return to_safe(replacement, where, convert)
    raise TypeError(f"{where}: an object of type {type(obj).__module__}.{type(obj).__qualname__} cannot be stored "
                    f"in a checkpoint: checkpoints hold only tensors, numbers, strings, lists, tuples and dicts "
                    f"(and numpy values, converted), so that they load without running code; give the state_dict "
                    f"that holds it plain values")


def from_safe(obj, where="checkpoint"):
    """Undo to_safe: tagged dicts become the NumPy values they were; everything else is returned as it is."""
    if type(obj) in (dict, OrderedDict):
        if NUMPY_TAG in obj:
            return _decode_numpy(obj, where)
        items, changed = [], False
        for k, v in obj.items():
            new = from_safe(v, where)
            changed |= new is not v
            items.append((k, new))
        return _rebuild(obj, items) if changed else obj
    if type(obj) in (list, tuple):
        items = [from_safe(v, where) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    return obj


# ---------------------------------------------------------------------------------------------------------
# the one loader
def refused_globals(path, error=None):
    """The pickle globals (module.name) of a file that the restricted loader refuses, read from the pickle's
    opcodes (pickletools; nothing is unpickled): a torch.save zip file, the legacy torch.save format or a
    plain pickle. Falls back on the names in the loader's error."""
    names = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a zip checkpoint: the legacy torch.save format, a plain pickle
        try:
            with open(path, "rb") as f:
                found = _pickle_globals(f)
            allowed = _allowed_globals()
            names = [n for n in found if n not in allowed]
        except Exception:
            pass
    if not names and error is not None:
        names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    return list(dict.fromkeys(names))


def _python3_name(module, name):
    """module.name as Python 3 spells it (protocol 2 pickles say __builtin__.exec for builtins.exec)."""
    import _compat_pickle
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _allowed_globals():
    from torch import _weights_only_unpickler as w
    return set(w._get_allowed_globals()) | set(w._get_user_allowed_globals())


def _pickle_globals(f, max_pickles=6):
    """The globals named by the first pickles of a stream (the legacy torch.save format is a few pickles in a
    row: magic number, protocol, system info, the object), statically: GLOBAL/INST opcodes, and STACK_GLOBAL
    with the two strings pushed before it (memo gets followed)."""
    import pickletools
    names = []
    for _ in range(max_pickles):
        memo, pushed = {}, []
        try:
            for op, arg, _pos in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    names.append(_python3_name(*arg.split(" ", 1)))
                    pushed.append(None)
                elif op.name == "STACK_GLOBAL":
                    if len(pushed) >= 2 and isinstance(pushed[-2], str) and isinstance(pushed[-1], str):
                        names.append(_python3_name(pushed[-2], pushed[-1]))
                    pushed.append(None)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                else:
                    pushed.append(arg if isinstance(arg, str) else None)
        except Exception:  # the end of the pickles (raw storage bytes follow in the legacy format)
            break
    return list(dict.fromkeys(names))


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint without running code from it: a .safetensors file (a dict of tensors), or a torch.save
    file through the restricted unpickler (weights_only=True). A file that holds anything else raises
    UnsafeCheckpointError (a SystemExit naming the file, the refused objects and how to proceed); an unreadable
    file is a SystemExit naming it. NumPy values stored by to_safe come back as NumPy values."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return load_safetensors(path, map_location)[0]
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 5": not ours to act on
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(path, refused_globals(path, e), _first_line(e)) from None
    except Exception as e:  # a truncated file, not a checkpoint at all, ...
        refused = refused_globals(path, e)
        if refused:
            raise UnsafeCheckpointError(path, refused, _first_line(e)) from None
        raise SystemExit(f"error: {path}: cannot be read as a checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    return from_safe(state, str(path))


def _first_line(error):
    """The line of the loader's error that says what it refused."""
    text = str(error)
    m = re.search(r"Unsupported (?:global|operand)[^\n]*", text)
    if m:  # without torch's advice to allowlist the global: that is the trust command's business
        return m.group(0).split(". Please")[0][:300]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


# ---------------------------------------------------------------------------------------------------------
# model.safetensors + model_config.json: a model without a pickle
# HCAConfig fields that do not change the shapes or meaning of the weights (training-time dropouts)
_UNCHECKED_CONFIG = {f for f in ("bert_dropout", "bert_attn_dropout", "lstm_dropout", "proj_dropout", "xattn_dropout",
                                 "step_dropout", "pool_dropout", "head_dropout")}
_ENCODER_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "vocab_size", "max_position_embeddings", "type_vocab_size")


def describe_model(model, **extra):
    """The configuration of a model as JSON-ready data: trunk, tasks, sizes (its HCAConfig), text encoder.
    extra: informational fields (stage, strategy, feature_norm, best_step, ...), never checked."""
    config = asdict(model.config) if is_dataclass(model.config) else dict(model.config)
    encoder = getattr(model, "text_encoder", None)
    text_encoder = None
    if encoder is not None:
        cfg = encoder.config
        text_encoder = {"source": str(getattr(encoder, "source", type(encoder).__name__)),
                        "class": type(encoder).__name__,
                        **{f: getattr(cfg, f, None) for f in _ENCODER_FIELDS}}
    info = {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, "weights": MODEL_FILE,
            "trunk": getattr(model, "trunk_name", type(model).__name__), "tasks": list(model.tasks),
            "config": config, "text_encoder": text_encoder}
    info.update(extra)
    return json.loads(json.dumps(info))  # tuples -> lists, as the file has them


def write_model_files(model, folder, **extra):
    """Write a model's exchange files into folder: model.safetensors (its state dict on the CPU, the
    configuration also in the header's metadata) and model_config.json; each through a temporary file and
    a rename. Returns the two paths."""
    from safetensors.torch import save_file
    folder = Path(folder)
    info = describe_model(model, **extra)
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        # safetensors refuses tensors that share storage (tied weights): those are copied (and re-tied on loading)
        tensors[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    paths = folder / MODEL_FILE, folder / MODEL_CONFIG_FILE
    tmp = [Path(str(p) + ".tmp") for p in paths]
    save_file(tensors, str(tmp[0]), metadata={"format": "pt", "model_config": json.dumps(info)})
    tmp[1].write_text(json.dumps(info, indent=2) + "\n")
    for t, p in zip(tmp, paths):
        with open(t, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(t, p)
    return paths


def load_safetensors(path, map_location="cpu"):
    """(tensors, configuration or None) of a .safetensors file: the configuration from its header's
    metadata, else from model_config.json beside it. No pickle is involved."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    path = Path(path)
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: cannot be read as a safetensors file ({e})") from None
    config = None
    if "model_config" in metadata:
        config = json.loads(metadata["model_config"])
    elif (path.parent / MODEL_CONFIG_FILE).is_file():
        config = json.loads((path.parent / MODEL_CONFIG_FILE).read_text())
    return tensors, config


def check_model_config(model, saved, source):
    """Stop (SystemExit) when the configuration a model file was saved with differs from this model's in a
    field that matters (trunk, tasks, sizes, text encoder; not dropouts or where the encoder came from),
    naming the field and both values."""
    ours = describe_model(model)
    if saved.get("format") not in (None, MODEL_FORMAT):
        raise SystemExit(f"error: {source}: configuration format {saved.get('format')!r}, expected {MODEL_FORMAT!r}")
    checks = [("trunk", saved.get("trunk"), ours["trunk"]), ("tasks", saved.get("tasks"), ours["tasks"])]
    saved_config = saved.get("config") or {}
    for name, value in ours["config"].items():
        if name not in _UNCHECKED_CONFIG:
            checks.append((f"config.{name}", saved_config.get(name), value))
    saved_encoder, our_encoder = saved.get("text_encoder"), ours["text_encoder"]
    if (saved_encoder is None) != (our_encoder is None):
        checks.append(("text_encoder", saved_encoder and saved_encoder.get("source"),
                       our_encoder and our_encoder.get("source")))
    elif saved_encoder is not None:
        for name in _ENCODER_FIELDS:
            checks.append((f"text_encoder.{name}", saved_encoder.get(name), our_encoder.get(name)))
    for field, theirs, mine in checks:
        if theirs != mine:
            raise SystemExit(
                f"error: --init {source}: the model was saved with {field} = {theirs!r}, this run's model has "
                f"{field} = {mine!r}. Load it into the same configuration (the file's {MODEL_CONFIG_FILE} lists "
                f"trunk, tasks, sizes and text encoder: --trunk, --tasks, --model-size, --text-encoder)")
    return ours


def config_fields_checked():
    """The HCAConfig fields check_model_config compares (for documentation and tests)."""
    return [f.name for f in fields(HCAConfig) if f.name not in _UNCHECKED_CONFIG]


def load_init(model, path):
    """Load a checkpoint into the model non-strictly and report what did not match. Our checkpoints hold
    {"model": state_dict}; the original code's hold {"model_state": ...} with its own parameter names; a
    .safetensors file (a finished run's model.safetensors) holds the state dict, and its configuration
    (model_config.json) must match the model's. Every file is read without running code from it
    (common.checkpoints: the restricted unpickler; a file holding anything else stops the run, unrun)."""
    if str(path).endswith(".safetensors"):  # no pickle; its configuration (header or model_config.json) must match
        tensors, config = load_safetensors(path)
        if config is not None:
            check_model_config(model, config, path)
        original = any(k.startswith("features.") for k in tensors) and not any(k.startswith("heads.") for k in tensors)
        state = tensors if original else {"model": tensors}
    else:  # restricted unpickler: a file holding anything but tensors and plain data stops here, unrun
        state = load_checkpoint(path, map_location="cpu")
    if isinstance(state, dict) and "model" in state:
        result = model.load_state_dict(state["model"], strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    else:
        missing, unexpected = load_original_checkpoint(model, state)
    trunk_missing = [k for k in missing if not k.startswith("heads.")]
    print(f"[init] {path}: {len(missing)} missing keys ({len(trunk_missing)} in the trunk), "
          f"{len(unexpected)} unexpected keys", flush=True)
    for k in trunk_missing[:10]:
        print(f"[init]   missing: {k}")
    for k in unexpected[:10]:
        print(f"[init]   unexpected: {k}")
    return {"missing": missing, "unexpected": unexpected}


# Loading checkpoints of the original code (Multi-Task/source/models/multi_task_model.py, class Bert_Model;
# the binary model and the hybrid pre-training model use the same trunk names). Its trunk is an
# nn.ModuleList `features` = [bert, rnn_img, rnn_img_drop_norm, rnn_audio, rnn_audio_drop_norm,
# sequential_audio, sequential_image, att1, att1_drop_norm1, att1_drop_norm2, att2, ..., att3, ...,
# attention (text pooling), attention_drop_norm, attention_audio, ..., attention_image, ...]; every
# *_drop_norm is Sequential(Dropout, LayerNorm) (hence ".1."), sequential_* is Sequential(Linear, LayerNorm,
# Dropout). att1/2/3 are the text/audio/video branches. Original prefix -> our prefix:
ORIGINAL_NAME_MAP = {
    "features.0.": "text_encoder.",               # HF BertModel ('bert-base-uncased' in the original)
    "features.1.": "video_encoder.lstm.",          # rnn_img
    "features.2.1.": "video_encoder.lstm_norm.",
    "features.3.": "audio_encoder.lstm.",          # rnn_audio
    "features.4.1.": "audio_encoder.lstm_norm.",
    "features.5.0.": "audio_encoder.proj.",        # sequential_audio
    "features.5.1.": "audio_encoder.proj_norm.",
    "features.6.0.": "video_encoder.proj.",        # sequential_image
    "features.6.1.": "video_encoder.proj_norm.",
    "features.7.": "branches.text.attn.",          # att1: text <- video <- audio
    "features.8.1.": "branches.text.norm1.",
    "features.9.1.": "branches.text.norm2.",
    "features.10.": "branches.audio.attn.",        # att2: audio <- video <- text
    "features.11.1.": "branches.audio.norm1.",
    "features.12.1.": "branches.audio.norm2.",
    "features.13.": "branches.video.attn.",        # att3: video <- text <- audio (binary) / <- audio <- text (multi-task)
    "features.14.1.": "branches.video.norm1.",
    "features.15.1.": "branches.video.norm2.",
    "features.16.": "branches.text.pool.",         # attention (u, v)
    "features.17.1.": "branches.text.pool_norm.",
    "features.18.": "branches.audio.pool.",        # attention_audio
    "features.19.1.": "branches.audio.pool_norm.",
    "features.20.": "branches.video.pool.",        # attention_image
    "features.21.1.": "branches.video.pool_norm.",
}


def format_name_map() -> str:
    return "\n".join(f"  {orig:<16} -> {ours}" for orig, ours in ORIGINAL_NAME_MAP.items())


def original_to_ours(state: dict) -> dict:
    """Rename original-code keys to ours; keys with no mapped prefix are kept unchanged (and then show up as
    unexpected). A 'module.' prefix (DataParallel) is stripped first."""
    out = {}
    for k, v in state.items():
        if k.startswith("module."):
            k = k[len("module."):]
        for orig, ours in ORIGINAL_NAME_MAP.items():
            if k.startswith(orig):
                k = ours + k[len(orig):]
                break
        out[k] = v
    # inside the text encoder, older transformers conventions: LayerNorm gamma/beta (TF names) are
    # weight/bias; embeddings.position_ids was a saved buffer (a constant arange, no longer in state dicts)
    renamed = {}
    for k, v in out.items():
        if k.startswith("text_encoder."):
            if k.endswith("embeddings.position_ids"):
                continue
            if ".LayerNorm." in k:
                k = k.replace(".gamma", ".weight").replace(".beta", ".bias")
        renamed[k] = v
    return renamed


def load_original_checkpoint(model: MultiTaskModel, path_or_state_dict, verbose: bool = True, show_map: bool = False):
    """Load a checkpoint of the original code into `model`, non-strictly, through ORIGINAL_NAME_MAP.

    Accepts a path or a dict: {"model_state": state_dict} (as best_pretrain_matching.pth), {"state_dict": ...},
    {"model": ...}, or a raw state dict. Tensors whose shape differs from ours (e.g. the original's uncased
    BERT vocabulary of 30522 rows against our 28996, or a smaller model size) are not loaded: they are
    counted as missing and listed in the report. Returns (missing, unexpected) lists of key names
    (missing: ours, not loaded; unexpected: theirs after renaming, not used)."""
    if isinstance(path_or_state_dict, (str, Path)):
        # the restricted unpickler (common.checkpoints): a file that carries code stops here, its code unrun
        state = load_checkpoint(path_or_state_dict, map_location="cpu")
        source = str(path_or_state_dict)
    else:
        state, source = path_or_state_dict, "state dict"
    for key in ("model_state", "state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{source}: not a state dict (nor a dict with 'model_state')")
    renamed = original_to_ours(state)
    ours = model.state_dict()
    mismatched = [k for k, v in renamed.items() if k in ours and ours[k].shape != v.shape]
    result = model.load_state_dict({k: v for k, v in renamed.items() if k not in mismatched}, strict=False)
    missing = sorted(set(result.missing_keys) | set(mismatched))
    unexpected = sorted(result.unexpected_keys)
    if verbose:
        if show_map:
            print("original -> ours name map:\n" + format_name_map())
        loaded = len(renamed) - len(unexpected) - len(mismatched)
        trunk_missing = [k for k in missing if not k.startswith("heads.")]
        print(f"load_original_checkpoint({source}): loaded {loaded} of our {len(ours)} tensors; "
              f"missing {len(missing)} ({len(trunk_missing)} in the trunk: {trunk_missing[:6]}); "
              f"unexpected {len(unexpected)}: {unexpected[:6]}")
        for k in mismatched:
            print(f"  shape mismatch, not loaded: {k}: checkpoint {tuple(renamed[k].shape)}, ours {tuple(ours[k].shape)}")
    return missing, unexpected


# Not mapped (reported as unexpected): the original heads img_audio_text_linear_{mature,gory,slapstick,sarcasm}
# (binary: img_audio_text_linear, sequential; pre-training: TAM_linear, ITM_linear, IAM_linear) are
# Linear/BatchNorm stacks of another shape than our heads; BERT's pooler (text_encoder.pooler.*) is unused here.
