import pytest

from lowlabel.config import ConfigError, load_params
from lowlabel.presets import available, build, main


@pytest.mark.parametrize("name", available())
def test_every_preset_is_valid_params(name, tmp_path):
    build(name)
    out = tmp_path / "params.yaml"
    assert main([name, "--out", str(out)]) == 0
    assert load_params(out) == build(name)


def test_presets_exist_for_the_benchmarks():
    assert {"glyphs", "cifar10_resnet18"} <= set(available())
    assert build("glyphs").data.source == "glyphs"


def test_fulllabel_glyphs_labels_every_base_training_image():
    params = build("glyphs_fulllabel")
    data = params.data
    train_per_class = round(data.glyphs.instances_per_class * (1 - data.test_fraction))
    test_per_class = data.glyphs.instances_per_class - train_per_class
    assert data.source == "glyphs" and data.labels_per_class == train_per_class
    assert params.meta.episodes_from == "labels" and params.meta.init == "random"
    assert set(params.meta.methods) == {"protonet", "matchingnet", "relationnet", "maml", "reptile"}
    # The meta stages' validation episodes come from each base class's test images.
    assert params.meta.shots + params.meta.queries <= test_per_class


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: .*glyphs"):
        build("nope")
