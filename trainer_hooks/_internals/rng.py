"""Every random number generator training draws from, captured and restored.

Bit-exact resume with dropout and shuffling needs the Python, NumPy, torch CPU and CUDA
generators exactly where they were. The states are stored as plain lists and tensors because
checkpoints are loaded with ``weights_only=True``, which refuses NumPy arrays.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from spotguard.trainer_hooks._internals.snapshot import cuda_in_use


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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
