"""A training step that processes a batch the way the original HICCAP code does, on this project's model
(same weights, same clips), as the baseline of `make bench` (tests/bench/bench.py):

  - text padded (or cut) to 500 tokens, and the text encoder called with an all-ones mask (the original
    calls BERT without one, so padding tokens are attended to; an all-ones mask computes the same);
  - video and audio run through the padded nn.LSTM as the original calls it, `lstm(x)` on the zero
    padding, no packing and no reversal within each length (so the backward direction starts in the padding);
  - every mask all ones (the original's attention pooling pools padding too);
  - BCE on softmax probabilities (one-hot targets), summed over the tasks;
  - PyTorch's own dropout (F.dropout, SDPA's dropout), as the original uses; this project's cheaper CPU
    dropout (common/dropout.py) is switched off for the step (`stock_dropout`);
  - fp32, gradient clipping at 1.0 and Adam (PyTorch's default, unfused implementation).

The LSTM path is swapped by replacing common.model.run_bilstm for the duration of the step
(`original_lstm_path`); the model itself is not modified.
"""
import contextlib

import torch
import torch.nn.functional as F

import common.model as model_module
from common.dropout import stock_dropout
from common.data import collate

ORIGINAL_TEXT_LEN = 500


def _padded_lstm(lstm, x, mask):
    """nn.LSTM over the padded batch, as the original's `self.rnn_img(image_feats)`."""
    return lstm(x)[0]


@contextlib.contextmanager
def original_lstm_path():
    """Within the block, the model's BiLSTMs run as the original calls them (see the module docstring)."""
    saved = model_module.run_bilstm
    model_module.run_bilstm = _padded_lstm
    try:
        yield
    finally:
        model_module.run_bilstm = saved


def original_batch(items):
    """Items of H5Dataset -> a batch as the original feeds it: text padded to 500, all masks all ones."""
    batch = collate(items, pad_text_to=ORIGINAL_TEXT_LEN)
    for key in ("text_mask", "video_mask", "audio_mask", "present"):
        batch[key] = torch.ones_like(batch[key], dtype=torch.bool)
    return batch


def bce_on_softmax(logits, labels):
    """The original's loss: binary cross-entropy of the softmax probabilities against one-hot targets,
    summed over the tasks. logits [B, T, 2], labels [B, T] in {0, 1}."""
    probs = torch.softmax(logits.float(), dim=-1)
    target = F.one_hot(labels.long(), 2).to(probs.dtype)
    return F.binary_cross_entropy(probs, target, reduction="none").mean(dim=(0, 2)).sum()


def original_like_step(model, optimizer, batch, clip=1.0):
    """One training step (forward, backward, clip, Adam) of a batch made by original_batch. Returns the loss."""
    with original_lstm_path(), stock_dropout():
        loss = bce_on_softmax(model(batch), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.detach()
