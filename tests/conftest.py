"""Fixtures shared by every test package: real HTTP servers, real processes, no network."""

from __future__ import annotations

import os
import socket

import pytest

# Nothing a test starts may reach the internet or pick up a developer's AWS setup.
for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE"):
    os.environ.pop(variable, None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()
