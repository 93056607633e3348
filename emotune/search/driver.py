"""The search: Ray Tune runs trials, Optuna proposes them, ASHA stops weak ones, MLflow records all.

Proposals are random draws by default, with the space's known-good point first, and TPE modelling each setting
alone with trial.folds=3 (search.sampler: auto; qmc, tpe and gp too): in replayed searches random draws with ASHA
selected best on one split, where TPE chased dev-set noise, and TPE beat them on three folds (benchmarks/hpo.md).
Every dev evaluation reports its bootstrap standard error (val_f1_se), and the summary lists the trials
statistically tied with the best.

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
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from emotune.config import SearchSettings, typed
from emotune.errors import EmotuneError, run_command
from emotune.names import ASHA_METRICS, OBJECTIVE
from emotune.search.identity import identity_of, parent_run
from emotune.search.lock import DriverLock, StoreLock
from emotune.search.report import progress_table, summarise, trial_table
from emotune.search.resume import (
    check_same_settings,
    end_running_trials,
    reconcile_runs,
    record_settings,
    trainable_name,
    trial_runs_callback,
)

USAGE = """usage: python -m emotune.search [space=NAME] [key=value ...]

Search spaces (space=NAME): {spaces}
Common keys: search.num_samples, search.max_concurrent, search.sampler (auto|random|qmc|tpe|tpe-independent|gp),
  search.scheduler (asha|noise_asha|none), search.metric ({metrics}),
  search.grace_period, search.reduction_factor, search.resources.cpu, search.resources.gpu, search.name,
  trial.max_epochs, trial.evals_per_epoch, trial.select_by, encoders=offline|hub, data=demo|folder, data.root,
  ray.address, paths.runs_dir, seed
Spaces of your own: DIR/space/NAME.yaml, used with paths.spaces_dir=DIR space=NAME
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
    from emotune.search.space import encoders_in_play, validate_space

    validate_space(cfg["space"], cfg)
    search = typed(SearchSettings, cfg["search"], "search")
    if search.metric not in ASHA_METRICS:
        raise EmotuneError(f"search.metric must be one of {', '.join(ASHA_METRICS)}, got '{search.metric}'")
    from emotune.noise import SCORES
    from emotune.search.algorithms import SAMPLERS, SCHEDULERS

    for key, value, allowed in (("search.sampler", search.sampler, SAMPLERS),
                                ("search.scheduler", search.scheduler, SCHEDULERS),
                                ("trial.select_by", cfg["trial"]["select_by"], SCORES)):
        if value not in allowed:
            raise EmotuneError(f"{key} must be one of {', '.join(allowed)}, got '{value}'")
    if search.scheduler == "noise_asha" and search.metric == "val_loss":
        raise EmotuneError("search.scheduler=noise_asha measures noise in dev macro-F1 (val_f1_se), so it judges an "
                           "F1 metric: set search.metric to best_val_score, best_val_f1, val_f1 or val_f1_ema, or use "
                           "search.scheduler=asha with val_loss")
    if search.num_samples < 1 or search.max_concurrent < 1:
        raise EmotuneError("search.num_samples and search.max_concurrent must be at least 1")
    check_tracking_on_cluster(cfg)
    if search.time_budget_s is not None and search.time_budget_s <= 0:
        raise EmotuneError(f"search.time_budget_s must be a positive number of seconds or null (no budget), got "
                           f"{search.time_budget_s}")
    return encoders_in_play(cfg)


def check_tracking_on_cluster(cfg: dict) -> None:
    """A search on a cluster (ray.address) logs through a tracking server: a file store (SQLite, a folder) would be
    opened by each node on its own disk, and SQLite on a network filesystem is unsafe."""
    uri, tracking = str(cfg["tracking"]["uri"]), cfg["tracking"]
    file_store = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    if cfg["ray"]["address"] and file_store and not tracking["allow_file_store_on_cluster"]:
        raise EmotuneError(
            f"ray.address={cfg['ray']['address']} runs trials on a Ray cluster, but tracking.uri={uri} is a file store "
            "that each node would open on its own disk (SQLite on a shared filesystem is not safe either). Start a "
            "tracking server every node can reach, `emotune server --host 0.0.0.0 --auth` on the head node, and pass "
            "the address it prints: tracking.uri=http://HEAD:5000. On one machine that joined its own cluster, "
            "tracking.allow_file_store_on_cluster=true keeps the file store.")


def check_evaluation_cadence(cfg: dict, corpus) -> None:
    """trial.evals_per_epoch against the batches an epoch of this corpus has, at the largest batch size the space
    may sample: before the cache fill, not inside every trial after it."""
    from emotune.config import TrialSettings
    from emotune.trial import check_evals_per_epoch

    trial = typed(TrialSettings, cfg["trial"], "trial")
    spec = cfg["space"]["params"].get("trial.batch_size") or {}  # a space's values: YAML numbers, maybe floats
    sizes = [trial.batch_size] + [int(v) for v in spec.get("choice", [])] + [int(v) for v in spec.get("int", [])[1:]]
    from emotune.data.folds import training_clips

    check_evals_per_epoch(trial.evals_per_epoch, training_clips(len(corpus.train), len(corpus.dev), trial.folds),
                          max(sizes))


def print_plan(cfg: dict, corpus, encoders: dict[str, list[str]]):
    """The feature-cache plan of this search, printed; stops the search when the missing part cannot fit."""
    from emotune.features.plan import ClipSplits, plan_cache, refuse_if_too_big

    plan = plan_cache(cfg["features"], cfg["paths"], ClipSplits.of_corpus(corpus), encoders)
    if plan.encoders:
        print(plan.table(), flush=True)
    refuse_if_too_big(plan)
    return plan


def print_time_plan(cfg: dict, corpus, plan, corpus_seconds: float):
    """The search's time plan (search.plan_time), printed under the cache plan; None when it is off or cannot be
    made (the search runs all the same, and says why). ``corpus_seconds``: the corpus' first preparation."""
    from emotune.data.prepare import prepare_corpus
    from emotune.features.plan import ClipSplits
    from emotune.search.plan import plan_search

    if not cfg["search"]["plan_time"] or not plan.encoders:
        return None
    started = time.perf_counter()  # what each trial pays: the corpus again, in a process that has read it before
    prepare_corpus(cfg["data"], cfg["paths"]["runs_dir"], progress=False)
    warm = time.perf_counter() - started
    try:
        time_plan = plan_search(cfg, ClipSplits.of_corpus(corpus), plan, corpus_seconds=(corpus_seconds, warm))
    except EmotuneError as exc:
        print(f"No time plan: {exc}", flush=True)
        return None
    print(time_plan.table(), flush=True)
    return time_plan


def _auth_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is Ray refusing this driver's authentication token."""
    seen = 0
    while exc is not None and seen < 5:
        if type(exc).__name__ == "AuthenticationError" or "auth" in str(exc).lower():
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _join_cluster(address: str, kwargs: dict) -> None:
    """``ray.init`` on the cluster at ``address``; a refused token becomes an error that says what to set."""
    import ray

    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:  # Ray raises ConnectionError or RuntimeError, caused by its AuthenticationError
        if not _auth_failure(exc):
            raise
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        token = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token (Ray's default)"
        raise EmotuneError(
            f"the Ray cluster at {address} refused this driver's authentication (RAY_AUTH_MODE is {mode}; token "
            f"from {token}). A cluster started with token authentication needs the same token on every node and "
            "the driver: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=FILE, the token file the head was "
            "started with (scripts/slurm/search.sbatch keeps it in $EMOTUNE_SHARED/ray-auth-token, readable by "
            "the job's user only).") from None


def _init_ray(ray_cfg: dict) -> bool:
    """Start or join Ray as configured; False when Ray was already running in this process (left as it is)."""
    import ray

    if ray.is_initialized():
        return False
    # ray.init puts its own SIGTERM handler (sys.exit, after a fatal-looking report) over the driver's: the
    # driver's handlers go back afterwards, so that SIGTERM and SIGHUP still stop the search as Ctrl-C does
    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGHUP)}
    kwargs = {"include_dashboard": bool(ray_cfg["dashboard"]), "log_to_driver": True,
              "configure_logging": True, "logging_level": "WARNING"}
    if ray_cfg["dashboard"]:
        kwargs["dashboard_host"] = "127.0.0.1"  # a Ray dashboard runs code for whoever reaches it
    address = ray_cfg["address"]
    if address:
        _join_cluster(address, {k: v for k, v in kwargs.items() if k != "include_dashboard"})
    else:
        # "local": a Ray of this search's own; without it ray.init joins whatever cluster this machine last
        # started (another user's or a test's), which ray.address=null promises not to do
        ray.init(address="local", num_cpus=ray_cfg["num_cpus"], **kwargs)
    if threading.current_thread() is threading.main_thread():
        for stop, handler in handlers.items():
            if handler is not None:
                signal.signal(stop, handler)
    return True


def fill_caches(cfg: dict, corpus, recipes: dict, plan) -> tuple[list[dict], dict[str, object]]:
    """Build the feature cache of every encoder the space can pick (``recipes``, by ``modality/name``), before any
    trial starts.

    Returns the build reports and, per ``"modality/name"``, the index part a trial reads that encoder's
    features with (so trials never load an encoder). The driver itself only reads the encoders' recipes;
    encoders are loaded where something is missing, by the cache workers (as many as features.cpu_workers allows
    without GPUs, each asking Ray for the memory the plan's largest encoder needs).
    """
    import ray

    from emotune.features.cache import FeatureStore
    from emotune.features.distributed import CacheWorkers, worker_memory
    from emotune.features.prepare import cache_encoder

    if not cfg["features"]["cache"]:
        return [], {}
    workers = int(ray.available_resources().get("CPU", 1))
    if cfg["features"]["cpu_workers"] is not None:
        workers = min(workers, cfg["features"]["cpu_workers"])
    memory = worker_memory(max((e.params_m for e in plan.encoders), default=0.0))
    lines, parts, started = [], {}, []

    def pool() -> CacheWorkers:  # started once, on the first encoder with something to encode, for all of them
        if not started:
            started.append(CacheWorkers(cfg["features"], workers, corpus.norm,
                                        str(FeatureStore(cfg["features"]["dir"]).root), memory))
        return started[0]

    try:
        for key, recipe in recipes.items():
            report, parts[key] = cache_encoder(recipe, corpus, cfg["features"], True, pool if workers > 1 else None)
            print(report.line(), flush=True)
            lines.append(asdict(report))
    finally:
        for workers_pool in started:
            workers_pool.close()
    return lines, parts


def search_trainable(sampled: dict, base: dict, launch, cached: dict | None = None, train=None) -> None:
    """What each Ray trial runs: the base config with this trial's sampled values written in.

    ``launch`` is the :class:`~emotune.trial.TrialContext` the search prepared for every trial. ``cached``
    holds the driver's index part of every encoder whose cache it filled; a trial whose encoders are all
    there reads their features without loading the encoders. ``train`` replaces
    :func:`emotune.trial.trainable` (tests wrap it to inject failures).
    """
    import logging
    from dataclasses import replace

    from emotune.features.cache import FeatureIndex
    from emotune.model import modalities_of
    from emotune.search.space import apply_sampled
    from emotune.trial import trainable

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one line per checkpoint otherwise
    cfg = apply_sampled(base, sampled)
    wanted = [f"{m}/{cfg['encoders'][m]}" for m in modalities_of(cfg["model"])]
    index = FeatureIndex.merge([cached[w] for w in wanted]) if cached and all(w in cached for w in wanted) else None
    (train or trainable)(cfg, replace(launch, index=index))


def make_searcher(cfg: dict):
    """Optuna's sampler (search.sampler) over the search space, its known-good points first, seeded by
    search.sampler_seed; it learns each trial's ranking score (the objective, best_val_score), and trials the
    scheduler cut reach it as pruned (:class:`~emotune.search.algorithms.PruningAwareOptunaSearch`)."""
    from ray.tune.search import ConcurrencyLimiter

    from emotune.search.algorithms import PruningAwareOptunaSearch, asha_clock, make_sampler, resolve_sampler
    from emotune.search.space import DefineByRun, points_to_evaluate

    search = typed(SearchSettings, cfg["search"], "search")
    sampler = make_sampler(resolve_sampler(search.sampler, cfg["trial"]["folds"]), search.sampler_seed,
                           search.n_startup_trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        searcher = PruningAwareOptunaSearch(space=DefineByRun(cfg["space"], cfg), metric=OBJECTIVE, mode="max",
                                            sampler=sampler, last_step=asha_clock(cfg)[2],
                                            points_to_evaluate=points_to_evaluate(cfg["space"], cfg) or None)
    # OptunaSearch alone starts more random trials than asked when many run in parallel (ray #52535)
    limited = ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent)
    if search.time_budget_s is None:
        return limited
    from emotune.search.budget import TimeBudget

    return TimeBudget(limited, search.time_budget_s)


def _tuner(cfg: dict, experiment_dir: Path, restore: bool, payload: dict):
    """Tune's tuner for this search; ``payload`` is what every trial gets (see :func:`search_trainable`)."""
    from ray import tune

    from emotune.search.algorithms import make_scheduler

    search = typed(SearchSettings, cfg["search"], "search")
    resources = {"cpu": float(search.resources["cpu"]), "gpu": float(search.resources["gpu"])}  # YAML numbers
    with_data = tune.with_parameters(search_trainable, **payload)
    # Ray's trainable registry is keyed by name: a name of its own keeps this search's payload from being
    # replaced by another search's on a shared cluster (ray #31330)
    with_data.__name__ = trainable_name(experiment_dir, restore)
    trainable = tune.with_resources(with_data, resources)
    if restore:
        return tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_errored=True)
    max_epochs = cfg["trial"]["max_epochs"]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=make_searcher(cfg), scheduler=make_scheduler(cfg),
                                    num_samples=search.num_samples,
                                    reuse_actors=True,  # saves each trial the worker's start-up and imports
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(
            name=experiment_dir.name, storage_path=str(experiment_dir.parent),
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
            callbacks=[trial_runs_callback(cfg["tracking"], max_epochs,
                                        Path(cfg["paths"]["runs_dir"]) / "trials" / experiment_dir.name)], verbose=1,
            progress_reporter=progress_table(cfg)),
    )


@dataclass(frozen=True)
class SearchStart:
    """What the driver knows and has prepared before it takes the search's locks."""

    experiment_dir: Path  # ray.storage/NAME: Tune's state, the id, the settings, the locks
    restore: bool         # Tune has state there: this run resumes the search
    started: float        # time.perf_counter() at the command's start, for the summary's timing
    corpus: object        # the prepared corpus (data.prepare.PreparedCorpus)
    encoders: dict        # the encoders the space can pick, by modality
    plan: object          # the feature-cache plan
    time_plan: object     # the time plan, or None (search.plan_time=false, or it could not be made)


def run_search(cfg: dict, train=None, command: str | None = None) -> dict:
    """Run (or resume) the search ``cfg`` describes; returns the summary that is also printed.

    ``train`` replaces the function each trial runs, :func:`emotune.trial.trainable` (tests wrap it).
    ``command``: the command that was typed, for the message that refuses a resume with other settings.
    """
    from ray import tune

    from emotune.data.prepare import prepare_corpus

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's classic progress table
    # per-epoch checkpoints are small and intended; Tune would warn about their frequency on every epoch
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = time.perf_counter()
    encoders = _validate(cfg)
    name = str(cfg["search"]["name"])
    experiment_dir = Path(cfg["ray"]["storage"]) / name
    restore = tune.Tuner.can_restore(str(experiment_dir))
    print(f"emotune search '{name}' (space {cfg['space']['name']}): "
          f"{'resuming from' if restore else 'results in'} {experiment_dir}", flush=True)
    check_same_settings(cfg, experiment_dir, restore, command)  # before any work: a refusal costs nothing

    corpus_started = time.perf_counter()
    corpus = prepare_corpus(cfg["data"], cfg["paths"]["runs_dir"])
    corpus_seconds = time.perf_counter() - corpus_started
    print(corpus.summary(), flush=True)
    check_evaluation_cadence(cfg, corpus)
    plan = print_plan(cfg, corpus, encoders)  # before any download, encoding, MLflow run or Ray results folder
    time_plan = print_time_plan(cfg, corpus, plan, corpus_seconds)
    start = SearchStart(experiment_dir, restore, started, corpus, encoders, plan, time_plan)
    # one driver per name: in its Ray folder (drivers sharing ray.storage) and in the tracking store (drivers on
    # other storage writing the same MLflow runs), both before any Ray or MLflow state
    take_over = typed(SearchSettings, cfg["search"], "search").take_over_lock
    with DriverLock(experiment_dir).holding(name, take_over), \
            StoreLock(cfg["tracking"], f"search/{name}", str(experiment_dir)).holding(name, take_over):
        return _run_locked(cfg, start, train)


def _run_locked(cfg: dict, start: SearchStart, train=None) -> dict:
    """The search proper, once this driver holds the search's lock."""
    import ray

    from emotune.tracking.store import ensure_experiment

    name = str(cfg["search"]["name"])
    fresh = not start.experiment_dir.exists()
    record_settings(cfg, start.experiment_dir, start.restore)
    me = identity_of(start.experiment_dir, name, start.restore)
    ensure_experiment(cfg["tracking"])  # create the store once, before concurrent trials write to it
    started_ray = _init_ray(cfg["ray"])
    try:
        try:
            recipes = _ready_to_run(cfg, start.corpus, start.encoders)
            parent = _search_run(cfg, me, start)
        except EmotuneError:
            if fresh:  # a refused start leaves nothing behind: the old search's Ray folder can be put back here
                shutil.rmtree(start.experiment_dir, ignore_errors=True)
            raise
        try:
            reports, results, fit_seconds = _fill_and_fit(cfg, start, recipes, parent, me, train)
        except KeyboardInterrupt:
            parent.finish("KILLED")
            raise
        finally:
            end_running_trials(cfg["tracking"], parent.run_id)
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    discarded = reconcile_runs(cfg, parent, me.id, trial_table(results))
    if discarded:
        print(f"Discarded {discarded} MLflow run(s) of trials the interrupted search had not recorded "
              "(their trials were proposed again).")
    timing = {"fit_seconds": fit_seconds, "fill_seconds": sum(r.get("seconds", 0.0) for r in reports),
              "planned": start.time_plan}
    summary = summarise(cfg, start.corpus, results, parent, start.experiment_dir, time.perf_counter() - start.started,
                        reports, timing)
    return summary | {"fit_seconds": fit_seconds}


def _search_run(cfg: dict, me, start: SearchStart):
    """The search's MLflow run (adopted or created), with its settings, plans and ASHA's rungs recorded."""
    from emotune.search.algorithms import asha_rungs, ladder_lines, make_scheduler, proposal_line
    from emotune.tracking.store import TAG_SEARCH

    parent = parent_run(cfg, me, start.experiment_dir,
                        tags={"emotune.space": cfg["space"]["name"], "emotune.code_version": code_version(),
                              TAG_SEARCH: me.name, "emotune.searched": ",".join(cfg["space"]["params"])})
    parent.log_params({"space": cfg["space"]["name"], "search": cfg["search"], "encoders": cfg["encoders"],
                       "data_root": cfg["data"]["root"], "seed": cfg["seed"]})
    parent.log_json(cfg, "config.json")
    parent.log_json(start.plan.to_dict(), "cache_plan.json")
    if start.time_plan is not None:
        parent.log_json(start.time_plan.to_dict(), "time_plan.json")
    rungs = asha_rungs(make_scheduler(cfg))
    print("\n".join([proposal_line(cfg), *ladder_lines(cfg, rungs)]), flush=True)
    parent.log_params({"asha_rungs": ",".join(map(str, rungs))})
    return parent


def _fill_and_fit(cfg: dict, start: SearchStart, recipes: dict, parent, me, train):
    """Fill the feature cache, then run the trials; returns the fill reports, Tune's results and the fit's seconds."""
    from emotune.trial import TrialContext

    reports, cached = fill_caches(cfg, start.corpus, recipes, start.plan)
    launch = TrialContext(verify_cache=False,  # the driver just checked the cache (stats; changed files' CRCs)
                          cpus=max(1, int(float(cfg["search"]["resources"]["cpu"]))), parent_run_id=parent.run_id,
                          search_name=me.name, search_id=me.id, recipes=recipes)
    payload = {"base": copy.deepcopy(cfg), "launch": launch, "cached": cached, "train": train}
    tuner = _tuner(cfg, start.experiment_dir, start.restore, payload)
    fit_started = time.perf_counter()
    results = _fit(tuner)
    return reports, results, time.perf_counter() - fit_started


def _ready_to_run(cfg: dict, corpus, encoders: dict[str, list[str]]) -> dict:
    """What must hold before the search records or runs anything: the cluster's GPUs for the cache workers, every
    encoder resolved once (built, found or downloaded) into the recipes all nodes use, and, on a multi-node
    cluster, every node able to see what the search needs (:mod:`emotune.search.preflight`)."""
    from emotune.features.distributed import worker_shape
    from emotune.features.prepare import resolve_recipes
    from emotune.search.preflight import check_cluster

    worker_shape(cfg["features"], 1)  # features.gpu_per_worker against the cluster's GPUs
    recipes = resolve_recipes(corpus, encoders, cfg["features"], cfg["paths"])
    check_cluster(cfg, corpus, recipes)
    return recipes


def _fit(tuner):
    """``tuner.fit()``; raises KeyboardInterrupt when Ctrl-C (or SIGTERM/SIGHUP, sent on as SIGINT) stopped it.

    Tune handles the first SIGINT itself: it saves the experiment and returns from ``fit`` as if the search were
    done, putting back the SIGINT handler it found. That handler, installed here, being back in place is how the
    interruption shows; a finished fit leaves Tune's handler in place, which is replaced again on the way out.
    """
    if threading.current_thread() is not threading.main_thread():  # no signals here: Tune installs none either
        return tuner.fit()

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        results = tuner.fit()
        if signal.getsignal(signal.SIGINT) is interrupt:
            raise KeyboardInterrupt
        return results
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None, train=None) -> int:
    """``python -m emotune.search [key=value ...]``: compose the config, run or resume the search.

    ``train``: see :func:`run_search`.
    """
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
            summary = run_search(load_config(args, "search"), train, command=_typed_command(args))
            if summary["failed"]:
                raise EmotuneError(f"{summary['failed']} trial(s) failed (their tracebacks are above and in the files "
                                   "named there); the other trials are kept, and running the same command again "
                                   "retries the failed ones.")

    # SIGTERM (kill, systemd, docker stop, SLURM's time limit, a closed tmux pane) and SIGHUP stop the search as
    # Ctrl-C does: Tune saves its state, the runs end KILLED, the locks are released, and running the same command
    # again resumes it (_init_ray puts these handlers back after ray.init replaces them)
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, _as_ctrl_c)
    return run_command(act, "search interrupted; run the same command again to resume it.")


def _typed_command(args: list[str]) -> str:
    """The command as the user typed it: ``scripts/demo.sh`` sets EMOTUNE_COMMAND to its own name."""
    import shlex

    return shlex.join([*shlex.split(os.environ.get("EMOTUNE_COMMAND") or "python -m emotune.search"), *args])


def _as_ctrl_c(*_) -> None:
    os.kill(os.getpid(), signal.SIGINT)


def spaces_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("emotune.search_spaces").joinpath("space")))

