"""The audio pipeline: decode a file to mono float32 at 16 kHz, check it, normalise it, crop or pad it.

Every speech encoder emotune uses expects 16 kHz input; the challenge audio is 44.1 kHz MP3, so loading
always resamples (the winning system fed 44.1 kHz audio to 16 kHz models, a defect not to repeat).
Normalisation uses one global mean and standard deviation computed over whole training files; the
per-file moments gathered while checking the corpus make that a sum, not a second decoding pass.
"""

from __future__ import annotations

import json
import math
import wave as wav_io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torchaudio.functional as AF

from emotune.errors import DataError
from emotune.names import SAMPLE_RATE

AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg")
# Peak amplitude below which a clip counts as silent (-80 dBFS): such a clip carries no speech to learn from.
SILENCE_PEAK = 1e-4


class AudioError(DataError):
    """An audio file that cannot be used; ``file`` is the audio file itself."""


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling with torchaudio; a no-op when the rates agree."""
    if orig_sr == new_sr:
        return wave
    out = AF.resample(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), orig_sr, new_sr)
    return out.numpy()


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """The file's samples (samples x channels, float32) and rate, by soundfile; where soundfile is not installed
    (the GPU check's machines), 16-bit PCM WAV files still decode, by the standard library."""
    try:
        import soundfile as sf
    except ImportError:
        return _decode_pcm16_wav(path)
    return sf.read(str(path), dtype="float32", always_2d=True)


def _decode_pcm16_wav(path: Path) -> tuple[np.ndarray, int]:
    with wav_io.open(str(path), "rb") as reader:
        if reader.getsampwidth() != 2:
            raise ValueError(f"{8 * reader.getsampwidth()}-bit WAV needs soundfile (pip install soundfile)")
        channels, rate = reader.getnchannels(), reader.getframerate()
        frames = reader.readframes(reader.getnframes())
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    return samples.reshape(-1, channels), rate


def write_pcm16_wav(path: str | Path, wave_16k: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write a mono waveform in [-1, 1] as a 16-bit PCM WAV file with the standard library (no soundfile)."""
    pcm = (np.clip(np.asarray(wave_16k, dtype=np.float64), -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wav_io.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(int(sample_rate))
        writer.writeframes(pcm.tobytes())


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read ``path`` as a mono float32 waveform at ``sample_rate``, or raise :class:`AudioError`.

    Channels are averaged. Empty, silent and non-finite audio is refused because any of them would
    silently poison the normalisation statistics or the encoders.
    """
    path = Path(path)
    try:
        data, file_sr = _decode(path)
    except FileNotFoundError:
        raise AudioError("audio file not found", file=path, fix="Check the id and the audio folder.",
                         kind="missing audio") from None
    except (RuntimeError, TypeError, ValueError, EOFError, wav_io.Error) as exc:  # soundfile's errors are RuntimeErrors
        raise AudioError(
            f"cannot be decoded as audio ({exc})",
            file=path,
            fix="Re-encode it (for example `ffmpeg -i in -ar 16000 -ac 1 out.wav`) or remove the row.",
            kind="unreadable audio",
        ) from None
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if wave.size == 0:
        raise AudioError(
            "audio file has no samples", file=path, fix="Replace the file or remove the row.", kind="empty audio"
        )
    if not np.isfinite(wave).all():
        bad = int((~np.isfinite(wave)).sum())
        raise AudioError(
            f"audio contains {bad} non-finite samples (NaN or Inf)",
            file=path,
            fix="Re-export the file from its source or remove the row.",
            kind="non-finite audio",
        )
    peak = float(np.abs(wave).max())
    if peak < SILENCE_PEAK:
        raise AudioError(
            f"audio is silent (peak amplitude {peak:.2e})",
            file=path,
            fix="Replace the file or remove the row.",
            kind="silent audio",
        )
    return np.ascontiguousarray(resample(wave, int(file_sr), sample_rate), dtype=np.float32)


@dataclass(frozen=True)
class AudioInfo:
    """What one decoding pass learns about a clip: its length and the moments for normalisation."""

    n_samples: int
    sum: float
    sum_sq: float

    @property
    def duration(self) -> float:
        return self.n_samples / SAMPLE_RATE

    @classmethod
    def of(cls, wave: np.ndarray) -> "AudioInfo":
        w = wave.astype(np.float64)
        return cls(int(w.size), float(w.sum()), float(np.dot(w, w)))


@dataclass(frozen=True)
class NormStats:
    """Global mean and standard deviation of the training audio, applied unchanged to every split."""

    mean: float
    std: float
    n_samples: int
    n_files: int

    @classmethod
    def from_infos(cls, infos: Iterable[AudioInfo]) -> "NormStats":
        n = total = total_sq = 0.0
        files = 0
        for info in infos:
            n += info.n_samples
            total += info.sum
            total_sq += info.sum_sq
            files += 1
        if n == 0:
            raise DataError("cannot compute normalisation statistics from an empty training split")
        mean = total / n
        var = max(total_sq / n - mean * mean, 0.0)
        return cls(mean=mean, std=math.sqrt(var) if var > 0 else 1.0, n_samples=int(n), n_files=files)

    def apply(self, wave: np.ndarray) -> np.ndarray:
        return ((wave - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "NormStats":
        return cls(**json.loads(Path(path).read_text()))


def crop_or_repeat(x: np.ndarray, length: int, rng: np.random.Generator | None, axis: int = 0) -> np.ndarray:
    """Return exactly ``length`` steps of ``x`` along ``axis``.

    Longer inputs are cropped at a random start drawn from ``rng`` (the start is 0 when ``rng`` is None);
    shorter ones are padded by repeating the clip from its beginning, so padding never adds silence that
    the model could learn as a length cue. Works for waveforms (samples) and feature arrays (frames).
    """
    n = x.shape[axis]
    if n == 0:
        raise ValueError("cannot crop or pad an empty array")
    if n >= length:
        start = int(rng.integers(0, n - length + 1)) if rng is not None else 0
        index = np.arange(start, start + length)
    else:
        index = np.arange(length) % n
    return np.take(x, index, axis=axis)
