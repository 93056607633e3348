"""Where an encoder's files are, on whichever node asks: resolved once by the driver, found again by every node.

The driver turns an encoder name into :class:`EncoderFiles`: a hub id at the exact commit it resolved, or a folder
on shared storage (tiny presets, a model saved with ``save_pretrained``). That small object travels to cache
workers and trials inside the encoder's recipe; each node then finds the files itself (:meth:`EncoderFiles.find`),
in its own Hugging Face cache or in ``paths.models_dir``, a shared folder the driver fills once. No path that
exists only on the driver's machine is handed on.

A download takes only the files loading needs (:func:`hub_load_files`): one PyTorch weights format and the
configuration, tokenizer and vocabulary files, never the TensorFlow, Flax or ONNX copies.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from emotune.errors import EmotuneError
from emotune.features.catalog import EncoderSpec

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


def hub_cache_dir() -> str:
    """This process's Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub), as huggingface_hub uses it."""
    import huggingface_hub.constants

    return str(huggingface_hub.constants.HF_HUB_CACHE)


def cached_hub_folder(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path | None:
    """The cached snapshot of ``repo_id`` (at ``revision``, a commit hash or branch; main by default) in the hub
    cache ``cache_dir`` (this process's own by default), if it holds a config and PyTorch weights; else None.

    Looked up file by file rather than with ``snapshot_download(local_files_only=True)``: recent huggingface_hub
    releases call a snapshot incomplete, and refuse it, when files of the repository's listing are missing, which
    is what a download of only the needed files leaves.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache_dir) if cache_dir else None,
                                        revision=revision or None)
    except ValueError:  # not a valid repository id, so nothing of it can be cached
        return None
    if not isinstance(config, str):  # None, or the marker of a file known not to exist
        return None
    folder = Path(config).parent
    names = [path.name for path in folder.iterdir()]
    if not any(pattern.fullmatch(name) for pattern in _WEIGHT_FORMATS for name in names):
        return None  # a partial snapshot (a config fetched alone): download the rest rather than fail to load it
    return folder


def download_hub_model(repo_id: str, revision: str | None = None) -> Path:
    """Fetch into the Hugging Face cache only the files that loading ``repo_id`` needs (:func:`hub_load_files`)."""
    from huggingface_hub import HfApi, snapshot_download

    wanted = hub_load_files(repo_id, HfApi().list_repo_files(repo_id, revision=revision))
    # without a revision, by branch rather than by the listed commit's hash: only a branch download records
    # refs/main, which the look-up by branch (cached_hub_folder) follows
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=wanted))


def node_name() -> str:
    """How messages name the machine they come from."""
    return socket.gethostname()


@dataclass(frozen=True)
class EncoderFiles:
    """Where any node finds one encoder's files, without a path that only the driver has.

    Either a hub id at the exact commit the driver resolved (found in the node's own Hugging Face cache, then in
    ``models_dir``, the shared folder the driver filled), or a folder that every node must see (tiny presets, a
    model saved with ``save_pretrained``; the search's preflight checks it).
    """

    repo_id: str = ""     # a hub id, e.g. facebook/wav2vec2-xls-r-300m
    revision: str = ""    # the commit the driver resolved ("" in old model cards: the main branch)
    folder: str = ""      # an absolute folder on shared storage, instead of a hub id
    models_dir: str = ""  # paths.models_dir: looked in after the node's own Hugging Face cache

    @property
    def label(self) -> str:
        if self.folder:
            return self.folder
        return f"{self.repo_id}@{self.revision[:12]}" if self.revision else self.repo_id

    def find(self) -> Path | None:
        """The folder of these files on this node, or None; nothing is downloaded."""
        if self.folder:
            folder = Path(self.folder)
            return folder if (folder / "config.json").is_file() else None
        found = cached_hub_folder(self.repo_id, self.revision or None)  # the node's own cache first: local disk
        if found is None and self.models_dir:
            found = cached_hub_folder(self.repo_id, self.revision or None, self.models_dir)
        return found

    def where_looked(self) -> str:
        if self.folder:
            return f"the folder {self.folder}"
        places = f"the Hugging Face cache {hub_cache_dir()}"
        return places + (f" and paths.models_dir {self.models_dir}" if self.models_dir else "")

    def fetch(self, what: str = "the encoder") -> Path:
        """The folder of these files on this node, downloading the files loading needs when the hub allows it."""
        found = self.find()
        if found is not None:
            return found
        reason = "it is not there"
        if self.repo_id and not self.folder:
            if hub_offline():
                reason = "it is not there, and HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set"
            else:
                try:
                    return download_hub_model(self.repo_id, self.revision or None)
                except EmotuneError:
                    raise
                except Exception as exc:  # network refused, unknown repo, no access ...
                    reason = f"it is not there and cannot be downloaded ({str(exc).splitlines()[0][:200]})"
        raise EmotuneError(f"{what} ({self.label}) cannot be found on {node_name()}: {self.where_looked()}; "
                           f"{reason}. {self.fix()}")

    def fix(self) -> str:
        if self.folder:
            return (f"Put {self.folder} on storage every node mounts at the same path, or set paths.models_dir to "
                    "such a folder (tiny presets are built there).")
        return (f"Set paths.models_dir to a folder every node can read (the driver copies its encoders there), or "
                f"fetch the model into this node's Hugging Face cache: `python -c \"from emotune.features.locate "
                f"import download_hub_model; download_hub_model('{self.repo_id}', '{self.revision}')\"`.")


def publish(folder: Path, files: EncoderFiles) -> None:
    """Copy the driver's snapshot ``folder`` of a hub encoder into ``files.models_dir`` once, in the hub cache's
    own layout (models--ORG--NAME/snapshots/COMMIT), so that nodes without it find it there."""
    if not files.models_dir or not files.repo_id or not files.revision:
        return
    repo = Path(files.models_dir) / f"models--{files.repo_id.replace('/', '--')}"
    target = repo / "snapshots" / files.revision
    if cached_hub_folder(files.repo_id, files.revision, files.models_dir) is not None:
        return
    staging = repo / f".incoming-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        for path in folder.iterdir():  # snapshot files are links into the cache's blobs: copy what they point to
            if path.is_file():
                shutil.copy2(path, staging / path.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(target)  # atomic: a node never sees half a snapshot
        except OSError:  # another driver published it first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_files(spec: EncoderSpec, tiny_dir: str | Path, models_dir: str | Path | None = None,
                  texts: Sequence[str] | None = None, download: bool = True) -> tuple[EncoderFiles | None, Path | None]:
    """On the driver: where ``spec``'s files are for every node, and their folder here.

    Tiny presets are built in ``tiny_dir`` first; a hub model is found in this machine's Hugging Face cache or in
    ``models_dir``, or downloaded, and then copied into ``models_dir`` when one is given. Classic features have no
    files: (None, None). With ``download=False`` a hub model that is not here gives (None, None) too.
    """
    if spec.kind == "classic":
        return None, None
    if spec.kind == "tiny":
        from emotune.features.tiny import build_tiny_encoder, tiny_text_hash

        if spec.modality == "text":
            if not texts:
                raise EmotuneError(f"the tiny text encoder '{spec.name}' needs the corpus texts to train its tokenizer")
            folder = Path(tiny_dir) / f"{spec.source}-{tiny_text_hash(texts)[:12]}"
        else:
            folder = Path(tiny_dir) / spec.source
        built = build_tiny_encoder(spec.source, folder, texts=list(texts) if spec.modality == "text" else None)
        return EncoderFiles(folder=str(Path(built).resolve())), Path(built)
    given = Path(spec.source).expanduser()
    if given.is_dir():
        return EncoderFiles(folder=str(given.resolve())), given.resolve()
    shared = str(Path(models_dir).resolve()) if models_dir else ""
    folder = cached_hub_folder(spec.source) or (cached_hub_folder(spec.source, cache_dir=shared) if shared else None)
    if folder is None and download:
        if hub_offline():
            raise EmotuneError(_not_here(spec, "HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set"))
        try:
            folder = download_hub_model(spec.source)
        except EmotuneError:
            raise
        except Exception as exc:  # network refused, unknown repo, no access ...
            raise EmotuneError(_not_here(spec, str(exc).splitlines()[0][:200])) from None
    if folder is None:
        return None, None
    files = EncoderFiles(repo_id=spec.source, revision=folder.name, models_dir=shared)  # snapshots/COMMIT
    if download:  # a plan only looks; the search that follows copies
        publish(folder, files)
    return files, folder


def _not_here(spec: EncoderSpec, reason: str) -> str:
    return (
        f"the {spec.modality} encoder '{spec.name}' ({spec.source}) is not in the local Hugging Face cache with "
        f"its weights and cannot be downloaded ({reason}). On a machine with "
        f"internet, fetch only the files loading needs with `python -c \"from emotune.features.locate import "
        f"download_hub_model; download_hub_model('{spec.source}')\"` "
        f"(or the whole repository with `hf download {spec.source}`, on older huggingface_hub `huggingface-cli "
        f"download {spec.source}`) and copy the cache (~/.cache/huggingface) here, or save the model with "
        f"`save_pretrained` and pass its folder: encoders.{spec.modality}=/path/to/folder. Offline, use a tiny "
        f"preset or fbank/mfcc instead."
    )


def locate_hf_folder(spec: EncoderSpec, download: bool = True) -> Path | None:
    """This machine's folder of a Hugging Face model (a folder given as the source, or the hub cache), downloading
    only when the hub is allowed; with ``download=False`` None when it is not here."""
    return resolve_files(spec, "", None, None, download)[1]
