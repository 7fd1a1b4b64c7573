"""Optimiser + per-step cosine schedule with warm-up, from timm.

timm's ``create_optimizer_v2`` excludes BatchNorm and bias parameters from weight decay
(``filter_bias_and_bn``) and provides LARS; its ``CosineLRScheduler`` is stepped per update.
"""

from __future__ import annotations

import timm.optim
import timm.scheduler
import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    total_steps: int,
    *,
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    warmup_fraction: float = 0.0,
) -> tuple[torch.optim.Optimizer, timm.scheduler.CosineLRScheduler]:
    # timm names plain momentum SGD 'momentum' and Nesterov SGD 'sgd'.
    name = {"sgd": "sgd" if nesterov else "momentum", "adamw": "adamw", "lars": "lars"}[optimizer]
    kwargs = {"momentum": momentum} if optimizer in ("sgd", "lars") else {}
    opt = timm.optim.create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, filter_bias_and_bn=True, **kwargs)
    warmup = round(warmup_fraction * total_steps)
    schedule = timm.scheduler.CosineLRScheduler(
        opt, t_initial=max(1, total_steps), warmup_t=warmup, warmup_lr_init=lr * 1e-3 if warmup else 0.0, warmup_prefix=True, t_in_epochs=False
    )
    return opt, schedule
