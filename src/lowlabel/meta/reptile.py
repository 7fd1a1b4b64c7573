"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each episode of a meta-batch, starting from the meta-parameters phi, take ``steps`` plain
SGD steps on the episode's data to reach W_i; then move phi towards the adapted weights,
``phi <- phi + epsilon * (1/n) sum_i (W_i - phi)`` (the paper's batched version, Algorithm 2).
The inner data is the episode's support set joined with its query set (all of the task's
labelled data; ``use_query=False`` keeps the support set only, as at meta-test time, where
only the support labels are known).

Functional like :mod:`lowlabel.meta.maml`: the inner loop runs ``torch.func.functional_call``
on detached copies of the parameters, so the module itself is only written by the outer
update. Across workers the mean over the meta-batch is the mean over every worker's episodes:
:func:`reptile_delta` all-reduces the per-worker means (equal meta-batch sizes per worker).
Reptile is not a gradient method, so DDP plays no part: :func:`reptile_step` applies the
update itself, or :func:`reptile_set_grads` writes ``phi - mean W`` into ``.grad`` so that
``SGD(lr=epsilon)`` reproduces it (and any other optimizer, e.g. Adam as in the paper's
few-shot runs, can use it as a gradient).

BatchNorm runs in the module's mode: in train mode each inner step normalises with its own
batch's statistics (transductive, as in MAML), and the running statistics are updated as a
side effect of the inner forwards; they are not meta-parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lowlabel.distributed import world_size
from lowlabel.meta.base import MetaMethod, preserved_buffers
from lowlabel.meta.episodes import EpisodicBatch
from lowlabel.meta.maml import LossFn

__all__ = ["ReptileMethod", "reptile_adapt", "reptile_delta", "reptile_set_grads", "reptile_step"]


def reptile_adapt(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    *,
    loss_fn: LossFn = F.cross_entropy,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """``steps`` SGD steps from ``params`` on (x, y); returns the final weights W (detached).

    Full-batch by default; with ``batch_size`` each step takes the next minibatch of a random
    permutation of the data (reshuffled when exhausted, drawn from ``generator``), as the
    paper's inner loop over minibatches.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    current = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    names = list(current)
    order, cursor = torch.empty(0, dtype=torch.long), 0
    with torch.enable_grad():
        for _ in range(steps):
            if batch_size is None or batch_size >= len(x):
                xb, yb = x, y
            else:
                if cursor + batch_size > len(order):
                    order, cursor = torch.randperm(len(x), generator=generator), 0
                pick = order[cursor : cursor + batch_size].to(x.device)
                cursor += batch_size
                xb, yb = x[pick], y[pick]
            loss = loss_fn(functional_call(model, current, (xb,)), yb)
            grads = torch.autograd.grad(loss, [current[n] for n in names], allow_unused=True)
            current = {
                n: current[n] if g is None else (current[n] - lr * g).detach().requires_grad_()
                for n, g in zip(names, grads)
            }
    return {n: p.detach() for n, p in current.items()}


def _episode_data(episode: EpisodicBatch, use_query: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_query:
        return episode.support_x, episode.support_y
    return torch.cat([episode.support_x, episode.query_x]), torch.cat([episode.support_y, episode.query_y])


@torch.no_grad()
def reptile_delta(
    model: nn.Module,
    episodes: Sequence[EpisodicBatch],
    steps: int,
    lr: float,
    *,
    loss_fn: LossFn = F.cross_entropy,
    use_query: bool = True,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """``(1/n) sum_i (W_i - phi)`` over the meta-batch (and over every worker's episodes when
    distributed: each worker must pass the same number of episodes), per parameter name."""
    if not episodes:
        raise ValueError("a meta-batch needs at least one episode")
    phi = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in phi.items()}
    for episode in episodes:
        x, y = _episode_data(episode, use_query)
        adapted = reptile_adapt(model, phi, x, y, steps, lr, loss_fn=loss_fn, batch_size=batch_size, generator=generator)
        for n in total:
            total[n] += adapted[n] - phi[n]
    delta = {n: t / len(episodes) for n, t in total.items()}
    world = world_size()
    if world > 1:
        for t in delta.values():
            dist.all_reduce(t)
            t /= world
    return delta


@torch.no_grad()
def reptile_step(
    model: nn.Module, episodes: Sequence[EpisodicBatch], steps: int, inner_lr: float, outer_lr: float, **kwargs: object
) -> dict[str, torch.Tensor]:
    """One Reptile outer update in place, ``phi <- phi + outer_lr * mean_i (W_i - phi)``;
    returns the mean delta (keywords as :func:`reptile_delta`)."""
    delta = reptile_delta(model, episodes, steps, inner_lr, **kwargs)  # type: ignore[arg-type]
    for n, p in model.named_parameters():
        p.add_(delta[n], alpha=outer_lr)
    return delta


@torch.no_grad()
def reptile_set_grads(
    model: nn.Module, episodes: Sequence[EpisodicBatch], steps: int, inner_lr: float, **kwargs: object
) -> dict[str, torch.Tensor]:
    """Write ``phi - mean_i W_i`` into every parameter's ``.grad`` (replacing it): an optimizer
    step with SGD(lr=epsilon) is then exactly :func:`reptile_step`. Returns the mean delta."""
    delta = reptile_delta(model, episodes, steps, inner_lr, **kwargs)  # type: ignore[arg-type]
    for n, p in model.named_parameters():
        p.grad = -delta[n].clone()
    return delta


class ReptileMethod(MetaMethod):
    """``meta@reptile``: the encoder and a ``ways``-output linear head; each worker adapts a copy
    to each of its episodes by ``inner_steps`` SGD steps and the outer update moves the weights
    by ``outer_lr`` times the mean of (W - phi) over every worker's episodes (SGD with no
    momentum on the gradient ``phi - mean W``, so meta.optim's schedule anneals epsilon).
    At test time the network adapts on the support set for ``test_inner_steps`` steps."""

    adapts = True

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        ways: int,
        inner_steps: int = 5,
        inner_lr: float = 0.05,
        outer_lr: float = 1.0,
        use_query: bool = True,
        test_inner_steps: int = 10,
    ) -> None:
        super().__init__(encoder, ways)
        self.model = nn.Sequential(encoder, nn.Linear(feature_dim, ways))
        self.inner_steps, self.inner_lr, self.outer_lr = inner_steps, inner_lr, outer_lr
        self.use_query, self.test_inner_steps = use_query, test_inner_steps

    def meta_gradients(self, episodes: list[EpisodicBatch]) -> torch.Tensor:
        with torch.no_grad(), preserved_buffers(self):  # the loss before adaptation, for the record
            loss = torch.stack([F.cross_entropy(self.model(e.query_x), e.query_y) for e in episodes]).mean()
        reptile_set_grads(self.model, episodes, self.inner_steps, self.inner_lr, use_query=self.use_query)
        return loss

    def outer_optimizer(self) -> dict[str, object]:
        return {"optimizer": "sgd", "lr": self.outer_lr, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}

    @torch.no_grad()
    def scores(self, episode: EpisodicBatch) -> torch.Tensor:
        with preserved_buffers(self):
            phi = dict(self.model.named_parameters())
            adapted = reptile_adapt(self.model, phi, episode.support_x, episode.support_y, self.test_inner_steps, self.inner_lr)
            return functional_call(self.model, adapted, (episode.query_x,))
