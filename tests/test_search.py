"""The search on real Ray Tune, Optuna, ASHA and MLflow, in process: pruning, retries, resume, settings, two nodes."""

from __future__ import annotations

import csv
import json
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
    from conftest import leave_shared_ray
    from ray.cluster_utils import Cluster

    leave_shared_ray()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    yield cluster
    leave_shared_ray()  # a driver of this process still joined to the cluster goes before it
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
    ("search.sampler=cmaes", ["search.sampler must be one of auto, random, qmc, tpe, tpe-independent, gp, got "
                              "'cmaes'"]),
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


@pytest.mark.slow
def test_two_runs_of_a_reproducible_search_two_trials_at_a_time_give_identical_trial_tables(separable, tmp_path,
                                                                                            shared_ray):
    """search.reproducible=true: trials reach rungs in a different order in each run (random pauses after every
    report), yet ASHA stops the same trials at the same evaluations and every trial ends with the same scores."""
    from emotune.config import load_config
    from emotune.search.driver import run_search

    from faults import jittered

    corpus, shared_runs = separable
    tables = []
    for run in ("first", "second"):
        cfg = load_config(search_args(corpus, tmp_path / run, shared_runs / "cache" / "features",
                                      "search.num_samples=6", "search.max_concurrent=2", "search.reproducible=true",
                                      "trial.max_epochs=6", "search.grace_period=1", "search.reduction_factor=2",
                                      ), "search")
        run_search(cfg, train=jittered(0.5))
        with (tmp_path / run / "ray" / "smoke" / "summary" / "trials.csv").open() as f:
            rows = list(csv.DictReader(f))
        tables.append(sorted((json.dumps({k: v for k, v in r.items() if k.startswith("param:")}, sort_keys=True),
                              r["epochs"], r["best_val_score"], r["status"]) for r in rows))
    assert tables[0] == tables[1]
    assert len(tables[0]) == 6
    assert any(float(epochs) < 6 for _, epochs, _, _ in tables[0])  # ASHA did stop trials, the same ones both times
