"""Benchmark: does emotune's search (as shipped) beat random search, TPE alone and the paper's point re-seeded,
at the same wall-clock budget?

For each search seed (``search.sampler_seed`` only: the split, the trial seed and the cache stay the same) and
each method, a real search runs on the demo corpus with ``search.time_budget_s=BUDGET`` and more trials asked
for than fit. The cache is filled once, before all methods, so that no method pays for it; the budget clock
starts at a search's first trial.

- ``default``: emotune's search as shipped (space=encoders, the default sampler and scheduler of
  conf/search/default.yaml, chosen by scripts/bench_hpo.py);
- ``random``: random draws, no pruning, the same first point (the space's known-good point);
- ``tpe``: Optuna's TPE without pruning;
- ``paper``: the space's known-good point (the paper's settings on the offline encoders), again and again
  with a new trial seed each time.

Reported per method: the best dev macro-F1 found against elapsed time (benchmarks/search.png), the time to reach
random search's final best, and the test macro-F1 of the best trial and of `select-top --k 3` (hard vote).

    python scripts/bench_search.py                          # 5 seeds x 4 methods x 150 s (about 1 hour)
    python scripts/bench_search.py --seeds 0 1 --budget 60  # a quick look

Writes benchmarks/search.json, benchmarks/search.md and benchmarks/search.png (``--out NAME``: NAME.* instead,
to keep another budget's results beside them; search.md links them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _bench import BENCH_DIR, RUNS_DIR, mean_sd, run_search, write

METHODS = ("default", "random", "tpe", "paper")
NO_PRUNING = "search.scheduler=none"  # every trial runs to its end (or its own early stopping)


def partial_file(out: str) -> Path:
    """The results so far, written after every search: a failure later on loses none of them."""
    return RUNS_DIR / f"bench-{out}-partial.json"


def paper_repeats_space(cfg: dict) -> Path:
    """A spaces folder whose space ``paper-repeats`` fixes the known-good point and draws only the trial seed."""
    nested: dict[str, dict] = {}
    for key, value in cfg["space"]["points_to_evaluate"][0].items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    folder = Path(tempfile.mkdtemp(prefix="emotune-bench-spaces-"))
    (folder / "space").mkdir()
    (folder / "space" / "paper-repeats.yaml").write_text(
        "# @package _global_\n# The known-good point of space=encoders, re-seeded: only trial.seed varies.\n"
        "space:\n  name: paper-repeats\n  params:\n    trial.seed: {int: [1, 1000000]}\n  points_to_evaluate: []\n"
        + "".join(f"{section}:\n" + "".join(f"  {key}: {value!r}\n" for key, value in keys.items())
                  for section, keys in nested.items()))
    return folder


def method_overrides(method: str, seed: int, budget: float, spaces: Path) -> list[str]:
    common = [f"search.sampler_seed={seed}", f"search.time_budget_s={budget}", "search.num_samples=200"]
    if method == "default":
        return ["space=encoders", *common]
    if method == "random":
        return ["space=encoders", "search.sampler=random", NO_PRUNING, *common]
    if method == "tpe":
        return ["space=encoders", "search.sampler=tpe", NO_PRUNING, *common]
    return [f"paths.spaces_dir={spaces}", "space=paper-repeats", "search.sampler=random", NO_PRUNING, *common]


def best_so_far(experiment_dir: str) -> list[tuple[float, float]]:
    """(seconds since the search's first trial started, best dev macro-F1 so far) at each trial's end."""
    ends = []
    for result in Path(experiment_dir).glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            first = rows[0]["timestamp"] - rows[0]["time_total_s"]
            ends.append((first, rows[-1]["timestamp"], max(r["best_val_f1"] for r in rows)))
    start = min(e[0] for e in ends)
    curve, best = [], -1.0
    for _, end, f1 in sorted(ends, key=lambda e: e[1]):
        best = max(best, f1)
        curve.append((end - start, best))
    return curve


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, f1 in curve if f1 >= target - 1e-12), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="search seeds (default 0-4)")
    parser.add_argument("--budget", type=float, default=150, help="seconds per search, from its first trial "
                        "(default 150)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to run")
    parser.add_argument("--out", default="search", help="name of the files written to benchmarks/ (default "
                        "search)")
    parser.add_argument("--report-only", action="store_true", help="write the report from runs/bench-OUT-partial.json "
                        "(the results of an earlier run) without running searches")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads(partial_file(args.out).read_text())
        report(saved["runs"], argparse.Namespace(**(saved["args"] | {"out": args.out})))
        return 0

    import ray

    from emotune.config import load_config
    from emotune.selection.ensemble import EnsembleRequest, select_top

    # one Ray for every search (each leaves a running Ray as it found it): no start-up inside the budgets
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    spaces = paper_repeats_space(load_config(["space=encoders"], "search"))
    stamp = int(time.time())
    # fill the cache once, for every method: a one-epoch, one-trial search with every encoder of the space
    run_search(["space=encoders", f"search.name=bench-search-fill-{stamp}", "search.num_samples=1",
                "trial.max_epochs=1"])
    runs = {}
    for seed in args.seeds:
        for method in args.methods:
            name = f"bench-search-{method}-seed{seed}-{stamp}"
            summary = run_search([f"search.name={name}", *method_overrides(method, seed, args.budget, spaces)])
            curve = best_so_far(summary["experiment_dir"])
            cfg = load_config([f"paths.runs_dir={RUNS_DIR}"])
            ensemble = select_top(cfg, EnsembleRequest(k=min(3, summary["trials"]), method="hard", search=name,
                                                       out_dir=RUNS_DIR / "ensembles" / name))
            runs[f"{method}/{seed}"] = {
                "trials": summary["trials"], "curve": curve, "best_dev_f1": curve[-1][1],
                "best_trial_test_f1": ensemble["members"][0]["eval_macro_f1"], "ensemble_test_f1": ensemble["macro_f1"],
                "cut_by_asha": summary["cut_by_asha"]}
            print(method, seed, {k: v for k, v in runs[f"{method}/{seed}"].items() if k != "curve"}, flush=True)
            partial_file(args.out).write_text(json.dumps({"args": vars(args), "runs": runs}))
    report(runs, args)
    return 0


def report(runs: dict, args) -> None:
    """Write the tables, the JSON and the plot from the searches' results."""

    ratios, never = [], 0
    for seed in args.seeds:
        if "default" not in args.methods or "random" not in args.methods:
            break
        random_curve, default_curve = runs[f"random/{seed}"]["curve"], runs[f"default/{seed}"]["curve"]
        target = random_curve[-1][1]
        t_random = time_to_reach(random_curve, target)
        t_default = time_to_reach(default_curve, target)
        if t_default is None:  # never reached it within the budget: counts as the whole budget, never below 1
            never += 1
            ratios.append(max(1.0, args.budget / t_random))
        else:
            ratios.append(t_default / t_random)

    def stat(method: str, key: str) -> tuple[float, float]:
        return mean_sd(runs[f"{method}/{s}"][key] for s in args.seeds)

    from emotune.config import load_config

    shipped = load_config([], "search")["search"]
    default = f"{shipped['sampler']} + {shipped['scheduler']}"
    others = {"random": "random search", "tpe": "TPE alone", "paper": "the paper's point re-seeded"}
    against = ", ".join(others[m] for m in args.methods if m in others)
    lines = [f"# emotune's default search ({default}) against {against} ({len(args.seeds)} "
             f"search seeds, {args.budget:g} s each)", "",
             "Demo corpus, 2 CPU cores, two trials at a time. Each search stops proposing trials "
             f"{args.budget:g} s after its first trial started (`search.time_budget_s`) and finishes those under way; "
             "the cache was filled once before all of them. Only `search.sampler_seed` changes between seeds.", "",
             "| method | trials | best dev macro-F1 | test F1, best trial | test F1, select-top --k 3 |",
             "|---|---|---|---|---|"]
    for method in args.methods:
        trials = stat(method, "trials")
        dev, single, ens = stat(method, "best_dev_f1"), stat(method, "best_trial_test_f1"), stat(method,
                                                                                                  "ensemble_test_f1")
        lines.append(f"| {method} | {trials[0]:.1f} | {dev[0]:.4f} ± {dev[1]:.4f} | {single[0]:.4f} ± {single[1]:.4f} "
                     f"| {ens[0]:.4f} ± {ens[1]:.4f} |")
    data = {"args": vars(args), "runs": runs}
    if ratios:
        data |= {"time_to_random_best_ratio": float(np.mean(ratios)), "seeds_default_never_reached": never,
                 "ensemble_test_f1_default": stat("default", "ensemble_test_f1")[0],
                 "ensemble_test_f1_random": stat("random", "ensemble_test_f1")[0]}
        lines += ["", f"Time for the default search to reach random search's final best dev F1, over random's own "
                  f"time to it: {np.mean(ratios):.2f} (mean over seeds; per seed "
                  f"{', '.join(f'{r:.2f}' for r in ratios)}; {never} seed(s) never reached it within the budget and "
                  "count as budget / random's time, at least 1). Goal: <= 0.33, and a k = 3 ensemble at least as "
                  "good as random's on test."]
    if {"default", "random"} <= set(args.methods):
        for key, what in (("best_trial_test_f1", "the best trial"), ("ensemble_test_f1", "select-top --k 3")):
            gains = [runs[f"default/{s}"][key] - runs[f"random/{s}"][key] for s in args.seeds]
            lines += ["", f"Test F1 of {what}, default minus random, paired by seed: mean {np.mean(gains):+.4f} "
                      f"(per seed {', '.join(f'{g:+.4f}' for g in gains)})."]
            data[f"{key}_gain_vs_random"] = float(np.mean(gains))
    if {"tpe", "random"} <= set(args.methods) and all(
            runs[f"tpe/{s}"]["best_dev_f1"] == runs[f"random/{s}"]["best_dev_f1"] for s in args.seeds):
        lines += ["", "TPE without pruning found the very trial random search found at every seed: Optuna's TPE draws "
                  "its first 10 proposals (n_startup_trials) at random, from the same seed as the random sampler, and "
                  f"no search here ran more than {max(runs[f'tpe/{s}']['trials'] for s in args.seeds)} trials without "
                  "pruning. Within this budget only ASHA's extra trials can tell TPE + ASHA from random search."]
    out = args.out
    lines += ["", f"![best dev macro-F1 against time]({out}.png)", "",
              f"Command: `python scripts/bench_search.py --seeds {' '.join(map(str, args.seeds))} --budget "
              f"{args.budget:g}{'' if out == 'search' else ' --out ' + out}"
              f"{'' if list(args.methods) == list(METHODS) else ' --methods ' + ' '.join(args.methods)}`."]
    others = sorted(p.stem for p in BENCH_DIR.glob("search*.md") if p.stem != out)
    if others:
        lines += ["", "Other runs of this benchmark: " + ", ".join(f"[{o}]({o}.md)" for o in others) + "."]
    plot(runs, args, BENCH_DIR / f"{out}.png")
    write(out, data, lines)


def plot(runs: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green", "tab:gray")))
    grid = np.linspace(0, max(t for run in runs.values() for t, _ in run["curve"]) + 1, 300)
    for method in args.methods:
        curves = []
        for seed in args.seeds:
            curve = runs[f"{method}/{seed}"]["curve"]
            times, best = [t for t, _ in curve], [f for _, f in curve]
            curves.append([best[i - 1] if (i := np.searchsorted(times, g, side="right")) else np.nan for g in grid])
            ax.step(times, best, where="post", color=colors[method], alpha=0.2, lw=1)
        # the mean from the moment every seed has a finished trial (before, it would mix different seeds)
        mean = np.mean(np.array(curves, dtype=float), axis=0)
        ax.plot(grid, mean, color=colors[method], lw=2, label=method)
    ax.axvline(args.budget, color="black", lw=0.8, ls=":")
    ax.set_xlabel("seconds since the search's first trial started")
    ax.set_ylabel("best dev macro-F1 so far")
    ax.set_title(f"{len(args.seeds)} seeds: each seed faint, their mean bold (once all have a trial); dotted: the "
                 "budget", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
