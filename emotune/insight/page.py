"""``report.html``: one self-contained page (pictures inlined, no outside address) of what a search learned.

    emotune report [--search NAME]      # also written at the end of every search, beside trials.csv

It is logged with its pictures to the search's MLflow run (artifacts, ``summary/``), so the UI shows it under the
search.
"""

from __future__ import annotations

import base64
import datetime
import html
import time
from pathlib import Path
from typing import Sequence

from emotune.insight import figures
from emotune.insight.importance import MIN_TRIALS, PED_ANOVA_MIN_TRIALS, Importance, importances, verdict
from emotune.insight.pairs import PairRow, pair_table
from emotune.insight.record import SearchRecord, score

REPORT = "report.html"
STYLE = """body{font:15px/1.5 system-ui,sans-serif;margin:0 auto;max-width:1000px;padding:1em 1.2em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
img{max-width:100%;height:auto}.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.92em}
td,th{padding:.25em .7em;border-bottom:1px solid #eee;text-align:left;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}.note{color:#666;font-size:.9em}
code{background:#f3f3f3;padding:0 .25em}pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f6f6;
padding:.5em}"""


def _e(value) -> str:
    return html.escape(str(value))


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _table(head: Sequence[str], rows: Sequence[Sequence], numeric: Sequence[int] = ()) -> str:
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{cells}</tr>{body}</table></div>'


def _importance_section(record: SearchRecord, out: Path) -> tuple[str, list[Path]]:
    finished = record.finished
    searched = record.searched
    if len(finished) < MIN_TRIALS:
        return f"<p>Too few finished trials ({len(finished)}) for importances: at least {MIN_TRIALS}.</p>", []
    every = [k for k in searched if all(r.get(f"param:{k}") is not None for r in finished)]
    params = [{k: r[f"param:{k}"] for k in every} for r in finished]
    scores = [score(r) for r in finished]
    parts, files = [], []
    evaluators = ["fanova"] + (["ped_anova"] if len(finished) >= PED_ANOVA_MIN_TRIALS else [])
    for evaluator in evaluators:
        try:
            found = importances(params, scores, {k: searched[k] for k in every}, evaluator)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # Optuna's refusals of a degenerate study
            parts.append(f"<p>{_e(evaluator)} importances could not be computed: {_e(exc)}</p>")
            continue
        if not found:
            parts.append("<p>No setting varies across the trials: nothing to assess.</p>")
            break
        png = figures.importance_png(found, out / f"importance-{evaluator}.png")
        files.append(png)
        parts += [f"<p><b>{_e(verdict(found))}</b></p>", _img(png, f"importance ({evaluator})"),
                  _importance_table(found)]
    left = [k for k in searched if k not in every]
    notes = [f"Scores: each trial's ranking score ({_e(_scored(record))}), {len(finished)} trials, those ASHA cut "
             "at the best score they reached. Intervals: 2.5th-97.5th percentiles over bootstrap resamples of the "
             "trials."]
    if left:
        notes.append(f"Not assessed (not in every trial: conditional settings): {_e(', '.join(left))}.")
    if len(evaluators) == 1:
        notes.append(f"PED-ANOVA needs at least {PED_ANOVA_MIN_TRIALS} trials (it compares the top 10% with all).")
    return "".join(parts) + "".join(f'<p class="note">{n}</p>' for n in notes), files


def _importance_table(found: Sequence[Importance]) -> str:
    return _table(["setting", f"importance ({found[0].evaluator})", "95% interval"],
                  [(i.setting, f"{i.value:.3f}", f"[{i.low:.3f}, {i.high:.3f}]") for i in found], (1, 2))


def _scored(record: SearchRecord) -> str:
    folds = int(record.cfg["trial"].get("folds") or 1)
    return "dev" if folds == 1 else f"out-of-fold over {folds} folds"


def _pair_section(record: SearchRecord, table: Sequence[PairRow], out: Path) -> tuple[str, list[Path]]:
    if not table:
        return "<p>No finished trial.</p>", []
    rows = []
    for i, p in enumerate(table):
        tied = "the best" if i == 0 else {True: "yes", False: "no", None: "not compared"}[p.tied]
        expected = "-" if p.expected is None else f"{p.expected[0]:.3f} [{p.expected[1]:.3f}, {p.expected[2]:.3f}]"
        rows.append((p.speech, p.text, p.trials, f"{p.best:.4f}",
                     f"{p.mean:.4f}" + ("" if p.se is None else f" ± {p.se:.4f}"), tied, expected, p.best_trial))
    png = figures.pairs_png(record, table, out / "pairs.png")
    notes = "".join(f'<p class="note">{_e(p.label)}: {_e(p.note)}</p>' for p in table if p.note)
    return (_table(["speech", "text", "trials", "best", "mean ± SE", "tied", "expected F1 [95%]", "best trial"],
                   rows, (2, 3, 4)) + _img(png, "pairs")
            + '<p class="note">Tied: with the best pair; the best pair\'s best trial does not score higher in at least '
            f"{float(record.cfg['search']['ties_confidence']):.0%} of paired bootstrap resamples of the clips. "
            "Expected F1: on unseen clips, the bias-corrected bootstrap estimate (BBC) of choosing the best of that "
            "pair's trials.</p>"
            + notes), [png]


def _time_section(record: SearchRecord, out: Path) -> tuple[str, list[Path]]:
    png = figures.progress_png(record, out / "progress.png")
    s = record.summary
    text = ""
    if s.get("seconds"):
        text = f"<p>The search took {s['seconds'] / 60:.1f} min"
        if s.get("planned_seconds"):
            text += f"; its plan said {s['planned_seconds'] / 60:.1f} min (actual/planned " \
                    f"{s['seconds'] / s['planned_seconds']:.2f})"
        text += ".</p>"
    return text + _img(png, "best score against time"), [png] if png else []


def _ties_section(record: SearchRecord) -> str:
    tied = [r for r in record.finished if r.get("tied") is True]
    rows = [(r["trial_id"], f"{score(r):.4f}", r.get("epochs"), "cut by ASHA" if record.was_cut(r) else "")
            for r in tied]
    where = f" paths.runs_dir={record.cfg['paths']['runs_dir']}"
    commands = [f"emotune select-top --k tied --search {record.name}{where}",
                f"emotune select-top --k 3 --search {record.name}{where}", f"emotune ui{where}"]
    return ((_table(["trial", "score", "epochs", ""], rows, (1, 2)) if rows
             else "<p>No trial tied with the best was recorded (see trials.csv, column tied).</p>")
            + "<p>Next:</p><pre>" + "\n".join(_e(c) for c in commands) + "</pre>")


def write_report(record: SearchRecord, corpus) -> tuple[Path, list[Path]]:
    """Write ``report.html`` (and its PNGs) into the search's summary folder; returns it and the PNGs."""
    started = time.perf_counter()
    out = record.summary_dir
    out.mkdir(parents=True, exist_ok=True)
    sections, files = [], []
    for title, (body, pngs) in (("Settings that matter", _importance_section(record, out)),
                                ("Encoder pairs", _pair_section(record, pair_table(record, corpus), out)),
                                ("Each numeric setting against the score", _slices(record, out)),
                                ("The search against time", _time_section(record, out))):
        sections.append(f"<h2>{_e(title)}</h2>{body}")
        files += pngs
    sections.append(f"<h2>The trials tied with the best</h2>{_ties_section(record)}")
    cut = sum(record.was_cut(r) for r in record.finished)
    head = (f"<h1>What search '{_e(record.name)}' learned</h1><p>{len(record.rows)} trials ({cut} cut by ASHA, "
            f"{len(record.rows) - len(record.finished)} failed), space <code>{_e(record.cfg['space']['name'])}"
            f"</code>, scored on {_e(_scored(record))}. Written {datetime.date.today().isoformat()} in "
            f"{time.perf_counter() - started:.1f} s by <code>emotune report</code>.</p>")
    page = out / REPORT
    page.write_text(f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
                    f'content="width=device-width,initial-scale=1"><title>emotune report: {_e(record.name)}</title>'
                    f"<style>{STYLE}</style></head><body>{head}{''.join(sections)}</body></html>\n",
                    encoding="utf-8")
    return page, files


def _slices(record: SearchRecord, out: Path) -> tuple[str, list[Path]]:
    png = figures.slices_png(record, out / "slices.png")
    if png is None:
        return "<p>The space has no numeric setting.</p>", []
    return _img(png, "slices") + ('<p class="note">Filled: trials that finished; hollow: trials ASHA cut, at the '
                                  "best score they reached.</p>"), [png]
