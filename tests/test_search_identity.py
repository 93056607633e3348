"""A search's name is not its identity: a new search never adopts or deletes an earlier search's runs, and one name
runs once against one MLflow store, whatever Ray folder each driver uses."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import search_args
from test_search import mlflow_runs
from test_search_commands import _wait_for

from emotune.config import load_config
from emotune.search.driver import run_search


def _trial_runs(runs, include_deleted: bool = False):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("emotune")
    view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
    return [r for r in client.search_runs([experiment.experiment_id], run_view_type=view, max_results=500)
            if r.data.tags.get("emotune.kind") == "trial"]


@pytest.mark.slow
def test_a_new_search_of_an_old_name_stops_and_replace_keeps_the_old_runs(separable, tmp_path, shared_ray):
    corpus, shared_runs = separable
    runs = tmp_path / "runs"
    args = search_args(corpus, runs, shared_runs / "cache" / "features", "search.name=shared", "search.num_samples=2",
                       "search.max_concurrent=1", "trial.max_epochs=2")
    first = run_search(load_config(args, "search"))
    old_ids = {r.info.run_id for r in _trial_runs(runs)}
    assert len(old_ids) == 2 and first["trials"] == 2

    # the Ray folder moved away (to free disk, or ray.storage changed): the same name is now another search
    shutil.move(runs / "ray" / "shared", tmp_path / "moved-away")
    again = subprocess.run([sys.executable, "-m", "emotune.search", *args], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert again.returncode == 2, again.stderr[-3000:]
    message = again.stderr
    for fragment in (f"search 'shared' already exists in the MLflow store sqlite:///{runs / 'mlflow.db'} as another "
                     f"search: run {first['parent_run_id']} ('search-shared'), started ", "2 trial run(s)",
                     "Nothing was started", "put its Ray folder back", "search.name=NEW_NAME", "search.replace=true"):
        assert fragment in message, message
    assert "Traceback" not in message
    assert not (runs / "ray" / "shared").exists()  # the refused start left no folder in the old one's place
    trials = _trial_runs(runs, include_deleted=True)
    assert {r.info.run_id for r in trials} == old_ids
    assert all(r.info.lifecycle_stage == "active" and r.info.status == "FINISHED" for r in trials)
    _, parents, _ = mlflow_runs(runs)
    assert [p.info.status for p in parents] == ["FINISHED"]

    # search.replace=true: the new search runs; the old trial runs stay, tagged as a replaced search's
    replaced = run_search(load_config(args + ["search.replace=true"], "search"))
    assert replaced["trials"] == 2 and replaced["parent_run_id"] != first["parent_run_id"]
    trials = _trial_runs(runs, include_deleted=True)
    assert len(trials) == 4 and all(r.info.lifecycle_stage == "active" for r in trials)
    old = [r for r in trials if r.info.run_id in old_ids]
    assert {r.data.tags["emotune.search"] for r in old} == {next(iter(old)).data.tags["emotune.search"]}
    assert next(iter(old)).data.tags["emotune.search"].startswith("shared (replaced ")
    new = [r for r in trials if r.info.run_id not in old_ids]
    assert {r.data.tags["mlflow.parentRunId"] for r in new} == {replaced["parent_run_id"]}
    assert {r.data.tags["emotune.search"] for r in new} == {"shared"}
    # select-top's `--search shared` now means the new search
    from emotune.selection.ensemble import find_search

    assert find_search(load_config(args, "search")["tracking"], "shared").info.run_id == replaced["parent_run_id"]


@pytest.mark.slow
def test_two_drivers_of_one_name_on_two_ray_folders_against_one_store_run_once(separable, tmp_path):
    from faults import driver_script

    corpus, shared_runs = separable
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    gate.mkdir()
    common = search_args(corpus, runs, shared_runs / "cache" / "features", "search.name=same", "search.num_samples=1",
                         "trial.max_epochs=2")
    (gate / "hold-0").touch()  # the first driver's trial waits at the gate: that driver is running for sure
    first = subprocess.Popen([*driver_script(tmp_path / "driver.py", f"held_at(1, {str(gate)!r})"), *common,
                              f"ray.storage={tmp_path / 'ray-a'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path)
    try:
        _wait_for(gate / "held-0", first)
        second = subprocess.run([sys.executable, "-m", "emotune.search", *common, f"ray.storage={tmp_path / 'ray-b'}"],
                                capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"search 'same' is already running against the MLflow store sqlite:///{runs / 'mlflow.db'}: its " \
               f"driver is pid {first.pid} on host" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert not (tmp_path / "ray-b" / "same").exists()  # it stopped before any Ray state
    finally:
        (gate / "hold-0").unlink()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, (out + err)[-3000:]
    client, parents, children = mlflow_runs(runs)
    assert len(parents) == 1 and len(children) == 1
    assert client.search_registered_models() == []  # the store's lock went with the driver that held it
