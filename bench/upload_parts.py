"""Upload part size and parallelism: spotguard's foreground save for several TransferSettings,
against the naive loop, on the same moto S3 server.

Why this exists: the default part size is a trade-off that must be measured, not guessed.
Serialization streams into the upload, so a part leaves as soon as it is full; small parts
start the upload sooner and keep every connection busy to the end, large parts cost fewer
requests. Each figure is the median of alternating trials (moto's throughput drifts); the
baseline is ``torch.save`` to a buffer + boto3 ``upload_fileobj`` with boto3's defaults
(8 MiB parts, 10 threads).

Usage: python bench/upload_parts.py [--size 1024] [--trials 3] [--settings 8x16 64x16 ...]
(MiB x threads)
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from collections.abc import Callable

import boto3
import torch
from checkpoint_io import MiB, make_state, start_moto_bucket, timed

from spotguard.trainer_hooks import CheckpointStore, TransferSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="state size in MiB")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=["8x10", "8x16", "16x16", "64x16"])
    args = parser.parse_args()
    moto, bucket = start_moto_bucket()
    client = boto3.client("s3")
    state = make_state(args.size)
    steps = iter(range(1, 10**6))

    def baseline() -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        client.upload_fileobj(buffer, bucket, "baseline/state.pt")

    def spotguard(part_mib: int, threads: int) -> Callable[[], object]:
        settings = TransferSettings(part_size=part_mib * MiB, threads=threads)
        store = CheckpointStore(f"s3://{bucket}/p{part_mib}x{threads}", transfer=settings)
        return lambda: store.save(next(steps), {"state.pt": lambda f: torch.save(state, f)})

    contenders: dict[str, Callable[[], object]] = {"baseline (boto3 defaults)": baseline}
    for setting in args.settings:
        part_mib, threads = (int(n) for n in setting.split("x"))
        contenders[f"spotguard {part_mib} MiB x {threads}"] = spotguard(part_mib, threads)
    walls: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        for _ in range(args.trials):
            for name, save in contenders.items():
                walls[name].append(timed(save)[0])
    finally:
        moto.terminate()
        moto.wait(10)
    base = statistics.median(walls["baseline (boto3 defaults)"])
    print(f"emergency save of {args.size} MiB, median of {args.trials} alternating trials")
    for name, times in walls.items():
        wall = statistics.median(times)
        print(f"  {name:28s} {wall:6.2f} s   speed-up vs baseline {base / wall:.2f} x")


if __name__ == "__main__":
    sys.exit(main())
