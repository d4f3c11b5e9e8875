"""SpotGuard with sharded (DCP) checkpoints: FSDP2 training on real gloo ranks.

Each launch runs its ranks in processes of their own (this module, run as
``python -m tests.trainer_hooks.test_guard_sharded JOB``) through a list of operations: train
with SpotGuard (periodic async saves, a stop delivered as a real SIGUSR1 to rank 1, the final
save), or only restore. Rank 0 writes the full state (every DTensor gathered) where asked,
every rank what happened to it (``<tag>-rank<N>.json``); the tests compare those here. Four
launches in all (2, 2, 1 and 3 ranks) check every case below, on a local store and on S3
(the moto server, through a proxy that holds or refuses chosen uploads).

Besides the model and Adam, the state holds plain values: a counter, a dict that grows every
step and a value that differs per rank. They are rank 0's, saved whole in its own file and
loaded whole on every rank, at any world size (as in format ``torch``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from spotguard.errors import ConfigError
from spotguard.protocol import MANIFEST_NAME, step_dir
from spotguard.trainer_hooks import CheckpointStore, GuardSettings
from spotguard.trainer_hooks.manifest import QUARANTINE_NAME
from tests.trainer_hooks.rank_processes import full_tensors, outcome, report, wait_for_ranks
from tests.trainer_hooks.test_dcp_store import SHARD, assert_same, metadata_file, shards

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY, STOP_AFTER = 14, 4, 6
#: A rank's own file: its random streams (rank 0's: the plain values too), named by the save.
OWN = re.compile(r"rank-(\d)-[0-9a-f]{12}\.pt")
#: The stop is agreed without blocking: rank 1's flag of step 6 is read at step 7's boundary.
EMERGENCY_STEP = STOP_AFTER + 1

# -- the ranks (run in processes of their own) ---------------------------------------------


def _build(rank: int) -> tuple[Any, Any]:
    """An FSDP2 MLP with dropout (5 output rows: uneven over 2 and 3 ranks) and its Adam."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # the same weights on every rank
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 5))
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(100 + rank)  # every rank its own dropout masks
    return model, optim


def _dump(model: Any, optim: Any, path: Path) -> None:
    """The full model and optimizer state (FQN keys: the same at any world size), by rank 0."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = full_tensors(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    )
    if torch.distributed.get_rank() == 0:
        torch.save(full, path)


def _train(op: dict[str, Any], rank: int, out: Path, record: dict[str, Any]) -> None:
    from spotguard.trainer_hooks import SpotGuard

    model, optim = _build(rank)
    state = {"model": model, "optim": optim, "seen": 0, "losses": {}, "rank": rank}
    with SpotGuard(op["uri"], every_n_steps=EVERY, keep_last=4, **op.get("options", {})) as guard:
        start = guard.restore(state)
        record["start"] = start
        for done in range(start + 1, STEPS + 1):
            batch = torch.Generator().manual_seed(1000 * done + rank)
            x, y = torch.randn(4, 8, generator=batch), torch.randn(4, 5, generator=batch)
            (model(x) - y).square().mean().backward()
            optim.step()
            optim.zero_grad()
            state["seen"] = done  # a plain value, replicated: restored in the dict
            state["losses"][str(done)] = done  # a dict that grows: restored whole
            if done in op.get("dump_at", ()):
                _dump(model, optim, out / f"{op['tag']}-{done}.pt")
            if done == op.get("stop_after") and rank == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # a real signal, handled by the guard
                while not guard.stop_requested:
                    time.sleep(0.01)
            if done % EVERY == EVERY - 1 and not op.get("stop_after"):
                # The save runs in the background for several of these tiny steps; let it end
                # so the next one is not deferred (its step would depend on timing).
                guard._core.wait()
            record["last_step"] = done
            record["abandoned"] = guard._core.saver.saving  # still in flight at this boundary
            guard.step(done, state)  # the emergency exits here: Preempted, code 75
        guard.finish(STEPS, state)
    record["seen"], record["losses"] = state["seen"], len(state["losses"])
    _dump(model, optim, out / f"{op['tag']}-final.pt")


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _restore(op: dict[str, Any], rank: int, out: Path, record: dict[str, Any]) -> None:
    from spotguard.trainer_hooks import SpotGuard

    model, optim = _build(rank)
    state = {"model": model, "optim": optim, "seen": -1, "losses": {}, "rank": -1}
    if op.get("broken_rank") == rank:  # fails to build its part of the load, before DCP's
        state["extra"] = _Broken()
    warnings = _Warnings()
    logging.getLogger("spotguard.trainer_hooks").addHandler(warnings)
    with SpotGuard(op["uri"], **op.get("options", {})) as guard:
        record["start"] = guard.restore(state)
    record["seen"], record["losses"], record["rank"] = (
        state["seen"],
        len(state["losses"]),
        state["rank"],
    )
    record["not_bit_exact"] = any("not bit-exact" in m for m in warnings.messages)
    _dump(model, optim, out / f"{op['tag']}.pt")


class _Broken(torch.nn.Module):
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: this rank cannot build its state dict")


def _run(op: dict[str, Any], rank: int, out: Path) -> None:
    report(
        out / f"{op['tag']}-rank{rank}.json",
        lambda record: (_train if op["op"] == "train" else _restore)(op, rank, out, record),
    )


def _rank_main(job_file: str) -> None:
    from datetime import timedelta

    job = json.loads(Path(job_file).read_text())
    rank, world = int(os.environ["RANK"]), job["world"]
    torch.distributed.init_process_group(
        "gloo", init_method=job["init"], rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        for op in job["ops"]:
            _run(op, rank, Path(job["out"]))
    finally:
        torch.distributed.barrier()  # leave together (see test_dcp_store)
        torch.distributed.destroy_process_group()


# -- the tests --------------------------------------------------------------------------


def launch(
    world: int,
    ops: list[dict[str, Any]],
    out: Path,
    env: dict[str, str],
    rank_env: dict[int, dict[str, str]] | None = None,
) -> list[int]:
    """Run ``ops`` on ``world`` ranks; their exit codes (a hang fails the test)."""
    out.mkdir(parents=True, exist_ok=True)
    job = out / f"job-{uuid.uuid4().hex[:8]}.json"
    init = f"file://{out / job.stem}.rendezvous"
    job.write_text(json.dumps({"world": world, "ops": ops, "out": str(out), "init": init}))
    command = [sys.executable, "-m", "tests.trainer_hooks.test_guard_sharded", str(job)]
    ranks = []
    for rank in range(world):
        own = {**os.environ, **env, **(rank_env or {}).get(rank, {}), "RANK": str(rank)}
        ranks.append(subprocess.Popen(command, cwd=REPO, env=own))
    return wait_for_ranks(ranks, ops, 120)


def loaded(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, moto_server: str) -> dict[str, Any]:
    """Launch 1 (2 ranks): an uninterrupted run, then one on S3 stopped after step 6 while
    its periodic save of step 4 is still uploading (the proxy holds its shards): its ranks
    exit 75. Launch 2 (2 ranks): the stopped run resumed; a restore from a copy of the first
    run's store with a shard of its newest checkpoint corrupted; format ``torch`` refused; a
    run on S3 whose rank 1 cannot upload its shards."""
    import boto3

    from tests.faulty_proxy import FaultyProxy

    folder = tmp_path_factory.mktemp("sharded")
    env = {"SPOTGUARD_STATE_DIR": str(folder / "no-agent"), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    bucket = f"sharded-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    proxy = FaultyProxy(moto_server)
    through_proxy = {rank: {"AWS_ENDPOINT_URL": proxy.url} for rank in (0, 1)}
    whole, stopped = folder / "whole", f"s3://{bucket}/stopped"
    # A short deadline (4 s, 1 s margin): the emergency waits 1.5 s for the held save, then
    # abandons it and saves step 7 while it is still in flight; the lease expires in 2 s.
    hurried = {"default_budget": 4.0, "safety_margin": 1.0, "lease_ttl": 2.0}
    first = [
        {"op": "train", "uri": str(whole), "tag": "whole", "dump_at": [12]},
        {"op": "train", "uri": stopped, "tag": "stopped", "stop_after": STOP_AFTER,
         "options": hurried},
    ]  # fmt: skip
    held = proxy.on("PUT", f"/{bucket}/stopped/{step_dir(EVERY)}/__", "hold")
    try:
        codes = launch(2, first, folder, env, through_proxy)
    finally:
        held.release()
    store = CheckpointStore(stopped, s3_client=client)
    stopped_steps = [(m.step, m.kind) for m in store.list()]
    emergency = store.get(EMERGENCY_STEP)

    damaged = folder / "damaged"
    shutil.copytree(whole, damaged)
    newest = CheckpointStore(str(damaged)).latest()
    assert newest is not None
    corrupt(damaged / step_dir(newest.step) / shards(newest.files)[1])

    proxy.on("PUT", f"/{bucket}/denied/{step_dir(EVERY)}/__1_", "deny")  # rank 1's shard
    second = [
        {"op": "train", "uri": stopped, "tag": "resumed", "options": hurried},
        {"op": "restore", "uri": str(damaged), "tag": "damaged"},
        {"op": "restore", "uri": str(damaged), "tag": "broken", "broken_rank": 1},
        {"op": "restore", "uri": str(folder / "refused"), "tag": "refused",
         "options": {"checkpoint_format": "torch"}},
        {"op": "train", "uri": f"s3://{bucket}/denied", "tag": "denied"},
    ]  # fmt: skip
    try:
        resumed = launch(2, second, folder, env, through_proxy)
    finally:
        proxy.close()
    listing = client.list_objects_v2(Bucket=bucket, Prefix="denied/").get("Contents", [])
    return {
        "out": folder, "codes": codes, "resumed_codes": resumed, "whole": whole,
        "stopped_steps": stopped_steps, "emergency": emergency, "damaged": damaged,
        "damaged_step": newest.step, "env": env, "denied_keys": [i["Key"] for i in listing],
    }  # fmt: skip


def test_periodic_saves_are_sharded_and_committed_while_training_goes_on(runs):
    assert [r.get("error") for r in outcome(runs["out"], "whole", 2)] == [None, None]
    kept = CheckpointStore(str(runs["whole"])).list()  # keep_last=4
    assert [(m.step, m.kind, m.format, m.world_size) for m in kept] == [
        (4, "periodic", "dcp", 2), (8, "periodic", "dcp", 2), (12, "periodic", "dcp", 2),
        (STEPS, "final", "dcp", 2),
    ]  # fmt: skip
    for manifest in kept:
        assert [SHARD.fullmatch(n)[1] for n in shards(manifest.files)] == ["0", "1"]
        own = sorted(name for name in manifest.files if OWN.fullmatch(name))
        assert [OWN.fullmatch(name)[1] for name in own] == ["0", "1"]
        assert sorted(manifest.files) == sorted(
            [*shards(manifest.files), metadata_file(manifest.files), *own]
        )
        save_id = SHARD.fullmatch(shards(manifest.files)[0])[2]
        assert all(name.endswith(f"-{save_id}.pt") for name in own)  # the save's own id


def test_a_stop_saves_every_ranks_shards_exits_75_and_resumes_bit_exact(runs):
    out = runs["out"]
    assert runs["codes"] == [75, 75]
    stopped = outcome(out, "stopped", 2)
    assert [(r.get("exit"), r["last_step"]) for r in stopped] == [(75, EMERGENCY_STEP)] * 2
    assert [(r["saved"], r["abandoned"]) for r in stopped] == [(True, True)] * 2
    # The periodic save of step 4 was still uploading: abandoned, never committed.
    assert runs["stopped_steps"] == [(EMERGENCY_STEP, "emergency")]
    saved = runs["emergency"]
    assert (saved.kind, saved.format, saved.world_size) == ("emergency", "dcp", 2)
    assert [SHARD.fullmatch(n)[1] for n in shards(saved.files)] == ["0", "1"]
    own = [name for name in saved.files if OWN.fullmatch(name)]
    assert sorted(saved.files) == sorted([*shards(saved.files), metadata_file(saved.files), *own])
    assert sorted(OWN.fullmatch(name)[1] for name in own) == ["0", "1"]

    assert runs["resumed_codes"] == [0, 0]
    resumed = outcome(out, "resumed", 2)
    assert [(r.get("error"), r["start"], r["seen"], r["losses"]) for r in resumed] == [
        (None, EMERGENCY_STEP, STEPS, STEPS)
    ] * 2
    # Weights and Adam's state, gathered in full: the same bits as the uninterrupted run.
    assert_same(loaded(out / "whole-final.pt"), loaded(out / "resumed-final.pt"))


def test_a_corrupt_shard_sends_every_rank_to_the_older_checkpoint(runs):
    out, step = runs["out"], runs["damaged_step"]
    damaged = outcome(out, "damaged", 2)
    assert [(r.get("error"), r["start"], r["seen"], r["losses"]) for r in damaged] == [
        (None, 12, 12, 12)
    ] * 2
    assert_same(loaded(out / "whole-12.pt"), loaded(out / "damaged.pt"))
    folder = runs["damaged"] / step_dir(step)
    assert (folder / QUARANTINE_NAME).exists()
    assert not (folder / MANIFEST_NAME).exists()
    reason = json.loads((folder / QUARANTINE_NAME).read_text())["reason"]
    assert "content does not match" in reason


def test_a_rank_failing_to_build_its_load_leaves_no_rank_inside_dcp(runs):
    """Rank 1 cannot build its state dict: the ranks agree on that before DCP's first
    collective, so rank 0 never waits in one alone (a hang) or pairs it with the next."""
    broken = outcome(runs["out"], "broken", 2)
    errors = [r.get("error") for r in broken]
    assert [e and e["type"] for e in errors] == ["UnloadableCheckpoint"] * 2, errors
    assert all("rank 1: RuntimeError: injected" in e["message"] for e in errors), errors


def test_a_background_save_failing_on_one_rank_raises_on_every_rank(runs):
    """Rank 1's shard upload is refused (S3 through a proxy): DCP gathers the failure, both
    ranks keep it and raise it at the same step boundary; nothing was committed."""
    denied = outcome(runs["out"], "denied", 2)
    errors = [r.get("error") for r in denied]
    assert [e and e["type"] for e in errors] == ["UploadFailed"] * 2, errors
    assert all("failed on rank 1" in e["message"] for e in errors), errors
    assert denied[0]["last_step"] == denied[1]["last_step"] < STEPS
    assert not [key for key in runs["denied_keys"] if key.endswith(MANIFEST_NAME)]


@pytest.mark.parametrize("world", [1, 3])
def test_another_world_size_loads_what_two_ranks_saved(runs, world, tmp_path):
    """DCP reshards: the final checkpoint of the 2-rank run, restored at 1 and at 3 ranks,
    gives every weight and every Adam moment back element for element; a rank with no RNG
    file of its own (rank 2) keeps its streams."""
    store = tmp_path / "store"
    shutil.copytree(runs["whole"], store)
    codes = launch(world, [{"op": "restore", "uri": str(store), "tag": "w"}], tmp_path, runs["env"])
    assert codes == [0] * world
    restored = [(r.get("error"), r["start"], r["seen"], r["losses"], r["rank"])
                for r in outcome(tmp_path, "w", world)]  # fmt: skip
    # Plain values are rank 0's on every rank, whatever its own value was (the rank's).
    assert restored == [(None, STEPS, STEPS, STEPS, 0)] * world
    assert_same(loaded(runs["out"] / "whole-final.pt"), loaded(tmp_path / "w.pt"))
    # Ranks 0 and 1 got their own streams back; rank 2 had none saved, and says so.
    warned = [r["not_bit_exact"] for r in outcome(tmp_path, "w", world)]
    assert warned == [False, False, True][:world]


def test_format_torch_with_dtensor_state_is_refused_on_every_rank(runs):
    errors = [r.get("error") for r in outcome(runs["out"], "refused", 2)]
    assert [e and e["type"] for e in errors] == ["ConfigError"] * 2, errors
    assert all("use checkpoint_format='dcp'" in e["message"] for e in errors)
    assert CheckpointStore(str(runs["out"] / "refused")).list() == []


def test_an_unknown_checkpoint_format_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="checkpoint_format must be one of auto, torch, dcp"):
        GuardSettings(uri="x", checkpoint_format="zip")


if __name__ == "__main__":
    _rank_main(sys.argv[1])
