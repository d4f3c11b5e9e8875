"""The store against its ceiling, and what resume and commit cost with a long history.

1. Throughput as a ratio of the ceiling measured in the same run, on one moto S3 server over
   HTTP (started here), for each state size:
   * emergency save: ``CheckpointStore.save`` of a state dict (``torch.save`` streamed into
     the multipart upload, SHA-256 on the way, conditional manifest create, read-back of the
     manifest and sizes) vs the ceiling: a raw multipart upload of the *already serialized*
     bytes (no torch, no hashing), same part size and threads;
   * restore: ``CheckpointStore.load_state`` (ranged GETs verified while streaming into a
     spool, then ``torch.load``) vs the ceiling: the raw parallel ranged GETs of the same
     object into a sink that drops the bytes, same range size and threads.
   ``ratio = ceiling seconds / spotguard seconds`` (1.0 = as fast as the ceiling); goal
   >= 0.8. Trials alternate (ceiling, spotguard, ceiling, ...); medians are reported.
2. S3 requests (counted on the client with botocore's ``before-send`` event) of one resume,
   one ``latest()``, one commit and one steady-state prune (keep the newest 1,000: one old
   checkpoint goes) with 1,000 checkpoints in the prefix.

Usage: python bench/store_ceiling.py [--sizes 256 1024] (MiB) [--trials 3] [--history 1000]
Smoke test (seconds): python bench/store_ceiling.py --sizes 8 --trials 1 --history 20
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from collections import Counter
from typing import Any

import torch
from checkpoint_io import (
    SETTINGS,
    alternate,
    baseline_client,
    download_config,
    make_state,
    start_moto_bucket,
    upload_config,
)
from provenance import describe  # the bench folder is this script's

from spotguard.trainer_hooks import CheckpointStore

MiB = 2**20


class _Drop(io.RawIOBase):
    """A sink that keeps nothing: the ceiling pays for the transfer only. Seekable, so that
    s3transfer writes the ranges as they arrive, in any order (the fastest way it has)."""

    def __init__(self) -> None:
        super().__init__()
        self._position = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = offset if whence == io.SEEK_SET else self._position + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def write(self, data: Any) -> int:
        size = len(memoryview(data))
        self._position += size
        return size


def throughput(size_mib: int, bucket: str, trials: int) -> dict[str, float]:
    state = make_state(size_mib)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    serialized = buffer.getvalue()
    client = baseline_client(SETTINGS)
    store = CheckpointStore(f"s3://{bucket}/ceiling-{size_mib}", transfer=SETTINGS)
    steps = iter(range(1, 10_000))
    saves = alternate(
        {
            # A new key per trial, as spotguard writes a new checkpoint per save (replacing
            # an object costs moto extra work).
            "ceiling": lambda trial: client.upload_fileobj(
                io.BytesIO(serialized), bucket, f"raw/{size_mib}/{trial}/state.pt",
                Config=upload_config(SETTINGS),
            ),
            "spotguard": lambda trial: store.save(
                next(steps), {"state.pt": lambda handle: torch.save(state, handle)}
            ),
        },
        trials,
    )  # fmt: skip
    restores = alternate(
        {
            "ceiling": lambda trial: client.download_fileobj(
                bucket, f"raw/{size_mib}/0/state.pt", _Drop(), Config=download_config(SETTINGS)
            ),
            "spotguard": lambda trial: store.load_state(),
        },
        trials,
    )

    def median(runs: list[tuple[float, float]]) -> float:
        return statistics.median(wall for wall, _ in runs)

    return {
        "save_ceiling": median(saves["ceiling"]),
        "save_spotguard": median(saves["spotguard"]),
        "restore_ceiling": median(restores["ceiling"]),
        "restore_spotguard": median(restores["spotguard"]),
    }


def request_counts(bucket: str, history: int) -> dict[str, Counter[str]]:
    """Requests of resume, commit (+ prune) and latest() with ``history`` checkpoints."""
    store = CheckpointStore(f"s3://{bucket}/history")
    template = store.save(0, {"state.pt": lambda handle: torch.save({"step": 0}, handle)})
    raw = baseline_client(SETTINGS)
    prefix = "history"
    manifest = template.to_bytes()
    for step in range(1, history + 1):  # committed by an earlier writer of this run
        directory = f"{prefix}/ckpt-{step:012d}"
        source = {"Bucket": bucket, "Key": f"{prefix}/ckpt-000000000000/state.pt"}
        raw.copy_object(Bucket=bucket, Key=f"{directory}/state.pt", CopySource=source)
        raw.put_object(Bucket=bucket, Key=f"{directory}/manifest.json",
                       Body=manifest.replace(b'"step": 0', f'"step": {step}'.encode()))  # fmt: skip
    counts: Counter[str] = Counter()
    client = store._backend.client  # type: ignore[attr-defined]
    client.meta.events.register(
        "before-send.s3", lambda request, **_: counts.update([request.method])
    )
    figures = {}
    for name, work in (
        ("resume (newest verifies)", lambda: store.resume()),
        ("latest()", lambda: store.latest()),
        ("commit", lambda: store.save(history + 1, {"state.pt": b"next"})),
        ("prune, steady state (deletes 1)", lambda: store.prune(
            history + 1, newest_verified=history + 1
        )),
    ):  # fmt: skip
        counts.clear()
        work()
        figures[name] = Counter(counts)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 1024], help="MiB")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--history", type=int, default=1000, help="checkpoints in the prefix")
    args = parser.parse_args()
    print(describe(), flush=True)
    moto, bucket = start_moto_bucket()
    try:
        print(f"S3 tuning for both: {SETTINGS}", file=sys.stderr)
        if args.sizes:
            print("| state | save: ceiling | spotguard | ratio | restore: ceiling | spotguard "
                  "| ratio |")  # fmt: skip
            print("|---|---|---|---|---|---|---|")
        for size in args.sizes:
            row = throughput(size, bucket, args.trials)
            save = row["save_ceiling"] / row["save_spotguard"]
            restore = row["restore_ceiling"] / row["restore_spotguard"]
            print(
                f"| {size} MiB | {row['save_ceiling']:.2f} s | {row['save_spotguard']:.2f} s "
                f"| {save:.2f} | {row['restore_ceiling']:.2f} s "
                f"| {row['restore_spotguard']:.2f} s | {restore:.2f} |",
                flush=True,
            )
        print()
        print(f"| with {args.history} checkpoints | GET | PUT | POST | DELETE | total |")
        print("|---|---|---|---|---|---|")
        for name, counts in request_counts(bucket, args.history).items():
            print(f"| {name} | {counts['GET']} | {counts['PUT']} | {counts['POST']} "
                  f"| {counts['DELETE']} | {sum(counts.values())} |")  # fmt: skip
    finally:
        moto.terminate()
        moto.wait(10)


if __name__ == "__main__":
    main()
