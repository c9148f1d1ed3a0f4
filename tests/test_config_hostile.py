"""Hostile configuration values: every one is refused with one line that names the key.

Non-finite and absurd numbers, numbers of the wrong kind, URLs the client cannot use,
values YAML itself cannot build, misspelled ASYNCRUNNER_* variables; and through the real
CLI: exit 2, one line on stderr, never a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, cli_env, run_cli, write_config, write_fixture_csv

from asyncrunner.config import (
    NUMERIC_RANGES,
    OTHER_ENV_VARIABLES,
    SECTIONS,
    _numeric_fields,
    _type_name,
    build_config,
    config_from_dict,
    known_env_variables,
    load_config,
    unknown_env_variables,
)
from asyncrunner.errors import ConfigError
from asyncrunner.llm.client import normalize_api_url, redact_url

NUMERIC_KEYS = sorted(NUMERIC_RANGES)
FLOAT_KEYS = sorted(f"{s}.{f}" for s, cls in SECTIONS.items()
                    for f, tp in ((x.name, x.type) for x in dataclasses.fields(cls))
                    if "float" in str(tp))


def refused(raw: dict[str, Any], key: str, *, env: dict[str, str] | None = None) -> str:
    """The ConfigError message for `raw`; it must name `key` and be one line."""
    with pytest.raises(ConfigError) as info:
        build_config(raw, env=env or {})
    message = str(info.value)
    assert key in message, message
    assert "\n" not in message and "\r" not in message, message
    return message


def nested(key: str, value: Any) -> dict[str, Any]:
    section, name = key.split(".")
    return {section: {name: value}}


def test_every_number_key_has_bounds() -> None:
    found = {f"{s}.{f}" for s, cls in SECTIONS.items() for f, _ in _numeric_fields(cls)}
    assert found == set(NUMERIC_RANGES)
    assert {"model.temperature", "model.timeout_s", "run.retry_backoff_s",
            "run.commit_interval_s", "run.grace_period_s", "run.max_error_share",
            "run.requests_per_minute", "run.tokens_per_minute"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", ".NaN", "1.0e+400", "-1.0e+400",
                                  "1e400"])
@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_non_finite_numbers_are_refused(tmp_path: Path, key: str, text: str) -> None:
    section, name = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {name}: {text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, require_data=False)
    message = str(info.value)
    assert f"'{key}'" in message and "\n" not in message
    if key in FLOAT_KEYS:
        assert re.search(r"must be (between|more than) \S+ and (at most )?\S+", message), message
    else:
        assert "must be a whole number" in message, message


@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_huge_integers_are_refused_with_the_bounds(key: str) -> None:
    for value in (10**400, -(10**400), 10**5000):
        message = refused(nested(key, value), key)
        assert "must be" in message and len(message) < 300, message


@pytest.mark.parametrize(
    ("key", "value", "bounds"),
    [
        ("model.timeout_s", 86_401, "more than 0 and at most 86400"),
        ("model.timeout_s", 0, "more than 0 and at most 86400"),
        ("run.commit_interval_s", 3_601, "more than 0 and at most 3600"),
        ("run.grace_period_s", 3_601, "between 0 and 3600"),
        ("run.grace_period_s", -1, "between 0 and 3600"),
        ("run.retry_backoff_s", 3_601, "between 0 and 3600"),
        ("model.max_tokens", 1_000_001, "between 1 and 1000000"),
        ("run.batch_size", 100_001, "between 1 and 100000"),
        ("run.max_attempts", 101, "between 1 and 100"),
        ("run.workers", 1025, "between 1 and 1024"),
        ("model.temperature", 2.5, "between 0 and 2"),
        ("run.max_error_share", 1.01, "between 0 and 1"),
        ("run.requests_per_minute", 0, "more than 0"),
        ("run.tokens_per_minute", -5, "more than 0"),
        ("run.max_narratives", 0, "between 1 and"),
        ("run.seed", 2**63, "between -9223372036854775808 and 9223372036854775807"),
        ("model.max_response_bytes", 2**31, "between 1024 and"),
        ("model.price_per_1k_input", -0.01, "between 0 and 1000"),
    ],
)
def test_out_of_range_numbers_state_the_bounds(key: str, value: float, bounds: str) -> None:
    assert bounds in refused(nested(key, value), key)


def test_bounds_themselves_are_accepted() -> None:
    cfg = build_config({"model": {"timeout_s": 86_400, "max_tokens": 1_000_000},
                        "run": {"commit_interval_s": 3_600, "grace_period_s": 0,
                                "batch_size": 100_000, "max_attempts": 100,
                                "retry_backoff_s": 0, "seed": -1,
                                "requests_per_minute": 0.5}}, env={})
    assert (cfg.model.timeout_s, cfg.run.seed, cfg.run.requests_per_minute) == (86_400, -1, 0.5)


@pytest.mark.parametrize(
    ("raw", "key", "expected"),
    [
        ({"run": {"workers": 8.5}}, "run.workers", "must be a whole number, got float 8.5"),
        ({"run": {"workers": 8.0}}, "run.workers", "must be a whole number, got float 8.0"),
        ({"run": {"workers": True}}, "run.workers", "must be a whole number, got bool"),
        ({"run": {"batch_size": "100"}}, "run.batch_size", "must be a whole number, got str"),
        ({"run": {"max_narratives": 1.5}}, "run.max_narratives", "must be a whole number"),
        ({"model": {"timeout_s": "slow"}}, "model.timeout_s", "must be a number, got str"),
        ({"model": {"temperature": False}}, "model.temperature", "must be a number, got bool"),
        ({"run": {"requests_per_minute": [1]}}, "run.requests_per_minute",
         "must be a number, got list"),
        ({"experiment": {"name": ["a"]}}, "experiment.name", "must be text, got list"),
        ({"model": {"name": True}}, "model.name", "must be text, got bool"),
        ({"model": {"provider": None}}, "model.provider", "must be text, not empty"),
        ({"run": {"workers": None}}, "run.workers", "must be a whole number, not empty"),
        ({"data": {"placeholders": "N/A"}}, "data.placeholders", "must be a list of text"),
        ({"data": {"narratives": "NarrativeLE"}}, "data.narratives", "must be a mapping"),
        ({"model": {"extra_body": [1]}}, "model.extra_body", "must be a mapping"),
    ],
)
def test_type_names_match_the_keys_type(raw: dict[str, Any], key: str, expected: str) -> None:
    assert expected in refused(raw, key)


def test_type_names() -> None:
    # No section has a bool field yet; the name must still read well when one comes.
    assert _type_name(bool) == "true or false"
    assert _type_name(int | None) == "a whole number"
    assert _type_name(float | None) == "a number"
    assert _type_name(list[str]) == "a list of text"
    assert _type_name(dict[str, str] | None) == "a mapping"


def test_exponent_numbers_yaml_reads_as_text_are_numbers() -> None:
    assert build_config({"model": {"timeout_s": "1e3"}}, env={}).model.timeout_s == 1000.0
    assert build_config({}, env={"ASYNCRUNNER_RUN_RETRY_BACKOFF_S": "5e-1"}
                        ).run.retry_backoff_s == 0.5


DEEP: list[Any] = [1]
for _ in range(40):
    DEEP = [DEEP]

BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"model": {"extra_body": {"top_p": math.nan}}}, "model.extra_body.top_p"),
    ({"model": {"extra_body": {"stop": [math.inf]}}}, "model.extra_body.stop[0]"),
    ({"model": {"extra_body": {"seed": 10**30}}}, "model.extra_body.seed"),
    ({"model": {"extra_body": {"when": yaml.safe_load("2024-01-01")}}},
     "model.extra_body.when"),
    ({"model": {"extra_body": {1: "x"}}}, "model.extra_body"),
    ({"model": {"extra_body": {"a": DEEP}}}, "model.extra_body.a"),
    ({"model": {"api_key_env": "sk-live-123456"}}, "model.api_key_env"),
    ({"model": {"api_key_env": "MY KEY"}}, "model.api_key_env"),
    ({"data": {"file": "cases\n.csv"}}, "data.file"),
    ({"run": {"log_dir": "logs\r"}}, "run.log_dir"),
    ({"run": {"output_dir": "out\x00"}}, "run.output_dir"),
    ({"data": {"id_column": "Incident\x00ID"}}, "data.id_column"),
    ({"data": {"narratives": {"LE": "Narr\x00LE"}, "flags": {}}}, "data.narratives.LE"),
    ({"data": {"placeholders": ["N/A", "x\x00"]}}, "data.placeholders[1]"),
    ({"data": {"narratives": {"LE": 1.5}}}, "data.narratives.LE"),
    ({"data": {"narratives": {"LE\nX": 1.5}}}, "data.narratives.LE\\nX"),
    ({"data": {"flags": {"XX\x1b[2J": "F"}}}, "data.flags.XX\\x1b[2J"),
    ({"data": {"placeholders": [10**5000]}}, "data.placeholders[0]"),
    ({"run": {"wrokers\n": 3}}, "run.wrokers\\n"),
    ({"run": {1: 2, "a": 3}}, "run.1"),
    ({1: {}, "x": {}}, "config section '1'"),
    ({"run\x1b": {}}, "config section 'run\\x1b'"),
    ({"run": [1, 2]}, "config section 'run'"),
]


@pytest.mark.parametrize(("raw", "key"), BAD_VALUES, ids=[k for _, k in BAD_VALUES])
def test_bad_values_are_one_line_naming_the_key(raw: dict[str, Any], key: str) -> None:
    refused(raw, key)


# --------------------------------------------------------------------------- api_url

@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("http://h/v1?api-version=2024-02-01",
         "http://h/v1/chat/completions?api-version=2024-02-01"),
        ("http://h/v1/?api-version=2024-02-01",
         "http://h/v1/chat/completions?api-version=2024-02-01"),
        ("https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=1",
         "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=1"),
        ("http://h/v1?", "http://h/v1/chat/completions"),
        ("http://localhost:1234/v1", "http://localhost:1234/v1/chat/completions"),
        ("http://[::1]:8080/v1/", "http://[::1]:8080/v1/chat/completions"),
        ("HTTPS://h/v1/chat/completions", "HTTPS://h/v1/chat/completions"),
    ],
)
def test_a_query_string_is_kept_behind_the_chat_path(given: str, sent: str) -> None:
    cfg = build_config({"model": {"api_url": given}}, env={})
    assert normalize_api_url(cfg.model.api_url) == sent  # what the client posts to
    assert "?" not in redact_url(normalize_api_url(cfg.model.api_url))  # stored, logged
    assert config_from_dict(cfg.to_dict()).model.api_url == cfg.model.api_url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://user:SECRET@h/v1#frag", "#fragment"),
        ("http://h/v1#", "#fragment"),
        ("ftp://h/v1", "http:// or https://"),
        ("localhost:1234/v1", "http:// or https://"),
        ("/v1/chat/completions", "http:// or https://"),
        ("http:///v1", "host"),
        ("http://:80/v1", "host"),
        ("http://a<b/v1", "host"),
        ("http://h:99999/v1", "port"),
        ("http://h:0/v1", "port"),
        ("http://h:x/v1", "port"),
        ("http://[::1/v1", "valid URL"),
        ("http://xn--/v1", "valid URL"),
        ("http://h/v 1?key=SECRET", "spaces"),
        ("http://h/v1\n", "control"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_unusable_urls_are_refused_without_echoing_them(url: str, why: str) -> None:
    message = refused({"model": {"api_url": url}}, "model.api_url")
    assert why in message, message
    assert "SECRET" not in message and (not url.strip() or url not in message)


def test_an_url_from_the_environment_is_checked_too() -> None:
    env = {"ASYNCRUNNER_MODEL_API_URL": "http://gpu:1234/v1?api-version=1"}
    assert build_config({}, env=env).model.api_url == "http://gpu:1234/v1/chat/completions?api-version=1"
    refused({}, "model.api_url", env={"ASYNCRUNNER_MODEL_API_URL": "gpu:1234/v1"})


# --------------------------------------------------------------------------- environment

@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"ASYNCRUNNER_RUN_WORKERS": "8.5"}, "ASYNCRUNNER_RUN_WORKERS"),
        ({"ASYNCRUNNER_RUN_WORKERS": "auto"}, "ASYNCRUNNER_RUN_WORKERS"),
        ({"ASYNCRUNNER_RUN_WORKERS": "[" * 500}, "ASYNCRUNNER_RUN_WORKERS"),
        ({"ASYNCRUNNER_MODEL_TIMEOUT_S": ".inf"}, "model.timeout_s"),
        ({"ASYNCRUNNER_MODEL_TIMEOUT_S": ".nan"}, "model.timeout_s"),
        ({"ASYNCRUNNER_MODEL_TEMPERATURE": "1e400"}, "model.temperature"),
        ({"ASYNCRUNNER_DATA_PLACEHOLDERS": "{a: 1}"}, "ASYNCRUNNER_DATA_PLACEHOLDERS"),
    ],
)
def test_bad_environment_values_name_the_variable_or_key(env: dict[str, str], key: str) -> None:
    refused({}, key, env=env)


def test_text_keys_from_the_environment_keep_the_text() -> None:
    env = {"ASYNCRUNNER_EXPERIMENT_NAME": "yes", "ASYNCRUNNER_PROMPT_VERSION": "2024-13-45",
           "ASYNCRUNNER_DATA_SHEET": "1.10", "ASYNCRUNNER_DATA_CASE_FLAG": "null",
           "ASYNCRUNNER_DATA_PLACEHOLDERS": "[n/a, '-']"}
    cfg = build_config({}, env=env)
    assert (cfg.experiment.name, cfg.prompt.version, cfg.data.sheet) == (
        "yes", "2024-13-45", "1.10")
    assert cfg.data.case_flag is None           # null still means empty, as in the YAML
    assert cfg.data.placeholders == ["n/a", "-"]


def test_misspelled_variables_get_a_suggestion_and_never_their_value() -> None:
    env = {"ASYNCRUNNER_RUN_WORKRS": "SECRET-VALUE-1", "ASYNCRUNNER_WORKERS": "SECRET-VALUE-2",
           "ASYNCRUNNER_MODEL_APIURL": "SECRET-VALUE-3", "asyncrunner_run_workers": "4",
           "ASYNCRUNNER_NONSENSE_THING": "SECRET-VALUE-4",
           "ASYNCRUNNER_RUN_WORKERS": "4", "ASYNCRUNNER_FILE_MODE": "umask",
           "ASYNCRUNNER_VENV": ".venv", "PATH": "/bin", "ASYNCRUNNERX": "1"}
    lines = unknown_env_variables(env)
    assert lines == [
        "unknown environment variable ASYNCRUNNER_MODEL_APIURL is ignored; "
        "did you mean ASYNCRUNNER_MODEL_API_URL?",
        "unknown environment variable ASYNCRUNNER_NONSENSE_THING is ignored (settings are "
        "ASYNCRUNNER_<SECTION>_<KEY>, e.g. ASYNCRUNNER_RUN_WORKERS)",
        "unknown environment variable ASYNCRUNNER_RUN_WORKRS is ignored; "
        "did you mean ASYNCRUNNER_RUN_WORKERS?",
        "unknown environment variable ASYNCRUNNER_WORKERS is ignored; "
        "did you mean ASYNCRUNNER_RUN_WORKERS?",
        "unknown environment variable asyncrunner_run_workers is ignored; "
        "did you mean ASYNCRUNNER_RUN_WORKERS? (names are case-sensitive)",
    ]
    assert "SECRET" not in "\n".join(lines)


def test_a_key_variable_named_by_the_config_is_not_unknown() -> None:
    env = {"ASYNCRUNNER_TEST_KEY": "k"}
    assert len(unknown_env_variables(env)) == 1
    assert unknown_env_variables(env, known=["ASYNCRUNNER_TEST_KEY"]) == []


def test_a_name_with_a_line_break_is_shown_on_one_line() -> None:
    (line,) = unknown_env_variables({"ASYNCRUNNER_RUN\nWORKERS": "1"})
    assert "\n" not in line and "ASYNCRUNNER_RUN\\nWORKERS" in line


def test_every_variable_the_code_reads_is_known() -> None:
    known = known_env_variables()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"ASYNCRUNNER_{section}_{f.name}".upper() in known
    assert set(OTHER_ENV_VARIABLES) <= known
    # A variable added to the package or bin/ must be added to config.OTHER_ENV_VARIABLES.
    sources = [*(ROOT / "asyncrunner").rglob("*.py"), *(ROOT / "bin").iterdir(),
               ROOT / "README.md"]
    named = {m for path in sources if path.is_file()
             for m in re.findall(r"ASYNCRUNNER_[A-Z][A-Z0-9_]*",
                                 path.read_text(encoding="utf-8", errors="replace"))}
    assert named and named <= known, named - known


# --------------------------------------------------------------------------- YAML files

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prompt:\n  version: 2024-13-45\n", "YAML cannot read"),
        ("experiment: {name: 2024-02-30}\n", "YAML cannot read"),
        ("run: " + "[" * 3000 + "]" * 3000 + "\n", "config file"),
        ("run: {seed: 0x_}\n", "YAML cannot read"),  # PyYAML: int("", 16)
        ("data: {sheet: 2001-02-29}\n", "YAML cannot read"),
        ("run:\n  ? [a, b]\n  : 1\n", "not valid YAML"),
        ("- a\n- b\n", "mapping of sections"),
        ("run: {workers: 8.5}\n", "must be a whole number"),
        ("model: {timeout_s: .inf}\n", "model.timeout_s"),
        ("\ufeffrun: {workers: 0}\n", "run.workers"),
    ],
)
def test_yaml_files_that_cannot_be_used(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, require_data=False)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_home_folder_that_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"file": "~no-such-user-xyz/cases.csv"}}))
    with pytest.raises(ConfigError, match=r"data\.file"):
        load_config(path, env={})


# --------------------------------------------------------------------------- the CLI

CLI_CASES: dict[str, tuple[dict[str, Any], dict[str, str], str]] = {
    # name: (model/run keys to set, environment, text stderr must hold)
    "timeout inf": ({"model": {"timeout_s": math.inf}}, {}, "model.timeout_s"),
    "temperature nan": ({"model": {"temperature": math.nan}}, {}, "model.temperature"),
    "workers 8.5": ({"run": {"workers": 8.5}}, {}, "run.workers"),
    "workers huge": ({"run": {"workers": 10**400}}, {}, "run.workers"),
    "url fragment": ({"model": {"api_url": "http://127.0.0.1:9/v1#x"}}, {}, "model.api_url"),
    "url no scheme": ({"model": {"api_url": "127.0.0.1:9/v1"}}, {}, "model.api_url"),
    "env workers": ({}, {"ASYNCRUNNER_RUN_WORKERS": "8.5"}, "ASYNCRUNNER_RUN_WORKERS"),
    "env backoff inf": ({}, {"ASYNCRUNNER_RUN_RETRY_BACKOFF_S": ".inf"}, "run.retry_backoff_s"),
    "extra_body nan": ({"model": {"extra_body": {"top_p": math.nan}}}, {},
                       "model.extra_body.top_p"),
}


@pytest.mark.parametrize("case", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_the_cli_refuses_with_exit_2_and_one_line(
        tmp_path: Path, case: tuple[dict[str, Any], dict[str, str], str]) -> None:
    changes, env, expected = case
    data = write_fixture_csv(tmp_path / "cases.csv")
    path = write_config(tmp_path, data, "http://127.0.0.1:9/v1")
    raw = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw))
    proc = run_cli("run", str(path), "--db", str(tmp_path / "x.db"), env=cli_env(**env))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert expected in proc.stderr and "experiment_id" not in proc.stdout


def test_the_cli_refuses_a_yaml_date_it_cannot_build(tmp_path: Path) -> None:
    data = write_fixture_csv(tmp_path / "cases.csv")
    path = write_config(tmp_path, data, "http://127.0.0.1:9/v1")
    path.write_text(path.read_text() + "prompt:\n  version: 2024-13-45\n")
    proc = run_cli("run", str(path), "--db", str(tmp_path / "x.db"), env=cli_env())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "YAML cannot read" in proc.stderr


# The keys #12 and #13 added that are not plain numbers: each refused in one line naming it.
NEW_KEY_CASES = [
    ({"model": {"price_per_mtok": {"input": -1}}}, "model.price_per_mtok.input"),
    ({"model": {"price_per_mtok": {"input": ".nan"}}}, "model.price_per_mtok.input"),
    ({"model": {"price_per_mtok": {"in": 1}}}, "model.price_per_mtok.in"),
    ({"model": {"batch_window": "1h"}}, "model.batch_window"),
    ({"model": {"endpoints": []}}, "model.endpoints"),
    ({"model": {"endpoints": [{"api_url": "ftp://h/v1"}]}}, "model.endpoints[0].api_url"),
    ({"model": {"endpoints": [{"api_url": "http://h/v1", "weight": 0}]}},
     "model.endpoints[0].weight"),
    ({"model": {"endpoints": [{"api_url": "http://h/v1", "max_concurrency": 2000}]}},
     "model.endpoints[0].max_concurrency"),
    ({"model": {"endpoints": [{"api_url": "http://h/v1", "colour": 1}]}},
     "model.endpoints[0].colour"),
    ({"model": {"endpoints": [{"api_url": "http://h/v1"}, {"api_url": "http://h/v1"}]}},
     "model.endpoints"),
    ({"run": {"auto_workers": "sometimes"}}, "run.auto_workers"),
]


@pytest.mark.parametrize(("raw", "key"), NEW_KEY_CASES, ids=[k for _, k in NEW_KEY_CASES])
def test_the_new_keys_refuse_bad_values_in_one_line(raw: dict[str, Any], key: str) -> None:
    raw = yaml.safe_load(yaml.safe_dump(raw).replace("'.nan'", ".nan"))
    with pytest.raises(ConfigError) as info:
        build_config(raw, env={})
    assert key in str(info.value) and "\n" not in str(info.value)


def test_a_bad_endpoint_list_through_the_cli_is_one_line(tmp_path: Path) -> None:
    data = write_fixture_csv(tmp_path / "data.csv")
    cfg = write_config(tmp_path, data, "http://127.0.0.1:9/v1",
                       model={"endpoints": [{"api_url": "http://h/v1", "weight": -2}]})
    for args in (("run", str(cfg), "--db", str(tmp_path / "x.db")), ("plan", str(cfg))):
        proc = run_cli(*args, env=cli_env())
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "model.endpoints[0].weight" in lines[0]
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.db").exists()
