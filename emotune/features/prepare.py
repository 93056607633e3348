"""From a prepared corpus and the encoder settings to a filled feature cache and its index.

This is the features layer's entry point: the search calls it once before trials start, a standalone
``emotune train`` calls it itself, and with ``features.cache=false`` it only loads the encoders. Encoders are
known first as recipes (shapes and cache keys, read from their config files), and loaded only where
something must be encoded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from emotune.data.augment import Augmenter
from emotune.data.prepare import PreparedCorpus
from emotune.features.cache import (
    AudioHashes,
    BuildReport,
    FeatureIndex,
    FeatureStore,
    encode_jobs,
    fill_missing,
    speech_jobs,
    text_jobs,
)
from emotune.features.catalog import resolve_encoder
from emotune.features.encode import FrozenEncoder, open_encoder
from emotune.features.recipe import EncoderRecipe, recipe_settings, resolve_recipe


def tokenizer_texts(corpus: PreparedCorpus) -> list[str]:
    """The text a tiny preset's tokenizer is trained on: the training split only.

    Dev chooses hyperparameters and members and test scores them; a vocabulary fitted to their words would
    tokenize them better than any unseen text, and the scores would no longer say how new text fares.
    """
    return [u.text for u in corpus.train]


def encoder_dirs(paths: dict) -> tuple[Path, str | None]:
    """Where tiny presets are built, and the shared models folder (``paths.models_dir``, None when not set)."""
    shared = paths.get("models_dir")
    return Path(shared or Path(paths["runs_dir"]) / "encoders"), shared or None


def encoder_recipe(name: str, modality: str, corpus: PreparedCorpus, features: dict, paths: dict,
                   download: bool = True) -> EncoderRecipe | None:
    """The recipe of one named encoder, resolved once for every node (a tiny preset is built on first use, its
    tokenizer on the training text; a hub model is copied into ``paths.models_dir`` when that is set).

    With ``download=False`` a hub model that is not on this machine gives None instead of a download.
    """
    tiny_dir, models_dir = encoder_dirs(paths)
    return resolve_recipe(resolve_encoder(name, modality), tiny_dir, models_dir, tokenizer_texts(corpus), download,
                          **recipe_settings(features, modality))


def resolve_recipes(corpus: PreparedCorpus, encoders: dict[str, list[str]], features: dict,
                    paths: dict) -> dict[str, EncoderRecipe]:
    """The recipe of every encoder a search can pick (``encoders``: names by modality), keyed ``modality/name``."""
    return {f"{m}/{name}": encoder_recipe(name, m, corpus, features, paths) for m, names in encoders.items()
            for name in names}


def modality_recipes(corpus: PreparedCorpus, encoders: dict, features: dict, modalities: Sequence[str], paths: dict,
                     recipes: dict[str, EncoderRecipe] | None = None) -> dict[str, EncoderRecipe]:
    """The recipe of each modality's encoder named in ``encoders``: the driver's (``recipes``, keyed ``modality/name``,
    resolved once for every node) when it has one, else resolved here."""
    given = recipes or {}
    return {m: given.get(f"{m}/{encoders[m]}") or encoder_recipe(encoders[m], m, corpus, features, paths)
            for m in modalities}


def load_encoders(corpus: PreparedCorpus, encoders: dict, features: dict, modalities: Sequence[str], paths: dict,
                  recipes: dict[str, EncoderRecipe] | None = None) -> dict[str, FrozenEncoder]:
    """The encoder of each modality named in ``encoders``, loaded onto ``features.device``."""
    chosen = modality_recipes(corpus, encoders, features, modalities, paths, recipes)
    return {m: open_encoder(recipe, features["device"]) for m, recipe in chosen.items()}


def describe(encoder: FrozenEncoder) -> dict:
    return encoder.recipe.describe()


def plan_jobs(corpus: PreparedCorpus, recipe: EncoderRecipe, features: dict, store: FeatureStore,
              save_hashes: bool = True) -> dict[str, list]:
    """For each utterance id, the cache jobs holding its features (speech: clean, then training variants)."""
    if recipe.modality == "text":
        return {uid: [job] for uid, job in text_jobs(recipe.key, corpus.train + corpus.dev + corpus.test).items()}
    hashes = AudioHashes(store.root / "audio_hashes.json")
    augment = dict(features["augment"])
    # with K folds every labelled clip is trained on (in K-1 folds), so dev clips need augmented copies too
    labelled = int(features.get("folds") or 1) > 1
    trained, untrained = ((corpus.train + corpus.dev, corpus.test) if labelled
                          else (corpus.train, corpus.dev + corpus.test))
    jobs = speech_jobs(recipe.key, trained, corpus.audio, corpus.norm, hashes, int(features["variants"]), augment)
    jobs |= speech_jobs(recipe.key, untrained, corpus.audio, corpus.norm, hashes, 0, augment)
    if save_hashes:
        hashes.save()
    return jobs


def fill_cache(recipe: EncoderRecipe, jobs: dict[str, list], corpus: PreparedCorpus, features: dict,
               progress: bool = True, pool=None) -> BuildReport:
    """Encode what the cache lacks; with ``pool`` (which returns the Ray cache workers of features/distributed.py,
    started on first use), they share the work.

    The encoder is loaded only when something is missing: a warm cache costs no model load at all.
    """
    store = FeatureStore(features["dir"])
    speech = recipe.modality == "speech"

    def start():
        if pool is not None:
            workers = pool()
            return f", {workers.label}", lambda todo, bar, report: workers.fill(recipe, todo, bar, report)
        encoder = open_encoder(recipe, features["device"])
        augmenter = Augmenter.from_settings(features.get("augment")) if speech else None

        def encode(todo, bar, report: BuildReport) -> None:
            report.encoder_calls, report.bytes_written = encode_jobs(encoder, todo, store,
                                                                     corpus.norm if speech else None, augmenter, bar)
        return "", encode

    return fill_missing(recipe, [j for row in jobs.values() for j in row], store, bool(features["verify"]),
                        progress, start)


def index_part(recipe: EncoderRecipe, jobs: dict[str, list], store: FeatureStore) -> FeatureIndex:
    """What a trial needs to read one encoder's cached features: its description and each clip's keys.

    Parts are small and picklable: the search builds one per encoder before trials start and hands them
    to the trials, which then never load an encoder themselves.
    """
    part = FeatureIndex(cache_dir=str(store.root), encoders={recipe.modality: recipe.describe()})
    if recipe.modality == "speech":
        part.speech = {uid: [j.key for j in row] for uid, row in jobs.items()}
    else:
        part.text = {uid: row[0].key for uid, row in jobs.items()}
    return part


def cache_encoder(recipe: EncoderRecipe, corpus: PreparedCorpus, features: dict, progress: bool = True,
                  pool=None) -> tuple[BuildReport, FeatureIndex]:
    """Fill the cache of one encoder for every utterance of ``corpus`` (``pool``: see :func:`fill_cache`).

    Returns the build report and the index part a trial reads this encoder's features with.
    """
    store = FeatureStore(features["dir"])
    jobs = plan_jobs(corpus, recipe, features, store)
    report = fill_cache(recipe, jobs, corpus, features, progress, pool)
    return report, index_part(recipe, jobs, store)


def prepare_features(corpus: PreparedCorpus, encoders: dict, features: dict, modalities: Sequence[str], paths: dict,
                     progress: bool = True, recipes: dict[str, EncoderRecipe] | None = None) -> FeatureIndex:
    """Fill the cache for every utterance of ``corpus`` and return where each one's features are (``recipes``: see
    :func:`modality_recipes`)."""
    parts = []
    for recipe in modality_recipes(corpus, encoders, features, modalities, paths, recipes).values():
        report, part = cache_encoder(recipe, corpus, features, progress)
        parts.append(part)
        if progress:
            print(report.line())
    return FeatureIndex.merge(parts)
