"""What each rank saves, in one format for both front ends, and how a rank finds its part.

A checkpoint holds one whole-state file, written by rank 0, and one small file per other rank::

    state.pt      {<the front end's state>..., "__spotguard__": {"step", "epoch", "rng"}}
    rank-<k>.pt   {"__spotguard__": {"step", "epoch", "rng"}}

The state is replicated (DDP), so rank 0 saves it once; what differs per rank is its random
streams, saved by each rank and restored by each rank from its own file. The front end decides
what the whole state is (``SpotGuard``: ``{"state": {name: state_dict}}``; ``SpotCheckpoint``:
Lightning's own checkpoint dict, which Lightning can still load with ``ckpt_path``); the
``__spotguard__`` entry is the same for both.

That is format ``torch``. In format ``dcp`` (sharded state, :mod:`.sharded`) every rank writes
its shards and its own ``rank-<k>-<save id>.pt`` (rank 0's too, with the state's plain
values); :func:`load_newest` resumes from the newest checkpoint of either format when the
front end passes it a sharded loader.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from spotguard.errors import (
    CorruptCheckpoint,
    ResumeRefused,
    UnloadableCheckpoint,
)
from spotguard.trainer_hooks._internals import rng
from spotguard.trainer_hooks._internals.ranks import Ranks
from spotguard.trainer_hooks.manifest import WHOLE_STATE_FILE, Manifest
from spotguard.trainer_hooks.store import CheckpointStore

__all__ = [
    "META_KEY",
    "RANK_FILE",
    "Restored",
    "ShardedLoad",
    "load_newest",
    "meta",
    "rank_file",
    "rank_stem",
]

log = logging.getLogger("spotguard.trainer_hooks")

META_KEY = "__spotguard__"
#: A rank's own file in either format: ``rank-<k>.pt`` (``torch``), ``rank-<k>-<save id>.pt``
#: (``dcp``); the rank is its only group.
RANK_FILE = re.compile(r"rank-(\d+)(?:-[0-9a-f]+)?\.pt")


def rank_stem(rank: int) -> str:
    """The name of ``rank``'s own file without its suffix: ``.pt`` in format ``torch``, the
    save's id then ``.pt`` in format ``dcp`` (the sharded writer adds it)."""
    return f"rank-{rank}"


def rank_file(rank: int) -> str:
    """The file ``rank`` writes in format ``torch``: the whole state on rank 0, its own streams
    elsewhere."""
    return WHOLE_STATE_FILE if rank == 0 else f"{rank_stem(rank)}.pt"


def meta(step: int, epoch: int) -> dict[str, Any]:
    """What every rank saves about itself: where it is, and its random streams (captured now:
    call it at the step boundary being saved)."""
    return {"step": step, "epoch": epoch, "rng": rng.capture()}


class Restored:
    """The newest verified checkpoint as one rank sees it: the whole state (``None`` for a
    sharded checkpoint, already loaded into the live state) and its own meta."""

    def __init__(self, manifest: Manifest, whole: Any, own_meta: dict[str, Any]) -> None:
        self.manifest, self.whole, self.meta = manifest, whole, own_meta


#: Loads the sharded checkpoint of a step on every rank (a collective), never raising: what
#: it restored, or (file, reason) for a file that failed verification (``""``: one of its
#: shards), or another reason (see :func:`.sharded.load_sharded_step`).
ShardedLoad = Callable[[int], tuple[Restored | None, tuple[str, str] | None, str | None]]


def load_newest(
    store: CheckpointStore,
    ranks: Ranks,
    *,
    allow_fresh_start: bool = False,
    sharded: ShardedLoad | None = None,
) -> Restored | None:
    """Load the checkpoint every rank resumes from; ``None`` when the store holds none.

    With ``sharded``, the newest checkpoint may be of either format (``torch``: whole-state
    files, at the same world size; ``dcp``: loaded by ``sharded``, at any world size); without
    it a ``dcp`` one raises :class:`UnloadableCheckpoint`.

    Rank 0 proposes the newest that verifies for it (quarantining what fails on the way down)
    and the others load exactly that step: ranks never resume from different checkpoints,
    even while another writer commits. When another rank's file fails verification, rank 0
    reads it back itself: if the store's bytes are bad, the checkpoint is quarantined and every
    rank tries the next older one (all resume from the newest that every rank can load); if
    rank 0 reads them fine, the fault is that node's and every rank raises instead (one bad
    node must not quarantine the whole history). Any other failure to load (memory, a missing
    file) raises on every rank alike. When the store holds checkpoint data and none verifies,
    :class:`~spotguard.errors.ResumeRefused` is raised on every rank, unless
    ``allow_fresh_start`` (then the log says so and all start from 0).
    """
    while True:
        step, layout, found = _proposed(store, ranks, allow_fresh_start, sharded is not None)
        if step is None:
            return None
        if layout == "dcp" and sharded is not None:
            restored, corrupt, other = sharded(step)
        else:
            restored, corrupt, other = _load_step(store, ranks, step, found)
        problems = ranks.gather((corrupt, other))
        unloadable = "; ".join(f"rank {k}: {why}" for k, (_, why) in enumerate(problems) if why)
        if unloadable:
            raise UnloadableCheckpoint(f"checkpoint {step} cannot be loaded ({unloadable})")
        broken = [(k, *bad) for k, (bad, _) in enumerate(problems) if bad]
        if not broken:
            assert restored is not None  # every rank loaded it
            return restored
        verdict = _confirm(store, step, found, broken) if ranks.rank == 0 else None
        quarantined, reason = ranks.gather(verdict)[0]
        if not quarantined:
            raise UnloadableCheckpoint(f"checkpoint {step} cannot be loaded: {reason}")
        log.error("checkpoint %d quarantined (%s): trying the next older one", step, reason)


def _confirm(
    store: CheckpointStore,
    step: int,
    found: tuple[Manifest, Any] | None,
    broken: list[tuple[int, str, str]],
) -> tuple[bool, str]:
    """Rank 0's verdict on files other ranks could not verify: read back from the store, bad
    bytes quarantine the checkpoint (``True``); good bytes mean a fault on that node. A file
    named ``""`` is one of a sharded checkpoint's (DCP names it in the reason only): every
    file of the checkpoint is read back then."""
    if found is None:  # rank 0 proposed this step: it has loaded its manifest
        return False, "rank 0 has no manifest to check the other ranks' files against"
    manifest = found[0]
    checked: set[str] = set()
    try:
        for rank, name, why in broken:
            if name in checked:
                continue
            checked.add(name)
            try:
                if name:
                    store.read_back_payload(step, name, manifest.files[name])
                else:
                    _read_back_all(store, step)
            except CorruptCheckpoint:
                reason = f"rank {rank}: {why}"
                store.quarantine(step, reason)
                return True, reason
        nodes = ", ".join(f"rank {rank}" for rank, _, _ in broken)
        details = "; ".join(why for _, _, why in broken)
        return False, (f"{nodes} could not verify files that rank 0 reads back intact: a fault "
                       f"on that node, not in the store ({details})")  # fmt: skip
    except Exception as exc:
        return False, f"rank 0 could not check the other ranks' report: {exc}"


def _read_back_all(store: CheckpointStore, step: int) -> None:
    """Every file of checkpoint ``step`` read back: :class:`CorruptCheckpoint` for the first
    that does not match its manifest."""
    for result in store.verify(step):
        if not result.ok:
            raise CorruptCheckpoint(f"{store.uri}: step {step}: {result.problem}")


def _newest(store: CheckpointStore, sharded: bool) -> tuple[Manifest, Any] | None:
    """Rank 0's candidate: the newest checkpoint that verifies, its whole state loaded
    (format ``torch``) or not (format ``dcp``, with ``sharded``: every rank loads its part,
    and its shards are verified then). Walked newest first as
    :meth:`CheckpointStore.resume` walks: what fails on the way down (a manifest, a listed
    file missing or truncated, a whole-state file's checksum) is quarantined, never skipped
    and left in place (the run would resume older and then find its next save's step
    committed already, at every restart). :class:`ResumeRefused` when checkpoints exist and
    none verifies; ``None`` for a store without any."""
    if not sharded:
        return store.resume(WHOLE_STATE_FILE)
    failed: list[str] = []
    for step, manifest, problem in store.walk():
        try:
            if manifest is None:
                if not problem.startswith("quarantined earlier"):
                    raise CorruptCheckpoint(problem)
            elif manifest.format == "dcp":
                return manifest, None
            else:
                return store.load_state(step=step, name=WHOLE_STATE_FILE)
        except CorruptCheckpoint as exc:
            problem = str(exc)
            log.error("checkpoint %d failed verification: %s", step, problem)
            store.quarantine(step, problem)
        failed.append(f"step {step}: {problem}")
    if not failed:
        return None
    raise ResumeRefused(
        f"{store.uri} holds checkpoints but none verifies ({'; '.join(failed)}). Starting "
        "from step 0 would lose the run: inspect with `spotguard ckpt list`, or pass "
        "allow_fresh_start=True to start over"
    )


def _proposed(
    store: CheckpointStore, ranks: Ranks, allow_fresh_start: bool, sharded: bool
) -> tuple[int | None, str | None, tuple[Manifest, Any] | None]:
    """Rank 0's newest verified step and its format, told to every rank (or its error,
    raised on all), and on rank 0 what it loaded on the way."""
    step: int | None = None
    layout: str | None = None
    found: tuple[Manifest, Any] | None = None
    problem: Exception | None = None
    if ranks.rank == 0:
        try:
            found = _newest(store, sharded)
            whole = found is not None and found[0].format == "torch"  # dcp: any world size
            if found is not None and whole and found[0].world_size != ranks.world:
                raise UnloadableCheckpoint(
                    f"{store.uri}: checkpoint {found[0].step} was written by "
                    f"{found[0].world_size} rank(s), this run has {ranks.world}: whole-state "
                    "checkpoints resume at the same world size"
                )
            if found is not None:
                step, layout = found[0].step, found[0].format
        except ResumeRefused as exc:
            if not allow_fresh_start:
                problem = exc
            else:
                log.error("starting from step 0 (allow_fresh_start=True) although %s", exc)
        except Exception as exc:  # raised below, after the others heard of it
            problem = exc
    step, layout, message = ranks.gather((step, layout, str(problem) if problem else None))[0]
    if message is not None:
        if problem is not None:
            raise problem
        raise ResumeRefused(f"rank 0 could not resume: {message}")
    return step, layout, found


def _load_step(
    store: CheckpointStore, ranks: Ranks, step: int, found: tuple[Manifest, Any] | None
) -> tuple[Restored | None, tuple[str, str] | None, str | None]:
    """This rank's view of ``step`` (``found``: rank 0 has loaded it already): what it
    restored, or why not: (file, reason) when a file failed verification, else a reason."""
    name = WHOLE_STATE_FILE
    try:
        manifest, whole = found or store.load_state(step=step, name=name)
        own = whole[META_KEY]
        if ranks.rank != 0:
            # Rank 0's file carries rank 0's random streams; this rank's are its own.
            name = rank_file(ranks.rank)
            own = store.load_state(step=step, name=name)[1][META_KEY]
    except CorruptCheckpoint as exc:
        return None, (name, str(exc)), None
    except Exception as exc:  # every rank must reach the gather that follows: never raise
        return None, None, f"{type(exc).__name__}: {exc}"
    return Restored(manifest, whole, own), None, None
