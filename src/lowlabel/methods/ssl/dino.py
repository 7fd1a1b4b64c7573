"""DINO (Caron et al. 2021): self-distillation with no labels.

A student and a momentum teacher (the student's EMA, same architecture: encoder, a 3-layer MLP
to a bottleneck, L2 normalisation, a weight-normalised linear layer to ``out_dim`` prototypes)
see multi-crop views of every image: 2 global views at the image size and ``local_crops`` local
views at ``local_crop_size`` px. The teacher sees only the global views; its outputs are centred
(a running mean of its batch outputs, over every worker's batch) and sharpened (a low
``teacher_temp``, warmed up from ``warmup_teacher_temp``), and the student matches them from
every other view (``lowlabel.methods.ssl.losses.dino_loss``). Centring and sharpening together
keep the outputs from collapsing to one prototype or to the uniform distribution.

The local views are smaller than the global ones, so the encoder must give the same features at
both sizes: a globally pooled one (WRN, ResNet, timm), or Conv-4 with both sizes in the same
16 px band (its flattened map is 1x1 from 16 to 31 px); the pretrain loop checks it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.distributed import all_reduce_mean
from lowlabel.methods.ssl.base import MomentumSSLMethod, ViewSpec, multi_crop
from lowlabel.methods.ssl.losses import dino_loss
from lowlabel.models.heads import mlp

GLOBAL_CROPS = 2


class NormalizedLinear(nn.Module):
    """A bias-free linear layer with unit-norm weight rows: DINO's weight-normalised last layer
    with its norm fixed to 1 (``norm_last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, num_layers=3)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=1))


@torch.no_grad()
def update_center_(center: torch.Tensor, teacher_logits: list[torch.Tensor], momentum: float) -> None:
    """``center <- momentum * center + (1 - momentum) * mean of the teacher's outputs``, the mean
    over every global view of every worker's batch (workers hold equal batches, so the mean of
    their means is the global batch's): every worker keeps the same center."""
    batch_mean = torch.cat(teacher_logits).mean(dim=0).to(center.dtype)
    center.mul_(momentum).add_(all_reduce_mean(batch_mean), alpha=1 - momentum)


class DINO(MomentumSSLMethod):
    name = "dino"
    num_views = GLOBAL_CROPS  # the global views; view_specs adds the local ones

    def __init__(
        self,
        encoder: nn.Module,
        feat_dim: int,
        proj_hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        out_dim: int = 4096,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_fraction: float = 0.3,
        center_momentum: float = 0.9,
        momentum: float = 0.99,
        momentum_final: float | None = 1.0,
        local_crops: int = 6,
        local_crop_size: int = 16,
        global_crop_scale: tuple[float, float] = (0.4, 1.0),
        local_crop_scale: tuple[float, float] = (0.05, 0.4),
    ) -> None:
        super().__init__(encoder, feat_dim, momentum, momentum_final)
        self.head = DINOHead(feat_dim, proj_hidden_dim, bottleneck_dim, out_dim)
        self.momentum_branch = self.init_momentum_branch(self.encoder, self.head)
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.final_teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.warmup_teacher_temp_fraction = warmup_teacher_temp_fraction
        self.local_crops, self.local_crop_size = local_crops, local_crop_size
        self.global_crop_scale, self.local_crop_scale = tuple(global_crop_scale), tuple(local_crop_scale)
        # Buffers: they ride in the checkpoint, so a resumed run centres and sharpens as an
        # uninterrupted one.
        self.register_buffer("center", torch.zeros(out_dim))
        self.register_buffer("teacher_temp", torch.tensor(self.teacher_temp_at(0, 1), dtype=torch.float64))

    def view_specs(self, image_size: int, crop_scale: tuple[float, float]) -> list[ViewSpec]:
        # DINO's own crop scales (pretrain.dino.*_crop_scale), not pretrain.crop_scale.
        return multi_crop(image_size, self.global_crop_scale, self.local_crops, self.local_crop_size, self.local_crop_scale, GLOBAL_CROPS)

    def teacher_temp_at(self, step: int, total_steps: int) -> float:
        """Linear from ``warmup_teacher_temp`` to ``teacher_temp`` over the first
        ``warmup_teacher_temp_fraction`` of the steps, then constant."""
        warmup = self.warmup_teacher_temp_fraction * total_steps
        if warmup <= 0 or step >= warmup:
            return self.final_teacher_temp
        return self.warmup_teacher_temp + (self.final_teacher_temp - self.warmup_teacher_temp) * step / warmup

    def _outputs(self, encoder: nn.Module, head: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each view's output, one forward per run of same-size views (BatchNorm sees those together)."""
        outputs: list[torch.Tensor] = []
        for _, group in itertools.groupby(views, key=lambda v: tuple(v.shape[1:])):
            group = list(group)
            outputs += head(encoder(torch.cat(group))).chunk(len(group))
        return outputs

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(views) < GLOBAL_CROPS:
            raise ValueError(f"DINO needs at least {GLOBAL_CROPS} (global) views, got {len(views)}")
        student = self._outputs(self.encoder, self.head, views)
        with torch.no_grad():
            teacher_encoder, teacher_head = self.momentum_branch
            teacher = self._outputs(teacher_encoder, teacher_head, views[:GLOBAL_CROPS])
        loss = dino_loss(student, teacher, self.center, self.student_temp, float(self.teacher_temp))
        update_center_(self.center, teacher, self.center_momentum)
        return {"loss": loss}

    def on_train_step_end(self, step: int, total_steps: int) -> None:
        super().on_train_step_end(step, total_steps)
        # The temperature of the next step (``step`` steps done), a function of the step alone.
        self.teacher_temp.fill_(self.teacher_temp_at(step, total_steps))
