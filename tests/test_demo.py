"""The embedded demo corpus: deterministic, shaped like the challenge data, emotion in words and voice."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS

from emotune.data.demo import REAL_COUNTS, build_demo_corpus, ensure_demo_corpus, plan_corpus
from emotune.errors import EmotuneError


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".csv", ".mp3")}


def test_same_seed_same_bytes_other_seed_other_corpus(demo_corpus, tmp_path):
    again = build_demo_corpus(tmp_path / "again", n_clips=60, seed=7, workers=1, progress=False)
    assert digest(demo_corpus) == digest(tmp_path / "again")
    assert again["counts"]["train"]["fear"] >= 1
    # another seed, another corpus: its plan (what build_demo_corpus synthesises) starts with another sentence, or,
    # should the two plans start alike, its audio differs
    if plan_corpus(60, seed=8)[0].text == again["clips"][0]["text"]:
        build_demo_corpus(tmp_path / "other", n_clips=60, seed=8, progress=False)
        assert digest(tmp_path / "other") != digest(demo_corpus)


def test_layout_matches_the_challenge(demo_corpus):
    assert (demo_corpus / "train.csv").read_text(encoding="utf-8").splitlines()[0] == "id,label,transcription,speaker"
    assert (demo_corpus / "test.csv").read_text(encoding="utf-8").splitlines()[0] == "id,transcription"
    assert (demo_corpus / "test_labels.csv").read_text(encoding="utf-8").splitlines()[0] == "id,label"
    files = list((demo_corpus / "audio").iterdir())
    assert len(files) == 60 and all(f.suffix == ".mp3" for f in files)


def test_plan_is_shaped_like_the_real_corpus():
    specs = plan_corpus(900, seed=0)
    counts = Counter(s.label for s in specs)
    assert sum(counts.values()) == 900
    real_order = sorted(REAL_COUNTS, key=REAL_COUNTS.get, reverse=True)
    assert sorted(counts, key=counts.get, reverse=True)[0] == "neutral" == real_order[0]
    assert min(counts, key=counts.get) == "fear"
    for split in ("train", "test"):
        present = Counter(s.label for s in specs if s.split == split)
        assert set(present) == set(LABELS), split
    test_share = sum(s.split == "test" for s in specs) / 900
    assert 0.18 < test_share < 0.22
    assert len({s.voice for s in specs}) >= 4
    assert len({s.id for s in specs}) == 900


def test_emotion_is_in_words_voice_or_both():
    specs = plan_corpus(900, seed=0)
    emotional = [s for s in specs if s.label != "neutral"]
    modes = Counter(s.mode for s in emotional)
    assert set(modes) == {"text", "voice", "both"} and min(modes.values()) > 0.25 * len(emotional)
    neutral_texts = {s.text for s in specs if s.label == "neutral"}
    # a clip whose emotion is only in the voice reads like a neutral sentence: no cue words
    from emotune.data.demo import CUES

    for s in emotional:
        own_cue = any(c in s.text for c in CUES[s.label])
        any_cue = any(c in s.text for cues in CUES.values() for c in cues)
        assert own_cue == any_cue == (s.mode in ("text", "both")), s
    assert neutral_texts


def test_prosody_depends_on_emotion_and_overlaps():
    specs = plan_corpus(900, seed=0)

    def rates(label, mode):
        return np.array([s.rate for s in specs if s.label == label and s.mode in mode])

    neutral = rates("neutral", ("neutral", "text"))
    assert rates("sadness", ("voice", "both")).mean() < neutral.mean() < rates("anger", ("voice", "both")).mean()
    # overlapping classes: some sad clips are faster than some neutral ones
    assert rates("sadness", ("voice", "both")).max() > np.percentile(neutral, 10)
    pitch_by_speaker = {spk: np.mean([s.pitch for s in specs if s.speaker == spk and s.label == "neutral"])
                        for spk in {s.speaker for s in specs}}
    assert max(pitch_by_speaker.values()) - min(pitch_by_speaker.values()) > 15  # voices differ


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(EmotuneError, match="not an emotune demo corpus"):
        build_demo_corpus(tmp_path, n_clips=60, progress=False)
    with pytest.raises(EmotuneError, match="at least 60 clips"):
        plan_corpus(20, seed=0)


def test_ensure_reuses_a_complete_corpus(demo_corpus):
    before = (demo_corpus / "demo_manifest.json").stat().st_mtime_ns
    assert ensure_demo_corpus(demo_corpus, n_clips=60, seed=7, progress=False) == demo_corpus
    assert (demo_corpus / "demo_manifest.json").stat().st_mtime_ns == before
