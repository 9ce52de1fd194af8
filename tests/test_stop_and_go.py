"""Dynamic Stop-and-Go (common/schedulers.py StopAndGo) against the 12-in-1 reference controller.

The reference is MultiTaskStopOnPlateau in facebookresearch/vilbert-multi-task (vilbert/utils.py), built by
train_tasks.py with mode="max", patience=1, threshold=0.001 (relative), continue_threshold=0.005, cooldown=1,
stepped once per evaluation of a task and _reset() at every learning-rate drop. ReferenceController below is a
literal transcription of its step() and _reset() for mode max with relative thresholds; it is the oracle.
Our `patience` counts the non-improving evaluations that stop a task (2), the reference's is one less (1: it
stops when the count exceeds it).
"""
import math
import random

import pytest

from common.schedulers import StopAndGo


class ReferenceController:
    """The oracle: vilbert/utils.py MultiTaskStopOnPlateau, mode max, threshold_mode rel."""

    def __init__(self, patience=1, threshold=0.001, continue_threshold=0.005, cooldown=1):
        self.patience, self.threshold = patience, threshold
        self.continue_threshold, self.cooldown = continue_threshold, cooldown
        self._reset()

    def _reset(self):
        self.best = -math.inf
        self.cooldown_counter = 0
        self.num_bad_epochs = 0
        self.in_stop = False

    def step(self, current):
        if current > self.best * (self.threshold + 1.0):           # is_better, mode max
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:                               # in_cooldown
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self.in_stop = True
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        elif current < self.best * (1.0 - self.continue_threshold) and self.in_stop:  # continue_is_better, mode min
            self.in_stop = False
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0


RESET = "reset"


def replay_ours(seq, **kw):
    """States ("go"/"stop") of task "a" after each evaluation, and the transitions reported."""
    rule = StopAndGo(["a"], **kw)
    states, transitions = [], []
    for k, s in enumerate(seq):
        if s == RESET:
            rule.reset()
            continue
        transitions += [(k, state) for _, state in rule.observe({"a": s})]
        states.append(rule.states()["a"])
    return states, transitions


def replay_reference(seq, patience=2, improve=0.001, restart=0.005, cooldown=1):
    ref = ReferenceController(patience - 1, improve, restart, cooldown)
    states = []
    for s in seq:
        if s == RESET:
            ref._reset()
            continue
        ref.step(s)
        states.append("stop" if ref.in_stop else "go")
    return states


def up(x, rel=0.001):
    return x * (1.0 + rel)


def down(x, rel=0.005):
    return x * (1.0 - rel)


# (name, scripted scores of one task, expected state after each evaluation)
HAND_CASES = [
    ("improving never stops", [0.5, 0.6, 0.7, 0.8, 0.9], "ggggg"),
    ("two flat evaluations stop", [0.5, 0.5, 0.5], "ggs"),
    ("gain under 0.1% is not an improvement", [0.5, 0.5004, 0.5004], "ggs"),
    ("a tie with the improve threshold is not an improvement", [0.5, up(0.5), up(0.5)], "ggs"),
    ("compared with the best, not the last score", [0.6, 0.5, 0.55], "ggs"),
    ("an improvement resets the count", [0.5, 0.5, 0.6, 0.6, 0.6], "gggg" + "s"),
    ("a drop over 0.5% restarts (on the cooldown evaluation too)", [0.5, 0.5, 0.5, 0.49], "ggsg"),
    ("a drop under 0.5% does not restart", [0.5, 0.5, 0.5, 0.498, 0.498], "ggsss"),
    ("a tie with the restart threshold does not restart", [0.5, 0.5, 0.5, down(0.5)], "ggss"),
    ("after a restart three non-improving evaluations stop again", [0.5, 0.5, 0.5, 0.49, 0.49, 0.49, 0.49], "ggsgggs"),
    ("the stop branch takes precedence over the restart", [0.5, 0.5, 0.5, 0.5, 0.5, 0.49, 0.49], "ggssssg"),
    ("a stopped task that improves stays stopped", [0.5, 0.5, 0.5, 0.6, 0.6], "ggsss"),
    ("a stopped task restarts against its new best", [0.5, 0.5, 0.5, 0.6, 0.59], "ggssg"),
    ("reset forgets the best", [0.8, 0.8, 0.8, RESET, 0.5, 0.5, 0.5], "ggs" + "ggs"),
    ("reset puts a stopped task back to go", [0.5, 0.5, 0.5, RESET, 0.45], "ggs" + "g"),
    ("a stopped task stays stopped while flat", [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], "ggssssss"),
]


@pytest.mark.parametrize("name,seq,expected", HAND_CASES, ids=[c[0] for c in HAND_CASES])
def test_hand_cases_agree_with_the_reference(name, seq, expected):
    want = ["stop" if c == "s" else "go" for c in expected]
    assert replay_reference(seq) == want, "the expectation itself disagrees with the reference"
    states, _ = replay_ours(seq)
    assert states == want


def test_the_precedence_case_is_the_one_where_stop_branch_fires_again():
    # evaluation 6 (0.49) is 2% under the best, but it is also the second non-improving evaluation since the
    # cooldown: the reference's stop branch fires (the task stays stopped, cooldown restarts) and the restart
    # check, an elif, is skipped; the task restarts one evaluation later
    states, transitions = replay_ours([0.5, 0.5, 0.5, 0.5, 0.5, 0.49, 0.49])
    assert transitions == [(2, "stop"), (6, "go")]


def test_transitions_are_reported_once_per_change():
    states, transitions = replay_ours([0.5, 0.5, 0.5, 0.49, 0.49, 0.49, 0.49])
    assert transitions == [(2, "stop"), (3, "go"), (6, "stop")]


def test_reset_also_clears_counters_and_cooldown():
    rule = StopAndGo(["a", "b"])
    for s in (0.5, 0.5, 0.5):
        rule.observe({"a": s, "b": 0.4 + s})
    assert rule.states() == {"a": "stop", "b": "stop"} and rule.cooldown_left == [1, 1]
    rule.reset()
    assert rule.states() == {"a": "go", "b": "go"}
    assert rule.best == [-math.inf, -math.inf] and rule.no_improve == [0, 0] and rule.cooldown_left == [0, 0]


def test_negative_scores_use_the_absolute_best():
    # scores such as minus a loss. The reference's best * 1.001 lies below a negative best, so there every
    # non-worse score counts as an improvement and a flat task never stops; with |best| it stops as a
    # positive one would (the documented, intended difference)
    flat = [-2.0, -2.0, -2.0]
    assert replay_reference(flat) == ["go", "go", "go"]
    assert replay_ours(flat)[0] == ["go", "go", "stop"]
    assert replay_ours([-2.0, -1.5, -1.0])[0] == ["go", "go", "go"]            # loss falling: improving
    assert replay_ours([-2.0, -1.999, -1.9985])[0] == ["go", "go", "stop"]      # under 0.1% of |best|
    # restart: more than 0.5% of |best| worse (below -2.01)
    assert replay_ours(flat + [-2.005])[0][-1] == "stop"
    assert replay_ours(flat + [-2.02])[0][-1] == "go"


def test_tasks_left_out_are_not_judged():
    rule = StopAndGo(["a", "b"])
    for s in (0.5, 0.5, 0.5):
        rule.observe({"a": s})                       # b not yet introduced (curriculum)
    assert rule.states() == {"a": "stop", "b": "go"}
    assert rule.best[1] == -math.inf and rule.no_improve[1] == 0


def test_a_non_finite_score_is_skipped_and_reported():
    rule = StopAndGo(["a", "b"])
    rule.observe({"a": 0.5, "b": 0.5})
    assert rule.observe({"a": float("nan"), "b": 0.5}) == []
    assert rule.skipped == ["a"]
    assert rule.no_improve == [0, 1]                  # a's count untouched
    rule.observe({"a": None, "b": 0.5})
    assert rule.skipped == ["a"] and rule.states()["b"] == "stop"


def test_stopped_task_is_updated_every_stop_gap_steps():
    rule = StopAndGo(["a", "b"], stop_gap=4)
    for a in (0.5, 0.6, 0.7):
        rule.observe({"a": a, "b": 0.5})          # a improves, b is flat
    assert rule.states() == {"a": "go", "b": "stop"}
    schedule = [rule.active(step).tolist() for step in range(8)]
    assert [s[0] for s in schedule] == [True] * 8
    assert [s[1] for s in schedule] == [True, False, False, False, True, False, False, False]


def test_state_round_trip_continues_identically():
    seq = [0.5, 0.5, 0.5, 0.49]
    a = StopAndGo(["a"])
    for s in seq[:3]:
        a.observe({"a": s})
    b = StopAndGo(["a"])
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert a.observe({"a": 0.49}) == b.observe({"a": 0.49}) == [("a", "go")]


def random_sequence(rng, length=40):
    """A random walk of scores with steps around both thresholds, exact ties, and occasional resets."""
    s, seq = rng.uniform(0.2, 0.8), []
    for _ in range(length):
        if rng.random() < 0.05:
            seq.append(RESET)
            continue
        kind = rng.random()
        if kind < 0.1 and seq and seq[-1] != RESET:
            s = seq[-1]                                            # exact tie with the last score
        else:
            s = s * (1 + rng.choice([-0.02, -0.006, -0.005, -0.004, -0.001, 0.0, 0.0, 0.0005, 0.001, 0.0011, 0.01, 0.03]))
        s = min(max(s, 0.05), 0.99)
        seq.append(s)
    return seq


@pytest.mark.parametrize("seed", range(200))
def test_random_sequences_agree_with_the_reference(seed):
    rng = random.Random(seed)
    patience, cooldown = rng.choice([(2, 1)] * 4 + [(1, 0), (1, 1), (2, 0), (3, 1), (3, 2), (2, 2)])
    seq = random_sequence(rng)
    rule = StopAndGo(["a"], patience=patience, cooldown=cooldown)
    ref = ReferenceController(patience - 1, cooldown=cooldown)
    for s in seq:
        if s == RESET:
            rule.reset()
            ref._reset()
            continue
        was_stopped = ref.in_stop
        ref.step(s)
        changes = rule.observe({"a": s})
        expected = [] if ref.in_stop == was_stopped else [("a", "stop" if ref.in_stop else "go")]
        assert changes == expected
        assert (rule.stopped[0], rule.best[0], rule.no_improve[0], rule.cooldown_left[0]) == \
               (ref.in_stop, ref.best, ref.num_bad_epochs, ref.cooldown_counter)


def test_the_script_follows_the_reference_on_its_own_validation_scores(tiny_data, tmp_path, capsys):
    """strategies/stop_and_go.py on tiny data, judged at every step with a large --improve so that tasks stop:
    replaying the logged per-task validation scores (and the logged LR-drop resets) through the reference
    controller gives the logged go/stop states."""
    import json

    from strategies.stop_and_go import main
    improve, restart = 0.05, 0.001
    main(["--data", str(tiny_data), "--out", str(tmp_path), "--model-size", "tiny", "--batch-size", "4",
          "--epochs", "1", "--max-steps", "12", "--eval-every", "1", "--improve", str(improve), "--restart", str(restart),
          "--quiet", "--log-every", "100"])
    records = [json.loads(line) for line in open(tmp_path / "stop_and_go" / "seed0" / "metrics.jsonl")]
    tasks = records[0]["tasks"]
    refs = {t: ReferenceController(1, improve, restart, 1) for t in tasks}
    checked, stops = 0, 0
    for r in records:
        if r["event"] == "val":
            for t in tasks:
                refs[t].step(r["per_task"][t]["score"])
        elif r["event"] == "reset":
            assert r["why"] == "learning-rate drop"
            for ref in refs.values():
                ref._reset()
        elif r["event"] == "states":
            assert r["states"] == {t: "stop" if refs[t].in_stop else "go" for t in tasks}, r["step"]
            checked += 1
            stops += sum(s == "stop" for s in r["states"].values())
    assert checked == 12 and stops > 0
    assert "go/stop timeline" in capsys.readouterr().out
