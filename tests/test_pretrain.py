"""Pretraining tasks: negatives, the contrastive loss, masked scoring, and pretrain -> fine-tune."""
import math

import torch

from common.model import MODEL_SIZES
from common.pretrain import (MASK_ID, SWAP_AUDIO, SWAP_NONE, SWAP_TEXT, SWAP_VIDEO, PretrainHeads, corrupt, info_nce,
                             shifted_partner)
from common.arguments import build_parser
from common.train import Run


def make_batch(B=6, L=9, S=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"text_ids": ids, "text_mask": torch.ones(B, L, dtype=torch.bool),
            "video": torch.randn(B, S, 1024, generator=g), "video_mask": torch.ones(B, S, dtype=torch.bool),
            "audio": torch.randn(B, S, 128, generator=g), "audio_mask": torch.ones(B, S, dtype=torch.bool),
            "present": torch.ones(B, 3, dtype=torch.bool), "labels": torch.zeros(B, 5, dtype=torch.long),
            "index": torch.arange(B), "clip_ids": [f"c{i}" for i in range(B)]}


def test_partner_is_never_the_clip_itself():
    for seed in range(50):
        p = shifted_partner(7, torch.Generator().manual_seed(seed))
        assert (p != torch.arange(7)).all() and sorted(p.tolist()) == list(range(7))


def test_negatives_are_truly_mismatched():
    batch = make_batch(B=8)
    out, t = corrupt(batch, torch.Generator().manual_seed(3), swap_prob=0.9, mask_prob=0.0)
    swap, partner = t["swap"], t["partner"]
    assert (swap != SWAP_NONE).any()
    for b in range(8):
        assert partner[b] != b
        same = {"text": torch.equal(out["text_ids"][b], batch["text_ids"][b]),
                "video": torch.equal(out["video"][b], batch["video"][b]),
                "audio": torch.equal(out["audio"][b], batch["audio"][b])}
        swapped = {SWAP_NONE: None, SWAP_TEXT: "text", SWAP_VIDEO: "video", SWAP_AUDIO: "audio"}[int(swap[b])]
        for m, kept in same.items():
            assert kept == (m != swapped), (b, m, swapped)
        if swapped == "video":
            assert torch.equal(out["video"][b], batch["video"][partner[b]])


def test_contrastive_loss_equals_hand_computed_value():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    # row 0: sims (1, 1/sqrt2); row 1: sims (0, 1/sqrt2), each / tau, target the diagonal
    s = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(s / tau)))
    row1 = -math.log(math.exp(s / tau) / (math.exp(0) + math.exp(s / tau)))
    assert torch.allclose(info_nce(a, b, tau), torch.tensor([row0, row1]), atol=1e-6)


def test_only_masked_positions_are_scored():
    config = MODEL_SIZES["tiny"]
    heads = PretrainHeads(config, tasks=("mlm", "mfm_video", "mfm_audio"))
    batch = make_batch(B=4)
    out, targets = corrupt(batch, torch.Generator().manual_seed(1), swap_prob=0.0, mask_prob=0.3)
    pos = targets["mlm_positions"]
    assert pos.any() and (out["text_ids"][pos] == MASK_ID).all() and (out["text_ids"][~pos] != MASK_ID).all()
    assert not pos[:, 0].any() and not pos[:, -1].any()        # [CLS] and [SEP] are never masked
    H = config.hidden
    seqs = {m: torch.randn(4, n, H) for m, n in (("text", 9), ("video", 5), ("audio", 5))}
    fused = torch.randn(4, 3 * H)
    base, valid = heads(fused, seqs, targets)
    changed = {m: s.clone() for m, s in seqs.items()}
    changed["text"][~targets["mlm_positions"]] += 5.0               # only unmasked positions change
    changed["video"][~targets["mfm_video_positions"]] += 5.0
    changed["audio"][~targets["mfm_audio_positions"]] += 5.0
    same, _ = heads(fused, changed, targets)
    assert torch.allclose(base, same)
    changed["video"][targets["mfm_video_positions"]] += 5.0        # a masked position changes: loss changes
    other, _ = heads(fused, changed, targets)
    assert not torch.allclose(base[:, 1], other[:, 1])
    # masked feature targets are the features before masking, and the input there is zeroed
    vpos = targets["mfm_video_positions"]
    assert torch.equal(targets["mfm_video_features"][vpos], batch["video"][vpos])
    assert (out["video"][vpos] == 0).all()


def test_pretrain_then_finetune_loads_every_trunk_parameter(tiny_data, tmp_path, capsys):
    common = ["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--epochs", "1",
              "--batch-size", "8", "--quiet"]
    args = build_parser().parse_args(common + ["--stage", "pretrain", "--max-steps", "3"])
    run = Run(args, strategy="all_at_once")
    run.start()
    for batch in run.batches():
        losses = run.task_losses(batch)
        assert losses.shape == (7,) and torch.isfinite(losses).all()
        run.step(losses.sum(), losses, batch)
        if run.at_eval():
            run.validate()
            run.eval_checkpoint()
    summary = run.finish()
    assert set(summary["test"]["per_task"]) == {"vtm", "vam", "atm", "contrastive", "mfm_video", "mfm_audio", "mlm"}
    best = tmp_path / "all_at_once_pretrain" / "seed0" / "best.pt"
    pretrained = torch.load(best, weights_only=False)["model"]

    ft = Run(build_parser().parse_args(common + ["--init", str(best)]), strategy="all_at_once")
    assert [k for k in ft.init_report["missing"]] == []
    for name, p in ft.model.named_parameters():
        assert torch.equal(p.detach(), pretrained[name]), name
    assert "0 missing keys" in capsys.readouterr().out


def test_the_pretraining_heads_follow_the_seed_not_what_ran_before(tiny_data, tmp_path):
    """Two runs of the same --seed in one process (compare, task_grouping, the tests) start from the same
    heads, whatever the process drew before; another seed starts from other heads."""
    argv = lambda seed: build_parser().parse_args(["--data", str(tiny_data), "--out", str(tmp_path), "--model-size",
                                                   "tiny", "--stage", "pretrain", "--seed", str(seed), "--quiet"])
    heads = lambda run: torch.cat([p.detach().reshape(-1) for p in run.objective.heads.parameters()])
    first = heads(Run(argv(0), strategy="a"))
    torch.rand(1000)  # the process draws something in between
    assert torch.equal(heads(Run(argv(0), strategy="b")), first)
    assert not torch.equal(heads(Run(argv(1), strategy="c")), first)


def test_representation_space_refuses_tasks_that_bypass_z(tiny_data, tmp_path):
    """mfm and mlm read the branch sequences: their gradient with respect to z is zero, so a representation-space
    rule would weigh zero rows and the trunk would learn nothing from them."""
    import pytest
    from common.multitask import add_update_args, make_update
    base = ["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--stage", "pretrain", "--quiet",
            "--aggregator", "pcgrad", "--grad-space", "representation"]
    run = Run(add_update_args(build_parser()).parse_args(base), strategy="repr")
    with pytest.raises(ValueError, match="mfm_video, mfm_audio, mlm do not pass through the fused representation"):
        make_update(run, run.args)
    ok = Run(add_update_args(build_parser()).parse_args(base + ["--pretrain-tasks", "vtm,contrastive"]), strategy="ok")
    make_update(ok, ok.args)  # the matching and contrastive losses read z
