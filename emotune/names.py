"""Names every layer shares, defined once: the modalities, the sample rate, metric and ensemble method names."""

from __future__ import annotations

import os
from pathlib import Path

MODALITIES = ("speech", "text")  # in the order the model concatenates them in time
SAMPLE_RATE = 16_000  # Hz: every clip is decoded to this rate, the rate all supported speech encoders expect
# what a trial reports that ASHA may judge (best_val_score: the ranking score, trial.select_by): F1s and
# scores are maximised, the dev cross-entropy val_loss is minimised
# The search's one objective: what ranks trials (the summary, select-top, ties), what the sampler learns and what the
# progress table sorts by; ASHA judges it too unless search.metric names another curve (a documented choice)
OBJECTIVE = "best_val_score"
ASHA_METRICS = ("best_val_score", "val_f1", "val_f1_ema", "best_val_f1", "val_loss")
ENSEMBLE_METHODS = ("hard", "soft", "greedy")  # emotune.selection.ensemble combines members in these ways


def asha_mode(metric: str) -> str:
    """Whether ASHA keeps the trials with the highest (max) or the lowest (min) values of ``metric``."""
    return "min" if metric == "val_loss" else "max"


def user_cache_dir() -> Path:
    """Where emotune keeps what a machine can reuse across runs (an empty MLflow store, encoders' parameter counts):
    ``$XDG_CACHE_HOME/emotune``, by default ``~/.cache/emotune``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emotune"


def file_identity(path: str | Path) -> str:
    """A key that changes whenever the file does (path, size, modification time), for memos of its content."""
    st = os.stat(path)
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"
