"""``emotune ui``: the MLflow UI on the project's store, opened on the search's runs, stopped cleanly.

    emotune ui                       # http://127.0.0.1:5000, on the runs of the latest search
    emotune ui --port 5001 --open    # another port; open the page in a browser
    emotune ui tracking.uri=http://HOST:5000   # a tracking server (``emotune server``): print its runs page

MLflow's server starts a dozen processes (uvicorn workers, job consumers). They run in a session of their
own, and Ctrl-C, SIGTERM (``kill``, systemd) and SIGHUP (a closed terminal or tmux pane) all stop every one
of them, so the port is free for the next start. ``emotune server`` runs its MLflow the same way
(``run_until_signal``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from emotune.errors import EmotuneError
from emotune.names import OBJECTIVE

# The columns the first screen shows, left to right: the ranking score the runs are sorted by, the best dev macro-F1,
# how far each trial got, its last dev macro-F1; then the searched settings.
METRIC_COLUMNS = (OBJECTIVE, "best_val_f1", "epochs_trained", "asha_stopped", "val_f1")
# Column widths in px. MLflow prints a metric's every digit (0.36746031746031746) and has no setting for decimals
# (its runs table gives metrics no formatter), so the fractions' columns are made wide enough to show them whole;
# the run name's, to show the trial's id at its end; the start time's ("2 minutes ago") needs less than its 150.
WIDTHS = {"attributes.`Run Name`": 240, "runDateAndNestInfo": 135, "metrics.`epochs_trained`": 115,
          **{f"metrics.`{m}`": 165 for m in (OBJECTIVE, "best_val_f1", "val_f1")}}
VIEW_KEY = "emotune-latest-search"
# MLflow 3.17 opens the GenAI workspace (traces, judges, prompts) unless the address asks for model training: the
# workspace comes from this URL parameter, else from the browser's last choice, and the experiment tag
# mlflow.experimentKind is not consulted (MLflow's useExperimentKind defers to the workflow type). Its assistant's
# chat, though, opens by itself on a browser's first visit to a localhost address, and no setting, environment
# variable, tag or parameter stops that: it is closed with its X, and stays closed in that browser.
WORKSPACE = "workflowType=machine_learning"


def _ranking_metric(mlflow_client, experiment_id: str, name: str) -> tuple[str, bool]:
    """The metric that ranks the trials of search ``name``: the objective, or ``best_val_f1`` for a search older
    than it (as ``emotune select-top`` ranks them); and whether it is best_val_f1 itself (trial.select_by=val_f1,
    the default), which makes a best_val_f1 column a copy of it."""
    from emotune.tracking.store import TAG_SEARCH, retry

    # runs without the metric come last in MLflow's order, so the first run has it if any of the search's has
    best = retry(mlflow_client.search_runs, [experiment_id], filter_string=f"tags.`{TAG_SEARCH}` = '{name}'",
                 order_by=[f"metrics.`{OBJECTIVE}` DESC"], max_results=1)
    metrics = best[0].data.metrics if best else {}
    if OBJECTIVE not in metrics:
        return "best_val_f1", True
    return OBJECTIVE, metrics.get("best_val_f1") == metrics[OBJECTIVE]


def runs_page(tracking: dict, base: str) -> str:
    """The address of a view of the latest search: its runs as a tree with their dev scores, best first.

    MLflow 3 opens an experiment on its GenAI overview (traces), and its runs table starts with every
    search collapsed, sorted by start time, with no metric in sight. MLflow's shared views (an experiment tag
    holding the table's state, named in the address) are its one way to set the table's columns, grouping and
    widths from outside the browser: the first screen is the latest search, expanded, best first, with its
    metrics. Their cost is MLflow's "You're viewing a shared view" banner above the table, which no setting hides.
    """
    import json

    from emotune.tracking.store import TAG_KIND, TAG_SEARCH, client, ensure_experiment, retry

    experiment_id = ensure_experiment(tracking)
    mlflow_client = client(tracking["uri"])
    searches = retry(mlflow_client.search_runs, [experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'search'",
                     order_by=["attributes.start_time DESC"], max_results=1)
    if not searches:
        return f"{base}/#/experiments/{experiment_id}/runs?{WORKSPACE}"
    search = searches[0]
    name = search.data.tags.get(TAG_SEARCH, "")
    searched = [k for k in search.data.tags.get("emotune.searched", "").split(",") if k]
    ranking, same_as_f1 = _ranking_metric(mlflow_client, experiment_id, name)
    shown = [m for m in METRIC_COLUMNS if not (same_as_f1 and m == "best_val_f1" and ranking == OBJECTIVE)]
    columns = [f"metrics.`{m}`" for m in shown] + [f"params.`{k}`" for k in searched]
    # shared views leave out which runs are expanded, so the search is shown as a group of its runs (the search's
    # own run and its trials), open, with the best value of each metric on the group's row
    view = {
        "searchFilter": f"tags.`{TAG_SEARCH}` = '{name}'",
        # the sort goes in the view: an address with a sort parameter of its own makes MLflow skip the shared view
        "orderByKey": f"metrics.`{ranking}`",
        "orderByAsc": False,
        "groupBy": {"aggregateFunction": "max", "groupByKeys": [{"mode": "tag", "groupByData": TAG_SEARCH}]},
        "groupsExpanded": {f"tag.{TAG_SEARCH}.{name}": True},
        "selectedColumns": columns,
        # MLflow sets the widths of the columns named in the order only; those it leaves out (Duration) go last
        "columnOrder": ["attributes.`Run Name`", "runDateAndNestInfo", *columns],
        "columnWidths": WIDTHS,
        "useGroupedValuesInCharts": False,  # the chart view draws each trial's curve, not the group's aggregate
        # and starts on the dev macro-F1 curves: raw, smoothed, best so far (MLflow reads the filter as a regular
        # expression: "val_f1" alone would also match checkpoint_val_f1 and val_f1_se), of the table's first 10 runs
        # (MLflow's default), which the sort makes the 10 best
        "chartsSearchFilter": "^(val_f1|val_f1_ema|best_val_f1)$",
    }
    retry(mlflow_client.set_experiment_tag, experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(view))
    return f"{base}/#/experiments/{experiment_id}/runs?{WORKSPACE}&viewStateShareKey={VIEW_KEY}"


def _session_members(sid: int) -> list[int]:
    """Every process of session ``sid`` (read from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the name: state, ppid, pgrp, session, ...
            members.append(int(entry.name))
    return members


def stop_processes(find, grace: float = 10.0) -> None:
    """SIGTERM the processes ``find()`` returns, then SIGKILL whatever of them is left after ``grace`` seconds
    (``find`` is asked again at each step, so processes started meanwhile are stopped too)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid in find():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not [pid for pid in find() if not _is_zombie(pid)]:
                return
            time.sleep(0.1)


def stop_session(sid: int, grace: float = 10.0) -> None:
    """SIGTERM every process of the server's session, then SIGKILL whatever is left after ``grace`` seconds."""
    stop_processes(lambda: _session_members(sid), grace)


def _is_zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except OSError:
        return True


def _wait_until_up(url: str, server: subprocess.Popen, stopping: list) -> bool:
    """Poll ``url`` until it answers 200; False if the server exits or a stop signal comes first."""
    # no deadline: a busy machine may take minutes to start MLflow's workers, and a signal ends the wait anyway
    while not stopping and server.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


class StartupLog:
    """A server's stderr, held back until it is up and passed through from then on.

    A server that dies while starting leaves a traceback of dozens of lines; the user needs its last line, what
    went wrong (:meth:`reason`). Once the server is up (:meth:`release`), its messages go to stderr as they come.
    """

    def __init__(self, stream) -> None:
        import threading

        self.lines: list[str] = []
        self.released = threading.Event()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            if self.released.is_set():
                sys.stderr.write(line)
                sys.stderr.flush()
            else:
                self.lines.append(line)

    def release(self) -> None:
        for line in self.lines:
            sys.stderr.write(line)
        self.lines.clear()
        self.released.set()

    def reason(self) -> str:
        """The error the server died of: its last line that names an exception, else its last line."""
        self.thread.join(timeout=5)
        text = [line.strip() for line in self.lines if line.strip()]
        errors = [line for line in text if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
        reason = (errors or text or ["it printed nothing"])[-1]
        return reason if len(reason) <= 300 else reason[:300] + "..."


def run_until_signal(command: list[str], probe: str, announce: Callable[[], None], what: str, port: int,
                     env: dict | None = None, port_taken: Callable[[], bool] | None = None) -> int:
    """Run ``command`` (an MLflow server) in a session of its own until SIGINT, SIGTERM or SIGHUP.

    ``announce`` runs once ``probe`` answers. Every process of the session is stopped on the way out, whatever
    the way out is; returns the exit status. A server that exits while starting raises an error that says what it
    died of in one line (its traceback is not shown), and mentions the port only if ``port_taken`` says it is.
    """
    stopping: list[int] = []

    def stop(signum, _frame):
        stopping.append(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    server, log, up = None, None, False
    try:
        server = subprocess.Popen(command, start_new_session=True, env=env, stderr=subprocess.PIPE, text=True,
                                  bufsize=1)
        log = StartupLog(server.stderr)
        if _wait_until_up(probe, server, stopping):
            up = True
            log.release()
            announce()
        while not stopping and server.poll() is None:
            time.sleep(0.2)
    finally:
        if server is not None:
            stop_session(server.pid)
            server.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping:
        print(f"{what} stopped.", flush=True)
        return 0
    if server.returncode:
        if up:
            raise EmotuneError(f"the {what} exited with status {server.returncode}; its messages above say why.")
        taken = port_taken() if port_taken is not None else False
        raise EmotuneError(f"the {what} did not start: {log.reason()}"
                           + (f". Port {port} is in use now: pick another with --port." if taken else "."))
    return 0


def serve(tracking: dict, host: str, port: int, open_browser: bool = False) -> int:
    """Run the MLflow UI until a signal; returns the exit status. On a tracking server, only point to its UI."""
    from emotune.tracking.store import is_server

    uri = tracking["uri"]
    if is_server(uri):
        # the server already serves the UI: a second MLflow here would only read the same runs through it
        page = runs_page(tracking, uri.rstrip("/"))
        print(f"MLflow UI of the tracking server {uri}: {page}", flush=True)
        _open(page, open_browser)
        return 0
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise EmotuneError(f"no MLflow store yet at {uri}: run a search or `emotune train` first.")
    base = f"http://{host}:{port}"
    page = runs_page(tracking, base)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]

    def announce() -> None:
        print(f"MLflow UI for {uri}: {page}  (Ctrl-C stops it)", flush=True)
        _open(page, open_browser)

    return run_until_signal(command, base, announce, "MLflow UI", port)


def _open(page: str, open_browser: bool) -> None:
    if open_browser:
        import webbrowser

        webbrowser.open(page)
