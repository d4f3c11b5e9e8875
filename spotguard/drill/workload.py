"""The drill's built-in training: small, CPU-only, and as hard to resume exactly as real ones.

``python -m spotguard.drill.workload RUN`` (a :class:`~spotguard.drill.options.WorkloadRun`'s
JSON: the drill's options and this launch's store, results folder and length) trains a small
MLP with dropout on synthetic data, shuffled by a :class:`ResumableDataLoader`, with SGD
momentum and a per-step LR schedule under Lightning's real ``Trainer``; any one of those
restored wrongly makes the final weights differ. With ``ranks`` 2 it runs DDP on gloo, and each
rank registers in a state dir of its own (``state_dir_template``: ``.../node-{rank}/state``),
as if it ran on a node of its own: a notice to one node must stop them all.

Each rank writes ``<results>/rank-<r>.json`` when it leaves (how, at which step, resumed from
where, the preemption path's times, and on rank 0 the SHA-256 of the final weights); rank 0
appends every finished step to ``<results>/progress``. A run without a ``store`` trains without
spotguard: the drill's reference for what an uninterrupted run ends with.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from spotguard.drill.options import WorkloadRun
from spotguard.errors import Preempted
from spotguard.trainer_hooks.data import ResumableDataLoader

__all__ = ["STEPS_PER_EPOCH", "weights_digest"]

SAMPLES, BATCH = 512, 16
#: Optimizer steps per epoch (on every rank: each rank's shard has SAMPLES samples).
STEPS_PER_EPOCH = SAMPLES // BATCH


def _lightning() -> ModuleType:
    try:
        return importlib.import_module("pytorch_lightning")
    except ImportError:
        return importlib.import_module("lightning.pytorch")


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and raw bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _build(
    pl: ModuleType, ranks: int, step_time: float, progress: Path | None, ballast: int
) -> Any:
    class Model(pl.LightningModule):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1)
            )
            self.first_step_at: float | None = None
            # Extra state that travels with every checkpoint: rehearses a big model's save.
            self.register_buffer("ballast", torch.zeros(ballast // 4, dtype=torch.float32))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if step_time:
                time.sleep(step_time)  # a real step takes time: the notice lands mid-run
            features, targets = batch
            logits = self.net(features)
            return nn.functional.binary_cross_entropy_with_logits(logits, targets)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.first_step_at is None:
                self.first_step_at = time.time()
            if progress is not None and self.trainer.global_rank == 0:
                with progress.open("a") as handle:
                    handle.write(f"{self.trainer.global_step}\n")

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=16, gamma=0.9)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

        def train_dataloader(self) -> ResumableDataLoader:
            generator = torch.Generator().manual_seed(2026)
            features = torch.randn(SAMPLES * ranks, 16, generator=generator)
            targets = (features[:, :8].sum(dim=1, keepdim=True) > 0).float()
            dataset = torch.utils.data.TensorDataset(features, targets)
            return ResumableDataLoader(dataset, batch_size=BATCH, shuffle=True, seed=11)

    return Model()


def main(argv: list[str] | None = None) -> int:
    run = WorkloadRun.from_argv(sys.argv[1:] if argv is None else argv)
    options = run.options
    # Lightning starts rank 1.. as copies of this command with LOCAL_RANK set.
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    started = time.time()
    run.results.mkdir(parents=True, exist_ok=True)
    pl = _lightning()
    pl.seed_everything(7, workers=True, verbose=False)
    callbacks: list[Any] = []
    spot: Any = None
    if run.store is not None:
        from spotguard.trainer_hooks.lightning import SpotCheckpoint

        template = run.state_dir_template
        state_dir = Path(template.format(rank=rank)) if template else None
        spot = SpotCheckpoint(
            run.store, every_n_train_steps=run.every, keep_last=2, state_dir=state_dir
        )
        callbacks.append(spot)
    distributed: dict[str, Any] = {}
    if options.ranks > 1:
        strategy = pl.strategies.DDPStrategy(
            process_group_backend="gloo", timeout=timedelta(seconds=60)
        )
        distributed = {"strategy": strategy, "use_distributed_sampler": False}
    trainer = pl.Trainer(
        max_epochs=run.epochs,
        accelerator="cpu",
        devices=options.ranks,
        logger=False,
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=run.results / "lightning",
        callbacks=callbacks,
        **distributed,
    )
    progress = run.results / "progress" if rank == 0 else None
    model = _build(pl, options.ranks, options.step_time, progress, options.state_bytes)
    result: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "started_at": started}
    try:
        trainer.fit(model)
        result["outcome"] = "finished"
        if rank == 0:
            result["weights_sha256"] = weights_digest(model.state_dict())
    except Preempted as exc:
        result.update(outcome="preempted", saved=exc.saved)
        raise
    finally:
        result["step"] = trainer.global_step
        result["first_step_at"] = model.first_step_at
        result["resumed_from"] = spot.resumed_from if spot is not None else None
        result["events"] = dict(spot.events) if spot is not None else {}
        result["left_at"] = time.time()
        (run.results / f"rank-{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
