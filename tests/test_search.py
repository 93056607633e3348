"""The search on real Ray Tune, Optuna, ASHA and MLflow: pruning, retries, SIGKILL and resume, two nodes."""

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

from emotune.config import load_config
from emotune.errors import EmotuneError
from emotune.search.driver import run_search


def mlflow_runs(runs: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("emotune")
    found = client.search_runs([experiment.experiment_id], max_results=500)
    parents = [r for r in found if r.data.tags.get("emotune.kind") == "search"]
    children = [r for r in found if r.data.tags.get("emotune.kind") == "trial"]
    return client, parents, children


def assert_one_tree(client, parents, children, n_trials: int) -> None:
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == n_trials
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert len({c.data.tags["emotune.run_key"] for c in children}) == n_trials  # no duplicated trial runs
    assert all(c.info.status == "FINISHED" for c in children)  # none orphaned in RUNNING
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_f1")]
        assert sorted(steps) == list(range(1, len(steps) + 1))  # every epoch logged exactly once


def test_search_prunes_retries_and_logs_one_tree(smoke_search):
    runs, summary = smoke_search
    assert summary["trials"] == 6 and summary["failed"] == 0 and summary["best"]["best_val_f1"] >= 0.8

    client, parents, children = mlflow_runs(runs)
    assert_one_tree(client, parents, children, 6)
    stopped = [c for c in children if c.data.tags.get("emotune.stopped_by") == "asha"]
    assert stopped and all(c.data.metrics["epochs_trained"] < 4 for c in stopped)  # ASHA stopped some early
    # ASHA's clock is the dev evaluation (two per epoch here): its cuts fall on rungs 1, 2, 4 of 8, even mid-epoch
    assert {2 * c.data.metrics["epochs_trained"] for c in stopped} <= {1, 2, 4}
    complete = [c for c in children if c not in stopped]
    for child in complete:
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "best")}
        assert {"best/model.safetensors", "best/dev_predictions.csv"} <= artifacts
    # the conditional parameter: only attention trials sample hidden_layers
    import csv

    with (runs / "ray" / "smoke" / "summary" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    families = {r["param:model.family"] for r in rows}
    assert families == {"attention", "cognicic"}
    assert all((r["param:model.hidden_layers"] != "") == (r["param:model.family"] == "attention") for r in rows)
    # the deliberately crashed trial was retried from its checkpoint and finished
    errors = list((runs / "ray" / "smoke").glob("*/error.txt"))
    assert len(errors) == 1 and "deliberate crash" in errors[0].read_text()
    # it went on from its epoch-2 checkpoint (whether Ray's result.json then keeps evaluations 1-4 varies), and
    # its MLflow curve holds evaluations 1..8 once each (assert_one_tree)
    rows = _result_rows(errors[0].parent)
    assert rows[-1]["epoch"] == 4 and rows[-1]["evaluation"] == 8 and rows[-1]["resumed_from_epoch"] == 2
    assert [row["evaluation"] for row in rows] in (list(range(1, 9)), [5, 6, 7, 8])
    assert [row["epoch"] for row in rows][-4:] == [2.5, 3, 3.5, 4]
    assert parents[0].data.metrics["trials"] == 6
    assert parents[0].data.tags["emotune.space"] == "smoke"
    assert parents[0].data.params["asha_rungs"] == "1,2,4,8"  # the ladder went to the search's run
    # no trial has early stopping here (smoke: trial.early_stop=null): every short trial was an ASHA cut
    assert summary["cut_by_asha"] == len(stopped) and summary["early_stopped"] == 0


def optuna_states(experiment: Path) -> dict[str, tuple[str, dict, float | None]]:
    """Per Ray trial id, what the Optuna study that Tune saved with the search says of it: state, intermediate
    values and value."""
    import pickle

    saved = pickle.loads(next(experiment.glob("searcher-state-*.pkl")).read_bytes())
    trials = saved["_ot_study"].trials
    return {trial_id: (trials[t.number].state.name, trials[t.number].intermediate_values, trials[t.number].value)
            for trial_id, t in saved["_ot_trials"].items()}


def test_optuna_hears_which_trials_asha_cut_and_a_resumed_search_keeps_it(smoke_search, separable, shared_ray):
    from conftest import smoke_search_args

    runs, summary = smoke_search
    experiment = runs / "ray" / "smoke"
    rows = {r["trial_id"]: r for r in _read_csv(experiment / "summary" / "trials.csv")}
    states = optuna_states(experiment)
    assert set(states) == set(rows)
    for trial_id, (state, steps, value) in states.items():
        evaluations = 2 * float(rows[trial_id]["epochs"])  # two per epoch; Optuna's steps count Ray's reports
        if evaluations < 8:  # cut by ASHA: pruned, with the scores it had reached, not completed with an early one
            assert state == "PRUNED" and len(steps) >= 1, (trial_id, state, steps)
        else:
            assert state == "COMPLETE" and value == pytest.approx(float(rows[trial_id]["best_val_score"]))
    assert summary["cut_by_asha"] == sum(s == "PRUNED" for s, _, _ in states.values()) >= 1

    # the same command again resumes the finished search: nothing is proposed again and the study is as it was
    again = run_search(load_config(smoke_search_args(separable, runs), "search"))
    assert again["trials"] == 6
    assert optuna_states(experiment) == states


def _read_csv(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def test_resuming_with_other_settings_is_refused(smoke_search, separable, capsys, shared_ray):
    runs, _ = smoke_search
    corpus, shared_runs = separable
    args = search_args(corpus, runs, shared_runs / "cache" / "features", "search.num_samples=6",
                       "search.max_concurrent=1", "search.max_failures=1", "trial.evals_per_epoch=2")
    capsys.readouterr()
    typed = "python -m emotune.search " + " ".join(args + ["trial.max_epochs=9"])
    with pytest.raises(EmotuneError, match=r"already exists .*trial\.max_epochs: 4 -> 9") as refused:
        run_search(load_config(args + ["trial.max_epochs=9"], "search"), command=typed)
    # the way on is the typed command under a free name, and the refusal comes before the corpus and the plans
    assert str(refused.value).endswith(f"\n  {typed} search.name=smoke-2")
    printed = capsys.readouterr().out
    assert "emotune search 'smoke'" in printed and "corpus " not in printed and "to encode" not in printed
    # where it runs may change: a finished search resumed elsewhere just reports again
    again = run_search(load_config(args + ["search.max_concurrent=2"], "search"))
    assert again["trials"] == 6


def _result_rows(trial_dir: Path) -> list[dict]:
    """The rows a trial reported, from Ray's result.json in its folder."""
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


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
    third.communicate(timeout=30)
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
def test_a_trial_that_always_fails_is_never_the_best(separable, tmp_path, capsys, shared_ray):
    from faults import fail_after_first_report

    corpus, shared_runs = separable
    cfg = load_config(search_args(corpus, tmp_path / "runs", shared_runs / "cache" / "features",
                                  "search.num_samples=2", "search.max_concurrent=1", "search.max_failures=0",
                                  "trial.max_epochs=2", "search.grace_period=2"), "search")  # no ASHA cut first
    summary = run_search(cfg, train=fail_after_first_report())
    printed = capsys.readouterr().out
    assert summary["failed"] == 2 and summary["best"] is None, printed[-3000:]
    assert summary["cut_by_asha"] == 0 and summary["early_stopped"] == 0
    assert "Best trial" not in printed and "2 failed" in printed
    _, parents, children = mlflow_runs(tmp_path / "runs")
    assert "best_val_f1" not in parents[0].data.metrics and parents[0].data.metrics["trials_failed"] == 2
    # each had a dev score when it failed: a score alone did not make it a candidate
    assert all("best_val_f1" in c.data.metrics for c in children)


@pytest.fixture
def two_node_cluster():
    """A real two-node Ray cluster (one CPU each) on this machine, shut down afterwards."""
    import ray
    from conftest import leave_shared_ray
    from ray.cluster_utils import Cluster

    leave_shared_ray()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


def test_two_searches_share_a_cluster_without_mixing(separable, two_node_cluster, tmp_path):
    corpus, shared_runs = separable
    runs = tmp_path / "runs"
    drivers = {}
    for name, speech in (("with_fbank", "fbank"), ("with_mfcc", "mfcc")):
        args = search_args(corpus, runs, shared_runs / "cache" / "features", f"search.name={name}",
                           f"encoders.speech={speech}", "search.num_samples=2", "search.max_concurrent=1",
                           "trial.max_epochs=2", f"ray.address={two_node_cluster.address}",
                           # one machine's cluster: both drivers and every node see the same SQLite file
                           "tracking.allow_file_store_on_cluster=true")
        drivers[name] = subprocess.Popen([sys.executable, "-m", "emotune.search", *args], stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    for name, driver in drivers.items():
        output, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, output[-3000:]
    client, parents, children = mlflow_runs(runs)
    assert len(parents) == 2 and len(children) == 4
    for parent in parents:
        mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        speech = parent.data.tags["emotune.search"].split("_")[1]
        # each search's trials ran its own configuration (its payload was not replaced by the other's)
        assert len(mine) == 2 and all(c.data.params["encoders.speech"] == speech for c in mine)
        assert all(c.data.tags["emotune.search"] == parent.data.tags["emotune.search"] for c in mine)


@pytest.mark.parametrize("override, expected", [
    ("search.num_sample=3", ["num_sample", "num_samples", "under 'search'"]),
    ("space=nope", ["Could not find 'space/nope'", "encoders", "smoke"]),
    ("encoders.speech=wavlm-huge", ["unknown speech encoder 'wavlm-huge'", "xlsr", "fbank"]),
    ("encoders.speech_choices=[fbank,whisper]", ["unknown speech encoder 'whisper'"]),
    ("search.metric=accuracy", ["search.metric must be one of best_val_score, val_f1, val_f1_ema, best_val_f1"]),
    ("model.modalities=[speech,video]", ["model.modalities must be a non-empty subset of [speech, text]"]),
    ("trial.lr=fast", ["trial.lr must be a number, got 'fast'", "trial.lr=..."]),
    ("search.num_samples=2.5", ["search.num_samples must be a whole number, got 2.5"]),
    ("features.verify=maybe", ["features.verify must be true or false, got 'maybe'"]),
    ("+trial.learning_rate=0.1", ["unknown key trial.learning_rate", "lr, lr_decay, max_epochs"]),
    # settings whose type is right and value is not: caught as the config loads, not as a traceback later
    ("search.grace_period=0", ["search.grace_period=0 is out of range: it must be at least 1 (the dev evaluations",
                               "search.grace_period=..."]),
    ("search.reduction_factor=1", ["search.reduction_factor=1 is out of range: it must be above 1"]),
    ("trial.evals_per_epoch=0", ["trial.evals_per_epoch=0 is out of range: it must be at least 1"]),
    ("features.gpu_per_worker=0", ["features.gpu_per_worker=0 is out of range: it must be above 0"]),
    ("features.cpu_workers=0", ["features.cpu_workers=0 is out of range: it must be at least 1, or null"]),
    ("ray.storage=s3://bucket/emotune", ["ray.storage=s3://bucket/emotune", "shared filesystem",
                                         "ray.storage=/shared/emotune/ray"]),
    ("features.gpu_per_worker=-0.5", ["features.gpu_per_worker=-0.5 is out of range"]),
    ("search.sampler=cmaes", ["search.sampler must be one of tpe, random, qmc, gp, got 'cmaes'"]),
    ("search.scheduler=hyperband", ["search.scheduler must be one of asha, noise_asha, none"]),
    ("trial.select_by=accuracy", ["trial.select_by must be one of val_f1, val_f1_ema, val_f1_mean3, val_f1_lcb"]),
    ("search.noise_z=-1", ["search.noise_z=-1 is out of range: it must be 0 or more"]),
    ("search.ties_confidence=1.5", ["search.ties_confidence=1.5 is out of range"]),
    ("search.scheduler=noise_asha search.metric=val_loss", ["noise_asha measures noise in dev macro-F1"]),
])
def test_bad_search_settings_are_clear_errors(tmp_path, override, expected):
    with pytest.raises(EmotuneError) as caught:  # before any Ray, MLflow or cache work
        run_search(load_config([*override.split(), f"paths.runs_dir={tmp_path}"], "search"))
    for fragment in expected:
        assert fragment in str(caught.value), str(caught.value)
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def test_more_evaluations_per_epoch_than_batches_fails_before_the_cache_and_ray(separable, tmp_path):
    corpus, _ = separable
    runs = tmp_path / "runs"
    # 36 training clips in batches of 8 (search_args): 5 batches an epoch, so at most 5 evaluations
    cfg = load_config(search_args(corpus, runs, tmp_path / "cache", "trial.evals_per_epoch=6"), "search")
    with pytest.raises(EmotuneError, match=r"trial.evals_per_epoch=6 is out of range: an epoch of the training split "
                                           r"\(36 clips\) has 5 batches of trial.batch_size=8 clips. Set "
                                           r"trial.evals_per_epoch between 1 and 5"):
        run_search(cfg)
    assert not (runs / "ray").exists() and not (runs / "mlflow.db").exists() and not (tmp_path / "cache").exists()


def test_a_bad_setting_exits_2_with_the_message_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "emotune.search", "trial.lr=fast", f"paths.runs_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "trial.lr must be a number, got 'fast'" in result.stderr, result.stderr


def test_a_spaces_folder_of_your_own_adds_spaces_and_overrides_shipped_ones(tmp_path):
    import shutil

    from emotune.search.driver import spaces_dir

    mine = tmp_path / "my_spaces" / "space"
    mine.mkdir(parents=True)
    shipped = (spaces_dir() / "smoke.yaml").read_text()
    (mine / "tiny_lr.yaml").write_text(shipped.replace("name: smoke", "name: tiny_lr"))
    shutil.copy(spaces_dir() / "smoke.yaml", mine / "smoke.yaml")
    with (mine / "smoke.yaml").open("a") as f:
        f.write("  max_concurrent: 3   # differs from the shipped smoke space\n")
    where = f"paths.spaces_dir={mine.parent}"
    assert load_config([where, "space=tiny_lr"], "search")["space"]["name"] == "tiny_lr"
    assert load_config([where, "space=smoke"], "search")["search"]["max_concurrent"] == 3  # yours wins
    assert load_config(["space=smoke"], "search")["search"]["max_concurrent"] != 3  # without it: emotune's own
    with pytest.raises(EmotuneError, match="Could not find 'space/tiny_lr'"):  # the launch folder is not searched
        load_config(["space=tiny_lr"], "search")
    with pytest.raises(EmotuneError, match=r"paths.spaces_dir=.*nowhere/space is not a folder.*space/NAME.yaml"):
        load_config([f"paths.spaces_dir={tmp_path / 'nowhere'}", "space=smoke"], "search")


def test_a_time_budget_stops_proposing_once_its_seconds_are_spent():
    """search.time_budget_s wraps the real sampler: proposals until the budget, which starts at the first one."""
    from ray.tune.search import Searcher

    from emotune.search.budget import TimeBudget
    from emotune.search.driver import make_searcher

    searcher = make_searcher(load_config(["space=smoke", "search.time_budget_s=0.5"], "search"))
    assert isinstance(searcher, TimeBudget)
    time.sleep(0.7)  # the clock starts at the first proposal, not when the searcher is made (the cache fill)
    first = searcher.suggest("a")
    assert isinstance(first, dict) and first
    searcher.on_trial_complete("a", {"best_val_score": 0.5, "evaluation": 1, "training_iteration": 1})
    time.sleep(0.6)
    assert searcher.suggest("b") is Searcher.FINISHED
