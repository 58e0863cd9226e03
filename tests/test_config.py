"""TrainConfig: TOML + overrides, closest-match errors, algorithm presets, documented fields."""

import pytest

from rlft.config import ALGORITHMS, ConfigError, TrainConfig, describe, load_config


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match="Did you mean 'learning_rate'"):
        load_config(overrides=["learnig_rate=1e-4"])


def test_toml_tables_flatten_and_overrides_win(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('steps = 5\ntemperature = 0.7\n[lora]\nrank = 8\n')
    cfg = load_config(p, ["steps=7", "lora=false"])
    assert (cfg.steps, cfg.temperature, cfg.lora_rank, cfg.lora) == (7, 0.7, 8, False)


def test_wrong_value_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="'steps' expects int"):
        load_config(overrides=["steps=many"])


def test_algorithm_preset_fills_only_auto_fields():
    cfg = TrainConfig(algorithm="gspo", eps_high=0.5).resolved()
    assert cfg.ratio_level == "sequence" and cfg.eps_low == ALGORITHMS["gspo"]["eps_low"] and cfg.eps_high == 0.5
    assert TrainConfig(algorithm="dr_grpo").resolved().std_normalize == "false"


def test_invalid_choice_is_rejected_on_resolve():
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        TrainConfig(dynamic_sampling="sometimes").resolved()


def test_every_field_has_a_one_line_comment():
    assert all(comment for _, _, comment in describe())


def test_saved_config_loads_back_equal(tmp_path):
    cfg = TrainConfig(steps=3, run_name="x y", lora=False).resolved()
    cfg.save(tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg
