"""The simulator follows IMDSv2's rules, over real HTTP."""

from __future__ import annotations

import json
import time

import pytest
import requests

TOKEN = "/latest/api/token"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"


def token(url: str, ttl: str = "60") -> str:
    answer = requests.put(url + TOKEN, headers={TTL: ttl}, timeout=5)
    assert answer.status_code == 200
    assert answer.headers[TTL] == ttl
    return answer.text


def get(url: str, path: str, tok: str | None) -> requests.Response:
    headers = {"X-aws-ec2-metadata-token": tok} if tok else {}
    return requests.get(f"{url}/latest/meta-data/{path}", headers=headers, timeout=5)


@pytest.mark.parametrize("ttl", ["0", "21601", "abc", ""])
def test_token_ttl_outside_1_to_21600_is_400(sim, ttl):
    answer = requests.put(sim.url + TOKEN, headers={TTL: ttl} if ttl else {}, timeout=5)
    assert answer.status_code == 400


def test_token_through_a_proxy_is_refused(sim):
    headers = {TTL: "60", "X-Forwarded-For": "10.0.0.1"}
    assert requests.put(sim.url + TOKEN, headers=headers, timeout=5).status_code == 403


def test_gets_need_a_live_token(sim):
    assert get(sim.url, "instance-id", None).status_code == 401
    assert get(sim.url, "instance-id", "made-up").status_code == 401
    short = token(sim.url, "1")
    answer = get(sim.url, "instance-id", short)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "text/plain"
    time.sleep(1.1)
    assert get(sim.url, "instance-id", short).status_code == 401


def test_spot_notice_time_is_fixed_once_scheduled(sim):
    tok = token(sim.url)
    assert get(sim.url, "spot/instance-action", tok).status_code == 404
    sim.control.spot(action="stop", in_seconds=120)
    first = get(sim.url, "spot/instance-action", tok).json()
    time.sleep(1.1)
    second = get(sim.url, "spot/instance-action", tok).json()
    assert first == second
    assert first["action"] == "stop"
    sim.control.clear_spot()
    assert get(sim.url, "spot/instance-action", tok).status_code == 404


def test_maintenance_events_use_imds_date_format(sim):
    tok = token(sim.url)
    assert get(sim.url, "events/maintenance/scheduled", tok).text == "[]"
    sim.control.maintenance(code="system-reboot", not_before_in=60, event_id="e-1")
    (event,) = json.loads(get(sim.url, "events/maintenance/scheduled", tok).text)
    assert event["EventId"] == "e-1"
    assert event["NotBefore"].endswith(" GMT")
    assert "NotAfter" not in event


def test_faults_are_counted_and_cleared(sim):
    tok = token(sim.url)
    sim.control.fault(status=503, count=2)
    assert [get(sim.url, "instance-id", tok).status_code for _ in range(3)] == [503, 503, 200]
    sim.control.fault(garbage=1)
    assert get(sim.url, "instance-id", tok).content.startswith(b"\xff\xfe")
    sim.control.fault(drop=1)
    with pytest.raises(requests.ConnectionError):
        get(sim.url, "instance-id", tok)
    sim.control.fault(expire_tokens=True)
    assert get(sim.url, "instance-id", tok).status_code == 401


def test_bad_control_call_is_400(sim):
    answer = requests.post(f"{sim.url}/_sim/spot", json={"action": "explode"}, timeout=5)
    assert answer.status_code == 400
    assert "explode" in answer.json()["error"]


def test_request_log_records_every_metadata_call(sim):
    tok = token(sim.url)
    get(sim.url, "instance-id", tok)
    log = sim.control.requests()
    assert [(r["method"], r["path"], r["status"]) for r in log] == [
        ("PUT", TOKEN, 200),
        ("GET", "/latest/meta-data/instance-id", 200),
    ]
