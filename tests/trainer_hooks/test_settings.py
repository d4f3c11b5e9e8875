"""The settings are written once: the front ends' keywords are GuardSettings' fields, and every
bad value is a ConfigError that names the setting."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from spotguard.errors import ConfigError
from spotguard.trainer_hooks import GuardSettings, SpotGuard, TransferSettings
from spotguard.trainer_hooks.lightning import SpotCheckpoint
from spotguard.trainer_hooks.settings import CommonOptions, GuardOptions

#: Lightning's names for GuardSettings' cadence fields (as ModelCheckpoint names them).
LIGHTNING_NAMES = {"every_n_train_steps": "every_n_steps", "every_n_seconds": "every_seconds"}


def fields() -> set[str]:
    return {item.name for item in dataclasses.fields(GuardSettings)} - {"uri"}


def test_the_keyword_types_list_exactly_the_settings_fields():
    assert set(GuardOptions.__annotations__) == fields()
    assert set(CommonOptions.__annotations__) == fields() - set(LIGHTNING_NAMES.values())


def test_lightning_names_its_cadence_its_own_way_and_takes_everything_else():
    explicit = set(inspect.signature(SpotCheckpoint.__init__).parameters) - {"self", "uri"}
    assert {LIGHTNING_NAMES.get(name, name) for name in explicit - {"options"}} == set(
        LIGHTNING_NAMES.values()
    )
    spot = SpotCheckpoint("/tmp/x", every_n_train_steps=7, every_n_seconds=3.0, keep_last=2)
    assert spot.settings == GuardSettings(
        uri="/tmp/x", every_n_steps=7, every_seconds=3.0, keep_last=2
    )


def test_both_front_ends_build_the_same_settings(tmp_path):
    guard = SpotGuard(str(tmp_path), every_n_steps=5, safety_margin=2.0, state_dir=tmp_path)
    assert guard._core.settings == GuardSettings(
        uri=str(tmp_path), every_n_steps=5, safety_margin=2.0, state_dir=tmp_path
    )
    assert GuardSettings(uri="x").exit_code == 75


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_seconds": -1.0}, "every_seconds"),
        ({"keep_last": 0}, "keep_last"),
        ({"signals": ("SIGKILL",)}, "signals"),
        ({"exit_code": 0}, "exit_code"),
        ({"default_budget": -1.0}, "default_budget"),
        ({"save_niceness": 20}, "save_niceness"),
        ({"save_niceness": -1}, "save_niceness"),
    ],
)
def test_bad_guard_settings_are_config_errors_naming_the_setting(settings, named):
    with pytest.raises(ConfigError, match=named):
        GuardSettings(uri="x", **settings)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "store URI is empty"),
        ("gs://bucket/x", "store URI 'gs://bucket/x': unsupported scheme 'gs'"),
        ("s3://", "store URI 's3://' names no bucket"),
        ("file://host/x", "store URI 'file://host/x': file:// URIs take no host"),
        ("s3://[bucket/x", "store URI 's3://\\[bucket/x': Invalid IPv6 URL"),
        ("~no-such-user-here/x", "store URI '~no-such-user-here/x': .*home directory"),
        (Path("/tmp/x"), "store URI must be a string, got PosixPath"),
    ],
)
def test_a_uri_no_store_takes_is_a_config_error_when_the_settings_are_made(uri, message):
    """The store's own rule, applied before training starts instead of at the first save."""
    with pytest.raises(ConfigError, match=message):
        GuardSettings(uri=uri)


@pytest.mark.parametrize("uri", ["/tmp/x", "relative/dir", "file:///tmp/x", "s3://bucket"])
def test_every_uri_a_store_takes_is_accepted(uri):
    assert GuardSettings(uri=uri).uri == uri


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"part_size": 2**20}, "part_size"),
        ({"download_part_size": 1}, "download_part_size"),
        ({"threads": 0}, "threads"),
        ({"max_attempts": 99}, "max_attempts"),
    ],
)
def test_bad_transfer_settings_are_config_errors_too(settings, named):
    with pytest.raises(ConfigError, match=named):
        TransferSettings(**settings)
    with pytest.raises(ValueError, match=named):  # a ConfigError is a ValueError
        TransferSettings(**settings)
