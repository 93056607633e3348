"""Compose emotune's configuration with Hydra and hand it on as a plain dict with absolute paths.

The YAML files live in ``emotune/conf`` (shipped inside the package). Commands take Hydra-style
``key=value`` overrides; a wrong key, group option or missing value becomes an :class:`EmotuneError` that
lists what exists instead of a Hydra traceback. Everything downstream (trials on Ray workers included)
receives the plain dict, never a Hydra object, and never a relative path: Ray changes the working
directory of its workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

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
    tracking = cfg.get("tracking") or {}
    uri = tracking.get("uri") or ""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # a relative SQLite path
        tracking["uri"] = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    if tracking.get("artifacts"):
        tracking["artifacts"] = str(Path(tracking["artifacts"]).expanduser().resolve())
    return cfg


def load_config(overrides: Sequence[str] = (), config_name: str = "config") -> dict:
    """Compose and resolve: the plain dict every emotune command works from."""
    return to_plain(compose(overrides, config_name))
