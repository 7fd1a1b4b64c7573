"""The finetune few-shot head: where the last block is cut, what it trains, and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lowlabel.config import ConfigError, parse_params
from lowlabel.data.prepared import PreparedData
from lowlabel.data.splits import Split
from lowlabel.fewshot import (
    EncoderSplitError,
    FineTuneLastBlock,
    LastBlockSplit,
    evaluate_episodes,
    sample_episodes,
    split_last_block,
)
from lowlabel.fewshot.protocol import (
    FewShotProtocol,
    ProtocolError,
    embed_novel_pool,
    evaluate_encoder,
    evaluate_head,
    plan_episodes,
    random_encoder,
)
from lowlabel.models.encoders import Conv4, build_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _conv4_split(seed: int = 0) -> tuple[nn.Module, LastBlockSplit]:
    torch.manual_seed(seed)
    encoder = Conv4(in_chans=1, width=16).eval()
    return encoder, split_last_block(encoder, torch.randn(2, 1, 28, 28), "conv4")


def _images(labels: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Noise images whose class shifts a class-specific pattern: learnable, not trivial."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(int(labels.max()) + 1, 1, 28, 28, generator=gen)
    return torch.randn(labels.size, 1, 28, 28, generator=gen) + 0.8 * patterns[torch.as_tensor(labels)]


def _episode_batch(acts: torch.Tensor, labels: np.ndarray, n_episodes: int, k_shot: int = 2):
    episodes = sample_episodes(labels, 3, k_shot, 4, n_episodes, seed=0)
    sup = torch.as_tensor(np.stack([e.support for e in episodes]))
    qry = torch.as_tensor(np.stack([e.query for e in episodes]))
    ys = torch.as_tensor(np.stack([e.support_labels() for e in episodes]))
    return acts[sup], ys, acts[qry]


# ---------------------------------------------------------------- the cut


@pytest.mark.parametrize(
    "arch, in_chans, size, block",
    [
        ("conv4", 1, 28, ("12", "13", "14", "15")),  # the 4th conv-BN-ReLU-pool; Flatten after
        ("resnet18_cifar", 3, 32, ("layer4.1",)),  # the last residual block of timm's last stage
        ("timm:resnet10t", 3, 32, ("layer4.0",)),  # any timm model by the same rule
        ("wrn28_2", 3, 32, ("12", "13", "14")),  # last residual block + the final BN-act; pooling after
    ],
)
def test_split_reproduces_encoder(arch: str, in_chans: int, size: int, block: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    try:
        encoder = build_encoder(arch, in_chans, 64).eval()
    except ValueError as error:  # an arch this checkout's encoders do not offer
        pytest.skip(str(error))
    images = torch.randn(3, in_chans, size, size)
    split = split_last_block(encoder, images, arch)
    assert split.block_names == block
    with torch.no_grad():
        torch.testing.assert_close(split.embed(split.trunk(images)), encoder(images), rtol=1e-4, atol=1e-5)
    # A private frozen copy: the caller's encoder keeps its parameters and their grad flags.
    assert split.encoder is not encoder and not any(p.requires_grad for p in split.encoder.parameters())
    assert all(p.requires_grad for p in encoder.parameters())


def test_trunk_stays_in_eval_mode() -> None:
    _, split = _conv4_split()
    split.trunk.train()  # e.g. extract_features restoring a training flag
    assert not split.encoder.training


class _NoBlocks(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class _NotReallySequential(nn.Sequential):
    """A Sequential whose forward adds a skip over everything: no cut reproduces it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x.mean((2, 3)).repeat(1, 4)


@pytest.mark.parametrize(
    "encoder, arch, found",
    [
        (_NoBlocks(), "custom:noblocks", "no last block"),
        (nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), "custom:pool", "no last block"),
        (
            _NotReallySequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            "custom:skip",
            "does not reproduce",
        ),
    ],
)
def test_split_unknown_encoder_names_arch(encoder: nn.Module, arch: str, found: str) -> None:
    with pytest.raises(EncoderSplitError, match=found) as err:
        split_last_block(encoder, torch.randn(2, 1, 8, 8), arch)
    assert repr(arch) in str(err.value)


# ---------------------------------------------------------------- the head


def test_only_the_last_block_is_tuned() -> None:
    encoder, split = _conv4_split()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    labels = np.repeat(np.arange(3), 4)
    images = _images(labels)
    with torch.no_grad():
        acts = split.trunk(images)
    head = FineTuneLastBlock(split, steps=20, block_lr=1e-2).fit(acts, torch.as_tensor(labels), 3)
    # The caller's encoder and the split's copy are untouched: tuning works on stacked copies.
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    tuned = split.fine_tuned_encoder(head.block_state_)
    after = tuned.state_dict()
    last_block = ("12.", "13.")  # conv and BN of the 4th block (ReLU, pool, Flatten hold nothing)
    for k, v in after.items():
        if k.startswith(last_block) and "running" not in k and "num_batches" not in k:
            assert not torch.equal(v, before[k]), f"{k} was not tuned"
        else:  # earlier blocks, and BN running statistics (eval mode) stay as they were
            assert torch.equal(v, before[k]), f"{k} changed"
    # The tuned encoder + the head's classifier reproduce the head's own logits.
    with torch.no_grad():
        emb = torch.nn.functional.normalize(tuned.eval()(images), dim=-1)
        torch.testing.assert_close(emb @ head.weight_.T + head.bias_, head.logits(acts), rtol=1e-4, atol=1e-5)


def test_resnet_only_last_residual_block_tuned() -> None:
    torch.manual_seed(0)
    encoder = build_encoder("resnet18_cifar", 3, 64).eval()
    images = torch.randn(6, 3, 32, 32)
    split = split_last_block(encoder, images[:2], "resnet18_cifar")
    with torch.no_grad():
        acts = split.trunk(images)
    head = FineTuneLastBlock(split, steps=2, block_lr=1e-2).fit(acts, torch.arange(3).repeat(2), 3)
    before, after = encoder.state_dict(), split.fine_tuned_encoder(head.block_state_).state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("layer4.1.") for k in changed)
    assert "layer4.1.conv2.weight" in changed


def test_head_fits_its_support() -> None:
    _, split = _conv4_split()
    labels = np.repeat(np.arange(5), 3)
    with torch.no_grad():
        acts = split.trunk(_images(labels))
    head = FineTuneLastBlock(split).fit(acts, torch.as_tensor(labels), 5)  # the default 100 steps
    assert head.predict(acts).tolist() == labels.tolist()


def test_batched_equals_per_episode_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    _, split = _conv4_split()
    labels = np.repeat(np.arange(6), 8)
    with torch.no_grad():
        acts = split.trunk(_images(labels))
    support, ys, query = _episode_batch(acts, labels, n_episodes=5)
    batched = FineTuneLastBlock(split, steps=10, seed=3).fit_logits_batched(support, ys, query, 3)
    single = torch.stack(
        [FineTuneLastBlock(split, steps=10, seed=3).fit(s, y, 3).logits(q) for s, y, q in zip(support, ys, query)]
    )
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    # Episodes never interact, so splitting them into chunks (large blocks) changes nothing.
    monkeypatch.setattr("lowlabel.fewshot.finetune._PARAM_BUDGET", 1)
    chunked = FineTuneLastBlock(split, steps=10, seed=3).fit_logits_batched(support, ys, query, 3)
    torch.testing.assert_close(chunked, batched, rtol=1e-4, atol=1e-5)


def test_deterministic_by_seed_and_leaves_global_rng() -> None:
    _, split = _conv4_split()
    labels = np.repeat(np.arange(3), 2)
    with torch.no_grad():
        acts = split.trunk(_images(labels))
    ys = torch.as_tensor(labels)
    state = torch.get_rng_state()
    a = FineTuneLastBlock(split, steps=5, seed=1).fit(acts, ys, 3)
    b = FineTuneLastBlock(split, steps=5, seed=1).fit(acts, ys, 3)
    c = FineTuneLastBlock(split, steps=5, seed=2).fit(acts, ys, 3)
    assert torch.equal(a.weight_, b.weight_) and not torch.equal(a.weight_, c.weight_)
    assert all(torch.equal(a.block_state_[k], b.block_state_[k]) for k in a.block_state_)
    assert torch.equal(state, torch.get_rng_state())


def test_works_under_inference_mode() -> None:
    _, split = _conv4_split()
    with torch.inference_mode():
        acts = split.trunk(torch.randn(6, 1, 28, 28))  # inference tensors, as extract_features makes
        preds = FineTuneLastBlock(split, steps=3).fit(acts, torch.arange(3).repeat(2), 3).predict(acts)
    assert preds.shape == (6,)


def test_evaluate_episodes_with_built_classifier() -> None:
    _, split = _conv4_split()
    labels = np.repeat(np.arange(6) * 5 + 1, 8)
    with torch.no_grad():
        acts = split.trunk(_images(labels))
    episodes = sample_episodes(labels, 3, 2, 4, 6, seed=0)
    head = FineTuneLastBlock(split, steps=5)
    result = evaluate_episodes(acts, labels, episodes, "finetune", batch_size=4, classifier=head)
    assert result.head == "finetune" and result.per_episode.shape == (6,)
    assert 0.0 <= result.accuracy <= 1.0
    with pytest.raises(ValueError, match="not both"):
        evaluate_episodes(acts, labels, episodes, "finetune", head_kwargs={"steps": 3}, classifier=head)
    with pytest.raises(ValueError, match=r"\(N, D\)"):  # a named head still needs (N, D) rows
        evaluate_episodes(acts, labels, episodes, "protonet")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"steps": 0}, ValueError, "steps"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"block_lr": -1e-3}, ValueError, "block_lr"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
    ],
)
def test_rejects_bad_settings(kwargs: dict, error: type, match: str) -> None:
    _, split = _conv4_split()
    with pytest.raises(error, match=match):
        FineTuneLastBlock(split, **kwargs)


def test_rejects_bad_inputs() -> None:
    _, split = _conv4_split()
    acts = split.trunk(torch.randn(4, 1, 28, 28)).detach()
    with pytest.raises(TypeError, match="LastBlockSplit"):
        FineTuneLastBlock(Conv4(1, 16))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="fit"):
        FineTuneLastBlock(split).logits(acts)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        FineTuneLastBlock(split, steps=1).fit(acts, torch.tensor([0, 1, 2, 1]), 2)
    with pytest.raises(ValueError, match="mismatched"):
        FineTuneLastBlock(split).fit_logits_batched(acts[None], torch.zeros(1, 3, dtype=torch.long), acts[None], 2)
    with pytest.raises(ValueError, match="block inputs"):
        FineTuneLastBlock(split).fit_logits_batched(acts[None], torch.zeros(1, 4, dtype=torch.long), acts[None, :, :8], 2)
    with pytest.raises(ValueError, match=r"\(E,S,\.\.\.\)"):
        FineTuneLastBlock(split).fit_logits_batched(acts.flatten(1), torch.zeros(4, 1), acts.flatten(1), 2)


# ---------------------------------------------------------------- config and stage


def test_config_finetune_off_by_default_and_validated() -> None:
    default = parse_params({})
    assert "finetune" not in default.fewshot.heads
    on = parse_params({"fewshot": {"heads": ["protonet", "finetune"], "finetune": {"steps": 5, "block_lr": 1e-3}}})
    assert on.fewshot.finetune.steps == 5 and on.fewshot.finetune.block_lr == 1e-3
    for bad, field in (
        ({"steps": 0}, "fewshot.finetune.steps"),
        ({"block_lr": 0}, "fewshot.finetune.block_lr"),
        ({"weight_decay": -1}, "fewshot.finetune.weight_decay"),
        ({"lr_block": 0.1}, "fewshot.finetune.lr_block"),
    ):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            parse_params({"fewshot": {"finetune": bad}})


def _tiny_prepared(n_novel: int = 4, per_class: int = 8) -> PreparedData:
    rng = np.random.default_rng(0)
    test_labels = np.repeat(np.arange(2 + n_novel), per_class)
    train_labels = np.repeat(np.arange(2), per_class)
    image = lambda n: rng.integers(0, 255, size=(n, 28, 28, 1), dtype=np.uint8)  # noqa: E731
    novel = list(range(2, 2 + n_novel))
    split = Split(
        base_classes=[0, 1], novel_classes=novel, labeled=[0, per_class], unlabeled=[i for i in range(2 * per_class) if i not in (0, per_class)],
        test_base=list(range(2 * per_class)), test_novel=list(range(2 * per_class, len(test_labels))), seed=0,
    )
    return PreparedData(Path("."), image(len(train_labels)), train_labels, image(len(test_labels)), test_labels, split, {"mean": [0.5], "std": [0.25]})


def test_stage_pool_and_heads_with_finetune() -> None:
    params = parse_params(
        {
            "encoder": {"width": 16},
            "fewshot": {"ways": [3], "shots": [1], "queries": 2, "episodes": 4, "heads": ["protonet", "matchingnet", "finetune"], "finetune": {"steps": 3}},
        }
    )
    protocol = FewShotProtocol.from_params(params)
    data = _tiny_prepared()
    labels = data.novel_pool_labels()
    plans = plan_episodes(protocol, labels)
    encoder = random_encoder(params.encoder.arch, data.in_chans, params.encoder.width, params.seed)
    pool = embed_novel_pool(protocol, encoder, data)
    assert pool.split is not None and pool.block_inputs is not None
    assert pool.embeddings.shape == (len(labels), 16) and pool.block_inputs.shape[0] == len(labels)
    assert protocol.head_kwargs("finetune") == {"steps": 3, "lr": 0.01, "block_lr": 1e-4, "weight_decay": 1e-3, "l2_normalize": True, "seed": 0}
    scores = evaluate_encoder(protocol, encoder, data, plans, labels)
    assert set(scores) == {"base_knn_acc", "base_linear_acc", "protonet/3w1s", "matchingnet/3w1s", "finetune/3w1s"}
    assert 0 <= scores["base_linear_acc"] <= 1
    # Without the head asked for, nothing is cut and nothing extra cached; asking anyway is an error.
    plain = embed_novel_pool(protocol, encoder, data, heads=["protonet"])
    assert plain.split is None and plain.block_inputs is None
    torch.testing.assert_close(plain.embeddings, pool.embeddings)
    with pytest.raises(ProtocolError, match="finetune"):
        evaluate_head(protocol, plain, labels, plans[(3, 1)], "finetune")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_finetune_on_cuda_matches_cpu() -> None:
    encoder, cpu_split = _conv4_split()
    labels = np.repeat(np.arange(6), 10)
    images = _images(labels)
    gpu_split = split_last_block(encoder.cuda(), images[:2].cuda(), "conv4")
    episodes = sample_episodes(labels, 3, 2, 5, 40, seed=0)
    accuracy = {}
    for device, split in (("cpu", cpu_split), ("cuda", gpu_split)):
        with torch.no_grad():
            acts = split.trunk(images.to(device))
        assert acts.device.type == device
        result = evaluate_episodes(acts, labels, episodes, "finetune", classifier=FineTuneLastBlock(split, steps=20))
        accuracy[device] = result.accuracy
    # Float rounding may flip a rare near-tied query between devices; allow 1 in 100.
    assert abs(accuracy["cpu"] - accuracy["cuda"]) <= 0.01
