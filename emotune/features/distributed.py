"""Filling the feature cache with Ray actors, so every CPU, every GPU or every node of a cluster encodes a share.

One pool of actors serves every encoder of a fill (starting an actor costs seconds of imports): each actor
gets an encoder's recipe with its first chunk, loads the encoder once and keeps it until a chunk of another
encoder arrives. On a cluster with GPUs there is one actor (one encoder copy) per ``features.gpu_per_worker``
GPUs, and each actor asks Ray for that GPU, so Ray's accounting matches what runs; without GPUs there is one
actor per CPU, on the CPU. Work is handed out chunk by chunk to actors that have started, never pinned in
advance, so an actor that never gets its resources cannot hang the fill. The cache folder must be reachable
from every node (shared storage), like Ray's results folder.
"""

from __future__ import annotations

import time
from collections import deque

from emotune.errors import EmotuneError
from emotune.features.cache import BuildReport, FeatureStore, encode_jobs
from emotune.features.recipe import EncoderRecipe

MIB = 1 << 20
CHUNK = 32  # jobs per actor call: small enough for a live progress bar, large enough to batch the encoder
WAIT_NOTE_S = 60  # say what the fill waits for when no actor has started after this long


class _CacheWorker:
    def __init__(self, cache_dir: str, norm, augment: dict, device: str) -> None:
        self.store = FeatureStore(cache_dir)
        self.norm, self.augment, self.device = norm, augment, device
        self.encoder, self.augmenter = None, None

    def ready(self) -> bool:
        return True

    def build(self, recipe: EncoderRecipe, jobs) -> dict:
        """Encode ``jobs`` with ``recipe``'s encoder; says what was written and where it ran (the GPUs Ray gave)."""
        import ray
        import torch

        from emotune.data.augment import Augmenter
        from emotune.features.encode import open_encoder

        if self.encoder is None or self.encoder.recipe != recipe:
            self.encoder = None  # one encoder in memory at a time
            self.encoder = open_encoder(recipe, self.device)
        speech = recipe.modality == "speech"
        if speech and self.augmenter is None:
            self.augmenter = Augmenter.from_settings(self.augment)
        calls, written = encode_jobs(self.encoder, jobs, self.store, self.norm if speech else None,
                                     self.augmenter if speech else None)
        return {"built": calls, "bytes": written, "worker": {
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": str(self.encoder.device),
            "cuda_initialized": bool(torch.cuda.is_initialized()), "node_id": ray.get_runtime_context().get_node_id()}}


def worker_shape(features: dict, workers: int) -> tuple[int, float, str]:
    """How many cache workers, the GPUs each asks Ray for, and the device each loads its encoder on.

    With GPUs in the cluster (and ``features.device`` not ``cpu``): one worker per ``gpu_per_worker`` GPUs.
    Otherwise one worker per CPU, forced onto the CPU so that no worker touches a GPU Ray did not give it.
    """
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    device = str(features["device"])
    if gpus > 0 and device != "cpu":
        per = float(features["gpu_per_worker"])
        if per > gpus:  # Ray would keep the worker waiting for GPUs that never come
            raise EmotuneError(f"features.gpu_per_worker={per:g} is more than the {gpus:g} GPU(s) the Ray cluster has: "
                               f"set it to at most {gpus:g} (1 is one encoder copy per GPU), or features.device=cpu.")
        return int(gpus / per + 1e-9), per, "auto" if device == "auto" else device
    return max(1, workers), 0.0, "cpu"


def worker_memory(params_m: float) -> int:
    """The memory one cache worker asks Ray for, in bytes: its encoder's float32 weights (``params_m`` millions of
    parameters) with a quarter more for loading and activations, plus 512 MiB for the process and its libraries.

    Asking for it lets Ray place no more workers on a node than its memory holds: one worker per CPU each holding
    XLM-R large would otherwise need 36 GB on a 16-core node.
    """
    return int(params_m * 1e6 * 4 * 1.25) + 512 * MIB


class CacheWorkers:
    """The pool of cache actors of one fill; ``close`` ends them (also those still waiting for resources)."""

    def __init__(self, features: dict, workers: int, norm, cache_dir: str, memory: int = 0) -> None:
        import ray

        self.count, self.gpus_each, device = worker_shape(features, workers)
        self.memory = int(memory)
        actor = ray.remote(num_cpus=1, num_gpus=self.gpus_each, memory=self.memory or None)(_CacheWorker)
        augment = dict(features["augment"])
        self.pool = [actor.remote(cache_dir, norm, augment, device) for _ in range(self.count)]
        self.starting = {worker.ready.remote(): worker for worker in self.pool}
        self.idle: list = []

    @property
    def label(self) -> str:
        return f"{self.count} Ray workers{', GPU' if self.gpus_each else ''}"

    def fill(self, recipe: EncoderRecipe, todo: list, bar, report: BuildReport) -> None:
        """Encode ``todo`` with the pool; adds what was built to ``report``."""
        import ray

        chunks = deque(todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK))
        running: dict = {}
        where: dict = {}
        waited, noted = time.monotonic(), False

        def hand_out(worker) -> None:
            if chunks:
                chunk = chunks.popleft()
                running[worker.build.remote(recipe, chunk)] = (worker, len(chunk))
            else:
                self.idle.append(worker)

        for worker in self.idle[:]:
            self.idle.remove(worker)
            hand_out(worker)
        while chunks or running:
            done, _ = ray.wait(list(self.starting) + list(running), num_returns=1, timeout=10)
            if not done:
                if not running and not noted and time.monotonic() - waited > WAIT_NOTE_S:
                    print(f"feature cache: waiting for Ray to start a cache worker ({self.gpus_each:g} GPU, 1 CPU and "
                          f"{self.memory / 2**30:.1f} GiB each); check `ray status` for free resources, or lower "
                          "features.cpu_workers.", flush=True)
                    noted = True
                continue
            ref = done[0]
            if ref in self.starting:
                worker = self.starting.pop(ref)
            else:
                worker, size = running.pop(ref)
                result = ray.get(ref)
                report.bytes_written += result["bytes"]
                report.encoder_calls += size
                where[worker] = result["worker"]
                if bar is not None:
                    bar.update(size)
            hand_out(worker)
        report.workers = list(where.values())

    def close(self) -> None:
        import ray

        for worker in self.pool:
            ray.kill(worker)
