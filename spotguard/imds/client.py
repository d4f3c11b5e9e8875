"""An IMDSv2 client that never mistakes "could not ask" for "nothing to report".

:meth:`ImdsClient.get` returns the body of a metadata path, ``None`` for a 404 (IMDS's way of
saying "no such event"), and raises an :class:`~spotguard.errors.ImdsError` subclass for
everything else. The session token is fetched with ``PUT /latest/api/token``, its expiry tracked
with a monotonic clock (wall-clock jumps cannot make it look fresh) and renewed shortly before it
runs out; a 401 anyway (IMDS restarted, clock skew) drops it and retries once with a new one.

The network sits behind :class:`Transport`, so unit tests can answer requests without a server
and without monkeypatching; everything else talks HTTP to the real thing or the simulator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import urllib3

from spotguard.errors import ConfigError, ImdsBadAnswer, ImdsDisabled, ImdsUnreachable

__all__ = ["ImdsClient", "Response", "Transport", "Urllib3Transport"]

TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a URL path, not a secret
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - a header name
#: Renew the token when less than this share of its lifetime is left (at most 60 s before).
RENEW_FRACTION = 0.1
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


class Transport(Protocol):
    """Sends one HTTP request; raises :class:`ImdsUnreachable` when no answer comes back."""

    def request(
        self, method: str, url: str, headers: Mapping[str, str], timeout: float
    ) -> Response: ...

    def close(self) -> None: ...


class Urllib3Transport:
    """HTTP over one kept-alive urllib3 connection pool.

    urllib3 rather than requests (which wraps it): the agent polls every second for weeks,
    and requests' per-call machinery (hooks, cookie jars, environment merging) doubles the CPU
    of each poll and adds 4 MiB of imports for nothing IMDS needs. Proxies are never used:
    IMDS is link-local, and an ``HTTP_PROXY`` meant for the internet must not capture it (the
    AWS SDKs bypass proxies for IMDS the same way).
    """

    def __init__(self) -> None:
        self._pool = urllib3.PoolManager(num_pools=2, maxsize=1, retries=False)

    def request(
        self, method: str, url: str, headers: Mapping[str, str], timeout: float
    ) -> Response:
        try:
            answer = self._pool.request(
                method,
                url,
                headers=dict(headers),
                timeout=timeout,
                preload_content=False,
                retries=False,
            )
            try:
                body = answer.read(MAX_BODY + 1)
            finally:
                answer.release_conn()
            return Response(answer.status, body)
        except urllib3.exceptions.TimeoutError:
            raise ImdsUnreachable(f"{method} {url}: timed out after {timeout} s") from None
        except urllib3.exceptions.HTTPError as exc:
            raise ImdsUnreachable(f"{method} {url}: {type(exc).__name__}") from None
        except OSError as exc:
            raise ImdsUnreachable(f"{method} {url}: {exc.strerror or exc}") from None

    def close(self) -> None:
        self._pool.clear()


class ImdsClient:
    """Reads instance metadata through IMDSv2 only."""

    def __init__(
        self,
        endpoint: str = "http://169.254.169.254",
        *,
        token_ttl: int = 21600,
        timeout: float = 1.0,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= token_ttl <= 21600:
            raise ConfigError(f"token_ttl must be 1..21600, got {token_ttl}")
        self.endpoint = endpoint.rstrip("/")
        self.token_ttl = token_ttl
        self.timeout = timeout
        self._transport: Transport = transport or Urllib3Transport()
        self._clock = clock
        self._token: str | None = None
        self._renew_at = 0.0
        #: How many tokens this client fetched (metrics and tests read it).
        self.tokens_fetched = 0

    def close(self) -> None:
        self._transport.close()

    def get(self, path: str) -> str | None:
        """Body of ``/latest/meta-data/...`` (or any path), ``None`` when IMDS says 404."""
        url = f"{self.endpoint}/{path.lstrip('/')}"
        response = self._send_get(url)
        if response.status == 401:
            # The token died early (IMDS restarted, or our clock lied): one fresh try.
            self._token = None
            response = self._send_get(url)
        return self._interpret(url, response)

    def _send_get(self, url: str) -> Response:
        headers = {TOKEN_HEADER: self._valid_token()}
        return self._transport.request("GET", url, headers, self.timeout)

    def _valid_token(self) -> str:
        now = self._clock()
        if self._token is None or now >= self._renew_at:
            self._token = self._fetch_token()
            margin = min(60.0, self.token_ttl * RENEW_FRACTION)
            self._renew_at = now + self.token_ttl - margin
        return self._token

    def _fetch_token(self) -> str:
        url = self.endpoint + TOKEN_PATH
        response = self._transport.request(
            "PUT", url, {TTL_HEADER: str(self.token_ttl)}, self.timeout
        )
        if response.status == 200:
            token = self._decode(url, response.body).strip()
            if not token or any(ch.isspace() for ch in token) or len(token) > 1024:
                raise ImdsBadAnswer(f"PUT {url}: answered a malformed token")
            self.tokens_fetched += 1
            return token
        if response.status == 403:
            raise ImdsDisabled(f"PUT {url}: 403, the metadata service is disabled")
        if response.status == 404:
            raise ImdsBadAnswer(f"PUT {url}: 404, this endpoint does not speak IMDSv2")
        if response.status >= 500:
            raise ImdsUnreachable(f"PUT {url}: {response.status}")
        raise ImdsBadAnswer(f"PUT {url}: unexpected status {response.status}")

    def _interpret(self, url: str, response: Response) -> str | None:
        status = response.status
        if status == 200:
            return self._decode(url, response.body)
        if status == 404:
            return None
        if status == 401:
            raise ImdsBadAnswer(f"GET {url}: 401 even with a fresh token")
        if status == 403:
            raise ImdsDisabled(f"GET {url}: 403, the metadata service is disabled")
        if status >= 500 or status == 429:
            raise ImdsUnreachable(f"GET {url}: {status}")
        raise ImdsBadAnswer(f"GET {url}: unexpected status {status}")

    @staticmethod
    def _decode(url: str, body: bytes) -> str:
        if len(body) > MAX_BODY:
            raise ImdsBadAnswer(f"{url}: answer larger than {MAX_BODY} bytes")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise ImdsBadAnswer(f"{url}: answer is not UTF-8 text") from None
