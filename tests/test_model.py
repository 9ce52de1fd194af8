"""Tests of common/model.py (HCA) on the tiny configuration with hand-made random batches. The text encoder's
own tests: tests/test_text_encoder.py; the other trunks: tests/test_trunks.py."""
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data import MODALITIES, TASKS  # noqa: E402
from common.dropout import attention, dropout, stock_dropout  # noqa: E402
from common.checkpoints import ORIGINAL_NAME_MAP, load_original_checkpoint  # noqa: E402
from common.model import CrossAttention, HCAModel, MODEL_SIZES, masked_softmax, packed_bilstm, run_bilstm  # noqa: E402

TINY = MODEL_SIZES["tiny"]
H = TINY.hidden


def make_batch(lengths, pad=(0, 0, 0), seed=0, garbage=0.0):
    """Batch in the contract's format. lengths: per clip (text, video, audio) lengths, 0 = absent.
    pad: extra padded positions beyond the longest item; garbage: scale of the values put in padded slots
    (0 = pad id 0 and zero features). The real values depend only on lengths and seed, not on pad/garbage."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    Lt, Sv, Sa = (max(1, max(l[i] for l in lengths)) for i in range(3))
    ids = torch.randint(1000, 2000, (B, Lt), generator=g)
    video = torch.randn(B, Sv, TINY.video_dim, generator=g)
    audio = torch.randn(B, Sa, TINY.audio_dim, generator=g)
    labels = torch.randint(0, 2, (B, len(TASKS)), generator=g)
    # append the extra padding, then overwrite every padded slot
    g = torch.Generator().manual_seed(seed + 1000)
    ids = torch.cat([ids, torch.zeros(B, pad[0], dtype=ids.dtype)], dim=1)
    video = torch.cat([video, torch.zeros(B, pad[1], TINY.video_dim)], dim=1)
    audio = torch.cat([audio, torch.zeros(B, pad[2], TINY.audio_dim)], dim=1)
    lt, sv, sa = (torch.tensor([l[i] for l in lengths]) for i in range(3))
    mask = lambda S, n: torch.arange(S)[None, :] < n[:, None]  # noqa: E731
    batch = dict(text_mask=mask(ids.shape[1], lt), video_mask=mask(video.shape[1], sv),
                 audio_mask=mask(audio.shape[1], sa), present=torch.stack([lt > 0, sv > 0, sa > 0], dim=1),
                 labels=labels)
    gids = torch.randint(1, 5000, ids.shape, generator=g) if garbage else torch.zeros_like(ids)
    batch["text_ids"] = torch.where(batch["text_mask"], ids, gids)
    batch["video"] = torch.where(batch["video_mask"][..., None], video, garbage * torch.randn(video.shape, generator=g))
    batch["audio"] = torch.where(batch["audio_mask"][..., None], audio, garbage * torch.randn(audio.shape, generator=g))
    return batch


def real_part(batch, i):
    """Clip i of a batch alone, cut to its own lengths (at least 1 position per modality)."""
    out = {}
    for m, key in (("text", "text_ids"), ("video", "video"), ("audio", "audio")):
        n = max(1, int(batch[f"{m}_mask"][i].sum()))
        out[key] = batch[key][i : i + 1, :n].clone()
        out[f"{m}_mask"] = batch[f"{m}_mask"][i : i + 1, :n].clone()
    out["present"] = batch["present"][i : i + 1]
    out["labels"] = batch["labels"][i : i + 1]
    return out


def tiny_model(seed=0, tasks=TASKS):
    torch.manual_seed(seed)
    return HCAModel(TINY, tasks=tasks).eval()


LENGTHS = [(9, 5, 7), (4, 3, 2), (12, 6, 8), (6, 1, 0), (7, 0, 5)]


def test_output_shapes_and_task_order():
    model = tiny_model()
    batch = make_batch(LENGTHS)
    fused = model.trunk(batch)
    logits = model(batch)
    assert fused.shape == (len(LENGTHS), 3 * H)
    assert logits.shape == (len(LENGTHS), len(TASKS), 2)
    assert torch.isfinite(logits).all()
    fused2, seqs = model.trunk(batch, return_sequences=True)  # the branch outputs before pooling (pretraining)
    assert torch.equal(fused2, fused)
    assert {m: s.shape for m, s in seqs.items()} == {m: (*batch[f"{m}_mask"].shape, H) for m in MODALITIES}
    # task t's logits come from head t, in the order of model.tasks
    sub = HCAModel(TINY, tasks=("gory", "binary")).eval()
    sub.load_state_dict(model.state_dict(), strict=False)
    assert torch.allclose(sub(batch), logits[:, [TASKS.index("gory"), TASKS.index("binary")]])


def test_padding_changes_nothing():
    model = tiny_model()
    base = make_batch(LENGTHS, seed=1)
    padded = make_batch(LENGTHS, seed=1, pad=(7, 4, 5), garbage=100.0)
    garbage2 = make_batch(LENGTHS, seed=1, pad=(7, 4, 5), garbage=-3.0)
    with torch.no_grad():
        ref = model(base)
        assert not torch.equal(padded["video"][:, -1], garbage2["video"][:, -1])  # the garbage really differs
        assert torch.allclose(model(padded), ref, atol=1e-5)
        assert torch.allclose(model(garbage2), ref, atol=1e-5)
        # each clip alone, cut to its own length, gives the same logits as in the batch
        for i in range(len(LENGTHS)):
            assert torch.allclose(model(real_part(base, i)), ref[i : i + 1], atol=1e-5), f"clip {i}"


def test_non_finite_garbage_in_padding_is_ignored():
    model = tiny_model()
    batch = make_batch(LENGTHS, seed=2, pad=(0, 2, 2))
    ref = model(batch)
    batch["video"][~batch["video_mask"]] = float("nan")
    batch["audio"][~batch["audio_mask"]] = float("inf")
    assert torch.allclose(model(batch), ref, atol=1e-6)


def test_absent_modality_is_exactly_excluded():
    model = tiny_model()
    batch = make_batch(LENGTHS, seed=3)
    i = 4  # clip 4 has no video
    assert not batch["present"][i, 1] and not batch["video_mask"][i].any()
    fused = model.trunk(batch)
    assert torch.isfinite(fused).all()
    video_part = slice(2 * H, 3 * H)  # branches are concatenated text, audio, video
    assert torch.equal(fused[i, video_part], torch.zeros(H))
    assert fused[0, video_part].abs().sum() > 0
    changed = {k: v.clone() for k, v in batch.items()}
    changed["video"][i] = 1e3 * torch.randn_like(changed["video"][i])
    assert torch.allclose(model(changed)[i], model(batch)[i], atol=1e-6)
    # a present flag of False masks the modality even when its mask says otherwise
    flagged = {k: v.clone() for k, v in batch.items()}
    flagged["present"][0, 2] = False
    no_audio = {k: v.clone() for k, v in batch.items()}
    no_audio["present"][0, 2] = False
    no_audio["audio_mask"][0] = False
    assert torch.allclose(model(flagged)[0], model(no_audio)[0], atol=1e-6)


def test_switching_a_modality_off_equals_absent():
    model = tiny_model()
    batch = make_batch(LENGTHS, seed=4)
    for off in MODALITIES:
        absent = {k: v.clone() for k, v in batch.items()}
        absent[f"{off}_mask"][:] = False
        absent["present"][:, MODALITIES.index(off)] = False
        active = [m for m in MODALITIES if m != off]
        switched = model(batch, active_modalities=active)
        assert torch.allclose(switched, model(absent), atol=1e-6), off
        assert not torch.allclose(switched, model(batch), atol=1e-3), off
    text_only = model.trunk(batch, active_modalities=["text"])
    assert torch.equal(text_only[:, H:], torch.zeros(len(LENGTHS), 2 * H))  # audio and video branches: zero
    with pytest.raises(ValueError, match="subset"):
        model(batch, active_modalities=["text", "smell"])


def pooling_original_formula(scores, mask):
    """The original code's pooling weights (Attention.forward): exp(score) * mask / (sum + 1e-10), no max
    subtraction. Kept here only to show the hazard our masked softmax removes."""
    alpha = mask * torch.exp(scores) + 1e-10
    return mask * (alpha / alpha.sum(dim=-1, keepdim=True))


def test_pooling_is_finite_where_the_original_overflows():
    scores = torch.tensor([[1e4, 1e4 - 1.0, 3.0, 0.0], [100.0, -50.0, 2.0, 5.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    ours = masked_softmax(scores, mask)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours.sum(dim=1), torch.ones(2))
    assert torch.equal(ours[~mask], torch.zeros(int((~mask).sum())))
    assert torch.allclose(ours[0, :2], torch.softmax(torch.tensor([1.0, 0.0]), 0))
    original = pooling_original_formula(scores, mask.float())
    assert not torch.isfinite(original).all()  # exp(1e4) = inf, inf/inf = NaN


def test_all_masked_row_gives_zero_weights_and_finite_grads():
    scores = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[True] * 5, [False] * 5, [True, True, False, False, False]])
    w = masked_softmax(scores, mask)
    assert torch.equal(w[1], torch.zeros(5))
    assert torch.allclose(w.sum(dim=1), torch.tensor([1.0, 0.0, 1.0]))
    (w * torch.randn(3, 5)).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert torch.equal(scores.grad[1], torch.zeros(5))


def test_cross_attention_with_all_keys_masked_gives_zero_context():
    torch.manual_seed(0)
    attn = CrossAttention(H, 2, dropout=0.0).eval()
    q, ctx = torch.randn(2, 4, H), torch.randn(2, 3, H)
    key_mask = torch.tensor([[True, True, False], [False, False, False]])
    out = attn(q, ctx, key_mask)
    assert torch.equal(out[1], torch.zeros(4, H))
    assert out[0].abs().sum() > 0
    # the visible keys alone give the same context as the masked set
    assert torch.allclose(out[0], attn(q[:1], ctx[:1, :2], key_mask[:1, :2])[0], atol=1e-6)


def test_attention_helper_matches_the_formula_and_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    add = torch.zeros(2, 1, 1, 5)
    add[1, ..., 3:] = -10000.0
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5 + add, dim=-1) @ v
    assert torch.allclose(attention(q, k, v, add, 0.1, training=False), ref, atol=1e-5)
    # training with dropout: the explicit path, which does drop probabilities
    torch.manual_seed(1)
    out = attention(q, k, v, add, 0.5, training=True)
    assert out.shape == ref.shape and not torch.allclose(out, ref, atol=1e-3)


def test_cheap_dropout_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = dropout(x, 0.1, training=True)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 26 / 256) < 0.005  # p rounded to a multiple of 1/256
    assert abs(y.mean().item() - 1.0) < 0.01
    assert torch.equal(dropout(x, 0.1, training=False), x)


def test_stock_dropout_is_pytorchs():
    x = torch.randn(1000)
    torch.manual_seed(3)
    ref = torch.nn.functional.dropout(x, 0.1, True)
    with stock_dropout():
        torch.manual_seed(3)
        assert torch.equal(dropout(x, 0.1, True), ref)
    torch.manual_seed(3)
    assert not torch.equal(dropout(x, 0.1, True), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dropout_kernel_and_torch_fallback_are_bit_identical(dtype):
    """csrc/dropout_cpu.cpp and common/dropout.py's torch ops draw the same SplitMix64 mask: same outputs
    and gradients bit for bit, so a machine without the build trains the same model."""
    import common.dropout as cd
    if cd._EXT is None:
        pytest.skip("the dropout kernel is not built (make build)")
    x = torch.randn(3, 7, 1001, dtype=dtype, generator=torch.Generator().manual_seed(0))
    outs = []
    for ext in (cd._EXT, None):
        saved, cd._EXT = cd._EXT, ext
        try:
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(5)
            y = dropout(xi, 0.1, True)
            (y * torch.arange(y.numel(), dtype=dtype).view_as(y)).sum().backward()
            outs.append((y.detach(), xi.grad))
        finally:
            cd._EXT = saved
    (y_kernel, g_kernel), (y_torch, g_torch) = outs
    assert torch.equal(y_kernel, y_torch) and torch.equal(g_kernel, g_torch)
    assert 0.08 < (y_kernel == 0).double().mean().item() < 0.12


def test_bilstm_equals_packed_sequences():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(4, 7, 6)
    lengths = torch.tensor([7, 3, 1, 0])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    packed = pack_padded_sequence(x, lengths.clamp(min=1), batch_first=True, enforce_sorted=False)
    ref, _ = pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=7)
    ours = run_bilstm(lstm, x, mask)
    assert torch.allclose(ours[mask], ref[mask], atol=1e-6)
    assert torch.equal(ours[~mask], torch.zeros(int((~mask).sum()), 10))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_packed_branch_is_padding_exact(device):
    """The branch run_bilstm takes off the CPU (packed sequences: cuDNN on a GPU) gives each sequence what it
    gives alone, zeros at padding and for an absent modality (length 0), and the padded CPU path's outputs
    and gradients (issue 28: no test ran that branch). On CPU the same code runs PyTorch's packed kernel."""
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(4, 7, 6)
    lengths = torch.tensor([7, 3, 1, 0])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    lstm_d = torch.nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True).to(device)
    lstm_d.load_state_dict(lstm.state_dict())
    xd = x.clone().to(device).requires_grad_()
    out = packed_bilstm(lstm_d, xd, mask.to(device))
    for b in range(4):
        n = int(lengths[b])
        alone = lstm(x[b:b + 1, :n])[0][0] if n else torch.zeros(0, 10)
        assert torch.allclose(out[b, :n].cpu(), alone, atol=1e-5), b
        assert torch.equal(out[b, n:].detach().cpu(), torch.zeros(7 - n, 10)), b
    xc = x.clone().requires_grad_()
    padded = run_bilstm(lstm, xc, mask)
    assert torch.allclose(out.detach().cpu(), padded.detach(), atol=1e-5)
    (out.pow(2).sum()).backward()
    padded.pow(2).sum().backward()
    assert torch.allclose(xd.grad.cpu(), xc.grad, atol=1e-5)
    assert torch.equal(xd.grad[3].cpu(), torch.zeros(7, 6))   # an absent modality's input gets no gradient


def test_segment_mask_must_be_a_prefix():
    model = tiny_model()
    batch = make_batch(LENGTHS)
    batch["video_mask"][0, 0] = False  # a hole before real segments
    with pytest.raises(ValueError, match="prefix"):
        model(batch)


def test_backward_gives_finite_grads_for_all_shared_params():
    torch.manual_seed(0)
    model = HCAModel(TINY).train()
    batch = make_batch(LENGTHS, seed=5)
    logits = model(batch)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), batch["labels"].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert all(p.grad.abs().sum() > 0 for p in model.last_shared_parameters())


def test_parameter_groups_partition_the_model():
    model = tiny_model()
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    shared, heads, last = ids(model.shared_parameters()), ids(model.head_parameters()), ids(model.last_shared_parameters())
    assert shared.isdisjoint(heads)
    assert shared | heads == ids(model.parameters())
    assert len(shared) + len(heads) == len(list(model.parameters()))
    assert last <= shared and len(last) == 6  # weight and bias of the three pooling LayerNorms
    counts = model.parameter_counts()
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    with torch.device("meta"):  # full size without allocating: its BERT is BERT-base-cased minus the pooler
        full = HCAModel(MODEL_SIZES["full"])
    assert full.parameter_counts()["text_encoder"] + 768 * 768 + 768 == 108_310_272


def to_original_names(state):
    """Our state dict under the original code's names (inverse of ORIGINAL_NAME_MAP); heads dropped."""
    inverse = {ours: orig for orig, ours in ORIGINAL_NAME_MAP.items()}
    out = {}
    for k, v in state.items():
        for ours, orig in inverse.items():
            if k.startswith(ours):
                out[orig + k[len(ours):]] = v
                break
    return out


def test_original_checkpoint_loads_through_the_name_map(tmp_path, capsys):
    source = tiny_model(seed=1)
    original = to_original_names(source.state_dict())
    assert not any(k.startswith("heads.") for k in original)
    assert "features.1.weight_ih_l0_reverse" in original and "features.16.v" in original
    original["img_audio_text_linear_mature.0.weight"] = torch.zeros(200, 3 * H)  # their head: not ours
    original["features.0.embeddings.position_ids"] = torch.arange(TINY.max_positions)[None]
    target = tiny_model(seed=2)
    batch = make_batch(LENGTHS, seed=6)
    assert not torch.allclose(target.trunk(batch), source.trunk(batch), atol=1e-3)
    path = tmp_path / "best_pretrain_matching.pth"
    torch.save({"model_state": original, "epoch": 3}, path)
    missing, unexpected = load_original_checkpoint(target, path, show_map=True)
    assert [k for k in missing if not k.startswith("heads.")] == []
    assert set(missing) == {k for k in target.state_dict() if k.startswith("heads.")}
    assert unexpected == ["img_audio_text_linear_mature.0.weight"]
    assert torch.allclose(target.trunk(batch), source.trunk(batch), atol=1e-6)
    assert "features.0." in capsys.readouterr().out  # the map was printed
    # a raw state dict with a vocabulary of another size: reported, not loaded, no crash
    original["features.0.embeddings.word_embeddings.weight"] = torch.zeros(30522, H)
    missing, _ = load_original_checkpoint(tiny_model(), original, verbose=False)
    assert "text_encoder.embeddings.word_embeddings.weight" in missing
    with pytest.raises(ValueError, match="not a state dict"):
        load_original_checkpoint(target, {"model_state": {"x": "not a tensor"}})
