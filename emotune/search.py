"""The search: Ray Tune runs trials, Optuna (TPE) proposes them, ASHA stops weak ones, MLflow records all.

    python -m emotune.search space=encoders                      # the embedded default: demo corpus, offline
    python -m emotune.search space=head search.num_samples=40 trial.max_epochs=60
    python -m emotune.search space=encoders encoders=hub data=folder data.root=/data/meacorpus
    python -m emotune.search space=encoders ray.address=auto     # on a cluster started with `ray start`

(``emotune search ...`` is the same command.) Running the same search name again resumes it: finished
trials are kept, unfinished ones continue from their checkpoints, and their MLflow runs are reused. The
search is one parent run in MLflow with a child run per trial.
"""

from __future__ import annotations

import copy
import csv
import os
import re
import signal
from dataclasses import asdict
import subprocess
import sys
import time
import warnings
from pathlib import Path

from emotune.driver_lock import DriverLock
from emotune.errors import EmotuneError, run_command

ASHA_METRICS = ("val_f1", "val_f1_ema", "best_val_f1")
USAGE = """usage: python -m emotune.search [space=NAME] [key=value ...]

Search spaces (space=NAME): {spaces}
Common keys: search.num_samples, search.max_concurrent, search.metric ({metrics}), search.grace_period,
  search.reduction_factor, search.resources.cpu, search.resources.gpu, search.name, trial.max_epochs,
  encoders=offline|hub, data=demo|folder, data.root, ray.address, paths.runs_dir, seed
Show the composed configuration: python -m emotune.search --cfg [key=value ...]
Size the feature cache first (nothing is downloaded or encoded): emotune plan [key=value ...]"""


def code_version() -> str:
    from emotune import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def _validate(cfg: dict) -> dict[str, list[str]]:
    """Check the space and the search settings before anything starts; return the encoders in play."""
    from emotune.space import encoders_in_play, validate_space

    space, search = cfg["space"], cfg["search"]
    validate_space(space, cfg)
    if search["metric"] not in ASHA_METRICS:
        raise EmotuneError(f"search.metric must be one of {', '.join(ASHA_METRICS)}, got '{search['metric']}'")
    if int(search["num_samples"]) < 1 or int(search["max_concurrent"]) < 1:
        raise EmotuneError("search.num_samples and search.max_concurrent must be at least 1")
    return encoders_in_play(cfg)


def print_plan(cfg: dict, corpus, encoders: dict[str, list[str]]):
    """The feature-cache plan of this search, printed; stops the search when the missing part cannot fit."""
    from emotune.features.plan import ClipSplits, plan_cache, refuse_if_too_big

    plan = plan_cache(cfg["features"], cfg["paths"]["runs_dir"], ClipSplits.of_corpus(corpus), encoders)
    if plan.encoders:
        print(plan.table(), flush=True)
    refuse_if_too_big(plan)
    return plan


def _init_ray(ray_cfg: dict) -> bool:
    """Start or join Ray as configured; False when Ray was already running in this process (left as it is)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": bool(ray_cfg.get("dashboard", False)), "log_to_driver": True,
              "configure_logging": True, "logging_level": "WARNING"}
    if ray_cfg.get("dashboard"):
        kwargs["dashboard_host"] = "127.0.0.1"  # a Ray dashboard runs code for whoever reaches it
    address = ray_cfg.get("address")
    if address:
        ray.init(address=address, **{k: v for k, v in kwargs.items() if k != "include_dashboard"})
    else:
        ray.init(num_cpus=ray_cfg.get("num_cpus"), **kwargs)
    return True


def fill_caches(cfg: dict, corpus, encoders: dict[str, list[str]]) -> tuple[list[dict], dict[str, object]]:
    """Build the feature cache of every encoder the space can pick, before any trial starts.

    Returns the build reports and, per ``"modality/name"``, the index part a trial reads that encoder's
    features with (so trials never load an encoder). The driver itself only reads the encoders' recipes;
    encoders are loaded where something is missing, by the cache workers.
    """
    import ray

    from emotune.features.cache import FeatureStore
    from emotune.features.distributed import CacheWorkers
    from emotune.features.prepare import encoder_recipe, fill_cache, index_part, plan_jobs

    if not cfg["features"].get("cache", True):
        return [], {}
    workers = int(ray.available_resources().get("CPU", 1))
    store = FeatureStore(cfg["features"]["dir"])
    lines, parts, started = [], {}, []

    def pool() -> CacheWorkers:  # started once, on the first encoder with something to encode, for all of them
        if not started:
            started.append(CacheWorkers(cfg["features"], workers, corpus.norm, str(store.root)))
        return started[0]

    try:
        for modality, names in encoders.items():
            for name in names:
                recipe = encoder_recipe(name, modality, corpus, cfg["features"], cfg["paths"]["runs_dir"])
                jobs = plan_jobs(corpus, recipe, cfg["features"], store)
                report = fill_cache(recipe, jobs, corpus, cfg["features"], progress=True,
                                    pool=pool if workers > 1 else None)
                print(report.line(), flush=True)
                lines.append(asdict(report))
                parts[f"{modality}/{name}"] = index_part(recipe, jobs, store, report)
    finally:
        for workers_pool in started:
            workers_pool.close()
    return lines, parts


def search_trainable(sampled: dict, base: dict, cached: dict | None = None) -> None:
    """What each Ray trial runs: the base config with this trial's sampled values written in.

    ``cached`` holds the driver's index part of every encoder whose cache it filled; a trial whose encoders
    are all there reads their features without loading the encoders.
    """
    import logging

    from emotune.features.cache import FeatureIndex
    from emotune.model import modalities_of
    from emotune.space import apply_sampled
    from emotune.trial import trainable

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one line per checkpoint otherwise
    cfg = apply_sampled(base, sampled)
    wanted = [f"{m}/{cfg['encoders'][m]}" for m in modalities_of(cfg["model"])]
    index = FeatureIndex.merge([cached[w] for w in wanted]) if cached and all(w in cached for w in wanted) else None
    trainable(cfg, index=index)


def _mlflow_callback(tracking: dict, max_epochs: int, trials_dir: Path):
    """A Tune callback that ends each trial's MLflow run, also when ASHA stopped the trial mid-way.

    For a stopped trial it also draws the dev report of its best model (the trial itself never got to).
    """
    from emotune.evaluation import dev_reports

    from ray.tune import Callback

    from emotune.tracking import TrackedRun

    class EndTrialRuns(Callback):
        def _end(self, trial, status: str) -> None:
            result = trial.last_result or {}
            run_id = result.get("mlflow_run_id")
            if not run_id:
                return
            run = TrackedRun(tracking, run_id)
            info = run.client.get_run(run_id).info
            if info.status != "RUNNING":
                return  # the trial finished its run itself
            stopped = status == "FINISHED" and int(result.get("epoch", 0)) < max_epochs
            run.log_metrics({"best_val_f1": result.get("best_val_f1"), "epochs_trained": result.get("epoch"),
                             "asha_stopped": float(stopped)}, step=int(result.get("epoch", 0)))
            if result.get("best_val_f1") is not None:
                title = f"dev macro-F1 {result['best_val_f1']:.4f}, best of {result.get('epoch')} epochs"
                run.log_artifacts(dev_reports(trials_dir / trial.trial_id / "best", title), "best")
            run.set_tags({"emotune.stopped_by": "asha" if stopped else ("error" if status == "FAILED" else "")})
            run.finish(status)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, "FAILED")

    return EndTrialRuns()


def _tuner(cfg: dict, base: dict, experiment_dir: Path, restore: bool, cached: dict):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from emotune.space import define_by_run, points_to_evaluate

    search = cfg["search"]
    resources = {"cpu": float(search["resources"]["cpu"]), "gpu": float(search["resources"].get("gpu", 0) or 0)}
    with_data = tune.with_parameters(search_trainable, base=base, cached=cached)
    # Ray's trainable registry is keyed by name: a name of its own keeps this search's payload from being
    # replaced by another search's on a shared cluster (ray #31330)
    with_data.__name__ = trainable_name(experiment_dir, restore)
    trainable = tune.with_resources(with_data, resources)
    if restore:
        return tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_errored=True)
    sampler = optuna.samplers.TPESampler(seed=int(search["sampler_seed"]), multivariate=True, group=True,
                                         constant_liar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna flags multivariate/group as experimental
        searcher = OptunaSearch(space=define_by_run(cfg["space"], cfg), metric="best_val_f1", mode="max",
                                sampler=sampler, points_to_evaluate=points_to_evaluate(cfg["space"], cfg) or None)
    # OptunaSearch alone starts more random trials than asked when many run in parallel (ray #52535)
    limited = ConcurrencyLimiter(searcher, max_concurrent=int(search["max_concurrent"]))
    max_epochs = int(cfg["trial"]["max_epochs"])
    # judged by the trial's own epoch count: a trial Tune starts again continues its epochs where it stopped
    scheduler = ASHAScheduler(time_attr="epoch", metric=search["metric"], mode="max", max_t=max_epochs,
                              grace_period=min(int(search["grace_period"]), max_epochs),
                              reduction_factor=float(search["reduction_factor"]))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=limited, scheduler=scheduler, num_samples=int(search["num_samples"]),
                                    reuse_actors=True,  # saves each trial the worker's start-up and imports
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(
            name=experiment_dir.name, storage_path=str(experiment_dir.parent),
            failure_config=tune.FailureConfig(max_failures=int(search["max_failures"])),
            callbacks=[_mlflow_callback(cfg["tracking"], max_epochs,
                                        Path(cfg["paths"]["runs_dir"]) / "trials" / experiment_dir.name)], verbose=1,
            progress_reporter=_progress_table(cfg)),
    )


def trainable_name(experiment_dir: Path, restore: bool) -> str:
    """The name this search's trainable is registered under; a resumed search keeps the one it started with."""
    record = experiment_dir / "emotune_trainable.txt"
    if restore:
        return record.read_text().strip() if record.is_file() else "search_trainable"  # searches from before
    name = "emotune_" + re.sub(r"[^A-Za-z0-9_]", "_", experiment_dir.name)
    record.write_text(name + "\n")
    return name


def _progress_table(cfg: dict):
    """Tune's table, every 20 s: each trial's sampled values and its latest dev macro-F1 figures."""
    from ray.tune import CLIReporter

    # conditional parameters are left out: Tune's table fails on trials that lack a column's key
    params = {key: key.split(".")[-1] for key, spec in cfg["space"]["params"].items() if not spec.get("when")}
    return CLIReporter(metric_columns={"epoch": "epoch", "val_f1": "val_f1", "val_f1_ema": "ema",
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


def run_search(cfg: dict) -> dict:
    """Run (or resume) the search ``cfg`` describes; returns the summary that is also printed."""
    import ray
    from ray import tune

    from emotune.data.prepare import prepare_corpus

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's classic progress table
    # per-epoch checkpoints are small and intended; Tune would warn about their frequency on every epoch
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = time.perf_counter()
    encoders = _validate(cfg)
    search = cfg["search"]
    name = str(search["name"])
    experiment_dir = Path(cfg["ray"]["storage"]) / name
    restore = tune.Tuner.can_restore(str(experiment_dir))
    print(f"emotune search '{name}' (space {cfg['space']['name']}): "
          f"{'resuming from' if restore else 'results in'} {experiment_dir}", flush=True)

    corpus = prepare_corpus(cfg["data"], cfg["paths"]["runs_dir"])
    print(corpus.summary(), flush=True)
    plan = print_plan(cfg, corpus, encoders)  # before any download, encoding, MLflow run or Ray results folder
    lock = DriverLock(experiment_dir)
    lock.acquire(name, take_over=bool(search.get("take_over_lock", False)))  # before any Ray or MLflow state
    try:
        return _run_locked(cfg, corpus, encoders, plan, experiment_dir, restore, started)
    finally:
        lock.release()


def _run_locked(cfg: dict, corpus, encoders: dict, plan, experiment_dir: Path, restore: bool, started: float) -> dict:
    """The search proper, once this driver holds the search's lock."""
    import ray

    from emotune.tracking import TrackedRun, ensure_experiment

    search = cfg["search"]
    name = str(search["name"])
    _check_same_settings(cfg, experiment_dir, restore)
    ensure_experiment(cfg["tracking"])  # create the store once, before concurrent trials write to it
    parent = TrackedRun.start(cfg["tracking"], name=f"search-{name}", kind="search", run_key=f"search/{name}",
                              tags={"emotune.space": cfg["space"]["name"], "emotune.code_version": code_version(),
                                    "emotune.search": name, "emotune.searched": ",".join(cfg["space"]["params"])})
    parent.log_params({"space": cfg["space"]["name"], "search": search, "encoders": cfg["encoders"],
                       "data_root": cfg["data"]["root"], "seed": cfg["seed"]})
    parent.log_json(cfg, "config.json")
    parent.log_json(plan.to_dict(), "cache_plan.json")

    started_ray = _init_ray(cfg["ray"])
    try:
        reports, cached = fill_caches(cfg, corpus, encoders)
        base = copy.deepcopy(cfg)
        base["features"]["verify"] = False  # the driver just verified every cached file
        base["search"] = {**search, "parent_run_id": parent.run_id, "name": name}
        base["trial"]["cpus"] = max(1, int(float(search["resources"]["cpu"])))
        tuner = _tuner(cfg, base, experiment_dir, restore, cached)
        fit_started = time.perf_counter()
        results = tuner.fit()
        fit_seconds = time.perf_counter() - fit_started
    except KeyboardInterrupt:
        parent.finish("KILLED")
        raise
    finally:
        _end_running_trials(cfg["tracking"], parent.run_id)
        if started_ray and ray.is_initialized():
            ray.shutdown()
    summary = _summarise(cfg, results, parent, experiment_dir, time.perf_counter() - started, reports)
    return summary | {"fit_seconds": fit_seconds}


# Settings that may change when a search resumes: where and how fast it runs, not what it searches.
RESUMABLE_CHANGES = ("ray.", "search.max_concurrent", "search.resources.", "search.take_over_lock", "features.batch_size",
                     "features.device",
                     "features.verify", "features.gpu_per_worker", "features.max_cache_gb", "features.plan_tflops",
                     "trial.device", "trial.cpus", "trial.fail_once_at_epoch")
# Keys added after searches already existed, with the value that reproduces what those searches did: a search
# saved without them resumes with these, so its cache keys and trials stay what they were.
ADDED_KEYS = {"features.waveform_norm": "global", "features.storage": "float16",
              "encoders.lr_range": None}  # None: only names a range the saved space already holds in full


def _check_same_settings(cfg: dict, experiment_dir: Path, restore: bool) -> None:
    """Refuse to resume a search with other settings: its trials would mix two configurations."""
    import json

    from emotune.space import get_path, set_path
    from emotune.tracking import flatten

    saved = experiment_dir / "emotune_config.json"
    if restore and saved.is_file():
        before_cfg = json.loads(saved.read_text())
        for key, old in ADDED_KEYS.items():
            try:
                get_path(before_cfg, key)
            except KeyError:  # started before the key existed: resume as it ran
                if old is None:
                    set_path(before_cfg, key, get_path(cfg, key))
                    continue
                set_path(before_cfg, key, old)
                if get_path(cfg, key) != old:
                    print(f"search '{cfg['search']['name']}' was started before {key} existed: it resumes with "
                          f"{key}={old}, as it ran.", flush=True)
                set_path(cfg, key, old)
        current = {k: v for k, v in flatten(cfg).items() if not k.startswith(RESUMABLE_CHANGES)}
        before = {k: v for k, v in flatten(before_cfg).items() if not k.startswith(RESUMABLE_CHANGES)}
        changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
        if changed:
            shown = "; ".join(f"{k}: {before.get(k)!r} -> {current.get(k)!r}" for k in changed[:6])
            raise EmotuneError(
                f"search '{cfg['search']['name']}' already exists in {experiment_dir} with other settings ({shown}"
                f"{'; ...' if len(changed) > 6 else ''}). Running it again resumes it, which needs the same "
                "settings: repeat them, or start a new search with search.name=NEW_NAME.")
    elif not restore:  # a new search (or one killed before Tune saved anything): these are its settings
        experiment_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(cfg, indent=1, default=str))


def _end_running_trials(tracking: dict, parent_run_id: str) -> None:
    """Once Tune has returned no trial runs any more: end runs an interruption left RUNNING (as KILLED).

    Resuming the search reuses them (and sets them running again), so nothing is duplicated or orphaned.
    """
    from emotune.tracking import TAG_KIND, TrackedRun, child_runs

    for run in child_runs(tracking, parent_run_id):
        if run.data.tags.get(TAG_KIND) == "trial" and run.info.status == "RUNNING":
            TrackedRun(tracking, run.info.run_id).finish("KILLED")


def _reconcile_runs(cfg: dict, parent, rows: list[dict]) -> int:
    """Discard MLflow runs of trials that Ray never recorded (a search killed before it saved its state).

    Such a trial is re-proposed under a new id when the search resumes; keeping its first run would show
    one trial twice. Returns how many runs were discarded.
    """
    from emotune.tracking import TAG_RUN_KEY, child_runs, discard_run

    known = {str(r["trial_id"]) for r in rows}
    discarded = 0
    for run in child_runs(cfg["tracking"], parent.run_id):
        trial_id = run.data.tags.get(TAG_RUN_KEY, "").rsplit("/", 1)[-1]
        if trial_id and trial_id not in known:
            discard_run(cfg["tracking"], run.info.run_id, "trial lost when the search was interrupted")
            discarded += 1
    return discarded


def _summarise(cfg: dict, results, parent, experiment_dir: Path, seconds: float, reports: list[dict]) -> dict:
    from emotune.tracking import TrackedRun

    rows = trial_table(results)
    discarded = _reconcile_runs(cfg, parent, rows)
    if discarded:
        print(f"Discarded {discarded} MLflow run(s) of trials the interrupted search had not recorded "
              "(their trials were proposed again).")
    finished = [r for r in rows if r["best_val_f1"] is not None]
    stopped = sum(1 for r in finished if r["epochs"] is not None and r["epochs"] < int(cfg["trial"]["max_epochs"]))
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
                        "trials_stopped_early": stopped, "trials_failed": len(errors), "search_seconds": seconds})
    parent.log_artifacts(files, "summary")
    parent.finish("FINISHED" if not errors else "FAILED")

    summary = {"name": cfg["search"]["name"], "trials": len(rows), "stopped_early": stopped, "failed": len(errors),
               "seconds": seconds, "parent_run_id": parent.run_id, "best": best, "experiment_dir": str(experiment_dir),
               "cache": reports}
    print()
    print(f"Search '{cfg['search']['name']}' done in {seconds / 60:.1f} min: {len(rows)} trials, {stopped} stopped "
          f"early by ASHA, {len(errors)} failed.")
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


def main(argv: list[str] | None = None) -> int:
    """``python -m emotune.search [key=value ...]``: compose the config, run or resume the search."""
    from emotune.config import compose, load_config

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        spaces = sorted(p.stem for p in spaces_dir().glob("*.yaml"))
        print(USAGE.format(spaces=", ".join(spaces), metrics=" | ".join(ASHA_METRICS)))
        return 0

    def act() -> None:
        if "--cfg" in args:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(compose([a for a in args if a != "--cfg"], "search"), resolve=True))
        else:
            summary = run_search(load_config(args, "search"))
            if summary["failed"]:
                raise EmotuneError(f"{summary['failed']} trial(s) failed (their tracebacks are above and in the files "
                                   "named there); the other trials are kept, and running the same command again "
                                   "retries the failed ones.")

    # SIGTERM (kill, systemd, a closed tmux pane) and SIGHUP stop the search as Ctrl-C does: Tune saves its state,
    # the runs end KILLED, the lock is released, and running the same command again resumes it
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    return run_command(act, "search interrupted; run the same command again to resume it.")


def spaces_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("emotune.search_spaces").joinpath("space")))


if __name__ == "__main__":
    sys.exit(main())
