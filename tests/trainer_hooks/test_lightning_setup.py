"""SpotCheckpoint in Lightning's real Trainer, in this process: which strategies it accepts,
what it resumes from when ``fit`` is given a ``ckpt_path``, and no log noise on every save."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from spotguard.errors import ConfigError
from spotguard.trainer_hooks import CheckpointStore
from spotguard.trainer_hooks._internals.lightning_resume import check_replicated
from spotguard.trainer_hooks.lightning import SpotCheckpoint
from tests.trainer_hooks.train_lightning_variants import Model

PACKAGES = ["lightning.pytorch", "pytorch_lightning"]


@pytest.fixture
def no_process_group() -> Iterator[None]:
    """A strategy that sets up torch.distributed in this process leaves nothing behind: no
    group, and none of the variables Lightning exports for it (``MASTER_PORT`` and the like).
    A later test's DDP subprocesses inherit the environment: with this run's ``MASTER_PORT``
    their rank 1 once met a stale store and never joined its rank 0."""
    environment = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)


def trainer(*callbacks: Any, **options: Any) -> Any:
    """Two epochs of 12 steps; Lightning's own checkpoints only where a test asks for them."""
    options = {"max_epochs": 2, "accelerator": "cpu", "devices": 1, **options}
    own = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    return pl.Trainer(
        logger=False, deterministic=True, enable_progress_bar=False, enable_checkpointing=own,
        enable_model_summary=False, callbacks=list(callbacks), **options,
    )  # fmt: skip


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


class Steps(pl.Callback):
    """The steps this fit trained, in order."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.seen.append(trainer.global_step)


# -- strategies --------------------------------------------------------------------------


def test_a_sharding_strategy_that_gathers_on_rank_0_is_refused_before_anything_is_held(
    tmp_path, no_process_group
):
    """ModelParallelStrategy (FSDP2/TP) saves in format dcp (test_lightning_sharded), but not
    with save_distributed_checkpoint=False: its dump gathers the whole state on rank 0."""
    spot = SpotCheckpoint(str(tmp_path / "store"), every_n_train_steps=2, state_dir="/none")
    strategy = pl.strategies.ModelParallelStrategy(save_distributed_checkpoint=False)
    run = trainer(spot, strategy=strategy, max_steps=2)
    with pytest.raises(ConfigError, match=r"use save_distributed_checkpoint=True"):
        run.fit(Model("stateful", 8))
    assert not (tmp_path / "store").exists(), "the writer lease was taken before the refusal"


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy", "XLAStrategy"])
def test_lightning_strategies_that_keep_state_their_own_way_are_refused(package, name):
    """FSDP needs a GPU and DeepSpeed its package to be built (here: neither), so the classes
    themselves are checked; DeepSpeed and XLA derive from DDPStrategy."""
    strategies = importlib.import_module(f"{package}.strategies")
    strategy = object.__new__(getattr(strategies, name))
    with pytest.raises(ConfigError, match=rf"cannot checkpoint {name}:.*strategy='ddp'"):
        check_replicated(strategy)


@pytest.mark.parametrize("package", PACKAGES)
def test_replicated_strategies_and_plain_subclasses_are_accepted(package):
    strategies = importlib.import_module(f"{package}.strategies")

    class QuietDDP(strategies.DDPStrategy):
        """A user's DDP that changes nothing about state."""

        def barrier(self, name: str | None = None) -> None:
            super().barrier(name)

    for strategy in (
        strategies.SingleDeviceStrategy(torch.device("cpu")),
        strategies.DDPStrategy(),
        strategies.DDPStrategy(start_method="spawn"),
        QuietDDP(),
    ):
        check_replicated(strategy)


def test_a_subclass_that_loads_state_its_own_way_is_refused_naming_the_method(
    tmp_path, no_process_group
):
    class ShardedLoadDDP(pl.strategies.DDPStrategy):
        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
            return super().load_checkpoint(checkpoint_path, weights_only)

    spot = SpotCheckpoint(str(tmp_path / "store"), state_dir="/none")
    run = trainer(spot, strategy=ShardedLoadDDP(process_group_backend="gloo"), max_steps=2)
    with pytest.raises(ConfigError, match=r"ShardedLoadDDP.load_checkpoint keeps state"):
        run.fit(Model("stateful", 8))


# -- saves --------------------------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("package", PACKAGES)
def test_saves_say_weights_only_and_lightning_logs_nothing_for_them(tmp_path, package):
    """Lightning logs "`weights_only` was not set" at INFO for every checkpoint dumped without
    it (its own logger prints INFO): once per save, 9 in a short run, before the fix."""
    lightning = importlib.import_module(package)
    records = Records()
    logger = logging.getLogger(lightning.__name__)
    logger.addHandler(records)
    try:
        spot = SpotCheckpoint(str(tmp_path / "store"), every_n_train_steps=2, state_dir="/none")
        run = lightning.Trainer(
            max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[spot],
        )  # fmt: skip
        run.fit(importlib.import_module(f"{package}.demos.boring_classes").BoringModel())
    finally:
        logger.removeHandler(records)
    store = CheckpointStore(str(tmp_path / "store"))
    assert store.list()[-1].step == 6
    assert "optimizer_states" in store.load_state(name="state.pt")[1]  # the whole state
    assert not [m for m in records.messages if "weights_only" in m]


# -- fit(ckpt_path=...) --------------------------------------------------------------------


class UploadsDone(pl.Callback):
    """Waits at every step boundary for the upload in flight, so that a periodic save is never
    deferred: on a loaded machine the save thread (which yields the CPU to training) did not
    finish step 4's upload before step 20, and the store held no step between 6 and 16."""

    def __init__(self, spot: SpotCheckpoint) -> None:
        self.spot = spot

    def on_train_batch_end(self, *args: Any) -> None:
        if self.spot._core is not None:
            self.spot._core.wait()


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> tuple[Path, int, dict[str, torch.Tensor]]:
    """Lightning's own checkpoints every 6 steps, spotguard's every 4 (each waited for), to
    step 20; the store is then cut back to step 16; and the uninterrupted run's weights."""
    folder = tmp_path_factory.mktemp("earlier")
    own = pl.callbacks.ModelCheckpoint(
        dirpath=folder / "own", every_n_train_steps=6, save_top_k=-1, save_last=True
    )
    store = str(folder / "store")
    spot = SpotCheckpoint(store, every_n_train_steps=4, keep_last=None, state_dir="/none")
    pl.seed_everything(7)
    trainer(own, spot, UploadsDone(spot), max_steps=20).fit(Model("stateful", 8))
    for manifest in CheckpointStore(store).list():
        if manifest.step > 16:
            CheckpointStore(store).delete(manifest.step)
    newest = CheckpointStore(store).latest().step
    assert newest == 16
    pl.seed_everything(7)
    reference = Model("stateful", 8)
    trainer().fit(reference)
    return folder, newest, weights(reference)


def resume(
    tmp_path: Path, earlier: Path, ckpt_path: str, *callbacks: Any
) -> tuple[SpotCheckpoint, Steps, Any, Any]:
    """A copy of the earlier run's store, and a fit(ckpt_path=...) over it to 2 epochs."""
    store = tmp_path / "store"
    for step_dir in (earlier / "store").glob("ckpt-*"):
        (store / step_dir.name).mkdir(parents=True)
        for item in step_dir.iterdir():
            (store / step_dir.name / item.name).write_bytes(item.read_bytes())
    spot, steps = SpotCheckpoint(str(store), state_dir="/none"), Steps()
    pl.seed_everything(7)
    model = Model("stateful", 8)
    run = trainer(steps, spot, *callbacks)
    run.fit(model, ckpt_path=ckpt_path)
    return spot, steps, run, model


def test_a_newer_checkpoint_in_the_store_wins_over_an_older_ckpt_path_and_says_so(
    tmp_path, earlier_run, caplog
):
    """Before: Lightning restored the path (step 6) and redid the steps up to the store's
    newest, while resumed_from named the store's step; a relaunch would then have written
    steps below the store's newest."""
    earlier, stored, reference = earlier_run
    path = earlier / "own" / "epoch=0-step=6.ckpt"
    with caplog.at_level(logging.WARNING, logger="spotguard.trainer_hooks"):
        spot, steps, run, model = resume(tmp_path, earlier, str(path))
    assert spot.resumed_from == stored
    assert steps.seen[0] == stored + 1, "steps were redone"
    assert str(run.ckpt_path).endswith(f"ckpt-{stored:012d}")  # what Lightning says it restored
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "step=6.ckpt' holds step 6" in warning
    assert f"resuming from step {stored} instead" in warning
    assert all(torch.equal(weights(model)[k], reference[k]) for k in reference)


@pytest.mark.parametrize("which", ["file", "last"])
def test_a_ckpt_path_newer_than_the_store_wins_and_resumed_from_says_so(
    tmp_path, earlier_run, which
):
    """Before: resumed_from named the store's newest step while Lightning restored step 18."""
    earlier, _stored, reference = earlier_run
    if which == "file":
        path = str(earlier / "own" / "epoch=1-step=18.ckpt")
    else:  # Lightning's "last" resolves to its own checkpoint folder
        path = "last"
        (tmp_path / "own").mkdir()
        (tmp_path / "own" / "last.ckpt").write_bytes((earlier / "own" / "last.ckpt").read_bytes())
    own = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "own", save_last=True)
    spot, steps, _run, model = resume(tmp_path, earlier, path, own)
    assert spot.resumed_from == 18
    assert steps.seen[0] == 19
    assert all(torch.equal(weights(model)[k], reference[k]) for k in reference)
    manifests = CheckpointStore(str(tmp_path / "store")).list()
    assert manifests[-1].step == 24
    assert manifests[-1].resumed_from == 18
