"""Upload part size and parallelism: spotguard's foreground save for several TransferSettings,
each against the naive loop with the same tuning, on the same moto S3 server.

Why this exists: the default part size is a trade-off that must be measured, not guessed.
Serialization streams into the upload, so a part leaves as soon as it is full; small parts
start the upload sooner and keep every connection busy to the end, large parts cost fewer
requests.

Contenders, for each setting PARTxTHREADS of ``--settings``:

* ``boto3 loop PxT``: ``torch.save`` to a buffer + boto3 ``upload_fileobj`` with the same
  part size and threads (and a client configured as spotguard's S3 backend configures its own:
  see ``checkpoint_io.baseline_client``). boto3's own defaults are ``8x10``.
* ``spotguard PxT``: ``CheckpointStore.save`` with ``TransferSettings(part_size=P MiB,
  threads=T)``.

Every round runs all contenders in turn (boto3 8x10, spotguard 8x10, boto3 8x16, ...; moto's
throughput drifts); each figure is the median of ``--trials`` rounds. "vs same tuning" is the
product's speed-up (the boto3 loop with the same setting over spotguard); "vs the loop at
8x10" compares with the boto3 loop at boto3's default part size and threads (8x10; the client is
still spotguard's: its pool and retries), when 8x10 is among the settings.

Usage: python bench/upload_parts.py [--size 1024] [--trials 3] [--settings 8x10 8x16 ...]
(MiB x threads)
Smoke test (seconds): python bench/upload_parts.py --size 16 --trials 1 --settings 8x2
"""

from __future__ import annotations

import argparse
import io
import itertools
import statistics
import sys
from collections.abc import Callable

import torch
from checkpoint_io import (
    MiB,
    baseline_client,
    make_state,
    start_moto_bucket,
    timed,
    upload_config,
)
from provenance import describe  # the bench folder is this script's

from spotguard.trainer_hooks import CheckpointStore, TransferSettings

BOTO3_DEFAULTS = "8x10"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="state size in MiB")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=["8x10", "8x16", "16x16", "64x16"])
    args = parser.parse_args()
    print(describe(), flush=True)
    moto, bucket = start_moto_bucket()
    state = make_state(args.size)
    steps = iter(range(1, 10**6))

    def boto3_loop(settings: TransferSettings, prefix: str) -> Callable[[], object]:
        client = baseline_client(settings)
        config = upload_config(settings)
        trials = itertools.count()

        def save() -> None:
            # A new key each time, as spotguard writes a new step: replacing an object costs
            # moto extra work (store_ceiling.py), which would handicap the baseline.
            buffer = io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            key = f"{prefix}/{next(trials)}/state.pt"
            client.upload_fileobj(buffer, bucket, key, Config=config)

        return save

    def spotguard(settings: TransferSettings, prefix: str) -> Callable[[], object]:
        store = CheckpointStore(f"s3://{bucket}/{prefix}", transfer=settings)
        return lambda: store.save(next(steps), {"state.pt": lambda f: torch.save(state, f)})

    contenders: dict[str, Callable[[], object]] = {}
    for setting in args.settings:
        part_mib, threads = (int(n) for n in setting.split("x"))
        settings = TransferSettings(part_size=part_mib * MiB, threads=threads)
        contenders[f"boto3 loop {setting}"] = boto3_loop(settings, f"baseline-{setting}")
        contenders[f"spotguard {setting}"] = spotguard(settings, f"p{setting}")
    walls: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        for _ in range(args.trials):
            for name, save in contenders.items():
                walls[name].append(timed(save)[0])
    finally:
        moto.terminate()
        moto.wait(10)
    wall = {name: statistics.median(times) for name, times in walls.items()}
    defaults = wall.get(f"boto3 loop {BOTO3_DEFAULTS}")
    print(f"emergency save of {args.size} MiB, median of {args.trials} alternating rounds")
    print("| setting (part MiB x threads) | boto3 loop | spotguard | vs same tuning "
          "| vs the loop at 8x10 |")  # fmt: skip
    print("|---|---|---|---|---|")
    for setting in args.settings:
        loop, guard = wall[f"boto3 loop {setting}"], wall[f"spotguard {setting}"]
        versus_defaults = f"{defaults / guard:.2f} x" if defaults is not None else "-"
        print(f"| {setting} | {loop:.2f} s | {guard:.2f} s | {loop / guard:.2f} x "
              f"| {versus_defaults} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
