"""Budget accounting (issue 25): every optimizer update a strategy takes counts against the step budget, so
task_grouping (its joint run, the affinity lookahead steps, the group models) and curriculum (the probe on
a copy of the model, then the main training) spend exactly all_at_once's budget. The scripts run in this
process on tiny data (64 clips, batch 4: 16 steps an epoch, 2 epochs = 32 steps)."""
import json
from pathlib import Path

import pytest
import torch

from strategies import all_at_once, curriculum, task_grouping

BUDGET = 32


def common(tiny_data, out):
    return ["--data", str(tiny_data), "--out", str(out), "--model-size", "tiny", "--epochs", "2",
            "--batch-size", "4", "--quiet"]


@pytest.fixture
def adam_steps(monkeypatch):
    """Counts every torch.optim.Adam.step (the training runs' fused Adam, the probe's Adam on its copy)."""
    calls = []
    step = torch.optim.Adam.step

    def counted(self, *args, **kwargs):
        calls.append(1)
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    return calls


def events(path, name):
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["event"] == name]


def test_all_at_once_budget_is_the_reference(tiny_data, tmp_path, adam_steps):
    summary = all_at_once.main(common(tiny_data, tmp_path))
    assert summary["budget_steps"] == summary["steps"] == BUDGET == len(adam_steps)


def test_task_grouping_spends_all_at_once_budget_lookahead_included(tiny_data, tmp_path, adam_steps):
    """Joint run: 6 training steps and 5 lookahead steps at each of its 2 measurements (steps 0 and 4),
    6 + 10 = 16 = half the budget; the groups share the other 16."""
    summary = task_grouping.main(common(tiny_data, tmp_path) + ["--affinity-every", "4"])
    measured = events(tmp_path / "task_grouping" / "seed0" / "affinity" / "metrics.jsonl", "affinity")
    assert [r["step"] for r in measured] == [0, 4]
    assert summary["extra_steps"] == {"affinity": 5 * len(measured)} == {"affinity": 10}
    budget = summary["decisions"]["budget"]
    assert budget["budget"] == BUDGET and budget["joint_steps"] == 6 and not budget["over_budget"]
    assert sum(budget["group_steps"].values()) == BUDGET - 16
    # every update counted once: Adam steps of the joint run and of the groups, plus the lookahead steps
    assert summary["budget_steps"] == summary["steps"] == BUDGET == len(adam_steps) + summary["extra_steps"]["affinity"]


def test_curriculum_spends_all_at_once_budget_probe_included(tiny_data, tmp_path, adam_steps):
    summary = curriculum.main(common(tiny_data, tmp_path) + ["--probe-steps", "5"])
    assert summary["extra_steps"] == {"probe": 5}
    assert summary["budget_steps"] == summary["steps"] == BUDGET == len(adam_steps)
    train = events(tmp_path / "curriculum_easy" / "seed0" / "metrics.jsonl", "train")
    assert max(r["step"] for r in train) == BUDGET - 5                 # the main training's share
    assert json.loads((tmp_path / "curriculum_easy" / "seed0" / "summary.json").read_text())["steps"] == BUDGET


def test_split_budget_and_joint_run_steps():
    assert task_grouping.split_budget(17, 3) == [6, 6, 5] and task_grouping.split_budget(1, 2) == [1, 1]
    assert task_grouping.joint_run_steps(16, 5, 4) == 6               # 6 + 5 * 2 = 16; 7 + 5 * 2 > 16
    assert task_grouping.joint_run_steps(182, 5, 10) == 120           # 120 + 5 * 12 = 180; 121 + 5 * 13 > 182
    assert task_grouping.joint_run_steps(2, 5, 1) == 1                # at least one step (over budget)
