"""Per-rank stall of SpotGuard's periodic sharded (DCP) save against the copy of that rank's shard.

Why: with ``checkpoint_format="dcp"`` every rank copies its own shards into reused CPU buffers
at the step boundary (``ShardedSave.of`` builds torch's state dicts, ``ShardedStager.stage``
copies each DTensor's local shard into a kept buffer and rewraps it) and saves the copy in a
background thread. The copy is the only stall training should see, so the goal is the
whole-state path's: the time ``SpotGuard.step`` takes at a save step is at most 1.5 x the bare
copy of that rank's shards.

Each world size (``--worlds``, 1 and 2 by default) is one launch of gloo ranks (subprocesses
of this script). Every launch builds the same model: ``Linear(width, width)`` layers, each
``fully_shard``-ed (FSDP2), plus the root, and Adam, stepped once so that it has state; the
layer count makes parameters + Adam's two moments about ``--size`` MiB in all (each rank
holds 1/N of it). SpotGuard saves with ``every_n_steps=1``, ``checkpoint_format="dcp"``, on
each store of ``--stores`` (a local folder; a moto S3 server over HTTP, started here).

Per rank, at steady state (after a first save that allocates the staging buffers), each
trial runs, with the ranks lined up by a barrier first:

* the floor: ``DTensor.to_local()`` of every parameter and optimizer state, copied into
  preallocated CPU buffers (``Tensor.copy_``), measured right before the stall, under the
  same load;
* the stall: ``SpotGuard.step`` at a save step (checked: the step did start a save);
* then, untimed: ``guard._core.wait()`` (the background save ends) and, with several ranks,
  one more ``SpotGuard.step`` that does not save: the ranks' agreement is read one boundary
  late, so the boundary right after a save sees it "busy" and defers (also checked).

Then a few instrumented trials (``--breakdown-trials``) say where the stall goes: torch's
``get_model_state_dict`` and ``get_optimizer_state_dict``, the rest of ``ShardedSave.of``
(rank 0's copy of the plain values, the buffer names, the byte count), ``ShardedStager.stage``
(the copy), and the rest of ``SpotGuard.step`` (the agreement, the thread's start). Their
timing wrappers are patched in for those trials only. After each of those saves, a reference
staging that no save uses: the same state dict copied tensor by tensor into kept buffers
(``_DirectStage``), after a barrier (two ranks copying at once share the memory bandwidth).

Reported per rank: medians of the copy, the stall, stall / copy (goal <= 1.5) and the median
of the per-trial ratios (each stall over the copy right before it: steadier when the load
drifts), and the breakdown; the load average of the machine during each launch. Markdown
tables, then one line of JSON with every figure.

Usage: python bench/dcp_stall.py [--size 256] [--width 1024] [--trials 7]
       [--breakdown-trials 3] [--stores local moto] [--worlds 1 2] [--quick]
Smoke test (seconds): python bench/dcp_stall.py --quick --stores local
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from provenance import describe  # the bench folder is this script's

MiB = 2**20
#: Default width of every layer: ``Linear(width, width)`` weights sharded by rows, as FSDP2
#: does. ``--width`` changes how many tensors hold the same bytes (costs per tensor show).
WIDTH = 1024
#: How long one launch of ranks may take before it counts as hung.
LAUNCH_TIMEOUT_S = 1800
#: The parts of a stall that the instrumented trials time, in the order they are reported.
PARTS = ("model_state_dict", "optimizer_state_dict", "of_rest", "stage", "step_rest")

__all__ = ["main"]


# -- one rank -------------------------------------------------------------------------------


def _layer_bytes(width: int) -> int:
    """Bytes of one layer's weight and bias and of Adam's two moments of them."""
    return 3 * 4 * width * (width + 1)


def _layers(size_mib: int, width: int) -> int:
    """Layers whose parameters and Adam's two moments make about ``size_mib`` MiB."""
    return max(1, round(size_mib * MiB / _layer_bytes(width)))


def _build(layers: int, width: int, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The FSDP2 model and its Adam, stepped once (Adam has state: a save holds it all)."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).square().mean().backward()
    optim.step()
    optim.zero_grad()
    return model, optim


def _locals(model: torch.nn.Module, optim: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """This rank's part of every parameter and optimizer state tensor."""
    from torch.distributed.tensor import DTensor

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    for param in model.parameters():
        yield local(param.detach())
    for per_param in optim.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                yield local(value)


class _Floor:
    """The bare copy of this rank's shards into CPU buffers allocated (and touched) here."""

    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self._model, self._optim = model, optim
        self._buffers = [torch.empty_like(tensor, device="cpu") for tensor in _locals(model, optim)]
        self.nbytes = sum(buffer.numel() * buffer.element_size() for buffer in self._buffers)
        self.tensors = len(self._buffers)
        self()  # first touch: page faults are not the copy's cost

    def __call__(self) -> None:
        for buffer, tensor in zip(self._buffers, _locals(self._model, self._optim), strict=True):
            buffer.copy_(tensor)


class _Breakdown:
    """Timing wrappers around the parts of a sharded save's stall, patched in while active."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {name: [] for name in ("of", *PARTS[:2], "stage")}
        self._saves = 0
        #: Off while the script itself builds a state dict (for the reference staging).
        self.recording = True

    def _timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if self.recording:
                    self.times[name].append(time.perf_counter() - started)

        return wrapper

    @contextmanager
    def active(self) -> Iterator[None]:
        """``sharded_state_dict`` imports torch's functions from their module at each call,
        and the guard and the saver call ``ShardedSave.of`` / ``ShardedStager.stage`` through
        their classes: patching those four attributes reaches every call."""
        import torch.distributed.checkpoint.state_dict as torch_state_dict

        from spotguard.trainer_hooks._internals.sharded import ShardedSave, ShardedStager

        wrapped = [
            (torch_state_dict, "get_model_state_dict", "model_state_dict"),
            (torch_state_dict, "get_optimizer_state_dict", "optimizer_state_dict"),
            (ShardedSave, "of", "of"),
            (ShardedStager, "stage", "stage"),
        ]
        originals = [(owner, attribute, vars(owner)[attribute]) for owner, attribute, _ in wrapped]
        try:
            for (owner, attribute, name), (_, _, original) in zip(wrapped, originals, strict=True):
                if isinstance(original, classmethod):  # ShardedSave.of: wrap the function
                    setattr(owner, attribute, classmethod(self._timed(name, original.__func__)))
                else:
                    setattr(owner, attribute, self._timed(name, original))
            yield
        finally:
            for owner, attribute, original in originals:
                setattr(owner, attribute, original)

    def trial(self, stall: float) -> dict[str, float]:
        """The parts of the last save's ``stall`` (one call of each wrapper per save; a model
        and an optimizer in the state: one call of each state-dict function)."""
        self._saves += 1
        calls = {name: len(times) for name, times in self.times.items()}
        if set(calls.values()) != {self._saves}:
            raise SystemExit(f"dcp_stall: {self._saves} saves made the calls {calls}")
        model_sd, optim_sd = (
            self.times["model_state_dict"][-1],
            self.times["optimizer_state_dict"][-1],
        )
        of, stage = self.times["of"][-1], self.times["stage"][-1]
        return {
            "model_state_dict": model_sd,
            "optimizer_state_dict": optim_sd,
            "of_rest": of - model_sd - optim_sd,
            "stage": stage,
            "step_rest": stall - of - stage,
        }


class _DirectStage:
    """A reference for ``ShardedStager.stage``, not used by any save: every tensor of the
    state dict copied with ``Tensor.copy_`` into a buffer kept per source tensor, each DTensor
    rewrapped around its buffer through the public ``DTensor.from_local`` (the source's mesh,
    placements, shape and stride), as a user would write it: what spotguard's staging (the
    internal constructor, no checks) is compared with. Earlier spotguard staged with torch's
    ``DefaultStager``, whose generic deep copy (per DTensor a ``new_empty`` through DTensor's
    dispatch and its attributes deep-copied) made the stall about 2 x the copy."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(id(tensor))
        if buffer is None:
            buffer = self._buffers[id(tensor)] = torch.empty_like(tensor, device="cpu")
        return buffer.copy_(tensor)

    def __call__(self, value: Any) -> Any:
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            local = self._copy(value._local_tensor)
            return DTensor.from_local(
                local, value.device_mesh, value.placements, run_check=False,
                shape=value.shape, stride=value.stride(),
            )  # fmt: skip
        if isinstance(value, torch.Tensor):
            return self._copy(value)
        if isinstance(value, dict):
            return {key: self(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self(item) for item in value)
        return value


def _trials(
    guard: Any, state: dict[str, Any], floor: _Floor, steps: Iterator[int], count: int,
    world: int, breakdown: _Breakdown | None = None,
) -> list[dict[str, float]]:  # fmt: skip
    """``count`` trials: the floor, then the stall of a save step; the save waited for. With
    ``breakdown``: the parts of each stall, and the reference staging after the save."""
    import torch.distributed as dist

    from spotguard.trainer_hooks._internals.sharded_state import sharded_state_dict

    saver = guard._core.saver
    runs: list[dict[str, float]] = []
    for _ in range(count):
        dist.barrier()  # the ranks reach the boundary together, as in training
        started = time.perf_counter()
        floor()
        copy = time.perf_counter() - started
        step = next(steps)
        state["seen"] = step
        started = time.perf_counter()
        guard.step(step, state)
        stall = time.perf_counter() - started
        if saver._last_save_step != step:
            raise SystemExit(f"dcp_stall: step {step} did not start a save: nothing to time")
        guard._core.wait()
        guard._core.raise_if_failed()
        run = {"copy": copy, "stall": stall}
        if breakdown is not None:
            run.update(breakdown.trial(stall))
            breakdown.recording = False
            state_dict = sharded_state_dict(state)
            breakdown.recording = True
            direct = _DirectStage()
            direct(state_dict)  # allocates, as the guard's first save did
            dist.barrier()  # the ranks copy at once, as at the boundary (memory bandwidth)
            started = time.perf_counter()
            direct(state_dict)
            run["direct_stage"] = time.perf_counter() - started
            del direct  # its buffers are not held into the next trial
        runs.append(run)
        if world > 1:  # its agreement still says "busy": this boundary defers, untimed
            step = next(steps)
            guard.step(step, state)
            if saver._last_save_step == step:
                raise SystemExit(f"dcp_stall: step {step} saved; the trials' pattern is off")
    return runs


def _rank_main(job_file: str) -> None:
    """One rank of one launch: the trials on every store; rank 0 writes every rank's runs."""
    import torch.distributed as dist
    from checkpoint_io import SETTINGS
    from dcp_save import join_launch

    from spotguard.trainer_hooks import SpotGuard

    job, rank, world = join_launch(job_file)
    results: dict[str, Any] = {"stores": {}, "load": [os.getloadavg()[0]]}
    try:
        model, optim = _build(job["layers"], job["width"], world)
        floor = _Floor(model, optim)
        # Plain values too, as a training loop keeps them: rank 0 copies them at each save.
        state: dict[str, Any] = {"model": model, "optim": optim, "seen": 0, "run": {"id": 42}}
        for store_kind, base in job["stores"].items():
            guard = SpotGuard(
                f"{base}/world-{world}", every_n_steps=1, keep_last=2, checkpoint_format="dcp",
                state_dir=job["state_dir"], transfer=SETTINGS,
            )  # fmt: skip
            steps = iter(range(1, 1_000_000))
            try:
                guard.step(next(steps), state)  # the first save allocates the buffers
                guard._core.wait()
                guard._core.raise_if_failed()
                if world > 1:
                    guard.step(next(steps), state)  # deferred: see _trials
                runs = _trials(guard, state, floor, steps, job["trials"], world)
                breakdown = _Breakdown()
                with breakdown.active():
                    parts = _trials(
                        guard, state, floor, steps, job["breakdown_trials"], world, breakdown
                    )
            finally:
                guard.close()
            mine = {"runs": runs, "parts": parts, "shard_bytes": floor.nbytes,
                    "tensors": floor.tensors}  # fmt: skip
            every: list[Any] = [None] * world
            dist.all_gather_object(every, mine)
            results["stores"][store_kind] = every
            results["load"].append(os.getloadavg()[0])
        dist.barrier()  # leave together (see bench/dcp_save.py)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(job["result"]).write_text(json.dumps(results))


# -- the launches and the report ------------------------------------------------------------


def _summarize(launches: dict[int, dict[str, Any]], stores: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for store in stores:
        for world, launch in sorted(launches.items()):
            for rank, mine in enumerate(launch["stores"][store]):
                runs, parts = mine["runs"], mine["parts"]
                copy = statistics.median(run["copy"] for run in runs)
                stall = statistics.median(run["stall"] for run in runs)
                trial_ratios = [run["stall"] / run["copy"] for run in runs]
                row: dict[str, Any] = {
                    "store": store,
                    "world": world,
                    "rank": rank,
                    "shard_mib": mine["shard_bytes"] / MiB,
                    "tensors": mine["tensors"],
                    "copy_s": copy,
                    "stall_s": stall,
                    "ratio": stall / copy,
                    # Each stall over the copy right before it: robust to load that drifts.
                    "trial_ratio": statistics.median(trial_ratios),
                    "trial_ratios": trial_ratios,
                    "load": launch["load"],
                    "breakdown_copy_s": statistics.median(run["copy"] for run in parts),
                    "breakdown_stall_s": statistics.median(run["stall"] for run in parts),
                    "direct_stage_s": statistics.median(run["direct_stage"] for run in parts),
                }
                for part in PARTS:
                    row[f"{part}_s"] = statistics.median(run[part] for run in parts)
                rows.append(row)
    return rows


def _print_tables(rows: list[dict[str, Any]], args: argparse.Namespace, layers: int) -> None:
    total = _layer_bytes(args.width) * layers / MiB
    print(
        f"\nStall per periodic sharded save, {total:.0f} MiB of FSDP2 parameters + Adam "
        f"({layers} Linear({args.width}, {args.width}) layers), medians of {args.trials} "
        "trials; copy = this rank's shards into preallocated buffers, right before each "
        "stall; goal stall / copy <= 1.5:\n"
    )
    print("| store | ranks | rank | shard (tensors) | copy | stall | stall / copy | median of "
          "per-trial ratios | per-trial ratios | load avg (1 min) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratios = ", ".join(f"{ratio:.2f}" for ratio in row["trial_ratios"])
        load = "-".join(f"{load:.1f}" for load in (min(row["load"]), max(row["load"])))
        print(
            f"| {row['store']} | {row['world']} | {row['rank']} | {row['shard_mib']:.0f} MiB "
            f"({row['tensors']}) | {row['copy_s']:.3f} s | {row['stall_s']:.3f} s "
            f"| {row['ratio']:.2f} x | {row['trial_ratio']:.2f} x | {ratios} | {load} |"
        )
    print(
        f"\nWhere the stall goes (instrumented trials, medians of {args.breakdown_trials}): "
        "torch's get_model_state_dict and get_optimizer_state_dict, the rest of "
        "ShardedSave.of, ShardedStager.stage, the rest of SpotGuard.step; and, for "
        "reference, the state dict copied tensor by tensor into kept buffers and rewrapped "
        "with DTensor.from_local:\n"
    )
    print("| store | ranks | rank | copy | stall | model sd | optimizer sd | rest of of "
          "| stage | rest of step | reference staging |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = " | ".join(f"{row[f'{part}_s']:.3f} s" for part in PARTS)
        print(
            f"| {row['store']} | {row['world']} | {row['rank']} "
            f"| {row['breakdown_copy_s']:.3f} s | {row['breakdown_stall_s']:.3f} s | {cells} "
            f"| {row['direct_stage_s']:.3f} s |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="parameters + Adam state, MiB")
    parser.add_argument("--width", type=int, default=WIDTH, help="of the Linear layers")
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--breakdown-trials", type=int, default=3)
    parser.add_argument("--stores", nargs="+", choices=["local", "moto"], default=["local", "moto"])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="one layer, 2 trials: a smoke test")
    parser.add_argument("--rank-job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from dcp_save import launch  # the bench folder is this script's: run as a script

    if args.rank_job:
        _rank_main(args.rank_job)
        return
    print(describe(), flush=True)
    if args.quick:
        args.size, args.trials, args.breakdown_trials = 12, 2, 1
    if args.trials < 1 or args.breakdown_trials < 1:
        parser.error("--trials and --breakdown-trials must be at least 1")
    layers = _layers(args.size, args.width)
    moto = None
    with tempfile.TemporaryDirectory(prefix="dcp-stall-") as folder:
        stores = {}
        if "local" in args.stores:
            stores["local"] = str(Path(folder) / "local-store")
        if "moto" in args.stores:
            from checkpoint_io import start_moto_bucket

            moto, bucket = start_moto_bucket()
            stores["moto"] = f"s3://{bucket}/dcp-stall"
        job = {
            "layers": layers,
            "width": args.width,
            "trials": args.trials,
            "breakdown_trials": args.breakdown_trials,
            "stores": stores,
            "state_dir": str(Path(folder) / "no-agent"),
        }
        launches: dict[int, dict[str, Any]] = {}
        try:
            for world in args.worlds:
                print(f"dcp_stall: {world} rank(s)...", file=sys.stderr, flush=True)
                launches[world] = launch(Path(__file__), world, job, Path(folder), LAUNCH_TIMEOUT_S)
        finally:
            if moto is not None:
                moto.terminate()
                moto.wait(10)
    rows = _summarize(launches, list(stores))
    _print_tables(rows, args, layers)
    figures = {
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "size_mib": _layer_bytes(args.width) * layers / MiB,
        "layers": layers,
        "width": args.width,
        "trials": args.trials,
        "breakdown_trials": args.breakdown_trials,
        "rows": rows,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
