"""MAML (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks"), its first-order approximation (FO-MAML, same paper, Sec. 5.2) and Meta-SGD's
learnable per-parameter inner learning rates (Li et al. 2017, "Meta-SGD").

For one episode with support (x_s, y_s) and query (x_q, y_q), MAML adapts the parameters
theta by ``steps`` gradient steps on the support loss,
``theta_{i+1} = theta_i - alpha * grad L_s(theta_i)``, and its meta-loss is the query loss at
the adapted parameters, ``L_q(theta_steps)``; the meta-gradient differentiates *through* the
inner steps (second order: Hessian-vector products). FO-MAML treats the inner gradients as
constants, so its meta-gradient is ``grad L_q`` evaluated at ``theta_steps``.

Everything is functional over any ``nn.Module``: the inner loop evaluates the model with
``torch.func.functional_call(model, params, x)`` on a dict of tensors and differentiates with
``torch.autograd.grad(..., create_graph=not first_order)``. Nothing is copied by hand and
the model's own parameters stay the leaves of the graph, so ``meta_loss(...).backward()``
accumulates the meta-gradient into ``model.parameters()``' ``.grad`` for any optimizer.
Passing a subset of the parameters as ``params`` adapts only those (e.g. the head alone, as
ANIL); the rest are the module's own, held fixed in the inner loop.

**BatchNorm.** The module runs in whatever mode it is in; in train mode BatchNorm normalises
with the statistics of the batch it is given (the support batch in the inner loop, the query
batch in the outer loss), exactly as Finn et al.'s reference code, which uses batch statistics
at meta-test time too ("transductive" evaluation: keep ``model.train()`` when adapting to and
scoring test episodes). The running statistics are updated by every forward as usual but
MAML never reads them; BN's affine parameters are adapted like any other parameter.

**DDP.** The known traps (learn2learn#170, pytorch#63929): DDP all-reduces in gradient
hooks on the parameters' ``AccumulateGrad`` nodes, armed by each DDP forward; an inner loop
that calls ``loss.backward()`` (or deep-copies/"clones" the wrapped module) fires them on
the *inner* gradients, writes ``.grad`` mid-episode and desynchronises the reducer's state.
Here the inner gradients come from ``torch.autograd.grad``, which returns them without
running any ``AccumulateGrad`` node, so DDP never sees them; the one outer ``backward``
then reaches each parameter's ``AccumulateGrad`` exactly once with its whole meta-gradient
(autograd sums the direct and the second-order paths before accumulating), and DDP averages
that over workers. Two correct ways, both checked by ``tests/test_ddp.py``:

1. Wrap :class:`MAML` (whose ``forward`` is the whole inner loop plus the query forward) in
   ``DistributedDataParallel`` and call ``backward`` once per DDP forward.
2. Or skip DDP: call :func:`meta_loss` on the plain module and average the ``.grad`` over
   workers with :func:`average_gradients` before the optimizer step.

What does *not* work is calling ``functional_call`` on ``ddp.module`` without any DDP
forward: DDP's hooks are only armed by its forward, so each worker silently keeps its own
episode's gradient (also checked). Every worker must run the same number of episodes per
step (one DDP forward/backward pair each, or one ``average_gradients``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lowlabel.distributed import average_gradients
from lowlabel.meta.base import MetaMethod, preserved_buffers
from lowlabel.meta.episodes import EpisodicBatch

__all__ = ["MAML", "LossFn", "MAMLMethod", "adapt", "average_gradients", "meta_batch_loss", "meta_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
InnerLr = float | Mapping[str, torch.Tensor]


def _lr_for(lr: InnerLr, name: str) -> float | torch.Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr


def adapt(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    steps: int,
    lr: InnerLr,
    *,
    first_order: bool = False,
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, torch.Tensor]:
    """``steps`` inner SGD steps of ``params`` on the support loss; returns the adapted params.

    ``lr`` is one inner learning rate, or one tensor per parameter name (Meta-SGD: broadcast
    against the parameter, learnable when it requires grad). With ``first_order=False`` the
    result stays differentiable through the inner gradients (``create_graph=True``); with
    ``first_order=True`` the inner gradients are constants (FO-MAML). Parameters that do not
    require grad (e.g. at meta-test under ``torch.no_grad``) are adapted from detached copies.
    A parameter the support loss does not reach is left unchanged.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    names = list(params)
    with torch.enable_grad():
        current = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in params.items()}
        for _ in range(steps):
            loss = loss_fn(functional_call(model, current, (support_x,)), support_y)
            grads = torch.autograd.grad(
                loss, [current[n] for n in names], create_graph=not first_order, allow_unused=True
            )
            current = {
                n: current[n] if g is None else current[n] - _lr_for(lr, n) * (g.detach() if first_order else g)
                for n, g in zip(names, grads)
            }
    return current


def meta_loss(
    model: nn.Module,
    episode: EpisodicBatch,
    *,
    steps: int = 1,
    lr: InnerLr = 0.4,
    first_order: bool = False,
    loss_fn: LossFn = F.cross_entropy,
    params: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The MAML meta-loss of one episode: the query loss at the parameters adapted on its support.

    ``meta_loss(...).backward()`` accumulates the meta-gradient into the model's parameters
    (second order unless ``first_order``). ``params`` defaults to all of ``model``'s parameters.
    """
    params = dict(model.named_parameters()) if params is None else params
    adapted = adapt(model, params, episode.support_x, episode.support_y, steps, lr, first_order=first_order, loss_fn=loss_fn)
    return loss_fn(functional_call(model, adapted, (episode.query_x,)), episode.query_y)


def meta_batch_loss(model: nn.Module, episodes: Sequence[EpisodicBatch], **kwargs: object) -> torch.Tensor:
    """Mean :func:`meta_loss` over a meta-batch of episodes (keywords as :func:`meta_loss`)."""
    if not episodes:
        raise ValueError("a meta-batch needs at least one episode")
    return torch.stack([meta_loss(model, e, **kwargs) for e in episodes]).mean()  # type: ignore[arg-type]


def _lr_key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot contain dots


class MAML(nn.Module):
    """``model`` plus MAML's inner loop as a module, so it can be wrapped in DDP.

    ``forward(support_x, support_y, query_x)`` adapts ``model``'s parameters on the support
    set and returns the query outputs at the adapted parameters; the caller takes the query
    loss and calls ``backward`` once (through DDP when wrapped). With ``learn_lrs`` the inner
    learning rates are parameters, one per element of every parameter, initialised to ``lr``
    (Meta-SGD, Li et al. 2017), and are meta-learned with the model.
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int = 1,
        lr: float = 0.4,
        *,
        first_order: bool = False,
        learn_lrs: bool = False,
        loss_fn: LossFn = F.cross_entropy,
    ) -> None:
        super().__init__()
        self.module = model
        self.steps, self.lr, self.first_order, self.loss_fn = steps, lr, first_order, loss_fn
        self.inner_lrs: nn.ParameterDict | None = None
        if learn_lrs:
            self.inner_lrs = nn.ParameterDict(
                {_lr_key(n): nn.Parameter(torch.full_like(p, lr)) for n, p in model.named_parameters()}
            )

    def inner_lr(self) -> InnerLr:
        if self.inner_lrs is None:
            return self.lr
        return {n: self.inner_lrs[_lr_key(n)] for n, _ in self.module.named_parameters()}

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None) -> dict[str, torch.Tensor]:
        """Adapted parameters of ``model`` for one support set (``steps`` defaults to training's)."""
        return adapt(
            self.module,
            dict(self.module.named_parameters()),
            support_x,
            support_y,
            self.steps if steps is None else steps,
            self.inner_lr(),
            first_order=self.first_order,
            loss_fn=self.loss_fn,
        )

    def forward(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.adapt(support_x, support_y), (query_x,))

    @torch.no_grad()
    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, steps: int | None = None
    ) -> torch.Tensor:
        """Meta-test: adapt on the support set (first order: no graph is kept) and return the
        query outputs, detached. Keep the module in train mode for MAML's transductive BN."""
        adapted = adapt(
            self.module,
            dict(self.module.named_parameters()),
            support_x,
            support_y,
            self.steps if steps is None else steps,
            {n: lr.detach() for n, lr in self.inner_lr().items()} if self.inner_lrs is not None else self.lr,
            first_order=True,
            loss_fn=self.loss_fn,
        )
        return functional_call(self.module, {n: p.detach() for n, p in adapted.items()}, (query_x,))

    def meta_loss(self, episode: EpisodicBatch) -> torch.Tensor:
        """Query loss of one episode (not through DDP: use ``loss_fn(ddp(...), query_y)`` there)."""
        return self.loss_fn(self(episode.support_x, episode.support_y, episode.query_x), episode.query_y)


class MAMLMethod(MetaMethod):
    """``meta@maml``: the encoder and a ``ways``-output linear head, meta-trained by MAML
    (second order unless ``first_order``; Meta-SGD rates with ``learn_lrs``). At test time the
    whole network adapts on the support set for ``test_inner_steps`` steps, in train mode
    (Finn et al.'s transductive batch statistics), leaving the trained state unchanged."""

    adapts = True

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        ways: int,
        inner_steps: int = 5,
        inner_lr: float = 0.4,
        first_order: bool = False,
        learn_lrs: bool = False,
        test_inner_steps: int = 10,
    ) -> None:
        super().__init__(encoder, ways)
        self.maml = MAML(nn.Sequential(encoder, nn.Linear(feature_dim, ways)), inner_steps, inner_lr, first_order=first_order, learn_lrs=learn_lrs)
        self.test_inner_steps = test_inner_steps

    def meta_gradients(self, episodes: list[EpisodicBatch]) -> torch.Tensor:
        loss = torch.stack([self.maml.meta_loss(e) for e in episodes]).mean()
        loss.backward()
        average_gradients(self.parameters())
        return loss.detach()

    def scores(self, episode: EpisodicBatch) -> torch.Tensor:
        with preserved_buffers(self):
            return self.maml.predict(episode.support_x, episode.support_y, episode.query_x, self.test_inner_steps)
