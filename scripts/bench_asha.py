"""Benchmark: how ASHA behaves on noisy dev macro-F1 curves, judging raw, smoothed or best-so-far F1.

1. Record: a real search on the demo corpus whose trials all run the full budget (no pruning); each trial's
   epoch-by-epoch val_f1 is kept.
2. Replay: the recorded curves go through the real ``ASHAScheduler`` (a Tune trainable that reports a
   recorded curve), many times in shuffled arrival orders, judging by ``val_f1``, ``val_f1_ema`` and
   ``best_val_f1``. For each: how often the trial with the best final F1 survives to the end, the mean regret
   (best final F1 minus the best surviving trial's final F1) and the epochs spent against no pruning.

    python scripts/bench_asha.py                       # 12 trials x 40 epochs recorded, 20 orders per metric
    python scripts/bench_asha.py --trials 8 --epochs 20 --orders 5
    python scripts/bench_asha.py --reuse --graces 5 10 15   # replay the curves already in benchmarks/asha.json

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
    parser.add_argument("--trials", type=int, default=12, help="trials recorded at the full budget (default 12)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per recorded trial (default 40)")
    parser.add_argument("--orders", type=int, default=20, help="shuffled arrival orders per metric (default 20)")
    parser.add_argument("--graces", type=int, nargs="+", default=[5], help="ASHA grace periods to compare (default 5)")
    parser.add_argument("--reuse", action="store_true", help="replay the curves recorded in benchmarks/asha.json")
    parser.add_argument("--factor", type=float, default=3, help="ASHA reduction factor (default 3)")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once during replay (default 2)")
    args = parser.parse_args()

    if args.reuse:
        from _bench import BENCH_DIR
        import json

        saved = json.loads((BENCH_DIR / "asha.json").read_text())
        curves, record_seconds = saved["curves"], saved.get("record_seconds", 0.0)
        args.epochs = len(curves[0])
    else:
        start = time.perf_counter()
        summary = run_search(["space=encoders", f"search.name=bench-asha-record-{int(time.time())}",
                              f"search.num_samples={args.trials}", f"trial.max_epochs={args.epochs}",
                              "trial.early_stop=null", f"search.grace_period={args.epochs}"])  # nobody is stopped
        record_seconds = time.perf_counter() - start
        curves = [[{k: r[k] for k in METRICS} for r in trial["rows"][: args.epochs]]
                  for trial in trial_results(summary["experiment_dir"])]
    final = np.array([c[-1]["best_val_f1"] for c in curves])
    noise = float(np.mean([np.std(np.diff([r["val_f1"] for r in c])) for c in curves]))
    best = int(np.argmax(final))

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rng = np.random.default_rng(0)
    orders = [rng.permutation(len(curves)).tolist() for _ in range(args.orders)]
    outcomes = {}
    for grace in args.graces:
        for metric in METRICS:
            rows = []
            for order in orders:
                epochs = replay(curves, metric, order, args.epochs, grace, args.factor, args.concurrent)
                survivors = [i for i, e in epochs.items() if e >= args.epochs]
                best_survivor = max((final[i] for i in survivors), default=0.0)
                rows.append({"order": order, "epochs": epochs, "best_survives": best in survivors,
                             "regret": float(final[best] - best_survivor),
                             "epoch_share": sum(epochs.values()) / (len(curves) * args.epochs)})
            outcomes[f"{metric}@{grace}"] = rows
            print(f"grace {grace} {metric}: best survives {np.mean([r['best_survives'] for r in rows]):.2f}, "
                  f"regret {np.mean([r['regret'] for r in rows]):.4f}", flush=True)
    ray.shutdown()

    lines = [f"# ASHA on noisy dev macro-F1 ({len(curves)} recorded trials, {args.epochs} epochs, "
             f"{args.orders} shuffled orders per setting)", "",
             f"Recorded with a real search on the demo corpus (no pruning, {record_seconds / 60:.1f} min); "
             f"the mean epoch-to-epoch standard deviation of a trial's val_f1 is {noise:.3f}. Replayed through "
             f"the real ASHAScheduler (reduction factor {args.factor:g}, {args.concurrent} trials at a time). "
             f"The best trial's final best F1 is {final[best]:.3f}; the median trial's is {np.median(final):.3f}.", "",
             "| grace period | ASHA judges by | best trial survives | mean regret (± sd) | epochs spent vs no pruning |",
             "|---|---|---|---|---|"]
    for grace in args.graces:
        for metric in METRICS:
            rows = outcomes[f"{metric}@{grace}"]
            regret = mean_sd(r["regret"] for r in rows)
            share = np.mean([r["epoch_share"] for r in rows])
            lines.append(f"| {grace} | `{metric}` | {np.mean([r['best_survives'] for r in rows]):.0%} | "
                         f"{regret[0]:.4f} ± {regret[1]:.4f} | {share:.0%} |")
    lines += ["", "Regret = best final F1 of all trials minus the best final F1 among trials ASHA let finish.",
              f"Command: `python scripts/bench_asha.py --trials {len(curves)} --epochs {args.epochs} "
              f"--orders {args.orders} --graces {' '.join(map(str, args.graces))}`"
              + (" (replaying the recorded curves with --reuse)" if args.reuse else "")]
    write("asha", {"args": vars(args), "record_seconds": record_seconds, "final_best_f1": final.tolist(),
                   "curves": curves, "noise": noise, "outcomes": outcomes}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
