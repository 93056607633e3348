"""One driver per search: a lock file beside the search's results folder, naming who holds it.

Two drivers of the same search would both restore the same Tune experiment and both write its MLflow runs;
the second start must stop before it touches either. Ray does not guard against this, so the search takes
``<ray.storage>/<name>.lock`` (created atomically, also on shared storage, so it covers a cluster). The file
records host, pid and start time. A lock left by a driver that died on this host (its process is gone) is
taken over with a note, so running the same command again still resumes a search after ``kill -9``; a lock
from another host cannot be checked from here and needs ``search.take_over_lock=true``. Drivers with other
``ray.storage`` folders never see that file, so the search also takes a lock in its MLflow store
(:class:`StoreLock`), under the same rules.

Several drivers may find the same dead holder at once; exactly one of them takes over. A holder can only be
judged dead on its own host, so those drivers all run on one host, where a file lock (flock on
``.<name>.lock.guard``) lets them in one at a time. Inside, a driver replaces the lock only if it still holds
the very record that was judged dead, and does it with ``os.rename``, which swaps the file in one step.
That record is never written again, so the first driver in replaces it and every later one sees the
first's live record and stops as "already running"; a driver arriving after finds either the dead record
(and queues) or the live one, never an empty path where its own ``os.link`` could slip in. Without the
flock, "check, then rename" would not do: two drivers could both check before either renames. The system
drops a flock when its process dies, so a driver killed half-way through blocks nobody.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
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


def _is_gone(holder: dict) -> bool:
    """Whether the driver ``holder`` names is known to be dead: it ran on this host and its process is gone (or the
    pid now belongs to another process). A driver on another host cannot be checked from here."""
    if holder.get("host") != socket.gethostname() or "pid" not in holder:
        return False
    start = _process_start(int(holder["pid"]))
    return start is None or (start != "unknown" and start != holder.get("pid_start"))


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {since}"


def _my_record(name: str, **extra) -> dict:
    """What a lock records of this driver."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "started": time.time(), "search": name, **extra}


def _already_running(name: str, holder: dict, running: str, details: str, resumes: bool) -> EmotuneError:
    """The refusal when ``holder`` holds the lock and is not known to be dead (``resumes``: the same command run
    afterwards resumes that driver's search, which is so when both share the Ray folder)."""
    elsewhere = holder.get("host") != socket.gethostname()
    return EmotuneError(
        f"search '{name}' is already running{running}: its driver is {_describe(holder)}{details}. Wait for it to "
        f"finish{' (running the same command afterwards resumes it)' if resumes else ''}, or start another search "
        "with search.name=NEW_NAME."
        + (" If that driver is dead (its host went down), pass search.take_over_lock=true." if elsewhere else ""))


class _Lock:
    """What both locks share: held for a ``with`` block."""

    def acquire(self, name: str, take_over: bool = False) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    @contextmanager
    def holding(self, name: str, take_over: bool = False):
        """The lock, held for the ``with`` block and released after it, however it ends."""
        self.acquire(name, take_over)
        try:
            yield self
        finally:
            self.release()


def _parse(record: str) -> dict:
    try:
        return json.loads(record)
    except ValueError:
        return {}  # damaged: treated as held by an unknown driver


class DriverLock(_Lock):
    """The lock of one search; ``acquire`` or raise, ``release`` at the end (also on Ctrl-C and errors)."""

    def __init__(self, experiment_dir: Path) -> None:
        self.path = Path(str(experiment_dir) + ".lock")
        self.held = False

    def _record(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return ""  # unreadable: treated as held by an unknown driver

    def acquire(self, name: str, take_over: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _my_record(name)
        # the record is written first and put in place whole, so a reader never sees a half-written lock
        draft = self.path.with_name(f".{self.path.name}.{me['host']}.{me['pid']}")
        try:
            for _ in range(3):
                draft.write_text(json.dumps(me))
                if self._place(draft, name, take_over):
                    self.held = True
                    return
        finally:
            draft.unlink(missing_ok=True)
        raise EmotuneError(f"could not take the lock {self.path} of search '{name}' (another driver keeps taking it); "
                           "check that no other driver of this search is starting, then try again.")

    def _place(self, draft: Path, name: str, take_over: bool) -> bool:
        """Puts ``draft`` in as the lock; False if the lock changed under way (worth another try)."""
        try:
            os.link(draft, self.path)
            return True
        except FileExistsError:
            pass
        record = self._record()
        if record is None:
            return False  # released in between
        holder = _parse(record)
        if _is_gone(holder):
            note = f"taking over the lock of a driver that is gone ({_describe(holder)})."
        elif take_over:
            note = f"taking over the lock of {_describe(holder)}, as search.take_over_lock=true asks."
        else:
            raise _already_running(name, holder, "", f" (lock {self.path})", resumes=True)
        if not self._replace(record, draft, name):
            return False
        print(f"search '{name}': {note}", flush=True)
        return True

    def _replace(self, record: str, draft: Path, name: str) -> bool:
        """Renames ``draft`` over the lock if the lock still holds ``record``; see the module's docstring."""
        # never deleted: a driver queued on a deleted guard and one that created it anew would both get in
        guard_path = self.path.with_name(f".{self.path.name}.guard")
        with open(guard_path, "a") as guard:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX)
            except OSError as e:
                raise EmotuneError(
                    f"search '{name}': cannot take over the lock {self.path}, as the file system refuses a file "
                    f"lock on {guard_path} ({e.strerror}). If no driver of this search is running, delete "
                    f"{self.path} and start again.") from None
            if self._record() != record:
                return False
            os.rename(draft, self.path)
            return True

    def release(self) -> None:
        if not self.held:
            return
        record = self._record()
        holder = _parse(record) if record else {}
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False


class StoreLock(_Lock):
    """The lock of one search name in the MLflow store, beside the file lock in its Ray folder.

    Drivers with other ``ray.storage`` folders (another disk, another machine) never see each other's file lock,
    but they write the same MLflow runs when they share a store and a name. The store's lock is a registered model
    whose name is unique in the store (see :func:`emotune.tracking.take_store_lock`); its record names the driver,
    and a dead driver's lock is taken over as with the file lock.
    """

    def __init__(self, tracking: dict, key: str, ray_folder: str = "") -> None:
        self.tracking, self.key, self.ray_folder = tracking, key, ray_folder  # the folder is named to other drivers
        self.holder: dict | None = None

    def acquire(self, name: str, take_over: bool = False) -> None:
        from emotune.tracking.store import clear_stale_store_lock, take_store_lock

        me = _my_record(name, ray_folder=self.ray_folder, token=uuid.uuid4().hex)
        where = f"the MLflow store {self.tracking['uri']}"
        for _ in range(3):
            holder = take_store_lock(self.tracking, self.key, me)
            if holder is None:
                self.holder = me
                return
            gone = _is_gone(holder)
            if not (gone or take_over):
                raise _already_running(name, holder, f" against {where}",
                                       f", with its Ray folder in {holder.get('ray_folder') or 'an unknown place'}",
                                       resumes=False)
            if clear_stale_store_lock(self.tracking, self.key, holder):  # else another driver did: next round
                print(f"search '{name}': taking over its lock in {where} from "
                      + (f"a driver that is gone ({_describe(holder)})." if gone else
                         f"{_describe(holder)}, as search.take_over_lock=true asks."), flush=True)
        raise EmotuneError(f"could not take the lock of search '{name}' in {where} (another driver keeps taking it); "
                           "check that no other driver of this search is starting, then try again.")

    def release(self) -> None:
        from emotune.tracking.store import release_store_lock

        if self.holder is not None:
            release_store_lock(self.tracking, self.key, self.holder)
            self.holder = None
