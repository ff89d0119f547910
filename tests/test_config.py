import pytest

from pix2rep.config import PRESETS, RunConfig, preset_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_round_trip(tmp_path, name):
    cfg = preset_config(name, pretrain={"epochs": 3}, preprocess={"protocol": "gt-crop"})
    cfg.save(tmp_path / "config.yaml")
    again = RunConfig.load(tmp_path / "config.yaml")
    assert again == cfg
    assert again.pretrain.epochs == 3 and again.preprocess.protocol == "gt-crop"


def test_unknown_settings_and_values_are_refused():
    with pytest.raises(ValueError, match="unknown PretrainConfig settings"):
        RunConfig.from_dict({"pretrain": {"epochz": 3}})
    with pytest.raises(ValueError, match="protocol must be one of"):
        preset_config("cpu", preprocess={"protocol": "magic"})
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")
