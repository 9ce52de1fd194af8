"""The real-text track: folds of the public val split (data_prep/real_text_folds.py) and the runs of
make real-text (common/real_text.py)."""
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.build_h5 import DataError  # noqa: E402
from data_prep.real_text_folds import DEFAULT_JSON, make_folds, read_clips, video_of, write_folds  # noqa: E402


def test_video_of_clip_ids():
    assert video_of("TkZFuKHXa7w_2") == "TkZFuKHXa7w"
    assert video_of("4S1zDnj_IuY_0") == "4S1zDnj_IuY"          # a YouTube id may hold "_"
    assert video_of("Auyj3CNF5xk.010") == "Auyj3CNF5xk"        # segments of the <video>.<n> form
    assert video_of("tt1448755.00") == "tt1448755"
    with pytest.raises(DataError, match="'clip-without-segment'"):
        video_of("clip-without-segment")


def check_folds(folds, ids, labels, n_folds):
    row = {c: i for i, c in enumerate(ids)}
    tests = [c for f in folds for c in f["test"]]
    assert sorted(tests) == sorted(ids)  # the test folds partition the clips
    for f in folds:
        sides = {s: set(f[s]) for s in ("train", "val", "test")}
        assert sum(map(len, sides.values())) == len(ids) and set.union(*sides.values()) == set(ids)
        videos = {s: {video_of(c) for c in clips} for s, clips in sides.items()}
        assert not videos["train"] & videos["val"] and not videos["train"] & videos["test"]
        assert not videos["val"] & videos["test"]
    # stratified: every test fold holds about a fifth of each task's positives
    total = labels.sum(0)
    for f in folds:
        pos = labels[[row[c] for c in f["test"]]].sum(0)
        assert np.all(np.abs(pos - total / n_folds) <= 0.35 * total / n_folds + 2), (pos, total)
        assert np.all(pos > 0)


@pytest.mark.skipif(not DEFAULT_JSON.is_file(), reason="the public val split is not in ../shared")
def test_folds_of_the_real_split_are_stratified_and_keep_videos_apart():
    ids, labels = read_clips(DEFAULT_JSON)
    assert len(ids) == 432 and len({video_of(c) for c in ids}) == 109
    folds = make_folds(ids, labels, n_folds=5, seed=0)
    check_folds(folds, ids, labels, 5)
    assert make_folds(ids, labels, n_folds=5, seed=0) == folds  # a function of the seed
    # without grouping by video, some video would sit on two sides: the grouping is doing something
    from sklearn.model_selection import StratifiedKFold
    y = ["".join(map(str, r)) for r in labels]
    y = [p if Counter(y)[p] >= 5 else "rare" for p in y]
    with warnings.catch_warnings():  # the pooled rare class has 3 clips
        warnings.simplefilter("ignore", UserWarning)
        split = next(StratifiedKFold(5, shuffle=True, random_state=0).split(ids, y))
    assert {video_of(ids[i]) for i in split[0]} & {video_of(ids[i]) for i in split[1]}


def small_json(path, n_videos=12):
    """A JSON in the real format: videos of 2-4 clips under both id forms, mixed label patterns."""
    rng = np.random.default_rng(0)
    clips = {}
    for v in range(n_videos):
        for s in range(2 + v % 3):
            clip = f"video{v:02d}_{s}" if v % 2 else f"tt{v:07d}.0{s}"
            pos = int(rng.random() < 0.5)
            sub = [int(pos and rng.random() < 0.4) for _ in range(4)]
            rec = {"indexes": [101, 1103 + s, 102], "words": ["[CLS]", "the", "[SEP]"], "label": pos,
                   "y": [1 - pos, pos]}
            rec.update({t: [1 - b, b] for t, b in zip(("mature", "gory", "slapstick", "sarcasm"), sub)})
            clips[clip] = rec
    path.write_text(json.dumps(clips))
    return path


def test_write_folds_marks_video_and_audio_absent(tmp_path):
    source = small_json(tmp_path / "val.json")
    folds = write_folds(source, tmp_path / "folds", n_folds=3, val_parts=3, verbose=False)
    listed = json.loads((tmp_path / "folds" / "folds.json").read_text())
    assert listed["splits"] == folds and listed["source"] == str(source.resolve())
    for k, fold in enumerate(folds):
        for split, clips in fold.items():
            with h5py.File(tmp_path / "folds" / f"fold{k}" / f"{split}.h5") as f:
                assert [c.decode() for c in f["clip_ids"][:]] == clips
                present = f["present"][:]
                assert present[:, 0].all() and not present[:, 1:].any()  # text only: video, audio absent
                assert f["video"].shape[0] == 0 and f.attrs["tokenizer"] == "bert-base-cased"
    with pytest.raises(DataError, match="no such JSON"):
        write_folds(tmp_path / "missing.json", tmp_path / "x", verbose=False)


def test_real_text_runs_every_strategy_on_every_fold(tmp_path):
    from common.real_text import plan_jobs, run_settings
    settings = run_settings("/enc", epochs=2, lr=1e-4, batch_size=16, patience=3)
    rows, jobs = plan_jobs(["single_task", "all_at_once"], [0, 1], tmp_path, settings, tmp_path / "runs")
    assert rows[0][0] == "single_task" and ("all_at_once", ["--weights", "learned"]) in rows
    assert len(jobs) == len(rows) * 2
    for key, tail, reuse in jobs:
        k = int(tail[tail.index("--seed") + 1])
        assert tail[tail.index("--data") + 1] == str(tmp_path / f"fold{k}")  # fold = seed
        assert tail[tail.index("--trunk") + 1] == "text_only" and tail[tail.index("--text-encoder") + 1] == "/enc"
        assert str(tmp_path / f"fold{k}") in reuse and key.endswith(f"seed{k}")


def test_real_text_rows_filter_keeps_only_the_named_rows(tmp_path):
    from common.real_text import plan_jobs, run_settings
    settings = run_settings("/enc", epochs=2, lr=1e-4, batch_size=16, patience=3)
    rows, jobs = plan_jobs(["all_at_once", "pcgrad"], [0], tmp_path, settings, tmp_path / "runs",
                           keep_rows=["all_at_once", "pcgrad --grad-space representation"])
    assert rows == [("all_at_once", []), ("pcgrad", ["--grad-space", "representation"])]
    assert len(jobs) == 2
    with pytest.raises(SystemExit, match="not rows"):
        plan_jobs(["all_at_once"], [0], tmp_path, settings, tmp_path / "runs", keep_rows=["pcgrad"])


def test_drop_checkpoints_removes_every_copy_of_the_weights(tmp_path):
    """A finished real-text run keeps only its records: checkpoint.pt, best.pt and model.safetensors go (also
    those of each sub-model), summary.json and metrics.jsonl stay; a run not finished keeps everything."""
    from common.real_text import drop_checkpoints
    weights = ("checkpoint.pt", "best.pt", "model.safetensors")
    for folder in (tmp_path, tmp_path / "gory"):
        folder.mkdir(exist_ok=True)
        for name in weights + ("summary.json", "metrics.jsonl"):
            (folder / name).write_text("x")
    drop_checkpoints({"status": "running", "summary": str(tmp_path / "summary.json")})
    assert (tmp_path / "best.pt").exists()
    drop_checkpoints({"status": "ok", "summary": str(tmp_path / "summary.json")})
    for folder in (tmp_path, tmp_path / "gory"):
        assert not any((folder / name).exists() for name in weights)
        assert (folder / "summary.json").exists() and (folder / "metrics.jsonl").exists()
