"""Compose emotune's configuration with Hydra and hand it on as a plain dict with absolute paths.

The YAML files live in ``emotune/conf`` (shipped inside the package). Commands take Hydra-style
``key=value`` overrides; a wrong key, group option or missing value becomes an :class:`EmotuneError` that
lists what exists instead of a Hydra traceback. Everything downstream (trials on Ray workers included)
receives the plain dict, never a Hydra object, and never a relative path: Ray changes the working
directory of its workers.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from emotune.errors import EmotuneError

CONF_DIR = Path(__file__).resolve().parent / "conf"


def _keys_under(cfg, parent: str) -> str:
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, parent) if parent else cfg
    return ", ".join(sorted(str(k) for k in node.keys())) if hasattr(node, "keys") else "(none)"


def compose(overrides: Sequence[str] = (), config_name: str = "config"):
    """The composed Hydra config (an OmegaConf object) for ``overrides``; errors explain themselves."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    def run(overrides):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                return hydra_compose(config_name=config_name, overrides=list(overrides))
        finally:
            GlobalHydra.instance().clear()

    overrides = list(overrides)
    if config_name == "search":
        overrides += _spaces_search_path(overrides)
    try:
        return run(overrides)
    except MissingConfigException as exc:
        message = str(exc).split("Config search path")[0].strip()
        raise EmotuneError(f"{message}\nPick one of the options listed.") from None
    except ValueError as exc:  # e.g. a config group set to null
        raise EmotuneError(f"invalid override: {exc}. A config group takes the name of one of its options.") from None
    except OverrideParseException as exc:
        first = str(exc).splitlines()[0]
        raise EmotuneError(f"cannot parse the override: {first}. Overrides look like key=value.") from None
    except ConfigCompositionException as exc:
        cause = exc.__cause__ or exc
        key = getattr(cause, "full_key", None) or ""
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        where = f"under '{parent}'" if parent else "at the top level"
        raise EmotuneError(
            f"invalid override: {str(cause).splitlines()[0]}. Keys {where}: {_keys_under(run([]), parent)}. "
            "Check the spelling, or prefix the override with + to add a new key on purpose."
        ) from None


def _spaces_search_path(overrides: Sequence[str]) -> list[str]:
    """Hydra's search path with the folder ``paths.spaces_dir=DIR`` names (its ``space/NAME.yaml`` files)."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("paths.spaces_dir=")]
    if not given or given[-1] in ("", "null"):
        return []
    folder = Path(given[-1]).expanduser().resolve()
    if not (folder / "space").is_dir():
        raise EmotuneError(f"paths.spaces_dir={given[-1]}: {folder / 'space'} is not a folder. Put your spaces in "
                           "DIR/space/NAME.yaml (copy one from emotune's search_spaces/space/) and pass "
                           "paths.spaces_dir=DIR space=NAME.")
    # Hydra takes a space from the first folder of its search path that has it: yours come first, so they win
    return [f"hydra.searchpath=[file://{folder},pkg://emotune.search_spaces]"]


def to_plain(cfg) -> dict:
    """Resolve interpolations and make every path absolute; raise a clear error for a missing value."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    # Make runs_dir absolute before interpolation, so every path built from it (caches, the SQLite URI) is too.
    cfg.paths.runs_dir = str(Path(cfg.paths.runs_dir).expanduser().resolve())
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", "a required key")
        raise EmotuneError(f"{key} has no value: pass it on the command line as {key}=...") from None
    except InterpolationResolutionError as exc:
        raise EmotuneError(f"cannot resolve the configuration: {exc}") from None
    return absolutize(plain)


def absolutize(cfg: dict) -> dict:
    """Resolve data paths against ``data.root`` and the other folders against the launch folder."""
    data = cfg.get("data")
    if data:
        root = Path(data["root"]).expanduser().resolve()
        data["root"] = str(root)
        for key in ("train_csv", "test_csv", "test_labels", "audio_dir"):
            if data.get(key):
                data[key] = str((root / data[key]).resolve())
    features = cfg.get("features") or {}
    if features.get("dir"):
        features["dir"] = str(Path(features["dir"]).expanduser().resolve())
    for key in ("rir_dir", "noise_dir"):
        if (features.get("augment") or {}).get(key):
            features["augment"][key] = str(Path(features["augment"][key]).expanduser().resolve())
    ray_cfg = cfg.get("ray") or {}
    if ray_cfg.get("storage"):
        ray_cfg["storage"] = _storage_path(str(ray_cfg["storage"]))
    tracking = cfg.get("tracking") or {}
    uri = tracking.get("uri") or ""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # a relative SQLite path
        tracking["uri"] = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    if tracking.get("artifacts"):
        tracking["artifacts"] = str(Path(tracking["artifacts"]).expanduser().resolve())
    return cfg


def _storage_path(storage: str) -> str:
    """``ray.storage`` as an absolute folder; object-storage URIs are refused, saying why and what works instead."""
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    if "://" in storage:
        raise EmotuneError(
            f"ray.storage={storage}: emotune keeps Ray's results in a folder, not in object storage. A search's lock "
            "is an atomic file creation there, and its corpus, feature cache and encoders are read as files by every "
            "node anyway, so a cluster needs a shared filesystem (NFS, Lustre, a cloud file share) mounted at the same "
            "path on every node: pass that path, e.g. ray.storage=/shared/emotune/ray.")
    return str(Path(storage).expanduser().resolve())


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> dict:
    """Compose, resolve and type-check: the plain dict every emotune command works from."""
    cfg = to_plain(compose(overrides, config_name))
    check_settings(cfg)
    return cfg


# --- typed settings ---------------------------------------------------------------------------------------------
# The sections that the training loop, the cache and the search read, with their types. The values (defaults
# included) live in the YAML files only; these classes say what each key must be, so that a mistyped value
# fails here, naming the key, instead of deep inside a trial.

@dataclass(frozen=True)
class TrialSettings:
    """``trial.*``: one trial's training loop (conf/trial/default.yaml)."""

    max_epochs: int
    evals_per_epoch: int
    batch_size: int
    eval_batch_size: int
    lr: float
    weight_decay: float
    aug_prob: float
    crop_seconds: float
    patience: int
    lr_decay: float
    early_stop: int | None
    select_by: str
    ema_alpha: float
    class_weights: str
    seed: int
    cpus: int
    device: str
    folds: int
    resplit: bool


@dataclass(frozen=True)
class FeatureSettings:
    """``features.*``: how encoder outputs reach the model (conf/features/cached.yaml)."""

    cache: bool
    dir: str
    variants: int
    folds: int
    speech_layers: Any
    text_layers: Any
    max_text_tokens: int
    batch_size: int
    device: str
    gpu_per_worker: float
    cpu_workers: int | None
    waveform_norm: str
    storage: str
    max_cache_gb: float | None
    plan_tflops: float
    verify: bool
    preload_mb: float
    augment: dict


@dataclass(frozen=True)
class SearchSettings:
    """``search.*``: how trials are proposed and stopped (conf/search/default.yaml)."""

    name: str
    num_samples: int
    time_budget_s: float | None
    max_concurrent: int
    scheduler: str
    noise_z: float
    metric: str
    grace_period: int
    reduction_factor: float
    plan_time: bool
    max_failures: int
    take_over_lock: bool
    replace: bool
    sampler: str
    n_startup_trials: int
    ties_confidence: float
    sampler_seed: int
    reproducible: bool
    resources: dict


_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", dict: "a section"}


def _checked(key: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` says, or an error naming ``key``."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for kind in options:
        if kind is Any:
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind in (int, str, dict) and isinstance(value, kind) and not isinstance(value, bool):
            return value
        if kind is bool and isinstance(value, bool):
            return value
    wanted = " or ".join("null" if k is type(None) else _KINDS[k] for k in options)
    raise EmotuneError(f"{key} must be {wanted}, got {value!r}. Fix it on the command line ({key}=...) or in the "
                       "YAML file that sets it.")


def typed(settings_class: type, section: dict, prefix: str):
    """The typed, checked settings of one config section (``prefix``: its name, for error messages)."""
    hints = typing.get_type_hints(settings_class)
    unknown = sorted(set(section) - set(hints))
    if unknown:
        raise EmotuneError(f"unknown key {prefix}.{unknown[0]}; the keys under '{prefix}' are: "
                           f"{', '.join(sorted(hints))}.")
    missing = sorted(set(hints) - set(section))
    if missing:
        raise EmotuneError(f"{prefix}.{missing[0]} has no value: set it in the YAML files or on the command line.")
    return settings_class(**{name: _checked(f"{prefix}.{name}", section[name], hint) for name, hint in hints.items()})


# Settings whose type alone does not make them valid: (key, test, what the value must be, what the key does).
_RANGES = (
    ("search.grace_period", lambda v: v >= 1, "at least 1",
     "the dev evaluations every trial gets before ASHA's first rung"),
    ("search.reduction_factor", lambda v: v > 1, "above 1",
     "ASHA keeps the best 1/reduction_factor of trials at each rung: 2 keeps half, 3 a third"),
    ("search.n_startup_trials", lambda v: v >= 1, "at least 1",
     "trials tpe or gp draw at random before modelling the results"),
    ("search.noise_z", lambda v: v >= 0, "0 or more", "standard errors below a rung's cutoff before noise_asha cuts"),
    ("search.ties_confidence", lambda v: 0.5 < v < 1, "between 0.5 and 1",
     "the share of paired resamples in which the best must beat a trial for it not to be tied with the best"),
    ("trial.evals_per_epoch", lambda v: v >= 1, "at least 1", "dev evaluations per epoch"),
    ("trial.folds", lambda v: v >= 1, "at least 1",
     "1 trains on the train split and scores on dev; K cuts the labelled clips into K folds"),
    ("features.cpu_workers", lambda v: v is None or v >= 1, "at least 1, or null",
     "the most cache-filling workers without GPUs: each holds a full encoder in memory"),
    ("features.gpu_per_worker", lambda v: v > 0, "above 0",
     "the GPUs each cache-filling worker asks Ray for: 1 is one encoder copy per GPU, 0.5 two copies"),
)


def check_settings(cfg: dict) -> None:
    """Type-check every section that has settings classes, then the ranges of the keys whose type is not enough;
    raises :class:`EmotuneError` on the first problem."""
    for name, settings_class in (("trial", TrialSettings), ("features", FeatureSettings), ("search", SearchSettings)):
        if name in cfg:
            typed(settings_class, cfg[name], name)
    for key, valid, must, meaning in _RANGES:
        section, name = key.split(".")
        if section in cfg and not valid(cfg[section][name]):
            raise EmotuneError(f"{key}={cfg[section][name]} is out of range: it must be {must} ({meaning}). Fix it "
                               f"on the command line ({key}=...) or in the YAML file that sets it.")
