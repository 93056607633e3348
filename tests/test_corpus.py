"""The corpus reader: the challenge layout round-trips, bad input is named precisely, skips are counted."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import LABELS, tone, write_csv

from emotune.data.corpus import load_corpus, split_train_dev
from emotune.errors import DataError


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def load(root: Path, **kwargs):
    return load_corpus(root / "train.csv", root / "audio", root / "test.csv", progress=False, **kwargs)


def edit_train(root: Path, edit) -> None:
    header, rows = read_rows(root / "train.csv")
    header, rows = edit(header, rows)
    write_csv(root / "train.csv", header, rows)


def expect_error(root: Path, *fragments: str, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        load(root, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


def test_tiny_corpus_reads_in_challenge_order(tiny_corpus):
    corpus = load(tiny_corpus)
    assert len(corpus.train) == 24 and len(corpus.test) == 3
    assert corpus.labels == LABELS
    assert not corpus.test_labelled
    first = corpus.train[0]
    assert first.row == 2 and first.id == "clip001.wav" and first.label == "neutral"
    assert corpus.audio[first.id].n_samples == 8000  # 0.5 s at 16 kHz


def test_demo_corpus_round_trips_through_the_reader(demo_corpus):
    import json

    manifest = json.loads((demo_corpus / "demo_manifest.json").read_text())
    corpus = load_corpus(demo_corpus / "train.csv", demo_corpus / "audio", demo_corpus / "test.csv",
                         demo_corpus / "test_labels.csv", group_column="speaker", progress=False)
    by_id = {c["id"]: c for c in manifest["clips"]}
    assert len(corpus.train) + len(corpus.test) == manifest["n_clips"] == 60
    assert corpus.test_labelled
    for u in corpus.train + corpus.test:
        clip = by_id[u.id]
        assert (u.label, u.text) == (clip["label"], clip["text"])
        assert u.audio.suffix == ".mp3"
        # decoded at 16 kHz from 22.05 kHz MP3: the length follows the resampling ratio
        assert abs(corpus.audio[u.id].duration - clip["duration"]) < 0.01
    assert {u.group for u in corpus.train} <= {c["speaker"] for c in manifest["clips"]}


def test_resampled_to_16k_and_mixed_to_mono(tmp_path):
    """The loaded clip is the channel mean, band-limited down to 16 kHz with torchaudio (as load_audio documents).

    One channel carries a 12 kHz tone, above the 8 kHz that 16 kHz audio can hold: resampling without a
    low-pass filter would fold it back to 4 kHz, and keeping one channel would drop half the signal.
    """
    import torch
    import torchaudio.functional as AF

    from emotune.data.audio import load_audio

    seconds, sr = 1.0, 44_100
    t = np.arange(int(seconds * sr)) / sr
    left = tone(seconds, sr, 200)
    right = tone(seconds, sr, 300, seed=1) + (0.2 * np.sin(2 * np.pi * 12_000 * t)).astype(np.float32)
    sf.write(tmp_path / "s.flac", np.stack([left, right], axis=1), sr, subtype="PCM_24")
    wave = load_audio(tmp_path / "s.flac")
    assert wave.dtype == np.float32 and wave.ndim == 1 and wave.size == 16_000
    expected = AF.resample(torch.from_numpy((left + right) / 2), sr, 16_000).numpy()
    np.testing.assert_allclose(wave, expected, atol=1e-5, rtol=0)  # 24-bit FLAC: quantisation is far below that


def test_id_without_extension_finds_the_file(tiny_corpus):
    edit_train(tiny_corpus, lambda h, rows: (h, [[r[0].removesuffix(".wav"), *r[1:]] for r in rows]))
    corpus = load(tiny_corpus)
    assert corpus.train[0].audio.name == "clip001.wav"


# --- bad input: every message names the CSV file, the row and the id ---------------------------------------

def test_missing_audio_file(tiny_corpus):
    (tiny_corpus / "audio" / "clip005.wav").unlink()
    expect_error(tiny_corpus, "train.csv", "row 6", "clip005.wav", "not found")


@pytest.mark.parametrize(
    "name, payload, problem",
    [
        ("corrupt", b"this is not audio at all" * 10, "cannot be decoded"),
        ("empty", None, "no samples"),
        ("silent", np.zeros(8000, dtype=np.float32), "silent"),
        ("nan", np.array([0.1, np.nan, 0.2] * 3000, dtype=np.float32), "non-finite"),
    ],
)
def test_unusable_audio(tiny_corpus, name, payload, problem):
    target = tiny_corpus / "audio" / "clip003.wav"
    if isinstance(payload, bytes):
        target.write_bytes(payload)
    elif payload is None:
        sf.write(target, np.zeros(0, dtype=np.float32), 16_000)
    else:
        sf.write(target, payload, 16_000, subtype="FLOAT")
    error = expect_error(tiny_corpus, "train.csv", "row 4", "clip003.wav", problem)
    assert str(target) in str(error)  # the audio file itself is named too


def test_unknown_label(tiny_corpus):
    edit_train(tiny_corpus, lambda h, rows: (h, rows[:2] + [[rows[2][0], "surprise", rows[2][2]]] + rows[3:]))
    expect_error(tiny_corpus, "train.csv", "row 4", "clip003.wav", "unknown label 'surprise'", "neutral, disgust")


def test_labels_match_without_case_or_spaces(tiny_corpus):
    edit_train(tiny_corpus, lambda h, rows: (h, [[r[0], f" {r[1].upper()} ", r[2]] for r in rows]))
    assert load(tiny_corpus).train[0].label == "neutral"


def test_duplicate_id(tiny_corpus):
    edit_train(tiny_corpus, lambda h, rows: (h, rows + [rows[0]]))
    expect_error(tiny_corpus, "train.csv", "row 26", "clip001.wav", "duplicate id", "row 2")


def test_missing_column(tiny_corpus):
    edit_train(tiny_corpus, lambda h, rows: (["id", "transcription"], [[r[0], r[2]] for r in rows]))
    expect_error(tiny_corpus, "train.csv", "row 1", "'label'", "id, transcription")


def test_empty_transcript(tiny_corpus):
    edit_train(tiny_corpus, lambda h, rows: (h, rows[:6] + [[rows[6][0], rows[6][1], "   "]] + rows[7:]))
    expect_error(tiny_corpus, "train.csv", "row 8", "clip007.wav", "transcription is empty")


def test_csv_that_is_not_utf8(tiny_corpus):
    header, rows = read_rows(tiny_corpus / "train.csv")
    write_csv(tiny_corpus / "train.csv", header, rows, encoding="latin-1")  # "número" becomes byte 0xfa
    expect_error(tiny_corpus, "train.csv", "row 2", "not valid UTF-8", "iconv")


@pytest.mark.parametrize("bad_id", ["../outside.wav", "sub/../../outside.wav", "ABSOLUTE"])
def test_id_outside_the_audio_folder(tiny_corpus, bad_id):
    outside = tiny_corpus / "outside.wav"
    sf.write(outside, tone(), 16_000)  # the file exists: the reader must still refuse to leave the folder
    bad_id = str(outside) if bad_id == "ABSOLUTE" else bad_id
    edit_train(tiny_corpus, lambda h, rows: (h, rows[:1] + [[bad_id, "joy", "hola"]] + rows[1:]))
    expect_error(tiny_corpus, "train.csv", "row 3", bad_id, "outside the audio folder")


def test_row_with_wrong_number_of_fields(tiny_corpus):
    edit_train(tiny_corpus, lambda h, rows: (h, rows[:3] + [rows[3] + ["extra"]] + rows[4:]))
    expect_error(tiny_corpus, "train.csv", "row 5", "4 fields but the header has 3")


def test_missing_csv_and_audio_folder(tiny_corpus):
    with pytest.raises(DataError, match="CSV file not found"):
        load_corpus(tiny_corpus / "nope.csv", tiny_corpus / "audio", progress=False)
    with pytest.raises(DataError, match="audio folder not found"):
        load_corpus(tiny_corpus / "train.csv", tiny_corpus / "sound", progress=False)


def test_test_clip_also_in_train_is_refused(tiny_corpus):
    header, rows = read_rows(tiny_corpus / "test.csv")
    write_csv(tiny_corpus / "test.csv", header, rows + [["clip001.wav", "otra vez"]])
    expect_error(tiny_corpus, "test.csv", "row 5", "clip001.wav", "training CSV (row 2)")


def test_test_labels_file(tiny_corpus):
    write_csv(tiny_corpus / "test_labels.csv", ["id", "label"], [["test0.wav", "joy"], ["test1.wav", "fear"]])
    with pytest.raises(DataError, match=r"test\.csv, row 4, id 'test2\.wav': has no label"):
        load_corpus(tiny_corpus / "train.csv", tiny_corpus / "audio", tiny_corpus / "test.csv",
                    tiny_corpus / "test_labels.csv", progress=False)
    corpus = load_corpus(tiny_corpus / "train.csv", tiny_corpus / "audio", tiny_corpus / "test.csv",
                         tiny_corpus / "test_labels.csv", on_error="skip", progress=False)
    assert [u.label for u in corpus.test] == ["joy", "fear"] and len(corpus.report) == 1


# --- skip policy -------------------------------------------------------------------------------------------

def test_skip_policy_counts_and_lists_every_skipped_row(tiny_corpus, tmp_path):
    (tiny_corpus / "audio" / "clip002.wav").unlink()
    (tiny_corpus / "audio" / "clip004.wav").write_bytes(b"garbage" * 20)
    sf.write(tiny_corpus / "audio" / "clip006.wav", np.zeros(4000, dtype=np.float32), 16_000)

    def edit(header, rows):
        rows[7][1] = "boredom"  # row 9
        rows[9][2] = ""  # row 11
        return header, rows + [rows[0]]  # row 26 duplicates row 2

    edit_train(tiny_corpus, edit)
    corpus = load(tiny_corpus, on_error="skip")
    report = corpus.report
    assert len(report) == 6
    assert len(corpus.train) == 24 - 5
    assert report.counts() == {"missing audio": 1, "unreadable audio": 1, "silent audio": 1,
                               "unknown label": 1, "empty transcript": 1, "duplicate id": 1}
    assert sorted(r.row for r in report.rows) == [3, 5, 7, 9, 11, 26]
    summary = report.summary()
    assert summary.startswith("Skipped 6 rows") and "row 9" in summary
    written = report.write_csv(tmp_path / "skipped.csv")
    assert len(read_rows(written)[1]) == 6


def test_on_error_must_be_known(tiny_corpus):
    expect_error(tiny_corpus, "on_error must be one of raise, skip", on_error="ignore")


# --- splits ------------------------------------------------------------------------------------------------

def test_split_is_stratified_seeded_and_keeps_every_class(demo_corpus):
    corpus = load_corpus(demo_corpus / "train.csv", demo_corpus / "audio", group_column="speaker", progress=False)
    train, dev = split_train_dev(corpus.train, 0.16, seed=3)
    again_train, again_dev = split_train_dev(corpus.train, 0.16, seed=3)
    other_train, other_dev = split_train_dev(corpus.train, 0.16, seed=4)
    assert [u.id for u in dev] == [u.id for u in again_dev]
    assert [u.id for u in dev] != [u.id for u in other_dev]
    assert {u.id for u in train}.isdisjoint({u.id for u in dev})
    assert len(train) + len(dev) == len(corpus.train)
    assert {u.label for u in dev} == set(LABELS)  # fear is scarce but still in dev
    for label in LABELS:
        n = sum(u.label == label for u in corpus.train)
        assert abs(sum(u.label == label for u in dev) - 0.16 * n) <= 1


def test_grouped_split_keeps_each_speaker_on_one_side(demo_corpus):
    corpus = load_corpus(demo_corpus / "train.csv", demo_corpus / "audio", group_column="speaker", progress=False)
    train, dev = split_train_dev(corpus.train, 0.2, seed=0, by_group=True)
    assert dev and {u.group for u in train}.isdisjoint({u.group for u in dev})
    with pytest.raises(DataError, match="needs at least 20 groups"):
        split_train_dev(corpus.train, 0.05, seed=0, by_group=True)
