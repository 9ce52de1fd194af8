"""Files from elsewhere cannot run code (issue 31).

Every checkpoint load (--init, --resume, best.pt, the pretraining --init, the original code's files) goes
through common.checkpoints.load_checkpoint, PyTorch's restricted unpickler. A payload checkpoint (an
object whose __reduce__ creates a marker file when unpickled), in our layout and in the original code's,
stops the run with an error naming the file and the refused global, and the marker never appears. Our own
checkpoints load with weights_only=True (numpy values stored as plain data, restored exactly);
data_prep/trust_checkpoint.py is the one explicit way to convert a trusted file; a finished run's
model.safetensors + model_config.json load back with --init to the same validation metrics as best.pt.
The scripts run in this process (runpy), as in tests/test_strategies_smoke.py."""
import argparse
import json
import pickle
import random
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoints import (MODEL_CONFIG_FILE, MODEL_FILE, UnsafeCheckpointError, from_safe, load_checkpoint,
                                to_safe)
from common.checkpoints import load_original_checkpoint
from common.arguments import build_parser
from common.files import atomic_save
from common.train import Run

REPO = Path(__file__).resolve().parents[1]
REFUSED = "builtins.exec"  # the global the payload calls


class Payload:
    """Unpickling it runs exec(...), which creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def payload_file(path, layout, marker, base=None):
    """A torch.save file with a payload: our layout {"model": ...} or the original code's {"model_state": ...}."""
    weights = base if base is not None else {"w": torch.zeros(2)}
    state = {"model": weights} if layout == "ours" else {"model_state": weights, "epoch": 3}
    state["extra"] = Payload(marker)
    torch.save(state, path)
    return path


def script(name, tiny_data, out, monkeypatch, *args):
    argv = [f"{name}.py", "--data", str(tiny_data), "--out", str(out), "--model-size", "tiny", "--epochs", "1",
            "--batch-size", "4", "--eval-every", "2", "--checkpoint-every", "2", "--log-every", "1", "--quiet", *args]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "strategies" / f"{name}.py"), run_name="__main__")


def assert_refused(err, path, marker):
    message = str(err.value)
    assert isinstance(err.value, SystemExit)
    assert str(path) in message and REFUSED in message, message
    assert "trust_checkpoint.py" in message  # says how to proceed
    assert not Path(marker).exists(), "the payload ran"


def test_the_payload_is_real(tmp_path):
    """The full unpickler runs it (so the tests below prove something)."""
    marker = tmp_path / "marker"
    path = payload_file(tmp_path / "evil.pt", "ours", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("layout", ["ours", "original"])
def test_init_with_a_payload_stops_before_training(layout, tiny_data, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    path = payload_file(tmp_path / "evil.pt", layout, marker)
    with pytest.raises(UnsafeCheckpointError) as err:
        script("all_at_once", tiny_data, tmp_path / "out", monkeypatch, "--max-steps", "1", "--init", str(path))
    assert_refused(err, path, marker)
    assert err.value.refused == [REFUSED]
    assert not (tmp_path / "out" / "all_at_once" / "seed0" / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.parametrize("layout", ["ours", "original"])
def test_pretraining_init_with_a_payload_stops(layout, tiny_data, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    path = payload_file(tmp_path / "evil.pt", layout, marker)
    with pytest.raises(UnsafeCheckpointError) as err:
        script("all_at_once", tiny_data, tmp_path / "out", monkeypatch, "--stage", "pretrain", "--max-steps", "1",
               "--init", str(path))
    assert_refused(err, path, marker)


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """all_at_once, 4 steps (validations at 2 and 4): checkpoint.pt, best.pt, model.safetensors."""
    out = tmp_path_factory.mktemp("finished")
    mp = pytest.MonkeyPatch()
    try:
        script("all_at_once", tiny_data, out, mp, "--max-steps", "4")
    finally:
        mp.undo()
    return out / "all_at_once" / "seed0"


@pytest.mark.parametrize("layout", ["ours", "original"])
def test_resume_from_a_tampered_checkpoint_stops(layout, finished_run, tiny_data, tmp_path, monkeypatch):
    import shutil
    out = tmp_path / "out"
    run_dir = out / "all_at_once" / "seed0"
    shutil.copytree(finished_run, run_dir)
    marker = tmp_path / "marker"
    good = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    if layout == "ours":
        good["extra"] = Payload(marker)
        torch.save(good, run_dir / "checkpoint.pt")
    else:
        payload_file(run_dir / "checkpoint.pt", "original", marker, base=good["model"])
    with pytest.raises(UnsafeCheckpointError) as err:
        script("all_at_once", tiny_data, out, monkeypatch, "--max-steps", "6", "--resume")
    assert_refused(err, run_dir / "checkpoint.pt", marker)


def test_tampered_best_pt_and_other_entry_points_stop(finished_run, tmp_path):
    """best.pt (read by Run.finish), load_original_checkpoint with a path, the legacy torch.save format and a
    plain pickle file: all go through the restricted loader."""
    marker = tmp_path / "marker"
    best = torch.load(finished_run / "best.pt", weights_only=True)
    best["extra"] = Payload(marker)
    torch.save(best, tmp_path / "best.pt")
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(tmp_path / "best.pt")
    assert_refused(err, tmp_path / "best.pt", marker)

    original = payload_file(tmp_path / "original.pth", "original", marker)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_original_checkpoint(torch.nn.Linear(1, 1), original)
    assert_refused(err, original, marker)

    legacy = tmp_path / "legacy.pt"
    torch.save({"model": {}, "extra": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(legacy)
    assert_refused(err, legacy, marker)

    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"model": {}, "extra": Payload(marker)}))
    with pytest.raises(SystemExit) as err:
        load_checkpoint(plain)
    assert str(plain) in str(err.value) and not marker.exists()

    disguised = tmp_path / "model.safetensors"  # a pickle under a safetensors name is not read as a pickle
    disguised.write_bytes(original.read_bytes())
    with pytest.raises(SystemExit, match="safetensors"):
        load_checkpoint(disguised)
    assert not marker.exists()


# ---------------------------------------------------------------- our own checkpoints
def test_our_checkpoints_load_with_weights_only(finished_run):
    for name in ("checkpoint.pt", "best.pt"):
        state = torch.load(finished_run / name, weights_only=True)  # raises on anything but plain data
        assert "model" in state
    state = load_checkpoint(finished_run / "checkpoint.pt")
    kind, key, *_ = state["rng"]["numpy"]
    assert kind == "MT19937" and isinstance(key, np.ndarray) and key.dtype == np.uint32
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])


def test_numpy_values_round_trip_exactly(tmp_path):
    np.random.seed(5)
    np.random.rand(3)
    random.seed(3)
    state = {"numpy": np.random.get_state(), "python": random.getstate(), "score": np.float64(0.1),
             "f32": np.float32(1 / 3), "ints": np.arange(5, dtype=np.int16), "nested": [{"m": np.eye(2)}, (np.int64(7),)],
             "plain": {"t": torch.arange(3), "x": 1.5, "s": "a", "n": None}}
    atomic_save(state, tmp_path / "s.pt")
    back = load_checkpoint(tmp_path / "s.pt")
    assert type(back["score"]) is np.float64 and back["score"] == state["score"]
    assert type(back["f32"]) is np.float32 and back["f32"] == state["f32"]
    assert back["ints"].dtype == np.int16 and (back["ints"] == state["ints"]).all()
    assert (back["nested"][0]["m"] == np.eye(2)).all() and type(back["nested"][1][0]) is np.int64
    assert back["python"] == state["python"] and torch.equal(back["plain"]["t"], state["plain"]["t"])
    np.random.set_state(state["numpy"])
    a = np.random.rand(4)
    np.random.set_state(back["numpy"])
    assert (np.random.rand(4) == a).all()
    assert from_safe(to_safe(state))["python"] == state["python"]


def test_writing_an_unsafe_object_is_an_error_naming_it(tmp_path):
    with pytest.raises(TypeError, match=r"s.pt\['strategy'\]\['args'\].*argparse.Namespace"):
        atomic_save({"strategy": {"args": argparse.Namespace(lr=1.0)}}, tmp_path / "s.pt")
    assert not (tmp_path / "s.pt").exists()


# ---------------------------------------------------------------- the one explicit trust command
def test_trust_checkpoint_converts_a_trusted_file(tmp_path, capsys):
    from data_prep.trust_checkpoint import main as trust
    old = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.5, data=Path("/x")),
                "rng": {"numpy": np.random.get_state()}, "best": np.float64(0.25)}, old)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(old)
    assert "argparse.Namespace" in err.value.refused
    safe = tmp_path / "safe.pt"
    trust([str(old), str(safe)])
    out = capsys.readouterr().out
    assert "trusting" in out and str(safe) in out
    state = load_checkpoint(safe)
    assert state["args"] == {"lr": 0.5, "data": "/x"} and type(state["best"]) is np.float64
    assert torch.equal(state["model"]["w"], torch.ones(2))
    trust([str(old), str(tmp_path / "model.safetensors")])
    assert torch.equal(load_checkpoint(tmp_path / "model.safetensors")["w"], torch.ones(2))


# ---------------------------------------------------------------- model.safetensors: exchange without a pickle
def _run(tiny_data, out, *extra):
    args = build_parser().parse_args(["--data", str(tiny_data), "--out", str(out), "--model-size", "tiny",
                                      "--batch-size", "4", "--quiet", *extra])
    return Run(args, strategy="all_at_once")


def test_model_safetensors_round_trip_gives_best_pt_metrics(finished_run, tiny_data, tmp_path):
    config = json.loads((finished_run / MODEL_CONFIG_FILE).read_text())
    assert config["trunk"] == "hca" and config["tasks"] == ["binary", "mature", "gory", "slapstick", "sarcasm"]
    assert config["config"]["hidden"] == 32 and config["text_encoder"]["model_type"] == "bert"
    from_file = _run(tiny_data, tmp_path / "a", "--init", str(finished_run / MODEL_FILE))
    assert from_file.init_report == {"missing": [], "unexpected": []}
    from_best = _run(tiny_data, tmp_path / "b", "--init", str(finished_run / "best.pt"))
    a, b = from_file.evaluate(from_file.val_set), from_best.evaluate(from_best.val_set)
    assert a == b
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["val"]["mean"]["loss"] == pytest.approx(a["mean"]["loss"], rel=1e-6)


@pytest.mark.parametrize("flags,field", [(["--model-size", "small"], "config.hidden"),
                                         (["--tasks", "binary,gory"], "tasks"),
                                         (["--trunk", "late_fusion"], "trunk")])
def test_model_safetensors_into_another_configuration_stops(flags, field, finished_run, tiny_data, tmp_path):
    with pytest.raises(SystemExit, match=field):
        _run(tiny_data, tmp_path, "--init", str(finished_run / MODEL_FILE), *flags)


def tiny_bert_folder(folder, weights_file=None):
    """A local encoder folder with a 1-layer BERT config (and, if given, a weights file written by the caller)."""
    from transformers import BertConfig
    folder.mkdir(parents=True, exist_ok=True)
    BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
               max_position_embeddings=16).save_pretrained(folder)
    return folder


def test_text_encoder_folder_with_a_pickled_payload_bin_is_refused(tmp_path):
    """A folder holding only a pickled pytorch_model.bin: transformers loads it with torch.load(weights_only=True)
    (local_files_only, never remote code), so a payload is refused before it runs; a clean .bin still loads."""
    from transformers import BertModel

    from common.text_encoder import load_encoder_folder
    clean = tiny_bert_folder(tmp_path / "clean")
    model = BertModel(__import__("transformers").BertConfig.from_pretrained(clean), add_pooling_layer=False)
    torch.save(model.state_dict(), clean / "pytorch_model.bin")
    loaded = load_encoder_folder(clean, verbose=False)
    assert torch.equal(loaded.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)

    bad = tiny_bert_folder(tmp_path / "bad")
    marker = tmp_path / "marker"
    state = dict(model.state_dict())
    state["extra"] = Payload(marker)
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(Exception) as err:
        load_encoder_folder(bad, verbose=False)
    assert "weights_only" in str(err.value) or "Unsupported global" in str(err.value), str(err.value)
    assert not marker.exists(), "the payload ran"


def test_text_encoder_folder_asking_for_remote_code_is_refused(tmp_path):
    """A config.json whose auto_map points at code in the folder: loaded without trust_remote_code, so the
    folder's Python file never runs. A known model_type loads transformers' own class; an unknown one is
    refused by transformers (it would need trust_remote_code)."""
    from transformers import BertConfig, BertModel

    from common.text_encoder import load_encoder_folder
    marker = tmp_path / "marker"
    for model_type in ("bert", "evil_bert"):
        folder = tiny_bert_folder(tmp_path / model_type)
        model = BertModel(BertConfig.from_pretrained(folder), add_pooling_layer=False)
        model.save_pretrained(folder)
        (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModel": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
        config["model_type"] = model_type
        (folder / "config.json").write_text(json.dumps(config))
        if model_type == "bert":
            assert type(load_encoder_folder(folder, verbose=False)).__name__ == "BertModel"
        else:
            with pytest.raises(Exception, match="trust_remote_code"):
                load_encoder_folder(folder, verbose=False)
        assert not marker.exists(), f"the folder's code ran ({model_type})"


def test_a_fresh_start_removes_the_model_files_of_an_earlier_run(finished_run, tiny_data, tmp_path):
    """Starting again without --resume in a run's folder removes its model.safetensors and model_config.json
    with its other files: an unfinished new run never sits beside the old run's exported model."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(finished_run, out / "all_at_once" / "seed0")
    run = _run(tiny_data, out)
    assert (run.dir / MODEL_FILE).exists() and (run.dir / MODEL_CONFIG_FILE).exists()
    run.start()
    assert not (run.dir / MODEL_FILE).exists() and not (run.dir / MODEL_CONFIG_FILE).exists()
