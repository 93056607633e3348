"""Run a frozen encoder: waveforms or texts in, the chosen layers' hidden states out, padding removed.

Only this module runs encoders. Every encoder returns, per input, a float32 array ``(layers, time, width)``
holding just the valid frames or tokens: batches are padded internally with attention masks, and the
padded positions are cut off before anything is returned, so padding never reaches a later step.
Group-norm speech encoders (wav2vec2-base style) change their output when a clip is padded, even with a
mask, so they run one clip at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from emotune.errors import EmotuneError
from emotune.features.catalog import EncoderSpec
from emotune.names import SAMPLE_RATE

# transformers' WavLM passes torch a padding mask and an attention bias of different types; torch warns on
# every batch. The outputs are right (tests compare padded and unpadded runs); the warning is noise.
warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_layers(choice, n_layers: int) -> list[int]:
    """Layer indices, sorted, from ``all``, ``last``, ``every_K`` or a list (negative indices count from the end).

    ``every_K`` keeps every K-th layer counted back from the last one (``every_3`` of 24 layers: 2, 5, ..., 23),
    so the top layer is always kept and the rest of the depth is sampled evenly.
    """
    if choice == "all":
        return list(range(n_layers))
    if choice == "last":
        return [n_layers - 1]
    if isinstance(choice, str) and choice.startswith("every_") and choice[6:].isdigit() and int(choice[6:]) > 0:
        return list(range(n_layers - 1, -1, -int(choice[6:])))[::-1]
    try:
        picked = sorted({int(i) % n_layers if -n_layers <= int(i) < n_layers else None for i in choice})
    except (TypeError, ValueError):
        picked = [None]
    if None in picked or not picked:
        raise EmotuneError(
            f"layers must be 'all', 'last', 'every_K' (every K-th layer, ending with the last) or a list of "
            f"indices between {-n_layers} and {n_layers - 1}, got {choice!r}"
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


WAVEFORM_NORMS = ("auto", "utterance", "global")
STORAGES = ("float16", "int8")


def conv_frames(n_samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Output frames of a strided convolution stack (no padding) for ``n_samples`` inputs, at least 1."""
    n = int(n_samples)
    for kernel, stride in zip(kernels, strides):
        n = (n - kernel) // stride + 1
    return max(1, n)


@dataclass(frozen=True)
class EncoderRecipe:
    """What an encoder is and how its cached outputs are named, known without loading any weights.

    Small and picklable: the driver computes cache keys from it, and a Ray worker gets it and loads the
    encoder itself (:func:`open_encoder`), so no worker imports back up into the feature preparation.
    """

    spec: EncoderSpec
    folder: str | None          # the Hugging Face folder (None for classic features)
    identity: str               # changes whenever the outputs could change (content hash of the folder)
    n_layers: int               # hidden-state layers available to choose from
    width: int
    layers: tuple[int, ...]     # the stored layers
    frame_hop: int = 0          # input samples per output frame (speech only)
    conv: tuple = ()            # (kernels, strides) of an SSL front-end, for exact frame counts
    waveform_norm: str = "global"  # "utterance": each input z-normalised before padding; "global": as given
    storage: str = "float16"    # how the cache stores the outputs: float16 or int8 with per-frame scales
    max_tokens: int = 0         # text: longer transcripts are truncated
    batch_size: int = 8
    one_at_a_time: bool = False  # group-norm front-ends change their output when a clip is padded

    @property
    def modality(self) -> str:
        return self.spec.modality

    @property
    def frame_rate(self) -> float:
        return SAMPLE_RATE / self.frame_hop if self.frame_hop else 0.0

    @property
    def key(self) -> str:
        """What a cached array of this encoder depends on: identity, stored layers, input and storage modes.

        The modes added in later versions only appear when they differ from the original behaviour, so
        caches built before them keep their keys.
        """
        key = f"{self.identity}-L{'.'.join(map(str, self.layers))}"
        if self.waveform_norm == "utterance":
            key += "-zu"
        if self.storage == "int8":
            key += "-q8"
        return key

    def steps(self, item: int | str) -> int:
        """Output time steps for a clip of ``item`` samples (exact), or for the text ``item`` (estimated)."""
        if self.modality == "speech":
            if self.conv:
                return conv_frames(int(item), *self.conv)
            if self.spec.kind == "classic":  # Kaldi framing: 25 ms windows every 10 ms, edges snipped
                return max(1, (int(item) - 400) // 160 + 1) if self.spec.source == "fbank" else 1 + int(item) // 160
            return max(1, int(item) // self.frame_hop)
        return min(self.max_tokens, 2 + len(str(item)) // 3)

    def describe(self) -> dict:
        """The encoder as trials and model cards record it (``predict`` rebuilds it from this)."""
        return {"name": self.spec.name, "kind": self.spec.kind, "source": self.spec.source, "key": self.key,
                "layers": len(self.layers), "layer_indices": list(self.layers), "width": self.width,
                "frame_rate": self.frame_rate, "norm": DEFAULT_NORM[self.spec.kind], "folder": self.folder,
                "waveform_norm": self.waveform_norm, "storage": self.storage, "max_tokens": self.max_tokens}


# How each kind of encoder output is normalised in the model by default: SSL layers get a LayerNorm (as the
# winners did); hand-crafted features get a global per-dimension standardisation, because a LayerNorm per
# frame would erase their loudness information.
DEFAULT_NORM = {"classic": "global", "tiny": "layer", "hf": "layer"}


def resolve_waveform_norm(setting: str, spec: EncoderSpec, folder: Path | None) -> str:
    """``features.waveform_norm`` for one encoder: ``auto`` follows how the encoder was pre-trained."""
    from emotune.features.catalog import pretrained_with_utterance_norm

    if setting not in WAVEFORM_NORMS:
        raise EmotuneError(f"features.waveform_norm must be one of {', '.join(WAVEFORM_NORMS)}, got {setting!r}")
    if spec.modality != "speech":
        return "global"
    if setting == "auto":
        return "utterance" if pretrained_with_utterance_norm(spec, folder) else "global"
    return setting


def check_storage(storage: str) -> str:
    if storage not in STORAGES:
        raise EmotuneError(f"features.storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    return storage


def make_recipe(spec: EncoderSpec, folder: Path | None, layers=None, batch_size: int = 8, max_tokens: int = 256,
                waveform_norm: str = "auto", storage: str = "float16") -> EncoderRecipe:
    """The recipe of ``spec`` whose files are in ``folder``: shapes come from its config.json, not its weights."""
    layers = layers if layers is not None else ("all" if spec.modality == "speech" else "last")
    norm = resolve_waveform_norm(waveform_norm, spec, folder)
    common = {"spec": spec, "waveform_norm": norm, "storage": check_storage(storage), "batch_size": max(1, int(batch_size))}
    if spec.kind == "classic":
        width = 80 if spec.source == "fbank" else 40
        return EncoderRecipe(folder=None, identity=f"{spec.source}-v1-w{width}", n_layers=1, width=width,
                             layers=tuple(resolve_layers(layers, 1)), frame_hop=160, **common)
    config = json.loads((Path(folder) / "config.json").read_text())
    n_layers, width = int(config["num_hidden_layers"]), int(config["hidden_size"])
    picked = tuple(resolve_layers(layers, n_layers))
    if spec.modality == "speech":
        kernels, strides = tuple(config["conv_kernel"]), tuple(config["conv_stride"])
        return EncoderRecipe(folder=str(folder), identity=folder_identity(Path(folder)), n_layers=n_layers,
                             width=width, layers=picked, frame_hop=int(np.prod(strides)), conv=(kernels, strides),
                             one_at_a_time=config.get("feat_extract_norm", "layer") == "group", **common)
    limit = int(config.get("max_position_embeddings", max_tokens))
    # RoBERTa reserves two positions for the padding offset
    tokens = int(min(max_tokens, limit - 2 if config.get("model_type") in ("roberta", "xlm-roberta") else limit))
    return EncoderRecipe(folder=str(folder), identity=f"{folder_identity(Path(folder))}-t{tokens}", n_layers=n_layers,
                         width=width, layers=picked, max_tokens=tokens, **common)


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
    folder = property(lambda self: Path(self.recipe.folder) if self.recipe.folder else None)

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

        self.model = AutoModel.from_pretrained(recipe.folder, local_files_only=True).to(self.device).eval()

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

        self.tokenizer = AutoTokenizer.from_pretrained(recipe.folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(recipe.folder, local_files_only=True).to(self.device).eval()

    @torch.inference_mode()
    def _encode(self, inputs: Sequence[str]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(inputs)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            tokens = self.tokenizer([inputs[i] for i in idx], padding=True, truncation=True,
                                    max_length=self.recipe.max_tokens, return_tensors="pt")
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
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


# What loading a hub checkpoint reads besides its weights: config, feature-extractor and tokenizer settings (json),
# vocabularies and BPE merges (txt) and sentencepiece models (.model). Only top-level files: subfolders hold
# exports (onnx/, coreml/, openvino/) that from_pretrained never opens. Weight indexes are left to the weights.
_SUPPORT_FILE = re.compile(r"[^/]+\.(json|txt|model)")
# PyTorch weights in transformers' order of preference, each a single file or an index with numbered shards. The
# names are exact so that training leftovers (training_args.bin, optimizer.pt) and variants (model.fp16.safetensors)
# stay on the hub.
_WEIGHT_FORMATS = (
    re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"),
    re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json"),
)


def hub_load_files(repo_id: str, repo_files: Iterable[str]) -> list[str]:
    """The files of hub repository ``repo_id`` that loading it needs, chosen from its file listing.

    One weights format only: safetensors when the repository has them, else pytorch_model.bin. Repositories
    often hold the same weights three to five times over (TensorFlow, Flax, ONNX, Rust, both PyTorch formats),
    and fetching them all costs gigabytes. A repository with no PyTorch weights is refused before anything is
    downloaded.
    """
    top = sorted({name for name in repo_files if "/" not in name})
    for pattern in _WEIGHT_FORMATS:
        weights = [name for name in top if pattern.fullmatch(name)]
        if weights:
            break
    else:
        raise EmotuneError(
            f"the hub repository {repo_id} has no PyTorch weights (model.safetensors or pytorch_model.bin) at its top "
            f"level; its files: {', '.join(top) or 'none'}. emotune loads PyTorch weights only: save the model from "
            "PyTorch with transformers' save_pretrained and pass that folder (encoders.speech=/path/to/folder or "
            "encoders.text=/path/to/folder), or choose another checkpoint."
        )
    support = [name for name in top if _SUPPORT_FILE.fullmatch(name) and not name.endswith(".index.json")]
    return sorted({*weights, *support})


def hub_offline() -> bool:
    """Whether the hub is switched off, as huggingface_hub decides it, but read now: huggingface_hub reads the
    variables once, at import, so a setting made later (a test, a notebook) would otherwise be missed."""
    import huggingface_hub.constants

    setting = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return setting.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def cached_hub_folder(repo_id: str) -> Path | None:
    """The cached snapshot of ``repo_id``'s main branch if it holds a config and PyTorch weights, else None.

    Looked up file by file rather than with ``snapshot_download(local_files_only=True)``: recent huggingface_hub
    releases call a snapshot incomplete, and refuse it, when files of the repository's listing are missing, which
    is what a download of only the needed files leaves.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repository id, so nothing of it can be cached
        return None
    if not isinstance(config, str):  # None, or the marker of a file known not to exist
        return None
    folder = Path(config).parent
    names = [path.name for path in folder.iterdir()]
    if not any(pattern.fullmatch(name) for pattern in _WEIGHT_FORMATS for name in names):
        return None  # a partial snapshot (a config fetched alone): download the rest rather than fail to load it
    return folder


def download_hub_model(repo_id: str) -> Path:
    """Fetch into the Hugging Face cache only the files that loading ``repo_id`` needs (:func:`hub_load_files`)."""
    from huggingface_hub import HfApi, snapshot_download

    wanted = hub_load_files(repo_id, HfApi().list_repo_files(repo_id))
    # by branch, not by the listed commit's hash: only a branch download records refs/main, which the offline
    # look-up (cached_hub_folder) follows
    return Path(snapshot_download(repo_id, allow_patterns=wanted))


def locate_hf_folder(spec: EncoderSpec, download: bool = True) -> Path | None:
    """The local folder of a hub model: the Hugging Face cache, downloading only when the hub is allowed.

    With ``download=False`` nothing is fetched: the folder is returned if it is already here, else None.
    A download takes only the files loading needs (:func:`download_hub_model`).
    """
    folder = Path(spec.source).expanduser()
    if folder.is_dir():
        return folder.resolve()
    cached = cached_hub_folder(spec.source)
    if cached is not None or not download:
        return cached
    if hub_offline():
        reason = "HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set"
    else:
        try:
            return download_hub_model(spec.source)
        except EmotuneError:
            raise
        except Exception as exc:  # network refused, unknown repo, no access ...
            reason = str(exc).splitlines()[0][:200]
    raise EmotuneError(
        f"the {spec.modality} encoder '{spec.name}' ({spec.source}) is not in the local Hugging Face cache with "
        f"its weights and cannot be downloaded ({reason}). On a machine with internet, fetch only the files "
        f"loading needs with `python -c \"from emotune.features.encode import download_hub_model; "
        f"download_hub_model('{spec.source}')\"` "
        f"(or the whole repository with `hf download {spec.source}`, on older huggingface_hub `huggingface-cli "
        f"download {spec.source}`) and copy the cache (~/.cache/huggingface) here, or save the model with "
        f"`save_pretrained` and pass its folder: encoders.{spec.modality}=/path/to/folder. Offline, use a tiny "
        f"preset or fbank/mfcc instead."
    )


def encoder_folder(spec: EncoderSpec, models_dir: str | Path, texts: Sequence[str] | None = None,
                   download: bool = True) -> Path | None:
    """Where ``spec``'s files are: built first for tiny presets, found (or downloaded) for hub models.

    None for classic features, and for a hub model that is not here when ``download`` is False.
    """
    if spec.kind == "classic":
        return None
    if spec.kind == "tiny":
        from emotune.features.tiny import build_tiny_encoder, tiny_text_hash

        if spec.modality == "text":
            if not texts:
                raise EmotuneError(f"the tiny text encoder '{spec.name}' needs the corpus texts to train its tokenizer")
            folder = Path(models_dir) / f"{spec.source}-{tiny_text_hash(texts)[:12]}"
        else:
            folder = Path(models_dir) / spec.source
        return build_tiny_encoder(spec.source, folder, texts=list(texts) if spec.modality == "text" else None)
    return locate_hf_folder(spec, download)


def recipe_settings(features: dict, modality: str) -> dict:
    """:func:`make_recipe`'s settings from a ``features`` config section (text features are always float16)."""
    return {"layers": features[f"{modality}_layers"], "batch_size": int(features["batch_size"]),
            "max_tokens": int(features["max_text_tokens"]), "waveform_norm": str(features["waveform_norm"]),
            "storage": str(features["storage"]) if modality == "speech" else "float16"}


def load_encoder(spec: EncoderSpec, models_dir: str | Path, texts: Sequence[str] | None = None, device: str = "auto",
                 **recipe) -> FrozenEncoder:
    """Load (building first, for tiny presets) the encoder ``spec`` describes.

    ``models_dir`` holds built tiny presets; ``texts`` are the corpus texts a tiny tokenizer is trained on.
    ``recipe`` takes :func:`make_recipe`'s settings by name (``layers`` defaults to all transformer layers for
    speech and the last layer for text).
    """
    return open_encoder(make_recipe(spec, encoder_folder(spec, models_dir, texts), **recipe), device)
