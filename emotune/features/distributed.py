"""Filling the feature cache with Ray actors, so every CPU, every GPU or every node of a cluster encodes a share.

Each actor gets the encoder's recipe, loads the encoder once and encodes chunks of jobs. On a cluster with
GPUs there is one actor (one encoder copy) per ``features.gpu_per_worker`` GPUs, and each actor asks Ray for
that GPU, so Ray's accounting matches what runs; without GPUs there is one actor per CPU, on the CPU. Work is
handed out chunk by chunk to actors that have started, never pinned in advance, so an actor that never gets
its resources cannot hang the fill. The cache folder must be reachable from every node (shared storage),
like Ray's results folder.
"""

from __future__ import annotations

import time
from collections import deque

from emotune.features.cache import BuildReport, FeatureStore, encode_jobs
from emotune.features.encode import EncoderRecipe

CHUNK = 32  # jobs per actor call: small enough for a live progress bar, large enough to batch the encoder
WAIT_NOTE_S = 60  # say what the fill waits for when no actor has started after this long


class _CacheWorker:
    def __init__(self, recipe: EncoderRecipe, cache_dir: str, norm, augment: dict, device: str) -> None:
        from emotune.data.augment import Augmenter
        from emotune.features.encode import open_encoder

        self.encoder = open_encoder(recipe, device)
        self.store = FeatureStore(cache_dir)
        self.norm = norm
        self.augmenter = Augmenter.from_settings(augment) if recipe.modality == "speech" else None

    def ready(self) -> dict:
        """Where this worker runs: the GPUs Ray gave it and the device its encoder is on."""
        import ray
        import torch

        return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": str(self.encoder.device),
                "cuda_initialized": bool(torch.cuda.is_initialized()),
                "node_id": ray.get_runtime_context().get_node_id()}

    def build(self, jobs) -> dict:
        calls, written = encode_jobs(self.encoder, jobs, self.store, self.norm, self.augmenter)
        return {"built": calls, "bytes": written}


def worker_shape(features: dict, workers: int) -> tuple[int, float, str]:
    """How many cache workers, the GPUs each asks Ray for, and the device each loads its encoder on.

    With GPUs in the cluster (and ``features.device`` not ``cpu``): one worker per ``gpu_per_worker`` GPUs.
    Otherwise one worker per CPU, forced onto the CPU so that no worker touches a GPU Ray did not give it.
    """
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    device = str(features.get("device", "auto"))
    if gpus > 0 and device != "cpu":
        per = float(features.get("gpu_per_worker", 1) or 1)
        return max(1, int(gpus / per + 1e-9)), per, "auto" if device == "auto" else device
    return max(1, workers), 0.0, "cpu"


def fill_with_ray(recipe: EncoderRecipe, todo, store: FeatureStore, norm, augment: dict, features: dict,
                  workers: int, bar, report: BuildReport) -> None:
    """Encode ``todo`` with a pool of Ray actors; adds what was built to ``report``."""
    import ray

    count, gpus_each, device = worker_shape(features, workers)
    chunks = deque(todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK))
    actor = ray.remote(num_cpus=1, num_gpus=gpus_each)(_CacheWorker)
    pool = [actor.remote(recipe, str(store.root), norm, augment, device) for _ in range(min(count, len(chunks)))]
    if bar is not None:
        bar.set_description(f"encoding ({report.encoder}, {len(pool)} Ray workers{', GPU' if gpus_each else ''})")
    starting = {worker.ready.remote(): worker for worker in pool}
    running: dict = {}
    waited, noted = time.monotonic(), False
    try:
        while chunks or running:
            done, _ = ray.wait(list(starting) + list(running), num_returns=1, timeout=10)
            if not done:
                if not running and not noted and time.monotonic() - waited > WAIT_NOTE_S:
                    print(f"feature cache: waiting for Ray to start a cache worker ({gpus_each:g} GPU and 1 CPU "
                          "each); check `ray status` for free resources.", flush=True)
                    noted = True
                continue
            ref = done[0]
            if ref in starting:
                worker = starting.pop(ref)
                report.workers.append(ray.get(ref))
            else:
                worker, size = running.pop(ref)
                result = ray.get(ref)
                report.bytes_written += result["bytes"]
                report.encoder_calls += size
                if bar is not None:
                    bar.update(size)
            if chunks:
                chunk = chunks.popleft()
                running[worker.build.remote(chunk)] = (worker, len(chunk))
    finally:
        for worker in pool:  # also those still waiting for resources: they must not start later
            ray.kill(worker)
