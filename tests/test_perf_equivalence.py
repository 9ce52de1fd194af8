"""The speed-ups of issue 17 leave the results unchanged (tiny model, fp32):
batched per-task gradients equal the one-pass-per-task ones, evaluation under inference_mode with a larger
batch gives the same scores, and the original-like baseline of `make bench` computes what it claims."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gradagg as ga  # noqa: E402
from common.model import MODEL_SIZES, run_bilstm  # noqa: E402
from common.trunks import build_model  # noqa: E402
from common.data import collate  # noqa: E402
from common.objectives import losses_from_logits  # noqa: E402
from test_model import make_batch  # noqa: E402

LENGTHS = [(7, 5, 9), (3, 2, 4), (11, 6, 1), (5, 4, 8)]


def row_error(a, b):
    """||a - b|| / ||b|| of one task's flattened gradient (per parameter the relative error is meaningless
    where the true gradient is zero up to rounding, e.g. attention key biases)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def fill_both(model, losses):
    params = model.shared_parameters()
    loop, batched = ga.TaskGradBuffer(params, len(losses)), ga.TaskGradBuffer(params, len(losses), batched=True)
    loop.grads.fill_(3.0)
    batched.grads.fill_(3.0)  # stale values must be overwritten, inactive rows zeroed
    loop.fill_from_losses(losses)
    batched.fill_from_losses(losses)
    return loop, batched


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_batched_task_gradients_equal_one_pass_per_task(grad_checkpointing):
    torch.manual_seed(0)
    model = build_model(MODEL_SIZES["tiny"], grad_checkpointing=grad_checkpointing)
    batch = make_batch(LENGTHS)
    losses = list(losses_from_logits(model(batch), batch["labels"]))  # train mode: dropout drawn once
    losses[1] = None                     # a task switched off by a scheduler
    losses[3] = torch.tensor(0.0)        # a task absent from the batch (a constant loss)
    loop, batched = fill_both(model, losses)
    if grad_checkpointing:  # the recomputed forward draws dropout masks: random ops cannot run under vmap
        assert "random operations" in batched.batch_fallback
    else:
        assert batched.batch_fallback is None  # every op of this model has a batching rule
    for t in (0, 2, 4):
        assert loop.row(t).norm() > 0
        assert row_error(batched.row(t), loop.row(t)) < 1e-6, t
    for t in (1, 3):
        assert torch.count_nonzero(loop.row(t)) == 0 and torch.count_nonzero(batched.row(t)) == 0
    # the reference itself: plain autograd, one task at a time
    (g,) = [torch.autograd.grad(losses[2], model.shared_parameters(), retain_graph=True, allow_unused=True)]
    flat = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                      for x, p in zip(g, model.shared_parameters())])
    torch.testing.assert_close(loop.row(2), flat, rtol=0, atol=0)


class NoVmapScale(torch.autograd.Function):
    """x * 2 whose backward checks its gradient with .item() (data-dependent Python): cannot be batched."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        if not torch.isfinite(g).all().item():
            raise FloatingPointError("non-finite gradient")
        return g * 2


def test_batched_falls_back_to_one_pass_per_task(capsys):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 6)
    heads = [torch.nn.Linear(6, 1) for _ in range(3)]
    x = torch.randn(8, 4)
    h = NoVmapScale.apply(torch.tanh(trunk(x)))
    losses = [head(h).pow(2).mean() for head in heads]
    params = list(trunk.parameters())
    loop, batched = ga.TaskGradBuffer(params, 3), ga.TaskGradBuffer(params, 3, batched=True)
    loop.fill_from_losses(losses)
    batched.fill_from_losses(losses)
    assert batched.batch_fallback  # the reason is kept
    assert "one backward per task instead" in capsys.readouterr().err
    torch.testing.assert_close(batched.grads, loop.grads, rtol=0, atol=0)


def test_batched_with_no_active_task_zeroes_the_buffer():
    model = build_model(MODEL_SIZES["tiny"])
    tgb = ga.TaskGradBuffer(model.shared_parameters(), 2, batched=True)
    tgb.grads.fill_(1.0)
    tgb.fill_from_losses([None, None])
    assert torch.count_nonzero(tgb.grads) == 0


def test_original_like_baseline():
    """bench_original: text padded to 500 with all-ones masks, and the padded nn.LSTM; on sequences
    without padding that LSTM path gives what the model's padding-exact path gives."""
    from tests.bench.bench_original import bce_on_softmax, original_batch, original_lstm_path
    import common.model as model_module
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(5, 3, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 6, 5)
    full = torch.ones(2, 6, dtype=torch.bool)
    exact = run_bilstm(lstm, x, full)
    with original_lstm_path():
        torch.testing.assert_close(model_module.run_bilstm(lstm, x, full), exact, rtol=1e-5, atol=1e-6)
        partial = full.clone()
        partial[1, 4:] = False  # the padded LSTM reads the padding: its backward direction differs
        assert not torch.allclose(model_module.run_bilstm(lstm, x, partial)[1, :4], run_bilstm(lstm, x, partial)[1, :4])
    assert model_module.run_bilstm is run_bilstm  # restored
    items = [{"text": torch.arange(1, 9), "video": torch.randn(3, 1024), "audio": torch.randn(5, 128),
              "present": torch.tensor([True, True, False]), "labels": torch.tensor([1, 0, 0, 1, 0]),
              "index": 0, "clip_id": "a"}]
    batch = original_batch(items)
    assert batch["text_ids"].shape == (1, 500) and batch["text_mask"].all() and batch["present"].all()
    logits = torch.tensor([[[2.0, -1.0], [0.0, 0.0], [1.0, 1.0], [-3.0, 3.0], [0.5, 0.0]]])
    p = torch.softmax(logits, -1)[..., 1]
    y = batch["labels"].float()
    expected = -(y * p.log() + (1 - y) * (1 - p).log()).sum()  # BCE of a 2-class softmax = BCE of p1
    torch.testing.assert_close(bce_on_softmax(logits, batch["labels"]), expected[None].squeeze(), rtol=1e-6, atol=1e-6)


def test_predict_same_scores_whatever_the_eval_batch_size(tiny_data, tmp_path):
    """Run.predict batches clips in order of length: at batch 128 and 5 each row equals the clip's score
    alone (batch 1, no padding) and the rows come back in the dataset's order."""
    from common.arguments import build_parser
    from common.train import Run
    scores = []
    for size in (128, 5, 1):
        args = build_parser().parse_args(["--data", str(tiny_data), "--model-size", "tiny", "--out", str(tmp_path),
                                          "--quiet", "--eval-batch-size", str(size)])
        run = Run(args, strategy="perf_eval")
        scores.append(run.predict(run.val_set))
        assert torch.is_grad_enabled()  # predict leaves autograd as it found it
    for batched in scores[:2]:
        torch.testing.assert_close(torch.as_tensor(batched[0]), torch.as_tensor(scores[2][0]), rtol=1e-5, atol=1e-6)
        assert (batched[1] == scores[2][1]).all()
    lengths = run.val_set.text_lengths()
    assert (lengths[:-1] != lengths[1:]).any() and not (np.diff(lengths) >= 0).all()  # the order matters here
    expected = np.stack([run.objective.labels(collate([run.val_set[i]]))[0].numpy() for i in range(len(run.val_set))])
    assert (scores[2][1] == expected).all()
