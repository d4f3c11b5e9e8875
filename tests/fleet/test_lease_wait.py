"""The fleet's lease wait reaches the trainer hooks: ``SPOTGUARD_LEASE_WAIT`` (written by the
user data into the training unit's environment) is the default of ``GuardSettings.lease_wait``,
so a rebalance replacement, launched while the old node still trains for up to the termination
delay, waits for the lease instead of failing with WriterConflict after 180 s."""

from __future__ import annotations

import pytest

from spotguard.errors import ConfigError
from spotguard.protocol import SPOT_NOTICE_SECONDS
from spotguard.trainer_hooks import GuardSettings


def test_without_the_variable_the_default_is_the_notice_plus_one_ttl(monkeypatch):
    monkeypatch.delenv("SPOTGUARD_LEASE_WAIT", raising=False)
    assert GuardSettings("/tmp/x").lease_wait_seconds == SPOT_NOTICE_SECONDS + 60.0


def test_the_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("SPOTGUARD_LEASE_WAIT", "540")
    assert GuardSettings("/tmp/x").lease_wait_seconds == 540.0
    # An explicit keyword still wins.
    assert GuardSettings("/tmp/x", lease_wait=5).lease_wait_seconds == 5.0


def test_an_empty_variable_is_unset(monkeypatch):
    monkeypatch.setenv("SPOTGUARD_LEASE_WAIT", " ")
    assert GuardSettings("/tmp/x", lease_ttl=10).lease_wait_seconds == SPOT_NOTICE_SECONDS + 10


@pytest.mark.parametrize("bad", ["soon", "-1", "nan", "inf"])
def test_a_bad_value_is_a_config_error_naming_the_variable(monkeypatch, bad):
    monkeypatch.setenv("SPOTGUARD_LEASE_WAIT", bad)
    with pytest.raises(ConfigError, match="SPOTGUARD_LEASE_WAIT"):
        GuardSettings("/tmp/x")
