"""Config loading: validation names the key, precedence flag > env > YAML > default."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from asyncrunner.config import Config, build_config, config_from_dict, load_config
from asyncrunner.errors import ConfigError


def write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "d.csv"
    path.write_text("IncidentID,NarrativeLE\n1,x\n")
    return path


def test_defaults_and_yaml(tmp_path: Path, data_file: Path) -> None:
    cfg = load_config(write(tmp_path, {"data": {"file": str(data_file)},
                                       "run": {"workers": 7}}), env={})
    assert cfg.run.workers == 7
    assert cfg.run.batch_size == 100
    assert cfg.data.file == str(data_file)


def test_precedence_flag_over_env_over_yaml(tmp_path: Path, data_file: Path) -> None:
    path = write(tmp_path, {"data": {"file": str(data_file)}, "run": {"workers": 2}})
    env = {"ASYNCRUNNER_RUN_WORKERS": "5"}
    assert load_config(path, env=env).run.workers == 5
    assert load_config(path, env=env, overrides={"run.workers": 9}).run.workers == 9
    assert load_config(path, env={}, overrides={"run.workers": None}).run.workers == 2


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"run": {"wrokers": 3}}, "run.wrokers"),
        ({"model": {"temperature": "hot"}}, "model.temperature"),
        ({"run": {"workers": 2.5}}, "run.workers"),
        ({"prompt": {"user_template": "no placeholder"}}, "prompt.user_template"),
        ({"bogus": {}}, "bogus"),
        ({"run": {"workers": 0}}, "run.workers"),
        ({"model": {"provider": "smoke-signals"}}, "model.provider"),
        ({"data": {"narratives": {"LE": ["a"]}}}, "data.narratives.LE"),
        ({"data": {"flags": {"XX": "F"}}}, "data.flags.XX"),
        ({"model": {"response_format": "json"}}, "model.response_format"),
        ({"model": {"max_response_bytes": 100}}, "model.max_response_bytes"),
        ({"prompt": {"system_role": "developer"}}, "prompt.system_role"),
        ({"run": {"parse_retry": "twice"}}, "run.parse_retry"),
        ({"run": {"max_error_share": 1.5}}, "run.max_error_share"),
        ({"run": {"max_error_share": -0.1}}, "run.max_error_share"),
        ({"run": {"breaker_window": 0}}, "run.breaker_window"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, data_file: Path, data: dict, key: str) -> None:
    data = {"data": {"file": str(data_file)}} | data if "data" not in data else data
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, data), env={}, require_data=False)


def test_missing_data_file_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.xlsx"):
        load_config(write(tmp_path, {"data": {"file": "nope.xlsx"}}), env={})


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", env={})


def test_stored_config_round_trips_and_holds_no_key() -> None:
    cfg = build_config({"run": {"workers": 3}}, env={"OPENAI_API_KEY": "sk-SENTINEL-123"})
    again = config_from_dict(cfg.to_dict())
    assert again == Config(**{**{f: getattr(cfg, f) for f in ("experiment", "model", "prompt",
                                                              "data", "run")}})
    assert "SENTINEL" not in str(cfg.to_dict())
    assert cfg.to_dict()["model"]["api_key_env"] == "OPENAI_API_KEY"


def test_issue_15_keys_defaults_and_accepted_values() -> None:
    cfg = build_config({}, env={})
    assert (cfg.model.response_format, cfg.prompt.system_role, cfg.run.parse_retry) == (
        "auto", "system", "repair")
    assert (cfg.run.max_error_share, cfg.run.breaker_window) == (0.2, 50)
    assert cfg.model.max_response_bytes == 8 * 1024 * 1024
    for mode in ("auto", "json_schema", "json_object", "none"):
        assert build_config({"model": {"response_format": mode}}, env={}).model.response_format \
            == mode
    # empty, as older configs and stored experiments have it, means no response_format
    assert build_config({"model": {"response_format": None}}, env={}).model.response_format \
        == "none"
    assert build_config({}, env={"ASYNCRUNNER_MODEL_RESPONSE_FORMAT": ""}
                        ).model.response_format == "none"
    assert config_from_dict({"model": {"response_format": None}}).model.response_format == "none"
    cfg = build_config({"prompt": {"system_role": "user"}, "run": {"parse_retry": "off",
                        "max_error_share": 1, "breaker_window": 1}}, env={})
    assert (cfg.prompt.system_role, cfg.run.parse_retry, cfg.run.max_error_share) == (
        "user", "off", 1.0)


def test_the_probes_record_in_a_stored_config_is_not_a_setting() -> None:
    stored = build_config({}, env={}).to_dict()
    stored["model"]["response_format_used"] = "json_object"
    assert config_from_dict(stored).model.response_format == "auto"
    with pytest.raises(ConfigError, match="response_format_used"):
        build_config(stored, env={})


def test_issue_15_keys_are_answer_or_session_keys() -> None:
    from asyncrunner.settings import Kind, kind

    for key in ("model.response_format", "prompt.system_role", "run.parse_retry"):
        assert kind(key) is Kind.ANSWER
    for key in ("run.max_error_share", "run.breaker_window", "model.max_response_bytes"):
        assert kind(key) is Kind.SESSION


def test_a_list_key_names_its_type_in_the_message() -> None:
    with pytest.raises(ConfigError, match=r"'data\.placeholders' must be a list of text, got str"):
        build_config({"data": {"placeholders": "N/A"}}, env={})
