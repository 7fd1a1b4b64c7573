"""Each name list of lowlabel.config (what params.yaml may say) agrees with the registry that
implements those names. config imports none of them (it is the bottom layer), so the two are
kept in step here: a method, head, source or arch added to one side only fails this file."""

from __future__ import annotations

from typing import get_args

import pytest

from lowlabel import config
from lowlabel.config import ConfigError, parse_params


def _literal(model: type, field: str) -> tuple:
    return get_args(model.model_fields[field].annotation)


def test_fewshot_heads() -> None:
    from lowlabel.fewshot import HEADS
    from lowlabel.fewshot.protocol import FINETUNE, HEAD_NAMES

    assert HEAD_NAMES == config.FEWSHOT_HEADS  # same names, same order
    # finetune is built from the encoder, not by name
    assert set(HEADS) == set(config.FEWSHOT_HEADS) - {FINETUNE}
    (literal,) = get_args(config.FewshotConfig.model_fields["heads"].annotation)  # list[Literal[...]]
    assert get_args(literal) == config.FEWSHOT_HEADS


def test_fewshot_feature_norms_and_distances() -> None:
    from lowlabel.fewshot import NormalizeMode, ProtoNet

    assert _literal(config.FewshotConfig, "feature_norm") == get_args(NormalizeMode)
    for distance in _literal(config.FewshotConfig, "distance"):
        assert ProtoNet(distance).distance == distance


def test_pretrain_methods() -> None:
    from lowlabel.methods.ssl import PRETRAIN_METHODS

    assert tuple(PRETRAIN_METHODS) == config.PRETRAIN_METHODS


def test_semisup_methods() -> None:
    from lowlabel.config import SEMISUP_USES_UNLABELED
    from lowlabel.methods.semisup import SEMISUP_REGISTRY

    assert set(SEMISUP_REGISTRY) == set(config.SEMISUP_METHODS)
    assert set(SEMISUP_USES_UNLABELED) == set(config.SEMISUP_METHODS)


def test_data_sources() -> None:
    from lowlabel.data.sources import ALLOWED_SOURCES

    assert _literal(config.DataConfig, "source") == ALLOWED_SOURCES


@pytest.mark.parametrize("arch", ["conv4", "resnet18_cifar", "wrn10_1", "wrn16_2"])
def test_encoder_arch_config_accepts_is_buildable(arch: str) -> None:
    from lowlabel.models.encoders import build_encoder

    assert parse_params({"encoder": {"arch": arch}}).encoder.arch == arch
    build_encoder(arch, in_chans=1, width=8)


@pytest.mark.parametrize("arch", ["conv5", "resnet18", "wrn12_2", "wrn28"])
def test_encoder_arch_both_reject(arch: str) -> None:
    from lowlabel.models.encoders import build_encoder

    with pytest.raises(ConfigError, match="encoder.arch"):
        parse_params({"encoder": {"arch": arch}})
    with pytest.raises(ValueError):
        build_encoder(arch, in_chans=1, width=8)
