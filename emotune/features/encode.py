"""Run a frozen encoder: waveforms or texts in, the chosen layers' hidden states out, padding removed.

Only this module runs encoders. Every encoder returns, per input, a float32 array ``(layers, time, width)``
holding just the valid frames or tokens: batches are padded internally with attention masks, and the
padded positions are cut off before anything is returned, so padding never reaches a later step.
Group-norm speech encoders (wav2vec2-base style) change their output when a clip is padded, even with a
mask, so they run one clip at a time.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from emotune.errors import EmotuneError
from emotune.features.catalog import EncoderSpec

SAMPLE_RATE = 16_000
# transformers' WavLM passes torch a padding mask and an attention bias of different types; torch warns on
# every batch. The outputs are right (tests compare padded and unpadded runs); the warning is noise.
warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_layers(choice, n_layers: int) -> list[int]:
    """``all``, ``last`` or a list of layer indices (negative ones count from the end) to sorted indices."""
    if choice == "all":
        return list(range(n_layers))
    if choice == "last":
        return [n_layers - 1]
    try:
        picked = sorted({int(i) % n_layers if -n_layers <= int(i) < n_layers else None for i in choice})
    except TypeError:
        picked = [None]
    if None in picked or not picked:
        raise EmotuneError(
            f"layers must be 'all', 'last' or a list of indices between {-n_layers} and {n_layers - 1}, got {choice!r}"
        )
    return picked


def folder_identity(folder: Path) -> str:
    """A content hash of an encoder folder (weights, config, tokenizer): the cache key of its outputs.

    Files over 64 MB are hashed by size and three 4 MB samples, which is enough to tell checkpoints apart
    while keeping a 1 GB model's key cheap to compute.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        with path.open("rb") as f:
            if size <= 64 << 20:
                digest.update(f.read())
            else:
                for offset in (0, size // 2, size - (4 << 20)):
                    f.seek(offset)
                    digest.update(f.read(4 << 20))
    return digest.hexdigest()[:24]


class FrozenEncoder(ABC):
    """A frozen encoder: ``encode`` maps inputs to ``(layers, time, width)`` arrays of the chosen layers."""

    spec: EncoderSpec
    identity: str  # changes whenever the outputs could change
    n_layers: int  # hidden-state layers available to choose from
    width: int
    frame_hop: int = 0  # input samples per output frame (speech only)
    folder: Path | None = None  # the Hugging Face folder it was loaded from (None for classic features)

    def __init__(self, spec: EncoderSpec, layers="all", batch_size: int = 8, device: str = "auto") -> None:
        self.spec = spec
        self.batch_size = max(1, int(batch_size))
        self.device = pick_device(device)
        self._layer_choice = layers

    @property
    def layers(self) -> list[int]:
        return resolve_layers(self._layer_choice, self.n_layers)

    @property
    def modality(self) -> str:
        return self.spec.modality

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / self.frame_hop if self.frame_hop else 0.0

    @property
    def key(self) -> str:
        """Identity plus layer choice: what a cached array of this encoder depends on."""
        return f"{self.identity}-L{'.'.join(map(str, self.layers))}"

    @abstractmethod
    def encode(self, inputs: Sequence) -> list[np.ndarray]:
        """Hidden states for each input (waveforms as float32 arrays at 16 kHz, or strings)."""

    def estimate_steps(self, item: int | str) -> int:
        """Expected time steps for a clip of ``item`` samples or for the text ``item`` (disk estimates)."""
        if self.modality == "speech":
            return max(1, int(item) // self.frame_hop)
        return min(self.max_tokens, 2 + len(str(item)) // 3)


class ClassicSpeechEncoder(FrozenEncoder):
    """80-bin log-mel filterbanks (Kaldi-compatible) or 40 MFCCs, 10 ms hop: one "layer"."""

    n_layers = 1
    frame_hop = 160

    def __init__(self, spec: EncoderSpec, layers="all", batch_size: int = 8, device: str = "auto") -> None:
        super().__init__(spec, layers, batch_size, "cpu")
        self.width = 80 if spec.source == "fbank" else 40
        self.identity = f"{spec.source}-v1-w{self.width}"
        if spec.source == "mfcc":
            import torchaudio.transforms as T

            self._mfcc = T.MFCC(sample_rate=SAMPLE_RATE, n_mfcc=40,
                                melkwargs={"n_fft": 400, "hop_length": 160, "n_mels": 80})

    @torch.inference_mode()
    def encode(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
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

    def __init__(self, spec: EncoderSpec, folder: Path, layers="all", batch_size: int = 8, device: str = "auto"):
        super().__init__(spec, layers, batch_size, device)
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        config = self.model.config
        self.n_layers = int(config.num_hidden_layers)
        self.width = int(config.hidden_size)
        self.frame_hop = int(np.prod(config.conv_stride))
        # Padding changes group-norm front-ends' outputs even with a mask (NOTES: up to about 1.0).
        self.one_at_a_time = getattr(config, "feat_extract_norm", "layer") == "group"
        self.identity = folder_identity(folder)
        self.folder = Path(folder)

    @torch.inference_mode()
    def encode(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))  # similar lengths share a batch
        size = 1 if self.one_at_a_time else self.batch_size
        results: list[np.ndarray | None] = [None] * len(inputs)
        for start in range(0, len(order), size):
            idx = order[start : start + size]
            lengths = torch.tensor([len(inputs[i]) for i in idx])
            batch = torch.zeros(len(idx), int(lengths.max()))
            for row, i in enumerate(idx):
                batch[row, : lengths[row]] = torch.from_numpy(np.asarray(inputs[i], dtype=np.float32))
            mask = (torch.arange(batch.shape[1])[None] < lengths[:, None]).long()
            kwargs = {} if self.one_at_a_time else {"attention_mask": mask.to(self.device)}
            hidden = self.model(batch.to(self.device), output_hidden_states=True, **kwargs).hidden_states
            stacked = torch.stack([hidden[1 + layer] for layer in self.layers], dim=1).float().cpu()  # B,L,T,D
            frames = self.model._get_feat_extract_output_lengths(lengths)
            for row, i in enumerate(idx):
                results[i] = stacked[row, :, : max(1, int(frames[row]))].numpy()
        return results


class HFTextEncoder(FrozenEncoder):
    """A Hugging Face text model (RoBERTa, BERT, BETO, ...) and its tokenizer."""

    def __init__(self, spec: EncoderSpec, folder: Path, layers="last", batch_size: int = 8, device: str = "auto",
                 max_tokens: int = 256):
        super().__init__(spec, layers, batch_size, device)
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        config = self.model.config
        self.n_layers = int(config.num_hidden_layers)
        self.width = int(config.hidden_size)
        limit = getattr(config, "max_position_embeddings", max_tokens)
        # RoBERTa reserves two positions for the padding offset
        self.max_tokens = int(min(max_tokens, limit - 2 if config.model_type in ("roberta", "xlm-roberta") else limit))
        self.identity = f"{folder_identity(folder)}-t{self.max_tokens}"
        self.folder = Path(folder)

    @torch.inference_mode()
    def encode(self, inputs: Sequence[str]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(inputs)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            tokens = self.tokenizer([inputs[i] for i in idx], padding=True, truncation=True,
                                    max_length=self.max_tokens, return_tensors="pt")
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            hidden = self.model(**tokens, output_hidden_states=True).hidden_states
            stacked = torch.stack([hidden[1 + layer] for layer in self.layers], dim=1).float().cpu()
            lengths = tokens["attention_mask"].sum(dim=1).cpu()
            for row, i in enumerate(idx):
                results[i] = stacked[row, :, : int(lengths[row])].numpy()
        return results


def locate_hf_folder(spec: EncoderSpec) -> Path:
    """The local folder of a hub model: the Hugging Face cache, downloading only when the hub is allowed."""
    folder = Path(spec.source).expanduser()
    if folder.is_dir():
        return folder.resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.source, local_files_only=True))
    except Exception:  # not cached: fall through to a download if allowed
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            return Path(snapshot_download(spec.source))
        except Exception as exc:  # network refused, unknown repo, no access ...
            reason = str(exc).splitlines()[0][:200]
    raise EmotuneError(
        f"the {spec.modality} encoder '{spec.name}' ({spec.source}) is not in the local Hugging Face cache and "
        f"cannot be downloaded ({reason}). On a machine with internet run `huggingface-cli download {spec.source}` "
        f"and copy the cache (~/.cache/huggingface) here, or save the model with `save_pretrained` and pass its "
        f"folder: encoders.{spec.modality}=/path/to/folder. Offline, use a tiny preset or fbank/mfcc instead."
    )


def load_encoder(spec: EncoderSpec, models_dir: str | Path, texts: Sequence[str] | None = None, layers=None,
                 batch_size: int = 8, device: str = "auto", max_tokens: int = 256) -> FrozenEncoder:
    """Load (building first, for tiny presets) the encoder ``spec`` describes.

    ``models_dir`` holds built tiny presets; ``texts`` are the corpus texts a tiny tokenizer is trained on.
    ``layers`` defaults to all transformer layers for speech and the last layer for text.
    """
    layers = layers if layers is not None else ("all" if spec.modality == "speech" else "last")
    if spec.kind == "classic":
        return ClassicSpeechEncoder(spec, layers, batch_size, device)
    if spec.kind == "tiny":
        from emotune.features.tiny import build_tiny_encoder, tiny_text_hash

        if spec.modality == "text":
            if not texts:
                raise EmotuneError(f"the tiny text encoder '{spec.name}' needs the corpus texts to train its tokenizer")
            folder = Path(models_dir) / f"{spec.source}-{tiny_text_hash(texts)[:12]}"
        else:
            folder = Path(models_dir) / spec.source
        folder = build_tiny_encoder(spec.source, folder, texts=list(texts) if spec.modality == "text" else None)
    else:
        folder = locate_hf_folder(spec)
    if spec.modality == "speech":
        return HFSpeechEncoder(spec, Path(folder), layers, batch_size, device)
    return HFTextEncoder(spec, Path(folder), layers, batch_size, device, max_tokens)
