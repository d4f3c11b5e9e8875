"""Checkpoint benchmark: training stall, emergency save, restore, for 256 MiB and 1 GiB states.

Everything goes to one moto S3 server over HTTP (started here), so every contender faces the
same server. Figures, per state size:

* stall per periodic checkpoint: what the training loop waits for.
  - spotguard: ``SpotGuard.step`` at a save step (copy into reused CPU buffers; the upload
    runs in the background), measured at steady state (second save);
  - baseline: synchronous ``torch.save`` to a buffer + boto3 ``upload_fileobj`` (what a
    training loop without spotguard does);
  - the bare tensor copy (``torch.Tensor.copy_`` into preallocated buffers): the floor.
  Goal: stall <= 1.5 x copy and >= 10 x less than the synchronous save.
* emergency save (wall time and client CPU-seconds per GiB): spotguard's foreground save
  vs ``torch.save`` to a buffer + ``upload_fileobj`` with boto3 defaults.
* restore: ``CheckpointStore.load_state`` (verified while downloading) vs boto3
  ``download_fileobj`` with defaults + ``torch.load``.

* Lightning, per checkpoint inside ``fit`` (time spent in the checkpointing callback's
  ``on_train_batch_end``, median of steps 2-4), both writing to local disk (an ``s3://``
  dirpath for ModelCheckpoint needs s3fs, which downgrades boto3): ``SpotCheckpoint`` vs
  ``ModelCheckpoint(every_n_train_steps=1)`` with ``AsyncCheckpointIO`` vs the same without.

Usage: python bench/checkpoint_io.py [--sizes 256 1024] (MiB)
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

import boto3
import torch

from spotguard.trainer_hooks import CheckpointStore, SpotGuard

MiB = 2**20


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return process, f"http://127.0.0.1:{port}"


def start_moto_bucket() -> tuple[subprocess.Popen[bytes], str]:
    """A moto server that this process's boto3 clients reach, and a fresh bucket on it."""
    moto, url = start_moto()
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return moto, bucket


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(work: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) for ``work``."""
    cpu, wall = cpu_seconds(), time.perf_counter()
    work()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def make_state(size_mib: int) -> dict[str, torch.Tensor]:
    tensors = max(1, size_mib // 64)
    per = size_mib * MiB // 4 // tensors
    return {f"layer{i}.weight": torch.randn(per) for i in range(tensors)}


def bench_size(size_mib: int, bucket: str) -> dict[str, float]:
    state = make_state(size_mib)
    gib = size_mib / 1024
    client = boto3.client("s3")
    results: dict[str, float] = {}

    buffers = {name: torch.empty_like(t) for name, t in state.items()}
    for name, tensor in state.items():  # first touch: page faults are not the copy's cost
        buffers[name].copy_(tensor)
    results["copy"], _ = timed(lambda: [buffers[n].copy_(t) for n, t in state.items()])

    def sync_save() -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        client.upload_fileobj(buffer, bucket, f"baseline/{size_mib}/state.pt")

    prefix = f"s3://{bucket}/guard-{size_mib}"
    guard = SpotGuard(prefix, every_n_steps=1, keep_last=2, state_dir="/nonexistent")
    holder = {"model": state}
    guard.restore(holder)
    guard.step(1, holder)  # first save allocates the buffers
    guard._core.wait()
    stalls, loaded_copies = [], []
    for step in (2, 3, 4):  # steady state: the median of three saves
        # The floor again, under the same conditions as the stall right after it (moto is
        # still digesting the last upload and prune): the ratio is then spotguard's own cost.
        loaded_copies.append(timed(lambda: [buffers[n].copy_(t) for n, t in state.items()])[0])
        stalls.append(timed(lambda step=step: guard.step(step, holder))[0])
        guard._core.wait()
    results["guard_stall"] = statistics.median(stalls)
    results["copy_loaded"] = statistics.median(loaded_copies)
    guard.close()

    # Emergency save vs the baseline, alternating three times each: the server's throughput
    # drifts (it is CPU-bound and shares the cores), so single runs are too noisy to compare.
    store = CheckpointStore(prefix)
    trials: dict[str, list[tuple[float, float]]] = {"sync": [], "emergency": []}
    for trial in range(3):
        trials["sync"].append(timed(sync_save))
        trials["emergency"].append(timed(
            lambda step=5 + trial: store.save(
                step, {"state.pt": lambda handle: torch.save(state, handle)}
            )
        ))  # fmt: skip
    for name in ("sync", "emergency"):
        walls, cpus = zip(*trials[name], strict=True)
        results[f"{name}_wall"] = statistics.median(walls)
        results[f"{name}_cpu"] = statistics.median(cpus)
    results["sync_stall"] = results["sync_wall"]
    results["restore_wall"], results["restore_cpu"] = timed(lambda: store.load_state(step=7))

    def baseline_restore() -> None:
        buffer = io.BytesIO()
        client.download_fileobj(bucket, f"baseline/{size_mib}/state.pt", buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)

    results["baseline_restore_wall"], results["baseline_restore_cpu"] = timed(baseline_restore)
    for key in ("sync_cpu", "emergency_cpu", "restore_cpu", "baseline_restore_cpu"):
        results[key] /= gib
    return results


def lightning_stalls(size_mib: int) -> dict[str, float]:
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

    def stall(checkpointer: pl.Callback, plugins: list[object]) -> float:
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
        return statistics.mean(stalls[1:])  # steady state: the first save allocates

    with tempfile.TemporaryDirectory() as store:
        spot = stall(SpotCheckpoint(store, every_n_train_steps=1, keep_last=1), [])
    model_checkpoint = {"every_n_train_steps": 1, "save_top_k": -1}
    return {
        "spot": spot,
        "async": stall(ModelCheckpoint(**model_checkpoint), [AsyncCheckpointIO()]),
        "sync": stall(ModelCheckpoint(**model_checkpoint), []),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    args = parser.parse_args()
    moto, bucket = start_moto_bucket()
    try:
        for size in args.sizes:
            r = bench_size(size, bucket)
            print(f"\nstate {size} MiB (moto S3 over HTTP)")
            print(f"  stall: copy {r['copy']:.3f} s idle, {r['copy_loaded']:.3f} s between saves "
                      f"| spotguard {r['guard_stall']:.3f} s ({r['guard_stall'] / r['copy']:.2f} x "
                      f"idle copy, {r['guard_stall'] / r['copy_loaded']:.2f} x copy between saves) "
                      "| sync torch.save+upload "
                      f"{r['sync_stall']:.3f} s ({r['sync_stall'] / r['guard_stall']:.0f} x "
                      "spotguard)")  # fmt: skip
            print(f"  emergency save (median of 3, alternating): spotguard "
                      f"{r['emergency_wall']:.2f} s, {r['emergency_cpu']:.2f} CPU-s/GiB | "
                      f"baseline {r['sync_wall']:.2f} s, {r['sync_cpu']:.2f} CPU-s/GiB | "
                      f"speed-up {r['sync_wall'] / r['emergency_wall']:.2f} x")  # fmt: skip
            print(f"  restore: spotguard (verified) {r['restore_wall']:.2f} s, "
                      f"{r['restore_cpu']:.2f} CPU-s/GiB | baseline "
                      f"{r['baseline_restore_wall']:.2f} s, {r['baseline_restore_cpu']:.2f} "
                      f"CPU-s/GiB | speed-up "
                      f"{r['baseline_restore_wall'] / r['restore_wall']:.2f} x")  # fmt: skip
            lightning = lightning_stalls(size)
            print(f"  Lightning, per checkpoint (local disk): SpotCheckpoint "
                  f"{lightning['spot']:.3f} s | ModelCheckpoint + AsyncCheckpointIO "
                  f"{lightning['async']:.3f} s | ModelCheckpoint "
                  f"{lightning['sync']:.3f} s")  # fmt: skip
    finally:
        moto.terminate()
        moto.wait(10)


if __name__ == "__main__":
    sys.exit(main())
