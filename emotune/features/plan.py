"""The feature-cache plan: what a search's encoders will store and cost, before anything is downloaded or encoded.

    emotune plan space=encoders encoders=hub data=folder data.root=/data/meacorpus
    emotune plan space=encoders encoders=hub --clips 5129 --hours 13.16      # a corpus you describe

Sizes come from clip lengths (or a described corpus) and the encoders' shapes: the catalog's for hub models
not on this machine, the ``config.json`` of everything else. Where an encoder's files are here, its cache
keys are known and the plan also says what the cache already holds. Every search prints the same plan and
stops before any work when the missing part cannot fit (``features.max_cache_gb`` or the free disk).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from emotune.errors import EmotuneError
from emotune.features.cache import HEADER_BYTES, FeatureStore, SpeechJob, TextJob, bytes_per_step, free_bytes
from emotune.features.catalog import hub_entry, resolve_encoder
from emotune.features.prepare import encoder_dirs, plan_jobs, tokenizer_texts
from emotune.features.recipe import (
    EncoderRecipe,
    check_storage,
    recipe_settings,
    resolve_layers,
    resolve_recipe,
    resolve_waveform_norm,
)
from emotune.names import SAMPLE_RATE, user_cache_dir

# The SSL front-end every catalog speech model shares (320x downsampling): frame counts before a download.
SSL_CONV = ((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
# A described corpus has no transcripts: Spanish read or spontaneous speech runs about 15 characters a second.
CHARS_PER_SECOND = 15
# The test share of a described corpus: EmoSPeech 2024's (750 test clips of 3,750).
DEFAULT_TEST_SHARE = 0.2


@dataclass(frozen=True)
class Clip:
    """What the plan needs of one clip: its length in samples and its transcript."""

    n_samples: int
    text: str


@dataclass
class ClipSplits:
    """The clips of a corpus by split (each clip may stand for ``weight`` identical clips)."""

    train: list[Clip]
    dev: list[Clip]
    test: list[Clip]
    description: str
    utterances: object = None  # the PreparedCorpus when the corpus is on disk (cache keys can then be known)
    shares: tuple | None = None  # a described corpus: how many clips each split's one representative clip stands for

    @classmethod
    def of_corpus(cls, corpus) -> "ClipSplits":
        def clips(split):
            return [Clip(corpus.audio[u.id].n_samples, u.text) for u in split]

        seconds = sum(i.duration for i in corpus.audio.values())
        n = len(corpus.train) + len(corpus.dev) + len(corpus.test)
        return cls(clips(corpus.train), clips(corpus.dev), clips(corpus.test),
                   f"{corpus.settings['root']}: {n:,} clips, {seconds / 3600:.2f} h (train {len(corpus.train):,}, "
                   f"dev {len(corpus.dev):,}, test {len(corpus.test):,})", utterances=corpus)

    @classmethod
    def described(cls, clips: int, hours: float, dev_fraction: float, test_share: float = DEFAULT_TEST_SHARE):
        """``clips`` clips of equal length adding up to ``hours``; split test first, then dev from the rest."""
        if clips < 1 or hours <= 0:
            raise EmotuneError(f"--clips must be at least 1 and --hours positive, got {clips} and {hours}")
        if not 0 <= test_share < 1 or not 0 <= dev_fraction < 1:
            raise EmotuneError("the test share and data.dev_fraction must be in [0, 1), "
                               f"got {test_share}, {dev_fraction}")
        seconds = hours * 3600 / clips
        one = Clip(int(round(seconds * SAMPLE_RATE)), "x" * int(round(seconds * CHARS_PER_SECOND)))
        train = clips * (1 - test_share) * (1 - dev_fraction)
        dev = clips * (1 - test_share) * dev_fraction
        test = clips * test_share
        return cls([one], [one], [one],
                   (f"a described corpus: {clips:,} clips, {hours:.2f} h, {seconds:.2f} s each (train "
                    f"{train:,.0f}, dev {dev:,.0f}, test {test:,.0f}: test {test_share:.0%} as in EmoSPeech "
                    f"2024 (--test-share), dev {dev_fraction:.0%} of the rest (data.dev_fraction))"),
                   shares=(train, dev, test))

    def counts(self) -> tuple[float, float, float]:
        if self.shares:
            return self.shares
        return float(len(self.train)), float(len(self.dev)), float(len(self.test))


@dataclass
class EncoderPlan:
    """One encoder's share of the cache."""

    modality: str
    name: str
    source: str
    layers: str               # stored / available, e.g. "8/24"
    width: int
    params_m: float
    storage: str
    waveform_norm: str
    passes: float             # inputs to encode: clips x (1 + variants) for training clips, once for the rest
    steps: float              # frames or tokens over all passes
    total_bytes: float
    cached_bytes: float | None  # None: unknown (the encoder is not on this machine, or the corpus is described)
    missing_bytes: float
    seconds: float            # encoding time of the missing part at the assumed speed
    note: str = ""


@dataclass
class CachePlan:
    corpus: str
    variants: int
    tflops: float
    cache_dir: str
    free_bytes: int
    cap_gb: float | None
    encoders: list[EncoderPlan] = field(default_factory=list)
    folds: int = 1  # trial.folds: above 1, dev clips are trained on too and get augmented copies

    @property
    def total_bytes(self) -> float:
        return sum(e.total_bytes for e in self.encoders)

    @property
    def missing_bytes(self) -> float:
        return sum(e.missing_bytes for e in self.encoders)

    @property
    def total_gb(self) -> float:
        return round(self.total_bytes / 1e9, 1)

    def to_dict(self) -> dict:
        return asdict(self) | {"total_gb": self.total_gb, "missing_gb": round(self.missing_bytes / 1e9, 1)}

    def problem(self) -> str | None:
        """Why the missing part cannot be built here, or None when it fits."""
        missing = self.missing_bytes
        if self.cap_gb is not None and missing > float(self.cap_gb) * 1e9:
            return f"the missing cache ({human(missing)}) exceeds features.max_cache_gb={self.cap_gb:g}"
        if missing > 0.95 * self.free_bytes:
            return (f"the missing cache ({human(missing)}) does not fit the {human(self.free_bytes)} free in "
                    f"{self.cache_dir}")
        return None

    def table(self) -> str:
        rows = [("modality", "encoder", "source", "layers", "width", "params", "storage", "passes", "cache",
                 "in cache", "to encode", "time")]
        for e in self.encoders:
            rows.append((e.modality, e.name, e.source, e.layers, str(e.width),
                         f"{e.params_m:,.0f}M" if e.params_m >= 1
                         else ("-" if not e.params_m else f"{e.params_m:.2f}M"),
                         e.storage + (" z" if e.waveform_norm == "utterance" else ""), f"{e.passes:,.0f}",
                         human(e.total_bytes), "?" if e.cached_bytes is None else human(e.cached_bytes),
                         human(e.missing_bytes), duration(e.seconds)))
        rows.append(("total", "", "", "", "", "", "", f"{sum(e.passes for e in self.encoders):,.0f}",
                     human(self.total_bytes),
                     "?" if any(e.cached_bytes is None for e in self.encoders)
                     else human(sum(e.cached_bytes for e in self.encoders)),
                     human(self.missing_bytes), duration(sum(e.seconds for e in self.encoders))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        left = {0, 1, 2, 6}
        lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(-1, "-" * len(lines[0]))
        notes = [f"  {e.modality} {e.name}: {e.note}" for e in self.encoders if e.note]
        verdict = self.problem()
        cap = f"; cap features.max_cache_gb={self.cap_gb:g}" if self.cap_gb is not None else ""
        return "\n".join([
            f"Feature cache plan for {self.corpus}",
            f"(speech: the clean clip plus {self.variants} augmented copies per training clip, one pass for "
            + ("dev and test" if self.folds == 1 else f"test: with trial.folds={self.folds} every labelled clip, dev "
               "included, is a training clip") + "; text: one pass per transcript; 'z': clips z-normalised per "
            "utterance)",
            *lines, *notes,
            f"Total cache for this search: {self.total_gb:,.1f} GB; to encode: {self.missing_bytes / 1e9:,.1f} GB; "
            f"free disk at {self.cache_dir}: {self.free_bytes / 1e9:,.1f} GB{cap}: "
            + ("it fits." if verdict is None else f"IT DOES NOT FIT ({verdict})."),
            f"Time: 2 x parameters x frames (or tokens) at {self.tflops:g} TFLOP/s effective (features.plan_tflops: "
            "set your device's), without model loading, audio decoding and disk time.",
        ])


def human(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.{2 if n < 10 * size else 1}f} {unit}"
    return f"{n:,.0f} B"


def duration(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"


def count_parameters(folder: str | Path) -> int:
    """Parameters of a Hugging Face folder's bare encoder, built on the meta device (no weights are read).

    Counts are kept by the config's bytes and the transformers version in ``~/.cache/emotune``: building the model
    (and importing its transformers module) takes seconds that every search and plan would otherwise pay again."""
    import hashlib
    from importlib.metadata import version

    config_bytes = (Path(folder) / "config.json").read_bytes()
    key = f"{version('transformers')}:{hashlib.sha256(config_bytes).hexdigest()}"
    known = _read_counts()
    if key in known:
        return int(known[key])
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    _write_counts(known | {key: count})
    return count


def _counts_file() -> Path:
    return user_cache_dir() / "parameter-counts.json"


def _read_counts() -> dict:
    try:
        return json.loads(_counts_file().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: count again
        return {}


def _write_counts(counts: dict) -> None:
    path = _counts_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(counts, indent=0, sort_keys=True))
        os.replace(partial, path)  # whole or not at all; a count lost to a concurrent writer is counted again
    except OSError:
        pass  # a read-only home: the count is simply made again next time


def _offline_recipe(name: str, modality: str, features: dict) -> EncoderRecipe | None:
    """A recipe from the catalog alone, for a hub model not on this machine: shapes right, identity unknown."""
    spec = resolve_encoder(name, modality)
    entry = hub_entry(spec)
    if entry is None:
        return None
    layers = tuple(resolve_layers(features[f"{modality}_layers"], entry.layers))
    common = {"spec": spec, "files": None, "identity": "not-downloaded", "n_layers": entry.layers,
              "width": entry.width, "layers": layers, "batch_size": int(features["batch_size"])}
    if modality == "speech":
        return EncoderRecipe(frame_hop=320, conv=SSL_CONV, storage=check_storage(str(features["storage"])),
                             waveform_norm=resolve_waveform_norm(str(features["waveform_norm"]), spec, None),
                             **common)
    return EncoderRecipe(max_tokens=min(int(features["max_text_tokens"]), 510), **common)


def plan_recipe(name: str, modality: str, splits: ClipSplits, features: dict, paths: dict) -> tuple:
    """The recipe, the parameter count and whether cache keys can be known, without any download."""
    spec = resolve_encoder(name, modality)
    corpus = splits.utterances
    tiny_dir, models_dir = encoder_dirs(paths)
    texts = tokenizer_texts(corpus) if corpus else None
    if spec.kind == "tiny" and modality == "text" and corpus is None:
        # a described corpus has no text to train a tokenizer on: size a throw-away build (same shapes)
        tiny_dir, texts = Path(tempfile.mkdtemp(prefix="emotune-plan-")), ["un texto de ejemplo"]
    recipe = resolve_recipe(spec, tiny_dir, models_dir, texts, download=False, **recipe_settings(features, modality))
    if recipe is None:
        entry = hub_entry(spec)
        return _offline_recipe(name, modality, features), (entry.params_m * 1e6 if entry else 0), False
    return recipe, (count_parameters(recipe.files.find()) if recipe.files else 0), corpus is not None


def _jobs(recipe: EncoderRecipe, splits: ClipSplits, features: dict, store: FeatureStore) -> list:
    """The cache jobs of a corpus on disk (keys included), as the fill will make them; the hash memo is not saved."""
    jobs = plan_jobs(splits.utterances, recipe, features, store, save_hashes=False)
    return [j for row in jobs.values() for j in row]


def _job_bytes(recipe: EncoderRecipe, job: SpeechJob | TextJob, tokens: dict | None = None) -> tuple[int, int]:
    if isinstance(job, SpeechJob):
        steps = recipe.steps(job.n_samples)
    else:
        steps = tokens[job.text] if tokens is not None else recipe.steps(job.text)
    return steps, steps * bytes_per_step(recipe) + HEADER_BYTES[recipe.storage]


def _token_counts(recipe: EncoderRecipe, texts: Sequence[str]) -> dict[str, int] | None:
    """Exact token counts from the encoder's own tokenizer (no model weights are read), when it is here."""
    folder = recipe.files.find() if recipe.modality == "text" and recipe.files else None
    if folder is None:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    unique = sorted(set(texts))
    ids = tokenizer(unique, truncation=True, max_length=recipe.max_tokens)["input_ids"]
    return {text: len(row) for text, row in zip(unique, ids)}


def plan_encoder(name: str, modality: str, splits: ClipSplits, features: dict, paths: dict,
                 store: FeatureStore) -> EncoderPlan:
    recipe, params, keys_known = plan_recipe(name, modality, splits, features, paths)
    if recipe is None:
        return EncoderPlan(modality, name, resolve_encoder(name, modality).source, "?", 0, 0, "?", "?", 0, 0, 0, None,
                           0, 0, note="not on this machine and not in the catalog: its shape is unknown "
                                      "until downloaded")
    variants = int(features["variants"]) if modality == "speech" else 0
    n_train, n_dev, n_test = splits.counts()
    cached = missing = steps_missing = steps_all = total = 0.0
    if keys_known:
        jobs = _jobs(recipe, splits, features, store)
        tokens = _token_counts(recipe, [j.text for j in jobs if isinstance(j, TextJob)])
        for job in {j.key: j for j in jobs}.values():
            steps, size = _job_bytes(recipe, job, tokens)
            steps_all += steps
            total += size
            if store.exists(job.key):
                cached += store.path(job.key).stat().st_size
            else:
                missing += size
                steps_missing += steps
        passes = float(len(jobs))
    else:
        per_split = []
        for clips, count in ((splits.train, n_train), (splits.dev, n_dev), (splits.test, n_test)):
            sized = [_job_bytes(recipe, SpeechJob("", "", 0, 0, c.n_samples) if modality == "speech"
                                else TextJob("", c.text)) for c in clips]
            scale = count / max(1, len(clips)) if splits.shares else 1.0
            per_split.append((sum(s for s, _ in sized) * scale, sum(b for _, b in sized) * scale))
        dev_copies = 1 + variants if int(features.get("folds") or 1) > 1 else 1  # K folds train on dev clips too
        copies = (1 + variants, dev_copies, 1)
        steps_all = sum(s * k for (s, _), k in zip(per_split, copies))
        total = sum(b * k for (_, b), k in zip(per_split, copies))
        passes = n_train * (1 + variants) + n_dev * dev_copies + n_test
        missing, steps_missing = total, steps_all
    tflops = float(features["plan_tflops"])
    note = ""
    if not keys_known and splits.utterances is not None:
        note = "not on this machine: shapes from the catalog; what the cache holds is known after the download"
    return EncoderPlan(
        modality, name, recipe.spec.source, f"{len(recipe.layers)}/{recipe.n_layers}", recipe.width, params / 1e6,
        recipe.storage, recipe.waveform_norm, passes, steps_all, total, cached if keys_known else None, missing,
        2 * params * steps_missing / (tflops * 1e12), note)


def plan_cache(features: dict, paths: dict, splits: ClipSplits, encoders: dict[str, Sequence[str]]) -> CachePlan:
    """The plan for every encoder each modality may use (``encoders``: modality -> names)."""
    store = FeatureStore(features["dir"])
    plan = CachePlan(splits.description, int(features["variants"]), float(features["plan_tflops"]),
                     str(store.root), free_bytes(store.root), features["max_cache_gb"],
                     folds=int(features.get("folds") or 1))
    if not features["cache"]:
        return plan  # live features: nothing is stored
    for modality, names in encoders.items():
        for name in names:
            plan.encoders.append(plan_encoder(name, modality, splits, features, paths, store))
    return plan


def refuse_if_too_big(plan: CachePlan) -> None:
    """Stop before any download or encoding when the missing cache cannot be built; the message names the ways out."""
    problem = plan.problem()
    if problem:
        raise EmotuneError(
            f"{problem}, so the search stops before downloading or encoding anything (the plan is above). Ways out: "
            "store fewer layers (features.speech_layers=every_3 or last), store int8 (features.storage=int8), fewer "
            "augmented copies (features.variants=2), fewer encoders (encoders.speech_choices=[...], "
            "encoders.text_choices=[...]), a larger disk (features.dir=/big/disk/cache), or a higher "
            "features.max_cache_gb.")
