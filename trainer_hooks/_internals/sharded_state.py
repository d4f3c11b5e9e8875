"""What every rank's part of a sharded (``dcp``) checkpoint is, and how a loaded one is put
back: the format decision, modules and optimizers through torch's state-dict API, the state's
plain values, the load target built from the checkpoint's metadata.

* modules as ``get_model_state_dict`` gives them, optimizers as ``get_optimizer_state_dict``
  with the module of the state that holds all their parameters: keyed by parameter names
  (FQNs), which is what lets DCP reshard them to another world size. An optimizer without
  state yet (a save before its first step) is saved as a marker with its hyperparameters:
  torch's state-dict API would make its state by a step with ``lr=0``, changing the live
  optimizer (Adam's step count, and its moments with weight decay); on load the marker leaves
  the live optimizer fresh;
* everything else (other objects' ``state_dict()``, plain values) is not DCP's to save: DCP
  would load it into a template built from the live state, so a dict that gained keys would
  come back empty and a value that changed type or size would never load again. It is saved
  whole in rank 0's own file (:data:`PLAIN_KEY`), as the ``torch`` format does, and loaded
  whole from there on every rank, at any world size.

The save job, the staging and the load of one checkpoint are in :mod:`.sharded`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from spotguard.errors import ConfigError, UnloadableCheckpoint

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

    from spotguard.trainer_hooks._internals.ranks import Ranks

__all__ = [
    "FRESH_OPTIMIZER",
    "PLAIN_KEY",
    "apply_loaded",
    "buffer_names",
    "choose_format",
    "fresh_optimizer",
    "has_dtensor",
    "holds_dtensors",
    "load_target",
    "plain_state",
    "refill",
    "sharded_state_dict",
]

#: The entry of rank 0's own file that holds the state's plain values (``{name: value}``).
PLAIN_KEY = "state"
#: DCP's entry for an optimizer saved without state (see the module's docstring).
FRESH_OPTIMIZER = "__spotguard_fresh_optimizer__"


def has_dtensor(value: Any) -> bool:
    if isinstance(value, DTensor):
        return True
    if isinstance(value, Mapping):
        return any(has_dtensor(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_dtensor(item) for item in value)
    return False


def holds_dtensors(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` holds a DTensor: a module's parameters or buffers (a sharded buffer
    saved by rank 0 alone would come back as rank 0's shard on every rank), an optimizer's
    parameters, or a value (other objects' ``state_dict()`` is not built for this: it may be
    costly)."""
    for value in state.values():
        if isinstance(value, nn.Module):
            params: Any = itertools.chain(value.parameters(), value.buffers())
        elif isinstance(value, torch.optim.Optimizer):
            params = (p for group in value.param_groups for p in group["params"])
        else:
            if has_dtensor(value):
                return True
            continue
        if any(isinstance(param, DTensor) for param in params):
            return True
    return False


def choose_format(setting: str, state: Mapping[str, Any], ranks: Ranks) -> str:
    """The format of every checkpoint this run writes, the same on every rank (a collective
    with several ranks): ``setting`` resolved (``auto``: ``dcp`` when any rank's state holds a
    DTensor); ``torch`` for DTensor state is refused on every rank."""
    (sharded,) = ranks.any(holds_dtensors(state))
    if setting == "torch" and sharded:
        raise ConfigError(
            "checkpoint_format='torch' cannot save DTensor state (FSDP2, tensor parallelism): "
            "no rank holds all of it; use checkpoint_format='dcp' (or 'auto')"
        )
    chosen = ("dcp" if sharded else "torch") if setting == "auto" else setting
    if chosen == "dcp":  # at the start, not at the first save (the same state on every rank)
        for name, value in state.items():
            if isinstance(value, torch.optim.Optimizer):
                _owner(name, value, state)
    return chosen


def _owner(name: str, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> nn.Module:
    """The module of ``state`` that holds every parameter ``optimizer`` updates (the first in
    the state's order: the same at save and load). Not merely one that shares a parameter:
    the optimizer's state is keyed by that module's parameter names, and a submodule or one of
    two modules would leave the other parameters without a name."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for value in state.values():
        if isinstance(value, nn.Module) and params <= {id(p) for p in value.parameters()}:
            return value
    raise ConfigError(
        f"state[{name!r}] optimizes parameters that no single module of the state holds: a "
        "sharded checkpoint keys optimizer state by the parameter names of one module; put "
        "the module holding all of them in the state (the whole model, or the modules it "
        "optimizes together in one nn.ModuleDict)"
    )


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def fresh_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What an optimizer without state is saved as: the marker and its hyperparameters (a
    scheduler may have set its learning rate already)."""
    return {FRESH_OPTIMIZER: True, "param_groups": _hyperparameters(optimizer)}


def sharded_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """DCP's state dict of ``state``: its modules and optimizers through torch's state-dict
    API (sharded, FQN keys; an optimizer without state as a marker, never stepped to make
    some). Nothing else: see :func:`plain_state`."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    built: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, nn.Module):
            built[name] = get_model_state_dict(value)
        elif isinstance(value, torch.optim.Optimizer):
            if value.state:
                built[name] = get_optimizer_state_dict(_owner(name, value, state), value)
            else:
                built[name] = fresh_optimizer(value)
    return built


def plain_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``state`` that are neither modules nor optimizers, as saved in rank 0's
    own file: objects' ``state_dict()``, plain values as they are."""
    return {
        name: value.state_dict() if hasattr(value, "state_dict") else value
        for name, value in state.items()
        if not isinstance(value, (nn.Module, torch.optim.Optimizer))
    }


def buffer_names(state: Mapping[str, Any]) -> frozenset[str]:
    """The paths of the modules' buffers in DCP's state dict."""
    return frozenset(
        f"{name}.{path}"
        for name, value in state.items()
        if isinstance(value, nn.Module)
        for path, _ in value.named_buffers()
    )


def load_target(state: Mapping[str, Any], metadata: Metadata) -> dict[str, Any]:
    """The state dict DCP loads the checkpoint into: modules and optimizers as
    :func:`sharded_state_dict` builds them (an optimizer the checkpoint holds as a marker: its
    hyperparameters only, the live one stays fresh), and any other entry only where DCP holds
    it (Lightning's entries, or plain values of an earlier spotguard's checkpoint)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    saved = metadata.state_dict_metadata

    def in_dcp(name: str) -> bool:
        return any(key == name or key.startswith(f"{name}.") for key in saved)

    target: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, nn.Module):
            target[name] = get_model_state_dict(value)
        elif isinstance(value, torch.optim.Optimizer):
            if f"{name}.{FRESH_OPTIMIZER}" in saved:
                target[name] = fresh_optimizer(value)
            else:
                target[name] = get_optimizer_state_dict(_owner(name, value, state), value)
        elif in_dcp(name):
            target[name] = value.state_dict() if hasattr(value, "state_dict") else value
    return target


def refill(target: Any, loaded: Any) -> None:
    """Put the values DCP replaced in ``loaded`` (the form a target was loaded in, built by
    ``load_sharded_step``'s ``loaded_as``) back into ``target``: plain values (a learning rate,
    Lightning's entries) were replaced in the copy's containers; tensors were filled in place
    (the copy's share their storage) and stay."""
    if target is loaded:
        return
    keys = target.keys() if isinstance(target, dict) else range(len(target))
    for key in keys:
        mine, theirs = target[key], loaded[key]
        if isinstance(mine, (dict, list)):
            refill(mine, theirs)
        elif not isinstance(mine, torch.Tensor):  # ShardedTensors included
            target[key] = theirs


def apply_loaded(
    state: MutableMapping[str, Any], loaded: Mapping[str, Any], plain: Mapping[str, Any]
) -> None:
    """Put ``loaded`` (built by :func:`_target`, filled by DCP) and ``plain`` (rank 0's plain
    values) back into the objects of ``state``; plain values are replaced in the dict."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    for name, value in list(state.items()):
        if name not in loaded:
            continue
        if isinstance(value, nn.Module):
            set_model_state_dict(value, loaded[name])
        elif isinstance(value, torch.optim.Optimizer):
            if FRESH_OPTIMIZER in loaded[name]:  # saved before its first step: stays fresh
                saved = loaded[name]["param_groups"]
                if len(saved) != len(value.param_groups):
                    raise UnloadableCheckpoint(
                        f"state[{name!r}] has {len(value.param_groups)} parameter groups, the "
                        f"checkpoint {len(saved)}"
                    )
                for group, hyperparameters in zip(value.param_groups, saved, strict=True):
                    group.update(hyperparameters)
            else:
                set_optimizer_state_dict(_owner(name, value, state), value, loaded[name])
        elif hasattr(value, "load_state_dict"):
            value.load_state_dict(loaded[name])
        else:
            state[name] = loaded[name]
    for name, saved in plain.items():  # as the torch format restores rank 0's state
        value = state.get(name)
        if value is not None and hasattr(value, "load_state_dict"):
            value.load_state_dict(saved)
        else:
            state[name] = saved
