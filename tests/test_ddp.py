"""Distributed behaviour under real multi-process DDP (torch.multiprocessing, gloo, CPU)."""

from __future__ import annotations

import socket

import ddp_workers as W
import pytest
import torch
import torch.multiprocessing as mp

from lowlabel.methods.freematch import SelfAdaptiveThreshold


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
