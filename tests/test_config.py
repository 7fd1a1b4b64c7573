from pathlib import Path

import pytest
import yaml

from lowlabel.config import ConfigError, Params, flatten, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "fashion_mnist"
    assert params.semisup.init in params.pretrain.methods


def test_defaults_parse_from_empty_mapping():
    assert parse_params({}) == Params()


def test_unknown_key_names_its_path():
    with pytest.raises(ConfigError) as err:
        parse_params({"pretrain": {"epohcs": 3}}, source="params.yaml")
    assert "params.yaml" in str(err.value)
    assert "pretrain.epohcs" in str(err.value)
    assert "unknown key" in str(err.value)


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        parse_params({"data": {"source": "mnist"}})
    message = str(err.value)
    assert "data.source" in message and "'mnist'" in message
    for allowed in ("fashion_mnist", "imagefolder", "cifar10", "stl10"):
        assert allowed in message


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"semisup": {"fixmatch": {"threshold": 0.0}}}, "semisup.fixmatch.threshold"),
        ({"semisup": {"fixmatch": {"threshold": 1.5}}}, "semisup.fixmatch.threshold"),
        ({"semisup": {"fixmatch": {"mu": 0}}}, "semisup.fixmatch.mu"),
        ({"pretrain": {"simclr": {"temperature": 0}}}, "pretrain.simclr.temperature"),
        ({"pretrain": {"methods": ["swav"]}}, "pretrain.methods.0"),
        ({"data": {"labels_per_class": 0}}, "data.labels_per_class"),
        ({"encoder": {"arch": "vgg"}}, "encoder.arch"),
        ({"fewshot": {"heads": ["maml"]}}, "fewshot.heads.0"),
    ],
)
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_params(raw)


def test_cross_section_checks():
    with pytest.raises(ConfigError, match="semisup.init"):
        parse_params({"pretrain": {"methods": ["simclr"]}, "semisup": {"init": "moco"}})
    with pytest.raises(ConfigError, match=r"pretrain.moco.queue_size \(1000\) must be a multiple"):
        parse_params({"pretrain": {"moco": {"queue_size": 1000}}})
    with pytest.raises(ConfigError, match="at least 2 samples per worker"):
        parse_params({"runtime": {"workers": 2}, "semisup": {"batch_size": 2}})
    with pytest.raises(ConfigError, match=r"multiple of runtime.workers"):
        parse_params({"runtime": {"workers": 3}, "pretrain": {"batch_size": 256}})
    assert parse_params({"semisup": {"init": "random"}}).semisup.init == "random"


def test_workers_auto_parses_and_defers_the_batch_checks():
    # semisup.batch_size 6 fits no count in particular: checked once "auto" is resolved.
    params = parse_params({"runtime": {"workers": "auto"}, "semisup": {"batch_size": 6}})
    assert params.runtime.workers == "auto"
    assert flatten(params)["runtime.workers"] == "auto"
    assert parse_params({"runtime": {"workers": 3}, "pretrain": {"batch_size": 255}, "semisup": {"batch_size": 6}}).runtime.workers == 3


@pytest.mark.parametrize("junk", ["two", 0, -1, 1.5, True, None, "Auto"])
def test_workers_junk_is_rejected_naming_field_and_value(junk):
    with pytest.raises(ConfigError) as err:
        parse_params({"runtime": {"workers": junk}}, source="params.yaml")
    message = str(err.value)
    assert "params.yaml" in message and "runtime.workers" in message
    assert "positive integer or 'auto'" in message and f"(got {junk!r})" in message


def test_resolved_workers_run_the_batch_checks():
    params = parse_params({"runtime": {"workers": "auto"}, "pretrain": {"batch_size": 256}, "semisup": {"batch_size": 4}})
    with pytest.raises(ConfigError, match=r"params.yaml: pretrain.batch_size \(256\) must be a multiple of runtime.workers \(auto -> 3\)"):
        params.with_workers(3)
    with pytest.raises(ConfigError, match=r"semisup.batch_size \(4\) is too small for runtime.workers \(auto -> 4\): .*2 samples per worker"):
        params.with_workers(4)
    resolved = params.with_workers(2)
    assert resolved.runtime.workers == 2 and params.runtime.workers == "auto"
    assert resolved.model_dump(exclude={"runtime"}) == params.model_dump(exclude={"runtime"})
    assert flatten(resolved)["runtime.workers"] == 2


def test_load_params_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    good = tmp_path / "p.yaml"
    good.write_text(yaml.safe_dump({"seed": 3}))
    assert load_params(good).seed == 3


def test_flatten_gives_dotted_keys():
    flat = flatten(Params())
    assert flat["pretrain.simclr.temperature"] == 0.1
    assert flat["semisup.fixmatch.mu"] == 7
