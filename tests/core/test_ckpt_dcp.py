"""`spotguard ckpt` on sharded (dcp) checkpoints, and `pull --to-torch FILE` for both formats.

Real parts: a 2-rank gloo launch saves FSDP2 (DTensor) model and Adam state plus plain values
through spotguard's sharded save (the launcher of tests/trainer_hooks/test_dcp_store.py; its
rank 0 also writes the full state it saved, gathered, as the reference). The command line runs
as an operator runs it, in a process of its own, where its output is checked line by line (an
error is one line: no warning or log record of DCP's slips out); the conversions that succeed
run through the same entry point (``spotguard.cli.main``) in this process, which has torch
loaded already (a process of their own would import it again for each: seconds in CI).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from spotguard.cli import main
from spotguard.protocol import MANIFEST_NAME, step_dir
from spotguard.trainer_hooks import CheckpointStore
from tests.core.test_ckpt_cli import spotguard
from tests.trainer_hooks.test_dcp_store import assert_same, launch, outcome, shards

SHARDED, WHOLE = 10, 5


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One store: a ``torch`` checkpoint written by 2 ranks (step 5), then a ``dcp`` one saved
    by 2 real ranks (step 10)."""
    folder = tmp_path_factory.mktemp("ckpt-dcp")
    uri = str(folder / "store")
    whole = {"w": torch.arange(6.0).reshape(2, 3), "step": WHOLE, "name": "whole"}
    writer = CheckpointStore(uri)
    files = {
        "state.pt": writer.put(WHOLE, "state.pt", lambda f: torch.save(whole, f)),
        "rank-1.pt": writer.put(WHOLE, "rank-1.pt", lambda f: torch.save({"r": 1}, f)),
    }
    writer.commit(WHOLE, files, world_size=2)
    launch(2, [{"op": "save", "uri": uri, "step": SHARDED, "tag": "saved"}], folder, {})
    assert [r.get("error") for r in outcome(folder, "saved", 2)] == [None, None]
    reference = torch.load(folder / "saved.pt", weights_only=True)
    return {"uri": uri, "reference": reference}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``spotguard ARGS`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return str(lines[0])


def test_list_shows_each_checkpoints_format_and_world_size_and_verify_reads_both(store):
    listed = spotguard("ckpt", "list", store["uri"], "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["step"], r["format"], r["world_size"]) for r in rows] == [
        (WHOLE, "torch", 2),
        (SHARDED, "dcp", 2),
    ]
    table = spotguard("ckpt", "list", store["uri"]).stdout.splitlines()
    assert table[0].split() == ["step", "epoch", "kind", "format", "ranks", "size", "created"]
    assert table[2].split()[:5] == [str(SHARDED), "2", "emergency", "dcp", "2"]
    verified = spotguard("ckpt", "verify", store["uri"])
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.split() == [str(WHOLE), "ok", str(SHARDED), "ok"]


def test_pull_downloads_a_dcp_checkpoint_whole_and_exports_it_element_for_element(
    store, tmp_path, capsys
):
    """``pull URI DEST --to-torch FILE``: every shard and the metadata land in DEST as in the
    store; FILE holds full tensors (the DTensor shards of both ranks gathered) and the plain
    values, loads weights-only, and equals what the two ranks saved. ``--to-torch`` alone
    reads straight from the store."""
    source = CheckpointStore(store["uri"])
    manifest = source.get(SHARDED)
    dest, exported = tmp_path / "pulled", tmp_path / "model.pt"
    code, out, err = run(capsys, "ckpt", "pull", store["uri"], str(dest), "--to-torch",
                         str(exported))  # fmt: skip
    assert code == 0, err
    assert f"exported step {SHARDED} (dcp, written by 2 rank(s))" in out
    folder = dest / step_dir(SHARDED)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest.files, MANIFEST_NAME])
    for name in manifest.files:
        sink = io.BytesIO()
        source.fetch(manifest, name, sink)
        assert (folder / name).read_bytes() == sink.getvalue(), name
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "pulled"]  # no temp file left
    loaded = torch.load(exported, weights_only=True)
    assert loaded["model"]["2.weight"].shape == (5, 16)  # 5 rows: sharded 3 + 2
    assert_same(store["reference"], loaded)

    alone = tmp_path / "alone.pt"
    code, _, err = run(capsys, "ckpt", "pull", store["uri"], "--to-torch", str(alone))
    assert code == 0, err
    assert_same(store["reference"], torch.load(alone, weights_only=True))


def test_a_torch_checkpoint_exports_rank_0s_state_file_as_it_is(store, tmp_path, capsys):
    exported = tmp_path / "whole.pt"
    code, _, err = run(capsys, "ckpt", "pull", store["uri"], "--step", str(WHOLE), "--to-torch",
                       str(exported))  # fmt: skip
    assert code == 0, err
    assert (Path(store["uri"]) / step_dir(WHOLE) / "state.pt").read_bytes() == (
        exported.read_bytes()
    )
    loaded = torch.load(exported, weights_only=True)
    assert_same({"w": torch.arange(6.0).reshape(2, 3), "step": WHOLE, "name": "whole"}, loaded)


def test_a_corrupt_shard_fails_verify_and_export_and_leaves_the_old_file(store, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(store["uri"], broken)
    manifest = CheckpointStore(str(broken)).get(SHARDED)
    shard = shards(manifest.files)[1]
    path = broken / step_dir(SHARDED) / shard
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum tells
    path.write_bytes(bytes(data))

    verified = spotguard("ckpt", "verify", str(broken))
    assert verified.returncode == 1
    assert f"{SHARDED:>12}  FAILED: {broken}/{step_dir(SHARDED)}/{shard}" in verified.stdout
    assert f"{WHOLE:>12}  ok" in verified.stdout

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt").write_bytes(b"an earlier export")
    result = spotguard("ckpt", "pull", str(broken), "--to-torch", str(out / "model.pt"))
    assert result.returncode == 1
    assert f"{shard}: content does not match its manifest" in one_line(result)
    assert os.listdir(out) == ["model.pt"]
    assert (out / "model.pt").read_bytes() == b"an earlier export"


def test_bad_input_is_one_line_and_writes_nothing(store, tmp_path, capsys):
    missing = spotguard("ckpt", "pull", store["uri"], "--step", "99", "--to-torch",
                        str(tmp_path / "x.pt"))  # fmt: skip
    assert missing.returncode == 2
    assert "no committed checkpoint at step 99" in one_line(missing)

    nowhere = tmp_path / "no-such-dir" / "x.pt"
    code, _, err = run(capsys, "ckpt", "pull", store["uri"], str(tmp_path / "d"), "--to-torch",
                       str(nowhere))  # fmt: skip
    assert code == 2
    expected = f"cannot write {nowhere}: directory {nowhere.parent} does not exist"
    assert err == f"spotguard ckpt pull: {expected}\n"
    assert not (tmp_path / "d").exists()  # refused before any download
    code, _, err = run(capsys, "ckpt", "pull", store["uri"], "--to-torch", str(tmp_path))
    assert code == 2
    assert err == f"spotguard ckpt pull: {tmp_path} is a directory, not a file to write\n"

    neither = spotguard("ckpt", "pull", store["uri"])
    assert neither.returncode == 2
    assert "DEST, --to-torch FILE, or both" in one_line(neither)

    # A torch checkpoint whose state file verifies but is no weights-only torch.save file.
    other = str(tmp_path / "other")
    CheckpointStore(other).save(1, {"state.pt": b"not a torch.save file"})
    code, _, err = run(capsys, "ckpt", "pull", other, "--to-torch", str(tmp_path / "y.pt"))
    assert code == 1
    assert "does not load with torch.load(weights_only=True)" in err
    assert sorted(os.listdir(tmp_path)) == ["other"]
