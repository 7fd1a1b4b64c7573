"""Distributed behaviour under real multi-process DDP (torch.multiprocessing, gloo, CPU)."""

from __future__ import annotations

import socket

import ddp_workers as W
import pytest
import torch
import torch.multiprocessing as mp

from lowlabel.methods.semisup.freematch import SelfAdaptiveThreshold


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, out, world=2):
    mp.spawn(fn, args=(world, free_port(), str(out)), nprocs=world, join=True)


def test_simclr_two_workers_equal_one_worker_on_the_union(tmp_path):
    spawn(W.simclr_step, tmp_path / "ddp.pt")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    single = W.toy_simclr()
    single.gather_distributed = False
    v1, v2 = W.simclr_views()
    loss = single([v1, v2])["loss"]
    loss.backward()
    assert ddp["loss"].item() == pytest.approx(loss.item(), rel=1e-10)
    for got, want in zip(ddp["grads"], [p.grad for p in single.parameters()]):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)



@pytest.mark.parametrize("method, step", [("barlowtwins", W.barlow_twins_step), ("vicreg", W.vicreg_step)])
def test_decorrelation_losses_two_workers_equal_one_worker_on_the_union(tmp_path, method, step):
    """Barlow Twins' cross-correlation and VICReg's variance/covariance are statistics of the
    global batch: each worker computes the union's loss, and DDP's averaged gradient is the
    1-worker gradient (not 1/world_size of it: lightly#1977)."""
    spawn(step, tmp_path / "ddp.pt")
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    single = W.toy_decorrelation(method)
    single.gather_distributed = False
    v1, v2 = W.simclr_views(12)
    loss = single([v1, v2])["loss"]
    loss.backward()
    assert ddp["losses"].tolist() == pytest.approx([loss.item()] * 2, rel=1e-10)
    for got, want in zip(ddp["grads"], [p.grad for p in single.parameters()]):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    # The trap the gather avoids: per-worker statistics give another loss.
    local = W.toy_decorrelation(method)
    local.gather_distributed = False
    assert local([v1[:6], v2[:6]])["loss"].item() != pytest.approx(loss.item(), rel=1e-3)

def test_moco_workers_hold_identical_queues_and_pointer_wraps(tmp_path):
    spawn(W.moco_steps, tmp_path / "moco")
    r0, r1 = (torch.load(tmp_path / f"moco.{r}", weights_only=False) for r in (0, 1))
    for q0, q1 in zip(r0["queues"], r1["queues"]):
        assert torch.equal(q0, q1)
    # Global batch 4 into a queue of 12: 4, 8, 0 (wrapped), 4.
    assert r0["ptrs"] == [4, 8, 0, 4] == r1["ptrs"]
    assert all(g is None for g in r0["key_grads"])


def test_moco_enqueues_gathered_keys_in_rank_order(tmp_path):
    spawn(W.moco_enqueue_order, tmp_path / "order")
    r0, r1 = (torch.load(tmp_path / f"order.{r}", weights_only=False) for r in (0, 1))
    expected = torch.cat([r0["keys"], r1["keys"]]).T
    assert torch.equal(r0["queue"][:, :4], expected) and torch.equal(r1["queue"][:, :4], expected)


def test_shuffle_bn_unshuffle_restores_each_workers_samples_in_order(tmp_path):
    spawn(W.shuffle_roundtrip, tmp_path / "shuf")
    r0, r1 = (torch.load(tmp_path / f"shuf.{r}", weights_only=False) for r in (0, 1))
    for r in (r0, r1):
        assert torch.equal(r["back"], r["mine"])
    # The shuffle deals out a permutation of the global batch: nothing lost, nothing doubled.
    union = torch.cat([r0["mine"], r1["mine"]])
    assert sorted(r0["everyone"][:, 0].tolist()) == sorted(union[:, 0].tolist())


def test_distribution_alignment_tracks_the_mean_over_every_workers_batch(tmp_path):
    spawn(W.dist_align_steps, tmp_path / "align")
    r0, r1 = (torch.load(tmp_path / f"align.{r}", weights_only=False) for r in (0, 1))
    mean = torch.full((3,), 1 / 3, dtype=torch.float64)
    for step in range(3):
        # The union's batch mean, whichever worker holds which half.
        batches = [torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(10 * step + r), dtype=torch.float64), dim=1) for r in (0, 1)]
        mean = 0.5 * mean + 0.5 * torch.cat(batches).mean(0)
        assert all(torch.allclose(r["means"][step].double(), mean, atol=1e-6) for r in (r0, r1))
        for r, record in enumerate((r0, r1)):
            want = batches[r] * (1 / 3) / mean
            assert torch.allclose(record["aligned"][step].double(), want / want.sum(1, keepdim=True), atol=1e-6)


def test_self_adaptive_thresholds_track_every_workers_batch(tmp_path):
    spawn(W.self_adaptive_threshold_steps, tmp_path / "sat")
    r0, r1 = (torch.load(tmp_path / f"sat.{r}", weights_only=False) for r in (0, 1))
    # The same statistics on one process fed the union of both workers' batches.
    single = SelfAdaptiveThreshold(3, momentum=0.5)
    for step in range(3):
        batches = [torch.softmax(3 * torch.randn(4, 3, generator=torch.Generator().manual_seed(10 * step + r), dtype=torch.float64), dim=1) for r in (0, 1)]
        want = single(torch.cat(batches))
        for record in (r0, r1):
            assert torch.allclose(record["thresholds"][step].double(), want.double(), atol=1e-6)
            assert all(torch.allclose(record["buffers"][step][k].double(), v.double(), atol=1e-6) for k, v in single.state_dict().items())


def test_flexmatch_learning_effect_records_every_workers_images(tmp_path):
    from lowlabel.methods.semisup.flexmatch import LearningEffect

    spawn(W.flexmatch_record_steps, tmp_path / "flex")
    r0, r1 = (torch.load(tmp_path / f"flex.{r}", weights_only=False) for r in (0, 1))
    single = LearningEffect(16, 3, 0.5, True)
    for step in range(3):
        for rank in (0, 1):  # one worker replaying both workers' batches, in rank order
            g = torch.Generator().manual_seed(10 * step + rank)
            probs = torch.softmax(3 * torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
            single.record(torch.arange(4) + 4 * rank + 8 * (step % 2), probs)
        assert torch.equal(r0["selected"][step], single.selected) and torch.equal(r1["selected"][step], single.selected)
        assert torch.allclose(r0["thresholds"][step], single.thresholds())
    assert (single.selected >= 0).sum() > 4  # both workers' images are in it


def test_maml_two_workers_equal_one_worker_on_the_union_of_episodes(tmp_path):
    """Worker r meta-trains on its own episode E_{r+1} (second-order MAML, BatchNorm inside):
    the averaged meta-gradient is the 1-worker meta-gradient of the mean meta-loss over
    {E1, E2}, whether DDP wraps the MAML module (inner loop inside DDP's one forward, inner
    gradients by autograd.grad, so DDP's hooks only see the outer backward: learn2learn#170)
    or the plain module's gradients are averaged with average_gradients."""
    from lowlabel.meta import MAML, meta_loss

    spawn(W.maml_meta_grads, tmp_path / "maml")
    r0, r1 = (torch.load(tmp_path / f"maml.{r}", weights_only=False) for r in (0, 1))
    episodes = [W.toy_meta_episode(0), W.toy_meta_episode(1)]
    for learn_lrs, key in ((False, "ddp"), (True, "ddp_meta_sgd")):
        single = MAML(W.toy_maml_model(), steps=W.MAML_STEPS, lr=W.MAML_LR, learn_lrs=learn_lrs)
        ((single.meta_loss(episodes[0]) + single.meta_loss(episodes[1])) / 2).backward()
        for name, p in single.named_parameters():
            for r in (r0, r1):
                assert torch.allclose(r[key][name], p.grad, rtol=1e-10, atol=1e-13), (key, name)
    single = W.toy_maml_model()
    ((meta_loss(single, episodes[0], steps=W.MAML_STEPS, lr=W.MAML_LR) + meta_loss(single, episodes[1], steps=W.MAML_STEPS, lr=W.MAML_LR)) / 2).backward()
    for r in (r0, r1):
        for got, p in zip(r["explicit"], single.parameters()):
            assert torch.allclose(got, p.grad, rtol=1e-10, atol=1e-13)
    # Outside DDP's forward every worker keeps its own episode's meta-gradient.
    for rank, r in enumerate((r0, r1)):
        own = W.toy_maml_model()
        meta_loss(own, episodes[rank], steps=W.MAML_STEPS, lr=W.MAML_LR).backward()
        assert all(torch.allclose(got, p.grad, rtol=1e-10, atol=1e-13) for got, p in zip(r["outside_forward"], own.parameters()))
        assert not torch.allclose(r["outside_forward"][0], single[0].weight.grad)


def test_reptile_two_workers_equal_one_worker_on_the_union_of_meta_batches(tmp_path):
    from lowlabel.meta import reptile_step

    spawn(W.reptile_deltas, tmp_path / "reptile")
    r0, r1 = (torch.load(tmp_path / f"reptile.{r}", weights_only=False) for r in (0, 1))
    single = W.toy_maml_model()
    reptile_step(single, [W.toy_meta_episode(i) for i in range(4)], steps=3, inner_lr=0.1, outer_lr=0.5)
    for r in (r0, r1):
        for got, p in zip(r["params"], single.parameters()):
            assert torch.allclose(got, p.detach(), rtol=1e-12, atol=1e-14)


def test_dino_two_workers_equal_one_worker_on_the_union_with_one_centre(tmp_path):
    """Worker r holds half of every view: the mean of the workers' losses and DDP's averaged
    gradients are the 1-worker loss and gradients on the union, and the centre, an EMA of the
    teacher's batch mean, is the global batch's on every worker (all-reduced), step after step."""
    spawn(W.dino_steps, tmp_path / "dino")
    r0, r1 = (torch.load(tmp_path / f"dino.{r}", weights_only=False) for r in (0, 1))
    single = W.toy_dino()
    views = W.dino_views()
    loss = single(views)["loss"]
    loss.backward()
    centers = [single.center.clone()]
    with torch.no_grad():
        losses = [loss.detach(), single(views)["loss"]]
    centers.append(single.center.clone())
    for step in range(2):
        assert r0["losses"][step].mean().item() == pytest.approx(losses[step].item(), rel=1e-10)
        for record in (r0, r1):
            assert torch.allclose(record["centers"][step], centers[step], atol=1e-12)
    grads = [p.grad for p in single.parameters() if p.requires_grad]
    for record in (r0, r1):
        for got, want in zip(record["grads"], grads, strict=True):
            assert torch.allclose(got, want, atol=1e-10)
    assert not torch.equal(centers[0], torch.zeros_like(centers[0]))


def test_sharded_features_are_rank_0s_model_on_every_image_in_order(tmp_path):
    """The training loops' evaluation (kNN monitor, test accuracy) is split over the workers:
    every worker gets exactly what rank 0 alone computes, and no worker's own model changes."""
    import numpy as np

    from lowlabel.data.augment import eval_view
    from lowlabel.evaluation import extract_features
    from lowlabel.models.encoders import build_encoder

    spawn(W.sharded_features, tmp_path / "feats")
    records = [torch.load(f"{tmp_path / 'feats'}.{r}") for r in range(2)]
    encoder = build_encoder("conv4", 1, 16).to(memory_format=torch.channels_last)
    encoder.load_state_dict(records[0]["state"])
    images = np.random.default_rng(0).integers(0, 256, (120, 28, 28, 1), dtype=np.uint8)
    expected = extract_features(encoder, images, np.arange(3, 104), eval_view([0.3], [0.35]), batch_size=101, channels_last=True)
    assert expected.shape[0] == 101
    for record in records:
        assert torch.equal(record["features"], expected)
        assert record["untouched"] and record["training"]
    assert not torch.equal(records[0]["state"]["1.running_mean"], records[1]["state"]["1.running_mean"])
