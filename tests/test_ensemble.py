"""Ensembles: voting rules on constructed predictions, then select-top and predict on a real smoke search."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from emotune.config import load_config
from emotune.ensemble import EnsembleRequest, greedy_selection, hard_vote, select_top, soft_vote, tune_offsets
from emotune.errors import EmotuneError


def one_hot(labels, n=3, confidence=0.8):
    probs = np.full((len(labels), n), (1 - confidence) / (n - 1))
    probs[np.arange(len(labels)), labels] = confidence
    return probs


def test_hard_vote_majority_and_tie_break_by_the_best_member():
    best, second, third, fourth = one_hot([0, 1, 2, 2]), one_hot([1, 1, 0, 1]), one_hot([1, 2, 1, 0]), one_hot([2, 2, 0, 0])
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


def test_calibration_offsets_never_lower_dev_macro_f1():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=60)
    logits = np.log(rng.dirichlet(np.ones(3), size=60)) + 1.5 * np.eye(3)[y] - 1.0 * np.eye(3)[np.zeros(60, int)]
    from emotune.evaluation import macro_f1

    offsets = tune_offsets(logits, y, 3)
    assert macro_f1(y, (logits + offsets).argmax(1), 3) >= macro_f1(y, logits.argmax(1), 3)


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
    assert submitted == pytest.approx(summary.get("macro_f1_calibrated", summary["macro_f1"]), abs=1e-12)
    assert ("macro_f1_calibrated" in summary) == (method != "hard")
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
    assert {"confusion_matrix.png", "submission.csv", "ensemble.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    # a fresh process loads the folder and predicts the test clips again, identically (weights and offsets too)
    predicted = tmp_path / "predicted.csv"
    result = subprocess.run([sys.executable, "-m", "emotune", "predict", str(out), "--csv", str(corpus / "test.csv"),
                             "--audio-dir", str(corpus / "audio"), "--out", str(predicted)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with predicted.open() as f:
        again = {r["id"]: r["prediction"] for r in csv.DictReader(f)}
    assert again == {r["id"]: r["label"] for r in rows}
    single = subprocess.run([sys.executable, "-m", "emotune", "predict", str(out), "--audio",
                             str(corpus / "audio" / rows[0]["id"]), "--text", "qué alegría", "--out",
                             str(tmp_path / "one.json")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    (answer,) = json.loads((tmp_path / "one.json").read_text())
    assert answer["prediction"] in manifest["labels"]
    assert abs(sum(v for k, v in answer.items() if k.startswith("p_")) - 1.0) < 1e-3
    if method == "hard":
        return
    # predict applies the ensemble's calibration offsets: a large one for the last class makes it win everywhere
    from emotune.predict import Ensemble, read_inputs

    manifest["calibration_offsets"] = [0.0] * (len(manifest["labels"]) - 1) + [50.0]
    (out / "ensemble.json").write_text(json.dumps(manifest))
    utterances, _ = read_inputs(str(corpus / "test.csv"), str(corpus / "audio"), None, None)
    shifted, _ = Ensemble(out).predict(utterances)
    assert set(shifted.tolist()) == {len(manifest["labels"]) - 1}


def test_the_prediction_files_agree_on_vote_ties_and_calibrated_scores(tmp_path):
    from types import SimpleNamespace

    from emotune.ensemble import Candidate, Chosen, _write_predictions
    from emotune.evaluation import write_predictions

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


def test_predict_in_chunks_equals_all_at_once_and_old_cards_still_load(smoke_search, separable, tmp_path):
    import shutil

    from emotune.predict import Ensemble, read_inputs

    runs, _ = smoke_search
    corpus, _ = separable
    select_top(config_for(runs), EnsembleRequest(k=3, method="soft", out_dir=tmp_path / "ens"))
    utterances, _ = read_inputs(str(corpus / "test.csv"), str(corpus / "audio"), None, None)
    ensemble = Ensemble(tmp_path / "ens")
    whole, whole_scores = ensemble.predict(utterances, chunk_size=10**9)
    chunked, chunked_scores = ensemble.predict(utterances, chunk_size=2, batch_size=1)
    assert chunked.tolist() == whole.tolist() and len(whole) == len(utterances)
    np.testing.assert_allclose(chunked_scores, whole_scores, atol=1e-6)
    # an ensemble saved before cards recorded input normalisation and storage still loads and predicts the same
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "ens", old)
    for card_path in old.glob("members/*/model_card.json"):
        card = json.loads(card_path.read_text())
        assert card.pop("format") == 2  # cards had no format number then
        for description in card["encoders"].values():
            for key in ("waveform_norm", "storage", "max_tokens"):
                description.pop(key)
        card_path.write_text(json.dumps(card))
    again, again_scores = Ensemble(old).predict(utterances)
    assert again.tolist() == whole.tolist()
    np.testing.assert_allclose(again_scores, whole_scores, atol=1e-6)


def test_select_top_errors_are_clear(smoke_search, tmp_path):
    runs, _ = smoke_search
    cfg = config_for(runs)
    with pytest.raises(EmotuneError, match=r"asked for 40 members but search 'smoke' has only \d finished trials"):
        select_top(cfg, EnsembleRequest(k=40, out_dir=tmp_path / "x"))
    with pytest.raises(EmotuneError, match="no search named 'nope'.*Searches there: smoke"):
        select_top(cfg, EnsembleRequest(k=2, search="nope", out_dir=tmp_path / "x"))
    with pytest.raises(EmotuneError, match="no search found"):
        select_top(config_for(tmp_path / "empty"), EnsembleRequest(k=2))


def test_predict_with_a_missing_member_is_a_clear_error(smoke_search, tmp_path):
    runs, _ = smoke_search
    select_top(config_for(runs), EnsembleRequest(k=2, method="soft", out_dir=tmp_path / "ens"))
    (tmp_path / "ens" / "members" / "02" / "model.safetensors").unlink()
    result = subprocess.run([sys.executable, "-m", "emotune", "predict", str(tmp_path / "ens"), "--audio", "x.wav",
                             "--text", "hola"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ensemble member members/02" in result.stderr and "model.safetensors missing" in result.stderr


def test_without_test_labels_the_ensemble_is_scored_on_held_out_dev(separable, tmp_path):
    from conftest import search_args
    from emotune.search import run_search

    corpus, shared_runs = separable
    runs = tmp_path / "runs"
    run_search(load_config(search_args(corpus, runs, shared_runs / "cache" / "features", "search.num_samples=3",
                                       "data.test_labels=null", "search.name=unlabelled"), "search"))
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
