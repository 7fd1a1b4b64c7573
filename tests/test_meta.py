"""lowlabel.meta: episodes, ProtoNet/MatchingNet/RelationNet heads against hand computations,
MAML's meta-gradient against finite differences and FO-MAML/Meta-SGD/Reptile against their
closed forms (float64, so the comparisons are tight)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.fewshot import EpisodeError
from lowlabel.meta import (
    MAML,
    EpisodeSampler,
    EpisodicBatch,
    MatchingNetLearner,
    ProtoNetLearner,
    RelationMLP,
    RelationModule,
    RelationNetLearner,
    adapt,
    episode_seed,
    load_episode,
    matching_attention,
    matchingnet_log_probs,
    meta_batch_loss,
    meta_loss,
    protonet_logits,
    relation_loss,
    relation_scores,
    reptile_adapt,
    reptile_set_grads,
    reptile_step,
)

D64 = torch.float64


def random_episode(seed: int, ways: int = 2, shots: int = 2, queries: int = 3, dim: int = 3) -> EpisodicBatch:
    g = torch.Generator().manual_seed(seed)
    return EpisodicBatch(
        support_x=torch.randn(ways * shots, dim, generator=g, dtype=D64),
        support_y=torch.arange(ways).repeat_interleave(shots),
        query_x=torch.randn(ways * queries, dim, generator=g, dtype=D64),
        query_y=torch.arange(ways).repeat_interleave(queries),
        ways=ways,
        shots=shots,
    )


def linear(seed: int = 0, fan_in: int = 3, out: int = 2) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(fan_in, out).double()


# ---------------------------------------------------------------------------------------------
# Episodes


def pool_labels() -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(10), 8)  # 10 classes x 8 samples
    indices = np.flatnonzero(labels < 7)  # the "base classes": 0..6
    return labels, indices


def test_episodes_are_disjoint_inside_the_pool_and_label_consistent():
    labels, indices = pool_labels()
    sampler = EpisodeSampler(labels, indices, n_way=5, k_shot=2, n_query=3, seed=3)
    for step in range(20):
        ep = sampler.sample(step)
        assert set(ep.support.tolist()).isdisjoint(ep.query.tolist())
        assert set(ep.support.tolist()) | set(ep.query.tolist()) <= set(indices.tolist())
        assert len(set(ep.classes.tolist())) == 5 and (ep.classes < 7).all()
        assert (labels[ep.support] == ep.classes[ep.support_labels()]).all()
        assert (labels[ep.query] == ep.classes[ep.query_labels()]).all()


def test_episodes_are_deterministic_by_seed_rank_and_step():
    labels, indices = pool_labels()

    def key(seed, rank, step, index=0):
        ep = EpisodeSampler(labels, indices, 5, 2, 3, seed=seed, rank=rank).sample(step, index)
        return ep.support.tolist(), ep.query.tolist(), ep.classes.tolist()

    assert key(1, 0, 4) == key(1, 0, 4)
    # Another rank, step, meta-batch slot or seed: another episode.
    others = [key(1, 1, 4), key(1, 0, 5), key(1, 0, 4, 1), key(2, 0, 4), key(0, 1, 4)]
    assert all(o != key(1, 0, 4) for o in others)
    assert len({repr(o) for o in others}) == len(others)
    # No additive collisions in the seed stream.
    assert episode_seed(1, 0, 0) != episode_seed(0, 1, 0) != episode_seed(0, 0, 1)
    sampler = EpisodeSampler(labels, indices, 5, 2, 3, seed=1, rank=0)
    batch = sampler.meta_batch(4, 2)
    assert [b.support.tolist() for b in batch] == [key(1, 0, 4, i)[0] for i in range(2)]


def test_sampler_rejects_a_pool_that_cannot_supply_episodes():
    labels, indices = pool_labels()
    with pytest.raises(EpisodeError):
        EpisodeSampler(labels, indices, n_way=8, k_shot=1, n_query=1, seed=0)  # 7 classes in the pool
    with pytest.raises(EpisodeError):
        EpisodeSampler(labels, indices, n_way=2, k_shot=5, n_query=4, seed=0)  # 8 per class < 9
    with pytest.raises(EpisodeError):
        EpisodeSampler(labels, np.array([0, 80]), 1, 1, 1, seed=0)


def test_load_episode_gathers_images_and_episode_labels():
    labels, indices = pool_labels()
    images = torch.arange(len(labels), dtype=D64)[:, None].repeat(1, 4)
    ep = EpisodeSampler(labels, indices, 3, 2, 1, seed=0).sample(0)
    batch = load_episode(ep, images)
    assert batch.support_x[:, 0].long().tolist() == ep.support.tolist()
    assert batch.query_x[:, 0].long().tolist() == ep.query.tolist()
    assert batch.support_y.tolist() == [0, 0, 1, 1, 2, 2] and batch.query_y.tolist() == [0, 1, 2]
    assert (batch.ways, batch.shots, batch.queries) == (3, 2, 1)
    # A loader function (e.g. with augmentation) instead of a tensor.
    via_fn = load_episode(ep, lambda idx: images[torch.as_tensor(idx)] * 2)
    assert torch.equal(via_fn.support_x, 2 * batch.support_x)


# ---------------------------------------------------------------------------------------------
# Metric learners


def test_protonet_logits_are_negative_squared_distances_to_class_means():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]], dtype=D64)
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 1.0], [3.0, 3.0]], dtype=D64)
    # Prototypes (1, 0) and (0, 3).
    want = -torch.tensor([[0 + 1, 1 + 4], [4 + 9, 9 + 0]], dtype=D64)
    assert torch.equal(protonet_logits(support, labels, query, 2), want)
    learner = ProtoNetLearner()
    batch = EpisodicBatch(support, labels, query, torch.tensor([0, 1]), ways=2, shots=2)
    assert torch.equal(learner(batch), want)
    assert learner.loss(batch).item() == pytest.approx(F.cross_entropy(want, torch.tensor([0, 1])).item())


def test_matchingnet_attention_and_class_probabilities_by_hand():
    support = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=D64)
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=D64)
    temperature = 0.5
    attention = torch.zeros(2, 3, dtype=D64)
    for q in range(2):
        cos = [float(query[q] @ support[i]) / (float(query[q].norm()) * float(support[i].norm())) for i in range(3)]
        e = [math.exp(c / temperature) for c in cos]
        attention[q] = torch.tensor([v / sum(e) for v in e], dtype=D64)
    assert torch.allclose(matching_attention(query, support, temperature), attention, rtol=1e-14, atol=0)
    probs = torch.stack([attention[:, 0], attention[:, 1] + attention[:, 2]], dim=1)  # attention-weighted one-hot
    log_probs = matchingnet_log_probs(support, labels, query, 2, temperature)
    assert torch.allclose(log_probs.exp(), probs, rtol=1e-13, atol=0)
    learner = MatchingNetLearner(temperature=temperature)
    loss = learner.loss_from_scores(learner.episode_logits(support, labels, query, 2), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(-(math.log(probs[0, 0]) + math.log(probs[1, 1])) / 2, rel=1e-13)


def test_relation_scores_pair_summed_class_maps_with_each_query():
    support = torch.tensor([[1.0, 0.0], [3.0, 1.0], [0.0, 2.0], [1.0, -1.0]], dtype=D64)
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 2.0], [-2.0, 0.5], [0.0, 1.0]], dtype=D64)
    relation = nn.Linear(4, 1).double()
    with torch.no_grad():
        relation.weight.copy_(torch.tensor([[0.5, -1.0, 0.25, 2.0]]))
        relation.bias.fill_(-0.1)
    w = relation.weight[0].detach()
    for reduce, classes in (("sum", [[4.0, 1.0], [1.0, 1.0]]), ("mean", [[2.0, 0.5], [0.5, 0.5]])):
        want = torch.tensor(
            [[1 / (1 + math.exp(-(float(w @ torch.tensor(c + query[q].tolist(), dtype=D64)) - 0.1))) for c in classes] for q in range(3)],
            dtype=D64,
        )
        got = relation_scores(relation, support, labels, query, 2, reduce=reduce)
        assert torch.allclose(got, want, rtol=1e-14, atol=0)
    query_labels = torch.tensor([1, 0, 1])
    onehot = torch.tensor([[0, 1], [1, 0], [0, 1]], dtype=D64)
    assert relation_loss(got, query_labels).item() == pytest.approx(((got - onehot) ** 2).mean().item(), rel=1e-14)


def test_relation_learners_on_feature_maps_and_flat_features_train():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # maps, no Flatten
    learner = RelationNetLearner(encoder, RelationModule(4, hidden=6, fc_hidden=3))
    batch = EpisodicBatch(torch.randn(6, 1, 10, 10), torch.tensor([0, 0, 1, 1, 2, 2]), torch.randn(3, 1, 10, 10), torch.tensor([0, 1, 2]), 3, 2)
    scores = learner(batch)
    assert scores.shape == (3, 3) and bool(((scores > 0) & (scores < 1)).all())
    learner.loss(batch).backward()
    assert all(p.grad is not None for p in learner.parameters())
    flat = RelationNetLearner(nn.Flatten(), RelationMLP(100))
    assert flat(batch).shape == (3, 3)


# ---------------------------------------------------------------------------------------------
# MAML


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()


def finite_difference_grads(model: nn.Module, loss_of_model, h: float = 1e-6) -> list[torch.Tensor]:
    grads = []
    for p in model.parameters():
        g = torch.zeros_like(p)
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += h
            up = loss_of_model().item()
            with torch.no_grad():
                p.view(-1)[i] -= 2 * h
            down = loss_of_model().item()
            with torch.no_grad():
                p.view(-1)[i] += h
            g.view(-1)[i] = (up - down) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("make_model", [linear, bn_model], ids=["linear", "batchnorm-mlp"])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_second_order_meta_gradient_matches_central_finite_differences(make_model, steps):
    model = make_model()
    episode = random_episode(1)
    meta_loss(model, episode, steps=steps, lr=0.5).backward()
    analytic = [p.grad.clone() for p in model.parameters()]
    numeric = finite_difference_grads(model, lambda: meta_loss(model, episode, steps=steps, lr=0.5))
    for a, n in zip(analytic, numeric):
        assert torch.allclose(a, n, rtol=1e-6, atol=1e-8)
    # The second-order terms matter here, so the check above tells MAML from FO-MAML.
    model.zero_grad()
    meta_loss(model, episode, steps=steps, lr=0.5, first_order=True).backward()
    assert any(not torch.allclose(a, p.grad, rtol=1e-3) for a, p in zip(analytic, model.parameters()))


@pytest.mark.parametrize("steps", [1, 2])
def test_fo_maml_meta_gradient_is_the_query_gradient_at_the_adapted_parameters(steps):
    model, episode, lr = linear(), random_episode(2), 0.3
    meta_loss(model, episode, steps=steps, lr=lr, first_order=True).backward()
    # By hand: plain gradient steps on detached weights, then the query gradient there.
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    for _ in range(steps):
        w.requires_grad_(), b.requires_grad_()
        gw, gb = torch.autograd.grad(F.cross_entropy(episode.support_x @ w.T + b, episode.support_y), (w, b))
        w, b = (w - lr * gw).detach(), (b - lr * gb).detach()
    w.requires_grad_(), b.requires_grad_()
    want = torch.autograd.grad(F.cross_entropy(episode.query_x @ w.T + b, episode.query_y), (w, b))
    assert torch.allclose(model.weight.grad, want[0], rtol=1e-12, atol=1e-15)
    assert torch.allclose(model.bias.grad, want[1], rtol=1e-12, atol=1e-15)


def test_adapt_is_functional_and_leaves_the_model_alone():
    model, episode = linear(), random_episode(3)
    before = [p.detach().clone() for p in model.parameters()]
    adapted = adapt(model, dict(model.named_parameters()), episode.support_x, episode.support_y, steps=3, lr=0.1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not torch.equal(adapted["weight"], model.weight)
    assert adapt(model, dict(model.named_parameters()), episode.support_x, episode.support_y, 0, 0.1)["bias"] is model.bias
    # Under no_grad (meta-test) it still adapts, from detached copies.
    with torch.no_grad():
        again = adapt(model, dict(model.named_parameters()), episode.support_x, episode.support_y, steps=3, lr=0.1)
    assert torch.allclose(again["weight"], adapted["weight"], rtol=1e-14)
    # A subset of parameters adapts only those (the head alone, as ANIL).
    head_only = adapt(model, {"bias": model.bias}, episode.support_x, episode.support_y, steps=1, lr=0.1)
    assert set(head_only) == {"bias"}


def test_maml_predict_adapts_without_keeping_a_graph():
    model, episode = linear(), random_episode(12)
    maml = MAML(model, steps=2, lr=0.3, learn_lrs=True)
    logits = maml.predict(episode.support_x, episode.support_y, episode.query_x)
    assert not logits.requires_grad
    assert torch.allclose(logits, maml(episode.support_x, episode.support_y, episode.query_x), rtol=1e-14)
    assert all(p.grad is None for p in maml.parameters())


def test_meta_batch_loss_is_the_mean_of_episode_meta_losses():
    model, episodes = linear(), [random_episode(4), random_episode(5)]
    want = (meta_loss(model, episodes[0], steps=2, lr=0.2) + meta_loss(model, episodes[1], steps=2, lr=0.2)) / 2
    assert meta_batch_loss(model, episodes, steps=2, lr=0.2).item() == pytest.approx(want.item(), rel=1e-14)


def test_meta_sgd_learned_inner_rates_start_as_maml_and_get_their_closed_form_gradient():
    model, episode, lr = linear(), random_episode(6), 0.4
    plain = MAML(model, steps=1, lr=lr).meta_loss(episode)
    learned = MAML(model, steps=1, lr=lr, learn_lrs=True)
    loss = learned.meta_loss(episode)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-14)
    loss.backward()
    # theta' = theta - alpha * g_s, so dL_q/dalpha = -(grad L_q at theta') * g_s, elementwise.
    params = dict(model.named_parameters())
    g_s = torch.autograd.grad(F.cross_entropy(model(episode.support_x), episode.support_y), list(params.values()))
    adapted = adapt(model, params, episode.support_x, episode.support_y, 1, lr, first_order=True)
    adapted = {n: p.detach().requires_grad_() for n, p in adapted.items()}
    g_q = torch.autograd.grad(F.cross_entropy(episode.query_x @ adapted["weight"].T + adapted["bias"], episode.query_y), [adapted["weight"], adapted["bias"]])
    for (name, _), gs, gq in zip(model.named_parameters(), g_s, g_q):
        assert torch.allclose(learned.inner_lrs[name].grad, -gq * gs, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Reptile


def regression_episode(seed: int) -> EpisodicBatch:
    g = torch.Generator().manual_seed(seed)
    return EpisodicBatch(
        torch.randn(4, 3, generator=g, dtype=D64),
        torch.randn(4, 2, generator=g, dtype=D64),
        torch.randn(2, 3, generator=g, dtype=D64),
        torch.randn(2, 2, generator=g, dtype=D64),
        ways=2,
        shots=2,
    )


def test_reptile_outer_update_by_hand_for_one_inner_step():
    model, episodes, alpha, eps = linear(), [regression_episode(7), regression_episode(8)], 0.1, 0.5
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    # One SGD step on the episode's support + query under MSE: for y_hat = x W^T + b over
    # N x O outputs, dL/dW = 2/(N O) (y_hat - y)^T x and dL/db = 2/(N O) sum_n (y_hat - y).
    new_w, new_b = torch.zeros_like(w), torch.zeros_like(b)
    for e in episodes:
        x, y = torch.cat([e.support_x, e.query_x]), torch.cat([e.support_y, e.query_y])
        r = x @ w.T + b - y
        gw, gb = 2 / r.numel() * r.T @ x, 2 / r.numel() * r.sum(0)
        new_w += ((w - alpha * gw) - w) / 2  # mean over the meta-batch of (W_i - phi)
        new_b += ((b - alpha * gb) - b) / 2
    want_w, want_b = w + eps * new_w, b + eps * new_b
    reptile_step(model, episodes, steps=1, inner_lr=alpha, outer_lr=eps, loss_fn=F.mse_loss)
    assert torch.allclose(model.weight, want_w, rtol=1e-13, atol=1e-15)
    assert torch.allclose(model.bias, want_b, rtol=1e-13, atol=1e-15)


def test_reptile_grads_with_sgd_reproduce_the_outer_update():
    episodes = [regression_episode(9), regression_episode(10)]
    direct = linear()
    reptile_step(direct, episodes, steps=3, inner_lr=0.05, outer_lr=0.7, loss_fn=F.mse_loss)
    via_opt = linear()
    opt = torch.optim.SGD(via_opt.parameters(), lr=0.7)
    reptile_set_grads(via_opt, episodes, steps=3, inner_lr=0.05, loss_fn=F.mse_loss)
    opt.step()
    for p, q in zip(direct.parameters(), via_opt.parameters()):
        assert torch.allclose(p, q, rtol=1e-13, atol=1e-15)


def test_reptile_adapt_minibatches_and_support_only():
    model, e = linear(), regression_episode(11)
    phi = dict(model.named_parameters())
    full = reptile_adapt(model, phi, e.support_x, e.support_y, 2, 0.1, loss_fn=F.mse_loss)
    batched = reptile_adapt(model, phi, e.support_x, e.support_y, 2, 0.1, loss_fn=F.mse_loss, batch_size=4)
    assert all(torch.equal(full[n], batched[n]) for n in full)  # batch_size >= N is full-batch
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    mb1 = reptile_adapt(model, phi, e.support_x, e.support_y, 3, 0.1, loss_fn=F.mse_loss, batch_size=2, generator=g1)
    mb2 = reptile_adapt(model, phi, e.support_x, e.support_y, 3, 0.1, loss_fn=F.mse_loss, batch_size=2, generator=g2)
    assert all(torch.equal(mb1[n], mb2[n]) and not p.requires_grad for n, p in mb1.items())
    assert not torch.equal(mb1["weight"], full["weight"])


# ---- the meta-training loop's methods (lowlabel.meta.registry) ---------------------------------


def _tiny_encoder() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _episode(seed: int, ways: int = 3, shots: int = 2, queries: int = 2):
    from lowlabel.meta import EpisodicBatch

    g = torch.Generator().manual_seed(seed)
    return EpisodicBatch(
        torch.randn(ways * shots, 1, 6, 6, generator=g, dtype=torch.float64),
        torch.arange(ways).repeat_interleave(shots),
        torch.randn(ways * queries, 1, 6, 6, generator=g, dtype=torch.float64),
        torch.arange(ways).repeat_interleave(queries),
        ways,
        shots,
    )


def test_registry_names_every_config_meta_method():
    from lowlabel.config import META_METHODS
    from lowlabel.meta.registry import META_METHODS as REGISTRY

    assert tuple(REGISTRY) == META_METHODS


@pytest.mark.parametrize("name", ["protonet", "matchingnet", "relationnet", "maml"])
def test_meta_gradients_are_the_gradient_of_the_mean_episode_loss(name):
    from lowlabel.meta.registry import META_METHODS

    torch.manual_seed(0)
    settings = {"maml": {"inner_steps": 1, "inner_lr": 0.1}}.get(name, {})
    method = META_METHODS[name](_tiny_encoder(), 3, 3, **settings).double()
    episodes = [_episode(1), _episode(2)]
    loss = method.meta_gradients(episodes)
    got = {n: p.grad.clone() for n, p in method.named_parameters()}
    method.zero_grad()
    if name == "maml":
        losses = [method.maml.meta_loss(e) for e in episodes]
    else:
        losses = [method.learner.loss(e) for e in episodes]
    expected_loss = (losses[0] + losses[1]) / 2
    expected_loss.backward()
    assert torch.allclose(loss, expected_loss.detach())
    for n, p in method.named_parameters():
        assert torch.allclose(got[n], p.grad), n


def test_reptile_method_gradient_is_phi_minus_mean_adapted_weights_and_sgd_takes_the_outer_step():
    from lowlabel.meta import ReptileMethod, reptile_adapt

    torch.manual_seed(0)
    method = ReptileMethod(_tiny_encoder(), 3, 3, inner_steps=2, inner_lr=0.1, outer_lr=0.5, use_query=False).double()
    episodes = [_episode(1), _episode(2)]
    phi = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method.meta_gradients(episodes)
    adapted = [reptile_adapt(method.model, phi, e.support_x, e.support_y, 2, 0.1) for e in episodes]
    for n, p in method.model.named_parameters():
        assert torch.allclose(p.grad, phi[n] - (adapted[0][n] + adapted[1][n]) / 2), n
    assert method.outer_optimizer() == {"optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    optimizer.step()
    for n, p in method.model.named_parameters():
        assert torch.allclose(p, phi[n] + 0.5 * ((adapted[0][n] + adapted[1][n]) / 2 - phi[n])), n


@pytest.mark.parametrize("name", ["maml", "reptile"])
def test_test_time_adaptation_leaves_the_trained_state_unchanged(name):
    from lowlabel.meta.registry import META_METHODS

    torch.manual_seed(0)
    method = META_METHODS[name](_tiny_encoder(), 3, 3, test_inner_steps=3).double().train()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    scores = method.scores(_episode(3))
    assert scores.shape == (6, 3) and torch.isfinite(scores).all()
    after = method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
