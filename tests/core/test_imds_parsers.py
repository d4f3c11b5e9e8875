"""Every IMDS answer becomes a notice, "none", or ImdsBadAnswer: never anything else."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotguard.errors import ImdsBadAnswer
from spotguard.imds.parsers import (
    evaluate_lifecycle_state,
    evaluate_rebalance,
    evaluate_spot_action,
    scheduled_maintenance_evaluator,
)
from spotguard.protocol import Notice

NOW = datetime(2026, 11, 29, 8, 20, 1, tzinfo=timezone.utc)
PARSERS = [
    evaluate_spot_action,
    evaluate_rebalance,
    evaluate_lifecycle_state,
    scheduled_maintenance_evaluator(600),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "Code": json_values | st.sampled_from(["system-reboot", "instance-stop"]),
        "EventId": json_values | st.text(min_size=1),
        "NotBefore": json_values | st.just("21 Jan 2019 09:00:43 GMT"),
        "State": json_values | st.sampled_from(["active", "completed"]),
    },
)


@pytest.mark.parametrize("parse", PARSERS)
@settings(max_examples=300, deadline=None)
@given(body=st.text() | st.binary().map(lambda b: b.decode("latin-1")))
def test_arbitrary_text_gives_only_domain_errors(parse, body):
    with contextlib.suppress(ImdsBadAnswer):
        assert parse(body, NOW) is None or isinstance(parse(body, NOW), Notice)


@pytest.mark.parametrize("parse", PARSERS)
@settings(max_examples=300, deadline=None)
@given(
    payload=json_values
    | st.dictionaries(st.sampled_from(["action", "time", "noticeTime"]), json_values)
    | st.lists(event_like)
)
def test_arbitrary_json_gives_only_domain_errors(parse, payload):
    with contextlib.suppress(ImdsBadAnswer):
        result = parse(json.dumps(payload), NOW)
        assert result is None or isinstance(result, Notice)


def test_spot_action():
    notice = evaluate_spot_action('{"action": "terminate", "time": "2026-11-29T08:22:00Z"}', NOW)
    assert notice.kind == "spot-interruption"
    assert notice.deadline == datetime(2026, 11, 29, 8, 22, tzinfo=timezone.utc)
    assert notice.id == "spot-interruption/2026-11-29T08:22:00.000Z"
    assert evaluate_spot_action(None, NOW) is None
    with pytest.raises(ImdsBadAnswer, match="unknown action"):
        evaluate_spot_action('{"action": "reboot", "time": "2026-11-29T08:22:00Z"}', NOW)


def test_rebalance_has_no_deadline():
    notice = evaluate_rebalance('{"noticeTime": "2026-11-29T08:17:00Z"}', NOW)
    assert notice.kind == "rebalance-recommendation"
    assert notice.deadline is None
    assert not notice.signals_targets


def test_maintenance_is_due_only_within_its_lead():
    evaluate = scheduled_maintenance_evaluator(lead=600)

    def events(*offsets_and_states):
        return json.dumps([
            {"Code": "system-reboot", "EventId": f"e{i}", "State": state,
             "NotBefore": (NOW + timedelta(seconds=off)).strftime("%d %b %Y %H:%M:%S GMT")}
            for i, (off, state) in enumerate(offsets_and_states)
        ])  # fmt: skip

    assert evaluate(None, NOW) is None
    assert evaluate("[]", NOW) is None
    assert evaluate(events((3600, "active")), NOW) is None
    assert evaluate(events((300, "completed")), NOW) is None
    due = evaluate(events((3600, "active"), (500, "active"), (300, "active")), NOW)
    assert due.id == "scheduled-maintenance/e2"  # the earliest due one
    assert due.deadline == NOW + timedelta(seconds=300)


def test_lifecycle_state():
    assert evaluate_lifecycle_state("InService", NOW) is None
    assert evaluate_lifecycle_state("Warmed:Running\n", NOW) is None
    assert evaluate_lifecycle_state("Terminated", NOW).kind == "asg-termination"
    with pytest.raises(ImdsBadAnswer):
        evaluate_lifecycle_state("<html>", NOW)


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize(
    "body",
    [
        '{"action": "terminate", "time": "0001-01-01T00:00:00+01:00"}',
        '{"action": "terminate", "time": "9999-12-31T23:59:59-01:00"}',
        '{"noticeTime": "0001-01-01T00:30:00+01:00"}',
        "[" * 100_000,
    ],
)
def test_calendar_edges_and_deep_nesting_are_bad_answers(parse, body):
    """Converting year 1 or year 9999 to UTC overflows; JSON nested 100,000 deep exhausts the
    recursion limit. Both are a bad answer, never OverflowError or RecursionError."""
    with contextlib.suppress(ImdsBadAnswer):
        result = parse(body, NOW)
        assert result is None or isinstance(result, Notice)


def test_maintenance_in_year_one_is_due_not_an_overflow():
    """``NotBefore`` minus the lead would fall before year 1: compared as a duration, the
    event is simply overdue."""
    body = json.dumps(
        [{"Code": "system-reboot", "EventId": "e0", "NotBefore": "01 Jan 0001 00:05:00 GMT"}]
    )
    due = scheduled_maintenance_evaluator(lead=900)(body, NOW)
    assert due.deadline == datetime(1, 1, 1, 0, 5, tzinfo=timezone.utc)
    assert scheduled_maintenance_evaluator(lead=1e12)(body.replace("0001", "2027"), NOW)
