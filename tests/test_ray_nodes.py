"""tests/ray_nodes.py starts a real two-node Ray cluster, each node with its own home, one blind to a folder."""

from __future__ import annotations

import os
import shutil
import socket

import pytest
from conftest import leave_shared_ray

from emotune.tracking.ui import _is_zombie, _session_members

from ray_nodes import RayNodes

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                 reason="hiding a folder needs root and unshare (mount namespaces)"),
              pytest.mark.slow]  # starts Ray nodes


def _alive(sid: int) -> list[int]:
    return [pid for pid in _session_members(sid) if not _is_zombie(pid)]


def test_two_nodes_own_homes_and_a_hidden_folder(tmp_path):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    hidden = tmp_path / "models"
    hidden.mkdir()
    secret = hidden / "weights.bin"
    secret.write_bytes(b"\0" * 16)

    with RayNodes() as cluster:
        address = cluster.head(num_cpus=1)
        worker_id = cluster.worker(num_cpus=1, hidden=[hidden])
        assert cluster.node_ids["w1"] == worker_id and cluster.node_ids["head"] != worker_id
        sessions = [node.process.pid for node in cluster.nodes.values()]
        port = cluster.port

        leave_shared_ray()  # this process joins the cluster instead
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        try:
            @ray.remote(num_cpus=1)
            def look(path: str) -> dict:
                import emotune  # the nodes' PYTHONPATH (and the venv) reach the project

                return {"home": os.environ["HOME"], "hf_home": os.environ["HF_HOME"],
                        "sees": os.path.exists(path), "emotune": emotune.__name__}

            seen = {name: ray.get(look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                                  .remote(str(secret)), timeout=60)
                    for name, node_id in cluster.node_ids.items()}
        finally:
            ray.shutdown()

        for name, node in cluster.nodes.items():
            assert seen[name]["home"] == str(node.home)
            assert seen[name]["hf_home"] == str(node.folder / "hf")
            assert seen[name]["emotune"] == "emotune"
        assert seen["head"]["home"] != seen["w1"]["home"]
        assert seen["head"]["sees"] is True   # the head sees the folder as it is
        assert seen["w1"]["sees"] is False    # the worker sees an empty tmpfs over it
        assert secret.exists()                # ...which the test process does not

    for sid in sessions:
        assert _alive(sid) == [], f"processes of session {sid} outlived stop()"
    assert cluster.leftovers() == []
    assert not cluster.root.exists()
    with socket.socket() as s:  # the GCS port is free again (SO_REUSEADDR: its closed connections may linger)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
        s.listen()
