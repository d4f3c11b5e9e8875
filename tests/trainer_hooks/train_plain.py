"""A small but honest training run for the SpotGuard tests.

Dropout, a shuffled ResumableDataLoader, SGD with momentum and an LR schedule: everything that
makes a resumed run drift if any state is lost. Progress goes to ``--progress`` (one line per
step) so a test can send a real signal at a chosen point; final weights go to ``--out``.
"""

from __future__ import annotations

import argparse
import random
import time
from datetime import timedelta
from pathlib import Path

import numpy
import torch
from torch import nn

from spotguard.trainer_hooks import ResumableDataLoader, SpotGuard


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, object, ResumableDataLoader]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(1234)
    features = torch.randn(96, 8, generator=generator)
    targets = (features.sum(dim=1, keepdim=True) > 0).float()
    dataset = torch.utils.data.TensorDataset(features, targets)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.8)
    loader = ResumableDataLoader(dataset, batch_size=8, shuffle=True, seed=seed)
    return model, optimizer, scheduler, loader


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--progress", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pause-at", type=int, help="after this step, wait up to 10 s")
    parser.add_argument("--go-file", type=Path, help="with --pause-at: wait for this file")
    parser.add_argument("--ddp", action="store_true", help="RANK/WORLD_SIZE from the env, gloo")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds after a bare signal")
    parser.add_argument("--margin", type=float, default=5.0, help="the guard's safety_margin")
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--guard-first", action="store_true", help="SpotGuard before init_pg")
    args = parser.parse_args()

    def make_guard() -> SpotGuard:
        return SpotGuard(
            args.store,
            every_n_steps=args.every,
            keep_last=args.keep_last,
            default_budget=args.budget,
            safety_margin=args.margin,
        )

    early_guard = make_guard() if args.guard_first else None
    model, optimizer, scheduler, loader = build(args.seed)
    rank = 0
    if args.ddp:
        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
        rank = torch.distributed.get_rank()
        model = nn.parallel.DistributedDataParallel(model)
        # Every rank its own random streams (dropout, noise), as in real multi-rank training.
        torch.manual_seed(args.seed + rank)
    random.seed(args.seed)
    numpy.random.seed(args.seed)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": loader}
    with early_guard or make_guard() as guard:
        step = guard.restore(state)
        steps_per_epoch = len(loader)
        while step < args.epochs * steps_per_epoch:
            for features, targets in loader:
                # Python and NumPy randomness too: a resumed run must draw the same numbers.
                noise = random.random() * 1e-3 + float(numpy.random.rand()) * 1e-3
                loss = nn.functional.binary_cross_entropy_with_logits(
                    model(features) + noise, targets
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                if args.progress and rank == 0:
                    with args.progress.open("a") as handle:
                        handle.write(f"{step}\n")
                time.sleep(args.step_sleep)
                if step == args.pause_at:
                    # The test signals us now: the stop lands exactly at this step boundary.
                    paused = time.monotonic()
                    if args.go_file:  # every rank waits; the test signals one, then says go
                        while not args.go_file.exists() and time.monotonic() - paused < 30:
                            time.sleep(0.01)
                        time.sleep(0.2)  # by now the signalled rank has handled its signal
                    else:
                        while not guard.stop_requested and time.monotonic() - paused < 10:
                            time.sleep(0.01)
                guard.step(step, state, epoch=step // steps_per_epoch)
        guard.finish(step, state)
    if rank == 0:
        torch.save(model.state_dict(), args.out)
    if args.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
