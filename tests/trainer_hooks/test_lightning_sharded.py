"""SpotCheckpoint under Lightning's ModelParallelStrategy (FSDP2 on gloo, CPU): sharded (dcp)
checkpoints from every rank, a stop by a real signal, the automatic resume of weights and
optimizer state, at the same world size and at another one, and ``ckpt_path`` beside the store.

Each launch runs its ranks in processes of their own (this module, run as
``python -m tests.trainer_hooks.test_lightning_sharded JOB``, with ``LOCAL_RANK`` set: Lightning
then takes the processes as launched for it, as under torchrun) through a list of fits. After
each fit rank 0 writes the full model and Adam state (every DTensor gathered, FQN keys: the
same at any world size) where asked, and every rank what happened to it. Three launches:
2 ranks (an uninterrupted run, then one stopped by SIGUSR1 to rank 1), 2 ranks (the stopped run
resumed), 1 rank (the 2-rank run's checkpoints loaded at world size 1, and ``ckpt_path``).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import lightning.pytorch  # noqa: F401 - its ranks train with it: a dev dependency, never skipped
import pytest
import torch

from spotguard.errors import ConfigError
from spotguard.trainer_hooks import CheckpointStore
from spotguard.trainer_hooks._internals.lightning_sharded import checkpoint_format
from tests.trainer_hooks.rank_processes import full_tensors, outcome, report, wait_for_ranks
from tests.trainer_hooks.test_dcp_store import SHARD, assert_same, metadata_file, shards

REPO = Path(__file__).resolve().parents[2]
#: 2 epochs of 6 batches; periodic saves every 3 steps.
STEPS, EVERY, STOP_AFTER = 12, 3, 7
#: The stop is agreed without blocking: rank 1's flag of step 7 is read at step 8's boundary.
EMERGENCY_STEP = STOP_AFTER + 1
#: Where the uninterrupted run also writes Lightning's own (distributed) checkpoint.
OWN_AT = 4

# -- the ranks (run in processes of their own) ---------------------------------------------


def _dump(trainer: Any, path: Path) -> None:
    """The full model and optimizer state, and the scheduler's, by rank 0."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model, (optimizer,) = trainer.strategy.model, trainer.optimizers
    full = full_tensors(
        {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
    )
    full["lr"] = trainer.lr_scheduler_configs[0].scheduler.state_dict()["_last_lr"]
    if trainer.global_rank == 0:
        torch.save(full, path)


def _fit(op: dict[str, Any], rank: int, world: int, out: Path, record: dict[str, Any]) -> None:
    from datetime import timedelta

    import lightning.pytorch as pl
    from torch import nn

    from spotguard.trainer_hooks import ResumableDataLoader
    from spotguard.trainer_hooks.lightning import SpotCheckpoint

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            # 5 output rows: uneven shards over 2 ranks
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 5))

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[3]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def on_fit_start(self) -> None:
            # Every rank its own dropout masks (after Lightning seeded all alike): a resume
            # that gave rank 1 rank 0's random streams would not be bit-exact.
            torch.manual_seed(100 + self.global_rank)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            features, targets = batch
            return (self.net(features) - targets).square().mean()

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

        def train_dataloader(self) -> Any:
            generator = torch.Generator().manual_seed(1234)
            features, targets = torch.randn(48, 8, generator=generator), torch.randn(48, 5)
            dataset = torch.utils.data.TensorDataset(features, targets)
            return ResumableDataLoader(dataset, batch_size=8, shuffle=True, seed=7)

    spot = SpotCheckpoint(op["uri"], every_n_train_steps=EVERY, keep_last=5,
                          **op.get("options", {}))  # fmt: skip

    class Test(pl.Callback):
        """Before SpotCheckpoint (callbacks run in order): a real signal to rank 1 after step
        ``stop_after``; Lightning's own checkpoint and a dump at ``OWN_AT``."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            step = trainer.global_step
            if step == OWN_AT and op.get("own_checkpoint"):
                trainer.save_checkpoint(out / "own.ckpt")
                _dump(trainer, out / f"{op['tag']}-{step}.pt")
            if step == op.get("stop_after") and rank == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # handled by SpotCheckpoint's core
                while not spot._core.stop_requested:
                    time.sleep(0.01)
            if step % EVERY == EVERY - 1 and not op.get("stop_after"):
                # The save runs in the background for several of these tiny steps; let it end
                # so the next one is not deferred (its step would depend on timing).
                spot._core.wait()
            record["last_step"] = step

    strategy = pl.strategies.ModelParallelStrategy(
        data_parallel_size=world, tensor_parallel_size=1, timeout=timedelta(seconds=60)
    )
    trainer = pl.Trainer(
        max_steps=op.get("max_steps", STEPS), accelerator="cpu", devices=world,
        strategy=strategy, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[Test(), spot],
    )  # fmt: skip
    pl.seed_everything(7)
    trainer.fit(Model(), ckpt_path=op.get("ckpt_path"))
    record["resumed_from"] = spot.resumed_from
    record["global_step"] = trainer.global_step
    _dump(trainer, out / f"{op['tag']}-final.pt")


def _fsdp1(op: dict[str, Any], rank: int, world: int, out: Path, record: dict[str, Any]) -> None:
    """FSDPStrategy's state (FSDP1 with Lightning's sharded state-dict settings: ShardedTensors,
    offloaded to the CPU), FSDPStrategy needing a GPU: its real ``lightning_module_state_dict``
    and ``optimizer_state`` in a stand-in for Lightning's dump (a trainer needs the GPU), saved
    by :func:`sharded_save`'s job at 2 ranks, loaded into a model and an optimizer that were
    zeroed meanwhile, and a second optimizer never stepped. Run where Lightning's fit left the
    process group (or in its own)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from spotguard.trainer_hooks._internals.dcp_reader import StoreReader
    from spotguard.trainer_hooks._internals.dcp_store import save_sharded
    from spotguard.trainer_hooks._internals.files import META_KEY
    from spotguard.trainer_hooks._internals.lightning_sharded import (
        REST_KEY,
        _rest,
        load_step,
        sharded_save,
    )
    from spotguard.trainer_hooks._internals.ranks import Ranks
    from spotguard.trainer_hooks._internals.sharded import ShardedStager
    from spotguard.trainer_hooks.store import CheckpointStore as Store

    if not torch.distributed.is_initialized():  # run alone (no fit before it)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    # A 1-row head: at 2 ranks one rank's shard of its weight is empty. Wrapped per layer,
    # with the original parameters, as FSDPStrategy does.
    layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5), nn.Linear(5, 1))
    model = FullyShardedDataParallel(
        layers, device_id=torch.device("cpu"), use_orig_params=True,
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    # never stepped: torch's state-dict API would step it with lr=0 (weight decay moves it)
    fresh = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=0.1)
    for _ in range(3):
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    strategy = FSDPStrategy(state_dict_type="sharded")
    strategy.model, strategy.optimizers = model, [optimizer, fresh]

    def dump_checkpoint(weights_only: bool) -> dict[str, Any]:  # Lightning's, for these keys
        optimizer_states = [strategy.optimizer_state(o) for o in strategy.optimizers]
        return {"state_dict": strategy.lightning_module_state_dict(), "loops": {"at": 3},
                "optimizer_states": optimizer_states, META_KEY: {"own": rank}}  # fmt: skip

    trainer = SimpleNamespace(
        global_rank=rank, strategy=strategy, lightning_module=model,
        _checkpoint_connector=SimpleNamespace(dump_checkpoint=dump_checkpoint),
    )  # fmt: skip
    job = sharded_save(trainer)
    staged = ShardedStager(lambda: 2**40).stage(job)
    record["saved"] = [repr(job.failure), job.private, staged.state_dict is job.state_dict,
                       len(fresh.state)]  # fmt: skip
    store = Store(op["uri"])
    save_sharded(store, 3, staged.state_dict, own_file=job.own_file())
    in_dcp = StoreReader(store, 3).checked_metadata().state_dict_metadata
    record["rest_in_dcp"] = sorted(key for key in in_dcp if key.startswith(REST_KEY))
    saved = _full_fsdp1(model, optimizer)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    for moments in optimizer.state.values():
        for value in moments.values():
            value.zero_()
    optimizer.param_groups[0]["lr"] = fresh.param_groups[0]["lr"] = 0.5  # loaded back too
    state = {"state_dict": model, "optimizer_0": optimizer, "optimizer_1": fresh, REST_KEY: None}
    restored, corrupt, other = load_step(store, Ranks(), 3, state)
    rest = _rest(state[REST_KEY], 3) if restored is not None else None
    record["loaded"] = [restored is not None, corrupt, other, rest]
    record["fresh"] = [len(fresh.state), fresh.param_groups[0]["lr"]]
    both = {"saved": saved, "loaded": _full_fsdp1(model, optimizer)}  # collectives: all ranks
    if rank == 0:
        torch.save(both, out / "fsdp1.pt")


def _full_fsdp1(model: Any, optimizer: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    model_state = {k: v.clone() for k, v in get_model_state_dict(model, options=full).items()}
    return {"model": model_state, "optim": get_optimizer_state_dict(model, optimizer, options=full)}


def _run(op: dict[str, Any], rank: int, world: int, out: Path) -> None:
    report(
        out / f"{op['tag']}-rank{rank}.json",
        lambda record: (_fsdp1 if op.get("op") == "fsdp1" else _fit)(op, rank, world, out, record),
    )


def _rank_main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    rank = int(os.environ["LOCAL_RANK"])
    try:
        for op in job["ops"]:
            _run(op, rank, job["world"], Path(job["out"]))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # leave together (see test_dcp_store)
            torch.distributed.destroy_process_group()


# -- the tests --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(world: int, ops: list[dict[str, Any]], out: Path, env: dict[str, str]) -> list[int]:
    """Run ``ops`` on ``world`` ranks; their exit codes (a hang fails the test)."""
    out.mkdir(parents=True, exist_ok=True)
    job = out / f"job-{uuid.uuid4().hex[:8]}.json"
    job.write_text(json.dumps({"world": world, "ops": ops, "out": str(out)}))
    command = [sys.executable, "-m", "tests.trainer_hooks.test_lightning_sharded", str(job)]
    ranks = []
    where = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "NODE_RANK": "0",
             "WORLD_SIZE": str(world)}  # fmt: skip
    for rank in range(world):
        own = {**os.environ, **env, **where, "LOCAL_RANK": str(rank)}
        ranks.append(subprocess.Popen(command, cwd=REPO, env=own))
    return wait_for_ranks(ranks, ops, 180)


def assert_every_ranks_files(files: Any) -> None:
    """A shard of each of the 2 ranks, DCP's metadata, and each rank's own file (its random
    streams and samplers: ``rank-<k>...``), nothing else."""
    assert [SHARD.fullmatch(n)[1] for n in shards(files)] == ["0", "1"]
    own = sorted(set(files) - {*shards(files), metadata_file(files)})
    ranks = [re.fullmatch(r"rank-(\d+)(?:-[0-9a-f]+)?\.pt", name) for name in own]
    assert [found and found[1] for found in ranks] == ["0", "1"], sorted(files)


def loaded(path: Path) -> Any:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("lightning-sharded")
    env = {"SPOTGUARD_STATE_DIR": str(folder / "no-agent")}
    whole, stopped = folder / "whole", folder / "stopped"
    first = [
        {"tag": "whole", "uri": str(whole), "own_checkpoint": True},
        {"tag": "stopped", "uri": str(stopped), "stop_after": STOP_AFTER},
    ]
    codes = launch(2, first, folder, env)
    emergency = CheckpointStore(str(stopped)).latest()
    second = [
        {"tag": "resumed", "uri": str(stopped)},
        {"tag": "fsdp1", "op": "fsdp1", "uri": str(folder / "fsdp1")},
    ]
    resumed = launch(2, second, folder, env)
    # World size 1: the 2-rank run's store (newest: its final checkpoint) restored; then a
    # ckpt_path older than that store (the store wins, loaded over the path's weights); then
    # the same path with an empty store (the path wins: Lightning's own load).
    for name in ("at-1", "over-path"):
        shutil.copytree(whole, folder / name)
    own = str(folder / "own.ckpt")
    alone = [
        {"tag": "at-1", "uri": str(folder / "at-1")},
        {"tag": "over-path", "uri": str(folder / "over-path"), "ckpt_path": own},
        {"tag": "path", "uri": str(folder / "empty"), "ckpt_path": own, "max_steps": OWN_AT},
    ]
    at_1 = launch(1, alone, folder, env)
    return {"out": folder, "codes": codes, "emergency": emergency, "resumed": resumed,
            "at_1": at_1, "whole": whole}  # fmt: skip


def test_periodic_and_final_saves_hold_every_ranks_shards(runs):
    assert [r.get("error") for r in outcome(runs["out"], "whole", 2)] == [None, None]
    kept = CheckpointStore(str(runs["whole"])).list()
    assert [(m.step, m.kind, m.format, m.world_size) for m in kept] == [
        (3, "periodic", "dcp", 2),
        (6, "periodic", "dcp", 2),
        (9, "periodic", "dcp", 2),
        (STEPS, "periodic", "dcp", 2),
    ]  # fmt: skip (the final save at 12 found step 12 committed by the periodic save)
    for manifest in kept:
        assert_every_ranks_files(manifest.files)


def test_a_signal_to_rank_1_saves_every_ranks_shards_exits_75_and_resumes_bit_exact(runs):
    out = runs["out"]
    assert runs["codes"] == [75, 75]  # the stopped run is the launch's last fit
    stopped = outcome(out, "stopped", 2)
    assert [(r.get("exit"), r.get("saved"), r["last_step"]) for r in stopped] == [
        (75, True, EMERGENCY_STEP)
    ] * 2
    saved = runs["emergency"]
    assert (saved.step, saved.kind, saved.format, saved.world_size) == (
        EMERGENCY_STEP, "emergency", "dcp", 2,
    )  # fmt: skip
    assert_every_ranks_files(saved.files)
    assert runs["resumed"] == [0, 0]
    resumed = outcome(out, "resumed", 2)
    assert [(r.get("error"), r.get("resumed_from"), r.get("global_step")) for r in resumed] == [
        (None, EMERGENCY_STEP, STEPS)
    ] * 2
    # Weights, Adam's moments and steps, the learning rate: the uninterrupted run's bits.
    assert_same(loaded(out / "whole-final.pt"), loaded(out / "resumed-final.pt"))


def test_one_rank_loads_what_two_saved_and_ckpt_path_loses_to_a_newer_store(runs):
    """ModelParallelStrategy runs at 1 device: the 2-rank run's final checkpoint comes back
    element for element (DCP reshards). A ``ckpt_path`` (Lightning's own checkpoint of step
    4) older than the store: the store's checkpoint is loaded over the weights Lightning had
    loaded from the path. The same path with an empty store: the path is resumed."""
    out = runs["out"]
    assert runs["at_1"] == [0]
    reference = loaded(out / "whole-final.pt")
    for tag in ("at-1", "over-path"):
        (record,) = outcome(out, tag, 1)
        assert (record.get("error"), record.get("resumed_from")) == (None, STEPS), tag
        assert_same(reference, loaded(out / f"{tag}-final.pt"), tag)
    (record,) = outcome(out, "path", 1)
    assert (record.get("error"), record.get("resumed_from")) == (None, OWN_AT)
    assert_same(loaded(out / f"whole-{OWN_AT}.pt"), loaded(out / "path-final.pt"))


def test_fsdp_strategys_sharded_state_saves_staged_and_loads_back(runs):
    """FSDPStrategy needs a GPU (bench/gpu_check.py runs it there): its ShardedTensors, which
    torch's stager refuses, go through SpotCheckpoint's path here, on FSDP1 on gloo, with a
    weight of fewer rows than ranks (an empty shard: torch's loader misread the checkpoint)."""
    records = outcome(runs["out"], "fsdp1", 2)
    # Lightning's CPU copies go to the save as they are (no second copy); the optimizer never
    # stepped is not stepped by the save and stays fresh at the load; the rest of Lightning's
    # checkpoint is in rank 0's own file, not in DCP, and loaded on every rank.
    assert [
        (r.get("error"), r.get("saved"), r.get("rest_in_dcp"), r.get("loaded"), r.get("fresh"))
        for r in records
    ] == [
        (None, ["None", True, True, 0], [], [True, None, None, {"loops": {"at": 3}}], [0, 0.02])
    ] * 2
    both = loaded(runs["out"] / "fsdp1.pt")
    assert_same(both["saved"], both["loaded"])


# -- ckpt_path against a store whose load gives nothing as new (one process, no group) -------


def _choose(loads: int | None) -> tuple[Any, Any, list[int]]:
    """``ckpt_path`` of step 100 against a store listing step 120 whose verified load gives
    step ``loads`` (``None``: every checkpoint failed, a fresh start allowed): the source, the
    connector after it, and how often the path was loaded again."""
    from types import SimpleNamespace

    from spotguard.trainer_hooks._internals.files import Restored
    from spotguard.trainer_hooks._internals.lightning_resume import StoreSide, choose_source
    from spotguard.trainer_hooks._internals.ranks import Ranks

    path_checkpoint = {"global_step": 100, "loops": "path's"}
    connector = SimpleNamespace(_loaded_checkpoint=dict(path_checkpoint), _ckpt_path="p.ckpt")
    reloads: list[int] = []

    def reload() -> None:  # Lightning's resume_start: the path's weights back in the model
        reloads.append(1)
        connector._loaded_checkpoint = {**path_checkpoint, "reloaded": True}

    def load() -> Any:
        if loads is None:
            return None
        return Restored(SimpleNamespace(step=loads), None, {}), {"global_step": loads}

    source = choose_source(connector, "p.ckpt", StoreSide(120, load), Ranks(), "s3://b/r", reload)
    return source, connector, reloads


@pytest.mark.parametrize("loads", [None, 80])
def test_a_store_that_loads_nothing_as_new_as_ckpt_path_gives_way_to_the_path_loaded_again(
    loads: int | None,
) -> None:
    """Every newer checkpoint failed (a fresh start allowed), or the fallback is older than
    the path: the store's load wrote into the live model, so the path is loaded again and
    resumed, never its counters over other weights nor an older store checkpoint."""
    source, connector, reloads = _choose(loads)
    assert (source.step, source.newest_in_store, reloads) == (100, loads, [1])
    assert connector._loaded_checkpoint == {"global_step": 100, "loops": "path's",
                                            "reloaded": True}  # fmt: skip


def test_a_store_checkpoint_as_new_as_ckpt_path_wins_without_loading_the_path_again() -> None:
    source, connector, reloads = _choose(120)
    assert (source.step, reloads, connector._loaded_checkpoint) == (120, [], {"global_step": 120})


def test_a_dump_is_private_unless_it_holds_a_live_tensor_and_live_scalars_are_copied() -> None:
    """Lightning's dump offloads to the CPU: a copy of a GPU tensor, the live tensor itself
    when training runs on the CPU (then staged), and Adam's step count, a live CPU scalar."""
    from spotguard.trainer_hooks._internals.lightning_sharded import _storage, _unshared

    weight, step = torch.ones(3), torch.tensor(5.0)
    live = {_storage(weight), _storage(step)}
    dump = {"state_dict": {"w": weight.clone()}, "optimizer_0": {"state": {"w": {"step": step}}}}
    assert _unshared(dump, live)
    copied = dump["optimizer_0"]["state"]["w"]["step"]
    assert _storage(copied) not in live
    assert torch.equal(copied, step)
    assert not _unshared({"state_dict": {"w": weight}}, live)
    assert not _unshared({"state_dict": [{"w": weight}]}, live)


# -- which configurations are saved, and how (no process group needed) ---------------------

PACKAGES = ["lightning.pytorch", "pytorch_lightning"]


@pytest.mark.parametrize("package", PACKAGES)
def test_the_format_follows_the_strategy_and_a_contradicting_setting_is_refused(package):
    strategies = importlib.import_module(f"{package}.strategies")
    sharded = [
        strategies.ModelParallelStrategy(),
        strategies.FSDPStrategy(state_dict_type="sharded"),
    ]
    for strategy in sharded:
        assert checkpoint_format(strategy, "auto") == checkpoint_format(strategy, "dcp") == "dcp"
        with pytest.raises(ConfigError, match=r"checkpoint_format='torch' cannot save"):
            checkpoint_format(strategy, "torch")
    ddp = strategies.DDPStrategy()
    assert checkpoint_format(ddp, "auto") == checkpoint_format(ddp, "torch") == "torch"
    with pytest.raises(ConfigError, match=r"checkpoint_format='dcp' with DDPStrategy"):
        checkpoint_format(ddp, "dcp")


@pytest.mark.parametrize("package", PACKAGES)
def test_sharded_settings_that_gather_on_rank_0_are_refused_naming_the_fix(package):
    strategies = importlib.import_module(f"{package}.strategies")
    with pytest.raises(ConfigError, match=r"use FSDPStrategy\(state_dict_type='sharded'\)"):
        checkpoint_format(strategies.FSDPStrategy(), "auto")  # its default: 'full'
    gathering = strategies.ModelParallelStrategy(save_distributed_checkpoint=False)
    with pytest.raises(ConfigError, match=r"use save_distributed_checkpoint=True"):
        checkpoint_format(gathering, "auto")


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("hybrid", ["HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"])
def test_fsdp_hybrid_sharding_without_a_device_mesh_is_refused_naming_the_fix(package, hybrid):
    """Its shards are ShardedTensors over a process group pair: every first save failed."""
    strategies = importlib.import_module(f"{package}.strategies")
    groups = strategies.FSDPStrategy(
        state_dict_type="sharded", sharding_strategy=hybrid, process_group=(None, None)
    )
    with pytest.raises(ConfigError, match=rf"{hybrid}'\) without a device_mesh.*device_mesh="):
        checkpoint_format(groups, "auto")
    meshed = strategies.FSDPStrategy(
        state_dict_type="sharded", sharding_strategy=hybrid, device_mesh=(1, 2)
    )
    assert checkpoint_format(meshed, "auto") == "dcp"


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("name", ["DeepSpeedStrategy", "XLAStrategy"])
def test_deepspeed_and_unknown_strategies_are_refused_naming_the_supported_ones(package, name):
    """DeepSpeed needs its package built (here: not), so the class itself is checked."""
    strategies = importlib.import_module(f"{package}.strategies")
    strategy = object.__new__(getattr(strategies, name))
    with pytest.raises(ConfigError, match=rf"cannot checkpoint {name}:.*ModelParallelStrategy"):
        checkpoint_format(strategy, "auto")


def test_a_sharded_subclass_that_loads_state_its_own_way_is_refused_naming_the_method():
    import lightning.pytorch as pl

    class OwnLoad(pl.strategies.ModelParallelStrategy):
        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
            return super().load_checkpoint(checkpoint_path, weights_only)

    with pytest.raises(ConfigError, match=r"OwnLoad.load_checkpoint keeps state its own way"):
        checkpoint_format(OwnLoad(), "auto")


if __name__ == "__main__":
    _rank_main(sys.argv[1])
