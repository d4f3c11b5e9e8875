"""What only a machine with CUDA can show, in one run of a few minutes.

    .venv/bin/python bench/gpu_check.py

1. pinned staging: snapshot buffers of GPU tensors are page-locked, and no larger than the
   tensor plus alignment (``pin_memory=True`` would round them up to a power of two);
2. copies from every device land before the snapshot is used, whichever device is current;
3. CUDA RNG states round-trip, and a checkpoint holding more devices' states than this machine
   has is restored with a warning, not an error;
4. a run interrupted by a real SIGUSR1 (exit 75) and resumed in a new process ends with weights
   bit-identical to an uninterrupted run: one process, and 2 ranks on NCCL when 2 GPUs exist
   (the signal goes to the last rank only);
5. Lightning's ``FSDPStrategy(state_dict_type="sharded")`` under SpotCheckpoint (format
   ``dcp``): a fit interrupted by a real SIGUSR1 (exit 75, an emergency checkpoint with every
   rank's files) and resumed in new processes ends with the weights and Adam's state of an
   uninterrupted fit, bit for bit, and the resumed fit started at the emergency checkpoint's
   step (not an earlier periodic one): one process, and 2 ranks when 2 GPUs exist. At one
   process FSDP runs ``NO_SHARD`` (torch's FSDP at world size 1): nothing is sharded, the
   check covers the save/resume path only; the sharded case is the 2-rank one (the model's
   ``Linear(width, 1)`` head then gives one rank an empty shard);
6. the per-step cost of the guard's step-boundary call (the stop agreement) as a ratio of a
   bare step, medians of alternating blocks, with every rank the machine has (up to 2).

Without CUDA it prints "skipped: no CUDA" and exits 0 (CPU CI runs it that way). Exit 1 when
any check fails. Uses a local store in a temporary folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from spotguard.trainer_hooks import Preempted, SpotGuard
from spotguard.trainer_hooks._internals import rng
from spotguard.trainer_hooks._internals.snapshot import PAGE, Snapshotter

TOTAL, STOP_AT, EVERY = 30, 17, 10
SEED = 7
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures.append(what)


def pinned_staging() -> None:
    source = torch.arange(3 * 2**20 + 7, dtype=torch.float32, device="cuda")  # 12 MiB + 28 B
    nbytes = source.numel() * 4
    (buffer,) = Snapshotter().copy([source])
    locked = buffer.untyped_storage().nbytes()
    rounded = 1 << (nbytes - 1).bit_length()
    check(buffer.is_pinned(), "snapshot buffer of a GPU tensor is page-locked")
    check(
        locked <= nbytes + 2 * PAGE,
        f"{nbytes} B staged in {locked} B (pin_memory=True would take {rounded} B)",
    )
    check(torch.equal(buffer, source.cpu()), "staged bytes equal the tensor")


def copies_from_every_device() -> None:
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    tensors = {str(d): torch.zeros(2**22, device=d) for d in devices}
    snapshots = Snapshotter()
    snapshots.copy(tensors)  # the buffers exist (zeros): a copy that has not landed shows
    for value, device in enumerate(devices, start=1):
        with torch.cuda.device(device):  # the write lands late, the latest off device 0
            torch.cuda._sleep(200_000_000 * value)  # GPU cycles: ~0.1 s per device index
            tensors[str(device)].fill_(value)
    torch.cuda.set_device(0)  # the current device: the one a bare synchronize() waits for
    copied = snapshots.copy(tensors)
    landed = all(bool((copied[str(d)] == v).all()) for v, d in enumerate(devices, start=1))
    check(landed, f"copies from {len(devices)} device(s) landed when copy() returned")


def rng_round_trip() -> None:
    count = torch.cuda.device_count()
    for index in range(count):
        torch.randn(3, device=f"cuda:{index}")  # every device's generator in use
    state = rng.capture()
    before = [torch.rand(5, device=f"cuda:{i}") for i in range(count)]
    rng.restore(state)
    after = [torch.rand(5, device=f"cuda:{i}") for i in range(count)]
    check(len(state.get("cuda", [])) == count, f"CUDA RNG states of {count} device(s) captured")
    check(all(map(torch.equal, before, after)), "CUDA RNG states round-trip")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("spotguard.trainer_hooks")
    logger.addHandler(handler)
    try:
        rng.restore({**state, "cuda": [*state["cuda"], state["cuda"][0]]})  # one device more
        restored, error = True, ""
    except Exception as exc:
        restored, error = False, repr(exc)
    finally:
        logger.removeHandler(handler)
    check(restored, f"a checkpoint from a machine with more GPUs restores {error}".rstrip())
    check(any("CUDA RNG" in r.getMessage() for r in records), "... and says so in a warning")


def launch(phase: str, world: int, folder: Path) -> list[int]:
    """Run ``phase`` on ``world`` fresh processes; their exit codes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                phase,
                str(rank),
                str(world),
                str(port),
                str(folder),
                "cuda",
            ],
            env=env,
        )
        for rank in range(world)
    ]
    codes = []
    for child in children:
        try:
            codes.append(child.wait(timeout=300))
        except subprocess.TimeoutExpired:
            child.kill()
            codes.append(child.wait())
    return codes


def interrupted_run(world: int) -> None:
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        folder = Path(scratch)
        reference = launch("reference", world, folder)
        interrupted = launch("interrupted", world, folder)
        resumed = launch("resumed", world, folder)
        check(
            reference == [0] * world and resumed == [0] * world,
            f"{world} rank(s): reference and resumed runs exit 0 ({reference}, {resumed})",
        )
        check(
            interrupted == [75] * world,
            f"{world} rank(s): SIGUSR1 -> exit 75 on every rank ({interrupted})",
        )
        if (folder / "reference.pt").exists() and (folder / "resumed.pt").exists():
            want = torch.load(folder / "reference.pt", weights_only=True)
            got = torch.load(folder / "resumed.pt", weights_only=True)
            same = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        else:
            same = False
        check(same, f"{world} rank(s): interrupted + resumed weights bit-identical")


def build(width: int, depth: int, device: torch.device) -> nn.Module:
    torch.manual_seed(SEED)  # the same initial weights in every run and on every rank
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU(), nn.Dropout(0.2)]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.2)]
    return nn.Sequential(*layers, nn.Linear(width, 1)).to(device)


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: int) -> None:
    device = next(model.parameters()).device
    features = torch.randn(batch, 64, device=device)  # the device's generator: restored too
    loss = nn.functional.mse_loss(model(features), features.sum(1, keepdim=True).sin())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def train(phase: str, rank: int, world: int, folder: Path, device: torch.device) -> int:
    model = build(1024, 2, device)  # 4 MiB weights: staged in page-locked buffers
    torch.manual_seed(SEED + rank + (1000 if phase == "resumed" else 0))  # restore must fix it
    module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    state = {"model": module, "optimizer": optimizer}
    if phase == "reference":
        for _ in range(TOTAL):
            one_step(module, optimizer, 32)
    else:
        with SpotGuard(
            str(folder / "store"), every_n_steps=EVERY, state_dir=folder / f"run-{rank}"
        ) as guard:
            step = guard.restore(state)
            while step < TOTAL:
                one_step(module, optimizer, 32)
                step += 1
                if phase == "interrupted" and step == STOP_AT and rank == world - 1:
                    os.kill(os.getpid(), signal.SIGUSR1)  # the node's notice, on one rank
                guard.step(step, state)
            guard.finish(step, state)
        if phase == "interrupted":
            print(f"rank {rank}: the interrupted run was never stopped", flush=True)
            return 1
    if rank == 0:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, folder / f"{phase}.pt")
    return 0


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole model and optimizer state, gathered to the CPU (a collective: every rank)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, optimizer, options=options),
    }


def same(want: object, got: object) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and torch.equal(want.cpu(), got.cpu())
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and want.keys() == got.keys()
            and all(same(want[k], got[k]) for k in want)
        )
    if isinstance(want, (list, tuple)):
        return (
            isinstance(got, (list, tuple)) and len(want) == len(got) and all(map(same, want, got))
        )
    return want == got


def lightning_fsdp(phase: str, rank: int, world: int, folder: Path) -> int:
    """One rank of a Lightning fit under FSDPStrategy with SpotCheckpoint; the processes are
    launched here (``LOCAL_RANK`` set: Lightning takes them as launched for it)."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")
    import lightning.pytorch as pl

    from spotguard.trainer_hooks import ResumableDataLoader
    from spotguard.trainer_hooks.lightning import SpotCheckpoint

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build(1024, 2, torch.device("cpu"))

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            (features,) = batch
            return nn.functional.mse_loss(self.net(features), features.sum(1, keepdim=True).sin())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

        def train_dataloader(self) -> ResumableDataLoader:
            features = torch.randn(512, 64, generator=torch.Generator().manual_seed(SEED))
            dataset = torch.utils.data.TensorDataset(features)
            return ResumableDataLoader(dataset, batch_size=32, shuffle=True, seed=SEED)

    class Notice(pl.Callback):
        """The node's notice, on the last rank, before SpotCheckpoint's hook sees the step;
        the step the fit starts at."""

        def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            started.append(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            stopping = phase == "fsdp-interrupted" and trainer.global_step == STOP_AT
            if stopping and rank == world - 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    started: list[int] = []
    store = folder / ("fsdp-reference-store" if phase == "fsdp-reference" else "fsdp-store")
    spot = SpotCheckpoint(str(store), every_n_train_steps=EVERY, state_dir=folder / f"run-{rank}")
    strategy = pl.strategies.FSDPStrategy(state_dict_type="sharded", timeout=timedelta(seconds=120))
    trainer = pl.Trainer(
        max_steps=TOTAL, accelerator="cuda", devices=world, strategy=strategy, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, deterministic=True, callbacks=[Notice(), spot],
    )  # fmt: skip
    pl.seed_everything(SEED + (1000 if phase == "fsdp-resumed" else 0))  # restore must fix it
    trainer.fit(Model())
    if phase == "fsdp-interrupted":
        print(f"rank {rank}: the interrupted fit was never stopped", flush=True)
        return 1
    full = full_state(trainer.strategy.model, trainer.optimizers[0])
    if rank == 0:
        torch.save(full, folder / f"{phase}.pt")
    resumed = {"resumed_from": spot.resumed_from, "started_at": started[0] if started else None}
    (folder / f"{phase}-rank{rank}.json").write_text(json.dumps(resumed))
    return 0


def fsdp_interrupted_run(world: int) -> None:
    from spotguard.trainer_hooks import CheckpointStore

    sharding = "FULL_SHARD" if world > 1 else "NO_SHARD: nothing sharded at 1 rank"
    what = f"Lightning FSDPStrategy, {world} rank(s) ({sharding})"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        folder = Path(scratch)
        reference = launch("fsdp-reference", world, folder)
        interrupted = launch("fsdp-interrupted", world, folder)
        saved = CheckpointStore(str(folder / "fsdp-store")).latest()
        resumed = launch("fsdp-resumed", world, folder)
        check(
            reference == [0] * world and resumed == [0] * world,
            f"{what}: reference and resumed fits exit 0 ({reference}, {resumed})",
        )
        check(interrupted == [75] * world, f"{what}: SIGUSR1 -> exit 75 ({interrupted})")
        # Each rank's own file: rank-<k>-<save id>.pt
        own = {
            int(found[1])
            for name in (saved.files if saved is not None else ())
            if (found := re.fullmatch(r"rank-(\d+)-[0-9a-f]+\.pt", name))
        }
        check(
            saved is not None
            and (saved.kind, saved.format, saved.world_size) == ("emergency", "dcp", world)
            and own == set(range(world))
            and sum(name.endswith(".distcp") for name in saved.files) == world,
            f"{what}: emergency checkpoint in format dcp with every rank's files "
            f"({saved and (saved.step, saved.kind, saved.format, sorted(saved.files))})",
        )
        starts = [
            json.loads(path.read_text()) if path.exists() else None
            for path in (folder / f"fsdp-resumed-rank{rank}.json" for rank in range(world))
        ]
        emergency = None if saved is None else saved.step
        check(
            emergency is not None
            and starts == [{"resumed_from": emergency, "started_at": emergency}] * world,
            f"{what}: the resumed fit started from the emergency checkpoint's step "
            f"({emergency}; by rank: {starts})",
        )
        if (folder / "fsdp-reference.pt").exists() and (folder / "fsdp-resumed.pt").exists():
            want = torch.load(folder / "fsdp-reference.pt", weights_only=True)
            got = torch.load(folder / "fsdp-resumed.pt", weights_only=True)
            equal = same(want, got)
        else:
            equal = False
        check(equal, f"{what}: interrupted + resumed weights and Adam state bit-identical")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: a step's time is when it is done, not queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement_cost(rank: int, world: int, folder: Path, device: torch.device) -> int:
    """Blocks of bare steps and of steps with ``guard.step`` alternate; medians per step."""
    model = build(4096, 3, device)  # tens of ms per step on one GPU
    module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)
    state = {"model": module, "optimizer": optimizer}
    times: dict[bool, list[float]] = {False: [], True: []}
    with SpotGuard(
        str(folder / "cost-store"), every_n_steps=10**9, state_dir=folder / f"run-{rank}"
    ) as guard:
        step = guard.restore(state)
        for _ in range(3):
            one_step(module, optimizer, 4096)
        for _ in range(5):
            for guarded in (False, True):
                sync(device)
                started = time.perf_counter()
                for _ in range(10):
                    one_step(module, optimizer, 4096)
                    if guarded:
                        step += 1
                        guard.step(step, state)
                sync(device)
                times[guarded].append((time.perf_counter() - started) / 10)
    if rank == 0:
        bare, guarded_step = statistics.median(times[False]), statistics.median(times[True])
        print(
            f"stop agreement, {world} rank(s){' (no collective)' if world == 1 else ''}: "
            f"bare step {bare * 1e3:.2f} ms, with guard.step {guarded_step * 1e3:.2f} ms, "
            f"ratio {guarded_step / bare:.3f} x (goal <= 1.02 x)",
            flush=True,
        )
    return 0


def worker(phase: str, rank: int, world: int, port: int, folder: Path, kind: str) -> int:
    """One rank of one phase, in a fresh process (``kind``: the device type)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.use_deterministic_algorithms(True)
    device = torch.device(kind, rank) if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(device)
    if phase.startswith("fsdp-"):  # Lightning sets up its process group itself
        try:
            return lightning_fsdp(phase, rank, world, folder)
        except Preempted:
            return 75
    if world > 1:
        backend = "nccl" if kind == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=120))
    try:
        if phase == "cost":
            return agreement_cost(rank, world, folder, device)
        return train(phase, rank, world, folder, device)
    except Preempted:
        return 75
    finally:
        if world > 1:
            dist.destroy_process_group()


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        phase, rank, world, port, folder, kind = sys.argv[2:8]
        return worker(phase, int(rank), int(world), int(port), Path(folder), kind)
    if not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA")
        return 0
    count = torch.cuda.device_count()
    print(f"gpu_check: {count} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    started = time.monotonic()
    pinned_staging()
    copies_from_every_device()
    rng_round_trip()
    for world in sorted({1, min(count, 2)}):
        interrupted_run(world)
    for world in sorted({1, min(count, 2)}):
        fsdp_interrupted_run(world)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        codes = launch("cost", min(count, 2), Path(scratch))
        check(codes == [0] * min(count, 2), f"agreement cost measured ({codes})")
    print(f"gpu_check: {len(failures)} failure(s) in {time.monotonic() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
