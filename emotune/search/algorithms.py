"""The search's two deciders, as Ray classes: the Optuna searcher that proposes trials and the scheduler that
cuts them, each taught one thing Ray's own does not do.

- :class:`PruningAwareOptunaSearch` is Ray's ``OptunaSearch`` telling Optuna the truth about cut trials. Ray's
  builds its study without a pruner, and when a scheduler stops a trial Tune reports the trial's last result as
  its final one, so Optuna records an epoch-5 score as if it were the trial's outcome. Here a trial that stopped
  before its last evaluation, and not by its own early stopping, is told as PRUNED: Optuna keeps its
  intermediate values, and TPE ranks it below the trials that finished, by the last of them.
- :class:`NoiseASHA` is Ray's ``ASHAScheduler`` that does not cut within noise: at a rung it stops a trial only
  when the trial's value is below the rung's cutoff by more than ``noise_z`` of the trial's own bootstrap
  standard errors (``val_f1_se``, which every evaluation reports). What each rung records, and so the cutoffs,
  stay those of plain ASHA.
"""

from __future__ import annotations

import math
import warnings

from ray.tune.schedulers import ASHAScheduler
from ray.tune.schedulers.async_hyperband import _Bracket
from ray.tune.search.optuna import OptunaSearch

from emotune.names import OBJECTIVE, asha_mode

SAMPLERS = ("auto", "random", "qmc", "tpe", "tpe-independent", "gp")
SCHEDULERS = ("asha", "noise_asha", "none")
# search.sampler=auto: random draws, except where the step-16 benchmark (benchmarks/hpo.md) found a model-based
# sampler beating them, paired over seeds with a 95% interval above 0: with three folds, TPE modelling each setting
# alone. On one split and with five folds, random draws did as well or better.
AUTO_SAMPLER = {3: "tpe-independent"}


def resolve_sampler(name: str, folds: int) -> str:
    """The sampler ``search.sampler`` names for a search with ``trial.folds`` = ``folds`` (``auto`` resolved)."""
    return AUTO_SAMPLER.get(int(folds), "random") if name == "auto" else name


def make_sampler(name: str, seed: int, n_startup_trials: int):
    """Optuna's sampler ``name`` (one of :data:`SAMPLERS`), seeded; TPE and GP draw ``n_startup_trials`` at random
    before they model anything."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna flags multivariate/group, QMC and GP as experimental
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "qmc":  # a better-spread random baseline (scrambled Sobol points)
            return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False,
                                              warn_asynchronous_seeding=False)
        if name == "gp":  # noise-aware: deterministic_objective=False, Optuna's default
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials,
                                             warn_independent_sampling=False)
        if name == "tpe-independent":  # Optuna's plain TPE: each setting modelled alone, no liar for running trials
            return optuna.samplers.TPESampler(seed=seed, multivariate=False, constant_liar=False,
                                              n_startup_trials=n_startup_trials)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=n_startup_trials)


class PruningAwareOptunaSearch(OptunaSearch):
    """Ray's ``OptunaSearch``; trials cut by the scheduler reach Optuna as PRUNED (see the module's docstring).

    ``last_step``: the value of ``time_attr`` at a trial's last evaluation (trial.max_epochs x
    trial.evals_per_epoch). Saved and restored with the searcher, as Ray pickles it whole.
    """

    def __init__(self, *args, last_step: int, time_attr: str = "evaluation", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_step, self.time_attr = int(last_step), time_attr

    def was_cut(self, result: dict | None) -> bool:
        """Whether a trial's last result says it stopped early for another reason than its own rule."""
        if not result or self.time_attr not in result:
            return False
        return int(result[self.time_attr]) < self.last_step and not result.get("early_stopped")

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        cut = not error and self.was_cut(result)
        if cut and trial_id not in self._completed_trials:
            # Tune hands the result that got a trial stopped to the scheduler and to this call only, never to
            # on_trial_result: it is the trial's last intermediate value (its only one when the first rung cut it)
            super().on_trial_result(trial_id, result)
        # Ray's OptunaSearch tells a trial without a final value as PRUNED, its intermediate values kept
        super().on_trial_complete(trial_id, None if cut else result, error)


class _NoiseBracket(_Bracket):
    """Ray's ASHA bracket, judging ``value + margin`` against a rung's cutoff and recording ``value``."""

    margin = 0.0  # set per result by NoiseASHA, just before each decision

    def cutoff(self, recorded):
        cut = super().cutoff(recorded)
        return None if cut is None else cut - self.margin


class NoiseASHA(ASHAScheduler):
    """Ray's ``ASHAScheduler`` that cuts a trial only when it is below the rung's cutoff by more than
    ``noise_z`` x its standard error (``se_attr`` in the same result; a result without it is judged as plain
    ASHA judges it). For a minimised metric the margin applies the same way round: the trial must be worse by more
    than the noise."""

    def __init__(self, *args, noise_z: float, se_attr: str = "val_f1_se", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.noise_z, self.se_attr = float(noise_z), se_attr
        for bracket in self._brackets:
            bracket.__class__ = _NoiseBracket  # the same rungs and records; only the cutoff it compares with moves

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        margin = self.noise_z * float(result.get(self.se_attr) or 0.0)
        bracket = self._trial_info.get(trial.trial_id)
        if bracket is None:
            return super().on_trial_result(tune_controller, trial, result)
        bracket.margin = margin
        try:
            return super().on_trial_result(tune_controller, trial, result)
        finally:
            bracket.margin = 0.0


# --- the ladder: ASHA as a search's settings build it ---------------------------------------------------------

def asha_clock(cfg: dict) -> tuple[int, int, int]:
    """ASHA's time unit is the dev evaluation: (evaluations per epoch, grace period and max_t in evaluations)."""
    search, trial = _settings(cfg)
    max_t = trial.max_epochs * trial.evals_per_epoch
    return trial.evals_per_epoch, min(search.grace_period, max_t), max_t


def _settings(cfg: dict):
    """The typed search.* and trial.* settings (checked once more: a scheduler is cheap, a wrong type is not)."""
    from emotune.config import SearchSettings, TrialSettings, typed

    return typed(SearchSettings, cfg["search"], "search"), typed(TrialSettings, cfg["trial"], "trial")


def make_scheduler(cfg: dict):
    """ASHA (search.scheduler: plain, or noise_asha that does not cut within noise) on the trials' own count of
    dev evaluations (``trial.evals_per_epoch`` per epoch): a trial Tune starts again continues its count where its
    checkpoint left it. With search.scheduler=none, a FIFO scheduler: every trial runs to its end."""
    from ray.tune.schedulers import FIFOScheduler

    search, _ = _settings(cfg)
    if search.scheduler == "none":
        return FIFOScheduler()
    _, grace, max_t = asha_clock(cfg)
    metric = search.metric
    kwargs = {"time_attr": "evaluation", "metric": metric, "mode": asha_mode(metric), "max_t": max_t,
              "grace_period": grace, "reduction_factor": search.reduction_factor}
    scheduler = (NoiseASHA(noise_z=search.noise_z, se_attr=_se_of(metric), **kwargs)
                 if search.scheduler == "noise_asha" else ASHAScheduler(**kwargs))
    if search.reproducible:
        from emotune.search.ordered import OrderedASHA

        # a rung at max_t judges nothing that would go on: a trial there ends anyway, it need not wait
        rungs = [r for r in asha_rungs(scheduler) if r < max_t]
        return OrderedASHA(metric, asha_mode(metric), rungs, search.reduction_factor,
                           search.noise_z if search.scheduler == "noise_asha" else 0.0, _se_of(metric))
    return scheduler


def _se_of(metric: str) -> str:
    """The reported standard error that goes with ``metric`` (the best score's own, or the evaluation's)."""
    return "best_val_score_se" if metric == "best_val_score" else "val_f1_se"


def asha_rungs(scheduler) -> list[int]:
    """The evaluations at which Ray's ASHA scheduler compares trials, read from the scheduler itself (its one
    bracket)."""
    # a trial is judged at the first evaluation that reaches a rung's milestone, which is fractional when the
    # reduction factor is (grace 5, factor 1.5: 7.5, judged at 8)
    if hasattr(scheduler, "waiting"):  # OrderedASHA (search.reproducible) keeps its own
        return list(scheduler.rungs)
    brackets = getattr(scheduler, "_brackets", None)  # search.scheduler=none: a FIFO scheduler, no rungs
    return sorted(math.ceil(milestone) for milestone, _ in brackets[0]._rungs) if brackets else []


SAMPLER_WORDS = {"random": "random draws", "qmc": "quasi-random (Sobol) draws", "tpe": "TPE, settings modelled "
                 "jointly", "tpe-independent": "TPE, each setting modelled alone", "gp": "a Gaussian process"}


def proposal_line(cfg: dict) -> str:
    """How trials are proposed, said at the search's start (``search.sampler=auto`` resolved)."""
    search, _ = _settings(cfg)
    folds = int(cfg["trial"]["folds"])
    sampler = resolve_sampler(search.sampler, folds)
    why = f" (search.sampler=auto with trial.folds={folds})" if search.sampler == "auto" else ""
    learns = sampler in ("tpe", "tpe-independent", "gp")
    startup = f", after {search.n_startup_trials} random start-up trials" if learns else ""
    return f"Proposals: {SAMPLER_WORDS[sampler]}{why}{startup}"


def ladder_lines(cfg: dict, rungs: list[int]) -> list[str]:
    """What ASHA will do in this search (``rungs``: :func:`asha_rungs` of its scheduler), said at its start; a
    second line warns when it makes one cut or none. Rungs are in dev evaluations, which are epochs unless
    ``trial.evals_per_epoch`` is above 1."""
    search, _ = _settings(cfg)
    per_epoch, grace, max_t = asha_clock(cfg)
    factor = search.reduction_factor
    unit = "epoch" if per_epoch == 1 else "evaluation"
    if search.scheduler == "none":
        return [f"No scheduler (search.scheduler=none): every trial runs its {max_t} {unit}s, unless its own early "
                "stopping ends it."]
    judged = (f"it judges {search.metric}, {asha_mode(search.metric)}imised, and keeps the best 1/{factor:g} "
              "at each rung")
    if search.scheduler == "noise_asha":
        judged += (f"; a trial below the cutoff is cut only if it is below by more than {search.noise_z:g} "
                   f"bootstrap standard errors ({_se_of(search.metric)}), so none is cut within noise")
    if per_epoch == 1:
        lines = [f"ASHA rungs at epochs {', '.join(map(str, rungs))}; max {max_t} ({judged})"]
    else:
        epochs = ", ".join(f"{r / per_epoch:g}" for r in rungs)
        lines = [f"ASHA rungs at evaluations {', '.join(map(str, rungs))} (epochs {epochs}, at {per_epoch} "
                 f"evaluations per epoch); max {max_t} ({judged})"]
    if search.reproducible:
        lines.append("Reproducible (search.reproducible=true): each trial is judged at a rung against the trials "
                     "proposed before it only; one that arrives first waits, paused, for them.")
        sampler = resolve_sampler(search.sampler, cfg["trial"]["folds"])
        if sampler not in ("random", "qmc") or search.time_budget_s is not None:
            lines.append(f"Warning: with search.sampler={sampler}"
                         f"{'' if search.time_budget_s is None else ' and a time budget'} the trials proposed "
                         "still depend on timing: use search.sampler=random or qmc and no search.time_budget_s for "
                         "identical searches.")
    if search.metric != OBJECTIVE:
        lines.append(f"ASHA judges {search.metric} (search.metric) while the trials are ranked, and the sampler "
                     f"learns, by the objective {OBJECTIVE} (the best of trial.select_by): a deliberate choice; "
                     f"search.metric={OBJECTIVE} makes them one.")
    cuts = [r for r in rungs if r < max_t]  # a rung at max_t stops nothing that would go on
    fix = "lower search.grace_period or search.reduction_factor, or raise trial.max_epochs"
    if not cuts:
        lines.append(f"Warning: ASHA never stops a trial: search.grace_period={grace} reaches the trial's "
                     f"last {unit} ({max_t}). To prune, {fix}.")
    elif len(cuts) == 1:
        lines.append(f"Warning: ASHA has a single rung ({unit} {cuts[0]}): the next would be at {unit} "
                     f"{cuts[0] * factor:g}, past the trial's last ({max_t}). It makes one cut, judging each trial "
                     f"against whichever trials reached {unit} {cuts[0]} before it. For a ladder, {fix}.")
    return lines
