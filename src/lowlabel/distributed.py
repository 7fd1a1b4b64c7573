"""Explicit distributed helpers (no-ops on one process), in the spirit of lightly's."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gathers(setting: bool | None) -> bool:
    """A method's ``gather_distributed`` setting: explicit, or (None) on exactly when distributed."""
    return world_size() > 1 if setting is None else setting


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


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every worker in rank order, without gradient."""
    if world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def gather_shards(local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Every worker's rows concatenated in rank order, on every worker; worker r holds
    ``sizes[r]`` rows (uneven shares are padded for the all-gather, then trimmed)."""
    if world_size() == 1:
        return local
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: len(local)] = local
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([chunk[:size] for chunk, size in zip(out, sizes, strict=True)])


@torch.no_grad()
def replica_of_main(module: torch.nn.Module) -> torch.nn.Module:
    """Rank 0's weights and buffers on every worker (a collective): rank 0 gets ``module``
    itself, the others a copy overwritten from rank 0, their own module left as it was (an
    EMA teacher's BatchNorm statistics are the worker's own and keep labelling its batches)."""
    if world_size() == 1:
        return module
    replica = module if rank() == 0 else copy.deepcopy(module)
    for tensor in replica.state_dict().values():
        # Collectives take contiguous tensors; channels-last conv weights are not.
        sent = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.broadcast(sent, src=0)
        if sent is not tensor:
            tensor.copy_(sent)
    return replica


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN, step 1 (MoCo): deal the global batch out to workers in a random order.

    Returns this worker's share of the shuffled global batch and the permutation's inverse.
    Every worker must hold the same number of samples.
    """
    gathered = gather_no_grad(x)
    perm = torch.randperm(len(gathered), device=x.device)
    if world_size() > 1:
        dist.broadcast(perm, src=0)  # one permutation for all workers
    return gathered[perm.view(world_size(), -1)[rank()]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """Shuffle-BN, step 2: gather the shuffled outputs and give each worker back its own, in order."""
    gathered = gather_no_grad(x)
    return gathered[unshuffle.view(world_size(), -1)[rank()]]


@torch.no_grad()
def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over workers in place (no-op on one process), for meta-gradients
    computed outside DDP. A missing ``.grad`` counts as zero, so every worker joins every
    collective in the same order."""
    world = world_size()
    if world == 1:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average every floating-point buffer (BatchNorm running statistics) over workers in place
    (no-op on one process): replicas trained without DDP each see their own batches."""
    world = world_size()
    if world == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world
