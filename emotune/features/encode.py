"""Run a frozen encoder: waveforms or texts in, the chosen layers' hidden states out, padding removed.

Only this module runs encoders. Every encoder returns, per input, a float32 array ``(layers, time, width)``
holding just the valid frames or tokens: batches are padded internally with attention masks, and the
padded positions are cut off before anything is returned, so padding never reaches a later step.
Group-norm speech encoders (wav2vec2-base style) change their output when a clip is padded, even with a
mask, so they run one clip at a time.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from emotune.features.catalog import EncoderSpec
from emotune.features.recipe import EncoderRecipe, resolve_recipe
from emotune.names import SAMPLE_RATE

# transformers' WavLM passes torch a padding mask and an attention bias of different types; torch warns on
# every batch. The outputs are right (tests compare padded and unpadded runs); the warning is noise.
warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def zscore(wave: np.ndarray) -> np.ndarray:
    """Per-utterance normalisation as the SSL checkpoints' feature extractors do it: zero mean, unit variance."""
    wave = np.asarray(wave, dtype=np.float32)
    return ((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)).astype(np.float32)


class FrozenEncoder(ABC):
    """A loaded frozen encoder: ``encode`` maps inputs to ``(layers, time, width)`` arrays of the stored layers."""

    def __init__(self, recipe: EncoderRecipe, device: str = "auto") -> None:
        self.recipe = recipe
        self.device = pick_device(device)

    # the recipe's facts, read through the encoder for convenience
    spec = property(lambda self: self.recipe.spec)
    key = property(lambda self: self.recipe.key)
    layers = property(lambda self: list(self.recipe.layers))
    width = property(lambda self: self.recipe.width)
    n_layers = property(lambda self: self.recipe.n_layers)
    modality = property(lambda self: self.recipe.modality)
    frame_rate = property(lambda self: self.recipe.frame_rate)
    batch_size = property(lambda self: self.recipe.batch_size)

    def encode(self, inputs: Sequence) -> list[np.ndarray]:
        """Hidden states for each input (waveforms as float32 arrays at 16 kHz, or strings)."""
        if self.modality == "speech" and self.recipe.waveform_norm == "utterance":
            inputs = [zscore(wave) for wave in inputs]  # each clip on its own, before any padding
        return self._encode(inputs)

    @abstractmethod
    def _encode(self, inputs: Sequence) -> list[np.ndarray]:
        ...


class ClassicSpeechEncoder(FrozenEncoder):
    """80-bin log-mel filterbanks (Kaldi-compatible) or 40 MFCCs, 10 ms hop: one "layer"."""

    def __init__(self, recipe: EncoderRecipe, device: str = "auto") -> None:
        super().__init__(recipe, "cpu")
        if recipe.spec.source == "mfcc":
            import torchaudio.transforms as T

            self._mfcc = T.MFCC(sample_rate=SAMPLE_RATE, n_mfcc=40,
                                melkwargs={"n_fft": 400, "hop_length": 160, "n_mels": 80})

    @torch.inference_mode()
    def _encode(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        from torchaudio.compliance import kaldi

        out = []
        for wave in inputs:
            x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
            if x.numel() < 400:  # shorter than one 25 ms window: repeat so that one frame exists
                x = x.repeat(400 // max(1, x.numel()) + 1)[:400]
            if self.spec.source == "fbank":
                feats = kaldi.fbank(x[None], num_mel_bins=80, sample_frequency=SAMPLE_RATE, dither=0.0)
            else:
                feats = self._mfcc(x[None])[0].T
            out.append(feats.numpy()[None].astype(np.float32))
        return out


class HFSpeechEncoder(FrozenEncoder):
    """A Hugging Face speech model (wav2vec2, WavLM, HuBERT, ...) whose transformer layers we read."""

    def __init__(self, recipe: EncoderRecipe, device: str = "auto") -> None:
        super().__init__(recipe, device)
        from transformers import AutoModel

        folder = recipe.files.fetch(f"the speech encoder '{recipe.spec.name}'")
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()

    @torch.inference_mode()
    def _encode(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))  # similar lengths share a batch
        size = 1 if self.recipe.one_at_a_time else self.batch_size
        results: list[np.ndarray | None] = [None] * len(inputs)
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            lengths = torch.tensor([len(inputs[i]) for i in idx])
            batch = torch.zeros(len(idx), int(lengths.max()))
            for row, i in enumerate(idx):
                batch[row, : lengths[row]] = torch.from_numpy(np.asarray(inputs[i], dtype=np.float32))
            mask = (torch.arange(batch.shape[1])[None] < lengths[:, None]).long()
            kwargs = {} if self.recipe.one_at_a_time else {"attention_mask": mask.to(self.device)}
            hidden = self.model(batch.to(self.device), output_hidden_states=True, **kwargs).hidden_states
            stacked = torch.stack([hidden[1 + layer] for layer in self.layers], dim=1).float().cpu()  # B,L,T,D
            for row, i in enumerate(idx):
                results[i] = stacked[row, :, : self.recipe.steps(int(lengths[row]))].numpy()
        return results


class HFTextEncoder(FrozenEncoder):
    """A Hugging Face text model (RoBERTa, BERT, BETO, ...) and its tokenizer."""

    def __init__(self, recipe: EncoderRecipe, device: str = "auto") -> None:
        super().__init__(recipe, device)
        from transformers import AutoModel, AutoTokenizer

        folder = recipe.files.fetch(f"the text encoder '{recipe.spec.name}'")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()

    @torch.inference_mode()
    def _encode(self, inputs: Sequence[str]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(inputs)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            tokens = self.tokenizer([inputs[i] for i in idx], padding=True, truncation=True,
                                    max_length=self.recipe.max_tokens, return_tensors="pt")
            tokens = {k: v.to(self.device) for k, v in tokens.items()
                      if k in ("input_ids", "attention_mask", "token_type_ids")}
            hidden = self.model(**tokens, output_hidden_states=True).hidden_states
            stacked = torch.stack([hidden[1 + layer] for layer in self.layers], dim=1).float().cpu()
            lengths = tokens["attention_mask"].sum(dim=1).cpu()
            for row, i in enumerate(idx):
                results[i] = stacked[row, :, : int(lengths[row])].numpy()
        return results


def open_encoder(recipe: EncoderRecipe, device: str = "auto") -> FrozenEncoder:
    """Load the encoder a recipe describes onto ``device`` (the only place weights are loaded)."""
    if recipe.spec.kind == "classic":
        return ClassicSpeechEncoder(recipe, device)
    if recipe.modality == "speech":
        return HFSpeechEncoder(recipe, device)
    return HFTextEncoder(recipe, device)


def load_encoder(spec: EncoderSpec, models_dir: str | Path, texts: Sequence[str] | None = None, device: str = "auto",
                 **recipe) -> FrozenEncoder:
    """Resolve and load (building first, for tiny presets) the encoder ``spec`` describes (tests and notebooks).

    ``models_dir`` holds built tiny presets; ``recipe``: see :func:`resolve_recipe`.
    """
    return open_encoder(resolve_recipe(spec, models_dir, None, texts, **recipe), device)
