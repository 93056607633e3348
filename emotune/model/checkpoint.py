"""A trained model as it leaves a trial: its weights and its model card, written and read only here.

A model folder holds ``model.safetensors`` (the weights) and ``model_card.json`` (the card). The card says how
to rebuild the model (family settings, each modality's layers, width and normalisation, the label order) and
its inputs (each encoder as its recipe describes it, the waveform normalisation statistics), and where it came
from (best epoch, dev macro-F1, trial seed). A trial writes it, ``select-top`` copies it into an ensemble, and
``predict`` loads it.

Cards carry a format number. Cards written before it existed (format 1) load with the settings of that time:
encoders fed the corpus-wide waveform normalisation, features stored as float16. Format 3 added ``folds``: a
card without it describes one head.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from emotune.errors import EmotuneError

CARD_FORMAT = 3
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"

# What a card written before each setting existed was trained with (see the module docstring).
_ENCODER_DEFAULTS = {"waveform_norm": "global", "storage": "float16", "layer_indices": "all"}
_REQUIRED = ("labels", "dims", "norms", "model", "encoders")


@dataclass(frozen=True)
class ModelCard:
    """What ``predict`` needs to rebuild a trained model and feed it as its trial did."""

    labels: list[str]
    dims: dict[str, tuple[int, int]]  # per modality: (encoder layers kept, width)
    norms: dict[str, str]  # per modality: the model's feature normalisation
    model: dict  # the model family's settings (``model.*``)
    encoders: dict[str, dict]  # per modality: the encoder's recipe description (EncoderRecipe.describe)
    encoder_names: dict = field(default_factory=dict)  # ``encoders.*`` as configured
    norm_stats: dict = field(default_factory=dict)  # the training side's waveform mean and std
    features: dict = field(default_factory=dict)  # the feature settings the cache was built with
    best_epoch: int | float = 0  # fractional when the best dev evaluation came within an epoch
    best_val_f1: float = float("nan")
    trial_seed: int | None = None
    folds: int = 1  # K > 1: the weights are K heads (a FoldBag), each trained on K-1 folds; it predicts their mean
    fold_seed: int | None = None  # the seed those folds were drawn with
    format: int = CARD_FORMAT

    def to_dict(self) -> dict:
        data = asdict(self)
        data["dims"] = {m: list(d) for m, d in self.dims.items()}
        return data

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CARD_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_dict(cls, data: dict, source: str = "the model card") -> "ModelCard":
        """Validate a card read from disk and fill what older formats lack."""
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise EmotuneError(f"{source} lacks {', '.join(missing)}: it was not written by emotune's trial. "
                               "Recreate the ensemble with `emotune select-top`.")
        version = int(data.get("format", 1))
        if version > CARD_FORMAT:
            raise EmotuneError(f"{source} has format {version}, newer than this emotune reads ({CARD_FORMAT}): "
                               "upgrade emotune.")
        features = dict(data.get("features") or {})
        encoders = {}
        for modality, description in data["encoders"].items():
            description = dict(description)
            for key, default in _ENCODER_DEFAULTS.items():
                if not description.get(key):
                    description[key] = default
            if not description.get("max_tokens"):
                description["max_tokens"] = int(features.get("max_text_tokens") or 256)
            encoders[modality] = description
        model = dict(data["model"])
        if model.get("family") == "cognicic":  # searches that sampled the family wrote no width: the 256 they used
            model.setdefault("branch_width", 256)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known and k not in ("dims", "encoders", "format", "model")},
                   dims={m: (int(d[0]), int(d[1])) for m, d in data["dims"].items()}, encoders=encoders,
                   model=model, format=CARD_FORMAT)

    @classmethod
    def load(cls, folder: str | Path) -> "ModelCard":
        path = Path(folder) / CARD_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EmotuneError(f"cannot read the model card {path}: {exc}. Recreate it with `emotune select-top` "
                               "(an ensemble) or by re-running the trial.") from None
        return cls.from_dict(data, str(path))

    def build_model(self) -> torch.nn.Module:
        """The untrained model this card describes (a bag of ``folds`` heads when there are several)."""
        from emotune.model import build_model
        from emotune.model.bag import FoldBag

        heads = [build_model(self.model, self.dims, len(self.labels), self.norms) for _ in range(max(1, self.folds))]
        return heads[0] if len(heads) == 1 else FoldBag(heads)


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model


def save_model(model: torch.nn.Module, card: ModelCard, folder: str | Path) -> list[Path]:
    """Write the model folder (weights and card); returns the two files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [save_weights(model, folder / WEIGHTS_FILE), card.save(folder)]


def load_model(folder: str | Path, what: str | None = None) -> tuple[torch.nn.Module, ModelCard]:
    """The trained model of a model folder, in eval mode, with its card (``what`` names it in errors)."""
    folder = Path(folder)
    missing = [name for name in (WEIGHTS_FILE, CARD_FILE) if not (folder / name).is_file()]
    if missing:
        raise EmotuneError(f"{what or folder} is incomplete: {', '.join(missing)} missing in {folder}. Recreate it "
                           "with `emotune select-top` (an ensemble) or by re-running the trial.")
    card = ModelCard.load(folder)
    model = load_weights(card.build_model(), folder / WEIGHTS_FILE)
    return model.eval(), card
