"""Ensembles: voting rules on constructed predictions, then select-top and predict on a real smoke search."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emotune.cli import main as cli_main
from emotune.config import load_config
from emotune.errors import EmotuneError
from emotune.selection.ensemble import EnsembleRequest, greedy_selection, hard_vote, select_top, soft_vote, tune_offsets


def one_hot(labels, n=3, confidence=0.8):
    probs = np.full((len(labels), n), (1 - confidence) / (n - 1))
    probs[np.arange(len(labels)), labels] = confidence
    return probs


def test_hard_vote_majority_and_tie_break_by_the_best_member():
    best, second = one_hot([0, 1, 2, 2]), one_hot([1, 1, 0, 1])
    third, fourth = one_hot([1, 2, 1, 0]), one_hot([2, 2, 0, 0])
    # three members: item 0 votes 0,1,1 -> 1; item 1 votes 1,1,2 -> 1; items 2 and 3 are three-way ties,
    # which the best member (listed first) decides: 2 and 2
    assert hard_vote([best, second, third]).tolist() == [1, 1, 2, 2]
    # four members: item 1 votes 1,1,2,2 -> a tie the best member is part of -> 1; items 2, 3 -> 0 outright
    assert hard_vote([best, second, third, fourth]).tolist() == [1, 1, 0, 0]
    # a tie the best member is not part of: votes 2 | 0,0 | 1,1 -> the best-ranked member voting 0 or 1 wins
    assert hard_vote([one_hot([2]), one_hot([0]), one_hot([1]), one_hot([0]), one_hot([1])]).tolist() == [0]
    # the order of members decides ties, not their labels
    assert hard_vote([one_hot([1]), one_hot([2])]).tolist() == [1]
    assert hard_vote([one_hot([2]), one_hot([1])]).tolist() == [2]


def test_soft_vote_is_the_mean():
    rng = np.random.default_rng(0)
    members = [rng.dirichlet(np.ones(4), size=5) for _ in range(3)]
    np.testing.assert_allclose(soft_vote(members), np.mean(members, axis=0))
    np.testing.assert_allclose(soft_vote(members, [2, 1, 1]), (2 * members[0] + members[1] + members[2]) / 4)


def test_greedy_selection_picks_what_helps_and_may_repeat_a_member():
    y = np.array([0, 0, 1, 1, 2, 2])
    strong = one_hot([0, 0, 1, 1, 2, 1], confidence=0.6)  # wrong on the last item only
    # right on the last item, confidently wrong elsewhere: it helps only next to two copies of `strong`
    fixer = np.array([[0.15, 0.7, 0.15], [0.15, 0.7, 0.15], [0.15, 0.15, 0.7], [0.15, 0.15, 0.7],
                      [0.7, 0.15, 0.15], [0.05, 0.05, 0.9]])
    useless = one_hot([2, 2, 2, 2, 2, 2], confidence=0.9)
    bag, curve = greedy_selection([strong, useless, fixer], y, 3, steps=4, start=0)
    assert bag == [0, 0, 2]  # strong twice (a repeat), then the fixer; the useless model never
    combined = np.mean([[strong, useless, fixer][i] for i in bag], axis=0).argmax(1)
    assert (combined == y).all() and curve[2] == 1.0 and curve[0] < 1.0


def test_calibration_offsets_lift_a_class_the_members_are_biased_against():
    """Members that under-score one class lose its items to the others; the tuned offsets must give that class a
    positive offset, above every other class's, and win back at least the dev macro-F1 the bias cost."""
    from emotune.evaluation import macro_f1

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=60)
    unbiased = np.log(rng.dirichlet(np.ones(3), size=60)) + 2.0 * np.eye(3)[y]
    penalised = 2
    biased = unbiased - 1.5 * np.eye(3)[np.full(60, penalised)]
    assert macro_f1(y, biased.argmax(1), 3) < macro_f1(y, unbiased.argmax(1), 3) - 0.05  # the bias costs F1

    offsets = tune_offsets(biased, y, 3)
    others = np.delete(offsets, penalised)
    assert offsets[penalised] > 0 and offsets[penalised] > others.max(), offsets
    calibrated = macro_f1(y, (biased + offsets).argmax(1), 3)
    assert calibrated > macro_f1(y, biased.argmax(1), 3)
    assert calibrated >= macro_f1(y, unbiased.argmax(1), 3)


# --- end to end on a real search ---------------------------------------------------------------------------

def config_for(runs) -> dict:
    return load_config([f"paths.runs_dir={runs}"])


@pytest.mark.parametrize("method", ["hard", "soft", "greedy"])
def test_select_top_writes_run_plot_submission_and_a_folder_predict_can_load(smoke_search, separable, method,
                                                                               tmp_path):
    from mlflow import MlflowClient

    runs, search = smoke_search
    corpus, _ = separable
    summary = select_top(config_for(runs), EnsembleRequest(k=3, method=method, out_dir=tmp_path / "ens",
                                                           calibrate=True))
    assert summary["evaluation"] == "test split (labelled)"
    if method == "greedy":
        assert summary["members"] and sum(m["weight"] for m in summary["members"]) >= len(summary["members"])
    else:
        assert len(summary["members"]) == 3 and [m["weight"] for m in summary["members"]] == [1.0, 1.0, 1.0]
    out = tmp_path / "ens"
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    with (out / "submission.csv").open() as f:
        rows = list(csv.DictReader(f))
    test_ids = [r[0] for r in csv.reader((corpus / "test.csv").open()) if r and r[0] != "id"]
    assert sorted(r["id"] for r in rows) == sorted(test_ids)  # every test id exactly once
    assert {r["label"] for r in rows} <= {"neutral", "disgust", "anger", "sadness", "joy", "fear"}
    # the printed F1 is the submission's, recomputed here from the files against the test labels
    truth = {r["id"]: r["label"] for r in csv.DictReader((corpus / "test_labels.csv").open())}
    labels = json.loads((out / "ensemble.json").read_text())["labels"]
    from emotune.evaluation import macro_f1

    submitted = macro_f1([labels.index(truth[r["id"]]) for r in rows], [labels.index(r["label"]) for r in rows],
                         len(labels))
    assert submitted == pytest.approx(summary["macro_f1"], abs=1e-12)
    assert summary.get("macro_f1_calibrated", summary["macro_f1"]) == summary["macro_f1"]
    # the hard vote takes no offsets: --calibrate leaves it with the one figure
    assert ("macro_f1_calibrated" in summary) == ("macro_f1_uncalibrated" in summary) == (method != "hard")
    with (out / "test_predictions.csv").open() as f:  # the probabilities file names the same labels
        assert {r["id"]: r["prediction"] for r in csv.DictReader(f)} == {r["id"]: r["label"] for r in rows}
    manifest = json.loads((out / "ensemble.json").read_text())
    assert manifest["method"] == method and manifest["labels"][0] == "neutral"
    assert manifest["encoder_folders"]  # the tiny text encoder ships with the ensemble

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])
    assert run.data.tags["emotune.kind"] == "ensemble"
    assert run.data.tags["mlflow.parentRunId"] == search["parent_run_id"]
    assert "ensemble_macro_f1" in run.data.metrics and "member1_macro_f1" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "submission.csv", "ensemble.json"} <= logged

    # predict loads the folder and predicts the test clips again, identically (weights and offsets too); for the
    # hard vote in a fresh process, so that nothing but the folder carries the ensemble
    predicted = tmp_path / "predicted.csv"
    args = ["predict", str(out), "--csv", str(corpus / "test.csv"), "--audio-dir", str(corpus / "audio"), "--out",
            str(predicted)]
    if method == "hard":
        result = subprocess.run([sys.executable, "-m", "emotune", *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    else:
        assert cli_main(args) == 0
    with predicted.open() as f:
        again = {r["id"]: r["prediction"] for r in csv.DictReader(f)}
    assert again == {r["id"]: r["label"] for r in rows}
    assert cli_main(["predict", str(out), "--audio", str(corpus / "audio" / rows[0]["id"]), "--text", "qué alegría",
                     "--out", str(tmp_path / "one.json")]) == 0
    (answer,) = json.loads((tmp_path / "one.json").read_text())
    assert answer["prediction"] in manifest["labels"]
    assert abs(sum(v for k, v in answer.items() if k.startswith("p_")) - 1.0) < 1e-3
    if method == "hard":
        return
    # predict applies the ensemble's calibration offsets: a large one for the last class makes it win everywhere
    from emotune.selection.predict import Ensemble, read_inputs

    manifest["calibration_offsets"] = [0.0] * (len(manifest["labels"]) - 1) + [50.0]
    (out / "ensemble.json").write_text(json.dumps(manifest))
    utterances, _ = read_inputs(str(corpus / "test.csv"), str(corpus / "audio"), None, None)
    shifted, _ = Ensemble(out).predict(utterances)
    assert set(shifted.tolist()) == {len(manifest["labels"]) - 1}


@pytest.mark.parametrize("method", ["soft", "greedy"])
def test_calibrate_reports_the_figures_of_the_predictions_it_writes(smoke_search, separable, method, tmp_path,
                                                                    capsys):
    """With --calibrate the written predictions apply the offsets, so the printed headline, the report and
    confusion matrix, evaluation.json and the MLflow run must be theirs; the score without offsets is printed
    beside under its own label.

    Trials that reach dev macro-F1 1.0 leave nothing to calibrate (the offsets stay 0), so the test works on a
    copy of the search's store where they count as failed: the weaker trials left get offsets that change labels.
    """
    import shutil

    from mlflow import MlflowClient

    from emotune.evaluation import confusion_counts, macro_f1, read_predictions

    smoke_runs, search = smoke_search
    corpus, _ = separable
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy2(smoke_runs / "mlflow.db", runs / "mlflow.db")
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    perfect = [r for r in finished_trials(runs, search["parent_run_id"]) if r.data.metrics["best_val_f1"] == 1.0]
    for run in perfect:
        client.set_terminated(run.info.run_id, status="FAILED")
    out = tmp_path / "ens"
    assert cli_main(["select-top", "--method", method, "--k", "3", "--calibrate", "--out", str(out),
                     f"paths.runs_dir={runs}"]) == 0
    printed = capsys.readouterr().out
    headline = re.search(r"ensemble macro-F1 (\d\.\d{4}) with calibration offsets: the predictions, submission.csv, "
                         r"confusion matrix and report written apply them", printed)
    plain = re.search(r"ensemble macro-F1 (\d\.\d{4}) without calibration offsets \(for comparison only\)", printed)
    assert headline and plain, printed

    # score the written predictions again against the test labels (the evaluation data: the test split is labelled)
    truth = {r["id"]: r["label"] for r in csv.DictReader((corpus / "test_labels.csv").open())}
    ids, probs, labels = read_predictions(out / "test_predictions.csv")
    with (out / "test_predictions.csv").open() as f:
        written = [labels.index(r["prediction"]) for r in csv.DictReader(f)]
    true = [labels.index(truth[i]) for i in ids]
    written_f1 = macro_f1(true, written, len(labels))
    assert headline.group(1) == f"{written_f1:.4f}"
    # the probabilities written are the vote before offsets: their argmax scores the figure printed for comparison
    assert plain.group(1) == f"{macro_f1(true, probs.argmax(1), len(labels)):.4f}"
    assert written != probs.argmax(1).tolist()  # the offsets changed labels: the two figures measure different files

    evaluated = json.loads((out / "evaluation.json").read_text())
    assert evaluated["macro_f1"] == pytest.approx(written_f1, abs=1e-12)
    assert evaluated["macro_f1_calibrated"] == evaluated["macro_f1"]
    assert f"{evaluated['macro_f1_uncalibrated']:.4f}" == plain.group(1)
    assert evaluated["report"]["macro avg"]["f1-score"] == pytest.approx(written_f1, abs=1e-12)
    assert evaluated["confusion_matrix"]["rows_true_columns_predicted"] == labels
    assert evaluated["confusion_matrix"]["counts"] == confusion_counts(true, written, len(labels)).tolist()
    assert (out / "evaluation.txt").read_text().splitlines()[1].startswith(
        f"ensemble ({method}) macro-F1 {written_f1:.4f} with calibration offsets")

    run_id = re.search(r"^MLflow run (\w+)$", printed, re.MULTILINE).group(1)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["ensemble_macro_f1"] == pytest.approx(written_f1, abs=1e-12)
    assert metrics["ensemble_macro_f1_uncalibrated"] == pytest.approx(evaluated["macro_f1_uncalibrated"], abs=1e-12)


def test_the_prediction_files_agree_on_vote_ties_and_calibrated_scores(tmp_path):
    from types import SimpleNamespace

    from emotune.evaluation import write_predictions
    from emotune.selection.ensemble import Candidate, Chosen, _write_predictions

    labels, ids = ["a", "b", "c"], ["x", "y"]
    member_probs = [np.array([[0.3, 0.6, 0.1], [0.2, 0.3, 0.5]]),  # members best first
                    np.array([[0.5, 0.1, 0.4], [0.3, 0.5, 0.2]])]
    members = []
    for i, probs in enumerate(member_probs):
        (tmp_path / f"m{i}").mkdir()
        write_predictions(tmp_path / f"m{i}" / "test_predictions.csv", ids, probs, labels)
        members.append(Candidate(f"run{i}", f"t{i}", 0.9 - i, False, folder=tmp_path / f"m{i}"))
    corpus = SimpleNamespace(test=[SimpleNamespace(id=i) for i in ids])
    cases = {"hard": (None, ["b", "c"]),  # 1-1 ties go to the best member's vote; the vote shares' argmax says a, b
             "soft": (np.array([0.0, 0.0, 3.0]), ["c", "c"])}  # the offset outweighs the probabilities
    for method, (offsets, expected) in cases.items():
        out = tmp_path / method
        out.mkdir()
        _write_predictions(out, corpus, Chosen(method, members, [1.0, 1.0], offsets, labels))
        submitted = [line.split(",")[1] for line in (out / "submission.csv").read_text().splitlines()[1:]]
        written = [line.split(",")[1] for line in (out / "test_predictions.csv").read_text().splitlines()[1:]]
        assert submitted == written == expected, method


def test_select_top_errors_are_clear(smoke_search, tmp_path):
    runs, _ = smoke_search
    cfg = config_for(runs)
    with pytest.raises(EmotuneError, match=r"asked for 40 members but search 'smoke' has only \d finished trials"):
        select_top(cfg, EnsembleRequest(k=40, out_dir=tmp_path / "x"))
    with pytest.raises(EmotuneError, match="no search named 'nope'.*Searches there: smoke"):
        select_top(cfg, EnsembleRequest(k=2, search="nope", out_dir=tmp_path / "x"))
    with pytest.raises(EmotuneError, match="no search found"):
        select_top(config_for(tmp_path / "empty"), EnsembleRequest(k=2))
    with pytest.raises(EmotuneError, match="greedy picks its own members"):
        select_top(cfg, EnsembleRequest(k="tied", method="greedy", out_dir=tmp_path / "x"))
    with pytest.raises(EmotuneError, match="--k must be at least 1"):
        select_top(cfg, EnsembleRequest(k=0, out_dir=tmp_path / "x"))


@pytest.mark.parametrize("value", ["foo", "3.5", "all"])
def test_a_bad_k_says_what_k_takes(value, tmp_path, capsys):
    """Refused before any store is read: no search is needed."""
    assert cli_main(["select-top", "--k", value, "--out", str(tmp_path / "x"), f"paths.runs_dir={tmp_path}"]) == 2
    error = capsys.readouterr().err
    assert f"bad --k value '{value}': --k takes a number of members or 'tied'" in error, error
    assert not (tmp_path / "x").exists()


def finished_trials(runs, parent_run_id: str) -> list:
    """The search's trial runs that finished (ASHA-stopped ones included), straight from the MLflow store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return [r for r in children if r.data.tags.get("emotune.kind") == "trial" and r.info.status == "FINISHED"]


def test_select_top_never_deletes_a_folder_it_did_not_write(smoke_search, tmp_path, capsys):
    from emotune.cli import main
    from emotune.selection.ensemble import check_replaceable

    runs, _ = smoke_search
    mine = tmp_path / "my-results"
    (mine / "tables").mkdir(parents=True)
    (mine / "notes.txt").write_text("a week of work")
    (mine / "tables" / "f1.csv").write_text("trial,f1\n")
    assert main(["select-top", "--k", "1", "--out", str(mine), f"paths.runs_dir={runs}"]) == 2
    message = capsys.readouterr().err
    assert f"the ensemble folder {mine} already exists" in message and "refuses to delete them" in message
    assert "Pass --out a new folder" in message  # the fix
    assert (mine / "notes.txt").read_text() == "a week of work"
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == ["notes.txt", "tables", "tables/f1.csv"]

    # an ensemble select-top wrote earlier is replaced whole: its stale files go
    earlier = tmp_path / "ens"
    select_top(config_for(runs), EnsembleRequest(k=1, method="hard", out_dir=earlier))
    (earlier / "stale.txt").write_text("left from an earlier ensemble")
    select_top(config_for(runs), EnsembleRequest(k=2, method="soft", out_dir=earlier))
    manifest = json.loads((earlier / "ensemble.json").read_text())
    assert manifest["method"] == "soft" and len(manifest["members"]) == 2
    assert not (earlier / "stale.txt").exists()
    # so are an empty folder and the leftovers of an interrupted select-top (its downloads, no manifest yet)
    (tmp_path / "empty").mkdir()
    (tmp_path / "interrupted" / ".candidates" / "00").mkdir(parents=True)
    check_replaceable(tmp_path / "empty")
    check_replaceable(tmp_path / "interrupted")
    (tmp_path / "a-file").write_text("kept")
    with pytest.raises(EmotuneError, match="is a file. Pass --out a folder that does not exist yet"):
        check_replaceable(tmp_path / "a-file")


def test_exclude_stopped_leaves_out_every_trial_asha_stopped(smoke_search, tmp_path, capsys):
    from emotune.cli import main

    runs, search = smoke_search
    finished = finished_trials(runs, search["parent_run_id"])
    stopped = {r.info.run_id for r in finished if r.data.tags.get("emotune.stopped_by") == "asha"}
    # stopped trials end FINISHED with a dev score: without the option they compete like any other
    assert stopped and all("best_val_f1" in r.data.metrics for r in finished)
    summary = select_top(config_for(runs), EnsembleRequest(method="greedy", exclude_stopped=True,
                                                           out_dir=tmp_path / "ens"))
    # greedy selection draws from every candidate: they must be exactly the trials ASHA let finish
    assert {r["run_id"] for r in summary["ranking"]} == {r.info.run_id for r in finished} - stopped
    assert not {m["run_id"] for m in summary["members"]} & stopped
    assert not any(m["stopped_by_asha"] for m in summary["members"])
    # the command-line flag reaches select-top: asking for every finished trial is then too many
    assert main(["select-top", "--k", str(len(finished)), "--exclude-stopped", "--out", str(tmp_path / "cli"),
                 f"paths.runs_dir={runs}"]) == 2
    assert (f"has only {len(finished) - len(stopped)} finished trials (trials stopped by ASHA left out)"
            in capsys.readouterr().err)


def test_trials_with_equal_dev_f1_rank_by_run_start_then_run_id(smoke_search, tmp_path):
    """A tie (common: tiny corpora reach F1 1.0) must not be decided by chance or by Ray's random trial names.

    The test works on a copy of the search's store where every trial is tied and the names sort in the opposite
    order of the start times.
    """
    import shutil

    from mlflow import MlflowClient

    from emotune.selection.ensemble import candidates_of, find_search

    runs, search = smoke_search
    copy = tmp_path / "runs"
    copy.mkdir()
    shutil.copy2(runs / "mlflow.db", copy / "mlflow.db")
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    trials = sorted(finished_trials(copy, search["parent_run_id"]), key=lambda r: (r.info.start_time, r.info.run_id))
    assert len(trials) >= 3
    for i, run in enumerate(trials):
        for metric in ("best_val_f1", "best_val_score"):  # the latest values: all tied, whichever ranks
            client.log_metric(run.info.run_id, metric, 0.5, step=10**6)
        client.update_run(run.info.run_id, name=f"trial-{len(trials) - i:02d}")  # names sort latest-started first
    tracking = config_for(copy)["tracking"]
    ranked = candidates_of(tracking, find_search(tracking, "smoke"), exclude_stopped=False)
    assert [c.dev_f1 for c in ranked] == [c.score for c in ranked] == [0.5] * len(trials)
    assert [c.run_id for c in ranked] == [r.info.run_id for r in trials]


@pytest.mark.slow
def test_without_test_labels_the_ensemble_is_scored_on_held_out_dev(separable, tmp_path, shared_ray):
    from conftest import search_args
    from mlflow import MlflowClient

    from emotune.data.prepare import prepare_corpus
    from emotune.evaluation import macro_f1
    from emotune.search.driver import run_search
    from emotune.selection.ensemble import evaluation_plan

    corpus, shared_runs = separable
    runs = tmp_path / "runs"
    search_cfg = load_config(search_args(corpus, runs, shared_runs / "cache" / "features", "search.num_samples=3",
                                         "data.test_labels=null", "search.name=unlabelled"), "search")
    run_search(search_cfg)
    summary = select_top(config_for(runs), EnsembleRequest(k=2, method="soft", out_dir=tmp_path / "ens"))
    assert summary["evaluation"].startswith("held-out half of dev (6 clips")  # 12 dev clips, half held out
    assert "ranked on the other half" in summary["evaluation"]
    # every finished trial competed on the selection half, and the members are its two best there
    assert len(summary["ranking"]) == 3
    scores = [r["selection_macro_f1"] for r in summary["ranking"]]
    assert scores == sorted(scores, reverse=True)
    assert [m["run_id"] for m in summary["members"]] == [r["run_id"] for r in summary["ranking"][:2]]
    assert "held-out half of dev" in (tmp_path / "ens" / "evaluation.txt").read_text()
    lines = (tmp_path / "ens" / "submission.csv").read_text().splitlines()
    assert lines[0] == "id,label" and len(lines) == 1 + 12  # the unlabelled test split gets its submission

    # the two halves of dev, as select-top draws them from the search's corpus and seed: disjoint, covering dev
    prepared = prepare_corpus(search_cfg["data"], runs, progress=False)
    labels = list(prepared.labels)
    dev_ids = [u.id for u in prepared.dev]
    plan = evaluation_plan(prepared, dev_ids, [labels.index(u.label) for u in prepared.dev], labels,
                           int(search_cfg["seed"]))
    selection, held_out = [dev_ids[i] for i in plan.select_idx], plan.eval_ids
    assert plan.eval_split == "dev" and len(selection) == len(held_out) == 6
    assert not set(selection) & set(held_out) and set(selection) | set(held_out) == set(dev_ids)

    # each trial's selection score is the macro-F1 of its own dev predictions on the selection half alone
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    truth, probs = {}, {}
    for entry in summary["ranking"]:
        local = client.download_artifacts(entry["run_id"], "best/dev_predictions.csv", str(tmp_path / entry["run_id"]))
        with open(local, newline="") as f:
            rows = {r["id"]: r for r in csv.DictReader(f)}
        truth = {uid: labels.index(r["label"]) for uid, r in rows.items()}
        probs[entry["run_id"]] = {uid: np.array([float(r[f"p_{c}"]) for c in labels]) for uid, r in rows.items()}
        own = probs[entry["run_id"]]
        recomputed = macro_f1([truth[i] for i in selection], [own[i].argmax() for i in selection], len(labels))
        assert entry["selection_macro_f1"] == pytest.approx(recomputed, abs=1e-12), entry["name"]
    # and the ensemble was scored on the held-out half: its members' soft vote there, with that half's class counts
    voted = np.mean([[probs[m["run_id"]][i] for i in held_out] for m in summary["members"]], axis=0).argmax(1)
    held_truth = [truth[i] for i in held_out]
    assert summary["macro_f1"] == pytest.approx(macro_f1(held_truth, voted, len(labels)), abs=1e-12)
    report = json.loads((tmp_path / "ens" / "evaluation.json").read_text())["report"]
    assert [report[c]["support"] for c in labels] == [held_truth.count(i) for i in range(len(labels))]


# --- ties with the best: --k tied and greedy's pool ----------------------------------------------------------------

# Hand-made trials on the separable corpus' 12 dev clips, in the order their best_val_score ranks them. Each is
# given as what it predicts: "best" is wrong on dev clip 0 only; "same" predicts exactly as the best; "one-off-a" and
# "one-off-b" differ from it on one clip each (tied); "fixer" is right on clip 0 but wrong, with little confidence,
# on six others (the best beats it with confidence, yet it would lift greedy's ensemble of the best to F1 1.0);
# "wrong" is wrong everywhere. "fixer" ranks above the one-offs by its score, so ties are not simply the top k.
TIED_TRIALS = [("best", 0.95), ("same", 0.94), ("fixer", 0.93), ("one-off-a", 0.92), ("one-off-b", 0.91),
               ("wrong", 0.50)]


def tied_probs(truth: list[int], n_classes: int) -> dict[str, np.ndarray]:
    """Each hand-made trial's dev probabilities (rows in the order of ``truth``)."""
    def confident(classes, confidence=0.7):
        probs = np.full((len(classes), n_classes), (1 - confidence) / (n_classes - 1))
        probs[np.arange(len(classes)), classes] = confidence
        return probs

    y = np.array(truth)
    miss = (y + 1) % n_classes
    best = y.copy()
    best[0] = miss[0]
    fixer = confident(y)
    fixer[0] = confident([y[0]], 0.9)[0]
    for i in range(1, 7):  # wrong, but only just: next to the best's confident rows these clips stay right
        fixer[i] = (1 - 0.4 - 0.35) / (n_classes - 2)
        fixer[i, miss[i]], fixer[i, y[i]] = 0.4, 0.35
    one_off_a, one_off_b = best.copy(), best.copy()
    one_off_a[7], one_off_b[8] = miss[7], miss[8]
    return {"best": confident(best), "same": confident(best), "fixer": fixer, "one-off-a": confident(one_off_a),
            "one-off-b": confident(one_off_b), "wrong": confident(miss)}


@pytest.fixture(scope="module")
def tied_store(smoke_search, tmp_path_factory):
    """An MLflow store with two searches of the hand-made TIED_TRIALS: 'tied' (search.ties_confidence 0.95) and
    'tied-loose' (0.6, which leaves only 'same' tied with the best).

    Every trial carries the model, card, config and test predictions of one real smoke trial, and its own dev
    predictions; no training is run. Returns the runs folder, the dev truth and the trials' dev probabilities.
    """
    from mlflow import MlflowClient

    from emotune.data.prepare import prepare_corpus
    from emotune.evaluation import macro_f1, write_predictions
    from emotune.tracking.store import TrackedRun

    smoke_runs, search = smoke_search
    base = tmp_path_factory.mktemp("tied")
    source = MlflowClient(f"sqlite:///{smoke_runs / 'mlflow.db'}")
    search_cfg = json.loads(Path(source.download_artifacts(search["parent_run_id"], "config.json",
                                                           str(base))).read_text())
    model = next(r for r in finished_trials(smoke_runs, search["parent_run_id"])
                 if "emotune.stopped_by" not in r.data.tags)
    source.download_artifacts(model.info.run_id, "best", str(base / "model"))
    source.download_artifacts(model.info.run_id, "config.json", str(base / "model"))

    runs = base / "runs"
    corpus = prepare_corpus(search_cfg["data"], runs, progress=False)
    labels = list(corpus.labels)
    dev_ids = [u.id for u in corpus.dev]
    truth = [labels.index(u.label) for u in corpus.dev]
    probs = tied_probs(truth, len(labels))
    tracking = config_for(runs)["tracking"]
    for name, confidence in (("tied", 0.95), ("tied-loose", 0.6)):
        saved = {**search_cfg, "search": {**search_cfg["search"], "name": name, "ties_confidence": confidence}}
        parent = TrackedRun.start(tracking, name=name, kind="search", tags={"emotune.search": name})
        parent.log_json(saved, "config.json")
        for trial, score in TIED_TRIALS:
            folder = base / name / trial / "best"
            folder.mkdir(parents=True)
            for kept in ("model.safetensors", "model_card.json", "test_predictions.csv"):
                shutil.copy2(base / "model" / "best" / kept, folder / kept)
            write_predictions(folder / "dev_predictions.csv", dev_ids, probs[trial], labels,
                              [corpus.dev[i].label for i in range(len(dev_ids))])
            run = TrackedRun.start(tracking, name=trial, kind="trial", parent_run_id=parent.run_id,
                                   tags={"emotune.search": name})
            run.log_metrics({"best_val_f1": macro_f1(truth, probs[trial].argmax(1), len(labels)),
                             "best_val_score": score})
            run.log_artifacts(sorted(folder.iterdir()), "best")
            run.log_artifacts([base / "model" / "config.json"])
            run.finish()
        parent.finish()
    return runs, truth, probs


def names_of(summary: dict, key: str) -> list[str]:
    return [entry["name"] for entry in summary[key]]


def test_k_tied_ensembles_the_trials_tied_with_the_best(tied_store, tmp_path, capsys):
    from emotune.evaluation import macro_f1
    from emotune.noise import better_with_confidence
    from emotune.selection.ensemble import TIED_FLOOR

    runs, truth, probs = tied_store
    best = probs["best"].argmax(1)
    shares = {trial: better_with_confidence(truth, best, probs[trial].argmax(1), 6) for trial, _ in TIED_TRIALS}
    # the hand-made trials are what they claim: tied at 95% (and only 'same' at 60%), or beaten with confidence
    assert shares["same"] == 0.5 and 0.6 <= shares["one-off-a"] < 0.95 and 0.6 <= shares["one-off-b"] < 0.95
    assert shares["fixer"] >= 0.95 and shares["wrong"] >= 0.95

    summary = select_top(config_for(runs), EnsembleRequest(k="tied", method="hard", search="tied",
                                                           out_dir=tmp_path / "ens"))
    # ranked by best_val_score, not by dev F1 (which puts the one-offs above the fixer)
    assert names_of(summary, "ranking") == [trial for trial, _ in TIED_TRIALS]
    assert names_of(summary, "members") == ["best", "same", "one-off-a", "one-off-b"]  # exactly the tied, best first
    # the members show their best_val_f1, whatever ranked them
    assert summary["members"][0]["dev_f1"] == pytest.approx(macro_f1(truth, best, 6), abs=1e-12)
    assert summary["members"][0]["dev_f1"] != summary["ranking"][0]["score"] == 0.95
    assert summary["k"] == "tied" and summary["ties_confidence"] == 0.95
    assert len(summary["tied"]) == 4
    assert {e["name"]: e["best_ahead_share"] for e in summary["ranking"]} == pytest.approx(shares)
    printed = capsys.readouterr().out
    assert ("k=tied: the best trial and 3 tied with it (paired bootstrap, 95%); ensembling those 4" in printed)
    manifest = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert manifest["k"] == "tied" and [m["name"] for m in manifest["members"]] == names_of(summary, "members")

    # at 60% only 'same' is tied: below the floor of three the next best-ranked trial fills up (by score: fixer).
    # The default folder name says 'ktied'.
    assert cli_main(["select-top", "--k", "tied", "--method", "soft", "--search", "tied-loose",
                     f"paths.runs_dir={runs}"]) == 0
    printed = capsys.readouterr().out
    assert (f"k=tied: the best trial and 1 tied with it (paired bootstrap, 60%), fewer than the floor of "
            f"{TIED_FLOOR}") in printed and "ensembling 3" in printed
    folder = runs / "ensembles" / "tied-loose-soft-ktied"
    manifest = json.loads((folder / "ensemble.json").read_text())
    assert [m["name"] for m in manifest["members"]] == ["best", "same", "fixer"]


def test_tied_members_are_clamped_to_the_floor_and_the_ceiling():
    from emotune.selection.ensemble import TIED_CEILING, TIED_FLOOR, tied_members

    assert (TIED_FLOOR, TIED_CEILING) == (3, 7)
    # one tied trial (position 2): the best-ranked untied one (position 1) fills up, members stay in rank order
    assert tied_members([0.5, 0.99, 0.7, 0.99], 0.95) == ([0, 1, 2], [0, 2])
    assert tied_members([0.5, 0.99, 0.99, 0.99], 0.95) == ([0, 1, 2], [0])
    assert tied_members([0.5, 0.9, 0.99, 0.8], 0.95) == ([0, 1, 3], [0, 1, 3])  # three tied: exactly those
    crowd = [0.5] + [0.6] * 9  # ten tied: the seven best-ranked
    assert tied_members(crowd, 0.95) == (list(range(7)), list(range(10)))
    assert tied_members([0.5, 0.99], 0.95) == ([0, 1], [0])  # fewer candidates than the floor: all of them


def test_greedy_leaves_out_the_trials_the_best_beats_with_confidence(tied_store, tmp_path, capsys):
    from emotune.evaluation import macro_f1

    runs, truth, probs = tied_store
    ranked = [probs[trial] for trial, _ in TIED_TRIALS]
    # without the rule greedy would take the fixer: next to the best it gets every clip right
    bag, _ = greedy_selection(ranked, truth, 6, steps=25, start=0)
    assert bag == [0, 2] and macro_f1(truth, (ranked[0] + ranked[2]).argmax(1), 6) == 1.0

    summary = select_top(config_for(runs), EnsembleRequest(method="greedy", search="tied", out_dir=tmp_path / "ens"))
    assert "fixer" not in names_of(summary, "members") and "wrong" not in names_of(summary, "members")
    assert names_of(summary, "members")[0] == "best"
    assert [entry["name"] for entry in summary["ranking"] if entry["best_ahead_share"] >= 0.95] == ["fixer", "wrong"]
    assert "greedy: 2 of 6 trials left out of the pool" in capsys.readouterr().out


def test_the_search_summary_lists_the_trials_tied_with_the_best(smoke_search):
    """Here because it reads the smoke search that the ensemble tests share."""
    runs, summary = smoke_search
    assert summary["tied"][0] == summary["best"]["trial_id"]
    with (runs / "ray" / "smoke" / "summary" / "trials.csv").open() as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert {trial_id for trial_id, r in rows.items() if r["tied"] == "True"} == set(summary["tied"])
    assert "best_val_score" in next(iter(rows.values()))
    from mlflow import MlflowClient

    parent = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}").get_run(summary["parent_run_id"])
    assert parent.data.metrics["trials_tied_with_best"] == len(summary["tied"]) - 1
