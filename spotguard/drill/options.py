"""What a drill rehearses: :class:`DrillOptions`, and its command-line flags declared with it.

Each field that the ``spotguard drill`` command exposes carries its flag and help text in its
metadata, so a new option is one field here: :func:`add_arguments` and :func:`from_args`
derive the parser and the options from these declarations. The options reach a built-in
workload whole, inside one :class:`WorkloadRun` (one JSON argument): no workload declares flags
of its own, so an option that changes the training is one field here too, read there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from spotguard.errors import ConfigError
from spotguard.sizes import parse_size

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["DrillOptions", "WorkloadRun", "add_arguments", "from_args", "parse_flag"]

_Fields = TypeVar("_Fields", bound="DataclassInstance")


def _cli(
    help: str, *, flag: str | None = None, parse: Callable[[str], Any] | None = None
) -> dict[str, Any]:
    """Metadata of a field exposed as ``--flag`` (default: the field name with dashes)."""
    return {"help": help, "flag": flag, "parse": parse}


@dataclass(frozen=True)
class DrillOptions:
    """What to rehearse; the defaults are the README's ``make drill``."""

    #: Checkpoint store URI; the drill works under a fresh prefix of its own inside it and
    #: removes it afterwards. ``None``: a temporary local directory.
    store: str | None = field(
        default=None, metadata=_cli("checkpoint store URI (default: a temporary directory)")
    )
    ranks: int = field(default=1, metadata=_cli("DDP ranks on gloo (default 1)", parse=int))
    interruptions: int = field(default=1, metadata=_cli("interruptions in one run", parse=int))
    seed: int | None = field(
        default=None, metadata=_cli("picks the interruption steps (default random)", parse=int)
    )
    #: The user's training script instead of the built-in workload (see the README).
    script: Path | None = field(
        default=None, metadata=_cli("your training script instead of the built-in", parse=Path)
    )
    #: Extra bytes of state in the built-in workload, to rehearse a big checkpoint's save.
    state_bytes: int = field(
        default=0,
        metadata=_cli(
            "e.g. 1GiB: extra state in the built-in workload; with --budget, the size to judge "
            "(default: the newest checkpoint's)",
            flag="--state-size",
            parse=parse_size,
        ),
    )
    #: Nodes of a torchrun elastic job (:mod:`~spotguard.drill.elastic`); 1: no torchrun.
    nodes: int = field(
        default=1, metadata=_cli("nodes of one torchrun elastic job (default 1)", parse=int)
    )
    #: With ``nodes``: the fewest that may train (torchrun's ``--nnodes MIN:MAX``); ``None``:
    #: all of them (the survivors wait for the replacement).
    min_nodes: int | None = field(
        default=None, metadata=_cli("with --nodes: the fewest that may train", parse=int)
    )
    #: Seconds each step of the built-in single-node workload sleeps, so the notice lands
    #: mid-run as on a GPU.
    step_time: float = 0.03
    #: The agent's IMDS poll interval (the daemon's default is 1 s).
    poll_interval: float = 0.5
    #: Where the agents look for IMDS; ``None`` = the drill's simulators. Pointing it at an
    #: address that does not answer rehearses an agent cut off from IMDS.
    agent_imds_endpoint: str | None = None
    #: Limit for any one launch, in seconds.
    launch_timeout: float = 180.0

    def __post_init__(self) -> None:
        if not 1 <= self.ranks <= 8:
            raise ConfigError(f"ranks must be 1..8, got {self.ranks}")
        if not 1 <= self.interruptions <= 10:
            raise ConfigError(f"interruptions must be 1..10, got {self.interruptions}")
        if self.script is not None and not self.script.is_file():
            raise ConfigError(f"script {self.script} does not exist")
        if self.script is not None and self.ranks != 1:
            raise ConfigError("--ranks applies to the built-in workload; a script starts its own")
        if self.state_bytes and self.script is not None:
            raise ConfigError("--state-size applies to the built-in workload, not to a script")
        if not 1 <= self.nodes <= 4:
            raise ConfigError(f"nodes must be 1..4, got {self.nodes}")
        if self.min_nodes is not None and self.nodes == 1:
            raise ConfigError("--min-nodes applies with --nodes 2 or more")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            raise ConfigError(f"min-nodes must be 1..{self.nodes} (--nodes), got {self.min_nodes}")
        if self.nodes > 1:
            for name, value, default in (("ranks", self.ranks, 1), ("interruptions",
                                         self.interruptions, 1), ("script", self.script, None),
                                         ("state-size", self.state_bytes, 0)):  # fmt: skip
                if value != default:
                    raise ConfigError(f"--{name} does not apply with --nodes (one worker per "
                                      "node, one interruption, the built-in workload)")  # fmt: skip
        for name in ("state_bytes", "step_time"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        for name in ("poll_interval", "launch_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")


def _flags() -> list[tuple[dataclasses.Field[Any], str]]:
    return [
        (item, item.metadata["flag"] or "--" + item.name.replace("_", "-"))
        for item in dataclasses.fields(DrillOptions)
        if "help" in item.metadata
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per exposed field; values stay text until :func:`from_args` parses them, so a
    bad value is a one-line error naming its flag."""
    for item, flag in _flags():
        parser.add_argument(flag, dest=item.name, help=item.metadata["help"])


def parse_flag(args: argparse.Namespace, name: str) -> Any:
    """The parsed value of one exposed field's flag, ``None`` when it was not given."""
    for item, flag in _flags():
        if item.name == name:
            text = getattr(args, name)
            if text is None:
                return None
            parse = item.metadata["parse"] or str
            try:
                return parse(text)
            except ValueError as exc:
                raise ConfigError(f"{flag} {text!r}: {exc}") from None
    raise KeyError(name)


def from_args(args: argparse.Namespace) -> DrillOptions:
    """The options the flags in ``args`` ask for (the defaults for those not given)."""
    given = {item.name: parse_flag(args, item.name) for item, _ in _flags()}
    return DrillOptions(**{name: value for name, value in given.items() if value is not None})


@dataclass(frozen=True)
class WorkloadRun:
    """One launch of a built-in workload (``python -m spotguard.drill.workload RUN``, or the
    elastic one under torchrun): the user's :class:`DrillOptions` and what the drill decides
    per launch. It travels as one JSON argument (:meth:`to_json`, :meth:`from_argv`)."""

    options: DrillOptions
    #: Where the workload writes what it did (per rank, and the progress file).
    results: Path
    #: The checkpoint store; ``None``: train without spotguard (the drill's reference).
    store: str | None = None
    #: Each rank's state dir, with ``{rank}``; ``None``: the hooks' default (the environment).
    state_dir_template: str | None = None
    #: How long to train: epochs of the single-node workload, ...
    epochs: int = 4
    #: ... optimizer steps of the whole elastic job, whatever its world size.
    steps: int = 0
    #: The periodic checkpoint interval, in steps.
    every: int = 16

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def from_argv(cls, argv: list[str]) -> WorkloadRun:
        """The run a workload was started with: its only argument, :meth:`to_json`'s text."""
        if len(argv) != 1:
            raise ConfigError("a drill workload takes one argument: the run's JSON")
        payload = json.loads(argv[0])
        payload["options"] = _typed(DrillOptions, payload["options"])
        return _typed(cls, payload)


def _typed(cls: type[_Fields], values: dict[str, Any]) -> _Fields:
    """``cls`` from JSON values: a field declared as a ``Path`` gets its text back as one."""
    paths = {item.name for item in dataclasses.fields(cls) if "Path" in str(item.type)}
    typed = {name: Path(value) if name in paths and value is not None else value
             for name, value in values.items()}  # fmt: skip
    return cls(**typed)
