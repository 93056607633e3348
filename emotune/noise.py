"""How much of a dev score is noise: bootstrap standard errors, paired comparisons, and the ranking scores.

Macro-F1 is not a mean over clips, so its standard error comes from a bootstrap: the dev clips are resampled
within each class (so that a rare class keeps its count in every resample), and macro-F1 is recomputed on each
resample. The resamples are drawn from a fixed seed and depend only on the dev labels, so two trials scored on the
same dev split are resampled alike: the same resamples then give paired comparisons between them.

Used by trials (``val_f1_se`` at every evaluation), the search summary (trials tied with the best), the selector
(``select-top --k tied``, greedy members) and the noise-aware scheduler.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 200  # bootstrap resamples: enough for a standard error to about 5%, a few ms for 1,000 clips
SEED = 0  # the resamples' seed: fixed, so every trial of a search is resampled alike

# The ranking scores a trial can be selected by (trial.select_by); the benchmark (benchmarks/hpo.md) chose the
# default. Each is a value per dev evaluation; a trial's score is its best value, and its best checkpoint is the
# evaluation where that value is reached.
SCORES = ("val_f1", "val_f1_ema", "val_f1_mean3", "val_f1_lcb")


def stratified_resamples(y_true: Sequence[int], resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) clip indices: each row draws, per class, as many clips of that class as dev holds."""
    y = np.asarray(y_true)
    rng = np.random.default_rng(seed)
    rows = np.empty((resamples, len(y)), dtype=np.int64)
    at = 0
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rows[:, at: at + len(members)] = rng.choice(members, size=(resamples, len(members)), replace=True)
        at += len(members)
    return rows


def resampled_macro_f1(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int,
                       rows: np.ndarray) -> np.ndarray:
    """Macro-F1 of each resample in ``rows`` (from :func:`stratified_resamples`), vectorised over resamples.

    Classes count as :func:`emotune.evaluation.macro_f1` counts them: all ``n_classes``, a class never predicted
    and absent scoring 0.
    """
    y, p = np.asarray(y_true)[rows], np.asarray(y_pred)[rows]  # (resamples, n)
    offsets = (np.arange(len(rows)) * n_classes)[:, None]
    size = len(rows) * n_classes

    def per_class(values: np.ndarray) -> np.ndarray:
        return np.bincount((values + offsets).ravel(), minlength=size).reshape(len(rows), n_classes)

    true_count, pred_count = per_class(y), per_class(p)
    hits = np.bincount((y + offsets)[y == p], minlength=size).reshape(len(rows), n_classes)
    denominator = true_count + pred_count
    f1 = np.where(denominator > 0, 2 * hits / np.maximum(denominator, 1), 0.0)
    return f1.mean(axis=1)


def macro_f1_se(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int, resamples: int = RESAMPLES,
                seed: int = SEED, rows: np.ndarray | None = None) -> float:
    """Bootstrap standard error of dev macro-F1 (stratified resamples of the clips, fixed seed).

    ``rows``: resamples drawn once by :func:`stratified_resamples` for many calls on the same labels (a trial's
    evaluations); drawn here from ``resamples`` and ``seed`` when None.
    """
    if rows is None:
        rows = stratified_resamples(y_true, resamples, seed)
    return float(resampled_macro_f1(y_true, y_pred, n_classes, rows).std(ddof=1))


def better_with_confidence(y_true: Sequence[int], best_pred: Sequence[int], other_pred: Sequence[int],
                           n_classes: int, resamples: int = 1000, seed: int = SEED) -> float:
    """Share of paired resamples in which ``best_pred`` scores a higher macro-F1 than ``other_pred``.

    Both are scored on the same resampled clips, so what the two get right or wrong together cancels out. A share
    of 0.95 or more says the first is better with 95% confidence; below, the two are statistically tied.
    """
    return shares_best_ahead(y_true, best_pred, [other_pred], n_classes, resamples, seed)[0]


def shares_best_ahead(y_true: Sequence[int], best_pred: Sequence[int], other_preds: Sequence[Sequence[int]],
                      n_classes: int, resamples: int = 1000, seed: int = SEED) -> list[float]:
    """:func:`better_with_confidence` of ``best_pred`` against each of ``other_preds``, with the resamples drawn
    and the best scored once for all of them."""
    rows = stratified_resamples(y_true, resamples, seed)
    best = resampled_macro_f1(y_true, best_pred, n_classes, rows)
    shares = []
    for other_pred in other_preds:
        difference = best - resampled_macro_f1(y_true, other_pred, n_classes, rows)
        shares.append(float(np.mean(difference > 0) + 0.5 * np.mean(difference == 0)))
    return shares


def score_values(f1: Sequence[float], se: Sequence[float], ema: Sequence[float], score: str) -> list[float | None]:
    """The ranking ``score``'s value at each evaluation of a curve; None where it is not known yet.

    - ``val_f1``: the evaluation's dev macro-F1 (so a trial's score is its best_val_f1);
    - ``val_f1_ema``: its exponential moving average, as the trial reports it;
    - ``val_f1_mean3``: the mean of the evaluation and its two neighbours, known one evaluation later (the first
      and the last evaluations use the neighbours they have);
    - ``val_f1_lcb``: dev macro-F1 less one bootstrap standard error.
    """
    f1 = list(f1)
    if score == "val_f1":
        return f1
    if score == "val_f1_ema":
        return list(ema)
    if score == "val_f1_lcb":
        return [f - s for f, s in zip(f1, se)]
    if score == "val_f1_mean3":
        return [float(np.mean(f1[max(0, i - 1): i + 2])) for i in range(len(f1))]
    raise ValueError(f"unknown score {score!r}; one of {', '.join(SCORES)}")
