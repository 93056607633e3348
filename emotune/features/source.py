"""Batches of encoder features for the model, from the shared cache or (``cache=false``) encoded live.

Both sources return the same batch: per modality a ``(batch, layers, time, width)`` tensor and a
``(batch, time)`` mask that is True on real frames and tokens, plus class indices when labels are known.
For training, speech is cropped to ``crop_seconds`` at a random start (clips that are shorter are repeated),
and augmentation is drawn with probability ``aug_prob``; evaluation always sees whole, clean clips.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from emotune.data.audio import NormStats, crop_or_repeat, load_audio
from emotune.data.augment import Augmenter
from emotune.data.corpus import Utterance
from emotune.features.cache import FeatureIndex, FeatureStore
from emotune.features.encode import FrozenEncoder
from emotune.names import MODALITIES, SAMPLE_RATE


def pad_batch(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(layers, time, width)`` arrays into a zero-padded tensor and its time mask.

    Float16 features (the cache's) stay float16 here: the model widens the whole batch in one operation,
    which is much cheaper than widening clip by clip.
    """
    longest = max(a.shape[1] for a in arrays)
    layers, width = arrays[0].shape[0], arrays[0].shape[2]
    half = all(a.dtype == np.float16 for a in arrays)
    dtype = np.float16 if half else np.float32
    out = torch.zeros(len(arrays), layers, longest, width, dtype=torch.float16 if half else torch.float32)
    mask = torch.zeros(len(arrays), longest, dtype=torch.bool)
    for i, a in enumerate(arrays):
        out[i, :, : a.shape[1]] = torch.from_numpy(np.asarray(a, dtype=dtype))
        mask[i, : a.shape[1]] = True
    return out, mask


def label_tensor(utterances: Sequence[Utterance], labels: Sequence[str]) -> torch.Tensor | None:
    if any(u.label is None for u in utterances):
        return None
    index = {label: i for i, label in enumerate(labels)}
    return torch.tensor([index[u.label] for u in utterances], dtype=torch.long)


class CachedFeatures:
    """Reads batches from the feature cache; small caches are loaded into memory once.

    "Small" is what the loaded arrays take in memory (``held_bytes``), at most ``preload_mb``: reads unpack int8
    to float16, so an int8 cache takes about twice its size on disk.
    """

    def __init__(self, index: FeatureIndex, modalities: Sequence[str], labels: Sequence[str], aug_prob: float = 0.0,
                 crop_seconds: float = 5.5, preload_mb: float = 4096) -> None:
        self.index = index
        self.modalities = tuple(modalities)
        self.labels = tuple(labels)
        self.aug_prob = float(aug_prob)
        self.store = FeatureStore(index.cache_dir)
        speech = index.encoders.get("speech")
        self.crop_frames = max(1, int(round(crop_seconds * speech["frame_rate"]))) if speech else 0
        self.memory: dict[str, np.ndarray] = {}
        keys = self._keys()
        self.held_bytes = sum(self.store.held_bytes(k) for k in keys)  # once loaded; reads only the files' headers
        if self.held_bytes <= preload_mb * 1e6:
            self.memory = {k: self.store.read(k) for k in keys}

    def _keys(self) -> list[str]:
        keys: list[str] = []
        if "speech" in self.modalities:
            keys += [k for row in self.index.speech.values() for k in row]
        if "text" in self.modalities:
            keys += list(self.index.text.values())
        return sorted(set(keys))

    def _speech(self, utt: Utterance, train: bool, rng: np.random.Generator) -> np.ndarray:
        keys = self.index.speech[utt.id]
        key = keys[0]
        if train and len(keys) > 1 and rng.random() < self.aug_prob:
            key = keys[1 + int(rng.integers(len(keys) - 1))]
        if not train:
            return self.memory[key] if key in self.memory else self.store.read(key)
        if key in self.memory:
            return crop_or_repeat(self.memory[key], self.crop_frames, rng, axis=1)
        n = self.store.frames(key)
        if n > self.crop_frames:  # read only the crop from disk
            start = int(rng.integers(0, n - self.crop_frames + 1))
            return self.store.read(key, slice(start, start + self.crop_frames))
        return crop_or_repeat(self.store.read(key), self.crop_frames, rng, axis=1)

    def _text(self, utt: Utterance) -> np.ndarray:
        key = self.index.text[utt.id]
        return self.memory[key] if key in self.memory else self.store.read(key)

    def batch(self, utterances: Sequence[Utterance], train: bool, rng: np.random.Generator) -> dict:
        out: dict = {}
        if "speech" in self.modalities:
            out["speech"], out["speech_mask"] = pad_batch([self._speech(u, train, rng) for u in utterances])
        if "text" in self.modalities:
            out["text"], out["text_mask"] = pad_batch([self._text(u) for u in utterances])
        out["labels"] = label_tensor(utterances, self.labels)
        return out


class LiveFeatures:
    """Runs the encoders on every batch, as the winning code did: augmentation streams, crops are on samples."""

    def __init__(self, encoders: dict[str, FrozenEncoder], labels: Sequence[str], norm: NormStats,
                 augmenter: Augmenter | None, aug_prob: float = 0.0, crop_seconds: float = 5.5) -> None:
        self.encoders = encoders
        self.modalities = tuple(m for m in MODALITIES if m in encoders)
        self.labels = tuple(labels)
        self.norm = norm
        self.augmenter = augmenter
        self.aug_prob = float(aug_prob)
        self.crop_samples = int(round(crop_seconds * SAMPLE_RATE))
        self._waves: dict[str, np.ndarray] = {}  # decoded once; the encoder is what this mode re-runs

    def _wave(self, utt: Utterance) -> np.ndarray:
        if utt.id not in self._waves:
            self._waves[utt.id] = self.norm.apply(load_audio(utt.audio))
        return self._waves[utt.id]

    def batch(self, utterances: Sequence[Utterance], train: bool, rng: np.random.Generator) -> dict:
        out: dict = {}
        if "speech" in self.modalities:
            waves = []
            for u in utterances:
                wave = self._wave(u)
                if train:
                    if self.augmenter is not None:
                        wave = self.augmenter(wave, rng, p=self.aug_prob)
                    wave = crop_or_repeat(wave, self.crop_samples, rng)
                waves.append(wave)
            out["speech"], out["speech_mask"] = pad_batch(self.encoders["speech"].encode(waves))
        if "text" in self.modalities:
            out["text"], out["text_mask"] = pad_batch(self.encoders["text"].encode([u.text for u in utterances]))
        out["labels"] = label_tensor(utterances, self.labels)
        return out
