"""Saves checkpoints until killed (the SIGKILL tests), saying on stdout what it does.

It resumes where the store left off: the first step it saves is the newest committed
checkpoint's step + 1 (``begin N`` reports each save as it starts, ``committed N`` once
``save`` returned). With ``--hold-after K`` it commits K checkpoints, then starts the next
one and stops in the middle of it: ``small.bin`` is uploaded, ``state.bin`` is streamed into
its multipart upload up to ``--hold-mib`` MiB, then the writer blocks for good and the
process reports ``holding N``: a kill from then on lands mid-upload, by construction.

Every ``state.bin`` starts with its step (8 bytes, big-endian), so a reader can tell which
checkpoint it loaded.
"""

from __future__ import annotations

import argparse
import os
import threading

from spotguard.trainer_hooks import CheckpointStore, TransferSettings

MiB = 2**20


def say(*words: object) -> None:
    print(*words, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--mib", type=int, default=12)
    parser.add_argument("--hold-after", type=int, default=None)
    parser.add_argument("--hold-mib", type=int, default=7)
    args = parser.parse_args()
    store = CheckpointStore(args.store, transfer=TransferSettings(part_size=5 * MiB, threads=2))
    latest = store.latest()
    step = (latest.step if latest else 0) + 1
    saved = 0
    while True:
        header = step.to_bytes(8, "big")
        say("begin", step)
        if args.hold_after is not None and saved == args.hold_after:
            head = header + os.urandom(args.hold_mib * MiB - len(header))

            def stalled(handle, head=head, step=step) -> None:
                handle.write(head)
                handle.flush()  # past the buffer: in the pipe, its parts on their way
                say("holding", step)
                threading.Event().wait()  # never returns: the test kills the process

            store.save(step, {"small.bin": b"x" * 100, "state.bin": stalled})
            raise AssertionError("unreachable: the held save never finishes")
        payload = header + os.urandom(args.mib * MiB - len(header))
        store.save(step, {"small.bin": b"x" * 100, "state.bin": payload})
        say("committed", step)
        saved += 1
        step += 1


if __name__ == "__main__":
    main()
