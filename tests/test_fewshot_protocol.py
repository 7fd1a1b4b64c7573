"""The few-shot protocol of lowlabel.fewshot.protocol: built from params in one place, episode
planning and its errors, and heads (MatchingNet among them) run through the protocol."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lowlabel.config import ConfigError, FewshotConfig, parse_params
from lowlabel.errors import UserError
from lowlabel.fewshot import sample_episodes
from lowlabel.fewshot.protocol import (
    FINETUNE,
    HEAD_NAMES,
    FewShotProtocol,
    FineTuneSettings,
    NovelPool,
    ProtocolError,
    evaluate_head,
    plan_episodes,
    setting_name,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _protocol(**fewshot) -> FewShotProtocol:
    return FewShotProtocol.from_params(
        parse_params({"seed": 3, "encoder": {"arch": "wrn28_2"}, "fewshot": fewshot})
    )


def test_from_params_takes_every_setting() -> None:
    protocol = _protocol(
        ways=[5, 20],
        shots=[1],
        queries=7,
        episodes=11,
        heads=["protonet", "matchingnet", "finetune"],
        feature_norm="center_l2",
        distance="cosine",
        knn_k=9,
        matchingnet={"temperature": 0.25},
        finetune={"steps": 4, "lr": 0.5},
    )
    assert protocol == FewShotProtocol(
        ways=(5, 20),
        shots=(1,),
        n_query=7,
        episodes=11,
        heads=("protonet", "matchingnet", "finetune"),
        feature_norm="center_l2",
        distance="cosine",
        knn_k=9,
        matchingnet_temperature=0.25,
        finetune=FineTuneSettings(steps=4, lr=0.5, block_lr=1e-4, weight_decay=1e-3),
        seed=3,
        encoder_arch="wrn28_2",
    )
    hash(protocol)  # frozen, tuples only: usable as a cache key
    with pytest.raises(dataclasses.FrozenInstanceError):
        protocol.episodes = 1  # type: ignore[misc]
    # Every fewshot.* setting has its protocol field (a new one must be added to from_params too).
    renamed = {"queries": "n_query", "matchingnet": "matchingnet_temperature"}
    fields = {field.name for field in dataclasses.fields(FewShotProtocol)}
    assert {renamed.get(name, name) for name in FewshotConfig.model_fields} <= fields
    defaults = FewShotProtocol.from_params(parse_params({}))
    assert (
        defaults.matchingnet_temperature == 1.0 and defaults.heads == ("protonet",) and defaults.n_query == 15
    )


def test_head_kwargs() -> None:
    protocol = _protocol(
        distance="cosine", matchingnet={"temperature": 0.5}, feature_norm="center", finetune={"steps": 2}
    )
    assert protocol.head_kwargs("protonet") == {"distance": "cosine"}
    assert protocol.head_kwargs("knn") == {"k": 1}
    assert protocol.head_kwargs("matchingnet") == {"temperature": 0.5}
    assert protocol.head_kwargs("linear") == protocol.head_kwargs("cosine") == {"seed": 3}
    # centering alone does not l2-normalise the tuned block's output
    assert protocol.head_kwargs(FINETUNE) == {
        "steps": 2,
        "lr": 0.01,
        "block_lr": 1e-4,
        "weight_decay": 1e-3,
        "l2_normalize": False,
        "seed": 3,
    }


def test_protocol_rejects_unknown_heads_and_norms() -> None:
    good = _protocol()
    with pytest.raises(ValueError, match="unknown few-shot heads \\['svm'\\]"):
        dataclasses.replace(good, heads=["protonet", "svm"])
    with pytest.raises(ValueError, match="feature_norm"):
        dataclasses.replace(good, feature_norm="l1")
    assert dataclasses.replace(good, ways=[5]).ways == (5,)  # lists become tuples


def test_matchingnet_temperature_is_validated_in_params() -> None:
    with pytest.raises(ConfigError, match=r"fewshot\.matchingnet\.temperature"):
        parse_params({"fewshot": {"matchingnet": {"temperature": 0}}})
    with pytest.raises(ConfigError, match=r"fewshot\.matchingnet\.temp"):
        parse_params({"fewshot": {"matchingnet": {"temp": 1.0}}})


def test_plan_episodes_skips_big_ways_and_names_settings(capsys) -> None:
    labels = np.repeat(np.arange(4), 6)
    plans = plan_episodes(_protocol(ways=[2, 9], shots=[1, 2], queries=3, episodes=5), labels)
    assert list(plans) == [(2, 1), (2, 2)] and [setting_name(*key) for key in plans] == ["2w1s", "2w2s"]
    assert all(len(episodes) == 5 for episodes in plans.values())
    assert "[fewshot] skipping 9-way: only 4 novel classes" in capsys.readouterr().out
    # Same seed, same episodes: every encoder is scored on the same ones.
    again = plan_episodes(_protocol(ways=[2, 9], shots=[1, 2], queries=3, episodes=5), labels)
    assert all(np.array_equal(a.query, b.query) for a, b in zip(plans[(2, 1)], again[(2, 1)]))
    with pytest.raises(ProtocolError, match=r"fewshot\.shots=5, fewshot\.queries=3") as error:
        plan_episodes(_protocol(ways=[2], shots=[5], queries=3), labels)
    assert isinstance(error.value, UserError)  # a stage prints it as one line and exits 2
    with pytest.raises(ProtocolError, match=r"fewshot\.ways=\[9\]: no setting fits the 4 novel classes"):
        plan_episodes(_protocol(ways=[9]), labels)


def test_matchingnet_runs_through_the_protocol() -> None:
    """The matchingnet head, named in fewshot.heads, scores each episode by the attention of
    lowlabel.meta's MatchingNet over that episode's support (argmax of its log-probabilities)."""
    from lowlabel.meta.matchingnet import matchingnet_log_probs

    protocol = _protocol(
        ways=[3], shots=[2], queries=4, episodes=9, heads=["matchingnet"], matchingnet={"temperature": 0.3}
    )
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5) * 3 + 1, 12)
    means = rng.normal(size=(5, 6)) * 0.8  # overlapping classes: the accuracy is informative
    features = torch.as_tensor(means[labels // 3] + rng.normal(size=(labels.size, 6)), dtype=torch.float64)
    (episodes,) = plan_episodes(protocol, labels).values()
    result = evaluate_head(protocol, NovelPool(features), labels, episodes, "matchingnet")
    expected = []
    for e in episodes:
        log_probs = matchingnet_log_probs(
            features[e.support], torch.as_tensor(e.support_labels()), features[e.query], 3, 0.3
        )
        expected.append(float((log_probs.argmax(1).numpy() == e.query_labels()).mean()))
    np.testing.assert_allclose(result.per_episode, expected)
    assert result.head == "matchingnet" and (result.n_way, result.k_shot, result.n_query) == (3, 2, 4)
    assert 0.2 < result.accuracy < 1.0


def test_every_cached_head_runs_on_a_pool() -> None:
    protocol = _protocol(heads=[h for h in HEAD_NAMES if h != FINETUNE])
    labels = np.repeat(np.arange(6), 10)
    features = torch.randn(labels.size, 8, generator=torch.Generator().manual_seed(0))
    episodes = sample_episodes(labels, 3, 2, 3, 4, seed=0)
    for head in protocol.heads:
        assert evaluate_head(protocol, NovelPool(features), labels, episodes, head).episodes == 4
