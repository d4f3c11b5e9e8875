"""Fixtures shared by every test package: real HTTP servers, real processes, no network."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import in_ci, require_tool, sim

# Nothing a test starts may reach the internet or pick up a developer's AWS setup.
for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE"):
    os.environ.pop(variable, None)


__all__ = ["free_port", "sim"]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """On pytest-xdist's workers (Makefile: ``-n 2``), every fleet test goes to one worker,
    the others are load-balanced: two ``terraform init`` at once would share the plugin cache,
    which Terraform does not support, and the moto applies are module fixtures that a split
    module would run twice. (xdist's own ``--dist loadgroup`` does nothing with pytest 9.2: it
    renames ``item._nodeid``, which pytest 9.2 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    # A private method of xdist's: should it be renamed, say so rather than split the fleet.
    assert "_split_scope" in vars(LoadScopeScheduling), "xdist changed: update this hook"

    class FleetOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/fleet" if nodeid.startswith("tests/fleet/") else nodeid

    return FleetOnOneWorker(config, log)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def systemd_analyze() -> str:
    """The path of ``systemd-analyze``: the test fails in CI where it is missing, and is
    skipped elsewhere."""
    return require_tool("systemd-analyze", package="systemd")


def wait_until_listening(process: subprocess.Popen[bytes], port: int, what: str) -> None:
    """Return once ``process`` accepts connections on ``port``; fail the test if it exits or
    30 s pass first."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not start")
            time.sleep(0.1)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto server over HTTP (S3, EC2, IAM, SQS, ...), reached as real AWS is reached
    (``AWS_ENDPOINT_URL``)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        # AWS managed policies (AmazonSSMManagedInstanceCore for the fleet's nodes) exist.
        env={**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_listening(process, port, "the moto server")
    yield url
    process.terminate()
    process.wait(10)


@pytest.fixture
def s3(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Environment pointing boto3 at the moto server, and a fresh bucket; yields its name."""
    import boto3

    for key, value in {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def faulty_s3(s3: str, moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    """The bucket of ``s3``, reached through a proxy that can fail on command."""
    from tests.faulty_proxy import FaultyProxy

    proxy = FaultyProxy(moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield s3, proxy
    proxy.close()


S3RVER = Path(__file__).resolve().parent.parent / ".s3rver" / "node_modules" / ".bin" / "s3rver"


@pytest.fixture(scope="session")
def s3rver_https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A second S3 implementation, not moto: s3rver (from npm, installed by ``make test`` into
    ``.s3rver``) over HTTPS with a self-signed certificate made here. Yields the environment
    that points boto3 at it; its bucket is ``ckpt``."""
    if not S3RVER.exists():
        message = f"{S3RVER} is missing (make test installs s3rver from npm)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    openssl = require_tool("openssl", package="openssl")
    folder = tmp_path_factory.mktemp("s3rver")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    process = subprocess.Popen(
        [str(S3RVER), "-d", str(folder / "data"), "-a", "127.0.0.1", "-p", str(port),
         "--key", str(key), "--cert", str(cert), "--silent", "--configure-bucket", "ckpt"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_until_listening(process, port, "s3rver")
    yield {
        "AWS_ENDPOINT_URL": f"https://127.0.0.1:{port}",
        "AWS_CA_BUNDLE": str(cert),
        "AWS_ACCESS_KEY_ID": "S3RVER",
        "AWS_SECRET_ACCESS_KEY": "S3RVER",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    process.terminate()
    process.wait(10)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path is root's alone): the state dir
    goes below it when another user must connect to the socket."""
    path = Path(tempfile.mkdtemp(prefix="spotguard-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
