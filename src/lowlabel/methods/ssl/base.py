"""Shared base of the self-supervised methods (cf. solo-learn's ``BaseMethod``).

A method owns the encoder plus whatever heads it needs, turns a list of augmented views
into a loss in :meth:`training_step`, and may update non-gradient state after the
optimiser step (momentum encoders, queues). Adding a method is one new module that
subclasses this and registers itself in ``lowlabel.methods.ssl.PRETRAIN_METHODS``.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn


class ViewSpec(NamedTuple):
    """One augmented view of every image: its side in px and its crop's area scale (low, high)."""

    size: int
    crop_scale: tuple[float, float]


def multi_crop(
    image_size: int,
    global_scale: tuple[float, float],
    local_crops: int,
    local_size: int,
    local_scale: tuple[float, float],
    global_crops: int = 2,
) -> list[ViewSpec]:
    """Multi-crop (Caron et al. 2020, SwAV; DINO): ``global_crops`` views at the image size from
    large crops, then ``local_crops`` views at ``local_size`` px from small ones (global first)."""
    return [ViewSpec(image_size, tuple(global_scale))] * global_crops + [ViewSpec(local_size, tuple(local_scale))] * local_crops


class SSLMethod(nn.Module, ABC):
    name: ClassVar[str]
    num_views: ClassVar[int] = 2

    def __init__(self, encoder: nn.Module, feat_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.feat_dim = feat_dim

    @classmethod
    def resolve_kwargs(cls, kwargs: dict[str, Any], num_images: int, global_batch: int) -> dict[str, Any]:
        """The constructor's keyword arguments from the method's params section, with defaults that
        depend on the data (``num_images`` to pretrain on) resolved; default: as they are. Called
        in the worker, so the job builder needs no method code (pretrain's import closure stays
        out of semisup's and meta's DVC deps)."""
        return kwargs

    def view_specs(self, image_size: int, crop_scale: tuple[float, float]) -> list[ViewSpec]:
        """The views the loop makes of every image, in the order :meth:`training_step` gets them:
        (output size in px, random-resized-crop area scale) each, all with the contrastive recipe.
        Default: ``num_views`` alike, at the image size and ``pretrain.crop_scale``; multi-crop
        methods (DINO) override it with views of several sizes."""
        return [ViewSpec(image_size, tuple(crop_scale))] * self.num_views

    @abstractmethod
    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return at least ``{"loss": scalar}``; other entries are logged."""

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        # DDP only syncs gradients through forward(), so the step is the forward.
        return self.training_step(views)

    def project_pair(self, views: list[torch.Tensor], projector: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views through the encoder and ``projector`` in one forward, so BatchNorm sees the
        same 2N batch as in the papers; returns the two views' projections."""
        n = views[0].shape[0]
        z = projector(self.encoder(torch.cat(views)))
        return z[:n], z[n:]

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        """Hook after ``optimizer.step()`` (momentum updates); default none."""


class MomentumSSLMethod(SSLMethod):
    """An SSL method with a momentum (EMA) copy of its encoder and projector (cf. solo-learn's
    ``BaseMomentumMethod``): after every optimiser step, ``k <- tau * k + (1 - tau) * q``,
    with tau rising from ``momentum`` to ``momentum_final`` on a cosine schedule (constant
    when they are equal). The momentum branch never receives gradients.
    """

    def __init__(self, encoder: nn.Module, feat_dim: int, momentum: float = 0.99, momentum_final: float | None = None) -> None:
        super().__init__(encoder, feat_dim)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        final = momentum if momentum_final is None else momentum_final
        if not momentum <= final <= 1.0:
            raise ValueError(f"momentum_final must be in [momentum, 1], got {final} with momentum {momentum}")
        self.base_momentum, self.final_momentum = momentum, final
        self.current_momentum = momentum

    def init_momentum_branch(self, *online: nn.Module) -> nn.ModuleList:
        """Frozen deep copies of the online modules, to be updated only by EMA."""
        branch = nn.ModuleList(copy.deepcopy(module) for module in online)
        for param in branch.parameters():
            param.requires_grad_(False)
        self._online = list(online)  # plain list: not registered twice
        return branch

    def momentum_at(self, step: int, total_steps: int) -> float:
        progress = min(1.0, step / max(1, total_steps))
        return self.final_momentum - (self.final_momentum - self.base_momentum) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def momentum_update(self, tau: float) -> None:
        online = [p for module in self._online for p in module.parameters()]
        target = list(self.momentum_branch.parameters())
        torch._foreach_lerp_(target, [p.detach() for p in online], 1.0 - tau)

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        # A function of the step alone, so a resumed run continues the same schedule.
        self.current_momentum = self.momentum_at(step - 1, total_steps)
        self.momentum_update(self.current_momentum)
