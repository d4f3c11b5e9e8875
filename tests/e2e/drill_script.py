"""A user's own plain-PyTorch training script, as ``spotguard drill --script`` runs it.

The drill's contract: the store comes from ``SPOTGUARD_CHECKPOINT_URI`` (the state dir from
``SPOTGUARD_STATE_DIR``, which SpotGuard reads by itself), and the final weights go to
``SPOTGUARD_DRILL_OUTPUT`` when it is set, so that the drill can compare them.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from spotguard.trainer_hooks import ResumableDataLoader, SpotGuard

torch.manual_seed(3)
features = torch.randn(256, 8, generator=torch.Generator().manual_seed(5))
dataset = torch.utils.data.TensorDataset(features, (features.sum(1, keepdim=True) > 0).float())
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
loader = ResumableDataLoader(dataset, batch_size=8, shuffle=True, seed=1)
state = {"model": model, "optimizer": optimizer, "data": loader}

with SpotGuard(os.environ["SPOTGUARD_CHECKPOINT_URI"], every_n_steps=20) as guard:
    step = guard.restore(state)
    while step < 6 * len(loader):
        for batch_features, targets in loader:
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch_features), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            time.sleep(0.02)
            guard.step(step, state, epoch=step // len(loader))
    guard.finish(step, state)
if "SPOTGUARD_DRILL_OUTPUT" in os.environ:
    torch.save(model.state_dict(), os.environ["SPOTGUARD_DRILL_OUTPUT"])
