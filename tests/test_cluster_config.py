"""The cluster configs pass Ray's own launcher validation; a misspelled field does not."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("name", ["config.yaml", "local.yaml"])
def test_config_validates(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", ["config.yaml", "local.yaml"])
def test_misspelled_field_is_rejected(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    config["max_wokers"] = config.pop("max_workers")
    with pytest.raises(Exception, match="max_wokers"):
        validate_config(prepare_config(config))

