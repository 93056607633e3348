"""What the chosen model is expected to score on unseen clips: a bootstrap bias-corrected estimate (BBC).

The dev score of a search's pick is the best of many noisy values (of every evaluation of every trial), so it is
optimistic: the more trials and evaluations, the more. BBC (Tsamardinos, Greasidou & Borboudakis, Machine Learning
2018) measures the choice instead of the chosen: the scored clips are resampled with replacement (within each
class, so that a rare class keeps its count); on each resample the whole choice is repeated on the in-bag clips
(each trial's best evaluation by its ranking score, then the best trial, or the top k of an ensemble) and what it
chose is scored on the out-of-bag clips, which took no part in choosing. The mean over resamples is the estimate,
its 2.5th and 97.5th percentiles the 95% interval. No model is retrained: it needs only each trial's predicted
class per scored clip at each evaluation (``evaluations.json``, written by every trial).

Macro-F1 is computed for every (trial, evaluation) and every resample at once, as matrix products of one-hot
predictions with the resamples' clip counts: a search of 30 trials of 40 evaluations on 1,300 clips takes a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

EVALUATIONS_FILE = "evaluations.json"  # in a trial's folder and its MLflow run: what the estimate needs
RESAMPLES = 500  # bootstrap resamples: the interval's ends to about 0.005
SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A choice's expected macro-F1 on unseen clips, its 95% interval, and the raw score it corrects."""

    expected: float
    low: float
    high: float
    raw: float  # the chosen model's score on all the clips it was chosen on (optimistic)
    clips: int  # scored clips the choice was made on
    candidates: int  # trials it chose among
    k: int = 1  # members chosen: 1 is the best trial, more a hard vote of the top k

    def metrics(self) -> dict:
        return {"expected_f1": self.expected, "expected_f1_low": self.low, "expected_f1_high": self.high}

    def text(self, what: str = "dev", folds: int = 1) -> str:
        """The line printed beside a pick; with ``folds`` > 1 it says that the estimate is for one head, since
        out-of-fold predictions come from one head each while new clips get the mean of all of them."""
        among = f"the best of {self.candidates} trials" if self.candidates > 1 else "one trial"
        if self.k > 1:
            among = f"a vote of the top {self.k} of {self.candidates} trials"
        bag = "" if folds <= 1 else (f"; for one head: the mean of the {folds} heads that predicts new clips "
                                     "usually scores higher")
        return (f"{what} {self.raw:.3f} ({among}: optimistic); expected on unseen clips {self.expected:.3f} "
                f"[{self.low:.3f}, {self.high:.3f}] (bias-corrected bootstrap, 95%){bag}")


def encode_classes(classes: Sequence[int]) -> str:
    """Predicted classes as one character each (``'0'`` + class), as ``evaluations.json`` keeps them."""
    return "".join(chr(48 + int(c)) for c in classes)


def decode_classes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("latin-1"), dtype=np.uint8).astype(np.int64) - 48


def resample_counts(y_true: Sequence[int], resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n, resamples) in-bag counts of each clip: per class, as many draws with replacement as it has clips."""
    y = np.asarray(y_true)
    rng = np.random.default_rng(seed)
    counts = np.zeros((len(y), resamples), dtype=np.float32)
    columns = np.arange(resamples)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        draws = rng.choice(members, size=(len(members), resamples), replace=True)
        np.add.at(counts, (draws, np.broadcast_to(columns, draws.shape)), 1.0)
    return counts


def weighted_macro_f1(y_true: Sequence[int], predicted: np.ndarray, n_classes: int, weights: np.ndarray) -> np.ndarray:
    """Macro-F1 of each row of ``predicted`` (m, n) under each column of clip ``weights`` (n, b): (m, b).

    Classes count as :func:`emotune.evaluation.macro_f1` counts them: all ``n_classes``, a class never predicted
    and absent scoring 0.
    """
    y = np.asarray(y_true)
    predicted = np.atleast_2d(predicted)
    total = np.zeros((predicted.shape[0], weights.shape[1]))
    for c in range(n_classes):
        is_c = (predicted == c).astype(np.float32)
        truth = (y == c).astype(np.float32)
        hits = (is_c * truth) @ weights
        denominator = is_c @ weights + (truth @ weights)[None, :]
        total += np.where(denominator > 0, 2 * hits / np.maximum(denominator, 1e-12), 0.0)
    return total / n_classes


def score_curves(f1: np.ndarray, select_by: str, se: np.ndarray | None, ema_alpha: float) -> np.ndarray:
    """A trial's ranking score (``trial.select_by``, :mod:`emotune.noise`) at each evaluation, for each resample:
    ``f1`` is (evaluations, resamples)."""
    if select_by == "val_f1":
        return f1
    if select_by == "val_f1_lcb":
        return f1 - (np.zeros(len(f1)) if se is None else np.asarray(se))[:, None]
    if select_by == "val_f1_mean3":
        return np.stack([f1[max(0, i - 1): i + 2].mean(0) for i in range(len(f1))])
    if select_by == "val_f1_ema":
        out = np.empty_like(f1)
        out[0] = f1[0]
        for i in range(1, len(f1)):
            out[i] = ema_alpha * f1[i] + (1 - ema_alpha) * out[i - 1]
        return out
    raise ValueError(f"unknown score {select_by!r}")


@dataclass
class Curves:
    """Every candidate trial's predicted classes on the scored clips, per evaluation, and how it ranks them."""

    predicted: list[np.ndarray]  # per trial: (evaluations, n) class indices
    y_true: np.ndarray
    n_classes: int
    select_by: str = "val_f1"
    ema_alpha: float = 0.5
    se: list[np.ndarray | None] | None = None  # per trial: its reported val_f1_se per evaluation (val_f1_lcb)


def _choices(curves: Curves, inbag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per trial and resample, its best in-bag ranking score and the evaluation where it is reached: (t, b)."""
    best, where = [], []
    for t, predicted in enumerate(curves.predicted):
        f1 = weighted_macro_f1(curves.y_true, predicted, curves.n_classes, inbag)
        scores = score_curves(f1, curves.select_by, curves.se[t] if curves.se else None, curves.ema_alpha)
        where.append(scores.argmax(0))  # the first of equal values: the earliest evaluation, as a trial keeps it
        best.append(scores.max(0))
    return np.stack(best), np.stack(where)


def hard_votes(votes: np.ndarray, n_classes: int) -> np.ndarray:
    """Majority of ``votes`` (members best first, n); a tie goes to the best member voting a tied class, as
    :func:`emotune.selection.ensemble.hard_vote` decides."""
    counts = np.zeros((votes.shape[1], n_classes), dtype=np.int64)
    rows = np.arange(votes.shape[1])
    for member in votes:
        counts[rows, member] += 1
    top = counts.max(1)
    out = np.full(votes.shape[1], -1)
    for member in votes:
        out = np.where((out < 0) & (counts[rows, member] == top), member, out)
    return out


def bias_corrected(curves: Curves, k: int = 1, raw: float | None = None, resamples: int = RESAMPLES,
                   seed: int = SEED) -> Estimate:
    """BBC of choosing the best trial (``k=1``) or the hard vote of the top ``k``, on the scored clips.

    ``raw``: the chosen model's score as the search reports it (computed here on all clips when None).
    """
    return bias_corrected_sizes(curves, (k,), {k: raw} if raw is not None else None, resamples, seed)[k]


def bias_corrected_sizes(curves: Curves, sizes: Sequence[int], raw: dict[int, float] | None = None,
                         resamples: int = RESAMPLES, seed: int = SEED) -> dict[int, Estimate]:
    """:func:`bias_corrected` for several ensemble sizes at once, on the same resamples: each trial's in-bag
    choice, the costly part, is made once for all of them."""
    inbag = resample_counts(curves.y_true, resamples, seed)
    outbag = (inbag == 0).astype(np.float32)
    best, where = _choices(curves, inbag)
    # ranks trials in each resample by in-bag score; a stable sort keeps the given (the search's) order on ties
    ranked = np.argsort(-best, axis=0, kind="stable")
    full = np.ones((len(curves.y_true), 1), dtype=np.float32)
    best_all, where_all = _choices(curves, full) if raw is None else (None, None)
    out = {}
    for k in sizes:
        scores = np.empty(resamples)
        for b in range(resamples):
            members = [curves.predicted[t][where[t, b]] for t in ranked[:k, b]]
            chosen = members[0] if k == 1 else hard_votes(np.stack(members), curves.n_classes)
            scores[b] = weighted_macro_f1(curves.y_true, chosen, curves.n_classes, outbag[:, b: b + 1])[0, 0]
        if raw is None:
            order = np.argsort(-best_all[:, 0], kind="stable")[:k]
            members = [curves.predicted[t][where_all[t, 0]] for t in order]
            chosen = members[0] if k == 1 else hard_votes(np.stack(members), curves.n_classes)
            raw_k = float(weighted_macro_f1(curves.y_true, chosen, curves.n_classes, full)[0, 0])
        else:
            raw_k = float(raw[k])
        low, high = np.percentile(scores, [2.5, 97.5])
        out[k] = Estimate(float(scores.mean()), float(low), float(high), raw_k, len(curves.y_true),
                          len(curves.predicted), k)
    return out


def curves_of(evaluations: Sequence[dict], truth: dict[str, str], labels: Sequence[str],
              ids: Sequence[str] | None = None) -> Curves:
    """:class:`Curves` from trials' ``evaluations.json`` contents (best-ranked first), on the clips ``ids`` (all the
    first trial scored when None); ``truth`` maps clip ids to labels. Raises ValueError when a trial did not score
    those clips (another corpus or split) or predicted other classes."""
    labels = list(labels)
    ids = list(ids if ids is not None else evaluations[0]["ids"])
    predicted, se = [], []
    for data in evaluations:
        if list(data["classes"]) != labels:
            raise ValueError("a trial predicted other classes than the corpus has")
        row = {uid: i for i, uid in enumerate(data["ids"])}
        if any(uid not in row for uid in ids):
            raise ValueError("a trial did not score the same clips (another corpus or split)")
        take = np.array([row[uid] for uid in ids])
        predicted.append(np.stack([decode_classes(p)[take] for p in data["predicted"]]))
        se.append(np.asarray(data.get("val_f1_se") or [0.0] * len(data["predicted"]), dtype=np.float64))
    first = evaluations[0]
    return Curves(predicted, np.array([labels.index(truth[uid]) for uid in ids]), len(labels),
                  first.get("select_by", "val_f1"), float(first.get("ema_alpha", 0.5)), se)
