"""Shared helpers of the benchmark scripts: run a real search, read its trials, write JSON and a markdown table."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH_DIR = ROOT / "benchmarks"
RUNS_DIR = ROOT / "runs"  # the project's runs folder, wherever the script is started from


def run_search(overrides: list[str]) -> dict:
    """Compose the search config from ``overrides`` and run it (real Ray Tune, Optuna, ASHA, MLflow)."""
    from emotune.config import load_config
    from emotune.search.driver import run_search as run

    return run(load_config([f"paths.runs_dir={RUNS_DIR}", *overrides], "search"))


def trial_results(experiment_dir: str | Path) -> list[dict]:
    """Every trial's reported rows (one per epoch), read from Ray's result files."""
    trials = []
    for result in sorted(Path(experiment_dir).glob("*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            trials.append({"trial_id": rows[-1]["trial_id"], "rows": rows})
    return trials


def mean_sd(values) -> tuple[float, float]:
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write(name: str, data: dict, markdown: list[str]) -> None:
    BENCH_DIR.mkdir(exist_ok=True)
    (BENCH_DIR / f"{name}.json").write_text(json.dumps(data, indent=2))
    (BENCH_DIR / f"{name}.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))
    print(f"\nwritten: {BENCH_DIR / (name + '.json')} and {BENCH_DIR / (name + '.md')}")
