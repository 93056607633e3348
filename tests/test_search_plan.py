"""The search's time plan: ASHA's share checked against Ray's own scheduler, and the plan of a smoke search against
the smoke search itself."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from emotune.config import load_config
from emotune.search.algorithms import asha_rungs, make_scheduler
from emotune.search.plan import asha_share, survival_chances


def _ray_asha_evaluations(cfg: dict, trials: int, concurrent: int, rng: np.random.Generator) -> dict[int, int]:
    """Evaluations each trial runs when Ray's ASHA (as the search builds it) judges values drawn afresh at every
    evaluation; ``concurrent`` trials run side by side, one evaluation each in turn, as equally fast trials do."""
    from ray.tune.schedulers import TrialScheduler

    scheduler = make_scheduler(cfg)
    max_t = int(cfg["trial"]["max_epochs"])
    queue, running, done = list(range(trials)), [], {}
    while queue or running:
        while queue and len(running) < concurrent:
            trial = SimpleNamespace(trial_id=f"t{queue.pop(0)}", evaluations=0)
            scheduler.on_trial_add(None, trial)
            running.append(trial)
        for trial in list(running):
            trial.evaluations += 1
            result = {"evaluation": trial.evaluations, "best_val_f1": float(rng.random())}
            stop = scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP
            if stop or trial.evaluations >= max_t:
                scheduler.on_trial_complete(None, trial, result)
                running.remove(trial)
                done[trial.trial_id] = trial.evaluations
    return done


@pytest.mark.parametrize("grace, factor, max_epochs, trials", [(1, 2, 8, 12), (2, 3, 18, 15)])
def test_asha_share_matches_rays_scheduler(grace, factor, max_epochs, trials):
    cfg = load_config([f"search.grace_period={grace}", f"search.reduction_factor={factor}",
                       f"trial.max_epochs={max_epochs}", "search.metric=best_val_f1"], "search")
    rungs = asha_rungs(make_scheduler(cfg))
    planned = asha_share(trials, rungs, max_epochs, factor)
    assert planned.rungs == [r for r in rungs if r < max_epochs] and len(planned.rungs) >= 2  # a ladder, not one cut

    rng = np.random.default_rng(0)
    replays = [_ray_asha_evaluations(cfg, trials, 3, rng) for _ in range(400)]
    totals = np.array([sum(r.values()) for r in replays], dtype=float)
    se = totals.std(ddof=1) / np.sqrt(len(totals))
    assert abs(totals.mean() - planned.evaluations) < 4 * se + 0.01 * planned.evaluations, \
        (totals.mean(), planned.evaluations, se)
    for rung, expected in zip(planned.rungs, planned.reach):
        reached = np.array([sum(e >= rung for e in r.values()) for r in replays], dtype=float)
        assert abs(reached.mean() - expected) < 4 * reached.std(ddof=1) / np.sqrt(len(reached)) + 0.05, (rung, expected)
    finished = np.array([sum(e >= max_epochs for e in r.values()) for r in replays], dtype=float)
    assert abs(finished.mean() - planned.finish) < 4 * finished.std(ddof=1) / np.sqrt(len(finished)) + 0.05
    assert 0 < planned.share < 1


def test_survival_chances_follow_rays_percentile():
    # reduction factor 2: the first trial always goes on, every later one half the time (the median of those before)
    assert survival_chances(4, 2) == [1.0, 0.5, 0.5, 0.5]
    # factor 3 keeps a third at most, and more for the early arrivals
    chances = survival_chances(5, 3)
    assert chances[0] == 1.0 and chances[1] == pytest.approx(0.5) and chances[-1] == pytest.approx(6 / 15)
    # no rung below max_t: every trial runs to the end
    none = asha_share(5, [], 10, 2)
    assert none.evaluations == 50 and none.share == 1.0 and none.finish == 5


@pytest.mark.slow
def test_a_planned_smoke_search_takes_about_its_planned_time(separable, tmp_path):
    """`emotune plan` then the search it planned, each as a user runs them; the search prints its plan at the start
    and the planned and actual times side by side at the end."""
    import subprocess
    import sys

    from conftest import search_args

    corpus, _ = separable
    args = [a for a in search_args(corpus, tmp_path / "runs", tmp_path / "cache") if not a.startswith("search.plan_")]
    args += ["search.num_samples=4", "search.max_concurrent=2", "search.name=planned"]
    plan_file = tmp_path / "plan.json"
    planned = subprocess.run([sys.executable, "-m", "emotune", "plan", *args, "--json", str(plan_file)],
                             capture_output=True, text=True, timeout=300)
    assert planned.returncode == 0, planned.stderr
    assert "Search time plan" in planned.stdout and "rung at epoch 1" in planned.stdout
    plan = json.loads(plan_file.read_text())
    assert plan["total_seconds"] > 0 and plan["device_hours"] > 0 and plan["total_gb"] >= 0  # cache keys kept
    assert plan["search"]["trials"] == 4 and plan["search"]["concurrency"] == 2
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))

    started = time.perf_counter()
    searched = subprocess.run([sys.executable, "-m", "emotune.search", *args], capture_output=True, text=True,
                              timeout=600)
    measured = time.perf_counter() - started
    assert searched.returncode == 0, searched.stderr[-3000:]
    out = searched.stdout
    assert out.index("Search time plan") < out.index("ASHA rungs at")  # printed at the start, with the cache plan
    assert "Planned " in out and " took " in out and "actual/planned" in out
    ratio = measured / plan["total_seconds"]
    assert 0.5 <= ratio <= 2.0, (measured, plan["total_seconds"], out[-2000:])


def test_ordered_asha_cuts_exactly_as_asha_does_one_trial_at_a_time_whatever_the_arrival_order():
    """search.reproducible: trials interleaved at random, three at a time, a trial paused whenever it reaches a rung
    before an earlier one; each trial still ends where Ray's ASHA ends it when trials run one after another."""
    from ray.tune.schedulers import TrialScheduler

    from emotune.search.ordered import OrderedASHA

    cfg = load_config(["search.grace_period=1", "search.reduction_factor=2", "trial.max_epochs=8",
                       "search.metric=best_val_f1"], "search")
    rng = np.random.default_rng(1)
    values = rng.random((12, 8))
    sequential = {}
    reference = make_scheduler(cfg)
    for i in range(12):
        trial = SimpleNamespace(trial_id=f"t{i}")
        reference.on_trial_add(None, trial)
        for t in range(8):
            result = {"evaluation": t + 1, "best_val_f1": float(values[i, t])}
            if reference.on_trial_result(None, trial, result) == TrialScheduler.STOP or t == 7:
                reference.on_trial_complete(None, trial, result)
                sequential[i] = t + 1
                break
    assert len(set(sequential.values())) > 1  # ASHA did cut trials at several rungs

    for seed in range(5):
        order = np.random.default_rng(seed)
        scheduler = OrderedASHA("best_val_f1", "max", [1, 2, 4], 2)
        queue, running, paused, ended = list(range(12)), [], {}, {}
        while queue or running or paused:
            for i, rung in list(paused.items()):  # a paused trial resumes or ends once it is judged
                decision = scheduler.decided.get((i, rung))
                if decision == TrialScheduler.CONTINUE:
                    running.append([i, rung])
                    del paused[i]
                elif decision == TrialScheduler.STOP:
                    ended[i] = rung
                    scheduler.on_trial_remove(None, SimpleNamespace(trial_id=f"t{i}"))
                    del paused[i]
            while queue and len(running) + len(paused) < 3:
                i = queue.pop(0)
                scheduler.on_trial_add(None, SimpleNamespace(trial_id=f"t{i}"))
                running.append([i, 0])
            if not running:
                continue
            trial = running[int(order.integers(len(running)))]  # whichever trial happens to report next
            trial[1] += 1
            i, t = trial
            result = {"evaluation": t, "best_val_f1": float(values[i, t - 1])}
            decision = scheduler.on_trial_result(None, SimpleNamespace(trial_id=f"t{i}"), result)
            if decision == TrialScheduler.PAUSE:
                running.remove(trial)
                paused[i] = t
            elif decision == TrialScheduler.STOP or t == 8:
                running.remove(trial)
                ended[i] = t
                scheduler.on_trial_complete(None, SimpleNamespace(trial_id=f"t{i}"), result)
        assert ended == sequential, seed
