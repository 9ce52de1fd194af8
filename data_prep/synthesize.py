"""Synthetic Comic Mischief data in the real on-disk format, with a planted, seeded signal per task.

    python data_prep/synthesize.py --out data_prep/synthetic/raw            # JSON + .npy, default knobs
    python data_prep/build_h5.py --json-dir data_prep/synthetic/raw \\
        --features data_prep/synthetic/raw/features --out data_prep/synthetic
    python data_prep/synthesize.py --default     # both steps into data_prep/synthetic/ (if missing)

Layout written to OUT: `train_features.json`, `val_features.json`, `test_features.json` (dict keyed by
clip id `<11-char video id>_<n>`: id, IMDBid, indexes, words, label, y, mature, gory, slapstick,
sarcasm, as in the real files), `features/<id>_rgb.npy`, `<id>_flow.npy` (segments x 1024) and
`<id>_vggish.npy` (segments x 128), all float32; and `synth_config.json` (seed, sizes, knobs, triggers).

Statistics copied from the public val split (docs/models.md, "Data"): label patterns are allocated in exact
proportion to its counts (199 all-negative, 73 mature only, 50 sarcasm only, ...; every subtype-positive
clip is binary-positive), token lengths follow its quantiles (median 128, max 299, ~7% empty
transcripts of just [CLS] [SEP]); video has up to 36 segments, audio up to 63.

Features: per dimension a fixed mean, a small per-video offset (clips of one video look alike), and
Gaussian noise of std `noise[modality]` (of rgb + flow for video). Values lie roughly in [-1, 2].

The planted signal (directions and trigger tokens are fixed by --seed, the same for every split):
  video/audio  a clip that carries task t's signal gets `strength[t] * weight[t][m] * noise[m] * GAIN
               * u` (u ~ U(0.5, 1.5) per clip) times a unit direction d[t][m] added to a random half of
               its segments (split evenly between rgb and flow);
  text         it gets Poisson(strength[t] * weight[t]['text'] * TEXT_RATE * u) trigger tokens of task t
               (N_TRIGGERS ids per task) written over random positions, so a bag-of-tokens model can
               learn it; a transcript of length 2 has no room for them.
  label noise  a positive clip carries no signal with probability label_noise[t], and negatives carry
               it at the rate that keeps the number of carriers equal to the number of positives.
  conflict     for a pair a:b = c, d[b][m] is turned to have cosine -c with d[a][m] (video and audio):
               what the trunk learns for a then points against b.
"""
import argparse
import fcntl
import json
import shutil
import string
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common.data import AUDIO_DIM, DEFAULT_DATA, TASKS, VIDEO_DIM  # noqa: E402

# train as the real training split; val twice and test four times the real sizes (issue 25): gory, with
# about 6% positives, then has ~52 validation positives for model selection and early stopping and ~190
# test positives, so that the comparison measures training and not the sampling noise of a small test set
SPLIT_SIZES = {"train": 2900, "val": 864, "test": 3200}
SPLIT_NUMBER = {"train": 1, "val": 2, "test": 3}   # seeds the split's own random streams
# (mature, gory, slapstick, sarcasm) -> clips in the public val split; binary = any subtype
LABEL_PATTERNS = {
    (0, 0, 0, 0): 199, (1, 0, 0, 0): 73, (0, 0, 0, 1): 50, (0, 0, 1, 0): 48, (0, 1, 0, 0): 15,
    (1, 0, 1, 0): 14, (1, 0, 0, 1): 14, (0, 0, 1, 1): 8, (0, 1, 1, 0): 8, (1, 1, 0, 1): 1,
    (1, 1, 1, 0): 1, (0, 1, 0, 1): 1,
}
# token-length quantiles of the public val split (probability, length)
LENGTH_QUANTILES = ((0.0, 0.07, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 1.0), (2, 2, 14, 65, 128, 171, 207, 225, 299))
MAX_VIDEO, MAX_AUDIO = 36, 63
CLS, SEP = 101, 102
VOCAB_LOW, VOCAB_HIGH = 999, 28996   # ordinary word pieces of bert-base-cased

# -- default knobs (see --help)
DEFAULT_STRENGTH = {"binary": 0.4, "mature": 0.8, "gory": 1.2, "slapstick": 1.0, "sarcasm": 0.6}
DEFAULT_MODALITIES = {
    "binary": {"text": 0.5, "video": 0.5, "audio": 0.5},   # weak everywhere: mostly implied by the subtypes
    "mature": {"text": 1.0, "audio": 0.6},
    "gory": {"video": 1.0, "audio": 0.3},
    "slapstick": {"video": 1.0, "audio": 0.8},
    "sarcasm": {"text": 1.0, "audio": 0.4},
}
DEFAULT_NOISE = {"video": 0.5, "audio": 0.5}
DEFAULT_LABEL_NOISE = {"binary": 0.10, "mature": 0.10, "gory": 0.05, "slapstick": 0.10, "sarcasm": 0.15}
DEFAULT_CONFLICT = {("slapstick", "sarcasm"): 0.5}
GAIN = 3.0            # video/audio signal per segment, in units of the noise std (3: learnable by the small models within a few epochs)
SEGMENT_FRACTION = 0.5
TEXT_RATE = 3.0       # mean trigger tokens per clip at strength * weight = 1
N_TRIGGERS = 8
VIDEO_OFFSET = 0.15   # std of the per-video offset, in units of the noise std
ID_ALPHABET = np.array(list(string.ascii_letters + string.digits + "-_"))


# ---------------------------------------------------------------- knobs
def make_knobs(strength=None, modalities=None, noise=None, label_noise=None, conflict=None):
    """Defaults overridden by the given (partial) dicts; names are checked."""
    def merged(default, given, names, what):
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in default.items()}
        for k, v in (given or {}).items():
            if k not in names:
                raise ValueError(f"{what}: unknown name {k!r}; choose from {', '.join(names)}")
            out[k] = v
        return out

    k = {
        "strength": merged(DEFAULT_STRENGTH, strength, TASKS, "strength"),
        "modalities": merged(DEFAULT_MODALITIES, modalities, TASKS, "modalities"),
        "noise": merged(DEFAULT_NOISE, noise, ("video", "audio"), "noise"),
        "label_noise": merged(DEFAULT_LABEL_NOISE, label_noise, TASKS, "label_noise"),
        "conflict": dict(DEFAULT_CONFLICT if conflict is None else conflict),
    }
    for t, mods in k["modalities"].items():
        bad = set(mods) - {"text", "video", "audio"}
        if bad:
            raise ValueError(f"modalities[{t}]: unknown modality {sorted(bad)}; choose from text, video, audio")
    for t, p in k["label_noise"].items():
        if not 0 <= p < 1:
            raise ValueError(f"label_noise[{t}] = {p}: must be in [0, 1)")
    for m, s in k["noise"].items():
        if not s > 0:
            raise ValueError(f"noise[{m}] = {s}: must be > 0")
    for (a, b), c in k["conflict"].items():
        if a not in TASKS or b not in TASKS or a == b:
            raise ValueError(f"conflict {a}:{b}: need two different tasks from {', '.join(TASKS)}")
        if not 0 <= c < 1:
            raise ValueError(f"conflict {a}:{b} = {c}: must be in [0, 1)")
    return k


def planted(seed, knobs):
    """The seed's fixed signal: unit directions per task and modality, trigger tokens, feature means."""
    rng = np.random.default_rng([seed, 0])
    dirs = {}
    for m, dim in (("video", VIDEO_DIM), ("audio", AUDIO_DIM)):
        d = rng.standard_normal((len(TASKS), dim))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        for (a, b), c in knobs["conflict"].items():
            da, db = d[TASKS.index(a)], d[TASKS.index(b)]
            ortho = db - (db @ da) * da
            ortho /= np.linalg.norm(ortho)
            d[TASKS.index(b)] = np.sqrt(1 - c * c) * ortho - c * da   # cosine with d[a] is exactly -c
        dirs[m] = d.astype(np.float32)
    triggers = rng.choice(np.arange(VOCAB_LOW + 1000, VOCAB_HIGH), size=(len(TASKS), N_TRIGGERS), replace=False)
    mean = {"video": rng.uniform(0.2, 0.8, VIDEO_DIM).astype(np.float32),
            "audio": rng.normal(0.0, 0.5, AUDIO_DIM).astype(np.float32)}
    return {"dirs": dirs, "triggers": triggers, "mean": mean}


def split_sizes(scale=1.0, sizes=None):
    """{split: clips}: the default sizes (or `sizes`) times scale, at least 1."""
    unknown = set(sizes or {}) - set(SPLIT_SIZES)
    if unknown:
        raise ValueError(f"sizes: unknown split {sorted(unknown)}; choose from train, val, test")
    base = dict(SPLIT_SIZES, **(sizes or {}))
    return {s: max(1, int(round(n * scale))) for s, n in base.items()}


# ---------------------------------------------------------------- sampling
def allocate_patterns(n):
    """Label patterns in exact proportion to the val split's counts (largest remainder)."""
    pats = list(LABEL_PATTERNS)
    counts = np.array([LABEL_PATTERNS[p] for p in pats], float)
    quota = counts / counts.sum() * n
    alloc = np.floor(quota).astype(int)
    rest = n - alloc.sum()
    alloc[np.argsort(-(quota - alloc), kind="stable")[:rest]] += 1
    subtypes = np.repeat(np.array(pats, np.int64), alloc, axis=0)
    binary = subtypes.any(axis=1).astype(np.int64)[:, None]
    return np.concatenate([binary, subtypes], axis=1)     # (n, 5) in TASKS order


def sample_labels(n, rng):
    return allocate_patterns(n)[rng.permutation(n)]


def sample_text_lengths(n, rng):
    q, lengths = LENGTH_QUANTILES
    return np.rint(np.interp(rng.random(n), q, lengths)).astype(int)


def _video_ids(n, rng):
    """Clip ids grouped into videos (about 2.3 clips per video, as in the val split)."""
    ids = []
    while len(ids) < n:
        vid = "".join(rng.choice(ID_ALPHABET, 11))
        ids += [(vid, f"{vid}_{k}") for k in range(1, 2 + rng.poisson(1.3))]
    return ids[:n]


def iter_clips(split, n, seed=0, knobs=None, features=True, plant=None):
    """Yield (clip_id, json record, arrays) for n clips of a split; arrays = dict(rgb, flow, vggish)
    or None with features=False. Records do not depend on `features` (separate random streams)."""
    knobs = knobs or make_knobs()
    plant = plant or planted(seed, knobs)
    meta_ss, feat_ss = np.random.SeedSequence([seed, SPLIT_NUMBER[split]]).spawn(2)
    rng, frng = np.random.default_rng(meta_ss), np.random.default_rng(feat_ss)

    labels = sample_labels(n, rng)
    # which clips carry each task's signal: positives, minus label noise, plus as many negatives
    carries = labels.astype(bool)
    for t, task in enumerate(TASKS):
        p = knobs["label_noise"][task]
        npos, nneg = labels[:, t].sum(), n - labels[:, t].sum()
        drop = rng.random(n) < p
        add = rng.random(n) < (p * npos / nneg if nneg else 0.0)
        carries[:, t] = np.where(labels[:, t] == 1, ~drop, add)
    intensity = rng.uniform(0.5, 1.5, (n, len(TASKS))) * carries
    strength = np.array([knobs["strength"][t] for t in TASKS])
    weight = {m: np.array([knobs["modalities"][t].get(m, 0.0) for t in TASKS]) for m in ("text", "video", "audio")}
    text_rate = intensity * strength * weight["text"] * TEXT_RATE                       # (n, T)
    amp = {m: (intensity * strength * weight[m] * GAIN * knobs["noise"][m]).astype(np.float32) for m in ("video", "audio")}

    lengths = sample_text_lengths(n, rng)
    n_video = np.clip(np.rint(rng.normal(27, 7, n)), 4, MAX_VIDEO).astype(int)
    n_audio = np.clip(np.rint(n_video * MAX_AUDIO / MAX_VIDEO + rng.normal(0, 3, n)), 3, MAX_AUDIO).astype(int)
    ids = _video_ids(n, rng)
    video_offset = {}   # (video id, modality) -> offset shared by the clips of one video

    for i, (vid, clip) in enumerate(ids):
        L = lengths[i]
        toks = VOCAB_LOW + (rng.random(L) ** 2.5 * (VOCAB_HIGH - VOCAB_LOW)).astype(np.int64)  # frequent ids low
        toks[0], toks[-1] = CLS, SEP
        if L > 2:
            for t in np.flatnonzero(text_rate[i]):
                k = rng.poisson(text_rate[i, t])
                toks[rng.integers(1, L - 1, k)] = rng.choice(plant["triggers"][t], k)
        y = int(labels[i, 0])
        rec = {"id": SPLIT_NUMBER[split] * 100_000 + i, "IMDBid": clip, "indexes": toks.tolist(),
               "words": ["[CLS]"] + [f"tok{v}" for v in toks[1:-1]] + ["[SEP]"],
               "label": y, "y": [1 - y, y]}
        for t, task in enumerate(TASKS[1:], start=1):
            rec[task] = [1 - int(labels[i, t]), int(labels[i, t])]

        arrays = None
        if features:
            arrays = {}
            for m, S, out in (("video", n_video[i], ("rgb", "flow")), ("audio", n_audio[i], ("vggish",))):
                dim, sigma = plant["dirs"][m].shape[1], knobs["noise"][m]
                if (vid, m) not in video_offset:   # clips of a video are consecutive: forget the previous one
                    video_offset = {k: v for k, v in video_offset.items() if k[0] == vid}
                    video_offset[(vid, m)] = frng.normal(0, VIDEO_OFFSET * sigma, dim).astype(np.float32)
                on = (frng.random((S, len(TASKS))) < SEGMENT_FRACTION) * amp[m][i]     # (S, T)
                clean = plant["mean"][m] + video_offset[(vid, m)] + on.astype(np.float32) @ plant["dirs"][m]
                noise = frng.standard_normal((len(out), S, dim), dtype=np.float32) * np.float32(sigma / np.sqrt(len(out)))
                for k, name in enumerate(out):   # rgb and flow each get half, so their sum is `clean`
                    arrays[name] = clean / len(out) + noise[k]
        yield clip, rec, arrays


# ---------------------------------------------------------------- writing
def synthesize(out_dir, scale=1.0, seed=0, sizes=None, overwrite=False, verbose=True, **knobs):
    """Write a synthetic dataset (JSON + .npy) into out_dir. knobs: strength, modalities, noise,
    label_noise, conflict (partial dicts over the defaults). Returns the config written to
    out_dir/synth_config.json."""
    out_dir = Path(out_dir)
    if any(out_dir.glob("*_features.json")) and not overwrite:
        raise FileExistsError(f"{out_dir}: already holds a dataset (pass overwrite=True / --overwrite)")
    if overwrite and (out_dir / "features").exists():
        shutil.rmtree(out_dir / "features")
    feat_dir = out_dir / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    k = make_knobs(**knobs)
    plant = planted(seed, k)
    n_by_split = split_sizes(scale, sizes)
    t0 = time.perf_counter()
    seen = set()
    for split, n in n_by_split.items():
        records = {}
        for clip, rec, arrays in iter_clips(split, n, seed, k, features=True, plant=plant):
            if clip in seen:
                raise RuntimeError(f"duplicate synthetic clip id {clip}")  # 64^11 ids: should not happen
            seen.add(clip)
            records[clip] = rec
            for name, a in arrays.items():
                np.save(feat_dir / f"{clip}_{name}.npy", a)
        with open(out_dir / f"{split}_features.json", "w") as f:
            json.dump(records, f)
        if verbose:
            print(f"{split}: {n} clips ({time.perf_counter() - t0:.1f}s)", flush=True)
    config = {"seed": seed, "scale": scale, "sizes": n_by_split,
              "knobs": {**k, "conflict": {f"{a}:{b}": c for (a, b), c in k["conflict"].items()}},
              "triggers": {t: plant["triggers"][i].tolist() for i, t in enumerate(TASKS)},
              "constants": {"GAIN": GAIN, "SEGMENT_FRACTION": SEGMENT_FRACTION, "TEXT_RATE": TEXT_RATE,
                            "VIDEO_OFFSET": VIDEO_OFFSET}}
    (out_dir / "synth_config.json").write_text(json.dumps(config, indent=1))
    return config


def _complete(root, splits, scale, seed):
    """All three .h5 files exist and were made with these sizes and seed (raw/synth_config.json)."""
    if not all((root / s).exists() for s in splits):
        return False
    config = root / "raw" / "synth_config.json"
    if not config.exists():
        return True   # built from elsewhere (e.g. real features converted by build_h5): not ours to judge
    made = json.loads(config.read_text())
    return made.get("sizes") == split_sizes(scale) and made.get("seed") == seed


def _resolve(root):
    root = Path(root)
    return root if root.is_absolute() else REPO / root


def ensure_data(path):
    """The default synthetic set is made on first use; other data must already exist."""
    path = Path(path)
    if all((path / f"{s}.h5").exists() for s in ("train", "val", "test")):
        return path
    if path.resolve() == DEFAULT_DATA.resolve():
        ensure_default_data(str(path))
        return path
    raise SystemExit(f"--data {path}: expected train.h5, val.h5 and test.h5 (see data_prep/build_h5.py)")


def ensure_default_data(root="data_prep/synthetic", scale=1.0, seed=0, verbose=True):
    """Make root/{train,val,test}.h5 (+ root/raw) with the default knobs unless all three exist.
    Built in root/.building and moved into place with the .h5 files last, under a file lock, so an
    interrupted or concurrent build never leaves a set that looks complete. A relative root is taken
    from the repository root. Returns the folder (a Path)."""
    from data_prep.build_h5 import build_all

    root = _resolve(root)
    splits = ("train.h5", "val.h5", "test.h5")
    if _complete(root, splits, scale, seed):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # a second process waits here, then finds the data made
        if _complete(root, splits, scale, seed):
            return root
        for s in splits:   # made with other sizes or seed (an older default): made again
            if (root / s).exists():
                if verbose:
                    print(f"{root}: made with other split sizes or seed than {split_sizes(scale)} (seed {seed}); "
                          "making it again", flush=True)
                break
        for s in splits:
            (root / s).unlink(missing_ok=True)
        tmp = root / ".building"
        if tmp.exists():
            shutil.rmtree(tmp)   # left by an interrupted build (we hold the lock)
        if verbose:
            print(f"making the synthetic dataset in {root} (scale {scale}, seed {seed}) ...", flush=True)
        t0 = time.perf_counter()
        synthesize(tmp / "raw", scale=scale, seed=seed, verbose=verbose)
        build_all(tmp / "raw", tmp / "raw" / "features", tmp, verbose=verbose)
        if (root / "raw").exists():
            shutil.rmtree(root / "raw")   # raw data of an earlier, incomplete build
        for name in ("raw", *splits):     # the .h5 files last: their presence means "complete"
            (tmp / name).replace(root / name)
        tmp.rmdir()
        if verbose:
            print(f"synthetic dataset ready in {time.perf_counter() - t0:.0f}s: {root}", flush=True)
    return root


# ---------------------------------------------------------------- command line
def _pairs(text, what):
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"{what}: expected name=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _floats(what):
    def parse(text):
        try:
            return {k: float(v) for k, v in _pairs(text, what).items()}
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{what}: {e}") from None
    return parse


def _modalities(text):
    out = {}
    for task, spec in _pairs(text, "--modalities").items():
        out[task] = {}
        for part in spec.split("+"):
            m, _, w = part.partition(":")
            out[task][m.strip()] = float(w) if w else 1.0
    return out


def _conflict(text):
    if text.strip().lower() in ("none", "off", ""):
        return {}
    out = {}
    for pair, c in _pairs(text, "--conflict").items():
        a, sep, b = pair.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"--conflict: expected task_a:task_b=c, got {pair!r}")
        out[(a.strip(), b.strip())] = float(c)
    return out


def _fmt(d):
    return ",".join(f"{k}={v}" for k, v in d.items())


def main(argv=None):
    mods = ",".join(f"{t}=" + "+".join(f"{m}:{w}" for m, w in d.items()) for t, d in DEFAULT_MODALITIES.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data_prep/synthetic/raw", help="output folder (default %(default)s)")
    p.add_argument("--default", action="store_true",
                   help="make the default dataset (JSON, npy and the three .h5) in data_prep/synthetic/ if missing")
    p.add_argument("--scale", type=float, default=1.0,
                   help=f"multiplies the split sizes {_fmt(SPLIT_SIZES)} (e.g. 0.02 for a tiny set)")
    p.add_argument("--sizes", type=_floats("--sizes"), default={}, help="explicit split sizes, e.g. train=500,val=100")
    p.add_argument("--seed", type=int, default=0, help="fixes directions, triggers and every sample (default 0)")
    p.add_argument("--strength", type=_floats("--strength"), default={},
                   help=f"per-task signal strength (default {_fmt(DEFAULT_STRENGTH)})")
    p.add_argument("--modalities", type=_modalities, default={},
                   help=f"per task, modalities carrying its signal with weights, e.g. gory=video or "
                        f"mature=text+audio:0.5 (default {mods})")
    p.add_argument("--noise", type=_floats("--noise"), default={},
                   help=f"feature noise std per modality (default {_fmt(DEFAULT_NOISE)})")
    p.add_argument("--label-noise", type=_floats("--label-noise"), default={},
                   help=f"per task, probability that a positive carries no signal (default {_fmt(DEFAULT_LABEL_NOISE)})")
    p.add_argument("--conflict", type=_conflict, default=None,
                   help="task pairs whose video/audio directions point against each other, a:b=cosine magnitude "
                        "in [0,1), or 'none' (default slapstick:sarcasm=0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    a = p.parse_args(argv)
    if a.default:
        ensure_default_data(scale=a.scale, seed=a.seed)
        return
    try:
        synthesize(a.out, scale=a.scale, seed=a.seed, sizes={k: int(v) for k, v in a.sizes.items()} or None,
                   overwrite=a.overwrite, strength=a.strength, modalities=a.modalities, noise=a.noise,
                   label_noise=a.label_noise, conflict=a.conflict)
    except (ValueError, FileExistsError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
