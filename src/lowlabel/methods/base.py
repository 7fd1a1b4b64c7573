"""Shared base of the self-supervised methods (cf. solo-learn's ``BaseMethod``).

A method owns the encoder plus whatever heads it needs, turns a list of augmented views
into a loss in :meth:`training_step`, and may update non-gradient state after the
optimiser step (momentum encoders, queues). Adding a method is one new module that
subclasses this and registers itself in ``lowlabel.methods.PRETRAIN_METHODS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn


class SSLMethod(nn.Module, ABC):
    name: ClassVar[str]
    num_views: ClassVar[int] = 2

    def __init__(self, encoder: nn.Module, feat_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.feat_dim = feat_dim

    @abstractmethod
    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return at least ``{"loss": scalar}``; other entries are logged."""

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        # DDP only syncs gradients through forward(), so the step is the forward.
        return self.training_step(views)

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        """Hook after ``optimizer.step()`` (momentum updates); default none."""
