"""Trials tied with the best: the search summary's comparison of each trial's dev predictions with the best's."""

from __future__ import annotations

import numpy as np

from emotune.evaluation import write_predictions
from emotune.insight.standing import ties_with_best
from emotune.noise import better_with_confidence
from emotune.search.report import ties_text

LABELS = ["neutral", "joy", "anger"]


def write_dev(trials_dir, trial_id, ids, classes, labels=LABELS, confidence=0.8):
    """A trial's best/dev_predictions.csv giving ``classes`` (indices of ``labels``) to ``ids``."""
    probs = np.full((len(ids), len(labels)), (1 - confidence) / (len(labels) - 1))
    probs[np.arange(len(ids)), classes] = confidence
    folder = trials_dir / trial_id / "best"
    folder.mkdir(parents=True)
    write_predictions(folder / "dev_predictions.csv", ids, probs, labels)


def test_ties_with_best_compares_every_trial_with_the_best_on_its_dev_predictions(tmp_path):
    dev_ids = [f"clip{i:02d}.wav" for i in range(30)]
    truth = np.array([i % 3 for i in range(30)])
    wrong = (truth + 1) % 3
    trials = tmp_path / "trials" / "search"
    order = np.random.default_rng(0).permutation(30)  # files list the clips in their own order: aligned by id
    predictions = {"best": truth.copy(), "same": truth.copy(), "one-off": truth.copy(), "worse": truth.copy()}
    predictions["one-off"][4] = wrong[4]
    predictions["worse"][:12] = wrong[:12]
    for trial_id, classes in predictions.items():
        write_dev(trials, trial_id, [dev_ids[i] for i in order], classes[order])
    # the same predictions as one-off, written with the classes in another order
    reordered = truth.copy()
    reordered[9] = wrong[9]
    shuffled = ["anger", "neutral", "joy"]
    write_dev(trials, "reordered", dev_ids, [shuffled.index(LABELS[c]) for c in reordered], labels=shuffled)
    write_dev(trials, "other-split", dev_ids[1:], truth[1:])  # lacks a dev clip
    rows = [{"trial_id": t, "best_val_f1": 0.9 - 0.01 * i}
            for i, t in enumerate(["best", "same", "missing", "worse", "one-off", "other-split", "reordered"])]

    ties = ties_with_best(rows, trials, dev_ids, truth.tolist(), LABELS, 0.95)
    assert ties.tied == ["best", "same", "one-off", "reordered"]  # best first, then in rank order
    assert ties.shares["same"] == 0.5  # identical predictions: every resample a draw
    assert ties.shares["one-off"] == better_with_confidence(truth, truth, predictions["one-off"], 3) < 0.95
    assert ties.shares["worse"] >= 0.95
    assert set(ties.skipped) == {"missing", "other-split"}
    assert "dev_predictions.csv is missing from the trial folder" in ties.skipped["missing"]
    assert "lacks dev clips" in ties.skipped["other-split"]
    assert [ties.mark(t) for t in ("best", "one-off", "worse", "missing")] == [True, True, False, ""]

    lines = ties_text(ties, rows, trials)
    assert lines[0] == ("Tied with the best (paired bootstrap on dev, 95%): 3 trials: same (0.8900), "
                        "one-off (0.8600), reordered (0.8400)")
    assert any(line.startswith("  1 trial not compared (missing): best/dev_predictions.csv is missing") and
               str(trials) in line for line in lines[1:])
    assert len(lines) == 3  # one line per reason for skipping

    # a stricter confidence leaves fewer ties; with the best's own file missing nothing can be compared
    strict = ties_with_best(rows, trials, dev_ids, truth.tolist(), LABELS, 0.6)
    assert strict.tied == ["best", "same"]
    assert ties_text(strict, rows, trials)[0].startswith("Tied with the best (paired bootstrap on dev, 60%): 1 trial:")
    alone = ties_with_best([rows[0], rows[3]], trials, dev_ids, truth.tolist(), LABELS, 0.95)
    assert alone.tied == ["best"] and ties_text(alone, rows, trials)[0].startswith(
        "No trial is tied with the best (paired bootstrap on dev, 95%): it scores higher than the one other trial "
        "compared in at least 95% of the resamples.")
    headless = ties_with_best(rows[2:], trials, dev_ids, truth.tolist(), LABELS, 0.95)
    assert headless.tied == ["missing"] and not headless.shares and "the best trial's" in headless.problem
    assert ties_text(headless, rows, trials)[0].startswith("Ties with the best not computed")
