"""Agent configuration: one frozen dataclass that validates itself, from three sources.

Precedence is flags > ``SPOTGUARD_<KEY>`` environment variables > TOML file > defaults. The file
is flat (every key is a top-level key) so that every key has exactly one environment variable.
Any wrong key or value raises :class:`ConfigError` with a one-line message that names the key
and where it came from; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spotguard.errors import ConfigError
from spotguard.protocol import (
    ALLOWED_SIGNALS,
    ASG_TERMINATION,
    DEFAULT_STATE_DIR,
    NOTICE_GRACE_SECONDS,
    NOTICE_KINDS,
    SCHEDULED_MAINTENANCE,
    SPOT_INTERRUPTION,
    SPOT_NOTICE_SECONDS,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["DEFAULT_CONFIG_PATH", "AgentConfig", "load_config", "redact_url"]

DEFAULT_CONFIG_PATH = Path("/etc/spotguard/agent.toml")
ENV_PREFIX = "SPOTGUARD_"
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Retries back off exponentially up to 120 s apart: ten already wait about six minutes in all,
#: longer than a spot notice lasts, while a count without a bound kept retrying for hours.
MAX_WEBHOOK_RETRIES = 10


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent can be told. ``systemd/agent.toml.example`` documents each key."""

    imds_endpoint: str = "http://169.254.169.254"
    state_dir: Path = DEFAULT_STATE_DIR
    poll_interval: float = 1.0
    request_timeout: float = 1.0
    token_ttl: int = 21600
    max_backoff: float = 5.0
    watch_spot_interruption: bool = True
    watch_rebalance: bool = True
    rebalance_interval: float = 5.0
    watch_scheduled_maintenance: bool = True
    maintenance_interval: float = 60.0
    maintenance_lead: float = 900.0
    watch_asg_termination: bool = True
    asg_interval: float = 5.0
    target_patterns: tuple[str, ...] = ()
    target_units: tuple[str, ...] = ()
    target_signal: str = "SIGUSR1"
    #: How long a signalled target is watched when its notice has no deadline (an ASG
    #: termination): by default as long as a spot notice lasts.
    target_watch_timeout: float = SPOT_NOTICE_SECONDS
    hook_command: tuple[str, ...] = ()
    hook_kinds: tuple[str, ...] = (SPOT_INTERRUPTION, ASG_TERMINATION, SCHEDULED_MAINTENANCE)
    hook_timeout: float = 30.0
    webhook_url: str = field(default="", repr=False)
    webhook_kinds: tuple[str, ...] = NOTICE_KINDS
    webhook_timeout: float = 5.0
    webhook_retries: int = 3
    log_format: str = "plain"
    log_level: str = "info"
    metrics_address: str = "127.0.0.1:9464"
    health_max_age: float = 30.0
    notice_grace: float = NOTICE_GRACE_SECONDS

    def __post_init__(self) -> None:
        _check_url("imds_endpoint", self.imds_endpoint, required=True)
        _check_url("webhook_url", self.webhook_url, required=False)
        for name in (
            "notice_grace",
            "poll_interval",
            "request_timeout",
            "max_backoff",
            "rebalance_interval",
            "maintenance_interval",
            "asg_interval",
            "target_watch_timeout",
            "hook_timeout",
            "webhook_timeout",
            "health_max_age",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        if self.poll_interval < 0.05:
            raise ConfigError(f"poll_interval: must be >= 0.05 s, got {self.poll_interval!r}")
        if self.maintenance_lead < 0:
            raise ConfigError(f"maintenance_lead: must be >= 0, got {self.maintenance_lead!r}")
        if not 1 <= self.token_ttl <= 21600:
            raise ConfigError(f"token_ttl: must be 1..21600 seconds, got {self.token_ttl!r}")
        if self.max_backoff < self.poll_interval:
            raise ConfigError(
                f"max_backoff: must be >= poll_interval ({self.poll_interval}), "
                f"got {self.max_backoff!r}"
            )
        if not 0 <= self.webhook_retries <= MAX_WEBHOOK_RETRIES:
            raise ConfigError(
                f"webhook_retries: must be 0..{MAX_WEBHOOK_RETRIES}, got {self.webhook_retries!r}"
            )
        if any("\x00" in part for part in self.hook_command):
            raise ConfigError("hook_command: a NUL character cannot be passed to a program")
        if self.target_signal not in ALLOWED_SIGNALS:
            raise ConfigError(
                f"target_signal: must be one of {sorted(ALLOWED_SIGNALS)}, "
                f"got {self.target_signal!r}"
            )
        for name in ("hook_kinds", "webhook_kinds"):
            unknown = [kind for kind in getattr(self, name) if kind not in NOTICE_KINDS]
            if unknown:
                raise ConfigError(f"{name}: unknown notice kind(s) {unknown}; use {NOTICE_KINDS}")
        for pattern in self.target_patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"target_patterns: bad regex {pattern!r}: {exc}") from None
        if self.log_format not in ("plain", "json"):
            raise ConfigError(f"log_format: must be 'plain' or 'json', got {self.log_format!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level: must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.metrics_address:
            self.metrics_bind()

    def metrics_bind(self) -> tuple[str, int]:
        """``metrics_address`` as (host, port); only loopback addresses are accepted."""
        host, sep, port_text = self.metrics_address.rpartition(":")
        host = host.strip("[]")
        try:
            port = int(port_text)
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback, port = False, -1
        if not sep or not loopback or not 0 <= port <= 65535:
            raise ConfigError(
                "metrics_address: must be a loopback HOST:PORT such as 127.0.0.1:9464 "
                f"(or empty to disable), got {self.metrics_address!r}"
            )
        return host, port


_FIELDS = {f.name: f for f in dataclasses.fields(AgentConfig)}


def _check_url(name: str, value: str, *, required: bool) -> None:
    if not value and not required:
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: must be an http(s) URL, got {redact_url(value)!r}")


def redact_url(url: str) -> str:
    """Scheme and host only: webhook URLs often carry a secret in the path or query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}/..." if parts.hostname else "<unparseable>"


def _coerce(name: str, value: Any, origin: str) -> Any:
    """Turn a TOML, environment or flag value into the field's type, or say why not."""
    kind = _FIELDS[name].type
    from_text = isinstance(value, str) and origin != "file"
    try:
        if kind == "bool":
            if from_text:
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError("expected true or false")
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"expected a number, got {type(value).__name__}")
            if isinstance(value, str) and not from_text:
                raise ValueError("expected a number, got a string")
            number = float(value)
            if kind == "int":
                if number != int(number):
                    raise ValueError("expected a whole number")
                return int(number)
            return number
        if kind == "Path":
            if not isinstance(value, str) or not value:
                raise ValueError("expected a non-empty path")
            return Path(value)
        if kind == "tuple[str, ...]":
            if from_text:
                text = value.strip()
                if name == "hook_command":
                    value = shlex.split(text)
                elif text.startswith("["):
                    value = json.loads(text)
                else:
                    value = [item.strip() for item in text.split(",") if item.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("expected a list of strings")
            return tuple(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return value
    except ValueError as exc:
        shown = redact_url(value) if name == "webhook_url" and isinstance(value, str) else value
        raise ConfigError(f"{name} (from {origin}): {exc}, got {shown!r}") from None


def _read_file(path: Path, explicit: bool) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the configuration from file, environment and flags (in rising precedence).

    ``path=None`` means the default location, where a missing file simply means defaults;
    a path given explicitly must exist.
    """
    values: dict[str, Any] = {}
    config_path = path or DEFAULT_CONFIG_PATH
    for key, value in _read_file(config_path, explicit=path is not None).items():
        if key not in _FIELDS:
            raise ConfigError(f"config file {config_path}: unknown key {key!r}")
        values[key] = _coerce(key, value, "file")
    env = environ if environ is not None else {}
    for name in _FIELDS:
        variable = ENV_PREFIX + name.upper()
        if variable in env:
            values[name] = _coerce(name, env[variable], variable)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, "--" + name.replace("_", "-"))
    return AgentConfig(**values)
