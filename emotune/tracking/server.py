"""``emotune server``: one MLflow tracking server for a team, or for a Ray cluster whose nodes share no disk.

    emotune server                            # http://127.0.0.1:5000; store and artifacts in runs/server/
    emotune server --host 0.0.0.0 --auth      # the whole network, with logins (MLFLOW_AUTH_ADMIN_PASSWORD first)
    emotune search tracking.uri=http://HOST:5000 ...   # searches, and their trials on any node, log to it

It is MLflow's own server with ``--serve-artifacts``: clients send runs and artifacts over HTTP, and the server
alone writes its store (SQLite by default, or any SQLAlchemy URI) and its artifact folder. It runs in a session
of its own, stopped whole by Ctrl-C, SIGTERM or SIGHUP, as ``emotune ui`` is (``emotune.tracking.ui.run_until_signal``).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from emotune.errors import EmotuneError

_WILDCARDS = ("0.0.0.0", "::", "")
# The first MLflow free of the published advisories on what the server exposes: path traversal in the artifact
# handler (CVE-2026-2033, fixed in 3.8.0), DNS rebinding (CVE-2025-14279, 3.5.0), basic-auth routes left open
# (CVE-2026-0545, CVE-2026-2652, 3.10.0) and the shipped admin password (GHSA-gq3w-7jj3-x7gr, 3.16.1)
MLFLOW_FLOOR = (3, 16, 1)
MIN_PASSWORD_LENGTH = 12  # what MLflow's basic-auth app itself requires from 3.16.1 on
KNOWN_PASSWORDS = ("password1234", "password")  # the admin passwords MLflow shipped or documented before 3.16.1


@dataclass(frozen=True)
class ServerOptions:
    """What ``emotune server`` was asked for; None means the default under the runs folder."""

    host: str = "127.0.0.1"
    port: int = 5000
    backend_store_uri: str | None = None
    artifacts_destination: str | None = None
    auth: bool = False
    auth_config: str | None = None
    insecure: bool = False
    workers: int | None = None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def client_uri(host: str, port: int) -> str:
    """The tracking URI clients use; on every interface, the machine's name (what other nodes can resolve)."""
    name = host
    if host in _WILDCARDS:
        name = socket.getfqdn()
        if name.startswith("localhost") or is_loopback(name):  # no DNS name: the one /etc/hostname gives
            name = socket.gethostname()
    if ":" in name and not name.startswith("["):  # an IPv6 address
        name = f"[{name}]"
    return f"http://{name}:{port}"


def _backend_store(uri: str | None, server_dir: Path) -> str:
    if not uri:
        uri = f"sqlite:///{server_dir / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: made absolute, as config does
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)  # SQLite makes no folders
    return uri


def _artifacts_destination(given: str | None, server_dir: Path) -> str:
    if given and re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", given):  # a URI: s3://, gs://, file:///...
        return given
    folder = Path(given).expanduser().resolve() if given else server_dir / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def check_mlflow_version(version: str) -> None:
    """Refuse an MLflow below :data:`MLFLOW_FLOOR`, naming what it lacks and the command that fixes it."""
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    if numbers and numbers < MLFLOW_FLOOR:
        floor = ".".join(map(str, MLFLOW_FLOOR))
        raise EmotuneError(f"emotune server needs MLflow {floor} or newer; this environment has MLflow {version}, "
                           "whose server carries published advisories on what it exposes (path traversal in the "
                           "artifact handler CVE-2026-2033, DNS rebinding CVE-2025-14279, open basic-auth routes "
                           "CVE-2026-0545 and CVE-2026-2652, a shipped admin password GHSA-gq3w-7jj3-x7gr). Upgrade "
                           f"it: pip install -U 'mlflow[auth]>={floor}'.")


def check_admin_password(password: str | None, source: str) -> None:
    """The admin password MLflow's basic-auth app will bootstrap with: set, long enough, not a known default."""
    fix = ("Set MLFLOW_AUTH_ADMIN_PASSWORD to a password of your own of 12 characters or more (e.g. "
           "MLFLOW_AUTH_ADMIN_PASSWORD=$(python -c 'import secrets; print(secrets.token_urlsafe(18))')), or give "
           "--auth-config FILE with such an admin_password.")
    if not password:
        raise EmotuneError(f"--auth needs the admin's password and MLflow ships none ({source} sets none). {fix}")
    if password in KNOWN_PASSWORDS:
        raise EmotuneError(f"the admin password in {source} is a default MLflow once shipped, which anyone may "
                           f"know. {fix}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise EmotuneError(f"the admin password in {source} has {len(password)} characters; MLflow requires "
                           f"{MIN_PASSWORD_LENGTH} or more. {fix}")


def _effective_password(config_path: str | None) -> tuple[str | None, str]:
    """The admin password MLflow will read, as it reads it: the variable when set (even empty), else the INI's."""
    import configparser

    if "MLFLOW_AUTH_ADMIN_PASSWORD" in os.environ:
        return os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"], "MLFLOW_AUTH_ADMIN_PASSWORD"
    if config_path:
        parser = configparser.ConfigParser()
        parser.read(config_path)
        return (parser["mlflow"].get("admin_password") if parser.has_section("mlflow") else None,
                f"the admin_password of {config_path}")
    return None, "MLFLOW_AUTH_ADMIN_PASSWORD"


def _private_file(path: Path) -> None:
    """Create ``path`` (if missing) readable and writable by its owner only, and keep it so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)


def _auth_env(config: str | None, server_dir: Path) -> dict[str, str]:
    """The environment MLflow's basic-auth app reads: its INI file (``config`` or one of ours), a form-signing key."""
    env = {}
    if config:
        if not Path(config).expanduser().is_file():
            raise EmotuneError(f"--auth-config {config}: no such file. Give the path of an MLflow basic-auth INI "
                               "file (a [mlflow] section with database_uri, admin_username, admin_password).")
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(Path(config).expanduser().resolve())
        check_admin_password(*_effective_password(env["MLFLOW_AUTH_CONFIG_PATH"]))
    else:
        check_admin_password(*_effective_password(None))
        # MLflow's own INI keeps the users in sqlite:///basic_auth.db, relative to wherever the server starts; the
        # login database (password hashes) and its INI are the owner's alone
        ini = server_dir / "basic_auth.ini"
        _private_file(ini)
        _private_file(server_dir / "basic_auth.db")
        ini.write_text("# Written by `emotune server --auth` at each start; give your own with --auth-config FILE.\n"
                       "[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{server_dir / 'basic_auth.db'}\nadmin_username = admin\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        # the app refuses to start without one; all its workers inherit this one, which is all it needs
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
    return env


def _allowed_hosts(host: str, port: int) -> list[str]:
    """``--allowed-hosts``: MLflow's defaults, the bound address and this machine's names, with and without port.

    MLflow answers 403 to a request whose Host header is not allowed (against DNS rebinding), and by default
    allows only a few loopback names and private ranges, so a client using the printed URI (this machine's name,
    or a loopback address such as 127.0.0.2) would be turned away.
    """
    try:
        from mlflow.server.security_utils import get_default_allowed_hosts
    except ImportError:  # an MLflow without the option (before 3.5) checks no Host header
        return []
    names = {socket.getfqdn(), socket.gethostname()} | ({host} if host not in _WILDCARDS else set())
    for name in list(names):
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(name, port, proto=socket.IPPROTO_TCP)}
        except OSError:
            pass
    extra = [f"{n}:{port}" if ":" not in n else f"[{n}]:{port}" for n in sorted(names)]
    return [*get_default_allowed_hosts(), *sorted(names), *extra]


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def serve_tracking(runs_dir: str | Path, options: ServerOptions) -> int:
    """Run the tracking server until a signal; returns the exit status."""
    from emotune.tracking.ui import run_until_signal

    host, port = options.host, options.port
    auth = options.auth or bool(options.auth_config)
    auth_config = options.auth_config or os.environ.get("MLFLOW_AUTH_CONFIG_PATH")  # MLflow's own variable
    if not is_loopback(host) and not (auth or options.insecure):
        raise EmotuneError(f"--host {host} opens the server to every machine that reaches port {port}, and anyone "
                           "there could read, change and delete every run: MLflow asks for no login by default. Add "
                           "--auth (logins; set MLFLOW_AUTH_ADMIN_PASSWORD first), or --insecure on a network where "
                           "everyone may do that (a private cluster).")
    from importlib.metadata import version

    check_mlflow_version(version("mlflow"))
    # checked first, because an MLflow already on the port would answer this one's readiness probe
    if _port_in_use(host, port):
        raise EmotuneError(f"port {port} is already in use (another MLflow?). Pick another with --port.")
    server_dir = Path(runs_dir) / "server"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true")}
    if auth:
        env.update(_auth_env(auth_config, server_dir))
    store = _backend_store(options.backend_store_uri, server_dir)
    artifacts = _artifacts_destination(options.artifacts_destination, server_dir)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--serve-artifacts",
               "--artifacts-destination", artifacts, "--host", host, "--port", str(port)]
    if options.workers:
        command += ["--workers", str(options.workers)]
    if auth:
        command += ["--app-name", "basic-auth"]
    if allowed := _allowed_hosts(host, port):
        command += ["--allowed-hosts", ",".join(allowed)]
    uri = client_uri(host, port)
    local = "127.0.0.1" if host == "0.0.0.0" else "[::1]" if host == "::" else host.strip("[]")
    probe = f"{client_uri(local, port)}/health"  # answered without a login, and from here whatever the name
    shown = re.sub(r"(://[^:/@]+:)[^@/]+@", r"\1***@", store)  # a database password stays out of logs

    def announce() -> None:
        where = f"on every interface, port {port}" if host in _WILDCARDS else f"at {uri}"
        name = " with this machine's name" if host in _WILDCARDS else ""
        login = ""
        if auth:
            admin = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
            first = "" if auth_config else f" (first user {admin}, password MLFLOW_AUTH_ADMIN_PASSWORD)"
            login = f" and MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD in their environment{first}"
        print(f"MLflow tracking server {where} (store {shown}, artifacts {artifacts}). Give it to searches{name}: "
              f"tracking.uri={uri}{login}  (Ctrl-C stops it)", flush=True)

    return run_until_signal(command, probe, announce, "MLflow tracking server", port, env=env,
                            port_taken=lambda: _port_in_use(host, port))


def add_user(tracking: dict, name: str, password_file: str | Path) -> str:
    """Create the non-admin user ``name`` on the tracking server ``tracking["uri"]`` (as the admin of
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) with EDIT on emotune's experiment ``tracking["experiment"]``
    (created if missing), so that workers log runs without the admin's rights. The password is read from
    ``password_file``, or made and written there (owner-only) when the file is missing or empty. Returns a line
    saying what was done."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from emotune.tracking.store import ensure_experiment, is_server

    uri = tracking["uri"]
    if not is_server(uri):
        raise EmotuneError(f"--add-user needs a tracking server: tracking.uri is {uri}. Give "
                           "tracking.uri=http://HOST:PORT of an `emotune server --auth`.")
    if not (os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD")):
        raise EmotuneError("--add-user acts as the server's admin: set MLFLOW_TRACKING_USERNAME=admin and "
                           "MLFLOW_TRACKING_PASSWORD to the admin's password (MLFLOW_AUTH_ADMIN_PASSWORD of the "
                           "server) for this command only.")
    path = Path(password_file).expanduser()
    if not path.is_file() or not path.read_text().strip():
        _private_file(path)
        path.write_text(secrets.token_urlsafe(24) + "\n")
    password = path.read_text().strip()
    check_admin_password(password, str(path))  # the same rules: 12 characters or more, no known default
    try:
        auth = get_app_client("basic-auth", tracking_uri=uri)
        try:
            auth.get_user(name)
            created = False
        except MlflowException:
            auth.create_user(name, password)
            created = True
        experiment_id = ensure_experiment(tracking)
        _grant_edit(auth, name, experiment_id)
    except MlflowException as exc:
        raise EmotuneError(f"the tracking server {uri} refused --add-user: {str(exc).splitlines()[0][:300]}. Are "
                           "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD the admin's?") from None
    what = "created" if created else "already there; its password was left as it was"
    return (f"user {name} {what}, with EDIT on experiment '{tracking['experiment']}' ({experiment_id}); its password "
            f"is in {path} (readable by you only). Workers: MLFLOW_TRACKING_USERNAME={name} "
            f"MLFLOW_TRACKING_PASSWORD=$(cat {path})")


def _grant_edit(auth, name: str, experiment_id: str) -> None:
    """EDIT on one experiment, through whichever API this MLflow has (3.17 grants by resource type)."""
    from mlflow.exceptions import MlflowException

    if hasattr(auth, "grant_user_permission"):
        def grant():
            auth.grant_user_permission(name, "experiment", experiment_id, "EDIT")

        def revoke():
            auth.revoke_user_permission(name, "experiment", experiment_id)
    else:
        def grant():
            auth.create_experiment_permission(experiment_id, name, "EDIT")

        def revoke():
            auth.delete_experiment_permission(experiment_id, name)
    try:
        grant()
    except MlflowException:  # granted before, maybe otherwise: made EDIT
        revoke()
        grant()
