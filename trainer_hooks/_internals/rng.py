"""Every random number generator training draws from, captured and restored.

Bit-exact resume with dropout and shuffling needs the Python, NumPy, torch CPU and CUDA
generators exactly where they were. The states are stored as plain lists and tensors because
checkpoints are loaded with ``weights_only=True``, which refuses NumPy arrays.

A replacement instance may have fewer GPUs than the one that saved (the fleet mixes instance
types): the CUDA states of devices that exist are restored, the rest are reported, not fatal.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

log = logging.getLogger("spotguard.trainer_hooks")


def cuda_in_use() -> bool:
    """Whether this process has touched CUDA (asking must not initialize it)."""
    return torch.cuda.is_available() and bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def capture() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy
    except ImportError:
        pass
    else:
        name, keys, pos, has_gauss, cached = numpy.random.get_state(legacy=True)
        as_tensor = torch.from_numpy(numpy.asarray(keys).astype("int64"))
        state["numpy"] = [name, as_tensor, pos, has_gauss, cached]
    if cuda_in_use():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    _restore_cuda(state.get("cuda", []))


def _restore_cuda(states: list[torch.Tensor]) -> None:
    """Restore the saved CUDA states of the devices present; warn about the others (their
    random numbers will differ from the uninterrupted run's)."""
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, device_state in enumerate(states[:present]):
        torch.cuda.set_rng_state(device_state, index)
    if len(states) > present:
        log.warning("the checkpoint holds CUDA RNG states of %d devices and this process has "
                    "%d: restored %d; random numbers on the missing devices' work will differ "
                    "from the uninterrupted run", len(states), present, present)  # fmt: skip
