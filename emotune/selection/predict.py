"""Predict new clips with a saved ensemble: run its encoders on the audio and text, combine its members.

    emotune predict runs/ensembles/encoders-hard-k3 --csv new.csv --audio-dir clips/ --out predictions.csv
    emotune predict runs/ensembles/encoders-hard-k3 --audio clip.wav --text "¡Qué alegría verte!"

The ensemble folder holds everything needed (member checkpoints and model cards, the normalisation
statistics, the label order, the tiny encoders built offline); hub encoders come from the Hugging Face cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from emotune.data.audio import NormStats, load_audio
from emotune.data.corpus import ErrorPolicy, Utterance
from emotune.errors import DataError, EmotuneError
from emotune.model.checkpoint import ModelCard

# Clips per predict chunk. A chunk's encoder outputs are all in memory at once (a large speech encoder with all
# layers: about 10 MB per second of audio), so a chunk of 16 clips of MEACorpus' 9 s holds about 1.5 GB of
# them, whatever the number of clips (benchmarks/scale.md).
CHUNK_CLIPS = 16


@dataclass
class Member:
    model: torch.nn.Module
    card: ModelCard
    weight: float


class Ensemble:
    """A loaded ensemble folder (see ``emotune.selection.ensemble``)."""

    def __init__(self, folder: str | Path, models_dir: str | Path | None = None) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.models_dir = str(Path(models_dir).expanduser().resolve()) if models_dir else ""  # paths.models_dir
        manifest_path = self.folder / "ensemble.json"
        if not manifest_path.is_file():
            raise EmotuneError(f"{self.folder} is not an ensemble folder (no ensemble.json); create one with "
                               "`emotune select-top`.")
        self.manifest = json.loads(manifest_path.read_text())
        self.labels = list(self.manifest["labels"])
        self.method = self.manifest["method"]
        offsets = self.manifest.get("calibration_offsets")
        self.offsets = np.asarray(offsets) if offsets is not None else None
        self.norm = NormStats(**self.manifest["norm_stats"])
        self.members = [self._load_member(entry) for entry in self.manifest["members"]]
        self._encoders: dict[str, object] = {}

    def _load_member(self, entry: dict) -> Member:
        from emotune.model.checkpoint import load_model

        model, card = load_model(self.folder / entry["folder"],
                                 f"ensemble member {entry['folder']} ({entry.get('name', '?')})")
        return Member(model, card, float(entry.get("weight", 1.0)))

    def _encoder(self, modality: str, description: dict):
        """The encoder a member was trained on, rebuilt from its card; refused if it no longer matches."""
        from emotune.features.catalog import EncoderSpec
        from emotune.features.encode import open_encoder
        from emotune.features.recipe import make_recipe

        key = description["key"]
        if key in self._encoders:
            return self._encoders[key]
        spec = EncoderSpec(description["name"], modality, description["kind"], description["source"])
        folder, shipped = None, None
        if spec.kind != "classic":
            shipped = self.manifest.get("encoder_folders", {}).get(description.get("folder") or "")
            folder = self.folder / shipped if shipped else self._files(spec, description).fetch(
                f"the {modality} encoder '{spec.name}' of this ensemble")
        recipe = make_recipe(spec, folder, description["layer_indices"], max_tokens=int(description["max_tokens"]),
                             waveform_norm=description["waveform_norm"], storage=description["storage"])
        if recipe.key != key:
            raise _changed_encoder(recipe, key, description, shipped_with_ensemble=bool(shipped))
        self._encoders[key] = open_encoder(recipe)
        return self._encoders[key]

    def _files(self, spec, description: dict):
        """Where a member's encoder is, found as a trial's was: a folder, or a hub id at the commit the member was
        trained on (this machine's Hugging Face cache, then the models folder). Cards from before commits were
        recorded name a hub model's folder on the training machine: its main branch is looked up instead."""
        from emotune.features.locate import EncoderFiles

        if spec.kind == "tiny" or Path(spec.source).is_absolute():
            return EncoderFiles(folder=str(description.get("folder") or spec.source))
        return EncoderFiles(repo_id=spec.source, revision=description.get("revision") or "", models_dir=self.models_dir)

    def _features(self, member: Member, chunk: Sequence[Utterance], encoded: dict, waves: list) -> dict:
        """A member's inputs for ``chunk``, as its trials read them from the cache (same storage rounding)."""
        from emotune.features.cache import as_stored

        features: dict[str, list[np.ndarray]] = {}
        for modality in member.model.modalities:
            description = member.card.encoders[modality]
            if description["key"] not in encoded:  # members sharing an encoder share its outputs
                encoder = self._encoder(modality, description)
                if modality == "speech":
                    if not waves:
                        waves.extend(self.norm.apply(load_audio(u.audio)) for u in chunk)
                    outputs = encoder.encode(waves)
                else:
                    outputs = encoder.encode([u.text for u in chunk])
                encoded[description["key"]] = [as_stored(a, description["storage"]) for a in outputs]
            features[modality] = encoded[description["key"]]
        return features

    @torch.inference_mode()
    def predict(self, utterances: Sequence[Utterance], batch_size: int = 16, chunk_size: int = CHUNK_CLIPS,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Class indices and class scores (probabilities, or vote shares for ``hard``) per utterance.

        Clips go through in chunks: load, encode, run every member, keep the probabilities, and drop the
        waveforms and features before the next chunk, so memory does not grow with the number of clips.
        """
        from emotune.features.source import pad_batch
        from emotune.selection.ensemble import combine

        member_probs: list[list[np.ndarray]] = [[] for _ in self.members]
        bar = None
        if progress and len(utterances) > chunk_size:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(utterances), desc="predicting", unit="clip")
        for start in range(0, len(utterances), chunk_size):
            chunk = utterances[start : start + chunk_size]
            encoded: dict[str, list[np.ndarray]] = {}
            waves: list[np.ndarray] = []
            for member, probs in zip(self.members, member_probs):
                features = self._features(member, chunk, encoded, waves)
                for first in range(0, len(chunk), batch_size):
                    batch = {}
                    for modality, arrays in features.items():
                        batch[modality], batch[f"{modality}_mask"] = pad_batch(arrays[first : first + batch_size])
                    probs.append(torch.softmax(member.model(batch), dim=-1).numpy().astype(np.float64))
            del encoded, waves, features, arrays, batch  # nothing of this chunk outlives it
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return combine(self.method, [np.concatenate(p) for p in member_probs], [m.weight for m in self.members],
                       self.offsets)


def _changed_encoder(recipe, trained_key: str, description: dict, shipped_with_ensemble: bool) -> EmotuneError:
    """The refusal to feed members from an encoder that is not the one they were trained on, with its remedy."""
    folder = recipe.files.find() if recipe.files else None
    what = (f"the {recipe.modality} encoder '{recipe.spec.name}' in {folder or recipe.spec.source} is not the "
            f"one this ensemble was trained with")
    if folder and not trained_key.startswith(recipe.identity):
        change = "its files (weights, config or tokenizer) changed since the search"
    else:
        change = "its settings differ"
    found = (f"{what}: {change} (cache key now {recipe.key}, trained with {trained_key}), so the members would get "
             "features they never saw and their predictions would be meaningless.")
    if shipped_with_ensemble:
        fix = (f"select-top copied it into the ensemble folder from {description.get('folder')}: put the original "
               "files back, or write the ensemble again with `emotune select-top`.")
    else:
        fix = ("Put back the version the search used (the same hub revision or saved folder), or run the search "
               "and `emotune select-top` again with this encoder.")
    return EmotuneError(f"{found} Fix: {fix}")


class _RowPolicy(ErrorPolicy):
    """The corpus' row policy; a bad row that stops predict also says that ``--on-error skip`` would go on."""

    def handle(self, error: DataError) -> None:
        if self.on_error == "raise":
            raise DataError(error.problem, file=error.file, row=error.row, utt_id=error.utt_id, kind=error.kind,
                            fix=f"{error.fix} Or pass --on-error skip to predict the other rows and list the bad ones.")
        super().handle(error)


def read_inputs(csv_path: str | None, audio_dir: str | None, audio: str | None, text: str | None,
                on_error: str = "raise"):
    """The utterances to predict (never none) and the report of rows left out (``on_error=skip``)."""
    from emotune.data.corpus import SkipReport, read_split_csv, scan_audio

    report = SkipReport()
    if csv_path:
        if not audio_dir:
            raise EmotuneError("--csv needs --audio-dir: the folder holding the audio files named by id")
        policy = _RowPolicy(on_error, report)
        utterances = read_split_csv(csv_path, audio_dir, require_labels=False, policy=policy)
        utterances, _ = scan_audio(utterances, policy, progress=False)
        _require_rows(utterances, report, csv_path)
        return utterances, report
    if audio:
        if text is None or not text.strip():
            raise EmotuneError("--audio needs --text with the clip's transcript (the model uses both)")
        path = Path(audio).expanduser().resolve()
        if not path.is_file():
            raise DataError("audio file not found", file=path, fix="Check the path.")
        utterances = [Utterance(path.name, path, " ".join(text.split()), None, "(command line)", 0)]
        utterances, _ = scan_audio(utterances, ErrorPolicy("raise", report), progress=False)
        return utterances, report
    raise EmotuneError("give either --csv FILE --audio-dir DIR or --audio FILE --text TEXT")


def _require_rows(utterances: list, report, csv_path: str) -> None:
    """Nothing to predict is an error that says why: a CSV without rows, or every row skipped (listed)."""
    if utterances:
        return
    if not len(report):
        raise DataError("has no rows to predict, only a header", file=Path(csv_path).expanduser().resolve(),
                        fix="Add one row per clip (id,transcription, the id naming its file in --audio-dir).",
                        kind="no rows")
    raise EmotuneError(f"nothing to predict: all {len(report)} rows of {csv_path} were skipped. {report.summary()}\n"
                       "Fix those rows (each line says how) and predict again.")


def write_output(path: str | None, utterances, predicted: np.ndarray, scores: np.ndarray, labels) -> str:
    """CSV (``id,prediction,p_<class>...``) or JSON, chosen by the file suffix; to stdout without a path."""
    rows = [{"id": u.id, "prediction": labels[int(p)], **{f"p_{c}": round(float(s), 6) for c, s in zip(labels, row)}}
            for u, p, row in zip(utterances, predicted, scores)]
    if path and path.endswith(".json"):
        text = json.dumps(rows, indent=2, ensure_ascii=False)
    else:
        header = ["id", "prediction", *(f"p_{c}" for c in labels)]
        text = "\n".join([",".join(header)] + [",".join(str(r[h]) for h in header) for r in rows])
    if path:
        Path(path).write_text(text + "\n", encoding="utf-8")
    return text
