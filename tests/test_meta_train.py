"""The meta stage: its episode pools (labels, pseudo-labels, UMTRA views), its settings checks,
and real 2-worker Ray meta-training jobs for every method (tiny data, a few steps)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lowlabel.config import ConfigError, parse_params
from lowlabel.data.prepared import PreparedData
from lowlabel.stages.common import StageError


def meta_params(**meta):
    base = {"ways": 2, "shots": 1, "queries": 1, "meta_batch": 2, "steps": 4, "eval_every": 2, "eval_episodes": 4}
    return parse_params({"pretrain": {"methods": ["simclr"]}, "semisup": {"methods": ["fixmatch"]}, "meta": {"methods": ["protonet"], **base, **meta}})


# ---- settings checked before anything runs -------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({"maml": {"inner_steps": 0}}, "meta.maml.inner_steps"),
        ({"reptile": {"inner_steps": 0}}, "meta.reptile.inner_steps"),
        ({"pseudo_threshold": 1.0}, "meta.pseudo_threshold"),
        ({"pseudo_threshold": 0.0}, "meta.pseudo_threshold"),
        ({"ways": 1}, "meta.ways"),
        ({"init": "byol"}, "meta.init"),
        ({"episodes_from": "pseudo", "pseudo_model": "uda"}, "meta.pseudo_model"),
        ({"meta_batch": 3}, "meta.meta_batch"),
    ],
)
def test_bad_meta_settings_fail_naming_the_field(meta, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        meta_params(**meta)


def test_meta_init_may_name_a_pretrain_or_semisup_method():
    assert meta_params(init="simclr").meta.init == "simclr"
    assert meta_params(init="fixmatch").meta.init == "fixmatch"


def test_labels_pool_too_few_classes_or_images_fails_naming_the_settings(tiny_prepared):
    from lowlabel.stages.meta import episode_pool

    data = PreparedData.load(tiny_prepared)  # 4 base classes, 2 labels each
    indices, labels, _ = episode_pool(meta_params(ways=4, shots=1, queries=1), data)
    assert len(indices) == 8 and np.array_equal(np.bincount(labels), [2, 2, 2, 2])
    assert np.array_equal(data.base_label(data.train_labels[indices]), labels)
    with pytest.raises(StageError, match=r"meta\.ways=5 .* only 4 classes"):
        episode_pool(meta_params(ways=5), data)
    with pytest.raises(StageError, match=r"meta\.shots \+ meta\.queries = 3 .* only 0 classes .*labels_per_class=4"):
        episode_pool(meta_params(shots=2, queries=1), data)


def test_validation_episodes_the_base_test_images_cannot_supply_fail_naming_the_settings(tiny_prepared):
    from lowlabel.stages.meta import check_validation_episodes

    data = PreparedData.load(tiny_prepared)  # 4 base classes, 20 test images each
    check_validation_episodes(meta_params(ways=4, shots=5, queries=15), data)
    with pytest.raises(StageError, match=r"meta\.ways=4 with meta\.shots \+ meta\.queries = 21: the validation episodes"):
        check_validation_episodes(meta_params(ways=4, shots=5, queries=16), data)


def test_pseudo_label_pool_by_hand():
    from lowlabel.stages.meta import pseudo_label_pool

    probabilities = np.array(
        [
            [0.90, 0.05, 0.05],  # class 0, confident
            [0.97, 0.02, 0.01],  # class 0, most confident
            [0.10, 0.85, 0.05],  # class 1
            [0.05, 0.92, 0.03],  # class 1
            [0.30, 0.40, 0.30],  # not confident
            [0.95, 0.03, 0.02],  # class 0: a third one, beyond the balance cap
            [0.02, 0.03, 0.95],  # class 2: only one, dropped (< per_class_min)
        ]
    )
    indices = np.arange(100, 107)
    pool, labels, stats = pseudo_label_pool(probabilities, indices, threshold=0.8, per_class_min=2)
    # classes 0 (rows 0, 1, 5) and 1 (rows 2, 3); class 2 has one image, dropped; row 4 unsure
    assert pool.tolist() == [100, 101, 102, 103, 105] and labels.tolist() == [0, 0, 1, 1, 0]
    assert stats == {"pseudo_confident": 6 / 7, "pseudo_classes": 2.0, "pseudo_min_per_class": 2.0, "pseudo_max_per_class": 3.0}
    # capped at 2 per class: class 0 keeps its two most confident (rows 1, 5)
    pool, labels, stats = pseudo_label_pool(probabilities, indices, threshold=0.8, per_class_min=2, per_class_max=2)
    assert pool.tolist() == [101, 102, 103, 105] and labels.tolist() == [0, 1, 1, 0]
    assert stats["pseudo_max_per_class"] == 2.0


def _write_classifier(root: Path, data: PreparedData, seed: int = 0) -> None:
    from lowlabel.models.encoders import build_encoder, feature_dim
    from lowlabel.models.heads import Classifier

    torch.manual_seed(seed)
    encoder = build_encoder("conv4", data.in_chans, 64)
    model = Classifier(encoder, feature_dim(encoder, data.in_chans, data.image_size), len(data.split.base_classes))
    with torch.no_grad():  # a sharp, spread-out random head: confident predictions of every class
        model.fc.weight.normal_(0, 30.0)
        model.fc.bias.zero_()
    folder = root / "models" / "semisup" / "fixmatch"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "classifier_ema.pt")


def test_pseudo_episodes_never_read_the_true_labels(tiny_prepared, tmp_path, monkeypatch):
    """The swap test: permuting the unlabeled images' true labels changes nothing in the pool."""
    from lowlabel.stages.meta import episode_pool

    monkeypatch.chdir(tmp_path)
    data = PreparedData.load(tiny_prepared)
    _write_classifier(tmp_path, data)
    params = meta_params(episodes_from="pseudo", pseudo_threshold=0.9, ways=2)
    indices, labels, stats = episode_pool(params, data)
    assert stats["pseudo_classes"] >= 2 and 0 < len(indices) < len(data.split.unlabeled)
    assert set(indices) <= set(np.asarray(data.split.unlabeled).tolist())
    unlabeled = np.asarray(data.split.unlabeled)
    swapped = data.train_labels.copy()
    swapped[unlabeled] = np.random.default_rng(0).permutation(swapped[unlabeled])
    again = episode_pool(params, dataclasses.replace(data, train_labels=swapped))
    assert np.array_equal(again[0], indices) and np.array_equal(again[1], labels) and again[2] == stats


def test_pseudo_pool_without_the_semisup_model_names_the_command(tiny_prepared, tmp_path, monkeypatch):
    from lowlabel.stages.meta import episode_pool

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match=r"dvc repro semisup@fixmatch"):
        episode_pool(meta_params(episodes_from="pseudo"), PreparedData.load(tiny_prepared))


def test_unsupervised_episodes_are_views_of_distinct_images_class_major_and_seeded(tiny_prepared):
    from lowlabel.data import device_augment
    from lowlabel.train.meta import UnsupervisedEpisodes

    data = PreparedData.load(tiny_prepared)
    pool = np.asarray(data.split.unlabeled)
    view = device_augment.contrastive_view(data.image_size, data.in_chans, data.mean, data.std, crop_scale=(0.5, 1.0))
    source = UnsupervisedEpisodes(data.train_images, pool, ways=3, shots=2, queries=3, seed=0, rank=0, view=view)
    episode = source.batch(step=5, index=1, device=torch.device("cpu"))
    assert episode.support_x.shape == (6, data.in_chans, data.image_size, data.image_size)
    assert episode.query_x.shape[0] == 9
    assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2] and episode.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(set(episode.classes.tolist())) == 3 and set(episode.classes.tolist()) <= set(pool.tolist())
    assert not torch.equal(episode.support_x[0], episode.support_x[1])  # two random views of one image
    again = source.batch(step=5, index=1, device=torch.device("cpu"))
    assert torch.equal(again.support_x, episode.support_x) and torch.equal(again.query_x, episode.query_x)
    other_rank = UnsupervisedEpisodes(data.train_images, pool, 3, 2, 3, seed=0, rank=1, view=view).batch(5, 1, torch.device("cpu"))
    assert not torch.equal(other_rank.support_x, episode.support_x)


# ---- Ray jobs ---------------------------------------------------------------------------------


SETTINGS = {
    "protonet": {},
    "matchingnet": {"temperature": 0.1},
    "relationnet": {"hidden": 8, "reduce": "sum"},
    "maml": {"inner_steps": 2, "inner_lr": 0.1, "first_order": False, "learn_lrs": False, "test_inner_steps": 3},
    "reptile": {"inner_steps": 2, "inner_lr": 0.05, "outer_lr": 1.0, "use_query": True, "test_inner_steps": 3},
}


def meta_config(tiny_prepared, method, episodes_from="labels", **extra):
    data = PreparedData.load(tiny_prepared)
    if episodes_from == "labels":
        pool = np.asarray(data.split.labeled)
        labels = data.base_label(data.train_labels[pool])
    else:
        pool, labels = np.asarray(data.split.unlabeled), None
    return {
        "label": f"test-meta@{method}",
        "seed": 0,
        "data": str(tiny_prepared),
        "arch": "conv4",
        "width": 8,
        "cpus_per_worker": 1,
        "method": method,
        "method_kwargs": SETTINGS[method],
        "episodes_from": episodes_from,
        "pool_indices": pool,
        "pool_labels": labels,
        "ways": 2,
        "shots": 1,
        "queries": 1,
        "meta_batch": 2,
        "steps": 4,
        "eval_every": 2,
        "eval_episodes": 4,
        "optim": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "nesterov": False, "warmup_fraction": 0.0},
    } | extra


def run_meta(config, tmp_path, name, **kwargs):
    from lowlabel.runner.launch import run_training_job
    from lowlabel.runner.worker import read_state
    from lowlabel.train.meta import meta_loop

    result = run_training_job(meta_loop, config, name=name, workers=2, use_gpu=False, cpus_per_worker=1, storage_path=str(tmp_path / "ray"), **kwargs)
    assert result.error is None, result.error
    return read_state(result.checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SETTINGS))
def test_two_worker_meta_job_per_method(ray_two_cpus, tiny_prepared, tmp_path, method):
    episodes_from = "unsupervised" if method == "protonet" else "labels"  # UMTRA rides along once
    state = run_meta(meta_config(tiny_prepared, method, episodes_from), tmp_path, method)
    assert [h["step"] for h in state["history"]] == [2, 4]
    for entry in state["history"]:
        assert math.isfinite(entry["loss"]) and 0.0 <= entry["val_acc"] <= 1.0 and entry["episodes_per_s"] > 0
    assert state["periods"] == 2
    # The encoder handed on is the method's encoder, in the bare encoder's keys.
    assert set(state["encoder"]) and all(not key.startswith(("learner.", "maml.", "model.")) for key in state["encoder"])
    if method == "relationnet":
        assert any(key.startswith("learner.relation.") for key in state["model"])


@pytest.mark.slow
def test_meta_job_resumed_after_a_worker_crash_ends_with_the_uninterrupted_weights(ray_two_cpus, tiny_prepared, tmp_path):
    """MAML (second order) under 2 workers: rank 1 dies in the second period; Ray restarts the
    group from the first period's checkpoint and the run ends where the clean one did."""
    clean = run_meta(meta_config(tiny_prepared, "maml"), tmp_path / "clean", "clean")
    fault = {"epoch": 2, "step": 1, "rank": 1, "marker": str(tmp_path / "killed"), "delay_s": 3.0}
    restarted = run_meta(meta_config(tiny_prepared, "maml", fault_injection=fault), tmp_path / "faulty", "faulty", max_failures=1)
    assert (tmp_path / "killed").exists()
    assert [h["step"] for h in restarted["history"]] == [2, 4]
    for name, tensor in clean["model"].items():
        assert torch.allclose(tensor.float(), restarted["model"][name].float(), atol=1e-6), name


def test_report_compares_each_meta_encoder_with_the_encoder_it_started_from():
    from lowlabel.stages.report import margins, markdown

    params = parse_params(
        {"pretrain": {"methods": ["simclr"]}, "semisup": {"methods": ["fixmatch"]}, "meta": {"methods": ["protonet"], "init": "fixmatch"}}
    )
    scores = lambda acc: {"base_knn_acc": 0.8, "protonet/5w5s": {"acc": acc, "ci95": 0.01}}  # noqa: E731
    metrics = {
        "prepare": {"base_classes": 5, "labeled": 20, "unlabeled": 100, "novel_classes": 5, "test_novel": 50},
        "pretrain": {"simclr": {"loss": 4.0, "knn_acc": 0.8, "knn_acc_init": 0.7, "images_per_s": 100.0}},
        "semisup": {"fixmatch": {"init": "simclr", "steps": 10, "test_acc": 0.7, "test_acc_ema": 0.72}},
        "meta": {"protonet": {"init": "fixmatch", "episodes_from": "pseudo", "steps": 100, "val_acc": 0.61, "best_val_acc": 0.63, "episodes_per_s": 12.0}},
        "fewshot": {"episodes": 10, "queries": 5, "feature_norm": "l2", "encoders": {
            "random": scores(0.60), "pretrain/simclr": scores(0.70), "semisup/fixmatch": scores(0.72), "meta/protonet": scores(0.75)}},
    }
    deltas = margins(metrics, params)
    assert round(deltas["protonet/5w5s: meta/protonet - semisup/fixmatch"], 6) == 3.0
    text = markdown(metrics, params, deltas)
    assert "| protonet | fixmatch | pseudo | 100 | 61.0 | 63.0 | 12.0 |" in text
    assert "| meta/protonet | 80.0 |" in text


def test_own_head_of_a_meta_encoder_scores_novel_episodes_and_protonet_equals_the_frozen_head(tiny_prepared, one_torch_thread):
    """ProtoNet's own head (squared Euclidean to class means of eval-mode features) is the
    frozen ProtoNet head without feature normalisation: same episodes, same accuracies. MAML's
    head has the trained number of ways, so it is scored at those ways only."""
    from lowlabel.fewshot.protocol import (
        FewShotProtocol,
        evaluate_encoder,
        meta_method_from_state,
        plan_episodes,
    )
    from lowlabel.meta.registry import META_METHODS
    from lowlabel.models.encoders import build_encoder, feature_dim
    from lowlabel.stages.fewshot import own_head_scores

    data = PreparedData.load(tiny_prepared)  # 2 novel classes
    params = parse_params({"encoder": {"width": 8}, "fewshot": {"ways": [2], "shots": [1, 3], "queries": 3, "episodes": 20,
                                                                "feature_norm": "none", "distance": "euclidean"}})
    protocol = FewShotProtocol.from_params(params)
    labels = data.novel_pool_labels()
    plans = plan_episodes(protocol, labels)
    torch.manual_seed(0)
    encoder = build_encoder("conv4", data.in_chans, 8)
    dim = feature_dim(encoder, data.in_chans, data.image_size)
    blob = {"method": "protonet", "settings": {}, "ways": 2, "state": META_METHODS["protonet"](encoder, dim, 2).state_dict()}
    own = own_head_scores(meta_method_from_state(blob, build_encoder("conv4", data.in_chans, 8), data.in_chans, data.image_size), data, plans)
    frozen = evaluate_encoder(protocol, encoder, data, plans, labels)
    assert set(own) == {"own/2w1s", "own/2w3s"}
    for setting in ("2w1s", "2w3s"):
        assert own[f"own/{setting}"]["acc"] == pytest.approx(frozen[f"protonet/{setting}"]["acc"], abs=1e-6)
    maml = META_METHODS["maml"](build_encoder("conv4", data.in_chans, 8), dim, 5, inner_steps=1, test_inner_steps=2)
    assert own_head_scores(maml, data, plans) == {}  # trained 5-way: no 2-way score
    maml2 = META_METHODS["maml"](build_encoder("conv4", data.in_chans, 8), dim, 2, inner_steps=1, test_inner_steps=2)
    scores = own_head_scores(maml2, data, plans)
    assert set(scores) == {"own/2w1s", "own/2w3s"} and all(0 <= s["acc"] <= 1 for s in scores.values())


@pytest.mark.parametrize("name", ["protonet", "matchingnet", "relationnet"])
def test_metric_own_head_from_one_pool_embedding_equals_the_per_episode_forward_passes(tiny_prepared, one_torch_thread, name):
    """The fewshot stage scores a metric method's own head on the pool embedded once; every
    episode's accuracy is exactly the one its own forward pass (MetaMethod.scores) gives."""
    from lowlabel.data import device_augment
    from lowlabel.fewshot.protocol import (
        FewShotProtocol,
        metric_episode_accuracies,
        novel_pool_images,
        plan_episodes,
    )
    from lowlabel.meta.base import episode_accuracies
    from lowlabel.meta.episodes import load_episode
    from lowlabel.meta.registry import META_METHODS
    from lowlabel.models.encoders import build_encoder, feature_dim

    data = PreparedData.load(tiny_prepared)
    params = parse_params({"encoder": {"width": 8}, "fewshot": {"ways": [2], "shots": [1, 3], "queries": 3, "episodes": 15}})
    plans = plan_episodes(FewShotProtocol.from_params(params), data.novel_pool_labels())
    torch.manual_seed(0)
    encoder = build_encoder("conv4", data.in_chans, 8)
    method = META_METHODS[name](encoder, feature_dim(encoder, data.in_chans, data.image_size), 2)
    with torch.no_grad():  # BatchNorm statistics that are not the init's 0/1
        method.train()
        encoder(torch.randn(16, data.in_chans, data.image_size, data.image_size) * 3 + 1)
    load = device_augment.view_loader(novel_pool_images(data), device_augment.eval_view(data.mean, data.std), "cpu")
    for episodes in plans.values():
        cached = metric_episode_accuracies(method, load, episodes, "cpu")
        per_episode = episode_accuracies(method, (load_episode(e, load) for e in episodes))
        assert method.training  # the mode is restored
        np.testing.assert_array_equal(cached, per_episode)
