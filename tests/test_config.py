"""Configs: defaults < YAML < command line; typed checks with located, helpful errors."""

from dataclasses import dataclass
from typing import Literal

import pytest

from safealign.config import ConfigError, config_field, describe_config, load_config, parse_overrides, save_config


@dataclass
class ToyConfig:
    learning_rate: float = config_field(1e-3, help="Peak learning rate.")
    epochs: int = config_field(2, help="Passes.")
    bf16: bool = config_field(False, help="Use bf16.")
    schedule: Literal["cosine", "constant"] = config_field("cosine", help="Schedule.")
    nus: list[float] = config_field([0.5, 1.0], help="Shaping weights.")
    name: str = config_field("run", help="Name.")
    stage: dict = config_field({}, help="Overrides for a sub-stage.")


def test_yaml_then_cli_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\nepochs: 3\nname: from-yaml\n")
    cfg = load_config(ToyConfig, path, ["--epochs", "5", "--bf16", "--learning-rate=2e-5", "--nus", "[0.1, 2]"])
    assert cfg.learning_rate == pytest.approx(2e-5)  # YAML's '1e-4' string and the CLI value both parse
    assert cfg.epochs == 5 and cfg.bf16 is True and cfg.name == "from-yaml"
    assert cfg.nus == [0.1, 2.0]


def test_defaults_are_not_shared_between_instances():
    first, second = load_config(ToyConfig), load_config(ToyConfig)
    first.nus.append(9.0)
    assert second.nus == [0.5, 1.0]


@pytest.mark.parametrize("args, message", [
    (["--learning_rat", "1"], "did you mean 'learning_rate'"),
    (["--epochs", "2.5"], "'epochs' must be an integer"),
    (["--bf16", "maybe"], "'bf16' must be true or false"),
    (["--schedule", "linear"], "must be one of ['cosine', 'constant']"),
    (["--stage", "3"], "'stage' must be a mapping"),
    (["epochs", "3"], "expected --key value"),
])
def test_bad_overrides_are_clear(args, message):
    with pytest.raises(ConfigError, match="command line") as err:
        load_config(ToyConfig, None, args)
    assert message in str(err.value)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(ToyConfig, path)
    path.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(ToyConfig, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(ToyConfig, tmp_path / "missing.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(ToyConfig, None, {"epochs": 7, "stage": {"lr": 1.0}})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(ToyConfig, tmp_path / "config.yaml") == cfg


def test_describe_lists_every_key_with_help():
    text = describe_config(ToyConfig)
    assert "--learning_rate (float, default 0.001): Peak learning rate." in text
    assert text.count("\n") == 6


def test_parse_overrides_bare_flag_and_equals():
    assert parse_overrides(["--a", "--b=3", "--c", "x"]) == {"a": True, "b": 3, "c": "x"}


@pytest.mark.parametrize("text", ["010", "0x10", "1_000", "yes", "null", "~", "1e-4"])
def test_a_string_field_keeps_the_text_typed(text):
    assert load_config(ToyConfig, None, ["--name", text]).name == text  # YAML would read 8, 16, 1000, True, None, ...


def test_a_bare_key_needs_a_value_unless_it_is_a_flag():
    with pytest.raises(ConfigError, match="--name needs a value"):
        load_config(ToyConfig, None, ["--name"])
    with pytest.raises(ConfigError, match="--epochs needs a value"):
        load_config(ToyConfig, None, ["--epochs", "--bf16"])
    assert load_config(ToyConfig, None, ["--bf16"]).bf16 is True


def test_yaml_boolean_spelling_maps_back_to_literal_choice():
    @dataclass
    class Precision:
        mixed_precision: Literal["auto", "no", "bf16"] = config_field("auto", help="")

    assert load_config(Precision, None, ["--mixed_precision", "no"]).mixed_precision == "no"


def test_changed_settings_compares_a_config_with_the_one_saved(tmp_path):
    from safealign.config import changed_settings

    path = tmp_path / "config.yaml"
    assert changed_settings(ToyConfig(), path) is None  # nothing saved yet
    save_config(ToyConfig(), path)
    assert changed_settings(ToyConfig(), path) == []
    assert changed_settings(ToyConfig(epochs=3, name="other"), path) == ["epochs", "name"]
    assert changed_settings(ToyConfig(epochs=3, name="other"), path, ignore=("name",)) == ["epochs"]
    path.write_text("epochs: 2\n")  # an older version's file without the newer keys: those are not called changed
    assert changed_settings(ToyConfig(learning_rate=0.5), path) == []
