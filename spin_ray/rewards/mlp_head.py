"""The 5-layer linear reward head shared by the LAION aesthetic predictor and ImageReward."""

from __future__ import annotations

import torch
from torch import nn


class RewardMLP(nn.Module):
    """``input_size -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropout in between and no activations.

    The layer indices (``layers.0, .2, .4, .6, .7``) are those of the published state dicts
    (improved-aesthetic-predictor's ``sac+logos+ava1-l14-linearMSE.pth`` and ImageReward's
    ``mlp.layers.*``), so the files load without renaming. Without activations the head is
    an affine map; it is kept layered so the published files load as they are.
    """

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, input_size) -> scores (B,)."""
        return self.layers(features).squeeze(-1)
