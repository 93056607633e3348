"""Benchmark: what ensembling the top trials gains over the best single trial, across search seeds.

For each seed a full demo search runs (``space=encoders``, its sampler and trial seeds set to the seed; the
data split stays fixed), then ``select-top`` builds the hard, soft and greedy ensembles. Everything is scored
on the demo corpus's labelled test split, which selection never sees: the best single trial is the one with
the best dev macro-F1.

    python scripts/bench_ensemble.py                  # seeds 0 1 2 (about 10 minutes on 2 cores)
    python scripts/bench_ensemble.py --seeds 0 1 2 3 --k 5

Writes benchmarks/ensemble.json and benchmarks/ensemble.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from emotune.names import ENSEMBLE_METHODS

from _bench import RUNS_DIR, mean_sd, run_search, write

METHODS = ENSEMBLE_METHODS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds (default 0 1 2)")
    parser.add_argument("--k", type=int, default=3, help="members of the hard and soft ensembles (default 3)")
    parser.add_argument("--samples", type=int, default=10, help="trials per search (default 10)")
    args = parser.parse_args()

    from emotune.config import load_config
    from emotune.selection.ensemble import EnsembleRequest, select_top

    rows = []
    for seed in args.seeds:
        name = f"bench-ensemble-seed{seed}-{int(time.time())}"  # a new search, not the resumption of an old one
        run_search(["space=encoders", f"search.name={name}", f"search.sampler_seed={seed}", f"trial.seed={seed}",
                    f"search.num_samples={args.samples}"])
        row = {"seed": seed}
        for method in METHODS:
            cfg = load_config([f"paths.runs_dir={RUNS_DIR}"])
            summary = select_top(cfg, EnsembleRequest(k=args.k, method=method, search=name,
                                                      out_dir=RUNS_DIR / "ensembles" / f"{name}-{method}"))
            row[method] = summary["macro_f1"]
            if method == "hard":  # members are ranked by dev F1: the first is the best single trial
                row["best_single"] = summary["members"][0]["eval_macro_f1"]
                row["best_single_dev"] = summary["members"][0]["dev_f1"]
            if method == "greedy":
                row["greedy_members"] = len(summary["members"])
        rows.append(row)
        print(row, flush=True)

    columns = ["best_single", *METHODS]
    lines = [f"# Ensembles of the top trials vs the best single trial ({len(rows)} search seeds, "
             f"{args.samples} trials each, k={args.k})", "",
             "Test macro-F1 on the demo corpus's held-out test split; members are chosen on dev only.", "",
             "| seed | best single | hard | soft | greedy |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r[c]:.3f}" for c in columns) + " |")
    stats = {c: mean_sd(r[c] for r in rows) for c in columns}
    lines.append("| mean ± sd | " + " | ".join(f"{stats[c][0]:.3f} ± {stats[c][1]:.3f}" for c in columns) + " |")
    gains = {m: mean_sd(r[m] - r["best_single"] for r in rows) for m in METHODS}
    lines += ["", "Gain over the best single trial: " + ", ".join(
        f"{m} {gains[m][0]:+.3f} ± {gains[m][1]:.3f}" for m in METHODS) + ".",
        f"Command: `python scripts/bench_ensemble.py --seeds {' '.join(map(str, args.seeds))} --k {args.k}`"]
    write("ensemble", {"args": vars(args), "rows": rows, "stats": stats, "gains": gains}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
