"""Saves checkpoints 1, 2, 3, ... of ``--mib`` MiB each until killed (SIGKILL tests)."""

from __future__ import annotations

import argparse
import os
import sys

from spotguard.trainer_hooks import CheckpointStore, TransferSettings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--mib", type=int, default=12)
    args = parser.parse_args()
    store = CheckpointStore(args.store, transfer=TransferSettings(part_size=5 * 2**20, threads=2))
    step = (store.latest().step if store.latest() else 0) + 1
    while True:
        payload = os.urandom(args.mib * 2**20)
        store.save(step, {"state.bin": payload, "small.bin": b"x" * 100})
        print(step, flush=True)
        sys.stdout.flush()
        step += 1


if __name__ == "__main__":
    main()
