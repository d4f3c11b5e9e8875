"""SpotGuard over torch.distributed: two gloo ranks, only rank 1 signalled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest

from spotguard.protocol import Notice, write_notice
from spotguard.trainer_hooks import CheckpointStore
from tests.conftest import free_port
from tests.support import wait_for
from tests.trainer_hooks.agent_double import AgentDouble
from tests.trainer_hooks.test_plain_resume import assert_same_weights, steps_done

SCRIPT = Path(__file__).with_name("train_plain.py")


def launch(
    store: Path | str,
    out: Path,
    *extra: str,
    env: dict | None = None,
    rank_env: dict[int, dict] | None = None,
    logs: list[Path] | None = None,
) -> list[subprocess.Popen]:
    """Both ranks, started the way torchrun would (RANK, WORLD_SIZE, MASTER_*); ``rank_env``
    adds variables for one rank only (each rank on a node of its own); ``logs`` take each
    rank's stderr."""
    port = str(free_port())
    command = [sys.executable, str(SCRIPT), "--ddp", "--store", str(store), "--out", str(out)]
    world = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    ranks = []
    for rank in (0, 1):
        own = {**os.environ, **(env or {}), **(rank_env or {}).get(rank, {}), **world}
        stderr = logs[rank].open("w") if logs else None
        ranks.append(
            subprocess.Popen([*command, *extra], env={**own, "RANK": str(rank)}, stderr=stderr)
        )
        if stderr is not None:
            stderr.close()
    return ranks


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plain-ddp-reference")
    ranks = launch(folder / "store", folder / "final.pt")
    assert [rank.wait(180) for rank in ranks] == [0, 0]
    return folder / "final.pt"


def test_rank_1_signalled_both_ranks_save_exit_75_and_resume_bit_exact(tmp_path, reference):
    state_dir = tmp_path / "run-spotguard"
    agent = AgentDouble(state_dir)
    progress, go, store = tmp_path / "progress", tmp_path / "go", tmp_path / "store"
    env = {"SPOTGUARD_STATE_DIR": str(state_dir)}
    ranks = launch(store, tmp_path / "unused.pt", "--progress", str(progress), "--pause-at", "12",
                   "--go-file", str(go), env=env)  # fmt: skip
    wait_for(lambda: steps_done(progress) >= 12, timeout=120, what="step 12")
    registrations = {message["rank"]: pid for pid, message in agent.wait_registered(2).items()}
    assert registrations == {0: ranks[0].pid, 1: ranks[1].pid}
    ranks[1].send_signal(signal.SIGUSR1)
    go.touch()
    assert [rank.wait(120) for rank in ranks] == [75, 75]
    wait_for(lambda: len(agent.exits) == 2, what="both ranks' exit messages")
    assert {pid: exit["code"] for pid, exit in agent.exits.items()} == {
        ranks[0].pid: 75,
        ranks[1].pid: 75,
    }
    agent.close()
    latest = CheckpointStore(str(store)).latest()
    # Ranks agree without blocking: the flags of step 12's boundary are read at step 13's
    # (of 18: 3 epochs of 6 steps per rank), and the relaunch trains the 5 steps left.
    assert (latest.step, latest.kind) == (13, "emergency")
    assert sorted(latest.files) == ["rank-1.pt", "state.pt"]

    ranks = launch(store, tmp_path / "final.pt", env=env)
    assert [rank.wait(180) for rank in ranks] == [0, 0]
    assert_same_weights(tmp_path / "final.pt", reference)


def test_guard_built_before_init_process_group_learns_its_rank_at_first_use(tmp_path, reference):
    ranks = launch(tmp_path / "store", tmp_path / "final.pt", "--guard-first")
    assert [rank.wait(180) for rank in ranks] == [0, 0]
    latest = CheckpointStore(str(tmp_path / "store")).latest()
    assert sorted(latest.files) == ["rank-1.pt", "state.pt"]  # not two "rank 0"s
    assert_same_weights(tmp_path / "final.pt", reference)


def test_the_notified_nodes_deadline_governs_every_rank(tmp_path):
    """Only rank 1's node has the notice (120 s); rank 0 alone would assume ``--budget``
    seconds, all of them eaten by the safety margin, and skip the emergency save."""
    node_dirs = {rank: tmp_path / f"node-{rank}" for rank in (0, 1)}
    for folder in node_dirs.values():
        folder.mkdir(parents=True)
    progress, go, store = tmp_path / "progress", tmp_path / "go", tmp_path / "store"
    ranks = launch(store, tmp_path / "unused.pt", "--progress", str(progress), "--pause-at", "12",
                   "--go-file", str(go), "--budget", "1", "--margin", "1",
                   rank_env={rank: {"SPOTGUARD_STATE_DIR": str(folder)}
                             for rank, folder in node_dirs.items()})  # fmt: skip
    wait_for(lambda: steps_done(progress) >= 12, timeout=120, what="step 12")
    now = datetime.now(timezone.utc)
    notice = Notice("spot-interruption", "terminate", now + timedelta(seconds=120), now, "t")
    write_notice(node_dirs[1], notice)
    time.sleep(1.5)  # rank 1's watcher reads the file every 0.5 s (later: a later step)
    go.touch()
    assert [rank.wait(120) for rank in ranks] == [75, 75]
    latest = CheckpointStore(str(store)).latest()
    # Not the periodic checkpoint of step 10: rank 0 knew it had time for the emergency save.
    assert latest.kind == "emergency"
    assert latest.step >= 13


def test_a_rank_file_that_fails_verification_sends_every_rank_to_the_next_older(
    tmp_path, reference
):
    progress, go, store = tmp_path / "progress", tmp_path / "go", tmp_path / "store"
    no_agent = {"SPOTGUARD_STATE_DIR": str(tmp_path / "none")}
    ranks = launch(store, tmp_path / "unused.pt", "--progress", str(progress), "--pause-at", "12",
                   "--go-file", str(go), env=no_agent)  # fmt: skip
    wait_for(lambda: steps_done(progress) >= 12, timeout=120, what="step 12")
    ranks[1].send_signal(signal.SIGUSR1)
    go.touch()
    assert [rank.wait(120) for rank in ranks] == [75, 75]
    newest = CheckpointStore(str(store)).latest()
    rank_1_file = store / f"ckpt-{newest.step:012d}" / "rank-1.pt"
    damaged = bytearray(rank_1_file.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size: only its checksum can tell
    rank_1_file.write_bytes(bytes(damaged))
    ranks = launch(store, tmp_path / "final.pt")
    assert [rank.wait(180) for rank in ranks] == [0, 0]
    assert (store / f"ckpt-{newest.step:012d}" / "quarantined.json").exists()
    assert_same_weights(tmp_path / "final.pt", reference)  # resumed from the older one: exact


def test_one_node_reading_bad_bytes_raises_on_every_rank_and_quarantines_nothing(
    faulty_s3, moto_server, tmp_path
):
    """Rank 1's node damages what it reads (bad memory, a broken proxy): rank 0 reads the
    same file back intact, so the store is fine and no checkpoint may be quarantined."""
    bucket, proxy = faulty_s3
    store = f"s3://{bucket}/run"
    direct = {0: {"AWS_ENDPOINT_URL": moto_server}, 1: {"AWS_ENDPOINT_URL": moto_server}}
    ranks = launch(store, tmp_path / "first.pt", rank_env=direct)
    assert [rank.wait(180) for rank in ranks] == [0, 0]
    proxy.on("GET", "rank-1.pt", "flip-reply")
    damaged = {**direct, 1: {"AWS_ENDPOINT_URL": proxy.url}}
    logs = [tmp_path / f"rank-{rank}.log" for rank in (0, 1)]
    ranks = launch(store, tmp_path / "again.pt", rank_env=damaged, logs=logs)
    assert all(rank.wait(180) not in (0, 75) for rank in ranks)
    for log in logs:
        assert "a fault on that node, not in the store" in log.read_text(), log.read_text()[-2000:]
    client = boto3.client("s3", endpoint_url=moto_server)
    listing = client.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]
    assert not [item["Key"] for item in listing if item["Key"].endswith("quarantined.json")]
