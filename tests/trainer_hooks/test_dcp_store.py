"""Sharded checkpoints (torch.distributed.checkpoint) on the checkpoint store.

Real parts: gloo process groups of 1, 2 and 3 ranks in processes of their own (this module,
run as ``python -m tests.trainer_hooks.test_dcp_store JOB``), FSDP2 (``fully_shard``) state
from ``get_state_dict``, a local store and S3 through the moto server. Each launch runs a list
of operations and every rank writes what happened to it (``<tag>-rank<N>.json``; rank 0 also
the full state it saw, ``<tag>.pt``): the tests compare those here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from spotguard.errors import CorruptCheckpoint, UnloadableCheckpoint
from spotguard.protocol import MANIFEST_NAME, step_dir
from spotguard.trainer_hooks import CheckpointStore
from spotguard.trainer_hooks.backends import MemoryBackend
from tests.trainer_hooks.rank_processes import full_tensors, outcome, wait_for_ranks

REPO = Path(__file__).resolve().parents[2]
STEP, FAILED_STEP, REPLICATED_STEP = 10, 20, 30
PER_RANK_STEP, TWICE_STEP, CONFLICT_STEP = 40, 50, 60
BROKEN_STEP, BUFFERS_STEP = 80, 90
SHARD = re.compile(r"__(\d)_([0-9a-f]{12})_0\.distcp")


def shards(files: Any) -> list[str]:
    """The shard files among ``files``, by rank; each name carries its save's id."""
    return sorted((name for name in files if SHARD.fullmatch(name)), key=lambda n: n[2])


def metadata_file(files: Any) -> str:
    (name,) = [name for name in files if re.fullmatch(r"dcp-[0-9a-f]{12}\.metadata", name)]
    return name


# -- the ranks (run in processes of their own) ---------------------------------------------


def _build(seed: int, train: bool) -> tuple[Any, Any]:
    """An FSDP2 model (5 output rows: uneven over 2 and 3 ranks) and its Adam optimizer."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    if train:  # non-trivial optimizer state (the same batch on every rank)
        torch.manual_seed(1)
        model(torch.randn(4, 8)).square().sum().backward()
        optim.step()
        optim.zero_grad()
    return model, optim


def _state(model: Any, optim: Any, seed: int) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optim)
    plain = {"table": torch.arange(12.0).reshape(3, 4) * seed, "count": seed, "name": f"s{seed}"}
    return {"model": model_state, "optim": optim_state, "plain": plain}


class _CutUpload:
    """A backend whose uploads fail after some bytes, as a dropped connection would."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write(self, key: str, produce: Any, size_hint: int | None = None) -> None:
        from spotguard.errors import StoreError

        def cut(sink: Any) -> None:
            class Sink:
                written = 0

                def write(self, data: Any) -> int:
                    self.written += memoryview(data).nbytes
                    if self.written > 200:
                        raise StoreError("injected: the connection dropped mid-upload")
                    return sink.write(data)

            produce(Sink())

        self._inner.write(key, cut, size_hint)


class _CommitLost(CheckpointStore):
    """Every rank's files are written, the commit never happens (a worker lost mid-save)."""

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        from spotguard.errors import StoreError

        raise StoreError("injected: the commit was lost")


def _listing(uri: str, step: int) -> dict[str, str]:
    folder = Path(uri) / step_dir(step)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _run(op: dict[str, Any], rank: int, out: Path) -> None:
    from spotguard.trainer_hooks._internals.dcp_store import load_sharded, save_sharded
    from spotguard.trainer_hooks.backends import backend_for_uri

    store = CheckpointStore(op["uri"])
    if op.get("fail_rank") == rank:
        store = CheckpointStore(_CutUpload(backend_for_uri(op["uri"])))
    if op.get("commit_lost"):
        store = _CommitLost(op["uri"])
    record: dict[str, Any] = {}
    try:
        if op["op"] == "save-per-rank":  # values that differ by rank, and some that do not
            state = {"rng": torch.tensor([rank] * 3), "n": rank, "name": f"rank{rank}",
                     "same": {"w": torch.ones(2), "tags": {"a", "b", "c"}, "lr": [0.1, 2]},
                     **({"only0": 7} if rank == 0 else {})}  # fmt: skip
            full = state
            record["manifest"] = json.loads(save_sharded(store, op["step"], state).to_bytes())
        elif op["op"] == "save-broken":  # rank 1 could not build its state dict
            full = {"w": torch.ones(3)}
            failure = RuntimeError("injected: no state dict") if rank == 1 else None
            save_sharded(store, op["step"], full, failure=failure)
        elif op["op"] == "save-buffers":  # FSDP2 and BatchNorm: running stats per rank
            from torch import nn
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import Shard, distribute_tensor

            from spotguard.trainer_hooks._internals.sharded import ShardedSave

            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
            mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
            fully_shard(model, mesh=mesh)
            model(torch.randn(5, 4) + rank)  # each rank its own batch: its own statistics
            plain = {}
            if op.get("plain_dtensor"):  # not in a module: rank 0's shard alone would be saved
                plain = {"first": distribute_tensor(torch.ones(4), mesh, [Shard(0)])}
            job = ShardedSave.of({"model": model, **plain}, {}, rank)
            full = {}
            save_sharded(store, op["step"], job.state_dict, buffers=job.buffers,
                         failure=job.failure)  # fmt: skip
        elif op["op"] == "save-replicated":  # one small tensor: one rank writes it, one none
            full = {"only": torch.arange(4.0)}
            record["manifest"] = json.loads(save_sharded(store, op["step"], full).to_bytes())
        elif op["op"] == "save":
            model, optim = _build(seed=3, train=True)
            state = _state(model, optim, seed=3)
            full = full_tensors(state)
            manifest = save_sharded(store, op["step"], state, epoch=2, kind="emergency")
            record["manifest"] = json.loads(manifest.to_bytes())
        else:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            model, optim = _build(seed=7, train=False)  # other values everywhere
            state = _state(model, optim, seed=7)
            manifest = load_sharded(store, op["step"], state)
            set_state_dict(model, optim, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])  # fmt: skip
            full = full_tensors(_state(model, optim, seed=0) | {"plain": state["plain"]})
            record["manifest"] = json.loads(manifest.to_bytes())
        if rank == 0:
            torch.save(full, out / f"{op['tag']}.pt")
    except Exception as exc:
        record["error"] = {"type": type(exc).__name__, "message": str(exc)}
    if op.get("listing") and rank == 0:
        record["listing"] = _listing(op["uri"], op["step"])
    (out / f"{op['tag']}-rank{rank}.json").write_text(json.dumps(record))


def _rank_main(job_file: str) -> None:
    from datetime import timedelta

    job = json.loads(Path(job_file).read_text())
    rank, world = int(os.environ["RANK"]), job["world"]
    torch.distributed.init_process_group(
        "gloo", init_method=job["init"], rank=rank, world_size=world,
        timeout=timedelta(seconds=30),
    )  # fmt: skip
    try:
        for op in job["ops"]:
            _run(op, rank, Path(job["out"]))
    finally:
        # Leave together: a rank tearing gloo down while a peer still talks to it aborts
        # ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# -- the tests --------------------------------------------------------------------------


def launch(world: int, ops: list[dict[str, Any]], out: Path, env: dict[str, str]) -> None:
    """Run ``ops`` on ``world`` ranks; fail (after killing them all) if any hangs."""
    out.mkdir(parents=True, exist_ok=True)
    job = out / f"job-{uuid.uuid4().hex[:8]}.json"
    init = f"file://{out / job.stem}.rendezvous"
    job.write_text(json.dumps({"world": world, "ops": ops, "out": str(out), "init": init}))
    command = [sys.executable, "-m", "tests.trainer_hooks.test_dcp_store", str(job)]
    ranks = [
        subprocess.Popen(command, cwd=REPO, env={**os.environ, **env, "RANK": str(rank)})
        for rank in range(world)
    ]
    codes = wait_for_ranks(ranks, ops, 100)
    assert codes == [0] * world


def assert_same(saved: Any, loaded: Any, where: str = "") -> None:
    if isinstance(saved, torch.Tensor):
        assert isinstance(loaded, torch.Tensor), where
        assert saved.dtype == loaded.dtype, where
        assert torch.equal(saved, loaded), where
    elif isinstance(saved, dict):
        assert sorted(saved) == sorted(loaded), where
        for key in saved:
            assert_same(saved[key], loaded[key], f"{where}/{key}")
    elif isinstance(saved, (list, tuple)):
        assert len(saved) == len(loaded), where
        for index, (one, other) in enumerate(zip(saved, loaded)):
            assert_same(one, other, f"{where}[{index}]")
    else:
        assert saved == loaded, where


@pytest.fixture(scope="module")
def s3_env(moto_server: str) -> dict[str, str]:
    import boto3

    env = {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    bucket = f"dcp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing",
                 ).create_bucket(Bucket=bucket)  # fmt: skip
    return {**env, "BUCKET": bucket}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, s3_env: dict[str, str]) -> dict[str, Any]:
    """Two ranks: save to a local store and to S3, load both back at world size 2, then a
    save at which rank 1's upload breaks."""
    folder = tmp_path_factory.mktemp("dcp")
    local, s3 = str(folder / "store"), f"s3://{s3_env['BUCKET']}/runs/r1"
    taken = str(folder / "taken")  # another writer committed a step above the one saved
    CheckpointStore(taken).save(CONFLICT_STEP + 10, {"other.bin": b"someone else's"})
    ops = [
        {"op": "save", "uri": local, "step": STEP, "tag": "saved-local"},
        {"op": "save", "uri": s3, "step": STEP, "tag": "saved-s3"},
        {"op": "load", "uri": local, "step": STEP, "tag": "w2-local"},
        {"op": "load", "uri": s3, "step": STEP, "tag": "w2-s3"},
        {"op": "save", "uri": local, "step": FAILED_STEP, "tag": "cut", "fail_rank": 1},
        {"op": "save-replicated", "uri": local, "step": REPLICATED_STEP, "tag": "replicated"},
        {"op": "save-per-rank", "uri": local, "step": PER_RANK_STEP, "tag": "per-rank"},
        {"op": "save", "uri": local, "step": TWICE_STEP, "tag": "lost", "commit_lost": True,
         "listing": True},
        {"op": "save", "uri": local, "step": TWICE_STEP, "tag": "again", "listing": True},
        {"op": "save", "uri": taken, "step": CONFLICT_STEP, "tag": "taken"},
        {"op": "save-broken", "uri": local, "step": BROKEN_STEP, "tag": "broken"},
        {"op": "save-buffers", "uri": local, "step": BUFFERS_STEP, "tag": "buffers"},
        {"op": "save-buffers", "uri": local, "step": BUFFERS_STEP, "tag": "plain-dtensor",
         "plain_dtensor": True},
    ]  # fmt: skip
    launch(2, ops, folder, s3_env)
    return {"out": folder, "local": local, "s3": s3, "env": s3_env, "taken": taken}


def test_two_ranks_save_fsdp2_and_plain_state_and_load_it_back(saved):
    out = saved["out"]
    reference = torch.load(out / "saved-local.pt", weights_only=True)
    assert reference["plain"]["count"] == 3
    assert reference["model"]["2.weight"].shape == (5, 16)
    assert reference["optim"]["state"]["2.weight"]["exp_avg"].abs().sum() > 0
    assert_same(reference, torch.load(out / "saved-s3.pt", weights_only=True))
    for tag in ("w2-local", "w2-s3"):
        assert [r.get("error") for r in outcome(out, tag, 2)] == [None, None]
        assert_same(reference, torch.load(out / f"{tag}.pt", weights_only=True), tag)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_manifest_lists_every_ranks_files_format_dcp_world_size_2(saved, where, monkeypatch):
    for key, value in saved["env"].items():
        monkeypatch.setenv(key, value)
    records = outcome(saved["out"], f"saved-{where}", 2)
    assert [r.get("error") for r in records] == [None, None]
    assert records[0]["manifest"] == records[1]["manifest"]  # every rank returns the commit
    store = CheckpointStore(saved[where])
    manifest = store.get(STEP)
    assert (manifest.format, manifest.world_size, manifest.kind, manifest.epoch) == (
        "dcp", 2, "emergency", 2,
    )  # fmt: skip
    shard_names = shards(manifest.files)
    assert [SHARD.fullmatch(name)[1] for name in shard_names] == ["0", "1"]
    assert sorted(manifest.files) == sorted([*shard_names, metadata_file(manifest.files)])
    # One save, one id: in every name of its files.
    assert len({SHARD.fullmatch(name)[2] for name in shard_names}) == 1
    assert SHARD.fullmatch(shard_names[0])[2] in metadata_file(manifest.files)
    assert store.verify(STEP)[0].ok
    for name, entry in manifest.files.items():
        sink = io.BytesIO()
        store.fetch(manifest, name, sink)
        data = sink.getvalue()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256)


def test_a_rank_failing_mid_save_commits_nothing_and_every_rank_raises(saved):
    errors = [r.get("error") for r in outcome(saved["out"], "cut", 2)]
    assert [e and e["type"] for e in errors] == ["StoreError", "StoreError"]
    assert all("failed on rank 1" in e["message"] and "injected" in e["message"] for e in errors)
    directory = Path(saved["local"]) / step_dir(FAILED_STEP)
    assert not (directory / MANIFEST_NAME).exists()
    assert [n for n in os.listdir(directory) if n.startswith("__1_")] == []  # the cut left none
    assert [m.step for m in CheckpointStore(saved["local"]).list()] == [
        STEP, REPLICATED_STEP, TWICE_STEP,
    ]  # fmt: skip


def test_replicated_state_is_written_once_and_loads_without_a_process_group(saved):
    """DCP's planner deduplicates replicated tensors: the rank left with nothing writes no
    file (the manifest never lists an empty shard); the pytest process, with no process group
    at all, loads the 2-rank checkpoint."""
    from spotguard.trainer_hooks._internals.dcp_store import load_sharded

    assert [r.get("error") for r in outcome(saved["out"], "replicated", 2)] == [None, None]
    store = CheckpointStore(saved["local"])
    manifest = store.get(REPLICATED_STEP)
    assert manifest.world_size == 2
    assert len(manifest.files) == 2  # one shard and the metadata
    assert len(shards(manifest.files)) == 1
    assert metadata_file(manifest.files)
    target = {"only": torch.zeros(4)}
    assert load_sharded(store, REPLICATED_STEP, target) == manifest
    assert torch.equal(target["only"], torch.arange(4.0))


def _corrupt_copy(source: str, target: Path, name: str) -> str:
    shutil.copytree(source, target)
    path = target / step_dir(STEP) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))
    return str(target)


def test_three_ranks_reshard_and_a_corrupt_file_fails_on_every_rank(saved, tmp_path):
    out = tmp_path / "w3"
    files = CheckpointStore(saved["local"]).get(STEP).files
    shard, metadata = shards(files)[1], metadata_file(files)
    bad_shard = _corrupt_copy(saved["local"], tmp_path / "bad-shard", shard)
    bad_metadata = _corrupt_copy(saved["local"], tmp_path / "bad-metadata", metadata)
    ops = [
        {"op": "load", "uri": saved["local"], "step": STEP, "tag": "w3-local"},
        {"op": "load", "uri": saved["s3"], "step": STEP, "tag": "w3-s3"},
        {"op": "load", "uri": bad_shard, "step": STEP, "tag": "bad-shard"},
        {"op": "load", "uri": bad_metadata, "step": STEP, "tag": "bad-metadata"},
    ]
    launch(3, ops, out, saved["env"])
    reference = torch.load(saved["out"] / "saved-local.pt", weights_only=True)
    for tag in ("w3-local", "w3-s3"):
        assert [r.get("error") for r in outcome(out, tag, 3)] == [None] * 3
        assert_same(reference, torch.load(out / f"{tag}.pt", weights_only=True), tag)
    for tag, name in (("bad-shard", shard), ("bad-metadata", metadata)):
        errors = [r.get("error") for r in outcome(out, tag, 3)]
        assert [e and e["type"] for e in errors] == ["CorruptCheckpoint"] * 3, errors
        assert all(f"{step_dir(STEP)}/{name}: content does not match" in e["message"]
                   for e in errors)  # fmt: skip


def test_per_rank_values_are_refused_on_every_rank_before_anything_is_written(saved):
    """DCP keeps one rank's copy of every value that is not a DTensor: per-rank values would
    load as rank 0's on every rank, silently. Equal values (a set included, whatever each
    process's hash seed) and a key only one rank has are fine."""
    errors = [r.get("error") for r in outcome(saved["out"], "per-rank", 2)]
    assert [e and e["type"] for e in errors] == ["ConfigError"] * 2, errors
    assert errors[0] == errors[1]
    message = errors[0]["message"]
    assert "'n' (rank 0 vs rank 1), 'name' (rank 0 vs rank 1), 'rng' (rank 0 vs rank 1)" in (
        message
    )
    assert "same" not in message
    assert "only0" not in message
    assert "per-rank files" in message
    assert not (Path(saved["local"]) / step_dir(PER_RANK_STEP)).exists()


def test_a_rank_that_could_not_build_its_part_fails_the_save_before_dcp(saved):
    """The ranks agree that each built its part before DCP's first collective: the failed
    rank raises its own error, the other one names it; nobody waits in DCP alone."""
    errors = [r.get("error") for r in outcome(saved["out"], "broken", 2)]
    assert [e and e["type"] for e in errors] == ["CheckpointError", "RuntimeError"], errors
    assert errors[0]["message"] == (
        f"sharded save of step {BROKEN_STEP}: rank 1 failed before saving (RuntimeError: "
        "injected: no state dict); nothing was written"
    )
    assert not (Path(saved["local"]) / step_dir(BROKEN_STEP)).exists()


def test_fsdp2_batchnorm_buffers_that_differ_per_rank_are_named_as_such(saved):
    errors = [r.get("error") for r in outcome(saved["out"], "buffers", 2)]
    assert [e and e["type"] for e in errors] == ["ConfigError"] * 2, errors
    message = errors[0]["message"]
    assert "module buffers 'model.1.running_mean' (rank 0 vs rank 1)" in message
    assert "FSDP2 shards parameters but does not keep buffers" in message
    assert "SyncBatchNorm.convert_sync_batchnorm" in message
    assert not (Path(saved["local"]) / step_dir(BUFFERS_STEP)).exists()


def test_a_dtensor_outside_modules_and_optimizers_is_refused_on_every_rank(saved):
    """Such entries are rank 0's, saved whole: a DTensor there would keep rank 0's shard."""
    errors = [r.get("error") for r in outcome(saved["out"], "plain-dtensor", 2)]
    assert [e and e["type"] for e in errors] == ["ConfigError"] * 2, errors
    assert all("state['first'] holds a DTensor outside a module" in e["message"] for e in errors)


def test_two_saves_of_one_step_never_share_a_file(saved):
    """A save whose commit was lost (an orphaned worker's) and a later save of the same step:
    each save's files carry its own id, so the second overwrites none of the first's, and the
    manifest lists exactly the second save's files."""
    lost, again = outcome(saved["out"], "lost", 2), outcome(saved["out"], "again", 2)
    assert [r["error"]["type"] for r in lost] == ["StoreError"] * 2
    assert [r.get("error") for r in again] == [None, None]
    first, second = lost[0]["listing"], again[0]["listing"]
    assert len(shards(first)) == 2
    assert metadata_file(first)
    assert first.items() <= second.items()  # still there, byte for byte
    manifest = CheckpointStore(saved["local"]).get(TWICE_STEP)
    assert not set(manifest.files) & set(first)
    assert sorted(manifest.files) == sorted(set(second) - set(first) - {MANIFEST_NAME})
    assert CheckpointStore(saved["local"]).verify(TWICE_STEP)[0].ok


def test_a_newer_commit_by_another_writer_stops_the_save_before_any_file(saved):
    errors = [r.get("error") for r in outcome(saved["out"], "taken", 2)]
    assert [e and e["type"] for e in errors] == ["WriterConflict"] * 2, errors
    assert all(f"step {CONFLICT_STEP + 10} was committed by" in e["message"] for e in errors)
    assert not (Path(saved["taken"]) / step_dir(CONFLICT_STEP)).exists()  # no byte written


def test_one_rank_loads_what_two_saved(saved, tmp_path):
    out = tmp_path / "w1"
    launch(1, [{"op": "load", "uri": saved["s3"], "step": STEP, "tag": "w1"}], out, saved["env"])
    assert outcome(out, "w1", 1)[0].get("error") is None
    reference = torch.load(saved["out"] / "saved-local.pt", weights_only=True)
    assert_same(reference, torch.load(out / "w1.pt", weights_only=True))


# -- in this process, without a process group --------------------------------------------


class Opaque:
    """Not weights-only data: saved fine, refused on load."""


def test_without_a_process_group_one_process_saves_and_loads():
    from spotguard.trainer_hooks._internals.dcp_store import load_sharded, save_sharded

    store = CheckpointStore(MemoryBackend())
    state = {"w": torch.randn(4, 3), "view": torch.arange(10.0)[::3], "meta": {"n": 5}}
    manifest = save_sharded(store, 1, state)
    assert (manifest.format, manifest.world_size) == ("dcp", 1)
    target = {"w": torch.zeros(4, 3), "view": torch.zeros(4), "meta": {"n": 0}}
    assert load_sharded(store, 1, target) == manifest
    assert_same(state, target)
    with pytest.raises(UnloadableCheckpoint, match="sharded path"):
        store.resume()  # the whole-state loader does not take a dcp checkpoint for its own

    save_sharded(store, 2, {"obj": Opaque()})
    with pytest.raises(UnloadableCheckpoint, match="obj: not weights-only"):
        load_sharded(store, 2, {"obj": None})


class _Shell:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def test_metadata_naming_other_callables_is_never_unpickled(tmp_path):
    """Checksums prove the bytes are as committed, not that their writer meant well."""
    import pickle

    from spotguard.trainer_hooks._internals.dcp_store import load_sharded

    backend = MemoryBackend()
    store = CheckpointStore(backend)
    name = "dcp-000000000000.metadata"
    files = {name: store.put(3, name, pickle.dumps(_Shell(tmp_path / "ran")))}
    store.commit(3, files, format="dcp")
    with pytest.raises(UnloadableCheckpoint, match=r"posix\.system is not part of DCP"):
        load_sharded(store, 3, {"w": torch.zeros(1)})
    assert not (tmp_path / "ran").exists()

    files[name] = store.put(4, name, b"not a pickle")
    store.commit(4, files, format="dcp")
    with pytest.raises(UnloadableCheckpoint):
        load_sharded(store, 4, {"w": torch.zeros(1)})
    backend.objects[f"{step_dir(4)}/{name}"] = b"not a pickl3"  # same size
    with pytest.raises(CorruptCheckpoint, match=r"0\.metadata: content does not match"):
        load_sharded(store, 4, {"w": torch.zeros(1)})


if __name__ == "__main__":
    _rank_main(sys.argv[1])
