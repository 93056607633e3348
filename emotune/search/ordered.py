"""ASHA whose decisions do not depend on which trial reaches a rung first: ``search.reproducible=true``.

Ray's asynchronous ASHA judges a trial at a rung against the trials that happened to reach that rung before it.
With two or more trials at a time, which ones those are depends on the machine's timing, so the same search can
cut different trials from one run to the next. :class:`OrderedASHA` judges trial number i (in the order the
searcher proposed them) against trials 0 to i-1 only, as if they had arrived in that order: when trial i reaches
a rung before an earlier trial has, it is paused (its checkpoint kept) until every earlier trial has reached the
rung or ended, then judged, and resumed or stopped where it paused. The rule at a rung is Ray's: stop the trial
when its value is below the given percentile of the earlier trials' values there (``noise_z``: below it by more
than that many of its own bootstrap standard errors, as ``noise_asha`` judges). Every decision is then a function
of the trials' results alone, and those are fixed by their seeds.

Waiting costs time, not results: a paused trial's slot goes to the next trial in the meantime.
"""

from __future__ import annotations

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler


class OrderedASHA(FIFOScheduler):
    """ASHA judged in the trials' proposal order (see the module docstring). ``rungs``: the evaluations at which
    trials are judged (those of Ray's ASHA with the same settings); ``mode``: max or min."""

    def __init__(self, metric: str, mode: str, rungs: list[int], reduction_factor: float, noise_z: float = 0.0,
                 se_attr: str = "val_f1_se", time_attr: str = "evaluation") -> None:
        super().__init__()
        self._metric, self._mode = metric, mode
        self.rungs, self.rf = sorted(int(r) for r in rungs), float(reduction_factor)
        self.noise_z, self.se_attr, self.time_attr = float(noise_z), se_attr, time_attr
        self.order: dict[str, int] = {}  # trial id: its place in the proposal order
        self.recorded: dict[int, dict[int, tuple[float, float]]] = {r: {} for r in self.rungs}  # rung: {i: (v, se)}
        self.decided: dict[tuple[int, int], str] = {}  # (i, rung): CONTINUE or STOP
        self.ended: set[int] = set()
        self.waiting: dict[str, int] = {}  # paused trial id: the rung it waits to be judged at

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the metric and mode are the search's, given at construction

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self.order.setdefault(trial.trial_id, len(self.order))

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        i, now = self.order.setdefault(trial.trial_id, len(self.order)), int(result.get(self.time_attr, 0))
        for rung in self.rungs:
            if now < rung or self.decided.get((i, rung)) == TrialScheduler.CONTINUE:
                continue
            if (i, rung) in self.decided:  # a stop already decided (a resumed trial's repeated report)
                return TrialScheduler.STOP
            value = float(result[self._metric]) * (1 if self._mode == "max" else -1)
            self.recorded[rung].setdefault(i, (value, float(result.get(self.se_attr) or 0.0)))
            self._judge_waiting(tune_controller)
            if not self._ready(i, rung):
                self.waiting[trial.trial_id] = rung
                return TrialScheduler.PAUSE
            if self._decide(i, rung) == TrialScheduler.STOP:
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._end(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._end(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._end(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """A paused trial whose judgement came out to continue, else the next pending trial in order."""
        self._judge_waiting(tune_controller)
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PAUSED and trial.trial_id not in self.waiting:
                return trial
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING:
                return trial
        return None

    def debug_string(self) -> str:
        return f"OrderedASHA: rungs {self.rungs}, {len(self.waiting)} trials waiting for earlier ones"

    def _end(self, tune_controller, trial: Trial) -> None:
        self.ended.add(self.order.setdefault(trial.trial_id, len(self.order)))
        self.waiting.pop(trial.trial_id, None)
        self._judge_waiting(tune_controller)

    def _ready(self, i: int, rung: int) -> bool:
        """Whether every earlier trial has reached ``rung`` or ended (or was stopped before it)."""
        return all(j in self.recorded[rung] or j in self.ended or self._stopped_before(j, rung) for j in range(i))

    def _stopped_before(self, j: int, rung: int) -> bool:
        return any(self.decided.get((j, r)) == TrialScheduler.STOP for r in self.rungs if r < rung)

    def _decide(self, i: int, rung: int) -> str:
        """Ray's rule against the earlier trials' values at ``rung`` only."""
        value, se = self.recorded[rung][i]
        earlier = [v for j, (v, _) in self.recorded[rung].items() if j < i]
        decision = TrialScheduler.CONTINUE
        if earlier:
            cutoff = float(np.nanpercentile(earlier, (1 - 1 / self.rf) * 100))
            if value + self.noise_z * se < cutoff:
                decision = TrialScheduler.STOP
        self.decided[(i, rung)] = decision
        return decision

    def _judge_waiting(self, tune_controller) -> None:
        """Judge every paused trial whose earlier trials are all past its rung: stop it there, or let it resume."""
        trials = {t.trial_id: t for t in tune_controller.get_trials()} if tune_controller is not None else {}
        for trial_id, rung in sorted(self.waiting.items(), key=lambda item: self.order[item[0]]):
            i = self.order[trial_id]
            if trial_id not in self.waiting or not self._ready(i, rung):  # judged meanwhile, or not yet
                continue
            del self.waiting[trial_id]
            if self._decide(i, rung) == TrialScheduler.STOP and trial_id in trials:
                tune_controller.stop_trial(trials[trial_id])
