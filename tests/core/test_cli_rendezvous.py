"""``spotguard rendezvous-store``: a real process serving torch's TCPStore, reached by a real
client; it stops cleanly on SIGTERM and says in one line why it cannot listen."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import timedelta

import pytest

pytest.importorskip("torch")


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "spotguard", "rendezvous-store", "--host", "127.0.0.1", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_it_serves_a_store_torchrun_can_use_until_sigterm():
    from torch.distributed import TCPStore

    server = start("--port", "0")
    try:
        line = server.stdout.readline().strip()  # type: ignore[union-attr]
        assert line.startswith("spotguard rendezvous-store: serving 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        client = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        client.set("torch.rendezvous.job.0", b"state")
        other = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        assert other.get("torch.rendezvous.job.0") == b"state"
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
        assert server.returncode == 0
        assert "SIGTERM, stopping" in out
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_port_it_cannot_take_is_a_one_line_error():
    first = start("--port", "0")
    try:
        port = first.stdout.readline().strip().rsplit(":", 1)[1]  # type: ignore[union-attr]
        second = start("--port", port)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 1
        assert err.strip().count("\n") == 0
        assert f"cannot listen on 127.0.0.1:{port}" in err
    finally:
        first.kill()
        first.wait()


def test_the_address_is_never_implied():
    done = subprocess.run([sys.executable, "-m", "spotguard", "rendezvous-store"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "--host" in done.stderr
