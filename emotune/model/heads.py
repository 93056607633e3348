"""The trainable models that sit on top of frozen speech and text encoders.

Both families read a batch dict holding, per modality ``m`` in ("speech", "text"), the hidden states of
every encoder layer ``batch[m]`` (B, L, T, D) and a padding mask ``batch[m + "_mask"]`` (B, T, True = real).

* :class:`AttentionPoolingModel` is the EmoSPeech 2024 winner (BSC-UPC): learned layer mix and LayerNorm per
  modality, speech frames and text tokens concatenated along time, attention pooling, MLP classifier. Unlike
  the paper it accepts encoders of different widths by projecting them to one fused width.
* :class:`CogniCICModel` is the simpler CogniCIC baseline: layer mix, mean over time and a small MLP.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from emotune.errors import EmotuneError
from emotune.model.pooling import AttentionPooling, LayerMix, masked_mean
from emotune.names import MODALITIES

NORMS = ("layer", "global", "none")


def _ordered_modalities(dims: Mapping[str, tuple[int, int]]) -> tuple[str, ...]:
    unknown = sorted(set(dims) - set(MODALITIES))
    if unknown:
        raise EmotuneError(
            f"unknown modality {', '.join(map(repr, unknown))}; the models know {', '.join(MODALITIES)}."
        )
    present = tuple(m for m in MODALITIES if m in dims)
    if not present:
        raise EmotuneError(f"a model needs at least one modality out of {', '.join(MODALITIES)}; none was given.")
    return present


def _modality_input(batch: Mapping[str, Tensor], modality: str) -> tuple[Tensor, Tensor]:
    mask_key = f"{modality}_mask"
    if modality not in batch or mask_key not in batch:
        raise EmotuneError(
            f"the model was built for {modality} features but the batch has no '{modality}' and '{mask_key}' "
            f"entries (it has: {', '.join(sorted(batch)) or 'nothing'})."
        )
    # Cached features are stored as float16 to halve their size on disk; the heads train in float32.
    return batch[modality].float(), batch[mask_key].to(torch.bool)


class ClassifierHead(nn.Module):
    """MLP classifier: Dropout, then (Linear, LayerNorm, GELU, Dropout) x (1 + hidden_layers), then Linear."""

    def __init__(
        self, in_dim: int, n_classes: int, width: int = 512, hidden_layers: int = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if hidden_layers < 0:
            raise ValueError(f"hidden_layers must be 0 or more, got {hidden_layers}")
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        fan_in = in_dim
        for _ in range(1 + hidden_layers):
            layers += [nn.Linear(fan_in, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(dropout)]
            fan_in = width
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class FeatureAdapter(nn.Module):
    """Turns one modality's per-layer features (B, L, T, D) into one sequence (B, T, out_dim).

    Steps: :class:`LayerMix` over the L layers, a per-position normalisation chosen by ``norm`` and, when
    ``out_dim`` differs from D, a learned projection.

    ``norm`` is "layer" (``nn.LayerNorm(D)``, what the winners used), "global" (a fixed standardisation with
    per-dimension statistics of the training set, given through :meth:`set_statistics` and stored in the
    state dict so a saved model carries them) or "none".
    """

    def __init__(self, n_layers: int, width: int, norm: str = "layer", out_dim: int | None = None) -> None:
        super().__init__()
        if norm not in NORMS:
            raise EmotuneError(f"unknown feature normalisation '{norm}'; choose one of {', '.join(NORMS)}.")
        self.n_layers = n_layers
        self.width = width
        self.norm_kind = norm
        self.out_dim = out_dim if out_dim is not None else width
        self.layer_mix = LayerMix(n_layers)
        self.layer_norm = nn.LayerNorm(width) if norm == "layer" else None
        self.needs_statistics = norm == "global"
        if self.needs_statistics:
            self.register_buffer("mean", torch.zeros(width), persistent=True)
            self.register_buffer("std", torch.ones(width), persistent=True)
        self.projection = nn.Linear(width, self.out_dim) if self.out_dim != width else None

    def set_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Set the per-dimension mean and standard deviation used by the "global" normalisation."""
        if not self.needs_statistics:
            raise EmotuneError(
                f"feature statistics are only used by the 'global' normalisation, this adapter uses '{self.norm_kind}'."
            )
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (self.width,) or std.shape != (self.width,):
            raise EmotuneError(
                f"feature statistics must have shape ({self.width},), got mean {tuple(mean.shape)} "
                f"and std {tuple(std.shape)}."
            )
        self.mean.copy_(mean)
        # A dimension that is constant over the training set has std 0; dividing by it would turn every
        # feature of that dimension into inf or NaN instead of simply centring it.
        self.std.copy_(std.clamp_min(1e-6))

    def normalise(self, x: Tensor) -> Tensor:
        """Layer mix and normalisation, without the projection: (B, L, T, D) -> (B, T, D)."""
        if x.shape[-1] != self.width:
            raise EmotuneError(f"expected features of width {self.width}, got {x.shape[-1]}.")
        h = self.layer_mix(x)
        if self.layer_norm is not None:
            h = self.layer_norm(h)
        elif self.needs_statistics:
            h = (h - self.mean) / self.std
        return h

    def forward(self, x: Tensor) -> Tensor:
        h = self.normalise(x)
        return self.projection(h) if self.projection is not None else h


def _adapters(
    dims: Mapping[str, tuple[int, int]],
    modalities: tuple[str, ...],
    norms: Mapping[str, str] | None,
    out_dim: int | None,
) -> nn.ModuleDict:
    norms = dict(norms or {})
    unknown = sorted(set(norms) - set(modalities))
    if unknown:
        raise EmotuneError(
            f"a normalisation was given for {', '.join(unknown)} but the model only has {', '.join(modalities)}."
        )
    return nn.ModuleDict(
        {
            m: FeatureAdapter(dims[m][0], dims[m][1], norm=norms.get(m, "layer"), out_dim=out_dim)
            for m in modalities
        }
    )


class AttentionPoolingModel(nn.Module):
    """The EmoSPeech 2024 winning model: adapt each modality, concatenate in time, attention-pool, classify.

    ``dims`` maps each modality to (n_layers, width). The fused width E is ``fused_dim`` when given, else the
    widest modality; a modality of another width is projected to E (the paper required equal widths).
    """

    def __init__(
        self,
        dims: Mapping[str, tuple[int, int]],
        n_classes: int,
        width: int = 512,
        hidden_layers: int = 2,
        dropout: float = 0.1,
        norms: Mapping[str, str] | None = None,
        fused_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.modalities = _ordered_modalities(dims)
        self.fused_dim = fused_dim if fused_dim is not None else max(dims[m][1] for m in self.modalities)
        self.adapters = _adapters(dims, self.modalities, norms, self.fused_dim)
        self.attention = AttentionPooling(self.fused_dim)
        self.classifier = ClassifierHead(self.fused_dim, n_classes, width, hidden_layers, dropout)

    def pool(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The pooled vector (B, E), the attention weights (B, T) and the mask (B, T) over the fused sequence.

        The fused sequence is the speech frames followed by the text tokens, each with its own padding.
        """
        parts = []
        for modality in self.modalities:
            features, mask = _modality_input(batch, modality)
            adapter = self.adapters[modality]
            parts.append((adapter.normalise(features), mask, adapter.projection))
        pooled, weights = self.attention.pool_then_project(parts)
        return pooled, weights, torch.cat([mask for _, mask, _ in parts], dim=1)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        pooled, _, _ = self.pool(batch)
        return self.classifier(pooled)


class CogniCICModel(nn.Module):
    """The CogniCIC baseline: per modality layer mix, norm, mean over time and a Linear to ``branch_width``;
    the branches are concatenated and classified by Linear + ReLU + Dropout + Linear."""

    def __init__(
        self,
        dims: Mapping[str, tuple[int, int]],
        n_classes: int,
        dropout: float = 0.5,
        norms: Mapping[str, str] | None = None,
        branch_width: int = 256,
    ) -> None:
        super().__init__()
        self.modalities = _ordered_modalities(dims)
        self.adapters = _adapters(dims, self.modalities, norms, out_dim=None)
        self.branches = nn.ModuleDict({m: nn.Linear(dims[m][1], branch_width) for m in self.modalities})
        self.classifier = nn.Sequential(
            nn.Linear(branch_width * len(self.modalities), branch_width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(branch_width, n_classes),
        )

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        branches = []
        for modality in self.modalities:
            features, mask = _modality_input(batch, modality)
            pooled = masked_mean(self.adapters[modality](features), mask)
            branches.append(self.branches[modality](pooled))
        return self.classifier(torch.cat(branches, dim=1))
