"""One trial end to end on real (tiny) assets: it learns, logs to MLflow, checkpoints, resumes, repeats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import trial_config

from emotune.errors import EmotuneError
from emotune.trial import TrainerState, TrialContext, load_checkpoint, run_trial, save_checkpoint

QUIET = {"reporter": lambda metrics, checkpoint: None, "progress": False}


def history(summary: dict, key: str) -> list[float]:
    return [h[key] for h in summary["history"]]


def test_trial_learns_and_is_logged_to_mlflow(separable, tmp_path):
    from mlflow import MlflowClient

    corpus, runs = separable
    cfg = trial_config(corpus, runs, "trial.max_epochs=12", "trial.early_stop=null")
    summary = run_trial(cfg, TrialContext(workdir=tmp_path / "trial", **QUIET))
    assert summary["best_val_f1"] >= 0.8  # six separable classes: chance is about 0.17
    assert summary["epochs_trained"] == 12 and len(summary["history"]) == 12

    client = MlflowClient(cfg["tracking"]["uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.dropout"] == "0.1" and run.data.params["encoders.speech"] == "fbank"
    assert run.data.metrics["best_val_f1"] == pytest.approx(summary["best_val_f1"])
    curve = client.get_metric_history(run.info.run_id, "val_f1")
    assert sorted(m.step for m in curve) == list(range(1, 13))
    best = {a.path for a in client.list_artifacts(run.info.run_id, "best")}
    for name in ("model.safetensors", "model_card.json", "dev_predictions.csv", "test_predictions.csv",
                 "dev_confusion_matrix.png", "dev_classification_report.txt"):
        assert f"best/{name}" in best
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "history.json"} <= top
    # the dev predictions carry ids, the true label and one probability per class
    header = (tmp_path / "trial" / "best" / "dev_predictions.csv").read_text().splitlines()[0]
    assert header == "id,label,prediction,p_neutral,p_disgust,p_anger,p_sadness,p_joy,p_fear"
    test_header = (tmp_path / "trial" / "best" / "test_predictions.csv").read_text().splitlines()[0]
    assert "label" not in test_header.split(",")  # test labels are never written by a trial


def test_same_seed_same_result(separable, tmp_path):
    corpus, runs = separable
    cfg = trial_config(corpus, runs, "trial.max_epochs=3", "trial.aug_prob=0.5")
    first = run_trial(cfg, TrialContext(workdir=tmp_path / "a", **QUIET))
    second = run_trial(cfg, TrialContext(workdir=tmp_path / "b", **QUIET))
    assert history(first, "train_loss") == history(second, "train_loss")
    assert history(first, "val_f1") == history(second, "val_f1")
    other = run_trial(trial_config(corpus, runs, "trial.max_epochs=3", "trial.aug_prob=0.5", "trial.seed=5"),
                      TrialContext(workdir=tmp_path / "c", **QUIET))
    assert history(other, "train_loss") != history(first, "train_loss")


@pytest.mark.parametrize("folds", [1, 3])
def test_resumed_trial_continues_exactly(separable, tmp_path, folds):
    """Stopped after epoch 3 and resumed, a trial repeats the uninterrupted one, lr decays and EMA included; a
    K-fold trial's heads and its per-evaluation predictions too."""
    corpus, runs = separable
    # a slow lr keeps dev F1 and its EMA moving, and patience=2 leaves the decay counter at 1 at the resume point
    # (with patience=1 it is back to 0 after every epoch, and losing it on resume would go unseen)
    rules = ("trial.aug_prob=0.5", "trial.lr=0.0001", "trial.patience=2", "trial.lr_decay=0.5", "trial.early_stop=4",
             f"trial.folds={folds}")
    straight = run_trial(trial_config(corpus, runs, "trial.max_epochs=7", *rules),
                         TrialContext(workdir=tmp_path / "straight", **QUIET))
    run_trial(trial_config(corpus, runs, "trial.max_epochs=3", *rules),
              TrialContext(workdir=tmp_path / "part", **QUIET))
    resumed = run_trial(trial_config(corpus, runs, "trial.max_epochs=7", *rules),
                        TrialContext(resume_dir=tmp_path / "part" / "checkpoint", workdir=tmp_path / "resumed",
                                     **QUIET))
    assert resumed["epochs_trained"] == straight["epochs_trained"]
    for key in ("train_loss", "val_f1", "lr", "val_f1_ema", "best_val_f1"):
        assert history(resumed, key) == history(straight, key), key
    evaluations = [json.loads((tmp_path / name / "evaluations.json").read_text()) for name in ("straight", "resumed")]
    assert evaluations[0]["predicted"] == evaluations[1]["predicted"]
    assert len(evaluations[1]["predicted"]) == len(straight["history"])
    # the test can tell: after the resume point the lr decayed, the EMA still moved and early stopping struck
    decays = [e for e, (a, b) in enumerate(zip(history(straight, "lr"), history(straight, "lr")[1:]), 2) if b < a]
    assert decays and max(decays) > 3
    assert len(set(history(straight, "val_f1_ema")[3:])) > 1
    assert straight["epochs_trained"] < 7


def test_a_trial_given_the_cache_index_never_loads_an_encoder(separable, tmp_path):
    """The search fills the cache once and hands its index to trials: they read features, not encoders."""
    import shutil

    from emotune.data.prepare import prepare_corpus
    from emotune.errors import EmotuneError
    from emotune.features.prepare import encoder_recipe, prepare_features

    corpus, runs = separable
    base = trial_config(corpus, runs)
    prepared = prepare_corpus(base["data"], runs, progress=False)
    preset = encoder_recipe("tiny-bert", "text", prepared, base["features"], base["paths"]).files.folder
    folder = shutil.copytree(preset, tmp_path / "my-text-encoder")  # a local folder, as a user would pass
    cfg = trial_config(corpus, runs, f"encoders.text={folder}", "trial.max_epochs=2")
    index = prepare_features(prepared, cfg["encoders"], cfg["features"], ["speech", "text"], cfg["paths"],
                             progress=False)
    shutil.rmtree(folder)  # from here on the text encoder cannot be loaded
    summary = run_trial(cfg, TrialContext(workdir=tmp_path / "with-index", index=index, **QUIET))
    assert summary["epochs_trained"] == 2 and 0.0 <= summary["best_val_f1"] <= 1.0
    with pytest.raises(EmotuneError, match="my-text-encoder"):  # without the index it needs the encoder
        run_trial(cfg, TrialContext(workdir=tmp_path / "without-index", **QUIET))


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
    state = TrainerState(epoch=3, best_f1=0.5, best_epoch=2, ema=0.4, lr=1e-2, history=[{"epoch": 1}])
    save_checkpoint(tmp_path, model, optimizer, state)
    assert not list(tmp_path.glob("*.pt")) and (tmp_path / "state.safetensors").is_file()

    clone = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    clone_opt = torch.optim.AdamW(clone.parameters(), lr=1.0)
    restored = load_checkpoint(tmp_path, clone, clone_opt)
    assert restored == state
    x = torch.randn(2, 4)
    assert torch.equal(model(x), clone(x))
    for a, b in zip(optimizer.state.values(), clone_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert clone_opt.param_groups[0]["lr"] == 1e-2


@pytest.mark.parametrize("overrides", [["features=live"], ["model=cognicic"], ["model.modalities=[text]"],
                                       ["encoders.speech=tiny-wavlm", "model.modalities=[speech]"]])
def test_other_modes_and_families_run(separable, tmp_path, overrides):
    corpus, runs = separable
    summary = run_trial(trial_config(corpus, runs, "trial.max_epochs=1", *overrides),
                        TrialContext(workdir=tmp_path, **QUIET))
    assert 0.0 <= summary["best_val_f1"] <= 1.0 and np.isfinite(history(summary, "train_loss")).all()


def test_class_weights_come_from_the_training_split_only_inverse_to_its_counts(separable, tmp_path):
    import csv
    import shutil

    from conftest import write_csv

    from emotune.trial import Trainer

    corpus, runs = separable
    imbalanced = tmp_path / "imbalanced"
    shutil.copytree(corpus, imbalanced)
    keep = {"neutral": 8, "disgust": 8, "anger": 6, "sadness": 5, "joy": 4, "fear": 3}
    with (corpus / "train.csv").open(encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f)]
    rows = [r for r in rows if int(r["id"][len(r["label"]):-4]) < keep[r["label"]]]
    write_csv(imbalanced / "train.csv", ["id", "label", "transcription"],
              [[r["id"], r["label"], r["transcription"]] for r in rows])
    trainer = Trainer(trial_config(imbalanced, runs, "data.dev_fraction=0.4"), TrialContext(workdir=tmp_path / "t",
                                                                                            **QUIET))
    labels = trainer.labels
    train_counts = np.array([sum(u.label == c for u in trainer.corpus.train) for c in labels], dtype=float)
    all_counts = train_counts + [sum(u.label == c for u in trainer.corpus.dev) for c in labels]
    expected = train_counts.sum() / (len(labels) * train_counts)
    weights = trainer.loss_fn.weight.numpy()
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert not np.allclose(weights, all_counts.sum() / (len(labels) * all_counts), rtol=1e-3)  # the test can tell
    for i in range(len(labels)):  # rarer in training, heavier in the loss
        for j in range(len(labels)):
            assert (train_counts[i] < train_counts[j]) == (weights[i] > weights[j])


@pytest.mark.parametrize("evals_per_epoch", [1, 3])
def test_lr_decay_early_stop_and_ema_follow_the_dev_scores(separable, tmp_path, evals_per_epoch):
    """The EMA and the best follow every dev evaluation; patience, lr decay and early stopping count epochs."""
    corpus, runs = separable
    cfg = trial_config(corpus, runs, "trial.max_epochs=20", "trial.patience=2", "trial.lr_decay=0.5",
                       "trial.early_stop=3", "trial.ema_alpha=0.3", "trial.lr=0.002",
                       f"trial.evals_per_epoch={evals_per_epoch}")
    reports = []
    summary = run_trial(cfg, TrialContext(workdir=tmp_path / "t", progress=False,
                                          reporter=lambda metrics, checkpoint: reports.append((metrics, checkpoint))))
    rows = summary["history"]
    # replay the rules on the reported dev F1 and compare with what the trial reported
    lr, ema, best, since_best, since_decay, improved = 0.002, None, -1.0, 0, 0, False
    for evaluation, row in enumerate(rows, start=1):
        f1 = row["val_f1"]
        ema = f1 if ema is None else 0.3 * f1 + 0.7 * ema
        if f1 > best:
            best, improved = f1, True
        if evaluation % evals_per_epoch == 0:  # the epoch ends here
            if improved:
                since_best, since_decay, improved = 0, 0, False
            else:
                since_best, since_decay = since_best + 1, since_decay + 1
                if since_decay >= 2:
                    lr, since_decay = lr * 0.5, 0
        assert row["evaluation"] == evaluation
        assert row["epoch"] == pytest.approx(evaluation / evals_per_epoch, abs=1e-4)
        assert row["val_f1_ema"] == pytest.approx(ema, abs=2e-6)
        assert row["best_val_f1"] == pytest.approx(best, abs=2e-6)
        assert row["lr"] == pytest.approx(lr, rel=1e-9)
        if since_best >= 3:
            break
    # it stopped early, at the end of the first epoch the rule says
    assert since_best >= 3 and len(rows) == evaluation < 20 * evals_per_epoch
    assert evaluation % evals_per_epoch == 0 and summary["epochs_trained"] == evaluation // evals_per_epoch
    assert summary["patience_stopped"] == 1.0
    assert min(r["lr"] for r in rows) < 0.002  # the decay happened at least once
    # every evaluation is reported; only the one that ends an epoch comes with a checkpoint to resume from
    assert [m["evaluation"] for m, _ in reports] == list(range(1, len(rows) + 1))
    assert [c is not None for _, c in reports] == [m["evaluation"] % evals_per_epoch == 0 for m, _ in reports]
    if evals_per_epoch > 1:
        with pytest.raises(EmotuneError, match=r"trial.evals_per_epoch=99 is out of range: an epoch of the training "
                                               r"split \(\d+ clips\) has \d+ batches"):
            run_trial(trial_config(corpus, runs, "trial.evals_per_epoch=99"), TrialContext(**QUIET))


def test_feature_standardisation_and_the_tokenizer_learn_from_the_training_split_only(separable, tmp_path):
    from pathlib import Path

    from emotune.features.tiny import tiny_text_hash
    from emotune.trial import Trainer, feature_statistics

    corpus, runs = separable
    trainer = Trainer(trial_config(corpus, runs, "encoders.speech=fbank", "encoders.text=tiny-bert"),
                      TrialContext(workdir=tmp_path / "t", **QUIET))
    train, dev, test = trainer.corpus.train, trainer.corpus.dev, trainer.corpus.test
    assert trainer.norms["speech"] == "global"
    # fbank frames are standardised with statistics of the training clips, not of the clips it is judged on
    adapter = trainer.model.adapters["speech"]
    mean, std = feature_statistics(trainer.source, train, "speech")
    leaky_mean, _ = feature_statistics(trainer.source, train + dev + test, "speech")
    torch.testing.assert_close(adapter.mean, mean)
    torch.testing.assert_close(adapter.std, std)
    assert not torch.allclose(mean, leaky_mean, atol=1e-4)  # the test can tell the two apart
    # the tiny tokenizer's folder is named by the texts it was trained on: the training transcripts alone
    folder = Path(trainer.described["text"]["folder"]).name
    assert folder.endswith(tiny_text_hash([u.text for u in train])[:12])
    assert not folder.endswith(tiny_text_hash([u.text for u in train + dev])[:12])
