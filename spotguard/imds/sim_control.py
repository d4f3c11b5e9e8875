"""A client for the IMDS simulator's control API (``POST /_sim/...``): schedule and withdraw
notices, inject faults, read the request log. The API itself is described in
:mod:`spotguard.imds.simulator`."""

from __future__ import annotations

from typing import Any

import requests

from spotguard.protocol import SPOT_NOTICE_SECONDS

__all__ = ["SimControl"]


class SimControl:
    """Drives a running simulator through its control API (tests, the drill, benchmarks)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()
        self._session.trust_env = False

    def _post(self, command: str, **body: Any) -> dict[str, Any]:
        response = self._session.post(f"{self.url}/_sim/{command}", json=body, timeout=self.timeout)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def spot(self, action: str = "terminate", in_seconds: float = SPOT_NOTICE_SECONDS) -> str:
        """Schedule a spot interruption; returns its (fixed) time as IMDS will serve it."""
        spot = self._post("spot", action=action, in_seconds=in_seconds)["spot"]
        return str(spot["time"])

    def clear_spot(self) -> None:
        self._post("spot/clear")

    def rebalance(self) -> None:
        self._post("rebalance")

    def clear_rebalance(self) -> None:
        self._post("rebalance/clear")

    def maintenance(self, **event: Any) -> None:
        self._post("maintenance", **event)

    def cancel_maintenance(self, event_id: str) -> None:
        self._post("maintenance/cancel", event_id=event_id)

    def lifecycle(self, state: str) -> None:
        self._post("lifecycle", state=state)

    def clear_lifecycle(self) -> None:
        self._post("lifecycle/clear")

    def fault(self, **fault: Any) -> None:
        self._post("fault", **fault)

    def reset(self) -> None:
        self._post("reset")

    def requests(self) -> list[dict[str, Any]]:
        response = self._session.get(f"{self.url}/_sim/requests", timeout=self.timeout)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def close(self) -> None:
        self._session.close()
