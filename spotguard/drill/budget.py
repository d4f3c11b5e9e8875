"""``spotguard drill --budget``: will an emergency save of this size fit in two minutes?

It times a real save to the store (``torch.save`` into the store's streaming checksum and
parallel upload, exactly what an emergency save does) with a probe of ``probe_size`` bytes,
scales that to the state size, and compares it with what is left of EC2's two-minute notice
after detection, the wait for the next step boundary and the safety margin the hooks keep.
A save should fit with headroom: throughput on a busy node varies, and a save that does not
fit is skipped (the hooks keep the last verified checkpoint and say so).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

from spotguard.errors import ConfigError, StoreError
from spotguard.protocol import SPOT_NOTICE_SECONDS as NOTICE_SECONDS
from spotguard.sizes import human_size
from spotguard.trainer_hooks import CheckpointStore, GuardSettings

__all__ = ["Budget", "check_budget"]

#: Kept free by the hooks before the deadline.
SAFETY_MARGIN = GuardSettings.safety_margin
#: The agent's poll interval plus signal delivery.
DETECTION = 1.5
#: The probe's (never committed) checkpoint directory: far above any real step.
PROBE_STEP = 999_999_999_999
#: A save fits when it would take at most this share of the time left.
HEADROOM = 0.8


@dataclass(frozen=True)
class Budget:
    store: str
    state_bytes: int
    probe_bytes: int
    probe_seconds: float
    bytes_per_second: float
    estimated_save_seconds: float
    available_seconds: float
    step_seconds: float
    fits: bool
    advice: tuple[str, ...]

    def dumps(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def render_text(self) -> str:
        rate, probe = human_size(self.bytes_per_second), human_size(self.probe_bytes)
        save = f"~{self.estimated_save_seconds:.1f} s"
        lines = [
            f"store {self.store}: {rate}/s (a {probe} save took {self.probe_seconds:.2f} s, "
            "serialize + checksum + upload)",
            f"emergency save of {human_size(self.state_bytes)}: {save}",
            f"time for it: {self.available_seconds:.1f} s of the {NOTICE_SECONDS:.0f} s notice "
            f"(after {DETECTION} s detection, a {self.step_seconds:g} s step, "
            f"{SAFETY_MARGIN:g} s margin)",
        ]
        if self.fits:
            spare = self.available_seconds - self.estimated_save_seconds
            lines.append(f"fits, with {spare:.1f} s to spare")
        else:
            headroom = 100 - HEADROOM * 100
            lines.append(f"does NOT fit with {headroom:.0f} % headroom; what to change:")
            lines += [f"  - {item}" for item in self.advice]
        return "\n".join(lines)


def _advice(estimate: float, available: float, state_bytes: int) -> tuple[str, ...]:
    usable = available * HEADROOM
    shards = math.ceil(estimate / usable)
    fitting = int(state_bytes * usable / estimate)
    return (
        f"shard the save: with {shards} ranks each saving its share (e.g. FSDP/DCP sharded "
        "state), every rank writes in parallel",
        f"save less: about {human_size(fitting)} fits (drop what can be rebuilt, keep optimizer "
        "state in a smaller dtype)",
        "save more often: periodic saves bound the work lost when the emergency save is "
        "skipped (the hooks then keep the last verified checkpoint)",
        "a faster path to the store: larger multipart parts and more threads "
        "(TransferSettings), an S3 endpoint in the same Region, a bigger instance's network",
    )


def check_budget(
    uri: str, *, state_size: int | None, probe_size: int = 256 * 2**20, step_seconds: float = 2.0
) -> Budget:
    """Time a ``probe_size`` save to ``uri`` and judge a save of ``state_size`` bytes (default:
    the size of the newest checkpoint already in the store)."""
    import torch

    if not 0 <= step_seconds < NOTICE_SECONDS:
        raise ConfigError(f"step seconds must be 0..{NOTICE_SECONDS:.0f}, got {step_seconds}")
    store = CheckpointStore(uri)
    if state_size is None:
        latest = store.latest()
        if latest is None:
            raise StoreError(f"{uri} has no checkpoint to size from: give --state-size")
        state_size = sum(entry.size for entry in latest.files.values())
    tensor = torch.randint(0, 256, (probe_size,), dtype=torch.uint8)
    # Put but never committed: invisible to list()/latest() and to a training's prune.
    store.put(PROBE_STEP, "warm-up", b"x")  # connection, credentials, bucket: not timed
    try:
        started = time.monotonic()
        store.put(PROBE_STEP, "budget-probe.pt", lambda handle: torch.save(tensor, handle))
        seconds = time.monotonic() - started
    finally:
        store.delete(PROBE_STEP)
    rate = probe_size / max(seconds, 1e-6)
    estimate = state_size / rate
    available = NOTICE_SECONDS - DETECTION - step_seconds - SAFETY_MARGIN
    fits = estimate <= available * HEADROOM
    return Budget(
        store=uri,
        state_bytes=state_size,
        probe_bytes=probe_size,
        probe_seconds=seconds,
        bytes_per_second=rate,
        estimated_save_seconds=estimate,
        available_seconds=available,
        step_seconds=step_seconds,
        fits=fits,
        advice=() if fits else _advice(estimate, available, state_size),
    )
