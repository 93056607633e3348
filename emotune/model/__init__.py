"""Trainable heads on frozen speech/text encoder features, and :func:`build_model` to pick one from a config."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from emotune.errors import EmotuneError
from emotune.model.heads import AttentionPoolingModel, ClassifierHead, CogniCICModel, FeatureAdapter
from emotune.model.pooling import AttentionPooling, LayerMix, masked_mean
from emotune.names import MODALITIES

FAMILIES = ("attention", "cognicic")

__all__ = [
    "FAMILIES",
    "AttentionPooling",
    "AttentionPoolingModel",
    "ClassifierHead",
    "CogniCICModel",
    "FeatureAdapter",
    "LayerMix",
    "build_model",
    "masked_mean",
    "modalities_of",
]


def modalities_of(cfg: Mapping[str, Any]) -> list[str]:
    """The modalities a model config uses (both when unset); an unknown one is a clear error."""
    modalities = list(cfg.get("modalities") or MODALITIES)
    if set(modalities) - set(MODALITIES):
        raise EmotuneError(f"model.modalities must be a non-empty subset of [speech, text], got {modalities}")
    return modalities


def build_model(
    cfg: Mapping[str, Any],
    dims: Mapping[str, tuple[int, int]],
    n_classes: int,
    norms: Mapping[str, str] | None = None,
) -> nn.Module:
    """The model described by ``cfg`` for features of ``dims`` (modality -> (n_layers, width)).

    ``cfg`` holds ``family`` ("attention" or "cognicic"), ``width``, ``hidden_layers``, ``dropout`` and
    optionally ``fused_dim``. The CogniCIC baseline has a fixed architecture: it uses only ``dropout``
    and ``branch_width``.
    """
    family = cfg.get("family")
    if family not in FAMILIES:
        raise EmotuneError(f"unknown model family '{family}'; the known families are {', '.join(FAMILIES)}.")
    try:
        if family == "attention":
            return AttentionPoolingModel(
                dims,
                n_classes,
                width=int(cfg["width"]),
                hidden_layers=int(cfg["hidden_layers"]),
                dropout=float(cfg["dropout"]),
                norms=norms,
                fused_dim=None if cfg.get("fused_dim") is None else int(cfg["fused_dim"]),
            )
        return CogniCICModel(
            dims,
            n_classes,
            dropout=float(cfg["dropout"]),
            norms=norms,
            branch_width=int(cfg["branch_width"]),
        )
    except KeyError as missing:
        raise EmotuneError(
            f"the model configuration has no {missing} entry; the '{family}' family needs "
            f"{'width, hidden_layers and dropout' if family == 'attention' else 'branch_width and dropout'}."
        ) from None
