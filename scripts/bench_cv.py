"""The K-fold pool: every configuration trained as a 5-fold trial, each evaluation's out-of-fold and test
predictions kept, so that single-split, fewer-fold and K-fold searches can all be replayed on one recording.

Called by ``python scripts/bench_hpo.py record-cv``. Each configuration is one ``trial.folds=5`` trial of the
project's own Trainer (no Ray: nothing is decided during recording), trained without pruning or early stopping to
``trial.max_epochs``. Per evaluation it keeps the out-of-fold predicted class of every labelled clip and, per head,
its test predictions; the class probabilities (out of fold, and each head's on test) go to one compressed file per
configuration, quantised to 1/255, so that bags and ensembles can average probabilities. A configuration is
appended to ``runs/hpo-cv-pool.jsonl`` when it finishes: a stopped recording continues where it was.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from _bench import BENCH_DIR, RUNS_DIR, record_pool

FOLDS = 5
PARTIAL = RUNS_DIR / "hpo-cv-pool.jsonl"
PROBS_DIR = RUNS_DIR / "hpo-cv-pool"
POOL_FILE = BENCH_DIR / "hpo-cv-pool.json.gz"


def _digits(values) -> str:
    return "".join(map(str, values))


def _record_one(job: tuple[int, dict, dict]) -> dict:
    """Train configuration ``index`` as a K-fold trial to max_epochs in this process, keeping every evaluation."""
    import torch

    from emotune import evaluation
    from emotune.search.space import apply_sampled
    from emotune.trial import Trainer, TrialContext, predict

    index, sampled, base = job
    torch.set_num_threads(1)
    cfg = apply_sampled(base, sampled)
    cfg["tracking"] = None  # nothing to record in MLflow: the pool file is the record
    rows: list[dict] = []
    oof_probs: list[np.ndarray] = []
    test_probs: list[np.ndarray] = []

    class Recorder(Trainer):
        def _epoch(self):
            n = len(self.labels)
            test_true = [self.labels.index(u.label) for u in self.corpus.test]
            for metrics, dev_probs, improved in super()._epoch():
                started = time.perf_counter()
                per_head = np.stack([predict(head, self.source, self.corpus.test, self.lengths,
                                             self.settings.eval_batch_size, self.device) for head in self.heads])
                bag = per_head.mean(0).argmax(1)
                rows.append({"evaluation": metrics["evaluation"], "val_f1": metrics["val_f1"],
                             "val_f1_se": metrics["val_f1_se"], "val_loss": metrics["val_loss"],
                             "seconds": metrics["epoch_seconds"], "test_seconds": time.perf_counter() - started,
                             "test_f1": evaluation.macro_f1(test_true, bag, n),
                             "oof_pred": _digits(dev_probs.argmax(1)),
                             "test_pred": [_digits(p.argmax(1)) for p in per_head], "bag_pred": _digits(bag)})
                oof_probs.append(np.round(dev_probs * 255).astype(np.uint8))
                test_probs.append(np.round(per_head * 255).astype(np.uint8))
                yield metrics, dev_probs, improved

        def _save_best(self, dev_probs):  # every evaluation's predictions are kept above instead
            return None

    started = time.perf_counter()
    trainer = Recorder(cfg, TrialContext(progress=False, cpus=1))
    trainer.fit()
    PROBS_DIR.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(PROBS_DIR / f"config-{index:03d}.npz", oof=np.stack(oof_probs), test=np.stack(test_probs))
    return {"index": index, "config": sampled, "rows": rows, "setup_seconds": trainer.setup_seconds,
            "wall_seconds": time.perf_counter() - started}


def record(args, pool_config, draw_configurations) -> None:
    """Train the K-fold pool, ``args.workers`` configurations at a time, appending each as it finishes."""
    import gzip

    from emotune.data.folds import trial_folds
    from emotune.data.prepare import prepare_corpus
    from emotune.features.prepare import prepare_features
    from emotune.search.space import encoders_in_play

    base = pool_config([f"trial.max_epochs={args.epochs}", f"seed={args.seed}", f"trial.folds={FOLDS}"])
    configurations = draw_configurations(base, args.configs, args.seed)
    corpus = prepare_corpus(base["data"], base["paths"]["runs_dir"])
    for modality, names in encoders_in_play(base).items():  # every encoder's cache filled (or extended) once, here
        for name in names:
            prepare_features(corpus, base["encoders"] | {modality: name}, base["features"], [modality],
                             base["paths"])
    folds = trial_folds(corpus.train, corpus.dev, FOLDS, int(base["data"]["fold_seed"]), by_group=False)
    done = {}
    if PARTIAL.is_file():
        for line in PARTIAL.read_text().splitlines():
            entry = json.loads(line)
            whole = len(entry["rows"]) == args.epochs and (PROBS_DIR / f"config-{entry['index']:03d}.npz").is_file()
            if entry["index"] < len(configurations) and entry["config"] == configurations[entry["index"]] and whole:
                done[entry["index"]] = entry
    todo = [(i, c, base) for i, c in enumerate(configurations) if i not in done]
    print(f"recording {len(todo)} {FOLDS}-fold configurations ({len(done)} already in {PARTIAL}); labelled "
          f"{len(folds.clips)} clips, test {len(corpus.test)}", flush=True)
    done |= record_pool(_record_one, todo, PARTIAL, args.workers, "out-of-fold")
    labels = corpus.labels
    pool = {"overrides": base_overrides(args), "labels": labels, "folds": FOLDS,
            "fold": _digits(folds.fold_of()[u.id] for u in folds.clips),
            "oof_true": _digits(labels.index(u.label) for u in folds.clips),
            "test_true": _digits(labels.index(u.label) for u in corpus.test),
            "record_seconds": sum(t["wall_seconds"] for t in done.values()),
            "space": base["space"]["params"], "trials": [done[i] for i in sorted(done)]}
    with gzip.open(POOL_FILE, "wt") as f:
        json.dump(pool, f)
    print(f"written: {POOL_FILE} ({len(done)} configurations)")


def base_overrides(args) -> list[str]:
    return [f"trial.max_epochs={args.epochs}", "trial.early_stop=null", f"seed={args.seed}", f"trial.folds={FOLDS}"]


# --- the recorded K-fold pool as arms: single split, 3 of 5 folds, 5 folds ------------------------------------

ARMS = {"single": [0], "k3": [0, 1, 2], "k5": [0, 1, 2, 3, 4]}  # the heads (folds) each objective uses
ARM_NAMES = {"single": "single split (one fold held out)", "k3": "3 folds (3 of the 5 recorded)",
             "k5": "5 folds"}


def load_cv_pool(partial: bool) -> dict:
    """The recording (finished, or under way with ``partial``) with its probabilities."""
    import gzip

    if not partial:
        with gzip.open(POOL_FILE, "rt") as f:
            data = json.load(f)
    else:
        from bench_hpo import pool_config

        from emotune.data.folds import trial_folds
        from emotune.data.prepare import prepare_corpus

        entries = {}
        for line in PARTIAL.read_text().splitlines():
            entry = json.loads(line)
            if (PROBS_DIR / f"config-{entry['index']:03d}.npz").is_file():
                entries[entry["index"]] = entry
        base = pool_config([f"trial.folds={FOLDS}"])
        corpus = prepare_corpus(base["data"], base["paths"]["runs_dir"], progress=False)
        folds = trial_folds(corpus.train, corpus.dev, FOLDS, int(base["data"]["fold_seed"]), by_group=False)
        labels = corpus.labels
        data = {"labels": labels, "folds": FOLDS, "space": base["space"]["params"],
                "fold": _digits(folds.fold_of()[u.id] for u in folds.clips),
                "oof_true": _digits(labels.index(u.label) for u in folds.clips),
                "test_true": _digits(labels.index(u.label) for u in corpus.test),
                "trials": [entries[i] for i in sorted(entries)]}
    for trial in data["trials"]:
        with np.load(PROBS_DIR / f"config-{trial['index']:03d}.npz") as probs:
            trial["test_probs"] = probs["test"]  # (evaluations, heads, test clips, classes), in 1/255
    return data


def arm_pool(data: dict, arm: str):
    """A :class:`bench_hpo.Pool` of one objective: its score at every evaluation on the clips its heads hold out,
    the test F1 and predictions of its heads' mean, and its cost (its heads' share of the recorded seconds)."""
    from bench_hpo import Pool

    from emotune import evaluation, noise
    from emotune.estimate import decode_classes

    heads = ARMS[arm]
    fold = np.array([int(c) for c in data["fold"]])
    scored = np.flatnonzero(np.isin(fold, heads))
    y = np.array([int(c) for c in data["oof_true"]])[scored]
    test_true = np.array([int(c) for c in data["test_true"]])
    n_classes = len(data["labels"])
    rows = noise.stratified_resamples(y)
    pool = Pool.__new__(Pool)
    trials = data["trials"]
    pool.data, pool.configs = data, [t["config"] for t in trials]
    pool.labels, pool.space = data["labels"], data["space"]
    pool.dev_true, pool.test_true = y, test_true
    oof = np.array([[np.frombuffer(r["oof_pred"].encode(), dtype=np.uint8)[scored] - 48 for r in t["rows"]]
                    for t in trials], dtype=np.int8)
    pool.oof = oof  # (configs, evaluations, scored clips)
    pool.f1 = np.array([[evaluation.macro_f1(y, p, n_classes) for p in trial] for trial in oof])
    pool.se = np.array([[noise.macro_f1_se(y, p, n_classes, rows=rows) for p in trial] for trial in oof])
    pool.ema = np.empty_like(pool.f1)
    pool.ema[:, 0] = pool.f1[:, 0]
    for t in range(1, pool.f1.shape[1]):
        pool.ema[:, t] = 0.5 * pool.f1[:, t] + 0.5 * pool.ema[:, t - 1]
    pool.loss = np.array([[r["val_loss"] for r in t["rows"]] for t in trials])
    test_pred = np.stack([t["test_probs"][:, heads].astype(np.float32).mean(axis=1).argmax(-1) for t in trials])
    pool.test_pred = test_pred.astype(np.int8)  # (configs, evaluations, test clips)
    pool.test_f1 = np.array([[evaluation.macro_f1(test_true, p, n_classes) for p in trial] for trial in test_pred])
    # what the out-of-fold score measures: one head at a time (each clip is scored by the head that held it out)
    pool.head_test_pred = np.array([[[decode_classes(r["test_pred"][h]) for h in heads] for r in t["rows"]]
                                    for t in trials], dtype=np.int8)  # (configs, evaluations, heads, test clips)
    pool.head_test_f1 = np.array([[np.mean([evaluation.macro_f1(test_true, p, n_classes) for p in row])
                                   for row in trial] for trial in pool.head_test_pred])
    # how much lower the scored clips rate every configuration than test does, before any choice: a property of
    # this recording's fixed test split (321 clips, itself noisy), the same for every search replayed on it
    pool.offset = (pool.f1 - pool.head_test_f1).mean(0)  # (evaluations,)
    pool.seconds = np.array([[r["seconds"] * len(heads) / FOLDS for r in t["rows"]] for t in trials])
    pool.setup = np.array([t["setup_seconds"] for t in trials])
    pool.size, pool.max_t = pool.f1.shape
    pool._numeric = pool._normalised()
    return pool


# --- replayed searches on the arms ------------------------------------------------------------------------------

ASHA = ["search.scheduler=asha", "search.metric=best_val_score", "search.grace_period=5",
        "search.reduction_factor=2", "trial.select_by=val_f1"]
NO_PRUNING = ["search.scheduler=none", "trial.select_by=val_f1"]
SAMPLERS = ("random", "tpe", "tpe-independent", "tpe-startup20", "gp")
BUDGETS = (10, 20, 30, 60)  # in full-length single-split trials on two slots; 30 is step 12's budget
REPORTED_BUDGET = 30
TODAY = ("single", "random", "asha")  # today's default: random + ASHA on one split
SELECTION_SEEDS = range(1000, 1030)
# The rule, fixed before the replays were looked at (written here first, then run):
RULE = (f"on seeds {SELECTION_SEEDS.start} and up, never those reported below, the new default is the (objective, "
        "sampler, scheduler) with random draws whose pick has the highest mean test F1 at the reported budget; a "
        "model-based sampler (tpe, gp) replaces random draws only if it beats them, same objective and scheduler, "
        "with a paired 95% interval above 0 on those seeds")


def make_optuna_sampler(name: str, seed: int):
    """The product's sampler ``name`` (tpe-independent included), or its TPE with 20 start-up trials."""
    from emotune.search.algorithms import make_sampler

    if name == "tpe-startup20":
        return make_sampler("tpe", seed, 20)
    return make_sampler(name, seed, 10)


def cv_method(sampler: str, scheduler: str):
    """A :class:`bench_hpo.Method` whose searcher is the product's (PruningAwareOptunaSearch behind a
    ConcurrencyLimiter) with the Optuna ``sampler`` named here."""
    from bench_hpo import Method

    class SamplerMethod(Method):
        def searcher(self, cfg: dict):
            import warnings

            from ray.tune.search import ConcurrencyLimiter

            from emotune.names import OBJECTIVE
            from emotune.search.algorithms import PruningAwareOptunaSearch, asha_clock
            from emotune.search.space import DefineByRun, points_to_evaluate

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                searcher = PruningAwareOptunaSearch(
                    space=DefineByRun(cfg["space"], cfg), metric=OBJECTIVE, mode="max",
                    sampler=make_optuna_sampler(sampler, int(cfg["search"]["sampler_seed"])),
                    last_step=asha_clock(cfg)[2], points_to_evaluate=points_to_evaluate(cfg["space"], cfg) or None)
            return ConcurrencyLimiter(searcher, max_concurrent=int(cfg["search"]["max_concurrent"]))

    overrides = [f"search.sampler={sampler.split('-')[0]}", *(ASHA if scheduler == "asha" else NO_PRUNING)]
    return SamplerMethod(f"{sampler}+{scheduler}", overrides)


def search_state(pool, scores, replay: dict, seconds: float, estimate: bool = True,
                 resamples: int = 200) -> dict | None:
    """What a replayed search has ``seconds`` in: its pick's test F1, the k = 3 vote's, the regrets, the pick's
    dev score and (``estimate``) the bias-corrected estimates of the pick and the vote on the arm's scored clips."""
    from emotune.estimate import Curves, bias_corrected_sizes, hard_votes
    from emotune.evaluation import macro_f1

    done: dict[int, tuple[int, int]] = {}
    for time_, number, index, evaluation in replay["reports"]:
        if time_ > seconds:
            break
        done[number] = (index, evaluation)
    if len(done) < 3:
        return None
    ranked = sorted(done, key=lambda n: (-scores.best[done[n][0], done[n][1] - 1], n))
    checkpoints = [(done[n][0], int(scores.checkpoint[done[n][0], done[n][1] - 1])) for n in ranked]
    n_classes = len(pool.labels)
    pick_test = float(pool.test_f1[checkpoints[0]])
    vote = hard_votes(np.stack([pool.test_pred[i, t] for i, t in checkpoints[:3]]).astype(np.int64), n_classes)
    pool_best = float(pool.test_f1[np.arange(pool.size), scores.checkpoint[:, -1]].max())
    best_visited = max(float(pool.test_f1[c]) for c in checkpoints)
    head_votes = [hard_votes(np.stack([pool.head_test_pred[i, t, h] for i, t in checkpoints[:3]]).astype(np.int64),
                            n_classes) for h in range(pool.head_test_pred.shape[2])]
    state = {"trials": len(done), "pick_test": pick_test, "k3_test": macro_f1(pool.test_true, vote, n_classes),
             "pick_heads_test": float(pool.head_test_f1[checkpoints[0]]),
             "offset": float(pool.offset[checkpoints[0][1]]),
             "k3_heads_test": float(np.mean([macro_f1(pool.test_true, v, n_classes) for v in head_votes])),
             "pick_dev": float(pool.f1[checkpoints[0]]), "search_regret": pool_best - best_visited,
             "selection_regret": best_visited - pick_test}
    if estimate:
        curves = Curves([pool.oof[done[n][0], : done[n][1]].astype(np.int64) for n in ranked], pool.dev_true,
                        n_classes)
        found = bias_corrected_sizes(curves, (1, 3), resamples=resamples)
        pick, top3 = found[1], found[3]
        state |= {"estimate": pick.expected, "estimate_low": pick.low, "estimate_high": pick.high,
                  "k3_estimate": top3.expected, "k3_low": top3.low, "k3_high": top3.high}
    return state


_ARM_POOLS: dict = {}  # per worker process: the arms' pools, built once
_DATA: dict = {}  # the recording, set before the workers fork


def _pool_of(arm: str):
    """The arm's pool and its scores, built once per process (a forked worker inherits the parent's)."""
    from bench_hpo import Scores

    if arm not in _ARM_POOLS:
        pool = arm_pool(_DATA["data"], arm)
        _ARM_POOLS[arm] = (pool, {"val_f1": Scores(pool, "val_f1")})
    return _ARM_POOLS[arm]


def _replay_job(job: tuple) -> tuple[str, list, float]:
    """One (arm, sampler, scheduler) over its seeds, in a worker: its rows, read at each budget."""
    from bench_hpo import replay_search

    arm, sampler, scheduler, seeds, unit, estimate = job
    pool, scores_of = _pool_of(arm)
    started, rows = time.perf_counter(), []
    for seed in seeds:
        replay = replay_search(pool, cv_method(sampler, scheduler), seed, max(BUDGETS) * unit, scores_of)
        rows.append({str(b): search_state(pool, scores_of["val_f1"], replay, b * unit,
                                          estimate=estimate and b == REPORTED_BUDGET) for b in BUDGETS})
    return f"{arm}/{sampler}/{scheduler}", rows, time.perf_counter() - started


def replay_arms(data: dict, arms: list[str], methods: list[tuple[str, str]], seeds: list[int],
                slow_seeds: int | None = None, estimate_for=lambda key: True, workers: int = 2,
                gp_arms: tuple = ("k3", "k5")) -> dict:
    """Every (arm, sampler, scheduler) replayed on ``seeds`` at the largest budget, read at each budget, in
    ``workers`` processes; the bias-corrected estimate where ``estimate_for(key)``; GP, whose proposals take about a
    second each (more with many trials), on the first ``slow_seeds`` and on ``gp_arms`` only."""
    import multiprocessing

    if _DATA.get("data") is not data:  # another recording: its pools are not these
        _ARM_POOLS.clear()
        _DATA["data"] = data
    single, _ = _pool_of("single")  # the budget's unit: a full-length single-split trial, on two slots
    unit = float(np.mean(single.trial_seconds())) / 2
    jobs = []
    for arm in arms:
        for sampler, scheduler in methods:
            if sampler == "gp" and arm not in gp_arms:
                continue
            key = f"{arm}/{sampler}/{scheduler}"
            jobs.append((arm, sampler, scheduler, seeds[:slow_seeds] if sampler == "gp" else seeds, unit,
                         estimate_for(key)))
    jobs.sort(key=lambda job: (job[1] != "gp", job[0]))  # the slow ones first, so the workers end together
    out: dict = {}
    with multiprocessing.get_context("fork").Pool(workers) as workers_pool:
        for key, rows, seconds in workers_pool.imap_unordered(_replay_job, jobs):
            out[key] = rows
            at = [r[str(REPORTED_BUDGET)] for r in rows if r[str(REPORTED_BUDGET)]]
            estimate = f", estimate {np.mean([a['estimate'] for a in at]):.4f}" if at and "estimate" in at[0] else ""
            pick = np.mean([a["pick_test"] for a in at])
            print(f"{key:28s} {len(rows)} seeds in {seconds:.0f} s: pick test {pick:.4f},"
                  f" k3 {np.mean([a['k3_test'] for a in at]):.4f}, dev {np.mean([a['pick_dev'] for a in at]):.4f}"
                  f"{estimate}", flush=True)
    ordered = [f"{arm}/{sampler}/{scheduler}" for arm in arms for sampler, scheduler in methods]
    return {"unit_seconds": unit, "results": {key: out[key] for key in ordered if key in out}}


# --- figures, the choice, the report -----------------------------------------------------------------------------

def mean_ci(values) -> tuple[float, float, float]:
    """Mean and its 95% interval (normal approximation over seeds)."""
    values = np.asarray(values, dtype=float)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


def paired(rows_a: list, rows_b: list, key: str, budget: int = REPORTED_BUDGET) -> tuple[float, float, float]:
    """a minus b, seed by seed, at ``budget``: mean and 95% interval."""
    pairs = [(a[str(budget)], b[str(budget)]) for a, b in zip(rows_a, rows_b) if a[str(budget)] and b[str(budget)]]
    return mean_ci([a[key] - b[key] for a, b in pairs])


def summary_of(rows: list, budget: int = REPORTED_BUDGET) -> dict:
    """An arm's figures at ``budget`` over its seeds; the estimate's error and coverage where it was computed."""
    at = [r[str(budget)] for r in rows if r[str(budget)]]
    out = {"pick_test": mean_ci([a["pick_test"] for a in at]), "k3_test": mean_ci([a["k3_test"] for a in at]),
           "search_regret": float(np.mean([a["search_regret"] for a in at])),
           "selection_regret": float(np.mean([a["selection_regret"] for a in at])),
           "gap": float(np.mean([a["pick_dev"] - a["pick_test"] for a in at])),
           "trials": float(np.mean([a["trials"] for a in at]))}
    if at and "estimate" in at[0]:
        for prefix, test, low, high, mean in (("", "pick_test", "estimate_low", "estimate_high", "estimate"),
                                              ("k3_", "k3_test", "k3_low", "k3_high", "k3_estimate")):
            out[f"{prefix}estimate_error"] = float(np.mean([a[mean] - a[test] for a in at]))
            out[f"{prefix}estimate_coverage"] = float(np.mean([a[low] <= a[test] <= a[high] for a in at]))
            # against what out-of-fold predictions measure: one head (a vote of one head per member), not the bag
            heads = test.replace("_test", "_heads_test")
            out[f"{prefix}estimate_error_heads"] = float(np.mean([a[mean] - a[heads] for a in at]))
            out[f"{prefix}estimate_coverage_heads"] = float(np.mean([a[low] <= a[heads] <= a[high] for a in at]))
            # against one head on clips like the scored ones: its test F1 moved by the split's offset
            out[f"{prefix}estimate_error_net"] = float(np.mean([a[mean] - a[heads] - a["offset"] for a in at]))
            out[f"{prefix}estimate_coverage_net"] = float(np.mean([a[low] <= a[heads] + a["offset"] <= a[high]
                                                                   for a in at]))
        out["raw_error_net"] = float(np.mean([a["pick_dev"] - a["pick_heads_test"] - a["offset"] for a in at]))
        out["offset"] = float(np.mean([a["offset"] for a in at]))
    return out


def choose_default(selection: dict) -> tuple[str, str]:
    """:data:`RULE`, applied to the selection seeds' replays; returns the chosen key and why."""
    means = {key: summary_of(rows)["pick_test"][0] for key, rows in selection.items()}
    model_free = {k: v for k, v in means.items() if k.split("/")[1] == "random"}
    best = max(model_free, key=model_free.get)
    why = f"the best with random draws: pick test F1 {model_free[best]:.4f} on the selection seeds"
    for key, value in sorted(means.items(), key=lambda item: -item[1]):
        arm, sampler, scheduler = key.split("/")
        baseline = f"{arm}/random/{scheduler}"
        if sampler == "random" or baseline not in selection or value <= model_free[best]:
            continue
        diff, low, _ = paired(selection[key], selection[baseline], "pick_test")
        if low > 0:
            return key, f"{why}; {key} beats random draws by {diff:+.4f} (95% CI above 0) and scores {value:.4f}"
    return best, why + "; no model-based sampler beat random draws with a 95% CI above 0"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for key, rows in sorted(results.items()):
        arm, sampler, scheduler = key.split("/")
        if sampler not in ("random", "tpe"):
            continue
        means = [summary_of(rows, b)["pick_test"][0] for b in BUDGETS]
        ax.plot(BUDGETS, means, marker="o", linestyle="-" if scheduler == "asha" else "--",
                color={"single": "tab:red", "k3": "tab:blue", "k5": "tab:green"}[arm], alpha=1 if sampler == "random"
                else 0.5, label=f"{ARM_NAMES[arm]}, {sampler}, {scheduler}")
    ax.set_xlabel("budget (full-length single-split trials, two at a time)")
    ax.set_ylabel("test macro-F1 of the search's pick")
    ax.set_title("The pick's test F1 against compute, per objective (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _f(value: float) -> str:
    return f"{value:.4f}"


def markdown(data: dict, reported: dict, chosen: str, why: str, record_note: str, seeds: int) -> str:
    results = reported["results"]
    today = results["/".join(TODAY)]
    lines = ["<!-- cv:start (written by scripts/bench_hpo.py replay-cv) -->",
             "## Step 16: cross-validated trials, the honest estimate, the sampler again", "",
             f"**Pool**: {len(data['trials'])} configurations of `space=encoders`, each trained as one `trial.folds=5` "
             f"trial for {len(data['trials'][0]['rows'])} evaluations without pruning ({record_note}). Every "
             f"evaluation kept the out-of-fold class of each of the {len(data['fold'])} labelled clips and each head's "
             f"test probabilities ({len(data['test_true'])} test clips). Objectives replayed from it: **single** (fold "
             "0 held out, head 0 alone: a single split), **k3** (folds 0-2 scored, the mean of heads 0-2: three of "
             "the five recorded folds, each head trained on 4/5 rather than 2/3) and **k5**. `trial.resplit` is not "
             "replayable from one fold assignment and was not measured.", "",
             f"**Compute**: a search's budget counts head-trainings: the unit is one full-length single-split trial "
             f"(one head: {reported['unit_seconds'] * 2:.0f} s recorded) on two slots; a k5 trial costs five. Budget "
             f"{REPORTED_BUDGET} units unless said. {seeds} seeds per arm, paired (seed s runs the same sampler seed "
             "in every arm); 95% intervals over seeds.", "",
             f"**The rule, fixed before the replays**: {RULE}.", "",
             f"**Chosen**: `{chosen}` ({why}).", "",
             "| objective / sampler / scheduler | trials | pick test F1 [95% CI] | vs today (paired) "
             "| k=3 vote test F1 | search regret | selection regret | raw dev error | estimate error | coverage "
             "| estimate error, one head | coverage, one head |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, rows in results.items():
        s = summary_of(rows)
        diff = paired(rows, today, "pick_test") if key != "/".join(TODAY) else None
        mark = " **(today)**" if key == "/".join(TODAY) else " **(chosen)**" if key == chosen else ""
        versus = "" if diff is None else f"{diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}]"
        lines.append(f"| `{key}`{mark} | {s['trials']:.1f} | {_f(s['pick_test'][0])} [{_f(s['pick_test'][1])}, "
                     f"{_f(s['pick_test'][2])}] | {versus} "
                     f"| {_f(s['k3_test'][0])} | {_f(s['search_regret'])} | {_f(s['selection_regret'])} | "
                     f"{s['gap']:+.4f} | {_estimate_cells(s)} |")
    lines += sampler_markdown(results) + estimate_markdown(results)
    lines += ["", "Search regret: the pool's best trial on test (fully trained) minus the best trial the search "
              "visited; selection regret: that minus the pick. Estimate error: the bias-corrected estimate minus the "
              "pick's test F1; coverage: how often its 95% interval held the pick's test F1; raw dev error: the "
              "pick's dev (or out-of-fold) score minus its test F1, what the summary used to print as the result. "
              "One head: against the mean test F1 of the pick's heads taken one at a time, which is what out-of-fold "
              "predictions measure (each labelled clip is scored by the one head that held it out), where the bag "
              "of K heads predicts test.",
              "", "The pick's test F1 against the budget (random draws and TPE with joint settings; the chosen "
              "tpe-independent's figures at budgets 30 and 60 are in the tables above):", "",
              "![pick test F1 against budget](hpo-cv.png)", "",
              "<!-- cv:end -->"]
    return "\n".join(lines) + "\n"


def _estimate_cells(s: dict) -> str:
    if "estimate_error" not in s:
        return "not computed | | |"
    return (f"{s['estimate_error']:+.4f} | {s['estimate_coverage']:.0%} | {s['estimate_error_heads']:+.4f} | "
            f"{s['estimate_coverage_heads']:.0%}")


def sampler_markdown(results: dict) -> list[str]:
    """Each model-based sampler against random draws on the same objective and scheduler, paired over seeds, at
    the reported budget and at the largest."""
    lines = ["", "**Model-based samplers against random draws** (same objective and scheduler, paired over seeds; "
             "pick test F1, model-based minus random):", "",
             f"| objective / sampler / scheduler | budget {REPORTED_BUDGET} [95% CI] | budget {max(BUDGETS)} [95% CI] "
             "| trials at the reported budget |", "|---|---|---|---|"]
    for key, rows in results.items():
        arm, sampler, scheduler = key.split("/")
        baseline = results.get(f"{arm}/random/{scheduler}")
        if sampler == "random" or baseline is None:
            continue
        cells = []
        for budget in (REPORTED_BUDGET, max(BUDGETS)):
            diff = paired(rows, baseline, "pick_test", budget)
            cells.append(f"{diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}]")
        lines.append(f"| `{key}` | {cells[0]} | {cells[1]} | {summary_of(rows)['trials']:.1f} |")
    return lines


def estimate_markdown(results: dict) -> list[str]:
    """The estimate per objective (random draws, ASHA): for the pick and the k = 3 vote, its error against the bag
    that predicts test and against one head at a time, with coverage; and how much of the test F1 is the bag's."""
    lines = ["", "**The estimate, per objective** (random draws, ASHA; error = estimate minus test F1, and how often "
             "the 95% interval held it). *Offset*: how much lower the scored clips rate a configuration than the "
             "test split does at the same evaluation, averaged over all recorded configurations, before any choice; "
             "*net*: against one head's test F1 moved by that offset, that is on clips like the scored ones, which "
             "is what the estimate claims to measure:", "",
             "| objective | pick: test F1 of the bag / of one head | pick: error vs bag (coverage) | pick: error vs "
             "one head (coverage) | offset | pick: error net (coverage) | raw dev error net "
             "| k=3: error vs bag (coverage) | k=3: error net (coverage) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        key = f"{arm}/random/asha"
        if key not in results:
            continue
        s, at = summary_of(results[key]), [r[str(REPORTED_BUDGET)] for r in results[key] if r[str(REPORTED_BUDGET)]]
        heads = float(np.mean([a["pick_heads_test"] for a in at]))
        lines.append(f"| {arm} | {_f(s['pick_test'][0])} / {_f(heads)} "
                     f"| {s['estimate_error']:+.4f} ({s['estimate_coverage']:.0%}) "
                     f"| {s['estimate_error_heads']:+.4f} ({s['estimate_coverage_heads']:.0%}) "
                     f"| {s['offset']:+.4f} | {s['estimate_error_net']:+.4f} ({s['estimate_coverage_net']:.0%}) "
                     f"| {s['raw_error_net']:+.4f} "
                     f"| {s['k3_estimate_error']:+.4f} ({s['k3_estimate_coverage']:.0%}) "
                     f"| {s['k3_estimate_error_net']:+.4f} ({s['k3_estimate_coverage_net']:.0%}) |")
    return lines


def keys_for_json(results: dict, chosen: str) -> dict:
    today, new = results["/".join(TODAY)], results[chosen]
    arm, sampler, scheduler = chosen.split("/")
    pick, k3 = paired(new, today, "pick_test"), paired(new, today, "k3_test")
    model_based = [k for k in results if k.startswith(f"{arm}/") and k.endswith(f"/{scheduler}")
                   and k.split("/")[1] != "random"]
    random_rows = results[f"{arm}/random/{scheduler}"]
    best_mb = max(model_based, key=lambda k: summary_of(results[k])["pick_test"][0]) if model_based else None
    mb = paired(results[best_mb], random_rows, "pick_test") if best_mb else (float("nan"),) * 3
    s_today, s_new = summary_of(today), summary_of(new)
    return {"cv_pool_size": None, "cv_default": chosen, "cv_pick_gain_vs_single": pick[0],
            "cv_pick_gain_ci_low": pick[1], "cv_k3_gain_vs_single": k3[0], "cv_k3_gain_ci_low": k3[1],
            "selection_regret_single": s_today["selection_regret"],
            "selection_regret_default": s_new["selection_regret"],
            "estimate_mean_error": s_new["estimate_error"], "estimate_coverage": s_new["estimate_coverage"],
            "estimate_mean_error_one_head": s_new["estimate_error_heads"],
            "estimate_coverage_one_head": s_new["estimate_coverage_heads"],
            "test_split_offset": s_new["offset"], "estimate_mean_error_net_of_offset": s_new["estimate_error_net"],
            "estimate_coverage_net_of_offset": s_new["estimate_coverage_net"],
            "raw_dev_mean_error_net_of_offset": s_new["raw_error_net"],
            "raw_dev_mean_error_single": s_today["gap"], "estimate_mean_error_single": s_today["estimate_error"],
            "raw_dev_mean_error": s_new["gap"], "model_based_sampler": best_mb,
            "model_based_gain_vs_random": mb[0], "model_based_gain_ci_low": mb[1]}


def replay_report(args) -> None:
    """Choose the default on the selection seeds, replay the reported seeds, write the section of hpo.md, the keys
    of hpo.json and hpo-cv.png."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load_cv_pool(args.partial)
    arms = list(ARMS)
    # the scheduler crossed with random draws and the product's TPE; TPE's variants and GP with ASHA, the default
    methods = [(s, "asha") for s in args.samplers] + [(s, "none") for s in ("random", "tpe") if s in args.samplers]
    print(f"pool: {len(data['trials'])} configurations; selection seeds first", flush=True)
    common = {"slow_seeds": args.gp_seeds, "workers": args.workers, "gp_arms": tuple(args.gp_arms)}
    selection = replay_arms(data, arms, methods, list(SELECTION_SEEDS)[: args.selection_seeds],
                            estimate_for=lambda key: False, **common)["results"]
    chosen, why = choose_default(selection)
    print(f"chosen: {chosen} ({why})", flush=True)
    reported = replay_arms(data, arms, methods, list(range(args.seeds)),
                           estimate_for=lambda key: key.split("/")[1] == "random" or key == chosen, **common)
    record_seconds = sum(t["wall_seconds"] for t in data["trials"])
    note = (f"recorded in {record_seconds / 3600:.1f} h of worker time, two configurations at a time "
            f"(`python scripts/bench_hpo.py record-cv`){'; a recording still under way' if args.partial else ''}")
    study = checkpoint_study(data)
    section = markdown(data, reported, chosen, why, note, args.seeds)
    section = section.replace("<!-- cv:end -->", "\n".join(checkpoint_markdown(study)) + "\n\n<!-- cv:end -->")
    md = BENCH_DIR / "hpo.md"
    text = md.read_text()
    start, end = text.find("<!-- cv:start"), text.find("<!-- cv:end -->")
    text = (text[:start] + section + text[end + len("<!-- cv:end -->\n"):]) if start >= 0 else text + "\n" + section
    md.write_text(text)
    plot(reported["results"], BENCH_DIR / "hpo-cv.png")
    hpo = json.loads((BENCH_DIR / "hpo.json").read_text())
    hpo |= keys_for_json(reported["results"], chosen) | {"cv_pool_size": len(data["trials"]), "cv_seeds": args.seeds,
                                                        "cv_partial_pool": bool(args.partial)}
    (BENCH_DIR / "hpo.json").write_text(json.dumps(hpo, indent=2) + "\n")
    print(f"written: {md}, {BENCH_DIR / 'hpo.json'}, {BENCH_DIR / 'hpo-cv.png'}")


# --- the checkpoint a trial keeps: which rule's score lands nearest its test F1 ------------------------------------

def checkpoint_rules(pool, data: dict, heads: list[int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per rule, each configuration's reported score and the evaluation (0-based) whose model it keeps, at the end
    of a full-length trial: the best evaluation, the best smoothed value (mean of three, EMA), a fixed late epoch,
    and (several folds) the best mean of the per-fold scores."""
    from emotune import evaluation
    from emotune.noise import score_values

    f1, last = pool.f1, pool.max_t - 1
    rules = {"best evaluation": (f1.max(1), f1.argmax(1))}
    for name in ("val_f1_mean3", "val_f1_ema"):
        values = np.array([score_values(f1[i], pool.se[i], pool.ema[i], name) for i in range(pool.size)])
        rules[f"best {name}"] = (values.max(1), values.argmax(1))
    late = int(round(0.75 * pool.max_t)) - 1
    rules[f"fixed epoch {late + 1}"] = (f1[:, late], np.full(pool.size, late))
    rules[f"last epoch ({pool.max_t})"] = (f1[:, last], np.full(pool.size, last))
    if len(heads) > 1:
        fold = np.array([int(c) for c in data["fold"]])
        scored_fold = fold[np.isin(fold, heads)]
        n_classes = len(pool.labels)
        per_fold = np.array([[np.mean([evaluation.macro_f1(pool.dev_true[scored_fold == k], p[scored_fold == k],
                                                           n_classes) for k in heads]) for p in trial]
                             for trial in pool.oof])
        where = per_fold.argmax(1)
        rules["best mean over folds"] = (f1[np.arange(pool.size), where], where)
    return rules


def checkpoint_study(data: dict) -> dict:
    """Each rule per objective: the mean of its reported score minus the kept model's test F1, and that test F1."""
    out = {}
    for arm, heads in ARMS.items():
        pool = arm_pool(data, arm)
        for rule, (score, where) in checkpoint_rules(pool, data, heads).items():
            test = pool.test_f1[np.arange(pool.size), where]
            out[f"{arm}/{rule}"] = {"optimism": mean_ci(score - test), "test_f1": mean_ci(test)}
    return out


def checkpoint_markdown(study: dict) -> list[str]:
    lines = ["", "### The checkpoint a trial keeps", "",
             "Every recorded configuration at the end of its 40 evaluations, per objective: the score each rule "
             "reports minus the test F1 of the model it keeps (its optimism), and that test F1. The rule to keep: the "
             "one whose reported score is nearest its test F1 without costing test F1.", "",
             "| objective / rule | reported minus test [95% CI] | test F1 of the kept model |", "|---|---|---|"]
    for key, row in study.items():
        o, t = row["optimism"], row["test_f1"]
        lines.append(f"| {key} | {o[0]:+.4f} [{o[1]:+.4f}, {o[2]:+.4f}] | {t[0]:.4f} [{t[1]:.4f}, {t[2]:.4f}] |")
    return lines
