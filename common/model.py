"""HCA / HICCAP multi-task model: one shared trunk, one small classifier per task; and the pieces
every trunk shares (MultiTaskModel: heads, masks, parameter groups; `build_model` for --trunk).

Follow one batch through `HCAModel.trunk`:
  text  [B, Lt] token ids    -> text encoder (transformers; last hidden layer)                 -> [B, Lt, H]
  video [B, Sv, 1024]        -> 2-layer BiLSTM -> dropout+LayerNorm -> Linear+LayerNorm+Dropout -> [B, Sv, H]
  audio [B, Sa, 128]         -> the same with its own weights                                 -> [B, Sa, H]
  three branches of hierarchical cross-attention (query <- context 1, then <- context 2, + query):
      text  <- video <- audio,   audio <- video <- text,   video <- text <- audio
  attention pooling per branch -> dropout+LayerNorm -> three [B, H] vectors -> fused [B, 3H] (text, audio, video)
`classify` maps fused to logits [B, T, 2], one pair per task (the loss is the training code's business).
The other trunks (common/trunks.py: late_fusion, concat, mult, text_only, video_only, audio_only) have the
same interface; a strategy sees only the per-task losses and the fused vector.

Masks. A modality that is absent for a clip (present False, length 0) or switched off by `active_modalities`
has an all-False mask, and is then excluded *exactly*: as attention keys it gives a zero context, as a branch
query it gives an exact zero vector in `fused`. Padded positions never change any output.
(A zero context still passes its step's dropout+LayerNorm, which then outputs the LayerNorm's bias; the
query modality itself reaches the pooled vector through the branch's residual.)

Text encoder: common/text_encoder.py (transformers' BertModel of our size with random weights, or any local
encoder folder with --text-encoder; the model's hidden size H is then the encoder's).

Deviations from the original code (GitHub RiTUAL-UH/Comic-Mischief-Prediction), all deliberate:
  - the text encoder gets the text mask (the original calls BERT without one, so padding tokens are attended to);
  - the BiLSTMs give what packed sequences give (the original runs them over the zero padding, so its
    backward direction starts in the padding);
  - attention pooling uses the real masks (the original passes all-ones masks, so padding is pooled) and a
    max-subtracted masked softmax (the original's exp(score)/(sum+1e-10) overflows for scores above ~88);
  - a cross-attention step whose keys are all masked returns a zero context (BERT's -10000 mask would
    otherwise give a uniform average over padding);
  - heads are Linear-ReLU-Dropout-Linear (the original: four Linear layers with BatchNorm, no activation);
  - the projections of the LSTM outputs are computed once per batch (the original calls them once per use,
    so in training each use draws its own dropout mask);
  - dropout, inside the text encoder too, uses a cheaper random mask on CPU (common/dropout.py; p rounded
    to a multiple of 1/256);
  - the pooling vector v is initialised N(0, 1/H) (the original: U(0, 1), which makes pooling nearly an argmax).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from common.data import MODALITIES, TASKS
from common.dropout import Dropout, attention
from common.text_encoder import build_text_encoder, encode_text, encoder_config

MASK_VALUE = -10000.0  # BERT's additive mask for padded keys (the original's cross-attention uses it too)


def additive_mask(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Bool key mask [B, L] (True = real) -> additive mask [B, 1, 1, L]: 0 for real keys, -10000 for padding."""
    return (~mask).to(dtype)[:, None, None, :] * MASK_VALUE


# ---------------------------------------------------------------------------------------------------------
@dataclass
class HCAConfig:
    # text encoder of --model-size (BERT-base-cased sizes by default); with --text-encoder the folder's
    # encoder is used and model_config copies its hidden and vocabulary sizes here
    vocab_size: int = 28996
    hidden: int = 768
    bert_layers: int = 12
    bert_heads: int = 12
    bert_intermediate: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    # video / audio encoders
    video_dim: int = 1024
    audio_dim: int = 128
    lstm_hidden: int = 512          # per direction; the BiLSTM output is 2 * lstm_hidden
    lstm_layers: int = 2
    # cross-attention and heads
    xattn_heads: int = 12
    head_hidden: int = 200          # the original heads' first layer is 768*3 -> 200
    # the mult trunk (common/trunks.py): layers of each cross-modal and self-attention transformer
    mult_layers: int = 2
    # dropouts (values of the original multi-task code)
    bert_dropout: float = 0.1       # BERT hidden dropout
    bert_attn_dropout: float = 0.1  # BERT attention-probability dropout
    lstm_dropout: float = 0.2       # after the BiLSTM, before its LayerNorm
    proj_dropout: float = 0.3       # after the Linear+LayerNorm projection to `hidden`
    xattn_dropout: float = 0.1      # on cross-attention probabilities
    step_dropout: float = 0.2       # after each cross-attention step, before its LayerNorm
    pool_dropout: float = 0.2       # after attention pooling, before its LayerNorm
    head_dropout: float = 0.3
    # branch structure: (query, first context, second context), in the order of the fused vector.
    # Default = the original binary model and the paper (docs/models.md, "HCA (HICCAP)"). The original multi-task code's video branch queries
    # audio first, then text: (("text","video","audio"), ("audio","video","text"), ("video","audio","text")).
    branches: tuple = (("text", "video", "audio"), ("audio", "video", "text"), ("video", "text", "audio"))

    @property
    def slot_order(self) -> tuple:
        """The modalities in the order of their H-wide slots in a 3H fused vector: (text, audio, video)."""
        return tuple(b[0] for b in self.branches)


MODEL_SIZES = {
    # unit tests: a few thousand parameters outside the embedding table
    "tiny": HCAConfig(hidden=32, bert_layers=1, bert_heads=2, bert_intermediate=64, lstm_hidden=16,
                      xattn_heads=2, head_hidden=16, mult_layers=1),
    # default for CPU runs: a forward+backward of a realistic batch of 16 in tens of milliseconds on 2 cores
    "small": HCAConfig(hidden=128, bert_layers=2, bert_heads=4, bert_intermediate=256, lstm_hidden=64,
                       xattn_heads=4, head_hidden=64),
    # the paper's sizes (BERT-base, 512-unit LSTMs, 12 heads)
    "full": HCAConfig(mult_layers=4),
}


def model_config(size="small", text_encoder=None) -> HCAConfig:
    """The HCAConfig of --model-size; with --text-encoder FOLDER its hidden size (the width of every
    branch) and vocabulary come from the folder's config.json, the rest from the size."""
    config = MODEL_SIZES[size]
    if text_encoder is None:
        return config
    enc = encoder_config(text_encoder)
    config = replace(config, hidden=enc.hidden_size, vocab_size=enc.vocab_size,
                     max_positions=getattr(enc, "max_position_embeddings", config.max_positions))
    if config.hidden % config.xattn_heads:
        raise ValueError(f"--text-encoder {text_encoder}: hidden size {config.hidden} is not a multiple of the "
                         f"{config.xattn_heads} attention heads of --model-size {size}; choose another size")
    return config


# ---------------------------------------------------------------------------------------------------------
def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of scores [B, L] over the positions where mask [B, L] is True.

    Max-subtracted (so large scores cannot overflow), exactly 0 on masked positions, and an all-zero row
    (not NaN, not a uniform average) where no position is valid."""
    row_ok = mask.any(dim=1, keepdim=True)
    s = scores.masked_fill(~mask, float("-inf")).masked_fill(~row_ok, 0.0)  # no all -inf row: no NaN
    return torch.softmax(s, dim=1) * mask


class AttentionPooling(nn.Module):
    """Additive attention pooling: score_i = tanh(u h_i) . v, weights = masked softmax, output sum_i w_i h_i."""

    def __init__(self, hidden: int):
        super().__init__()
        self.u = nn.Linear(hidden, hidden)
        self.v = nn.Parameter(torch.randn(hidden) * hidden ** -0.5)

    def forward(self, h, mask):
        weights = masked_softmax(torch.tanh(self.u(h)) @ self.v, mask)
        return torch.bmm(weights.unsqueeze(1), h).squeeze(1), weights


class CrossAttention(nn.Module):
    """BERT-style multi-head attention of queries over a context (query/key/value projections, no output
    projection, additive -10000 mask on padded keys, dropout on the probabilities), as the original's
    BertOutAttention. A query row whose keys are all masked gets a zero context."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of xattn_heads {heads}")
        self.heads, self.head_dim, self.dropout = heads, hidden // heads, dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def split(self, x):  # [B, L, H] -> [B, heads, L, head_dim]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, q, ctx, key_mask):
        out = attention(self.split(self.query(q)), self.split(self.key(ctx)), self.split(self.value(ctx)),
                        additive_mask(key_mask, q.dtype), self.dropout, self.training)
        out = out.transpose(1, 2).reshape(q.shape)
        # With every key masked, -10000 everywhere would give a uniform average over padding: zero it instead.
        return out * key_mask.any(dim=1).to(out.dtype)[:, None, None]


class PooledModality(nn.Module):
    """Attention pooling of one modality's sequence, then dropout+LayerNorm; an exact zero vector for a clip
    without that modality (LayerNorm(0) would be its bias: a learned constant that would look like evidence).
    Used by HCA's branches' and by the simpler trunks."""

    def __init__(self, hidden: int, c: HCAConfig):
        super().__init__()
        self.pool = AttentionPooling(hidden)
        self.pool_dropout = Dropout(c.pool_dropout)
        self.pool_norm = nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, h, mask):
        pooled, _ = self.pool(h, mask)
        present = mask.any(dim=1).to(pooled.dtype)[:, None]
        return self.pool_norm(self.pool_dropout(pooled)) * present


class Branch(PooledModality):
    """query <- context 1, then <- context 2 (one attention module shared by both steps, as the original),
    dropout+LayerNorm after each step, + query; then attention pooling, dropout+LayerNorm (PooledModality:
    an exact zero vector for a clip without the query modality, so that an absent or switched-off modality
    is the same thing for the heads whatever the training did)."""

    def __init__(self, c: HCAConfig):
        super().__init__(c.hidden, c)
        self.attn = CrossAttention(c.hidden, c.xattn_heads, c.xattn_dropout)
        self.norm1 = nn.LayerNorm(c.hidden, eps=1e-5)
        self.norm2 = nn.LayerNorm(c.hidden, eps=1e-5)
        self.step_dropout = Dropout(c.step_dropout)

    def forward(self, q, q_mask, ctx1, mask1, ctx2, mask2, return_sequence=False):
        x = self.norm1(self.step_dropout(self.attn(q, ctx1, mask1)))
        x = self.norm2(self.step_dropout(self.attn(x, ctx2, mask2)))
        out = super().forward(x + q, q_mask)
        return (out, x + q) if return_sequence else out


def reverse_within_length(x, lengths):
    """Reverse each sequence of x [B, S, D] within its own length; padding stays in place. Its own inverse."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, idx[..., None].expand_as(x))


def run_bilstm(lstm: nn.LSTM, x, mask):
    """Run a batch_first bidirectional nn.LSTM so that every sequence gives what it would give alone
    (the result of packed sequences): padding never reaches a real position. Outputs at padding are zero.

    On CPU, pack_padded_sequence is slow (the packed kernel steps through time with ragged batches: 3x
    the cost of the padded kernel for the audio LSTM). Padding at the end is harmless to the forward
    direction; the backward direction instead reads each sequence reversed within its length, so that its
    padding also comes last. Each layer then runs two one-direction calls of the fast padded kernel with
    the nn.LSTM's own weights (same parameter names as nn.LSTM, so original checkpoints load)."""
    if x.device.type != "cpu":  # cuDNN runs packed sequences efficiently
        return packed_bilstm(lstm, x, mask)
    B, S, _ = x.shape
    lengths = mask.sum(dim=1)
    keep = mask[..., None].to(x.dtype)
    if lstm.dropout or not (lstm.bidirectional and lstm.batch_first and lstm.bias) or lstm.proj_size:
        raise ValueError("run_bilstm expects a batch_first bidirectional nn.LSTM with biases, no dropout, no projection")
    h0 = x.new_zeros(1, B, lstm.hidden_size)
    for layer in range(lstm.num_layers):
        outs = []
        for suffix in ("", "_reverse"):
            weights = [getattr(lstm, f"{name}_l{layer}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            inp = x if not suffix else reverse_within_length(x, lengths)
            # torch.lstm is the kernel nn.LSTM itself calls: (input, (h0, c0), weights, has_biases, num_layers,
            # dropout, train, bidirectional, batch_first)
            out = torch.lstm(inp, (h0, h0), weights, True, 1, 0.0, lstm.training, False, True)[0]
            outs.append(out if not suffix else reverse_within_length(out, lengths))
        x = torch.cat(outs, dim=-1)
    return x * keep


def packed_bilstm(lstm: nn.LSTM, x, mask):
    """run_bilstm's path off the CPU: the nn.LSTM on packed sequences (cuDNN), outputs at padding zeroed.
    It runs on CPU too, where tests/test_model.py holds it equal to the padded path and to each sequence alone."""
    lengths = mask.sum(dim=1)
    # pack needs lengths >= 1: an absent modality runs on one zero segment, then is zeroed below
    packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
    out, _ = pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=x.shape[1])
    return out * mask[..., None].to(x.dtype)


_CPU_BF16_LSTM = {}  # cached probe result: None where it works, else the error


def cpu_bf16_lstm_problem():
    """None when this CPU runs the bf16 LSTM under autocast, else why not. oneDNN's bf16 LSTM needs
    AVX512-BF16 or AMX; on other processors (e.g. AVX2 only) it fails to create its kernel."""
    if "result" not in _CPU_BF16_LSTM:
        lstm = nn.LSTM(4, 2, batch_first=True, bidirectional=True)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lstm(torch.zeros(1, 2, 4))
            _CPU_BF16_LSTM["result"] = None
        except RuntimeError as e:
            _CPU_BF16_LSTM["result"] = str(e).split(". ")[0]
    return _CPU_BF16_LSTM["result"]


class SequenceEncoder(nn.Module):
    """Video or audio: 2-layer BiLSTM (padding-exact) -> dropout+LayerNorm -> Linear+LayerNorm+Dropout."""

    def __init__(self, in_dim: int, c: HCAConfig):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, c.lstm_hidden, num_layers=c.lstm_layers, bidirectional=True, batch_first=True)
        self.lstm_dropout = Dropout(c.lstm_dropout)
        self.lstm_norm = nn.LayerNorm(2 * c.lstm_hidden, eps=1e-5)
        self.proj = nn.Linear(2 * c.lstm_hidden, c.hidden)
        self.proj_norm = nn.LayerNorm(c.hidden, eps=1e-5)
        self.proj_dropout = Dropout(c.proj_dropout)

    def forward(self, x, mask):
        S = x.shape[1]
        lengths = mask.sum(dim=1)
        if not torch.equal(mask, torch.arange(S, device=mask.device)[None, :] < lengths[:, None]):
            raise ValueError("segment masks must be True on a prefix (real segments first, then padding)")
        # Zero the padding (torch.where, not a product, so that NaN/Inf garbage cannot leak in).
        x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        out = self.lstm_norm(self.lstm_dropout(run_bilstm(self.lstm, x, mask)))
        return self.proj_dropout(self.proj_norm(self.proj(out)))


def make_head(in_dim: int, c: HCAConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, c.head_hidden), nn.ReLU(), Dropout(c.head_dropout),
                         nn.Linear(c.head_hidden, 2))


# ---------------------------------------------------------------------------------------------------------
class MultiTaskModel(nn.Module):
    """What every trunk shares: one head per task on the fused vector, the effective modality masks and the
    parameter groups the strategies use. A trunk subclass builds its modules, sets `fused_dim` and
    `slots` (the modalities of the H-wide slots of `fused`, in order; None when fused is not made of
    per-modality slots) and implements `trunk` and `last_shared_parameters`.

    The interface a strategy (common/train.py, common/multitask.py) relies on:
      trunk(batch, active_modalities=None, return_sequences=False) -> fused [B, fused_dim]
          (with return_sequences also {modality: [B, L, H]}, the per-position outputs the pretraining heads read)
      classify(fused) -> logits [B, T, 2];  forward(batch, active_modalities) = classify(trunk(batch))
      heads[task], shared_parameters(), head_parameters(), last_shared_parameters(), parameter_counts()"""

    trunk_name = "?"
    modalities = MODALITIES  # the modalities the trunk reads

    def __init__(self, config: HCAConfig, tasks=TASKS):
        super().__init__()
        self.config = config
        self.tasks = tuple(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct and non-empty, got {self.tasks}")

    def _make_heads(self, fused_dim: int):
        self.fused_dim = fused_dim
        self.heads = nn.ModuleDict({t: make_head(fused_dim, self.config) for t in self.tasks})

    # ----- forward ------------------------------------------------------------------------------------------
    def effective_masks(self, batch, active_modalities=None) -> dict:
        """Per modality, the mask actually used: batch mask AND present flag AND switched on."""
        active = set(MODALITIES) if active_modalities is None else set(active_modalities)
        if not active <= set(MODALITIES):
            raise ValueError(f"active_modalities {sorted(active)} must be a subset of {MODALITIES}")
        for key in ("text_ids", "text_mask", "video", "video_mask", "audio", "audio_mask", "present"):
            if key not in batch:
                raise KeyError(f"batch has no {key!r} (keys: {sorted(batch)})")
        masks = {}
        for i, m in enumerate(MODALITIES):
            mask = batch[f"{m}_mask"].bool() & batch["present"][:, i : i + 1].bool()
            masks[m] = mask if m in active else torch.zeros_like(mask)
        return masks

    def trunk(self, batch, active_modalities=None, return_sequences=False):
        raise NotImplementedError

    def classify(self, fused) -> torch.Tensor:
        """fused [B, fused_dim] -> logits [B, T, 2], tasks in the order of self.tasks."""
        return torch.stack([self.heads[t](fused) for t in self.tasks], dim=1)

    def forward(self, batch, active_modalities=None) -> torch.Tensor:
        return self.classify(self.trunk(batch, active_modalities))

    # ----- parameter groups ---------------------------------------------------------------------------------
    def shared_parameters(self) -> list:
        """Every trunk parameter (everything except the heads)."""
        return [p for n, p in self.named_parameters() if not n.startswith("heads.")]

    def head_parameters(self) -> list:
        return list(self.heads.parameters())

    def last_shared_parameters(self) -> list:
        """The last layer shared by all heads (GradNorm measures per-task gradient norms here)."""
        raise NotImplementedError

    def parameter_counts(self) -> dict:
        counts = {name: sum(p.numel() for p in module.parameters()) for name, module in self.named_children()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts


class HCAModel(MultiTaskModel):
    """Hierarchical cross-attention model with one head per task. See the module docstring for the data flow."""

    trunk_name = "hca"

    def __init__(self, config: HCAConfig, tasks=TASKS, text_encoder=None, grad_checkpointing=False):
        super().__init__(config, tasks)
        if sorted(b[0] for b in config.branches) != sorted(MODALITIES) or \
                any(sorted(b) != sorted(MODALITIES) for b in config.branches):
            raise ValueError(f"config.branches must give each modality one branch over the other two: {config.branches}")
        self.text_encoder = build_text_encoder(config, text_encoder, grad_checkpointing)
        self.video_encoder = SequenceEncoder(config.video_dim, config)
        self.audio_encoder = SequenceEncoder(config.audio_dim, config)
        self.branches = nn.ModuleDict({b[0]: Branch(config) for b in config.branches})
        self.slots = config.slot_order
        self._make_heads(3 * config.hidden)

    def trunk(self, batch, active_modalities=None, return_sequences=False):
        """Text encoder, BiLSTMs, hierarchical cross-attention and pooling, once: fused [B, 3*hidden].
        With return_sequences, also {modality: [B, L, hidden]}, each branch's output before pooling
        (the pretraining heads predict masked tokens and segments from them)."""
        masks = self.effective_masks(batch, active_modalities)
        seqs = {"text": encode_text(self.text_encoder, batch["text_ids"], masks["text"]),
                "video": self.video_encoder(batch["video"], masks["video"]),
                "audio": self.audio_encoder(batch["audio"], masks["audio"])}
        outs = [self.branches[q](seqs[q], masks[q], seqs[c1], masks[c1], seqs[c2], masks[c2], return_sequence=True)
                for q, c1, c2 in self.config.branches]
        fused = torch.cat([pooled for pooled, _ in outs], dim=-1)
        if return_sequences:
            return fused, {q: seq for (q, _, _), (_, seq) in zip(self.config.branches, outs)}
        return fused

    def last_shared_parameters(self) -> list:
        """The three LayerNorms after attention pooling (their outputs are concatenated into `fused`, which
        every head reads)."""
        return [p for b in self.branches.values() for p in b.pool_norm.parameters()]


# ---------------------------------------------------------------------------------------------------------
