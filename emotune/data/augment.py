"""Waveform augmentation: one effect per clip, chosen at random: speed, reverberation or background noise.

This follows the winning system: speed perturbation by 0.9 or 1.1, reverberation by convolving a room
impulse response, and additive noise at 15 to 25 dB SNR. Impulse responses and noises come from folders
the user names (RIRS_NOISES, MUSAN, ...); without them emotune generates synthetic ones, so the pipeline
also runs offline with nothing downloaded. Every effect keeps the clip's length, and all randomness comes
from the ``numpy`` generator passed in, so a seed fixes the result.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchaudio.functional as AF

from emotune.data.audio import AUDIO_EXTENSIONS, crop_or_repeat, load_audio
from emotune.errors import DataError
from emotune.names import SAMPLE_RATE

EFFECTS = ("speed", "reverb", "noise")


class AudioBank:
    """The audio files under a folder (searched recursively), decoded lazily and kept in a small cache."""

    def __init__(self, folder: str | Path, what: str, cache_size: int = 64) -> None:
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise DataError(
                f"{what} folder does not exist",
                file=self.folder,
                fix=f"Pass an existing folder, or leave it empty to use generated {what}s.",
            )
        self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
        if not self.files:
            raise DataError(
                f"{what} folder holds no audio files ({', '.join(AUDIO_EXTENSIONS)})",
                file=self.folder,
                fix=f"Point it at a folder of {what} recordings, or leave it empty to use generated ones.",
            )
        self._cache: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        path = self.files[int(rng.integers(len(self.files)))]
        if path not in self._cache:
            self._cache[path] = load_audio(path)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(path)
        return self._cache[path]


def synthetic_rir(rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A room impulse response: a direct path, then exponentially decaying noise with RT60 0.2 to 0.9 s."""
    rt60 = rng.uniform(0.2, 0.9)
    n = int(sample_rate * min(1.0, 1.2 * rt60))
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60)  # -60 dB at t = rt60
    delay = int(rng.integers(int(0.002 * sample_rate), int(0.02 * sample_rate)))
    tail[:delay] = 0.0  # first reflections arrive a few milliseconds after the direct sound
    tail[0] = 1.0 / rng.uniform(0.2, 0.6)  # direct-to-reverberant balance varies from room to room
    return (tail / np.linalg.norm(tail)).astype(np.float32)


def synthetic_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Stationary coloured noise of length ``n``: white, pink or brown, picked at random."""
    exponent = float(rng.choice([0.0, 1.0, 2.0]))
    size = _fast_length(n)
    spectrum = np.fft.rfft(rng.standard_normal(size))
    freqs = np.arange(spectrum.size, dtype=np.float64)
    freqs[0] = 1.0
    noise = np.fft.irfft(spectrum / freqs ** (exponent / 2.0), n=size)[:n]
    return (noise / (np.std(noise) + 1e-12)).astype(np.float32)


def _fast_length(n: int) -> int:
    """The next power of two: FFTs of awkward (e.g. prime-factor) lengths are many times slower."""
    return 1 << max(0, (n - 1).bit_length())


class Augmenter:
    """Applies one randomly chosen effect to a 16 kHz waveform, keeping its length.

    ``rir_dir`` and ``noise_dir`` name folders of impulse responses and noises; left empty, synthetic
    ones are generated per call.
    """

    def __init__(
        self,
        rir_dir: str | Path | None = None,
        noise_dir: str | Path | None = None,
        speeds: Sequence[float] = (0.9, 1.1),
        snr_db: tuple[float, float] = (15.0, 25.0),
        effects: Sequence[str] = EFFECTS,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        unknown = sorted(set(effects) - set(EFFECTS))
        if unknown or not effects:
            raise DataError(
                f"unknown augmentation effects {unknown}" if unknown else "no augmentation effect chosen",
                fix=f"Choose among {', '.join(EFFECTS)}.",
            )
        self.rirs = AudioBank(rir_dir, "impulse response") if rir_dir else None
        self.noises = AudioBank(noise_dir, "noise") if noise_dir else None
        self.speeds = tuple(speeds)
        self.snr_db = snr_db
        self.effects = tuple(effects)
        self.sample_rate = sample_rate

    @classmethod
    def from_settings(cls, augment: dict | None) -> "Augmenter":
        """The augmenter of a ``features.augment`` config section (missing keys take the constructor's defaults)."""
        augment = dict(augment or {})
        given = {key: augment[key] for key in ("rir_dir", "noise_dir") if key in augment}
        given |= {key: tuple(augment[key]) for key in ("snr_db", "speeds") if key in augment}
        return cls(**given)

    def __call__(self, wave: np.ndarray, rng: np.random.Generator, p: float = 1.0) -> np.ndarray:
        """With probability ``p`` return ``wave`` with one random effect applied, else ``wave`` itself."""
        if p <= 0.0 or rng.random() >= p:
            return wave
        effect = self.effects[int(rng.integers(len(self.effects)))]
        return self.apply(effect, wave, rng)

    def apply(self, effect: str, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # torch splits its FFTs and resampling convolutions across threads, and the split changes the last bits
        # of the result: on one thread (as in a Ray cache worker) a copy is the same whichever process makes it
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out = getattr(self, effect)(wave, rng)
        finally:
            torch.set_num_threads(threads)
        return np.ascontiguousarray(out, dtype=np.float32)

    def speed(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        factor = float(rng.choice(self.speeds))
        changed, _ = AF.speed(torch.from_numpy(wave)[None], self.sample_rate, factor)
        # A faster clip is repeated to the original length, a slower one cut: later stages expect the length.
        return crop_or_repeat(changed[0].numpy(), wave.size, rng=None)

    def reverb(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        rir = self.rirs.draw(rng) if self.rirs else synthetic_rir(rng, self.sample_rate)
        rir = rir / (np.linalg.norm(rir) + 1e-12)
        onset = int(np.argmax(np.abs(rir)))  # align on the direct path so speech does not shift in time
        full = wave.size + rir.size - 1
        padded = np.pad(wave, (0, _fast_length(full) - full))  # zeros at the end only lengthen the tail we cut
        wet = AF.fftconvolve(torch.from_numpy(padded), torch.from_numpy(rir.astype(np.float32))).numpy()
        wet = wet[onset : onset + wave.size]
        # keep the loudness of the dry clip: loudness is an emotion cue that reverberation should not change
        return wet * (np.sqrt(np.mean(wave**2)) / (np.sqrt(np.mean(wet**2)) + 1e-12))

    def noise(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noise = crop_or_repeat(self.noises.draw(rng), wave.size, rng) if self.noises else None
        if noise is None or not np.any(noise):  # a silent stretch of a recording has no SNR to set
            noise = synthetic_noise(wave.size, rng)
        snr = rng.uniform(*self.snr_db)
        noisy = AF.add_noise(torch.from_numpy(wave)[None], torch.from_numpy(noise)[None], torch.tensor([snr]))
        return noisy[0].numpy()
