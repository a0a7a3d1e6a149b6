"""Config loading: the example file is the documentation; errors name key paths."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from gateway.config import (
    ConfigError,
    ProviderSettings,
    Settings,
    load_settings,
    make_settings,
    parse_settings,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "config.example.toml"


def _leaves(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(_leaves(value, key + "."))
        else:
            out[key] = value
    return out


def _toml_leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and name != "aliases":
            out.update(_toml_leaves(value, key + "."))
        else:
            out[key] = value
    return out


def _commented_keys(text: str) -> set[str]:
    """Keys documented as comments (``# key =``), with their section prefix."""
    section, keys = "", set()
    for line in text.splitlines():
        if m := re.match(r"^\[([a-z_.]+)\]", line):
            section = m.group(1) + "."
        elif m := re.match(r"^# \[\[([a-z_.]+)\]\]", line):
            keys.add(m.group(1))
            section = m.group(1) + "."
        elif m := re.match(r"^# ([a-z_]+) =", line):
            keys.add(section + m.group(1))
    return keys


def test_example_matches_model_defaults_key_by_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    written = _toml_leaves(tomllib.loads(text))
    commented = _commented_keys(text)
    defaults = _leaves(Settings())
    loaded = _leaves(load_settings(EXAMPLE))
    for key, default in defaults.items():
        if key in written:
            assert loaded[key] == default, key
        else:
            assert key in commented, f"{key} is not documented"
            assert default in (None, (), {}), f"{key} has a default but is commented out"
    assert set(written) <= set(defaults), set(written) - set(defaults)


def test_every_provider_key_documented_for_each_provider() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = set(_toml_leaves(tomllib.loads(text))) | _commented_keys(text)
    for provider in ("gmail", "outlook", "imap"):
        for name in ProviderSettings.model_fields:
            assert f"providers.{provider}.{name}" in keys


def _issues(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as exc_info:
        parse_settings(data)
    return {issue.key: issue.message for issue in exc_info.value.issues}


def test_unknown_key_named_by_path() -> None:
    assert _issues({"smtp": {"prot": 25}}) == {"smtp.prot": "unknown key"}
    assert "providers.gmail.bogus" in _issues({"providers": {"gmail": {"bogus": 1}}})


def test_wrong_type_and_range_named_by_path() -> None:
    issues = _issues({"smtp": {"port": "x"}, "providers": {"gmail": {"daily_send_limit": 0}}})
    assert issues["smtp.port"].startswith("wrong type")
    assert issues["providers.gmail.daily_send_limit"] == "must be ≥ 1"


def test_missing_required_value_named_by_path() -> None:
    issues = _issues({"webhooks": [{"url": "https://crm.example/h", "events": ["message.synced"]}]})
    assert issues == {"webhooks[0].secret": "required value missing"}


def test_unreadable_tls_file_named_by_path(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("k")
    issues = _issues({"smtp": {"tls_cert": str(tmp_path / "missing.pem"), "tls_key": str(key)}})
    assert list(issues) == ["smtp.tls_cert"]


def test_require_starttls_needs_tls_files() -> None:
    assert list(_issues({"smtp": {"require_starttls": True}})) == ["smtp"]


def test_secret_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MG_TEST_KEY", "s3cret")
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    settings = make_settings(
        security={"token_key": "env:MG_TEST_KEY"},
        relay={"password": f"file:{secret_file}"},
    )
    assert settings.security.token_key is not None
    assert settings.security.token_key.get_secret_value() == "s3cret"
    assert settings.relay.password is not None
    assert settings.relay.password.get_secret_value() == "from-file"
    assert "s3cret" not in repr(settings)


def test_unresolvable_secrets_named_by_path(tmp_path: Path) -> None:
    issues = _issues(
        {
            "security": {"token_key": "env:MG_SURELY_UNSET_VARIABLE"},
            "relay": {"password": f"file:{tmp_path / 'none'}"},
        }
    )
    assert set(issues) == {"security.token_key", "relay.password"}


def test_toml_syntax_error_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\nport = 1\n")
    with pytest.raises(ConfigError):
        load_settings(bad)


def test_settings_are_frozen() -> None:
    settings = make_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.smtp.port = 1  # type: ignore[misc]
