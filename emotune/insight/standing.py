"""The trials' standing: what ranks them, which are statistically tied with the best, and what the pick is expected
to score on unseen clips. The search's summary (emotune/search/report.py), ``emotune report`` and ``select-top``
read them from here.

Trials rank by their ranking score ``best_val_score`` (the best value of ``trial.select_by``); searches whose
trials did not report it rank by ``best_val_f1``. The trials tied with the best are those the best does not beat in
at least ``search.ties_confidence`` of paired bootstrap resamples of the scored clips
(:func:`emotune.noise.better_with_confidence`), compared on each trial's best-checkpoint predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from emotune.config import SearchSettings, TrialSettings, typed
from emotune.names import OBJECTIVE


def ranking_score(row: dict) -> float | None:
    """What ranks a trial: the objective (``best_val_score``), or its ``best_val_f1`` if it reported none (older
    searches)."""
    return row[OBJECTIVE] if row.get(OBJECTIVE) is not None else row.get("best_val_f1")


# --- trials tied with the best ----------------------------------------------------------------------------------

PREDICTIONS = "best/dev_predictions.csv"  # in a trial's folder: its best checkpoint's dev predictions


@dataclass
class Ties:
    """Which finished trials the best does not beat with confidence on dev, and which could not be compared."""

    confidence: float  # search.ties_confidence
    tied: list[str] = field(default_factory=list)  # trial ids, the best first
    shares: dict[str, float] = field(default_factory=dict)  # trial id: share of resamples the best scores higher
    skipped: dict[str, str] = field(default_factory=dict)  # trial id: why it was not compared
    problem: str = ""  # why no trial could be compared at all ("" when the comparisons were made)
    scored: str = "dev"  # the clips compared on: dev, or every labelled clip out of fold

    def mark(self, trial_id: str) -> bool | str:
        """The ``tied`` column of trials.csv: True or False, or empty when the trial was not compared."""
        if trial_id in self.tied:
            return True
        return False if trial_id in self.shares else ""


def _dev_classes(path: Path, dev_ids: Sequence[str], labels: Sequence[str]) -> tuple[np.ndarray | None, str]:
    """A trial's predicted class per dev clip (in ``dev_ids`` order, as indices of ``labels``), or why not."""
    from emotune import evaluation

    if not path.is_file():
        return None, (f"{PREDICTIONS} is missing from the trial folder (a trial that ran on another node of a "
                      "cluster leaves it there)")
    try:
        ids, probs, classes = evaluation.read_predictions(path)
    except (OSError, ValueError, IndexError) as exc:
        return None, f"{PREDICTIONS} cannot be read ({type(exc).__name__}: {exc})"
    if not classes or not set(classes) <= set(labels):
        return None, f"{PREDICTIONS} has other classes than the corpus (the trial was trained on another corpus)"
    row = {uid: i for i, uid in enumerate(ids)}
    if any(uid not in row for uid in dev_ids):
        return None, f"{PREDICTIONS} lacks dev clips (the trial was trained on another split)"
    # the file's class order may differ from the corpus's: its argmax is mapped through the class names
    to_corpus = np.array([list(labels).index(c) for c in classes])
    return to_corpus[probs[[row[uid] for uid in dev_ids]].argmax(1)], ""


def ties_with_best(finished: Sequence[dict], trials_dir: Path, dev_ids: Sequence[str], dev_true: Sequence[int],
                   labels: Sequence[str], confidence: float) -> Ties:
    """The trials of ``finished`` (rows of :func:`trial_table`, best-ranked first) tied with the first.

    Each trial's best-checkpoint dev predictions are read from ``<trials_dir>/<trial_id>/best/dev_predictions.csv``
    and aligned with ``dev_ids``; a trial is tied unless the best scores a higher dev macro-F1 in at least
    ``confidence`` of the paired resamples. A trial whose file is missing or does not match the dev split is
    skipped, with the reason; without the best's own file nothing is compared.
    """
    from emotune.noise import shares_best_ahead

    ties = Ties(confidence)
    if not finished:
        return ties
    best_id = str(finished[0]["trial_id"])
    ties.tied.append(best_id)
    best_pred, why = _dev_classes(trials_dir / best_id / PREDICTIONS, dev_ids, labels)
    if best_pred is None:
        ties.problem = f"the best trial's {why}"
        return ties
    compared: dict[str, np.ndarray] = {}
    for row in finished[1:]:
        trial_id = str(row["trial_id"])
        pred, why = _dev_classes(trials_dir / trial_id / PREDICTIONS, dev_ids, labels)
        if pred is None:
            ties.skipped[trial_id] = why
        else:
            compared[trial_id] = pred
    shares = shares_best_ahead(dev_true, best_pred, list(compared.values()), len(labels))
    ties.shares = dict(zip(compared, shares))
    ties.tied += [trial_id for trial_id, share in ties.shares.items() if share < confidence]
    return ties


def search_ties(cfg: dict, corpus, finished: Sequence[dict], trials_dir: Path) -> Ties:
    """:func:`ties_with_best` on the dev split of ``corpus``, the search's prepared corpus."""
    from emotune.data.folds import scored_clips

    labels = list(corpus.labels)
    trial = typed(TrialSettings, cfg["trial"], "trial")
    scored = scored_clips(corpus, trial.folds)
    dev_ids = [u.id for u in scored]
    dev_true = [labels.index(u.label) for u in scored]
    confidence = typed(SearchSettings, cfg["search"], "search").ties_confidence
    ties = ties_with_best(finished, trials_dir, dev_ids, dev_true, labels, confidence)
    ties.scored = scored_what(trial)
    return ties


# --- the pick's expected score on unseen clips -----------------------------------------------------------------

def _evaluations_of(cfg: dict, row: dict, trials_dir: Path) -> dict | None:
    """A trial's ``evaluations.json``: from its folder, else from its MLflow run (a trial on another node)."""
    import json

    from emotune.estimate import EVALUATIONS_FILE
    from emotune.tracking.store import download_json

    local = trials_dir / str(row["trial_id"]) / EVALUATIONS_FILE
    if local.is_file():
        try:
            return json.loads(local.read_text())
        except (OSError, ValueError):
            return None
    if row.get("mlflow_run_id") and cfg.get("tracking"):
        return download_json(cfg["tracking"], row["mlflow_run_id"], EVALUATIONS_FILE)
    return None


def search_estimate(cfg: dict, corpus, finished: Sequence[dict], trials_dir: Path):
    """The bias-corrected estimate (:mod:`emotune.estimate`) of the search's pick, or a sentence saying why not."""
    from emotune.estimate import bias_corrected, curves_of

    if not finished:
        return "no trial finished"
    found = [(row, _evaluations_of(cfg, row, trials_dir)) for row in finished]
    if found[0][1] is None:
        return f"the best trial's evaluations.json was found neither in {trials_dir} nor in its MLflow run"
    evaluations = [data for _, data in found if data is not None]
    truth = {u.id: u.label for u in corpus.train + corpus.dev}
    try:
        return bias_corrected(curves_of(evaluations, truth, corpus.labels))
    except (ValueError, KeyError, IndexError) as exc:
        return f"the trials' evaluations do not match the corpus ({exc})"


def scored_what(trial: TrialSettings) -> str:
    return "dev" if trial.folds == 1 else f"out-of-fold ({trial.folds} folds)"
