"""Peak memory of a periodic save: how far above "the state plus one copy of it" it goes.

An async save needs a second copy of the state in host memory (training goes on while the
copy is serialized, hashed and written); anything above that (serialization buffers, the
read-back of the first payload, the pinned allocator's power-of-two rounding on GPU) is what
this measures. Each contender runs in a fresh process and reports its peak RSS
(``ru_maxrss``), so the interpreter and torch's own footprint are in both:

* baseline: build the state, ``clone()`` every tensor once (the state + one copy, no I/O);
* spotguard: build the same state, ``SpotGuard(every_n_steps=1)`` on a local store, one
  ``step`` (a periodic save: copy, background ``torch.save`` + SHA-256 + write + the first
  save's full read-back), then ``finish`` (waits for it; no second save at the same step).

Ratio = spotguard peak / baseline peak; goal <= 1.1 x. Contenders alternate over ``--trials``
(peak RSS does not depend on timing; the alternation only guards against drift).

Usage: python bench/snapshot_memory.py [--size 1024] (MiB) [--trials 1]
Smoke test (seconds): python bench/snapshot_memory.py --size 32
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import describe  # the bench folder is this script's

MiB = 2**20
CHUNK = 64 * MiB  # tensors of a real state dict are many and at most a few hundred MiB each


def child(kind: str, size: int, folder: Path) -> None:
    import torch

    from spotguard.trainer_hooks import SpotGuard

    tensors = {
        f"w{i}": torch.ones(min(CHUNK, size - i * CHUNK) // 4) for i in range(-(-size // CHUNK))
    }
    state = {"model": tensors}
    if kind == "baseline":
        state["copy"] = {name: tensor.clone() for name, tensor in tensors.items()}
    else:
        guard = SpotGuard(str(folder / "store"), every_n_steps=1, state_dir=folder / "run")
        guard.restore(state)
        guard.step(1, state)
        guard.finish(1, state)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB


def measure(kind: str, size: int) -> int:
    with tempfile.TemporaryDirectory(prefix="snapshot-memory-") as scratch:
        result = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--size", str(size // MiB), scratch],
            capture_output=True,
            text=True,
            check=True,
        )
    return int(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="state size in MiB")
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--child", choices=["baseline", "spotguard"], help=argparse.SUPPRESS)
    parser.add_argument("folder", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    print(describe(), flush=True)
    if args.size < 1 or args.trials < 1:
        parser.error("--size and --trials must be >= 1")
    size = args.size * MiB
    if args.child:
        child(args.child, size, args.folder)
        return
    peaks: dict[str, list[int]] = {"baseline": [], "spotguard": []}
    for _ in range(args.trials):
        for kind in peaks:
            peaks[kind].append(measure(kind, size))
    baseline, spotguard = (statistics.median(peaks[kind]) for kind in peaks)
    print(
        "| state | peak RSS: state + one copy (baseline) | peak RSS: spotguard periodic save "
        "| ratio | goal |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {args.size} MiB | {baseline / MiB:.0f} MiB | {spotguard / MiB:.0f} MiB "
        f"| {spotguard / baseline:.3f} x | <= 1.1 x |"
    )


if __name__ == "__main__":
    main()
