"""What a search shows: Tune's live table, and at the end the trial table, the curves and the printed summary."""

from __future__ import annotations

import csv
from pathlib import Path


def progress_table(cfg: dict):
    """Tune's table, every 20 s: each trial's sampled values and its latest dev macro-F1 figures."""
    from ray.tune import CLIReporter

    # conditional parameters are left out: Tune's table fails on trials that lack a column's key
    params = {key: key.split(".")[-1] for key, spec in cfg["space"]["params"].items() if not spec.get("when")}
    return CLIReporter(metric_columns={"epoch": "epoch", "val_loss": "loss", "val_f1": "val_f1", "val_f1_ema": "ema",
                                       "best_val_f1": "best"},
                       parameter_columns=params, max_report_frequency=20, max_progress_rows=30,
                       metric="best_val_f1", mode="max", sort_by_metric=True, print_intermediate_tables=True)


def trial_table(results) -> list[dict]:
    """One row per trial: id, status, epochs, best dev macro-F1, MLflow run and sampled parameters."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        rows.append({"trial_id": metrics.get("trial_id", Path(result.path).name),
                     "status": "ERROR" if result.error else "TERMINATED",
                     "epochs": metrics.get("epoch"), "best_val_f1": metrics.get("best_val_f1"),
                     "val_loss": metrics.get("val_loss"), "early_stopped": bool(metrics.get("early_stopped")),
                     "mlflow_run_id": metrics.get("mlflow_run_id"), "path": result.path,
                     **{f"param:{k}": v for k, v in (result.config or {}).items()}})
    return sorted(rows, key=lambda r: -(r["best_val_f1"] if r["best_val_f1"] is not None else -1))


def curves_png(results, path: Path, metric: str) -> Path | None:
    """Every trial's dev macro-F1 per epoch in one plot: where ASHA stopped whom, and who won."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    drawn = 0
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or frame.empty or "val_f1" not in frame:
            continue
        ax.plot(frame["epoch"], frame["val_f1"], alpha=0.35, lw=1)
        if metric in frame:
            ax.plot(frame["epoch"], frame[metric], lw=1.5)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("dev macro-F1")
    ax.set_title(f"{drawn} trials: raw val_f1 (faint) and ASHA's {metric}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summarise(cfg: dict, results, parent, experiment_dir: Path, seconds: float, reports: list[dict]) -> dict:
    """Write the trial table and curves, close the search's run, and print the summary and the next commands."""
    from emotune.tracking import TrackedRun

    rows = trial_table(results)
    # only trials that ended without error compete: a failed one is listed as failed, never crowned or counted as cut
    # (select-top leaves it out too)
    finished = [r for r in rows if r["best_val_f1"] is not None and r["status"] != "ERROR"]
    # a trial that ended before max_epochs was cut by ASHA unless its own early stopping (trial.early_stop) ended it
    early = sum(1 for r in finished if r["early_stopped"])
    cut = sum(1 for r in finished if not r["early_stopped"] and r["epochs"] is not None
              and r["epochs"] < int(cfg["trial"]["max_epochs"]))
    out_dir = experiment_dir / "summary"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "trials.csv"
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("param:"), k))
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    files = [table]
    plot = curves_png(results, out_dir / "curves.png", cfg["search"]["metric"])
    if plot:
        files.append(plot)
    best = finished[0] if finished else None
    errors = [r for r in rows if r["status"] == "ERROR"]
    parent.log_metrics({"best_val_f1": best["best_val_f1"] if best else None, "trials": len(rows),
                        "trials_cut_by_asha": cut, "trials_early_stopped": early, "trials_failed": len(errors),
                        "search_seconds": seconds})
    parent.log_artifacts(files, "summary")
    parent.finish("FINISHED" if not errors else "FAILED")

    summary = {"name": cfg["search"]["name"], "trials": len(rows), "cut_by_asha": cut, "early_stopped": early,
               "failed": len(errors),
               "seconds": seconds, "parent_run_id": parent.run_id, "best": best, "experiment_dir": str(experiment_dir),
               "cache": reports}
    print()
    print(f"Search '{cfg['search']['name']}' done in {seconds / 60:.1f} min: {len(rows)} trials, {cut} cut by ASHA, "
          f"{early} ended by their own early stopping, {len(errors)} failed.")
    budget, wanted = cfg["search"]["time_budget_s"], int(cfg["search"]["num_samples"])
    if budget is not None and len(rows) < wanted:
        print(f"The time budget (search.time_budget_s={budget:g}) was spent after {len(rows)} of the {wanted} trials "
              "asked for; the trials under way then were finished.")
    for row in errors:  # Tune's own table points at a temporary copy; these files stay with the search
        error_file = Path(row["path"]) / "error.txt"
        last = error_file.read_text().strip().splitlines()[-1] if error_file.is_file() else "no error file"
        print(f"  trial {row['trial_id']} failed: {last}\n    traceback: {error_file}")
    if best:
        params = {k[6:]: v for k, v in best.items() if k.startswith("param:")}
        artifacts = ""
        if best.get("mlflow_run_id"):
            artifacts = TrackedRun(cfg["tracking"], best["mlflow_run_id"]).client.get_run(
                best["mlflow_run_id"]).info.artifact_uri + "/best"
        print(f"Best trial {best['trial_id']}: dev macro-F1 {best['best_val_f1']:.4f} after {best['epochs']} epochs")
        for key, value in params.items():
            print(f"  {key} = {value:.4g}" if isinstance(value, float) else f"  {key} = {value}")
        print(f"  MLflow run {best['mlflow_run_id']}; checkpoint and predictions: {artifacts}")
    print(f"All trials: {out_dir / 'trials.csv'}   curves: {out_dir / 'curves.png'}")
    # the next commands, spelled so that they find this search from the current folder
    runs_dir = cfg["paths"]["runs_dir"]
    where = "" if Path(runs_dir) == Path("runs").resolve() else f" paths.runs_dir={runs_dir}"
    print("Next:")
    print(f"  emotune ui{where}    # compare the trials in MLflow ({cfg['tracking']['uri']})")
    print(f"  emotune select-top --k 3 --search {cfg['search']['name']}{where}    # ensemble the best trials")
    return summary
