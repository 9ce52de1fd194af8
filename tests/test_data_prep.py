"""data_prep/: synthetic data (statistics, planted signal, knobs) and the JSON + npy -> HDF5 conversion
with its validation."""
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from common.data import TASKS, H5Dataset, collate
from data_prep import synthesize as syn
from data_prep.build_h5 import DataError, build_all, build_split, main as build_main

REAL_VAL = Path(__file__).resolve().parents[1].parent / "shared/data/comic_mischief/val_features_lrec_camera.json"


# ---------------------------------------------------------------- a small hand-made split
def write_split(tmp_path, n=3, seed=0):
    """n valid clips: split.json + features/. Returns (json path, features dir, records)."""
    rng = np.random.default_rng(seed)
    feats = tmp_path / "features"
    feats.mkdir()
    recs = {}
    for i in range(n):
        cid = f"abcdefghij{i}_{i + 1}"
        y = i % 2
        recs[cid] = {"id": i, "IMDBid": cid, "indexes": [101, 1106 + i, 2000, 102], "words": ["[CLS]", "a", "b", "[SEP]"],
                     "label": y, "y": [1 - y, y], "mature": [1 - y, y], "gory": [1, 0], "slapstick": [1, 0],
                     "sarcasm": [1, 0]}
        sv, sa = 3 + i, 5 + i
        np.save(feats / f"{cid}_rgb.npy", rng.random((sv, 1024), dtype=np.float32))
        np.save(feats / f"{cid}_flow.npy", rng.random((sv, 1024), dtype=np.float32))
        np.save(feats / f"{cid}_vggish.npy", rng.standard_normal((sa, 128), dtype=np.float32))
    path = tmp_path / "val_split.json"
    path.write_text(json.dumps(recs))
    return path, feats, recs


def rewrite(path, recs):
    path.write_text(json.dumps(recs))


def build_fails(tmp_path, json_path, feats, *needles, **kw):
    out = tmp_path / "out.h5"
    with pytest.raises(DataError) as e:
        build_split(json_path, feats, out, verbose=False, **kw)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message: {msg}"
    # atomic: nothing half-written is left behind
    assert not out.exists() and not Path(str(out) + ".tmp").exists()
    return msg


CLIP = "abcdefghij1_2"


def test_valid_split_converts(tmp_path):
    path, feats, recs = write_split(tmp_path)
    summary = build_split(path, feats, tmp_path / "ok.h5", verbose=False)
    assert summary["n"] == 3 and summary["missing"] == {"text": 0, "video": 0, "audio": 0}
    with h5py.File(tmp_path / "ok.h5") as f:
        assert f["text_offsets"][:].tolist() == [0, 4, 8, 12]
        assert f["video_offsets"][:].tolist() == [0, 3, 7, 12] and f["audio_offsets"][:].tolist() == [0, 5, 11, 18]
        assert f["labels"].dtype == np.int8 and f["labels"][:, :2].tolist() == [[0, 0], [1, 1], [0, 0]]
        assert f.attrs["created_by"] == "data_prep/build_h5.py" and "val_split.json" in f.attrs["source"]


def test_broken_json_names_file_and_position(tmp_path):
    path, feats, _ = write_split(tmp_path)
    path.write_text(path.read_text()[:200])
    build_fails(tmp_path, path, feats, "val_split.json", "not valid JSON", "line 1 column")


def test_missing_field_names_file_clip_and_field(tmp_path):
    path, feats, recs = write_split(tmp_path)
    del recs[CLIP]["gory"]
    rewrite(path, recs)
    build_fails(tmp_path, path, feats, "val_split.json", CLIP, "'gory'", "missing field")


@pytest.mark.parametrize("bad", [[1, 1], [0, 0], [1], [0, 1, 0], "yes", [True, False], [0.5, 0.5]])
def test_label_not_one_hot(tmp_path, bad):
    path, feats, recs = write_split(tmp_path)
    recs[CLIP]["sarcasm"] = bad
    rewrite(path, recs)
    build_fails(tmp_path, path, feats, "val_split.json", CLIP, "'sarcasm'", "one-hot")


def test_y_must_agree_with_label(tmp_path):
    path, feats, recs = write_split(tmp_path)
    recs[CLIP]["y"] = [1, 0]    # label is 1
    rewrite(path, recs)
    build_fails(tmp_path, path, feats, CLIP, "'y'", "disagrees")


@pytest.mark.parametrize("bad", [[], [101, 2.5, 102], [101, "x"], [101, -3], "101 102"])
def test_bad_token_ids(tmp_path, bad):
    path, feats, recs = write_split(tmp_path)
    recs[CLIP]["indexes"] = bad
    rewrite(path, recs)
    build_fails(tmp_path, path, feats, "val_split.json", CLIP, "'indexes'")


def test_out_of_vocabulary_ids(tmp_path, capsys):
    path, feats, recs = write_split(tmp_path)
    recs[CLIP]["indexes"] = [101, 29337, 102]
    rewrite(path, recs)
    build_fails(tmp_path, path, feats, CLIP, "'indexes'", "29337", oov="error")
    build_split(path, feats, tmp_path / "unk.h5")
    assert "1 token ids >= 28996" in capsys.readouterr().out
    assert H5Dataset(tmp_path / "unk.h5")[1]["text"].tolist() == [101, 100, 102]


def test_wrong_feature_width_names_npy_file(tmp_path):
    path, feats, _ = write_split(tmp_path)
    np.save(feats / f"{CLIP}_vggish.npy", np.zeros((5, 64), np.float32))
    build_fails(tmp_path, path, feats, f"{CLIP}_vggish.npy", CLIP, "audio", "(segments, 128)")
    np.save(feats / f"{CLIP}_vggish.npy", np.zeros((5, 128), np.float32))
    np.save(feats / f"{CLIP}_rgb.npy", np.zeros(1024, np.float32))   # 1-D
    build_fails(tmp_path, path, feats, f"{CLIP}_rgb.npy", CLIP, "video", "2-D")


def test_rgb_flow_shape_mismatch(tmp_path):
    path, feats, _ = write_split(tmp_path)
    np.save(feats / f"{CLIP}_flow.npy", np.zeros((9, 1024), np.float32))
    build_fails(tmp_path, path, feats, f"{CLIP}_flow.npy", f"{CLIP}_rgb.npy", CLIP, "video")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_feature_names_file(tmp_path, value):
    path, feats, _ = write_split(tmp_path)
    a = np.load(feats / f"{CLIP}_vggish.npy")
    a[2, 7] = value
    np.save(feats / f"{CLIP}_vggish.npy", a)
    build_fails(tmp_path, path, feats, f"{CLIP}_vggish.npy", CLIP, "audio", "NaN/Inf", "segment 2, dim 7")


def test_missing_feature_file_is_an_error_naming_the_path(tmp_path):
    path, feats, _ = write_split(tmp_path)
    (feats / f"{CLIP}_flow.npy").unlink()
    build_fails(tmp_path, path, feats, str(feats / f"{CLIP}_flow.npy"), CLIP, "video", "not found")


def test_missing_feature_file_with_mask(tmp_path, capsys):
    path, feats, recs = write_split(tmp_path)
    (feats / f"{CLIP}_flow.npy").unlink()
    (feats / f"{CLIP}_vggish.npy").unlink()
    summary = build_split(path, feats, tmp_path / "m.h5", missing="mask")
    out = capsys.readouterr().out
    assert "video missing for 1/3 clips" in out and "audio missing for 1/3 clips" in out
    assert summary["missing"] == {"text": 0, "video": 1, "audio": 1}
    ds = H5Dataset(tmp_path / "m.h5")
    item = ds[1]
    assert item["present"].tolist() == [True, False, False]
    assert item["video"].shape == (0, 1024) and item["audio"].shape == (0, 128)
    assert ds[2]["video"].shape == (5, 1024)          # the next clip's rows are not shifted
    assert torch.equal(ds[2]["audio"], torch.from_numpy(np.load(feats / "abcdefghij2_3_vggish.npy")))
    batch = collate([ds[i] for i in range(3)])
    assert not batch["video_mask"][1].any() and not batch["audio_mask"][1].any()
    assert batch["video_mask"][0].sum() == 3 and batch["audio_mask"][2].sum() == 7


def test_cli_reports_error_without_traceback(tmp_path):
    path, feats, recs = write_split(tmp_path)
    recs[CLIP]["mature"] = [1, 1]
    rewrite(path, recs)
    with pytest.raises(SystemExit, match=f"error: .*val_split.json.*{CLIP}.*'mature'"):
        build_main(["--json", str(path), "--features", str(feats), "--out", str(tmp_path / "x.h5")])


def test_build_all_finds_splits(tmp_path):
    path, feats, _ = write_split(tmp_path)
    path.rename(tmp_path / "my_test_set.json")
    res = build_all(tmp_path, feats, tmp_path / "out", verbose=False)
    assert list(res) == ["test"] and (tmp_path / "out" / "test.h5").exists()
    with pytest.raises(DataError, match="no \\*train"):
        build_all(tmp_path / "features", feats, tmp_path / "out")


# ---------------------------------------------------------------- the real public val split
@pytest.mark.skipif(not REAL_VAL.exists(), reason="public val split not present")
def test_real_val_split_converts_with_mask(tmp_path, capsys):
    summary = build_split(REAL_VAL, tmp_path / "no_features", tmp_path / "val.h5", missing="mask")
    assert summary["n"] == 432 and summary["missing"] == {"text": 0, "video": 432, "audio": 432}
    assert "video missing for 432/432" in capsys.readouterr().out
    ds = H5Dataset(tmp_path / "val.h5")
    counts = dict(zip(TASKS, ds.labels.sum(0).tolist()))
    assert counts == {"binary": 233, "mature": 103, "slapstick": 79, "sarcasm": 74, "gory": 26}
    assert (ds.labels.sum(1) == 0).sum() == 199
    assert ds.present[:, 0].all() and not ds.present[:, 1:].any()
    assert np.median(ds.text_lengths()) == 128 and ds.text_lengths().max() == 299
    with pytest.raises(DataError, match="no_features/TkZFuKHXa7w_2_rgb.npy: clip 'TkZFuKHXa7w_2'.*not found"):
        build_split(REAL_VAL, tmp_path / "no_features", tmp_path / "v2.h5", verbose=False)


# ---------------------------------------------------------------- synthetic data
def records(split, n, seed=0, **knobs):
    return [rec for _, rec, _ in syn.iter_clips(split, n, seed, syn.make_knobs(**knobs), features=False)]


def label_matrix(recs):
    return np.array([[r["label"]] + [r[t][1] for t in TASKS[1:]] for r in recs])


def test_synthetic_labels_follow_the_val_split():
    recs = records("train", 1240)    # about scale 0.3 of all splits
    y = label_matrix(recs)
    target = {"binary": 233 / 432, "mature": 103 / 432, "gory": 26 / 432, "slapstick": 79 / 432, "sarcasm": 74 / 432}
    for t, rate in zip(TASKS, y.mean(0)):
        assert abs(rate - target[t]) < 0.01, (t, rate)
    assert (y[:, 0] >= y[:, 1:].max(1)).all()      # subtype => binary
    # the val-sized split reproduces the real counts exactly
    y432 = label_matrix(records("val", 432))
    assert y432.sum(0).tolist() == [233, 103, 26, 79, 74]
    assert (y432.sum(1) == 0).sum() == 199
    only = lambda t: int(((y432[:, TASKS.index(t)] == 1) & (y432[:, 1:].sum(1) == 1)).sum())  # noqa: E731
    assert (only("mature"), only("sarcasm"), only("slapstick"), only("gory")) == (73, 50, 48, 15)


def test_synthetic_text_format_and_lengths():
    recs = records("test", 800)
    lengths = np.array([len(r["indexes"]) for r in recs])
    assert 110 <= np.median(lengths) <= 145 and lengths.max() <= 299 and lengths.min() >= 2
    for r in recs:
        ids = r["indexes"]
        assert ids[0] == 101 and ids[-1] == 102 and max(ids) < 28996 and len(r["words"]) == len(ids)
        assert r["words"][0] == "[CLS]" and r["words"][-1] == "[SEP]"
        assert re.fullmatch(r"[A-Za-z0-9_-]{11}_\d+", r["IMDBid"])
        assert r["y"] == [1 - r["label"], r["label"]]
    assert len({r["IMDBid"] for r in recs}) == 800


def test_synthetic_is_seeded_and_records_do_not_depend_on_features():
    k = syn.make_knobs()
    with_feats = [(c, r) for c, r, _ in syn.iter_clips("val", 20, 5, k, features=True)]
    assert with_feats == [(c, r) for c, r, _ in syn.iter_clips("val", 20, 5, k, features=False)]
    assert records("val", 20, seed=5) != records("val", 20, seed=6)


def test_synthetic_features_on_disk(tiny_data):
    cfg = json.loads((tiny_data / "raw" / "synth_config.json").read_text())
    assert cfg["seed"] == 0 and cfg["knobs"]["strength"] == syn.DEFAULT_STRENGTH
    feats = tiny_data / "raw" / "features"
    clips = json.loads((tiny_data / "raw" / "train_features.json").read_text())
    nv, na = [], []
    for cid in list(clips)[:20]:
        rgb, flow, aud = (np.load(feats / f"{cid}_{s}.npy") for s in ("rgb", "flow", "vggish"))
        assert rgb.dtype == flow.dtype == aud.dtype == np.float32
        assert rgb.shape == flow.shape and rgb.shape[1] == 1024 and aud.shape[1] == 128
        assert 1 <= len(rgb) <= 36 and 1 <= len(aud) <= 63
        for a in (rgb, flow, aud):
            assert np.isfinite(a).all() and np.abs(a).max() < 10
        nv.append(len(rgb))
        na.append(len(aud))
    assert len(set(nv)) > 3 and len(set(na)) > 3          # lengths vary


def auc(score, y):
    ranks = np.argsort(np.argsort(score)) + 1
    p = y.sum()
    return (ranks[y == 1].sum() - p * (p + 1) / 2) / (p * (len(y) - p))


def cv_auc(x, y, folds=5):
    """AUC of a mean-difference direction learned on the other folds (every clip scored once)."""
    fold = np.arange(len(y)) % folds
    score = np.zeros(len(y))
    for f in range(folds):
        train = fold != f
        w = x[train & (y == 1)].mean(0) - x[train & (y == 0)].mean(0)
        p = x[~train] @ w
        score[~train] = (p - p.mean()) / p.std()
    return auc(score, y)


def test_planted_signal_sits_in_the_documented_modality():
    # defaults: gory mostly video, sarcasm mostly text
    k = syn.make_knobs()
    plant = syn.planted(0, k)
    video, text, trig, y = [], [], [], []
    for _, rec, a in syn.iter_clips("train", 1000, 0, k, plant=plant):
        video.append((a["rgb"] + a["flow"]).mean(0))
        ids = np.array(rec["indexes"])
        text.append(np.bincount(ids, minlength=28996) > 0)       # bag of tokens
        trig.append([np.isin(ids, plant["triggers"][t]).sum() for t in range(len(TASKS))])
        y.append([rec["label"]] + [rec[t][1] for t in TASKS[1:]])
    video, text, trig, y = np.array(video), np.array(text, np.float32), np.array(trig), np.array(y)
    g, s = TASKS.index("gory"), TASKS.index("sarcasm")
    # learned from the data, without knowing the plant
    learned = {(task, m): cv_auc(x, y[:, t]) for task, t in (("gory", g), ("sarcasm", s))
               for m, x in (("video", video), ("text", text))}
    assert learned["gory", "video"] > 0.65 and learned["gory", "video"] - learned["gory", "text"] > 0.1, learned
    assert learned["sarcasm", "text"] > 0.7 and learned["sarcasm", "text"] - learned["sarcasm", "video"] > 0.15, learned
    # with the planted direction / trigger tokens known
    proj = video @ plant["dirs"]["video"].T
    assert auc(proj[:, g], y[:, g]) > 0.85 and auc(trig[:, g], y[:, g]) < 0.6
    assert auc(trig[:, s], y[:, s]) > 0.75 and auc(proj[:, s], y[:, s]) < 0.6


def test_knobs_change_the_signal():
    k = syn.make_knobs(conflict={("slapstick", "sarcasm"): 0.5})
    d = syn.planted(0, k)["dirs"]
    s, c = TASKS.index("slapstick"), TASKS.index("sarcasm")
    for m in ("video", "audio"):
        assert d[m][s] @ d[m][c] == pytest.approx(-0.5, abs=1e-5)
        assert np.linalg.norm(d[m], axis=1) == pytest.approx(np.ones(5), abs=1e-5)
    d0 = syn.planted(0, syn.make_knobs(conflict={}))["dirs"]
    assert abs(d0["video"][s] @ d0["video"][c]) < 0.15
    # strength 0 removes the trigger tokens of a task from its positives
    trig = set(syn.planted(0, k)["triggers"][c].tolist())
    hits = lambda recs: sum(sum(i in trig for i in r["indexes"]) for r in recs if r["sarcasm"][1])  # noqa: E731
    assert hits(records("val", 200)) > 20
    assert hits(records("val", 200, strength={"sarcasm": 0.0})) < 3


def test_knob_parsing_and_validation():
    assert syn._modalities("gory=video,mature=text+audio:0.5") == {"gory": {"video": 1.0}, "mature": {"text": 1.0, "audio": 0.5}}
    assert syn._conflict("slapstick:sarcasm=0.5") == {("slapstick", "sarcasm"): 0.5} and syn._conflict("none") == {}
    assert syn._floats("--strength")("gory=1.0,sarcasm=0.6") == {"gory": 1.0, "sarcasm": 0.6}
    k = syn.make_knobs(strength={"gory": 2.0})
    assert k["strength"]["gory"] == 2.0 and k["strength"]["mature"] == syn.DEFAULT_STRENGTH["mature"]
    with pytest.raises(ValueError, match="goryy"):
        syn.make_knobs(strength={"goryy": 1.0})
    with pytest.raises(ValueError, match="smell"):
        syn.make_knobs(modalities={"gory": {"smell": 1.0}})
    with pytest.raises(ValueError, match="conflict"):
        syn.make_knobs(conflict={("gory", "gory"): 0.5})
    assert syn.split_sizes(0.02) == {"train": 58, "val": 17, "test": 64}


def test_synthesize_cli_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "raw"
    syn.main(["--out", str(out), "--sizes", "train=6,val=4,test=3", "--seed", "2", "--strength", "gory=2",
              "--conflict", "none"])
    cfg = json.loads((out / "synth_config.json").read_text())
    assert cfg["sizes"] == {"train": 6, "val": 4, "test": 3} and cfg["knobs"]["strength"]["gory"] == 2.0
    assert cfg["knobs"]["conflict"] == {}
    assert len(list((out / "features").glob("*.npy"))) == 3 * 13
    with pytest.raises(SystemExit, match="already holds"):
        syn.main(["--out", str(out), "--sizes", "train=2,val=2,test=2"])


def test_ensure_default_data_is_idempotent_and_atomic(tmp_path, monkeypatch):
    import data_prep.build_h5 as b

    root = tmp_path / "synthetic"
    real_build_all = b.build_all

    def interrupted(*a, **kw):
        real_build_all(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(b, "build_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        syn.ensure_default_data(root, scale=0.003, verbose=False)
    assert not any((root / s).exists() for s in ("train.h5", "val.h5", "test.h5"))
    monkeypatch.setattr(b, "build_all", real_build_all)
    assert syn.ensure_default_data(root, scale=0.003, verbose=False) == root
    stamp = (root / "train.h5").stat().st_mtime_ns
    syn.ensure_default_data(root, scale=0.003, verbose=False)
    assert (root / "train.h5").stat().st_mtime_ns == stamp
    assert not (root / ".building").exists()
    assert len(H5Dataset(root / "val.h5")) == 3 and (root / "raw" / "val_features.json").exists()
