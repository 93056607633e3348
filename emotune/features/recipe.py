"""What an encoder is, known without loading it: its recipe (shapes, stored layers, cache key, where its files are).

An encoder is resolved once, here (:func:`resolve_recipe`): its name becomes a spec (catalog.py), its files are
found or built (locate.py, tiny.py), and its config.json gives the shapes. The resulting :class:`EncoderRecipe`
is small and picklable, and it is what flows down to the cache, the cache workers on any node, the trials and
the plan; only :func:`emotune.features.encode.open_encoder` turns it into a loaded model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from emotune.errors import EmotuneError
from emotune.features.catalog import EncoderSpec
from emotune.features.locate import EncoderFiles, resolve_files
from emotune.names import SAMPLE_RATE


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

    Small and picklable: the driver resolves it once per encoder and computes cache keys from it; cache workers and
    trials get it and load the encoder themselves (:func:`open_encoder`), each node finding the files on its own
    disks (:class:`~emotune.features.locate.EncoderFiles`), so no worker imports back up into the feature preparation.
    """

    spec: EncoderSpec
    files: EncoderFiles | None  # where any node finds the weights (hub id and commit, or a shared folder);
                                # None: classic
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
                "frame_rate": self.frame_rate, "norm": DEFAULT_NORM[self.spec.kind],
                "folder": self.files.folder or None if self.files else None,
                "revision": self.files.revision or None if self.files else None,
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
                waveform_norm: str = "auto", storage: str = "float16",
                files: EncoderFiles | None = None) -> EncoderRecipe:
    """The recipe of ``spec`` whose files are in ``folder`` here: shapes come from its config.json, not its weights.

    ``files`` says where other nodes find them (:func:`~emotune.features.locate.resolve_files`); by default the
    folder itself.
    """
    layers = layers if layers is not None else ("all" if spec.modality == "speech" else "last")
    norm = resolve_waveform_norm(waveform_norm, spec, folder)
    common = {"spec": spec, "waveform_norm": norm, "storage": check_storage(storage),
              "batch_size": max(1, int(batch_size))}
    if spec.kind == "classic":
        width = 80 if spec.source == "fbank" else 40
        return EncoderRecipe(files=None, identity=f"{spec.source}-v1-w{width}", n_layers=1, width=width,
                             layers=tuple(resolve_layers(layers, 1)), frame_hop=160, **common)
    config = json.loads((Path(folder) / "config.json").read_text())
    files = files or EncoderFiles(folder=str(Path(folder).resolve()))
    n_layers, width = int(config["num_hidden_layers"]), int(config["hidden_size"])
    picked = tuple(resolve_layers(layers, n_layers))
    if spec.modality == "speech":
        kernels, strides = tuple(config["conv_kernel"]), tuple(config["conv_stride"])
        return EncoderRecipe(files=files, identity=folder_identity(Path(folder)), n_layers=n_layers,
                             width=width, layers=picked, frame_hop=int(np.prod(strides)), conv=(kernels, strides),
                             one_at_a_time=config.get("feat_extract_norm", "layer") == "group", **common)
    limit = int(config.get("max_position_embeddings", max_tokens))
    # RoBERTa reserves two positions for the padding offset
    tokens = int(min(max_tokens, limit - 2 if config.get("model_type") in ("roberta", "xlm-roberta") else limit))
    return EncoderRecipe(files=files, identity=f"{folder_identity(Path(folder))}-t{tokens}", n_layers=n_layers,
                         width=width, layers=picked, max_tokens=tokens, **common)


def recipe_settings(features: dict, modality: str) -> dict:
    """:func:`make_recipe`'s settings from a ``features`` config section (text features are always float16)."""
    return {"layers": features[f"{modality}_layers"], "batch_size": int(features["batch_size"]),
            "max_tokens": int(features["max_text_tokens"]), "waveform_norm": str(features["waveform_norm"]),
            "storage": str(features["storage"]) if modality == "speech" else "float16"}


def resolve_recipe(spec: EncoderSpec, tiny_dir: str | Path, models_dir: str | Path | None = None,
                   texts: Sequence[str] | None = None, download: bool = True, **recipe) -> EncoderRecipe | None:
    """The one place an encoder is resolved: its files found (tiny presets built in ``tiny_dir``, hub models found,
    downloaded, and copied into the shared ``models_dir``) and its recipe made, for every node to use.

    ``texts`` are the corpus texts a tiny tokenizer is trained on; ``recipe`` takes :func:`make_recipe`'s settings
    by name. With ``download=False``, None for a hub model that is not on this machine.
    """
    files, folder = resolve_files(spec, tiny_dir, models_dir, texts, download)
    if folder is None and spec.kind != "classic":
        return None
    return make_recipe(spec, folder, files=files, **recipe)
