"""Search set-up on real Optuna (through Ray's OptunaSearch): the known-good point first, seeded proposals, and
search-space mistakes that explain themselves."""

from __future__ import annotations

import pytest

from emotune.config import load_config
from emotune.errors import EmotuneError
from emotune.search.algorithms import proposal_line
from emotune.search.driver import make_searcher
from emotune.search.space import validate_space


def made_up_f1(config: dict) -> float:
    """A score with a clear optimum, so that TPE's proposals depend on what it has seen."""
    return 1.0 - abs(config["model.dropout"] - 0.2) - abs(config["trial.lr"] - 1e-3) * 100


def proposals(cfg: dict, n: int) -> list[dict]:
    """``n`` proposals of the search's searcher, each completed with its score before the next is asked."""
    searcher = make_searcher(cfg)
    searcher.set_search_properties(metric=None, mode=None, config={})
    out = []
    for i in range(n):
        config = searcher.suggest(f"t{i}")
        out.append(config)
        searcher.on_trial_complete(f"t{i}", {"best_val_score": made_up_f1(config)})  # what the searcher learns
    return out


def smoke_cfg(*overrides: str) -> dict:
    # four parameters, one of them conditional; few start-up trials so that TPE itself proposes within the test
    return load_config(["space=smoke", "search.max_concurrent=1", *overrides], "search")


@pytest.mark.parametrize("sampler", ["tpe", "tpe-independent", "random", "qmc", "gp"])
def test_the_known_good_point_comes_first_and_the_same_seed_proposes_the_same_search(sampler):
    cfg = smoke_cfg("search.sampler_seed=3", f"search.sampler={sampler}")
    first = proposals(cfg, 14)  # TPE's (and GP's) 10 random start-up proposals, then 4 from its model
    assert first[0] == {"model.family": "attention", "model.hidden_layers": 2, "model.dropout": 0.1,
                        "trial.lr": 1e-3}  # the space's points_to_evaluate
    assert proposals(cfg, 14) == first
    other = proposals(smoke_cfg("search.sampler_seed=4", f"search.sampler={sampler}"), 14)
    assert other[0] == first[0] and other[1:] != first[1:]
    sampler_class = type(make_searcher(cfg).searcher._ot_study.sampler).__name__
    assert sampler_class == {"tpe": "TPESampler", "tpe-independent": "TPESampler", "random": "RandomSampler",
                             "qmc": "QMCSampler", "gp": "GPSampler"}[sampler]


@pytest.mark.parametrize("folds, expected", [(1, "RandomSampler"), (3, "TPESampler"), (5, "RandomSampler")])
def test_auto_is_what_the_benchmark_chose_for_the_number_of_folds(folds, expected):
    cfg = smoke_cfg(f"trial.folds={folds}")
    assert cfg["search"]["sampler"] == "auto"
    sampler = make_searcher(cfg).searcher._ot_study.sampler
    assert type(sampler).__name__ == expected
    if folds == 3:  # Optuna's plain TPE: each setting alone, no constant liar
        assert not sampler._multivariate and not sampler._constant_liar
    words = "TPE, each setting modelled alone" if folds == 3 else "random draws"
    assert proposal_line(cfg) == f"Proposals: {words} (search.sampler=auto with trial.folds={folds})" + (
        ", after 10 random start-up trials" if folds == 3 else "")


@pytest.mark.parametrize("params, expected", [
    ({}, r"search space 'bad' has no parameters: add a `params:` mapping"),
    ({"model.droput": {"float": [0, 0.5]}}, r"parameter 'model.droput' is not a configuration key\. Keys that exist: "
                                           r".*model\.dropout"),
    ({"model.dropout": [0.1, 0.2]}, r"'model.dropout' needs a mapping such as \{choice: \[\.\.\.\]\}"),
    ({"model.dropout": {"float": [0, 0.5], "choice": [0.1]}}, r"'model.dropout' must have exactly one of"),
    ({"model.dropout": {"float": [0.5, 0.1]}}, r"'model.dropout' float needs \[low, high\] with low <= high"),
    ({"trial.lr": {"float": [0, 0.1], "log": True}}, r"'trial.lr' is log-scaled, so its low bound must be positive"),
    ({"model.hidden_layers": {"int": [0, 2], "when": {"model.kind": "attention"}}},
     r"'model.hidden_layers' depends on 'model.kind', which is neither an earlier parameter nor a configuration key"),
    ({"encoders.speech": {"choice": []}}, r"'encoders.speech' choice needs a non-empty list"),
])
def test_search_space_mistakes_name_the_parameter_and_the_fix(params, expected):
    cfg = load_config(["space=smoke"], "search")
    with pytest.raises(EmotuneError, match=expected):
        validate_space({"name": "bad", "params": params}, cfg)


def test_a_known_good_point_outside_the_space_is_refused():
    cfg = smoke_cfg()
    cfg["space"]["points_to_evaluate"] = [{"model.family": "transformer", "trial.lr": 1e-3}]
    with pytest.raises(EmotuneError, match=r"points_to_evaluate sets model.family='transformer', which is not one "
                                           r"of its choices \['attention', 'cognicic'\]"):
        make_searcher(cfg)
    cfg["space"]["points_to_evaluate"] = [{"model.width": 64}]
    with pytest.raises(EmotuneError, match=r"points_to_evaluate names \['model.width'\], which are not parameters"):
        make_searcher(cfg)


@pytest.mark.parametrize("overrides, rungs, head, warning", [
    (["search.grace_period=15", "search.reduction_factor=3"], [15], "at epochs 15; max 40", "single rung (epoch 15)"),
    (["search.grace_period=5", "search.reduction_factor=3"], [5, 15], "at epochs 5, 15; max 40", None),
    ([], [5, 10, 20, 40], "at epochs 5, 10, 20, 40; max 40", None),  # the shipped default
    (["search.grace_period=3", "search.reduction_factor=2", "trial.max_epochs=60"], [3, 6, 12, 24, 48],
     "at epochs 3, 6, 12, 24, 48; max 60", None),
    (["search.grace_period=40", "search.reduction_factor=3"], [40], "at epochs 40; max 40", "never stops a trial"),
    # ASHA's clock counts dev evaluations: at 4 per epoch, grace 6 is one and a half epochs
    (["trial.evals_per_epoch=4", "search.grace_period=6", "search.reduction_factor=3", "trial.max_epochs=20"],
     [6, 18, 54], "at evaluations 6, 18, 54 (epochs 1.5, 4.5, 13.5, at 4 evaluations per epoch); max 80", None),
    (["trial.evals_per_epoch=2", "search.grace_period=30", "search.reduction_factor=3"], [30],
     "at evaluations 30 (epochs 15, at 2 evaluations per epoch); max 80", "single rung (evaluation 30)"),
])
def test_the_printed_asha_ladder_is_rays_own_and_a_single_cut_warns(overrides, rungs, head, warning):
    from ray.tune.schedulers import ASHAScheduler

    from emotune.search.algorithms import asha_rungs, ladder_lines, make_scheduler

    cfg = load_config(overrides, "search")
    search, trial = cfg["search"], cfg["trial"]
    ray_own = ASHAScheduler(time_attr="evaluation", metric="val_f1", mode="max",
                            max_t=trial["max_epochs"] * trial["evals_per_epoch"],
                            grace_period=search["grace_period"], reduction_factor=search["reduction_factor"])
    lines = ladder_lines(cfg, asha_rungs(make_scheduler(cfg)))
    assert sorted(m for m, _ in ray_own._brackets[0]._rungs) == rungs
    assert lines[0].startswith(f"ASHA rungs {head} ")
    assert (len(lines) == 2 and warning in lines[1]) if warning else len(lines) == 1


@pytest.mark.parametrize("grace, factor", [(5, 1.5), (5, 2), (3, 1.7)])
def test_the_printed_rungs_are_the_evaluations_at_which_ray_judges(grace, factor):
    from types import SimpleNamespace

    from emotune.search.algorithms import asha_rungs, make_scheduler

    cfg = load_config([f"search.grace_period={grace}", f"search.reduction_factor={factor}"], "search")
    scheduler = make_scheduler(cfg)
    trial = SimpleNamespace(trial_id="only")  # all Ray's scheduler reads of a trial is its id
    scheduler.on_trial_add(None, trial)
    judged = []
    last = cfg["trial"]["max_epochs"]
    for evaluation in range(1, last + 1):  # one report per evaluation, as trials send them; Tune ends it at the last
        before = sum(len(recorded) for _, recorded in scheduler._brackets[0]._rungs)
        result = {"evaluation": evaluation, "best_val_f1": 0.5, "best_val_score": 0.5}
        (scheduler.on_trial_complete if evaluation == last else scheduler.on_trial_result)(None, trial, result)
        if sum(len(recorded) for _, recorded in scheduler._brackets[0]._rungs) > before:
            judged.append(evaluation)  # a rung recorded the trial: Ray judged it at this evaluation
    assert asha_rungs(scheduler) == judged


def test_asha_judging_val_loss_cuts_the_trial_with_the_higher_loss():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from emotune.search.algorithms import make_scheduler

    scheduler = make_scheduler(smoke_cfg("search.metric=val_loss", "search.reduction_factor=2"))
    decisions = {}
    for name, loss in (("first", 0.5), ("worse", 0.9), ("better", 0.3)):  # each reaches the epoch-1 rung in turn
        trial = SimpleNamespace(trial_id=name)  # all Ray's scheduler reads of a trial is its id
        scheduler.on_trial_add(None, trial)
        decisions[name] = scheduler.on_trial_result(None, trial, {"evaluation": 1, "val_loss": loss,
                                                                               "val_f1": 0.5})
    assert decisions == {"first": TrialScheduler.CONTINUE, "worse": TrialScheduler.STOP,
                         "better": TrialScheduler.CONTINUE}


def test_the_shipped_asha_defaults_are_the_ones_the_benchmark_chose():
    import json
    from pathlib import Path

    chosen = json.loads((Path(__file__).parents[1] / "benchmarks" / "asha.json").read_text())["defaults"]
    cfg = load_config([], "search")
    metric = cfg["search"]["metric"]
    if metric == "best_val_score" and cfg["trial"]["select_by"] == "val_f1":
        metric = "best_val_f1"  # the objective: with select_by=val_f1 it is best_val_f1, value for value
    assert chosen == {"metric": metric, "grace_period": cfg["search"]["grace_period"],
                      "reduction_factor": cfg["search"]["reduction_factor"], "max_epochs": cfg["trial"]["max_epochs"]}


def test_the_private_parts_of_ray_and_optuna_emotune_relies_on_are_still_there():
    """emotune reaches into Ray's ASHA (NoiseASHA, the printed rungs) and Ray's OptunaSearch (cut trials told as
    PRUNED); a release that renames them must fail here, by name, not deep inside a search."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.search.optuna import OptunaSearch

    scheduler = ASHAScheduler(time_attr="evaluation", metric="m", mode="max", max_t=8, grace_period=1)
    missing = [name for name, present in [
        ("ASHAScheduler._brackets", hasattr(scheduler, "_brackets")),
        ("ASHAScheduler._trial_info", hasattr(scheduler, "_trial_info")),
        ("_Bracket._rungs (milestone, recorded) pairs",
         hasattr(scheduler, "_brackets") and all(len(rung) == 2 for rung in scheduler._brackets[0]._rungs)),
        ("_Bracket.cutoff(recorded)", callable(getattr(_Bracket, "cutoff", None))),
        ("_Bracket.on_result(trial, cur_iter, cur_rew)", callable(getattr(_Bracket, "on_result", None))),
        ("OptunaSearch._completed_trials", "_completed_trials" in vars(OptunaSearch(metric="m", mode="max"))),
    ] if not present]
    assert not missing, f"Ray changed private parts emotune.search.algorithms uses: {', '.join(missing)}"


def test_a_search_saved_with_random_draws_resumes_under_auto_where_auto_is_random(tmp_path):
    import json

    from emotune.search.resume import check_same_settings

    saved = smoke_cfg("search.sampler=random")
    (tmp_path / "emotune_config.json").write_text(json.dumps(saved))
    check_same_settings(smoke_cfg(), tmp_path, restore=True)  # auto with one split: random draws, as saved
    with pytest.raises(EmotuneError, match="search.sampler: 'random' -> 'auto'"):
        check_same_settings(smoke_cfg("trial.folds=3"), tmp_path, restore=True)  # auto is TPE there
