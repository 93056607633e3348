"""The audio pipeline: crop and repetition padding, normalisation statistics, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from conftest import tone

from emotune.data.audio import NormStats, crop_or_repeat, load_audio
from emotune.data.augment import EFFECTS, Augmenter
from emotune.data.corpus import load_corpus, norm_stats, split_train_dev
from emotune.errors import DataError


@pytest.mark.parametrize("n, length", [(100, 40), (40, 40), (30, 88), (1, 5)])
def test_crop_or_repeat_gives_the_exact_length(n, length):
    x = np.arange(n, dtype=np.float32)
    out = crop_or_repeat(x, length, np.random.default_rng(0))
    assert out.shape == (length,)
    if n >= length:  # a contiguous window of the clip
        assert np.all(np.diff(out) == 1) and out[0] + length <= n
    else:  # the clip repeated from its start, never zeros
        assert np.array_equal(out, np.arange(length) % n)


def test_crop_is_random_but_seeded_and_works_on_frames():
    frames = np.random.default_rng(0).standard_normal((3, 500, 8))  # layers x frames x width
    a = crop_or_repeat(frames, 275, np.random.default_rng(1), axis=1)
    b = crop_or_repeat(frames, 275, np.random.default_rng(1), axis=1)
    starts = {int(crop_or_repeat(np.arange(500), 275, np.random.default_rng(s))[0]) for s in range(20)}
    assert a.shape == (3, 275, 8) and np.array_equal(a, b) and len(starts) > 5


def test_norm_stats_equal_a_direct_computation_on_the_train_side_only(tiny_corpus):
    corpus = load_corpus(tiny_corpus / "train.csv", tiny_corpus / "audio", tiny_corpus / "test.csv", progress=False)
    train, dev = split_train_dev(corpus.train, 0.25, seed=0)
    stats = norm_stats(train, corpus.audio)
    everything = np.concatenate([load_audio(u.audio) for u in train]).astype(np.float64)
    assert stats.n_files == len(train) and stats.n_samples == everything.size
    assert stats.mean == pytest.approx(everything.mean(), abs=1e-9)
    assert stats.std == pytest.approx(everything.std(), rel=1e-6)
    with_dev = norm_stats(train + dev, corpus.audio)
    assert with_dev.n_samples > stats.n_samples  # dev is not part of the statistics
    normalised = stats.apply(everything.astype(np.float32))
    assert abs(normalised.mean()) < 1e-4 and abs(normalised.std() - 1) < 1e-4


def test_norm_stats_round_trip(tmp_path):
    stats = NormStats(mean=0.01, std=0.2, n_samples=10, n_files=2)
    stats.save(tmp_path / "norm.json")
    assert NormStats.load(tmp_path / "norm.json") == stats


@pytest.mark.parametrize("effect", EFFECTS)
def test_each_effect_keeps_length_and_finiteness_and_changes_the_clip(effect):
    wave = tone(2.3, freq=180)
    augmenter = Augmenter()
    out = augmenter.apply(effect, wave, np.random.default_rng(0))
    assert out.shape == wave.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert not np.allclose(out, wave)


def test_noise_is_added_at_the_requested_snr():
    wave = tone(2.0)
    out = Augmenter(snr_db=(20.0, 20.0)).apply("noise", wave, np.random.default_rng(0))
    snr = 10 * np.log10(np.sum(wave**2) / np.sum((out - wave) ** 2))
    assert snr == pytest.approx(20.0, abs=0.1)


def test_augmentation_is_deterministic_under_a_seed_and_respects_p():
    wave = tone(1.5)
    augmenter = Augmenter()

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [augmenter(wave, rng, p=0.6) for _ in range(12)]

    assert all(np.array_equal(a, b) for a, b in zip(draws(5), draws(5)))
    rng = np.random.default_rng(0)
    changed = sum(not np.array_equal(augmenter(wave, rng, p=0.6), wave) for _ in range(400))
    assert 0.5 < changed / 400 < 0.7
    assert all(np.array_equal(augmenter(wave, rng, p=0.0), wave) for _ in range(20))


def best_window_correlation(signal: np.ndarray, recording: np.ndarray) -> float:
    """The highest correlation coefficient between ``signal`` and any window of ``recording`` of its length."""
    n = signal.size
    size = 1 << (recording.size + n).bit_length()
    # every window's dot product with the signal at once, by FFT cross-correlation
    spectrum = np.fft.rfft(recording, size) * np.conj(np.fft.rfft(signal, size))
    dots = np.fft.irfft(spectrum, size)[: recording.size - n + 1]
    energy = np.convolve(recording**2, np.ones(n), mode="valid")
    return float(np.max(dots / np.sqrt(energy * np.sum(signal**2))))


def test_impulse_responses_and_noises_from_folders(tmp_path):
    rirs, noises = tmp_path / "rirs" / "room1", tmp_path / "noises"
    rirs.mkdir(parents=True)
    noises.mkdir()
    impulse = np.zeros(4000, dtype=np.float32)
    impulse[[0, 800, 2000]] = [1.0, 0.5, 0.25]  # a direct path and two echoes
    sf.write(rirs / "rir.wav", impulse, 16_000)
    # a known recording, longer than the clip so that a window of it is cut: noise generated on the fly would
    # not match any window of it
    recording = (0.1 * np.random.default_rng(3).standard_normal(32_000)).astype(np.float32)
    sf.write(noises / "street.wav", recording, 16_000, subtype="FLOAT")
    augmenter = Augmenter(rir_dir=tmp_path / "rirs", noise_dir=noises)
    wave = tone(1.0, freq=400)
    wet = augmenter.apply("reverb", wave, np.random.default_rng(0))
    noisy = augmenter.apply("noise", wave, np.random.default_rng(0))
    for out in (wet, noisy):
        assert out.shape == wave.shape and np.isfinite(out).all()
    # the echo of the impulse response appears 800 samples later
    echo = np.convolve(wave, impulse)[: wave.size]
    assert np.corrcoef(wet, echo)[0, 1] > 0.99
    # what the noise effect added is a window of the folder's recording, scaled to an SNR in the 15-25 dB range
    added = (noisy - wave).astype(np.float64)
    match = best_window_correlation(added, recording.astype(np.float64))
    snr = 10 * np.log10(np.sum(wave.astype(np.float64) ** 2) / np.sum(added**2))
    assert match > 0.999, f"the added noise is not a window of the folder's recording (correlation {match:.3f})"
    assert 15.0 - 0.1 <= snr <= 25.0 + 0.1, snr


def test_empty_augmentation_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="noise folder holds no audio files"):
        Augmenter(noise_dir=tmp_path / "empty")
    with pytest.raises(DataError, match="impulse response folder does not exist"):
        Augmenter(rir_dir=tmp_path / "missing")
    with pytest.raises(DataError, match="unknown augmentation effects"):
        Augmenter(effects=("speed", "pitch"))
