"""A finished search as the report reads it: its settings, its trial table and its summary, from its folder."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from emotune.errors import EmotuneError

SUMMARY_JSON = "summary.json"  # in a search's summary folder: its time, its plan and its MLflow run
TRIALS_CSV = "trials.csv"


def _value(text: str):
    """A trials.csv cell as the value it was: None, a bool, an int, a float, or the string."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass
class SearchRecord:
    """One finished search: ``rows`` are its trials.csv rows (best-ranked first), typed back from text."""

    name: str
    cfg: dict
    experiment_dir: Path
    rows: list[dict]
    summary: dict = field(default_factory=dict)

    @property
    def summary_dir(self) -> Path:
        return self.experiment_dir / "summary"

    @property
    def trials_dir(self) -> Path:
        return Path(self.cfg["paths"]["runs_dir"]) / "trials" / self.experiment_dir.name

    @property
    def searched(self) -> dict[str, dict]:
        """The searched settings and their ranges, in the space's order."""
        return dict(self.cfg["space"]["params"])

    @property
    def finished(self) -> list[dict]:
        """Trials that ended without error and reported a score: the ones the report learns from."""
        return [r for r in self.rows if r.get("status") != "ERROR" and score(r) is not None]

    def was_cut(self, row: dict) -> bool:
        """Stopped by ASHA: ended before trial.max_epochs without its own early stopping (as the summary counts)."""
        epochs = row.get("epochs")
        return (not row.get("early_stopped") and epochs is not None
                and epochs < float(self.cfg["trial"]["max_epochs"]))


def score(row: dict) -> float | None:
    """The ranking score of a trials.csv row (best_val_score; best_val_f1 for older searches)."""
    from emotune.insight.standing import ranking_score

    return ranking_score(row)


def read_rows(table: Path) -> list[dict]:
    with table.open(newline="", encoding="utf-8") as f:
        return [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _finished_searches(storage: Path) -> list[Path]:
    found = [d for d in storage.iterdir() if (d / "summary" / TRIALS_CSV).is_file()] if storage.is_dir() else []
    return sorted(found, key=lambda d: (d / "summary" / TRIALS_CSV).stat().st_mtime, reverse=True)


def load_record(cfg: dict, search: str | None = None) -> SearchRecord:
    """The search ``search`` (by name; the latest finished one when None) of the runs folder ``cfg`` names."""
    storage = Path(cfg["ray"]["storage"])
    searches = _finished_searches(storage)
    if not searches:
        raise EmotuneError(f"no finished search in {storage} (none has summary/{TRIALS_CSV}): run "
                           "`python -m emotune.search` first, or point paths.runs_dir at the runs folder it used.")
    if search is None:
        folder = searches[0]
    else:
        folder = storage / search
        if folder not in searches:
            names = ", ".join(d.name for d in searches)
            raise EmotuneError(f"no finished search named '{search}' in {storage}. Finished searches there: {names}.")
    settings = folder / "emotune_config.json"
    try:
        saved = json.loads(settings.read_text())
    except (OSError, ValueError) as exc:
        raise EmotuneError(f"{settings} cannot be read ({exc}): the search's own settings are needed to know what "
                           "it searched. Run the search again under a new name.") from None
    summary_file = folder / "summary" / SUMMARY_JSON
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return SearchRecord(folder.name, saved, folder, read_rows(folder / "summary" / TRIALS_CSV), summary)
