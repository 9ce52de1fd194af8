"""The other shared models of --trunk, with HCA's interface (common.model.MultiTaskModel): batch -> fused
vector -> one head per task. A strategy sees only the per-task losses and the fused vector, so every
strategy script runs unchanged on every trunk.

  late_fusion   one encoder per modality (HCA's: the text encoder, the two BiLSTMs), each attention-pooled,
                concatenated: fused [B, 3H] = (text, audio, video), the layout of HCA's fused vector
  concat        the same pooled vectors and the three presence flags through a fusion MLP: fused [B, H]
  mult          MulT-style cross-modal transformer (Tsai et al., ACL 2019): per target modality, two
                cross-modal transformers (the other modalities as keys and values), their outputs
                concatenated, then a self-attention transformer; pooled per target: fused [B, 3H]
  text_only, video_only, audio_only   one encoder alone, attention-pooled: fused [B, H] (unimodal ablations)

Masks are honoured as in HCA: an absent or switched-off modality is masked in attention and pooling (never
fed as zeros), a pooled slot of an absent modality is an exact zero vector, and padded positions change no
output. The encoders keep HCA's module names (text_encoder, video_encoder, audio_encoder), so an HCA
checkpoint initialises them through --init (the rest is reported as missing or unexpected).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from common.data import MODALITIES, TASKS
from common.model import (Dropout, HCAConfig, HCAModel, MultiTaskModel, PooledModality, SequenceEncoder, additive_mask,
                          attention)
from common.text_encoder import TokenizerMismatch, build_text_encoder, check_token_ids, encode_text


class EncodedModalities(MultiTaskModel):
    """A trunk that starts from HCA's unimodal encoders for the modalities it reads."""

    def __init__(self, config: HCAConfig, tasks, text_encoder, grad_checkpointing, modalities):
        super().__init__(config, tasks)
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        if "text" in self.modalities:
            self.text_encoder = build_text_encoder(config, text_encoder, grad_checkpointing)
        if "video" in self.modalities:
            self.video_encoder = SequenceEncoder(config.video_dim, config)
        if "audio" in self.modalities:
            self.audio_encoder = SequenceEncoder(config.audio_dim, config)
        # fused-vector order of the modalities read, as HCA's slots (text, audio, video)
        self.slots = tuple(m for m in config.slot_order if m in self.modalities)

    def encode(self, batch, masks):
        """{modality: [B, L, H]} for the modalities this trunk reads."""
        seqs = {}
        if "text" in self.modalities:
            seqs["text"] = encode_text(self.text_encoder, batch["text_ids"], masks["text"])
        if "video" in self.modalities:
            seqs["video"] = self.video_encoder(batch["video"], masks["video"])
        if "audio" in self.modalities:
            seqs["audio"] = self.audio_encoder(batch["audio"], masks["audio"])
        return seqs


class PooledTrunk(EncodedModalities):
    """late_fusion and the unimodal trunks: each modality's sequence attention-pooled, then concatenated."""

    def __init__(self, config, tasks=TASKS, text_encoder=None, grad_checkpointing=False, modalities=MODALITIES):
        super().__init__(config, tasks, text_encoder, grad_checkpointing, modalities)
        self.pools = nn.ModuleDict({m: PooledModality(config.hidden, config) for m in self.slots})
        self._make_heads(len(self.slots) * config.hidden)

    def trunk(self, batch, active_modalities=None, return_sequences=False):
        masks = self.effective_masks(batch, active_modalities)
        seqs = self.encode(batch, masks)
        fused = torch.cat([self.pools[m](seqs[m], masks[m]) for m in self.slots], dim=-1)
        return (fused, seqs) if return_sequences else fused

    def last_shared_parameters(self):
        return [p for m in self.slots for p in self.pools[m].pool_norm.parameters()]


class LateFusion(PooledTrunk):
    trunk_name = "late_fusion"


def unimodal(modality):
    class OneModality(PooledTrunk):
        trunk_name = f"{modality}_only"
        __doc__ = f"The {modality} encoder alone, attention-pooled (a unimodal ablation)."

        def __init__(self, config, tasks=TASKS, text_encoder=None, grad_checkpointing=False):
            super().__init__(config, tasks, text_encoder, grad_checkpointing, modalities=(modality,))

    OneModality.__name__ = OneModality.__qualname__ = f"{modality.capitalize()}Only"
    return OneModality


class ConcatFusion(EncodedModalities):
    """Early fusion of the pooled modality vectors: [text, audio, video, presence flags] -> Linear-ReLU-
    Dropout-Linear-LayerNorm -> fused [B, H]. The flags let the MLP tell an absent modality (its pooled
    vector is an exact zero) from a present one."""

    trunk_name = "concat"

    def __init__(self, config, tasks=TASKS, text_encoder=None, grad_checkpointing=False):
        super().__init__(config, tasks, text_encoder, grad_checkpointing, MODALITIES)
        H = config.hidden
        self.pools = nn.ModuleDict({m: PooledModality(H, config) for m in self.slots})
        self.fusion = nn.Sequential(nn.Linear(3 * H + 3, H), nn.ReLU(), Dropout(config.proj_dropout), nn.Linear(H, H))
        self.fusion_norm = nn.LayerNorm(H, eps=1e-5)
        self.slots = None  # fused is one mixed vector, not per-modality slots
        self._make_heads(H)

    def trunk(self, batch, active_modalities=None, return_sequences=False):
        masks = self.effective_masks(batch, active_modalities)
        seqs = self.encode(batch, masks)
        order = self.config.slot_order
        pooled = [self.pools[m](seqs[m], masks[m]) for m in order]
        flags = torch.stack([masks[m].any(dim=1) for m in order], dim=1).to(pooled[0].dtype)
        fused = self.fusion_norm(self.fusion(torch.cat(pooled + [flags], dim=-1)))
        return (fused, seqs) if return_sequences else fused

    def last_shared_parameters(self):
        return list(self.fusion_norm.parameters())


# ---------------------------------------------------------------------------------------------------------
class MultiHeadAttention(nn.Module):
    """Multi-head attention of queries over keys/values with an output projection; padded keys get
    BERT's -10000 additive mask; a query row whose keys are all masked gets a zero output."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not a multiple of {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def split(self, x):  # [B, L, D] -> [B, heads, L, D / heads]
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x, ctx, key_mask):
        h = attention(self.split(self.query(x)), self.split(self.key(ctx)), self.split(self.value(ctx)),
                      additive_mask(key_mask, x.dtype), self.dropout, self.training)
        h = self.out(h.transpose(1, 2).reshape(x.shape))
        return h * key_mask.any(dim=1).to(h.dtype)[:, None, None]


class TransformerBlock(nn.Module):
    """MulT's encoder layer (pre-LayerNorm): x + attn(LN(x), LN(ctx)), then x + FFN(LN(x)). Cross-modal
    when given a context, self-attention otherwise."""

    def __init__(self, dim, heads, c: HCAConfig, cross: bool):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=1e-5)
        self.norm_kv = nn.LayerNorm(dim, eps=1e-5) if cross else None
        self.attn = MultiHeadAttention(dim, heads, c.xattn_dropout)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-5)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), Dropout(c.xattn_dropout), nn.Linear(4 * dim, dim))
        self.res_dropout = Dropout(c.xattn_dropout)

    def forward(self, x, x_mask, ctx=None, ctx_mask=None):
        q = self.norm_q(x)
        kv, mask = (self.norm_kv(ctx), ctx_mask) if self.norm_kv is not None else (q, x_mask)
        x = x + self.res_dropout(self.attn(q, kv, mask))
        return x + self.res_dropout(self.ff(self.norm_ff(x)))


class TransformerStack(nn.Module):
    def __init__(self, dim, heads, layers, c, cross):
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(dim, heads, c, cross) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x, x_mask, ctx=None, ctx_mask=None):
        for layer in self.layers:
            x = layer(x, x_mask, ctx, ctx_mask)
        return self.norm(x)


def sinusoidal_positions(length, dim, device, dtype):
    """[length, dim] sine/cosine position embeddings (Vaswani et al.; MulT adds them to every modality)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table.to(dtype)


class MulT(MultiTaskModel):
    """MulT-style fusion (Tsai et al., ACL 2019, "Multimodal Transformer for Unaligned Multimodal Language
    Sequences"; its public code yaohungt/Multimodal-Transformer).

    Each modality is projected to H by a kernel-1 temporal convolution without bias (a Linear per position),
    scaled by sqrt(H), given sinusoidal positions and embedding dropout. For each target modality a, the
    cross-modal transformers b->a and c->a (queries a; keys and values b, resp. c; config.mult_layers
    pre-LN layers each) give two [B, La, H] sequences, concatenated to [B, La, 2H] and passed through a
    self-attention transformer. Text enters as the text encoder's last hidden layer (MulT: word vectors),
    video and audio as their features (MulT's design: no recurrent encoders).
    Deviation: MulT classifies on the last time step of each target sequence; with padded, unaligned
    clips we project each position to H and attention-pool over the real positions (as HCA), giving an
    exact zero for an absent target modality: fused [B, 3H] in HCA's slot order (text, audio, video)."""

    trunk_name = "mult"

    def __init__(self, config, tasks=TASKS, text_encoder=None, grad_checkpointing=False):
        super().__init__(config, tasks)
        H, heads, layers = config.hidden, config.xattn_heads, config.mult_layers
        self.text_encoder = build_text_encoder(config, text_encoder, grad_checkpointing)
        self.proj = nn.ModuleDict({"text": nn.Linear(H, H, bias=False), "video": nn.Linear(config.video_dim, H, bias=False),
                                   "audio": nn.Linear(config.audio_dim, H, bias=False)})
        self.embed_dropout = Dropout(config.proj_dropout)
        self.slots = config.slot_order
        self.pairs = [(src, tgt) for tgt in self.slots for src in self.slots if src != tgt]
        self.cross = nn.ModuleDict({f"{s}_to_{t}": TransformerStack(H, heads, layers, config, cross=True)
                                    for s, t in self.pairs})
        self.memory = nn.ModuleDict({t: TransformerStack(2 * H, heads, layers, config, cross=False) for t in self.slots})
        self.out_proj = nn.ModuleDict({t: nn.Linear(2 * H, H) for t in self.slots})
        self.pools = nn.ModuleDict({t: PooledModality(H, config) for t in self.slots})
        self._make_heads(3 * H)

    def embed(self, x, mask, modality):
        # padding zeroed first (torch.where: NaN/Inf garbage there cannot leak into attention)
        x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        H = self.config.hidden
        h = self.proj[modality](x) * math.sqrt(H) + sinusoidal_positions(x.shape[1], H, x.device, x.dtype)
        return self.embed_dropout(h)

    def trunk(self, batch, active_modalities=None, return_sequences=False):
        masks = self.effective_masks(batch, active_modalities)
        raw = {"text": encode_text(self.text_encoder, batch["text_ids"], masks["text"]),
               "video": batch["video"], "audio": batch["audio"]}
        x = {m: self.embed(raw[m], masks[m], m) for m in self.slots}
        seqs, pooled = {}, []
        for t in self.slots:
            crossed = [self.cross[f"{s}_to_{t}"](x[t], masks[t], x[s], masks[s]) for s in self.slots if s != t]
            memory = self.memory[t](torch.cat(crossed, dim=-1), masks[t])
            seqs[t] = self.out_proj[t](memory)
            pooled.append(self.pools[t](seqs[t], masks[t]))
        fused = torch.cat(pooled, dim=-1)
        return (fused, seqs) if return_sequences else fused

    def last_shared_parameters(self):
        return [p for t in self.slots for p in self.pools[t].pool_norm.parameters()]


# every trunk --trunk can name (HCA is common/model.py's)
TRUNKS = {"hca": HCAModel, "late_fusion": LateFusion, "concat": ConcatFusion, "mult": MulT,
          "text_only": unimodal("text"), "video_only": unimodal("video"), "audio_only": unimodal("audio")}


TRUNK_NAMES = tuple(TRUNKS)


def build_model(config: HCAConfig, trunk="hca", tasks=TASKS, text_encoder=None, grad_checkpointing=False,
                token_files=()) -> MultiTaskModel:
    """The model of --trunk (common/trunks.py for all but hca). token_files: .h5 splits whose stored token
    ids are checked against the text encoder's tokenizer (common.text_encoder.check_token_ids)."""
    if trunk not in TRUNKS:
        raise ValueError(f"unknown trunk {trunk!r}; choose from {', '.join(TRUNK_NAMES)}")
    model = TRUNKS[trunk](config, tasks, text_encoder, grad_checkpointing)
    if token_files and "text" in model.modalities:
        check_token_ids(model.text_encoder, token_files)
    return model


def model_from_args(args, config: HCAConfig, tasks, data_dir) -> MultiTaskModel:
    """The model of a run's arguments (--trunk, --text-encoder, --grad-checkpointing), its token ids
    checked against the run's splits. Pretraining needs a trunk whose fused vector has the three modality
    slots (its matching and contrastive heads read them): the model declares them (model.slots)."""
    trunk = getattr(args, "trunk", "hca")
    try:
        model = build_model(config, trunk, tasks, text_encoder=getattr(args, "text_encoder", None),
                            grad_checkpointing=getattr(args, "grad_checkpointing", False),
                            token_files=[Path(data_dir) / f"{s}.h5" for s in ("train", "val", "test")])
    except TokenizerMismatch as e:  # a message for the user, not a traceback
        raise SystemExit(f"error: {e}") from None
    if getattr(args, "stage", "finetune") == "pretrain" and sorted(model.slots or ()) != sorted(MODALITIES):
        raise SystemExit(f"--stage pretrain needs a trunk with text, video and audio slots in its fused vector "
                         f"(e.g. hca, late_fusion, mult); --trunk {trunk} has {model.slots}")
    return model
