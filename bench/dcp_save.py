"""Sharded (DCP) saves against today's rank-0 whole-state save, at 1, 2 and 4 ranks.

Why: ``save_sharded`` lets every rank write its own shard file through the checkpoint store
at the same time, where today's path has rank 0 alone ``torch.save`` the whole state while the
others wait. Whether that is faster depends on what bounds a save on the machine: the store
(disk, server), or the CPU that serializes and hashes the bytes. This script measures both
paths and the bound in one run.

Each world size is one launch of gloo ranks (subprocesses of this script). The same total
state (``--size`` MiB of float32 in ``--tensors`` 2-D tensors of 1024 columns) is saved, on
a local store and on a moto S3 server over HTTP (started here), by these contenders,
alternating trial by trial (ceiling, rank 0, DCP sharded, DCP replicated, ceiling, ...):

* ``ceiling``: every rank writes its 1/N of the bytes raw, at once (local: a file + fsync in
  the store's directory; moto: boto3 ``upload_fileobj`` with spotguard's tuning), no torch, no
  hashing: what the store can take from N writers;
* ``rank0`` (the baseline): rank 0 puts ``state.pt`` (``torch.save`` of the whole state,
  streamed through ``CheckpointStore.put``), the other ranks their small ``rank-<k>.pt``, and
  rank 0 commits them: the layout of today's ``Saver``. With sharded state it would first
  have to gather the state on rank 0; that gather is not counted (in the baseline's favour);
* ``sharded``: ``save_sharded`` of DTensors ``Shard(0)`` over the world (each rank 1/N);
* ``replicated``: ``save_sharded`` of plain tensors held whole by every rank (DDP): DCP's
  planner writes each tensor once, spread over the ranks; every rank first hashes every
  tensor (the per-rank-state check), which the script also times on its own.

A trial runs from a barrier to a barrier (every rank done). Per contender it reports the
median wall time, the speed-up over ``rank0`` and, for ``sharded``, the scaling efficiency
``(t1 / tN) / N``; per rank the CPU seconds and, with moto, the server's CPU seconds, so that
``busy = CPU seconds of all of them / (wall x cores)`` says whether the cores were the bound.

Then restores at a changed world size: the sharded state saved at 2 ranks is loaded with
``load_sharded`` into DTensors at 1, 2 and 4 ranks (every value checked), timed against the
same-size 2 -> 2 restore. (Restores of different world sizes run in different launches, so
they cannot alternate.)

Usage: python bench/dcp_save.py [--size 512] [--tensors 8] [--trials 3] [--stores local moto]
       [--worlds 1 2 4] [--quick]
It prints Markdown tables, then one line of JSON with every figure.
Smoke test (seconds): python bench/dcp_save.py --quick --stores local
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from provenance import describe  # the bench folder is this script's

MiB = 2**20
#: Columns of every tensor: 2-D weights sharded by rows, as FSDP shards them. (A 1-D tensor
#: of millions of elements would make DTensor's planning build an index of every element.)
COLUMNS = 1024
#: The step of the 2-rank sharded save that every restore loads.
REFERENCE_STEP = 1
#: Contenders of a save trial, in the order they alternate.
SAVES = ("ceiling", "rank0", "sharded", "replicated")
#: How long one launch of ranks may take before it counts as hung.
LAUNCH_TIMEOUT_S = 3600

__all__ = ["main"]


# -- the state ------------------------------------------------------------------------------


def _values(index: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of tensor ``index``: the same on every rank and at every world size,
    cheap to make (memory bandwidth, no RNG), so a restore can check every value."""
    flat = torch.arange(start * COLUMNS, stop * COLUMNS, dtype=torch.int64) % 1_000_003
    return flat.to(torch.float32).reshape(-1, COLUMNS) + index


def _bounds(length: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s rows of a ``Shard(0)`` placement (``torch.chunk``'s split)."""
    chunk = -(-length // world)
    start = min(rank * chunk, length)
    return start, min(start + chunk, length)


def _sharded(job: dict[str, Any], rank: int, world: int, *, empty: bool = False) -> dict[str, Any]:
    """The state as DTensors ``Shard(0)`` over the world (``empty``: to load into)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    length = job["rows"]
    state: dict[str, Any] = {}
    for index in range(job["tensors"]):
        start, stop = _bounds(length, world, rank)
        local = torch.empty(stop - start, COLUMNS) if empty else _values(index, start, stop)
        state[f"layer{index}.weight"] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size([length, COLUMNS]),
            stride=(COLUMNS, 1),
        )  # fmt: skip
    return state


def _replicated(job: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole state, as every DDP rank holds it."""
    return {
        f"layer{index}.weight": _values(index, 0, job["rows"]) for index in range(job["tensors"])
    }


# -- one rank -------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """This process's CPU seconds, all threads (upload threads, gloo's)."""
    times = os.times()
    return times.user + times.system


class _Collective:
    """Times work run on every rank at once, from a barrier to a barrier."""

    def __init__(self, moto_pid: int | None) -> None:
        import psutil

        self._moto = psutil.Process(moto_pid) if moto_pid else None

    def _moto_cpu(self) -> float:
        if self._moto is None:
            return 0.0
        times = self._moto.cpu_times()
        return float(times.user + times.system)

    def __call__(self, work: Callable[[], object]) -> dict[str, Any]:
        """``wall`` (rank 0's clock), ``cpu`` (CPU seconds of each rank), ``server_cpu``."""
        import torch.distributed as dist

        dist.barrier()
        cpu, server, wall = _cpu_seconds(), self._moto_cpu(), time.perf_counter()
        work()
        dist.barrier()
        wall = time.perf_counter() - wall
        cpu, server = _cpu_seconds() - cpu, self._moto_cpu() - server
        cpus: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(cpus, cpu)
        return {"wall": wall, "cpu": cpus, "server_cpu": server}


def _ceiling(store_kind: str, where: str, payload: memoryview, rank: int) -> Callable[[int], None]:
    """This rank's raw write of ``payload`` (given the trial's step): what the store can take
    from this rank, without spotguard. Clients and copies are made here, not in the trial."""
    if store_kind == "local":
        Path(where).mkdir(parents=True, exist_ok=True)

        def write_file(step: int) -> None:
            path = Path(where) / f".ceiling-{step}-{rank}"
            with path.open("wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            path.unlink()  # inside the trial, as cheap as it is: the next trial starts empty

        return write_file

    import io

    from checkpoint_io import SETTINGS, baseline_client, upload_config

    client = baseline_client(SETTINGS)
    bucket, prefix = where.removeprefix("s3://").split("/", 1)
    data = bytes(payload)

    def upload(step: int) -> None:
        key = f"{prefix}-ceiling/{step}-{rank}"
        client.upload_fileobj(io.BytesIO(data), bucket, key, Config=upload_config(SETTINGS))
        client.delete_object(Bucket=bucket, Key=key)

    return upload


def join_launch(job_file: str) -> tuple[dict[str, Any], int, int]:
    """In a rank started by :func:`launch`: its job, rank and world size, with the gloo group
    joined and torch's threads shared out among the ranks on this machine."""
    import torch.distributed as dist

    job: dict[str, Any] = json.loads(Path(job_file).read_text())
    rank, world = int(os.environ["RANK"]), int(job["world"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo", init_method=job["init"], rank=rank, world_size=world,
        timeout=timedelta(minutes=20),
    )  # fmt: skip
    return job, rank, world


def _rank_main(job_file: str) -> None:
    """One rank of one launch: every save trial on every store, then the restores."""
    import torch.distributed as dist
    from checkpoint_io import SETTINGS

    from spotguard.trainer_hooks import CheckpointStore
    from spotguard.trainer_hooks._internals.dcp_replicas import refuse_per_rank_state
    from spotguard.trainer_hooks._internals.dcp_store import load_sharded, save_sharded

    job, rank, world = join_launch(job_file)
    collective = _Collective(job["moto_pid"])
    sharded, replicated = _sharded(job, rank, world), _replicated(job)
    # The ceiling writes this rank's 1/N of the bytes: its own shard of every tensor.
    ceiling_bytes = torch.cat([tensor.to_local() for tensor in sharded.values()])
    payload = memoryview(ceiling_bytes.numpy()).cast("B")
    results: dict[str, Any] = {"saves": {}, "restores": {}, "check": {}}
    try:
        for store_kind, base in job["stores"].items():
            # A prefix per launch: a store refuses to save below a step another writer (an
            # earlier launch) committed. The 2-rank save every restore loads has its own.
            where = f"{base}/saves-{world}"
            store = CheckpointStore(where, transfer=SETTINGS)
            reference = CheckpointStore(f"{base}/reference", transfer=SETTINGS)
            steps = iter(range(1, 1_000_000))

            def rank0(step: int, store: CheckpointStore = store) -> None:
                name = "state.pt" if rank == 0 else f"rank-{rank}.pt"
                tree: Any = replicated if rank == 0 else {"rank": rank}
                entry = store.put(
                    step, name, lambda handle: torch.save(tree, handle),
                    size_hint=job["rows"] * COLUMNS * 4 * job["tensors"] if rank == 0 else None,
                )  # fmt: skip
                entries: list[Any] = [None] * world
                dist.all_gather_object(entries, (name, entry))
                if rank == 0:
                    store.commit(step, dict(entries), world_size=world)

            ceiling = _ceiling(store_kind, where, payload, rank)
            work: dict[str, Callable[[int], object]] = {
                "ceiling": ceiling,
                "rank0": rank0,
                "sharded": lambda step, store=store: save_sharded(store, step, sharded),
                "replicated": lambda step, store=store: save_sharded(store, step, replicated),
            }
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SAVES}
            for _ in range(job["trials"]):
                for name in SAVES:
                    step = next(steps)
                    runs[name].append(collective(lambda work=work[name], step=step: work(step)))
                    if rank == 0 and name != "ceiling":
                        store.delete(step)  # outside the timing: keeps the disk and moto small
            results["saves"][store_kind] = runs
            # What the replicated save pays before writing: every rank hashes every tensor.
            results["check"][store_kind] = [
                collective(lambda: refuse_per_rank_state(replicated, None))
                for _ in range(job["trials"])
            ]
            if job["save_reference"]:
                save_sharded(reference, REFERENCE_STEP, sharded)
            restores = []
            for _ in range(job["trials"]):
                target = _sharded(job, rank, world, empty=True)
                restores.append(
                    collective(
                        lambda target=target, reference=reference: load_sharded(
                            reference, REFERENCE_STEP, target
                        )
                    )
                )
                _check_restored(job, target, rank, world)
            results["restores"][store_kind] = restores
        # Leave together: a rank tearing gloo down while a peer still talks to it aborts.
        # (Not after a failure: the peers then fail on the lost connection instead of waiting.)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(job["result"]).write_text(json.dumps(results))


def _check_restored(job: dict[str, Any], target: dict[str, Any], rank: int, world: int) -> None:
    """Every value this rank loaded is the one saved (at another world size, too)."""
    for index in range(job["tensors"]):
        local = target[f"layer{index}.weight"].to_local()
        if not torch.equal(local, _values(index, *_bounds(job["rows"], world, rank))):
            raise SystemExit(
                f"dcp_save: rank {rank} of {world} restored other values of layer{index}.weight"
            )


# -- the launches and the report ------------------------------------------------------------


def launch(
    script: Path, world: int, job: dict[str, Any], folder: Path, timeout: float = LAUNCH_TIMEOUT_S
) -> dict[str, Any]:
    """Run ``script --rank-job FILE`` as ``world`` gloo ranks (``RANK`` set, rendezvous in
    ``folder``); rank 0's results, which it writes to ``job["result"]``. A rank that fails or
    outlives ``timeout`` ends the benchmark (none is left running)."""
    tag = f"world{world}-{uuid.uuid4().hex[:8]}"
    job = {
        **job,
        "world": world,
        "init": f"file://{folder / tag}.rendezvous",
        "result": str(folder / f"{tag}.json"),
    }
    job_file = folder / f"{tag}-job.json"
    job_file.write_text(json.dumps(job))
    command = [sys.executable, str(script.resolve()), "--rank-job", str(job_file)]
    ranks = [
        subprocess.Popen(command, env={**os.environ, "RANK": str(rank)}, stdout=sys.stderr)
        for rank in range(world)
    ]
    try:
        codes = [process.wait(timeout) for process in ranks]
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    if codes != [0] * world:
        raise SystemExit(f"{script.stem}: a rank of the {world}-rank launch failed (codes {codes})")
    result: dict[str, Any] = json.loads(Path(job["result"]).read_text())
    return result


def _median(runs: list[dict[str, Any]], key: str = "wall") -> float:
    return statistics.median(float(run[key]) for run in runs)


def _busy(runs: list[dict[str, Any]], cores: int) -> float:
    """Share of the machine's cores busy during the trials: ranks' and server's CPU / wall."""
    return statistics.median(
        (sum(run["cpu"]) + run["server_cpu"]) / (run["wall"] * cores) for run in runs
    )


def _summarize(
    launches: dict[int, dict[str, Any]], stores: list[str], size_mib: int, cores: int
) -> dict[str, Any]:
    saves: list[dict[str, Any]] = []
    restores: list[dict[str, Any]] = []
    gib = size_mib / 1024
    for store in stores:
        single = launches[1]["saves"][store]["sharded"] if 1 in launches else None
        for world, launch in sorted(launches.items()):
            runs = launch["saves"][store]
            row: dict[str, Any] = {"store": store, "world": world}
            for name in SAVES:
                row[f"{name}_s"] = _median(runs[name])
                row[f"{name}_cpu_s_per_rank"] = [
                    statistics.median(run["cpu"][rank] for run in runs[name])
                    for rank in range(world)
                ]
                row[f"{name}_server_cpu_s"] = _median(runs[name], "server_cpu")
                row[f"{name}_busy"] = _busy(runs[name], cores)
                # moto is one Python process: near 1.0 here, its GIL is the bound.
                row[f"{name}_server_share"] = statistics.median(
                    run["server_cpu"] / run["wall"] for run in runs[name]
                )
            row["ceiling_gib_per_s"] = gib / row["ceiling_s"]
            row["speedup_sharded"] = row["rank0_s"] / row["sharded_s"]
            row["speedup_replicated"] = row["rank0_s"] / row["replicated_s"]
            if single is not None:
                row["efficiency_sharded"] = _median(single) / row["sharded_s"] / world
            row["check_s"] = _median(launch["check"][store])
            saves.append(row)
        same = launches[2]["restores"][store] if 2 in launches else None
        for world, launch in sorted(launches.items()):
            runs = launch["restores"][store]
            restore = {"store": store, "from_world": 2, "to_world": world,
                       "restore_s": _median(runs), "restore_busy": _busy(runs, cores)}  # fmt: skip
            if same is not None:
                restore["vs_same_size"] = restore["restore_s"] / _median(same)
            restores.append(restore)
    return {"saves": saves, "restores": restores}


def _print_tables(summary: dict[str, Any], size_mib: int) -> None:
    print(
        f"Saves of {size_mib} MiB (medians; speed-up = rank-0 path s / DCP s; efficiency ="
        " (t1 / tN) / N of the sharded save):"
    )
    print()
    print("| store | ranks | ceiling | rank-0 path | DCP sharded | speed-up | efficiency "
          "| DCP replicated | speed-up | of which hash check |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in summary["saves"]:
        efficiency = f"{row['efficiency_sharded']:.2f}" if "efficiency_sharded" in row else "-"
        print(
            f"| {row['store']} | {row['world']} | {row['ceiling_s']:.2f} s "
            f"({row['ceiling_gib_per_s']:.2f} GiB/s) | {row['rank0_s']:.2f} s "
            f"| {row['sharded_s']:.2f} s | {row['speedup_sharded']:.2f} x | {efficiency} "
            f"| {row['replicated_s']:.2f} s | {row['speedup_replicated']:.2f} x "
            f"| {row['check_s']:.2f} s |"
        )
    print()
    print(
        "CPU seconds per rank (rank 0, 1, ...), the moto server's CPU seconds (and per second"
        " of wall time), busy = CPU of ranks + server / (wall x cores):"
    )
    print()
    print("| store | ranks | contender | wall | CPU s per rank | server CPU s (/ wall) | busy |")
    print("|---|---|---|---|---|---|---|")
    for row in summary["saves"]:
        for name in SAVES:
            cpus = ", ".join(f"{cpu:.2f}" for cpu in row[f"{name}_cpu_s_per_rank"])
            print(
                f"| {row['store']} | {row['world']} | {name} | {row[f'{name}_s']:.2f} s "
                f"| {cpus} | {row[f'{name}_server_cpu_s']:.2f} ({row[f'{name}_server_share']:.2f}) "
                f"| {row[f'{name}_busy']:.2f} |"
            )
    print()
    print("| store | restore | seconds | x the 2 -> 2 time | busy |")
    print("|---|---|---|---|---|")
    for row in summary["restores"]:
        ratio = f"{row['vs_same_size']:.2f} x" if "vs_same_size" in row else "-"
        print(
            f"| {row['store']} | {row['from_world']} -> {row['to_world']} "
            f"| {row['restore_s']:.2f} s | {ratio} | {row['restore_busy']:.2f} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="total state, MiB")
    parser.add_argument("--tensors", type=int, default=8, help="2-D float32 tensors")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--stores", nargs="+", choices=["local", "moto"], default=["local", "moto"])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true", help="8 MiB, 1 trial: a smoke test")
    parser.add_argument("--rank-job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_job:
        _rank_main(args.rank_job)
        return
    print(describe(), flush=True)
    if args.quick:
        args.size, args.trials = 8, 1
    rows, rest = divmod(args.size * MiB, 4 * COLUMNS * args.tensors)
    if rest or rows < max(args.worlds):
        parser.error(
            f"--size {args.size} MiB does not split into {args.tensors} float32 tensors of "
            f"{COLUMNS} columns"
        )
    if 2 not in args.worlds:
        parser.error("--worlds must include 2: the restores load the state saved at 2 ranks")
    cores = os.cpu_count() or 1
    moto = None
    with tempfile.TemporaryDirectory(prefix="dcp-bench-") as folder:
        stores = {}
        if "local" in args.stores:
            stores["local"] = str(Path(folder) / "local-store")
        if "moto" in args.stores:
            from checkpoint_io import start_moto_bucket

            moto, bucket = start_moto_bucket()
            stores["moto"] = f"s3://{bucket}/dcp-bench"
        job = {
            "rows": rows,
            "tensors": args.tensors,
            "trials": args.trials,
            "stores": stores,
            "moto_pid": moto.pid if moto else None,
        }
        launches: dict[int, dict[str, Any]] = {}
        try:
            # 2 first: it commits the state every restore loads.
            for world in sorted(args.worlds, key=lambda world: world != 2):
                print(f"dcp_save: {world} rank(s)...", file=sys.stderr, flush=True)
                launches[world] = launch(
                    Path(__file__), world, {**job, "save_reference": world == 2}, Path(folder)
                )
        finally:
            if moto is not None:
                moto.terminate()
                moto.wait(10)
    summary = _summarize(launches, list(stores), args.size, cores)
    _print_tables(summary, args.size)
    figures = {
        "machine": {
            "cores": cores,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "size_mib": args.size,
        "tensors": args.tensors,
        "trials": args.trials,
        **summary,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
