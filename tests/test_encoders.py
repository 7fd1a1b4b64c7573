"""Encoder builders: the hand-written CIFAR Wide-ResNet and the small-image ResNet-18 at any width."""

from __future__ import annotations

import pytest
import torch

from lowlabel.config import ConfigError, parse_params
from lowlabel.models.encoders import WideResNet, build_encoder, feature_dim


def test_wrn28_2_matches_the_paper_size():
    encoder = build_encoder("wrn28_2", in_chans=3)
    assert isinstance(encoder, WideResNet)
    # FixMatch's WRN-28-2 has 1,467,610 parameters with its 10-class linear head (128*10 + 10).
    assert sum(p.numel() for p in encoder.parameters()) == 1_467_610 - 1_290
    assert feature_dim(encoder, 3, 32) == 128
    assert encoder(torch.randn(4, 3, 32, 32)).shape == (4, 128)


def test_wide_resnet_rejects_a_depth_that_is_not_6n_plus_4():
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=27, widen=2)


@pytest.mark.parametrize("width", [16, 64])
def test_resnet18_cifar_builds_at_any_width(width):
    encoder = build_encoder("resnet18_cifar", in_chans=1, width=width)
    assert feature_dim(encoder, 1, 28) == 8 * width
    assert encoder(torch.randn(2, 1, 28, 28)).shape == (2, 8 * width)


@pytest.mark.parametrize("arch", ["wrn28_2", "wrn16_8", "conv4", "resnet18_cifar", "timm:resnet10t"])
def test_config_accepts_known_archs(arch):
    assert parse_params({"encoder": {"arch": arch}}).encoder.arch == arch


@pytest.mark.parametrize("arch", ["wrn27_2", "wrn28_0", "wrn", "resnet50", "timm:"])
def test_config_rejects_unknown_archs_naming_the_field(arch):
    with pytest.raises(ConfigError, match=r"encoder\.arch.*" + arch.replace(":", ":")):
        parse_params({"encoder": {"arch": arch}})


def test_fit_linear_head_is_the_logistic_regression_on_raw_features():
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from torch import nn

    from lowlabel.models.heads import fit_linear_head

    g = torch.Generator().manual_seed(0)
    labels = np.repeat(np.arange(3), 4)
    # Features on very different scales and offsets: the fold-back of the standardisation must be exact.
    features = torch.randn(12, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 5 + torch.from_numpy(labels)[:, None].float()
    fc = nn.Linear(5, 3)
    fit_linear_head(fc, features, labels)
    x = features.double().numpy()
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    probe = LogisticRegression(C=1.0, max_iter=1000).fit((x - mu) / sigma, labels)
    want = probe.predict_proba((x - mu) / sigma)
    got = torch.softmax(fc(features).double(), dim=1).detach().numpy()
    assert np.allclose(got, want, atol=1e-4)
    assert (got.argmax(1) == labels).mean() == 1.0
    with pytest.raises(ValueError, match="all 3 classes"):
        fit_linear_head(fc, features[:8], labels[:8])
