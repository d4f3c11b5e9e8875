"""Training throughput with periodic saves in the background, against the same loop without.

Why this exists: the stall at the step boundary (``bench/checkpoint_io.py``) is not the whole
cost of a periodic save. While training goes on, the save's serialization, SHA-256 and upload
threads compete with it for the GIL and the cores; that benchmark waits for the upload outside
its timed part, so it cannot see them. Here the upload happens inside the timed window.

The step is real work: forward, backward and an SGD step of a small MLP, repeated to take
about ``--step-ms`` (calibrated at start). It holds the GIL between its torch ops and keeps
the cores busy inside them, as a training step does; a sleep would release both and hide the
contention. It runs on ``--threads`` intra-op threads (default 1): it stands for a GPU
step's host side, one thread dispatching ops; with torch's default (a thread per core) every op
also waits at a barrier for whichever of its threads a background thread preempted, which
measures OpenMP on a full machine more than it measures spotguard.

Contenders, in the same run, alternating (bare, spotguard, bare, spotguard, ...), ``--trials``
rounds, medians:

* bare: ``--steps`` steps, nothing else (the state below sits in memory, unsaved).
* spotguard: the same steps with ``SpotGuard.step`` at every boundary, saving the state (the
  MLP, its optimizer and ``--size`` MiB of other tensors) every ``--every`` steps to a moto S3
  server over HTTP (started here), with spotguard's default transfer settings. Each round
  uses a fresh prefix; its first save (the one that allocates the copy buffers) is made and
  waited for before the window. The window opens at the boundary of a save step and covers
  ``--steps`` steps (a multiple of ``--every``: that many complete save cycles, every save
  started inside it) and then the wait for the last upload and commit: no upload is left
  outside the window. ``keep_last=None``, so the script can count the saves committed in the
  window from the store afterwards (pruning, one listing and one delete per save, is left out).

ratio = spotguard steps/s / bare steps/s (medians); goal >= 0.95. The per-round ratios are
printed too. With ``--store moto`` (the default) moto runs on the same cores as training, as it
did in the other scripts: its CPU time (parsing and storing every byte, which an S3 endpoint
does on its own machines) is counted against spotguard here. ``--store local`` saves to a
local directory instead: what spotguard's own work (snapshot, serialization, SHA-256, writing)
costs the training loop, without a server on the same cores. ``--moto-nice 19`` runs moto at
the lowest priority: the endpoint still shares the cores, but yields them to training as a
remote S3 would not need to (a middle ground between the two). ``--save-niceness`` is
spotguard's ``save_niceness`` (default: the product's), the priority of the background save
below training's (0: the same as training).

Usage: python bench/train_throughput.py [--size 256] [--every 50] [--steps 200] [--step-ms 50]
[--trials 3] [--threads 1] [--store moto|local] [--moto-nice 0] [--save-niceness 10]
Smoke test (seconds): python bench/train_throughput.py --size 8 --every 5 --steps 10
--step-ms 10 --trials 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from checkpoint_io import make_state, start_moto_bucket
from provenance import describe  # the bench folder is this script's
from torch import nn

from spotguard.trainer_hooks import CheckpointStore, GuardSettings, SpotGuard


def training_step(step_ms: float) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    """A model, its optimizer and a step of about ``step_ms``: enough repetitions of one
    forward/backward/SGD micro-step, measured here (the fastest of 20 after a warm-up: the
    machine may be busy for a moment, and a step that ends up longer than asked for under load
    is still a fair comparison, a shorter one would over-weight the saves). The
    micro-step is small (under a millisecond on a quiet core) so the step's length can be
    matched closely, and so a step is many ops, each dispatched by Python, as real ones are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 1))  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    inputs, targets = torch.randn(64, 256), torch.randn(64, 1)

    def micro() -> None:
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):
        micro()
    took = []
    for _ in range(20):
        started = time.perf_counter()
        micro()
        took.append(time.perf_counter() - started)
    repeats = max(1, round(step_ms / 1000 / min(took)))
    print(f"step: {repeats} x forward/backward/SGD of a 256-256-256-1 MLP on 64 samples "
          f"(the fastest of 20 took {min(took) * 1000:.2f} ms)", flush=True)  # fmt: skip

    def step() -> None:
        for _ in range(repeats):
            micro()

    return model, optimizer, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="MiB of state besides the MLP")
    parser.add_argument("--every", type=int, default=50, help="steps between saves")
    parser.add_argument("--steps", type=int, default=200, help="timed steps, a multiple of every")
    parser.add_argument("--step-ms", type=float, default=50.0, help="target step time")
    parser.add_argument("--trials", type=int, default=3, help="alternating rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--store", choices=("moto", "local"), default="moto",
                        help="a moto S3 server on these cores, or a local directory")  # fmt: skip
    parser.add_argument("--moto-nice", type=int, default=0, help="moto's niceness (0 to 19)")
    parser.add_argument("--save-niceness", type=int, default=GuardSettings.save_niceness,
                        help="spotguard's save_niceness (0 to 19; 0: as training)")  # fmt: skip
    args = parser.parse_args()
    print(describe(), flush=True)
    torch.set_num_threads(args.threads)
    if args.steps % args.every:
        parser.error("--steps must be a multiple of --every (whole save cycles)")
    model, optimizer, step = training_step(args.step_ms)
    state = {"model": model, "optimizer": optimizer, "other": make_state(args.size)}
    if args.store == "moto":
        moto, bucket = start_moto_bucket(args.moto_nice)
        root = f"s3://{bucket}"
    else:
        moto, local = None, tempfile.TemporaryDirectory(prefix="train-throughput-")
        root = local.name
    rates: dict[str, list[float]] = {"bare": [], "spotguard": []}
    saves: list[int] = []

    def bare() -> float:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        return time.perf_counter() - started

    def guarded(trial: int) -> float:
        prefix = f"{root}/trial-{trial}"
        first = args.every
        with SpotGuard(prefix, every_n_steps=first, keep_last=None, state_dir="/nonexistent",
                       save_niceness=args.save_niceness) as guard:  # fmt: skip
            guard.restore(state)
            guard.step(first, state)  # allocates the copy buffers: before the window
            guard._core.wait()
            started = time.perf_counter()
            for number in range(2 * first, 2 * first + args.steps):
                guard.step(number, state)  # saves at 2 * every, 3 * every, ...: in the window
                step()
            guard._core.wait()  # the last upload and its commit, inside the window
            took = time.perf_counter() - started
        store = CheckpointStore(prefix)
        steps = [manifest.step for manifest in store.list()]
        saves.append(sum(1 for saved in steps if saved > first))
        for saved in steps:  # the store keeps every object: free its memory/disk between rounds
            store.delete(saved)
        return took

    try:
        for trial in range(args.trials):
            rates["bare"].append(args.steps / bare())
            rates["spotguard"].append(args.steps / guarded(trial))
            print(f"round {trial + 1}: bare {rates['bare'][-1]:.2f} steps/s, spotguard "
                  f"{rates['spotguard'][-1]:.2f} steps/s ({saves[-1]} saves committed in the "
                  f"window), ratio {rates['spotguard'][-1] / rates['bare'][-1]:.3f}",
                  flush=True)  # fmt: skip
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(10)
        else:
            local.cleanup()
    bare_rate, guard_rate = (statistics.median(rates[name]) for name in ("bare", "spotguard"))
    rounds = [g / b for b, g in zip(rates["bare"], rates["spotguard"], strict=True)]
    print(f"\nMarkdown for bench/README.md (medians of {args.trials} alternating rounds):\n")
    niced = args.store == "moto" and args.moto_nice
    store = f"moto (nice {args.moto_nice})" if niced else args.store
    print("| store | save niceness | state | save every | step | steps timed | bare | spotguard "
          "| saves committed in window | ratio | per-round ratios |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {store} | {args.save_niceness} | {args.size} MiB | {args.every} steps "
          f"| {1000 / bare_rate:.0f} ms | "
          f"{args.steps} | "
          f"{bare_rate:.2f} steps/s | {guard_rate:.2f} steps/s | "
          f"{', '.join(map(str, saves))} | {guard_rate / bare_rate:.3f} x | "
          f"{', '.join(f'{r:.3f}' for r in rounds)} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
