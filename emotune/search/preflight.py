"""The preflight of a search on a Ray cluster: before any encoding or training, every node says what it cannot see.

A trial or cache worker can land on any node, and a node that lacks the corpus, the cache folder, an encoder, Ray's
storage or the tracking server would otherwise fail mid-search, far from the cause. One small task is pinned to each
alive node (node affinity, no CPU asked, so it runs beside whatever is there) and checks that the node can:

- read the corpus: a few named clips of each split;
- write and read the feature cache folder, and that it is the driver's folder (a marker with a token from the driver);
- find every encoder the search can pick, by hub id and commit or in ``paths.models_dir``;
- write and read Ray's storage folder (the same marker check);
- reach the tracking server.

The search stops on a table (node, what it cannot see, the fix) when any node fails. On a single node the driver
has already seen everything itself, and the preflight is skipped.
"""

from __future__ import annotations

import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from emotune.errors import EmotuneError

CLIPS_PER_SPLIT = 2  # enough to show the corpus is mounted; reading them all is the trials' job
ANSWER_S = 120.0     # a node that has not answered by then is reported, not waited for
MARKERS = ".emotune-preflight"


@dataclass(frozen=True)
class Problem:
    """One thing a node cannot see, and what to do about it."""

    node: str
    what: str
    fix: str


@dataclass
class Probe:
    """What every node is asked to see: plain values and absolute paths only."""

    token: str
    clips: list[str]
    corpus_root: str
    cache_dir: str
    storage: str
    encoders: list[tuple[str, object]] = field(default_factory=list)  # (name, EncoderFiles)
    tracking_uri: str = ""


def _shared(kind: str, folder: str, token: str, key: str, fix: str) -> list[tuple[str, str]]:
    """Check that ``folder`` is the driver's (its marker holds ``token``), and writable here."""
    marker = Path(folder) / MARKERS / token
    try:
        seen = marker.read_text()
    except OSError as exc:
        return [(f"the {kind} {folder}: not the driver's folder here ({exc.strerror or exc})", fix)]
    if seen != token:
        return [(f"the {kind} {folder}: a different folder than the driver's", fix)]
    mine = marker.with_name(f"{token}.{uuid.uuid4().hex[:8]}")
    try:
        mine.write_text(token)
        readable = mine.read_text() == token
        mine.unlink()
    except OSError as exc:
        return [(f"the {kind} {folder}: cannot write to it ({exc.strerror or exc})",
                 f"let the user running Ray write to {folder} on every node ({key})")]
    return [] if readable else [(f"the {kind} {folder}: what it writes does not read back", fix)]


def _tracking(uri: str) -> list[tuple[str, str]]:
    import urllib.error
    import urllib.request

    from emotune.tracking.store import is_server

    if not is_server(uri):
        return []
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
            return []
    except urllib.error.HTTPError:  # it answers (a login wall is still reachable)
        return []
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        return [(f"the tracking server {uri} ({reason})",
                 "start `emotune server --host 0.0.0.0 --auth` on a machine every node reaches and give its address "
                 "as tracking.uri (not 127.0.0.1, which each node reads as itself)")]


def check_node(probe: Probe) -> tuple[str, list[tuple[str, str]]]:
    """Run on one node: its host name, and (what it cannot see, fix) pairs."""
    from emotune.features.locate import hub_offline, node_name

    found: list[tuple[str, str]] = []
    for clip in probe.clips:
        try:
            with open(clip, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            found.append((f"the corpus clip {clip} ({exc.strerror or exc})",
                          f"mount the corpus folder {probe.corpus_root} at the same path on every node (data.root)"))
            break  # one unreadable clip says it; the rest would say the same
    found += _shared("feature cache", probe.cache_dir, probe.token, "features.dir",
                     "features.dir must be a folder every node mounts at the same path (shared storage)")
    found += _shared("Ray storage", probe.storage, probe.token, "ray.storage",
                     "ray.storage must be a folder every node mounts at the same path (shared storage)")
    for name, files in probe.encoders:
        if files.find() is None and (files.folder or hub_offline()):
            found.append((f"the encoder '{name}' ({files.label}): not in {files.where_looked()}", files.fix()))
    found += _tracking(probe.tracking_uri)
    return node_name(), found


def _sample_clips(corpus) -> list[str]:
    return [str(u.audio) for split in (corpus.train, corpus.dev, corpus.test) for u in split[:CLIPS_PER_SPLIT]]


def alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def preflight(cfg: dict, corpus, recipes: dict, nodes: list[dict] | None = None) -> list[Problem]:
    """Ask every alive node what it cannot see (``recipes``: the search's, by ``modality/name``); [] on one node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes() if nodes is None else nodes
    if len(nodes) < 2:
        return []
    token = uuid.uuid4().hex
    folders = [cfg["features"]["dir"], cfg["ray"]["storage"]]
    for folder in folders:
        (Path(folder) / MARKERS).mkdir(parents=True, exist_ok=True)
        (Path(folder) / MARKERS / token).write_text(token)
    probe = Probe(token, _sample_clips(corpus), cfg["data"]["root"], cfg["features"]["dir"], cfg["ray"]["storage"],
                  [(key.split("/", 1)[1], recipe.files) for key, recipe in recipes.items() if recipe.files],
                  cfg["tracking"]["uri"])
    task = ray.remote(num_cpus=0, max_retries=0)(check_node)
    asked = {}
    for node in nodes:
        ref = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(probe)
        asked[ref] = node
    problems = []
    try:
        done, late = ray.wait(list(asked), num_returns=len(asked), timeout=ANSWER_S)
        for ref in done:
            node = asked[ref]
            try:
                host, found = ray.get(ref)
            except Exception as exc:  # the task itself failed: the node cannot even run emotune
                host, found = "?", [(f"emotune itself ({str(exc).splitlines()[-1][:200]})",
                                     "install emotune in the same environment on every node")]
            problems += [Problem(_label(node, host), what, fix) for what, fix in found]
        for ref in late:
            ray.cancel(ref, force=True)
            problems.append(Problem(_label(asked[ref], "?"), f"a preflight answer within {ANSWER_S:g} s",
                                    "check the node with `ray status` and its logs"))
    finally:
        for folder in folders:
            (Path(folder) / MARKERS / token).unlink(missing_ok=True)
    return sorted(problems, key=lambda p: p.node)


def _label(node: dict, host: str) -> str:
    return f"{node.get('NodeManagerAddress', '?')} {node['NodeID'][:8]} ({host})"


def problems_table(problems: list[Problem], n_nodes: int) -> str:
    """The table the search stops on: each node, what it cannot see, and under it the fix (paths are never cut)."""
    nodes = sorted({p.node for p in problems})
    width = max(len("node"), *(len(p.node) for p in problems))
    wrap = {"width": 90, "break_long_words": False, "break_on_hyphens": False}
    lines = [f"Preflight: {len(nodes)} of {n_nodes} Ray nodes cannot see what the search needs; nothing was started.",
             f"{'node':<{width}}  cannot see / fix"]
    for problem in problems:
        rows = textwrap.wrap(problem.what, **wrap) + textwrap.wrap(f"fix: {problem.fix}", **wrap,
                                                                  subsequent_indent="     ")
        for i, row in enumerate(rows):
            lines.append(f"{problem.node if i == 0 else '':<{width}}  {row}")
    return "\n".join(lines)


def token_auth_on() -> bool:
    """Whether this driver talks to Ray with token authentication (so the cluster it joined requires it)."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        return get_authentication_mode() == AuthenticationMode.TOKEN
    except ImportError:  # a Ray without token authentication
        return False


NO_TOKEN_WARNING = ("Warning: this Ray cluster runs without token authentication: anyone who reaches its ports can "
                    "run code on every node. Start every node and the driver with RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN_PATH=FILE, a token file only you can read (scripts/slurm/search.sbatch does).")


def check_cluster(cfg: dict, corpus, recipes: dict) -> None:
    """Run the preflight on a multi-node cluster; stop the search with the table when a node cannot see something.
    Either way it warns when the cluster runs without token authentication."""
    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    started = time.perf_counter()
    problems = preflight(cfg, corpus, recipes, nodes)
    warning = "" if token_auth_on() else "\n" + NO_TOKEN_WARNING
    if problems:
        raise EmotuneError(problems_table(problems, len(nodes)) + warning)
    print(f"Preflight: all {len(nodes)} Ray nodes see the corpus, the cache, the encoders, Ray's storage and the "
          f"tracking store ({time.perf_counter() - started:.1f} s).{warning}", flush=True)
