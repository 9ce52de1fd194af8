"""A compact BERT encoder whose parameter names match Hugging Face's BertModel.

Only what HCA needs: embeddings (word + position + token type, LayerNorm, dropout) and N post-LN
layers of self-attention + GELU feed-forward; the pooler is optional (HCA uses the last hidden layer).
Because the names match (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`,
...), `BertEncoder.from_pretrained(folder)` loads an HF-style folder (config.json + model.safetensors or
pytorch_model.bin) without the `transformers` package. The `safetensors` package is not installed here,
so `read_safetensors` reads that (simple) format directly.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MASK_VALUE = -10000.0  # BERT's additive mask for padded keys


# ---------------------------------------------------------------------------------------------------------
def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout with a cheaper random mask on CPU.

    PyTorch's CPU dropout draws one random number per element (~13 ns each on the 2-core machine), which
    was a quarter of a small-model training step. Here one random 64-bit integer gives eight random bytes;
    an element is dropped when its byte is below round(256 p), so p is rounded to a multiple of 1/256
    (0.1 -> 0.1016, 0.2 -> 0.1992, 0.3 -> 0.3008) and kept values are scaled by 1 / (1 - that p): the
    expectation is unchanged. Other devices use F.dropout."""
    if not training or p == 0.0:
        return x
    k = round(p * 256)
    if x.device.type != "cpu" or k == 0 or k >= 256:
        return F.dropout(x, p, True)
    n = x.numel()
    bytes_ = torch.randint(-2**63, 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64).view(torch.uint8)[:n]
    keep = (bytes_.view(x.shape) >= k).to(x.dtype)
    return x * keep.mul_(256.0 / (256 - k))


class Dropout(nn.Module):
    """Drop-in replacement for nn.Dropout using `dropout` above (no parameters, so state dicts are unchanged)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


def attention(q, k, v, add_mask, p: float, training: bool) -> torch.Tensor:
    """BERT attention: softmax(q k^T / sqrt(d) + add_mask), dropout p on the probabilities, times v.
    q [B, heads, Lq, d], k and v [B, heads, Lk, d], add_mask broadcastable to [B, heads, Lq, Lk] or None.

    Without dropout, scaled_dot_product_attention computes exactly this. With dropout on CPU the explicit
    matmuls and the cheap `dropout` are used instead (SDPA's own CPU dropout costs more than the attention)."""
    if not training or p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=add_mask, dropout_p=p if training else 0.0)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if add_mask is not None:
        scores = scores + add_mask
    return torch.matmul(dropout(torch.softmax(scores, dim=-1), p, True), v)

# ---------------------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
# then the raw little-endian tensor bytes; offsets are relative to the end of the header.
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file into a dict of CPU tensors (F32, F16, BF16; I64/I32 for index buffers)."""
    if sys.byteorder != "little":
        raise RuntimeError("read_safetensors assumes a little-endian machine")
    path = Path(path)
    raw = bytearray(path.read_bytes())  # writable buffer: torch.frombuffer warns on read-only bytes
    if len(raw) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} exceeds the file size {len(raw)}")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = memoryview(raw)[8 + n:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {info['dtype']}")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = list(info["shape"])
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or end > len(data):
            raise ValueError(f"{path}: tensor {name}: data_offsets {begin}..{end} do not fit shape {shape}")
        if expected == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(data[begin:end], dtype=dtype).reshape(shape)
    return tensors


# ---------------------------------------------------------------------------------------------------------
@dataclass
class BertConfig:
    vocab_size: int = 28996
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attn_dropout: float = 0.1
    layer_norm_eps: float = 1e-12

    # Hugging Face config.json key for each of our fields
    HF_KEYS = {"vocab_size": "vocab_size", "hidden": "hidden_size", "layers": "num_hidden_layers",
               "heads": "num_attention_heads", "intermediate": "intermediate_size",
               "max_positions": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
               "hidden_dropout": "hidden_dropout_prob", "attn_dropout": "attention_probs_dropout_prob",
               "layer_norm_eps": "layer_norm_eps"}

    @classmethod
    def from_hf_dict(cls, d: dict, source="config.json") -> "BertConfig":
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"{source}: hidden_act={act!r}; only BERT's exact 'gelu' is supported")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: only absolute position embeddings are supported")
        kwargs = {ours: d[hf] for ours, hf in cls.HF_KEYS.items() if hf in d}
        for required in ("vocab_size", "hidden", "layers", "heads", "intermediate"):
            if required not in kwargs:
                raise ValueError(f"{source}: missing {cls.HF_KEYS[required]!r}")
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        d = {hf: getattr(self, ours) for ours, hf in self.HF_KEYS.items()}
        d.update(model_type="bert", hidden_act="gelu", position_embedding_type="absolute")
        return d


def additive_mask(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Bool key mask [B, L] (True = real) -> additive mask [B, 1, 1, L]: 0 for real keys, -10000 for padding."""
    return (~mask).to(dtype)[:, None, None, :] * MASK_VALUE


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout)

    def forward(self, input_ids, token_type_ids=None):
        L = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:L]
        if token_type_ids is None:  # all segment 0: add the row once instead of a [B, L] lookup
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        if c.hidden % c.heads:
            raise ValueError(f"hidden size {c.hidden} is not a multiple of the number of heads {c.heads}")
        self.heads, self.head_dim = c.heads, c.hidden // c.heads
        self.query = nn.Linear(c.hidden, c.hidden)
        self.key = nn.Linear(c.hidden, c.hidden)
        self.value = nn.Linear(c.hidden, c.hidden)
        self.attn_dropout = c.attn_dropout

    def split(self, x):  # [B, L, H] -> [B, heads, L, head_dim]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, add_mask):
        ctx = attention(self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x)),
                        add_mask, self.attn_dropout, self.training)
        return ctx.transpose(1, 2).reshape(x.shape)


class BertSelfOutput(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout)

    def forward(self, h, residual):  # post-LN, as BERT
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c)

    def forward(self, x, add_mask):
        return self.output(self.self(x, add_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.intermediate)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class BertOutput(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.intermediate, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutput(c)

    def forward(self, x, add_mask):
        a = self.attention(x, add_mask)
        return self.output(self.intermediate(a), a)


class BertStack(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.layers))


class BertPooler(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.hidden)

    def forward(self, hidden):  # tanh(W h_[CLS])
        return torch.tanh(self.dense(hidden[:, 0]))


class BertEncoder(nn.Module):
    """BERT without the pre-training heads. forward(input_ids, attention_mask) -> last hidden layer [B, L, H]."""

    def __init__(self, config: BertConfig, add_pooler: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertStack(config)
        self.pooler = BertPooler(config) if add_pooler else None
        self.apply(self._init_weights)
        self.load_report = None  # (missing, unexpected) after from_pretrained

    @staticmethod
    def _init_weights(m):  # BERT's initialisation: N(0, 0.02), zero biases, LayerNorm = identity
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if input_ids.shape[1] > self.config.max_positions:
            raise ValueError(f"text of {input_ids.shape[1]} tokens exceeds max_positions={self.config.max_positions}")
        x = self.embeddings(input_ids, token_type_ids)
        add_mask = None if attention_mask is None else additive_mask(attention_mask.bool(), x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, add_mask)
        return x

    # ----- loading Hugging Face folders ------------------------------------------------------------------
    @staticmethod
    def hf_to_ours(state: dict) -> dict:
        """Rename a Hugging Face BERT state dict to our names: strip 'bert.', old TF names gamma/beta ->
        weight/bias; drop the position_ids buffer (a constant arange, not a parameter)."""
        out = {}
        for k, v in state.items():
            if k.startswith("bert."):
                k = k[len("bert."):]
            if ".LayerNorm." in k:
                k = k.replace(".gamma", ".weight").replace(".beta", ".bias")
            if k.endswith("embeddings.position_ids"):
                continue
            out[k] = v
        return out

    @classmethod
    def from_pretrained(cls, folder, add_pooler: bool = False, verbose: bool = True) -> "BertEncoder":
        """Load config.json + model.safetensors (preferred) or pytorch_model.bin from an HF-style folder.
        Non-strict: keys of the pre-training heads (cls.*) and, without add_pooler, pooler.* are reported as
        unexpected; any missing key of ours is reported (and left at its random initialisation)."""
        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder}: no config.json")
        config = BertConfig.from_hf_dict(json.loads(cfg_path.read_text()), source=str(cfg_path))
        if (folder / "model.safetensors").is_file():
            weights = folder / "model.safetensors"
            state = read_safetensors(weights)
        elif (folder / "pytorch_model.bin").is_file():
            weights = folder / "pytorch_model.bin"
            state = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{folder}: neither model.safetensors nor pytorch_model.bin")
        model = cls(config, add_pooler=add_pooler)
        state = cls.hf_to_ours(state)
        ours = model.state_dict()
        for k, v in state.items():
            if k in ours and ours[k].shape != v.shape:
                raise ValueError(f"{weights}: {k} has shape {tuple(v.shape)}, config.json implies {tuple(ours[k].shape)}")
        result = model.load_state_dict(state, strict=False)
        model.load_report = (list(result.missing_keys), list(result.unexpected_keys))
        if verbose:
            print(f"BertEncoder.from_pretrained({folder}): {len(state) - len(result.unexpected_keys)} tensors loaded "
                  f"from {weights.name}; missing {len(result.missing_keys)}: {result.missing_keys[:8]}; "
                  f"unexpected {len(result.unexpected_keys)}: {result.unexpected_keys[:8]}")
        return model

    def config_dict(self) -> dict:
        return asdict(self.config)
