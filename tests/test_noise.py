"""The search's noise: bootstrap standard errors, paired ties, a scheduler that does not cut within noise, and a
searcher that tells Optuna which trials were cut."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from emotune import evaluation, noise


def _predictions(n: int = 300, n_classes: int = 6, accuracy: float = 0.7, seed: int = 1):
    rng = np.random.default_rng(seed)
    truth = rng.choice(n_classes, size=n, p=[0.35, 0.2, 0.15, 0.13, 0.12, 0.05])
    wrong = rng.random(n) > accuracy
    predicted = np.where(wrong, rng.integers(0, n_classes, size=n), truth)
    return truth, predicted


def test_val_f1_se_is_the_spread_of_macro_f1_over_stratified_resamples():
    truth, predicted = _predictions()
    rows = noise.stratified_resamples(truth)
    assert rows.shape == (noise.RESAMPLES, len(truth)) and noise.RESAMPLES >= 200
    for row in rows[:5]:  # stratified: every resample holds each class as often as dev does
        assert np.array_equal(np.bincount(truth[row], minlength=6), np.bincount(truth, minlength=6))
    # the vectorised scores are macro-F1 itself, resample by resample (the challenge's definition, via sklearn)
    direct = np.array([evaluation.macro_f1(truth[row], predicted[row], 6) for row in rows])
    assert np.allclose(noise.resampled_macro_f1(truth, predicted, 6, rows), direct, atol=1e-12)
    se = noise.macro_f1_se(truth, predicted, 6)
    assert se == pytest.approx(direct.std(ddof=1), abs=1e-12)
    assert se == noise.macro_f1_se(truth, predicted, 6)  # fixed seed: the same every time
    # and it is a standard error: a 2,000-resample bootstrap from another seed agrees within sampling error
    assert noise.macro_f1_se(truth, predicted, 6, resamples=2000, seed=7) == pytest.approx(se, rel=0.2)
    assert 0.01 < se < 0.06


def test_a_rare_class_makes_macro_f1_noisier_than_its_accuracy_suggests():
    truth, predicted = _predictions(n=120)
    big_truth, big_predicted = _predictions(n=1200)
    assert noise.macro_f1_se(truth, predicted, 6) > 2 * noise.macro_f1_se(big_truth, big_predicted, 6)


def test_paired_comparison_tells_ties_from_real_differences():
    truth, good = _predictions(accuracy=0.8)
    one_clip = good.copy()
    one_clip[np.flatnonzero(one_clip == truth)[0]] = (truth[np.flatnonzero(one_clip == truth)[0]] + 1) % 6
    _, poor = _predictions(accuracy=0.4, seed=2)
    assert noise.better_with_confidence(truth, good, one_clip, 6) < 0.95  # one clip apart: tied
    assert noise.better_with_confidence(truth, good, good, 6) == 0.5  # identical: a coin flip, never better
    assert noise.better_with_confidence(truth, good, poor, 6) > 0.99


def test_the_trial_reports_the_standard_error_of_the_predictions_it_keeps(separable, tmp_path):
    from conftest import trial_config

    from emotune.trial import TrialContext, run_trial

    corpus, runs = separable
    # no MLflow run: not what is tested
    cfg = trial_config(corpus, runs, "trial.max_epochs=3", "trial.lr=2e-5") | {"tracking": None}
    summary = run_trial(cfg, TrialContext(workdir=tmp_path / "trial", reporter=lambda *_: None, progress=False))
    ids, probs, labels = evaluation.read_predictions(tmp_path / "trial" / "best" / "dev_predictions.csv")
    truth = {row[0]: row[1] for row in (line.split(",") for line in
                                        (corpus / "train.csv").read_text().splitlines()[1:])}
    y_true = [labels.index(truth[i]) for i in ids]
    kept = next(h for h in summary["history"] if h["epoch"] == summary["checkpoint_epoch"])
    assert kept["val_f1_se"] == pytest.approx(noise.macro_f1_se(y_true, probs.argmax(1), len(labels)), abs=1e-6)
    assert kept["val_f1"] == pytest.approx(summary["checkpoint_val_f1"], abs=1e-6)
    assert summary["best_val_score"] == summary["best_val_f1"]  # the default score is the best dev macro-F1 itself
    # a slow learning rate keeps the first evaluation imperfect, so its standard error is not 0
    assert all(h["val_f1_se"] >= 0 for h in summary["history"]) and summary["history"][0]["val_f1_se"] > 0


def test_scores_of_a_curve():
    f1, se = [0.5, 0.7, 0.6, 0.8], [0.02, 0.02, 0.03, 0.04]
    ema = [0.5, 0.6, 0.6, 0.7]
    assert noise.score_values(f1, se, ema, "val_f1") == f1
    assert noise.score_values(f1, se, ema, "val_f1_ema") == ema
    assert noise.score_values(f1, se, ema, "val_f1_lcb") == pytest.approx([0.48, 0.68, 0.57, 0.76])
    assert noise.score_values(f1, se, ema, "val_f1_mean3") == pytest.approx([0.6, 0.6, 0.7, 0.7])


# --- the scheduler ----------------------------------------------------------------------------------------------

def _decide(scheduler, trial_id: str, value: float, se: float, evaluation_count: int = 1) -> str:
    trial = SimpleNamespace(trial_id=trial_id)  # Ray's ASHA reads nothing else of a trial
    if trial_id not in scheduler._trial_info:
        scheduler.on_trial_add(None, trial)
    return scheduler.on_trial_result(None, trial, {"evaluation": evaluation_count, "val_f1": value,
                                                   "val_f1_se": se})


@pytest.mark.parametrize("kind", ["asha", "noise_asha"])
def test_noise_asha_keeps_a_trial_within_noise_that_asha_cuts_and_cuts_one_far_below(kind):
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from emotune.search.algorithms import NoiseASHA

    settings = {"time_attr": "evaluation", "metric": "val_f1", "mode": "max", "max_t": 8, "grace_period": 1,
                "reduction_factor": 2}
    scheduler = NoiseASHA(noise_z=1.0, **settings) if kind == "noise_asha" else ASHAScheduler(**settings)
    assert _decide(scheduler, "leader", 0.80, 0.03) == TrialScheduler.CONTINUE  # the rung's first: no cutoff yet
    close = _decide(scheduler, "close", 0.78, 0.03)  # 0.02 below the cutoff (0.80), within one standard error
    far = _decide(scheduler, "far", 0.60, 0.03)  # far below it
    assert far == TrialScheduler.STOP
    assert close == (TrialScheduler.CONTINUE if kind == "noise_asha" else TrialScheduler.STOP)
    # the rung records the values themselves, so the cutoffs others meet are plain ASHA's
    rung = dict(scheduler._brackets[0]._rungs)[1]
    assert rung == {"leader": 0.80, "close": 0.78, "far": 0.60}


def test_a_search_prints_the_rule_of_its_ladder():
    from emotune.config import load_config
    from emotune.search.algorithms import asha_rungs, ladder_lines, make_scheduler

    cfg = load_config(["search.scheduler=noise_asha", "search.noise_z=1.5"], "search")
    lines = ladder_lines(cfg, asha_rungs(make_scheduler(cfg)))
    assert "1.5 bootstrap standard errors" in lines[0]
    cfg = load_config(["search.scheduler=none"], "search")
    assert asha_rungs(make_scheduler(cfg)) == []
    assert "every trial runs its 40 epochs" in ladder_lines(cfg, [])[0]


# --- the searcher -----------------------------------------------------------------------------------------------

def test_trials_the_scheduler_cut_reach_optuna_as_pruned_with_their_intermediate_values():
    import optuna

    from emotune.config import load_config
    from emotune.search.driver import make_searcher

    cfg = load_config(["space=head", "trial.max_epochs=10"], "search")
    limiter = make_searcher(cfg)
    searcher = limiter.searcher
    searcher.set_search_properties(None, None, {})
    ids = ["cut", "finished", "early", "failed"]
    for trial_id in ids:
        assert searcher.suggest(trial_id) is not None
        for step in (1, 2, 3):
            searcher.on_trial_result(trial_id, {"best_val_score": 0.1 * step, "training_iteration": step,
                                                "evaluation": step})
    # ASHA stopped it at 3 of 10: Tune gives the result that got it stopped to on_trial_complete only
    searcher.on_trial_complete("cut", {"best_val_score": 0.35, "evaluation": 4, "training_iteration": 4})
    searcher.on_trial_complete("finished", {"best_val_score": 0.9, "evaluation": 10, "early_stopped": 0.0})
    searcher.on_trial_complete("early", {"best_val_score": 0.5, "evaluation": 6, "early_stopped": 1.0})
    searcher.on_trial_complete("failed", error=True)  # as Tune tells a trial that failed for good
    study = searcher._ot_study
    trial = {i: study.trials[searcher._ot_trials[i].number] for i in ids}
    state = optuna.trial.TrialState
    assert trial["cut"].state == state.PRUNED
    assert trial["cut"].intermediate_values == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.35})
    assert trial["finished"].state == state.COMPLETE and trial["finished"].value == 0.9
    assert trial["early"].state == state.COMPLETE and trial["early"].value == 0.5  # its own rule ended it
    assert trial["failed"].state == state.FAIL
