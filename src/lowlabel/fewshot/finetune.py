"""The fine-tuning few-shot head: a copy of the encoder's last block plus a fresh linear classifier,
trained on each episode's support images (Chen et al. 2019's fine-tuning baseline, not transductive).

Everything before the last block stays frozen, so its output for every pool image is computed
once (:class:`LastBlockSplit` ``.trunk``) and the head trains on that cache like the other heads
train on embeddings: E episodes at once, each with its own stacked copy of the block's weights
(``torch.func.vmap`` over ``functional_call``), so no episode ever sees another's gradient.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from lowlabel.fewshot.heads import FewShotClassifier, _check_episode_batch, _fused_ok

__all__ = ["EncoderSplitError", "FineTuneLastBlock", "LastBlockSplit", "split_last_block"]

# Layers that end a Sequential encoder's last block: global pooling / flattening to (B, D).
_GLOBAL_POOLS = (nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# Layers timm models apply between their last block and forward_head, by the attribute names
# timm uses; tried in order, the first that reproduces the encoder's output is taken.
_TIMM_TAILS: tuple[tuple[str, ...], ...] = ((), ("norm",), ("norm_pre",), ("conv_head", "bn2"))
# Episodes fine-tuned together hold this many block weights at most (x4 with grads and Adam's
# two moments): all of a batch of episodes for Conv-4's block, a few for a ResNet stage's block.
_PARAM_BUDGET = 2**22


class EncoderSplitError(ValueError):
    """The encoder has no last block this module knows how to cut out."""


class _CutReached(Exception):
    """Raised by the pre-hook on the last block to stop the forward pass with the block's input."""

    def __init__(self, block_input: torch.Tensor) -> None:
        super().__init__()
        self.block_input = block_input


class _Trunk(nn.Module):
    """Images -> the last block's input: the encoder run up to (not through) its last block."""

    def __init__(self, encoder: nn.Module, first_block_module: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self._cut_at = [first_block_module]  # a list: not registered twice as a submodule
        self.train(False)

    def train(self, mode: bool = True) -> _Trunk:
        # Frozen means eval mode too: callers that restore a training flag afterwards
        # (extract_features) must not switch the shared encoder's BatchNorm to batch statistics.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        def stop(module: nn.Module, args: tuple) -> None:
            raise _CutReached(args[0])

        handle = self._cut_at[0].register_forward_pre_hook(stop)
        try:
            self.encoder(images)
        except _CutReached as cut:
            return cut.block_input
        finally:
            handle.remove()
        raise EncoderSplitError("the encoder's forward pass never reached its last block")


class _TimmAfter:
    """What a timm model does after its last block: optional final norms, then forward_head."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        self.model, self.names = model, names

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = getattr(self.model, name)(x)
        return self.model.forward_head(x)


@dataclass(frozen=True, eq=False)
class LastBlockSplit:
    """A frozen private copy of an encoder, cut before its last block.

    ``trunk`` maps images to the block's input (frozen); ``block`` is the last block (its
    modules are the copy's own, listed by ``block_names``); ``after`` is the frozen rest
    (global pooling, a final norm, flattening), so ``after(block(trunk(x))) == encoder(x)``.
    """

    arch: str
    encoder: nn.Module
    block_names: tuple[str, ...]
    block: nn.Sequential
    after: Callable[[torch.Tensor], torch.Tensor]
    trunk: nn.Module

    def embed(self, block_input: torch.Tensor) -> torch.Tensor:
        """Block input (B, ...) -> embedding (B, D) with the encoder's own last block."""
        return self.after(self.block(block_input))

    def fine_tuned_encoder(self, block_state: dict[str, torch.Tensor]) -> nn.Module:
        """A copy of the whole encoder with ``block_state`` (a fine-tuned ``block``) loaded in."""
        encoder = copy.deepcopy(self.encoder)
        nn.Sequential(*[encoder.get_submodule(name) for name in self.block_names]).load_state_dict(block_state)
        return encoder


def _holds_weights(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())


def _sequential_block(encoder: nn.Sequential) -> tuple[tuple[str, ...], Callable[[torch.Tensor], torch.Tensor]]:
    """Conv-4 / Wide-ResNet: from the last child holding a conv up to the global pooling."""
    children = list(encoder.named_children())
    starts = [i for i, (_, child) in enumerate(children) if _holds_weights(child)]
    if not starts:
        return (), nn.Identity()
    start = starts[-1]
    end = next((i for i in range(start + 1, len(children)) if isinstance(children[i][1], _GLOBAL_POOLS)), len(children))
    return tuple(name for name, _ in children[start:end]), nn.Sequential(*[child for _, child in children[end:]])


def _timm_block(model: nn.Module) -> str | None:
    """timm: the last block of the model's last feature stage (timm's own ``feature_info``)."""
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_head"):
        return None
    name = info[-1]["module"]
    stage = model.get_submodule(name)
    if isinstance(getattr(stage, "blocks", None), (nn.Sequential, nn.ModuleList)):  # ConvNeXt-like stages
        name, stage = f"{name}.blocks", stage.blocks
    children = list(stage.named_children())
    # A stage that is a list of blocks: a Sequential, or RegNet's b1..bN of one type.
    is_list = isinstance(stage, (nn.Sequential, nn.ModuleList))
    same_typed = len(children) > 1 and len({type(child) for _, child in children}) == 1
    if children and (is_list or same_typed):
        name, stage = f"{name}.{children[-1][0]}", children[-1][1]
    # ViT: every block is its own feature stage. A norm layer (DenseNet's norm5) is no block.
    return name if _holds_weights(stage) else None


def _reproduces(split: LastBlockSplit, example: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            want = split.encoder(example)
            got = split.embed(split.trunk(example))
    except (RuntimeError, TypeError, AttributeError, EncoderSplitError):
        return False
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-4, atol=1e-5 * (1 + float(want.abs().max()))))


def split_last_block(encoder: nn.Module, example: torch.Tensor, arch: str) -> LastBlockSplit:
    """Cut a frozen copy of ``encoder`` before its last block.

    The last block is, for a Sequential encoder (Conv-4, Wide-ResNet), the last child that
    holds a convolution together with the layers after it up to the global pooling; for a
    timm model (``resnet18_cifar`` included), the last block of timm's last feature stage.
    The cut is checked on ``example`` (a small image batch the encoder accepts): the
    pieces must reproduce the encoder's output, else :class:`EncoderSplitError` names ``arch``.
    """
    frozen = copy.deepcopy(encoder).eval().requires_grad_(False)
    candidates: list[tuple[tuple[str, ...], Callable[[torch.Tensor], torch.Tensor]]] = []
    if isinstance(frozen, nn.Sequential):
        names, after = _sequential_block(frozen)
        if names:
            candidates.append((names, after))
    elif (name := _timm_block(frozen)) is not None:
        candidates += [
            ((name,), _TimmAfter(frozen, tail)) for tail in _TIMM_TAILS if all(hasattr(frozen, n) for n in tail)
        ]
    for names, after in candidates:
        block = nn.Sequential(*[frozen.get_submodule(n) for n in names])
        example = example.to(next(block.parameters()).device)
        trunk = _Trunk(frozen, block[0])
        split = LastBlockSplit(arch=arch, encoder=frozen, block_names=names, block=block, after=after, trunk=trunk)
        if _reproduces(split, example):
            return split
    found = f"a last block at {candidates[0][0]} that does not reproduce its output" if candidates else "no last block"
    raise EncoderSplitError(
        f"encoder {arch!r} ({type(encoder).__name__}): found {found}; the finetune few-shot head "
        "supports Sequential encoders (conv4, wrn) and timm models whose last feature stage is a "
        "list of blocks followed by forward_head (resnet18_cifar, timm ResNets, ConvNeXt, ViT, "
        "EfficientNet); leave 'finetune' out of fewshot.heads for this encoder"
    )


class FineTuneLastBlock(FewShotClassifier):
    """Fine-tune a copy of the encoder's last block and a fresh linear classifier per episode.

    Inputs are the last block's inputs (``split.trunk`` of the images, eval view, no
    augmentation), the frozen trunk's cache. Full-batch Adam for ``steps`` steps on the
    support cross-entropy: the new classifier at ``lr`` with ``weight_decay`` (as
    :class:`~lowlabel.fewshot.heads.LinearProbe`), the block at ``block_lr`` without decay
    (decay would drag trained weights towards 0, not towards where they started). The block
    runs in eval mode: BatchNorm keeps the encoder's running statistics (a 5-image support
    batch gives useless batch statistics) while its affine weights are tuned with the rest.
    Embeddings are L2-normalised before the classifier when ``l2_normalize``. Deterministic by
    ``seed`` (the classifier's init, the same for every episode; the global RNG is untouched).
    After ``fit``: ``block_state_`` (the tuned block's weights), ``weight_``, ``bias_``.
    """

    def __init__(
        self,
        split: LastBlockSplit,
        steps: int = 100,
        lr: float = 0.01,
        block_lr: float = 1e-4,
        weight_decay: float = 1e-3,
        l2_normalize: bool = True,
        seed: int = 0,
    ) -> None:
        if not isinstance(split, LastBlockSplit):
            raise TypeError(f"split must be a LastBlockSplit (see split_last_block), got {type(split).__name__}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if lr <= 0 or block_lr <= 0:
            raise ValueError(f"lr and block_lr must be > 0, got {lr}, {block_lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.split = split
        self.steps, self.lr, self.block_lr, self.weight_decay = steps, lr, block_lr, weight_decay
        self.l2_normalize, self.seed = l2_normalize, seed
        self.block_state_: dict[str, torch.Tensor] | None = None
        self.weight_: torch.Tensor | None = None
        self.bias_: torch.Tensor | None = None

    def _embed(self, block_params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Stacked block weights (E, ...) and block inputs (E,A,...) -> embeddings (E,A,D)."""

        def one_episode(params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
            return self.split.after(functional_call(self.split.block, params, (inputs,)))

        emb = vmap(one_episode)(block_params, x)
        return F.normalize(emb, dim=-1) if self.l2_normalize else emb

    def _logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        emb = self._embed(params["block"], x)
        return torch.baddbmm(params["bias"].unsqueeze(1), emb, params["weight"].transpose(1, 2))

    def _init_params(self, n_episodes: int, x: torch.Tensor, n_way: int) -> dict:
        block = {
            name: p.detach().to(x.dtype).unsqueeze(0).repeat(n_episodes, *[1] * p.dim()).requires_grad_()
            for name, p in self.split.block.named_parameters()
        }
        with torch.no_grad():
            dim = self._embed({k: v[:1] for k, v in block.items()}, x[:1, :1]).shape[-1]
        # nn.Linear's U(-1/sqrt(dim), 1/sqrt(dim)), drawn from a private generator by seed.
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        wb = (torch.rand((n_way, dim + 1), generator=gen, dtype=torch.float64) * 2.0 - 1.0) / math.sqrt(dim)
        wb = wb.to(device=x.device, dtype=x.dtype).unsqueeze(0).expand(n_episodes, -1, -1)
        return {
            "block": block,
            "weight": wb[..., :dim].contiguous().requires_grad_(),
            "bias": wb[..., dim].contiguous().requires_grad_(),
        }

    def _train(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> dict:
        n_episodes, n_support = support.shape[:2]
        self.split.encoder.eval()  # BatchNorm on the encoder's running statistics (see class doc)
        # inference_mode(False) + clone: the cached block inputs may be inference tensors.
        with torch.inference_mode(False), torch.enable_grad():
            x = support.detach().clone().float()
            y = support_labels.detach().clone().long().reshape(-1)
            if bool((y < 0).any()) or bool((y >= n_way).any()):
                raise ValueError(f"support_labels must lie in 0..{n_way - 1}")
            params = self._init_params(n_episodes, x, n_way)
            opt = torch.optim.Adam(
                [
                    {"params": list(params["block"].values()), "lr": self.block_lr, "weight_decay": 0.0},
                    {"params": [params["weight"], params["bias"]], "lr": self.lr, "weight_decay": self.weight_decay},
                ],
                fused=_fused_ok(x),
            )
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                logits = self._logits(params, x).reshape(n_episodes * n_support, n_way)
                loss = F.cross_entropy(logits, y, reduction="none")
                # Sum of per-episode means: each episode's gradient is exactly its own.
                loss.view(n_episodes, n_support).mean(1).sum().backward()
                opt.step()
        return {
            "block": {k: v.detach() for k, v in params["block"].items()},
            "weight": params["weight"].detach(),
            "bias": params["bias"].detach(),
        }

    def _episodes_per_chunk(self) -> int:
        n_params = sum(p.numel() for p in self.split.block.parameters())
        return max(1, _PARAM_BUDGET // max(1, n_params))

    def fit(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> FineTuneLastBlock:
        """support (S, ...) block inputs, support_labels (S,) in 0..n_way-1."""
        _check_episode_batch(support[None], support_labels[None], support[None], n_way, block_inputs=True)
        params = self._train(support[None], support_labels[None], n_way)
        # A whole state dict of the block (its buffers, e.g. BN statistics, are unchanged).
        self.block_state_ = {**self.split.block.state_dict(), **{k: v[0] for k, v in params["block"].items()}}
        self.weight_, self.bias_ = params["weight"][0], params["bias"][0]
        return self

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        if self.block_state_ is None or self.weight_ is None or self.bias_ is None:
            raise RuntimeError("FineTuneLastBlock must be fit before scoring queries")
        tuned = dict(self.split.block.named_parameters())
        params = {
            "block": {k: v[None] for k, v in self.block_state_.items() if k in tuned},
            "weight": self.weight_[None],
            "bias": self.bias_[None],
        }
        with torch.no_grad():
            return self._logits(params, query[None].float())[0]

    def fit_logits_batched(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        _check_episode_batch(support, support_labels, query, n_way, block_inputs=True)
        chunk = self._episodes_per_chunk()
        out = []
        for start in range(0, support.shape[0], chunk):
            part = slice(start, start + chunk)
            params = self._train(support[part], support_labels[part], n_way)
            with torch.no_grad():
                out.append(self._logits(params, query[part].float()))
        return torch.cat(out)

