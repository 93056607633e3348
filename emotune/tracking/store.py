"""MLflow: the only module that talks to it. One run per trial, one parent run per search.

The default store is an SQLite file at an absolute path in the runs folder, with artifacts in a folder
next to it (both absolute, because Ray trials run in their own working directories). SQLite allows one
writer at a time, so every call retries with backoff while the database is busy: concurrent trials wait
instead of losing writes. A server URI (``tracking.uri=http://...``, e.g. from ``emotune server``) works the
same way, except that the server, not ``tracking.artifacts``, says where a new experiment's artifacts go.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from emotune.errors import EmotuneError  # noqa: E402
from emotune.names import user_cache_dir  # noqa: E402

TAG_KIND = "emotune.kind"  # trial | search | ensemble
TAG_RUN_KEY = "emotune.run_key"  # stable identity (e.g. the Ray trial id) that lets a resumed trial reuse its run
TAG_PARENT = "mlflow.parentRunId"
TAG_SEARCH = "emotune.search"  # the search's name, on its run and its trials' runs
TAG_SEARCH_ID = "emotune.search_id"  # which search of that name: a new one gets a new id (search/identity.py)
_PARAM_LIMIT = 6000  # MLflow's limit on a parameter value's length


PATIENCE_VARIABLE = "EMOTUNE_TRACKING_PATIENCE_S"
PATIENCE_S = 600.0  # how long a process waits for a busy store or an unreachable server before it fails
# MLflow retries a failed HTTP request itself, by default 7 times backing off to 2 min (about 4 min per call), which
# would hide an outage inside one call: emotune asks it for few retries and waits itself, saying so
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
_UNREACHABLE = ("connection refused", "max retries exceeded", "temporarily unavailable", "connection reset",
                "remote end closed", "name or service not known")
_away: dict = {}  # this process's current outage: "since" (time), "where" (the server)


def _is_busy(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("database is locked", "database table is locked", "busy", *_UNREACHABLE))


def _unreachable(exc: BaseException) -> str | None:
    """The server an exception says is unreachable (``host:port`` when it names one), or None for a busy store."""
    import re

    text = str(exc)
    if not any(s in text.lower() for s in _UNREACHABLE):
        return None
    found = re.search(r"host='([^']+)', port=(\d+)", text)
    return f"{found.group(1)}:{found.group(2)}" if found else "the tracking server"


def patience_s() -> float:
    return float(os.environ.get(PATIENCE_VARIABLE) or PATIENCE_S)


def retry(call: Callable, *args, **kwargs):
    """Run an MLflow call, waiting and retrying while the store is busy (SQLite locks) or the server unreachable.

    It waits up to :func:`patience_s` seconds (``EMOTUNE_TRACKING_PATIENCE_S``, 10 min by default). An
    unreachable server is said once per outage, with when it went away, and again when it is back; past the
    patience the call fails with an error that says so (a trial then fails, and Ray retries it from its checkpoint).
    """
    deadline, delay = time.monotonic() + patience_s(), 0.05
    while True:
        try:
            result = call(*args, **kwargs)
        except Exception as exc:
            if not _is_busy(exc):
                raise
            where = _unreachable(exc)
            if where is not None and "since" not in _away:
                _away.update(since=time.time(), where=where)
                wait = patience_s()
                wait_text = f"{wait / 60:g} min" if wait >= 120 else f"{wait:g} s"
                print(f"emotune: tracking server {where} unreachable since {time.strftime('%H:%M:%S')}; retrying "
                      f"for up to {wait_text} ({PATIENCE_VARIABLE})", file=sys.stderr, flush=True)
            if time.monotonic() >= deadline:
                if where is None:
                    raise
                raise EmotuneError(f"the tracking server {where} has been unreachable for {patience_s():g} s "
                                   f"({PATIENCE_VARIABLE}). Start it again on the same store: a trial that failed "
                                   "this way is retried from its checkpoint, and the same search command resumes "
                                   "the search.") from None
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)
            continue
        if "since" in _away:
            print(f"emotune: tracking server {_away['where']} is back after {time.time() - _away['since']:.0f} s",
                  file=sys.stderr, flush=True)
            _away.clear()
        return result


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"dropout": 0.1}}`` to ``{"model.dropout": 0.1}``, for MLflow parameters."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def is_server(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (``emotune server`` or any MLflow server) rather than a store."""
    return uri.startswith(("http://", "https://"))


_READY: set[str] = set()


def client(uri: str):
    """An MLflow client; a new SQLite store is created under a file lock first.

    Creating the store runs MLflow's schema migrations, and two processes doing that at once (two searches
    started together on a fresh runs folder) break each other's migration ("table _alembic_tmp_metrics
    already exists"). The lock makes the second wait until the first has built the store.
    """
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///") or uri in _READY:
        return MlflowClient(tracking_uri=uri)
    import fcntl

    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.init-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not database.exists():
                copy_empty_store(database)
            mlflow_client = MlflowClient(tracking_uri=uri)
            retry(mlflow_client.search_experiments, max_results=1)  # migrates a store made by an older MLflow
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY.add(uri)
    return mlflow_client


def copy_empty_store(database: Path) -> Path:
    """A new MLflow SQLite store at ``database``: a copy of an empty one kept per MLflow version in the user's
    cache (``~/.cache/emotune``), since creating MLflow's tables takes seconds: a fresh runs folder, and every
    store a test or a plan makes, pays that once per machine, not once per store."""
    import logging
    import shutil

    import mlflow
    from mlflow import MlflowClient

    cache = user_cache_dir()
    template = cache / f"empty-mlflow-{mlflow.__version__}.db"
    if not template.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        draft = Path(tempfile.mkdtemp(prefix=".empty-store-", dir=cache))
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # its "Creating tables" lines
        MlflowClient(f"sqlite:///{draft / 'mlflow.db'}").search_experiments()  # creates the tables
        os.replace(draft / "mlflow.db", template)  # whole or absent, whoever else is making it
        shutil.rmtree(draft, ignore_errors=True)
    partial = database.with_name(f".{database.name}.{os.getpid()}")
    shutil.copyfile(template, partial)
    os.replace(partial, database)  # a reader never meets half a store
    return database


def download_text(tracking: dict, run_id: str, path: str) -> str:
    """The text of artifact ``path`` of run ``run_id`` (retried while the store is busy or away)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = retry(client(tracking["uri"]).download_artifacts, run_id, path, tmp)
        return Path(local).read_text()


def download_json(tracking: dict, run_id: str, path: str) -> Any | None:
    """A JSON artifact of a run, or None when the run has none (or it cannot be read)."""
    try:
        return json.loads(download_text(tracking, run_id, path))
    except Exception:  # MLflow raises its own types for a missing artifact
        return None


def ensure_experiment(tracking: dict) -> str:
    """The id of ``tracking.experiment``, created (with its artifact folder) on first use."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking["uri"])
    try:
        found = retry(mlflow_client.get_experiment_by_name, tracking["experiment"])
    except MlflowException as exc:
        raise EmotuneError(f"cannot reach the MLflow store {tracking['uri']}: {str(exc).splitlines()[0]}") from None
    if found is not None:
        return found.experiment_id
    artifacts = tracking.get("artifacts")
    # a server picks the root itself (mlflow-artifacts: under `emotune server`): every client, on any machine,
    # uploads through it to the server's destination, where a file:// root would leave each on its own disk
    location = Path(artifacts).resolve().as_uri() if artifacts and not is_server(tracking["uri"]) else None
    try:
        return retry(mlflow_client.create_experiment, tracking["experiment"], artifact_location=location)
    except MlflowException:  # another process created it first
        return retry(mlflow_client.get_experiment_by_name, tracking["experiment"]).experiment_id


class TrackedRun:
    """One MLflow run; ``run_key`` makes ``start`` reuse the unfinished run of a resumed trial."""

    def __init__(self, tracking: dict, run_id: str) -> None:
        self.tracking = tracking
        self.client = client(tracking["uri"])
        self.run_id = run_id

    @classmethod
    def start(cls, tracking: dict, name: str, kind: str, run_key: str | None = None, parent_run_id: str | None = None,
              tags: dict | None = None) -> "TrackedRun":
        experiment_id = ensure_experiment(tracking)
        mlflow_client = client(tracking["uri"])
        if run_key:
            wanted = f"tags.`{TAG_RUN_KEY}` = '{run_key}'"
            if (tags or {}).get(TAG_SEARCH_ID):  # another search's run with the same key is not this one's
                wanted += f" and tags.`{TAG_SEARCH_ID}` = '{tags[TAG_SEARCH_ID]}'"
            existing = retry(mlflow_client.search_runs, [experiment_id], filter_string=wanted, max_results=5)
            if existing:  # a retried or resumed trial continues its own run instead of leaving an orphan
                run = cls(tracking, existing[0].info.run_id)
                run.reopen()
                return run
        all_tags = {TAG_KIND: kind, **(tags or {})}
        if run_key:
            all_tags[TAG_RUN_KEY] = run_key
        if parent_run_id:
            all_tags[TAG_PARENT] = parent_run_id
        created = retry(mlflow_client.create_run, experiment_id, tags=all_tags, run_name=name)
        return cls(tracking, created.info.run_id)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        existing = retry(self.client.get_run, self.run_id).data.params
        items = [Param(k, str(v)[:_PARAM_LIMIT]) for k, v in sorted(flat.items()) if k not in existing]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 parameters per batch
            retry(self.client.log_batch, self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            retry(self.client.log_batch, self.run_id, metrics=items)

    def last_step(self, metric: str) -> int:
        """The highest step logged for ``metric`` (0 if none): a resumed trial does not log those epochs again."""
        history = retry(self.client.get_metric_history, self.run_id, metric)
        return max((m.step for m in history), default=0)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for path in paths:
            retry(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_json(self, data: Any, name: str, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
            self.log_artifacts([path], artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        retry(self.client.set_terminated, self.run_id, status)

    def reopen(self) -> None:
        """Mark the run running again: its trial or search goes on."""
        retry(self.client.update_run, self.run_id, status="RUNNING")


def child_runs(tracking: dict, parent_run_id: str) -> list:
    """The active runs whose parent is ``parent_run_id``."""
    mlflow_client = client(tracking["uri"])
    experiment_id = ensure_experiment(tracking)
    return retry(mlflow_client.search_runs, [experiment_id],
                 filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'", max_results=50000)


def discard_run(tracking: dict, run_id: str, reason: str) -> None:
    """Soft-delete a run that belongs to nothing (MLflow keeps it in its trash, out of searches and the UI)."""
    mlflow_client = client(tracking["uri"])
    retry(mlflow_client.set_tag, run_id, "emotune.discarded", reason)
    retry(mlflow_client.set_terminated, run_id, "KILLED")
    retry(mlflow_client.delete_run, run_id)


def runs_with_key(tracking: dict, run_key: str) -> list:
    """The active runs tagged ``run_key``, oldest first."""
    mlflow_client = client(tracking["uri"])
    experiment_id = ensure_experiment(tracking)
    return retry(mlflow_client.search_runs, [experiment_id], filter_string=f"tags.`{TAG_RUN_KEY}` = '{run_key}'",
                 order_by=["attributes.start_time ASC"], max_results=1000)


# --- locks in the tracking store ---------------------------------------------------------------------------------
# A registered model's name is unique in the store (a database constraint, on a server too), and deleting one
# removes it for good, so creating one is an atomic "take the lock" that every client of the store sees.

_LOCK_TAG = "emotune.lock"


def _lock_name(tracking: dict, key: str) -> str:
    import re

    return re.sub(r"[/:]", ".", f"emotune-lock.{tracking['experiment']}.{key}")  # '/' and ':' are refused


def _lock_record(mlflow_client, name: str) -> dict | None:
    """The holder recorded in lock ``name``; None when there is no such lock, {} when it has no readable record."""
    from mlflow.exceptions import MlflowException

    try:
        model = retry(mlflow_client.get_registered_model, name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    try:
        return json.loads(model.tags.get(_LOCK_TAG, "{}"))
    except ValueError:
        return {}


def take_store_lock(tracking: dict, key: str, holder: dict) -> dict | None:
    """Create the store's lock ``key`` recording ``holder``: None when taken, else the current holder's record."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking["uri"])
    name = _lock_name(tracking, key)
    for _ in range(20):
        try:
            retry(mlflow_client.create_registered_model, name, tags={_LOCK_TAG: json.dumps(holder)},
                  description="Held by a running emotune search; deleted when it ends. Not a model.")
            return None
        except MlflowException as exc:
            # taken; or taken and then moved aside before MLflow could read it back to say so ("not found")
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise EmotuneError(f"cannot take the search's lock in the MLflow store {tracking['uri']}: "
                                   f"{str(exc).splitlines()[0]}") from None
        current = _lock_record(mlflow_client, name)
        if current == holder:  # this create went through, and a retry after a busy store found it
            return None
        if current:
            return current
        # gone (released, or moved aside), or caught without its record (a rename rewrites the tags): look again
        time.sleep(0.05 * (1 + random.random()))
    return {}  # never readable: treated as held by an unknown driver


def clear_stale_store_lock(tracking: dict, key: str, stale: dict) -> bool:
    """Move lock ``key`` aside when it still records ``stale`` (a driver that is gone); True when this call did.

    The aside name is made from the stale holder's token and stays until the next holder releases the lock: of
    several drivers clearing the same stale lock, one rename succeeds and the others fail (the lock is gone, or the
    aside name is taken), so none of them can move aside the lock that is taken next. A lock that is not the stale
    one is put back.
    """
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking["uri"])
    name = _lock_name(tracking, key)
    aside = f"{name}.stale-{stale.get('token', 'unknown')}"
    try:
        retry(mlflow_client.rename_registered_model, name, aside)
    except MlflowException:
        return False
    if _lock_record(mlflow_client, aside) != stale:
        try:  # someone else's live lock: give it back
            retry(mlflow_client.rename_registered_model, aside, name)
        except MlflowException:
            pass
        return False
    return True


def release_store_lock(tracking: dict, key: str, holder: dict) -> None:
    """Delete lock ``key`` if it still records ``holder`` (a lock taken over by another driver stays), and the dead
    drivers' locks moved aside before it was taken."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking["uri"])
    name = _lock_name(tracking, key)
    if _lock_record(mlflow_client, name) != holder:
        return
    aside = retry(mlflow_client.search_registered_models, filter_string=f"name LIKE '{name}.stale-%'")
    for target in [name] + [model.name for model in aside]:
        try:
            retry(mlflow_client.delete_registered_model, target)
        except MlflowException:
            pass
