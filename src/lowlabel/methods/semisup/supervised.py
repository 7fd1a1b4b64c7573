"""The supervised baseline: cross-entropy on the labeled batch alone (no unlabeled data),
optionally on its mixup or CutMix pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.methods.semisup.base import SemisupMethod
from lowlabel.methods.semisup.mixing import cutmix, mixed_cross_entropy, mixup, torch_seeded_rng


def supervised_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mix: str = "none", mix_alpha: float = 1.0, **_
) -> dict[str, torch.Tensor]:
    """The baseline: cross-entropy on the labeled batch alone, optionally on its mixup or CutMix
    pairs. The mixing draws come from the worker's seeded torch stream, so a seed repeats them."""
    if mix == "none":
        loss = F.cross_entropy(model(x), y)
        return {"loss": loss, "loss_sup": loss.detach()}
    rng = torch_seeded_rng()
    mixed, lam, perm = {"mixup": mixup, "cutmix": cutmix}[mix](x, mix_alpha, rng)
    loss = mixed_cross_entropy(model(mixed), y, lam, perm)
    return {"loss": loss, "loss_sup": loss.detach(), "mix_lambda": torch.tensor(lam)}


SUPERVISED = SemisupMethod(supervised_step, uses_unlabeled=False)
