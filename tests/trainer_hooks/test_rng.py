"""RNG states restored on a machine with fewer GPUs than the one that saved them."""

from __future__ import annotations

import logging
import random

import numpy
import torch

from spotguard.trainer_hooks._internals import rng


def draws() -> list[float]:
    return [random.random(), float(numpy.random.rand()), float(torch.rand(1))]


def test_cuda_states_without_their_devices_warn_and_the_rest_is_restored(caplog):
    saved = rng.capture()
    expected = draws()
    # Saved on a machine with two GPUs; restored here, with fewer (none on CPU CI).
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda_states = [torch.cuda.get_rng_state(i) for i in range(present)]
    saved["cuda"] = cuda_states + [torch.zeros(16, dtype=torch.uint8)] * 2
    draws()  # move every generator on
    with caplog.at_level(logging.WARNING, logger="spotguard.trainer_hooks"):
        rng.restore(saved)
    assert draws() == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"CUDA RNG states of {present + 2} devices" in warnings[0]
    assert f"this process has {present}" in warnings[0]


def test_no_cuda_states_no_warning(caplog):
    saved = rng.capture()
    saved.pop("cuda", None)
    with caplog.at_level(logging.WARNING, logger="spotguard.trainer_hooks"):
        rng.restore(saved)
    assert caplog.records == []
