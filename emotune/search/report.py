"""What a search shows: Tune's live table, and at the end the trial table, the curves, the printed summary and the
report of what it learned (emotune/insight).

Trials rank by their ranking score, and the summary names the trials statistically tied with the best
(emotune/insight/standing.py): they are printed, listed in the summary (``tied``, the best first), marked in
trials.csv (``tied``: True, False, or empty for a trial that could not be compared) and counted, the best left
out, in the search run's metric ``trials_tied_with_best``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from emotune.config import SearchSettings, TrialSettings, typed
from emotune.insight.standing import Ties, ranking_score, scored_what, search_estimate, search_ties
from emotune.names import OBJECTIVE


def progress_table(cfg: dict):
    """Tune's table, every 20 s: each trial's sampled values and its latest dev macro-F1 figures."""
    from ray.tune import CLIReporter

    # conditional parameters are left out: Tune's table fails on trials that lack a column's key
    params = {key: key.split(".")[-1] for key, spec in cfg["space"]["params"].items() if not spec.get("when")}
    return CLIReporter(metric_columns={"epoch": "epoch", "val_loss": "loss", "val_f1": "val_f1", "val_f1_ema": "ema",
                                       OBJECTIVE: "score"},
                       parameter_columns=params, max_report_frequency=20, max_progress_rows=30,
                       metric=OBJECTIVE, mode="max", sort_by_metric=True, print_intermediate_tables=True)


def trial_table(results) -> list[dict]:
    """One row per trial, best-ranked first: id, status, epochs, ranking score, best dev macro-F1, MLflow run and
    sampled parameters."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        rows.append({"trial_id": metrics.get("trial_id", Path(result.path).name),
                     "status": "ERROR" if result.error else "TERMINATED",
                     "epochs": metrics.get("epoch"), "best_val_score": metrics.get("best_val_score"),
                     "best_val_f1": metrics.get("best_val_f1"),
                     "val_loss": metrics.get("val_loss"), "early_stopped": bool(metrics.get("early_stopped")),
                     "mlflow_run_id": metrics.get("mlflow_run_id"), "path": result.path,
                     **{f"param:{k}": v for k, v in (result.config or {}).items()}})
    # a stable sort: trials with equal scores keep Tune's order
    return sorted(rows, key=lambda r: -(ranking_score(r) if ranking_score(r) is not None else -1))


def _trials(n: int) -> str:
    return f"{n} trial{'' if n == 1 else 's'}"


def ties_text(ties: Ties, finished: Sequence[dict], trials_dir: Path) -> list[str]:
    """The summary's lines about the trials tied with the best."""
    method = f"paired bootstrap on {ties.scored}, {ties.confidence:.0%}"
    if ties.problem:
        return [f"Ties with the best not computed ({method}): {ties.problem}."]
    f1 = {str(r["trial_id"]): r["best_val_f1"] for r in finished}
    others = ties.tied[1:]
    if others:
        listed = ", ".join(f"{trial_id} ({f1[trial_id]:.4f})" for trial_id in others)
        lines = [f"Tied with the best ({method}): {_trials(len(others))}: {listed}"]
    elif ties.shares:
        n = len(ties.shares)
        lines = [f"No trial is tied with the best ({method}): it scores higher than "
                 f"{'the one other trial' if n == 1 else f'each of the {n} others'} compared in at least "
                 f"{ties.confidence:.0%} of the resamples."]
    else:
        lines = [f"No trial is tied with the best ({method}): no other trial could be compared."]
    reasons: dict[str, list[str]] = {}
    for trial_id, why in ties.skipped.items():
        reasons.setdefault(why, []).append(trial_id)
    for why, trial_ids in reasons.items():
        shown = ", ".join(trial_ids[:5]) + (", ..." if len(trial_ids) > 5 else "")
        lines.append(f"  {_trials(len(trial_ids))} not compared ({shown}): {why}; trial folders in {trials_dir}")
    return lines


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


def planned_metrics(timing: dict | None) -> dict:
    planned = (timing or {}).get("planned")
    return {} if planned is None else {"planned_seconds": planned.total_seconds,
                                       "planned_device_hours": planned.device_hours}


def planned_lines(timing: dict | None, seconds: float) -> list[str]:
    """The time plan beside what the search took, part by part, so that users learn how far to trust it."""
    planned = (timing or {}).get("planned")
    if planned is None:
        return []
    from emotune.features.plan import duration

    fill, fit = timing["fill_seconds"], timing["fit_seconds"]
    rest = seconds - fill - fit
    return [f"Planned {duration(planned.total_seconds)}, took {duration(seconds)} (actual/planned "
            f"{seconds / planned.total_seconds:.2f}): cache fill {duration(planned.fill_seconds)} planned, "
            f"{duration(fill)} actual; trials {duration(planned.trials_seconds)} planned, {duration(fit)} actual; "
            f"the rest {duration(planned.start_seconds + planned.end_seconds)} planned, {duration(rest)} actual."]


def summarise(cfg: dict, corpus, results, parent, experiment_dir: Path, seconds: float, reports: list[dict],
              timing: dict | None = None) -> dict:
    """Write the trial table and curves, close the search's run, and print the summary and the next commands.

    ``corpus``: the prepared corpus the search ran on (its dev split decides which trials are tied with the best).
    ``timing``: the fill's and the trials' seconds, and the time plan made at the start (or None).
    """
    search, trial = typed(SearchSettings, cfg["search"], "search"), typed(TrialSettings, cfg["trial"], "trial")
    rows = trial_table(results)
    # only trials that ended without error compete: a failed one is listed as failed, never crowned or counted as cut
    # (select-top leaves it out too)
    finished = [r for r in rows if r["best_val_f1"] is not None and r["status"] != "ERROR"]
    # a trial that ended before max_epochs was cut by ASHA unless its own early stopping (trial.early_stop) ended it
    early = sum(1 for r in finished if r["early_stopped"])
    cut = sum(1 for r in finished if not r["early_stopped"] and r["epochs"] is not None
              and r["epochs"] < trial.max_epochs)
    trials_dir = Path(cfg["paths"]["runs_dir"]) / "trials" / experiment_dir.name  # as the trials name it
    ties = search_ties(cfg, corpus, finished, trials_dir)
    estimate = search_estimate(cfg, corpus, finished, trials_dir)
    for row in rows:  # a failed trial is not tied; one not compared is left blank
        row["tied"] = False if row["status"] == "ERROR" else ties.mark(str(row["trial_id"]))
    out_dir = experiment_dir / "summary"
    files = [_write_trials_csv(rows, out_dir), _write_summary_json(out_dir, parent.run_id, seconds, timing)]
    plot = curves_png(results, out_dir / "curves.png", search.metric)
    if plot:
        files.append(plot)
    files += _report(cfg, corpus, experiment_dir)
    best = finished[0] if finished else None
    errors = [r for r in rows if r["status"] == "ERROR"]
    parent.log_metrics({"best_val_f1": best["best_val_f1"] if best else None, "trials": len(rows),
                        "trials_cut_by_asha": cut, "trials_early_stopped": early, "trials_failed": len(errors),
                        "trials_tied_with_best": len(ties.tied) - 1 if best and not ties.problem else None,
                        "search_seconds": seconds, **planned_metrics(timing),
                        **(estimate.metrics() if not isinstance(estimate, str) else {})})
    parent.log_artifacts(files, "summary")
    parent.finish("FINISHED" if not errors else "FAILED")

    summary = {"name": search.name, "trials": len(rows), "cut_by_asha": cut, "early_stopped": early,
               "failed": len(errors),
               "seconds": seconds, "parent_run_id": parent.run_id, "best": best, "tied": ties.tied,
               "experiment_dir": str(experiment_dir), "cache": reports,
               "estimate": None if isinstance(estimate, str) else estimate.metrics() | {"raw_f1": estimate.raw}}
    print()
    print(f"Search '{search.name}' done in {seconds / 60:.1f} min: {len(rows)} trials, {cut} cut by ASHA, "
          f"{early} ended by their own early stopping, {len(errors)} failed.")
    print("\n".join(planned_lines(timing, seconds)))
    budget, wanted = search.time_budget_s, search.num_samples
    if budget is not None and len(rows) < wanted:
        print(f"The time budget (search.time_budget_s={budget:g}) was spent after {len(rows)} of the {wanted} trials "
              "asked for; the trials under way then were finished.")
    _print_failures(errors)
    if best:
        _print_best(cfg, best)
        print(f"  {estimate.text(scored_what(trial), trial.folds)}" if not isinstance(estimate, str)
              else f"  Expected score on unseen clips not computed: {estimate}.")
        print("\n".join(ties_text(ties, finished, trials_dir)))
    print(f"All trials: {out_dir / 'trials.csv'}   curves: {out_dir / 'curves.png'}")
    if (out_dir / "report.html").is_file():
        print(f"What the search learned (settings that matter, encoder pairs): {out_dir / 'report.html'}")
    _print_next_commands(cfg)
    return summary


def _write_summary_json(out_dir: Path, run_id: str, seconds: float, timing: dict | None) -> Path:
    """What the report needs of the search besides its trials: its MLflow run, its time and its plan."""
    import json
    import time

    planned = planned_metrics(timing).get("planned_seconds")
    path = out_dir / "summary.json"
    path.write_text(json.dumps({"parent_run_id": run_id, "seconds": seconds, "planned_seconds": planned,
                                "started_at": time.time() - seconds}, indent=1))
    return path


def _report(cfg: dict, corpus, experiment_dir: Path) -> list[Path]:
    """Write the search's report.html (emotune/insight) from what it just wrote; its files, to log with the rest.
    A report that fails is said in one line and leaves the search's results as they are."""
    from emotune.errors import EmotuneError
    from emotune.insight.page import write_report
    from emotune.insight.record import load_record

    try:
        page, pngs = write_report(load_record(cfg, experiment_dir.name), corpus)
    except (EmotuneError, OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"The report was not written ({type(exc).__name__}: {exc}); `emotune report --search "
              f"{experiment_dir.name}` tries again.")
        return []
    return [page, *pngs]


def _write_trials_csv(rows: list[dict], out_dir: Path) -> Path:
    """The search's trials.csv in ``out_dir``: one row per trial, its own columns first, then its parameters."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "trials.csv"
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("param:"), k))
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return table


def _print_failures(errors: list[dict]) -> None:
    """Each failed trial's last error line and its traceback file."""
    for row in errors:  # Tune's own table points at a temporary copy; these files stay with the search
        error_file = Path(row["path"]) / "error.txt"
        last = error_file.read_text().strip().splitlines()[-1] if error_file.is_file() else "no error file"
        print(f"  trial {row['trial_id']} failed: {last}\n    traceback: {error_file}")


def _print_best(cfg: dict, best: dict) -> None:
    """The best trial: its scores, sampled parameters, MLflow run and where its checkpoint and predictions are."""
    from emotune.tracking.store import TrackedRun

    params = {k[6:]: v for k, v in best.items() if k.startswith("param:")}
    artifacts = ""
    if best.get("mlflow_run_id"):
        artifacts = TrackedRun(cfg["tracking"], best["mlflow_run_id"]).client.get_run(
            best["mlflow_run_id"]).info.artifact_uri + "/best"
    score = best.get("best_val_score")
    trial = typed(TrialSettings, cfg["trial"], "trial")
    by = "" if score is None or score == best["best_val_f1"] else f" (score {score:.4f} by {trial.select_by})"
    print(f"Best trial {best['trial_id']}: {scored_what(trial)} macro-F1 {best['best_val_f1']:.4f}{by} after "
          f"{best['epochs']} epochs")
    for key, value in params.items():
        print(f"  {key} = {value:.4g}" if isinstance(value, float) else f"  {key} = {value}")
    print(f"  MLflow run {best['mlflow_run_id']}; checkpoint and predictions: {artifacts}")


def _print_next_commands(cfg: dict) -> None:
    """The commands that come next, spelled so that they find this search from the current folder."""
    name = typed(SearchSettings, cfg["search"], "search").name
    runs_dir = cfg["paths"]["runs_dir"]
    where = "" if Path(runs_dir) == Path("runs").resolve() else f" paths.runs_dir={runs_dir}"
    print("Next:")
    print(f"  emotune ui{where}    # compare the trials in MLflow ({cfg['tracking']['uri']})")
    print(f"  emotune select-top --k 3 --search {name}{where}    # ensemble the best trials")
    print(f"  emotune select-top --k tied --search {name}{where}    # or the best and those tied "
          "with it")
