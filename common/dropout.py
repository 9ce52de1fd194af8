"""Dropout with a cheaper random mask on CPU, for every trunk and inside the transformers text encoder.

PyTorch's CPU dropout draws one random float per element (~13 ns each on the 2-core machine) and its
backward is slow too: inside BERT's attention (the probabilities, [B, heads, L, L]) it was about a fifth of
a small-model training step. Here one random 64-bit integer gives the random bytes of eight elements; an
element is dropped when its byte is below round(256 p), so p is rounded to a multiple of 1/256 (0.1 ->
0.1016, 0.2 -> 0.1992, 0.3 -> 0.3008) and kept values are scaled by 1 / (1 - that p): the expectation is
unchanged. The 64-bit integers are the SplitMix64 stream of a seed drawn from torch's CPU generator, so
torch.manual_seed, the checkpointed RNG state and gradient checkpointing (which replays the RNG) reproduce
the masks. The compiled kernel (csrc/dropout_cpu.cpp, one pass, a 1-byte mask kept for the backward) and
the PyTorch fallback used where it is not built give bit-identical results. Other devices use F.dropout.

    dropout(x, p, training)      the function; Dropout(p) the module (no parameters: state dicts unchanged)
    attention(q, k, v, ...)      softmax attention with dropout on the probabilities (our trunks)
    use_cheap_dropout(encoder)   a transformers encoder's nn.Dropout modules and its attention-probability
                                 dropout switched to `dropout` (text_encoder.build_text_encoder calls it)
    with stock_dropout(): ...    F.dropout everywhere within the block (the bench's original-like baseline)
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

from common.gradagg import load_built_module

_STOCK = False  # True inside stock_dropout()
ATTN_IMPLEMENTATION = "sdpa_cheap_dropout"  # the name registered with transformers' AttentionInterface


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout with the cheaper random mask on CPU (see the module docstring)."""
    if not training or p == 0.0:
        return x
    k = round(p * 256)
    if _STOCK or x.device.type != "cpu" or k == 0 or k >= 256:
        return F.dropout(x, p, True)
    scale = 256.0 / (256 - k)
    seed = int(torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64).item())
    if _EXT is not None and x.dtype in _KERNEL_DTYPES:
        return _KernelDropout.apply(x, k, scale, seed)
    keep = random_bytes(x.numel(), seed).view(x.shape) >= k
    return torch.where(keep, x * scale, 0.0)


# SplitMix64 (Steele, Lea and Flood 2014): output w = mix(seed + (w + 1) * golden), all mod 2**64
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _int64(u):
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


def _shift_right(z, k):  # logical shift of int64 values (>> is arithmetic)
    return (z >> k) & ((1 << (64 - k)) - 1)


def random_bytes(n: int, seed: int) -> torch.Tensor:
    """The first n random bytes of the SplitMix64 stream of `seed` (int64), as csrc/dropout_cpu.cpp draws
    them: byte i is byte i % 8 (least significant first) of output i // 8. int64 arithmetic wraps."""
    if sys.byteorder != "little":
        raise RuntimeError("common.dropout.random_bytes assumes a little-endian machine")
    z = torch.arange(1, (n + 7) // 8 + 1, dtype=torch.int64) * _int64(_GOLDEN) + seed
    z = (z ^ _shift_right(z, 30)) * _int64(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _int64(_MIX2)
    z = z ^ _shift_right(z, 31)
    return z.view(torch.uint8)[:n]


class _KernelDropout(torch.autograd.Function):
    """csrc/dropout_cpu.cpp: y and a bool keep mask in one pass. The backward reads the 1-byte mask with
    torch ops (as fast as a kernel, and vmap can batch them: common/gradagg.py's batched backward)."""

    @staticmethod
    def forward(ctx, x, threshold, scale, seed):
        y, keep = _EXT.forward(x, threshold, scale, seed)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0.0), None, None, None


def load_kernel():
    """(Re)load the compiled kernel (csrc/build/dropout/_dropout.so, `make build`); None where not built."""
    global _EXT
    _EXT = load_built_module("_dropout", "dropout", ["dropout_cpu.cpp"])
    return _EXT


_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_EXT = None
load_kernel()


@contextlib.contextmanager
def stock_dropout():
    """Within the block every `dropout` (and so every Dropout and `attention`) is PyTorch's F.dropout."""
    global _STOCK
    saved, _STOCK = _STOCK, True
    try:
        yield
    finally:
        _STOCK = saved


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
    if not training or p == 0.0 or q.device.type != "cpu" or _STOCK:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=add_mask, dropout_p=p if training else 0.0)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if add_mask is not None:
        scores = scores + add_mask
    return torch.matmul(dropout(torch.softmax(scores, dim=-1), p, True), v)


# --------------------------------------------------------------------------------- transformers encoders
def _sdpa_cheap_dropout(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        **kwargs):
    """transformers' SDPA attention, except that with dropout on CPU the probabilities are dropped by the
    cheap `dropout` (explicit matmuls, as SDPA's own math path). Without dropout (evaluation), on other
    devices and for what the explicit path does not handle (grouped KV heads, causal masks, position bias,
    returned weights) it is transformers' sdpa_attention_forward itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    unsupported = (causal or getattr(module, "num_key_value_groups", 1) > 1
                   or kwargs.get("position_bias") is not None or kwargs.get("output_attentions"))
    if dropout == 0.0 or query.device.type != "cpu" or _STOCK or unsupported:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale            # [B, heads, Lq, Lk]
    empty_rows = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:   # True = attend (transformers' sdpa mask)
            scores = scores.masked_fill(~attention_mask, float("-inf"))
            empty_rows = ~attention_mask.any(dim=-1, keepdim=True)
        else:                                    # additive float mask
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    if empty_rows is not None and bool(empty_rows.any()):
        probs = probs.masked_fill(empty_rows, 0.0)  # SDPA gives such a row zeros, not NaN
    out = torch.matmul(_dropout_fn(probs, dropout), value)
    return out.transpose(1, 2).contiguous(), None


def _dropout_fn(x, p):  # `dropout` is a float argument inside _sdpa_cheap_dropout (transformers' name)
    return dropout(x, p, True)


def _register_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTN_IMPLEMENTATION, _sdpa_cheap_dropout)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # masks exactly as for "sdpa"


def use_cheap_dropout(encoder: nn.Module) -> nn.Module:
    """Switch a transformers encoder to the cheap dropout: each nn.Dropout module becomes Dropout (same p),
    and an encoder on SDPA attention moves to the registered sdpa_cheap_dropout (the same attention, with
    its probability dropout through `dropout`). Encoders on other attention keep their own."""
    for parent in list(encoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p))
    config = getattr(encoder, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        _register_attention()
        for sub in encoder.modules():   # the config object is shared by every layer
            sub_config = getattr(sub, "config", None)
            if sub_config is not None and getattr(sub_config, "_attn_implementation", None) == "sdpa":
                sub_config._attn_implementation = ATTN_IMPLEMENTATION
    return encoder
