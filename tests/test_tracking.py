"""MLflow tracking: an SQLite store shared by concurrent processes loses nothing; resumed runs are reused."""

from __future__ import annotations

import multiprocessing as mp

from emotune.tracking.store import TrackedRun, ensure_experiment, flatten


def tracking_for(tmp_path) -> dict:
    return {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "emotune-test",
            "artifacts": str(tmp_path / "artifacts")}


def _log_many(tracking: dict, worker: int, steps: int) -> None:
    run = TrackedRun.start(tracking, name=f"worker-{worker}", kind="trial", run_key=f"w{worker}")
    run.log_params({"worker": worker, "model": {"dropout": 0.1}})
    for step in range(1, steps + 1):
        run.log_metrics({"val_f1": step / steps, "train_loss": 1.0 / step}, step=step)
    run.finish()


def test_concurrent_processes_lose_no_writes(tmp_path):
    from mlflow import MlflowClient

    tracking = tracking_for(tmp_path)
    ensure_experiment(tracking)  # the search driver creates the store before trials start
    context = mp.get_context("spawn")
    workers = [context.Process(target=_log_many, args=(tracking, w, 40)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=240)
        assert p.exitcode == 0
    client = MlflowClient(tracking["uri"])
    experiment = client.get_experiment_by_name("emotune-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "val_f1")) == 40
        assert r.data.params["model.dropout"] == "0.1"
    assert experiment.artifact_location.startswith("file://") and str(tmp_path) in experiment.artifact_location


def test_a_resumed_trial_reuses_its_run(tmp_path):
    tracking = tracking_for(tmp_path)
    first = TrackedRun.start(tracking, name="t", kind="trial", run_key="search/trial_1")
    first.log_params({"a": 1})
    again = TrackedRun.start(tracking, name="t", kind="trial", run_key="search/trial_1")
    assert again.run_id == first.run_id
    # a resumed trial logs its parameters again: the ones already there keep their first value (MLflow refuses
    # to change a logged parameter), new ones are added
    again.log_params({"a": 5, "b": 2})
    assert again.client.get_run(again.run_id).data.params == {"a": "1", "b": "2"}
    other = TrackedRun.start(tracking, name="t", kind="trial", run_key="search/trial_2", parent_run_id=first.run_id)
    assert other.run_id != first.run_id
    assert other.client.get_run(other.run_id).data.tags["mlflow.parentRunId"] == first.run_id


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
