"""The feature cache shared by all trials and searches: content-addressed encoder outputs on disk.

Encoders are frozen, so their outputs depend only on the encoder, its layer choice, its input normalisation
and the input. Each array is stored once, in float16 or (``features.storage=int8``) as int8 with one scale
per layer and frame, as ``<root>/<key[:2]>/<key>.safetensors``, where the key hashes exactly those things:
for speech the encoder key, the audio file's bytes, the normalisation statistics and the augmentation
variant; for text the encoder key and the transcript. A trial, another search, or a rerun
after a crash finds the same keys and never runs the encoder again. Each file carries a CRC32 of its data, so
a damaged file is found and rebuilt instead of trained on. Reading a large cache in full at every start would take
hours, so the check is split (see :class:`CheckRecord`): a start compares each file's size and modification time
with those recorded when it was last known intact and reads in full only the files that changed or have no record;
a trial checks the CRC of each file it reads in full, the first time it reads it.

Training clips get ``variants`` augmented copies (variant 0 is the clean clip); a trial with augmentation
probability p then picks, per clip and epoch, the clean copy with probability 1 - p, else a random copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from emotune.data.audio import NormStats, load_audio
from emotune.data.augment import Augmenter
from emotune.errors import EmotuneError
from emotune.features.encode import FrozenEncoder
from emotune.names import file_identity

CACHE_FORMAT = "1"
READ_DTYPE = np.float16  # what every read returns, whatever the storage: what a trial holds in memory


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def pack(array: np.ndarray, storage: str = "float16") -> dict[str, np.ndarray]:
    """The tensors a ``(layers, time, width)`` array is stored as.

    ``float16``: the array itself. ``int8``: values scaled by their frame's largest magnitude (one float32
    scale per layer and frame, so quiet and loud frames keep the same relative precision), a quarter of
    float32's size plus 4 bytes per layer and frame.
    """
    if storage == "int8":
        x = np.asarray(array, dtype=np.float32)
        scale = np.abs(x).max(axis=-1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
        return {"x": np.ascontiguousarray(q), "s": np.ascontiguousarray(scale)}
    return {"x": np.ascontiguousarray(array, dtype=np.float16)}


def unpack(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The stored array as float16, whatever the storage (int8 values are multiplied back by their scales)."""
    if "s" in tensors:
        return (tensors["x"].astype(np.float32) * tensors["s"][..., None]).astype(READ_DTYPE)
    return tensors["x"].astype(READ_DTYPE, copy=False)


def as_stored(array: np.ndarray, storage: str) -> np.ndarray:
    """``array`` as a trial reads it back from the cache: what ``predict`` must feed the models it trained.

    Any other ``storage`` (``float32``: a model trained on live features) leaves the array as it is.
    """
    if storage not in ("float16", "int8"):
        return np.asarray(array, dtype=np.float32)
    return unpack(pack(array, storage)).astype(np.float32)


def _crc(tensors: dict[str, np.ndarray]) -> str:
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(np.ascontiguousarray(tensors[name]), crc)  # the array's buffer: no copy of its bytes
    return f"{crc:08x}"


def _sorted_header(data: bytes) -> bytes:
    """A safetensors file's bytes with the keys of its JSON header in sorted order.

    safetensors writes the metadata in the order of a Rust hash map, which changes from call to call: the same
    arrays would make files that differ in their header, so a cache filled by Ray workers, by another process
    or again would not be the same bytes. Sorted, equal arrays make equal files whoever writes them.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format starts the array data on a multiple of 8 bytes
    return len(header).to_bytes(8, "little") + header + data[8 + size :]


class CheckRecord:
    """The size and modification time (ns) of each cache file when it was last known intact, so that a start
    reads in full only the files that changed since.

    A file is recorded when it is written (its CRC is computed from the arrays it is written from) or when a full
    read finds its CRC right; a start trusts a file whose stat still matches its record. What this cannot see is
    a change that keeps both size and modification time (bit rot on the disk, an edit whose mtime was put back):
    trials catch those when they read the file in full (:meth:`FeatureStore.read`). Entries are observations of
    one file state each, so a record lost to a concurrent writer only costs a file one more full check; it never
    vouches for a file that changed. A cache without this record (written by an older emotune) is checked in
    full once, and recorded.
    """

    FILE = "checked_files.json"

    def __init__(self, root: Path) -> None:
        self.file = Path(root) / self.FILE
        self.entries = self._load()
        self.noted: dict[str, list[int]] = {}

    def _load(self) -> dict[str, list[int]]:
        try:
            return json.loads(self.file.read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):  # none yet, or unreadable: every file is checked in full
            return {}

    def unchanged(self, key: str, stat: os.stat_result) -> bool:
        return self.entries.get(key) == [stat.st_size, stat.st_mtime_ns]

    def note(self, key: str, stat: os.stat_result) -> None:
        self.entries[key] = self.noted[key] = [stat.st_size, stat.st_mtime_ns]

    def save(self) -> None:
        """Add what this process noted to the record on disk (re-read first: other processes may have added theirs)."""
        if not self.noted:
            return
        entries = self._load() | self.noted
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.{time.time_ns()}.tmp")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "files": entries}))
            os.replace(tmp, self.file)
        except OSError as exc:  # a read-only cache still works; only the time the record saves is lost
            with contextlib.suppress(OSError):
                tmp.unlink()
            print(f"feature cache: cannot save {self.file} ({exc}); the {len(self.noted)} files just checked "
                  "(or written) will be checked in full again at the next start.", flush=True)
        self.noted = {}


class FeatureStore:
    """Content-addressed arrays in safetensors files (float16, or int8 with scales), written atomically, CRC-checked."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()  # created by the first write, not before: plans write nothing
        self.read_intact: set[str] = set()  # keys whose CRC a full read of this store found right

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def write(self, key: str, array: np.ndarray, storage: str = "float16") -> int:
        from safetensors.numpy import save

        tensors = pack(array, storage)
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data = save(tensors, metadata={"crc32": _crc(tensors), "format": CACHE_FORMAT, "storage": storage})
        tmp.write_bytes(_sorted_header(data))
        os.replace(tmp, path)  # readers see the old state or the whole new file, never half of it
        return path.stat().st_size

    def _load(self, key: str) -> tuple[dict[str, np.ndarray], str | None]:
        """The stored tensors of ``key`` and the CRC written with them."""
        from safetensors import safe_open

        with safe_open(str(self.path(key)), framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, (f.metadata() or {}).get("crc32")

    def _unusable(self, key: str, problem: str) -> EmotuneError:
        """The error for a file a trial cannot use. The file's mtime is set to now, so that the next start sees
        it changed, checks it in full and re-encodes it."""
        path = self.path(key)
        try:
            os.utime(path)
            fix = "It is now marked as changed: start again with features.verify=true, which re-encodes it."
        except OSError:  # gone, or a read-only cache
            fix = ("Delete it if it is still there and start again with features.verify=true, which re-encodes "
                   "missing files.")
        return EmotuneError(f"cached features {path} {problem}: the file changed after the cache was checked. {fix}")

    def read(self, key: str, frames: slice | None = None) -> np.ndarray:
        """The ``(layers, time, width)`` array; ``frames`` reads only part of the time axis (memory-mapped).

        The first full read of each file also checks its CRC, on bytes already in memory: a start checks only
        files whose size or mtime changed, and this catches the changes that keep both before they are trained on.
        Partial reads (training crops streamed from disk) are not checked.
        """
        from safetensors import safe_open

        try:
            if frames is not None:
                with safe_open(str(self.path(key)), framework="numpy") as f:
                    return unpack({name: f.get_slice(name)[:, frames] for name in f.keys()})
            tensors, expected = self._load(key)
        except Exception as exc:  # missing, truncated or overwritten
            raise self._unusable(key, f"cannot be read ({str(exc).splitlines()[0][:120]})") from None
        if key not in self.read_intact:
            if expected != _crc(tensors):
                raise self._unusable(key, f"fail their CRC check (stored {expected}, read {_crc(tensors)})")
            self.read_intact.add(key)
        return unpack(tensors)

    def is_intact(self, key: str, record: CheckRecord | None = None) -> bool:
        """Whether ``key``'s file holds the arrays its CRC was computed from.

        With ``record``, a file whose size and mtime are those recorded is trusted without reading it, and a
        file read in full and found intact is recorded.
        """
        try:
            stat = self.path(key).stat()  # before the read: a change during the read must not be recorded as seen
            if record is not None and record.unchanged(key, stat):
                return True
            tensors, expected = self._load(key)
        except Exception:
            return False
        if expected != _crc(tensors):
            return False
        if record is not None:
            record.note(key, stat)
        return True

    def _shape(self, key: str) -> list[int]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path(key)), framework="numpy") as f:
                return list(f.get_slice("x").get_shape())
        except Exception as exc:
            raise self._unusable(key, f"cannot be read ({str(exc).splitlines()[0][:120]})") from None

    def frames(self, key: str) -> int:
        return self._shape(key)[1]

    def held_bytes(self, key: str) -> int:
        """The memory a full read of ``key`` takes: its values as ``READ_DTYPE`` (int8 is unpacked to float16,
        twice its size on disk). Only the file's header is read."""
        return math.prod(self._shape(key)) * np.dtype(READ_DTYPE).itemsize


@dataclass(frozen=True)
class SpeechJob:
    key: str
    audio: str
    variant: int
    seed: int
    n_samples: int


@dataclass(frozen=True)
class TextJob:
    key: str
    text: str


@dataclass
class BuildReport:
    """What one cache build did; ``encoder_calls`` counts inputs actually encoded."""

    encoder: str
    hits: int = 0
    built: int = 0
    rebuilt_damaged: int = 0
    checked_in_full: int = 0  # cached files whose CRC was read (new, changed or not yet recorded); the rest: a stat
    bytes_written: int = 0
    seconds: float = 0.0
    encoder_calls: int = 0
    workers: list = field(default_factory=list)  # what each Ray worker that filled the cache ran on

    def line(self) -> str:
        return (f"{self.encoder}: {self.hits} cached"
                f"{f' ({self.checked_in_full} new or changed files CRC-checked)' if self.checked_in_full else ''}, "
                f"{self.built} encoded"
                f"{f' ({self.rebuilt_damaged} damaged files rebuilt)' if self.rebuilt_damaged else ''}, "
                f"{self.bytes_written / 1e6:.1f} MB written in {self.seconds:.1f} s")


class AudioHashes:
    """SHA-256 of audio files, remembered by path, size and modification time.

    The memo is shared within a process too, so the plan and the fill that follows it hash each file once.
    """

    _in_process: dict[str, dict] = {}

    def __init__(self, memo_file: Path) -> None:
        self.memo_file = memo_file
        if str(memo_file) not in self._in_process:
            try:
                self._in_process[str(memo_file)] = json.loads(memo_file.read_text())
            except (OSError, json.JSONDecodeError):
                self._in_process[str(memo_file)] = {}
        self.memo = self._in_process[str(memo_file)]
        self.dirty = not memo_file.is_file() and bool(self.memo)

    def __call__(self, path: str | Path) -> str:
        memo_key = file_identity(path)
        if memo_key not in self.memo:
            self.memo[memo_key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            self.dirty = True
        return self.memo[memo_key]

    def save(self) -> None:
        if self.dirty:
            self.memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.memo_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.memo))
            os.replace(tmp, self.memo_file)
            self.dirty = False


def augment_fingerprint(augment: dict) -> str:
    """What the augmented variants depend on: folders, effect settings and the augmentation seed."""
    return _digest({k: augment.get(k) for k in sorted(augment)})


def speech_jobs(encoder_key: str, utterances, audio_info: dict, norm: NormStats, hashes: AudioHashes,
                variants: int, augment: dict) -> dict[str, list[SpeechJob]]:
    """For each utterance id, its clean job followed by ``variants`` augmented ones (pass 0 for dev/test)."""
    norm_key = (round(norm.mean, 9), round(norm.std, 9))
    fingerprint = augment_fingerprint(augment)
    jobs: dict[str, list[SpeechJob]] = {}
    for u in utterances:
        sha = hashes(u.audio)
        n_samples = audio_info[u.id].n_samples if u.id in audio_info else 0
        row = [SpeechJob(_digest("speech", encoder_key, sha, norm_key, 0), str(u.audio), 0, 0, n_samples)]
        for k in range(1, variants + 1):
            seed = int(_digest("seed", augment["seed"], sha, k)[:8], 16)
            row.append(SpeechJob(_digest("speech", encoder_key, sha, norm_key, k, fingerprint), str(u.audio), k,
                                 seed, n_samples))
        jobs[u.id] = row
    return jobs


def text_jobs(encoder_key: str, utterances) -> dict[str, TextJob]:
    return {u.id: TextJob(_digest("text", encoder_key, u.text), u.text) for u in utterances}


# safetensors' JSON header (shapes, dtype, CRC metadata) per file, measured on files this cache writes
HEADER_BYTES = {"float16": 152, "int8": 232}


def bytes_per_step(recipe, storage: str | None = None) -> int:
    """Stored bytes per frame or token of one encoder: every stored layer's values (and scales)."""
    storage = storage or recipe.storage
    layers = len(recipe.layers)
    return layers * recipe.width * (1 if storage == "int8" else 2) + (4 * layers if storage == "int8" else 0)


def estimate_bytes(recipe, jobs: Sequence[SpeechJob | TextJob]) -> int:
    """What writing ``jobs`` will add to the cache, from clip lengths and transcripts (nothing is encoded)."""
    steps = sum(recipe.steps(j.n_samples if isinstance(j, SpeechJob) else j.text) for j in jobs)
    return steps * bytes_per_step(recipe) + HEADER_BYTES[recipe.storage] * len(jobs)


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds ``folder`` (or would hold it: the nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk(store: FeatureStore, needed: int, what: str, announce: bool = True) -> None:
    """Say how much the build will write and refuse to start one that would not fit."""
    free = free_bytes(store.root)
    if announce:
        print(f"feature cache: {what} needs about {needed / 1e6:,.1f} MB; {free / 1e9:,.1f} GB free in {store.root}")
    if needed > 0.95 * free:
        raise EmotuneError(
            f"the feature cache for {what} needs about {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free "
            f"in {store.root}. Free space, point features.dir at a larger disk, lower features.variants, or choose "
            "fewer layers (features.speech_layers=last)."
        )


def _prepare_input(job: SpeechJob | TextJob, norm: NormStats | None, augmenter: Augmenter | None,
                   decoded: dict[str, np.ndarray]):
    if isinstance(job, TextJob):
        return job.text
    if job.audio not in decoded:  # a clip's clean and augmented jobs are adjacent: decode it once for all
        decoded.clear()
        decoded[job.audio] = norm.apply(load_audio(job.audio))
    wave = decoded[job.audio]
    if job.variant > 0:  # an augmented copy: one effect, drawn from the job's own seed
        wave = augmenter(wave, np.random.default_rng(job.seed), p=1.0)
    return wave


def missing_jobs(jobs: Sequence[SpeechJob | TextJob], store: FeatureStore, verify: bool,
                 record: CheckRecord | None = None) -> tuple[list[SpeechJob | TextJob], int, int]:
    """The jobs whose array is absent or (with ``verify``) damaged, plus the counts of hits and damaged files.

    With ``record``, ``verify`` reads only the files whose size or mtime differ from their record (see
    :class:`CheckRecord`); without it, every file in full.
    """
    todo, hits, damaged = [], 0, 0
    for job in {j.key: j for j in jobs}.values():
        if store.exists(job.key) and (not verify or store.is_intact(job.key, record)):
            hits += 1
        else:
            damaged += store.exists(job.key)
            todo.append(job)
    return todo, hits, damaged


def encode_jobs(encoder: FrozenEncoder, todo: Sequence[SpeechJob | TextJob], store: FeatureStore,
                norm: NormStats | None = None, augmenter: Augmenter | None = None, bar=None) -> tuple[int, int]:
    """Encode ``todo`` and write each array; returns (inputs encoded, bytes written). ``bar`` is a progress bar."""
    chunk = max(1, encoder.batch_size) * 4
    decoded: dict[str, np.ndarray] = {}
    calls = written = 0
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        arrays = encoder.encode([_prepare_input(j, norm, augmenter, decoded) for j in part])
        calls += len(part)
        for job, array in zip(part, arrays):
            written += store.write(job.key, array, encoder.recipe.storage)
        if bar is not None:
            bar.update(len(part))
    return calls, written


def fill_missing(recipe, jobs: Sequence[SpeechJob | TextJob], store: FeatureStore, verify: bool, progress: bool,
                 start: Callable[[], tuple[str, Callable]]) -> BuildReport:
    """The one build-and-report loop: find what is missing (or damaged), check the disk, encode it, report.

    ``start()`` is called only when something is missing; it returns a note for the progress bar (where the
    work runs) and ``encode(todo, bar, report)``, which encodes and adds its counts to the report.
    """
    label = f"{recipe.modality} encoder {recipe.spec.name}"
    report = BuildReport(encoder=label)
    began = time.perf_counter()
    record = CheckRecord(store.root)
    todo, report.hits, report.rebuilt_damaged = missing_jobs(jobs, store, verify, record)
    report.checked_in_full = len(record.noted) + report.rebuilt_damaged
    if todo:
        check_disk(store, estimate_bytes(recipe, todo), label, announce=progress)
        where, encode = start()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"encoding ({label}{where})", unit="item")
        encode(todo, bar, report)
        if bar:
            bar.close()
        for job in todo:  # written whole from arrays whose CRC they carry: known intact without a read
            record.note(job.key, store.path(job.key).stat())
    record.save()
    report.built = len(todo) - report.rebuilt_damaged
    report.seconds = time.perf_counter() - began
    return report


def build(encoder: FrozenEncoder, jobs: Sequence[SpeechJob | TextJob], store: FeatureStore,
          norm: NormStats | None = None, augmenter: Augmenter | None = None, verify: bool = True,
          progress: bool = True) -> BuildReport:
    """Encode every job whose array is missing (or damaged, when ``verify``) with a loaded encoder."""
    def encode(todo, bar, report: BuildReport) -> None:
        report.encoder_calls, report.bytes_written = encode_jobs(encoder, todo, store, norm, augmenter, bar)

    return fill_missing(encoder.recipe, jobs, store, verify, progress, lambda: ("", encode))


@dataclass
class FeatureIndex:
    """Which cached arrays hold each utterance's features: what a trial needs to read them.

    ``speech[id]`` lists the clean key then the augmented variants' keys (training clips only have
    variants); ``text[id]`` is one key. ``encoders`` describes each modality's encoder (name, key, layers,
    width, frame rate, default normalisation).
    """

    cache_dir: str
    speech: dict[str, list[str]] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    encoders: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def merge(cls, parts: Sequence["FeatureIndex"]) -> "FeatureIndex":
        """One index from per-encoder parts (each holding one modality) of the same cache folder."""
        merged = cls(cache_dir=parts[0].cache_dir)
        for part in parts:
            merged.speech.update(part.speech)
            merged.text.update(part.text)
            merged.encoders.update(part.encoders)
        return merged
