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


@pytest.mark.parametrize("text, expected", [("1e-3", 1e-3), ("5E-5", 5e-5), ("-2.5e+1", -25.0), ("3", 3.0), (".5", 0.5)])
def test_a_rate_written_without_a_dot_is_a_number(text, expected):
    # PyYAML (YAML 1.1) reads "1e-3" as a string; a float setting takes it as the number it is
    from pix2rep.config import apply_overrides, parse_assignment

    key, value = parse_assignment(f"downstream.lr_backbone={text}")
    assert apply_overrides(preset_config("cpu"), {key: value}).downstream.lr_backbone == expected
    with pytest.raises(ConfigError, match="downstream.lr_backbone must be a number, got '1e-3x'"):
        apply_overrides(preset_config("cpu"), {"downstream.lr_backbone": "1e-3x"})
    with pytest.raises(ConfigError, match="downstream.steps must be an integer, got '1e3'"):
        apply_overrides(preset_config("cpu"), {"downstream.steps": "1e3"})


@pytest.mark.parametrize("n, expected", [(1, (0, 1, 2, 3)), (4, (0, 1, 2, 3)), (5, (0, 1)), (80, (0,))])
def test_draws_shrink_with_n_by_the_largest_listed_n_not_above_it(n, expected):
    cfg = preset_config("cpu", study={"seeds": [0, 1, 2, 3], "seeds_by_n": [[80, 1], [1, 4], [5, 2]]})
    assert cfg.study.seeds_for(n) == expected
    assert preset_config("cpu").study.seeds_for(n) == (0, 1, 2)  # empty: every seed for every N


def test_seeds_by_n_round_trips_and_is_checked(tmp_path):
    cfg = preset_config("cpu", study={"seeds": [0, 1, 2], "seeds_by_n": [[1, 3], [5, 1]]})
    cfg.save(tmp_path / "config.yaml")
    assert RunConfig.load(tmp_path / "config.yaml") == cfg
    with pytest.raises(ConfigError, match=r"need N >= 1 and 1 <= k <= 3 \(the seeds listed\), got \[\[1, 4\]\]"):
        preset_config("cpu", study={"seeds_by_n": [[1, 4]]})
    with pytest.raises(ConfigError, match="seeds_by_n starts at N = 2, above the smallest N 1"):
        preset_config("cpu", study={"seeds_by_n": [[2, 1]]})


@pytest.mark.parametrize("key", ["cells_at_once", "workers"])
@pytest.mark.parametrize("value,message", [
    (0, "study: {key} must be a whole number >= 1, got 0"),
    (-1, "study: {key} must be a whole number >= 1, got -1"),
    (1.5, "study.{key} must be an integer, got 1.5"),
    ("two", "study.{key} must be an integer, got 'two'"),
])
def test_cells_at_once_and_workers_must_be_whole_numbers_of_at_least_one(key, value, message):
    with pytest.raises(ConfigError, match=message.format(key=key)):
        preset_config("cpu", study={key: value})


@pytest.mark.parametrize("key", ["cells_at_once", "workers"])
def test_cells_at_once_and_workers_round_trip(tmp_path, key):
    preset_config("cpu", study={key: 4}).save(tmp_path / "config.yaml")
    assert getattr(RunConfig.load(tmp_path / "config.yaml").study, key) == 4
