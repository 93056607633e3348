"""Reductions over the layer and time axes of frozen-encoder features.

:class:`LayerMix` collapses the per-layer hidden states of one encoder into a single sequence with learned
softmax weights; :class:`AttentionPooling` and :func:`masked_mean` collapse a padded sequence into one vector.
Both time reductions ignore padded positions completely, so a batch padded to any length gives the same
result as the unpadded sequences (up to float rounding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LayerMix(nn.Module):
    """Softmax-weighted sum over encoder layers: (B, L, T, D) -> (B, T, D).

    The logits start at zero, so training starts from the plain layer average and only moves away from it
    as far as the data asks.
    """

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"LayerMix needs at least one layer, got {n_layers}")
        self.n_layers = n_layers
        self.logits = nn.Parameter(torch.zeros(n_layers))

    def weights(self) -> Tensor:
        """The current layer weights (they sum to 1), e.g. for logging which layers the model relies on."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.n_layers:
            raise ValueError(f"expected features of shape (B, {self.n_layers}, T, D), got {tuple(x.shape)}")
        if self.n_layers == 1:
            return x[:, 0]
        return torch.einsum("l,bltd->btd", self.weights().to(x.dtype), x)


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    # A zero weight times a non-finite padded value is still NaN, so padded values are replaced rather than
    # merely down-weighted: whatever sits in the padding can never reach the result.
    if bool(mask.all()):  # nothing padded (training crops are all one length)
        return x
    return x.masked_fill(~mask.unsqueeze(-1), 0.0)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over time of ``x`` (B, T, D) counting only positions where ``mask`` (B, T) is True -> (B, D)."""
    mask = mask.to(torch.bool)
    counts = mask.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)
    return _zero_padding(x, mask).sum(dim=1) / counts


class AttentionPooling(nn.Module):
    """Attention pooling of the EmoSPeech 2024 winning system (BSC-UPC).

    With a trainable vector ``u`` of size E: scores ``s_t = h_t . u / sqrt(E)``, weights ``w = softmax_t(s)``
    over the real positions only, and the pooled vector ``c = sum_t w_t h_t``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        query = torch.empty(1, dim)
        nn.init.xavier_uniform_(query)
        self.query = nn.Parameter(query.squeeze(0))

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Pool ``h`` (B, T, E) under ``mask`` (B, T, True = real) -> (pooled (B, E), weights (B, T))."""
        mask = mask.to(torch.bool)
        scores = (h @ self.query) / math.sqrt(self.dim)
        # -inf before the softmax makes the padded weights exactly 0 and leaves the real ones as if the
        # padding were not there at all, which a large negative constant would only approximate.
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        pooled = torch.einsum("bt,bte->be", weights, _zero_padding(h, mask))
        return pooled, weights

    def pool_then_project(self, parts: list[tuple[Tensor, Tensor, nn.Linear | None]]) -> tuple[Tensor, Tensor]:
        """:meth:`forward` over the concatenation in time of ``projection(h)`` for each ``(h, mask, projection)``.

        Each ``h`` (B, T_i, D_i) enters unprojected: a projection ``W h + b`` is affine and the pooling weights
        sum to one, so ``h_t . u`` becomes ``h_t . (W^T u) + b . u`` and the pooled vector
        ``W (sum_t w_t h_t) + b sum_t w_t``. The result is the same up to float rounding, but the projection runs
        on one vector per clip instead of on every frame, which was most of a training step's cost.
        """
        scores = []
        for h, mask, projection in parts:
            if projection is None:
                part = h @ self.query
            else:
                part = h @ (self.query @ projection.weight) + projection.bias @ self.query
            scores.append(part.masked_fill(~mask.to(torch.bool), float("-inf")))
        weights = torch.softmax(torch.cat(scores, dim=1) / math.sqrt(self.dim), dim=1)
        pooled, start = 0.0, 0
        for h, mask, projection in parts:
            w = weights[:, start : start + h.shape[1]]
            start += h.shape[1]
            summed = torch.einsum("bt,btd->bd", w, _zero_padding(h, mask.to(torch.bool)))
            if projection is not None:
                summed = summed @ projection.weight.T + w.sum(dim=1, keepdim=True) * projection.bias
            pooled = pooled + summed
        return pooled, weights
