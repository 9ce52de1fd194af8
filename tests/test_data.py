"""common/data.py: HDF5 split -> items -> padded batches with masks; samplers and loaders."""
import json
import pickle

import numpy as np
import pytest
import torch

from common.data import (AUDIO_DIM, MAX_AUDIO_SEGMENTS, MAX_TEXT_LEN, MAX_VIDEO_SEGMENTS, TASKS, VIDEO_DIM,
                         H5Dataset, collate, feature_stats)


def raw_clips(tiny_data, split):
    return json.loads((tiny_data / "raw" / f"{split}_features.json").read_text())


def test_json_npy_to_h5_to_batch_round_trip_is_exact(tiny_data):
    clips = raw_clips(tiny_data, "val")
    ds = H5Dataset(tiny_data / "val.h5")
    assert ds.clip_ids == list(clips)
    feats = tiny_data / "raw" / "features"
    idx = [0, 3, 7, len(ds) - 1]
    batch = collate([ds[i] for i in idx])
    for b, i in enumerate(idx):
        cid = ds.clip_ids[i]
        rec = clips[cid]
        rgb, flow = np.load(feats / f"{cid}_rgb.npy"), np.load(feats / f"{cid}_flow.npy")
        audio = np.load(feats / f"{cid}_vggish.npy")
        want_labels = [rec["label"]] + [rec[t][1] for t in TASKS[1:]]
        item = ds[i]
        assert item["clip_id"] == cid and item["index"] == i
        assert item["text"].tolist() == rec["indexes"]
        assert torch.equal(item["video"], torch.from_numpy(rgb + flow))   # summed in float32, as stored
        assert torch.equal(item["audio"], torch.from_numpy(audio))
        assert item["labels"].tolist() == want_labels
        assert item["present"].tolist() == [True, True, True]
        # the batch holds the same values, then padding
        lt, sv, sa = len(rec["indexes"]), len(rgb), len(audio)
        assert batch["text_ids"][b, :lt].tolist() == rec["indexes"]
        assert batch["text_mask"][b].sum() == lt and batch["text_mask"][b, :lt].all()
        assert torch.equal(batch["video"][b, :sv], torch.from_numpy(rgb + flow))
        assert batch["video_mask"][b].sum() == sv and batch["video_mask"][b, :sv].all()
        assert torch.equal(batch["audio"][b, :sa], torch.from_numpy(audio))
        assert batch["audio_mask"][b].sum() == sa
        assert batch["labels"][b].tolist() == want_labels
        assert batch["clip_ids"][b] == cid and batch["index"][b] == i


def test_dataset_metadata(tiny_data):
    ds = H5Dataset(tiny_data / "train.h5")
    clips = raw_clips(tiny_data, "train")
    assert len(ds) == len(clips)
    assert ds.labels.shape == (len(ds), 5) and ds.labels.dtype == np.int64
    assert ds.labels[:, 0].tolist() == [c["label"] for c in clips.values()]
    assert ds.text_lengths().tolist() == [len(c["indexes"]) for c in clips.values()]
    assert ds[-1]["clip_id"] == ds.clip_ids[-1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_opens_lazily_and_pickles(tiny_data):
    ds = H5Dataset(tiny_data / "train.h5")
    assert ds._file is None            # nothing held open before the first item
    first = ds[0]
    assert ds._file is not None
    copy = pickle.loads(pickle.dumps(ds))   # as for a spawned worker: reopens on its own
    assert copy._file is None
    assert torch.equal(copy[0]["video"], first["video"])
    ds.close()
    assert torch.equal(ds[0]["text"], first["text"])   # reopens after close


def test_dataset_rejects_a_file_that_is_not_a_split(tmp_path):
    import h5py
    bad = tmp_path / "x.h5"
    with h5py.File(bad, "w") as f:
        f["labels"] = np.zeros((2, 5), np.int8)
    with pytest.raises(ValueError, match="x.h5.*missing datasets"):
        H5Dataset(bad)
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        H5Dataset(tmp_path / "nope.h5")


def fake_item(lt, sv, sa, index=0, present=None):
    present = present if present is not None else [lt > 0, sv > 0, sa > 0]
    return dict(text=torch.arange(1, lt + 1), video=torch.ones(sv, VIDEO_DIM), audio=torch.ones(sa, AUDIO_DIM),
                labels=torch.tensor([1, 0, 0, 1, 0]), present=torch.tensor(present), index=index, clip_id=f"c{index}")


def test_collate_pads_to_longest_with_masks():
    b = collate([fake_item(5, 3, 7, 0), fake_item(2, 6, 1, 1)])
    assert b["text_ids"].shape == (2, 5) and b["video"].shape == (2, 6, VIDEO_DIM) and b["audio"].shape == (2, 7, AUDIO_DIM)
    assert b["text_mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
    assert b["text_ids"][1].tolist() == [1, 2, 0, 0, 0]           # pad id 0
    assert b["video_mask"].sum(1).tolist() == [3, 6] and b["audio_mask"].sum(1).tolist() == [7, 1]
    assert b["video"][0, 3:].abs().sum() == 0 and b["audio"][1, 1:].abs().sum() == 0
    assert b["video"][0, :3].eq(1).all()
    assert b["index"].tolist() == [0, 1] and b["clip_ids"] == ["c0", "c1"]
    assert b["labels"].dtype == torch.long and b["present"].dtype == torch.bool


def test_collate_fixed_text_length_and_absent_modalities():
    b = collate([fake_item(5, 0, 0, 0), fake_item(2, 0, 0, 1)], pad_text_to=500)
    assert b["text_ids"].shape == (2, 500) and b["text_mask"].sum(1).tolist() == [5, 2]
    # no item has video or audio: length-1 padding with an all-False mask, never fake data
    assert b["video"].shape == (2, 1, VIDEO_DIM) and not b["video_mask"].any()
    assert b["audio"].shape == (2, 1, AUDIO_DIM) and not b["audio_mask"].any()
    assert b["present"].tolist() == [[True, False, False], [True, False, False]]


def test_collate_truncates_to_the_original_limits():
    b = collate([fake_item(MAX_TEXT_LEN + 40, MAX_VIDEO_SEGMENTS + 4, MAX_AUDIO_SEGMENTS + 9)])
    assert b["text_ids"].shape[1] == MAX_TEXT_LEN
    assert b["video"].shape[1] == MAX_VIDEO_SEGMENTS and b["audio"].shape[1] == MAX_AUDIO_SEGMENTS
    assert b["text_mask"].all() and b["video_mask"].all() and b["audio_mask"].all()


def test_bucketed_epochs_cover_each_index_once_and_depend_on_seed_and_epoch_only():
    from common.data import epoch_batches
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 300, 1000)
    e0, e1 = (epoch_batches(1000, 8, seed=3, epoch=e, lengths=lengths) for e in (0, 1))
    for batches in (e0, e1):
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert len(batches) == 125
    assert e0 != e1
    assert epoch_batches(1000, 8, seed=3, epoch=0, lengths=lengths) == e0
    assert epoch_batches(1000, 8, seed=4, epoch=0, lengths=lengths) != e0
    # batches hold similar lengths: far less spread than random batches
    spread = np.mean([np.ptp(lengths[b]) for b in e0])
    random_spread = np.mean([np.ptp(lengths[rng.permutation(1000)[:8]]) for _ in range(100)])
    assert spread < random_spread / 4


def test_loader_workers_read_their_own_handles_and_agree(tiny_data):
    from common.data import epoch_batches
    ds = H5Dataset(tiny_data / "train.h5")
    plan = epoch_batches(len(ds), 8, seed=1, epoch=0, lengths=ds.text_lengths())

    def load(workers):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=plan, collate_fn=collate, num_workers=workers,
                                             generator=torch.Generator())
        return list(loader)
    direct, workers = load(0), load(2)
    assert [b["index"].tolist() for b in direct] == [b["index"].tolist() for b in workers] == plan
    assert torch.equal(direct[0]["video"], workers[0]["video"])
    assert torch.equal(direct[0]["text_ids"], collate([ds[i] for i in plan[0]])["text_ids"])


def test_features_standardised_with_training_statistics(tiny_data, tmp_path):
    import h5py
    stats = feature_stats(tiny_data / "train.h5")
    with h5py.File(tiny_data / "train.h5", "r") as f:
        video = f["video"][:].astype(np.float64)
    np.testing.assert_allclose(stats["video"][0], video.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats["video"][1], video.std(0), rtol=1e-6)
    # the training split's statistics are applied to the other splits, row by row
    raw, norm = H5Dataset(tiny_data / "val.h5"), H5Dataset(tiny_data / "val.h5", stats)
    for m in ("video", "audio"):
        mean, std = stats[m]
        want = (raw[2][m].numpy().astype(np.float64) - mean) / std
        np.testing.assert_allclose(norm[2][m].numpy(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(norm[2]["text"], raw[2]["text"]) and torch.equal(norm[2]["labels"], raw[2]["labels"])
    # over the training split itself: mean 0, std 1 per dimension
    train = H5Dataset(tiny_data / "train.h5", stats)
    rows = np.concatenate([train[i]["video"].numpy() for i in range(len(train))])
    assert np.abs(rows.mean(0)).max() < 1e-4 and np.abs(rows.std(0) - 1).max() < 1e-3
    # a constant dimension is shifted, not divided by zero
    path = tmp_path / "const.h5"
    import shutil
    shutil.copy(tiny_data / "train.h5", path)
    with h5py.File(path, "r+") as f:
        f["audio"][:, 5] = 0.25
    const = feature_stats(path)["audio"]
    assert const[1][5] == 1.0 and const[0][5] == pytest.approx(0.25)
    assert np.isfinite(H5Dataset(path, {"audio": const})[0]["audio"].numpy()).all()
    # statistics of another width are refused when the split is opened, naming the file and the modality
    with pytest.raises(ValueError, match=r"val\.h5: audio rows have width"):
        H5Dataset(tiny_data / "val.h5", {"audio": (np.zeros(3), np.ones(3))})
