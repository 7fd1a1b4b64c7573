"""Few-shot classification heads over frozen embeddings.

Every head implements one episode (``fit`` then ``logits``/``predict``) and a batched
path (``fit_logits_batched``) that solves E independent episodes at once with batched
tensor ops, so evaluation never loops over episodes in Python. The single-episode path
runs the same math with E = 1, which is what makes the two paths agree.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HEADS",
    "KNN",
    "CosineClassifier",
    "FewShotClassifier",
    "LinearProbe",
    "MatchingNet",
    "ProtoNet",
    "build_head",
]


def _check_episode_batch(
    support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int, *, block_inputs: bool = False
) -> None:
    """Shapes of a batch of E episodes: embeddings (E,S,D) / (E,Q,D), or with ``block_inputs``
    any per-image shape (E,S,...) (the finetune head's cached inputs of the last block)."""
    item = "..." if block_inputs else "D"
    if (support.dim() < 3 if block_inputs else support.dim() != 3) or query.dim() != support.dim() or support_labels.dim() != 2:
        raise ValueError(
            f"batched inputs must be support (E,S,{item}), support_labels (E,S), query (E,Q,{item})"
            f"{' block inputs' if block_inputs else ''}; got "
            f"{tuple(support.shape)}, {tuple(support_labels.shape)}, {tuple(query.shape)}"
        )
    if support.shape[:2] != support_labels.shape or support.shape[0] != query.shape[0]:
        raise ValueError(
            f"mismatched shapes: support {tuple(support.shape)}, "
            f"support_labels {tuple(support_labels.shape)}, query {tuple(query.shape)}"
        )
    if support.shape[2:] != query.shape[2:]:
        if block_inputs:
            raise ValueError(f"support block inputs {tuple(support.shape[2:])} != query {tuple(query.shape[2:])}")
        raise ValueError(f"support dim {support.shape[2]} != query dim {query.shape[2]}")
    if n_way < 1:
        raise ValueError(f"n_way must be >= 1, got {n_way}")


def _one_hot(labels: torch.Tensor, n_way: int, dtype: torch.dtype) -> torch.Tensor:
    # F.one_hot raises on labels >= n_way, which is the range check we want.
    return F.one_hot(labels.long(), n_way).to(dtype)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances (E,A,D) x (E,B,D) -> (E,A,B) via one bmm."""
    d = (
        a.pow(2).sum(-1, keepdim=True)
        - 2.0 * torch.bmm(a, b.transpose(1, 2))
        + b.pow(2).sum(-1).unsqueeze(1)
    )
    return d.clamp_min_(0.0)  # the expansion can dip just below 0 by rounding


class _ConstInputLinear(torch.autograd.Function):
    """bmm(x, w^T) for a constant x, with the weight gradient computed as g^T x.

    Autograd's own backward forms x^T g, a (D,S)(S,N) product that is ~4x slower on CPU
    for these skinny few-shot shapes; fine-tuning time is almost all this matmul.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.bmm(x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (x,) = ctx.saved_tensors
        return None, torch.bmm(grad.transpose(1, 2), x)


class FewShotClassifier(ABC):
    """Fit on one episode's support embeddings, then score its queries."""

    @abstractmethod
    def fit(
        self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int
    ) -> FewShotClassifier:
        """support (S,D) float, support_labels (S,) in 0..n_way-1."""

    @abstractmethod
    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """query (Q,D) -> (Q, n_way) scores; higher means more likely."""

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        return self.logits(query).argmax(-1)

    def fit_logits_batched(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        n_way: int,
    ) -> torch.Tensor:
        """E independent episodes: (E,S,D), (E,S), (E,Q,D) -> logits (E,Q,n_way).

        Fallback loops over episodes; heads override it with batched tensor ops.
        """
        _check_episode_batch(support, support_labels, query, n_way)
        return torch.stack(
            [self.fit(s, y, n_way).logits(q) for s, y, q in zip(support, support_labels, query)]
        )

    def fit_predict_batched(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        n_way: int,
    ) -> torch.Tensor:
        """E independent episodes -> predicted episode labels (E,Q)."""
        return self.fit_logits_batched(support, support_labels, query, n_way).argmax(-1)


def _require(value: torch.Tensor | None, head: object) -> torch.Tensor:
    if value is None:
        raise RuntimeError(f"{type(head).__name__} must be fit before scoring queries")
    return value


class ProtoNet(FewShotClassifier):
    """Prototypical networks (Snell et al. 2017) without meta-training.

    Prototype = mean support embedding per class. Logits = -squared euclidean distance to
    each prototype, or, with ``distance="cosine"``, cosine similarity to each prototype
    (prototypes are averaged from the raw embeddings, then compared by angle).
    """

    def __init__(self, distance: Literal["euclidean", "cosine"] = "euclidean") -> None:
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
        self.distance = distance
        self.prototypes_: torch.Tensor | None = None

    @staticmethod
    def _prototypes(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
        onehot = _one_hot(labels, n_way, support.dtype)  # (E,S,N)
        sums = torch.bmm(onehot.transpose(1, 2), support)  # (E,N,D)
        counts = onehot.sum(1).unsqueeze(-1)  # (E,N,1)
        if bool((counts == 0).any()):
            raise ValueError("every way needs at least one support sample")
        return sums / counts

    def _score(self, query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        if self.distance == "euclidean":
            return -_sq_dists(query, prototypes)
        protos = F.normalize(prototypes, dim=-1)
        return torch.bmm(F.normalize(query, dim=-1), protos.transpose(1, 2))

    def fit(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> ProtoNet:
        self.prototypes_ = self._prototypes(support[None], support_labels[None], n_way)[0]
        return self

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        return self._score(query[None], _require(self.prototypes_, self)[None])[0]

    def fit_logits_batched(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        n_way: int,
    ) -> torch.Tensor:
        _check_episode_batch(support, support_labels, query, n_way)
        return self._score(query, self._prototypes(support, support_labels, n_way))


def _fused_ok(x: torch.Tensor) -> bool:
    return x.device.type in ("cpu", "cuda") and x.dtype in (torch.float32, torch.float64)


class _FineTuned(FewShotClassifier):
    """Shared trainer for heads that fit fresh weights on the support set.

    Full-batch Adam for ``steps`` steps on the cross-entropy, with E episodes solved at
    once: parameters are stacked (E, ...), and the loss is the *sum* over episodes of each
    episode's mean loss, so each episode's gradient is exactly its own. Adam is
    elementwise, so the episodes never interact. Adam rather than SGD because its step size
    does not depend on the embedding scale, which varies across encoders and normalisations.
    Every episode starts from the same initial weights, drawn from ``seed`` on a private
    generator (the global RNG is left alone).
    """

    def __init__(self, steps: int, lr: float, weight_decay: float, seed: int) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.steps = steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed

    def _init_uniform(
        self, shape: tuple[int, ...], bound: float, like: torch.Tensor
    ) -> torch.Tensor:
        # Same U(-1/sqrt(dim), 1/sqrt(dim)) range nn.Linear uses, but reproducible per seed.
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        w = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * bound
        return w.to(device=like.device, dtype=like.dtype)

    @abstractmethod
    def _init_params(
        self, n_episodes: int, dim: int, n_way: int, like: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Stacked (E, ...) leaf tensors; those with requires_grad are trained."""

    def _param_groups(self, params: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        trainable = [p for p in params.values() if p.requires_grad]
        return [{"params": trainable, "weight_decay": self.weight_decay}]

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Per-input transform applied once, outside the training loop."""
        return x

    @abstractmethod
    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Prepared x (E,A,D) -> logits (E,A,N)."""

    def _train(
        self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int
    ) -> dict[str, torch.Tensor]:
        n_episodes, n_support, dim = support.shape
        # inference_mode(False) + clone lets fitting work even when the caller is inside
        # torch.inference_mode() (inference tensors cannot be saved for backward).
        with torch.inference_mode(False), torch.enable_grad():
            x = self._prepare(support.detach().clone())
            y = support_labels.detach().clone().long().reshape(-1)
            if bool((y < 0).any()) or bool((y >= n_way).any()):
                raise ValueError(f"support_labels must lie in 0..{n_way - 1}")
            params = self._init_params(n_episodes, dim, n_way, x)
            # fused: one kernel per step, ~4x faster than the default loop on CPU.
            opt = torch.optim.Adam(self._param_groups(params), lr=self.lr, fused=_fused_ok(x))
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                logits = self._forward(params, x).reshape(n_episodes * n_support, n_way)
                loss = F.cross_entropy(logits, y, reduction="none")
                loss.view(n_episodes, n_support).mean(1).sum().backward()
                opt.step()
        return {name: p.detach() for name, p in params.items()}

    def fit_logits_batched(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        n_way: int,
    ) -> torch.Tensor:
        _check_episode_batch(support, support_labels, query, n_way)
        params = self._train(support, support_labels, n_way)
        with torch.no_grad():
            return self._forward(params, self._prepare(query))


class LinearProbe(_FineTuned):
    """Chen et al. 2019 "Baseline": a fresh ``nn.Linear(dim, n_way)`` trained on the support.

    Full-batch Adam (see ``_FineTuned``), weight decay on weight and bias. After ``fit`` the
    trained layer is ``linear_``.
    """

    def __init__(
        self, steps: int = 100, lr: float = 0.01, weight_decay: float = 1e-3, seed: int = 0
    ) -> None:
        super().__init__(steps, lr, weight_decay, seed)
        self.linear_: nn.Linear | None = None

    def _init_params(
        self, n_episodes: int, dim: int, n_way: int, like: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        # One draw for weight and bias together, like nn.Linear's U(-1/sqrt(dim), 1/sqrt(dim)).
        wb = self._init_uniform((n_way, dim + 1), 1.0 / math.sqrt(dim), like)
        wb = wb.unsqueeze(0).expand(n_episodes, -1, -1)  # same start for every episode
        return {
            "weight": wb[..., :dim].contiguous().requires_grad_(),
            "bias": wb[..., dim].contiguous().requires_grad_(),
        }

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return _ConstInputLinear.apply(x, params["weight"]) + params["bias"].unsqueeze(1)

    def fit(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> LinearProbe:
        params = self._train(support[None], support_labels[None], n_way)
        # skip_init: nn.Linear's own init would consume the global RNG for values we overwrite.
        layer = nn.utils.skip_init(
            nn.Linear, support.shape[1], n_way, device=support.device, dtype=support.dtype
        )
        with torch.no_grad():
            layer.weight.copy_(params["weight"][0])
            layer.bias.copy_(params["bias"][0])
        self.linear_ = layer.requires_grad_(False)
        return self

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        if self.linear_ is None:
            raise RuntimeError("LinearProbe must be fit before scoring queries")
        with torch.no_grad():
            return self.linear_(query)


class CosineClassifier(_FineTuned):
    """Chen et al. 2019 "Baseline++": logits = scale * cos(input, weight row).

    Inputs and weight rows are L2-normalised; no bias. ``scale`` starts at ``init_scale``
    and is learned (without weight decay, which would only drag it towards 0) unless
    ``learn_scale=False``. After ``fit``: ``weight_`` (n_way, dim) and the scale ``scale_``.
    """

    def __init__(
        self,
        steps: int = 100,
        lr: float = 0.01,
        weight_decay: float = 1e-3,
        init_scale: float = 10.0,
        learn_scale: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(steps, lr, weight_decay, seed)
        self.init_scale = float(init_scale)
        self.learn_scale = learn_scale
        self.weight_: torch.Tensor | None = None
        self.scale_: float | None = None

    def _init_params(
        self, n_episodes: int, dim: int, n_way: int, like: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        weight = self._init_uniform((n_way, dim), 1.0 / math.sqrt(dim), like)
        scale = torch.full((n_episodes,), self.init_scale, device=like.device, dtype=like.dtype)
        return {
            "weight": weight.unsqueeze(0).repeat(n_episodes, 1, 1).requires_grad_(),
            "scale": scale.requires_grad_(self.learn_scale),
        }

    def _param_groups(self, params: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [
            {"params": [params["weight"]], "weight_decay": self.weight_decay}
        ]
        if self.learn_scale:
            # No decay on the scale: it would only drag the temperature towards 0.
            groups.append({"params": [params["scale"]], "weight_decay": 0.0})
        return groups

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # x . (w / |w|) computed as (x . w) / |w|: same value, but autograd never has to
        # materialise (or backprop through) a normalised copy of the (E,N,D) weight.
        weight = params["weight"]
        norms = weight.norm(dim=-1).clamp_min(1e-12).unsqueeze(1)  # (E,1,N), F.normalize's eps
        cos = _ConstInputLinear.apply(x, weight) / norms
        return params["scale"].view(-1, 1, 1) * cos

    def fit(
        self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int
    ) -> CosineClassifier:
        params = self._train(support[None], support_labels[None], n_way)
        self.weight_ = F.normalize(params["weight"][0], dim=-1)
        self.scale_ = float(params["scale"][0])
        return self

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        if self.weight_ is None or self.scale_ is None:
            raise RuntimeError("CosineClassifier must be fit before scoring queries")
        with torch.no_grad():
            return self.scale_ * (F.normalize(query, dim=-1) @ self.weight_.T)


class _SupportScoringHead(FewShotClassifier):
    """A head that keeps the support set and scores queries against it with
    ``_score(support, support_labels, query, n_way)`` on (E, ...) episode batches (kNN, MatchingNet)."""

    support_: torch.Tensor | None = None
    support_labels_: torch.Tensor | None = None
    n_way_: int = 0

    @abstractmethod
    def _score(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int) -> torch.Tensor: ...

    def fit(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> Self:
        if bool((support_labels < 0).any()) or bool((support_labels >= n_way).any()):
            raise ValueError(f"support_labels must lie in 0..{n_way - 1}")
        self.support_, self.support_labels_, self.n_way_ = support, support_labels, n_way
        return self

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        support = _require(self.support_, self)
        labels = _require(self.support_labels_, self)
        return self._score(support[None], labels[None], query[None], self.n_way_)[0]

    def fit_logits_batched(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        n_way: int,
    ) -> torch.Tensor:
        _check_episode_batch(support, support_labels, query, n_way)
        return self._score(support, support_labels, query, n_way)


class KNN(_SupportScoringHead):
    """k nearest support embeddings by euclidean distance, majority vote.

    Tie rule: among classes with the most votes, the one holding the nearest neighbour
    wins. Logits are vote counts plus a tie-break fraction in (0, 1) that is larger the
    nearer a class's closest neighbour ranks, so argmax follows the rule exactly while
    ``floor(logits)`` are the plain vote counts.
    """

    def __init__(self, k: int = 1) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k

    def _score(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        if self.k > support.shape[1]:
            raise ValueError(f"k={self.k} exceeds the {support.shape[1]} support samples")
        dists = _sq_dists(query, support)  # (E,Q,S)
        nearest = dists.topk(self.k, dim=-1, largest=False, sorted=True).indices  # (E,Q,k)
        e, q, _ = dists.shape
        neighbour_labels = torch.gather(
            labels.long().unsqueeze(1).expand(e, q, -1), 2, nearest
        )  # (E,Q,k)
        out = torch.zeros(e, q, n_way, device=query.device, dtype=query.dtype)
        ones = torch.ones_like(neighbour_labels, dtype=out.dtype)
        votes = out.scatter_add(2, neighbour_labels, ones)
        # Rank r (0 = nearest) earns (k - r) / (k + 1): distinct, all in (0, 1).
        ranks = torch.arange(self.k, device=query.device, dtype=out.dtype)
        rank_bonus = (self.k - ranks) / (self.k + 1)
        bonus = out.scatter_reduce(
            2, neighbour_labels, rank_bonus.expand(e, q, -1), reduce="amax", include_self=True
        )
        return votes + bonus

    def fit(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> Self:
        if self.k > support.shape[0]:
            raise ValueError(f"k={self.k} exceeds the {support.shape[0]} support samples")
        return super().fit(support, support_labels, n_way)


class MatchingNet(_SupportScoringHead):
    """Matching networks (Vinyals et al. 2016) without meta-training: a training-free head.

    A query attends over the support set, ``a(x, x_i) = softmax_i(cos(x, x_i) / temperature)``,
    and ``P(y=k|x) = sum_{i: y_i = k} a(x, x_i)``. Logits are ``log P(y=k|x)``, the values of
    :func:`lowlabel.meta.matchingnet.matchingnet_log_probs` (the meta-learner's head, no
    full-context embeddings) for each episode, computed for E episodes at once with (E,Q,S)
    intermediates: per class, a log-sum-exp shifted by that class's largest similarity. A way
    without support samples gets -inf.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _score(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        sims = torch.bmm(F.normalize(query, dim=-1), F.normalize(support, dim=-1).transpose(1, 2))
        sims = sims / self.temperature  # (E,Q,S)
        onehot = _one_hot(labels, n_way, sims.dtype)  # (E,S,N); also the label range check
        e, q, s = sims.shape
        index = labels.long().unsqueeze(1).expand(e, q, s)
        # Each class's largest similarity; a class with no support keeps -inf.
        empty = torch.full((e, q, n_way), float("-inf"), device=sims.device, dtype=sims.dtype)
        class_max = empty.scatter_reduce(2, index, sims, reduce="amax", include_self=True)
        shifted = (sims - torch.gather(class_max, 2, index)).exp()  # <= 1, and 1 at each class's max
        per_class = class_max + torch.bmm(shifted, onehot).log()  # logsumexp over the class's samples
        return per_class - torch.logsumexp(sims, dim=-1, keepdim=True)



HEADS: dict[str, Callable[..., FewShotClassifier]] = {
    "protonet": ProtoNet,
    "linear": LinearProbe,
    "cosine": CosineClassifier,
    "knn": KNN,
    "matchingnet": MatchingNet,
}


def build_head(name: str, **kwargs: Any) -> FewShotClassifier:
    """Instantiate a head by name: one of ``HEADS``."""
    try:
        factory = HEADS[name]
    except KeyError:
        raise ValueError(
            f"unknown few-shot head {name!r}; allowed: {', '.join(sorted(HEADS))}"
        ) from None
    return factory(**kwargs)
