"""K-fold trials on real (tiny) assets: every labelled clip scored out of fold once per evaluation, groups kept
whole, the heads' mean predicted, and the single split unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import trial_config

from emotune.data.corpus import Utterance
from emotune.data.folds import assign_folds, resplit_seed, trial_folds
from emotune.errors import DataError
from emotune.trial import Trainer, TrialContext

QUIET = {"reporter": lambda metrics, checkpoint: None, "progress": False}


def clips(labels: list[str], groups: list[str] | None = None) -> list[Utterance]:
    return [Utterance(f"c{i}", None, "", label, "train.csv", i + 2, groups[i] if groups else None)
            for i, label in enumerate(labels)]


class Watched(Trainer):
    """The real trainer, keeping which clips each head trained on and what every evaluation scored."""

    trained: list[set] = []
    evaluations: list[np.ndarray] = []

    def _train_steps(self, plans, steps):
        for head, plan in enumerate(plans):
            self.trained[head].update(int(i) for step in steps if step < len(plan) for i in plan[step])
        return super()._train_steps(plans, steps)

    def _epoch(self):
        for metrics, dev_probs, improved in super()._epoch():
            self.evaluations.append(dev_probs)
            yield metrics, dev_probs, improved


def test_a_k_fold_trial_scores_every_labelled_clip_once_per_evaluation_by_a_head_that_never_saw_it(separable,
                                                                                                   tmp_path):
    corpus, runs = separable
    cfg = trial_config(corpus, runs, "trial.folds=3", "trial.max_epochs=2", "trial.evals_per_epoch=2",
                       "trial.early_stop=null") | {"tracking": None}
    trainer = Watched(cfg, TrialContext(workdir=tmp_path / "trial", **QUIET))
    trainer.trained, trainer.evaluations = [set() for _ in range(3)], []
    summary = trainer.fit()
    labelled = trainer.corpus.train + trainer.corpus.dev
    folds = trainer.folds
    # the held-out parts cut the labelled clips exactly: each clip in one fold
    heldout = np.concatenate(folds.heldout)
    assert sorted(heldout.tolist()) == list(range(len(labelled))) and len(folds.heldout) == 3
    assert [u.id for u in trainer.scored] == [u.id for u in labelled]
    # no head trained on a clip it scores, and each trained on all the others
    for head in range(3):
        assert trainer.trained[head].isdisjoint(folds.heldout[head].tolist())
        assert trainer.trained[head] == set(folds.train[head].tolist())
    # four evaluations, each with one probability row per labelled clip
    assert len(trainer.evaluations) == 4 == len(summary["history"])
    for probs in trainer.evaluations:
        assert probs.shape == (len(labelled), 6) and np.allclose(probs.sum(1), 1.0)
    # the dev predictions file holds every labelled clip once, out of fold
    ids = [line.split(",")[0] for line in (tmp_path / "trial" / "best" / "dev_predictions.csv").read_text()
           .splitlines()[1:]]
    assert sorted(ids) == sorted(u.id for u in labelled)


def test_a_k_fold_model_predicts_the_mean_of_its_heads(separable, tmp_path):
    from emotune.model.bag import FoldBag
    from emotune.model.checkpoint import load_model
    from emotune.trial import predict

    corpus, runs = separable
    cfg = trial_config(corpus, runs, "trial.folds=3", "trial.max_epochs=2") | {"tracking": None}
    trainer = Trainer(cfg, TrialContext(workdir=tmp_path / "trial", **QUIET))
    trainer.fit()
    model, card = load_model(tmp_path / "trial" / "best")
    assert isinstance(model, FoldBag) and card.folds == 3 and len(model.heads) == 3
    test = trainer.corpus.test
    bag = predict(model, trainer.source, test, trainer.lengths, 8, torch.device("cpu"))
    heads = [predict(h, trainer.source, test, trainer.lengths, 8, torch.device("cpu")) for h in model.heads]
    assert np.allclose(bag, np.mean(heads, axis=0), atol=1e-6)
    # the heads differ (each trained on other folds): the mean is not any one of them
    assert not np.allclose(heads[0], heads[1], atol=1e-3)
    written = np.loadtxt(tmp_path / "trial" / "best" / "test_predictions.csv", delimiter=",", skiprows=1,
                         usecols=range(2, 8))
    assert written.shape == bag.shape


def test_folds_are_stratified_seeded_and_keep_groups_whole():
    labels = [label for label in "abc" for _ in range(20)]
    groups = [f"speaker{i // 3}" for i in range(60)]  # 20 speakers of 3 clips each
    fold = assign_folds(labels, groups, 4, seed=1)
    for group in set(groups):
        assert len({fold[i] for i, g in enumerate(groups) if g == group}) == 1, group
    assert set(fold.tolist()) == {0, 1, 2, 3}
    assert (assign_folds(labels, groups, 4, seed=1) == fold).all()
    plain = assign_folds(labels, None, 4, seed=1)
    for label in "abc":  # stratified: every fold holds each class's share
        members = [i for i, other in enumerate(labels) if other == label]
        assert sorted(np.bincount(plain[members]).tolist()) == [5, 5, 5, 5]
    assert not (assign_folds(labels, None, 4, seed=2) == plain).all()


def test_one_fold_is_the_train_dev_split_and_bad_counts_say_what_to_do():
    train, dev = clips(["a"] * 6), clips(["a"] * 2)
    folds = trial_folds(train, dev, 1, 0, by_group=False)
    assert folds.count == 1 and [folds.clips[i] for i in folds.scored] == dev
    with pytest.raises(DataError, match="needs at least 4 groups.*Lower trial.folds"):
        trial_folds(clips(["a", "b"] * 3, ["s1", "s1", "s2", "s2", "s3", "s3"]), [], 4, 0, by_group=True)


def test_resplit_gives_each_configuration_folds_of_its_own():
    assert resplit_seed(0, {"lr": 1}) == resplit_seed(0, {"lr": 1})
    assert len({resplit_seed(0, {"lr": i}) for i in range(20)}) == 20
    assert resplit_seed(0, {"lr": 1}) != resplit_seed(1, {"lr": 1})
