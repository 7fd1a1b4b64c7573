"""Explicit distributed helpers (no-ops on one process), in the spirit of lightly's."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_distributed(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every worker along dim 0, in rank order, keeping gradients.

    ``torch.distributed.nn.functional.all_gather`` back-propagates into every worker's
    input, so a loss over the gathered tensor trains all workers' encoders.
    """
    if world_size() == 1:
        return tensor
    with warnings.catch_warnings():
        # Deprecated in favour of a private API (_functional_collectives); still the public autograd gather.
        warnings.simplefilter("ignore", FutureWarning)
        gathered = dist_fn.all_gather(tensor)
    return torch.cat(gathered, dim=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over workers, without gradient (for logging and metrics)."""
    if world_size() == 1:
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor)
    return tensor / world_size()
