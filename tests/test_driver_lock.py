"""The driver lock under real races: drivers in separate processes that find the same lock at the same moment."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import socket
import subprocess
import time

import pytest

from emotune.errors import EmotuneError
from emotune.search import lock as driver_lock
from emotune.search.lock import DriverLock

DRIVERS = 4
ROUNDS = 50
STORE_ROUNDS = 6  # MLflow calls are slower than files


def _record(pid: int, pid_start: str | None, started: float) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": pid, "pid_start": pid_start, "started": started,
                       "search": "race"})


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def _driver(where, gates, outcomes, store: bool = False) -> None:
    """One contender: every round it tries the lock at the gate, reports, and holds until all have tried. ``where``
    is the search's Ray folder (its lock file), or with ``store`` the MLflow store's URI (its lock there)."""
    from emotune.search.lock import StoreLock

    for _ in range(STORE_ROUNDS if store else ROUNDS):
        lock = StoreLock({"uri": where, "experiment": "emotune"}, "search/race") if store else DriverLock(where)
        gates.wait()
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):
                lock.acquire("race")
            outcomes.put((os.getpid(), "won", said.getvalue()))
        except EmotuneError as e:
            outcomes.put((os.getpid(), "refused", said.getvalue() + str(e)))
        gates.wait()  # everyone has tried while the winner still holds
        gates.wait()  # the test has looked at the lock
        lock.release()
        gates.wait()


@pytest.fixture
def drivers(tmp_path):
    """``DRIVERS`` processes racing for ``tmp_path/race.lock``; each round the test writes the lock they find."""
    context = mp.get_context("spawn")
    gates, outcomes = context.Barrier(DRIVERS + 1, timeout=60), context.Queue()
    procs = [context.Process(target=_driver, args=(tmp_path / "race", gates, outcomes), daemon=True)
             for _ in range(DRIVERS)]
    for p in procs:
        p.start()
    yield gates, outcomes
    gates.abort()  # frees drivers still at a gate if the test stopped early
    for p in procs:
        p.join(timeout=10)
        if p.exitcode is None:
            p.kill()
            p.join()


def _round(path, found: str, gates, outcomes) -> tuple[list[tuple], str, bool]:
    """Lays ``found`` down as the lock, lets the drivers race for it; their outcomes, the lock's record while
    they all hold or have given up, and whether it was gone after they released."""
    path.write_text(found)
    gates.wait()
    gates.wait()
    results = sorted(outcomes.get(timeout=30) for _ in range(DRIVERS))
    during = path.read_text()
    with pytest.raises(EmotuneError, match="is already running"):
        DriverLock(path.with_suffix("")).acquire("race")  # a driver arriving after the race
    gates.wait()
    gates.wait()
    return results, during, path.exists()


def test_drivers_racing_for_a_dead_drivers_lock_take_it_over_one_at_a_time(tmp_path, drivers):
    gates, outcomes = drivers
    path, dead = tmp_path / "race.lock", _dead_pid()
    for n in range(ROUNDS):
        # a start time that cannot match makes the lock stale even if the pid has been given out again
        results, during, left = _round(path, _record(dead, "-1", 1000.0 + n), gates, outcomes)
        winners = [r for r in results if r[1] == "won"]
        assert len(winners) == 1, (n, results)
        assert json.loads(during)["pid"] == winners[0][0]
        assert f"taking over the lock of a driver that is gone (pid {dead} " in winners[0][2]
        refused = [r[2] for r in results if r[1] == "refused"]
        assert all(f"is already running: its driver is pid {winners[0][0]} " in text for text in refused), refused
        assert not left


def test_a_live_drivers_lock_is_never_taken_over(tmp_path, drivers):
    gates, outcomes = drivers
    path = tmp_path / "race.lock"
    with subprocess.Popen(["sleep", "60"]) as alive:
        try:
            held = _record(alive.pid, driver_lock._process_start(alive.pid), time.time())
            for _ in range(ROUNDS - 1):
                results, during, left = _round(path, held, gates, outcomes)
                assert [r[1] for r in results] == ["refused"] * DRIVERS
                assert all(f"is already running: its driver is pid {alive.pid} " in r[2] for r in results)
                assert during == held and left
        finally:
            alive.kill()
    # the same holder once it is gone
    results, during, left = _round(path, held, gates, outcomes)
    assert sorted(r[1] for r in results) == ["refused"] * (DRIVERS - 1) + ["won"]
    assert not left


def test_release_removes_only_its_own_lock(tmp_path):
    mine, path = DriverLock(tmp_path / "s"), tmp_path / "s.lock"
    mine.acquire("s")
    assert json.loads(path.read_text())["pid"] == os.getpid()
    mine.release()
    assert not path.exists()

    mine.acquire("s")
    other = _record(_dead_pid(), None, time.time())
    path.write_text(other)  # another driver took over meanwhile
    mine.release()
    assert path.read_text() == other and not mine.held
    DriverLock(tmp_path / "s").release()  # never acquired: leaves the lock alone
    assert path.read_text() == other


def test_take_over_lock_takes_a_live_drivers_lock_with_a_note(tmp_path, capsys):
    path = tmp_path / "s.lock"
    with subprocess.Popen(["sleep", "60"]) as alive:
        try:
            path.write_text(_record(alive.pid, driver_lock._process_start(alive.pid), time.time()))
            lock = DriverLock(tmp_path / "s")
            lock.acquire("s", take_over=True)
        finally:
            alive.kill()
    assert f"search 's': taking over the lock of pid {alive.pid} on host " in capsys.readouterr().out
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_a_file_system_without_file_locks_stops_a_take_over_safely(tmp_path, monkeypatch):
    path = tmp_path / "s.lock"
    stale = _record(_dead_pid(), "-1", time.time())
    path.write_text(stale)

    def refuse(*_):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(driver_lock.fcntl, "flock", refuse)
    with pytest.raises(EmotuneError, match=r"refuses a file lock .*\(No locks available\)\. If no driver"):
        DriverLock(tmp_path / "s").acquire("s")
    assert path.read_text() == stale and not list(tmp_path.glob(".s.lock.*.*"))  # no draft left behind



def test_drivers_racing_for_a_dead_drivers_lock_in_the_mlflow_store_take_it_over_one_at_a_time(tmp_path):
    from mlflow import MlflowClient

    from emotune.tracking.store import client, take_store_lock

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = {"uri": uri, "experiment": "emotune"}
    client(uri)  # the store exists before the drivers race for its lock
    context = mp.get_context("spawn")
    gates, outcomes = context.Barrier(DRIVERS + 1, timeout=120), context.Queue()
    procs = [context.Process(target=_driver, args=(uri, gates, outcomes, True), daemon=True) for _ in range(DRIVERS)]
    for p in procs:
        p.start()
    dead = _dead_pid()
    try:
        for n in range(STORE_ROUNDS):
            stale = {"host": socket.gethostname(), "pid": dead, "pid_start": "-1", "started": 1000.0 + n,
                     "search": "race", "token": f"dead{n}"}
            assert take_store_lock(tracking, "search/race", stale) is None  # a driver that died holding it
            gates.wait()
            gates.wait()
            results = sorted(outcomes.get(timeout=60) for _ in range(DRIVERS))
            winners = [r for r in results if r[1] == "won"]
            assert len(winners) == 1, (n, results)
            # one driver moved the dead driver's lock aside (not always the one that then took the lock)
            note = f"taking over its lock in the MLflow store {uri} from a driver that is gone (pid {dead} "
            assert sum(note in r[2] for r in results) == 1, results
            refused = [r[2] for r in results if r[1] == "refused"]
            assert all(f"is already running against the MLflow store {uri}: its driver is pid {winners[0][0]} "
                       in text for text in refused), refused
            gates.wait()
            gates.wait()
            # released: nothing is left in the store, neither the lock nor the dead driver's, moved aside
            assert MlflowClient(uri).search_registered_models() == []
    finally:
        gates.abort()
        for p in procs:
            p.join(timeout=10)
            if p.exitcode is None:
                p.kill()
                p.join()
