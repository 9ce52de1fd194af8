"""Multi-task pretraining objectives, as tasks that any strategy can schedule, weight or aggregate
(`--stage pretrain` on every script; then `--init results/<strategy>/<run>/best.pt` to fine-tune).

One corrupted batch, one trunk pass, seven per-clip losses:
  vtm, vam, atm   matching (the original hybrid pretraining): for some clips one modality is replaced by
                  another clip's (a random cyclic shift of the batch: never the clip itself); each
                  matching head says whether its pair of modalities belongs together.
  contrastive     InfoNCE between the pooled text and video (and text and audio) vectors of the clips
                  left intact; the other clips of the batch are the negatives.
  mfm_video/audio masked feature modelling: 15% of real segments are zeroed at the input and their
                  features regressed from the branch output (MSE, masked positions only).
  mlm             masked language modelling: 15% of real word pieces become [MASK] and are predicted
                  from the text branch output (cross-entropy, masked positions only).
A clip for which a task has nothing to score (no masked token, a swapped clip for contrastive) is
marked invalid for that task, so that means are over the scored clips only.
"""
import torch
import torch.nn.functional as F
from torch import nn
from common import distributed
from common.data import TASKS

PRETRAIN_TASKS = ("vtm", "vam", "atm", "contrastive", "mfm_video", "mfm_audio", "mlm")
MASK_ID, CLS_ID, SEP_ID = 103, 101, 102          # bert-base-cased
SWAP_NONE, SWAP_TEXT, SWAP_VIDEO, SWAP_AUDIO = 0, 1, 2, 3
# which swaps break which pair: vtm = text-video, vam = video-audio, atm = audio-text
MATCH_PAIRS = {"vtm": (SWAP_TEXT, SWAP_VIDEO), "vam": (SWAP_VIDEO, SWAP_AUDIO), "atm": (SWAP_AUDIO, SWAP_TEXT)}


def shifted_partner(batch_size, generator):
    """partner[b] = (b + k) mod B with k in 1..B-1: a random derangement, no clip paired with itself."""
    if batch_size < 2:
        return torch.zeros(batch_size, dtype=torch.long)
    k = int(torch.randint(1, batch_size, (1,), generator=generator))
    return (torch.arange(batch_size) + k) % batch_size


def corrupt(batch, generator, swap_prob=0.5, mask_prob=0.15):
    """The corrupted batch and what each task must recover. Only clips of a batch of 2+ are swapped."""
    B = batch["labels"].shape[0]
    out = dict(batch)
    partner = shifted_partner(B, generator)
    swap = torch.zeros(B, dtype=torch.long)
    if B > 1:
        draw = torch.rand(B, generator=generator) < swap_prob
        swap[draw] = torch.randint(1, 4, (int(draw.sum()),), generator=generator)
    present = batch["present"].clone()
    for code, m, keys in ((SWAP_TEXT, 0, ("text_ids", "text_mask")), (SWAP_VIDEO, 1, ("video", "video_mask")),
                          (SWAP_AUDIO, 2, ("audio", "audio_mask"))):
        rows = (swap == code).nonzero().flatten()
        for key in keys:
            out[key] = out[key].clone()
            out[key][rows] = batch[key][partner[rows].to(batch[key].device)]
        present[rows, m] = batch["present"][partner[rows], m]
    out["present"] = present
    targets = {"swap": swap, "partner": partner}

    # masked language modelling: real word pieces other than [CLS]/[SEP]
    ids = out["text_ids"]
    can = out["text_mask"] & (ids != CLS_ID) & (ids != SEP_ID)
    mlm = can & (torch.rand(ids.shape, generator=generator) < mask_prob).to(can.device)
    targets["mlm_positions"], targets["mlm_ids"] = mlm, ids.clone()
    out["text_ids"] = ids.masked_fill(mlm, MASK_ID)
    # masked feature modelling: zero 15% of the real segments at the input, regress them
    for m in ("video", "audio"):
        feats, mask = out[m], out[f"{m}_mask"]
        chosen = mask & (torch.rand(mask.shape, generator=generator) < mask_prob).to(mask.device)
        targets[f"mfm_{m}_positions"], targets[f"mfm_{m}_features"] = chosen, feats.clone()
        out[m] = feats.masked_fill(chosen[..., None], 0.0)
    return out, targets


def info_nce(a, b, temperature):
    """Per-row InfoNCE of matched rows a[i] <-> b[i] against the other rows: [N] losses."""
    return _nce(F.normalize(a, dim=-1), F.normalize(b, dim=-1), temperature,
                torch.arange(a.shape[0], device=a.device))


def _nce(queries, keys, temperature, target):
    """Cross-entropy of unit queries [n, D] against unit keys [N, D]; query i's match is keys[target[i]]."""
    return F.cross_entropy(queries @ keys.T / temperature, target, reduction="none")


def own_rows(corrupted, targets, batch):
    """torchrun: this rank's rows of the corrupted global batch and of its targets (a ghost rank keeps the
    first clip, masked out later). The targets keep the global swaps and this rank's place in the global
    batch, for the contrastive negatives of the whole batch."""
    sizes = distributed.shard_sizes(batch["global_batch_size"])
    n, start = sizes[distributed.rank()], batch["shard_start"]
    rows = slice(start, start + n) if n else slice(0, 1)
    out = {k: (v[rows] if k in distributed.BATCH_TENSORS else v) for k, v in corrupted.items()}
    mine = {k: v[rows] for k, v in targets.items() if k != "partner"}  # partner holds global row numbers
    mine.update(global_swap=targets["swap"], shard_sizes=sizes)
    return out, mine


class PretrainHeads(nn.Module):
    """The heads of the pretraining tasks on top of the shared trunk (not part of the fine-tuned model)."""

    def __init__(self, config, tasks=PRETRAIN_TASKS, temperature=0.1):
        super().__init__()
        H = config.hidden
        self.tasks, self.temperature = tuple(tasks), temperature
        # where each modality's pooled vector sits in the fused representation
        self.slot = {b[0]: i for i, b in enumerate(config.branches)}
        self.match = nn.ModuleDict({t: nn.Sequential(nn.Linear(3 * H, H), nn.ReLU(), nn.Linear(H, 2))
                                    for t in MATCH_PAIRS if t in self.tasks})
        self.mfm_video = nn.Linear(H, config.video_dim)
        self.mfm_audio = nn.Linear(H, config.audio_dim)
        self.mlm = nn.Linear(H, config.vocab_size)

    def forward(self, fused, sequences, targets):
        """fused [B, 3H], sequences {modality: [B, L, H]} (branch outputs before pooling).
        Returns per-clip losses [B, T] and which of them are scored (bool [B, T])."""
        B = fused.shape[0]
        swap = targets["swap"].to(fused.device)
        losses = torch.zeros(B, len(self.tasks), device=fused.device)
        valid = torch.zeros(B, len(self.tasks), dtype=torch.bool, device=fused.device)
        for k, task in enumerate(self.tasks):
            if task in MATCH_PAIRS:
                matched = ~((swap == MATCH_PAIRS[task][0]) | (swap == MATCH_PAIRS[task][1]))
                losses[:, k] = F.cross_entropy(self.match[task](fused), matched.long(), reduction="none")
                valid[:, k] = True
            elif task == "contrastive":
                intact, row = self.contrastive(fused, swap, targets)
                if row is not None:
                    losses[intact, k] = row
                    valid[intact, k] = True
            elif task == "mlm":
                pos = targets["mlm_positions"]
                logits = self.mlm(sequences["text"][pos])
                per_token = F.cross_entropy(logits, targets["mlm_ids"][pos], reduction="none")
                losses[:, k], valid[:, k] = _per_clip_mean(per_token, pos)
            else:  # mfm_video / mfm_audio
                m = task.split("_")[1]
                pos = targets[f"mfm_{m}_positions"]
                pred = getattr(self, task)(sequences[m][pos])
                per_seg = F.mse_loss(pred, targets[f"mfm_{m}_features"][pos], reduction="none").mean(-1)
                losses[:, k], valid[:, k] = _per_clip_mean(per_seg, pos)
        return losses, valid

    def contrastive(self, fused, swap, targets):
        """(intact clips, their InfoNCE losses or None): each intact clip's text against the video (and the
        audio) of every intact clip of the batch. torchrun: of the global batch, the other ranks' video and
        audio vectors gathered (gradients flow back to their ranks), as one process computes it."""
        H = fused.shape[1] // 3
        if "global_swap" not in targets:
            intact = (swap == SWAP_NONE).nonzero().flatten()
            if intact.numel() < 2:
                return intact, None
            parts = fused[intact].view(-1, 3, H)
            t, v, a = (parts[:, self.slot[m]] for m in ("text", "video", "audio"))
            return intact, (info_nce(t, v, self.temperature) + info_nce(t, a, self.temperature)) / 2
        sizes = targets["shard_sizes"]
        r = distributed.rank()
        intact = (swap[:sizes[r]] == SWAP_NONE).nonzero().flatten()  # a ghost rank (no rows of its own) has none
        global_intact = (targets["global_swap"] == SWAP_NONE).long()
        if int(global_intact.sum()) < 2:  # the same answer on every rank: all skip the gathers
            return intact, None
        counts = [int(part.sum()) for part in global_intact.split(sizes)]
        parts = fused[intact].view(-1, 3, H)
        t, v, a = (parts[:, self.slot[m]] for m in ("text", "video", "audio"))
        first = sum(counts[:r])
        target = torch.arange(first, first + intact.numel(), device=fused.device)
        t = F.normalize(t, dim=-1)
        keys = [distributed.gather_rows(F.normalize(x, dim=-1), counts) for x in (v, a)]
        return intact, (_nce(t, keys[0], self.temperature, target) + _nce(t, keys[1], self.temperature, target)) / 2


def _per_clip_mean(values, positions):
    """Mean of the per-position values [n] of each clip (positions bool [B, L]); valid where any."""
    counts = positions.sum(1)
    clip = positions.nonzero()[:, 0]
    sums = torch.zeros(positions.shape[0], device=values.device, dtype=values.dtype).index_add(0, clip, values)
    return sums / counts.clamp(min=1), counts > 0


class PretrainObjective(nn.Module):
    """Corrupt the batch, run the trunk once, score every pretraining task: what Run.per_item_losses
    calls when --stage pretrain. Holds the heads and the corruption's generator (both checkpointed)."""

    def __init__(self, config, tasks=PRETRAIN_TASKS, seed=0):
        super().__init__()
        self.heads = PretrainHeads(config, tasks)
        self.generator = torch.Generator().manual_seed(seed + 2718281)

    strategy_suffix = "_pretrain"
    # recorded in a run's versions (common/versions.py); 2: the heads initialised from --seed, torchrun corrupts
    # the global batch and gathers the contrastive negatives of every rank
    rule_kind, name, version = "objective", "pretrain", 2
    # losses read from the branch sequences, not from the fused representation z (no representation-space rule)
    tasks_past_representation = ("mfm_video", "mfm_audio", "mlm")
    model_tasks = TASKS  # the model keeps every fine-tuning head, so that its checkpoint is a whole model

    @property
    def tasks(self):
        return list(self.heads.tasks)

    def forward(self, model, batch, active_modalities=None, generator=None):
        # torchrun: a training batch is this rank's shard; corrupt the global batch, as one process does (the
        # same generator state on every rank), then score this rank's rows of it
        whole = distributed.gather_global_batch(batch) if "shard_start" in batch else batch
        corrupted, targets = corrupt(whole, generator or self.generator)
        if whole is not batch:
            corrupted, targets = own_rows(corrupted, targets, batch)
        fused, sequences = model.trunk(corrupted, active_modalities=active_modalities, return_sequences=True)
        losses, valid = self.heads(fused, sequences, targets)
        return fused, losses, valid

    per_item_losses = forward

    @torch.no_grad()
    def evaluate(self, run, dataset, model, modalities):
        """Mean pretraining losses over a split, with a fixed corruption (the same every evaluation);
        score = minus the loss."""
        model.eval()
        generator = torch.Generator().manual_seed(12345)
        T = len(self.heads.tasks)
        sums = torch.zeros(T, dtype=torch.float64)
        counts = torch.zeros(T, dtype=torch.float64)
        plan = [list(range(i, min(i + 64, len(dataset)))) for i in range(0, len(dataset), 64)]
        for batch in run.loader(plan, dataset):
            _, per_item, valid = self(model, batch, modalities, generator)
            sums += (per_item * valid).sum(0).double().cpu()
            counts += valid.sum(0).double().cpu()
        model.train()
        losses = (sums / counts.clamp(min=1)).tolist()
        per_task = {t: {"loss": v, "score": -v} for t, v in zip(self.heads.tasks, losses)}
        mean = float(sum(losses) / len(losses))
        return {"per_task": per_task, "mean": {"loss": mean, "score": -mean}}

    def labels(self, batch):
        raise TypeError("pretraining tasks have no class labels to predict; use run.evaluate")

    def task_parameters(self, model, task=None):
        """The head parameters of one pretraining task (or of all); the model's are not involved."""
        if task is None:
            return list(self.heads.parameters())
        if task in MATCH_PAIRS:
            return list(self.heads.match[task].parameters())
        if task == "contrastive":
            return []
        return list(getattr(self.heads, task).parameters())

    def state_dict(self, *args, **kwargs):
        return {"heads": self.heads.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state, strict=True):
        self.heads.load_state_dict(state["heads"])
        self.generator.set_state(state["generator"])
