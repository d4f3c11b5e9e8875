"""Sharded (dcp) checkpoints next to everything else that reads a store: older spotguard
versions, the whole-state loader, and hostile metadata. In this process, no process group."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from spotguard.errors import CorruptCheckpoint, UnloadableCheckpoint
from spotguard.protocol import MANIFEST_NAME, step_dir
from spotguard.trainer_hooks import CheckpointStore
from spotguard.trainer_hooks.manifest import Manifest

REPO = Path(__file__).resolve().parents[2]
#: The last commit before the dcp format: the manifest reader that spotguard releases have.
BEFORE_DCP = "879e954"


def _save_torch(store: CheckpointStore, step: int) -> None:
    store.save(step, {"state.pt": lambda f: torch.save({"step": step}, f)})


def _old_manifest_module(tmp_path: Path) -> ModuleType:
    """``trainer_hooks/manifest.py`` as it was before the dcp format, imported on its own."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git history of the repository")
    shown = subprocess.run(
        ["git", "show", f"{BEFORE_DCP}:trainer_hooks/manifest.py"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if shown.returncode != 0:
        pytest.skip(f"commit {BEFORE_DCP} is not in this clone: {shown.stderr.strip()}")
    path = tmp_path / "old_manifest.py"
    path.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location("old_manifest", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_manifest"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["old_manifest"]
    return module


def test_an_older_spotguard_takes_a_dcp_manifest_as_unloadable_never_corrupt(tmp_path):
    """An older spotguard quarantines a CorruptCheckpoint for good and resumes an older one;
    an UnloadableCheckpoint (another version) it raises. A dcp manifest is version 3 for it;
    a torch manifest stays version 2, which it reads."""
    from spotguard.trainer_hooks._internals.dcp_store import save_sharded

    old = _old_manifest_module(tmp_path)
    store = CheckpointStore(str(tmp_path / "store"))
    _save_torch(store, 1)
    save_sharded(store, 2, {"w": torch.ones(2)})
    for step, version in ((1, 2), (2, 3)):
        data = (tmp_path / "store" / step_dir(step) / MANIFEST_NAME).read_bytes()
        assert json.loads(data)["version"] == version
    assert (
        old.Manifest.from_bytes(
            (tmp_path / "store" / step_dir(1) / MANIFEST_NAME).read_bytes(), "torch"
        ).step
        == 1
    )
    data = (tmp_path / "store" / step_dir(2) / MANIFEST_NAME).read_bytes()
    with pytest.raises(UnloadableCheckpoint, match="manifest version 3") as caught:
        old.Manifest.from_bytes(data, "dcp")
    assert not isinstance(caught.value, CorruptCheckpoint)


@pytest.mark.parametrize(
    ("version", "layout", "problem"),
    [(3, "zarr", "format 'zarr'"), (2, "dcp", "format 'dcp' in a version 2"), (4, "dcp", "4")],
)
def test_a_manifest_of_an_unknown_format_or_version_is_unloadable_and_not_quarantined(
    tmp_path, version, layout, problem
):
    store = CheckpointStore(str(tmp_path))
    _save_torch(store, 1)
    _save_torch(store, 2)
    path = tmp_path / step_dir(2) / MANIFEST_NAME
    payload = json.loads(path.read_bytes())
    path.write_text(json.dumps(payload | {"version": version, "format": layout}))
    with pytest.raises(UnloadableCheckpoint, match=problem):
        Manifest.from_bytes(path.read_bytes(), "x")
    with pytest.raises(UnloadableCheckpoint, match=problem):
        store.resume()
    assert store.quarantined() == []
    assert path.exists()
    with pytest.raises(UnloadableCheckpoint, match=problem):
        store.load_state()  # never step 1 instead: that would go back in time


def test_load_state_never_goes_back_past_a_sharded_checkpoint(tmp_path):
    """The whole-state loader cannot load a dcp checkpoint; the newer state is in it, so it
    raises instead of loading the older torch checkpoint. A corrupt one is still skipped."""
    from spotguard.trainer_hooks._internals.dcp_store import save_sharded

    store = CheckpointStore(str(tmp_path))
    _save_torch(store, 1)
    save_sharded(store, 2, {"w": torch.ones(2)})
    with pytest.raises(UnloadableCheckpoint, match="sharded path"):
        store.load_state()
    _save_torch(store, 3)
    (tmp_path / step_dir(3) / "state.pt").write_bytes(b"x")  # corrupt: skipped
    with pytest.raises(UnloadableCheckpoint, match="step 2 is a 'dcp' checkpoint"):
        store.load_state()


def _build_on(module: str, name: str, attribute: str, value: tuple[str, str]) -> bytes:
    """A pickle that BUILDs ``module.name`` itself (the class object, not an instance) with
    ``{attribute: value}`` as slot state: ``setattr(module.name, attribute, value)``."""
    found = f"c{value[0]}\n{value[1]}\n".encode()
    return (
        b"\x80\x04" + f"c{module}\n{name}\n".encode() + b"N}"  # target, (None, {...})
        + b"X" + len(attribute).to_bytes(4, "little") + attribute.encode() + found
        + b"s\x86b."
    )  # fmt: skip


def test_metadata_cannot_change_an_allowed_class(tmp_path):
    """pickle's BUILD on an allow-listed class object would set its attributes for the whole
    process (here ``pathlib.PosixPath.exists`` replaced by ``torch.Size``)."""
    from spotguard.trainer_hooks._internals.dcp_store import load_sharded

    store = CheckpointStore(str(tmp_path))
    name = "dcp-000000000000.metadata"
    data = _build_on("pathlib", "PosixPath", "exists", ("torch", "Size"))
    store.commit(1, {name: store.put(1, name, data)}, format="dcp")
    exists = pathlib.PosixPath.exists
    try:
        with pytest.raises(UnloadableCheckpoint, match="BUILD on a type"):
            load_sharded(store, 1, {"w": torch.zeros(1)})
        assert pathlib.PosixPath.exists is exists
    finally:
        pathlib.PosixPath.exists = exists  # type: ignore[method-assign]


def test_metadata_opcodes_change_only_what_they_build():
    """APPENDS/SETITEMS on allowed class objects are refused too; real metadata loads."""
    from torch.distributed.checkpoint.metadata import Metadata

    from spotguard.trainer_hooks._internals.dcp_reader import load_metadata

    appends = b"\x80\x04ccollections\nOrderedDict\n(K\x01e."
    with pytest.raises(UnloadableCheckpoint, match="APPENDS on a type"):
        load_metadata(appends, "x")
    setitem = b"\x80\x04ctorch\nSize\nK\x01K\x02s."
    with pytest.raises(UnloadableCheckpoint, match="SETITEM on a type"):
        load_metadata(setitem, "x")
    real: Any = Metadata(state_dict_metadata={}, storage_data={})
    assert isinstance(load_metadata(pickle.dumps(real), "x"), Metadata)
