"""A real multi-node Ray cluster on one machine, for tests: each node a ``ray start --block`` of its own.

    with RayNodes() as cluster:
        address = cluster.head(num_cpus=1)                       # "127.0.0.1:PORT", once the head is up
        node_id = cluster.worker(num_cpus=1, hidden=[models])    # this node's processes see an empty `models`
        ray.init(address=address)
        ...                                                      # pin work with cluster.node_ids["w1"] or
        ray.shutdown()                                           # resources={"node:w1": 0.01}
    # every process of both nodes is gone, their folders too; `ray stop` is never run

Each node is a ``ray start --block`` in a new session, with its own environment: HOME, HF_HOME, TMPDIR,
RAY_TMPDIR and Ray's ``--temp-dir`` all point into a fresh folder per node (/tmp/rn-XXXXXXXX/NAME/), so nothing
in a home or cache is shared between nodes. ``hidden`` folders are covered, for that node only, by an empty
tmpfs in a mount namespace of its own (``unshare -m``): a node without the models, the data, a cache...

Ports: the head's GCS port is picked free here (and the start retried if it was taken meanwhile). Every other
port Ray would otherwise take at a fixed default (ray client server 10001, dashboard agent 52365, workers
10002-19999, dashboard 8265) is either picked free here or set to 0, which Ray 2.60's source treats as "bind
any free port" for the node manager, object manager, runtime env agent, dashboard agent (http and grpc),
metrics export, and, with ``--min-worker-port=0 --max-worker-port=0``, for each worker: the OS chooses, so two
clusters (or any other Ray on the machine) cannot collide there, as a range checked free only at start could.
The ray client server port is passed only when ray[client] is installed (``ray start`` refuses it otherwise,
and then starts no client server).
Ray turns ``--node-ip-address=127.0.0.1`` into the machine's own address (``resolve_ip_for_localhost``), so the
nodes show with that IP, and the GCS, raylets and agents listen on all addresses: 127.0.0.1:PORT works.

What was found about Ray's processes (Ray 2.60, Linux) and how they are stopped:

* ``ray start --block`` starts the GCS server, the autoscaler monitor, a minimal dashboard head (even with
  ``--include-dashboard=false``; it does not listen on the dashboard port, but ``ray start`` test-binds that
  port first and, if it is taken, logs an error and starts no dashboard head at all: hence a free
  ``--dashboard-port``, so a node is the same whatever else runs), the log monitor and the raylet; the raylet
  starts the dashboard agent, the runtime env agent and the Python workers. All of them stayed in the session
  of ``ray start``, the task workers too, also inside ``unshare -m sh -c '... exec ray start'`` (``exec`` keeps
  the session leader's pid). Nothing escaped the session in the runs made while writing this (the test, two
  of these clusters beside a default ``ray start``, failed starts). In Ray's source, only Ray Jobs entrypoints
  (``job_supervisor.py``, ``start_new_session=True``) would leave it; they need the dashboard's job module,
  which these nodes do not run. Their output goes to a log file under the temp dir, which the sweep below sees.
* The agents and the workers rename themselves (``ray::DashboardAgent``, ``ray::IDLE``...): their
  /proc/PID/cmdline no longer names the temp dir, and their /proc/PID/environ is overwritten as well, so
  neither can find them. Their open files can: every Ray process keeps log files (and sockets) open under the
  node's temp dir. ``stop()`` therefore also kills, after the sessions, any process whose command line or
  open files reference this object's folder (the folder is fresh, so it is never someone else's), as a
  safety net, and ``leftovers()`` reports any process that still references the folder or the GCS port.
* Ray 2.60's ``ray start`` drains its node on SIGTERM, for up to ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``
  (30 s by default). With that on, SIGTERM to every process of the session at once was slow: ``ray start``,
  the GCS and the monitor outlived a 15 s wait (the drain waits on a GCS that is going down too). The nodes
  here run with the drain off (a test cluster has nothing to drain to; ``env`` may turn it back on), and then
  either way takes about 2 s. Each node is stopped by SIGTERM to ``ray start`` alone first, which stops its
  own processes in order (raylet, then GCS...) and works with the drain on as well, then ``stop_session``
  (SIGTERM to the whole session, a wait, SIGKILL) for whatever is left.
* The raylet and the agents are reparented to PID 1 when ``ray start`` exits, and may show as zombies until
  PID 1 reaps them (here after a moment): dead, holding no port or file, they are ignored. ``ray start``
  itself is reaped only after its whole session is gone, so that its pid, the session id, cannot be reused
  by an unrelated process meanwhile.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from emotune.tracking.ui import _is_zombie, _session_members, stop_processes, stop_session

ROOT = Path(__file__).resolve().parents[1]  # the project, for nodes' PYTHONPATH
VENV_BIN = Path(sys.executable).parent

# Variables that would point a node's caches or Ray's temp dir outside the node's own folder.
# ray.init in the test process leaves RAY_AUTH_MODE=token, RAY_CLIENT_MODE and PYTHONBREAKPOINT in its environment: a
# node started after that would demand a token nobody has (so every RAY_* variable is dropped, not only these)
_DROPPED = ("PYTHONBREAKPOINT", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_DATASETS_CACHE", "TORCH_HOME")
_STARTED = "Ray runtime started."
_PORT_TAKEN = re.compile(r"Failed to start the grpc server|already in use")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,12}")
_SOCKET_MAX = 107  # bytes in a unix socket path; Ray's longest is TEMP/session_<date>_<time>_<us>_<pid>/sockets/...

# Run in a subprocess: connect a short-lived driver and wait until the GCS counts `node_id` alive; print the
# nodes. A driver of its own keeps the test process free for its own `ray.init`.
_CHECK = """
import json, sys, time
import ray
address, node_id, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + seconds
while True:
    nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
    if any(n["id"] == node_id and n["alive"] for n in nodes) or time.monotonic() > deadline:
        break
    time.sleep(0.2)
ray.shutdown()
print(json.dumps(nodes))
"""


def free_port() -> int:
    """A TCP port nothing listens on now (on any address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ray_client_available() -> bool:
    """``ray start`` refuses ``--ray-client-server-port`` without ray[client]; with it, it defaults to 10001."""
    try:
        from ray._private.utils import get_ray_client_dependency_error
    except ImportError:  # pragma: no cover - another Ray layout
        import importlib.util

        return importlib.util.find_spec("grpc") is not None
    return get_ray_client_dependency_error() is None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _references_folder(pid: int, folder: str, environ: bool = False) -> bool:
    """Whether process `pid` names `folder` in its command line (or environment), or has a file open in it."""
    names = re.compile(re.escape(folder) + r"(?![\w.-])")  # the folder itself, not /tmp/rn-ab for /tmp/rn-abc
    if any(names.search(arg) for arg in _cmdline(pid)):
        return True
    if environ:
        try:
            if names.search(Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")):
                return True
        except OSError:
            pass
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if names.match(os.readlink(fd)):
                return True
        except OSError:
            continue
    return False


@dataclass
class Node:
    name: str
    folder: Path
    env: dict
    command: list[str]
    process: subprocess.Popen | None = None
    node_id: str | None = None
    hidden: tuple[str, ...] = ()
    stopped: bool = False

    @property
    def home(self) -> Path:
        return self.folder / "home"

    @property
    def temp_dir(self) -> Path:
        return self.folder / "r"

    @property
    def log(self) -> Path:
        return self.folder / "ray-start.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class RayNodes:
    """Start a head and workers as separate ``ray start --block`` processes; ``stop()`` ends exactly those."""

    startup_timeout: float = 90.0
    stop_grace: float = 10.0
    nodes: dict[str, Node] = field(default_factory=dict)  # name -> node, in start order
    address: str | None = None  # "127.0.0.1:PORT" of the head's GCS
    port: int | None = None
    root: Path | None = None
    common_env: dict = field(default_factory=dict)  # for every node and the node check (RAY_AUTH_MODE=token...)

    # ---- public API ---------------------------------------------------------------------------------------

    @property
    def node_ids(self) -> dict[str, str]:
        """Node name ("head", "w1", ...) -> Ray node id (hex), for NodeAffinitySchedulingStrategy."""
        return {name: node.node_id for name, node in self.nodes.items() if node.node_id}

    def head(self, num_cpus: int = 1, env: dict | None = None, name: str = "head", attempts: int = 3) -> str:
        """Start the head node; returns its address ``127.0.0.1:PORT`` once the GCS counts the head alive."""
        if self.address is not None:
            raise RuntimeError("this RayNodes already has a head")
        for _ in range(attempts):
            port = free_port()
            ports = [f"--port={port}", f"--dashboard-port={free_port()}"]
            if _ray_client_available():
                ports.append(f"--ray-client-server-port={free_port()}")
            node = self._start(name, ["--head", *ports, "--include-dashboard=false"], num_cpus, env, ())
            try:
                self._wait_started(node, head=True)
            except _PortTaken:  # taken between free_port() and the GCS binding it: again, on other ports
                self._stop_node(node, graceful=False)
                del self.nodes[name]
                shutil.rmtree(node.folder, ignore_errors=True)
                continue
            except BaseException:
                self._stop_node(node, graceful=False)
                raise
            self.port, self.address = port, f"127.0.0.1:{port}"
            try:
                self._wait_alive(node)
            except BaseException:
                self._stop_node(node, graceful=False)
                raise
            return self.address
        raise RuntimeError(f"the head could not get a free port in {attempts} attempts")

    def worker(self, num_cpus: int = 1, env: dict | None = None, hidden=(), name: str | None = None) -> str:
        """Start a worker node joined to the head; returns its Ray node id once the GCS counts it alive.

        Each folder in `hidden` is covered by an empty tmpfs in the node's own mount namespace: the node's
        processes (raylet, agents, task workers) see it empty, every other process sees it as it is.
        """
        if self.address is None:
            raise RuntimeError("start the head first")
        name = name or f"w{sum(1 for n in self.nodes.values() if n.name.startswith('w')) + 1}"
        hidden = tuple(str(Path(h).resolve()) for h in hidden)
        for folder in hidden:
            if not Path(folder).is_dir():
                raise ValueError(f"hidden folder {folder} is not a folder")
            inside = [p for p in (self._root(), ROOT, Path(sys.prefix).resolve()) if p == Path(folder)
                      or Path(folder) in p.parents]
            if inside:
                raise ValueError(f"hiding {folder} would hide {inside[0]}, which the node needs")
        node = self._start(name, [f"--address={self.address}"], num_cpus, env, hidden)
        try:
            self._wait_started(node)
            self._wait_alive(node)
        except BaseException:
            self._stop_node(node, graceful=False)
            raise
        return node.node_id

    def kill(self, name: str) -> int:
        """SIGKILL every process of node ``name`` at once, as a machine that dies would leave it; returns how many.
        ``stop()`` still reaps and sweeps what is left."""
        node = self.nodes[name]
        members = [pid for pid in _session_members(node.process.pid) if not _is_zombie(pid)]
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(members)

    def stop(self) -> None:
        """Stop every node this object started (workers first, then the head) and remove its folders.

        Safe to call more than once, and after a start that failed half way.
        """
        errors = []
        try:
            self._disconnect_driver()
            for node in reversed(list(self.nodes.values())):
                try:
                    self._stop_node(node)
                except Exception as error:  # pragma: no cover - stop the other nodes all the same
                    errors.append(error)
            if self.root is not None:
                self._kill_escaped()
            if errors:
                raise errors[0]
        finally:
            atexit.unregister(self.stop)
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """Live processes (not zombies, not this one) that still reference this cluster's folder or GCS port."""
        found = []
        folder = str(self.root) if self.root is not None else None
        port = re.compile(rf"(address|port)[^=]*=(\S*:)?{self.port}$") if self.port else None
        for pid in _pids():
            if pid == os.getpid() or _is_zombie(pid):
                continue
            if folder and _references_folder(pid, folder, environ=True):
                found.append(pid)
            elif port and any(port.search(arg) for arg in _cmdline(pid)):
                found.append(pid)
        return found

    def __enter__(self) -> "RayNodes":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- starting ---------------------------------------------------------------------------------------

    def _root(self) -> Path:
        if self.root is None:
            # short and under /tmp whatever TMPDIR says: Ray's socket paths must stay under 107 bytes
            self.root = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
            atexit.register(self.stop)
        return self.root

    def _env(self, folder: Path, extra: dict | None) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED and not k.startswith("RAY_")}
        path = os.pathsep.join([str(VENV_BIN)] + [p for p in env.get("PATH", "").split(os.pathsep) if p])
        pythonpath = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update(
            HOME=str(folder / "home"), HF_HOME=str(folder / "hf"), TMPDIR=str(folder / "tmp"),
            RAY_TMPDIR=str(folder / "r"), PATH=path, PYTHONPATH=pythonpath,
            RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        )
        env.update(self.common_env)
        env.update(extra or {})
        return env

    def _start(self, name: str, role: list[str], num_cpus: int, extra_env: dict | None, hidden) -> Node:
        if not _NAME.fullmatch(name):
            raise ValueError(f"node name {name!r}: 1-12 letters, digits, _ or - (socket paths are short)")
        if name in self.nodes:
            raise ValueError(f"there is already a node named {name}")
        folder = self._root() / name
        for sub in ("home", "hf", "tmp", "r"):
            (folder / sub).mkdir(parents=True)
        temp_dir = folder / "r"
        if len(str(temp_dir)) + len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store") > _SOCKET_MAX:
            raise ValueError(f"{temp_dir} is too long for Ray's unix sockets")
        command = [
            str(VENV_BIN / "ray"), "start", *role, "--block",
            f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={json.dumps({f'node:{name}': 1})}",
            "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp_dir}",
            "--node-manager-port=0", "--object-manager-port=0", "--min-worker-port=0", "--max-worker-port=0",
            "--dashboard-agent-listen-port=0", "--dashboard-agent-grpc-port=0", "--metrics-export-port=0",
            "--runtime-env-agent-port=0", "--log-style=record", "--log-color=false",
        ]
        if hidden:
            # absolute paths: a PATH in `env` must not change which unshare, sh and mount run
            unshare, mount = (shutil.which(tool) or tool for tool in ("unshare", "mount"))
            mounts = " && ".join(f"{mount} -t tmpfs -o size=1m,mode=0755 tmpfs {shlex.quote(h)}" for h in hidden)
            command = [unshare, "-m", "--propagation", "private", "/bin/sh", "-c",
                       f"{mounts} && exec {shlex.join(command)}"]
        node = Node(name, folder, self._env(folder, extra_env), command, hidden=tuple(hidden))
        self.nodes[name] = node  # before Popen returns: stop() must know it whatever happens next
        with node.log.open("wb") as log:
            node.process = subprocess.Popen(command, env=node.env, cwd=folder, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return node

    def _wait_started(self, node: Node, head: bool = False) -> None:
        """Wait for ``ray start`` to say the node runs; it says so once the GCS has registered its raylet."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            text = node.log.read_text(errors="replace") if node.log.exists() else ""
            if _STARTED in text:
                node.node_id = self._raylet_node_id(node)
                if node.node_id:
                    return
            if head and _PORT_TAKEN.search(text + "".join(
                    f.read_text(errors="replace") for f in node.temp_dir.glob("session_*/logs/gcs_server.out"))):
                # the GCS dies at once when its port is taken, but `ray start` notices only ~40 s later
                raise _PortTaken()
            status = _exit_status(node.process)
            if status is not None:
                raise RuntimeError(f"ray node {node.name} exited with {status}:\n{node.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"ray node {node.name} not up after {self.startup_timeout:.0f} s:\n{node.log_tail()}")

    def _raylet_node_id(self, node: Node) -> str | None:
        for pid in _session_members(node.process.pid):
            args = _cmdline(pid)
            if args and args[0].endswith("/raylet"):
                for arg in args:
                    if arg.startswith("--node_id="):
                        return arg.split("=", 1)[1]
        return None

    def _wait_alive(self, node: Node) -> None:
        """Ask the cluster itself, from a short-lived driver, that it counts the node alive."""
        check_env = self._env(self._root() / "check", None)
        for sub in ("home", "hf", "tmp", "r"):
            (self._root() / "check" / sub).mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-c", _CHECK, self.address, node.node_id, str(self.startup_timeout)],
                              env=check_env, cwd=self._root() / "check", capture_output=True, text=True,
                              timeout=self.startup_timeout + 60)
        try:
            nodes = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"could not list the nodes of {self.address}:\n{done.stdout[-2000:]}\n"
                               f"{done.stderr[-3000:]}") from None
        mine = [n for n in nodes if n["id"] == node.node_id and n["alive"]]
        if not mine or mine[0]["resources"].get(f"node:{node.name}") != 1.0:
            raise RuntimeError(f"the cluster does not count node {node.name} ({node.node_id}) alive: {nodes}")

    # ---- stopping ---------------------------------------------------------------------------------------

    def _stop_node(self, node: Node, graceful: bool = True) -> None:
        """Stop one node. `graceful=False` (a start that failed) skips the SIGTERM to ``ray start`` alone: it
        does not answer it while still starting."""
        if node.stopped or node.process is None:
            node.stopped = True
            return
        # start_new_session: `ray start` (or unshare, which execs it) leads the session, and its pid is the
        # session id. It is reaped only at the end: until then its pid, so the session id, cannot be reused by
        # an unrelated process, and stop_session cannot hit someone else's session.
        sid = node.process.pid
        if graceful and _exit_status(node.process) is None:
            try:
                os.kill(sid, signal.SIGTERM)  # `ray start` stops its own processes, in order
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + self.stop_grace
            while time.monotonic() < deadline and [pid for pid in _session_members(sid) if not _is_zombie(pid)]:
                time.sleep(0.1)
        stop_session(sid, grace=5.0 if graceful else 2.0)  # SIGTERM what is left of the session, then SIGKILL
        try:
            node.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed above
            pass
        node.stopped = True

    def _disconnect_driver(self) -> None:
        """A driver in this process still connected to this cluster would outlive its GCS and, a minute later,
        end the whole process (Ray's core worker exits when it cannot reach the GCS): shut it down first."""
        ray = sys.modules.get("ray")
        if ray is None or self.port is None or not ray.is_initialized():
            return
        try:
            gcs = ray.get_runtime_context().gcs_address or ""
        except Exception:  # pragma: no cover - a half-initialised driver
            gcs = ""
        if gcs.rsplit(":", 1)[-1] == str(self.port):
            ray.shutdown()

    def _kill_escaped(self) -> None:
        """Kill processes that left the sessions but still use this object's folder (none were seen)."""
        folder = str(self.root)
        stop_processes(lambda: [pid for pid in _pids() if pid != os.getpid() and not _is_zombie(pid)
                                and _references_folder(pid, folder)], grace=5.0)


class _PortTaken(Exception):
    pass


def _exit_status(process: subprocess.Popen) -> int | None:
    """The exit status of `process` if it has ended, without reaping it (so its pid stays reserved)."""
    if process.returncode is not None:
        return process.returncode
    try:
        done = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped elsewhere
        return -1
    return None if done is None else done.si_status
