"""Benchmark: does the search earn its compute? Samplers, schedulers and ranking scores replayed on a recorded pool.

1. Record once (``record``): at least 150 configurations drawn at random from ``space=encoders`` are trained
   without pruning or early stopping to ``trial.max_epochs``, on a demo corpus whose dev split holds 300+ clips.
   Every dev evaluation keeps dev macro-F1, its bootstrap standard error (``val_f1_se``), the EMA, dev loss, the
   per-clip dev and test predictions, the wall time and the test macro-F1. Two trials train at a time, in
   processes of their own, with the project's own Trainer (no Ray: nothing is decided during recording).
   Written to ``runs/hpo-pool.jsonl`` as it goes (a stopped recording continues where it was), then to
   ``benchmarks/hpo-pool.json.gz``.
2. Replay (``replay``): every method runs many seeded searches in process through Ray's real searcher and
   scheduler classes (``emotune.search.driver.make_searcher`` / ``emotune.search.algorithms.make_scheduler``, so
   what ships is what is measured) and Optuna's real samplers. A proposal is mapped to the nearest recorded
   configuration (numeric settings normalised to [0, 1], log-scaled ones on their log, categorical ones exact); two
   slots run at a time, and time advances by the recorded seconds of each evaluation.
3. Report: benchmarks/hpo.md, benchmarks/hpo.json and benchmarks/hpo.png.

    python scripts/bench_hpo.py record               # about 60 min on 2 cores
    python scripts/bench_hpo.py replay --seeds 50    # the tables, from benchmarks/hpo-pool.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from _bench import BENCH_DIR, ROOT, RUNS_DIR, record_pool

POOL_FILE = BENCH_DIR / "hpo-pool.json.gz"
PARTIAL = RUNS_DIR / "hpo-pool.jsonl"
# a demo corpus whose dev split holds 300+ clips (MEACorpus's dev is about 650); the default demo has about 115
CORPUS = ["data.demo.clips=1600", "data.dev_fraction=0.25", f"data.root={RUNS_DIR}/demo-corpus-1600"]


def pool_config(extra: list[str] = ()) -> dict:
    from emotune.config import load_config

    return load_config([f"paths.runs_dir={RUNS_DIR}", "space=encoders", *CORPUS, "trial.early_stop=null",
                        *extra], "search")


def draw_configurations(cfg: dict, count: int, seed: int) -> list[dict]:
    """``count`` configurations of the space, drawn uniformly (Optuna's RandomSampler on the space's own
    define-by-run function), the space's known-good point first."""
    import optuna

    from emotune.search.space import DefineByRun, points_to_evaluate

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    sample = DefineByRun(cfg["space"], cfg)
    drawn = points_to_evaluate(cfg["space"], cfg)[:1]
    while len(drawn) < count:
        trial = study.ask()
        sample(trial)
        drawn.append(dict(trial.params))
        study.tell(trial, 0.0)
    return drawn


def _record_one(job: tuple[int, dict, dict]) -> dict:
    """Train configuration ``index`` to max_epochs in this process and keep every evaluation."""
    import torch

    from emotune import evaluation, noise
    from emotune.search.space import apply_sampled
    from emotune.trial import Trainer, TrialContext, predict

    index, sampled, base = job
    torch.set_num_threads(1)
    cfg = apply_sampled(base, sampled)
    cfg["tracking"] = None  # nothing to record in MLflow: the pool file is the record

    class Recorder(Trainer):
        def _epoch(self):
            n = len(self.labels)
            test_true = [self.labels.index(u.label) for u in self.corpus.test]
            for metrics, dev_probs, improved in super()._epoch():
                started = time.perf_counter()
                test_probs = predict(self.model, self.source, self.corpus.test, self.lengths,
                                     self.settings.eval_batch_size, self.device)
                dev_pred, test_pred = dev_probs.argmax(1), test_probs.argmax(1)
                rows.append({"evaluation": metrics["evaluation"], "val_f1": metrics["val_f1"],
                             "val_f1_se": noise.macro_f1_se(self.dev_true, dev_pred, n),
                             "val_f1_ema": metrics["val_f1_ema"], "val_loss": metrics["val_loss"],
                             "seconds": metrics["epoch_seconds"],  # training and the dev evaluation, not the test
                             "test_f1": evaluation.macro_f1(test_true, test_pred, n),
                             "dev_pred": "".join(map(str, dev_pred)), "test_pred": "".join(map(str, test_pred))})
                rows[-1]["test_seconds"] = time.perf_counter() - started
                yield metrics, dev_probs, improved

        def _save_best(self, dev_probs):  # every evaluation's predictions are kept above instead
            return None

    rows: list[dict] = []
    started = time.perf_counter()
    trainer = Recorder(cfg, TrialContext(progress=False, cpus=1))
    trainer.fit()
    return {"index": index, "config": sampled, "rows": rows, "setup_seconds": trainer.setup_seconds,
            "wall_seconds": time.perf_counter() - started}


def record(args) -> None:
    """Train the pool, two at a time, appending each finished configuration to runs/hpo-pool.jsonl."""

    from emotune.data.prepare import prepare_corpus
    from emotune.features.prepare import prepare_features
    from emotune.search.space import encoders_in_play

    base = pool_config([f"trial.max_epochs={args.epochs}", f"seed={args.seed}"])
    configurations = draw_configurations(base, args.configs, args.seed)
    corpus = prepare_corpus(base["data"], base["paths"]["runs_dir"])
    # every encoder's cache filled once, here, before the workers read it
    for modality, names in encoders_in_play(base).items():
        for name in names:
            prepare_features(corpus, base["encoders"] | {modality: name}, base["features"], [modality],
                             base["paths"])
    done = {}
    if PARTIAL.is_file():
        for line in PARTIAL.read_text().splitlines():
            entry = json.loads(line)
            if entry["config"] == configurations[entry["index"]] and len(entry["rows"]) == args.epochs:
                done[entry["index"]] = entry
    todo = [(i, c, base) for i, c in enumerate(configurations) if i not in done]
    print(f"recording {len(todo)} configurations ({len(done)} already in {PARTIAL}); dev {len(corpus.dev)} clips, "
          f"test {len(corpus.test)}", flush=True)
    started = time.perf_counter()
    done |= record_pool(_record_one, todo, PARTIAL, args.workers, "dev")
    labels = corpus.labels
    dev_counts = {label: sum(u.label == label for u in corpus.dev) for label in labels}
    pool = {"overrides": CORPUS + [f"trial.max_epochs={args.epochs}", "trial.early_stop=null", f"seed={args.seed}"],
            "labels": labels, "dev_true": "".join(str(labels.index(u.label)) for u in corpus.dev),
            "test_true": "".join(str(labels.index(u.label)) for u in corpus.test), "dev_counts": dev_counts,
            "record_seconds": time.perf_counter() - started,
            "space": base["space"]["params"], "trials": [done[i] for i in sorted(done)]}
    with gzip.open(POOL_FILE, "wt") as f:
        json.dump(pool, f)
    print(f"written: {POOL_FILE} ({len(done)} configurations)")



# --- the recorded pool, as arrays -------------------------------------------------------------------------------

class Pool:
    """The recorded configurations as arrays: ``f1[i, t]`` is configuration i's dev macro-F1 at evaluation t+1."""

    def __init__(self, data: dict) -> None:
        trials = data["trials"]
        self.data, self.configs = data, [t["config"] for t in trials]
        self.labels, self.space = data["labels"], data["space"]
        self.dev_true = np.array([int(c) for c in data["dev_true"]])
        self.test_true = np.array([int(c) for c in data["test_true"]])

        def grid(key: str) -> np.ndarray:
            return np.array([[row[key] for row in t["rows"]] for t in trials], dtype=np.float64)

        self.f1, self.se, self.ema, self.loss = grid("val_f1"), grid("val_f1_se"), grid("val_f1_ema"), grid("val_loss")
        self.test_f1, self.seconds = grid("test_f1"), grid("seconds")
        self.setup = np.array([t["setup_seconds"] for t in trials])
        self.test_pred = np.array([[[int(c) for c in row["test_pred"]] for row in t["rows"]] for t in trials],
                                  dtype=np.int8)
        self.size, self.max_t = self.f1.shape
        self._numeric = self._normalised()

    @classmethod
    def load(cls, partial: bool = False) -> "Pool":
        if partial:  # a recording under way: what runs/hpo-pool.jsonl holds so far (for a first look only)
            base = pool_config([])
            trials = [json.loads(line) for line in PARTIAL.read_text().splitlines()]
            from emotune.data.prepare import prepare_corpus

            corpus = prepare_corpus(base["data"], base["paths"]["runs_dir"], progress=False)
            labels = corpus.labels
            return cls({"labels": labels, "space": base["space"]["params"], "trials": trials,
                        "dev_true": "".join(str(labels.index(u.label)) for u in corpus.dev),
                        "test_true": "".join(str(labels.index(u.label)) for u in corpus.test),
                        "dev_counts": {}})
        with gzip.open(POOL_FILE, "rt") as f:
            return cls(json.load(f))

    def _normalised(self) -> dict[str, np.ndarray]:
        """Each numeric parameter of every configuration scaled to [0, 1] over its range (log-scaled on its log)."""
        out = {}
        for key, spec in self.space.items():
            if "choice" in spec:
                continue
            low, high = (float(v) for v in (spec.get("float") or spec.get("int")))
            values = np.array([float(c[key]) for c in self.configs])
            if spec.get("log"):
                low, high, values = np.log(low), np.log(high), np.log(values)
            out[key] = (values - low) / max(high - low, 1e-12)
        return out

    def nearest(self, proposal: dict, taken: set[int] = frozenset()) -> int:
        """The recorded configuration closest to ``proposal``: categorical settings equal, numeric ones nearest,
        among those not ``taken`` yet in this search when one is left.

        Two trials of a real search never have exactly the same settings, and even close settings train apart; two
        trials on one recorded curve would tie at every ASHA rung (a tie is never cut) and vote as one in an ensemble.
        """
        candidates = np.ones(self.size, dtype=bool)
        for key, spec in self.space.items():
            if "choice" in spec:
                candidates &= np.array([c[key] == proposal[key] for c in self.configs])
        distance = np.zeros(self.size)
        for key, values in self._numeric.items():
            spec = self.space[key]
            low, high = (float(v) for v in (spec.get("float") or spec.get("int")))
            value = float(proposal[key])
            if spec.get("log"):
                low, high, value = np.log(low), np.log(high), np.log(value)
            distance += ((values - (value - low) / max(high - low, 1e-12)) ** 2)
        distance[~candidates] = np.inf
        free = distance.copy()
        free[list(taken)] = np.inf
        return int(np.argmin(free if np.isfinite(free).any() else distance))

    def trial_seconds(self) -> np.ndarray:
        return self.setup + self.seconds.sum(axis=1)


class Scores:
    """A ranking score over the pool, as the trial computes it: its value at each evaluation (from the evaluations so
    far), the best value so far and the evaluation (0-based) of the checkpoint the best points to."""

    def __init__(self, pool: Pool, name: str) -> None:
        from emotune.noise import score_values

        self.name = name
        value = np.empty_like(pool.f1)
        for i in range(pool.size):
            for t in range(pool.max_t):  # the trial knows the evaluations up to t only
                value[i, t] = score_values(pool.f1[i, : t + 1], pool.se[i, : t + 1], pool.ema[i, : t + 1], name)[-1]
        self.value = value
        self.best = np.maximum.accumulate(value, axis=1)
        checkpoint = np.zeros_like(value, dtype=np.int64)
        for t in range(1, pool.max_t):  # a new checkpoint only on a strict improvement, as the trial saves it
            better = value[:, t] > self.best[:, t - 1]
            checkpoint[:, t] = np.where(better, t, checkpoint[:, t - 1])
        self.checkpoint = checkpoint


def spearman(a, b) -> float:
    def ranks(x):
        return np.argsort(np.argsort(np.asarray(x), kind="stable"), kind="stable").astype(float)

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


CANDIDATE_SCORES = ("val_f1", "val_f1_ema", "val_f1_mean3", "val_f1_lcb")


def score_study(pool: Pool, draws: int = 2000, size: int = 20, seed: int = 0) -> dict:
    """Each candidate ranking score against test: rank correlation over the pool at max_t (all trials, and the top
    half by the score), and the test regret of picking a trial by it among ``size`` random trials."""
    rng = np.random.default_rng(seed)
    subsets = [rng.choice(pool.size, size=size, replace=False) for _ in range(draws)]
    last = pool.max_t - 1
    resamples = [rng.choice(pool.size, size=pool.size, replace=True) for _ in range(500)]  # trials, for the CIs
    out = {}
    candidates = {name: None for name in CANDIDATE_SCORES}
    # the centred mean of three around the best, with the checkpoint in the middle: a trial cannot know it when it
    # saves (it needs the next evaluation), measured to see what waiting one evaluation would buy
    for name in candidates:
        scores = Scores(pool, name)
        value = scores.best[:, last]
        test = pool.test_f1[np.arange(pool.size), scores.checkpoint[:, last]]
        top = value >= np.median(value)
        picked = [test[s[np.argmax(value[s])]] for s in subsets]
        best_test = [test[s].max() for s in subsets]
        resampled = [spearman(value[r], test[r]) for r in resamples]
        out[name] = {"rank_corr": spearman(value, test), "rank_corr_ci": [float(np.percentile(resampled, 2.5)),
                                                                           float(np.percentile(resampled, 97.5))],
                     "rank_corr_top_half": spearman(value[top], test[top]),
                     "pick_test_f1": float(np.mean(picked)), "pick_regret": float(np.mean(np.subtract(best_test,
                                                                                                     picked))),
                     "checkpoint_test_f1": float(test.mean())}
    centred = np.array([[np.mean(pool.f1[i, max(0, t - 1): t + 2]) for t in range(pool.max_t)]
                        for i in range(pool.size)])
    where = centred.argmax(axis=1)
    value, test = centred.max(axis=1), pool.test_f1[np.arange(pool.size), where]
    top = value >= np.median(value)
    picked = [test[s[np.argmax(value[s])]] for s in subsets]
    resampled = [spearman(value[r], test[r]) for r in resamples]
    out["val_f1_mean3_centred"] = {"rank_corr": spearman(value, test),
                                   "rank_corr_ci": [float(np.percentile(resampled, 2.5)),
                                                    float(np.percentile(resampled, 97.5))],
                                   "rank_corr_top_half": spearman(value[top], test[top]),
                                   "pick_test_f1": float(np.mean(picked)),
                                   "pick_regret": float(np.mean([test[s].max() for s in subsets]) - np.mean(picked)),
                                   "checkpoint_test_f1": float(test.mean())}
    return out



# --- replaying searches ---------------------------------------------------------------------------------------

class Method:
    """One way to search: config overrides of ``emotune.search`` (so the searcher and scheduler are what ships),
    or ``shipped_before``: the searcher as it was in earlier versions (Ray's plain OptunaSearch learning best_val_f1,
    every cut trial told as COMPLETE with its early value)."""

    def __init__(self, name: str, overrides: list[str], shipped_before: bool = False, note: str = "") -> None:
        self.name, self.overrides, self.shipped_before, self.note = name, overrides, shipped_before, note
        self._cfg = None

    def config(self, seed: int) -> dict:
        import copy

        if self._cfg is None:
            self._cfg = pool_config(self.overrides)
        cfg = copy.deepcopy(self._cfg)
        cfg["search"]["sampler_seed"] = seed
        return cfg

    def searcher(self, cfg: dict):
        from emotune.search.driver import make_searcher

        if not self.shipped_before:
            return make_searcher(cfg)
        import warnings

        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        from emotune.search.algorithms import make_sampler
        from emotune.search.space import DefineByRun, points_to_evaluate

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            searcher = OptunaSearch(space=DefineByRun(cfg["space"], cfg), metric="best_val_f1", mode="max",
                                    sampler=make_sampler("tpe", int(cfg["search"]["sampler_seed"]),
                                                         int(cfg["search"]["n_startup_trials"])),
                                    points_to_evaluate=points_to_evaluate(cfg["space"], cfg) or None)
        return ConcurrencyLimiter(searcher, max_concurrent=int(cfg["search"]["max_concurrent"]))


def _result(pool: Pool, scores: Scores, index: int, evaluation: int) -> dict:
    """What the recorded trial ``index`` reported at ``evaluation`` (1-based), as a trial reports it to Tune."""
    t = evaluation - 1
    row = {"evaluation": evaluation, "training_iteration": evaluation, "val_f1": pool.f1[index, t],
           "val_f1_se": pool.se[index, t], "val_f1_ema": pool.ema[index, t], "val_loss": pool.loss[index, t],
           "best_val_f1": pool.f1[index, : evaluation].max(), "val_score": scores.value[index, t],
           "best_val_score": scores.best[index, t], "best_val_score_se": pool.se[index, scores.checkpoint[index, t]]}
    if evaluation == pool.max_t:
        row["early_stopped"] = 0.0
    return row


def replay_search(pool: Pool, method: Method, seed: int, budget: float, scores_of: dict) -> dict:
    """One search of ``method``, seeded, for ``budget`` seconds of recorded time on two slots, through the real
    searcher (Ray's OptunaSearch and Optuna's sampler) and scheduler (Ray's ASHA, emotune's NoiseASHA or FIFO).

    Returns every report as (time, trial number, pool index, evaluation) and how each trial ended."""
    import heapq
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from emotune.search.algorithms import make_scheduler

    cfg = method.config(seed)
    scores = scores_of[cfg["trial"]["select_by"]]
    searcher, scheduler = method.searcher(cfg), make_scheduler(cfg)
    searcher.set_search_properties(None, None, {})
    slots = int(cfg["search"]["max_concurrent"])
    trials: list[dict] = []
    events: list[tuple[float, int]] = []
    reports: list[tuple[float, int, int, int]] = []

    def start(now: float) -> None:
        if now >= budget:  # as search.time_budget_s: no new trial after the budget, running ones finish
            return
        number = len(trials)
        proposal = searcher.suggest(str(number))
        if not isinstance(proposal, dict):
            return
        index = pool.nearest(proposal, {t["index"] for t in trials})
        trials.append({"index": index, "done": 0, "object": SimpleNamespace(trial_id=str(number)), "end": None})
        scheduler.on_trial_add(None, trials[-1]["object"])
        heapq.heappush(events, (now + pool.setup[index] + pool.seconds[index, 0], number))

    for _ in range(slots):
        start(0.0)
    while events:
        now, number = heapq.heappop(events)
        trial = trials[number]
        trial["done"] += 1
        evaluation, index = trial["done"], trial["index"]
        result = _result(pool, scores, index, evaluation)
        reports.append((now, number, index, evaluation))
        decision = scheduler.on_trial_result(None, trial["object"], result)
        if decision != TrialScheduler.STOP:  # as Tune does: a result that stops the trial goes to on_trial_complete
            searcher.on_trial_result(str(number), result)
        if decision == TrialScheduler.STOP or evaluation >= pool.max_t:
            scheduler.on_trial_complete(None, trial["object"], result)
            searcher.on_trial_complete(str(number), result)
            trial["end"] = now
            start(now)
        else:
            heapq.heappush(events, (now + pool.seconds[index, evaluation], number))
    return {"reports": reports, "trials": [(t["index"], t["done"]) for t in trials],
            "select_by": cfg["trial"]["select_by"]}


def state_at(pool: Pool, scores: Scores, replay: dict, seconds: float) -> dict:
    """What a search knows ``seconds`` into its replay: each trial's evaluations so far, the trial its ranking
    score selects, that trial's test F1, the k = 3 hard-vote ensemble's test F1 and the best dev F1 seen."""
    from emotune.selection.ensemble import hard_vote

    done: dict[int, tuple[int, int]] = {}
    best_dev = 0.0
    for time_, number, index, evaluation in replay["reports"]:
        if time_ > seconds:
            break
        done[number] = (index, evaluation)
        best_dev = max(best_dev, pool.f1[index, evaluation - 1])
    if not done:
        return {"trials": 0}
    ranked = sorted(done, key=lambda n: (-scores.best[done[n][0], done[n][1] - 1], n))
    checkpoints = [(done[n][0], scores.checkpoint[done[n][0], done[n][1] - 1]) for n in ranked]
    single = pool.test_f1[checkpoints[0]]
    from emotune.evaluation import macro_f1

    members = [np.eye(len(pool.labels))[pool.test_pred[i, t]] for i, t in checkpoints[:3]]
    ensemble = macro_f1(pool.test_true, hard_vote(members), len(pool.labels))
    return {"trials": len(done), "selected_test_f1": float(single), "ensemble_test_f1": float(ensemble),
            "best_dev_f1": float(best_dev), "selected_dev_f1": float(pool.f1[checkpoints[0]])}


def time_to_reach(pool: Pool, replay: dict, target: float) -> float | None:
    """When the replay first reported a dev macro-F1 of at least ``target``."""
    for time_, _, index, evaluation in replay["reports"]:
        if pool.f1[index, evaluation - 1] >= target - 1e-12:
            return time_
    return None


# what earlier versions shipped: plain ASHA on best_val_f1 at grace 5, reduction factor 2; trials ranked by best_val_f1
OLD = ["search.scheduler=asha", "search.metric=best_val_f1", "search.grace_period=5", "search.reduction_factor=2",
       "trial.select_by=val_f1", "search.n_startup_trials=10"]


def methods(score: str, scheduler: list[str], startup: int) -> list[Method]:
    """The baselines, and each new part alone on top of TPE + ASHA as shipped before (``scheduler``: the overrides of
    the scheduler the survival goal chose; the new default itself is added by :func:`benchmark`)."""
    label = " ".join(o.split("=", 1)[1] for o in scheduler if o.startswith(("search.scheduler", "search.noise_z")))
    return [
        Method("random", ["search.sampler=random", "search.scheduler=none", "trial.select_by=val_f1"],
               note="random search, no pruning"),
        Method("random+asha", ["search.sampler=random", *OLD], note="random search, ASHA as shipped"),
        Method("tpe+asha (before)", ["search.sampler=tpe", *OLD], shipped_before=True,
               note="TPE + ASHA, the earlier default"),
        Method("+ pruned told", ["search.sampler=tpe", *OLD], note="cut trials reach Optuna as PRUNED"),
        Method(f"+ startup {startup}", ["search.sampler=tpe", *OLD, f"search.n_startup_trials={startup}"],
               shipped_before=True, note=f"TPE models after {startup} trials instead of 10"),
        Method(f"+ {label}", ["search.sampler=tpe", *OLD, *scheduler], shipped_before=True,
               note="the survival goal's scheduler: " + ", ".join(scheduler)),
        *([] if score == "val_f1" else [  # the old score chosen again: its row would repeat TPE + ASHA's
            Method(f"+ score {score}", ["search.sampler=tpe", *OLD, f"trial.select_by={score}"], shipped_before=True,
                   note="trials ranked (and checkpoints kept) by the chosen score")]),
        Method("+ qmc", ["search.sampler=qmc", *OLD], note="Optuna's QMCSampler instead of TPE"),
    ]


def run_methods(pool: Pool, chosen: list[Method], seeds: list[int], budget: float) -> dict:
    scores_of = {name: Scores(pool, name) for name in CANDIDATE_SCORES}
    out = {}
    for method in chosen:
        started = time.perf_counter()
        rows = []
        for seed in seeds:
            replay = replay_search(pool, method, seed, budget, scores_of)
            scores = scores_of[replay["select_by"]]
            row = {f"at{int(share * 100)}": state_at(pool, scores, replay, share * budget)
                   for share in (0.25, 0.5, 1.0)}
            row["replay"] = replay
            evaluations = sum(done for _, done in replay["trials"])
            row["trials"], row["epoch_share"] = (len(replay["trials"]),
                                                 evaluations / (len(replay["trials"]) * pool.max_t))
            rows.append(row)
        out[method.name] = rows
        print(f"{method.name:22s} {len(seeds)} seeds in {time.perf_counter() - started:.0f} s: trials "
              f"{np.mean([r['trials'] for r in rows]):.1f}, selected test F1 "
              f"{np.mean([r['at100']['selected_test_f1'] for r in rows]):.4f}, k=3 "
              f"{np.mean([r['at100']['ensemble_test_f1'] for r in rows]):.4f}, best dev "
              f"{np.mean([r['at100']['best_dev_f1'] for r in rows]):.4f}", flush=True)
    return out


class FixedOrder:
    """A searcher that proposes given pool configurations in a given order (the scheduler study's arrivals)."""

    def __init__(self, pool: Pool, order: list[int]) -> None:
        self.pool, self.order = pool, list(order)

    def set_search_properties(self, *_args) -> bool:
        return True

    def suggest(self, trial_id: str):
        return self.pool.configs[self.order[int(trial_id)]] if int(trial_id) < len(self.order) else None

    def on_trial_result(self, *_args) -> None:
        return None

    def on_trial_complete(self, *_args, **_kwargs) -> None:
        return None


def scheduler_study(pool: Pool, settings: dict[str, list[str]], draws: int, size: int, seed: int,
                    scores_of: dict) -> dict:
    """Each scheduler setting on the same ``draws`` random pools of ``size`` recorded trials (paired), two at a
    time: how often the pool's best trial on test reaches the last evaluation, the share of evaluations run, and
    the test regret of the trial the ranking score then selects."""
    rng = np.random.default_rng(seed)
    orders = [rng.choice(pool.size, size=size, replace=False).tolist() for _ in range(draws)]
    out = {}
    for name, overrides in settings.items():
        method = Method(name, overrides)
        cfg = method.config(0)
        scores = scores_of[cfg["trial"]["select_by"]]
        final_test = pool.test_f1[np.arange(pool.size), scores.checkpoint[:, -1]]
        rows = []
        for order in orders:
            method.searcher = lambda _cfg, order=order: FixedOrder(pool, order)
            replay = replay_search(pool, method, 0, float("inf"), scores_of)
            reached = {i: done for i, done in replay["trials"]}
            best = max(order, key=lambda i: final_test[i])
            selected = max(order, key=lambda i: scores.best[i, reached[i] - 1])
            selected_test = pool.test_f1[selected, scores.checkpoint[selected, reached[selected] - 1]]
            rows.append({"survives": reached[best] >= pool.max_t, "regret": float(final_test[best] - selected_test),
                         "epoch_share": sum(reached.values()) / (size * pool.max_t)})
        out[name] = {"survival": float(np.mean([r["survives"] for r in rows])),
                     "regret": float(np.mean([r["regret"] for r in rows])),
                     "epoch_share": float(np.mean([r["epoch_share"] for r in rows])), "overrides": overrides}
        print(f"{name:40s} best-on-test survives {out[name]['survival']:.0%}, epochs {out[name]['epoch_share']:.0%}, "
              f"test regret {out[name]['regret']:.4f}", flush=True)
    return out


def scheduler_settings(score: str) -> dict[str, list[str]]:
    """No pruning, plain ASHA and NoiseASHA over grace periods, reduction factors and noise_z. ASHA judges the
    best ranking score so far (``best_val_score``), and also ``best_val_f1`` when the score is another one."""
    grid = {"no pruning": ["search.scheduler=none", f"trial.select_by={score}"]}
    metrics = ("best_val_score",) if score == "val_f1" else ("best_val_f1", "best_val_score")
    for grace, factor in ((3, 2), (3, 3), (5, 2), (5, 3), (5, 4), (10, 2), (10, 3)):
        for metric in metrics:
            base = [f"search.grace_period={grace}", f"search.reduction_factor={factor}", f"search.metric={metric}",
                    f"trial.select_by={score}"]
            grid[f"asha {metric} {grace}/{factor}"] = ["search.scheduler=asha", *base]
            for z in (0.5, 0.75, 1.0, 1.5):
                grid[f"noise_asha z={z:g} {metric} {grace}/{factor}"] = ["search.scheduler=noise_asha",
                                                                          f"search.noise_z={z}", *base]
    return grid


def ci95(values) -> tuple[float, float, float]:
    """Mean and its 95% confidence interval (normal approximation over seeds)."""
    values = np.asarray(list(values), dtype=np.float64)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


def time_ratios(pool: Pool, rows: list[dict], random_rows: list[dict], budget: float) -> list[float]:
    """Per seed: the time a method took to report random search's final best dev macro-F1, over random's own time
    to it; a method that never reached it counts as budget / random's time (at least 1)."""
    ratios = []
    for row, base in zip(rows, random_rows):
        target = base["at100"]["best_dev_f1"]
        mine, theirs = time_to_reach(pool, row["replay"], target), time_to_reach(pool, base["replay"], target)
        ratios.append(mine / theirs if mine is not None and mine <= budget else max(1.0, budget / theirs))
    return ratios


def curve_of(pool: Pool, rows: list[dict], scores_of: dict, budget: float, grid: np.ndarray) -> np.ndarray:
    """The selected trial's test F1 against the share of the budget, averaged over seeds."""
    values = []
    for row in rows:
        scores = scores_of[row["replay"]["select_by"]]
        values.append([state_at(pool, scores, row["replay"], g * budget).get("selected_test_f1", np.nan) for g in grid])
    return np.nanmean(np.array(values, dtype=float), axis=0)


def plot(curves: dict[str, np.ndarray], grid: np.ndarray, path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=110)
    for name, curve in curves.items():
        bold = name in ("random", "tpe+asha (before)", "new default")
        ax.plot(grid * 100, curve, lw=2.2 if bold else 1, alpha=1 if bold else 0.6, label=name,
                ls="-" if bold else "--")
    ax.set_xlabel(f"share of the budget (%; 100% = {budget:.0f} s of recorded training on two slots)")
    ax.set_ylabel("test macro-F1 of the selected trial")
    ax.set_title("Mean over seeds of the trial each method would pick at that point", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


GOAL_SURVIVAL, GOAL_SHARE = 0.75, 0.50
SHIPPED_ASHA = "asha shipped before (best_val_f1 5/2)"


def choose_scheduler(results: dict) -> tuple[str, str]:
    """The scheduler setting to ship: the cheapest meeting the goal, else the one keeping the best-on-test trial most
    often within the epoch goal."""
    meeting = {k: r for k, r in results.items() if r["survival"] >= GOAL_SURVIVAL and r["epoch_share"] <= GOAL_SHARE}
    if meeting:
        key = min(meeting, key=lambda k: (meeting[k]["epoch_share"], meeting[k]["regret"]))
        return key, "meets the goal with the fewest epochs"
    within = {k: r for k, r in results.items() if r["epoch_share"] <= GOAL_SHARE}
    key = max(within, key=lambda k: (within[k]["survival"], -within[k]["regret"]))
    return key, (f"no setting meets the goal (>= {GOAL_SURVIVAL:.0%} survival on <= {GOAL_SHARE:.0%} of the epochs); "
                 f"this one keeps the best-on-test trial most often within {GOAL_SHARE:.0%} of the epochs")


def choose_default(combos: list[Method], results: dict) -> tuple[Method, str]:
    """The sampler and scheduler to ship: the best combination with a model-free sampler (random, qmc) by the
    selected trial's test F1, unless one with a model-based sampler (tpe, gp) beats it with a paired 95% CI above 0
    on the seeds both ran. Model-based samplers cost proposal time, and on a noisy dev split they can chase what
    looked good by chance: they must show it."""
    def selected(method: Method, count: int) -> list[float]:
        return [r["at100"]["selected_test_f1"] for r in results[method.name][:count]]

    free = [m for m in combos if any(o in m.overrides for o in ("search.sampler=random", "search.sampler=qmc"))]
    base = max(free, key=lambda m: np.mean(selected(m, len(results[m.name]))))
    best, why = base, (f"{base.name}: the best combination with a model-free sampler, and none with a "
                       "model-based one beat it with confidence")
    for method in combos:
        if method in free:
            continue
        count = min(len(results[method.name]), len(results[base.name]))
        gain = ci95(np.subtract(selected(method, count), selected(base, count)))
        if gain[1] > 0 and (best is base or gain[0] > 0):
            best, why = method, f"{method.name} beat {base.name} by {gain[0]:+.4f} [{gain[1]:+.4f}, {gain[2]:+.4f}]"
    return best, why


def benchmark(args) -> None:
    """Record-free part of the benchmark: choose the defaults on selection seeds, then measure every method on report
    seeds, and write benchmarks/hpo.{md,json,png}."""
    started = time.perf_counter()
    pool = Pool.load(args.partial)
    scores_of = {name: Scores(pool, name) for name in CANDIDATE_SCORES}
    study = score_study(pool)
    score = max(CANDIDATE_SCORES, key=lambda n: study[n]["pick_test_f1"])
    print(f"ranking score: {score}", flush=True)
    settings = scheduler_settings(score) | {SHIPPED_ASHA: ["search.scheduler=asha", *OLD]}
    schedulers = scheduler_study(pool, settings, args.draws, 24, 0, scores_of)
    noise_key, noise_why = choose_scheduler(schedulers)
    noise = [o for o in schedulers[noise_key]["overrides"] if not o.startswith("trial.select_by")]
    print(f"scheduler by the survival goal: {noise_key} ({noise_why})", flush=True)

    # the default is chosen end to end, on searches replayed with seeds the report does not use: every sampler with
    # the scheduler the survival goal chose, plain ASHA as shipped, and no pruning
    budget = float(np.mean(pool.trial_seconds())) * args.budget_trials / 2
    selection_seeds = list(range(1000, 1000 + args.selection_seeds))
    asha = [o for o in OLD if not o.startswith(("trial.select_by", "search.n_startup_trials"))]
    scheduler_options = {noise_key: noise, SHIPPED_ASHA: asha, "no pruning": ["search.scheduler=none"]}
    samplers = {f"tpe startup {n}": ["search.sampler=tpe", f"search.n_startup_trials={n}"] for n in (5, 10)}
    samplers |= {"qmc": ["search.sampler=qmc"], "random": ["search.sampler=random"]}
    combos = [Method(f"{sampler} + {key}", [*sampler_overrides, *overrides, f"trial.select_by={score}"])
              for sampler, sampler_overrides in samplers.items() for key, overrides in scheduler_options.items()]
    print(f"choosing the default on {len(selection_seeds)} selection seeds ({budget:.0f} s budget)", flush=True)
    chosen = run_methods(pool, combos, selection_seeds, budget)
    gp = Method(f"gp startup 5 + {SHIPPED_ASHA}", ["search.sampler=gp", "search.n_startup_trials=5", *asha,
                                                    f"trial.select_by={score}"])
    chosen |= run_methods(pool, [gp], selection_seeds[: args.gp_seeds], budget)
    combos.append(gp)
    pick, sampler_why = choose_default(combos, chosen)
    scheduler_key = next(key for key in scheduler_options if pick.name.endswith(key))
    default = Method("new default", pick.overrides, note=f"{pick.name}, ranked by {score}")
    print(f"new default: {pick.name}", flush=True)

    seeds = list(range(args.seeds))
    compared = methods(score, noise, 5)
    compared.insert(3, default)
    runs = run_methods(pool, compared, seeds, budget)
    runs |= run_methods(pool, [Method("+ gp", ["search.sampler=gp", *OLD])], seeds[: args.gp_seeds], budget)
    compared.append(Method("+ gp", ["search.sampler=gp", *OLD], note="Optuna's GPSampler instead of TPE"))
    write_report(pool, study, score, schedulers, scheduler_key, noise_key, noise_why, chosen, combos, pick,
                 sampler_why, compared, runs, scores_of, budget, args, time.perf_counter() - started)


def write_report(pool, study, score, schedulers, scheduler_key, noise_key, noise_why, chosen, combos, pick,
                 sampler_why, compared, runs, scores_of, budget, args, seconds) -> None:
    from _bench import write

    random_rows = runs["random"]
    table = []
    for method in compared:
        rows = runs[method.name]
        paired = random_rows[: len(rows)]
        gain = ci95(r["at100"]["selected_test_f1"] - b["at100"]["selected_test_f1"] for r, b in zip(rows, paired))
        ratio = ci95(time_ratios(pool, rows, paired, budget))
        versus = runs["new default"][: len(rows)]
        against_default = ci95(r["at100"]["selected_test_f1"] - b["at100"]["selected_test_f1"]
                               for r, b in zip(rows, versus))
        table.append({"name": method.name, "note": method.note, "seeds": len(rows),
                      "trials": float(np.mean([r["trials"] for r in rows])),
                      "epoch_share": float(np.mean([r["epoch_share"] for r in rows])),
                      **{f"selected_{k}": ci95(r[k]["selected_test_f1"] for r in rows)
                         for k in ("at25", "at50", "at100")},
                      **{f"ensemble_{k}": ci95(r[k]["ensemble_test_f1"] for r in rows)
                         for k in ("at25", "at50", "at100")},
                      "best_dev": ci95(r["at100"]["best_dev_f1"] for r in rows), "gain_vs_random": gain,
                      "versus_default": against_default,
                      "time_ratio": ratio})
    by_name = {row["name"]: row for row in table}
    new = by_name["new default"]
    dev_counts = pool.data.get("dev_counts") or {}
    default_se = default_size_se(pool)
    mine = schedulers[scheduler_key]  # the default's scheduler
    noisy = schedulers[noise_key]  # the setting the survival goal chose
    fmt = lambda c: f"{c[0]:.4f} [{c[1]:.4f}, {c[2]:.4f}]"  # noqa: E731
    lines = [
        "# Does the search earn its compute? Samplers, schedulers and ranking scores on a recorded pool", "",
        f"**Pool**: {pool.size} configurations drawn at random from `space=encoders`, each trained without pruning or "
        f"early stopping for {pool.max_t} epochs on a larger demo corpus (`{' '.join(CORPUS[:2])}`): dev "
        f"{len(pool.dev_true)} clips, test {len(pool.test_true)}; the "
        f"rarest dev class has {min(dev_counts.values()) if dev_counts else '?'} clips. Recorded in "
        f"{pool.data.get('record_seconds', 0) / 60:.0f} min on 2 cores (`python scripts/bench_hpo.py record`).",
        "",
        f"**Noise**: the mean bootstrap standard error of a trial's dev macro-F1 (`val_f1_se`) is "
        f"{pool.se.mean():.4f} on this dev split ({len(pool.dev_true)} clips), and {default_se['se']:.4f} on a dev "
        f"split of the default demo's size ({default_se['clips']} clips, {default_se['rarest']} in its rarest class; "
        "measured on stratified subsets of this one). Final best dev F1 spans "
        f"{pool.f1.max(axis=1).min():.3f} to {pool.f1.max(axis=1).max():.3f}.", "",
        "## Ranking scores: which one holds on test", "",
        "Each score's best value over a trial's 40 evaluations, against the test macro-F1 of the checkpoint it points "
        "to. Spearman's rank correlation over the whole pool and over its better half; and the test F1 of the trial "
        "the score picks from 20 random trials of the pool (2,000 draws), the choice that matters in a search.", "",
        "| score | rank corr., all [95% CI] | rank corr., better half | test F1 of the pick | "
        "mean checkpoint test F1 |",
        "|---|---|---|---|---|"]
    for name, row in study.items():
        mark = (" **(chosen)**" if name == score
                else (" (not causal: measured only)" if name.endswith("centred") else ""))
        lines.append(f"| `{name}`{mark} | {row['rank_corr']:.3f} [{row['rank_corr_ci'][0]:.3f}, "
                     f"{row['rank_corr_ci'][1]:.3f}] | {row['rank_corr_top_half']:.3f} | "
                     f"{row['pick_test_f1']:.4f} | {row['checkpoint_test_f1']:.4f} |")
    lines += ["", "Chosen: the score whose pick scores best on test. `val_f1_mean3` is the mean of an evaluation and "
              "its neighbours as a trial can know it (the last two); `val_f1_mean3_centred` waits for the next "
              "evaluation.",
              "", "## Schedulers: survival of the best trial on test", "",
              f"{args.draws} random pools of 24 recorded trials (paired across settings), two at a time, through Ray's "
              "ASHAScheduler or emotune's NoiseASHA (`emotune.search.algorithms.make_scheduler`). Survival: the pool's "
              "best trial on test reaches the last evaluation. Test regret: that trial's test F1 minus the test F1 of "
              f"the trial the score selects. Goal: survival >= {GOAL_SURVIVAL:.0%} on <= {GOAL_SHARE:.0%} of the "
              "epochs, with at most half of plain ASHA's regret at the same epoch share.", "",
              "| setting (metric, grace/reduction factor) | best-on-test survives | epochs | test regret |",
              "|---|---|---|---|"]
    for name in sorted(schedulers, key=lambda k: (-schedulers[k]["survival"], schedulers[k]["epoch_share"])):
        r = schedulers[name]
        marks = [m for m, hit in (("the default", name == scheduler_key),
                                  ("the survival goal's choice", name == noise_key),
                                  ("shipped before", name == SHIPPED_ASHA)) if hit]
        mark = f" **({', '.join(marks)})**" if marks else ""
        lines.append(f"| {name}{mark} | {r['survival']:.0%} | {r['epoch_share']:.0%} | {r['regret']:.4f} |")
    def regret_ratio_of(entry: dict) -> tuple[float, str]:
        nearest = min((k for k in schedulers if k.startswith("asha ")),
                      key=lambda k: abs(schedulers[k]["epoch_share"] - entry["epoch_share"]))
        return entry["regret"] / max(schedulers[nearest]["regret"], 1e-9), nearest

    regret_ratio, nearest_plain = regret_ratio_of(mine)
    noisy_ratio, noisy_nearest = regret_ratio_of(noisy)
    lines += ["", f"The survival goal's choice: **{noise_key}** ({noise_why}). Against plain ASHA nearest in epoch "
              f"share ({noisy_nearest}, {schedulers[noisy_nearest]['epoch_share']:.0%} of the epochs), its test regret "
              f"is {noisy_ratio:.2f} x ({noisy['regret']:.4f} against {schedulers[noisy_nearest]['regret']:.4f}). "
              "Whether keeping the best trial alive helps a whole search is measured below, end to end.",
              "", "## The default: sampler and scheduler chosen end to end, on separate seeds", "",
              f"Every sampler with three schedulers (the survival goal's choice, plain ASHA as shipped, none) ran "
              f"{args.selection_seeds} replayed searches on seeds 1000+ (GP: {args.gp_seeds}, with plain ASHA only, as "
              "each of its proposals takes a second or more). The rule: the best combination with a model-free sampler "
              "(random, qmc) by the selected trial's test F1 at the full budget, unless one with a model-based sampler "
              "(tpe, gp) beats it with a paired 95% CI above 0 on the seeds both ran. The tables further down use "
              "other seeds.", "",
              "| sampler + scheduler | test F1 of the selected trial | k = 3 ensemble |", "|---|---|---|"]
    for method in combos:
        rows = chosen[method.name]
        mark = " **(chosen)**" if method is pick else ""
        lines.append(f"| {method.name}{mark} | {fmt(ci95(r['at100']['selected_test_f1'] for r in rows))} | "
                     f"{fmt(ci95(r['at100']['ensemble_test_f1'] for r in rows))} |")
    lines += ["", f"Chosen: {sampler_why}.", "", "## Searches replayed: every method, paired over seeds", "",
              f"Each method ran {args.seeds} searches (seeds 0-{args.seeds - 1}; GP {args.gp_seeds}) of {budget:.0f} s "
              f"of recorded training time on two slots (the time of {args.budget_trials:g} full trials), through the "
              "real searcher and scheduler classes; a proposal trains as the nearest recorded configuration. Test F1 "
              "of the trial the method's ranking selects, and of the hard-vote ensemble of its 3 best, at 25%, 50% "
              "and 100% of the budget; mean [95% CI].", "",
              "| method | trials | epochs | selected, 25% | selected, 50% | selected, 100% | "
              "k=3, 25% | k=3, 50% | k=3, 100% |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['name']} | {row['trials']:.1f} | {row['epoch_share']:.0%} | "
                     + " | ".join(f"{row[f'selected_{k}'][0]:.4f}" for k in ("at25", "at50", "at100")) + " | "
                     + " | ".join(f"{row[f'ensemble_{k}'][0]:.4f}" for k in ("at25", "at50", "at100")) + " |")
    lines += ["", "| method | what it is | selected test F1 minus random's (paired) | "
              "minus the new default's (paired) | time to random's best dev F1 / random's | best dev F1 |",
              "|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['name']} | {row['note']} | {fmt(row['gain_vs_random'])} | {fmt(row['versus_default'])} | "
                     f"{fmt(row['time_ratio'])} | {row['best_dev'][0]:.4f} |")
    goals = [("the new default's selected trial beats random's on test (paired 95% CI above 0)",
              new["gain_vs_random"][1] > 0, f"{fmt(new['gain_vs_random'])}"),
             ("time to random's final best dev F1 <= 0.5 of random's", new["time_ratio"][0] <= 0.5,
              f"{new['time_ratio'][0]:.2f}"),
             (f"the best-on-test trial survives the default scheduler >= {GOAL_SURVIVAL:.0%} on <= {GOAL_SHARE:.0%} "
              "of the epochs", mine["survival"] >= GOAL_SURVIVAL and mine["epoch_share"] <= GOAL_SHARE,
              f"{mine['survival']:.0%} on {mine['epoch_share']:.0%} ({noise_key}: {noisy['survival']:.0%} on "
              f"{noisy['epoch_share']:.0%})"),
             ("test regret <= half of plain ASHA's at the same epoch share", regret_ratio <= 0.5,
              f"{regret_ratio:.2f} ({noise_key}: {noisy_ratio:.2f})")]
    lines += ["", "## Goals", "", "| goal | met | measured |", "|---|---|---|"]
    lines += [f"| {goal} | {'yes' if met else 'no'} | {value} |" for goal, met, value in goals]
    grid = np.linspace(0.1, 1.0, 10)
    curves = {m.name: curve_of(pool, runs[m.name], scores_of, budget, grid) for m in compared}
    plot(curves, grid, BENCH_DIR / "hpo.png", budget)
    lines += ["", "![test F1 of the selected trial against the budget](hpo.png)", "",
              "Confirmed with real Ray searches on the default demo corpus, the default against random search: "
              "[search-hpo.md](search-hpo.md) (`python scripts/bench_search.py --seeds 0 1 2 3 4 --budget 150 "
              "--methods default random --out search-hpo`).", "",
              f"Replays and report took {seconds / 60:.1f} min. Command: `python scripts/bench_hpo.py report --seeds "
              f"{args.seeds} --selection-seeds {args.selection_seeds} --gp-seeds {args.gp_seeds} --draws {args.draws} "
              f"--budget-trials {args.budget_trials:g}`."]
    data = {"pool_size": pool.size, "seeds": args.seeds, "dev_clips": len(pool.dev_true),
            "test_f1_gain_vs_random": new["gain_vs_random"][0], "test_f1_gain_ci_low": new["gain_vs_random"][1],
            "time_to_random_best_ratio": new["time_ratio"][0], "best_survival": mine["survival"],
            "epoch_share": mine["epoch_share"], "regret_ratio_vs_asha": regret_ratio,
            "noise_asha": {"setting": noise_key, "best_survival": noisy["survival"],
                           "epoch_share": noisy["epoch_share"], "regret_ratio_vs_asha": noisy_ratio},
            "rank_corr_default_score": study[score]["rank_corr"], "rank_corr_best_val_f1": study["val_f1"]["rank_corr"],
            "mean_val_f1_se": float(pool.se.mean()), "mean_val_f1_se_default_demo": default_se["se"],
            "rarest_dev_class": min(dev_counts.values()) if dev_counts else None,
            "budget_seconds": budget, "chosen": {"score": score, "scheduler": scheduler_key, "default": pick.name,
                                                 "overrides": pick.overrides},
            "scores": study, "schedulers": schedulers, "methods": table}
    write("hpo", data, lines)


def default_size_se(pool: Pool, draws: int = 20, seed: int = 0) -> dict:
    """The mean val_f1_se on a dev split of the default demo corpus's size and class counts, from stratified subsets
    of this pool's dev predictions at each trial's last evaluation."""
    from emotune.data.demo import class_counts
    from emotune.noise import macro_f1_se

    share = 0.16 * (1 - 0.2)  # the default dev_fraction of the training side (the test share is 20%)
    counts = {label: max(1, round(n * share)) for label, n in class_counts(900).items()}
    by_class = {i: np.flatnonzero(pool.dev_true == i) for i in range(len(pool.labels))}
    rng = np.random.default_rng(seed)
    values = []
    data = [t for t in pool.data["trials"]]
    for _ in range(draws):
        subset = np.concatenate([rng.choice(by_class[pool.labels.index(label)], size=min(n, len(by_class[
            pool.labels.index(label)])), replace=False) for label, n in counts.items()])
        for trial in data[:: max(1, len(data) // 20)]:
            predicted = np.array([int(c) for c in trial["rows"][-1]["dev_pred"]])
            values.append(macro_f1_se(pool.dev_true[subset], predicted[subset], len(pool.labels)))
    return {"se": float(np.mean(values)), "clips": int(sum(counts.values())), "rarest": int(min(counts.values()))}

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="train the pool (about 60 min on 2 cores)")
    rec.add_argument("--configs", type=int, default=160, help="configurations (default 160)")
    rec.add_argument("--epochs", type=int, default=40, help="epochs each (default 40, the default max_epochs)")
    rec.add_argument("--workers", type=int, default=2, help="configurations trained at a time (default 2)")
    rec.add_argument("--seed", type=int, default=0, help="seed of the draws and of the trials (default 0)")
    cv = sub.add_parser("record-cv", help=f"train the {5}-fold pool (hours on 2 cores; resumable)")
    cv.add_argument("--configs", type=int, default=100, help="configurations (default 100)")
    cv.add_argument("--epochs", type=int, default=40, help="epochs each (default 40, the default max_epochs)")
    cv.add_argument("--workers", type=int, default=2, help="configurations trained at a time (default 2)")
    cv.add_argument("--seed", type=int, default=0, help="seed of the draws, the folds and the trials (default 0)")
    rcv = sub.add_parser("replay-cv", help="replay single-split and K-fold searches on the K-fold pool; writes the "
                         "step-16 section of benchmarks/hpo.md and its keys in hpo.json")
    rcv.add_argument("--partial", action="store_true", help="use the recording under way (runs/hpo-cv-pool.jsonl)")
    rcv.add_argument("--seeds", type=int, default=50, help="reported searches per arm (default 50)")
    rcv.add_argument("--selection-seeds", type=int, default=30, help="searches per arm that choose the default")
    rcv.add_argument("--samplers", nargs="*", default=["random", "tpe", "tpe-independent", "tpe-startup20", "gp"],
                     help="Optuna samplers to replay (default: random, tpe, tpe-independent, tpe-startup20, gp)")
    rcv.add_argument("--gp-seeds", type=int, default=10, help="seeds for GP (with ASHA only), whose proposals take "
                     "about a second each (default 10)")
    rcv.add_argument("--gp-arms", nargs="*", default=["k3", "k5"], help="objectives GP is replayed on (default k3 "
                     "k5: on the single split a search has about 80 trials and a GP replay took 4 min)")
    rcv.add_argument("--workers", type=int, default=2, help="replays at a time (default 2)")
    look = sub.add_parser("scores", help="the ranking scores against test on the pool")
    look.add_argument("--partial", action="store_true", help="use the recording under way (runs/hpo-pool.jsonl)")
    run = sub.add_parser("replay", help="replay the methods' searches on the pool and write the report")
    run.add_argument("--partial", action="store_true", help="use the recording under way (runs/hpo-pool.jsonl)")
    run.add_argument("--seeds", type=int, default=50, help="searches per method (default 50)")
    run.add_argument("--budget-trials", type=float, default=30, help="the budget, in full-length trials' time on two "
                     "slots (default 30)")
    run.add_argument("--methods", nargs="*", help="only these methods (names as in the table)")
    run.add_argument("--score", default="val_f1", help="the new default's ranking score")
    run.add_argument("--z", type=float, default=1.0, help="the new default's noise_z")
    run.add_argument("--startup", type=int, default=5, help="the new default's n_startup_trials")
    study = sub.add_parser("schedulers", help="the scheduler settings on random pools of recorded trials")
    study.add_argument("--partial", action="store_true", help="use the recording under way (runs/hpo-pool.jsonl)")
    study.add_argument("--draws", type=int, default=200, help="pools per setting (default 200)")
    study.add_argument("--size", type=int, default=24, help="trials per pool (default 24)")
    study.add_argument("--score", default="val_f1", help="the ranking score that selects (default val_f1)")
    full = sub.add_parser("report", help="the whole benchmark from the recorded pool: writes benchmarks/hpo.*")
    full.add_argument("--partial", action="store_true", help="use the recording under way (runs/hpo-pool.jsonl)")
    full.add_argument("--seeds", type=int, default=50, help="replayed searches per method (default 50)")
    full.add_argument("--selection-seeds", type=int, default=30, help="seeds that choose the sampler (default 30)")
    full.add_argument("--gp-seeds", type=int, default=10, help="seeds for GPSampler, whose proposals are slow "
                      "(default 10)")
    full.add_argument("--draws", type=int, default=200, help="pools per scheduler setting (default 200)")
    full.add_argument("--budget-trials", type=float, default=30, help="the budget, in full-length trials' time on "
                      "two slots (default 30)")
    args = parser.parse_args()
    if args.command == "report":
        benchmark(args)
    if args.command == "schedulers":
        pool = Pool.load(args.partial)
        scheduler_study(pool, scheduler_settings(args.score), args.draws, args.size, 0,
                        {name: Scores(pool, name) for name in CANDIDATE_SCORES})
    if args.command == "replay":
        pool = Pool.load(args.partial)
        budget = float(np.mean(pool.trial_seconds())) * args.budget_trials / 2
        scheduler = ["search.scheduler=noise_asha", f"search.noise_z={args.z}", "search.metric=best_val_score"]
        chosen = [m for m in methods(args.score, scheduler, args.startup) if not args.methods or m.name in args.methods]
        print(f"pool {pool.size} configurations; budget {budget:.0f} s of recorded time", flush=True)
        run_methods(pool, chosen, list(range(args.seeds)), budget)
    if args.command == "record":
        record(args)
    if args.command == "replay-cv":
        import bench_cv

        bench_cv.replay_report(args)
    if args.command == "record-cv":
        import bench_cv

        bench_cv.record(args, pool_config, draw_configurations)
    elif args.command == "scores":
        pool = Pool.load(args.partial)
        for name, row in score_study(pool).items():
            print(f"{name:24s}", "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")  # Optuna's experimental-feature notices, once per sampler and seed
    sys.exit(main())
