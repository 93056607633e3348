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

from emotune.checkpoint import ModelCard
from emotune.data.audio import NormStats, load_audio
from emotune.data.corpus import Utterance
from emotune.errors import DataError, EmotuneError


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
    """A loaded ensemble folder (see ``emotune.ensemble``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser().resolve()
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
        from emotune.checkpoint import load_model

        model, card = load_model(self.folder / entry["folder"],
                                 f"ensemble member {entry['folder']} ({entry.get('name', '?')})")
        return Member(model, card, float(entry.get("weight", 1.0)))

    def _encoder(self, modality: str, description: dict):
        """The encoder a member was trained on, rebuilt from its card; refused if it no longer matches."""
        from emotune.features.catalog import EncoderSpec
        from emotune.features.encode import locate_hf_folder, make_recipe, open_encoder

        key = description["key"]
        if key in self._encoders:
            return self._encoders[key]
        spec = EncoderSpec(description["name"], modality, description["kind"], description["source"])
        folder = None
        if spec.kind != "classic":
            shipped = self.manifest.get("encoder_folders", {}).get(description.get("folder") or "")
            folder = self.folder / shipped if shipped else locate_hf_folder(spec)
            if not Path(folder).is_dir():
                raise EmotuneError(f"the {modality} encoder of this ensemble is missing: {folder}")
        recipe = make_recipe(spec, folder, description["layer_indices"], max_tokens=int(description["max_tokens"]),
                             waveform_norm=description["waveform_norm"], storage=description["storage"])
        if recipe.key != key:
            raise EmotuneError(f"the {modality} encoder '{spec.name}' found now ({recipe.key}) differs from the one "
                               f"the ensemble was trained with ({key}); its predictions would be meaningless.")
        self._encoders[key] = open_encoder(recipe)
        return self._encoders[key]

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
        from emotune.ensemble import combine
        from emotune.features.source import pad_batch

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


def read_inputs(csv_path: str | None, audio_dir: str | None, audio: str | None, text: str | None,
                on_error: str = "raise"):
    """The utterances to predict and the report of rows left out (``on_error=skip``)."""
    from emotune.data.corpus import ErrorPolicy, SkipReport, read_split_csv, scan_audio

    report = SkipReport()
    policy = ErrorPolicy(on_error, report)
    if csv_path:
        if not audio_dir:
            raise EmotuneError("--csv needs --audio-dir: the folder holding the audio files named by id")
        utterances = read_split_csv(csv_path, audio_dir, require_labels=False, policy=policy)
    elif audio:
        if text is None or not text.strip():
            raise EmotuneError("--audio needs --text with the clip's transcript (the model uses both)")
        path = Path(audio).expanduser().resolve()
        if not path.is_file():
            raise DataError("audio file not found", file=path, fix="Check the path.")
        utterances = [Utterance(path.name, path, " ".join(text.split()), None, "(command line)", 0)]
    else:
        raise EmotuneError("give either --csv FILE --audio-dir DIR or --audio FILE --text TEXT")
    utterances, _ = scan_audio(utterances, policy, progress=False)
    return utterances, report


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
