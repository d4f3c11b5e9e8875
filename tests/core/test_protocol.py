"""The agent/trainer files: atomic, validated, round-trippable."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from spotguard.errors import ProtocolError
from spotguard.protocol import (
    ExitRecord,
    Notice,
    Registration,
    read_exit_record,
    read_notice,
    read_registrations,
    register,
    state_dir_from_env,
    unregister,
    write_exit_record,
    write_notice,
)

NOW = datetime(2026, 11, 29, 8, 20, 1, 234000, tzinfo=timezone.utc)


def test_notice_file_matches_the_design_format(tmp_path):
    notice = Notice("spot-interruption", "terminate", NOW.replace(minute=22, second=0,
                    microsecond=0), NOW, key="2026-11-29T08:22:00.000Z")  # fmt: skip
    path = write_notice(tmp_path, notice)
    assert json.loads(path.read_text()) == {
        "version": 1,
        "id": "spot-interruption/2026-11-29T08:22:00.000Z",
        "kind": "spot-interruption",
        "action": "terminate",
        "deadline": "2026-11-29T08:22:00.000Z",
        "noticed_at": "2026-11-29T08:20:01.234Z",
        "source": "imds",
    }
    assert read_notice(tmp_path) == notice
    assert list(tmp_path.glob(".*tmp")) == []  # no temp file left behind


def test_missing_and_garbage_notice(tmp_path):
    assert read_notice(tmp_path) is None
    (tmp_path / "notice.json").write_text('{"kind": "spot-interruption"}')
    with pytest.raises(ProtocolError):
        read_notice(tmp_path)
    (tmp_path / "notice.json").write_text("[1]")
    with pytest.raises(ProtocolError):
        read_notice(tmp_path)


def test_unknown_notice_kind_is_refused():
    with pytest.raises(ProtocolError, match="kind"):
        Notice("meteor-strike", "terminate", None, NOW, key="x")


def test_registrations_round_trip_and_bad_files_are_reported(tmp_path):
    register(tmp_path, Registration(pid=4321, create_time=12.5, signal="SIGTERM", rank=1))
    (tmp_path / "targets" / "99.json").write_text('{"pid": 98, "create_time": 1}')
    (tmp_path / "targets" / "7.json").write_text("nonsense")
    found, problems = read_registrations(tmp_path)
    assert [r for _, r in found] == [Registration(4321, 12.5, "SIGTERM", 1)]
    assert len(problems) == 2
    unregister(tmp_path, 4321)
    assert read_registrations(tmp_path)[0] == []


@pytest.mark.parametrize(
    "payload",
    [
        {"pid": 1, "create_time": 1},
        {"pid": True, "create_time": 1},
        {"pid": 5, "create_time": 1, "signal": "SIGKILL"},
    ],
)
def test_dangerous_registrations_are_refused(payload):
    with pytest.raises(ProtocolError):
        Registration.from_json(payload)


def test_exit_record_is_tied_to_the_process_start_time(tmp_path):
    write_exit_record(tmp_path, ExitRecord(4321, 100.0, 75, NOW))
    assert read_exit_record(tmp_path, 4321, 100.0).exit_code == 75
    assert read_exit_record(tmp_path, 4321, 200.0) is None  # a recycled PID
    assert read_exit_record(tmp_path, 1234, 100.0) is None


def test_state_dir_from_env():
    assert str(state_dir_from_env({})) == "/run/spotguard"
    assert str(state_dir_from_env({"SPOTGUARD_STATE_DIR": "/x"})) == "/x"
