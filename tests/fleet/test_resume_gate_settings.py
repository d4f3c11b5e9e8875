"""The restart gate's one setting: a bad ``interval`` is a ConfigError from the gate itself, and
the command line passes it on (one line, exit 2) instead of checking it a second time."""

from __future__ import annotations

import pytest

from spotguard.cli import main
from spotguard.errors import ConfigError
from spotguard.fleet.resume_gate import wait_until_clear


@pytest.mark.parametrize("interval", [0, -1.0])
def test_an_interval_that_is_not_positive_is_a_config_error(tmp_path, interval):
    with pytest.raises(ConfigError, match=r"interval \(--interval\): must be > 0"):
        wait_until_clear(tmp_path, interval=interval, sleep=lambda _: None)


def test_the_command_line_reports_it_in_one_line_with_exit_2(tmp_path, capsys):
    code = main(["fleet", "wait-clear", "--state-dir", str(tmp_path), "--interval", "0"])
    assert code == 2
    assert capsys.readouterr().err == (
        "spotguard fleet wait-clear: interval (--interval): must be > 0 seconds, got 0.0\n"
    )
