import pytest

from pix2rep.config import PRESETS, RunConfig, preset_config
from pix2rep.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_round_trip(tmp_path, name):
    cfg = preset_config(name, pretrain={"epochs": 3}, preprocess={"protocol": "gt-crop"})
    cfg.save(tmp_path / "config.yaml")
    again = RunConfig.load(tmp_path / "config.yaml")
    assert again == cfg
    assert again.pretrain.epochs == 3 and again.preprocess.protocol == "gt-crop"


def test_unknown_settings_and_values_are_refused():
    # ConfigError is a ValueError: one line, naming the key and suggesting the closest one
    with pytest.raises(ConfigError, match="unknown PretrainConfig setting 'pretrain.epochz'; did you mean 'pretrain.epochs'"):
        RunConfig.from_dict({"pretrain": {"epochz": 3}})
    with pytest.raises(ConfigError, match="protocol must be one of"):
        preset_config("cpu", preprocess={"protocol": "magic"})
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset_config("huge")
    assert issubclass(ConfigError, ValueError)
