"""The multi-node drill's training, one worker of a torchrun elastic job.

``torchrun ... -m spotguard.drill.elastic_workload RUN`` (a
:class:`~spotguard.drill.options.WorkloadRun`'s JSON: store, results folder, length, the
drill's options) trains a small MLP with dropout, data-parallel on gloo (gradients averaged
tensor by tensor), on synthetic data shuffled by a :class:`ResumableDataLoader`, with SGD
momentum and a per-step LR schedule, under :class:`SpotGuard` in format ``dcp``: a resume may
run at another world size (replicated tensors spread over the ranks' files, the data position
resharded). ``steps`` counts optimizer steps of the whole job, whatever the world size.

Each attempt of each worker writes ``<results>/<node>-attempt-<restart>-rank-<r>-pid-<pid>.json``
when it starts and again when it leaves: its
node (``SPOTGUARD_DRILL_NODE``), rank and world size, where it resumed from and the digest of
the state it restored, how it left (at which step, the digest of the state it saved), and
SpotGuard's event times. Rank 0 appends every finished step to ``<results>/progress`` and,
when the job is done, writes the final weights' digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spotguard.drill.options import WorkloadRun
from spotguard.errors import ConfigError, Preempted
from spotguard.trainer_hooks import ResumableDataLoader, SpotGuard

__all__ = ["average_gradients", "main", "state_digest"]

SAMPLES, BATCH = 1536, 8


def average_gradients(model: nn.Module, world: int) -> None:
    """What DDP does, tensor by tensor. Not DDP itself: DDP packs the gradients into buckets
    laid out in parameter order for the first step after it is built and in the order they
    became ready for every later one, and with three or more ranks the ring all-reduce then
    sums some elements in another order: the first step after every restart differs from the
    uninterrupted run in the last bits (seen here), and the runs could not be compared bit
    for bit. Each tensor reduced alone is summed the same way at every step."""
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad.div_(world)


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 over the model's, the optimizer's and the LR schedule's state (tensors and
    plain values): equal digests mean the same training state, bit for bit."""
    digest = hashlib.sha256()

    def walk(node: Any, path: str) -> None:
        if isinstance(node, torch.Tensor):
            digest.update(path.encode())
            digest.update(node.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(node, dict):
            for key in sorted(node, key=str):
                walk(node[key], f"{path}/{key}")
        elif isinstance(node, (list, tuple)):
            for index, item in enumerate(node):
                walk(item, f"{path}/{index}")
        else:
            digest.update(f"{path}={node!r}".encode())

    walk(state["model"].state_dict(), "model")
    walk(state["optimizer"].state_dict(), "optimizer")
    walk(state["scheduler"].state_dict(), "scheduler")
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    run = WorkloadRun.from_argv(sys.argv[1:] if argv is None else argv)
    if run.store is None:
        raise ConfigError("the elastic workload trains under SpotGuard: its run needs a store")
    node = os.environ.get("SPOTGUARD_DRILL_NODE", "node")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    # One intra-op thread: with more, the math may take another path when the machine is busy
    # (a matmul split over fewer threads sums in another order), and the run is not bit-exact.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(7 + rank)  # every rank its own dropout stream, as on real nodes
    generator = torch.Generator().manual_seed(2026)
    features = torch.randn(SAMPLES, 16, generator=generator)
    targets = (features[:, :8].sum(dim=1, keepdim=True) > 0).float()
    loader = ResumableDataLoader(
        torch.utils.data.TensorDataset(features, targets), batch_size=BATCH, shuffle=True, seed=3
    )
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
    with torch.no_grad():  # one model: rank 0's initial weights everywhere, as DDP does
        for param in model.parameters():
            dist.broadcast(param, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=16, gamma=0.9)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler,
                             "data": loader}  # fmt: skip
    run.results.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"node": node, "rank": rank, "world": world, "attempt": int(attempt),
                              "pid": os.getpid(), "started_at": time.time()}  # fmt: skip
    # torchrun's restart count does not move when a node joins: the pid tells the attempts apart
    record = run.results / f"{node}-attempt-{attempt}-rank-{rank}-pid-{os.getpid()}.json"
    record.write_text(json.dumps(result))  # at once: the drill finds rank 0's node by it
    guard = SpotGuard(run.store, every_n_steps=run.every, keep_last=3,
                      checkpoint_format="dcp")  # fmt: skip
    step = 0
    try:
        with guard:
            step = guard.restore(state)
            result.update(resumed_from=step, restored=state_digest(state) if step else None,
                          first_step_at=None)  # fmt: skip
            while step < run.steps:
                for batch, labels in loader:
                    loss = nn.functional.binary_cross_entropy_with_logits(model(batch), labels)
                    optimizer.zero_grad()
                    loss.backward()  # type: ignore[no-untyped-call]
                    average_gradients(model, world)
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    result["first_step_at"] = result["first_step_at"] or time.time()
                    if rank == 0:
                        with (run.results / "progress").open("a") as handle:
                            handle.write(f"{step}\n")
                    time.sleep(run.options.step_time)
                    guard.step(step, state)
                    if step >= run.steps:
                        break
            guard.finish(step, state)
        result["outcome"] = "finished"
        if rank == 0:
            result["final"] = state_digest(state)
    except Preempted as exc:
        result.update(outcome="preempted", saved=exc.saved, saved_state=state_digest(state))
        raise
    finally:
        result.update(step=step, events=dict(guard.events), left_at=time.time())
        record.write_text(json.dumps(result))
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
