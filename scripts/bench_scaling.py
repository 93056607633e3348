"""Benchmark: trials per hour with 1 and with 2 concurrent trials on this machine, and per-trial overhead.

Runs the same demo search (fixed seed, no pruning, warm feature cache) with ``search.max_concurrent`` 1 and
2 (one CPU per trial). Reports trials per hour over the trial phase, and per trial its set-up time (corpus,
cached features, model, MLflow run: from the trial's start to its first epoch), its training time and the
remaining overhead (evaluation, checkpoints, artifacts, reports).

    python scripts/bench_scaling.py                   # 6 trials x 20 epochs per setting (about 8 minutes)
    python scripts/bench_scaling.py --trials 4 --epochs 10

Writes benchmarks/scaling.json and benchmarks/scaling.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from _bench import run_search, trial_results, write


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials per setting (default 6)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per trial (default 20)")
    args = parser.parse_args()

    measured = {}
    for concurrent in (1, 2):
        summary = run_search(["space=encoders", f"search.name=bench-scaling-{concurrent}-{int(time.time())}",
                              f"search.num_samples={args.trials}", f"search.max_concurrent={concurrent}",
                              f"trial.max_epochs={args.epochs}", f"search.grace_period={args.epochs}",
                              "trial.early_stop=null"])
        trials = trial_results(summary["experiment_dir"])
        per_trial = []
        for t in trials:
            rows = t["rows"]
            total = rows[-1]["time_total_s"]
            train = sum(r["epoch_seconds"] for r in rows)
            setup = rows[0].get("setup_seconds", 0.0)
            per_trial.append({"total": total, "setup": setup, "train": train, "other": total - setup - train})
        fit = summary["fit_seconds"]
        measured[concurrent] = {"fit_seconds": fit, "trials": len(trials),
                                "trials_per_hour": len(trials) / fit * 3600, "per_trial": per_trial,
                                "search_seconds": summary["seconds"]}
        print(f"{concurrent} concurrent: {len(trials)} trials in {fit:.0f} s", flush=True)

    lines = [f"# Throughput on 2 cores ({args.trials} trials x {args.epochs} epochs, no pruning, warm cache)", "",
             "| concurrent trials | trials per hour | trial phase | mean trial time | set-up | training | "
             "other (eval, checkpoints, MLflow) |", "|---|---|---|---|---|---|---|"]
    for concurrent, m in measured.items():
        mean = {k: float(np.mean([p[k] for p in m["per_trial"]])) for k in ("total", "setup", "train", "other")}
        lines.append(f"| {concurrent} | {m['trials_per_hour']:.0f} | {m['fit_seconds']:.0f} s | "
                     f"{mean['total']:.1f} s | {mean['setup']:.1f} s ({mean['setup'] / mean['total']:.0%}) | "
                     f"{mean['train']:.1f} s ({mean['train'] / mean['total']:.0%}) | {mean['other']:.1f} s "
                     f"({mean['other'] / mean['total']:.0%}) |")
    speedup = measured[2]["trials_per_hour"] / measured[1]["trials_per_hour"]
    lines += ["", f"Two concurrent trials give {speedup:.2f}x the throughput of one. The gap between the trial "
              "phase and the sum of trial times is Ray's scheduling and actor start-up.",
              f"Command: `python scripts/bench_scaling.py --trials {args.trials} --epochs {args.epochs}`"]
    write("scaling", {"args": vars(args), "measured": measured, "speedup": speedup}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
