"""One driver per search: a lock file beside the search's results folder, naming who holds it.

Two drivers of the same search would both restore the same Tune experiment and both write its MLflow runs;
the second start must stop before it touches either. Ray does not guard against this, so the search takes
``<ray.storage>/<name>.lock`` (created atomically, also on shared storage, so it covers a cluster). The file
records host, pid and start time. A lock left by a driver that died on this host (its process is gone) is
taken over with a note, so running the same command again still resumes a search after ``kill -9``; a lock
from another host cannot be checked from here and needs ``search.take_over_lock=true``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from emotune.errors import EmotuneError


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (None if there is no such process), so that a
    recycled pid is not mistaken for the driver that wrote the lock."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "unknown"
        return "unknown"
    return stat.rsplit(")", 1)[1].split()[19]


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {since}"


class DriverLock:
    """The lock of one search; ``acquire`` or raise, ``release`` at the end (also on Ctrl-C and errors)."""

    def __init__(self, experiment_dir: Path) -> None:
        self.path = Path(str(experiment_dir) + ".lock")
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or damaged: treated as held by an unknown driver

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or "pid" not in holder:
            return False
        start = _process_start(int(holder["pid"]))
        return start is None or (start != "unknown" and start != holder.get("pid_start"))

    def acquire(self, name: str, take_over: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
              "started": time.time(), "search": name}
        for _ in range(3):
            # the record is written first and linked in whole, so a reader never sees a half-written lock
            draft = self.path.with_name(f".{self.path.name}.{me['host']}.{me['pid']}")
            draft.write_text(json.dumps(me))
            try:
                os.link(draft, self.path)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released in between: try again
                if self._is_stale(holder):
                    print(f"search '{name}': taking over the lock of a driver that is gone ({_describe(holder)}).",
                          flush=True)
                elif take_over:
                    print(f"search '{name}': taking over the lock of {_describe(holder)}, as "
                          "search.take_over_lock=true asks.", flush=True)
                else:
                    elsewhere = holder.get("host") != socket.gethostname()
                    raise EmotuneError(
                        f"search '{name}' is already running: its driver is {_describe(holder)} (lock {self.path}). "
                        "Wait for it to finish (running the same command afterwards resumes it), or start another "
                        "search with search.name=NEW_NAME."
                        + (" If that driver is dead (its host went down), pass search.take_over_lock=true."
                           if elsewhere else "")) from None
                self.path.unlink(missing_ok=True)
                continue
            finally:
                draft.unlink(missing_ok=True)
            self.held = True
            return
        raise EmotuneError(f"could not take the lock {self.path} of search '{name}' (another driver keeps taking it); "
                           "check that no other driver of this search is starting, then try again.")

    def release(self) -> None:
        if not self.held:
            return
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False
