"""Read a corpus in the EmoSPeech 2024 layout, validate every row and audio file, and split it.

The layout: a CSV with header ``id,label,transcription`` for labelled splits (``id,transcription`` for the
unlabelled test split), extra columns allowed, and one audio file per id in an audio folder (MP3, WAV,
FLAC or OGG; the id is the file name, with or without its extension). Labels of an unlabelled test CSV may
come from a separate ``id,label`` file.

Every problem is a :class:`~emotune.errors.DataError` naming the CSV, the row and the id. With
``on_error="raise"`` (the default) the first one stops the run; with ``on_error="skip"`` bad rows are left
out, and every one of them is listed in the :class:`SkipReport`: nothing is dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np

from emotune.data.audio import AUDIO_EXTENSIONS, AudioError, AudioInfo, NormStats, load_audio
from emotune.errors import DataError
from emotune.names import file_identity

# The challenge's label order; class indices follow it.
CHALLENGE_LABELS = ("neutral", "disgust", "anger", "sadness", "joy", "fear")
ON_ERROR_POLICIES = ("raise", "skip")


@dataclass(frozen=True)
class Utterance:
    """One row of a split: the clip's id, its audio file, transcript, label (None if unknown) and origin."""

    id: str
    audio: Path
    text: str
    label: str | None
    source: str
    row: int
    group: str | None = None


@dataclass(frozen=True)
class SkippedRow:
    file: str | None
    row: int | None
    utt_id: str | None
    kind: str
    message: str


@dataclass
class SkipReport:
    """Every row left out under ``on_error=skip``, with the reason."""

    rows: list[SkippedRow] = field(default_factory=list)

    def add(self, error: DataError) -> None:
        self.rows.append(SkippedRow(error.file, error.row, error.utt_id, error.kind, str(error)))

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self) -> Counter:
        return Counter(r.kind for r in self.rows)

    def summary(self, limit: int = 10) -> str:
        if not self.rows:
            return "No rows skipped."
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.counts().most_common())
        lines = [f"Skipped {len(self.rows)} rows ({kinds}):"]
        lines += [f"  - {r.message}" for r in self.rows[:limit]]
        if len(self.rows) > limit:
            lines.append(f"  ... and {len(self.rows) - limit} more (see the skipped-rows CSV)")
        return "\n".join(lines)

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "row", "id", "kind", "message"])
            for r in self.rows:
                writer.writerow([r.file, r.row, r.utt_id, r.kind, r.message])
        return path


class ErrorPolicy:
    """Raises a row's error or records it in the report, as ``on_error`` says."""

    def __init__(self, on_error: str, report: SkipReport) -> None:
        if on_error not in ON_ERROR_POLICIES:
            raise DataError(
                f"on_error must be one of {', '.join(ON_ERROR_POLICIES)}, got '{on_error}'",
                fix="Use on_error=raise to stop at the first bad row or on_error=skip to leave bad rows out.",
            )
        self.on_error = on_error
        self.report = report

    def handle(self, error: DataError) -> None:
        if self.on_error == "raise":
            raise error
        self.report.add(error)


def _read_utf8(path: Path) -> str:
    if not path.is_file():
        raise DataError("CSV file not found", file=path, fix="Check the path (data.root and the CSV name).")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            file=path,
            row=line,
            fix=f"Re-save it as UTF-8, for example `iconv -f latin1 -t utf-8 {path.name} > fixed.csv`.",
            kind="not UTF-8",
        ) from None


def _audio_path(audio_dir: Path, utt_id: str) -> Path | None:
    """The audio file an id names, trying the known extensions when the id has none; None if absent."""
    candidate = audio_dir / utt_id
    if candidate.is_file():
        return candidate
    if candidate.suffix.lower() not in AUDIO_EXTENSIONS:
        for ext in AUDIO_EXTENSIONS:
            for suffix in (ext, ext.upper()):
                with_ext = audio_dir / f"{utt_id}{suffix}"
                if with_ext.is_file():
                    return with_ext
    return None


def _canonical_labels(labels: Sequence[str]) -> dict[str, str]:
    return {label.strip().lower(): label for label in labels}


def _csv_rows(path: Path, text: str) -> tuple[list[str], Iterable[tuple[int, list[str]]]]:
    """The header and ``(line number, fields)`` for each non-blank record of a CSV text."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError("CSV file is empty (no header)", file=path, row=1, fix="Add the header and rows.")
    columns = [h.strip() for h in header]

    def records():
        line_before = reader.line_num
        for fields in reader:
            row = line_before + 1  # the line where this record starts, even if quoted fields span lines
            line_before = reader.line_num
            if fields:
                yield row, fields

    return columns, records()


def _require_columns(path: Path, columns: list[str], required: Sequence[str]) -> dict[str, int]:
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(
            f"has no column {', '.join(repr(c) for c in missing)}; its header is: {', '.join(columns)}",
            file=path,
            row=1,
            fix=f"The header must contain {', '.join(required)} (names are case-sensitive).",
            kind="missing column",
        )
    return {name: i for i, name in enumerate(columns)}


def read_split_csv(
    csv_path: str | Path,
    audio_dir: str | Path,
    *,
    require_labels: bool,
    labels: Sequence[str] = CHALLENGE_LABELS,
    group_column: str | None = None,
    policy: ErrorPolicy | None = None,
) -> list[Utterance]:
    """Validate and read one split's CSV. Audio files must exist; their content is checked by ``scan_audio``.

    A ``label`` column is read when present (required when ``require_labels``); labels are matched without
    regard to case or surrounding spaces and must be one of ``labels``.
    """
    policy = policy or ErrorPolicy("raise", SkipReport())
    csv_path = Path(csv_path).expanduser().resolve()
    audio_dir = Path(audio_dir).expanduser().resolve()
    if not audio_dir.is_dir():
        raise DataError("audio folder not found", file=audio_dir, fix="Check data.audio_dir (or data.root).")
    columns, records = _csv_rows(csv_path, _read_utf8(csv_path))
    required = (["id", "transcription"] + (["label"] if require_labels else [])
                + ([group_column] if group_column else []))
    layout = _SplitCsv(csv_path, audio_dir, columns, _require_columns(csv_path, columns, required),
                       _canonical_labels(labels), group_column)
    first_row_of: dict[str, int] = {}
    out: list[Utterance] = []
    for row, fields in records:
        try:
            out.append(_parse_row(layout, row, fields, first_row_of))
        except DataError as error:
            policy.handle(error)
    return out


@dataclass(frozen=True)
class _SplitCsv:
    """What every row of one split's CSV is read against."""

    csv_path: Path
    audio_dir: Path
    columns: list[str]  # the header
    col: dict[str, int]  # column name -> position
    known: dict[str, str]  # canonical (lower-case) label -> label as configured
    group_column: str | None


def _parse_row(layout: _SplitCsv, row: int, fields: list[str], first_row_of: dict[str, int]) -> Utterance:
    csv_path, audio_dir, columns, col, known = (layout.csv_path, layout.audio_dir, layout.columns, layout.col,
                                                layout.known)
    group_column = layout.group_column

    def fail(problem: str, fix: str, kind: str, utt_id: str | None = None) -> DataError:
        return DataError(problem, file=csv_path, row=row, utt_id=utt_id, fix=fix, kind=kind)

    if len(fields) != len(columns):
        raise fail(
            f"has {len(fields)} fields but the header has {len(columns)}",
            "Quote fields that contain commas, or fix the row's separators.",
            "malformed row",
        )
    utt_id = fields[col["id"]].strip()
    if not utt_id:
        raise fail("the id is empty", "Give every row the name of its audio file.", "empty id")
    rel = PurePosixPath(utt_id.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or (len(utt_id) > 1 and utt_id[1] == ":"):
        raise fail(
            f"the id points outside the audio folder {audio_dir}",
            "Ids must be file names relative to the audio folder, without '..' or absolute paths.",
            "id outside audio folder",
            utt_id,
        )
    if utt_id in first_row_of:
        raise fail(
            f"duplicate id, already used in row {first_row_of[utt_id]}",
            "Give every clip a unique id or remove the repeated row.",
            "duplicate id",
            utt_id,
        )
    first_row_of[utt_id] = row
    label = None
    if "label" in col:
        raw_label = fields[col["label"]]
        label = known.get(raw_label.strip().lower())
        if label is None:
            raise fail(
                f"unknown label '{raw_label}'; known labels: {', '.join(known.values())}",
                "Correct the label, or list it in data.labels if the corpus really has this class.",
                "unknown label",
                utt_id,
            )
    text = " ".join(fields[col["transcription"]].split())
    if not text:
        raise fail(
            "the transcription is empty",
            "Fill in the transcript (an ASR transcript will do) or remove the row.",
            "empty transcript",
            utt_id,
        )
    audio = _audio_path(audio_dir, utt_id)
    if audio is None:
        raise fail(
            f"audio file not found: {audio_dir / utt_id}",
            "Check that the audio folder is right and that the file exists with this exact name.",
            "missing audio",
            utt_id,
        )
    group = fields[col[group_column]].strip() if group_column else None
    return Utterance(utt_id, audio, text, label, str(csv_path), row, group)


def read_label_file(
    path: str | Path, utterances: list[Utterance], labels: Sequence[str], policy: ErrorPolicy
) -> list[Utterance]:
    """Attach labels from an ``id,label`` file to unlabelled utterances; every id must have exactly one."""
    path = Path(path).expanduser().resolve()
    columns, records = _csv_rows(path, _read_utf8(path))
    col = _require_columns(path, columns, ["id", "label"])
    known = _canonical_labels(labels)
    wanted = {u.id for u in utterances}
    found: dict[str, str] = {}
    for row, fields in records:
        utt_id = fields[col["id"]].strip() if len(fields) == len(columns) else None
        problem = None
        if utt_id is None:
            problem = (f"has {len(fields)} fields but the header has {len(columns)}", "malformed row")
        elif utt_id not in wanted:
            problem = (f"id '{utt_id}' is not in the test CSV (or was skipped)", "unknown id")
        elif utt_id in found:
            problem = ("duplicate id", "duplicate id")
        elif fields[col["label"]].strip().lower() not in known:
            problem = (f"unknown label '{fields[col['label']]}'; known labels: {', '.join(known.values())}",
                       "unknown label")
        if problem:
            policy.handle(DataError(problem[0], file=path, row=row, utt_id=utt_id, kind=problem[1],
                                    fix="Correct the row or remove it."))
            continue
        found[utt_id] = known[fields[col["label"]].strip().lower()]
    out = []
    for u in utterances:
        if u.id not in found:
            policy.handle(DataError(f"has no label in {path}", file=u.source, row=u.row, utt_id=u.id,
                                    kind="missing label", fix="Add the id to the label file."))
            continue
        out.append(Utterance(u.id, u.audio, u.text, found[u.id], u.source, u.row, u.group))
    return out


def scan_audio(
    utterances: list[Utterance],
    policy: ErrorPolicy,
    cache_file: str | Path | None = None,
    progress: bool = True,
) -> tuple[list[Utterance], dict[str, AudioInfo]]:
    """Decode every clip once to check it and gather its length and moments.

    Returns the usable utterances and their :class:`AudioInfo` by id. Results of clean files are kept in
    ``cache_file`` keyed by path, size and modification time, so a corpus is decoded only once.
    """
    cache: dict[str, list] = {}
    cache_path = Path(cache_file) if cache_file else None
    if cache_path and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text())
        except (json.JSONDecodeError, OSError):
            cache = {}  # a damaged scan cache only costs a rescan
    keys = [file_identity(u.audio) for u in utterances]

    def check(i: int) -> AudioInfo | AudioError:
        if keys[i] in cache:
            return AudioInfo(*cache[keys[i]])
        try:
            return AudioInfo.of(load_audio(utterances[i].audio))
        except AudioError as error:
            return error

    results: list[AudioInfo | AudioError]
    todo = sum(k not in cache for k in keys)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        iterator = pool.map(check, range(len(utterances)))
        if progress and todo > 50:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(utterances), desc="checking audio", unit="clip")
        results = list(iterator)

    kept, infos = [], {}
    for u, key, result in zip(utterances, keys, results):
        if isinstance(result, AudioError):
            policy.handle(DataError(f"audio {result.file}: {result.problem}", file=u.source, row=u.row,
                                    utt_id=u.id, fix=result.fix, kind=result.kind))
            continue
        cache[key] = [result.n_samples, result.sum, result.sum_sq]
        kept.append(u)
        infos[u.id] = result
    if cache_path and todo:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: two searches started together on one runs folder scan at the same time
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_path)
    return kept, infos


@dataclass
class Corpus:
    """A validated corpus: labelled training rows, test rows (labelled or not) and audio facts per id."""

    train: list[Utterance]
    test: list[Utterance]
    labels: tuple[str, ...]
    audio: dict[str, AudioInfo]
    report: SkipReport

    @property
    def test_labelled(self) -> bool:
        return bool(self.test) and all(u.label is not None for u in self.test)


def load_corpus(
    train_csv: str | Path,
    audio_dir: str | Path,
    test_csv: str | Path | None = None,
    test_labels: str | Path | None = None,
    *,
    labels: Sequence[str] = CHALLENGE_LABELS,
    group_column: str | None = None,
    on_error: str = "raise",
    scan_cache: str | Path | None = None,
    progress: bool = True,
) -> Corpus:
    """Read, validate and decode-check a corpus; see the module docstring."""
    report = SkipReport()
    policy = ErrorPolicy(on_error, report)
    if not labels:
        raise DataError("data.labels is empty", fix=f"List the classes, e.g. {', '.join(CHALLENGE_LABELS)}.")
    train = read_split_csv(train_csv, audio_dir, require_labels=True, labels=labels,
                           group_column=group_column, policy=policy)
    test: list[Utterance] = []
    if test_csv:
        test = read_split_csv(test_csv, audio_dir, require_labels=False, labels=labels, policy=policy)
        train_rows = {u.id: u.row for u in train}
        leaked = [u for u in test if u.id in train_rows]
        for u in leaked:
            policy.handle(DataError(
                f"id also appears in the training CSV (row {train_rows[u.id]}): test data must not be trained on",
                file=u.source, row=u.row, utt_id=u.id, kind="train/test overlap",
                fix="Remove the clip from one of the two splits."))
        test = [u for u in test if u.id not in train_rows]
        if test_labels:
            test = read_label_file(test_labels, test, labels, policy)
    train, train_infos = scan_audio(train, policy, scan_cache, progress)
    test, test_infos = scan_audio(test, policy, scan_cache, progress)
    infos = {**train_infos, **test_infos}
    if not train:
        raise DataError("no usable training rows remain", file=train_csv,
                        fix="Fix the rows listed above, or check that the CSV and audio folder match.")
    present = {u.label for u in train}
    class_order = tuple(label for label in labels if label in present)
    if len(class_order) < 2:
        raise DataError(f"the training CSV has only the class {class_order}; a classifier needs two or more",
                        file=train_csv, fix="Check the label column.")
    return Corpus(train=train, test=test, labels=class_order, audio=infos, report=report)


def split_train_dev(
    utterances: list[Utterance], dev_fraction: float = 0.16, seed: int = 0, by_group: bool = False
) -> tuple[list[Utterance], list[Utterance]]:
    """A seeded train/dev split, stratified by label, in the CSV's order within each side.

    Without groups every class with two or more clips puts at least one in dev. With ``by_group`` (the
    utterances must carry a group, e.g. the speaker), whole groups go to one side; the dev share is then
    only approximately ``dev_fraction`` (folds of a stratified group k-fold with k = round(1/fraction)).
    """
    if not 0.0 < dev_fraction < 1.0:
        raise DataError(f"dev_fraction must be between 0 and 1, got {dev_fraction}",
                        fix="The winning system used 0.16.")
    if by_group:
        return _split_by_group(utterances, dev_fraction, seed)
    rng = np.random.default_rng(seed)
    dev_index: set[int] = set()
    by_label: dict[str, list[int]] = {}
    for i, u in enumerate(utterances):
        by_label.setdefault(u.label, []).append(i)
    for label in sorted(by_label, key=str):
        members = by_label[label]
        n = len(members)
        n_dev = int(round(n * dev_fraction))
        if n >= 2:
            n_dev = min(max(n_dev, 1), n - 1)
        picked = rng.permutation(n)[:n_dev]
        dev_index.update(members[j] for j in picked)
    train = [u for i, u in enumerate(utterances) if i not in dev_index]
    dev = [u for i, u in enumerate(utterances) if i in dev_index]
    return train, dev


def _split_by_group(utterances, dev_fraction, seed):
    from sklearn.model_selection import StratifiedGroupKFold

    groups = [u.group for u in utterances]
    if any(g is None or g == "" for g in groups):
        missing = next(u for u in utterances if not u.group)
        raise DataError("has no group value but the split keeps groups together", file=missing.source,
                        row=missing.row, utt_id=missing.id, fix="Fill in the group column for every row.")
    n_splits = max(2, int(round(1.0 / dev_fraction)))
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise DataError(
            f"a grouped split with dev_fraction={dev_fraction} needs at least {n_splits} groups, "
            f"the corpus has {n_groups}",
            fix="Raise data.dev_fraction or split without data.group_column.")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    labels = [u.label for u in utterances]
    _, dev_idx = next(splitter.split(np.zeros(len(utterances)), labels, groups))
    dev_set = set(dev_idx.tolist())
    return ([u for i, u in enumerate(utterances) if i not in dev_set],
            [u for i, u in enumerate(utterances) if i in dev_set])


def format_summary(splits: dict[str, list[Utterance]], labels: Sequence[str], audio: dict[str, AudioInfo]) -> str:
    """A table of clip counts per class and split, then duration statistics per split."""
    names = list(splits)
    width = max(9, *(len(label) for label in labels))
    lines = ["".join([f"{'class':<{width}}", *(f"{n:>8}" for n in names)])]
    for label in list(labels) + ([None] if any(u.label is None for s in splits.values() for u in s) else []):
        counts = [sum(u.label == label for u in splits[n]) for n in names]
        lines.append("".join([f"{label or '(unlabelled)':<{width}}", *(f"{c:>8}" for c in counts)]))
    lines.append("".join([f"{'total':<{width}}", *(f"{len(splits[n]):>8}" for n in names)]))
    if audio:
        lines.append("")
        lines.append(f"{'duration (s)':<14}{'mean':>7}{'min':>7}{'max':>7}{'total (min)':>13}")
        for n in names:
            d = np.array([audio[u.id].duration for u in splits[n] if u.id in audio])
            if d.size:
                lines.append(f"{n:<14}{d.mean():>7.2f}{d.min():>7.2f}{d.max():>7.2f}{d.sum() / 60:>13.1f}")
    return "\n".join(lines)


def norm_stats(train: Iterable[Utterance], audio: dict[str, AudioInfo]) -> NormStats:
    """Normalisation statistics of the training side only (never dev or test)."""
    return NormStats.from_infos(audio[u.id] for u in train)
