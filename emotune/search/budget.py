"""``search.time_budget_s``: a search that stops proposing trials once its time is spent."""

from __future__ import annotations

import time

from ray.tune.search import Searcher


class TimeBudget(Searcher):
    """Proposes ``searcher``'s trials until ``seconds`` after its first proposal, then none.

    Tune then lets the running trials finish (or ASHA stop them) and ends the search as usual, summary included.
    The clock is wall time and starts at the first proposal, so the cache fill is not counted. A resumed search
    keeps the deadline it had: Tune saves it with the searcher.
    """

    def __init__(self, searcher: Searcher, seconds: float) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher, self.seconds, self.deadline = searcher, seconds, None

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if self.deadline is None:
            self.deadline = time.time() + self.seconds
        if time.time() >= self.deadline:
            return Searcher.FINISHED
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:  # Tune saves each wrapper's state apart from the searcher it wraps
        return {k: v for k, v in self.__dict__.items() if k != "searcher"}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
