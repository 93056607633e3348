"""A search's bookkeeping across interruptions: what may change on resume, the trainable's name, and MLflow runs
kept in step with what Ray recorded (ended when Tune ends a trial, ended or discarded after an interruption)."""

from __future__ import annotations

import re
from pathlib import Path

from emotune.errors import EmotuneError


def trial_runs_callback(tracking: dict, max_epochs: int, trials_dir: Path):
    """A Tune callback that ends each trial's MLflow run, also when ASHA stopped the trial mid-way.

    For a stopped trial it also draws the dev report of its best model (the trial itself never got to).
    """
    from ray.tune import Callback

    from emotune.evaluation import dev_reports
    from emotune.tracking.store import TrackedRun

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
            run.log_metrics({"best_val_f1": result.get("best_val_f1"), "best_val_score": result.get("best_val_score"),
                             "epochs_trained": result.get("epoch"),
                             "asha_stopped": float(stopped)},
                            step=int(result.get("evaluation", result.get("epoch", 0))))
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


def trainable_name(experiment_dir: Path, restore: bool) -> str:
    """The name this search's trainable is registered under; a resumed search keeps the one it started with."""
    record = experiment_dir / "emotune_trainable.txt"
    if restore:
        return record.read_text().strip() if record.is_file() else "search_trainable"  # searches from before
    name = "emotune_" + re.sub(r"[^A-Za-z0-9_]", "_", experiment_dir.name)
    record.write_text(name + "\n")
    return name


# Settings that may change when a search resumes: where and how fast it runs, not what it searches.
RESUMABLE_CHANGES = ("ray.", "paths.spaces_dir", "search.max_concurrent", "search.resources.", "search.take_over_lock",
                     "search.replace", "search.plan_time",
                     "features.batch_size", "features.device", "features.verify", "features.gpu_per_worker",
                     "features.max_cache_gb", "features.plan_tflops", "features.cpu_workers",
                     # where encoders are found, not what they are (cache keys hash their files)
                     "paths.models_dir", "tracking.allow_file_store_on_cluster",
                     "trial.device", "trial.cpus",
                     "trial.fail_once_at_epoch")  # a testing aid of earlier versions, recorded by their searches
# Keys added after searches already existed, with the value that reproduces what those searches did: a search
# saved without them resumes with these, so its cache keys and trials stay what they were.
ADDED_KEYS = {"features.waveform_norm": "global", "features.storage": "float16", "model.branch_width": 256,
              "trial.evals_per_epoch": 1,
              "search.sampler": "tpe",
              # a search started before these existed ran plain ASHA and ranked by best_val_f1
              "search.scheduler": "asha", "search.noise_z": None, "search.n_startup_trials": 10,
              "search.ties_confidence": None, "trial.select_by": "val_f1",
              "encoders.lr_range": None}  # None: only names a range the saved space already holds in full


def check_same_settings(cfg: dict, experiment_dir: Path, restore: bool, command: str | None = None) -> None:
    """Refuse to resume a search with other settings: its trials would mix two configurations.

    Runs before the corpus, the plans and the locks, so that a refusal costs nothing. ``command``: the command
    that was typed, shown again with a free ``search.name`` as the way to run these settings as a new search."""
    import json

    from emotune.search.space import get_path, set_path
    from emotune.tracking.store import flatten

    saved = experiment_dir / "emotune_config.json"
    if not (restore and saved.is_file()):
        return
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
    _same_sampler(before_cfg, cfg)
    current = {k: v for k, v in flatten(cfg).items() if not k.startswith(RESUMABLE_CHANGES)}
    before = {k: v for k, v in flatten(before_cfg).items() if not k.startswith(RESUMABLE_CHANGES)}
    changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {current.get(k)!r}" for k in changed[:6])
        raise EmotuneError(
            f"search '{cfg['search']['name']}' already exists in {experiment_dir} with other settings ({shown}"
            f"{'; ...' if len(changed) > 6 else ''}). Running it again resumes it, which needs the same settings: "
            f"repeat them, or run these settings as a new search under a name of its own:\n"
            f"  {as_new_search(command, experiment_dir)}")


def _same_sampler(before_cfg: dict, cfg: dict) -> None:
    """A search saved with ``search.sampler=random`` resumes under today's default ``auto`` where ``auto`` resolves
    to random draws (and the other way round): the same sampler, so no reason to refuse."""
    from emotune.search.algorithms import resolve_sampler

    def resolved(config: dict) -> str:
        return resolve_sampler(config["search"]["sampler"], int(config.get("trial", {}).get("folds") or 1))

    if resolved(before_cfg) == resolved(cfg):
        before_cfg["search"]["sampler"] = cfg["search"]["sampler"]


def as_new_search(command: str | None, experiment_dir: Path) -> str:
    """``command`` with ``search.name`` set to the first free name beside ``experiment_dir`` (NAME-2, NAME-3, ...)."""
    import shlex

    n = 2
    while (experiment_dir.parent / f"{experiment_dir.name}-{n}").exists():
        n += 1
    new_name = f"search.name={experiment_dir.name}-{n}"
    if not command:
        return f"the same command with {new_name}"
    words = [w for w in shlex.split(command) if not w.startswith("search.name=")]
    return shlex.join(words + [new_name])


def record_settings(cfg: dict, experiment_dir: Path, restore: bool) -> None:
    """Keep a new search's settings beside its Tune state, for :func:`check_same_settings` on a later run."""
    import json

    if not restore:  # a new search (or one killed before Tune saved anything): these are its settings
        experiment_dir.mkdir(parents=True, exist_ok=True)
        (experiment_dir / "emotune_config.json").write_text(json.dumps(cfg, indent=1, default=str))


def end_running_trials(tracking: dict, parent_run_id: str) -> None:
    """Once Tune has returned no trial runs any more: end runs an interruption left RUNNING (as KILLED).

    Resuming the search reuses them (and sets them running again), so nothing is duplicated or orphaned.
    """
    from emotune.tracking.store import TAG_KIND, TrackedRun, child_runs

    for run in child_runs(tracking, parent_run_id):
        if run.data.tags.get(TAG_KIND) == "trial" and run.info.status == "RUNNING":
            TrackedRun(tracking, run.info.run_id).finish("KILLED")


def reconcile_runs(cfg: dict, parent, search_id: str, rows: list[dict]) -> int:
    """Discard MLflow runs of this search's trials that Ray never recorded (a search killed before it saved its
    state).

    Such a trial is re-proposed under a new id when the search resumes; keeping its first run would show
    one trial twice. Only runs tagged with this search's id are candidates: never another search's, whatever
    its name. Returns how many runs were discarded.
    """
    from emotune.tracking.store import TAG_RUN_KEY, TAG_SEARCH_ID, child_runs, discard_run

    known = {str(r["trial_id"]) for r in rows}
    discarded = 0
    for run in child_runs(cfg["tracking"], parent.run_id):
        if run.data.tags.get(TAG_SEARCH_ID) != search_id:
            continue
        trial_id = run.data.tags.get(TAG_RUN_KEY, "").rsplit("/", 1)[-1]
        if trial_id and trial_id not in known:
            discard_run(cfg["tracking"], run.info.run_id, "trial lost when the search was interrupted")
            discarded += 1
    return discarded
