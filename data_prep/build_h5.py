"""Convert the Comic Mischief format (one JSON per split + per-clip .npy features) into one validated
HDF5 file per split, the format common/data.py reads.

    python data_prep/build_h5.py --json-dir RAW --features RAW/features --out OUT [--missing mask]
    python data_prep/build_h5.py --json val_features.json --features FEATS --out val.h5 --missing mask
    python data_prep/build_h5.py --json-dir RAW --features FEATS --out OUT --tokenizer path/to/encoder

Input, per split: `<split>_features.json`, a dict keyed by clip id with fields `indexes` (token ids),
`label` and/or `y` (0/1 and one-hot [no, yes]), `mature`, `gory`, `slapstick`, `sarcasm` (one-hot);
per clip in the features folder `<id>_rgb.npy`, `<id>_flow.npy` (I3D, segments x 1024) and
`<id>_vggish.npy` (VGGish, segments x 128).

Output (ragged, no padding stored; rows of clip i are data[offsets[i]:offsets[i+1]]):
  clip_ids (N,) utf-8; labels (N,5) int8 in the order of common.data.TASKS; present (N,3) bool
  (text, video, audio); text_ids int32 + text_offsets; video float32 (.,1024) + video_offsets;
  audio float32 (.,128) + audio_offsets. video = rgb + flow, summed in float32 as the original code
  does (its loader adds the two I3D streams before the LSTM), so the two streams are not kept apart.

Every input is checked; the first problem stops the conversion with a DataError naming the file, the
clip and the field. A missing feature file is an error unless --missing=mask: the modality is then
marked absent for that clip (length 0, present False; the model masks it) and the number of affected
clips is printed. The original code silently fed zeros instead.

Token ids at or above the vocabulary size (28996 for bert-base-cased) would crash the embedding; the
public val split holds a few (part of it seems tokenised with the uncased vocabulary). --oov unk
(default) replaces them by [UNK] = 100 and prints how many; --oov error stops; --oov keep stores them.

Tokenizer. By default the stored ids are the JSON's `indexes` (bert-base-cased ids). An encoder with another
vocabulary needs its own: --tokenizer FOLDER (a local Hugging Face folder with tokenizer files, e.g. the
text encoder's) re-tokenises each clip's `words` (the word pieces, "##" joined back, [CLS]/[SEP] dropped;
the tokenizer adds its own special tokens, at most 512 ids). The file's attributes record which tokenizer
made the ids (tokenizer, tokenizer_fingerprint, tokenizer_vocab_size, max_token_id); a run whose text
encoder has another tokenizer stops (common/text_encoder.py: check_token_ids).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.data import AUDIO_DIM, MAX_TEXT_LEN, MODALITIES, TASKS, VIDEO_DIM  # noqa: E402
from common.text_encoder import STORED_INDEXES, load_tokenizer, token_info  # noqa: E402

VOCAB_SIZE = 28996   # bert-base-cased
UNK_ID = 100
LABEL_FIELDS = ("mature", "gory", "slapstick", "sarcasm")   # one-hot [no, yes]
FLUSH_EVERY = 256    # clips buffered before appending to the HDF5 datasets


class DataError(ValueError):
    """Bad input data; the message names the file, the clip and the field."""


def _where(path, clip=None, field=None):
    s = str(path)
    if clip is not None:
        s += f": clip {clip!r}"
    if field is not None:
        s += f": field {field!r}"
    return s


def load_split_json(path):
    path = Path(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such JSON file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object keyed by clip id, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: no clips")
    return data


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _one_hot(path, clip, rec, field):
    v = rec[field]
    ok = (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       and x in (0, 1) for x in v) and v[0] + v[1] == 1)
    if not ok:
        raise DataError(f"{_where(path, clip, field)}: expected a one-hot pair [no, yes] such as [1, 0] or [0, 1], got {v!r}")
    return int(v[1])


def parse_clip(path, clip, rec, vocab_size=VOCAB_SIZE, tokenizer=None):
    """Validate one clip's JSON record -> (token ids int64 array, labels int8[5] in TASKS order).
    With a tokenizer the ids are made from the clip's `words` (see words_to_text), else read from `indexes`."""
    if not isinstance(rec, dict):
        raise DataError(f"{_where(path, clip)}: expected an object, got {type(rec).__name__}")
    for field in ("indexes" if tokenizer is None else "words",) + LABEL_FIELDS:
        if field not in rec:
            raise DataError(f"{_where(path, clip, field)}: missing field")
    if "label" not in rec and "y" not in rec:
        raise DataError(f"{_where(path, clip, 'label')}: missing field (neither 'label' nor 'y' present)")

    if tokenizer is not None:
        ids = tokenizer(words_to_text(path, clip, rec["words"]), truncation=True,
                        max_length=min(MAX_TEXT_LEN, tokenizer.model_max_length))["input_ids"]
    else:
        ids = rec["indexes"]
    if not isinstance(ids, list) or not ids:
        raise DataError(f"{_where(path, clip, 'indexes')}: expected a non-empty list of token ids, got {str(ids)[:60]}")
    bad = next((k for k, v in enumerate(ids) if not _is_int(v) or v < 0 or v >= 2**31), None)
    if bad is not None:
        raise DataError(f"{_where(path, clip, 'indexes')}: position {bad} is {ids[bad]!r}, not a non-negative int")

    binary = None
    if "label" in rec:
        if not _is_int(rec["label"]) or rec["label"] not in (0, 1):
            raise DataError(f"{_where(path, clip, 'label')}: expected 0 or 1, got {rec['label']!r}")
        binary = rec["label"]
    if "y" in rec:
        y = _one_hot(path, clip, rec, "y")
        if binary is not None and y != binary:
            raise DataError(f"{_where(path, clip, 'y')}: {rec['y']!r} disagrees with label={binary}")
        binary = y
    labels = {"binary": binary}
    labels.update({t: _one_hot(path, clip, rec, t) for t in LABEL_FIELDS})
    return np.asarray(ids, dtype=np.int64), np.array([labels[t] for t in TASKS], dtype=np.int8)


SPECIAL_PIECES = ("[CLS]", "[SEP]", "[PAD]")


def words_to_text(path, clip, words):
    """The clip's text from its word pieces: "##" continuations joined to the previous piece, BERT's
    [CLS]/[SEP]/[PAD] dropped (the new tokenizer adds its own special tokens)."""
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise DataError(f"{_where(path, clip, 'words')}: expected a list of word pieces (strings), got {str(words)[:60]}")
    text = ""
    for w in words:
        if w in SPECIAL_PIECES:
            continue
        text += w[2:] if w.startswith("##") and text else (" " + w if text else w)
    return text


def _load_npy(path, clip, field, width):
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated / not an .npy file / object array
        raise DataError(f"{_where(path, clip, field)}: cannot read as .npy ({e})") from None
    if a.ndim != 2 or a.shape[1] != width:
        raise DataError(f"{_where(path, clip, field)}: expected a 2-D array (segments, {width}), got shape {a.shape}")
    if a.shape[0] == 0:
        raise DataError(f"{_where(path, clip, field)}: 0 segments (delete the file and use --missing mask to mark it absent)")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise DataError(f"{_where(path, clip, field)}: expected numbers, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    finite = np.isfinite(a)
    if not finite.all():
        seg, dim = np.argwhere(~finite)[0]
        raise DataError(f"{_where(path, clip, field)}: {int((~finite).sum())} NaN/Inf values in float32 "
                        f"(first at segment {seg}, dim {dim})")
    return a


def load_features(features_dir, clip, missing="error"):
    """-> (video or None, audio or None). video = rgb + flow in float32. None = absent (missing='mask')."""
    features_dir = Path(features_dir)
    rgb_p, flow_p, aud_p = (features_dir / f"{clip}_{s}.npy" for s in ("rgb", "flow", "vggish"))

    def get(path, field, width):
        try:
            return _load_npy(path, clip, field, width)
        except FileNotFoundError:
            if missing == "mask":
                return None
            raise DataError(f"{_where(path, clip, field)}: expected feature file not found "
                            f"(use --missing mask to mark the modality absent)") from None

    rgb = get(rgb_p, "video (rgb)", VIDEO_DIM)
    flow = get(flow_p, "video (flow)", VIDEO_DIM)
    video = None
    if rgb is not None and flow is not None:
        if rgb.shape != flow.shape:
            raise DataError(f"{_where(flow_p, clip, 'video (flow)')}: shape {flow.shape} differs from "
                            f"{rgb_p.name} {rgb.shape}")
        video = rgb + flow
        if not np.isfinite(video).all():  # two large finite values can overflow float32 when added
            raise DataError(f"{_where(rgb_p, clip, 'video')}: rgb + flow overflows float32")
    return video, get(aud_p, "audio (vggish)", AUDIO_DIM)


class _Appender:
    """Resizable HDF5 datasets fed in blocks, so a split never has to fit in memory."""

    def __init__(self, f):
        self.d = {
            "text_ids": f.create_dataset("text_ids", (0,), np.int32, maxshape=(None,), chunks=(16384,)),
            "video": f.create_dataset("video", (0, VIDEO_DIM), np.float32, maxshape=(None, VIDEO_DIM), chunks=(32, VIDEO_DIM)),
            "audio": f.create_dataset("audio", (0, AUDIO_DIM), np.float32, maxshape=(None, AUDIO_DIM), chunks=(256, AUDIO_DIM)),
        }
        self.buf = {k: [] for k in self.d}

    def add(self, key, arr):
        if arr is not None and len(arr):
            self.buf[key].append(arr)

    def flush(self):
        for key, parts in self.buf.items():
            if parts:
                block = np.concatenate(parts)
                ds = self.d[key]
                n = ds.shape[0]
                ds.resize(n + len(block), axis=0)
                ds[n:] = block
                parts.clear()


def build_split(json_path, features_dir, out_path, missing="error", oov="unk", vocab_size=VOCAB_SIZE, verbose=True,
                tokenizer=None, clip_ids=None):
    """Validate and convert one split. Returns a summary dict (n, missing counts per modality, oov count).

    missing: "error" (a missing feature file stops) or "mask" (the modality is marked absent).
    oov: what to do with token ids >= vocab_size: "unk" (replace by [UNK]), "error", "keep".
    tokenizer: None (the JSON's bert-base-cased `indexes`), a tokenizer folder, or a loaded transformers
    tokenizer: the ids are then made from each clip's `words` (vocab_size becomes the tokenizer's).
    clip_ids: only these clips, in this order (data_prep/real_text_folds.py); default all of the JSON.
    Written atomically: to out_path + ".tmp", then renamed, so a failed run leaves no half file.
    """
    if missing not in ("error", "mask"):
        raise ValueError(f"missing must be 'error' or 'mask', got {missing!r}")
    if oov not in ("unk", "error", "keep"):
        raise ValueError(f"oov must be 'unk', 'error' or 'keep', got {oov!r}")
    json_path, out_path = Path(json_path), Path(out_path)
    clips = load_split_json(json_path)
    if clip_ids is not None:
        unknown = [c for c in clip_ids if c not in clips]
        if unknown:
            raise DataError(f"{json_path}: no clip(s) {unknown[:5]}")
        clips = {c: clips[c] for c in clip_ids}
    made_by = STORED_INDEXES
    if tokenizer is not None:
        name = tokenizer
        if isinstance(tokenizer, (str, Path)):
            name, tokenizer = Path(tokenizer).resolve(), load_tokenizer(tokenizer)
        else:
            name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        made_by = token_info(tokenizer, name)
        vocab_size = len(tokenizer)
    n = len(clips)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(out_path) + ".tmp")

    labels = np.zeros((n, len(TASKS)), np.int8)
    present = np.zeros((n, len(MODALITIES)), bool)
    lengths = np.zeros((n, len(MODALITIES)), np.int64)
    n_oov, oov_clips, max_id = 0, [], -1
    unk_id = UNK_ID if tokenizer is None else tokenizer.unk_token_id
    try:
        with h5py.File(tmp, "w") as f:
            app = _Appender(f)
            for i, (clip, rec) in enumerate(clips.items()):
                ids, labels[i] = parse_clip(json_path, clip, rec, tokenizer=tokenizer)
                over = ids >= vocab_size
                if over.any():
                    if oov == "error":
                        k = int(np.argmax(over))
                        raise DataError(f"{_where(json_path, clip, 'indexes')}: position {k} is {ids[k]}, "
                                        f"outside the vocabulary (< {vocab_size})")
                    n_oov += int(over.sum())
                    oov_clips.append(clip)
                    if oov == "unk":
                        ids[over] = unk_id
                video, audio = load_features(features_dir, clip, missing)
                for m, arr in enumerate((ids.astype(np.int32), video, audio)):
                    present[i, m] = arr is not None
                    lengths[i, m] = 0 if arr is None else len(arr)
                max_id = max(max_id, int(ids.max()))
                app.add("text_ids", ids.astype(np.int32))
                app.add("video", video)
                app.add("audio", audio)
                if (i + 1) % FLUSH_EVERY == 0:
                    app.flush()
            app.flush()
            f.create_dataset("clip_ids", data=list(clips.keys()), dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("labels", data=labels)
            f.create_dataset("present", data=present)
            for m, name in enumerate(MODALITIES):
                f.create_dataset(f"{name}_offsets", data=np.concatenate([[0], np.cumsum(lengths[:, m])]).astype(np.int64))
            f.attrs["source"] = str(json_path.resolve())
            f.attrs["features_dir"] = str(Path(features_dir).resolve())
            f.attrs["created_by"] = "data_prep/build_h5.py"
            f.attrs["tasks"] = ",".join(TASKS)
            f.attrs["modalities"] = ",".join(MODALITIES)
            f.attrs["missing_policy"] = missing
            f.attrs["video"] = "I3D rgb + flow, summed in float32"
            f.attrs["oov_policy"] = oov
            f.attrs["oov_tokens"] = n_oov
            for key, value in made_by.as_attrs().items():  # which tokenizer made the ids (check_token_ids)
                f.attrs[key] = value
            f.attrs["max_token_id"] = max_id
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    absent = {m: int((~present[:, k]).sum()) for k, m in enumerate(MODALITIES)}
    if verbose:
        for m in ("video", "audio"):
            if absent[m]:
                print(f"{json_path.name}: {m} missing for {absent[m]}/{n} clips, marked absent (masked)")
        if n_oov:
            what = {"unk": f"replaced by [UNK]={unk_id}", "keep": "kept"}[oov]
            print(f"{json_path.name}: {n_oov} token ids >= {vocab_size} in {len(oov_clips)} clips, {what}")
        print(f"{json_path.name} -> {out_path} ({n} clips, token ids of {made_by.name})")
    return {"n": n, "missing": absent, "oov_tokens": n_oov, "out": str(out_path)}


def find_split_files(json_dir):
    """{split: path} for the *train*.json, *val*.json, *test*.json files in json_dir."""
    json_dir = Path(json_dir)
    found = {}
    for split in ("train", "val", "test"):
        hits = sorted(json_dir.glob(f"*{split}*.json"))
        if len(hits) > 1:
            raise DataError(f"{json_dir}: several files match *{split}*.json: {[h.name for h in hits]}")
        if hits:
            found[split] = hits[0]
    if not found:
        raise DataError(f"{json_dir}: no *train*.json, *val*.json or *test*.json file")
    return found


def build_all(json_dir, features_dir, out_dir, missing="error", oov="unk", verbose=True, tokenizer=None):
    """Convert every split found in json_dir to out_dir/<split>.h5. Returns {split: summary}."""
    if isinstance(tokenizer, (str, Path)):  # loaded once for all splits
        tokenizer = load_tokenizer(tokenizer)
    return {split: build_split(path, features_dir, Path(out_dir) / f"{split}.h5", missing, oov, verbose=verbose,
                               tokenizer=tokenizer)
            for split, path in find_split_files(json_dir).items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--json-dir", help="folder with *train*.json, *val*.json, *test*.json; writes OUT/<split>.h5")
    src.add_argument("--json", help="one split's JSON file; OUT is then the .h5 file to write")
    p.add_argument("--features", required=True, help="folder with <clip>_rgb.npy, <clip>_flow.npy, <clip>_vggish.npy")
    p.add_argument("--out", required=True)
    p.add_argument("--missing", choices=("error", "mask"), default="error",
                   help="a missing feature file: stop (default) or mark the modality absent for that clip")
    p.add_argument("--oov", choices=("unk", "error", "keep"), default="unk",
                   help=f"token ids >= the vocabulary size ({VOCAB_SIZE} for the stored ids): replace by [UNK] "
                        f"(default), stop, or keep")
    p.add_argument("--tokenizer", default=None, metavar="FOLDER",
                   help="re-tokenise each clip's `words` with this local tokenizer (e.g. the --text-encoder folder) "
                        "instead of storing the JSON's bert-base-cased `indexes`")
    a = p.parse_args(argv)
    try:
        if a.json:
            build_split(a.json, a.features, a.out, a.missing, a.oov, tokenizer=a.tokenizer)
        else:
            build_all(a.json_dir, a.features, a.out, a.missing, a.oov, tokenizer=a.tokenizer)
    except DataError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
