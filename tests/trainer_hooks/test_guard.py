"""SpotGuard's decisions, in-process with real signals: rebalance, deadlines, repeated signals."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import ClassVar

import pytest
import torch

from spotguard.protocol import Notice, write_notice
from spotguard.trainer_hooks import CheckpointStore, Preempted, SpotGuard
from tests.support import wait_for
from tests.trainer_hooks.agent_double import AgentDouble


def notice(kind: str, deadline_in: float | None) -> Notice:
    now = datetime.now(timezone.utc)
    deadline = now + timedelta(seconds=deadline_in) if deadline_in is not None else None
    return Notice(kind, "terminate", deadline, now, key=f"k{time.time()}")


@pytest.fixture
def state_dir(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def agent(state_dir):
    with AgentDouble(state_dir) as double:
        yield double


def model_state(size: int = 16) -> dict:
    return {"model": torch.nn.Linear(size, size), "epoch_counter": 0}


def test_rebalance_triggers_an_early_save_and_training_goes_on(tmp_path, state_dir):
    uri = str(tmp_path / "store")
    state = model_state()
    with SpotGuard(uri, every_n_steps=1000, state_dir=state_dir) as guard:
        guard.restore(state)
        guard.step(1, state)
        assert CheckpointStore(uri).latest() is None
        write_notice(state_dir, notice("rebalance-recommendation", None))
        # An event, not a guess at the watcher's timing: it has seen the recommendation.
        wait_for(lambda: guard._core.stops.early_save, what="the watcher to see the rebalance")
        guard.step(2, state)  # not a multiple of 1000: saved because of the rebalance
        guard._core.wait()
        assert CheckpointStore(uri).latest().step == 2
        guard.step(3, state)  # still training, no Preempted
        assert not guard.stop_requested


def test_emergency_that_cannot_fit_keeps_the_last_checkpoint_and_says_so(
    tmp_path, state_dir, agent, caplog
):
    uri = str(tmp_path / "store")
    state = model_state()
    guard = SpotGuard(uri, every_n_steps=5, state_dir=state_dir, safety_margin=0)
    guard.restore(state)
    guard.step(5, state)
    guard._core.wait()  # a measured save: the guard now knows its throughput
    write_notice(state_dir, notice("spot-interruption", deadline_in=-1))  # already too late
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(Preempted) as caught:
        guard.step(7, state)
    assert caught.value.code == 75
    assert caught.value.saved is False
    assert CheckpointStore(uri).latest().step == 5
    assert "keeping the last verified checkpoint (step 5)" in caplog.text
    assert agent.exit_of(os.getpid()) == {"v": 2, "op": "exit", "code": 75, "step": 7}


def test_signals_during_the_emergency_save_do_not_corrupt_it(tmp_path, state_dir):
    uri = str(tmp_path / "store")
    state = {"model": torch.nn.Linear(1024, 1024)}  # 4 MiB: the save takes a moment
    # What the guard restores when it leaves: signals that arrive after that must not kill
    # the test process.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGUSR1)}
    guard = SpotGuard(uri, state_dir=state_dir)
    guard.restore(state)
    os.kill(os.getpid(), signal.SIGUSR1)
    pelting = threading.Event()

    def pelt() -> None:
        while not pelting.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.005)

    thread = threading.Thread(target=pelt)
    thread.start()
    try:
        with pytest.raises(Preempted) as caught:
            guard.step(3, state)
    finally:
        pelting.set()
        thread.join()
    assert caught.value.saved is True
    store = CheckpointStore(uri)
    assert [r.ok for r in store.verify()] == [True]
    assert store.latest().kind == "emergency"
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_registration_lives_exactly_as_long_as_the_guard(tmp_path, state_dir, agent):
    guard = SpotGuard(str(tmp_path / "store"), state_dir=state_dir)
    guard.restore({})
    registered = agent.wait_registered(1)
    assert registered[os.getpid()]["signal"] == "SIGUSR1"  # the pid is the kernel's word
    assert registered[os.getpid()]["rank"] == 0
    wait_for(lambda: guard._core.stops._link.registered_pid == os.getpid(), what="the ack")
    guard.close()
    wait_for(lambda: not agent.registered, what="the connection to end")
    assert os.getpid() not in agent.exits  # it did not end: no exit code to tell
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.default_int_handler)


def test_a_notice_pushed_by_the_agent_stops_training_without_a_signal(tmp_path, state_dir, agent):
    """In a container the agent may not be able to signal us: the pushed notice is enough."""
    uri = str(tmp_path / "store")
    state = model_state()
    guard = SpotGuard(uri, state_dir=state_dir, notice_poll_interval=3600)  # no file watching
    guard.restore(state)
    agent.wait_registered(1)
    guard.step(1, state)
    agent.push(notice("spot-interruption", deadline_in=120))
    wait_for(lambda: guard.stop_requested, what="the pushed notice")
    with pytest.raises(Preempted) as caught:
        guard.step(2, state)
    assert caught.value.saved is True
    assert CheckpointStore(uri).latest().step == 2
    assert agent.exit_of(os.getpid())["step"] == 2


def test_the_guard_registers_again_when_the_agent_restarts(tmp_path, state_dir, agent):
    with SpotGuard(str(tmp_path / "store"), state_dir=state_dir) as guard:
        guard.restore({})
        agent.wait_registered(1)
        agent.close()  # the agent restarts: its connections end
        with AgentDouble(state_dir) as restarted:
            assert os.getpid() in restarted.wait_registered(1)


def test_time_based_saves(tmp_path):
    """``every_seconds`` alone makes saves (no step is a multiple of anything), never more
    often than that: lower bounds on time only, nothing assumed about how fast a step runs.

    The guard is stepped until three saves are committed. The first save's step returned at
    least ``every_seconds`` after the guard was built (a save at once fails), and each
    save's step returned at least ``every_seconds`` after the previous save's step began
    (saving at every step, 20 ms apart, fails).
    """
    every = 0.3
    uri = str(tmp_path / "store")
    store = CheckpointStore(uri)
    state = model_state()
    built = time.monotonic()
    with SpotGuard(uri, every_seconds=every, state_dir="/nonexistent") as guard:
        guard.restore(state)
        saves: list[tuple[int, float, float]] = []  # (step, step began, step returned)
        step = 0
        deadline = time.monotonic() + 60  # only a no-hang bound
        while len(saves) < 3:
            assert time.monotonic() < deadline, f"only {len(saves)} time-based saves in 60 s"
            step += 1
            began = time.monotonic()
            guard.step(step, state)
            returned = time.monotonic()
            guard._core.wait()
            latest = store.latest()
            if latest is not None and latest.step == step:
                saves.append((step, began, returned))
            time.sleep(0.02)
    assert saves[0][2] - built >= every, saves
    for (_, began, _), (_, _, returned) in itertools.pairwise(saves):
        assert returned - began >= every, saves


def test_settings_are_validated():
    for bad in ({"every_n_steps": 0}, {"exit_code": 0}, {"signals": ("SIGKILL",)},
                {"keep_last": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            SpotGuard("/tmp/unused-store", **bad)


def test_polls_imds_itself_when_no_agent_runs(tmp_path, sim):
    uri = str(tmp_path / "store")
    state = model_state()
    guard = SpotGuard(uri, state_dir="/nonexistent", imds_endpoint=sim.url, safety_margin=0)
    guard.restore(state)
    guard.step(1, state)
    sim.control.spot(in_seconds=90)
    deadline = time.monotonic() + 10
    while not guard.stop_requested and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(Preempted) as caught:
        guard.step(2, state)
    assert caught.value.saved is True
    assert CheckpointStore(uri).latest().kind == "emergency"
    assert any(r["path"].endswith("spot/instance-action") for r in sim.control.requests())


def test_torchdata_stateful_dataloader_resumes_at_the_same_batch(tmp_path):
    """StatefulDataLoader works as guarded state: the epoch continues exactly where it stopped.

    (Later epochs reshuffle differently from an uninterrupted run - torchdata re-draws from its
    generator when the resumed iterator is created - so for bit-exact runs across epochs use
    ResumableDataLoader; see its docstring.)
    """
    import torchdata.stateful_dataloader as stateful

    dataset = torch.utils.data.TensorDataset(torch.arange(48))

    def loader():
        generator = torch.Generator().manual_seed(5)
        return stateful.StatefulDataLoader(dataset, batch_size=4, shuffle=True, generator=generator)

    reference = [batch[0].tolist() for batch in loader()]
    uri = str(tmp_path / "store")
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        state = {"data": loader()}
        guard = SpotGuard(uri, state_dir="/nonexistent")
        guard.restore(state)
        seen = []

        def train() -> None:
            for step, batch in enumerate(state["data"], start=1):
                seen.append(batch[0].tolist())
                if step == 5:
                    os.kill(os.getpid(), signal.SIGUSR1)
                guard.step(step, state)

        with pytest.raises(Preempted):
            train()
        resumed = {"data": loader()}
        with SpotGuard(uri, state_dir="/nonexistent") as again:
            assert again.restore(resumed) == 5
            seen += [batch[0].tolist() for batch in resumed["data"]]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == reference


class PriorityProbe:
    """Records the scheduling priority of the thread that serializes it (the save's)."""

    seen: ClassVar[list[tuple[int, int]]] = []

    def __deepcopy__(self, memo: dict) -> PriorityProbe:
        return self  # the snapshot keeps it; only the serialization is of interest

    def __reduce__(self) -> tuple:
        native = threading.get_native_id()
        PriorityProbe.seen.append((native, os.getpriority(os.PRIO_PROCESS, native)))
        return (int, (0,))


def test_the_background_save_yields_the_cpu_to_training(tmp_path):
    """Periodic saves serialize, hash and upload in a thread at a lower priority (niceness),
    so that where cores are short training goes first: with it, training throughput with a
    256 MiB save every 50 steps went from 0.93 to 0.99 x (bench/README.md)."""
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for asked, expected in ((None, min(main + 10, 19)), (0, main)):
        PriorityProbe.seen.clear()
        options = {} if asked is None else {"save_niceness": asked}
        with SpotGuard(str(tmp_path / f"ckpt-{asked}"), every_n_steps=1, state_dir=None,
                       **options) as guard:  # fmt: skip
            state = {"model": torch.nn.Linear(4, 4), "probe": PriorityProbe()}
            guard.restore(state)
            guard.step(1, state)
            guard._core.wait()
        ((thread, niceness),) = PriorityProbe.seen
        assert thread != threading.get_native_id()
        assert niceness == expected
