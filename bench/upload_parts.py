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

    #: Each contender: (the timed save, the untimed clean-up after it). Every save writes a
    #: new key or step, as spotguard does (replacing an object costs moto extra work, see
    #: store_ceiling.py); each is deleted once timed, or moto would hold every round's bytes in
    #: memory (8 contenders x 3 rounds x 1 GiB: all this machine has).
    Contender = tuple[Callable[[], object], Callable[[], object]]

    def boto3_loop(settings: TransferSettings, prefix: str) -> Contender:
        client = baseline_client(settings)
        config = upload_config(settings)
        key = f"{prefix}/state.pt"

        def save() -> None:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            client.upload_fileobj(buffer, bucket, key, Config=config)

        return save, lambda: client.delete_object(Bucket=bucket, Key=key)

    def spotguard(settings: TransferSettings, prefix: str) -> Contender:
        store = CheckpointStore(f"s3://{bucket}/{prefix}", transfer=settings)
        saved: list[int] = []

        def save() -> None:
            saved.append(next(steps))
            store.save(saved[-1], {"state.pt": lambda f: torch.save(state, f)})

        return save, lambda: store.delete(saved[-1])

    contenders: dict[str, Contender] = {}
    for setting in args.settings:
        part_mib, threads = (int(n) for n in setting.split("x"))
        settings = TransferSettings(part_size=part_mib * MiB, threads=threads)
        contenders[f"boto3 loop {setting}"] = boto3_loop(settings, f"baseline-{setting}")
        contenders[f"spotguard {setting}"] = spotguard(settings, f"p{setting}")
    walls: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        for _ in range(args.trials):
            for name, (save, clean_up) in contenders.items():
                walls[name].append(timed(save)[0])
                clean_up()
    finally:
        moto.terminate()
        moto.wait(60)
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
