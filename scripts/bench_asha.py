"""Benchmark: how ASHA behaves on noisy dev macro-F1 curves, judging raw, smoothed or best-so-far F1.

1. Record: a real search on the demo corpus whose trials all run the full budget (no pruning); each trial's
   epoch-by-epoch val_f1, val_f1_ema and best_val_f1 are kept.
2. Replay: the recorded curves go through the real ``ASHAScheduler`` (a Tune trainable that reports a
   recorded curve). Each replay draws a random pool of trials from the recording, in a random arrival
   order, so that the best trial differs from replay to replay; every setting (grace period x metric) sees
   the same draws. For each setting: how often the pool's best trial (best final best_val_f1) survives to
   the end, the mean regret (that trial's final F1 minus the best survivor's) and the epochs spent against
   no pruning.

    python scripts/bench_asha.py                        # record 24 trials x 40 epochs, 40 replays of 12
    python scripts/bench_asha.py --trials 12 --pool 8 --replays 10 --graces 5
    python scripts/bench_asha.py --reuse                 # replay the curves already in benchmarks/asha.json

Writes benchmarks/asha.json and benchmarks/asha.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from _bench import mean_sd, run_search, trial_results, write

METRICS = ("val_f1", "val_f1_ema", "best_val_f1")


def replay_trainable(config: dict, curves: list) -> None:
    from ray import tune

    for row in curves[config["curve_id"]]:
        tune.report(row)


def replay(curves: list[list[dict]], metric: str, order: list[int], max_t: int, grace: int, factor: float,
           concurrent: int) -> dict:
    """One replay through the real ASHAScheduler; returns which trials survived and the epochs they used."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(time_attr="training_iteration", metric=metric, mode="max", max_t=max_t,
                              grace_period=grace, reduction_factor=factor)
    tuner = tune.Tuner(
        tune.with_parameters(replay_trainable, curves=curves),
        param_space={"curve_id": tune.grid_search(order)},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(verbose=0, storage_path="/tmp/emotune-bench-asha"),
    )
    results = tuner.fit()
    epochs = {}
    for result in results:
        epochs[result.config["curve_id"]] = int(result.metrics.get("training_iteration", 0))
    return epochs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24, help="trials recorded at the full budget (default 24)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per recorded trial (default 40)")
    parser.add_argument("--pool", type=int, default=12, help="trials drawn from the recording per replay (default 12)")
    parser.add_argument("--replays", type=int, default=40, help="replays per setting (default 40)")
    parser.add_argument("--graces", type=int, nargs="+", default=[5, 10, 15],
                        help="ASHA grace periods to compare (default 5 10 15)")
    parser.add_argument("--reuse", action="store_true", help="replay the curves recorded in benchmarks/asha.json")
    parser.add_argument("--factor", type=float, default=3, help="ASHA reduction factor (default 3)")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once during replay (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the recorded search and of the draws (default 0)")
    args = parser.parse_args()

    if args.reuse:
        import json

        from _bench import BENCH_DIR

        saved = json.loads((BENCH_DIR / "asha.json").read_text())
        curves, record_seconds = saved["curves"], saved.get("record_seconds", 0.0)
        args.trials, args.epochs = len(curves), len(curves[0])
    else:
        start = time.perf_counter()
        summary = run_search(["space=encoders", f"search.name=bench-asha-record-{int(time.time())}",
                              f"search.num_samples={args.trials}", f"trial.max_epochs={args.epochs}",
                              f"seed={args.seed}", "trial.early_stop=null",
                              f"search.grace_period={args.epochs}"])  # nobody is stopped
        record_seconds = time.perf_counter() - start
        curves = [[{k: r[k] for k in METRICS} for r in trial["rows"][: args.epochs]]
                  for trial in trial_results(summary["experiment_dir"])]
        curves = [c for c in curves if len(c) == args.epochs]
    if args.pool > len(curves):
        parser.error(f"--pool {args.pool} is larger than the {len(curves)} recorded trials")
    final = np.array([c[-1]["best_val_f1"] for c in curves])
    noise = float(np.mean([np.std(np.diff([r["val_f1"] for r in c])) for c in curves]))

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rng = np.random.default_rng(args.seed)
    draws = [rng.choice(len(curves), size=args.pool, replace=False).tolist() for _ in range(args.replays)]
    outcomes = {}
    replay_started = time.perf_counter()
    for grace in args.graces:
        for metric in METRICS:
            rows = []
            for order in draws:
                best = max(order, key=lambda i: final[i])
                epochs = replay(curves, metric, order, args.epochs, grace, args.factor, args.concurrent)
                survivors = [i for i, e in epochs.items() if e >= args.epochs]
                best_survivor = max((final[i] for i in survivors), default=0.0)
                rows.append({"order": order, "epochs": epochs, "best_survives": best in survivors,
                             "regret": float(final[best] - best_survivor),
                             "epoch_share": sum(epochs.values()) / (len(order) * args.epochs)})
            outcomes[f"{metric}@{grace}"] = rows
            print(f"grace {grace} {metric}: best survives {np.mean([r['best_survives'] for r in rows]):.2f}, "
                  f"regret {np.mean([r['regret'] for r in rows]):.4f}", flush=True)
    replay_seconds = time.perf_counter() - replay_started
    ray.shutdown()

    spread = np.mean([np.ptp(final[d]) for d in draws])
    lines = [f"# ASHA on noisy dev macro-F1 ({len(curves)} recorded trials x {args.epochs} epochs; "
             f"{args.replays} replays of {args.pool} per setting)", "",
             f"Recorded with a real `space=encoders` search on the demo corpus (seed {args.seed}, no pruning, "
             f"{record_seconds / 60:.1f} min). The mean epoch-to-epoch standard deviation of a trial's val_f1 is "
             f"{noise:.3f}; trials' final best F1 range from {final.min():.3f} to {final.max():.3f} (median "
             f"{np.median(final):.3f}), and within a replay's pool the best and worst differ by {spread:.3f} on "
             f"average. Each replay draws {args.pool} recorded trials in a random order and runs them through the "
             f"real ASHAScheduler (reduction factor {args.factor:g}, {args.concurrent} trials at a time); every "
             f"setting sees the same draws.", "",
             "| grace period | ASHA judges by | pool's best trial survives | mean regret (± sd) | "
             "epochs spent vs no pruning |", "|---|---|---|---|---|"]
    for grace in args.graces:
        for metric in METRICS:
            rows = outcomes[f"{metric}@{grace}"]
            regret = mean_sd(r["regret"] for r in rows)
            share = np.mean([r["epoch_share"] for r in rows])
            lines.append(f"| {grace} | `{metric}` | {np.mean([r['best_survives'] for r in rows]):.0%} | "
                         f"{regret[0]:.4f} ± {regret[1]:.4f} | {share:.0%} |")
    lines += ["", "Regret = the pool's best final F1 minus the best final F1 among the trials ASHA let finish "
              "(final F1 = a trial's best_val_f1 after all epochs).",
              f"Command: `python scripts/bench_asha.py --trials {len(curves)} --epochs {args.epochs} --pool {args.pool} "
              f"--replays {args.replays} --graces {' '.join(map(str, args.graces))} --seed {args.seed}`"
              + (" (replaying the recorded curves with --reuse)" if args.reuse else "")
              + f"; replays took {replay_seconds / 60:.1f} min."]
    write("asha", {"args": vars(args), "record_seconds": record_seconds, "replay_seconds": replay_seconds,
                   "final_best_f1": final.tolist(), "curves": curves, "noise": noise, "draws": draws,
                   "outcomes": outcomes}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
