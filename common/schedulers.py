"""Task-scheduling rules shared by more than one strategy script. Pure: they see metrics or losses,
never the model, and return which tasks count on a step. Each has state_dict/load_state_dict."""
import math

import torch


class StopAndGo:
    """Dynamic Stop-and-Go (Lu et al., CVPR 2020, "12-in-1"), step for step the controller of
    facebookresearch/vilbert-multi-task (vilbert/utils.py MultiTaskStopOnPlateau, built in train_tasks.py with
    mode max, patience 1, threshold 0.001, continue_threshold 0.005, cooldown 1).

    observe() takes each task's validation score (higher is better) and, per task, in this order:
      1. better = score > best * (1 + improve), strict and against the best so far; better: best = score and
         the count of non-improving evaluations is 0, else the count grows;
      2. while a cooldown is running it ticks down and the count is set back to 0;
      3. if the count reaches `patience` (2): stop (a stopped task stays stopped), cooldown = `cooldown`, count 0;
      4. ELSE IF the task is stopped and score < best * (1 - restart): go, cooldown = `cooldown`, count 0.
    So ties count on neither side, a stopped task that improves stays stopped, and after a stop or a restart
    the next evaluation never counts (three non-improving evaluations stop a restarted task again).
    active(step): go tasks on every step, stopped tasks on every `stop_gap`-th step (iteration % 4 == 0).
    reset(): every task back to go, best forgotten, counters and cooldowns 0 (12-in-1 does it at every
    learning-rate drop).

    Intended differences: `patience` counts the non-improving evaluations that stop a task (the reference's
    patience=1 means "more than 1"); for a negative best (a score of minus a loss) the thresholds are taken on
    |best| (best + |best| * improve, best - |best| * restart), where the reference's best * 1.001 would lie below
    the best and count any non-worse score as an improvement; a non-finite (or None) score is not judged and is
    listed in `skipped` instead of counting as a non-improvement.
    """
    rule_kind, name, version = "scheduler", "stop_and_go", 1   # common/versions.py: bump when results change

    def __init__(self, tasks, improve=0.001, restart=0.005, patience=2, stop_gap=4, cooldown=1):
        if patience < 1 or stop_gap < 1 or cooldown < 0:
            raise ValueError(f"StopAndGo: need patience >= 1, stop_gap >= 1, cooldown >= 0 "
                             f"(got {patience}, {stop_gap}, {cooldown})")
        self.tasks = list(tasks)
        self.improve, self.restart, self.patience = improve, restart, patience
        self.stop_gap, self.cooldown = stop_gap, cooldown
        self.skipped = []
        self.reset()

    def _improved(self, score, best):
        if best == -math.inf:
            return score > best
        return score > (best * (1.0 + self.improve) if best >= 0 else best * (1.0 - self.improve))

    def _fell(self, score, best):
        if best == -math.inf:
            return False
        return score < (best * (1.0 - self.restart) if best >= 0 else best * (1.0 + self.restart))

    def observe(self, scores):
        """scores: {task: value}; tasks left out (not yet introduced by a curriculum) are not judged.
        Returns the transitions [(task, "stop"|"go")]; non-finite scores are skipped (see self.skipped)."""
        changes, self.skipped = [], []
        for i, t in enumerate(self.tasks):
            if t not in scores:
                continue
            s = scores[t]
            if s is None or not math.isfinite(s):
                self.skipped.append(t)
                continue
            if self._improved(s, self.best[i]):
                self.best[i], self.no_improve[i] = s, 0
            else:
                self.no_improve[i] += 1
            if self.cooldown_left[i] > 0:
                self.cooldown_left[i] -= 1
                self.no_improve[i] = 0
            if self.no_improve[i] >= self.patience:
                if not self.stopped[i]:
                    changes.append((t, "stop"))
                self.stopped[i], self.cooldown_left[i], self.no_improve[i] = True, self.cooldown, 0
            elif self.stopped[i] and self._fell(s, self.best[i]):
                changes.append((t, "go"))
                self.stopped[i], self.cooldown_left[i], self.no_improve[i] = False, self.cooldown, 0
        return changes

    def reset(self):
        """Every task back to go; best, counts and cooldowns forgotten (12-in-1: at every LR drop)."""
        T = len(self.tasks)
        self.best = [-math.inf] * T
        self.no_improve = [0] * T
        self.cooldown_left = [0] * T
        self.stopped = [False] * T

    def active(self, step):
        """Bool [T]: which tasks are updated on this step."""
        on_gap = step % self.stop_gap == 0
        return torch.tensor([(not s) or on_gap for s in self.stopped])

    def states(self):
        return {t: ("stop" if s else "go") for t, s in zip(self.tasks, self.stopped)}

    def state_dict(self):
        return {"best": list(self.best), "no_improve": list(self.no_improve),
                "cooldown_left": list(self.cooldown_left), "stopped": list(self.stopped)}

    def load_state_dict(self, state):
        self.best = list(state["best"])
        self.no_improve = list(state["no_improve"])
        self.cooldown_left = list(state["cooldown_left"])
        self.stopped = list(state["stopped"])


SCHEDULERS = {cls.name: cls for cls in (StopAndGo,)}
