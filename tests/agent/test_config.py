"""Configuration: precedence, validation, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spotguard.agent.config import AgentConfig, load_config
from spotguard.errors import ConfigError
from spotguard.protocol import (
    DEFAULT_STATE_DIR,
    NOTICE_GRACE_SECONDS,
    NOTICE_KINDS,
    SIGNALLING_KINDS,
    SPOT_NOTICE_SECONDS,
    STATE_DIR_ENV,
)

EXAMPLE = Path(__file__).parents[2] / "systemd" / "agent.toml.example"


def test_missing_default_file_means_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr("spotguard.agent.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert load_config(environ={}) == AgentConfig()


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", environ={})


def test_flags_beat_env_beat_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('poll_interval = 3.0\nrequest_timeout = 2.0\nstate_dir = "/from/file"\n')
    env = {"SPOTGUARD_POLL_INTERVAL": "2", "SPOTGUARD_STATE_DIR": "/from/env"}
    config = load_config(path, environ=env, overrides={"poll_interval": 0.5, "state_dir": None})
    assert config.poll_interval == 0.5
    assert config.state_dir == Path("/from/env")
    assert config.request_timeout == 2.0


def test_env_values_are_parsed_by_type():
    env = {
        "SPOTGUARD_WATCH_REBALANCE": "off",
        "SPOTGUARD_TOKEN_TTL": "300",
        "SPOTGUARD_TARGET_PATTERNS": '["train\\\\.py", "a,b"]',
        "SPOTGUARD_TARGET_UNITS": "a.service, b@*.service",
        "SPOTGUARD_HOOK_COMMAND": "/usr/bin/notify --flag 'two words'",
    }
    config = load_config(Path("/dev/null"), environ=env)
    assert config.watch_rebalance is False
    assert config.token_ttl == 300
    assert config.target_patterns == ("train\\.py", "a,b")
    assert config.target_units == ("a.service", "b@*.service")
    assert config.hook_command == ("/usr/bin/notify", "--flag", "two words")


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("pol_interval = 1", "pol_interval"),
        ("poll_interval = 0", "poll_interval"),
        ('poll_interval = "fast"', "poll_interval"),
        ("token_ttl = 21601", "token_ttl"),
        ("token_ttl = 1.5", "token_ttl"),
        ("watch_rebalance = 1", "watch_rebalance"),
        ('target_signal = "SIGKILL"', "target_signal"),
        ('target_patterns = ["(unclosed"]', "target_patterns"),
        ('hook_kinds = ["spot"]', "hook_kinds"),
        ('metrics_address = "0.0.0.0:9464"', "metrics_address"),
        ('imds_endpoint = "ftp://x"', "imds_endpoint"),
        ('log_format = "xml"', "log_format"),
        ("max_backoff = 0.5", "max_backoff"),
        ("webhook_retries = 11", "webhook_retries"),
        ("webhook_retries = 1000000", "webhook_retries"),
        ("webhook_retries = -1", "webhook_retries"),
        ('hook_command = ["/bin/echo", "a\\u0000b"]', "hook_command"),
        ("poll_interval = [", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path, toml, named):
    path = tmp_path / "agent.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=named) as caught:
        load_config(path, environ={})
    assert "\n" not in str(caught.value)


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="SPOTGUARD_POLL_INTERVAL"):
        load_config(Path("/dev/null"), environ={"SPOTGUARD_POLL_INTERVAL": "soon"})


def test_webhook_secret_never_appears_in_errors():
    with pytest.raises(ConfigError) as caught:
        load_config(Path("/dev/null"), environ={"SPOTGUARD_WEBHOOK_URL": "gopher://h/T0SECRET"})
    assert "T0SECRET" not in str(caught.value)
    assert "T0SECRET" not in repr(AgentConfig(webhook_url="https://h/T0SECRET"))


def test_defaults_are_the_protocols_numbers_and_names():
    """The agent and the trainer hooks agree on these: one definition, in the protocol."""
    config = AgentConfig()
    assert config.state_dir == DEFAULT_STATE_DIR
    assert config.notice_grace == NOTICE_GRACE_SECONDS
    assert config.target_watch_timeout == SPOT_NOTICE_SECONDS
    assert config.hook_kinds == tuple(kind for kind in NOTICE_KINDS if kind in SIGNALLING_KINDS)
    assert config.webhook_kinds == NOTICE_KINDS
    # The state dir's environment variable is the one the trainer hooks read.
    assert load_config(Path("/dev/null"), environ={STATE_DIR_ENV: "/x"}).state_dir == Path("/x")


def test_example_config_documents_every_key_and_loads():
    text = EXAMPLE.read_text()
    for name in AgentConfig.__dataclass_fields__:
        assert f"# {name} =" in text or f"\n{name} =" in text, f"{name} is not documented"
    assert load_config(EXAMPLE, environ={}) == AgentConfig()


def test_metrics_address_accepts_loopback_only():
    assert AgentConfig(metrics_address="[::1]:9000").metrics_bind() == ("::1", 9000)
    assert AgentConfig(metrics_address="").metrics_address == ""
    with pytest.raises(ConfigError):
        AgentConfig(metrics_address="10.0.0.1:9000")


def test_webhook_retries_bound_is_a_one_line_usage_error(tmp_path):
    """Through the real CLI: exit code 2 and one line naming the key."""
    path = tmp_path / "agent.toml"
    path.write_text("webhook_retries = 1000\n")
    result = subprocess.run(
        [sys.executable, "-m", "spotguard", "agent", "--config", str(path),
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("SPOTGUARD_")},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "webhook_retries" in lines[0]
    assert "0..10" in lines[0]
    assert AgentConfig(webhook_retries=10).webhook_retries == 10
