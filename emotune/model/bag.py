"""K heads trained on K folds, used as one model: the mean of their class probabilities.

A trial with ``trial.folds=K`` trains K heads of the same architecture and settings, each on K-1 folds; test clips
and new clips are predicted by all of them. ``forward`` returns the log of the heads' mean probabilities, so the
softmax that every caller applies gives that mean back exactly.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class FoldBag(nn.Module):
    """The heads of a K-fold trial; ``heads[k]`` is the one that never trained on fold k."""

    def __init__(self, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)

    @property
    def modalities(self) -> tuple:
        """The inputs the heads read (the same for every head)."""
        return self.heads[0].modalities

    def forward(self, batch: dict) -> torch.Tensor:
        log_probs = torch.stack([torch.log_softmax(head(batch).float(), dim=-1) for head in self.heads])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.heads))


def heads_of(model: nn.Module) -> list[nn.Module]:
    """The heads a model is made of: a bag's, or the model itself."""
    return list(model.heads) if isinstance(model, FoldBag) else [model]
