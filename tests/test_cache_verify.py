"""What a start and a trial check of the feature cache, and what a trial holds in memory when it preloads it."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from conftest import trial_config

from emotune.errors import EmotuneError
from emotune.features import cache
from emotune.features.cache import CheckRecord, FeatureStore
from emotune.features.source import CachedFeatures


def fbank_cache(separable, cache_dir, *overrides):
    """The fbank features of the separable corpus (one augmented copy per training clip) in ``cache_dir``, and
    ``start()``, which runs a start's cache step again (the real one: plan, check, build what is missing)."""
    from emotune.data.prepare import prepare_corpus
    from emotune.features.prepare import cache_encoder, encoder_recipe

    corpus_dir, runs = separable
    cfg = trial_config(corpus_dir, runs, f"features.dir={cache_dir}", "encoders.speech=fbank", *overrides)
    corpus = prepare_corpus(cfg["data"], cfg["paths"]["runs_dir"], progress=False)

    def start():
        recipe = encoder_recipe("fbank", "speech", corpus, cfg["features"], cfg["paths"])
        return cache_encoder(recipe, corpus, cfg["features"], progress=False)

    return corpus, start


@pytest.fixture
def crc_bytes(monkeypatch):
    """How many bytes the CRC function was given since the test began: what the cache read (or wrote) in full."""
    counted = [0]
    crc = cache._crc

    def counting(tensors):
        counted[0] += sum(t.nbytes for t in tensors.values())
        return crc(tensors)

    monkeypatch.setattr(cache, "_crc", counting)
    return counted


def test_preload_counts_what_a_trial_holds_in_memory_not_the_int8_bytes_on_disk(separable, tmp_path):
    corpus, start = fbank_cache(separable, tmp_path / "cache", "features.storage=int8")
    _, index = start()
    store = FeatureStore(index.cache_dir)
    keys = {k for row in index.speech.values() for k in row}
    on_disk = sum(store.path(k).stat().st_size for k in keys)
    loaded = CachedFeatures(index, ["speech"], corpus.labels, preload_mb=10_000)
    assert loaded.memory and loaded.held_bytes == sum(a.nbytes for a in loaded.memory.values())
    assert loaded.held_bytes > 1.8 * on_disk  # int8 (and a scale per frame) is unpacked to float16
    # a limit the cache's disk size fits but its memory does not: the old rule loaded it, now it streams
    between = (on_disk + loaded.held_bytes) / 2 / 1e6
    streamed = CachedFeatures(index, ["speech"], corpus.labels, preload_mb=between)
    assert not streamed.memory and streamed.held_bytes == loaded.held_bytes
    assert CachedFeatures(index, ["speech"], corpus.labels, preload_mb=(loaded.held_bytes + 1) / 1e6).memory


def test_a_start_reads_only_changed_files_and_a_trial_catches_what_a_stat_cannot_see(separable, tmp_path, crc_bytes):
    corpus, start = fbank_cache(separable, tmp_path / "cache")
    first, index = start()
    store = FeatureStore(index.cache_dir)
    n = first.built
    assert n == len(corpus.train) * 2 + len(corpus.dev) + len(corpus.test) and first.checked_in_full == 0
    assert len(CheckRecord(store.root).entries) == n  # written files are recorded without being read back

    crc_bytes[0] = 0
    unchanged = start()[0]
    assert (unchanged.hits, unchanged.built, unchanged.checked_in_full) == (n, 0, 0)
    assert crc_bytes[0] == 0  # not one byte of array data read: a stat per file

    flipped, truncated = (store.path(index.speech[u.id][0]) for u in corpus.train[:2])
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF  # same size, new mtime
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:50])
    # the limitation: an edit that keeps the size and puts the mtime back looks unchanged to a stat
    sneaky_clip = corpus.dev[0]
    sneaky_key = index.speech[sneaky_clip.id][0]
    sneaky = store.path(sneaky_key)
    original = store.read(sneaky_key)
    before = sneaky.stat()
    data = bytearray(sneaky.read_bytes())
    data[-5] ^= 0xFF
    sneaky.write_bytes(bytes(data))
    os.utime(sneaky, ns=(before.st_atime_ns, before.st_mtime_ns))

    repaired = start()[0]
    assert (repaired.rebuilt_damaged, repaired.checked_in_full, repaired.hits) == (2, 2, n - 2)
    assert store.is_intact(index.speech[corpus.train[0].id][0]) and store.is_intact(index.speech[corpus.train[1].id][0])
    assert not store.is_intact(sneaky_key)  # not read at the start: still damaged

    # a trial's first full read of the file (evaluation reads whole clean clips) checks its CRC ...
    streamed = CachedFeatures(index, ["speech"], corpus.labels, preload_mb=0)
    with pytest.raises(EmotuneError, match=rf"{re.escape(str(sneaky))}.*CRC.*features.verify=true"):
        streamed.batch([sneaky_clip], train=False, rng=np.random.default_rng(0))
    with pytest.raises(EmotuneError, match="CRC"):  # ... and so does preloading
        CachedFeatures(index, ["speech"], corpus.labels, preload_mb=10_000)
    # ... and marks it changed, so the next start reads it in full and re-encodes it
    assert sneaky.stat().st_mtime_ns != before.st_mtime_ns
    fixed = start()[0]
    assert (fixed.rebuilt_damaged, fixed.checked_in_full) == (1, 1)
    np.testing.assert_array_equal(store.read(sneaky_key), original)
    assert CachedFeatures(index, ["speech"], corpus.labels, preload_mb=10_000).memory

    # a file read in full once by a trial is not checked again on later reads
    reader = FeatureStore(store.root)
    crc_bytes[0] = 0
    for _ in range(3):
        reader.read(sneaky_key)
    assert crc_bytes[0] == original.nbytes


def test_a_cache_written_before_the_record_is_checked_in_full_once(separable, tmp_path, crc_bytes):
    corpus, start = fbank_cache(separable, tmp_path / "cache")
    first, index = start()
    store = FeatureStore(index.cache_dir)
    record = store.root / CheckRecord.FILE
    record.unlink()  # as an older emotune left the cache
    data_bytes = sum(store.read(k).nbytes for row in index.speech.values() for k in row)

    crc_bytes[0] = 0
    once = start()[0]
    assert (once.hits, once.built, once.checked_in_full) == (first.built, 0, first.built)
    assert crc_bytes[0] == data_bytes  # every file's arrays, once
    assert len(CheckRecord(store.root).entries) == first.built

    crc_bytes[0] = 0
    assert start()[0].checked_in_full == 0 and crc_bytes[0] == 0
