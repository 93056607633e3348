"""A search space file to an Optuna define-by-run function, and sampled values back into a config.

A space (``search_spaces/space/NAME.yaml``, chosen with ``space=NAME``) names configuration keys and how to
sample them::

    space:
      name: encoders
      params:
        encoders.speech: {choice: [fbank, mfcc]}
        model.family: {choice: [attention, cognicic]}
        model.hidden_layers: {int: [0, 3], when: {model.family: attention}}   # conditional
        trial.lr: {float: [1.0e-4, 3.0e-3], log: true}
      points_to_evaluate:            # known-good settings tried first (e.g. the paper's)
        - {model.family: attention, model.hidden_layers: 2, trial.lr: 1.0e-3}

Parameters are sampled in file order; ``when`` makes one exist only if earlier (or fixed) keys have the
given value(s), which is why the space reaches Optuna as a define-by-run function. The same file may also
set fixed keys for its trials (``trial.max_epochs``, ``search.num_samples``, ...) at the top level.
"""

from __future__ import annotations

import copy
from typing import Any

from emotune.errors import EmotuneError

KINDS = ("choice", "int", "float")


def get_path(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def set_path(cfg: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _where(space: dict) -> str:
    return f"search space '{space.get('name', '?')}'"


def validate_space(space: dict, cfg: dict) -> dict[str, dict]:
    """Check every parameter: the key exists in the config, the kind is known, bounds and conditions make sense."""
    params = space.get("params") or {}
    if not isinstance(params, dict) or not params:
        raise EmotuneError(f"{_where(space)} has no parameters: add a `params:` mapping of config keys to ranges.")
    seen: set[str] = set()
    for key, spec in params.items():
        try:
            get_path(cfg, key)
        except KeyError:
            section = key.split(".")[0]
            known = (", ".join(sorted(f"{section}.{k}" for k in cfg.get(section, {})))
                     if isinstance(cfg.get(section), dict) else ", ".join(sorted(cfg)))
            raise EmotuneError(f"{_where(space)}: parameter '{key}' is not a configuration key. "
                               f"Keys that exist: {known}.") from None
        if not isinstance(spec, dict):
            raise EmotuneError(f"{_where(space)}: parameter '{key}' needs a mapping such as {{choice: [...]}}.")
        kinds = [k for k in KINDS if k in spec]
        if len(kinds) != 1:
            raise EmotuneError(f"{_where(space)}: parameter '{key}' must have exactly one of {', '.join(KINDS)}.")
        kind = kinds[0]
        values = spec[kind]
        if kind == "choice" and (not isinstance(values, list) or not values):
            raise EmotuneError(f"{_where(space)}: '{key}' choice needs a non-empty list.")
        if kind in ("int", "float") and (not isinstance(values, list) or len(values) != 2 or values[0] > values[1]):
            raise EmotuneError(f"{_where(space)}: '{key}' {kind} needs [low, high] with low <= high, got {values!r}.")
        if spec.get("log") and kind != "choice" and values[0] <= 0:
            raise EmotuneError(f"{_where(space)}: '{key}' is log-scaled, so its low bound must be positive.")
        for condition_key in (spec.get("when") or {}):
            if condition_key not in seen:
                try:
                    get_path(cfg, condition_key)
                except KeyError:
                    raise EmotuneError(f"{_where(space)}: '{key}' depends on '{condition_key}', which is neither an "
                                       "earlier parameter nor a configuration key.") from None
        seen.add(key)
    return params


def _active(spec: dict, sampled: dict, cfg: dict) -> bool:
    """Whether ``spec``'s ``when`` conditions hold, reading keys from ``sampled`` first, then ``cfg``."""
    for key, wanted in (spec.get("when") or {}).items():
        value = sampled[key] if key in sampled else (cfg[key] if key in cfg else get_path(cfg, key))
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if value not in allowed:
            return False
    return True


class DefineByRun:
    """The callable Ray's ``OptunaSearch`` calls with an Optuna trial to sample one configuration.

    A class rather than a closure because Ray pickles the searcher, this included, to resume a search.
    """

    def __init__(self, space: dict, cfg: dict) -> None:
        self.params = validate_space(space, cfg)
        conditions = {k for spec in self.params.values() for k in (spec.get("when") or {})}
        # the fixed values of condition keys that are not sampled themselves
        self.fixed = {k: get_path(cfg, k) for k in conditions if k not in self.params}

    def __call__(self, trial) -> None:
        sampled: dict[str, Any] = {}
        for key, spec in self.params.items():
            if not _active(spec, sampled, self.fixed):
                continue
            if "choice" in spec:
                sampled[key] = trial.suggest_categorical(key, spec["choice"])
            elif "int" in spec:
                low, high = spec["int"]
                sampled[key] = trial.suggest_int(key, int(low), int(high), step=int(spec.get("step", 1)),
                                                 log=bool(spec.get("log", False)))
            else:
                low, high = spec["float"]
                sampled[key] = trial.suggest_float(key, float(low), float(high), log=bool(spec.get("log", False)))
        return None


def points_to_evaluate(space: dict, cfg: dict) -> list[dict]:
    """The space's known-good points, keeping only parameters that are active for each point."""
    params = validate_space(space, cfg)
    points = []
    for point in space.get("points_to_evaluate") or []:
        unknown = sorted(set(point) - set(params))
        if unknown:
            raise EmotuneError(f"{_where(space)}: points_to_evaluate names {unknown}, which are not parameters.")
        active: dict[str, Any] = {}
        for key, spec in params.items():
            if key in point and _active(spec, active, cfg):
                if "choice" in spec and point[key] not in spec["choice"]:
                    raise EmotuneError(f"{_where(space)}: points_to_evaluate sets {key}={point[key]!r}, which is not "
                                       f"one of its choices {spec['choice']}.")
                active[key] = point[key]
        points.append(active)
    return points


def apply_sampled(cfg: dict, sampled: dict) -> dict:
    """A copy of ``cfg`` with the sampled ``{"model.dropout": 0.2, ...}`` values written in."""
    out = copy.deepcopy(cfg)
    for key, value in sampled.items():
        set_path(out, key, value)
    return out


def choices_of(space: dict, key: str, cfg: dict) -> list:
    """Every value ``key`` can take in this search: its choices, or the fixed config value."""
    spec = (space.get("params") or {}).get(key)
    if spec and "choice" in spec:
        return list(spec["choice"])
    return [get_path(cfg, key)]


def encoders_in_play(cfg: dict) -> dict[str, list[str]]:
    """Per modality of the model, every encoder the search may pick (its choices, or the fixed one), checked."""
    from emotune.features.catalog import resolve_encoder
    from emotune.model import modalities_of

    space = cfg["space"]
    encoders = {}
    for modality in modalities_of(cfg["model"]):
        names = [str(n) for n in choices_of(space, f"encoders.{modality}", cfg)]
        for name in names + [str(cfg["encoders"][modality])]:
            resolve_encoder(name, modality)  # an unknown name fails here, listing the known ones
        encoders[modality] = list(dict.fromkeys(names))
    return encoders
