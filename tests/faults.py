"""Failures and holds injected into real trials, from the test side only: the shipped trainable is wrapped, never
changed."""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import ray.cloudpickle


def crash_once_at(epoch: int, marker: str | Path):
    """``emotune.trial.trainable``, except that the first trial to report ``epoch`` crashes just after reporting it.

    ``marker`` (a file created by the first crash) makes it happen once per search: the retry then resumes
    from the trial's checkpoint of that epoch.
    """
    marker = str(Path(marker).resolve())

    def crash(metrics: dict) -> None:
        if metrics.get("epoch") != epoch:
            return
        try:
            open(marker, "x").close()
        except FileExistsError:
            return
        raise RuntimeError(f"crash_once_at({epoch}): deliberate crash to exercise retries")

    return _wrapped_report(crash)


def _wrapped_report(on_report):
    """``emotune.trial.trainable`` with ``on_report(metrics)`` called after each of the trial's reports to Tune."""

    def trainable_with_hook(config: dict, launch=None):
        from ray import tune

        from emotune.trial import trainable

        real_report = tune.report

        def report(metrics, *args, **kwargs):
            real_report(metrics, *args, **kwargs)
            on_report(metrics)

        tune.report = report
        try:
            return trainable(config, launch)
        finally:
            tune.report = real_report

    return trainable_with_hook


def _trial_number(gate: Path, trial_id: str) -> int:
    """Trials numbered 0, 1, ... in the order they first ask; a trial Tune starts again keeps its number."""
    for number in itertools.count():
        slot = gate / f"trial-{number}"
        try:
            with open(slot, "x") as f:
                f.write(trial_id)
            return number
        except FileExistsError:
            if slot.read_text() == trial_id:
                return number


def held_at(evaluation: int, gate: str | Path):
    """``emotune.trial.trainable``, except that a trial can be held just after it reports ``evaluation``.

    Trials are numbered in the order they reach ``evaluation``. Trial k waits there, after creating ``gate/held-k``,
    for as long as the file ``gate/hold-k`` exists. A test thereby chooses which trials have finished and which one
    is under way when it interrupts a search, instead of guessing from the time.
    """
    gate = Path(gate).resolve()

    def hold(metrics: dict) -> None:
        from ray import tune

        if metrics.get("evaluation") != evaluation:
            return
        number = _trial_number(gate, tune.get_context().get_trial_id())
        if (gate / f"hold-{number}").exists():
            (gate / f"held-{number}").touch()
            while (gate / f"hold-{number}").exists():
                time.sleep(0.1)

    return _wrapped_report(hold)


def fail_after_first_report():
    """``emotune.trial.trainable``, except that every trial raises right after its first report: a trial that has a
    score and still failed."""

    def fail(metrics: dict) -> None:
        raise RuntimeError("fail_after_first_report: this trial always fails")

    return _wrapped_report(fail)


def driver_script(path: Path, train_expression: str) -> list[str]:
    """A ``python -m emotune.search`` of its own at ``path`` whose trials run ``train_expression`` (an expression
    over this module, e.g. ``held_at(2, '/tmp/gate')``); returns the command that runs it."""
    path.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                    "from faults import *\nfrom emotune.search.driver import main\n"
                    f"sys.exit(main(sys.argv[1:], train={train_expression}))\n")
    return [sys.executable, str(path)]


# Ray workers cannot import this test module: send its functions by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def jittered(most_seconds: float = 0.6):
    """``emotune.trial.trainable``, except that every report is followed by a random pause of up to
    ``most_seconds`` (unseeded): which trial reaches a rung first changes from run to run, as it changes with a
    machine's load."""
    import random

    def pause(metrics: dict) -> None:
        time.sleep(random.random() * most_seconds)

    return _wrapped_report(pause)
