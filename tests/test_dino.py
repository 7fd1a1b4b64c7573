"""DINO: the loss against the paper's formula written out with loops (float64), the centre, the
teacher's temperature, multi-crop views in the pretrain loop, and a state round trip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowlabel.methods.ssl import PRETRAIN_METHODS
from lowlabel.methods.ssl.base import ViewSpec
from lowlabel.methods.ssl.dino import DINO, update_center_
from lowlabel.methods.ssl.losses import dino_loss


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dino_reference(student, teacher, center, ts, tt):
    """Caron et al. 2021, Algorithm 1 / eq. 3 with loops: for every global view g (teacher) and
    every other view v (student), ``H(P_t, P_s) = -sum_k P_t,k log P_s,k`` per sample, averaged
    over the batch, then over the pairs (g, v != g)."""

    def softmax(row, temp):
        exps = [math.exp(x / temp) for x in row]
        total = sum(exps)
        return [e / total for e in exps]

    pairs = []
    for g, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == g:
                continue
            per_sample = []
            for b in range(t.shape[0]):
                p_t = softmax([t[b, k].item() - center[k].item() for k in range(t.shape[1])], tt)
                p_s = softmax([s[b, k].item() for k in range(s.shape[1])], ts)
                per_sample.append(-sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s)))
            pairs.append(sum(per_sample) / len(per_sample))
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("local_views", [0, 1, 3])
def test_dino_loss_matches_the_papers_formula(local_views):
    student = [randn(4, 5, seed=v) for v in range(2 + local_views)]
    teacher = [randn(4, 5, seed=10 + g) for g in range(2)]
    center = randn(5, seed=20)
    got = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04).item()
    assert got == pytest.approx(dino_reference(student, teacher, center, 0.1, 0.04), rel=1e-10)
    # (2 + L) views: 2 x (2 + L - 1) pairs.
    assert len(student) * 2 - 2 == 2 * (2 + local_views - 1)


def test_dino_loss_sends_gradient_to_the_student_only():
    student = [randn(3, 4, seed=v).requires_grad_() for v in range(3)]
    teacher = [randn(3, 4, seed=10 + g).requires_grad_() for g in range(2)]
    dino_loss(student, teacher, torch.zeros(4, dtype=torch.float64), 0.1, 0.04).backward()
    assert all(s.grad is not None for s in student) and all(t.grad is None for t in teacher)


def test_center_is_an_ema_of_the_teachers_batch_mean_over_the_global_views():
    center = randn(5, seed=1)
    before = center.clone()
    teacher = [randn(4, 5, seed=2), randn(4, 5, seed=3)]
    update_center_(center, teacher, momentum=0.9)
    want = 0.9 * before + 0.1 * torch.cat(teacher).mean(0)
    assert torch.allclose(center, want, atol=1e-12)


def tiny_dino(**kwargs) -> DINO:
    torch.manual_seed(0)
    args = {"proj_hidden_dim": 8, "bottleneck_dim": 4, "out_dim": 6, "momentum": 0.9, "local_crops": 2} | kwargs
    return DINO(nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh()), 8, **args).double()


def views(n=6, local=2, seed=0):
    return [randn(n, 6, seed=seed + v) for v in range(2 + local)]


def test_dino_step_uses_the_centred_teacher_on_the_global_views_and_updates_the_centre():
    dino = tiny_dino(center_momentum=0.5)
    vs = views()
    center = dino.center.clone()
    out = dino(vs)
    # Views of one size go through the networks together (BatchNorm sees them as one batch).
    student = dino.head(dino.encoder(torch.cat(vs))).chunk(4)
    with torch.no_grad():
        enc, head = dino.momentum_branch
        teacher = head(enc(torch.cat(vs[:2]))).chunk(2)
    want = dino_loss(list(student), list(teacher), center, 0.1, 0.04)
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-10)
    assert torch.allclose(dino.center, 0.5 * center + 0.5 * torch.cat(teacher).mean(0))
    out["loss"].backward()
    assert all(p.grad is None for p in dino.momentum_branch.parameters())
    assert all(p.grad is not None for p in dino.head.parameters())


def test_teacher_temperature_warms_up_then_stays():
    dino = tiny_dino(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_fraction=0.5)
    assert float(dino.teacher_temp) == pytest.approx(0.04)  # the first step
    assert dino.teacher_temp_at(5, 20) == pytest.approx(0.04 + 0.03 * 0.5)
    assert dino.teacher_temp_at(10, 20) == pytest.approx(0.07) == dino.teacher_temp_at(20, 20)
    dino.on_train_step_end(5, 20)
    assert float(dino.teacher_temp) == pytest.approx(0.055)
    assert tiny_dino(warmup_teacher_temp_fraction=0.0).teacher_temp.item() == pytest.approx(0.07)
    # The teacher's momentum: base momentum's cosine to 1 (BYOL's schedule).
    assert dino.momentum_at(20, 20) == pytest.approx(1.0)


def test_state_round_trip_continues_the_same_training():
    """Centre, temperature and teacher ride in the state dict: a resumed run takes the same step."""
    vs = views()
    first = tiny_dino()
    opt = torch.optim.SGD([p for p in first.parameters() if p.requires_grad], lr=0.1)
    for step in (1, 2):
        opt.zero_grad()
        first(vs)["loss"].backward()
        opt.step()
        first.on_train_step_end(step, 4)
    resumed = tiny_dino()
    resumed.load_state_dict(first.state_dict())
    assert {"center", "teacher_temp"} <= set(first.state_dict())
    assert first(vs)["loss"].item() == resumed(vs)["loss"].item()


def test_multi_crop_view_specs_and_the_other_methods_unchanged():
    dino = tiny_dino(local_crops=3, local_crop_size=12, global_crop_scale=(0.4, 1.0), local_crop_scale=(0.05, 0.4))
    assert dino.view_specs(28, (0.2, 1.0)) == [ViewSpec(28, (0.4, 1.0))] * 2 + [ViewSpec(12, (0.05, 0.4))] * 3
    # Every other method: num_views alike at the image size and pretrain.crop_scale, as before.
    simclr = PRETRAIN_METHODS["simclr"](nn.Linear(6, 8), 8, proj_hidden_dim=8, proj_dim=4)
    assert simclr.view_specs(28, (0.2, 1.0)) == [ViewSpec(28, (0.2, 1.0))] * 2
    rotnet = PRETRAIN_METHODS["rotnet"](nn.Linear(6, 8), 8, hidden_dim=8)
    assert rotnet.view_specs(28, (0.2, 1.0)) == [ViewSpec(28, (0.2, 1.0))]


def test_the_loop_builds_one_view_per_distinct_recipe_for_both_augment_paths():
    from lowlabel.data import augment, device_augment
    from lowlabel.train.pretrain import build_views

    same = build_views([ViewSpec(16, (0.2, 1.0))] * 2, lambda size, scale: augment.contrastive_view(size, 1, [0.5], [0.25], crop_scale=scale))
    assert same[0] is same[1]  # identical views share one recipe object, as [view] * num_views did
    specs = [ViewSpec(16, (0.4, 1.0))] * 2 + [ViewSpec(8, (0.05, 0.4))] * 2
    image = (torch.rand(16, 16, 1) * 255).to(torch.uint8).numpy()
    cpu = build_views(specs, lambda size, scale: augment.contrastive_view(size, 1, [0.5], [0.25], crop_scale=scale))
    assert [tuple(v(image, seed=i).shape) for i, v in enumerate(cpu)] == [(1, 16, 16)] * 2 + [(1, 8, 8)] * 2
    dev = build_views(specs, lambda size, scale: device_augment.contrastive_view(size, 1, [0.5], [0.25], crop_scale=scale))
    batch = (torch.rand(3, 1, 16, 16) * 255).to(torch.uint8)
    assert [tuple(v(batch, seed=i).shape) for i, v in enumerate(dev)] == [(3, 1, 16, 16)] * 2 + [(3, 1, 8, 8)] * 2


def test_multi_crop_needs_features_of_one_width_at_every_view_size():
    from lowlabel.models.encoders import build_encoder
    from lowlabel.train.pretrain import check_view_sizes

    specs = [ViewSpec(28, (0.4, 1.0))] * 2 + [ViewSpec(12, (0.05, 0.4))] * 2
    conv4 = build_encoder("conv4", 1, 8)
    with pytest.raises(ValueError, match=r"encoder.arch='conv4' gives features of different widths"):
        check_view_sizes(conv4, 1, 28, specs, "conv4")
    # Conv-4: 16 px locals of 28 px images share its 1x1 final map.
    check_view_sizes(conv4, 1, 28, [ViewSpec(28, (0.4, 1.0)), ViewSpec(16, (0.05, 0.4))], "conv4")
    check_view_sizes(build_encoder("wrn10_1", 1), 1, 28, specs, "wrn10_1")  # globally pooled
