"""Frozen encoders and the shared feature cache: catalog errors, masks, cache hits, damaged files."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tone
from emotune.data.audio import NormStats
from emotune.data.corpus import load_corpus
from emotune.errors import EmotuneError
from emotune.features.cache import (AudioHashes, FeatureStore, build, check_disk, speech_jobs, text_jobs)
from emotune.features.catalog import known_names, resolve_encoder
from emotune.features.encode import load_encoder, resolve_layers


class CountingEncoder:
    """A real encoder with its calls counted, to prove what a cache hit skips."""

    def __init__(self, encoder):
        self.inner, self.calls = encoder, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, inputs):
        self.calls += len(inputs)
        return self.inner.encode(inputs)


def test_catalog_knows_the_papers_encoders_and_explains_mistakes(tmp_path):
    assert resolve_encoder("xlsr", "speech").source == "facebook/wav2vec2-xls-r-300m"
    assert resolve_encoder("roberta-es", "text").source == "llange/xlm-roberta-large-spanish"
    assert resolve_encoder("beto", "text").source == "dccuchile/bert-base-spanish-wwm-uncased"
    assert resolve_encoder("someorg/some-model", "speech").kind == "hf"
    with pytest.raises(EmotuneError, match="unknown speech encoder 'wavlm-huge'.*xlsr.*fbank"):
        resolve_encoder("wavlm-huge", "speech")
    with pytest.raises(EmotuneError, match="'beto' is a text encoder"):
        resolve_encoder("beto", "speech")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmotuneError, match="no config.json"):
        resolve_encoder(str(tmp_path / "empty"), "text")
    assert "tiny-wavlm" in known_names("speech") and "tiny-roberta" in known_names("text")


def test_hub_model_missing_offline_names_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmotuneError, match=r"huggingface-cli download facebook/wav2vec2-xls-r-300m.*encoders\.speech="):
        load_encoder(resolve_encoder("xlsr", "speech"), tmp_path)


def test_layer_choices():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers("last", 4) == [3]
    assert resolve_layers([-1, 0], 4) == [0, 3]
    with pytest.raises(EmotuneError, match="between -4 and 3"):
        resolve_layers([7], 4)


@pytest.mark.parametrize("name, width", [("fbank", 80), ("mfcc", 40)])
def test_classic_encoders_give_100_frames_per_second(tmp_path, name, width):
    encoder = load_encoder(resolve_encoder(name, "speech"), tmp_path)
    (features,) = encoder.encode([tone(1.0)])
    assert features.shape[0] == 1 and features.shape[2] == width and abs(features.shape[1] - 100) <= 2
    assert np.isfinite(features).all() and encoder.frame_rate == 100


@pytest.mark.parametrize("preset", ["tiny-wav2vec2", "tiny-wavlm", "tiny-wav2vec2-base"])
def test_ssl_speech_outputs_do_not_depend_on_batch_padding(tmp_path, preset):
    encoder = load_encoder(resolve_encoder(preset, "speech"), tmp_path, batch_size=4)
    short, long = tone(0.7, seed=1), tone(1.9, seed=2)
    together = encoder.encode([long, short])
    alone = encoder.encode([short])[0]
    frames = int(encoder.model._get_feat_extract_output_lengths(len(short)))
    assert together[1].shape == alone.shape == (2, frames, 32)  # 2 transformer layers, width 32
    # group-norm models are run clip by clip precisely so that this holds for them too
    np.testing.assert_allclose(together[1], alone, atol=1e-4)
    assert together[0].shape[1] > together[1].shape[1]  # the padded frames were cut off


def test_text_encoder_returns_one_row_per_real_token(tmp_path):
    texts = ["hola qué tal", "me encanta la playa de verdad", "qué asco de día"]
    encoder = load_encoder(resolve_encoder("tiny-bert", "text"), tmp_path, texts=texts)
    out = encoder.encode(texts)
    lengths = [len(encoder.tokenizer(t)["input_ids"]) for t in texts]
    assert [o.shape[1] for o in out] == lengths
    np.testing.assert_allclose(encoder.encode([texts[0]])[0], out[0], atol=1e-5)


def test_second_build_is_a_cache_hit_that_never_calls_the_encoder(tiny_corpus, tmp_path):
    corpus = load_corpus(tiny_corpus / "train.csv", tiny_corpus / "audio", progress=False)
    utts = corpus.train[:6]
    norm = NormStats(0.0, 0.1, 1, 1)
    store = FeatureStore(tmp_path / "cache")
    hashes = AudioHashes(tmp_path / "hashes.json")
    from emotune.data.augment import Augmenter

    augmenter = Augmenter.from_settings({})
    encoder = CountingEncoder(load_encoder(resolve_encoder("fbank", "speech"), tmp_path))
    jobs = speech_jobs(encoder.key, utts, corpus.audio, norm, hashes, 2, {"seed": 0})
    flat = [j for row in jobs.values() for j in row]
    first = build(encoder, flat, store, norm, augmenter, progress=False)
    assert first.built == 18 and encoder.calls == 18
    clean, variant = store.read(jobs[utts[0].id][0].key), store.read(jobs[utts[0].id][1].key)
    assert clean.shape == variant.shape and not np.allclose(clean, variant)  # an augmented copy
    again = build(encoder, flat, store, norm, augmenter, progress=False)
    assert again.hits == 18 and again.built == 0 and encoder.calls == 18
    # another search asking for the same text or audio finds the same keys
    texts = text_jobs("enc", utts)
    assert texts == text_jobs("enc", list(reversed(utts)))


def test_damaged_cache_file_is_detected_and_rebuilt(tiny_corpus, tmp_path):
    corpus = load_corpus(tiny_corpus / "train.csv", tiny_corpus / "audio", progress=False)
    norm = NormStats(0.0, 0.1, 1, 1)
    store = FeatureStore(tmp_path / "cache")
    encoder = CountingEncoder(load_encoder(resolve_encoder("mfcc", "speech"), tmp_path))
    jobs = speech_jobs(encoder.key, corpus.train[:4], corpus.audio, norm, AudioHashes(tmp_path / "h.json"), 0, {})
    flat = [j for row in jobs.values() for j in row]
    build(encoder, flat, store, norm, progress=False)
    original = store.read(flat[0].key)
    path = store.path(flat[0].key)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the array: the file still loads, only the CRC notices
    path.write_bytes(bytes(data))
    store.path(flat[1].key).write_bytes(path.read_bytes()[:50])  # a truncated file
    assert not store.is_intact(flat[0].key) and not store.is_intact(flat[1].key)
    report = build(encoder, flat, store, norm, progress=False)
    assert report.rebuilt_damaged == 2 and report.hits == 2 and encoder.calls == 4 + 2
    np.testing.assert_array_equal(store.read(flat[0].key), original)


def test_cache_that_would_not_fit_is_refused_before_building(tmp_path):
    with pytest.raises(EmotuneError, match="needs about .* GB but only .* GB are free"):
        check_disk(FeatureStore(tmp_path), needed=10**18, what="speech encoder test")


def test_reading_a_damaged_file_in_a_trial_says_how_to_repair(tmp_path):
    store = FeatureStore(tmp_path)
    store.write("abcdef", np.ones((1, 3, 2)))
    store.path("abcdef").write_bytes(b"nonsense")
    with pytest.raises(EmotuneError, match="features.verify=true"):
        store.read("abcdef")
