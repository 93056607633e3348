"""The search's time plan: how long a whole search takes, and its device-hours, before it runs.

    emotune plan                                              # the demo search, on this machine
    emotune plan space=smoke --json plan.json                 # total_seconds and device_hours in the file
    emotune plan space=encoders encoders=hub --clips 5129 --hours 13.16 --device-tflops 100 --read-gbps 3 --gpus 2

It adds the trials to the cache plan (emotune/features/plan.py):

- per trial: seconds per epoch of the model shapes the space can draw (the narrowest and widest encoder pairs,
  at the lowest and highest hidden depth and head width, per model family), from short measurements of the real
  training step, evaluation and bookkeeping (emotune/search/probe.py), plus the cache reads at the cache folder's
  speed;
- ASHA's expected share of the epochs, by exact arithmetic on Ray's rule (:func:`asha_share`), and how many
  trials are expected to reach each rung;
- the fill, from the real fill code run on a few clips (encoders on this machine) or the encoders' FLOPs;
- the wall time: the fill, then the trials spread over the concurrency that ``search.max_concurrent``,
  ``search.resources`` and the CPUs and GPUs allow; and the device-hours it occupies.

What it does not know: when a trial's own early stopping (``trial.early_stop``) ends it before ASHA would (the
plan counts the epochs ASHA allows: an upper bound), how often the best model improves (assumed: as often as the
best of a noisy learning curve does, :func:`expected_improvements`), and how the sampler favours some shapes (the
plan draws them uniformly, as random search does).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from emotune.config import FeatureSettings, SearchSettings, TrialSettings, typed
from emotune.errors import EmotuneError

# What no short measurement gives, measured on this project's 2-core machine (scripts/bench_plan.py): Ray's start,
# the search's end (ties, summary), Tune's own work per trial (actor reset, results, MLflow callbacks), and a trial
# worker's first trial (its imports and first-epoch warm-up: setup_seconds 7-8 s against 1.7 s for the trials after
# it in the same worker; the workers start side by side, so the trials' span grows by one of them).
RAY_START_SECONDS = 15.0
WORKER_FIRST_TRIAL_SECONDS = 8.0
# A search run as a command (`python -m emotune.search`) first imports Ray, torch and MLflow: what `emotune plan`
# adds for it. A search's own summary starts its clock after them.
PROCESS_START_SECONDS = 5.0
# The cache workers' pool starts once per search (Ray workers, their imports) before the first encoder's work.
CACHE_POOL_START_SECONDS = 4.0
SEARCH_END_SECONDS = 4.0
TUNE_SECONDS_PER_TRIAL = 1.5
TUNE_SECONDS_PER_REPORT = 0.05
# A planned GPU's batches cross PCIe: about 12 GB/s is what PCIe 3.0 x16 (or a loaded 4.0) carries in practice.
HOST_TO_DEVICE_BYTES_PER_SECOND = 12e9


# --- ASHA's share of the epochs --------------------------------------------------------------------------------

@dataclass
class AshaShare:
    """Expected evaluations of a search's trials under Ray's ASHA (``rungs``: where trials are judged)."""

    trials: int
    max_t: int
    rungs: list[int]
    reach: list[float]               # expected trials judged at each rung
    finish: float                    # expected trials that run all max_t evaluations
    evaluations: float               # expected evaluations of all trials together
    how: str = "exact arithmetic on Ray's rule"

    @property
    def share(self) -> float:
        """The expected share of the evaluations that no pruning would run."""
        return self.evaluations / max(1, self.trials * self.max_t)


def survival_chances(arrivals: int, reduction_factor: float) -> list[float]:
    """The chance that the j-th trial to reach a rung goes on, for j = 1..arrivals, when trials' values at the rung
    are exchangeable (any arrival order is equally likely to be any ranking).

    Ray's rule (``_Bracket.on_result``): a trial is cut when its value is below the (1 - 1/rf) percentile, linearly
    interpolated, of the values recorded earlier at that rung; the first trial always goes on. The j-th trial's
    rank among the j - 1 earlier ones is uniform, so it goes on with chance (j - 1 - (j - 2) q) / j, q = 1 - 1/rf
    (exact where the percentile falls on a recorded value, and in expectation between two). Relative ranks of
    successive arrivals are independent, so the survivors of a rung are a sum of independent draws.
    """
    q = 1.0 - 1.0 / reduction_factor
    return [1.0] + [(j - 1 - (j - 2) * q) / j for j in range(2, arrivals + 1)]


def asha_share(trials: int, rungs: list[int], max_t: int, reduction_factor: float) -> AshaShare:
    """Expected evaluations and rung counts of ``trials`` trials under ASHA, exactly under exchangeable values.

    The number reaching each rung is carried as a distribution (a Poisson-binomial per arrival count), not a mean.
    """
    cuts = sorted(r for r in rungs if r < max_t)
    chances = survival_chances(trials, reduction_factor)
    # survivors[n] = distribution of the number that go on when n arrive (built up one arrival at a time)
    survivors = [np.array([1.0])]
    for p in chances:
        previous = survivors[-1]
        grown = np.zeros(len(previous) + 1)
        grown[:-1] += previous * (1 - p)
        grown[1:] += previous * p
        survivors.append(grown)
    arriving = np.zeros(trials + 1)
    arriving[trials] = 1.0
    reach, evaluations = [], 0.0
    for rung in cuts:
        expected_in = float(arriving @ np.arange(trials + 1))
        reach.append(expected_in)
        leaving = np.zeros(trials + 1)
        for n, chance in enumerate(arriving):
            if chance:
                leaving[: n + 1] += chance * survivors[n]
        evaluations += (expected_in - float(leaving @ np.arange(trials + 1))) * rung
        arriving = leaving
    finish = float(arriving @ np.arange(trials + 1))
    evaluations += finish * max_t
    return AshaShare(trials, max_t, cuts, reach, finish, evaluations)


def replayed_asha_share(cfg: dict, trials: int, concurrency: int, replays: int = 200, seed: int = 0) -> AshaShare:
    """ASHA's expected share when the judged metric carries its past (``best_val_f1``, ``best_val_score``: the best so
    far; ``val_f1_ema``: a moving average), which makes a trial's values at successive rungs depend on each other
    and the arithmetic of :func:`asha_share` too strict. Curves of that form, built from exchangeable noise, are
    replayed through the search's own Ray scheduler, ``concurrency`` trials at a time advancing one evaluation each
    in turn; the counts are averaged over ``replays``."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from emotune.names import asha_mode
    from emotune.search.algorithms import asha_clock, asha_rungs, make_scheduler

    _, _, max_t = asha_clock(cfg)
    metric = typed(SearchSettings, cfg["search"], "search").metric
    alpha = typed(TrialSettings, cfg["trial"], "trial").ema_alpha
    sign = 1.0 if asha_mode(metric) == "max" else -1.0
    rng = np.random.default_rng(seed)
    rungs = [r for r in asha_rungs(make_scheduler(cfg)) if r < max_t]
    replays = max(20, min(replays, 400_000 // max(1, trials * max_t)))  # a few seconds at most
    evaluations, reach, finish = 0.0, np.zeros(len(rungs)), 0.0
    for _ in range(replays):
        scheduler = make_scheduler(cfg)
        waiting, running, ran = list(range(trials)), [], []
        while waiting or running:
            while waiting and len(running) < concurrency:
                trial = SimpleNamespace(trial_id=str(waiting.pop(0)), done=0, value=None)
                scheduler.on_trial_add(None, trial)
                running.append(trial)
            for trial in list(running):
                trial.done += 1
                draw = float(rng.random())
                if trial.value is None or metric in ("val_f1", "val_loss"):
                    trial.value = draw
                elif metric == "val_f1_ema":
                    trial.value = alpha * draw + (1 - alpha) * trial.value
                else:
                    trial.value = max(trial.value, draw)
                result = {"evaluation": trial.done, metric: sign * trial.value, "val_f1_se": 0.0,
                          "best_val_score_se": 0.0}
                if scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP or trial.done >= max_t:
                    scheduler.on_trial_complete(None, trial, result)
                    running.remove(trial)
                    ran.append(trial.done)
        evaluations += sum(ran)
        reach += [sum(e >= r for e in ran) for r in rungs]
        finish += sum(e >= max_t for e in ran)
    form = {"val_f1_ema": "moving-average", "val_f1": "raw", "val_loss": "raw"}.get(metric, "best-so-far")
    return AshaShare(trials, max_t, rungs, list(reach / replays), finish / replays, evaluations / replays,
                     f"{replays} replays of {form} curves through Ray's scheduler")


def expected_improvements(evaluations: float) -> float:
    """How many evaluations set a new best score in a trial of ``evaluations`` evaluations: the records of a noisy
    rising curve, taken as twice a random sequence's (whose count of records is the harmonic number)."""
    n = max(1.0, evaluations)
    return min(n, 2 * (math.log(n) + 0.5772) + 1)


# --- the plan ----------------------------------------------------------------------------------------------------

@dataclass
class ShapeCost:
    label: str
    family: str
    size: float
    train_step: float
    eval_batch: float
    epoch_seconds: float
    how: str


@dataclass
class SearchPlan:
    """The time plan of one search (seconds unless named otherwise)."""

    description: str
    trials: int
    concurrency: int
    concurrency_why: str
    device: str
    asha: AshaShare
    evals_per_epoch: int
    shapes: list[ShapeCost] = field(default_factory=list)
    epoch_seconds: float = 0.0       # the space's mean epoch (shapes drawn uniformly)
    trial_fixed_seconds: float = 0.0  # a trial's start, end and Tune's work, besides its epochs
    trial_seconds: float = 0.0       # a trial's expected seconds under ASHA
    fill_seconds: float = 0.0
    fill_how: str = ""
    start_seconds: float = 0.0       # corpus, plan, Ray's start, workers' imports
    end_seconds: float = 0.0
    read_bytes_per_second: float = 0.0
    read_how: str = ""
    preloaded: bool = True
    time_budget_s: float | None = None
    notes: list[str] = field(default_factory=list)
    measure_seconds: float = 0.0
    units_per_trial: float = 1.0     # GPUs per trial, or CPUs when it has no GPU
    fill_units: float = 1.0          # the fill's workers (GPUs, or CPUs)
    unit: str = "CPU"

    @property
    def trials_seconds(self) -> float:
        """Wall time of the trials: their seconds spread over the concurrency, with a tail of half a trial per
        slot that the last trials leave idle, and the trial workers' start."""
        c = self.concurrency
        span = self.trials * self.trial_seconds / c + (c - 1) / c * self.trial_seconds / 2 + WORKER_FIRST_TRIAL_SECONDS
        if self.time_budget_s is not None:  # no new trial after the budget; running ones finish
            span = min(span, self.time_budget_s + self.trial_seconds / 2)
        return span

    @property
    def total_seconds(self) -> float:
        return self.start_seconds + self.fill_seconds + self.trials_seconds + self.end_seconds

    @property
    def device_hours(self) -> float:
        """Hours of the devices the search holds: the GPUs (or CPUs) of its concurrent trials for the trials' span,
        plus the fill's."""
        return (self.concurrency * self.units_per_trial * self.trials_seconds
                + self.fill_units * self.fill_seconds) / 3600

    def to_dict(self) -> dict:
        data = asdict(self)
        data["asha"]["share"] = self.asha.share
        return data | {"total_seconds": round(self.total_seconds, 1), "device_hours": round(self.device_hours, 3),
                       "trials_seconds": round(self.trials_seconds, 1)}

    def table(self) -> str:
        from emotune.features.plan import duration

        asha = self.asha
        lines = [f"Search time plan for {self.description}"]
        rows = [("shape", "train step", "eval batch", "epoch")]
        for s in self.shapes:
            rows.append((s.label, f"{s.train_step * 1e3:,.1f} ms", f"{s.eval_batch * 1e3:,.1f} ms",
                         f"{s.epoch_seconds:,.1f} s"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
        lines.append(f"  ({self.shapes[0].how if self.shapes else ''}; cache reads at "
                     f"{self.read_bytes_per_second / 1e9:,.2f} GB/s, {self.read_how}"
                     f"{'; the cache fits preload_mb: read once per trial' if self.preloaded else ''})")
        unit = "epoch" if self.evals_per_epoch == 1 else "evaluation"
        if asha.rungs:
            lines.append(f"ASHA ({asha.how}): {asha.share:.0%} of the epochs no pruning would run, "
                         f"{asha.evaluations / self.evals_per_epoch / max(1, self.trials):,.1f} epochs per trial")
            for rung, count in zip(asha.rungs, asha.reach):
                lines.append(f"  rung at {unit} {rung}: {count:,.1f} of {self.trials} trials expected to reach it")
            lines.append(f"  to the last {unit} ({asha.max_t}): {asha.finish:,.1f} trials")
        else:
            lines.append(f"No ASHA cut: every trial runs its {asha.max_t} {unit}s")
        budget = (f" (search.time_budget_s={self.time_budget_s:g}: about {self.trials} trials start)"
                  if self.time_budget_s is not None else "")
        lines += [
            f"Trial: {duration(self.trial_seconds)} expected ({duration(self.epoch_seconds)} per epoch on average, "
            f"{duration(self.trial_fixed_seconds)} to start and end); {self.trials} trials{budget}, "
            f"{self.concurrency} at a time ({self.concurrency_why}) on {self.device}",
            f"Time: start {duration(self.start_seconds)} + cache fill {duration(self.fill_seconds)} "
            f"({self.fill_how}) + trials {duration(self.trials_seconds)} + end {duration(self.end_seconds)} = "
            f"{duration(self.total_seconds)} wall, {self.device_hours:,.2f} {self.unit}-hours",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class Machine:
    """What the plan assumes of the machine the search runs on (``None``: measured or read here)."""

    device_tflops: float | None = None
    read_gbps: float | None = None
    cpus: int | None = None
    gpus: int | None = None


def device_tflops(value: str | float) -> tuple[float, str]:
    """A device's effective TFLOP/s for ``--device-tflops``, and where it comes from: a number as given, or the
    ``plan_device_tflops`` that scripts/gpu_check.py measured and wrote to its gpu.json."""
    try:
        return float(value), "as given (--device-tflops)"
    except ValueError:
        pass
    path = Path(str(value)).expanduser()
    try:
        measured = json.loads(path.read_text())
        figure, env = float(measured["plan_device_tflops"]), measured["environment"]
    except FileNotFoundError:
        raise EmotuneError(f"--device-tflops {value}: neither a number nor an existing file; give the device's "
                           "TFLOP/s or the gpu.json of scripts/gpu_check.py (benchmarks/gpu.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EmotuneError(f"--device-tflops {path}: not a gpu.json written by scripts/gpu_check.py (no "
                           f"plan_device_tflops, or unreadable: {exc}); run the check again or give the TFLOP/s as "
                           "a number") from None
    if not env.get("gpu"):
        raise EmotuneError(f"--device-tflops {path}: that file holds a CPU run of scripts/gpu_check.py (--cpu-smoke "
                           "at tiny sizes), which says nothing about a GPU; use the file a GPU run wrote")
    return figure, f"measured on {env['gpu']} on {env.get('date', '?')} by scripts/gpu_check.py ({path})"


def _stored_layers(text: str) -> int:
    return int(str(text).split("/")[0])


def _values(space: dict, cfg: dict, key: str) -> list:
    """The values ``key`` takes in the space: a choice's, an int range's ends, or the fixed value."""
    from emotune.search.space import get_path

    spec = (space.get("params") or {}).get(key) or {}
    if "choice" in spec:
        return list(spec["choice"])
    if "int" in spec:
        return [int(spec["int"][0]), int(spec["int"][1])]
    if "float" in spec:
        return [float(spec["float"][0]), float(spec["float"][1])]
    return [get_path(cfg, key)]


def model_shapes(cfg: dict, cache_plan, splits) -> tuple[list[tuple[str, float, object]], list[float]]:
    """The shapes to measure, as (family, weight, Shape): per family, the narrowest encoder pair at the lowest head
    settings and the widest at the highest, and both pairs at the other end (bilinear in size and depth); with the
    input size of every pair, for the interpolation between them."""
    from emotune.model import modalities_of
    from emotune.search.probe import Shape

    space = cfg["space"]
    modalities = modalities_of(cfg["model"])
    seconds = _mean_clip_seconds(splits)
    crop = typed(TrialSettings, cfg["trial"], "trial").crop_seconds
    by_modality: dict[str, list] = {m: [e for e in cache_plan.encoders if e.modality == m] for m in modalities}
    for m, found in by_modality.items():
        if not found or any(e.width == 0 for e in found):
            raise EmotuneError(f"the {m} encoders' shapes are unknown (see the cache plan's notes), so the trials "
                               "cannot be planned: download them first, or plan with the catalog's hub models")

    def steps(e) -> tuple[float, float, float]:
        per_clip = e.steps / max(1.0, e.passes)
        train = per_clip * crop / seconds if e.modality == "speech" else per_clip  # speech trains on crops
        return train, per_clip, e.total_bytes / max(1.0, e.steps)

    def size(pair: dict) -> float:
        return sum(_stored_layers(e.layers) * e.width * steps(e)[0] for e in pair.values())

    import itertools

    pairs = [dict(zip(modalities, combo)) for combo in itertools.product(*by_modality.values())]
    pairs.sort(key=size)
    families = [str(f) for f in _values(space, cfg, "model.family")]
    shapes = []
    for family in dict.fromkeys(families):
        ends = []
        for pick in (min, max):
            model = dict(cfg["model"], family=family)
            if family == "attention":
                model["hidden_layers"] = pick(int(v) for v in _values(space, cfg, "model.hidden_layers"))
                model["width"] = pick(int(v) for v in _values(space, cfg, "model.width"))
            ends.append(model)
        if ends[0] == ends[1]:
            ends = ends[:1]
        for chosen in (pairs[:1] if len(pairs) == 1 else [pairs[0], pairs[-1]]):
            for model in ends:
                depth = (f", {model['hidden_layers']} hidden x {model['width']}" if family == "attention" else "")
                label = f"{' + '.join(e.name for e in chosen.values())}, {family}{depth}"
                shape = Shape(label, model, {m: (_stored_layers(e.layers), e.width) for m, e in chosen.items()},
                              {m: steps(e)[0] for m, e in chosen.items()}, {m: steps(e)[1] for m, e in chosen.items()},
                              {m: steps(e)[2] for m, e in chosen.items()})
                shapes.append((family, families.count(family) / len(families), shape))
    return shapes, [size(p) for p in pairs]


def _mean_clip_seconds(splits) -> float:
    from emotune.names import SAMPLE_RATE

    clips = splits.train + splits.dev + splits.test
    return max(1e-3, sum(c.n_samples for c in clips) / len(clips) / SAMPLE_RATE)


def _concurrency(cfg: dict, trials: int, machine: Machine) -> tuple[int, str, str, float, str]:
    """Trials at a time, why, the trial's device, device units per trial and their name."""
    search = typed(SearchSettings, cfg["search"], "search")
    cpu, gpu = float(search.resources["cpu"]), float(search.resources["gpu"])
    cpus = _cpus(cfg, machine)
    gpus = _gpus(machine)
    limits = {"search.max_concurrent": search.max_concurrent, "trials": trials,
              f"{cpus} CPUs / {cpu:g} per trial": int(cpus // max(cpu, 1e-9))}
    if gpu > 0:
        limits[f"{gpus} GPUs / {gpu:g} per trial"] = int(gpus // gpu)
    why, slots = min(limits.items(), key=lambda kv: kv[1])
    if slots < 1:
        raise EmotuneError(f"no trial fits ({why}): lower search.resources or plan a machine with more "
                           "(--cpus, --gpus)")
    device = "cuda" if gpu > 0 else "cpu"
    return slots, why, device, (gpu if gpu > 0 else cpu), ("GPU" if gpu > 0 else "CPU")


@dataclass
class _TrialCosts:
    """What one trial costs besides the evaluations ASHA lets it run (seconds unless named otherwise)."""

    shapes: list[ShapeCost]          # the measured shapes, for the plan's table
    epoch_seconds: float             # the space's mean epoch (shapes drawn uniformly)
    fixed_seconds: float             # a trial's start, end and Tune's work, besides its epochs
    save_seconds: float              # one best-model save: its bookkeeping and test predictions
    read_bytes_per_second: float
    read_how: str
    preloaded: bool                  # the cache fits features.preload_mb: read once per trial


def plan_search(cfg: dict, splits, cache_plan, machine: Machine | None = None,
                corpus_seconds: tuple[float, float] = (0.0, 0.0), as_command: bool = False) -> SearchPlan:
    """The time plan of the search ``cfg`` on ``splits`` (whose cache plan is ``cache_plan``), measured here unless
    ``machine`` says otherwise. ``corpus_seconds``: what preparing the corpus took in a new process (the search's
    start) and again in the same one (each trial's, in a worker that has read it before).
    ``as_command``: the search will run as a new process, whose imports count too."""
    machine = machine or Machine()
    started = time.perf_counter()
    if not cfg["features"]["cache"]:
        raise EmotuneError("features.cache=false: the trials run the encoders themselves, which the time plan does "
                           "not model. Plan with the cache on (features=cached).")
    search = typed(SearchSettings, cfg["search"], "search")
    trial = typed(TrialSettings, cfg["trial"], "trial")
    trials = search.num_samples
    slots, why, device, units, unit = _concurrency(cfg, trials, machine)
    if device == "cuda" and machine.device_tflops is None:
        _require_gpu_here()
    costs = _trial_costs(cfg, splits, cache_plan, machine, device, corpus_seconds[1])
    asha, trial_seconds, best_saves = _under_asha(cfg, max(1, trials), slots, costs)
    if search.time_budget_s is not None:  # as many trials as start before the budget ends (num_samples at most)
        trials = min(trials, max(1, int(slots * search.time_budget_s / trial_seconds) + slots))
        asha, trial_seconds, best_saves = _under_asha(cfg, trials, slots, costs)
        slots, why, *_ = _concurrency(cfg, trials, machine)

    fill_seconds, fill_how, fill_workers = plan_fill(cfg, splits, cache_plan, machine, device)
    plan = SearchPlan(
        description=splits.description, trials=trials, concurrency=slots, concurrency_why=why, device=device,
        asha=asha, evals_per_epoch=trial.evals_per_epoch, shapes=costs.shapes, epoch_seconds=costs.epoch_seconds,
        trial_fixed_seconds=costs.fixed_seconds + best_saves, trial_seconds=trial_seconds, fill_seconds=fill_seconds,
        fill_how=fill_how,
        start_seconds=corpus_seconds[0] + RAY_START_SECONDS + (PROCESS_START_SECONDS if as_command else 0.0),
        end_seconds=SEARCH_END_SECONDS, read_bytes_per_second=costs.read_bytes_per_second, read_how=costs.read_how,
        preloaded=costs.preloaded, time_budget_s=search.time_budget_s, units_per_trial=units,
        fill_units=fill_workers, unit=unit)
    if trial.early_stop is not None:
        plan.notes.append(f"trial.early_stop={trial.early_stop} may end trials sooner than ASHA: the "
                          "trials' time is an upper bound")
    plan.measure_seconds = time.perf_counter() - started
    if search.plan_time:  # the search measures again at its start, as this plan just did
        plan.start_seconds += plan.measure_seconds
    return plan


def _require_gpu_here() -> None:
    """Refuse to plan GPU trials by measuring on a machine without a GPU: the planned GPU's speed must be given."""
    import torch

    if not torch.cuda.is_available():
        raise EmotuneError("search.resources.gpu asks for GPUs, and this machine has none to measure: give the "
                           "planned GPU's speed, --device-tflops (e.g. 100 for an A100 at a realistic share of "
                           "its 312 TFLOP/s bf16 peak)")


def _trial_costs(cfg: dict, splits, cache_plan, machine: Machine, device: str, corpus_seconds: float) -> _TrialCosts:
    """A trial's costs, measured on the shapes the space can draw: their steps, the cache reads, the bookkeeping
    (checkpoints, MLflow), the epochs these make, and the trial's start and end. ``corpus_seconds``: reading the
    prepared corpus again, in a worker that has read it before."""
    from emotune.search import probe as probe

    _, n_dev, n_test = splits.counts()
    n_classes = len(splits.utterances.labels) if splits.utterances is not None else 5
    shapes, pair_sizes = model_shapes(cfg, cache_plan, splits)
    steps = _step_times(cfg, shapes, n_classes, device, machine)
    speed, read_how, held, preloaded = _cache_reads(cfg, cache_plan, machine)
    bookkeeping = probe.measure_bookkeeping(steps[-1][2], n_classes, int(round(n_dev)), int(round(n_test)),
                                            cfg["tracking"])
    shape_costs, epoch_by_shape = _shape_epochs(cfg, splits, steps, bookkeeping, speed, preloaded)
    eval_batch_mean = float(np.mean([t.evaluate for _, _, _, t in steps]))
    test_batches = math.ceil(n_test / typed(TrialSettings, cfg["trial"], "trial").eval_batch_size)
    setup = corpus_seconds + (held / speed if preloaded else 0.0)
    return _TrialCosts(shapes=shape_costs, epoch_seconds=_mean_epoch(steps, epoch_by_shape, pair_sizes),
                       fixed_seconds=setup + bookkeeping.per_trial + TUNE_SECONDS_PER_TRIAL,
                       save_seconds=bookkeeping.per_best + test_batches * eval_batch_mean,
                       read_bytes_per_second=speed, read_how=read_how, preloaded=preloaded)


def _step_times(cfg: dict, shapes: list, n_classes: int, device: str, machine: Machine) -> list[tuple]:
    """Every shape's training step and evaluation batch, as (family, weight, Shape, StepTimes): from the FLOPs at
    the planned device's speed where ``machine`` gives one, else timed here with a trial's CPU threads."""
    from emotune.search import probe as probe

    trial = typed(TrialSettings, cfg["trial"], "trial")
    threads = max(1, int(float(cfg["search"]["resources"]["cpu"])))
    batch, eval_batch = trial.batch_size, trial.eval_batch_size
    steps = []
    for family, weight, shape in shapes:
        if machine.device_tflops:
            times = probe.flop_step_times(shape, batch, eval_batch, n_classes, machine.device_tflops,
                                          HOST_TO_DEVICE_BYTES_PER_SECOND if device == "cuda" else float("inf"))
        else:
            times = probe.time_steps(shape, batch, eval_batch, n_classes, device, threads)
        steps.append((family, weight, shape, times))
    return steps


def _cache_reads(cfg: dict, cache_plan, machine: Machine) -> tuple[float, str, float, bool]:
    """How the trials read the cache: its speed in bytes per second, how that was found, the bytes of an encoder
    pair's cache in memory, and whether those fit features.preload_mb (read once per trial, else crop by crop)."""
    from emotune.search import probe as probe

    features = typed(FeatureSettings, cfg["features"], "features")
    if machine.read_gbps:
        speed, read_how = machine.read_gbps * 1e9, "as given (--read-gbps)"
    else:
        speed, read_how = probe.read_speed(features.dir), f"measured in {features.dir}"
    held = sum(np.mean([e.total_bytes * (2 if e.storage == "int8" else 1) for e in cache_plan.encoders
                        if e.modality == m]) for m in {e.modality for e in cache_plan.encoders})  # a pair's, in memory
    return speed, read_how, held, bool(held <= features.preload_mb * 1e6)


def _shape_epochs(cfg: dict, splits, steps: list[tuple], bookkeeping, speed: float,
                  preloaded: bool) -> tuple[list[ShapeCost], dict[int, float]]:
    """Each measured shape's epoch: its training steps, the epoch's dev evaluations with their bookkeeping and
    Tune's reports, its checkpoint, and the cache reads unless the cache is preloaded. With ``trial.folds=K`` an
    epoch trains K heads on (K-1)/K of the labelled clips each and evaluates every labelled clip once. Returns the
    shapes' costs and their epoch seconds by ``id(shape)``."""
    from emotune.data.folds import trained_per_epoch

    trial = typed(TrialSettings, cfg["trial"], "trial")
    per_epoch = trial.evals_per_epoch
    n_train, n_dev, _ = splits.counts()
    n_train, n_dev = trained_per_epoch(n_train, n_dev, trial.folds), (n_dev if trial.folds == 1 else n_train + n_dev)
    train_batches, dev_batches = math.ceil(n_train / trial.batch_size), math.ceil(n_dev / trial.eval_batch_size)
    shape_costs, epoch_by_shape = [], {}
    for family, weight, shape, times in steps:
        io = 0.0 if preloaded else (n_train * sum(shape.train_steps[m] * shape.bytes_per_step[m] for m in shape.dims)
                                    + per_epoch * n_dev * sum(shape.eval_steps[m] * shape.bytes_per_step[m]
                                                              for m in shape.dims)) / speed
        epoch = (train_batches * times.train + per_epoch * (dev_batches * times.evaluate + bookkeeping.per_evaluation
                                                            + TUNE_SECONDS_PER_REPORT)
                 + bookkeeping.per_epoch + io)
        epoch_by_shape[id(shape)] = epoch
        shape_costs.append(ShapeCost(shape.label, family, shape.size, times.train, times.evaluate, epoch, times.how))
    return shape_costs, epoch_by_shape


def _mean_epoch(steps: list[tuple], epoch_by_shape: dict[int, float], pair_sizes: list[float]) -> float:
    """The space's mean epoch: per family, bilinear between its measured ends over every encoder pair (drawn
    uniformly), weighted by the family's share of the draws."""
    epoch_mean = 0.0
    for family in dict.fromkeys(f for f, _, _, _ in steps):
        mine = [(s, epoch_by_shape[id(s)]) for f, _, s, _ in steps if f == family]
        weight = next(w for f, w, _, _ in steps if f == family)
        lo, hi = min(pair_sizes), max(pair_sizes)
        sizes = sorted({s.size for s, _ in mine})
        at = {size: np.mean([e for s, e in mine if s.size == size]) for size in sizes}
        if len(sizes) == 1:
            mean = float(at[sizes[0]])
        else:
            mean = float(np.mean([at[sizes[0]] + (at[sizes[-1]] - at[sizes[0]]) * (p - lo) / max(hi - lo, 1e-9)
                                  for p in pair_sizes]))
        epoch_mean += weight * mean
    return epoch_mean


def _under_asha(cfg: dict, count: int, slots: int, costs: _TrialCosts) -> tuple[AshaShare, float, float]:
    """ASHA's share for ``count`` trials run ``slots`` at a time, a trial's expected seconds, and its best-model
    saves' seconds."""
    from emotune.search.algorithms import asha_clock, asha_rungs, make_scheduler

    search = typed(SearchSettings, cfg["search"], "search")
    per_epoch, _, max_t = asha_clock(cfg)
    rungs = asha_rungs(make_scheduler(cfg)) if search.scheduler != "none" else []
    if rungs and search.metric not in ("val_f1", "val_loss"):
        share = replayed_asha_share(cfg, count, min(count, slots))
    else:  # values exchangeable at every rung: the exact arithmetic
        share = asha_share(count, rungs, max_t, search.reduction_factor)
    evaluations = share.evaluations / share.trials
    saves = expected_improvements(evaluations) * costs.save_seconds
    return share, costs.fixed_seconds + evaluations / per_epoch * costs.epoch_seconds + saves, saves


def plan_fill(cfg: dict, splits, cache_plan, machine: Machine, device: str) -> tuple[float, str, float]:
    """Seconds to fill the missing cache, how they were found, and the devices it holds: the real fill code on a few
    clips for encoders on this machine; otherwise the encoders' FLOPs at the device's speed plus the CPU's share
    (normalising and augmenting each clip, timed here), spread over the cache workers (one per GPU, or per CPU up to
    features.cpu_workers)."""
    from emotune.features.plan import plan_recipe
    from emotune.search import probe as probe

    missing = [e for e in cache_plan.encoders if e.missing_bytes > 0]
    if not missing:
        return 0.0, "the cache holds everything", 0.0
    gpus = _gpus(machine)
    features = cfg["features"]  # handed on to the fill code as it is
    settings = typed(FeatureSettings, features, "features")
    if device == "cuda" and gpus:
        workers = max(1, int(gpus / settings.gpu_per_worker))
    else:
        workers = _cpus(cfg, machine)
        if settings.cpu_workers is not None:
            workers = min(workers, settings.cpu_workers)
    total, hows = 0.0, set()
    seconds = _mean_clip_seconds(splits)
    prep = None
    for e in missing:
        recipe, _, keys_known = plan_recipe(e.name, e.modality, splits, features, cfg["paths"])
        share = e.missing_bytes / max(1.0, e.total_bytes)
        here = recipe is not None and (recipe.files is not None or recipe.spec.kind == "classic")
        if machine.device_tflops is None and here and keys_known:
            per_job, load = probe.time_fill(recipe, splits.utterances, features,
                                            threads=1 if device != "cuda" or not gpus else 4)
            total += e.passes * share * per_job / workers + load
            hows.add("the fill code timed on a few clips")
            continue
        tflops = machine.device_tflops or settings.plan_tflops
        encode = e.seconds * settings.plan_tflops / tflops  # the cache plan's FLOPs, at this speed
        cpu = 0.0
        if e.modality == "speech":
            prep = prep or probe.time_waveform_prep(seconds, features)
            n_train, n_dev, _ = splits.counts()
            variants = (n_train + (n_dev if settings.folds > 1 else 0)) * settings.variants
            cpu = (e.passes * prep[0] + variants * prep[1]) * share
        total += (encode + cpu) / workers
        hows.add(f"encoder FLOPs at {tflops:g} TFLOP/s and the CPU's normalising and augmenting, timed here; "
                 "audio decoding not counted")
    where = f"{workers} {'GPU' if device == 'cuda' and gpus else 'CPU'} worker{'s' * (workers > 1)}"
    if workers > 1:  # the search starts a pool of Ray cache workers
        total += CACHE_POOL_START_SECONDS
    return total, f"{'; '.join(sorted(hows))}; {where}", float(workers)


def _cpus(cfg: dict, machine: Machine) -> int:
    """The CPUs the plan assumes: --cpus, else ray.num_cpus, else this machine's."""
    import os

    return machine.cpus or int(cfg["ray"].get("num_cpus") or os.cpu_count() or 1)


def _gpus(machine: Machine) -> int:
    """The GPUs the plan assumes: --gpus, else this machine's."""
    if machine.gpus is not None:
        return machine.gpus
    import torch

    return torch.cuda.device_count()
