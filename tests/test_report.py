"""`emotune report`: importances with intervals that can tell a setting that matters, and the page a real search
writes (self-contained, every searched setting named, its encoder-pair table as trials.csv has it)."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest

SPACE = {"model.dropout": {"float": [0.0, 0.5]}, "trial.lr": {"float": [1.0e-5, 5.0e-4], "log": True},
         "model.hidden_layers": {"int": [0, 3]}, "encoders.speech": {"choice": ["xlsr", "wavlm-large", "hubert"]},
         "trial.aug_prob": {"float": [0.0, 0.8]}}


def _trials(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"model.dropout": float(rng.uniform(0, 0.5)), "trial.lr": float(10 ** rng.uniform(-5, -3.3)),
             "model.hidden_layers": int(rng.integers(4)), "encoders.speech": str(rng.choice(SPACE["encoders.speech"]
                                                                                             ["choice"])),
             "trial.aug_prob": float(rng.uniform(0, 0.8))} for _ in range(n)]


def test_a_setting_that_alone_decides_the_score_has_its_interval_above_every_other():
    from emotune.insight.importance import importances, verdict

    params = _trials(24, seed=3)
    rng = np.random.default_rng(4)
    scores = [0.55 + 0.5 * p["model.dropout"] + 0.003 * rng.standard_normal() for p in params]
    found = importances(params, scores, SPACE)
    assert found[0].setting == "model.dropout"
    assert all(found[0].low > other.high for other in found[1:]), found
    assert all(i.low <= i.value <= i.high for i in found)
    assert verdict(found).startswith("model.dropout stands out")


def test_settings_that_do_not_matter_are_said_to_overlap():
    from emotune.insight.importance import importances, verdict

    params = _trials(16, seed=5)
    scores = list(0.6 + 0.02 * np.random.default_rng(6).standard_normal(16))  # the score ignores every setting
    assert verdict(importances(params, scores, SPACE)).startswith("No setting stands out")


def _read_csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_real_search_writes_a_self_contained_report_that_agrees_with_its_trials(smoke_search, capsys):
    from emotune.cli import main
    from emotune.insight.pairs import group_by_pair
    from emotune.insight.record import load_record
    from emotune.tracking.store import TrackedRun

    runs, summary = smoke_search
    summary_dir = runs / "ray" / "smoke" / "summary"
    page = (summary_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page) and "http://" not in page  # nothing fetched
    assert page.count("data:image/png;base64,") >= 4  # importances, pairs, slices, time
    for setting in ("model.family", "model.hidden_layers", "model.dropout", "trial.lr"):
        assert setting in page
    assert "not in every trial" in page  # model.hidden_layers exists for the attention family only

    rows = [r for r in _read_csv(summary_dir / "trials.csv") if r["status"] != "ERROR" and r["best_val_score"]]
    record = load_record({"ray": {"storage": str(runs / "ray")}}, "smoke")
    groups = group_by_pair(record)
    assert sum(len(g) for g in groups.values()) == len(rows)
    (pair, members), = groups.items()  # smoke searches one pair: the offline defaults
    best = max(float(r["best_val_score"]) for r in rows)
    assert max(m["best_val_score"] for m in members) == pytest.approx(best)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", page.split("<h2>Encoder pairs</h2>")[1].split("<h2>")[0])
    assert cells[:4] == [pair[0], pair[1], str(len(rows)), f"{best:.4f}"]

    capsys.readouterr()
    assert main(["report", "--search", "smoke", f"paths.runs_dir={runs}"]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "logged to the search's MLflow run" in printed
    artifacts = TrackedRun(record.cfg["tracking"], summary["parent_run_id"]).client.list_artifacts(
        summary["parent_run_id"], "summary")
    assert {"summary/report.html", "summary/pairs.png"} <= {a.path for a in artifacts}


def test_report_names_the_searches_there_when_the_one_asked_for_is_not(smoke_search, capsys):
    from emotune.cli import main

    runs, _ = smoke_search
    assert main(["report", "--search", "nope", f"paths.runs_dir={runs}"]) != 0
    assert "Finished searches there: smoke" in capsys.readouterr().err
