"""From a prepared corpus and the encoder settings to a filled feature cache and its index.

This is the features layer's entry point: the search calls it once before trials start, a standalone
``emotune train`` calls it itself, and with ``features.cache=false`` it only loads the encoders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from emotune.data.augment import Augmenter
from emotune.data.prepare import PreparedCorpus
from emotune.features.cache import (AudioHashes, BuildReport, FeatureIndex, FeatureStore, build, speech_jobs,
                                    text_jobs)
from emotune.features.catalog import resolve_encoder
from emotune.features.encode import FrozenEncoder, load_encoder

# How each kind of encoder output is normalised in the model by default: SSL layers get a LayerNorm (as the
# winners did); hand-crafted features get a global per-dimension standardisation, because a LayerNorm per
# frame would erase their loudness information.
DEFAULT_NORM = {"classic": "global", "tiny": "layer", "hf": "layer"}


def make_augmenter(augment: dict) -> Augmenter:
    return Augmenter(rir_dir=augment.get("rir_dir"), noise_dir=augment.get("noise_dir"),
                     snr_db=tuple(augment.get("snr_db", (15.0, 25.0))), speeds=tuple(augment.get("speeds", (0.9, 1.1))))


def load_named_encoder(name: str, modality: str, corpus: PreparedCorpus, features: dict,
                       runs_dir: str | Path) -> FrozenEncoder:
    """Resolve and load one encoder (a tiny preset is built on first use, its tokenizer on the training text)."""
    texts = [u.text for u in corpus.train + corpus.dev]  # the training CSV's text, never the test split's
    return load_encoder(resolve_encoder(name, modality), Path(runs_dir) / "encoders", texts=texts,
                        layers=features.get(f"{modality}_layers"), batch_size=int(features.get("batch_size", 8)),
                        device=features.get("device", "auto"), max_tokens=int(features.get("max_text_tokens", 256)))


def load_encoders(corpus: PreparedCorpus, encoders: dict, features: dict, modalities: Sequence[str],
                  runs_dir: str | Path) -> dict[str, FrozenEncoder]:
    """The encoder of each modality named in ``encoders``."""
    return {m: load_named_encoder(encoders[m], m, corpus, features, runs_dir) for m in modalities}


def describe(encoder: FrozenEncoder) -> dict:
    return {"name": encoder.spec.name, "kind": encoder.spec.kind, "source": encoder.spec.source, "key": encoder.key,
            "layers": len(encoder.layers), "layer_indices": encoder.layers, "width": encoder.width,
            "frame_rate": encoder.frame_rate, "norm": DEFAULT_NORM[encoder.spec.kind],
            "folder": str(encoder.folder) if encoder.folder else None}


def plan_jobs(corpus: PreparedCorpus, encoder: FrozenEncoder, features: dict, store: FeatureStore) -> dict[str, list]:
    """For each utterance id, the cache jobs holding its features (speech: clean, then training variants)."""
    if encoder.modality == "text":
        return {uid: [job] for uid, job in text_jobs(encoder.key, corpus.train + corpus.dev + corpus.test).items()}
    hashes = AudioHashes(store.root / "audio_hashes.json")
    augment = dict(features.get("augment") or {})
    jobs = speech_jobs(encoder.key, corpus.train, corpus.audio, corpus.norm, hashes, int(features.get("variants", 4)),
                       augment)
    jobs |= speech_jobs(encoder.key, corpus.dev + corpus.test, corpus.audio, corpus.norm, hashes, 0, augment)
    hashes.save()
    return jobs


def fill_cache(encoder: FrozenEncoder, jobs: dict[str, list], corpus: PreparedCorpus, features: dict,
               progress: bool = True, workers: int = 0, runs_dir: str | Path | None = None) -> BuildReport:
    """Encode what the cache lacks; with ``workers`` > 1 and Ray running, Ray actors share the work."""
    store = FeatureStore(features["dir"])
    flat = [j for row in jobs.values() for j in row]
    augmenter = make_augmenter(dict(features.get("augment") or {})) if encoder.modality == "speech" else None
    verify = bool(features.get("verify", True))
    if workers > 1:
        from emotune.features.distributed import fill_with_ray

        return fill_with_ray(encoder, flat, store, corpus, features, verify, workers, progress, str(runs_dir))
    return build(encoder, flat, store, corpus.norm if encoder.modality == "speech" else None, augmenter,
                 verify=verify, progress=progress)


def index_part(encoder: FrozenEncoder, jobs: dict[str, list], store: FeatureStore, report: BuildReport) -> FeatureIndex:
    """What a trial needs to read one encoder's cached features: its description and each clip's keys.

    Parts are small and picklable: the search builds one per encoder before trials start and hands them
    to the trials, which then never load an encoder themselves.
    """
    part = FeatureIndex(cache_dir=str(store.root), encoders={encoder.modality: describe(encoder)},
                        reports=[report.line()])
    if encoder.modality == "speech":
        part.speech = {uid: [j.key for j in row] for uid, row in jobs.items()}
    else:
        part.text = {uid: row[0].key for uid, row in jobs.items()}
    return part


def prepare_features(corpus: PreparedCorpus, encoders: dict, features: dict, modalities: Sequence[str],
                     runs_dir: str | Path, progress: bool = True,
                     loaded: dict[str, FrozenEncoder] | None = None) -> FeatureIndex:
    """Fill the cache for every utterance of ``corpus`` and return where each one's features are."""
    loaded = loaded or load_encoders(corpus, encoders, features, modalities, runs_dir)
    store = FeatureStore(features["dir"])
    parts = []
    for encoder in loaded.values():
        jobs = plan_jobs(corpus, encoder, features, store)
        report = fill_cache(encoder, jobs, corpus, features, progress)
        parts.append(index_part(encoder, jobs, store, report))
        if progress:
            print(report.line())
    return FeatureIndex.merge(parts)
