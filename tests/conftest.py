"""Shared test assets, built small and fresh in temporary folders (SpeechBrain recipe-test style)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Fixtures that run a whole search, start a Ray cluster or a tracking server: a test that uses one (directly or
# through another fixture) is slow, and `scripts/test.sh --quick` (pytest -m "not slow") leaves it out. Tests that
# start a search, a Ray instance or a server themselves, or send signals, carry @pytest.mark.slow.
SLOW_FIXTURES = {"smoke_search", "soft_ensemble", "tied_store", "team", "two_node_cluster", "server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def join_shared_ray() -> None:
    """Start the pytest run's own local Ray, unless one is up in this process.

    ``run_search`` joins a Ray already running in its process and leaves it running, so the searches a test runs in
    process share this one: each skips Ray's start and stop, and its trials run in workers that have already
    imported torch and emotune. Searches run as commands start their own Ray, as a user's do."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=True)


def leave_shared_ray() -> None:
    """Stop the shared Ray, for a test that starts a Ray of its own (other resources, or a cluster to join)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def shared_ray():
    join_shared_ray()


@pytest.fixture(scope="session", autouse=True)
def _no_ray_left_behind():
    yield
    leave_shared_ray()


LABELS = ("neutral", "disgust", "anger", "sadness", "joy", "fear")


def tone(seconds: float = 1.0, sr: int = 16_000, freq: float = 220.0, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    """A short harmonic tone with a little noise: real, decodable, non-silent audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wave = amp * np.sin(2 * np.pi * freq * t) + 0.3 * amp * np.sin(2 * np.pi * 2 * freq * t)
    return (wave + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_csv(path: Path, header: list[str], rows: list[list], encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_corpus(root: Path, n_per_class: int = 4, sr: int = 16_000, ext: str = ".wav") -> Path:
    """A tiny labelled corpus in the challenge layout: root/train.csv, root/test.csv and root/audio/."""
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = [], []
    k = 0
    for label in LABELS:
        for i in range(n_per_class):
            k += 1
            utt_id = f"clip{k:03d}{ext}"
            sf.write(audio / utt_id, tone(0.5 + 0.1 * i, sr, 150 + 20 * k, seed=k), sr)
            train_rows.append([utt_id, label, f"frase número {k} de {label}"])
    for j in range(3):
        utt_id = f"test{j}{ext}"
        sf.write(audio / utt_id, tone(0.8, sr, 300 + j, seed=100 + j), sr)
        test_rows.append([utt_id, f"frase de prueba {j}"])
    write_csv(root / "train.csv", ["id", "label", "transcription"], train_rows)
    write_csv(root / "test.csv", ["id", "transcription"], test_rows)
    return root


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """A small real demo corpus (espeak-ng synthesis, MP3), shared by the whole session."""
    from emotune.data.demo import build_demo_corpus

    out = tmp_path_factory.mktemp("demo") / "corpus"
    build_demo_corpus(out, n_clips=60, seed=7, progress=False)
    return out


CLASS_WORDS = {"neutral": "mañana hay reunión", "disgust": "qué asco", "anger": "qué rabia",
               "sadness": "qué pena", "joy": "qué alegría", "fear": "qué miedo"}


def make_separable_corpus(root: Path, per_class: int = 8) -> Path:
    """Six classes told apart by pitch and loudness (speech) and by a cue phrase (text): a model must learn it."""
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows, test_labels = [], [], []
    for c, label in enumerate(LABELS):
        for i in range(per_class + 2):
            utt_id = f"{label}{i:02d}.wav"
            wave = tone(1.0 + 0.15 * (i % 4), freq=120 + 90 * c, amp=0.05 + 0.08 * c, seed=100 * c + i)
            sf.write(audio / utt_id, wave, 16_000)
            text = f"{CLASS_WORDS[label]}, frase {i}"
            if i < per_class:
                train_rows.append([utt_id, label, text])
            else:
                test_rows.append([utt_id, text])
                test_labels.append([utt_id, label])
    write_csv(root / "train.csv", ["id", "label", "transcription"], train_rows)
    write_csv(root / "test.csv", ["id", "transcription"], test_rows)
    write_csv(root / "test_labels.csv", ["id", "label"], test_labels)
    return root


@pytest.fixture(scope="session")
def separable(tmp_path_factory) -> tuple[Path, Path]:
    """A separable corpus and a runs folder shared by the session (so encoders and caches are built once)."""
    base = tmp_path_factory.mktemp("separable")
    return make_separable_corpus(base / "corpus"), base / "runs"


def trial_config(corpus: Path, runs: Path, *overrides: str) -> dict:
    from emotune.config import load_config

    return load_config(["data=folder", f"data.root={corpus}", "data.test_labels=test_labels.csv",
                        f"paths.runs_dir={runs}", "data.dev_fraction=0.25", "trial.batch_size=8",
                        "trial.crop_seconds=1.0", "features.variants=1", *overrides])


def search_args(corpus: Path, runs: Path, cache: Path, *extra: str) -> list[str]:
    """Overrides for a `smoke` search on the separable corpus (the shared cache keeps encoders' work once)."""
    return ["space=smoke", "data=folder", f"data.root={corpus}", "data.test_labels=test_labels.csv",
            f"paths.runs_dir={runs}", f"features.dir={cache}", "data.dev_fraction=0.25", "trial.batch_size=8",
            "trial.crop_seconds=1.0", "features.variants=1",
            "search.plan_time=false",  # the time plan's own tests measure it (test_search_plan.py)
            *extra]


@pytest.fixture(scope="session")
def smoke_search(separable, tmp_path_factory) -> tuple[Path, dict]:
    """One real smoke search (6 trials, one crashing once and retried), shared by the search and ensemble tests.

    It evaluates twice per epoch, so that ASHA's clock (dev evaluations) differs from the epochs that patience,
    checkpoints and retries count."""
    from emotune.config import load_config
    from emotune.search.driver import run_search

    from faults import crash_once_at

    corpus, shared_runs = separable
    runs = tmp_path_factory.mktemp("smoke") / "runs"
    # one trial at a time: ASHA then judges each trial against all earlier ones, the same way every run
    cfg = load_config(smoke_search_args(separable, runs), "search")
    join_shared_ray()
    return runs, run_search(cfg, train=crash_once_at(2, runs.parent / "crashed-once"))


def smoke_search_args(separable, runs: Path) -> list[str]:
    """The settings of the `smoke_search` fixture's search, whose results are in ``runs``."""
    corpus, shared_runs = separable
    return search_args(corpus, runs, shared_runs / "cache" / "features", "search.num_samples=6",
                       "search.max_concurrent=1", "search.max_failures=1", "trial.evals_per_epoch=2")
