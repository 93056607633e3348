"""Frozen encoders and the shared feature cache: catalog errors, masks, cache hits, damaged files."""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import search_args, tone, trial_config

from emotune.data.audio import NormStats
from emotune.data.corpus import load_corpus
from emotune.errors import EmotuneError
from emotune.features.cache import AudioHashes, FeatureIndex, FeatureStore, build, check_disk, speech_jobs, text_jobs
from emotune.features.catalog import known_names, resolve_encoder
from emotune.features.encode import load_encoder
from emotune.features.recipe import resolve_layers
from emotune.features.source import CachedFeatures
from emotune.names import MODALITIES


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
    # keys hash the audio's bytes, not its path: the same clips copied to another folder under other names
    # (a corpus moved or re-exported) find every clean and augmented array already cached
    moved = tmp_path / "moved"
    moved.mkdir()
    copies = []
    for i, utt in enumerate(utts):
        shutil.copyfile(utt.audio, moved / f"renamed{i}.wav")
        copies.append(replace(utt, id=f"renamed{i}.wav", audio=moved / f"renamed{i}.wav"))
    moved_jobs = speech_jobs(encoder.key, copies, corpus.audio, norm, hashes, 2, {"seed": 0})
    assert [[j.key for j in moved_jobs[c.id]] for c in copies] == [[j.key for j in jobs[u.id]] for u in utts]
    moved_build = build(encoder, [j for row in moved_jobs.values() for j in row], store, norm, augmenter,
                        progress=False)
    assert moved_build.hits == 18 and moved_build.built == 0 and encoder.calls == 18
    # ... and other audio written over an already hashed path gets keys of its own, not the old file's
    sf.write(copies[0].audio, tone(0.9, freq=500, seed=99), 16_000)
    rewritten = speech_jobs(encoder.key, copies[:1], corpus.audio, norm, hashes, 2, {"seed": 0})[copies[0].id]
    assert {j.key for j in rewritten}.isdisjoint(j.key for j in jobs[utts[0].id])
    # text keys hash the transcript: another clip saying the same thing shares its text features
    same_words = replace(utts[1], id="another.wav", text=utts[0].text)
    assert text_jobs("enc", [same_words])["another.wav"].key == text_jobs("enc", utts)[utts[0].id].key
    assert text_jobs("enc", utts)[utts[1].id].key != text_jobs("enc", utts)[utts[0].id].key


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


# --- how trials read the cache ----------------------------------------------------------------------------

VARIANTS = 4


@pytest.fixture(scope="module")
def augmented_cache(separable, tmp_path_factory):
    """fbank features of a dozen training clips with 4 augmented copies each (and a few clean dev and test
    clips), and tiny-bert features of every transcript, in a cache of this module's own."""
    from emotune.data.prepare import prepare_corpus
    from emotune.features.prepare import prepare_features

    corpus_dir, runs = separable
    cache = tmp_path_factory.mktemp("augmented") / "features"
    cfg = trial_config(corpus_dir, runs, f"features.dir={cache}", f"features.variants={VARIANTS}",
                       "encoders.speech=fbank", "encoders.text=tiny-bert")
    corpus = prepare_corpus(cfg["data"], cfg["paths"]["runs_dir"], progress=False)
    few = replace(corpus, train=corpus.train[:12], dev=corpus.dev[:4], test=corpus.test[:4])
    parts = [prepare_features(few, cfg["encoders"], cfg["features"], ["speech"], cfg["paths"], progress=False),
             # the whole corpus's transcripts: tiny-bert's tokenizer (and its folder, shared by other tests)
             # is trained on the full training split
             prepare_features(corpus, cfg["encoders"], cfg["features"], ["text"], cfg["paths"], progress=False)]
    index = FeatureIndex.merge(parts)
    assert all(len(index.speech[u.id]) == 1 + VARIANTS for u in few.train)
    return few, index


@pytest.mark.parametrize("preload_mb", [4096, 0], ids=["in-memory", "from-disk"])
def test_evaluation_reads_the_whole_clean_copy_even_when_training_always_augments(augmented_cache, preload_mb):
    corpus, index = augmented_cache
    store = FeatureStore(index.cache_dir)
    source = CachedFeatures(index, ["speech"], corpus.labels, aug_prob=1.0, crop_seconds=0.5, preload_mb=preload_mb)
    assert bool(source.memory) == (preload_mb > 0)
    clips = corpus.train  # the clips that have augmented copies to pick by mistake
    rng = np.random.default_rng(0)
    for _ in range(2):
        batch = source.batch(clips, train=False, rng=rng)
        for i, utt in enumerate(clips):
            clean = store.read(index.speech[utt.id][0])
            assert int(batch["speech_mask"][i].sum()) == clean.shape[1]  # whole: not cropped to 0.5 s
            np.testing.assert_array_equal(batch["speech"][i, :, : clean.shape[1]].numpy(), clean)


@pytest.mark.parametrize("aug_prob", [0.0, 0.25, 0.75, 1.0])
def test_training_draws_the_clean_copy_with_probability_one_minus_aug_prob(augmented_cache, aug_prob):
    corpus, index = augmented_cache
    store = FeatureStore(index.cache_dir)
    copies = {u.id: [store.read(key) for key in index.speech[u.id]] for u in corpus.train}
    # a crop longer than every clip repeats the clip from its start, so the drawn copy shows whole at the start
    source = CachedFeatures(index, ["speech"], corpus.labels, aug_prob=aug_prob, crop_seconds=2.0)
    assert source.crop_frames > max(c[0].shape[1] for c in copies.values())
    drawn = Counter()
    rng = np.random.default_rng(2024)
    for _ in range(150):
        batch = source.batch(corpus.train, train=True, rng=rng)
        for i, utt in enumerate(corpus.train):
            features = batch["speech"][i].numpy()
            which = [v for v, copy in enumerate(copies[utt.id]) if np.array_equal(features[:, : copy.shape[1]], copy)]
            assert which == [0] or (which and 0 not in which), f"{utt.id}: the batch matches copies {which}"
            # two augmented copies can be equal (the same speed factor twice): such a draw counts half to each
            for variant in which:
                drawn[variant] += 1 / len(which)
    total = round(sum(drawn.values()))
    assert total == 150 * len(corpus.train) >= 1500
    clean_share = drawn[0] / total
    if aug_prob in (0.0, 1.0):
        assert clean_share == 1.0 - aug_prob
    else:
        assert clean_share == pytest.approx(1.0 - aug_prob, abs=0.04)  # about 4 standard deviations
    for variant in range(1, VARIANTS + 1):  # the augmented draws are shared evenly by the copies
        assert drawn[variant] / total == pytest.approx(aug_prob / VARIANTS, abs=0.03), (variant, drawn)


def test_batches_read_from_disk_equal_batches_read_from_memory(augmented_cache):
    """A cache too big for memory is read clip by clip (training reads only the crop): batches must not change."""
    corpus, index = augmented_cache
    # 1 s crops: longer clips are cropped (the disk path reads just that slice), the shortest are repeated
    settings = {"aug_prob": 0.5, "crop_seconds": 1.0}
    in_memory = CachedFeatures(index, MODALITIES, corpus.labels, preload_mb=4096, **settings)
    from_disk = CachedFeatures(index, MODALITIES, corpus.labels, preload_mb=0, **settings)
    assert in_memory.memory and not from_disk.memory
    for train, clips in ((True, corpus.train), (False, corpus.dev + corpus.test)):
        rng_memory, rng_disk = np.random.default_rng(5), np.random.default_rng(5)
        for _ in range(3):  # epochs
            for start in range(0, len(clips), 8):
                expected = in_memory.batch(clips[start : start + 8], train, rng_memory)
                got = from_disk.batch(clips[start : start + 8], train, rng_disk)
                assert got.keys() == expected.keys() and expected["labels"] is not None
                for key, value in expected.items():  # exactly equal, dtype included
                    torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=f"train={train}: {key} differs")


def test_the_parallel_fill_writes_the_bytes_a_serial_build_writes(smoke_search, separable, tmp_path):
    """The smoke search filled the shared cache with Ray cache workers (one per CPU, one thread each); building
    the first chunk of work they were handed again, in this process and without Ray, must give the same files
    byte for byte: whoever fills a cache, every trial and every later search reads the same features."""
    from emotune.config import load_config
    from emotune.data.prepare import prepare_corpus
    from emotune.features.distributed import CHUNK
    from emotune.features.prepare import encoder_recipe, fill_cache, plan_jobs

    runs, summary = smoke_search
    corpus_dir, shared_runs = separable
    shared = FeatureStore(shared_runs / "cache" / "features")
    cfg = load_config(search_args(corpus_dir, runs, shared.root), "search")
    by_workers = {r["encoder"] for r in summary["cache"] if r["built"] and r["workers"]}
    assert by_workers == {f"{m} encoder {cfg['encoders'][m]}" for m in MODALITIES}, (
        "the smoke search must be the first to fill the shared cache, with Ray cache workers", summary["cache"])
    corpus = prepare_corpus(cfg["data"], runs, progress=False)
    serial = {**cfg["features"], "dir": str(tmp_path / "serial")}
    for modality in MODALITIES:
        recipe = encoder_recipe(cfg["encoders"][modality], modality, corpus, cfg["features"], cfg["paths"])
        jobs = plan_jobs(corpus, recipe, cfg["features"], shared, save_hashes=False)
        # the clips of the first chunk, in the fill's order, so that a text encoder sees the same batches
        # (the padding in a batch moves the last bits of its outputs); speech: clean and augmented copies
        first_chunk, count = {}, 0
        for uid, row in jobs.items():
            if count + len(row) > CHUNK:
                break
            first_chunk[uid], count = row, count + len(row)
        report = fill_cache(recipe, first_chunk, corpus, serial, progress=False)
        assert report.built == count >= CHUNK - 1 and not report.workers
        for uid, row in first_chunk.items():
            for job in row:
                written = FeatureStore(serial["dir"]).path(job.key).read_bytes()
                assert written == shared.path(job.key).read_bytes(), f"{modality} {uid}: {job}"
