"""Which held-out part each labelled clip belongs to: a trial's splits, one or K folds.

With ``trial.folds=1`` a trial trains on the train split and is scored on the dev split, as the winners did. With
``trial.folds=K`` the labelled clips (train and dev together) are cut into K stratified folds: head k trains on
the other K-1 folds and predicts fold k, so every labelled clip gets exactly one out-of-fold prediction per
evaluation, and the score is computed on all of them (Cawley & Talbot, JMLR 2010: a selection criterion over more
clips over-fits less). With ``data.group_column`` a group (a speaker, say) never straddles folds.

The folds are a pure function of the labels, groups, K and the seed: every trial of a search that shares
``data.fold_seed`` is scored on the same folds, so trials compare clip by clip. ``trial.resplit=true`` draws them
anew per configuration instead (Nagler et al., NeurIPS 2024).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from emotune.data.corpus import Utterance
from emotune.errors import DataError


@dataclass(frozen=True)
class Folds:
    """A trial's splits over ``clips`` (the labelled clips a trial sees): per head, whom it trains on and
    predicts; ``scored`` are the clips with a held-out prediction, in ``clips`` order."""

    clips: list[Utterance]
    train: list[np.ndarray]  # per head: indices into clips it trains on
    heldout: list[np.ndarray]  # per head: indices into clips it predicts (disjoint across heads)
    seed: int | None  # the fold seed (None for the train/dev split)

    @property
    def count(self) -> int:
        return len(self.train)

    @property
    def scored(self) -> np.ndarray:
        return np.sort(np.concatenate(self.heldout))

    def fold_of(self) -> dict[str, int]:
        """Each scored clip's id and the head that predicts it."""
        return {self.clips[i].id: k for k, rows in enumerate(self.heldout) for i in rows}


def assign_folds(labels: Sequence[str], groups: Sequence[str | None] | None, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each clip: stratified by label; with ``groups``, each group within one fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(labels)
    if groups is not None:
        n_groups = len(set(groups))
        if n_groups < k:
            raise DataError(f"trial.folds={k} with groups needs at least {k} groups, the labelled clips have "
                            f"{n_groups}", fix=f"Lower trial.folds to {max(2, n_groups)} or less, or unset "
                            "data.group_column.")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed % 2**32)
    else:
        if len(y) < k:
            raise DataError(f"trial.folds={k} needs at least {k} labelled clips, there are {len(y)}",
                            fix="Lower trial.folds.")
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed % 2**32)
    fold = np.empty(len(y), dtype=np.int64)
    with warnings.catch_warnings():  # a class rarer than k: sklearn warns; its clips still land in some folds
        warnings.simplefilter("ignore", UserWarning)
        for index, (_, heldout) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
            fold[heldout] = index
    return fold


def trial_folds(train: list[Utterance], dev: list[Utterance], k: int, seed: int, by_group: bool) -> Folds:
    """A trial's splits: the train/dev split when ``k`` is 1, else K folds over train and dev together."""
    clips = list(train) + list(dev)
    if k < 1:
        raise DataError(f"trial.folds must be 1 or more, got {k}", fix="Set trial.folds=1 (one train/dev split) "
                        "or trial.folds=5 (five folds over the labelled clips).")
    if k == 1:
        return Folds(clips, [np.arange(len(train))], [np.arange(len(train), len(clips))], None)
    fold = assign_folds([u.label for u in clips], [u.group for u in clips] if by_group else None, k, seed)
    train_rows = [np.flatnonzero(fold != f) for f in range(k)]
    return Folds(clips, train_rows, [np.flatnonzero(fold == f) for f in range(k)], seed)


def resplit_seed(fold_seed: int, sampled: dict) -> int:
    """The fold seed of one configuration under ``trial.resplit=true``: ``data.fold_seed`` mixed with the sampled
    settings, so each configuration gets folds of its own, and the same configuration the same folds again."""
    text = json.dumps({"fold_seed": int(fold_seed), "config": sampled}, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def scored_clips(corpus, k: int) -> list[Utterance]:
    """The clips a trial of ``trial.folds=k`` scores at every evaluation: dev, or every labelled clip."""
    return list(corpus.dev) if k <= 1 else list(corpus.train) + list(corpus.dev)


def training_clips(n_train: int, n_dev: int, k: int) -> int:
    """About how many clips one head trains on: the train split, or (K-1)/K of the labelled clips."""
    return n_train if k <= 1 else (n_train + n_dev) * (k - 1) // k


def trained_per_epoch(n_train: int, n_dev: int, k: int) -> int:
    """Clips trained on per epoch by all heads together: K heads of (K-1)/K each."""
    return n_train if k <= 1 else (n_train + n_dev) * (k - 1)
