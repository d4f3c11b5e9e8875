"""A small Lightning run for the SpotCheckpoint tests (both import styles).

Dropout, a shuffled ResumableDataLoader, SGD with momentum and a step LR schedule. Progress goes
to ``--progress``; ``--pause-at N`` holds the run after step N until a stop is requested, so a
test's real signal lands exactly there. Final weights go to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from spotguard.trainer_hooks import ResumableDataLoader
from spotguard.trainer_hooks.lightning import SpotCheckpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--package", default="pytorch_lightning")
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--progress", type=Path)
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1, help="> 1: DDP on gloo")
    parser.add_argument("--go-file", type=Path, help="with --pause-at: wait for this file")
    args = parser.parse_args()
    pl = importlib.import_module(args.package)

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))

        def training_step(self, batch, batch_idx):
            features, targets = batch
            return nn.functional.binary_cross_entropy_with_logits(self.net(features), targets)

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.8)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

        def train_dataloader(self):
            generator = torch.Generator().manual_seed(1234)
            features = torch.randn(96, 8, generator=generator)
            targets = (features.sum(dim=1, keepdim=True) > 0).float()
            dataset = torch.utils.data.TensorDataset(features, targets)
            return ResumableDataLoader(dataset, batch_size=8, shuffle=True, seed=7)

    spot = SpotCheckpoint(args.store, every_n_train_steps=args.every, keep_last=2)

    class Progress(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if args.progress and trainer.global_rank == 0:
                with args.progress.open("a") as handle:
                    handle.write(f"{trainer.global_step}\n")
            if trainer.global_step == args.pause_at:
                paused = time.monotonic()
                if args.go_file:  # every rank waits; the test signals one of them, then says go
                    while not args.go_file.exists() and time.monotonic() - paused < 30:
                        time.sleep(0.01)
                    time.sleep(0.2)  # by now the signalled rank has handled its signal
                else:
                    while not spot._core.stop_requested and time.monotonic() - paused < 10:
                        time.sleep(0.01)

    pl.seed_everything(7, workers=True)
    distributed = {}
    if args.devices > 1:
        strategy = pl.strategies.DDPStrategy(
            process_group_backend="gloo", timeout=timedelta(seconds=60)
        )
        distributed = {"strategy": strategy, "use_distributed_sampler": False}
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=args.devices, logger=False, deterministic=True,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.root,
        callbacks=[Progress(), spot], **distributed,
    )  # fmt: skip
    model = Model()
    trainer.fit(model)
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
