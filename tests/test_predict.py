"""`emotune predict` on what users bring: MP3 clips, CSVs with bad rows or none, and ensembles whose encoder changed.

One soft-vote ensemble of the shared smoke search is written once for the module; a test that alters an ensemble
works on its own copy.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import write_csv

from emotune.cli import main
from emotune.config import load_config
from emotune.selection.ensemble import EnsembleRequest, select_top
from emotune.selection.predict import Ensemble, read_inputs


@pytest.fixture(scope="module")
def soft_ensemble(smoke_search, tmp_path_factory) -> Path:
    """The smoke search's two best trials, soft vote: read-only for the tests (copy it to change it)."""
    runs, _ = smoke_search
    out = tmp_path_factory.mktemp("predict") / "ens"
    select_top(load_config([f"paths.runs_dir={runs}"]), EnsembleRequest(k=2, method="soft", out_dir=out))
    return out


def clip_ids(corpus: Path) -> list[str]:
    with (corpus / "test.csv").open(newline="") as f:
        return [row["id"] for row in csv.DictReader(f)]


def predictions_of(path: Path) -> dict[str, dict]:
    with path.open(newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def test_mp3_clips_get_the_predictions_of_their_wav_originals(soft_ensemble, separable, tmp_path):
    """The real corpus is 44.1 kHz stereo MP3 while the other tests feed 16 kHz mono WAV: decoding, downmixing and
    resampling must bring an MP3 to what the members were trained on.

    The same clips as lossless 44.1 kHz FLAC separate the codec from the resampling: the 16 -> 44.1 -> 16 kHz round
    trip alone moves these tiny models' probabilities by up to 0.17 (measured), MP3 coding by under 0.01 more.
    """
    import torch
    import torchaudio.functional as AF

    assert "MP3" in sf.available_formats()  # libsndfile >= 1.1 writes MP3
    corpus, _ = separable
    with (corpus / "test.csv").open(newline="") as f:
        originals = [row for row in csv.DictReader(f) if row["id"].endswith("08.wav")]  # one clip of each class
    assert len(originals) == 6
    wav_csv = write_csv(tmp_path / "wav.csv", ["id", "transcription"],
                        [[r["id"], r["transcription"]] for r in originals])
    inputs = {".wav": read_inputs(str(wav_csv), str(corpus / "audio"), None, None)[0]}
    for ext, subtype in ((".mp3", "MPEG_LAYER_III"), (".flac", "PCM_16")):
        (tmp_path / ext).mkdir()
        rows = []
        for row in originals:
            wave, sr = sf.read(corpus / "audio" / row["id"], dtype="float32")
            at_44k = AF.resample(torch.from_numpy(wave), sr, 44_100).numpy()
            name = Path(row["id"]).with_suffix(ext).name
            sf.write(tmp_path / ext / name, np.stack([at_44k, 0.9 * at_44k], axis=1), 44_100, subtype=subtype)
            rows.append([name, row["transcription"]])
        listed = write_csv(tmp_path / f"{ext}.csv", ["id", "transcription"], rows)
        inputs[ext] = read_inputs(str(listed), str(tmp_path / ext), None, None)[0]
        assert {u.audio.suffix for u in inputs[ext]} == {ext}

    ensemble = Ensemble(soft_ensemble)
    (wav_predicted, _), (mp3_predicted, mp3_probs), (_, flac_probs) = (
        ensemble.predict(inputs[ext]) for ext in (".wav", ".mp3", ".flac"))
    assert mp3_predicted.tolist() == wav_predicted.tolist()
    np.testing.assert_allclose(mp3_probs, flac_probs, atol=0.03)


def test_on_error_skip_predicts_the_good_rows_and_names_the_bad_ones(soft_ensemble, separable, tmp_path, capsys):
    corpus, _ = separable
    good = clip_ids(corpus)[:2]
    audio = tmp_path / "audio"
    audio.mkdir()
    for clip in good:
        shutil.copy(corpus / "audio" / clip, audio / clip)
    (audio / "broken.wav").write_bytes(b"not audio at all" * 64)
    shutil.copy(corpus / "audio" / good[0], audio / "untranscribed.wav")
    rows = [[good[0], "qué alegría"], ["gone.wav", "qué pena"], ["untranscribed.wav", "  "], [good[1], "qué rabia"],
            ["broken.wav", "qué miedo"]]  # lines 2 to 6 of the file
    clips = write_csv(tmp_path / "clips.csv", ["id", "transcription"], rows)
    out = tmp_path / "predicted.csv"
    common = ["predict", str(soft_ensemble), "--csv", str(clips), "--audio-dir", str(audio), "--out", str(out)]

    assert main(common + ["--on-error", "skip"]) == 0
    assert list(predictions_of(out)) == good  # the good rows, in their order, and only them
    report = capsys.readouterr().err
    assert "Skipped 3 rows" in report
    for row, clip, kind in [(3, "gone.wav", "missing audio"), (4, "untranscribed.wav", "the transcription is empty"),
                            (6, "broken.wav", "cannot be decoded")]:
        assert f"row {row}, id '{clip}'" in report and kind in report, (clip, report)

    out.unlink()
    assert main(common) == 2  # on_error raise, the default: the first bad row stops it, nothing is written
    message = capsys.readouterr().err
    assert f"{clips}, row 3, id 'gone.wav': audio file not found" in message
    assert "Check that the audio folder is right" in message and "--on-error skip" in message
    assert not out.exists()


def test_nothing_to_predict_is_a_clear_error(soft_ensemble, separable, tmp_path, capsys):
    corpus, _ = separable
    header_only = write_csv(tmp_path / "empty.csv", ["id", "transcription"], [])
    assert main(["predict", str(soft_ensemble), "--csv", str(header_only), "--audio-dir", str(corpus / "audio")]) == 2
    message = capsys.readouterr().err
    assert f"{header_only}: has no rows to predict, only a header" in message and "Add one row per clip" in message

    all_bad = write_csv(tmp_path / "bad.csv", ["id", "transcription"], [["gone.wav", "hola"], ["lost.wav", "adiós"]])
    # in a fresh process: the exit status and stderr a user's shell sees
    result = subprocess.run([sys.executable, "-m", "emotune", "predict", str(soft_ensemble), "--csv", str(all_bad),
                             "--audio-dir", str(corpus / "audio"), "--on-error", "skip"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"nothing to predict: all 2 rows of {all_bad} were skipped" in result.stderr
    assert "row 2, id 'gone.wav'" in result.stderr and "row 3, id 'lost.wav'" in result.stderr
    assert result.stdout == ""


def test_predict_refuses_an_encoder_rebuilt_since_the_ensemble_was_made(soft_ensemble, separable, tmp_path, capsys):
    """The tiny text encoder shipped in the folder is rebuilt with another seed: same names, different weights."""
    from emotune.features.tiny import build_tiny_encoder

    corpus, _ = separable
    ensemble = tmp_path / "ens"
    shutil.copytree(soft_ensemble, ensemble)
    ((original, shipped),) = json.loads((ensemble / "ensemble.json").read_text())["encoder_folders"].items()
    with (corpus / "train.csv").open(newline="") as f:
        texts = [row["transcription"] for row in csv.DictReader(f)]
    rebuilt = build_tiny_encoder("tiny-bert", tmp_path / "rebuilt", texts=texts, seed=1)
    shutil.rmtree(ensemble / shipped)
    shutil.copytree(rebuilt, ensemble / shipped)

    clip = corpus / "audio" / clip_ids(corpus)[0]
    assert main(["predict", str(ensemble), "--audio", str(clip), "--text", "qué alegría"]) == 2
    message = capsys.readouterr().err
    what = f"the text encoder 'tiny-bert' in {ensemble / shipped} is not the one this ensemble was trained with"
    assert what in message
    assert "its files (weights, config or tokenizer) changed" in message  # what changed
    assert f"copied it into the ensemble folder from {original}" in message and "emotune select-top" in message


def test_predict_in_chunks_equals_all_at_once_and_old_cards_still_load(soft_ensemble, separable, tmp_path):
    corpus, _ = separable
    utterances, _ = read_inputs(str(corpus / "test.csv"), str(corpus / "audio"), None, None)
    ensemble = Ensemble(soft_ensemble)
    whole, whole_scores = ensemble.predict(utterances, chunk_size=10**9)
    chunked, chunked_scores = ensemble.predict(utterances, chunk_size=2, batch_size=1)
    assert chunked.tolist() == whole.tolist() and len(whole) == len(utterances)
    np.testing.assert_allclose(chunked_scores, whole_scores, atol=1e-6)
    # an ensemble saved before cards recorded input normalisation and storage still loads and predicts the same
    old = tmp_path / "old"
    shutil.copytree(soft_ensemble, old)
    for card_path in old.glob("members/*/model_card.json"):
        card = json.loads(card_path.read_text())
        assert card.pop("format") == 3  # cards had no format number then
        for description in card["encoders"].values():
            for key in ("waveform_norm", "storage", "max_tokens"):
                description.pop(key)
        card_path.write_text(json.dumps(card))
    again, again_scores = Ensemble(old).predict(utterances)
    assert again.tolist() == whole.tolist()
    np.testing.assert_allclose(again_scores, whole_scores, atol=1e-6)


def test_predict_with_a_missing_member_is_a_clear_error(soft_ensemble, tmp_path, capsys):
    ensemble = tmp_path / "ens"
    shutil.copytree(soft_ensemble, ensemble)
    (ensemble / "members" / "02" / "model.safetensors").unlink()
    assert main(["predict", str(ensemble), "--audio", "x.wav", "--text", "hola"]) == 2
    message = capsys.readouterr().err
    assert "ensemble member members/02" in message and "model.safetensors missing" in message


@pytest.mark.slow
def test_predict_on_a_k_fold_member_gives_the_mean_of_its_heads(separable, tmp_path, shared_ray):
    """A trial.folds=3 search, its best trial as a one-member soft ensemble: `predict` gives, per clip, the mean of
    the three heads' probabilities, each head run alone through the same path."""
    from conftest import search_args

    from emotune.model.bag import FoldBag
    from emotune.search.driver import run_search

    corpus, shared_runs = separable
    runs = tmp_path / "runs"
    cfg = load_config(search_args(corpus, runs, shared_runs / "cache" / "features", "search.num_samples=2",
                                  "trial.max_epochs=2", "trial.folds=3", "search.name=folds3"), "search")
    run_search(cfg)
    out = tmp_path / "ens"
    summary = select_top(load_config([f"paths.runs_dir={runs}"]), EnsembleRequest(k=1, method="soft", out_dir=out))
    assert summary["estimate"]["expected_f1_low"] <= summary["estimate"]["expected_f1_high"]
    utterances, _ = read_inputs(str(corpus / "test.csv"), str(corpus / "audio"), None, None)
    ensemble = Ensemble(out)
    member = ensemble.members[0]
    assert isinstance(member.model, FoldBag) and len(member.model.heads) == 3 and member.card.folds == 3
    _, bag_scores = ensemble.predict(utterances)
    bag = member.model
    head_scores = []
    for head in bag.heads:
        member.model = head
        head_scores.append(ensemble.predict(utterances)[1])
    member.model = bag
    np.testing.assert_allclose(bag_scores, np.mean(head_scores, axis=0), atol=1e-5)
    assert not np.allclose(head_scores[0], head_scores[1], atol=1e-3)  # three different heads
