"""Settings from the environment: validated at start, errors name the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ensemble_core.settings import SettingsError, load, parse_endpoints


def test_defaults_and_environment() -> None:
    settings = load({"ENSEMBLE_NATS_URL": "nats://h:1", "ENSEMBLE_FETCH_BATCH": "8", "OTHER": "x"})
    assert settings.nats_url == "nats://h:1" and settings.fetch_batch == 8 and settings.log_level == "INFO"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ENSEMBLE_FETCH_BATCH", "zero"),
        ("ENSEMBLE_FETCH_BATCH", "0"),
        ("ENSEMBLE_LOG_LEVEL", "LOUD"),
        ("ENSEMBLE_ACK_WAIT", "-1"),
    ],
)
def test_bad_setting_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"{variable}={value!r}"):
        load({variable: value})


def test_endpoints() -> None:
    assert parse_endpoints("0=127.0.0.1:5, 1=host:6") == {0: "127.0.0.1:5", 1: "host:6"}
    with pytest.raises(SettingsError, match="ENSEMBLE_ENDPOINTS"):
        parse_endpoints("0:127.0.0.1")


def test_service_with_bad_setting_exits_at_once_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ensemble_cli", "decider"],
        env={"ENSEMBLE_FETCH_BATCH": "lots", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "ENSEMBLE_FETCH_BATCH='lots'" in result.stderr
