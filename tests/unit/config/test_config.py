"""Scenario validation: unknown keys, bad values, overrides and round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradaudit.config import apply_overrides, build_scenario, dump_scenario, load_scenario
from gradaudit.errors import ConfigError

MINIMAL = {"data": {"dataset": "digits"}, "model": {"kind": "mlp"}}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_scenario_gets_defaults() -> None:
    scenario = build_scenario(MINIMAL)
    assert scenario.federation.algorithm == "fedsgd"
    assert scenario.threat.target.round == 1
    assert scenario.data.num_clients == 8


def test_unknown_key_names_dotted_path_and_allowed_keys() -> None:
    raw = {**MINIMAL, "federation": {"local": {"batchsize": 4}}}
    with pytest.raises(ConfigError) as err:
        build_scenario(raw)
    message = str(err.value)
    assert "federation.local.batchsize: unknown key" in message
    assert "batch_size" in message and "lr" in message


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match=r"attack: unknown key; allowed keys here: .*attacks"):
        build_scenario({**MINIMAL, "attack": []})


def test_bad_value_names_field_and_value() -> None:
    with pytest.raises(
        ConfigError, match=r"federation\.rounds: .*greater than or equal to 1.*got 0"
    ):
        build_scenario({**MINIMAL, "federation": {"rounds": 0}})


def test_unknown_component_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"model\.kind: unknown model 'vgg'; known: .*convnet"):
        build_scenario({**MINIMAL, "model": {"kind": "vgg"}})


def test_component_params_validated_with_path() -> None:
    raw = {
        **MINIMAL,
        "attacks": [
            {"kind": "label_recovery"},
            {"kind": "inverting_gradients", "params": {"iteratons": 5}},
        ],
    }
    with pytest.raises(ConfigError, match=r"attacks\[1\]\.params\.iteratons: unknown key"):
        build_scenario(raw)


def test_target_must_exist() -> None:
    raw = {**MINIMAL, "threat": {"target": {"round": 3}}}
    with pytest.raises(ConfigError, match=r"federation\.rounds is 1"):
        build_scenario(raw)


def test_scenario_is_frozen() -> None:
    scenario = build_scenario(MINIMAL)
    with pytest.raises(Exception, match="frozen"):
        scenario.seed = 3  # type: ignore[misc]


def test_overrides_parse_yaml_values_and_lists() -> None:
    raw = apply_overrides(
        {**MINIMAL, "attacks": [{"kind": "label_recovery"}]},
        [
            "federation.rounds=3",
            "model.params.hidden=[32, 16]",
            "attacks[0].params.method=bias",
            "seed=7",
        ],
    )
    scenario = build_scenario(raw)
    assert scenario.federation.rounds == 3
    assert scenario.model.params == {"hidden": [32, 16]}
    assert scenario.attacks[0].params == {"method": "bias"}
    assert scenario.seed == 7


@pytest.mark.parametrize("item", ["federation.rounds", "a..b=1", "attacks[4].kind=x"])
def test_bad_override_is_config_error(item: str) -> None:
    with pytest.raises(ConfigError):
        apply_overrides({**MINIMAL, "attacks": []}, [item])


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "data:\n  dataset: digits\n model: [\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: not valid YAML at line \d+"):
        load_scenario(path)


@pytest.mark.parametrize("text", ["", "- a\n- b\n"])
def test_empty_or_non_mapping_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"s\.yaml"):
        load_scenario(_write(tmp_path, text))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="scenario file not found"):
        load_scenario("/nonexistent/scenario.yaml")


def test_dump_round_trips(tmp_path: Path) -> None:
    scenario = build_scenario({**MINIMAL, "attacks": [{"kind": "label_recovery"}]})
    again = load_scenario(_write(tmp_path, dump_scenario(scenario)))
    assert again == scenario


def test_params_for_a_component_that_takes_none() -> None:
    raw = {
        **MINIMAL,
        "data": {"dataset": "digits", "partition": {"kind": "iid", "params": {"alpha": 1}}},
    }
    with pytest.raises(ConfigError, match=r"partition\.params\.alpha: .*takes no parameters"):
        build_scenario(raw)
