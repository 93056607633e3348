"""Benchmark: how many concurrent trials one `emotune server` holds, on SQLite and on PostgreSQL.

N processes (N = 4, 8, 16; processes, not threads) each play trials as emotune's trial logs them, through
emotune's own tracking code (``emotune.tracking.store.TrackedRun``) to one real `emotune server`:
a run with its parameters and config, then per evaluation the trial's 11 metrics in one batch and its
``evaluations.json``, and at every third evaluation a "best" set (a 200 kB weights file, the model card, dev and
test predictions). Reported per backend and N: the writes that failed (goal 0), the p50 and p99 latency of a
metric write, and the trials per minute the server held. The server runs on its default SQLite store, then on a
real PostgreSQL from Debian's package (`apt-get install postgresql`; its driver: `pip install -e .[postgres]`),
which this script starts in a folder of its own and stops.

    python scripts/bench_server.py              # about 10 min on 2 cores
    python scripts/bench_server.py --clients 4 8 --evaluations 10

Writes benchmarks/server.md and benchmarks/server.json (the worst case's numbers, and the whole table).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _bench import ROOT, write

PG_BIN = Path("/usr/lib/postgresql")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _play_trials(job: tuple[str, int, int, int, str]) -> dict:
    """One client process: ``trials`` trials of ``evaluations`` evaluations each; every metric write timed."""
    uri, client, trials, evaluations, folder = job
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    from emotune.tracking.store import TrackedRun

    tracking = {"uri": uri, "experiment": "load", "artifacts": None}
    work = Path(folder) / f"client-{client}"
    work.mkdir(parents=True, exist_ok=True)
    weights, predictions = work / "model.safetensors", work / "dev_predictions.csv"
    weights.write_bytes(os.urandom(200_000))
    predictions.write_text("id,label,prediction," + ",".join(f"p{c}" for c in range(6)) + "\n"
                           + "".join(f"clip{i},joy,joy,{','.join(['0.16'] * 6)}\n" for i in range(300)))
    latencies, failed, done = [], 0, 0
    for trial in range(trials):
        try:
            run = TrackedRun.start(tracking, f"client{client}-trial{trial}", "trial",
                                   run_key=f"load/{client}/{trial}/{time.time_ns()}")
            run.log_params({"trial": {"lr": 1e-3, "dropout": 0.1}, "model": {"width": 256}})
            run.log_json({"trial": {"folds": 1}}, "config.json")
            for evaluation in range(1, evaluations + 1):
                metrics = {name: float(np.random.random()) for name in (
                    "val_f1", "val_f1_se", "val_f1_ema", "best_val_f1", "val_score", "best_val_score",
                    "best_val_score_se", "val_loss", "train_loss", "lr", "epoch_seconds")}
                started = time.perf_counter()
                try:
                    run.log_metrics(metrics, step=evaluation)
                    latencies.append(time.perf_counter() - started)
                except Exception:
                    failed += 1
                try:
                    (work / "evaluations.json").write_text(json.dumps({"predicted": ["0" * 300] * evaluation}))
                    run.log_artifacts([work / "evaluations.json"])
                    if evaluation % 3 == 0:
                        run.log_artifacts([weights, predictions], "best")
                except Exception:
                    failed += 1
            run.finish()
            done += 1
        except Exception:
            failed += 1
    return {"latencies": latencies, "failed": failed, "trials": done}


class Postgres:
    """A PostgreSQL server of this script's own (Debian's binaries, run as the postgres user) in ``folder``."""

    def __init__(self, folder: Path) -> None:
        versions = sorted(PG_BIN.glob("*/bin/initdb"))
        if not versions:
            raise SystemExit("PostgreSQL is not installed: apt-get install postgresql")
        self.bin, self.folder, self.port = versions[-1].parent, folder, free_port()
        folder.mkdir(parents=True)
        shutil.chown(folder, "postgres", "postgres")
        self._as_postgres([str(self.bin / "initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", "postgres"])
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "log"), "-w",
                           "-o", f"-p {self.port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200",
                           "start"])
        self._as_postgres([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                           "mlflow"])
        self.uri = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/mlflow"

    def _as_postgres(self, command: list[str]) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, cwd="/tmp")

    def stop(self) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop"])


def start_server(runs: Path, store: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (runs / "server.log").open("w")
    command = [sys.executable, "-m", "emotune", "server", "--port", str(port), f"paths.runs_dir={runs}"]
    if store:
        command += ["--backend-store-uri", store]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=runs, start_new_session=True,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if "tracking.uri=" in (runs / "server.log").read_text(errors="replace"):
            return server, uri
        if server.poll() is not None:
            raise SystemExit(f"emotune server did not start:\n{(runs / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    raise SystemExit("emotune server did not start in 3 min")


def stop_server(server: subprocess.Popen) -> None:
    from emotune.tracking.ui import stop_session

    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    finally:
        stop_session(server.pid, grace=5)


def measure(backend: str, store: str | None, clients: int, args, folder: Path) -> dict:
    runs = folder / f"{backend}-{clients}"
    runs.mkdir(parents=True)
    server, uri = start_server(runs, store)
    try:
        jobs = [(uri, c, args.trials, args.evaluations, str(runs / "clients")) for c in range(clients)]
        started = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(clients) as pool:
            results = pool.map(_play_trials, jobs)
        seconds = time.perf_counter() - started
    finally:
        stop_server(server)
    latencies = np.concatenate([r["latencies"] for r in results]) * 1000
    row = {"backend": backend, "clients": clients, "failed_writes": int(sum(r["failed"] for r in results)),
           "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
           "trials_per_minute": sum(r["trials"] for r in results) / seconds * 60, "seconds": seconds,
           "metric_writes": int(len(latencies))}
    print(f"{backend:10s} N={clients:2d}: failed {row['failed_writes']}, metric write p50 {row['p50_ms']:.0f} ms, "
          f"p99 {row['p99_ms']:.0f} ms, {row['trials_per_minute']:.1f} trials/min ({seconds:.0f} s)", flush=True)
    return row


def recommendation(rows: list[dict]) -> list[str]:
    """The backend to recommend, from the largest N both backends ran."""
    by = {(r["backend"], r["clients"]): r for r in rows}
    both = [n for n in sorted({r["clients"] for r in rows}) if ("sqlite", n) in by and ("postgresql", n) in by]
    if not both:
        return []
    n = both[-1]
    lite, pg = by[("sqlite", n)], by[("postgresql", n)]
    lost = "neither backend lost a write" if not (lite["failed_writes"] or pg["failed_writes"]) else (
        f"failed writes: SQLite {lite['failed_writes']}, PostgreSQL {pg['failed_writes']}")
    return ["", f"**Recommendation.** At {n} concurrent trials {lost}; a trial waits for a metric write "
            f"{lite['p99_ms']:.0f} ms at the 99th percentile on SQLite and {pg['p99_ms']:.0f} ms on PostgreSQL (p50 "
            f"{lite['p50_ms']:.0f} and {pg['p50_ms']:.0f} ms), and the trials per minute held are alike "
            f"({lite['trials_per_minute']:.0f} and {pg['trials_per_minute']:.0f}: on this machine the clients and the "
            "server share 2 CPUs). SQLite, the default, serves a few concurrent trials well; from about 8 on, its "
            "single writer stretches the tail, and PostgreSQL (`--backend-store-uri postgresql+psycopg2://...`, "
            "`pip install -e .[postgres]`) keeps the 99th percentile lower, at a median no better here."]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 8, 16], help="concurrent trial processes")
    parser.add_argument("--trials", type=int, default=2, help="trials each client plays (default 2)")
    parser.add_argument("--evaluations", type=int, default=20, help="evaluations per trial (default 20)")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], help="sqlite and/or postgresql")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="emotune-load-") as tmp:
        folder = Path(tmp)
        os.chmod(folder, 0o755)  # the postgres user reaches its folder inside
        postgres = Postgres(folder / "pg") if "postgresql" in args.backends else None
        try:
            for backend in args.backends:
                store = postgres.uri if backend == "postgresql" else None
                for clients in args.clients:
                    rows.append(measure(backend, store, clients, args, folder))
        finally:
            if postgres is not None:
                postgres.stop()
    worst = max(rows, key=lambda r: (r["failed_writes"], r["p99_ms"]))
    data = {"failed_writes": worst["failed_writes"], "p50_ms": worst["p50_ms"], "p99_ms": worst["p99_ms"],
            "trials_per_minute": worst["trials_per_minute"], "worst_case": f"{worst['backend']}, N={worst['clients']}",
            "rows": rows, "trials_per_client": args.trials, "evaluations": args.evaluations,
            "machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d")}
    lines = ["# One tracking server under concurrent trials: SQLite against PostgreSQL", "",
             f"`python scripts/bench_server.py` on {data['machine']}, {data['date']}: N client processes each play "
             f"{args.trials} trials of {args.evaluations} evaluations through `emotune.tracking.store` (11 metrics "
             "in one batch and `evaluations.json` per evaluation, a 200 kB best-model set every third) to one "
             "`emotune server` (4 MLflow workers), on its default SQLite store and on a PostgreSQL server "
             "(Debian's package, started by the script). Latency: one metric batch, as the trial waits for it.", "",
             "| backend | clients | failed writes | metric write p50 | p99 | trials per minute |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['clients']} | {r['failed_writes']} | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms "
              f"| {r['trials_per_minute']:.1f} |" for r in rows]
    lines += ["", f"Worst case: {data['worst_case']}.", *recommendation(rows)]
    write("server", data, lines)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
