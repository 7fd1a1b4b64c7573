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


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: .*glyphs"):
        build("nope")
