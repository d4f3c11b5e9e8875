"""ImdsClient against a scripted transport (unit) and against the simulator over HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping

import pytest

from spotguard.errors import ImdsBadAnswer, ImdsDisabled, ImdsUnreachable
from spotguard.imds.client import ImdsClient, Response
from spotguard.imds.sim_control import SimControl
from spotguard.imds.simulator import ImdsSimulator


class ScriptedTransport:
    """Answers requests from a script of (method, status, body); records what was asked."""

    def __init__(self, *answers: tuple[str, int, bytes] | Exception) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, str, dict[str, str]]] = []

    def request(self, method: str, url: str, headers: Mapping[str, str], timeout: float):
        self.sent.append((method, url, dict(headers)))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        expected, status, body = answer
        assert method == expected, f"expected a {expected}, got {method} {url}"
        return Response(status, body)

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client(transport: ScriptedTransport, clock: Clock | None = None, ttl: int = 600) -> ImdsClient:
    return ImdsClient("http://imds", token_ttl=ttl, transport=transport, clock=clock or Clock())


def test_token_is_fetched_once_and_sent_with_every_get():
    transport = ScriptedTransport(("PUT", 200, b"tok"), ("GET", 200, b"a"), ("GET", 404, b""))
    imds = client(transport)
    assert imds.get("latest/meta-data/x") == "a"
    assert imds.get("latest/meta-data/y") is None
    put, first, second = transport.sent
    assert put[2]["X-aws-ec2-metadata-token-ttl-seconds"] == "600"
    assert first[2]["X-aws-ec2-metadata-token"] == second[2]["X-aws-ec2-metadata-token"] == "tok"


def test_token_is_renewed_before_it_expires_by_the_monotonic_clock():
    clock = Clock()
    transport = ScriptedTransport(
        ("PUT", 200, b"one"), ("GET", 200, b"a"), ("PUT", 200, b"two"), ("GET", 200, b"b")
    )
    imds = client(transport, clock, ttl=600)
    imds.get("x")
    clock.now += 600 - 59  # inside the renewal margin (10 % of the TTL, at most 60 s)
    imds.get("x")
    assert transport.sent[-1][2]["X-aws-ec2-metadata-token"] == "two"
    assert imds.tokens_fetched == 2


def test_401_gets_a_new_token_and_one_retry():
    transport = ScriptedTransport(
        ("PUT", 200, b"old"), ("GET", 401, b""), ("PUT", 200, b"new"), ("GET", 200, b"ok")
    )
    assert client(transport).get("x") == "ok"


def test_persistent_401_is_a_bad_answer_not_a_loop():
    transport = ScriptedTransport(
        ("PUT", 200, b"a"), ("GET", 401, b""), ("PUT", 200, b"b"), ("GET", 401, b"")
    )
    with pytest.raises(ImdsBadAnswer, match="401"):
        client(transport).get("x")
    assert len(transport.sent) == 4


@pytest.mark.parametrize(
    ("put", "error"),
    [
        ((403, b""), ImdsDisabled),
        ((404, b""), ImdsBadAnswer),
        ((503, b""), ImdsUnreachable),
        ((200, b""), ImdsBadAnswer),
        ((200, b"two words"), ImdsBadAnswer),
        ((418, b""), ImdsBadAnswer),
    ],
)
def test_token_failures_map_to_clear_errors(put, error):
    with pytest.raises(error):
        client(ScriptedTransport(("PUT", *put))).get("x")


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (403, b"", ImdsDisabled),
        (500, b"", ImdsUnreachable),
        (503, b"", ImdsUnreachable),
        (429, b"", ImdsUnreachable),
        (302, b"", ImdsBadAnswer),
        (200, b"\xff\xfe", ImdsBadAnswer),
        (200, b"x" * (64 * 1024 + 1), ImdsBadAnswer),
    ],
)
def test_get_failures_map_to_clear_errors(status, body, error):
    with pytest.raises(error):
        client(ScriptedTransport(("PUT", 200, b"t"), ("GET", status, body))).get("x")


def test_transport_errors_propagate_as_unreachable():
    transport = ScriptedTransport(ImdsUnreachable("refused"))
    with pytest.raises(ImdsUnreachable):
        client(transport).get("x")


def test_ttl_is_validated():
    with pytest.raises(ValueError, match="token_ttl"):
        ImdsClient(token_ttl=0)


def test_real_http_refused_connection_and_timeout(port):
    refused = ImdsClient(f"http://127.0.0.1:{port}", timeout=0.5)
    with pytest.raises(ImdsUnreachable):
        refused.get("latest/meta-data/instance-id")
    with ImdsSimulator() as sim:
        SimControl(sim.url).fault(latency=0.6)
        slow = ImdsClient(sim.url, timeout=0.2)
        with pytest.raises(ImdsUnreachable, match="timed out"):
            slow.get("latest/meta-data/instance-id")


def test_real_http_ignores_proxy_settings(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with ImdsSimulator() as sim:
        assert ImdsClient(sim.url).get("latest/meta-data/instance-id").startswith("i-")


class DrippingServer:
    """A loopback HTTP server that answers the token PUT at once and then drips its GET answer
    a byte every ``interval`` seconds: the body only, or status line and headers too. It counts
    the bytes it got out before the client hung up."""

    BODY = b"x" * 100

    def __init__(self, drip: str, interval: float = 0.1) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n"
        self.prompt, self.slow = (head, self.BODY) if drip == "body" else (b"", head + self.BODY)
        self.interval = interval
        self.dripped = 0
        self.hung_up = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn, conn.makefile("rb") as requests:
            while True:
                request_line = requests.readline()
                while requests.readline() not in (b"\r\n", b""):
                    pass  # headers
                if request_line.startswith(b"PUT"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntok")
                    continue
                try:
                    conn.sendall(self.prompt)
                    for byte in self.slow:
                        conn.sendall(bytes([byte]))
                        self.dripped += 1
                        time.sleep(self.interval)
                except OSError:
                    self.hung_up.set()
                return

    def close(self) -> None:
        self._listener.close()


@pytest.mark.parametrize("drip", ["body", "headers"])
def test_a_dripped_answer_is_cut_off_at_the_total_deadline(drip):
    """Each byte comes well inside the per-read timeout; the whole answer would take 10 s or
    more. The request gives up at its deadline and hangs up before the drip is through."""
    server = DrippingServer(drip)
    imds = ImdsClient(server.url, timeout=1.0)
    try:
        with pytest.raises(ImdsUnreachable, match="timed out"):
            imds.get("latest/meta-data/spot/instance-action")
        imds.close()
        assert server.hung_up.wait(30), "the server never saw the client hang up"
        assert server.dripped < len(server.slow)
    finally:
        imds.close()
        server.close()
