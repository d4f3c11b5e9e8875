"""Checkpoint benchmark: training stall, emergency save, restore, for 256 MiB and 1 GiB states.

Everything goes to one moto S3 server over HTTP (started here), so every contender faces the
same server. Every comparison runs its contenders in alternation (A, B, A, B, ...: moto's
throughput drifts, it is CPU-bound and shares the cores) and reports medians of ``--trials``.

The boto3 baseline (a training loop without spotguard) gets the same S3 tuning as spotguard,
taken from the one ``TransferSettings()`` both use: uploads in ``part_size`` parts with
``threads`` threads, downloads in ``download_part_size`` ranges with ``threads`` threads, and
a client whose connection pool and retry policy are configured as spotguard's S3 backend
configures its own. What differs is only the product: streaming serialization, SHA-256 of
every byte, the manifest commit, verification on restore.

Figures, per state size:

* stall per periodic checkpoint: what the training loop waits for.
  - spotguard: ``SpotGuard.step`` at a save step (copy into reused CPU buffers; the upload
    runs in the background), at steady state (saves 2 .. trials + 1);
  - the bare tensor copy (``torch.Tensor.copy_`` into preallocated buffers): the floor,
    measured idle and right before each of spotguard's saves (under the same load);
  - baseline: synchronous ``torch.save`` to a buffer + boto3 ``upload_fileobj`` (tuned as
    above), i.e. the baseline's emergency save below.
  Goal: stall <= 1.5 x copy and >= 10 x less than the synchronous save.
* emergency save (wall time and client CPU-seconds per GiB): spotguard's foreground save
  (``CheckpointStore.save``) vs ``torch.save`` to a buffer + ``upload_fileobj``.
* restore: ``CheckpointStore.load_state`` (verified while downloading) vs boto3
  ``download_fileobj`` + ``torch.load``.
* Lightning, per checkpoint inside ``fit`` (time spent in the checkpointing callback's
  ``on_train_batch_end`` at steps 2-3 of each fit; the median over all trials), both writing to
  local disk (an ``s3://`` dirpath for ModelCheckpoint needs s3fs, which downgrades boto3):
  ``SpotCheckpoint`` vs ``ModelCheckpoint(every_n_train_steps=1)`` with ``AsyncCheckpointIO``
  vs the same without. No S3 tuning is involved.

At the end the figures are printed again as the Markdown tables of bench/README.md.

Usage: python bench/checkpoint_io.py [--sizes 256 1024] (MiB) [--trials 3]
Smoke test (seconds): python bench/checkpoint_io.py --sizes 8 --trials 1
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import boto3
import torch
from boto3.s3.transfer import TransferConfig
from provenance import describe  # the bench folder is this script's

from spotguard.trainer_hooks import CheckpointStore, SpotGuard, TransferSettings
from spotguard.trainer_hooks.backends import S3Backend

MiB = 2**20

#: The one set of S3 tuning that spotguard and the boto3 baseline share (spotguard's defaults).
SETTINGS = TransferSettings()


def start_moto(niceness: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    """A moto server; ``niceness`` > 0 runs it at a lower priority (see train_throughput.py)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=(lambda: os.nice(niceness)) if niceness else None,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return process, f"http://127.0.0.1:{port}"


def start_moto_bucket(niceness: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    """A moto server that this process's boto3 clients reach, and a fresh bucket on it."""
    moto, url = start_moto(niceness)
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return moto, bucket


def baseline_client(settings: TransferSettings) -> Any:
    """A boto3 client configured as spotguard's S3 backend configures its own (the same
    function): a connection pool sized to the threads (botocore's default of 10 would cap 16
    threads), same retries, same checksum settings for a non-AWS endpoint."""
    return S3Backend.make_client(settings)


def upload_config(settings: TransferSettings) -> TransferConfig:
    """spotguard's upload tuning. (spotguard grows the part for files beyond ~9,000 parts;
    at the sizes benchmarked here the part is ``part_size``.)"""
    return TransferConfig(
        multipart_threshold=settings.part_size,
        multipart_chunksize=settings.part_size,
        max_concurrency=settings.threads,
    )


def download_config(settings: TransferSettings) -> TransferConfig:
    """spotguard's download tuning: ``download_part_size`` ranges, ``threads`` threads."""
    return TransferConfig(
        multipart_threshold=settings.download_part_size,
        multipart_chunksize=settings.download_part_size,
        max_concurrency=settings.threads,
        max_io_queue=1000,
    )


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(work: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) for ``work``."""
    cpu, wall = cpu_seconds(), time.perf_counter()
    work()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def alternate(
    contenders: dict[str, Callable[[int], object]], trials: int
) -> dict[str, list[tuple[float, float]]]:
    """Run the contenders in turn (A, B, A, B, ...), ``trials`` rounds; ``timed`` of each run.
    Each contender gets the round's index (0-based)."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for trial in range(trials):
        for name, work in contenders.items():
            runs[name].append(timed(lambda work=work, trial=trial: work(trial)))
    return runs


def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds of ``timed`` results."""
    walls, cpus = zip(*runs, strict=True)
    return statistics.median(walls), statistics.median(cpus)


def make_state(size_mib: int) -> dict[str, torch.Tensor]:
    tensors = max(1, size_mib // 64)
    per = size_mib * MiB // 4 // tensors
    return {f"layer{i}.weight": torch.randn(per) for i in range(tensors)}


def bench_size(size_mib: int, bucket: str, trials: int) -> dict[str, float]:
    state = make_state(size_mib)
    gib = size_mib / 1024
    client = baseline_client(SETTINGS)

    # A new key per trial, as spotguard writes a new step each time: replacing an object costs
    # moto extra work (see store_ceiling.py), which would handicap the baseline.
    def baseline_key(trial: int) -> str:
        return f"baseline/{size_mib}/{trial}/state.pt"

    results: dict[str, float] = {}

    buffers = {name: torch.empty_like(t) for name, t in state.items()}

    def copy() -> None:
        for name, tensor in state.items():
            buffers[name].copy_(tensor)

    copy()  # first touch: page faults are not the copy's cost
    results["copy"] = statistics.median(timed(copy)[0] for _ in range(trials))

    def sync_save(trial: int) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        client.upload_fileobj(buffer, bucket, baseline_key(trial), Config=upload_config(SETTINGS))

    prefix = f"s3://{bucket}/guard-{size_mib}"
    guard = SpotGuard(
        prefix, every_n_steps=1, keep_last=2, state_dir="/nonexistent", transfer=SETTINGS
    )
    holder = {"model": state}
    guard.restore(holder)
    guard.step(1, holder)  # first save allocates the buffers
    guard._core.wait()
    stalls, loaded_copies = [], []
    for step in range(2, 2 + trials):  # steady state
        # The floor again, under the same conditions as the stall right after it (moto is
        # still digesting the last upload and prune): the ratio is then spotguard's own cost.
        loaded_copies.append(timed(copy)[0])
        stalls.append(timed(lambda step=step: guard.step(step, holder))[0])
        guard._core.wait()
    results["guard_stall"] = statistics.median(stalls)
    results["copy_loaded"] = statistics.median(loaded_copies)
    guard.close()

    # Emergency save vs the baseline, alternating.
    store = CheckpointStore(prefix, transfer=SETTINGS)
    first_step = 2 + trials
    saves = alternate(
        {
            "sync": sync_save,
            "emergency": lambda trial: store.save(
                first_step + trial, {"state.pt": lambda handle: torch.save(state, handle)}
            ),
        },
        trials,
    )
    for name, runs in saves.items():
        results[f"{name}_wall"], results[f"{name}_cpu"] = medians(runs)
    results["sync_stall"] = results["sync_wall"]

    def baseline_restore() -> None:
        buffer = io.BytesIO()
        key = baseline_key(trials - 1)  # the last one saved, as spotguard restores its last
        client.download_fileobj(bucket, key, buffer, Config=download_config(SETTINGS))
        buffer.seek(0)
        torch.load(buffer, weights_only=True)

    last_step = first_step + trials - 1
    restores = alternate(
        {
            "restore": lambda trial: store.load_state(step=last_step),
            "baseline_restore": lambda trial: baseline_restore(),
        },
        trials,
    )
    for name, runs in restores.items():
        results[f"{name}_wall"], results[f"{name}_cpu"] = medians(runs)
    for key in ("sync_cpu", "emergency_cpu", "restore_cpu", "baseline_restore_cpu"):
        results[key] /= gib
    return results


def lightning_stalls(size_mib: int, trials: int) -> dict[str, float]:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.plugins.io import AsyncCheckpointIO
    from torch.utils.data import DataLoader, TensorDataset

    from spotguard.trainer_hooks.lightning import SpotCheckpoint

    class Big(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(size_mib * MiB // 4))

        def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
            return (self.weight[:8] * batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
            return DataLoader(TensorDataset(torch.ones(4, 8)), batch_size=1)

    class Breather(pl.Callback):
        """Time between steps, as real steps take: the previous save has finished."""

        def on_train_batch_start(self, *args: object) -> None:
            time.sleep(size_mib / 100)

    def stall(checkpointer: pl.Callback, plugins: list[object]) -> list[float]:
        """Seconds spent in the callback per checkpoint at steady state (the first save
        allocates), for one fit of 3 steps."""
        stalls: list[float] = []
        hook = checkpointer.on_train_batch_end

        def timed_hook(*args: object, **kwargs: object) -> None:
            started = time.perf_counter()
            hook(*args, **kwargs)  # type: ignore[arg-type]
            stalls.append(time.perf_counter() - started)

        checkpointer.on_train_batch_end = timed_hook  # type: ignore[method-assign]
        with tempfile.TemporaryDirectory() as root:
            trainer = pl.Trainer(
                max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=root, plugins=plugins, callbacks=[Breather(), checkpointer],
            )  # fmt: skip
            trainer.fit(Big())
        return stalls[1:]

    def spot() -> list[float]:
        with tempfile.TemporaryDirectory() as store:
            return stall(SpotCheckpoint(store, every_n_train_steps=1, keep_last=1), [])

    model_checkpoint = {"every_n_train_steps": 1, "save_top_k": -1}
    contenders: dict[str, Callable[[], list[float]]] = {
        "spot": spot,
        "async": lambda: stall(ModelCheckpoint(**model_checkpoint), [AsyncCheckpointIO()]),
        "sync": lambda: stall(ModelCheckpoint(**model_checkpoint), []),
    }
    pooled: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(trials):  # alternating: one fit of each per round
        for name, fit in contenders.items():
            pooled[name].extend(fit())
    return {name: statistics.median(values) for name, values in pooled.items()}


def print_tables(rows: dict[int, dict[str, float]], trials: int) -> None:
    def label(size: int) -> str:
        return f"{size // 1024} GiB" if size % 1024 == 0 else f"{size} MiB"

    print(f"\nMarkdown for bench/README.md (medians of {trials} alternating trials):\n")
    print("| state | copy idle | copy between saves | spotguard stall | stall / copy between "
          "saves | sync save + upload | sync / stall |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for size, r in rows.items():
        print(f"| {label(size)} | {r['copy']:.3f} s | {r['copy_loaded']:.3f} s | "
              f"{r['guard_stall']:.3f} s | {r['guard_stall'] / r['copy_loaded']:.2f} x | "
              f"{r['sync_stall']:.2f} s | "
              f"{r['sync_stall'] / r['guard_stall']:.0f} x |")  # fmt: skip
    print("\n| state | emergency save: spotguard | boto3 baseline | speed-up | "
          "client CPU-s/GiB (spotguard / baseline) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for size, r in rows.items():
        print(f"| {label(size)} | {r['emergency_wall']:.2f} s | {r['sync_wall']:.2f} s | "
              f"{r['sync_wall'] / r['emergency_wall']:.2f} x | "
              f"{r['emergency_cpu']:.2f} / {r['sync_cpu']:.2f} |")  # fmt: skip
    print("\n| state | restore: spotguard (verified) | boto3 baseline | speed-up | "
          "client CPU-s/GiB (spotguard / baseline) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for size, r in rows.items():
        print(f"| {label(size)} | {r['restore_wall']:.2f} s | {r['baseline_restore_wall']:.2f} s "
              f"| {r['baseline_restore_wall'] / r['restore_wall']:.2f} x | "
              f"{r['restore_cpu']:.2f} / {r['baseline_restore_cpu']:.2f} |")  # fmt: skip
    print("\n| state | SpotCheckpoint | ModelCheckpoint + AsyncCheckpointIO | ModelCheckpoint |")
    print("|---|---|---|---|")
    for size, r in rows.items():
        print(f"| {label(size)} | {r['lightning_spot']:.3f} s | {r['lightning_async']:.3f} s | "
              f"{r['lightning_sync']:.3f} s |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="MiB")
    parser.add_argument(
        "--trials", type=int, default=3, help="alternating rounds per comparison (default 3)"
    )
    args = parser.parse_args()
    print(describe(), flush=True)
    print(f"S3 tuning of spotguard and of the boto3 baseline alike: {SETTINGS}")
    moto, bucket = start_moto_bucket()
    rows: dict[int, dict[str, float]] = {}
    try:
        for size in args.sizes:
            r = bench_size(size, bucket, args.trials)
            print(f"\nstate {size} MiB (moto S3 over HTTP), medians of {args.trials} trials")
            print(f"  stall: copy {r['copy']:.3f} s idle, {r['copy_loaded']:.3f} s between saves "
                      f"| spotguard {r['guard_stall']:.3f} s ({r['guard_stall'] / r['copy']:.2f} x "
                      f"idle copy, {r['guard_stall'] / r['copy_loaded']:.2f} x copy between saves) "
                      "| sync torch.save+upload "
                      f"{r['sync_stall']:.3f} s ({r['sync_stall'] / r['guard_stall']:.0f} x "
                      "spotguard)", flush=True)  # fmt: skip
            print(f"  emergency save (alternating): spotguard "
                      f"{r['emergency_wall']:.2f} s, {r['emergency_cpu']:.2f} CPU-s/GiB | "
                      f"baseline {r['sync_wall']:.2f} s, {r['sync_cpu']:.2f} CPU-s/GiB | "
                      f"speed-up {r['sync_wall'] / r['emergency_wall']:.2f} x",
                      flush=True)  # fmt: skip
            print(f"  restore (alternating): spotguard (verified) {r['restore_wall']:.2f} s, "
                      f"{r['restore_cpu']:.2f} CPU-s/GiB | baseline "
                      f"{r['baseline_restore_wall']:.2f} s, {r['baseline_restore_cpu']:.2f} "
                      f"CPU-s/GiB | speed-up "
                      f"{r['baseline_restore_wall'] / r['restore_wall']:.2f} x",
                      flush=True)  # fmt: skip
            lightning = lightning_stalls(size, args.trials)
            r.update({f"lightning_{name}": value for name, value in lightning.items()})
            print(f"  Lightning, per checkpoint (local disk, alternating): SpotCheckpoint "
                  f"{lightning['spot']:.3f} s | ModelCheckpoint + AsyncCheckpointIO "
                  f"{lightning['async']:.3f} s | ModelCheckpoint "
                  f"{lightning['sync']:.3f} s", flush=True)  # fmt: skip
            rows[size] = r
    finally:
        moto.terminate()
        moto.wait(10)
    print_tables(rows, args.trials)


if __name__ == "__main__":
    sys.exit(main())
