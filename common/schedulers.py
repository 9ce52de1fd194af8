"""Task-scheduling rules shared by more than one strategy script. Pure: they see metrics or losses,
never the model, and return which tasks count on a step. Each has state_dict/load_state_dict."""
import math

import torch


class StopAndGo:
    """Dynamic Stop-and-Go (Lu et al., CVPR 2020, "12-in-1"; facebookresearch/vilbert-multi-task).

    observe() takes each task's validation score after an evaluation:
      - a score that beats the task's best by more than `improve` (relative, 0.1%) resets its count;
        otherwise the count of non-improving evaluations grows;
      - a go task whose count reaches `patience` (2) goes to stop;
      - a stopped task whose score falls more than `restart` (0.5%) below its best goes back to go.
    active(step): go tasks on every step, stopped tasks only on every `stop_gap`-th step (4).
    """

    def __init__(self, tasks, improve=0.001, restart=0.005, patience=2, stop_gap=4):
        self.tasks = list(tasks)
        self.improve, self.restart, self.patience, self.stop_gap = improve, restart, patience, stop_gap
        self.best = [-math.inf] * len(self.tasks)
        self.no_improve = [0] * len(self.tasks)
        self.stopped = [False] * len(self.tasks)

    def observe(self, scores):
        """scores: {task: value} (higher is better); tasks left out (not yet introduced by a curriculum)
        are not judged. Returns the transitions [(task, "stop"|"go")]."""
        changes = []
        for i, t in enumerate(self.tasks):
            if t not in scores:
                continue
            s, best = scores[t], self.best[i]
            if self.stopped[i] and best > -math.inf and s < best - abs(best) * self.restart:
                self.stopped[i] = False
                self.no_improve[i] = 0
                changes.append((t, "go"))
                continue  # this evaluation restarted the task; it does not count towards stopping it
            if best == -math.inf or s > best + abs(best) * self.improve:
                self.best[i] = s
                self.no_improve[i] = 0
            else:
                self.no_improve[i] += 1
                if not self.stopped[i] and self.no_improve[i] >= self.patience:
                    self.stopped[i] = True
                    changes.append((t, "stop"))
        return changes

    def reset(self):
        """Put every task back to go (the 12-in-1 code does this at fixed epochs: --reset-at)."""
        self.stopped = [False] * len(self.tasks)
        self.no_improve = [0] * len(self.tasks)

    def active(self, step):
        """Bool [T]: which tasks are updated on this step."""
        on_gap = step % self.stop_gap == 0
        return torch.tensor([(not s) or on_gap for s in self.stopped])

    def states(self):
        return {t: ("stop" if s else "go") for t, s in zip(self.tasks, self.stopped)}

    def state_dict(self):
        return {"best": list(self.best), "no_improve": list(self.no_improve), "stopped": list(self.stopped)}

    def load_state_dict(self, state):
        self.best = list(state["best"])
        self.no_improve = list(state["no_improve"])
        self.stopped = list(state["stopped"])
