"""The report's pictures, each a PNG: importances with intervals, scores per encoder pair, each numeric setting
against the score (trials ASHA cut drawn apart), and the best score against time."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from emotune.insight.importance import Importance
from emotune.insight.pairs import PairRow, group_by_pair
from emotune.insight.record import SearchRecord, score

KEPT, CUT = "#1f6fb4", "#9aa5b1"  # finished trials, and trials ASHA stopped early


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def importance_png(found: Sequence[Importance], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(found)))
    names = [i.setting for i in found][::-1]
    values = [i.value for i in found][::-1]
    errors = [[i.value - i.low for i in found][::-1], [i.high - i.value for i in found][::-1]]
    ax.barh(names, values, xerr=errors, color=KEPT, alpha=0.8, capsize=3)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"importance ({found[0].evaluator if found else ''}; bars: 95% bootstrap interval over trials)")
    return _save(fig, path)


def pairs_png(record: SearchRecord, table: Sequence[PairRow], path: Path) -> Path:
    """Each pair's trials as dots (hollow: cut by ASHA), the pair's best ringed, best pair on top."""
    plt = _pyplot()
    groups = group_by_pair(record)
    fig, ax = plt.subplots(figsize=(7, 0.7 + 0.45 * len(table)))
    for y, pair in enumerate(reversed(table)):
        for row in groups[(pair.speech, pair.text)]:
            cut = record.was_cut(row)
            ax.scatter(score(row), y, s=28, facecolors="none" if cut else KEPT, edgecolors=CUT if cut else KEPT)
        ax.scatter(pair.best, y, s=120, facecolors="none", edgecolors="#d1495b", linewidths=1.5)
    ax.set_yticks(range(len(table)), [p.label for p in reversed(table)])
    ax.set_xlabel("ranking score (filled: finished, hollow: cut by ASHA; ring: the pair's best)")
    return _save(fig, path)


def _numeric(record: SearchRecord) -> list[str]:
    return [k for k, spec in record.searched.items() if "choice" not in spec]


def slices_png(record: SearchRecord, path: Path) -> Path | None:
    keys = _numeric(record)
    if not keys:
        return None
    plt = _pyplot()
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for cut in (False, True):
            points = [(r[f"param:{key}"], score(r)) for r in record.finished
                      if r.get(f"param:{key}") is not None and record.was_cut(r) == cut]
            if points:
                ax.scatter(*zip(*points), s=22, facecolors="none" if cut else KEPT, edgecolors=CUT if cut else KEPT,
                           label="cut by ASHA" if cut else "finished")
        if record.searched[key].get("log"):
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks of a short log axis overlap
        ax.set_xlabel(key)
        ax.set_ylabel("ranking score")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return _save(fig, path)


def _reports(record: SearchRecord) -> list[dict]:
    """Every report of every trial (Ray's result.json rows), with its time."""
    rows = []
    for result in record.experiment_dir.glob("*/result.json"):
        for line in result.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "timestamp" in row and score(row) is not None:
                rows.append(row)
    return sorted(rows, key=lambda r: r["timestamp"])


def progress_png(record: SearchRecord, path: Path) -> Path | None:
    """The best ranking score reached so far against the search's minutes, with the planned and actual end."""
    reports = _reports(record)
    if not reports:
        return None
    plt = _pyplot()
    started = record.summary.get("started_at")
    since = "the search started"
    if started is None:  # a search from before summary.json: its first trial's start is what is known
        started, since = min(r["timestamp"] - r.get("time_total_s", 0) for r in reports), "the first trial started"
    best, xs, ys = -1.0, [], []
    for row in reports:
        best = max(best, score(row))
        xs.append((row["timestamp"] - started) / 60)
        ys.append(best)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.step(xs, ys, where="post", color=KEPT)
    for key, style, label in (("seconds", "-", "search ended"), ("planned_seconds", "--", "planned end")):
        if record.summary.get(key):
            ax.axvline(record.summary[key] / 60, color="#555", ls=style, lw=1, label=label)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"minutes since {since}")
    ax.set_ylabel("best ranking score so far")
    if record.summary.get("seconds"):
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)
