"""MoCo v2 (He et al. 2020; Chen et al. 2020): InfoNCE of queries against momentum keys and a queue."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.distributed import batch_shuffle, batch_unshuffle, gather_no_grad, world_size
from lowlabel.methods.ssl.base import MomentumSSLMethod
from lowlabel.methods.ssl.losses import infonce_loss


def default_queue_size(num_images: int, global_batch: int, cap: int = 16384) -> int:
    """A queue a quarter of the data (at most ``cap``), rounded down to whole global batches."""
    return max(global_batch, (min(cap, num_images // 4) // global_batch) * global_batch)


def moco_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's 2-layer MLP head (no BatchNorm)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class MoCo(MomentumSSLMethod):
    name = "moco"

    def __init__(
        self,
        encoder: nn.Module,
        feat_dim: int,
        temperature: float = 0.2,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        queue_size: int = 4096,
        momentum: float = 0.99,
        momentum_final: float | None = None,
        single_worker_bn_splits: int = 4,
    ) -> None:
        super().__init__(encoder, feat_dim, momentum, momentum_final)
        if temperature <= 0:
            raise ValueError(f"pretrain.moco.temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.projector = moco_projector(feat_dim, proj_hidden_dim, proj_dim)
        self.momentum_branch = self.init_momentum_branch(self.encoder, self.projector)
        self.bn_splits = single_worker_bn_splits
        self.register_buffer("queue", F.normalize(torch.randn(proj_dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._warned = False

    @classmethod
    def resolve_kwargs(cls, kwargs: dict[str, Any], num_images: int, global_batch: int) -> dict[str, Any]:
        if kwargs.get("queue_size") is None:  # pretrain.moco.queue_size null: sized to the data
            return {**kwargs, "queue_size": default_queue_size(num_images, global_batch)}
        return kwargs

    def momentum_forward(self, x: torch.Tensor) -> torch.Tensor:
        encoder, projector = self.momentum_branch
        return projector(encoder(x))

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Momentum-branch keys, with BatchNorm statistics that cannot leak the positive pair."""
        if world_size() > 1:
            shuffled, unshuffle = batch_shuffle(x)
            return F.normalize(batch_unshuffle(self.momentum_forward(shuffled), unshuffle), dim=1)
        # One worker cannot shuffle across devices: split the batch so each chunk gets its own
        # BN statistics (MoCo's SplitBatchNorm idea), in a shuffled order.
        if not self._warned:
            warnings.warn(f"MoCo on one worker: Shuffle-BN replaced by split-batch BN ({self.bn_splits} splits)", stacklevel=2)
            self._warned = True
        perm = torch.randperm(len(x), device=x.device)
        chunks = [self.momentum_forward(chunk) for chunk in x[perm].chunk(self.bn_splits)]
        return F.normalize(torch.cat(chunks)[torch.argsort(perm)], dim=1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Put the global batch's keys (rank order) at the pointer; every worker does the same."""
        size, ptr = self.queue.shape[1], int(self.queue_ptr)
        if size % len(keys):
            raise ValueError(f"pretrain.moco.queue_size ({size}) must be a multiple of the global batch ({len(keys)})")
        self.queue[:, ptr : ptr + len(keys)] = keys.T
        self.queue_ptr.fill_((ptr + len(keys)) % size)

    def training_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        q = F.normalize(self.projector(self.encoder(views[0])), dim=1)
        k = self.keys(views[1])
        loss = infonce_loss(q, k, self.queue.clone().detach(), self.temperature)
        self.enqueue(gather_no_grad(k))
        return {"loss": loss}
