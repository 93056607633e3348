"""Short measurements of what a trial spends its time on, for the search's time plan (emotune/search/plan.py).

Each figure comes from the code a trial runs, on this machine, with random data of the search's shapes:

- a training step and an evaluation batch of the real model (batches assembled by the real cropping and padding
  from cache-shaped arrays), timed on the trial's device; or, for a device you do not have
  (``--device-tflops``), the step's floating-point operations counted on the meta device and divided by its speed;
- the per-evaluation work around them: the bootstrap standard error, the MLflow metrics, the epoch's checkpoint;
- the work of a best-model save and of a trial's start and end, against a throw-away MLflow SQLite store;
- the read speed of the cache folder, with the page cache dropped for the file read (``--read-gbps`` instead).

Nothing here touches the user's runs, store or cache: everything is written in temporary folders.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# The budget of one timing: enough steps for a steady figure, few enough to keep `emotune plan` quick.
TIMING_SECONDS, MIN_REPEATS, MAX_REPEATS = 0.3, 3, 30


@dataclass(frozen=True)
class Shape:
    """One model the space can draw, with the feature shapes its batches have."""

    label: str
    model: dict                      # the model config (family, width, hidden_layers, ...)
    dims: dict                       # modality -> (stored layers, width)
    train_steps: dict                # modality -> frames (speech: the crop) or tokens per training clip
    eval_steps: dict                 # modality -> mean frames or tokens of a whole clip
    bytes_per_step: dict             # modality -> stored bytes per frame or token

    @property
    def size(self) -> float:
        """Feature values per training clip: what the step's cost grows with."""
        return float(sum(self.dims[m][0] * self.dims[m][1] * self.train_steps[m] for m in self.dims))


@dataclass
class StepTimes:
    """Seconds of one training step (batch assembly, forward, backward, AdamW) and one evaluation batch."""

    train: float
    evaluate: float
    how: str                         # "measured on cpu" or "FLOPs at 312 TFLOP/s"
    parameters: int = 0


def _repeat(work: Callable[[], None]) -> float:
    """Seconds per call of ``work``, after one warm-up call."""
    work()
    calls, started = 0, time.perf_counter()
    while calls < MIN_REPEATS or (calls < MAX_REPEATS and time.perf_counter() - started < TIMING_SECONDS):
        work()
        calls += 1
    return (time.perf_counter() - started) / calls


def _feature_pool(shape: Shape, steps: dict, count: int, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Cache-shaped float16 arrays (what the cache's reads give) per modality."""
    return {m: [rng.standard_normal((layers, max(1, int(steps[m])), width)).astype(np.float16) for _ in range(count)]
            for m, (layers, width) in shape.dims.items()}


def _batch(pool: dict, shape: Shape, size: int, rng: np.random.Generator, train: bool, n_classes: int,
           device) -> dict:
    from emotune.data.audio import crop_or_repeat
    from emotune.features.source import pad_batch

    batch: dict = {}
    for m, arrays in pool.items():
        picked = [arrays[int(rng.integers(len(arrays)))] for _ in range(size)]
        if train and m == "speech":
            picked = [crop_or_repeat(a, int(shape.train_steps[m]), rng, axis=1) for a in picked]
        x, mask = pad_batch(picked)
        batch[m], batch[f"{m}_mask"] = x.to(device), mask.to(device)
    batch["labels"] = torch.as_tensor(rng.integers(n_classes, size=size), device=device)
    return batch


def _build(shape: Shape, n_classes: int, device) -> torch.nn.Module:
    from emotune.model import build_model

    return build_model(shape.model, shape.dims, n_classes, {m: "layer" for m in shape.dims}).to(device)


def time_steps(shape: Shape, batch_size: int, eval_batch_size: int, n_classes: int, device: str,
               threads: int) -> StepTimes:
    """Time the real model's training step and evaluation batch on ``device`` with ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        rng = np.random.default_rng(0)
        model = _build(shape, n_classes, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()
        train_pool = _feature_pool(shape, {m: max(shape.train_steps[m], shape.eval_steps[m]) for m in shape.dims},
                                   8, rng)
        eval_pool = _feature_pool(shape, shape.eval_steps, 8, rng)

        def train_step() -> None:
            model.train()
            batch = _batch(train_pool, shape, batch_size, rng, True, n_classes, device)
            loss = loss_fn(model(batch), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()

        @torch.inference_mode()
        def eval_batch() -> None:
            model.eval()
            batch = _batch(eval_pool, shape, eval_batch_size, rng, False, n_classes, device)
            torch.softmax(model(batch).float(), dim=-1).cpu()

        train, evaluate = _repeat(train_step), _repeat(eval_batch)
        return StepTimes(train, evaluate, f"measured on {device}", sum(p.numel() for p in model.parameters()))
    finally:
        torch.set_num_threads(previous)


def count_step_flops(shape: Shape, batch_size: int, eval_batch_size: int, n_classes: int) -> tuple[float, float]:
    """Floating-point operations of a training step (forward and backward) and an evaluation batch, for a device
    that is not this one: counted on one clip here (the model branches on its masks, so the meta device cannot run
    it), times the batch (every operation of the head is per clip)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _build(shape, n_classes, "cpu")

    def one_clip(steps: dict) -> dict:
        batch = {}
        for m, (layers, width) in shape.dims.items():
            frames = max(1, int(steps[m]))
            batch[m] = torch.zeros(1, layers, frames, width, dtype=torch.float16)
            batch[f"{m}_mask"] = torch.ones(1, frames, dtype=torch.bool)
        return batch

    counter = FlopCounterMode(display=False)
    with counter:
        model(one_clip(shape.train_steps)).sum().backward()
    train = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(one_clip(shape.eval_steps))
    return float(train) * batch_size, float(counter.get_total_flops()) * eval_batch_size


def time_batch_assembly(shape: Shape, batch_size: int, eval_batch_size: int) -> tuple[float, float]:
    """Seconds to assemble a training and an evaluation batch on this machine's CPU (crops, padding): the host's
    share of a step on any device."""
    rng = np.random.default_rng(0)
    train_pool = _feature_pool(shape, {m: max(shape.train_steps[m], shape.eval_steps[m]) for m in shape.dims}, 4, rng)
    eval_pool = _feature_pool(shape, shape.eval_steps, 4, rng)
    return (_repeat(lambda: _batch(train_pool, shape, batch_size, rng, True, 2, "cpu")),
            _repeat(lambda: _batch(eval_pool, shape, eval_batch_size, rng, False, 2, "cpu")))


def flop_step_times(shape: Shape, batch_size: int, eval_batch_size: int, n_classes: int, tflops: float,
                    host_to_device: float) -> StepTimes:
    """A step on a device of ``tflops`` effective TFLOP/s: its FLOPs, the batch assembled here on the CPU, and the
    batch's copy to the device at ``host_to_device`` bytes per second."""
    train, evaluate = count_step_flops(shape, batch_size, eval_batch_size, n_classes)
    host_train, host_eval = time_batch_assembly(shape, batch_size, eval_batch_size)
    clip = {kind: sum(shape.dims[m][0] * shape.dims[m][1] * steps[m] * 2 for m in shape.dims)  # float16 values
            for kind, steps in (("train", shape.train_steps), ("eval", shape.eval_steps))}
    return StepTimes(train / (tflops * 1e12) + host_train + batch_size * clip["train"] / host_to_device,
                     evaluate / (tflops * 1e12) + host_eval + eval_batch_size * clip["eval"] / host_to_device,
                     f"FLOPs at {tflops:g} TFLOP/s, batches assembled on this CPU, copied at "
                     f"{host_to_device / 1e9:g} GB/s")


def time_waveform_prep(seconds: float, features: dict) -> tuple[float, float]:
    """Seconds to normalise one clip of ``seconds`` seconds and to make one augmented copy of it, with the real
    torchaudio effects (``features.augment``): a fill's work on the CPU besides decoding and the encoder."""
    from emotune.data.augment import Augmenter
    from emotune.features.encode import zscore
    from emotune.names import SAMPLE_RATE

    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
    augmenter = Augmenter.from_settings(features.get("augment"))
    return _repeat(lambda: zscore(wave)), _repeat(lambda: augmenter(wave, rng, p=1.0))


def read_speed(folder: str | Path, megabytes: int = 64) -> float:
    """Bytes per second read from a new file in ``folder`` (or its nearest existing parent), with the file's pages
    dropped from the page cache first, as a cache file a trial has not read yet would be."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    block = os.urandom(1 << 20)
    try:
        fd, name = tempfile.mkstemp(prefix=".emotune-read-speed-", dir=folder)
    except OSError:  # not writable yet (the search creates it): the temporary folder's disk instead
        fd, name = tempfile.mkstemp(prefix=".emotune-read-speed-")
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(megabytes):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        with open(name, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            started = time.perf_counter()
            while f.read(8 << 20):
                pass
            seconds = time.perf_counter() - started
    finally:
        os.unlink(name)
    return megabytes * (1 << 20) / max(seconds, 1e-6)


@dataclass
class Bookkeeping:
    """Seconds of a trial's work besides its steps, measured with the real functions on throw-away files."""

    per_evaluation: float            # bootstrap standard error and the metrics logged to MLflow
    per_epoch: float                 # the epoch's checkpoint (model, optimiser, trainer state)
    per_best: float                  # a best-model save, test predictions aside: weights, card, predictions, upload
    per_trial: float                 # a trial's MLflow run: start, parameters, config, history, dev reports, end


def measure_bookkeeping(shape: Shape, n_classes: int, n_dev: int, n_test: int, tracking: dict) -> Bookkeeping:
    """Run a trial's bookkeeping once with ``shape``'s model, against an MLflow SQLite store in a temporary folder
    (``tracking``: the search's settings, for the experiment's name; its store is not touched)."""
    from emotune import evaluation, noise
    from emotune.model.checkpoint import ModelCard, save_model
    from emotune.tracking.store import TrackedRun, copy_empty_store, ensure_experiment
    from emotune.trial import TrainerState, save_checkpoint

    rng = np.random.default_rng(0)
    model = _build(shape, n_classes, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(_batch(_feature_pool(shape, shape.train_steps, 2, rng), shape, 2, rng, True, n_classes,
                 "cpu")).sum().backward()
    optimizer.step()  # the optimiser's state exists, as in a checkpoint after the first epoch
    labels = [f"class{i}" for i in range(n_classes)]
    dev_true = rng.integers(n_classes, size=n_dev)
    dev_pred = np.where(rng.random(n_dev) < 0.7, dev_true, rng.integers(n_classes, size=n_dev))
    resamples = noise.stratified_resamples(dev_true.tolist())
    metrics = {k: 0.5 for k in ("val_f1", "val_f1_se", "val_f1_ema", "best_val_f1", "val_score", "best_val_score",
                                "best_val_score_se", "val_loss", "train_loss", "lr", "epoch_seconds", "setup_seconds",
                                "resumed_from_epoch")}
    state = TrainerState(history=[metrics] * 40)
    card = ModelCard(labels=labels, dims=shape.dims, norms={m: "layer" for m in shape.dims}, model=shape.model,
                     encoders={}, encoder_names={}, norm_stats={}, features={}, best_epoch=1, best_val_f1=0.5,
                     trial_seed=0)
    dev_probs = rng.dirichlet(np.ones(n_classes), size=n_dev)
    test_probs = rng.dirichlet(np.ones(n_classes), size=max(1, n_test))
    with tempfile.TemporaryDirectory(prefix="emotune-probe-") as tmp:
        store = {**tracking, "uri": f"sqlite:///{copy_empty_store(Path(tmp) / 'mlflow.db')}",
                 "artifacts": f"{tmp}/mlartifacts"}
        ensure_experiment(store)
        best = Path(tmp) / "trial" / "best"

        def start_run(key: str) -> TrackedRun:
            run = TrackedRun.start(store, name=key, kind="trial", run_key=key)
            run.log_params({"model": shape.model, "dims": {m: f"{d[0]}x{d[1]}" for m, d in shape.dims.items()},
                            "trial": {f"key{i}": i for i in range(20)}})
            run.log_json({"config": {f"key{i}": i for i in range(200)}}, "config.json")
            return run

        def save_best(run: TrackedRun) -> None:
            files = save_model(model, card, best)
            files.append(evaluation.write_predictions(best / "dev_predictions.csv", [f"d{i}" for i in range(n_dev)],
                                                      dev_probs, labels, [labels[i] for i in dev_true]))
            files.append(evaluation.write_predictions(best / "test_predictions.csv",
                                                      [f"t{i}" for i in range(len(test_probs))], test_probs, labels))
            run.log_artifacts(files, "best")

        def end_run(run: TrackedRun) -> None:
            run.log_metrics(metrics, step=0)
            run.log_json(state.history, "history.json")
            run.log_artifacts(evaluation.dev_reports(best, "probe"), "best")
            run.finish("FINISHED")

        # a first run warms what a trial worker warms once (the store's connection, the plotting library)
        first = start_run("probe/1")
        save_best(first)
        end_run(first)
        started = time.perf_counter()
        run = start_run("probe/2")
        start_seconds = time.perf_counter() - started
        step = iter(range(1, 100_000))
        per_evaluation = _repeat(lambda: (noise.macro_f1_se(dev_true, dev_pred, n_classes, rows=resamples),
                                          run.log_metrics(metrics, step=next(step))))
        per_epoch = _repeat(lambda: save_checkpoint(Path(tmp) / "trial" / "checkpoint", model, optimizer, state))
        per_best = _repeat(lambda: save_best(run))
        started = time.perf_counter()
        end_run(run)
        end_seconds = time.perf_counter() - started
    return Bookkeeping(per_evaluation, per_epoch, per_best, start_seconds + end_seconds)


def time_fill(recipe, corpus, features: dict, clips: int = 4, threads: int = 1) -> tuple[float, float]:
    """Seconds per cache job of the real fill code (decoding, augmented copies, the encoder, the write) on a few
    training clips, into a temporary store, with ``threads`` torch threads (a CPU cache worker has one); and the
    encoder's load time (once per worker). The first clip's jobs warm the encoder and are not counted."""
    from emotune.data.augment import Augmenter
    from emotune.features.cache import FeatureStore, encode_jobs
    from emotune.features.encode import open_encoder
    from emotune.features.prepare import plan_jobs

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        with tempfile.TemporaryDirectory(prefix="emotune-probe-fill-") as tmp:
            sample = replace(corpus, train=corpus.train[: clips + 1], dev=[], test=[])
            rows = list(plan_jobs(sample, recipe, {**features, "dir": tmp}, FeatureStore(tmp),
                                  save_hashes=False).values())
            started = time.perf_counter()
            encoder = open_encoder(recipe, features["device"])
            load = time.perf_counter() - started
            speech = recipe.modality == "speech"
            augmenter = Augmenter.from_settings(features.get("augment")) if speech else None
            norm = corpus.norm if speech else None
            encode_jobs(encoder, rows[0], FeatureStore(Path(tmp) / "warm"), norm, augmenter)
            jobs = [j for row in rows[1:] for j in row]
            started = time.perf_counter()
            encode_jobs(encoder, jobs, FeatureStore(tmp), norm, augmenter)
            return (time.perf_counter() - started) / max(1, len(jobs)), load
    finally:
        torch.set_num_threads(previous)
