"""The agent/trainer protocol: the notice file and the socket messages, validated."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from spotguard.errors import ProtocolError
from spotguard.protocol import (
    AGENT_OPS,
    CLIENT_OPS,
    MAX_MESSAGE_BYTES,
    NOTICE_KINDS,
    STATE_DIR_ENV,
    Notice,
    decode_message,
    encode_message,
    notice_path,
    read_notice,
    state_dir_from_env,
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
    assert path == notice_path(tmp_path) == tmp_path / "notice.json"
    assert list(tmp_path.glob(".*tmp")) == []  # no temp file left behind


def test_notice_kinds_are_the_designs_most_urgent_first():
    assert NOTICE_KINDS == (
        "spot-interruption",
        "asg-termination",
        "scheduled-maintenance",
        "rebalance-recommendation",
    )


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


def test_socket_messages_round_trip_on_one_line():
    line = encode_message("register", signal="SIGUSR1", rank=3)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    message = decode_message(line, CLIENT_OPS)
    assert message == {"v": 2, "op": "register", "signal": "SIGUSR1", "rank": 3}
    notice = Notice("spot-interruption", "terminate", NOW, NOW, key="k")
    pushed = decode_message(encode_message("notice", **notice.to_json()), AGENT_OPS)
    fields = {key: value for key, value in pushed.items() if key not in ("v", "op")}
    assert Notice.from_json(fields) == notice


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"[" * 3000, "not a JSON message"),  # nesting deep enough for a RecursionError
        (b"x" * (MAX_MESSAGE_BYTES + 1), "exceeds"),
        (b"\xff\xfe", "not a JSON message"),
        (b"[1]", "expected a JSON object"),
        (b'{"v": 1, "op": "register", "signal": "SIGUSR1"}', "version"),
        (b'{"v": 2, "op": "notice"}', "unexpected op"),  # an agent's op, sent by a client
        (b'{"v": 2, "op": "register", "signal": "SIGKILL"}', "signal must be one of"),
        (b'{"v": 2, "op": "register", "signal": "SIGUSR1", "rank": -1}', "rank"),
        (b'{"v": 2, "op": "register", "signal": "SIGUSR1", "rank": true}', "rank"),
        (b'{"v": 2, "op": "exit", "code": 256}', "code"),
        (b'{"v": 2, "op": "exit", "code": 75, "step": "7"}', "step"),
    ],
)
def test_bad_client_messages_are_refused_in_one_line(line, reason):
    with pytest.raises(ProtocolError, match=reason) as caught:
        decode_message(line, CLIENT_OPS)
    assert "\n" not in str(caught.value)


def test_a_message_too_long_to_send_is_refused_before_it_is_sent():
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_message("exit", code=0, note="x" * MAX_MESSAGE_BYTES)


def test_state_dir_from_env():
    assert STATE_DIR_ENV == "SPOTGUARD_STATE_DIR"
    assert str(state_dir_from_env({})) == "/run/spotguard"
    assert str(state_dir_from_env({"SPOTGUARD_STATE_DIR": "/x"})) == "/x"
