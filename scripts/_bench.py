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


def record_pool(record_one, todo: list, partial: Path, workers: int, score_name: str) -> dict:
    """``record_one`` over the jobs ``todo`` in ``workers`` spawned processes; each finished entry (a dict with
    ``index``, ``rows`` and ``wall_seconds``) is appended to ``partial`` as one JSON line at once, so that a stopped
    recording continues where it was. Returns the new entries by index."""
    import multiprocessing
    import time

    done = {}
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool, partial.open("a") as out:
        for count, entry in enumerate(pool.imap_unordered(record_one, todo), start=1):
            out.write(json.dumps(entry) + "\n")
            out.flush()
            done[entry["index"]] = entry
            elapsed = time.perf_counter() - started
            print(f"{count}/{len(todo)} configuration {entry['index']}: best {score_name} "
                  f"{max(r['val_f1'] for r in entry['rows']):.3f} ({entry['wall_seconds']:.0f} s; "
                  f"{elapsed / 60:.1f} min so far, about {elapsed / count * (len(todo) - count) / 60:.0f} min to go)",
                  flush=True)
    return done
