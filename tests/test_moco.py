"""MoCo v2 pieces on one process: InfoNCE formula, queue pointer, EMA formula, no key gradient, checkpoint."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlabel.methods.ssl.losses import infonce_loss
from lowlabel.methods.ssl.moco import MoCo, default_queue_size


def infonce_reference(q, k, queue, t):
    total = 0.0
    for i in range(len(q)):
        pos = math.exp((q[i] @ k[i]).item() / t)
        negs = sum(math.exp((q[i] @ queue[:, j]).item() / t) for j in range(queue.shape[1]))
        total += -math.log(pos / (pos + negs))
    return total / len(q)


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_infonce_matches_formula(temperature):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(8, 12, generator=g, dtype=torch.float64), dim=0)
    assert infonce_loss(q, k, queue, temperature).item() == pytest.approx(infonce_reference(q, k, queue, temperature), rel=1e-10)


def toy_moco(queue_size=8, momentum=0.9, **kw) -> MoCo:
    torch.manual_seed(0)
    return MoCo(nn.Sequential(nn.Linear(6, 5)), 5, proj_hidden_dim=7, proj_dim=4, queue_size=queue_size, momentum=momentum, **kw)


def test_queue_pointer_wraps_and_newest_keys_land_at_pointer():
    moco = toy_moco(queue_size=8)
    keys = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(3)]
    moco.enqueue(keys[0])
    assert int(moco.queue_ptr) == 4 and torch.equal(moco.queue[:, :4], keys[0].T)
    moco.enqueue(keys[1])
    assert int(moco.queue_ptr) == 0 and torch.equal(moco.queue[:, 4:], keys[1].T)
    moco.enqueue(keys[2])
    assert int(moco.queue_ptr) == 4 and torch.equal(moco.queue[:, :4], keys[2].T)
    with pytest.raises(ValueError, match=r"queue_size \(8\) must be a multiple of the global batch \(3\)"):
        moco.enqueue(torch.randn(3, 4))


def test_key_branch_gets_no_gradient_and_follows_the_ema_formula():
    moco = toy_moco(queue_size=8, momentum=0.9)
    opt = torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=0.5)
    expected = [p.detach().clone() for p in moco.momentum_branch.parameters()]
    for step in range(1, 4):
        views = [torch.randn(4, 6), torch.randn(4, 6)]
        with pytest.warns(UserWarning, match="split-batch BN") if step == 1 else contextlib.nullcontext():
            loss = moco(views)["loss"]
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in moco.momentum_branch.parameters())
        opt.step()
        moco.on_train_step_end(step, total_steps=3)
        online = [p.detach() for m in (moco.encoder, moco.projector) for p in m.parameters()]
        expected = [0.9 * k + 0.1 * q for k, q in zip(expected, online)]
        for got, want in zip(moco.momentum_branch.parameters(), expected):
            assert torch.allclose(got, want, atol=1e-6)


def test_momentum_cosine_schedule():
    moco = toy_moco(momentum=0.99, momentum_final=1.0)
    assert moco.momentum_at(0, 100) == pytest.approx(0.99)
    assert moco.momentum_at(50, 100) == pytest.approx(0.995)
    assert moco.momentum_at(100, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="momentum"):
        toy_moco(momentum=1.0)


def test_queue_is_saved_and_restored_with_the_checkpoint():
    moco = toy_moco(queue_size=8)
    moco.enqueue(F.normalize(torch.randn(4, 4), dim=1))
    restored = toy_moco(queue_size=8)
    restored.load_state_dict(moco.state_dict())
    assert torch.equal(restored.queue, moco.queue) and int(restored.queue_ptr) == 4


def test_default_queue_size_is_a_multiple_of_the_batch():
    assert default_queue_size(30000, 256) == 7424
    assert default_queue_size(100, 64) == 64
    assert default_queue_size(10**6, 256) % 256 == 0



def test_the_worker_sizes_a_null_queue_to_the_data_and_keeps_a_given_one():
    from lowlabel.methods.ssl import PRETRAIN_METHODS

    assert MoCo.resolve_kwargs({"queue_size": None, "momentum": 0.99}, num_images=30000, global_batch=256) == {"queue_size": 7424, "momentum": 0.99}
    assert MoCo.resolve_kwargs({"queue_size": 512}, num_images=30000, global_batch=256) == {"queue_size": 512}
    # Methods without data-dependent defaults take their params as they are.
    simclr_kwargs = {"temperature": 0.1, "proj_dim": 128}
    assert PRETRAIN_METHODS["simclr"].resolve_kwargs(simclr_kwargs, num_images=30000, global_batch=256) == simclr_kwargs
