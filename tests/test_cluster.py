"""A search on a real Ray cluster: separate `ray start` nodes, each with its own HOME, HF_HOME and TMPDIR, and a
real `emotune server` that every process logs to.

The nodes share this machine's filesystem (as NFS would share it) but no home and no Hugging Face cache. The
speech encoder is a tiny model saved in the driver's hub cache under a made-up hub id: the head node (the
driver's machine) has it, the worker node does not, until the driver copies it into ``paths.models_dir``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import leave_shared_ray, make_separable_corpus

from ray_nodes import RayNodes, free_port

HUB_ID = "emotune-test/tiny-speech"
COMMIT = "c0ffee" + "0" * 34


def hub_cache_with_made_up_encoder(hf_home: Path, build_dir: Path) -> None:
    """A tiny speech encoder saved in a hub-style cache (refs/main naming a snapshot) under ``HUB_ID``."""
    from emotune.features.tiny import build_tiny_encoder

    built = build_tiny_encoder("tiny-wav2vec2", build_dir / "tiny-wav2vec2")
    repo = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(built, repo / "snapshots" / COMMIT)


class Server:
    """`emotune server` on a free loopback port, in a session of its own, stopped by SIGTERM."""

    def __init__(self, runs: Path, env: dict) -> None:
        runs.mkdir(parents=True)
        self.log = runs / "server.log"  # a file, not a pipe: MLflow logs every request, and a full pipe blocks it
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "emotune.cli", "server", "--port", str(free_port()),
                                             "--workers", "2", f"paths.runs_dir={runs}"], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            found = re.search(r"tracking\.uri=(http://\S+)", self.log.read_text())
            if found:
                self.uri = found.group(1)
                return
            time.sleep(0.3)
        self.stop()
        raise AssertionError("emotune server did not start:\n" + self.log.read_text())

    def stop(self) -> None:
        from emotune.tracking.ui import stop_session

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        stop_session(self.process.pid)  # whatever of its session is left
        self.process.wait()


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """A tracking server and a two-node Ray cluster; the driver's environment; the shared folders."""
    leave_shared_ray()  # the driver of a cluster search joins the cluster, not the run's own Ray
    root = tmp_path_factory.mktemp("cluster")
    corpus = make_separable_corpus(root / "corpus")
    driver_home = root / "driver-home"
    hub_cache_with_made_up_encoder(driver_home / "hf", root / "build")
    # none of what an earlier ray.init left in this process (RAY_AUTH_MODE=token among it) reaches the driver
    driver_env = {k: v for k, v in os.environ.items()
                  if not k.startswith(("RAY_", "MLFLOW_TRACKING", "PYTHONBREAKPOINT"))}
    driver_env |= {"HOME": str(driver_home), "HF_HOME": str(driver_home / "hf"), "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                  driver_env.get("PYTHONPATH", "")])}
    server = Server(root / "server", driver_env)
    nodes = RayNodes()
    try:
        # the head is the driver's machine, so it shares the driver's Hugging Face cache, and nothing else
        address = nodes.head(num_cpus=1, env={"HF_HOME": str(driver_home / "hf")})
        worker = nodes.worker(num_cpus=1)
        yield {"root": root, "corpus": corpus, "env": driver_env, "server": server, "nodes": nodes,
               "address": address, "worker": worker}
    finally:
        nodes.stop()
        server.stop()
    assert not nodes.leftovers()


def search_command(team: dict, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "emotune.search", "space=smoke", "data=folder", f"data.root={team['corpus']}",
            "data.test_labels=test_labels.csv", f"paths.runs_dir={runs}", "data.dev_fraction=0.25",
            "trial.batch_size=8", "trial.crop_seconds=1.0", "features.variants=1", f"encoders.speech={HUB_ID}",
            "encoders.text=tiny-bert", "search.num_samples=3", "search.max_concurrent=2", "trial.max_epochs=2",
            "search.plan_time=false", f"ray.address={team['address']}",
            f"tracking.uri={team['server'].uri}", "tracking.experiment=cluster", *extra]  # tracking last: see below


def run(command: list[str], env: dict, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_cluster_search_with_an_sqlite_store_stops_before_any_work(team, tmp_path):
    from emotune.config import load_config
    from emotune.errors import EmotuneError
    from emotune.search.driver import run_search

    runs = tmp_path / "runs"
    cfg = load_config(search_command(team, runs)[3:-2], "search")  # the default tracking: SQLite in runs
    with pytest.raises(EmotuneError) as refused:
        run_search(cfg)
    assert "emotune server" in str(refused.value) and "tracking.allow_file_store_on_cluster" in str(refused.value)
    assert not runs.exists()  # no corpus statistics, no store, no Ray folder


def test_the_preflight_names_the_node_without_the_encoder_and_nothing_is_encoded(team, tmp_path):
    runs = tmp_path / "runs"
    done = run(search_command(team, runs), team["env"])
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    table = output[output.index("Preflight:"):]
    print(table)
    worker = team["worker"][:8]
    assert re.search(rf"{worker}.*?{re.escape(HUB_ID)}", table, re.S), table  # that node, that encoder
    assert "paths.models_dir" in table
    assert "1 of 2 Ray nodes" in table  # the head has the encoder in its Hugging Face cache
    assert not list((runs / "cache" / "features").rglob("*.safetensors"))  # nothing was encoded
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=team["server"].uri)
    experiment = client.get_experiment_by_name("cluster")
    assert not client.search_runs([experiment.experiment_id])  # nor recorded: the same command can simply run again


def test_a_search_on_the_cluster_records_everything_on_the_server(team, tmp_path):
    from mlflow import MlflowClient

    runs = tmp_path / "runs"
    models = team["root"] / "models"  # shared: the driver copies the encoder here, the worker finds it
    done = run(search_command(team, runs, f"paths.models_dir={models}", "search.name=on-cluster"), team["env"])
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "Preflight: all 2 Ray nodes" in output
    assert "runs without token authentication" in output and "RAY_AUTH_MODE=token" in output  # this one does
    assert not list(runs.rglob("mlflow.db"))  # no process opened a file store
    assert (models / f"models--{HUB_ID.replace('/', '--')}").is_dir()

    nodes = set()
    for result in (runs / "ray" / "on-cluster").glob("*/result.json"):
        nodes |= {json.loads(line).get("node_id") for line in result.read_text().splitlines() if line.strip()}
    assert team["worker"] in nodes and len(nodes - {None}) == 2  # trials ran on both nodes

    client = MlflowClient(tracking_uri=team["server"].uri)
    experiment = client.get_experiment_by_name("cluster")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    trials = client.search_runs([experiment.experiment_id], "tags.`emotune.kind` = 'trial'")
    assert len(trials) == 3
    for trial in trials:
        assert trial.info.status == "FINISHED" and "best_val_f1" in trial.data.metrics
        best = {Path(f.path).name for f in client.list_artifacts(trial.info.run_id, "best")}
        assert {"model.safetensors", "dev_predictions.csv", "test_predictions.csv"} <= best, best
    served = team["root"] / "server" / "server" / "artifacts"
    assert list(served.rglob("model.safetensors"))  # on the server's disk, written through the server

    ensemble = tmp_path / "ensemble"
    common = [f"paths.runs_dir={runs}", f"tracking.uri={team['server'].uri}", "tracking.experiment=cluster"]
    selected = run([sys.executable, "-m", "emotune.cli", "select-top", "--k", "3", "--search", "on-cluster",
                    "--out", str(ensemble), *common], team["env"])
    assert selected.returncode == 0, selected.stdout + selected.stderr
    # predict on a machine whose own Hugging Face cache is empty: the encoder comes from the models folder
    elsewhere = team["env"] | {"HOME": str(tmp_path / "other-home"), "HF_HOME": str(tmp_path / "other-home" / "hf")}
    clip = sorted((team["corpus"] / "audio").glob("*.wav"))[0]
    predicted = run([sys.executable, "-m", "emotune.cli", "predict", str(ensemble), "--audio", str(clip),
                     "--text", "qué rabia", "--models-dir", str(models)], elsewhere)
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    assert any(label in predicted.stdout for label in ("neutral", "disgust", "anger", "sadness", "joy", "fear"))


def test_the_preflight_names_the_node_that_cannot_see_the_corpus(team, tmp_path):
    blind = team["nodes"].worker(num_cpus=1, hidden=[team["corpus"]], name="blind")
    runs = tmp_path / "runs"
    done = run(search_command(team, runs, f"paths.models_dir={team['root'] / 'models'}"), team["env"])
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Preflight:" in output, output[-6000:]
    table = output[output.index("Preflight:"):]
    print(table)
    assert "1 of 3 Ray nodes" in table
    assert re.search(rf"{blind[:8]}.*?the corpus clip\s+{re.escape(str(team['corpus']))}", table, re.S), table


def test_a_node_that_cannot_see_the_corpus_cache_storage_or_server_gets_a_row_and_a_fix_each(tmp_path):
    """What each node runs in the preflight, run here: every missing thing is named with its fix (no cluster)."""
    import socket as sockets

    from emotune.search.preflight import MARKERS, Probe, Problem, check_node, problems_table

    cache, storage = tmp_path / "cache", tmp_path / "storage"
    (storage / MARKERS).mkdir(parents=True)
    (storage / MARKERS / "tok").write_text("tok")  # the driver's storage, seen; the cache was never marked
    with sockets.socket() as probe_port:
        probe_port.bind(("127.0.0.1", 0))
        closed = probe_port.getsockname()[1]  # nothing listens there once the socket closes
    host, found = check_node(Probe(token="tok", clips=[str(tmp_path / "corpus" / "a.wav")],
                                   corpus_root=str(tmp_path / "corpus"), cache_dir=str(cache),
                                   storage=str(storage), tracking_uri=f"http://127.0.0.1:{closed}"))
    whats = [what for what, _ in found]
    assert len(found) == 3, found
    assert f"the corpus clip {tmp_path / 'corpus' / 'a.wav'}" in whats[0] and "data.root" in found[0][1]
    assert whats[1].startswith(f"the feature cache {cache}: not the driver's folder here")
    assert whats[2].startswith(f"the tracking server http://127.0.0.1:{closed}") and "emotune server" in found[2][1]
    table = problems_table([Problem(host, what, fix) for what, fix in found], 2)
    assert table.startswith("Preflight: 1 of 2 Ray nodes cannot see what the search needs; nothing was started.")
    assert all(f"fix: {fix[:20]}" in table.replace("\n", " ") for _, fix in found)


@pytest.mark.slow
def test_a_driver_without_the_clusters_token_stops_with_what_to_set(tmp_path):
    """A cluster with Ray's token authentication, a driver without the token (and an old token in its home, as
    an earlier local Ray leaves one): the search stops with exit 2, naming RAY_AUTH_MODE and the token's file,
    without a traceback; with the token it joins."""
    leave_shared_ray()
    token = tmp_path / "ray-auth-token"
    token.write_text("emotune-test-token-" + "7" * 40)
    token.chmod(0o600)
    corpus = make_separable_corpus(tmp_path / "corpus")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("an-old-token-from-an-earlier-local-ray-" + "0" * 20)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_TRACKING"))}
    env |= {"HOME": str(home), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])}
    with RayNodes(common_env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}) as nodes:
        address = nodes.head(num_cpus=1)
        command = [sys.executable, "-m", "emotune.search", "space=smoke", "data=folder", f"data.root={corpus}",
                   f"paths.runs_dir={tmp_path / 'runs'}", "search.plan_time=false", f"ray.address={address}",
                   "tracking.allow_file_store_on_cluster=true"]
        refused = run(command, env, timeout=300)
        assert refused.returncode == 2, (refused.stdout + refused.stderr)[-3000:]
        assert "RAY_AUTH_MODE" in refused.stderr and "RAY_AUTH_TOKEN_PATH" in refused.stderr
        assert "Traceback" not in refused.stderr
        joined = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={address!r}); "
                                 "print(len(ray.nodes()))"], capture_output=True, text=True, timeout=120,
                                env=env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
        assert joined.returncode == 0 and joined.stdout.strip().splitlines()[-1] == "1", joined.stderr[-2000:]
    assert not nodes.leftovers()


def _trial_rows(experiment: Path) -> dict[str, list[dict]]:
    """Each trial's reported rows as Ray's result files hold them (a row being written may be cut: skipped)."""
    rows = {}
    for result in experiment.glob("*/result.json"):
        found = []
        for line in result.read_text().splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        rows[result.parent.name] = found
    return rows


@pytest.mark.slow
def test_a_trial_whose_node_dies_goes_on_from_its_checkpoint_on_another_node(tmp_path):
    """Two nodes, one trial on each; every process of the worker node is SIGKILLed in the middle of its trial. The
    trial starts again from its last checkpoint on the head, the search finishes, and the store holds one FINISHED
    run for it whose curve has every evaluation once."""
    from mlflow import MlflowClient

    leave_shared_ray()
    corpus = make_separable_corpus(tmp_path / "corpus")
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_TRACKING"))}
    env |= {"HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])}
    with RayNodes() as nodes:
        address = nodes.head(num_cpus=1)
        worker = nodes.worker(num_cpus=1)
        command = [sys.executable, "-m", "emotune.search", "space=smoke", "data=folder", f"data.root={corpus}",
                   "data.test_labels=test_labels.csv", f"paths.runs_dir={runs}", "data.dev_fraction=0.25",
                   "trial.batch_size=8", "trial.crop_seconds=1.0", "features.variants=1", "search.plan_time=false",
                   "search.num_samples=2", "search.max_concurrent=2", "search.scheduler=none",
                   "trial.max_epochs=150", "trial.early_stop=null", "search.max_failures=3", f"ray.address={address}",
                   "tracking.allow_file_store_on_cluster=true"]
        log = tmp_path / "search.log"
        with log.open("w") as out:
            search = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                      start_new_session=True)
        try:
            experiment = runs / "ray" / "smoke"
            deadline, on_worker = time.monotonic() + 300, None
            while time.monotonic() < deadline and search.poll() is None and on_worker is None:
                for trial, rows in _trial_rows(experiment).items():
                    if sum(r.get("node_id") == worker for r in rows) >= 3:
                        on_worker = trial
                time.sleep(0.3)
            assert on_worker, log.read_text()[-4000:]
            assert nodes.kill("w1") > 0
            assert search.wait(timeout=600) == 0, log.read_text()[-6000:]
        finally:
            if search.poll() is None:
                os.killpg(search.pid, signal.SIGKILL)
                search.wait()
        moved = [r.get("node_id") for r in _trial_rows(experiment)[on_worker]]
        assert moved[0] == worker and moved[-1] != worker  # it ended on the head
        client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
        trials = [r for r in client.search_runs([client.get_experiment_by_name("emotune").experiment_id])
                  if r.data.tags.get("emotune.kind") == "trial"]
        assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
        for run in trials:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_f1")]
            assert sorted(steps) == list(range(1, 151)), steps
    assert not nodes.leftovers()
