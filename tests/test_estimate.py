"""The bias-corrected estimate on predictions built so that the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from emotune import evaluation
from emotune.estimate import (
    Curves,
    bias_corrected,
    curves_of,
    decode_classes,
    encode_classes,
    hard_votes,
    weighted_macro_f1,
)
from emotune.selection.ensemble import hard_vote

N_CLASSES = 6


def noisy(y: np.ndarray, accuracy: float, rng) -> np.ndarray:
    """Predictions right with probability ``accuracy``, wrong towards a uniformly drawn other class."""
    predicted = y.copy()
    wrong = rng.random(len(y)) > accuracy
    predicted[wrong] = (y[wrong] + rng.integers(1, N_CLASSES, wrong.sum())) % N_CLASSES
    return predicted


def test_many_trials_of_equal_skill_the_raw_best_is_optimistic_the_estimate_is_not():
    rng = np.random.default_rng(3)
    y = rng.integers(0, N_CLASSES, 600)
    curves = Curves([np.stack([noisy(y, 0.6, rng) for _ in range(20)]) for _ in range(20)], y, N_CLASSES)
    estimate = bias_corrected(curves)
    # what any of these trials scores on clips it was not chosen on: its skill, measured on fresh draws
    truth = np.mean([evaluation.macro_f1(y, noisy(y, 0.6, rng), N_CLASSES) for _ in range(200)])
    assert estimate.raw > truth + 0.03  # the best of 400 noisy values
    assert abs(estimate.expected - truth) < 0.015
    assert estimate.low < truth < estimate.high
    assert estimate.candidates == 20 and estimate.clips == 600


def test_one_clearly_better_trial_is_estimated_at_its_own_skill():
    rng = np.random.default_rng(4)
    y = rng.integers(0, N_CLASSES, 600)
    trials = [np.stack([noisy(y, 0.85, rng) for _ in range(3)])] + [np.stack([noisy(y, 0.5, rng)]) for _ in range(5)]
    estimate = bias_corrected(Curves(trials, y, N_CLASSES))
    truth = np.mean([evaluation.macro_f1(y, noisy(y, 0.85, rng), N_CLASSES) for _ in range(200)])
    assert abs(estimate.expected - truth) < 0.02
    # a vote of the top 3: the good trial and two poor ones
    ensemble = bias_corrected(Curves(trials, y, N_CLASSES), k=3)
    assert ensemble.k == 3 and ensemble.expected < estimate.expected


def test_the_counting_matches_the_project_macro_f1_and_hard_vote():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 5, 80)  # class 5 absent from the truth: it counts, as the challenge counts it
    predicted = np.stack([noisy(y, 0.5, rng) for _ in range(4)])
    ones = np.ones((80, 1), dtype=np.float32)
    for row in predicted:
        assert weighted_macro_f1(y, row, N_CLASSES, ones)[0, 0] == pytest.approx(evaluation.macro_f1(y, row, 6))
    twice = np.full((80, 1), 2.0, dtype=np.float32)  # a clip drawn twice counts twice
    assert weighted_macro_f1(y, predicted[0], 6, twice)[0, 0] == pytest.approx(evaluation.macro_f1(y, predicted[0], 6))
    one_hot = [np.eye(N_CLASSES)[row] for row in predicted[:3]]
    assert (hard_votes(predicted[:3], N_CLASSES) == hard_vote(one_hot)).all()


def test_curves_are_read_aligned_by_clip_id():
    labels = ["a", "b", "c"]
    truth = {"x": "a", "y": "b", "z": "c"}
    first = {"ids": ["x", "y", "z"], "classes": labels, "predicted": [encode_classes([0, 1, 2])]}
    second = {"ids": ["z", "x", "y"], "classes": labels, "predicted": [encode_classes([2, 0, 0]),
                                                                          encode_classes([2, 0, 1])]}
    curves = curves_of([first, second], truth, labels)
    assert curves.y_true.tolist() == [0, 1, 2]
    assert curves.predicted[1].tolist() == [[0, 0, 2], [0, 1, 2]]
    assert decode_classes(encode_classes([11, 0])).tolist() == [11, 0]
    with pytest.raises(ValueError, match="same clips"):
        curves_of([first, {**second, "ids": ["z", "x", "w"]}], truth, labels)
