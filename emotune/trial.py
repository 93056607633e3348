"""One trial: train the model of a config on cached (or live) encoder features, report every epoch.

:func:`trainable` is what Ray Tune calls with a plain dict config; it reports through ``tune.report`` and keeps
its own checkpoint in ``<runs>/trials/<search>/<trial id>``, which it resumes from whenever Tune starts it
again. Outside Ray the same function runs alone:
``emotune train key=value ...``. Every epoch reports ``val_f1`` (dev macro-F1), its smoothed
``val_f1_ema``, ``best_val_f1``, ``train_loss`` and ``lr``. Each trial is one MLflow run; whenever dev
macro-F1 improves, the best checkpoint (safetensors), the dev and test class probabilities with ids, a
confusion-matrix PNG and a classification report are logged, so even a trial that ASHA stops early leaves
everything the ensemble selector needs. Test data is only ever predicted, never scored or selected on.
"""

from __future__ import annotations

import copy
import json
import random
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from emotune import evaluation
from emotune.data.corpus import Utterance
from emotune.errors import EmotuneError

Reporter = Callable[[dict, str], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def class_weights(train: Sequence[Utterance], labels: Sequence[str], mode: str) -> torch.Tensor | None:
    """Inverse class frequency, normalised so a balanced corpus would get weight 1 for every class."""
    if mode == "none":
        return None
    if mode != "inverse":
        raise EmotuneError(f"trial.class_weights must be 'inverse' or 'none', got '{mode}'")
    counts = np.array([sum(u.label == c for u in train) for c in labels], dtype=np.float64)
    weights = np.where(counts > 0, counts.sum() / (len(labels) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed trial needs to continue exactly where it stopped."""

    epoch: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    ema: float | None = None
    since_best: int = 0
    since_decay: int = 0
    lr: float = 0.0
    history: list = field(default_factory=list)
    rng: dict = field(default_factory=dict)
    run_id: str | None = None
    train_seconds: float = 0.0
    logged_upto: int = 0


# --- checkpoints: safetensors for tensors, JSON for the rest (no pickle anywhere) ------------------------------

def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState,
                    best: Path | None = None) -> None:
    """Write the trial's state to ``folder`` as a whole: a kill at any moment leaves the previous one readable.

    The new state is written beside it and swapped in by renames; ``latest_checkpoint`` finds whichever is whole.
    ``best`` (the best model's weights so far) is kept with it, so that a resume restores the matching best model.
    """
    import shutil

    from safetensors.torch import save_file

    draft, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    shutil.rmtree(draft, ignore_errors=True)
    draft.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    for index, slots in optim["state"].items():
        for name, value in slots.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(draft / "state.safetensors"))
    if best is not None and best.is_file():
        shutil.copyfile(best, draft / "model.safetensors")
    meta = asdict(state) | {"param_groups": optim["param_groups"]}
    (draft / "trainer.json").write_text(json.dumps(meta))  # last: its presence marks a whole checkpoint
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    draft.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    """``folder``, or the state it replaced if a kill came between the two renames; None if there is none."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / "trainer.json").is_file():
            return candidate
    return None


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainerState:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "trainer.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    return TrainerState(**meta)


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model


# --- the loop ----------------------------------------------------------------------------------------------------

def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.inference_mode()
def predict(model, source, utterances: Sequence[Utterance], lengths: dict, batch_size: int, device) -> np.ndarray:
    """Class probabilities for ``utterances`` (whole clips), in their order; batches group similar lengths."""
    model.eval()
    order = sorted(range(len(utterances)), key=lambda i: lengths.get(utterances[i].id, 0))
    out: list[np.ndarray | None] = [None] * len(utterances)
    rng = np.random.default_rng(0)  # evaluation batches are neither cropped nor augmented: it is never drawn from
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = _to(source.batch([utterances[i] for i in idx], train=False, rng=rng), device)
        p = torch.softmax(model(batch).float(), dim=-1).cpu().numpy().astype(np.float64)
        for row, i in enumerate(idx):
            out[i] = p[row]
    return np.stack(out)


def feature_statistics(source, utterances: Sequence[Utterance], modality: str, batch_size: int = 32):
    """Per-dimension mean and std of a modality's clean features over ``utterances`` (padding excluded)."""
    total = total_sq = None
    count = 0
    rng = np.random.default_rng(0)
    for start in range(0, len(utterances), batch_size):
        batch = source.batch(utterances[start : start + batch_size], train=False, rng=rng)
        x, mask = batch[modality].double(), batch[f"{modality}_mask"]
        valid = x.permute(0, 2, 1, 3)[mask]  # (frames, layers, width)
        valid = valid.reshape(-1, valid.shape[-1])
        total = valid.sum(0) if total is None else total + valid.sum(0)
        total_sq = (valid**2).sum(0) if total_sq is None else total_sq + (valid**2).sum(0)
        count += valid.shape[0]
    mean = total / count
    std = torch.sqrt(torch.clamp(total_sq / count - mean**2, min=1e-10))
    return mean.float(), std.float()


def _print_reporter(metrics: dict, _checkpoint: str) -> None:
    print(f"epoch {metrics['epoch']:>3}  train_loss {metrics['train_loss']:.4f}  val_f1 {metrics['val_f1']:.4f}  "
          f"ema {metrics['val_f1_ema']:.4f}  best {metrics['best_val_f1']:.4f}  lr {metrics['lr']:.2e}  "
          f"({metrics['epoch_seconds']:.1f} s)", flush=True)


def run_trial(cfg: dict, reporter: Reporter | None = None, resume_dir: str | Path | None = None,
              workdir: str | Path | None = None, run_key: str | None = None, run_name: str | None = None,
              progress: bool = True, index=None, device: str | None = None) -> dict:
    """Train one model as ``cfg`` says and return its summary (``best_val_f1``, ``best_epoch``, ...).

    ``reporter(metrics, checkpoint_dir)`` is called after every epoch (Ray's ``tune.report`` inside a
    search); ``resume_dir`` is a checkpoint folder written by an earlier attempt of the same trial;
    ``index`` is the feature index of an already filled cache (the search passes it), else the trial loads
    its encoders and fills the cache itself. ``device`` overrides ``trial.device`` (a Ray trial passes the
    device Ray gave it).
    """
    from emotune.data.augment import Augmenter
    from emotune.data.prepare import prepare_corpus
    from emotune.features.encode import pick_device
    from emotune.features.prepare import describe, load_encoders, prepare_features
    from emotune.features.source import CachedFeatures, LiveFeatures
    from emotune.model import build_model, modalities_of
    from emotune.tracking import TrackedRun

    trial_cfg, model_cfg, features_cfg = cfg["trial"], cfg["model"], cfg["features"]
    reporter = reporter or _print_reporter
    seed = int(trial_cfg["seed"])
    seed_everything(seed)
    torch.set_num_threads(max(1, int(trial_cfg.get("cpus", 1))))
    device = pick_device(device or trial_cfg.get("device", "auto"))
    workdir = Path(workdir or tempfile.mkdtemp(prefix="emotune-trial-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs_dir = cfg["paths"]["runs_dir"]
    modalities = modalities_of(model_cfg)

    started = time.perf_counter()
    corpus = prepare_corpus(cfg["data"], runs_dir, progress=progress)
    labels = corpus.labels
    if features_cfg.get("cache", True):
        if index is None:
            index = prepare_features(corpus, cfg["encoders"], features_cfg, modalities, runs_dir, progress=progress)
        source = CachedFeatures(index, modalities, labels, float(trial_cfg["aug_prob"]), float(trial_cfg["crop_seconds"]),
                                float(features_cfg.get("preload_mb", 4096)))
        described = index.encoders
    else:
        # live encoders run where the trial runs: on the device it was given, not wherever features.device says
        encoders = load_encoders(corpus, cfg["encoders"], {**features_cfg, "device": str(device)}, modalities, runs_dir)
        augmenter = Augmenter.from_settings(features_cfg.get("augment"))
        source = LiveFeatures(encoders, labels, corpus.norm, augmenter, float(trial_cfg["aug_prob"]),
                              float(trial_cfg["crop_seconds"]))
        described = {m: describe(e) | {"storage": "float32"} for m, e in encoders.items()}  # never stored
    feature_seconds = time.perf_counter() - started

    dims = {m: (described[m]["layers"], described[m]["width"]) for m in modalities}
    norms = {m: described[m]["norm"] for m in modalities}
    model = build_model(model_cfg, dims, len(labels), norms)
    for m in modalities:
        adapter = model.adapters[m]
        if getattr(adapter, "needs_statistics", False):  # global standardisation from the training side only
            adapter.set_statistics(*feature_statistics(source, corpus.train, m))
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(trial_cfg["lr"]),
                                  weight_decay=float(trial_cfg["weight_decay"]))
    weights = class_weights(corpus.train, labels, trial_cfg.get("class_weights", "inverse"))
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None)
    lengths = {uid: info.n_samples for uid, info in corpus.audio.items()}

    state = TrainerState(lr=float(trial_cfg["lr"]))
    rng = np.random.default_rng(seed)
    if resume_dir and (Path(resume_dir) / "trainer.json").is_file():
        state = load_checkpoint(Path(resume_dir), model, optimizer)
        rng.bit_generator.state = state.rng
        best_src = Path(resume_dir) / "model.safetensors"
        if best_src.is_file():
            (workdir / "best").mkdir(exist_ok=True)
            (workdir / "best" / "model.safetensors").write_bytes(best_src.read_bytes())

    tracking = cfg.get("tracking")
    run = None
    if tracking:
        search = cfg.get("search") or {}
        run = TrackedRun.start(tracking, name=run_name or f"train-{time.strftime('%Y%m%d-%H%M%S')}", kind="trial",
                               run_key=run_key, parent_run_id=search.get("parent_run_id"),
                               tags={"emotune.search": search.get("name", "")})
        state.run_id = run.run_id
        # A trial killed after logging an epoch but before its checkpoint was kept retrains that epoch on
        # resume (with identical results, as the RNG state is restored); MLflow already has it.
        state.logged_upto = run.last_step("val_f1")
        if state.epoch == 0:
            run.log_params(params_of(cfg, corpus, dims, norms))
            run.log_json(cfg, "config.json")

    setup_seconds = time.perf_counter() - started
    try:
        summary = _train_loop(cfg, model, optimizer, loss_fn, source, corpus, labels, lengths, device, state, rng,
                              reporter, workdir, run, dims, norms, described, feature_seconds, setup_seconds)
    except Exception:  # not SystemExit: that is Ray stopping the trial (ASHA), which the search records itself
        if run is not None:
            run.finish("FAILED")
        raise
    return summary


def params_of(cfg: dict, corpus, dims, norms) -> dict:
    return {
        "encoders": cfg["encoders"],
        "model": cfg["model"],
        "trial": cfg["trial"],
        "features": {k: cfg["features"].get(k) for k in ("cache", "variants", "speech_layers", "text_layers")},
        "data": {"root": cfg["data"]["root"], "dev_fraction": cfg["data"]["dev_fraction"],
                 "split_seed": cfg["data"]["split_seed"], "n_train": len(corpus.train), "n_dev": len(corpus.dev),
                 "n_test": len(corpus.test)},
        "dims": {m: f"{d[0]}x{d[1]}" for m, d in dims.items()},
        "norms": norms,
    }


def _train_loop(cfg, model, optimizer, loss_fn, source, corpus, labels, lengths, device, state: TrainerState, rng,
                reporter, workdir: Path, run, dims, norms, described, feature_seconds, setup_seconds) -> dict:
    t = cfg["trial"]
    batch_size, eval_batch = int(t["batch_size"]), int(t.get("eval_batch_size", 32))
    patience, decay = int(t["patience"]), float(t["lr_decay"])
    early_stop = t.get("early_stop")
    alpha = float(t.get("ema_alpha", 0.5))
    dev_true = [labels.index(u.label) for u in corpus.dev]
    if not corpus.dev:
        raise EmotuneError("the dev split is empty: raise data.dev_fraction so that model selection has data")
    summary: dict = {}
    # a resumed trial may already be done: all its epochs, or stopped early (then it must not train on)
    finished = early_stop is not None and state.epoch > 0 and state.since_best >= int(early_stop)
    while state.epoch < int(t["max_epochs"]) and not finished:
        epoch_start = time.perf_counter()
        model.train()
        order = rng.permutation(len(corpus.train))
        losses = []
        for start in range(0, len(order), batch_size):
            batch = _to(source.batch([corpus.train[i] for i in order[start : start + batch_size]], True, rng), device)
            loss = loss_fn(model(batch), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        dev_probs = predict(model, source, corpus.dev, lengths, eval_batch, device)
        f1 = evaluation.macro_f1(dev_true, dev_probs.argmax(1), len(labels))
        state.epoch += 1
        state.ema = f1 if state.ema is None else alpha * f1 + (1 - alpha) * state.ema
        improved = f1 > state.best_f1
        if improved:
            state.best_f1, state.best_epoch = f1, state.epoch
            state.since_best = state.since_decay = 0
        else:
            state.since_best += 1
            state.since_decay += 1
            if state.since_decay >= patience:  # the winners' rule: lr x 0.9 after `patience` flat evaluations
                state.lr *= decay
                state.since_decay = 0
                for group in optimizer.param_groups:
                    group["lr"] = state.lr
        state.train_seconds += time.perf_counter() - epoch_start
        metrics = {"epoch": state.epoch, "val_f1": f1, "val_f1_ema": state.ema, "best_val_f1": state.best_f1,
                   "train_loss": float(np.mean(losses)), "lr": state.lr,
                   "epoch_seconds": time.perf_counter() - epoch_start}
        state.history.append({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()})
        _maybe_fail_once(cfg, state.epoch)
        if improved:
            _save_best(model, corpus, labels, source, lengths, dev_probs, device, eval_batch, workdir,
                       run, cfg, dims, norms, described, state)
        if run is not None and state.epoch > state.logged_upto:
            run.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=state.epoch)
        state.rng = rng.bit_generator.state
        checkpoint = workdir / "checkpoint"
        save_checkpoint(checkpoint, model, optimizer, state, workdir / "best" / "model.safetensors")
        stopped_early = early_stop is not None and state.since_best >= int(early_stop)
        last = stopped_early or state.epoch >= int(t["max_epochs"])
        if last:  # close the run before the last report: Ray may end the process as soon as it has it
            summary = _finish_run(run, state, stopped_early, feature_seconds, workdir / "best")
        extra = {"setup_seconds": setup_seconds} | ({"mlflow_run_id": run.run_id} if run is not None else {})
        reporter(metrics | extra, str(checkpoint))
        if last:
            break
    else:  # resumed with nothing left to train, but Tune may not have the last result yet
        summary = _finish_run(run, state, finished, feature_seconds, workdir / "best")
        if state.history:
            extra = {"setup_seconds": setup_seconds} | ({"mlflow_run_id": run.run_id} if run is not None else {})
            reporter(state.history[-1] | extra, str(workdir / "checkpoint"))
    return summary | {"run_id": state.run_id, "history": state.history, "workdir": str(workdir)}


def _maybe_fail_once(cfg: dict, epoch: int) -> None:
    """Testing aid (``trial.fail_once_at_epoch``): the first trial of the search to reach this epoch crashes once."""
    target = cfg["trial"].get("fail_once_at_epoch")
    if target is None or epoch != int(target):
        return
    marker = Path(cfg["paths"]["runs_dir"]) / f"failed-once-{(cfg.get('search') or {}).get('name', 'train')}"
    try:
        with open(marker, "x"):
            pass
    except FileExistsError:
        return
    raise RuntimeError(f"trial.fail_once_at_epoch={target}: deliberate crash to exercise retries")


def _finish_run(run, state: TrainerState, stopped_early: bool, feature_seconds: float,
                best_dir: Path | None = None) -> dict:
    summary = {"best_val_f1": state.best_f1, "best_epoch": state.best_epoch, "epochs_trained": state.epoch,
               "patience_stopped": float(stopped_early), "train_seconds": state.train_seconds,
               "seconds_per_epoch": state.train_seconds / max(1, len(state.history)),
               "feature_seconds": feature_seconds}
    if run is not None:
        run.log_metrics(summary, step=state.epoch)
        run.log_json(state.history, "history.json")
        if best_dir is not None:
            run.log_artifacts(evaluation.dev_reports(best_dir, best_title(state.best_f1, state.best_epoch)), "best")
        run.finish("FINISHED")
    return summary


def best_title(f1: float, epoch: int) -> str:
    return f"dev macro-F1 {f1:.4f} at epoch {epoch}"


def _save_best(model, corpus, labels, source, lengths, dev_probs, device, eval_batch, workdir: Path, run,
               cfg, dims, norms, described, state) -> None:
    """Write (and log) what the selector and ``predict`` need from the best model so far."""
    best = workdir / "best"
    best.mkdir(exist_ok=True)
    files = [save_weights(model, best / "model.safetensors")]
    card = {"labels": list(labels), "dims": dims, "norms": norms, "model": cfg["model"], "encoders": described,
            "encoder_names": cfg["encoders"], "norm_stats": corpus.norm.to_dict(), "features": {
                k: cfg["features"].get(k) for k in ("speech_layers", "text_layers", "max_text_tokens")},
            "best_epoch": state.epoch, "best_val_f1": state.best_f1, "trial_seed": cfg["trial"]["seed"]}
    files.append(evaluation.save_json(card, best / "model_card.json"))
    files.append(evaluation.write_predictions(best / "dev_predictions.csv", [u.id for u in corpus.dev], dev_probs,
                                              labels, [u.label for u in corpus.dev]))
    if corpus.test:
        test_probs = predict(model, source, corpus.test, lengths, eval_batch, device)
        files.append(evaluation.write_predictions(best / "test_predictions.csv", [u.id for u in corpus.test],
                                                  test_probs, labels))
    if run is not None:
        run.log_artifacts(files, "best")


def trainable(config: dict, index=None) -> dict | None:
    """The Ray Tune trainable (also runs alone): ``config`` is the full plain config dict.

    ``index``: the feature index of a cache the search already filled (see :func:`run_trial`).
    """
    from ray import tune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context = tune.get_context()
        trial_id = context.get_trial_id()
    if trial_id is None:
        return run_trial(copy.deepcopy(config), index=index)
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    # only the GPUs Ray assigned (CUDA_VISIBLE_DEVICES holds just those); none assigned: the CPU, even on a GPU box
    device = config["trial"].get("device", "auto")
    if device == "auto":
        device = "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"

    def report(metrics: dict, _checkpoint_dir: str) -> None:
        # Tune gets a marker of a few bytes per epoch, kept (never deleted), so that it restores the trial and its
        # result files after an interruption; the state itself is the trial's own checkpoint below. Were it
        # Tune's, Tune would delete old ones as new ones arrive, and a driver killed before saving its state
        # would send the resume to a deleted checkpoint.
        with tempfile.TemporaryDirectory(prefix="emotune-marker-") as marker:
            Path(marker, "epoch.json").write_text(json.dumps({"epoch": metrics["epoch"]}))
            tune.report(metrics | {"node_id": node_id, "gpu_ids": ",".join(gpu_ids),
                                   "cuda_initialized": torch.cuda.is_initialized()},
                        checkpoint=tune.Checkpoint.from_directory(marker))

    # The trial resumes from its own checkpoint, in a folder named by its id, whenever Tune starts it again (a
    # retry after a crash, or a resumed search), whichever marker Tune restores it from.
    workdir = Path(config["paths"]["runs_dir"]) / "trials" / context.get_experiment_name() / trial_id
    run_trial(config, report, latest_checkpoint(workdir / "checkpoint"), workdir=workdir,
              run_key=f"{context.get_experiment_name()}/{trial_id}", run_name=context.get_trial_name(),
              progress=False, index=index, device=device)
    return None
