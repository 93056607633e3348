"""The search as a user runs it, a command in a process of its own: interrupted by Ctrl-C, SIGTERM and SIGKILL and
resumed, started twice, ended by its time budget, with a crashing trial, and run again bigger after the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import search_args
from test_search import assert_one_tree, mlflow_runs


def _ray_trial_ids(experiment: Path) -> list[str]:
    """The trials Ray started in this search: one folder each, named by its id (emotune's trial_dirname_creator)."""
    return [p.parent.name for p in experiment.glob("*/params.json")]


def _finished_curves(runs: Path) -> dict[str, list[float]]:
    """Each finished trial's dev macro-F1 curve by MLflow run id, as the trial logged it. (Ray's result.json is
    written by the driver: a SIGKILL can cut its last rows, and a resumed trial's may lack its first epochs.)"""
    client, _, children = mlflow_runs(runs)
    return {c.info.run_id: [m.value for m in sorted(client.get_metric_history(c.info.run_id, "val_f1"),
                                                    key=lambda m: m.step)]
            for c in children if c.info.status == "FINISHED"}


def _wait_for(path: Path, process) -> None:
    """Wait until ``path`` exists (a trial held at the test's gate); fail if the driver ends first."""
    deadline = time.time() + 300
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the search ended (exit {process.returncode}) before {path.name}:\n{(out + err)[-3000:]}")
        if time.time() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"no {path.name} after 300 s")
        time.sleep(0.2)


def _gated_search(separable, tmp_path: Path, hold_at: int, *overrides: str) -> tuple[list[str], Path, Path]:
    """The command of a smoke search, one trial at a time, whose trials the test can hold at its gate after
    evaluation ``hold_at`` (faults.held_at); with its runs folder and the gate folder."""
    from faults import driver_script

    corpus, shared_runs = separable
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    gate.mkdir()
    command = driver_script(tmp_path / "driver.py", f"held_at({hold_at}, {str(gate)!r})")
    return [*command, *search_args(corpus, runs, shared_runs / "cache" / "features", "search.max_concurrent=1",
                                   *overrides)], runs, gate


def _wait_for_saved(experiment: Path, process, terminated: int) -> None:
    """Wait until Tune's saved experiment state records ``terminated`` finished trials: a trial that finished after
    the last save is, to a resumed search, one it never recorded (its run is discarded and it is proposed again)."""
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        for state in sorted(experiment.glob("experiment_state-*.json"))[-1:]:
            try:
                trials = [json.loads(trial) for trial, _ in json.loads(state.read_text())["trial_data"]]
            except (OSError, ValueError, KeyError):
                continue  # being replaced
            if sum(t.get("status") == "TERMINATED" for t in trials) >= terminated:
                return
        time.sleep(0.5)
    pytest.fail(f"Tune's saved state never recorded {terminated} finished trials")


@pytest.mark.slow
def test_a_search_stopped_by_ctrl_c_sigterm_then_sigkill_resumes_each_time_without_duplicates(separable, tmp_path):
    """Ctrl-C, then SIGTERM, then SIGKILL, each in the middle of a trial, and the same command resumes every time.

    Trials are held at the test's gate after their second of 4 epochs: which trials have finished and which one is
    under way at each interruption is a state the test sets, not a race against the machine's speed."""
    from ray import tune

    args, runs, gate = _gated_search(separable, tmp_path, 2, "search.num_samples=6", "trial.max_epochs=4",
                                     "search.grace_period=4")
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    experiment = runs / "ray" / "smoke"

    def start():
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=env, cwd=tmp_path)

    def assert_stopped_cleanly(driver, out: str, err: str) -> None:
        assert driver.returncode == 130, (out + err)[-3000:]
        assert "search interrupted; run the same command again to resume it." in err
        assert "Traceback" not in out + err and "SIGTERM received" not in out + err
        assert not (runs / "ray" / "smoke.lock").exists()  # released on the way out
        _, parents, children = mlflow_runs(runs)
        assert [p.info.status for p in parents] == ["KILLED"]
        assert all(c.info.status != "RUNNING" for c in children)  # no trial run left looking alive
        assert tune.Tuner.can_restore(str(experiment))  # Tune saved its state

    # Ctrl-C (SIGINT to the terminal's whole process group) once trial 0 has finished and trial 1 is under way
    (gate / "hold-1").touch()
    first = start()
    _wait_for(gate / "held-1", first)
    os.killpg(first.pid, signal.SIGINT)
    assert_stopped_cleanly(first, *first.communicate(timeout=120))
    assert len(_finished_curves(runs)) == 1

    # the same command resumes; SIGTERM, as kill, systemd, docker stop and SLURM send it (to the driver alone),
    # stops it as Ctrl-C does while trial 2 is under way
    (gate / "hold-1").unlink()
    (gate / "hold-2").touch()
    second = start()
    _wait_for(gate / "held-2", second)
    os.kill(second.pid, signal.SIGTERM)
    out, err = second.communicate(timeout=120)
    assert "resuming from" in out
    assert_stopped_cleanly(second, out, err)
    assert len(_finished_curves(runs)) == 2  # trials 0 and 1 (resumed)

    # resumed again; this time the driver is killed outright while trial 3 is under way
    (gate / "hold-2").unlink()
    (gate / "hold-3").touch()
    third = start()
    _wait_for(gate / "held-3", third)
    _wait_for_saved(experiment, third, terminated=3)
    os.killpg(third.pid, signal.SIGKILL)
    out, _ = third.communicate(timeout=30)
    assert "resuming from" in out  # after SIGTERM too, the same command resumed the search
    lock = json.loads((runs / "ray" / "smoke.lock").read_text())
    assert lock["pid"] == third.pid  # the killed driver could not release its lock
    done_before = _finished_curves(runs)
    assert len(done_before) == 3, done_before  # trials 0, 1 and 2 (resumed); trial 3 was under way

    (gate / "hold-3").unlink()
    resumed = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert f"taking over the lock of a driver that is gone (pid {third.pid}" in resumed.stdout
    assert f"taking over its lock in the MLflow store sqlite:///{runs / 'mlflow.db'} from a driver that is gone " \
           f"(pid {third.pid}" in resumed.stdout
    assert not (runs / "ray" / "smoke.lock").exists()  # released at the end
    ids = _ray_trial_ids(experiment)
    assert len(ids) == len(set(ids)) == 6  # every trial exactly once in Ray's results
    client, parents, children = mlflow_runs(runs)
    assert_one_tree(client, parents, children, 6)
    # the trials finished before the kill were not re-run: the same MLflow runs with the same curves
    done_after = _finished_curves(runs)
    assert {k: done_after.get(k) for k in done_before} == done_before


@pytest.mark.slow
def test_the_same_search_started_twice_runs_once_and_a_time_budget_ends_it_with_a_summary(separable, tmp_path):
    corpus, shared_runs = separable
    runs = tmp_path / "runs"
    # a budget of seconds for 40 trials; ASHA judges val_loss; trials also end by their own early stopping
    args = [sys.executable, "-m", "emotune.search",
            *search_args(corpus, runs, shared_runs / "cache" / "features", "search.num_samples=40",
                         "search.max_concurrent=1", "search.time_budget_s=8", "search.metric=val_loss",
                         "trial.early_stop=1")]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lock = runs / "ray" / "smoke.lock"
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert lock.exists(), "the first driver never took its lock"
    second = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    output, _ = first.communicate(timeout=600)  # everything the first driver printed, until it exited
    assert second.returncode == 2
    assert f"search 'smoke' is already running: its driver is pid {first.pid} on host" in second.stderr
    assert "search.name=NEW_NAME" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "Exception ignored" not in output and "SystemExit" not in output
    assert "Search 'smoke' done" in output and "emotune select-top --k 3 --search smoke" in output
    assert "ASHA rungs at epochs 1, 2, 4; max 4 (it judges val_loss, minimised" in output
    client, parents, children = mlflow_runs(runs)
    n = len(children)
    assert 1 <= n < 40 and f": {n} trials, " in output
    assert_one_tree(client, parents, children, n)
    assert f"The time budget (search.time_budget_s=8) was spent after {n} of the 40 trials" in output
    # the trials' own early stopping and ASHA's cuts are told apart
    early = {c.info.run_id for c in children if c.data.metrics.get("patience_stopped") == 1.0}
    cut = {c.info.run_id for c in children if c.data.tags.get("emotune.stopped_by") == "asha"}
    assert early and not early & cut
    assert f"{len(cut)} cut by ASHA, {len(early)} ended by their own early stopping" in output


@pytest.mark.slow
def test_a_bigger_search_after_the_demo_runs_as_the_refusal_says(separable, tmp_path):
    """The README's order: scripts/demo.sh, then the same with more trials. Resuming needs the same settings, so the
    second is refused before any work, with a command that, typed as shown, runs the bigger search."""
    import shlex

    corpus, shared_runs = separable
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"EMOTUNE_VENV": sys.prefix}  # the scripts' environment is this one
    args = search_args(corpus, tmp_path / "runs", shared_runs / "cache" / "features", "search.max_concurrent=1",
                       "trial.max_epochs=2", "search.grace_period=2")

    def demo(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["scripts/demo.sh", *args, *extra], capture_output=True, text=True, env=env, cwd=root,
                              timeout=600)

    first = demo("search.num_samples=1")
    assert first.returncode == 0, first.stderr[-3000:]
    bigger = demo("search.num_samples=2")
    assert bigger.returncode == 2 and "Traceback" not in bigger.stderr, bigger.stderr[-3000:]
    assert "search.num_samples: 1 -> 2" in bigger.stderr
    assert "to encode" not in bigger.stdout  # refused before the cache plan
    suggested = bigger.stderr.strip().splitlines()[-1].strip()
    assert suggested == shlex.join(["scripts/demo.sh", *args, "search.num_samples=2", "search.name=smoke-2"])
    again = subprocess.run(suggested, shell=True, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Search 'smoke-2' done" in again.stdout and ": 2 trials, " in again.stdout


@pytest.mark.slow
def test_a_crashing_trial_shows_its_traceback_id_and_log(separable, tmp_path):
    from faults import driver_script

    corpus, shared_runs = separable
    runs = tmp_path / "runs"
    # `python -m emotune.search` whose first trial crashes at epoch 1
    command = driver_script(tmp_path / "crashing_search.py", f"crash_once_at(1, {str(tmp_path / 'crashed')!r})")
    result = subprocess.run([*command, *search_args(corpus, runs, shared_runs / "cache" / "features",
                                                    "search.num_samples=2", "search.max_failures=0")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "1 trial(s) failed" in result.stderr
    errors = list((runs / "ray" / "smoke").glob("*/error.txt"))
    assert len(errors) == 1
    trial_id = errors[0].parent.name
    assert "Traceback (most recent call last)" in output and "deliberate crash to exercise retries" in output
    assert f"trial {trial_id} failed: RuntimeError: crash_once_at(1)" in output
    assert f"traceback: {errors[0]}" in output


@pytest.mark.slow
def test_a_k_fold_search_interrupted_resumes_and_prints_its_estimate(separable, tmp_path):
    """trial.folds=3: Ctrl-C while the second trial is under way, then the same command finishes the search; the
    resumed trial's evaluations carry on, and the summary prints the bias-corrected estimate."""
    args, runs, gate = _gated_search(separable, tmp_path, 2, "search.num_samples=3", "trial.max_epochs=4",
                                     "search.grace_period=4", "trial.folds=3")
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    (gate / "hold-1").touch()
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env=env, cwd=tmp_path)
    _wait_for(gate / "held-1", first)
    os.killpg(first.pid, signal.SIGINT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130, (out + err)[-3000:]
    (gate / "hold-1").unlink()
    resumed = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    experiment = runs / "ray" / "smoke"
    ids = _ray_trial_ids(experiment)
    assert len(ids) == len(set(ids)) == 3
    assert "out-of-fold (3 folds) macro-F1" in resumed.stdout
    assert "expected on unseen clips" in resumed.stdout and "(the best of 3 trials: optimistic)" in resumed.stdout
    labelled = len((separable[0] / "train.csv").read_text().splitlines()) - 1
    for trial_id in ids:  # every evaluation of every trial, the resumed one too, scored every labelled clip
        evaluations = json.loads((runs / "trials" / "smoke" / trial_id / "evaluations.json").read_text())
        assert len(evaluations["predicted"]) == 4 and len(evaluations["ids"]) == labelled
        assert all(len(p) == labelled for p in evaluations["predicted"])
    client, parents, _ = mlflow_runs(runs)
    assert {"expected_f1", "expected_f1_low", "expected_f1_high"} <= set(parents[0].data.metrics)
