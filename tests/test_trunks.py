"""Every --trunk: output shapes, masks honoured (padding and absent modalities change nothing), the
parameter groups the strategies use, and one training step of a strategy script on each."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data import MODALITIES, TASKS  # noqa: E402
from common.model import MODEL_SIZES  # noqa: E402
from common.trunks import TRUNK_NAMES, build_model  # noqa: E402
from test_model import LENGTHS, make_batch, real_part  # noqa: E402

TINY = MODEL_SIZES["tiny"]
H = TINY.hidden
REPO = Path(__file__).resolve().parents[1]
FUSED_DIM = {"hca": 3 * H, "late_fusion": 3 * H, "mult": 3 * H, "concat": H, "text_only": H, "video_only": H,
             "audio_only": H}
READS = {"hca": MODALITIES, "late_fusion": MODALITIES, "mult": MODALITIES, "concat": MODALITIES,
         "text_only": ("text",), "video_only": ("video",), "audio_only": ("audio",)}


def tiny(trunk, seed=0, tasks=TASKS):
    torch.manual_seed(seed)
    return build_model(TINY, trunk, tasks).eval()


@pytest.mark.parametrize("trunk", TRUNK_NAMES)
def test_shapes_and_padding(trunk):
    model = tiny(trunk)
    assert model.trunk_name == trunk
    base = make_batch(LENGTHS, seed=1)
    padded = make_batch(LENGTHS, seed=1, pad=(7, 4, 5), garbage=100.0)
    with torch.no_grad():
        fused = model.trunk(base)
        logits = model(base)
        assert fused.shape == (len(LENGTHS), FUSED_DIM[trunk]) and model.fused_dim == FUSED_DIM[trunk]
        assert logits.shape == (len(LENGTHS), len(TASKS), 2) and torch.isfinite(logits).all()
        assert torch.allclose(model(padded), logits, atol=1e-5)
        for i in range(len(LENGTHS)):  # each clip alone, cut to its own lengths
            assert torch.allclose(model(real_part(base, i)), logits[i : i + 1], atol=1e-5), f"clip {i}"
        nan_pad = make_batch(LENGTHS, seed=1, pad=(0, 2, 2))
        nan_pad["video"][~nan_pad["video_mask"]] = float("nan")
        nan_pad["audio"][~nan_pad["audio_mask"]] = float("inf")
        assert torch.allclose(model(nan_pad), model(make_batch(LENGTHS, seed=1, pad=(0, 2, 2))), atol=1e-6)


@pytest.mark.parametrize("trunk", TRUNK_NAMES)
def test_absent_modality_is_masked(trunk):
    model = tiny(trunk)
    batch = make_batch(LENGTHS + [(0, 3, 4)], seed=3)  # clip 5 has no text
    with torch.no_grad():
        ref = model(batch)
        for m in MODALITIES:
            k = MODALITIES.index(m)
            # what an absent modality holds changes nothing (clip 3 has no audio, clip 4 no video)
            absent = [i for i in range(len(LENGTHS) + 1) if not batch["present"][i, k]]
            assert absent
            changed = {key: v.clone() for key, v in batch.items()}
            key = {"text": "text_ids", "video": "video", "audio": "audio"}[m]
            for i in absent:
                changed[key][i] = (changed[key][i] + 7) if m == "text" else 1e3 * torch.randn_like(changed[key][i])
            assert torch.allclose(model(changed), ref, atol=1e-6), m
            # switching a modality off equals every clip lacking it; it matters only where the trunk reads it
            gone = {key: v.clone() for key, v in batch.items()}
            gone[f"{m}_mask"][:] = False
            gone["present"][:, k] = False
            switched = model(batch, active_modalities=[x for x in MODALITIES if x != m])
            assert torch.allclose(switched, model(gone), atol=1e-6), m
            assert torch.allclose(switched, ref, atol=1e-6) == (m not in READS[trunk]), m
        if model.slots:  # per-modality slots: an absent modality's slot is an exact zero vector
            slot = model.slots.index("video") if "video" in model.slots else None
            if slot is not None:
                fused = model.trunk(batch)
                assert torch.equal(fused[4, slot * H:(slot + 1) * H], torch.zeros(H))


@pytest.mark.parametrize("trunk", TRUNK_NAMES)
def test_parameter_groups_and_gradients(trunk):
    torch.manual_seed(0)
    model = build_model(TINY, trunk).train()
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    shared, heads, last = ids(model.shared_parameters()), ids(model.head_parameters()), ids(model.last_shared_parameters())
    assert shared.isdisjoint(heads) and shared | heads == ids(model.parameters())
    assert last and last <= shared
    batch = make_batch(LENGTHS, seed=5)
    logits = model(batch)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 2), batch["labels"].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    counts = model.parameter_counts()
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_unknown_trunk_is_an_error():
    with pytest.raises(ValueError, match="late_fusion"):
        build_model(TINY, "early_fusion")


@pytest.mark.parametrize("script,trunk", [("pcgrad.py", "mult"), ("stop_and_go.py", "text_only")])
def test_strategy_script_runs_on_a_trunk(tiny_data, tmp_path, script, trunk):
    cmd = [sys.executable, str(REPO / "strategies" / script), "--data", str(tiny_data), "--trunk", trunk,
           "--model-size", "tiny", "--epochs", "1", "--max-steps", "3", "--batch-size", "8", "--out", str(tmp_path),
           "--quiet", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "summary:" in proc.stdout


@pytest.mark.parametrize("trunk", TRUNK_NAMES)
def test_pretraining_takes_the_trunks_whose_fused_vector_has_three_modality_slots(trunk, tiny_data):
    """The trunk declares its slots (model.slots); no list of names decides which trunks can pretrain."""
    from argparse import Namespace
    from common.trunks import model_from_args
    args = Namespace(trunk=trunk, stage="pretrain", text_encoder=None, grad_checkpointing=False)
    if trunk in ("hca", "late_fusion", "mult"):
        assert sorted(model_from_args(args, TINY, TASKS, tiny_data).slots) == sorted(MODALITIES)
    else:
        with pytest.raises(SystemExit, match=f"--trunk {trunk} has"):
            model_from_args(args, TINY, TASKS, tiny_data)
