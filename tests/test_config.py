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


@pytest.mark.parametrize("n, expected", [(1, 1000), (2, 1000), (5, 2000), (10, 2000), (80, 8000)])
def test_steps_grow_with_n_by_the_largest_listed_n_not_above_it(n, expected):
    cfg = preset_config("cpu", study={"n": [1, 2, 5, 10], "steps_by_n": [[5, 2000], [1, 1000], [80, 8000]]})
    assert cfg.study.steps_for(n, default=300) == expected


def test_steps_by_n_round_trips_and_is_checked(tmp_path):
    cfg = preset_config("cpu", study={"steps_by_n": [[1, 1000], [20, 4000]]})
    assert cfg.study.steps_for(3, default=300) == 1000 and preset_config("cpu").study.steps_for(3, default=300) == 300
    cfg.save(tmp_path / "config.yaml")
    assert RunConfig.load(tmp_path / "config.yaml") == cfg
    with pytest.raises(ConfigError, match="steps_by_n starts at N = 2, above the smallest N 1"):
        preset_config("cpu", study={"steps_by_n": [[2, 1000]]})
    with pytest.raises(ConfigError, match=r"study.steps_by_n\[0\] must have 2 entries"):
        preset_config("cpu", study={"steps_by_n": [[1, 1000, 3]]})
