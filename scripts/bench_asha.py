"""Benchmark: which ASHA settings keep the best trial on noisy dev curves, and at what share of the epochs.

1. Record: a real `space=encoders` search on the demo corpus whose trials all run the full budget (no pruning,
   no early stopping); each trial's epoch-by-epoch val_f1, val_f1_ema, best_val_f1 and val_loss are kept.
2. Replay: each replay draws a pool of recorded trials in a random arrival order, so that the best trial
   differs from replay to replay; every setting sees the same draws (paired). The pool goes through Ray's
   real ``ASHAScheduler`` (its ``on_trial_add``/``on_trial_result`` decisions), fed by a small event loop that
   runs ``--concurrent`` trials at a time, one epoch each per round, as Tune does with equally fast trials.
   A replay takes milliseconds instead of the seconds a Tune run costs, so the whole grid fits on 2 cores.
   ``--check N`` also runs N draws through a real Tune run per setting checked and reports the agreement.

For each setting (metric x grace period x reduction factor x max_t): how often the pool's best trial (best
final best_val_f1 at max_t) survives to max_t, the mean regret (that trial's final F1 minus the best
survivor's), and the epochs spent against no pruning.

    python scripts/bench_asha.py                 # record 24 trials x 60 epochs (about 15 min), replay the grid
    python scripts/bench_asha.py --reuse         # replay the curves already in benchmarks/asha.json

Writes benchmarks/asha.json and benchmarks/asha.md. The goal for the shipped default: the best trial survives
at least 90% of replays with at most 40% of the full budget's epochs.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from types import SimpleNamespace

import numpy as np

from _bench import BENCH_DIR, ROOT, RUNS_DIR, mean_sd, run_search, trial_results, write

METRICS = ("val_f1", "val_f1_ema", "best_val_f1", "val_loss")
GOAL_SURVIVAL, GOAL_SHARE = 0.90, 0.40


@functools.lru_cache(maxsize=None)
def _search_config(metric: str, max_t: int, grace: int, factor: float) -> dict:
    from emotune.config import load_config

    return load_config([f"search.metric={metric}", f"trial.max_epochs={max_t}", f"search.grace_period={grace}",
                        f"search.reduction_factor={factor:g}"], "search")


def scheduler_for(metric: str, max_t: int, grace: int, factor: float):
    """A fresh scheduler as a search with these settings gets it (emotune.search.algorithms.make_scheduler)."""
    from emotune.search.algorithms import make_scheduler

    return make_scheduler(_search_config(metric, max_t, grace, factor))


def replay(curves: list[list[dict]], order: list[int], scheduler, max_t: int, concurrent: int) -> dict[int, int]:
    """Epochs each trial of ``order`` ran before Ray's ``scheduler`` stopped it (or max_t), ``concurrent`` at a time."""
    from ray.tune.schedulers import TrialScheduler

    waiting, running, epochs = list(order), [], {}
    while waiting or running:
        while waiting and len(running) < concurrent:
            trial = SimpleNamespace(trial_id=str(waiting.pop(0)))  # Ray's ASHA reads nothing but the id
            scheduler.on_trial_add(None, trial)
            running.append(trial)
            epochs[int(trial.trial_id)] = 0
        for trial in list(running):  # one epoch each, in turn
            index = int(trial.trial_id)
            epochs[index] += 1
            result = dict(curves[index][epochs[index] - 1]) | {"epoch": epochs[index], "evaluation": epochs[index]}
            decision = scheduler.on_trial_result(None, trial, result)
            if decision == TrialScheduler.STOP or epochs[index] >= max_t:
                scheduler.on_trial_complete(None, trial, result)
                running.remove(trial)
    return epochs


def replay_with_tune(curves: list[list[dict]], order: list[int], scheduler, max_t: int,
                     concurrent: int) -> dict[int, int]:
    """The same replay as a real Tune run (seconds each): checks that :func:`replay` decides as Tune does."""
    from ray import tune

    def trainable(config: dict) -> None:
        for epoch, row in enumerate(curves[config["curve_id"]][:max_t], start=1):
            tune.report(dict(row) | {"epoch": epoch, "evaluation": epoch})

    tuner = tune.Tuner(
        trainable, param_space={"curve_id": tune.grid_search(order)},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(verbose=0, storage_path="/tmp/emotune-bench-asha"))
    return {r.config["curve_id"]: int(r.metrics.get("epoch", 0)) for r in tuner.fit()}


def record(args) -> tuple[list[list[dict]], float, str]:
    """Run the recording search; its curves, its seconds and its name."""
    name = f"bench-asha-record-{int(time.time())}"
    summary = run_search(["space=encoders", f"search.name={name}", f"search.num_samples={args.trials}",
                          f"trial.max_epochs={args.epochs}", f"seed={args.seed}", "trial.early_stop=null",
                          f"search.grace_period={args.epochs}"])  # nobody is stopped
    return *recorded(summary["experiment_dir"], args.epochs), name


def recorded(experiment_dir, epochs: int) -> tuple[list[list[dict]], float]:
    """The full-length curves of a finished search and the wall time from its first trial's start to the last end."""
    trials = [t["rows"] for t in trial_results(experiment_dir) if len(t["rows"]) >= epochs]
    seconds = max(r[-1]["timestamp"] for r in trials) - min(r[0]["timestamp"] - r[0]["time_total_s"] for r in trials)
    return [[{k: row[k] for k in METRICS} for row in rows[:epochs]] for rows in trials], float(seconds)


def at_epoch(curves, epoch: int, metric: str = "best_val_f1") -> np.ndarray:
    """Every recorded trial's ``metric`` at ``epoch`` (1-based); at max_t, best_val_f1 is a trial's final F1."""
    return np.array([c[epoch - 1][metric] for c in curves])


def evaluate(curves, draws, setting: tuple, concurrent: int) -> dict:
    metric, grace, factor, max_t = setting
    final = at_epoch(curves, max_t)
    rows = []
    for order in draws:
        best = max(order, key=lambda i: final[i])
        epochs = replay(curves, order, scheduler_for(metric, max_t, grace, factor), max_t, concurrent)
        survivors = [i for i, e in epochs.items() if e >= max_t]
        rows.append({"best_survives": best in survivors,
                     "regret": float(final[best] - max((final[i] for i in survivors), default=0.0)),
                     "epoch_share": sum(epochs.values()) / (len(order) * max_t), "epochs": epochs})
    return {"survival": float(np.mean([r["best_survives"] for r in rows])),
            "regret": mean_sd(r["regret"] for r in rows),
            "epoch_share": float(np.mean([r["epoch_share"] for r in rows])), "rows": rows}


def _ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values, kind="stable"), kind="stable").astype(float)


def early_signal(curves, max_t: int, epochs=(3, 5, 10, 15, 20)) -> list[str]:
    """How well each metric at an early epoch predicts the final best F1 at ``max_t`` (Spearman's rank
    correlation over the recorded trials), and where the eventual best trial ranks early on: what any ASHA setting
    can at most get from these curves."""
    final = at_epoch(curves, max_t)
    header = "| metric | " + " | ".join(f"epoch {e}" for e in epochs) + " |"
    lines = [header, "|---|" + "---|" * len(epochs)]
    for metric in METRICS:
        cells = []
        for epoch in epochs:
            early = at_epoch(curves, epoch, metric) * (-1 if metric == "val_loss" else 1)
            cells.append(f"{np.corrcoef(_ranks(early), _ranks(final))[0, 1]:.2f}")
        lines.append(f"| `{metric}` | " + " | ".join(cells) + " |")
    best = int(np.argmax(final))
    places = []
    for epoch in epochs:
        early = at_epoch(curves, epoch)
        places.append(f"{int((early > early[best]).sum()) + 1} at epoch {epoch}")
    return lines + ["", f"The trial with the best final F1 (of {len(curves)}) ranks, by best_val_f1: "
                    f"{', '.join(places)} (1 is the top)."]


def choose(results: dict) -> tuple[str, str]:
    """The setting to ship and why: the cheapest one meeting the goal, else the closest to it."""
    meeting = {k: r for k, r in results.items() if r["survival"] >= GOAL_SURVIVAL and r["epoch_share"] <= GOAL_SHARE}
    if meeting:
        key = min(meeting, key=lambda k: (meeting[k]["epoch_share"], -meeting[k]["survival"]))
        return key, "meets the goal with the fewest epochs"
    # closest: the most survival per unit of epochs among those within the epoch goal, else the best survival
    within = {k: r for k, r in results.items() if r["epoch_share"] <= GOAL_SHARE}
    if within:
        key = max(within, key=lambda k: (within[k]["survival"], -within[k]["regret"][0]))
        return key, "no setting meets the goal; this one keeps the best trial most often within 40% of the epochs"
    key = max(results, key=lambda k: (results[k]["survival"], -results[k]["epoch_share"]))
    return key, "no setting meets the goal; this one keeps the best trial most often"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24, help="trials recorded at the full budget (default 24)")
    parser.add_argument("--epochs", type=int, default=60, help="epochs per recorded trial (default 60)")
    parser.add_argument("--pool", type=int, default=12, help="trials drawn from the recording per replay (default 12)")
    parser.add_argument("--replays", type=int, default=200, help="replays per setting (default 200)")
    parser.add_argument("--graces", type=int, nargs="+", default=[3, 5, 10, 15],
                        help="grace periods (default 3 5 10 15)")
    parser.add_argument("--factors", type=float, nargs="+", default=[2, 3], help="reduction factors (default 2 3)")
    parser.add_argument("--max-ts", type=int, nargs="+", default=[40, 60], help="max_t values (default 40 60)")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once during replay (default 2)")
    parser.add_argument("--check", type=int, default=3, help="draws replayed through real Tune too, per checked "
                        "setting (default 3; 0 skips)")
    parser.add_argument("--reuse", action="store_true", help="replay the curves recorded in benchmarks/asha.json")
    parser.add_argument("--recorded", metavar="SEARCH", help="take the curves of this finished recording search "
                        "(runs/ray/SEARCH) instead of running one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the recorded search and of the draws (default 0)")
    args = parser.parse_args()

    if args.reuse:
        saved = json.loads((BENCH_DIR / "asha.json").read_text())
        curves, record_seconds, source = saved["curves"], saved["record_seconds"], saved.get("recorded_by", "?")
        if any(m not in curves[0][0] for m in METRICS):
            parser.error("benchmarks/asha.json holds curves without val_loss: record new ones (drop --reuse)")
        args.trials, args.epochs = len(curves), len(curves[0])
    elif args.recorded:
        curves, record_seconds = recorded(RUNS_DIR / "ray" / args.recorded, args.epochs)
        source, args.trials = args.recorded, len(curves)
    else:
        curves, record_seconds, source = record(args)
    if max(args.max_ts) > args.epochs:
        parser.error(f"--max-ts {max(args.max_ts)} needs curves of that many epochs (recorded: {args.epochs})")
    rng = np.random.default_rng(args.seed)
    draws = [rng.choice(len(curves), size=args.pool, replace=False).tolist() for _ in range(args.replays)]

    started = time.perf_counter()
    settings = list(itertools.product(METRICS, args.graces, args.factors, args.max_ts))
    results = {}
    for setting in settings:
        results["{}@{}/{:g}/{}".format(*setting)] = evaluate(curves, draws, setting, args.concurrent)
    replay_seconds = time.perf_counter() - started
    chosen, why = choose(results)

    from emotune.config import load_config
    from emotune.search.algorithms import asha_rungs

    shipped = load_config([], "search")
    shipped_key = "{}@{}/{:g}/{}".format(shipped["search"]["metric"], shipped["search"]["grace_period"],
                                         shipped["search"]["reduction_factor"], shipped["trial"]["max_epochs"])
    agreement = check_with_tune(curves, draws, [chosen, shipped_key], results, args) if args.check else None

    final60 = at_epoch(curves, args.epochs)
    noise = {m: float(np.mean([np.std(np.diff([r[m] for r in c])) for c in curves])) for m in ("val_f1", "val_loss")}
    lines = [f"# ASHA settings on noisy dev curves ({len(curves)} recorded trials x {args.epochs} epochs; "
             f"{args.replays} paired replays of {args.pool} per setting)", "",
             f"Recorded with a real `space=encoders` search on the demo corpus (seed {args.seed}, no pruning, no early "
             f"stopping, {record_seconds / 60:.1f} min). Epoch-to-epoch standard deviation of a trial's curve: val_f1 "
             f"{noise['val_f1']:.3f}, val_loss {noise['val_loss']:.3f}. Final best F1 at epoch {args.epochs}: "
             f"{final60.min():.3f} to {final60.max():.3f} (median {np.median(final60):.3f}).", "",
             f"Each replay runs its pool through Ray's real ASHAScheduler, {args.concurrent} trials at a time, one "
             "epoch each per round; the replays of all settings took "
             f"{replay_seconds:.0f} s." + (f" {agreement}" if agreement else ""), "",
             f"Goal for the default: the pool's best trial survives >= {GOAL_SURVIVAL:.0%} of replays with <= "
             f"{GOAL_SHARE:.0%} of the epochs of no pruning. Chosen: **{chosen}** ({why}). Shipped before this run: "
             f"{shipped_key}.", "",
             "| metric | grace | reduction factor | max_t | rungs | best trial survives | mean regret (± sd) | "
             "epochs vs no pruning |", "|---|---|---|---|---|---|---|---|"]
    for key in sorted(results, key=lambda k: (-results[k]["survival"], results[k]["epoch_share"])):
        metric, rest = key.split("@")
        grace, factor, max_t = rest.split("/")
        rungs = ", ".join(map(str, asha_rungs(scheduler_for(metric, int(max_t), int(grace), float(factor)))))
        r = results[key]
        mark = " **(chosen)**" if key == chosen else (" (shipped before)" if key == shipped_key else "")
        lines.append(f"| `{metric}`{mark} | {grace} | {factor} | {max_t} | {rungs} | {r['survival']:.0%} | "
                     f"{r['regret'][0]:.4f} ± {r['regret'][1]:.4f} | {r['epoch_share']:.0%} |")
    lines += ["", "## Why no setting does better on these curves", "",
              f"Rank correlation between each metric at an early epoch and the final best F1 at epoch "
              f"{min(40, args.epochs)} (1: early order is final order; val_loss negated):", "",
              *early_signal(curves, min(40, args.epochs)), "",
              "An early rung can only keep the eventual best trial if it already ranks in the kept share; where the "
              "correlation is weak and the best trial starts slowly, no grace period short enough to save epochs "
              "keeps it reliably."]
    lines += ["", "Regret: the pool's best final F1 minus the best final F1 among the trials ASHA let finish. "
              "Final F1: a trial's best_val_f1 at max_t. Rungs: Ray's own, as `emotune.search` prints them.",
              f"Command: `python scripts/bench_asha.py{' --reuse' if args.reuse else ''}"
              f"{f' --recorded {args.recorded}' if args.recorded and not args.reuse else ''} --trials {args.trials} "
              f"--epochs {args.epochs} --pool {args.pool} --replays {args.replays} --seed {args.seed}`."]
    metric, rest = chosen.split("@")
    grace, factor, max_t = rest.split("/")
    defaults = {"metric": metric, "grace_period": int(grace), "reduction_factor": float(factor),
                "max_epochs": int(max_t)}
    write("asha", {"args": vars(args), "recorded_by": source, "record_seconds": record_seconds,
                   "replay_seconds": replay_seconds,
                   "curves": curves, "draws": draws, "chosen": chosen, "why": why, "defaults": defaults,
                   "default_best_survival": results[chosen]["survival"],
                   "default_epoch_share": results[chosen]["epoch_share"],
                   "results": {k: {kk: vv for kk, vv in r.items() if kk != "rows"} for k, r in results.items()}},
          lines)
    return 0


def check_with_tune(curves, draws, keys: list[str], results: dict, args) -> str:
    """Run the first ``--check`` draws of ``keys`` through real Tune; how many replays decided the same."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    same = total = 0
    try:
        for key in dict.fromkeys(keys):
            metric, rest = key.split("@")
            grace, factor, max_t = rest.split("/")
            for order, row in zip(draws[: args.check], results[key]["rows"]):
                tuned = replay_with_tune(curves, order, scheduler_for(metric, int(max_t), int(grace), float(factor)),
                                         int(max_t), args.concurrent)
                survivors = {i for i, e in tuned.items() if e >= int(max_t)}
                same += survivors == {i for i, e in row["epochs"].items() if e >= int(max_t)}
                total += 1
    finally:
        ray.shutdown()
    return (f"Check against real Tune runs ({', '.join(dict.fromkeys(keys))}; first {args.check} draws each): the "
            f"same survivors in {same} of {total} replays (Tune's interleaving of two trials depends on timing).")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
