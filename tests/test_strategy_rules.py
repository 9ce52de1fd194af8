"""The rules of the strategy scripts, on small deterministic cases (no model). Dynamic sampling:
tests/test_dynamic_sampling.py; stop-and-go: tests/test_stop_and_go.py; TAG: tests/test_tag.py."""

import pytest
import torch

from strategies.curriculum import curriculum_order, entered
from strategies.round_robin import task_of_step
from strategies.sequential import Phases, forgetting  # noqa: E402


def test_round_robin_cycles_through_tasks():
    assert [int(task_of_step(k, 3).nonzero()) for k in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_curriculum_order_follows_measured_difficulty():
    difficulty = {"binary": 0.3, "mature": 0.1, "gory": 0.6, "slapstick": 0.2, "sarcasm": 0.5}
    assert curriculum_order(difficulty, "easy") == ["mature", "slapstick", "binary", "sarcasm", "gory"]
    assert curriculum_order(difficulty, "hard") == ["gory", "sarcasm", "binary", "slapstick", "mature"]


def test_tasks_enter_at_planned_steps():
    tasks = ["binary", "mature", "gory"]
    order = ["gory", "binary", "mature"]
    assert entered(0, tasks, order, 10).tolist() == [False, False, True]
    assert entered(9, tasks, order, 10).tolist() == [False, False, True]
    assert entered(10, tasks, order, 10).tolist() == [True, False, True]
    assert entered(20, tasks, order, 10).tolist() == [True, True, True]


def test_forgetting_from_recorded_metrics():
    order = ["a", "b", "c"]
    after = {"a": {"a": 0.80, "b": 0.50, "c": 0.40},
             "b": {"a": 0.70, "b": 0.75, "c": 0.45},
             "c": {"a": 0.60, "b": 0.74, "c": 0.90}}
    assert forgetting(after, order) == pytest.approx({"a": 0.20, "b": 0.01})


def test_sequential_phase_ends_on_plateau_or_cap():
    ph = Phases(["a", "b"], patience=2, max_steps=100)
    assert not ph.observe(0.5, 10) and not ph.observe(0.6, 20)
    assert not ph.observe(0.6, 30)           # one evaluation without improvement
    assert ph.observe(0.55, 40)              # second: phase ends
    ph.next({"a": 0.6, "b": 0.1}, 40)
    assert ph.task == "b" and ph.start_step == 40
    assert ph.observe(0.9, 140)              # the cap ends it too


def test_modality_curriculum_phases_then_all():
    from strategies.modality_curriculum import curriculum_modalities
    order = ["text", "video", "audio"]
    got = [curriculum_modalities(step, order, 10) for step in (0, 9, 10, 25, 29, 30, 100)]
    assert got == [("text",), ("text",), ("video",), ("audio",), ("audio",), None, None]


def test_modality_dropout_never_drops_everything_and_drops_at_the_rate():
    from strategies.modality_curriculum import dropout_modalities
    g = torch.Generator().manual_seed(0)
    draws = [dropout_modalities(0.3, g) for _ in range(3000)]
    assert all(d is None or len(d) >= 1 for d in draws)
    kept_text = sum(d is None or "text" in d for d in draws) / len(draws)
    # P(keep) = 0.7, conditioned on not dropping all three: 0.7 / (1 - 0.3^3)
    assert kept_text == pytest.approx(0.7 / (1 - 0.027), abs=0.03)
