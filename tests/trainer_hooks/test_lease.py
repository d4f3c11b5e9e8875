"""One writer per prefix over time: the writer lease (local and S3 through moto), and the
replacement instance that starts while the interrupted one still writes its emergency save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from spotguard.errors import WriterConflict
from spotguard.trainer_hooks import CheckpointStore
from spotguard.trainer_hooks._internals.lease import LEASE_KEY, Lease
from tests.support import wait_for
from tests.trainer_hooks.test_plain_resume import SCRIPT, steps_done, train


@pytest.fixture(params=["local", "s3"])
def prefix(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('s3')}/leased"


def lease_of(prefix: str, ttl: float = 60.0) -> Lease:
    store = CheckpointStore(prefix)
    return Lease(store._backend, store.writer, ttl=ttl)


def test_a_second_writer_waits_for_the_first_to_release(prefix):
    first, second = lease_of(prefix), lease_of(prefix)
    first.acquire(wait=0)
    assert first.honours_conditions  # moto and the local store refuse a second create
    with pytest.raises(WriterConflict, match="holds the writer lease"):
        second.acquire(wait=0.3, poll=0.1)
    threading.Timer(0.5, first.release).start()
    started = time.monotonic()
    second.acquire(wait=30, poll=0.1)  # returns once the first one let go
    assert time.monotonic() - started >= 0.4
    second.release()


def test_an_expired_lease_is_taken_over_and_its_old_holder_fenced(prefix):
    first, second = lease_of(prefix, ttl=1.0), lease_of(prefix, ttl=1.0)
    first.acquire(wait=0)  # and then its instance "dies": no heartbeat
    second.acquire(wait=10, poll=0.1)  # after the ttl
    second.start_heartbeat()
    first.start_heartbeat()  # the old holder wakes up: its next renewal finds the change
    wait_for(lambda: first._lost, what="the old holder to notice")
    with pytest.raises(WriterConflict, match="lease lost"):
        first.check()
    second.check()
    second.release()
    first.release()


def test_two_writers_racing_for_a_free_lease_get_exactly_one(prefix):
    leases = [lease_of(prefix) for _ in range(4)]
    won, lost = [], []

    def take(lease: Lease) -> None:
        try:
            lease.acquire(wait=0)
            won.append(lease)
        except WriterConflict:
            lost.append(lease)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(won), len(lost)) == (1, 3)


def test_a_commit_after_the_lease_was_lost_is_refused(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    lease = Lease(store._backend, store.writer, ttl=0.2)
    lease.acquire(wait=0)
    store.lease = lease
    store.save(1, {"state.pt": b"while holding it"})
    time.sleep(0.3)  # no heartbeat: it may have been taken over by now
    with pytest.raises(WriterConflict, match="not renewed"):
        store.save(2, {"state.pt": b"too late"})
    assert [m.step for m in store.list()] == [1]


def test_the_replacement_waits_for_the_emergency_save_and_resumes_from_it(faulty_s3, tmp_path):
    """EC2's capacity rebalancing starts the replacement early on purpose: it must not resume
    from an older checkpoint (or write beside) while the interrupted instance is still saving."""
    bucket, proxy = faulty_s3
    uri = f"s3://{bucket}/run"
    hold = proxy.on("PUT", "ckpt-000000000012/state.pt", "hold", count=1)  # the emergency save
    progress = tmp_path / "progress"
    env = {"SPOTGUARD_STATE_DIR": str(tmp_path / "none")}
    old = train(uri, tmp_path / "old.pt", "--every", "5", "--progress", str(progress),
                "--pause-at", "12", env=env)  # fmt: skip
    wait_for(lambda: steps_done(progress) >= 12, timeout=120, what="step 12")
    old.send_signal(signal.SIGUSR1)
    wait_for(lambda: hold.hits, timeout=60, what="the emergency save to reach the store")
    new_progress, new_log = tmp_path / "new-progress", tmp_path / "new.log"
    with new_log.open("w") as log:
        new = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--store", uri, "--out", str(tmp_path / "new.pt"),
             "--every", "5", "--progress", str(new_progress)],
            env={**os.environ, **env}, stderr=log,
        )  # fmt: skip
    wait_for(lambda: "waiting for it to finish" in new_log.read_text(), timeout=60,
             what="the replacement to wait on the lease")  # fmt: skip
    assert not new_progress.exists(), "the replacement trained while the old writer saved"
    hold.release()
    assert old.wait(60) == 75
    assert new.wait(120) == 0
    first_step = int(new_progress.read_text().split()[0])
    assert first_step == 13, "the replacement must resume from the emergency checkpoint"
    # It took over because the old writer released the lease at exit 75, not because the
    # lease expired (which would have cost the replacement a minute).
    assert "(released)" in new_log.read_text()
    data = CheckpointStore(uri)._backend.read_small(LEASE_KEY)
    assert b'"released": true' in data
