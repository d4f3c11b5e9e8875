"""A small Lightning run for the SpotCheckpoint tests (both import styles).

Dropout, a shuffled ResumableDataLoader, SGD with momentum and a step LR schedule. Progress goes
to ``--progress``; ``--pause-at N`` holds the run after step N until a stop is requested, so a
test's real signal lands exactly there. Final weights go to ``--out``.

Optional, off by default: gradient accumulation (``--accumulate``), a validation loop
(``--val-batches``, each batch recorded in ``--val-progress``), and holds at other places
(``--pause-at-batch``: after a training micro-batch; ``--hold-in``: inside ``prepare_data``,
the sanity check, or the validation at step ``--pause-at``), announced by touching
``--ready-file`` so that a test signals the process exactly there.
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
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--every-seconds", type=float, help="every_n_seconds")
    parser.add_argument("--val-batches", type=int, default=0, help="> 0: validate every epoch")
    parser.add_argument("--val-progress", type=Path, help="'step batch_idx' of each val batch")
    parser.add_argument("--pause-at-batch", type=int, help="hold after this batch of epoch 0")
    parser.add_argument("--hold-for", choices=["stop", "rebalance"], default="stop")
    parser.add_argument("--hold-in", choices=["prepare_data", "sanity", "validation"])
    parser.add_argument("--ready-file", type=Path, help="touched when a hold begins")
    args = parser.parse_args()
    pl = importlib.import_module(args.package)

    def hold() -> None:
        """Wait (bounded) for the test: for the go file when there is one (every rank waits;
        the test signals one of them, then says go), else for what ``--hold-for`` names to
        reach SpotCheckpoint (before its ``setup`` there is no core: then only the go file,
        or the signal itself, ends the wait)."""
        if args.ready_file:
            args.ready_file.touch()
        held = time.monotonic()
        while time.monotonic() - held < 30:
            core = spot._core
            if args.go_file:
                if args.go_file.exists():
                    time.sleep(0.2)  # by now a signalled rank has handled its signal
                    return
            elif core is not None and (
                core.stops.early_save if args.hold_for == "rebalance" else core.stop_requested
            ):
                return
            time.sleep(0.01)

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

    class Preparing(Model):
        def prepare_data(self):
            hold()

    class Validated(Model):
        def validation_step(self, batch, batch_idx):
            trainer = self.trainer
            if args.val_progress and trainer.global_rank == 0:
                with args.val_progress.open("a") as handle:
                    handle.write(f"{trainer.global_step} {batch_idx}\n")
            features, targets = batch
            return nn.functional.binary_cross_entropy_with_logits(self.net(features), targets)

        def val_dataloader(self):
            generator = torch.Generator().manual_seed(4321)
            features = torch.randn(4 * args.val_batches, 8, generator=generator)
            targets = (features.sum(dim=1, keepdim=True) > 0).float()
            dataset = torch.utils.data.TensorDataset(features, targets)
            return torch.utils.data.DataLoader(dataset, batch_size=4)

    spot = SpotCheckpoint(
        args.store, every_n_train_steps=args.every, every_n_seconds=args.every_seconds, keep_last=2
    )

    class Progress(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if args.progress and trainer.global_rank == 0:
                with args.progress.open("a") as handle:
                    handle.write(f"{trainer.global_step}\n")
            if args.pause_at_batch is not None:
                if trainer.current_epoch == 0 and batch_idx == args.pause_at_batch:
                    hold()
            elif args.hold_in is None and trainer.global_step == args.pause_at:
                hold()

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
            # before SpotCheckpoint's hook (callbacks run in order): it sees the stop in
            # this same batch
            if batch_idx == 0 and (
                (args.hold_in == "sanity" and trainer.sanity_checking)
                or (
                    args.hold_in == "validation"
                    and not trainer.sanity_checking
                    and trainer.global_step == args.pause_at
                )
            ):
                hold()

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
        callbacks=[Progress(), spot], accumulate_grad_batches=args.accumulate, **distributed,
    )  # fmt: skip
    model = Model()
    if args.val_batches:
        model = Validated()
    elif args.hold_in == "prepare_data":
        model = Preparing()
    trainer.fit(model)
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
