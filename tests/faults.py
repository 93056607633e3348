"""Failures injected into real trials, from the test side only: the shipped trainable is wrapped, never changed."""

from __future__ import annotations

import sys
from pathlib import Path

import ray.cloudpickle


def crash_once_at(epoch: int, marker: str | Path):
    """``emotune.trial.trainable``, except that the first trial to report ``epoch`` crashes just after reporting it.

    ``marker`` (a file created by the first crash) makes it happen once per search: the retry then resumes
    from the trial's checkpoint of that epoch.
    """
    marker = str(Path(marker).resolve())

    def crashing_trainable(config: dict, launch=None):
        from ray import tune

        from emotune.trial import trainable

        real_report = tune.report

        def report(metrics, *args, **kwargs):
            real_report(metrics, *args, **kwargs)
            if metrics.get("epoch") != epoch:
                return
            try:
                open(marker, "x").close()
            except FileExistsError:
                return
            raise RuntimeError(f"crash_once_at({epoch}): deliberate crash to exercise retries")

        tune.report = report
        try:
            return trainable(config, launch)
        finally:
            tune.report = real_report

    return crashing_trainable


# Ray workers cannot import this test module: send its functions by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
