"""``spotguard ckpt list|verify|prune|pull``: inspect and manage a checkpoint store.

The trainer hooks' store is imported when a subcommand runs, never when the parser is built:
the agent's command line must not load them (nor torch: only ``pull --to-torch`` needs it).
Both formats are handled: ``torch`` (one ``torch.save`` file per rank) and ``dcp`` (sharded,
``torch.distributed.checkpoint``); ``list`` shows which, and the world size that wrote it.

Exit codes: 0 ok; 1 a checkpoint failed verification, verifies but cannot be loaded or
exported here, or a local file could not be written; 2 the store cannot be used (bad URI,
missing bucket, no credentials), there is no committed checkpoint at ``--step``, or a bad
argument (``--to-torch`` into a directory that does not exist). Every error is one line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from spotguard.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpoint,
    UnloadableCheckpoint,
)
from spotguard.protocol import MANIFEST_NAME, step_dir
from spotguard.sizes import human_size

if TYPE_CHECKING:
    from spotguard.trainer_hooks import CheckpointStore, Manifest
    from spotguard.trainer_hooks.backends import Sink

__all__ = ["register", "run_ckpt"]


def register(commands: Any) -> None:
    ckpt = commands.add_parser("ckpt", help="inspect and manage a checkpoint store")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True, parser_class=type(ckpt))
    listing = ckpt_commands.add_parser("list", help="committed checkpoints, oldest first")
    listing.add_argument("uri", help="local path, file:///path or s3://bucket/prefix")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    verify = ckpt_commands.add_parser("verify", help="re-read every byte against the manifests")
    verify.add_argument("uri")
    verify.add_argument("--step", type=int, help="only this checkpoint")
    prune = ckpt_commands.add_parser("prune", help="delete all but the newest checkpoints")
    prune.add_argument("uri")
    prune.add_argument("--keep-last", type=int, required=True)
    prune.add_argument(
        "--quarantined", action="store_true", help="also delete quarantined checkpoints"
    )
    pull = ckpt_commands.add_parser(
        "pull", help="download a verified checkpoint, or export it as one torch.save file"
    )
    pull.add_argument("uri")
    pull.add_argument(
        "dest",
        nargs="?",
        type=Path,
        help="local directory: the checkpoint's files and manifest go to DEST/ckpt-<step>/ "
        "(optional with --to-torch)",
    )
    pull.add_argument("--step", type=int, help="default: the newest")
    pull.add_argument(
        "--to-torch",
        metavar="FILE",
        type=Path,
        help="write the checkpoint as one torch.save file that loads with "
        "torch.load(FILE, weights_only=True): a dcp checkpoint gathered into full tensors "
        "(in this process, any world size), a torch checkpoint's rank-0 state.pt as it is. "
        "Replaces FILE atomically, mode 0600; with DEST, converted from the pulled copy",
    )
    ckpt.set_defaults(handler=run_ckpt)


def _describe(manifest: Manifest) -> dict[str, object]:
    return {
        "step": manifest.step,
        "epoch": manifest.epoch,
        "kind": manifest.kind,
        "format": manifest.format,
        "world_size": manifest.world_size,
        "created_at": manifest.created_at.isoformat(),
        "bytes": sum(entry.size for entry in manifest.files.values()),
        "files": sorted(manifest.files),
    }


def _list(store: CheckpointStore, as_json: bool, out: TextIO) -> int:
    rows = [_describe(manifest) for manifest in store.list()]
    quarantined = [
        {"step": q.step, "reason": q.reason, "quarantined_at": q.quarantined_at}
        for q in store.quarantined()
    ]
    if as_json:  # committed checkpoints only, as before; quarantined ones: the text form
        print(json.dumps(rows, indent=2), file=out)
        return 0
    for q in quarantined:
        print(f"quarantined step {q['step']} ({q['quarantined_at']}): {q['reason']}", file=out)
    if not rows:
        print(f"{store.uri}: no committed checkpoints", file=out)
        return 0
    header = f"{'step':>12} {'epoch':>6} {'kind':10} {'format':6} {'ranks':>5} {'size':>10}"
    print(f"{header}  created", file=out)
    for row in rows:
        size = human_size(float(row["bytes"]))  # type: ignore[arg-type]
        print(
            f"{row['step']:>12} {row['epoch']:>6} {row['kind']!s:10} {row['format']!s:6} "
            f"{row['world_size']:>5} {size:>10}  {row['created_at']}",
            file=out,
        )
    return 0


def _verify(store: CheckpointStore, step: int | None, out: TextIO) -> int:
    results = store.verify(step)
    if not results:
        print(f"{store.uri}: no checkpoints", file=out)
        return 0
    for result in results:
        verdict = "ok" if result.ok else f"FAILED: {result.problem}"
        print(f"{result.step:>12}  {verdict}", file=out)
    return 0 if all(result.ok for result in results) else 1


def _prune(store: CheckpointStore, keep_last: int, quarantined: bool, out: TextIO) -> int:
    deleted = store.prune(keep_last, quarantined=quarantined)
    print(f"deleted steps: {', '.join(map(str, deleted)) or 'none'}", file=out)
    return 0


class _Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.enabled = stream.isatty()
        self.started = time.monotonic()

    def advance(self, size: int) -> None:
        self.done += size
        if self.enabled:
            share = self.done / max(self.total, 1)
            rate = self.done / max(time.monotonic() - self.started, 1e-6)
            bar = "#" * int(30 * share)
            self.stream.write(f"\r[{bar:30}] {share:6.1%} {human_size(rate)}/s")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


class _Tee:
    def __init__(self, sink: Sink, progress: _Progress) -> None:
        self.sink, self.progress = sink, progress

    def write(self, data: bytes | memoryview, /) -> int:
        self.progress.advance(len(data))
        return self.sink.write(data) or len(data)


def _pull(
    store: CheckpointStore, dest: Path | None, step: int | None, to_torch: Path | None, out: TextIO
) -> int:
    """Download the checkpoint into ``dest``, convert it into the file ``to_torch``, or both
    (converted from the verified local copy: one download)."""
    if dest is None and to_torch is None:
        raise ConfigError("pull needs DEST, --to-torch FILE, or both")
    manifest = store.get(step) if step is not None else store.latest()
    if manifest is None:
        print(f"{store.uri}: no committed checkpoint to pull", file=sys.stderr)
        return 1
    if to_torch is not None:  # imports torch: only now, and before any download
        from spotguard.trainer_hooks._internals.dcp_export import export_torch, writable_target

        writable_target(to_torch)
    source = store
    if dest is not None:
        from spotguard.trainer_hooks import CheckpointStore

        _download(store, manifest, dest, out)
        source = CheckpointStore(str(dest))
    if to_torch is not None:
        export_torch(source, manifest, to_torch)
        print(
            f"exported step {manifest.step} ({manifest.format}, written by "
            f"{manifest.world_size} rank(s)) to {to_torch}",
            file=out,
        )
    return 0


def _download(store: CheckpointStore, manifest: Manifest, dest: Path, out: TextIO) -> None:
    target = dest / step_dir(manifest.step)
    partial = dest / f".{step_dir(manifest.step)}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    progress = _Progress(sum(e.size for e in manifest.files.values()), sys.stderr)
    try:
        for name in sorted(manifest.files):
            path = partial / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                store.fetch(manifest, name, _Tee(handle, progress))
        (partial / MANIFEST_NAME).write_bytes(manifest.to_bytes())
    except CorruptCheckpoint:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        progress.close()
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)
    print(f"pulled step {manifest.step} (verified) to {target}", file=out)


def run_ckpt(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run one ``spotguard ckpt`` subcommand; the exit code is returned. Output goes to
    ``out``, by default to ``sys.stdout`` as it is when this runs (not as it was at import)."""
    from spotguard.trainer_hooks import CheckpointStore

    out = out or sys.stdout
    try:
        store = CheckpointStore(args.uri)
        if args.ckpt_command == "list":
            return _list(store, args.json, out)
        if args.ckpt_command == "verify":
            return _verify(store, args.step, out)
        if args.ckpt_command == "prune":
            return _prune(store, args.keep_last, args.quarantined, out)
        return _pull(store, args.dest, args.step, args.to_torch, out)
    except (CorruptCheckpoint, UnloadableCheckpoint) as exc:
        print(f"spotguard ckpt {args.ckpt_command}: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, ConfigError) as exc:
        print(f"spotguard ckpt {args.ckpt_command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a local file: disk full, permission denied
        print(f"spotguard ckpt {args.ckpt_command}: {exc}", file=sys.stderr)
        return 1
