"""Few-shot sub-package: sampler invariants, heads against reference formulas, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowlabel.fewshot import (
    KNN,
    CosineClassifier,
    Episode,
    EpisodeError,
    LinearProbe,
    MatchingNet,
    ProtoNet,
    build_head,
    confidence_interval95,
    evaluate_episodes,
    normalize_features,
    sample_episodes,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pool(n_classes: int = 12, per_class: int = 30, seed: int = 0) -> np.ndarray:
    # Shuffled, non-contiguous class ids so nothing relies on labels being sorted or dense.
    labels = np.repeat(np.arange(n_classes) * 7 + 3, per_class)
    return np.random.default_rng(seed).permutation(labels)


def _clusters(
    labels: np.ndarray, dim: int = 32, spread: float = 20.0, seed: int = 0
) -> torch.Tensor:
    """Gaussian clusters (unit noise) around far-apart class means: trivially separable."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    means = rng.normal(size=(classes.size, dim)) * spread
    x = means[np.searchsorted(classes, labels)] + rng.normal(size=(labels.size, dim))
    return torch.as_tensor(x, dtype=torch.float32)


def _stack(features: torch.Tensor, episodes: list[Episode]):
    sup = torch.as_tensor(np.stack([e.support for e in episodes]))
    qry = torch.as_tensor(np.stack([e.query for e in episodes]))
    ys = torch.as_tensor(np.stack([e.support_labels() for e in episodes]))
    return features[sup], ys, features[qry]


# ---------------------------------------------------------------- sampler


def test_sampler_episode_invariants() -> None:
    labels = _pool()
    n_way, k_shot, n_query = 5, 3, 4
    episodes = sample_episodes(labels, n_way, k_shot, n_query, n_episodes=50, seed=1)
    assert len(episodes) == 50
    for e in episodes:
        assert e.support.shape == (n_way * k_shot,) and e.support.dtype == np.int64
        assert e.query.shape == (n_way * n_query,) and e.query.dtype == np.int64
        assert e.classes.shape == (n_way,)
        assert len(set(e.classes.tolist())) == n_way
        assert (e.n_way, e.k_shot, e.n_query) == (n_way, k_shot, n_query)
        assert not set(e.support.tolist()) & set(e.query.tolist())
        # Class-major: episode label i <-> classes[i], for every index.
        np.testing.assert_array_equal(labels[e.support], e.classes[e.support_labels()])
        np.testing.assert_array_equal(labels[e.query], e.classes[e.query_labels()])
        for way in range(n_way):
            picked = np.concatenate(
                [e.support[e.support_labels() == way], e.query[e.query_labels() == way]]
            )
            assert np.unique(picked).size == k_shot + n_query
    np.testing.assert_array_equal(episodes[0].support_labels(), np.repeat(np.arange(5), 3))


def test_sampler_deterministic_by_seed() -> None:
    labels = _pool()
    a = sample_episodes(labels, 5, 1, 5, 20, seed=3)
    b = sample_episodes(labels, 5, 1, 5, 20, seed=3)
    c = sample_episodes(labels, 5, 1, 5, 20, seed=4)
    def key(eps):
        return [(e.support.tolist(), e.query.tolist(), e.classes.tolist()) for e in eps]

    assert key(a) == key(b)
    assert key(a) != key(c)


def test_sampler_covers_all_classes() -> None:
    labels = _pool()
    episodes = sample_episodes(labels, 5, 1, 1, 200, seed=0)
    assert set(np.concatenate([e.classes for e in episodes]).tolist()) == set(labels.tolist())


def test_sampler_too_few_classes() -> None:
    labels = np.repeat([10, 20, 30], 50)
    with pytest.raises(EpisodeError, match=r"n_way=5.*only 3") as err:
        sample_episodes(labels, 5, 1, 1, 1, seed=0)
    assert "10" in str(err.value) and "30" in str(err.value)


def test_sampler_too_few_images_names_classes() -> None:
    labels = np.concatenate([np.repeat(np.arange(6), 20), [41] * 4, [42] * 2])
    with pytest.raises(EpisodeError) as err:
        sample_episodes(labels, 5, 1, 5, 1, seed=0)
    msg = str(err.value)
    assert "k_shot=1" in msg and "n_query=5" in msg
    assert "41: 4" in msg and "42: 2" in msg
    assert "0: 20" not in msg


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_way": 0},
        {"k_shot": 0},
        {"n_query": -1},
        {"n_episodes": 0},
        {"n_way": 2.0},
        {"k_shot": True},
        {"seed": -1},
    ],
)
def test_sampler_validates_ints(kwargs: dict) -> None:
    args = {"n_way": 2, "k_shot": 1, "n_query": 1, "n_episodes": 1, "seed": 0} | kwargs
    with pytest.raises(EpisodeError, match=next(iter(kwargs))):
        sample_episodes(_pool(), **args)


# ---------------------------------------------------------------- heads


def _accuracy(preds: torch.Tensor, episodes: list[Episode]) -> float:
    truth = torch.as_tensor(np.stack([e.query_labels() for e in episodes]))
    return float((preds == truth).float().mean())


@pytest.mark.parametrize(
    "head",
    [
        ProtoNet(),
        ProtoNet("cosine"),
        LinearProbe(),
        CosineClassifier(),
        KNN(k=1),
        KNN(k=3),
        MatchingNet(),
        MatchingNet(temperature=0.05),
    ],
    ids=["proto-euclid", "proto-cos", "linear", "cosine", "knn1", "knn3", "matching", "matching-t0.05"],
)
def test_heads_separable_clusters(head) -> None:
    labels = _pool()
    feats = _clusters(labels)
    episodes = sample_episodes(labels, 5, 5, 10, 8, seed=0)
    support, ys, query = _stack(feats, episodes)
    assert _accuracy(head.fit_predict_batched(support, ys, query, 5), episodes) == 1.0
    e = episodes[0]
    head.fit(feats[e.support], torch.as_tensor(e.support_labels()), 5)
    assert head.predict(feats[e.query]).tolist() == e.query_labels().tolist()


def test_protonet_matches_numpy_reference() -> None:
    # float64 so that the equality is exact up to genuine near-ties, which are absent here.
    rng = np.random.default_rng(0)
    labels = _pool(n_classes=10, per_class=40)
    feats = rng.normal(size=(labels.size, 24))
    episodes = sample_episodes(labels, 5, 5, 15, 40, seed=2)
    support, ys, query = _stack(torch.as_tensor(feats), episodes)
    batched = ProtoNet().fit_predict_batched(support, ys, query, 5).numpy()
    accs = []
    for i, e in enumerate(episodes):
        s, q, y = feats[e.support], feats[e.query], e.support_labels()
        protos = np.stack([s[y == c].mean(0) for c in range(5)])
        ref = ((q[:, None, :] - protos[None]) ** 2).sum(-1).argmin(1)
        np.testing.assert_array_equal(batched[i], ref)
        head = ProtoNet().fit(torch.as_tensor(s), torch.as_tensor(y), 5)
        single = head.predict(torch.as_tensor(q))
        np.testing.assert_array_equal(single.numpy(), ref)
        accs.append((ref == e.query_labels()).mean())
    assert 0.0 < np.mean(accs) < 0.6  # really non-separable, so the comparison means something


def test_protonet_logits_are_negative_squared_distances() -> None:
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    head = ProtoNet().fit(support, torch.tensor([0, 0, 1]), 2)
    logits = head.logits(torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(logits, torch.tensor([[-1.0, -(81.0 + 81.0)]]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: LinearProbe(steps=30, seed=5),
        lambda: CosineClassifier(steps=30, seed=5),
        lambda: CosineClassifier(steps=30, learn_scale=False),
        lambda: ProtoNet(),
        lambda: ProtoNet("cosine"),
        lambda: KNN(k=3),
        lambda: MatchingNet(temperature=0.2),
    ],
    ids=["linear", "cosine", "cosine-fixed", "proto", "proto-cos", "knn3", "matching"],
)
def test_batched_equals_per_episode(make) -> None:
    torch.manual_seed(0)
    labels = _pool()
    feats = torch.randn(labels.size, 48)  # non-separable: the logits carry real information
    episodes = sample_episodes(labels, 5, 5, 6, 12, seed=0)
    support, ys, query = _stack(feats, episodes)
    batched = make().fit_logits_batched(support, ys, query, 5)
    single = torch.stack([make().fit(s, y, 5).logits(q) for s, y, q in zip(support, ys, query)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched.argmax(-1), single.argmax(-1))


def test_finetune_heads_deterministic_and_leave_global_rng() -> None:
    torch.manual_seed(0)
    feats, ys = torch.randn(10, 16), torch.arange(5).repeat(2)
    state = torch.get_rng_state()
    a = LinearProbe(steps=5, seed=1).fit(feats, ys, 5).linear_.weight
    b = LinearProbe(steps=5, seed=1).fit(feats, ys, 5).linear_.weight
    c = LinearProbe(steps=5, seed=2).fit(feats, ys, 5).linear_.weight
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.get_rng_state())


def test_finetune_works_under_inference_mode() -> None:
    feats, ys = torch.randn(10, 16), torch.arange(5).repeat(2)
    with torch.inference_mode():
        preds = LinearProbe(steps=5).fit(feats, ys, 5).predict(feats)
    assert preds.shape == (10,)


def test_cosine_scale_learned_or_fixed() -> None:
    feats, ys = _clusters(np.repeat(np.arange(5), 4)), torch.arange(5).repeat_interleave(4)
    learned = CosineClassifier(init_scale=10.0).fit(feats, ys, 5)
    assert learned.scale_ is not None and abs(learned.scale_ - 10.0) > 1e-3
    fixed = CosineClassifier(init_scale=10.0, learn_scale=False).fit(feats, ys, 5)
    assert fixed.scale_ == 10.0
    assert fixed.logits(feats).abs().max() <= 10.0 + 1e-5  # |scale * cos| <= scale


def test_knn_k1_is_nearest_neighbour() -> None:
    rng = np.random.default_rng(1)
    support, query = rng.normal(size=(25, 20)), rng.normal(size=(60, 20))
    ys = np.repeat(np.arange(5), 5)
    nearest = ((query[:, None] - support[None]) ** 2).sum(-1).argmin(1)
    head = KNN(k=1).fit(torch.as_tensor(support), torch.as_tensor(ys), 5)
    preds = head.predict(torch.as_tensor(query))
    np.testing.assert_array_equal(preds.numpy(), ys[nearest])


def test_knn_votes_and_tie_rule() -> None:
    # Neighbours of the query at 0, in order: class 1 (d=1), class 0 (d=2), class 0 (d=3),
    # class 1 (d=4). k=3: 2 votes for class 0 beat the single nearest. k=4: tie 2-2, the
    # class holding the nearest neighbour (1) wins.
    support = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    ys = torch.tensor([1, 0, 0, 1])
    query = torch.tensor([[0.0]])
    logits3 = KNN(k=3).fit(support, ys, 2).logits(query)
    assert logits3.floor().tolist() == [[2.0, 1.0]] and logits3.argmax().item() == 0
    logits4 = KNN(k=4).fit(support, ys, 2).logits(query)
    assert logits4.floor().tolist() == [[2.0, 2.0]] and logits4.argmax().item() == 1


def test_matchingnet_matches_hand_computation() -> None:
    """log P(y=k|x) = log sum_{i: y_i=k} softmax_i(cos(x, s_i) / T), worked out by hand in float64."""
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 1.0], [1.0, -0.2]], dtype=torch.float64)
    t = 0.5
    expected = []
    for qx, qy in query.tolist():
        norm = math.hypot(qx, qy)
        cos = [qx / norm, qy / norm, (qx + qy) / (norm * math.sqrt(2.0))]
        w = [math.exp(c / t) for c in cos]
        expected.append([math.log(w[0] / sum(w)), math.log((w[1] + w[2]) / sum(w))])
    expected_t = torch.tensor(expected, dtype=torch.float64)
    head = MatchingNet(temperature=t).fit(support, labels, 2)
    torch.testing.assert_close(head.logits(query), expected_t, rtol=1e-12, atol=1e-12)
    batched = MatchingNet(temperature=t).fit_logits_batched(support[None], labels[None], query[None], 2)
    torch.testing.assert_close(batched[0], expected_t, rtol=1e-12, atol=1e-12)
    # The hand numbers pick class 1 for the first query (two support images near it), 0 for the second.
    assert head.predict(query).tolist() == [1, 0]


def test_matchingnet_head_equals_meta_learner_head() -> None:
    """Same values as lowlabel.meta's MatchingNet log-probabilities, episode by episode; a way
    without support gets -inf; a tiny temperature stays finite (no exp underflow to log 0)."""
    from lowlabel.meta.matchingnet import matchingnet_log_probs

    gen = torch.Generator().manual_seed(0)
    support = torch.randn(6, 10, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (6, 10), generator=gen)
    labels[:, :4] = torch.arange(4)  # every way has support
    query = torch.randn(6, 7, 8, generator=gen, dtype=torch.float64)
    for t in (1.0, 0.3, 1e-3):
        batched = MatchingNet(temperature=t).fit_logits_batched(support, labels, query, 4)
        reference = torch.stack([matchingnet_log_probs(s, y, q, 4, t) for s, y, q in zip(support, labels, query)])
        assert bool(torch.isfinite(batched).all())
        torch.testing.assert_close(batched, reference, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(batched.exp().sum(-1), torch.ones(6, 7, dtype=torch.float64))
    missing = MatchingNet().fit(support[0], torch.zeros(10, dtype=torch.long), 2).logits(query[0])
    assert bool((missing[:, 1] == float("-inf")).all())  # and all of the mass on way 0: log 1
    torch.testing.assert_close(missing[:, 0], torch.zeros(7, dtype=torch.float64))
    with pytest.raises(ValueError, match="temperature"):
        MatchingNet(temperature=0.0)
    with pytest.raises(ValueError, match="support_labels"):
        MatchingNet().fit(support[0], labels[0], 3)


def test_build_head() -> None:
    assert isinstance(build_head("protonet", distance="cosine"), ProtoNet)
    assert isinstance(build_head("linear", steps=3), LinearProbe)
    assert isinstance(build_head("cosine"), CosineClassifier)
    assert isinstance(build_head("knn", k=2), KNN)
    assert isinstance(build_head("matchingnet", temperature=0.5), MatchingNet)
    with pytest.raises(ValueError, match="cosine, knn, linear, matchingnet, protonet"):
        build_head("svm")


# ---------------------------------------------------------------- evaluation


def test_confidence_interval_formula() -> None:
    acc = np.array([0.2, 0.4, 0.4, 0.6, 1.0])
    mean = acc.sum() / acc.size
    std = math.sqrt(((acc - mean) ** 2).sum() / (acc.size - 1))
    assert confidence_interval95(acc) == pytest.approx(1.96 * std / math.sqrt(acc.size), rel=1e-12)
    assert confidence_interval95(np.full(10, 0.7)) == 0.0
    assert math.isnan(confidence_interval95(np.array([0.5])))


@pytest.mark.parametrize("head", ["protonet", "linear", "cosine", "knn", "matchingnet"])
def test_evaluate_separable_is_perfect(head: str) -> None:
    labels = _pool()
    feats = _clusters(labels)
    episodes = sample_episodes(labels, 5, 2, 5, 30, seed=0)
    result = evaluate_episodes(feats, labels, episodes, head, batch_size=7)
    assert result.accuracy == 1.0 and result.ci95 == 0.0
    assert result.per_episode.shape == (30,)
    assert result.as_dict() == {
        "head": head, "n_way": 5, "k_shot": 2, "n_query": 5,
        "episodes": 30, "acc": 100.0, "ci95": 0.0,
    }


def test_evaluate_matches_per_episode_and_batch_size() -> None:
    torch.manual_seed(0)
    labels = _pool()
    feats = torch.randn(labels.size, 16)
    episodes = sample_episodes(labels, 5, 1, 5, 25, seed=0)
    result = evaluate_episodes(feats, labels, episodes, "protonet", batch_size=4)
    other = evaluate_episodes(feats.numpy(), labels, episodes, "protonet", batch_size=100)
    expected = [
        float((ProtoNet().fit(feats[e.support], torch.as_tensor(e.support_labels()), 5)
               .predict(feats[e.query]).numpy() == e.query_labels()).mean())
        for e in episodes
    ]
    np.testing.assert_allclose(result.per_episode, expected)
    np.testing.assert_allclose(other.per_episode, expected)
    assert result.accuracy == pytest.approx(np.mean(expected))
    assert result.ci95 == pytest.approx(confidence_interval95(np.array(expected)))


def test_evaluate_rejects_mismatched_labels() -> None:
    labels = _pool()
    episodes = sample_episodes(labels, 5, 1, 1, 3, seed=0)
    with pytest.raises(ValueError, match="do not match"):
        evaluate_episodes(torch.randn(labels.size, 4), np.roll(labels, 1), episodes, "protonet")


def test_normalize_features_modes() -> None:
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [2.0, 2.0]])
    ref = np.array([[0.0, 0.0], [2.0, 2.0]])
    assert torch.equal(normalize_features(x, "none"), x)
    torch.testing.assert_close(normalize_features(x.numpy(), "l2").norm(dim=1), torch.ones(3))
    torch.testing.assert_close(normalize_features(x, "l2")[0], torch.tensor([0.6, 0.8]))
    centered = normalize_features(x, "center")
    torch.testing.assert_close(centered.mean(0), torch.zeros(2))
    torch.testing.assert_close(normalize_features(x, "center", reference=ref), x - 1.0)
    cl2n = normalize_features(x, "center_l2", reference=ref)
    torch.testing.assert_close(cl2n, torch.nn.functional.normalize(x - 1.0, dim=1))
    assert normalize_features(x.double(), "l2").dtype == torch.float64
    assert normalize_features(x.half(), "none").dtype == torch.float32
    with pytest.raises(ValueError, match="center_l2"):
        normalize_features(x, "zscore")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head", ["protonet", "linear", "cosine", "knn", "matchingnet"])
def test_evaluate_on_cuda_matches_cpu(head: str) -> None:
    torch.manual_seed(0)
    labels = _pool()
    feats = torch.randn(labels.size, 32)
    episodes = sample_episodes(labels, 5, 5, 5, 20, seed=0)
    cpu = evaluate_episodes(feats, labels, episodes, head, head_kwargs=None, batch_size=8)
    gpu = evaluate_episodes(feats.cuda(), labels, episodes, head, batch_size=8)
    # Fine-tuned heads may flip a rare near-tied query between devices; allow 1 in 100.
    assert abs(cpu.accuracy - gpu.accuracy) <= 0.01
