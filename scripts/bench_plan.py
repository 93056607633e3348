"""Benchmark: how close is `emotune plan`'s wall time to the search it plans?

For each case, in a runs folder of its own with an empty feature cache (the demo corpus is synthesized once
beforehand: building a corpus is not part of a search), `emotune plan ... --json` runs in a fresh process, then
the search itself (`python -m emotune.search ...`), timed from its process' start to its end, as a user sees it.

- ``demo``: the main job, `space=encoders` on the demo corpus (scripts/demo.sh);
- ``smoke``: `space=smoke` on the demo corpus;
- ``demo-evals3``: the demo search evaluating three times per epoch (`trial.evals_per_epoch=3`).

Reported: planned and measured seconds, the ratio, and the plan's parts beside the search's (fill, trials). The
goal: every ratio within 0.75-1.33. Also the paper's 4 x 4 search on a MEACorpus-size corpus, planned for one
stated GPU box (no run: there is no GPU here), in device-hours.

    python scripts/bench_plan.py                  # about 10 minutes on 2 cores
    python scripts/bench_plan.py --cases smoke    # one case

Writes benchmarks/plan.json (worst_ratio, paper_search_device_hours, the cases) and benchmarks/plan.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _bench import ROOT, RUNS_DIR, write

CASES = {
    "demo": ["space=encoders"],
    "smoke": ["space=smoke"],
    "demo-evals3": ["space=encoders", "trial.evals_per_epoch=3"],
}
GOAL = (0.75, 1.33)
# The paper's search planned for a GPU box: one NVIDIA A100 (312 TFLOP/s dense bf16 peak; 100 effective, a third,
# is what frozen-encoder inference and small heads reach) per trial, two of them as in the paper, NVMe at 3 GB/s.
PAPER = ["space=encoders", "encoders=hub", "trial.folds=1", "search.resources.gpu=1", "search.resources.cpu=4",
         "--clips", "5129", "--hours", "13.16", "--device-tflops", "100", "--read-gbps", "3", "--gpus", "2",
         "--cpus", "16"]


def emotune(args: list[str], log: Path) -> float:
    """Run ``python -m ARGS``, its output to ``log``; its wall seconds. A failure stops the benchmark."""
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}); see {log}")
    return seconds


def run_case(name: str, overrides: list[str], corpus_root: Path) -> dict:
    runs = RUNS_DIR / "bench-plan" / name
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    common = [*overrides, f"paths.runs_dir={runs}", f"data.root={corpus_root}", f"search.name=bench-plan-{name}"]
    plan_file = runs / "plan.json"
    plan_seconds = emotune(["emotune", "plan", *common, "--json", str(plan_file)], runs / "plan.log")
    plan = json.loads(plan_file.read_text())
    shutil.rmtree(runs / "cache", ignore_errors=True)  # the plan writes nothing there; the search starts empty
    measured = emotune(["emotune.search", *common], runs / "search.log")
    log = (runs / "search.log").read_text()
    found = re.search(r"cache fill \S+ \S+ planned, (.+?) actual; trials (.+?) planned, (.+?) actual", log)
    search = plan["search"]
    row = {"case": name, "overrides": overrides, "planned_seconds": plan["total_seconds"],
           "measured_seconds": round(measured, 1), "ratio": round(measured / plan["total_seconds"], 3),
           "planned_fill_seconds": round(search["fill_seconds"], 1),
           "planned_trials_seconds": search["trials_seconds"], "trials": search["trials"],
           "planned_trial_seconds": round(search["trial_seconds"], 1), "plan_command_seconds": round(plan_seconds, 1),
           "summary_line": found.group(0) if found else None}
    print(f"{name}: planned {row['planned_seconds']:.0f} s, measured {row['measured_seconds']:.0f} s, "
          f"ratio {row['ratio']:.2f}", flush=True)
    return row


def paper_line() -> dict:
    out = RUNS_DIR / "bench-plan" / "paper"
    out.mkdir(parents=True, exist_ok=True)
    emotune(["emotune", "plan", *PAPER, f"paths.runs_dir={out}", "--json", str(out / "plan.json")], out / "plan.log")
    plan = json.loads((out / "plan.json").read_text())
    return {"command": "emotune plan " + " ".join(PAPER), "device_hours": plan["device_hours"],
            "total_seconds": plan["total_seconds"], "fill_seconds": round(plan["search"]["fill_seconds"], 1),
            "trials_seconds": plan["search"]["trials_seconds"], "trials": plan["search"]["trials"],
            "cache_gb": plan["total_gb"], "table": (out / "plan.log").read_text().split("Search time plan", 1)[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    corpus_root = RUNS_DIR / "demo-corpus"
    if not (corpus_root / "train.csv").is_file():
        RUNS_DIR.mkdir(parents=True, exist_ok=True)
        emotune(["emotune", "demo-corpus", str(corpus_root)], RUNS_DIR / "bench-plan-corpus.log")
    rows = [run_case(name, CASES[name], corpus_root) for name in args.cases]
    paper = paper_line()
    worst = max(max(r["ratio"], 1 / r["ratio"]) for r in rows)
    data = {"worst_ratio": round(worst, 3), "paper_search_device_hours": paper["device_hours"], "goal": GOAL,
            "cases": rows, "paper": paper, "cpus": os.cpu_count()}
    md = ["# The time plan against real searches", "",
          f"`python scripts/bench_plan.py` on {os.cpu_count()} CPU cores, each search in a fresh runs folder with an "
          "empty cache; the search timed from its process' start to its end. Goal: every ratio within "
          f"{GOAL[0]}-{GOAL[1]}.", "",
          "| case | overrides | planned | measured | measured / planned |", "|---|---|---|---|---|"]
    md += [f"| {r['case']} | `{' '.join(r['overrides'])}` | {r['planned_seconds']:.0f} s | "
           f"{r['measured_seconds']:.0f} s | {r['ratio']:.2f} |" for r in rows]
    md += ["", f"Worst ratio (the larger of measured/planned and planned/measured): {worst:.2f}.", "",
           "What each search's summary printed, plan beside actual:", ""]
    md += [f"- {r['case']}: {r['summary_line']}" for r in rows]
    md += ["", "## The paper's search on a GPU box", "", f"`{paper['command']}`", "",
           f"Planned: {paper['device_hours']:.2f} GPU-hours, {paper['total_seconds'] / 3600:.2f} h wall "
           f"({paper['trials']} trials; fill {paper['fill_seconds'] / 60:.0f} min; cache {paper['cache_gb']} GB).",
           "", "```", "Search time plan" + paper["table"].rstrip(), "```"]
    write("plan", data, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
