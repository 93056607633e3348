"""``emotune server``: a real MLflow tracking server in its own session, runs and artifacts through it, logins.

Each test that starts a server stops exactly that one (its emotune process, then whatever is left of MLflow's
session), whether its assertions pass or not. The plain server is started once for the module.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

PASSWORD = "a-test-admin-password"  # MLflow wants 12 characters or more


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def emotune(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emotune", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
    except OSError:
        return []


def _live(predicate) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] != "Z" and predicate(stat):
            found.append(int(entry.name))
    return found


def in_session(sid: int) -> list[int]:
    return _live(lambda stat: int(stat[3]) == sid)


def mlflow_sessions(emotune_pid: int) -> set[int]:
    """The sessions of the emotune process's children: the MLflow server each one leads."""
    return {int(_stat(pid)[3]) for pid in _live(lambda stat: int(stat[1]) == emotune_pid)}


class Server:
    """``emotune server`` started as a real process, its output in a file (a pipe nobody reads could fill)."""

    def __init__(self, runs: Path, *args: str, env: dict | None = None, port: int | None = None) -> None:
        self.runs, self.port, self.log = runs, port or free_port(), runs / "server.log"
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "emotune", "server", "--port", str(self.port), "--workers", "1",
                 f"paths.runs_dir={runs}", *args], stdout=log, stderr=subprocess.STDOUT, cwd=runs, env=env)
        self.sessions: set[int] = set()
        self.uri = self._wait_for_uri()

    def _wait_for_uri(self) -> str:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and self.process.poll() is None:
            self.sessions |= mlflow_sessions(self.process.pid)
            found = re.search(r"tracking\.uri=(\S+)", self.output())
            if found:
                self.sessions |= mlflow_sessions(self.process.pid)
                return found.group(1)
            time.sleep(0.3)
        self.stop()
        pytest.fail(f"no tracking URI printed; the server said:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal_and_wait(self, sig: int) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def stop(self) -> None:
        """This server only: its emotune process, then anything left of the MLflow sessions it started."""
        from emotune.tracking.ui import stop_session

        if self.process.poll() is None:
            self.sessions |= mlflow_sessions(self.process.pid)
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for sid in self.sessions:
            stop_session(sid, grace=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = Server(tmp_path_factory.mktemp("server"))
    yield started
    started.stop()


def test_runs_and_artifacts_go_through_the_server(server):
    from mlflow import MlflowClient

    from emotune.tracking.store import TrackedRun

    assert server.uri == f"http://127.0.0.1:{server.port}"
    tracking = {"uri": server.uri, "experiment": "e", "artifacts": None}
    run = TrackedRun.start(tracking, "a-trial", "trial")
    run.log_params({"model": {"dropout": 0.1}})
    run.log_metrics({"val_f1": 0.5}, step=1)
    artifact = server.runs / "notes.txt"
    artifact.write_text("logged through the server")
    run.log_artifacts([artifact])
    run.finish()

    client = MlflowClient(server.uri)
    logged = client.get_run(run.run_id)
    assert logged.data.params == {"model.dropout": "0.1"} and logged.data.metrics == {"val_f1": 0.5}
    experiment = client.get_experiment_by_name("e")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied, not a client's own disk
    landed = list((server.runs / "server" / "artifacts").rglob("notes.txt"))
    assert len(landed) == 1 and landed[0].read_text() == "logged through the server"
    assert (server.runs / "server" / "mlflow.db").is_file()
    assert not (server.runs / "mlflow.db").exists() and not (server.runs / "mlartifacts").exists()


def test_ui_on_a_server_prints_its_runs_page_and_returns(server):
    started = time.monotonic()
    result = emotune("ui", f"tracking.uri={server.uri}", f"paths.runs_dir={server.runs}", cwd=server.runs)
    assert result.returncode == 0, result.stderr[-2000:]
    # the page of the runs, in MLflow's model-training workspace (its GenAI one is the default)
    assert re.search(rf"{re.escape(server.uri)}/#/experiments/\d+/runs\?workflowType=machine_learning", result.stdout)
    assert time.monotonic() - started < 60  # it started no MLflow of its own and waited for no signal
    assert not (server.runs / "mlflow.db").exists()


def test_runs_page_opens_the_latest_search_best_first(tmp_path):
    import json

    from mlflow import MlflowClient

    from emotune.tracking.store import TrackedRun
    from emotune.tracking.ui import VIEW_KEY, runs_page

    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "e", "artifacts": str(tmp_path / "a")}

    def search(name: str, score: str, offset: float = 0.0) -> None:
        parent = TrackedRun.start(tracking, name=f"search-{name}", kind="search",
                                  tags={"emotune.search": name, "emotune.searched": "model.dropout,trial.lr"})
        for f1 in (0.5, 0.7):
            trial = TrackedRun.start(tracking, name=f"t{f1}", kind="trial", parent_run_id=parent.run_id,
                                     tags={"emotune.search": name})
            trial.log_metrics({score: f1 + offset, "best_val_f1": f1})

    def view(page: str) -> dict:
        assert page.endswith(f"/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}")
        experiment = MlflowClient(tracking["uri"]).get_experiment_by_name("e")
        return json.loads(experiment.tags[f"mlflow.sharedViewState.{VIEW_KEY}"])

    search("old", "val_f1")  # an older search: its trials logged no ranking score
    old = view(runs_page(tracking, "http://h:1"))
    assert old["orderByKey"] == "metrics.`best_val_f1`" and old["orderByAsc"] is False
    search("new", "best_val_score")
    new = view(runs_page(tracking, "http://h:1"))
    assert new["searchFilter"] == "tags.`emotune.search` = 'new'"  # the latest search's runs, open
    assert new["groupsExpanded"] == {"tag.emotune.search.new": True}
    assert new["orderByKey"] == "metrics.`best_val_score`" and new["orderByAsc"] is False  # best first
    columns = new["selectedColumns"]
    assert columns[0] == "metrics.`best_val_score`" and new["columnOrder"][-len(columns):] == columns  # score first
    assert new["selectedColumns"][-2:] == ["params.`model.dropout`", "params.`trial.lr`"]  # the searched settings
    assert new["columnWidths"]["metrics.`best_val_score`"] >= 150  # wide enough for a float's every digit
    assert "metrics.`best_val_f1`" not in columns  # the score is dev macro-F1 itself (trial.select_by=val_f1)
    search("ema", "best_val_score", offset=-0.01)  # a score of its own (trial.select_by=val_f1_ema, say)
    assert "metrics.`best_val_f1`" in view(runs_page(tracking, "http://h:1"))["selectedColumns"]


def test_sigterm_stops_the_server_and_every_process_of_it(server):
    assert server.sessions and all(in_session(s) for s in server.sessions)
    assert server.signal_and_wait(signal.SIGTERM) == 0, server.output()[-2000:]
    assert "MLflow tracking server stopped." in server.output()
    assert all(not in_session(s) for s in server.sessions)
    with socket.socket() as again:
        # as a new server binds: the connections the clients left in TIME_WAIT do not hold the port, a listener would
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", server.port))
        again.listen()


def test_a_non_loopback_host_needs_auth_or_insecure(tmp_path):
    result = emotune("server", "--host", "0.0.0.0", "--port", str(free_port()), f"paths.runs_dir={tmp_path}",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "--auth" in result.stderr and "--insecure" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "server").exists()  # nothing was started


def test_a_taken_port_is_refused_before_mlflow_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = emotune("server", "--port", str(taken.getsockname()[1]), f"paths.runs_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "in use" in result.stderr and "--port" in result.stderr


def test_auth_without_an_admin_password_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_CONFIG_PATH")}
    result = emotune("server", "--auth", "--port", str(free_port()), f"paths.runs_dir={tmp_path}", cwd=tmp_path,
                     env=env)
    assert result.returncode == 2
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr and "--auth-config" in result.stderr


@pytest.mark.slow
def test_auth_refuses_strangers_and_lets_the_admin_log(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from emotune.tracking.store import TrackedRun

    # no job runner (GenAI scorers): its consumers would only slow this second start on a busy machine
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = Server(tmp_path, "--auth", env=env)
    try:
        assert "MLFLOW_TRACKING_USERNAME" in server.output() and "MLFLOW_TRACKING_PASSWORD" in server.output()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
        assert refused.value.code == 401

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        run = TrackedRun.start({"uri": server.uri, "experiment": "e", "artifacts": None}, "admin's", "trial")
        run.log_metrics({"val_f1": 0.25})
        assert MlflowClient(server.uri).get_run(run.run_id).data.metrics == {"val_f1": 0.25}
        # the users are kept in the runs folder, not wherever the server happened to start
        assert (tmp_path / "server" / "basic_auth.db").is_file() and not (tmp_path / "basic_auth.db").exists()
        # the login database (password hashes) and its INI are the owner's alone
        for name in ("basic_auth.db", "basic_auth.ini"):
            assert stat.S_IMODE((tmp_path / "server" / name).stat().st_mode) == 0o600, name

        assert server.signal_and_wait(signal.SIGINT) == 0, server.output()[-2000:]
        assert all(not in_session(s) for s in server.sessions)
    finally:
        server.stop()


@pytest.mark.parametrize("password, said", [("short", "has 5 characters; MLflow requires 12"),
                                             ("password1234", "a default MLflow once shipped")])
def test_a_weak_admin_password_is_refused_before_mlflow_starts(tmp_path, password, said):
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": password}
    result = emotune("server", "--auth", "--port", str(free_port()), f"paths.runs_dir={tmp_path}", cwd=tmp_path,
                     env=env)
    assert result.returncode == 2
    assert said in result.stderr and "MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr
    assert "Traceback" not in result.stderr and "in use" not in result.stderr
    assert not (tmp_path / "server").exists()  # nothing was written or started
    # an INI of one's own with MLflow's old default is refused the same way
    ini = tmp_path / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///x.db\nadmin_username = admin\n"
                   "admin_password = password1234\n")
    env.pop("MLFLOW_AUTH_ADMIN_PASSWORD")
    result = emotune("server", "--auth-config", str(ini), "--port", str(free_port()), f"paths.runs_dir={tmp_path}",
                     cwd=tmp_path, env=env)
    assert result.returncode == 2 and f"the admin_password of {ini}" in result.stderr


def test_an_mlflow_below_the_floor_is_refused_naming_the_advisories():
    from emotune.errors import EmotuneError
    from emotune.tracking.server import check_mlflow_version

    for old in ("2.16.0", "3.16.0", "3.8.0rc0"):
        with pytest.raises(EmotuneError, match=r"MLflow 3\.16\.1 or newer.*GHSA-gq3w-7jj3-x7gr.*pip install -U"):
            check_mlflow_version(old)
    for fine in ("3.16.1", "3.17.2", "4.0.0"):
        check_mlflow_version(fine)


def test_a_server_that_cannot_start_says_why_in_one_line(tmp_path):
    result = emotune("server", "--port", str(free_port()), "--backend-store-uri", "bogus://nowhere",
                     f"paths.runs_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "did not start: " in result.stderr and "bogus://nowhere" in result.stderr
    assert "Traceback" not in result.stderr and "in use" not in result.stderr  # the port was free: no guess at it
    assert len(result.stderr.strip().splitlines()) <= 2


@pytest.mark.slow
def test_a_server_on_another_loopback_address_answers_its_clients(tmp_path):
    server = Server(tmp_path, "--host", "127.0.0.2")
    try:
        assert server.uri == f"http://127.0.0.2:{server.port}"
        with urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1",
                                    timeout=30) as response:
            assert response.status == 200  # not 403 "Invalid Host header"
    finally:
        server.stop()


@pytest.mark.slow
def test_a_worker_user_made_by_add_user_logs_a_trial_without_the_admins_rights(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    from emotune.tracking.store import TrackedRun

    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = Server(tmp_path, "--auth", env=env)
    try:
        secret = tmp_path / "shared" / "worker-password"
        made = emotune("server", "--add-user", "worker", "--password-file", str(secret), f"tracking.uri={server.uri}",
                       "tracking.experiment=team", f"paths.runs_dir={tmp_path}", cwd=tmp_path,
                       env=env | {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD})
        assert made.returncode == 0, made.stderr[-2000:]
        assert "user worker created, with EDIT on experiment 'team'" in made.stdout
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_text().strip()) >= 12
        assert PASSWORD not in made.stdout and secret.read_text().strip() not in made.stdout

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "worker")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret.read_text().strip())
        run = TrackedRun.start({"uri": server.uri, "experiment": "team", "artifacts": None}, "a trial", "trial")
        run.log_metrics({"val_f1": 0.5}, step=1)
        note = tmp_path / "note.txt"
        note.write_text("from a worker")
        run.log_artifacts([note])
        run.finish()
        assert MlflowClient(server.uri).get_run(run.run_id).data.metrics == {"val_f1": 0.5}
        with pytest.raises(MlflowException):  # no admin rights: it cannot make users
            AuthServiceClient(server.uri).create_user("intruder", "another-long-password")
    finally:
        server.stop()


def _search_through_an_outage(separable, tmp_path: Path, outage_s: float, env: dict, *overrides: str):
    """A real smoke search (two 25-epoch trials, a command of its own) logging to `emotune server`, which is stopped
    once a trial has logged two evaluations and started again ``outage_s`` later on the same port and store.
    Returns the search's exit status, its output and the trials' runs and curves as the server has them."""
    from conftest import search_args
    from mlflow import MlflowClient

    corpus, shared_runs = separable
    server, second = Server(tmp_path), None
    command = [sys.executable, "-m", "emotune.search",
               *search_args(corpus, tmp_path / "search-runs", shared_runs / "cache" / "features",
                            "search.num_samples=2", "search.max_concurrent=2", "search.scheduler=none",
                            "trial.max_epochs=25", "trial.early_stop=null", f"tracking.uri={server.uri}",
                            "tracking.experiment=outage", *overrides)]
    log = tmp_path / "search.log"
    with log.open("w") as out:
        search = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                                  env={**os.environ, **env})
    try:
        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and search.poll() is None:  # until a trial has logged two evaluations
            experiment = client.get_experiment_by_name("outage")
            runs_now = client.search_runs([experiment.experiment_id]) if experiment else []
            if any(len(client.get_metric_history(r.info.run_id, "val_f1")) >= 2 for r in runs_now):
                break
            time.sleep(0.5)
        assert search.poll() is None, log.read_text()[-3000:]
        server.stop()
        time.sleep(outage_s)
        second = Server(tmp_path, port=server.port)
        status = search.wait(timeout=900)
        client = MlflowClient(second.uri)
        every = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        curves = {r.info.run_id: [m.step for m in client.get_metric_history(r.info.run_id, "val_f1")]
                  for r in every if r.data.tags.get("emotune.kind") == "trial"}
        return status, log.read_text(), every, curves
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
            search.wait()
        server.stop()
        if second is not None:
            second.stop()


def _assert_nothing_lost(every, curves) -> None:
    assert all(r.info.status != "RUNNING" for r in every)
    trials = [r for r in every if r.data.tags.get("emotune.kind") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)  # one run per trial, retried or not
    for steps in curves.values():
        assert sorted(steps) == list(range(1, 26)), steps  # every evaluation once, none twice


@pytest.mark.slow
def test_a_search_outlives_a_server_outage_and_says_so(separable, tmp_path):
    """The tracking server stops for 35 s in the middle of a real search and comes back on the same store: the
    search ends well, each trial's run is FINISHED with one dev macro-F1 per evaluation, none logged twice, no run
    is left RUNNING, and each process said once that the server was away, and when it was back."""
    status, output, every, curves = _search_through_an_outage(separable, tmp_path, 35, {})
    assert status == 0, output[-5000:]
    assert "unreachable since" in output and "is back after" in output
    assert output.count("unreachable since") <= 3  # once per process (two trials, the driver), not per metric
    _assert_nothing_lost(every, curves)


@pytest.mark.slow
def test_an_outage_past_the_patience_fails_the_trials_which_ray_resumes_in_their_runs(separable, tmp_path):
    """With EMOTUNE_TRACKING_PATIENCE_S=8 and a 40 s outage, the trials give up waiting and fail with an error that
    says so; Ray retries each from its checkpoint (search.max_failures) and, the server back, it goes on in the
    same MLflow run: the search ends well and nothing is lost or logged twice."""
    status, output, every, curves = _search_through_an_outage(
        separable, tmp_path, 40, {"EMOTUNE_TRACKING_PATIENCE_S": "8"}, "search.max_failures=12")
    assert status == 0, output[-5000:]
    assert "has been unreachable for 8 s (EMOTUNE_TRACKING_PATIENCE_S)" in output
    _assert_nothing_lost(every, curves)
