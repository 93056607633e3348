"""Filling the feature cache with Ray actors, so every CPU (or every node of a cluster) encodes a share.

Each actor loads the encoder once and encodes chunks of jobs; the driver shows one progress bar as chunks
finish. The cache folder must be reachable from every node (shared storage), like Ray's results folder.
"""

from __future__ import annotations

import time

from emotune.features.cache import BuildReport, FeatureStore, build, check_disk, estimate_bytes, missing_jobs
from emotune.features.encode import FrozenEncoder

CHUNK = 32  # jobs per actor call: small enough for a live progress bar, large enough to batch the encoder


class _CacheWorker:
    def __init__(self, name: str, modality: str, corpus, features: dict, runs_dir: str) -> None:
        from emotune.features.prepare import load_named_encoder, make_augmenter

        self.encoder = load_named_encoder(name, modality, corpus, features, runs_dir)
        self.store = FeatureStore(features["dir"])
        self.norm = corpus.norm if modality == "speech" else None
        self.augmenter = make_augmenter(dict(features.get("augment") or {})) if modality == "speech" else None

    def build(self, jobs) -> dict:
        report = build(self.encoder, jobs, self.store, self.norm, self.augmenter, verify=False, progress=False)
        return {"built": report.built, "bytes": report.bytes_written}


def fill_with_ray(encoder: FrozenEncoder, jobs, store: FeatureStore, corpus, features: dict, verify: bool,
                  workers: int, progress: bool, runs_dir: str) -> BuildReport:
    import ray

    label = f"{encoder.modality} encoder {encoder.spec.name}"
    report = BuildReport(encoder=label)
    start = time.perf_counter()
    todo, report.hits, report.rebuilt_damaged = missing_jobs(jobs, store, verify)
    if todo:
        check_disk(store, estimate_bytes(encoder, todo), label)
        gpu = float(features.get("gpu_per_worker", 0) or 0)
        actor = ray.remote(num_cpus=1, num_gpus=gpu)(_CacheWorker)
        corpus_ref = ray.put(corpus)
        pool = [actor.remote(encoder.spec.name, encoder.modality, corpus_ref, features, str(runs_dir))
                for _ in range(min(workers, max(1, len(todo) // CHUNK)))]
        chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"encoding ({label}, {len(pool)} Ray workers)", unit="item")
        pending = {}
        for i, chunk in enumerate(chunks):
            pending[pool[i % len(pool)].build.remote(chunk)] = len(chunk)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            result = ray.get(done[0])
            report.bytes_written += result["bytes"]
            report.encoder_calls += pending.pop(done[0])
            if bar:
                bar.update(report.encoder_calls - bar.n)
        if bar:
            bar.close()
        for worker in pool:
            ray.kill(worker)
    report.built = len(todo) - report.rebuilt_damaged
    report.seconds = time.perf_counter() - start
    return report
