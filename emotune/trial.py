"""One trial: train the model of a config on cached (or live) encoder features, report every epoch.

:func:`trainable` is what Ray Tune calls with a plain dict config; it reports through ``tune.report`` and keeps
its own checkpoint in ``<runs>/trials/<search>/<trial id>``, which it resumes from whenever Tune starts it
again. Outside Ray the same function runs alone:
``emotune train key=value ...``. Every dev evaluation (one per epoch, or ``trial.evals_per_epoch``) reports
``val_f1`` (dev macro-F1), its bootstrap standard error ``val_f1_se``, its smoothed ``val_f1_ema``,
``best_val_f1``, the ranking score ``val_score`` and its best ``best_val_score`` (``trial.select_by``, see
:mod:`emotune.noise`), ``val_loss`` (dev cross-entropy), ``train_loss`` and ``lr``, with ``epoch`` (fractional
between epochs) and ``evaluation`` (the count of dev evaluations, which is ASHA's clock). Each trial is one MLflow
run; whenever the ranking score improves, the best checkpoint (safetensors), the dev and test class probabilities
with ids, a confusion-matrix PNG and a classification report are logged, so even a trial that ASHA stops early
leaves everything the ensemble selector needs. Test data is only ever predicted, never scored or selected on.

With ``trial.folds=K`` (:mod:`emotune.data.folds`) the trial trains K heads in lockstep, each on K-1 folds of the
labelled clips, and every "dev" figure above is computed on the out-of-fold predictions of all labelled clips;
the model it keeps is the bag of its K heads (:class:`emotune.model.bag.FoldBag`). Each evaluation's predicted
classes go to ``evaluations.json``, from which :mod:`emotune.estimate` repeats the search's choice.
"""

from __future__ import annotations

import copy
import json
import random
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from emotune import evaluation, noise
from emotune.data.corpus import Utterance
from emotune.errors import EmotuneError
from emotune.estimate import EVALUATIONS_FILE, encode_classes
from emotune.model.checkpoint import ModelCard, save_model

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

    epoch: int = 0  # whole epochs trained
    evaluation: int = 0  # dev evaluations so far (evals_per_epoch per epoch)
    best_f1: float = -1.0  # the best dev macro-F1 so far (patience and early stopping follow it)
    best_epoch: int | float = 0  # fractional when the best evaluation came within an epoch
    best_score: float = -1.0  # the best value of the ranking score (trial.select_by) so far: the best checkpoint's
    score_epoch: int | float = 0  # the best checkpoint's epoch
    score_f1: float = -1.0  # the best checkpoint's dev macro-F1
    score_se: float = 0.0  # and its bootstrap standard error
    ema: float | None = None
    since_best: int = 0
    since_decay: int = 0
    lr: float = 0.0
    history: list = field(default_factory=list)
    predicted: list = field(default_factory=list)  # per evaluation, the predicted class of every scored clip
    # (emotune.estimate.encode_classes): what the search's bias-corrected estimate repeats its choice on
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


def train_step(heads: Sequence[torch.nn.Module], loss_fns: Sequence[torch.nn.Module], optimizer, source,
               batches: Sequence[Sequence[Utterance] | None], rng: np.random.Generator, device) -> list[float]:
    """One optimiser step of a trial: each head trains on its batch of clips (None: no batch this step), read from
    ``source`` with training crops and augmentation; the heads' losses. The GPU check times this same step."""
    optimizer.zero_grad(set_to_none=True)
    total, losses = None, []
    for head, loss_fn, clips in zip(heads, loss_fns, batches):
        if clips is None:
            continue
        batch = _to(source.batch(clips, True, rng), device)
        loss = loss_fn(head(batch), batch["labels"])
        total = loss if total is None else total + loss
        losses.append(loss.item())
    total.backward()
    optimizer.step()
    return losses


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


def _print_reporter(metrics: dict, _checkpoint: str | None) -> None:
    print(f"epoch {metrics['epoch']:>3g}  train_loss {metrics['train_loss']:.4f}  val_loss {metrics['val_loss']:.4f}  "
          f"val_f1 {metrics['val_f1']:.4f}  "
          f"ema {metrics['val_f1_ema']:.4f}  best {metrics['best_val_f1']:.4f}  lr {metrics['lr']:.2e}  "
          f"({metrics['epoch_seconds']:.1f} s)", flush=True)


def check_evals_per_epoch(evals: int, n_train: int, batch_size: int) -> None:
    """Each dev evaluation needs at least one training batch before it: raise when an epoch has fewer batches."""
    batches = -(-n_train // batch_size)
    if not 1 <= evals <= batches:
        raise EmotuneError(f"trial.evals_per_epoch={evals} is out of range: an epoch of the training split "
                           f"({n_train} clips) has {batches} batches of trial.batch_size={batch_size} clips. Set "
                           f"trial.evals_per_epoch between 1 and {batches}.")


@dataclass
class TrialContext:
    """What a trial gets besides its configuration: where it works, whom it tells, what the search prepared.

    Every field has a default, so ``run_trial(cfg)`` trains alone; a search fills in the rest.
    """

    workdir: str | Path | None = None  # checkpoints and the best model; a new temporary folder when None
    reporter: Reporter | None = None  # called after every dev evaluation (Ray's tune.report in a search); prints
    # when None. Its second argument is the checkpoint folder at the end of an epoch, None within one.
    resume_dir: str | Path | None = None  # a checkpoint written by an earlier attempt of the same trial
    index: object | None = None  # FeatureIndex of a cache the search filled; None: the trial fills it itself
    recipes: dict | None = None  # the driver's encoder recipes ("modality/name"), resolved once for every node;
    # None: the trial resolves its encoders itself
    verify_cache: bool = True  # check cached files' CRCs when the trial fills the cache itself
    device: str | None = None  # overrides trial.device (a Ray trial passes the device Ray gave it)
    cpus: int | None = None  # torch threads; None: trial.cpus (a search passes the CPUs Ray gives each trial)
    parent_run_id: str | None = None  # the search's MLflow run
    search_name: str = ""
    search_id: str = ""  # tells this search's runs from those of an earlier search of the same name
    run_key: str | None = None  # names the trial's MLflow run across attempts, so a retry reuses it
    run_name: str | None = None
    progress: bool = True  # progress bars while preparing the corpus and the cache


def run_trial(cfg: dict, context: TrialContext | None = None) -> dict:
    """Train one model as ``cfg`` says and return its summary (``best_val_f1``, ``best_epoch``, ``history``, ...)."""
    return Trainer(cfg, context or TrialContext()).fit()


class Trainer:
    """One trial: its data, model and optimiser, and the loop that trains, evaluates, reports and checkpoints.

    What a resumed trial needs besides tensors is in ``self.state`` (a :class:`TrainerState`).
    """

    def __init__(self, cfg: dict, context: TrialContext) -> None:
        from emotune.config import TrialSettings, typed
        from emotune.data.prepare import prepare_corpus
        from emotune.features.encode import pick_device

        self.cfg, self.context = cfg, context
        self.settings: TrialSettings = typed(TrialSettings, cfg["trial"], "trial")
        self.reporter = context.reporter or _print_reporter
        seed = self.settings.seed
        seed_everything(seed)
        torch.set_num_threads(max(1, context.cpus or self.settings.cpus))
        self.device = pick_device(context.device or self.settings.device)
        self.workdir = Path(context.workdir or tempfile.mkdtemp(prefix="emotune-trial-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

        started = time.perf_counter()
        self.corpus = prepare_corpus(cfg["data"], cfg["paths"]["runs_dir"], progress=context.progress)
        self.labels = self.corpus.labels
        self.folds = self._folds()
        # the clips scored at every evaluation: dev with one split, every labelled clip (out of fold) with K folds
        self.scored = [self.folds.clips[i] for i in self.folds.scored]
        self.dev_true = [self.labels.index(u.label) for u in self.scored]
        self.dev_resamples = noise.stratified_resamples(self.dev_true)  # drawn once: every evaluation alike
        if self.settings.select_by not in noise.SCORES:
            raise EmotuneError(f"trial.select_by must be one of {', '.join(noise.SCORES)}, got "
                               f"'{self.settings.select_by}'")
        self.source, self.described = self._features()
        self.feature_seconds = time.perf_counter() - started
        self.model, self.heads = self._model()
        # one optimiser for all heads: a head's parameters get gradients only from its own loss, and AdamW skips
        # parameters without one, so K heads in lockstep train as K separate runs would
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.settings.lr,
                                           weight_decay=self.settings.weight_decay)
        self.loss_fns = [self._loss_fn(rows) for rows in self.folds.train]
        self.loss_fn = self.loss_fns[0]  # weighs val_loss as the first head's training loss is weighed
        self.lengths = {uid: info.n_samples for uid, info in self.corpus.audio.items()}
        self.evals_per_epoch = self._evals_per_epoch()
        self.state = TrainerState(lr=self.settings.lr)
        self.rng = np.random.default_rng(seed)
        self._resume()
        self.resumed_from = self.state.epoch  # 0 for a fresh start: reported, so a retry shows where it went on
        self.run = self._start_run()
        self.setup_seconds = time.perf_counter() - started

    # --- set-up --------------------------------------------------------------------------------------------------

    def _features(self):
        """The batch source (cached or live) and each modality's encoder description."""
        from emotune.data.augment import Augmenter
        from emotune.features.prepare import describe, load_encoders, prepare_features
        from emotune.features.source import CachedFeatures, LiveFeatures
        from emotune.model import modalities_of

        cfg, features, corpus = self.cfg, self.cfg["features"], self.corpus
        modalities = modalities_of(cfg["model"])
        aug_prob, crop = self.settings.aug_prob, self.settings.crop_seconds
        if features["cache"]:
            index = self.context.index
            if index is None:
                index = prepare_features(corpus, cfg["encoders"], {**features, "verify": self.context.verify_cache},
                                         modalities, cfg["paths"], self.context.progress, self.context.recipes)
            source = CachedFeatures(index, modalities, self.labels, aug_prob, crop, float(features["preload_mb"]))
            return source, index.encoders
        # live encoders run where the trial runs: on the device it was given, not wherever features.device says
        encoders = load_encoders(corpus, cfg["encoders"], {**features, "device": str(self.device)}, modalities,
                                 cfg["paths"], self.context.recipes)
        source = LiveFeatures(encoders, self.labels, corpus.norm, Augmenter.from_settings(features["augment"]),
                              aug_prob, crop)
        return source, {m: describe(e) | {"storage": "float32"} for m, e in encoders.items()}  # never stored

    def _folds(self):
        """The trial's splits (:mod:`emotune.data.folds`): the train/dev split, or K folds of the labelled clips."""
        from emotune.data.folds import resplit_seed, trial_folds

        data, k = self.cfg["data"], self.settings.folds
        seed = int(data.get("fold_seed", data["split_seed"]))
        if self.settings.resplit and k > 1:
            seed = resplit_seed(seed, {key: self.cfg.get(key) for key in ("encoders", "model", "trial")})
        return trial_folds(self.corpus.train, self.corpus.dev, k, seed, by_group=bool(data.get("group_column")))

    def _clips(self, rows) -> list[Utterance]:
        return [self.folds.clips[i] for i in rows]

    def _loss_fn(self, train_rows) -> torch.nn.CrossEntropyLoss:
        weights = class_weights(self._clips(train_rows), self.labels, self.settings.class_weights)
        return torch.nn.CrossEntropyLoss(weight=weights.to(self.device) if weights is not None else None)

    def _model(self) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
        """The model (one head, or a :class:`~emotune.model.bag.FoldBag` of K) and its heads."""
        from emotune.model import build_model, modalities_of
        from emotune.model.bag import FoldBag

        modalities = modalities_of(self.cfg["model"])
        self.dims = {m: (self.described[m]["layers"], self.described[m]["width"]) for m in modalities}
        self.norms = {m: self.described[m]["norm"] for m in modalities}
        heads = []
        for train_rows in self.folds.train:
            head = build_model(self.cfg["model"], self.dims, len(self.labels), self.norms)
            for m in modalities:
                adapter = head.adapters[m]
                if getattr(adapter, "needs_statistics", False):  # global standardisation from its training side
                    adapter.set_statistics(*feature_statistics(self.source, self._clips(train_rows), m))
            heads.append(head.to(self.device))
        return (heads[0] if len(heads) == 1 else FoldBag(heads).to(self.device)), heads

    def _evals_per_epoch(self) -> int:
        n_train = min(len(rows) for rows in self.folds.train)
        check_evals_per_epoch(self.settings.evals_per_epoch, n_train, self.settings.batch_size)
        return self.settings.evals_per_epoch

    def _resume(self) -> None:
        resume_dir = self.context.resume_dir
        if not resume_dir or not (Path(resume_dir) / "trainer.json").is_file():
            return
        self.state = load_checkpoint(Path(resume_dir), self.model, self.optimizer)
        if self.state.evaluation == 0:  # a checkpoint from before evaluations were counted: one per epoch
            self.state.evaluation = self.state.epoch * self.evals_per_epoch
        self.rng.bit_generator.state = self.state.rng
        best_src = Path(resume_dir) / "model.safetensors"
        if best_src.is_file():
            (self.workdir / "best").mkdir(exist_ok=True)
            (self.workdir / "best" / "model.safetensors").write_bytes(best_src.read_bytes())

    def _start_run(self):
        from emotune.tracking.store import TAG_SEARCH, TAG_SEARCH_ID, TrackedRun

        tracking = self.cfg.get("tracking")
        if not tracking:
            return None
        context = self.context
        run = TrackedRun.start(tracking, name=context.run_name or f"train-{time.strftime('%Y%m%d-%H%M%S')}",
                               kind="trial", run_key=context.run_key, parent_run_id=context.parent_run_id,
                               tags={TAG_SEARCH: context.search_name,
                                     **({TAG_SEARCH_ID: context.search_id} if context.search_id else {})})
        self.state.run_id = run.run_id
        # A trial killed after logging an epoch but before its checkpoint was kept retrains that epoch on
        # resume (with identical results, as the RNG state is restored); MLflow already has it.
        self.state.logged_upto = run.last_step("val_f1")  # steps count dev evaluations
        if self.state.epoch == 0:
            params = params_of(self.cfg, self.corpus, self.dims, self.norms)
            params["trial"] = params["trial"] | {"cpus": torch.get_num_threads()}  # what it ran with
            run.log_params(params)
            run.log_json(self.cfg, "config.json")
        return run

    # --- the loop ------------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train until ``max_epochs`` or early stopping; returns the summary."""
        try:
            summary = self._loop()
        except Exception:  # not SystemExit: that is Ray stopping the trial (ASHA), which the search records itself
            if self.run is not None:
                self.run.finish("FAILED")
            raise
        return summary | {"run_id": self.state.run_id, "history": self.state.history, "workdir": str(self.workdir)}

    def _stopped_early(self) -> bool:
        early_stop = self.settings.early_stop
        return early_stop is not None and self.state.since_best >= int(early_stop)

    def _loop(self) -> dict:
        if not self.scored:
            raise EmotuneError("the dev split is empty: raise data.dev_fraction so that model selection has data")
        max_epochs = self.settings.max_epochs
        if self.state.epoch >= max_epochs or (self.state.epoch > 0 and self._stopped_early()):
            # resumed with nothing left to train, but Tune may not have the last result yet
            summary = self._finish(self._stopped_early())
            if self.state.history:
                self._report(self.state.history[-1] | {"early_stopped": float(self._stopped_early())})
            return summary
        while True:
            for metrics, dev_probs, _ in self._epoch():
                if self._score_improved(metrics):
                    self._save_best(dev_probs)
                if self.run is not None and self.state.evaluation > self.state.logged_upto:
                    # MLflow's step is the evaluation; the epoch goes along when the two differ
                    skip = ("evaluation",) + (("epoch",) if self.evals_per_epoch == 1 else ())
                    self.run.log_metrics({k: v for k, v in metrics.items() if k not in skip},
                                         step=self.state.evaluation)
                if metrics["evaluation"] % self.evals_per_epoch:  # within the epoch: no checkpoint, it goes on
                    self._report(metrics, checkpoint=False)
            self.state.rng = self.rng.bit_generator.state
            save_checkpoint(self.workdir / "checkpoint", self.model, self.optimizer, self.state,
                            self.workdir / "best" / "model.safetensors")
            self._save_evaluations()
            stopped_early = self._stopped_early()
            metrics["early_stopped"] = float(stopped_early)  # tells the search this trial's own rule ended it
            last = stopped_early or self.state.epoch >= max_epochs
            if last:  # close the run before the last report: Ray may end the process as soon as it has it
                summary = self._finish(stopped_early)
            self._report(metrics)
            if last:
                return summary

    def _epoch(self):
        """Train one epoch, evaluating on dev ``evals_per_epoch`` times, at even shares of its batches.

        Yields, per evaluation, its metrics, the dev probabilities (held-out: out of fold with K folds, in the
        order of ``self.scored``) and whether dev macro-F1 improved. The epoch's own bookkeeping (patience, lr
        decay, early stopping count epochs) is done before its last evaluation is yielded, whose ``epoch`` is then
        the whole number of epochs trained. K heads step in lockstep, each through its own training folds.
        """
        batch_size, evals = self.settings.batch_size, self.evals_per_epoch
        plans = []
        for rows in self.folds.train:
            order = rows[self.rng.permutation(len(rows))]
            plans.append([order[start : start + batch_size] for start in range(0, len(order), batch_size)])
        steps = max(len(plan) for plan in plans)
        improved_in_epoch = False
        for share, indices in enumerate(np.array_split(np.arange(steps), evals), start=1):
            started = time.perf_counter()
            losses = self._train_steps(plans, indices)
            dev_probs = self.predict_heldout()
            dev_pred = dev_probs.argmax(1)
            f1 = evaluation.macro_f1(self.dev_true, dev_pred, len(self.labels))
            f1_se = noise.macro_f1_se(self.dev_true, dev_pred, len(self.labels), rows=self.dev_resamples)
            progress = self.state.epoch + 1 if share == evals else round(self.state.epoch + share / evals, 4)
            improved = self._record_evaluation(f1, progress)
            improved_in_epoch |= improved
            if share == evals:
                self._close_epoch(improved_in_epoch)
            self.state.train_seconds += time.perf_counter() - started
            metrics = {"epoch": progress, "evaluation": self.state.evaluation, "val_f1": f1, "val_f1_se": f1_se,
                       "val_f1_ema": self.state.ema, "best_val_f1": self.state.best_f1,
                       "val_loss": self._dev_loss(dev_probs), "train_loss": float(np.mean(losses)),
                       "lr": self.state.lr, "epoch_seconds": time.perf_counter() - started}  # since the last report
            self.state.history.append({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()})
            self.state.predicted.append(encode_classes(dev_pred))
            yield metrics, dev_probs, improved

    def _dev_loss(self, dev_probs: np.ndarray) -> float:
        """Dev cross-entropy, weighted per class as the training loss is (``trial.class_weights``).

        With the default balanced weights every class counts about equally, as it does in macro-F1, which ranks
        the trials; and train_loss and val_loss stay comparable. It moves with every probability, not only with
        the argmax, so it is a smoother signal to prune on than macro-F1 over a hundred clips.
        """
        weight = self.loss_fn.weight
        log_probs = torch.log(torch.from_numpy(dev_probs).clamp_min(1e-12))
        return float(torch.nn.functional.nll_loss(log_probs, torch.tensor(self.dev_true),
                                                  weight=None if weight is None else weight.cpu().double()))

    def _train_steps(self, plans: list[list[np.ndarray]], steps: np.ndarray) -> list[float]:
        """One optimiser step per step index: each head that has a batch at that step trains on it (``plans``:
        per head, its batches of clip indices); the heads' losses."""
        self.model.train()
        losses = []
        for step in steps:
            # folds differ by a clip or two: a head may have one batch fewer
            batches = [self._clips(plan[step]) if step < len(plan) else None for plan in plans]
            losses += train_step(self.heads, self.loss_fns, self.optimizer, self.source, batches, self.rng, self.device)
        return losses

    def predict_heldout(self) -> np.ndarray:
        """Class probabilities of ``self.scored``: each clip predicted by the head that never trained on it."""
        probs = np.zeros((len(self.folds.clips), len(self.labels)))
        for head, rows in zip(self.heads, self.folds.heldout):
            probs[rows] = predict(head, self.source, self._clips(rows), self.lengths, self.settings.eval_batch_size,
                                  self.device)
        return probs[self.folds.scored]

    def _score_improved(self, metrics: dict) -> bool:
        """Add the ranking score to ``metrics`` (``val_score``, ``best_val_score`` and its standard error
        ``best_val_score_se``); True when it beat the best so far, so that this evaluation's model becomes the
        trial's best checkpoint."""
        state = self.state
        rows = state.history
        # earlier evaluations as the history keeps them (rounded), this one as measured: with select_by=val_f1 the
        # score is then exactly best_val_f1
        earlier = rows[:-1]
        value = noise.score_values([r["val_f1"] for r in earlier] + [metrics["val_f1"]],
                                   [r.get("val_f1_se", 0.0) for r in earlier] + [metrics["val_f1_se"]],
                                   [r["val_f1_ema"] for r in earlier] + [metrics["val_f1_ema"]],
                                   self.settings.select_by)[-1]
        improved = value > state.best_score
        if improved:
            state.best_score, state.score_epoch, state.score_f1 = value, metrics["epoch"], metrics["val_f1"]
            state.score_se = metrics["val_f1_se"]
        metrics |= {"val_score": value, "best_val_score": state.best_score, "best_val_score_se": state.score_se}
        rows[-1] |= {"val_score": round(value, 6), "best_val_score": round(state.best_score, 6)}
        return improved

    def _record_evaluation(self, f1: float, progress: int | float) -> bool:
        """Count a dev evaluation at epoch ``progress``: its EMA and the best so far. Returns whether F1 improved."""
        state, alpha = self.state, self.settings.ema_alpha
        state.evaluation += 1
        state.ema = f1 if state.ema is None else alpha * f1 + (1 - alpha) * state.ema
        if f1 > state.best_f1:
            state.best_f1, state.best_epoch = f1, progress
            return True
        return False

    def _close_epoch(self, improved: bool) -> None:
        """Count the epoch (``improved``: any of its evaluations beat the best), and apply the winners' rule of
        lr x ``lr_decay`` after ``patience`` epochs without improvement. Patience and early stopping count epochs
        whatever the evaluation cadence, so that changing the cadence does not change how long a trial waits."""
        state = self.state
        state.epoch += 1
        if improved:
            state.since_best = state.since_decay = 0
            return
        state.since_best += 1
        state.since_decay += 1
        if state.since_decay >= self.settings.patience:
            state.lr *= self.settings.lr_decay
            state.since_decay = 0
            for group in self.optimizer.param_groups:
                group["lr"] = state.lr

    def _report(self, metrics: dict, checkpoint: bool = True) -> None:
        extra = {"setup_seconds": self.setup_seconds, "resumed_from_epoch": self.resumed_from}
        extra |= {"mlflow_run_id": self.run.run_id} if self.run else {}
        self.reporter(metrics | extra, str(self.workdir / "checkpoint") if checkpoint else None)

    # --- what the trial leaves ----------------------------------------------------------------------------------

    def _save_evaluations(self) -> None:
        """Write (and log) ``evaluations.json``: every evaluation's predicted classes on the scored clips, so that
        the search and select-top can repeat the choice of checkpoint and trial on resamples of those clips
        (:mod:`emotune.estimate`). Written at every epoch's end: a trial ASHA stops leaves it too."""
        path = self.workdir / EVALUATIONS_FILE
        data = {"ids": [u.id for u in self.scored], "classes": list(self.labels), "folds": self.folds.count,
                "select_by": self.settings.select_by, "ema_alpha": self.settings.ema_alpha,
                "val_f1_se": [row.get("val_f1_se", 0.0) for row in self.state.history],
                "predicted": self.state.predicted}
        path.write_text(json.dumps(data))
        if self.run is not None:
            self.run.log_artifacts([path])

    def _save_best(self, dev_probs: np.ndarray) -> None:
        """Write (and log) what the selector and ``predict`` need from the best model so far."""
        cfg, corpus, labels, best = self.cfg, self.corpus, self.labels, self.workdir / "best"
        card = ModelCard(labels=list(labels), dims=self.dims, norms=self.norms, model=cfg["model"],
                         encoders=self.described, encoder_names=cfg["encoders"], norm_stats=corpus.norm.to_dict(),
                         features={k: cfg["features"].get(k) for k in ("speech_layers", "text_layers",
                                                                         "max_text_tokens")},
                         best_epoch=self.state.score_epoch, best_val_f1=self.state.score_f1,
                         trial_seed=self.settings.seed, folds=self.folds.count, fold_seed=self.folds.seed)
        files = save_model(self.model, card, best)
        # with K folds, "dev" predictions are out of fold, for every labelled clip
        files.append(evaluation.write_predictions(best / "dev_predictions.csv", [u.id for u in self.scored],
                                                  dev_probs, labels, [u.label for u in self.scored]))
        if corpus.test:
            test_probs = predict(self.model, self.source, corpus.test, self.lengths,
                                 self.settings.eval_batch_size, self.device)
            files.append(evaluation.write_predictions(best / "test_predictions.csv", [u.id for u in corpus.test],
                                                      test_probs, labels))
        if self.run is not None:
            self.run.log_artifacts(files, "best")

    def _finish(self, stopped_early: bool) -> dict:
        state = self.state
        summary = {"best_val_f1": state.best_f1, "best_epoch": state.best_epoch, "best_val_score": state.best_score,
                   "checkpoint_epoch": state.score_epoch, "checkpoint_val_f1": state.score_f1,
                   "epochs_trained": state.epoch,
                   "patience_stopped": float(stopped_early), "train_seconds": state.train_seconds,
                   "seconds_per_epoch": state.train_seconds / max(1, state.epoch),
                   "feature_seconds": self.feature_seconds}
        if self.run is not None:
            self.run.log_metrics(summary, step=state.evaluation)
            self.run.log_json(state.history, "history.json")
            self.run.log_artifacts(evaluation.dev_reports(self.workdir / "best",
                                                          best_title(state.score_f1, state.score_epoch)), "best")
            self.run.finish("FINISHED")
        return summary


def params_of(cfg: dict, corpus, dims, norms) -> dict:
    return {
        "encoders": cfg["encoders"],
        "model": cfg["model"],
        "trial": cfg["trial"],
        "features": {k: cfg["features"].get(k) for k in ("cache", "variants", "speech_layers", "text_layers")},
        "data": {"root": cfg["data"]["root"], "dev_fraction": cfg["data"]["dev_fraction"],
                 "split_seed": cfg["data"]["split_seed"], "fold_seed": cfg["data"].get("fold_seed"),
                 "n_train": len(corpus.train), "n_dev": len(corpus.dev),
                 "n_test": len(corpus.test)},
        "dims": {m: f"{d[0]}x{d[1]}" for m, d in dims.items()},
        "norms": norms,
    }


def best_title(f1: float, epoch: int) -> str:
    return f"dev macro-F1 {f1:.4f} at epoch {epoch}"


def _quiet_worker_exit(unraisable) -> None:
    """Ray ends an idle trial worker with SIGTERM, whose handler raises SystemExit; when that lands in a garbage
    collector callback, Python prints it as 'Exception ignored ... Traceback', which reads as a failure at the
    end of a successful search. That one case is dropped; every other unraisable exception prints as usual."""
    if isinstance(unraisable.exc_value, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


def trainable(config: dict, launch: TrialContext | None = None) -> dict | None:
    """The Ray Tune trainable (also runs alone): ``config`` is the full plain config dict.

    ``launch`` holds what the search prepared for every trial (the feature index, the parent run, CPUs);
    this function adds what belongs to this trial: its folder, its MLflow run key, its device, the reporter.
    """
    from ray import tune

    launch = launch or TrialContext()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tune_context = tune.get_context()
        trial_id = tune_context.get_trial_id()
    if trial_id is None:
        return run_trial(copy.deepcopy(config), launch)
    import ray

    sys.unraisablehook = _quiet_worker_exit
    node_id = ray.get_runtime_context().get_node_id()
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    # only the GPUs Ray assigned (CUDA_VISIBLE_DEVICES holds just those); none assigned: the CPU, even on a GPU box
    device = config["trial"]["device"]
    if device == "auto":
        device = "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        # Tune gets a marker of a few bytes per epoch, kept (never deleted), so that it restores the trial and its
        # result files after an interruption; the state itself is the trial's own checkpoint below. Were it
        # Tune's, Tune would delete old ones as new ones arrive, and a driver killed before saving its state
        # would send the resume to a deleted checkpoint. Within an epoch there is no checkpoint, and no marker.
        extra = {"node_id": node_id, "gpu_ids": ",".join(gpu_ids), "cuda_initialized": torch.cuda.is_initialized()}
        if checkpoint_dir is None:
            tune.report(metrics | extra)
            return
        with tempfile.TemporaryDirectory(prefix="emotune-marker-") as marker:
            Path(marker, "epoch.json").write_text(json.dumps({"epoch": metrics["epoch"]}))
            tune.report(metrics | extra, checkpoint=tune.Checkpoint.from_directory(marker))

    # The trial resumes from its own checkpoint, in a folder named by its id, whenever Tune starts it again (a
    # retry after a crash, or a resumed search), whichever marker Tune restores it from.
    experiment = tune_context.get_experiment_name()
    workdir = Path(config["paths"]["runs_dir"]) / "trials" / experiment / trial_id
    run_trial(config, replace(launch, workdir=workdir, reporter=report,
                              resume_dir=latest_checkpoint(workdir / "checkpoint"), device=device,
                              run_key=f"{experiment}/{trial_id}", run_name=tune_context.get_trial_name(),
                              progress=False))
    return None
