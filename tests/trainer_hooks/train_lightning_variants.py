"""A Lightning run as a new user writes it, for the SpotCheckpoint tests of loaders and paths.

Dropout, SGD with momentum and a step LR schedule, 3 epochs of 12 steps per rank. With
``--devices 2``: DDP on gloo with Lightning's default distributed sampler. ``--loader stateful``
is torchdata's ``StatefulDataLoader(shuffle=True)`` (the loader Lightning recommends),
``--loader resumable`` spotguard's ``ResumableDataLoader``, ``--loader plain`` torch's
``DataLoader(shuffle=True)``. ``--last-every N`` adds Lightning's
own ``ModelCheckpoint(save_last=True)`` every N steps; ``--ckpt-path`` is passed to ``fit``.
``--pause-at N`` holds every rank after step N until ``--go-file`` exists (the test signals one
rank meanwhile). Rank 0 writes the steps it ran to ``--progress``, the final weights to
``--out`` and what SpotCheckpoint says it resumed from to ``--report`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from spotguard.trainer_hooks import ResumableDataLoader
from spotguard.trainer_hooks.lightning import SpotCheckpoint


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1, help="> 1: DDP on gloo")
    parser.add_argument("--loader", choices=["stateful", "resumable", "plain"], default="stateful")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--last-every", type=int, help="ModelCheckpoint(save_last=True) every N")
    parser.add_argument("--ckpt-path")
    parser.add_argument("--progress", type=Path)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--go-file", type=Path)
    return parser.parse_args()


class Model(pl.LightningModule):
    def __init__(self, loader: str, batch_size: int) -> None:
        super().__init__()
        self.loader, self.batch_size = loader, batch_size
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        features, targets = batch
        return nn.functional.binary_cross_entropy_with_logits(self.net(features), targets)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.8)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def train_dataloader(self) -> Any:
        generator = torch.Generator().manual_seed(1234)
        features = torch.randn(12 * 8, 8, generator=generator)
        targets = (features.sum(dim=1, keepdim=True) > 0).float()
        dataset = torch.utils.data.TensorDataset(features, targets)
        if self.loader == "resumable":
            return ResumableDataLoader(dataset, batch_size=self.batch_size, shuffle=True, seed=7)
        if self.loader == "plain":
            return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=True)
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(dataset, batch_size=self.batch_size, shuffle=True)


def main() -> None:
    args = arguments()
    spot = SpotCheckpoint(args.store, every_n_train_steps=args.every, keep_last=3)

    class Progress(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            if args.progress and trainer.global_rank == 0:
                with args.progress.open("a") as handle:
                    handle.write(f"{trainer.global_step}\n")
            if trainer.global_step == args.pause_at and args.go_file:
                paused = time.monotonic()  # every rank waits; the test signals one of them
                while not args.go_file.exists() and time.monotonic() - paused < 30:
                    time.sleep(0.01)
                time.sleep(0.2)  # by now the signalled rank has handled its signal

    callbacks: list[Any] = [Progress(), spot]
    if args.last_every:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=args.root / "checkpoints", save_last=True, save_top_k=0,
                every_n_train_steps=args.last_every,
            )
        )  # fmt: skip
    pl.seed_everything(7, workers=True)
    distributed: dict[str, Any] = {}
    if args.devices > 1:
        strategy = pl.strategies.DDPStrategy(
            process_group_backend="gloo", timeout=timedelta(seconds=120)
        )
        distributed = {"strategy": strategy}
        if args.loader == "resumable":  # it shuffles the same on every rank by itself
            distributed["use_distributed_sampler"] = False
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=args.devices, logger=False, deterministic=True,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.root,
        enable_checkpointing=bool(args.last_every), callbacks=callbacks, **distributed,
    )  # fmt: skip
    batch_size = 8 if args.devices == 1 or args.loader == "resumable" else 8 // args.devices
    model = Model(args.loader, batch_size)
    trainer.fit(model, ckpt_path=args.ckpt_path)
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), args.out)
        if args.report:
            report = {"resumed_from": spot.resumed_from, "ckpt_path": trainer.ckpt_path}
            args.report.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
