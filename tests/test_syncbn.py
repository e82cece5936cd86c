"""dist.sync_bn: batch statistics over every rank's images equal one process's over the whole batch."""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from launch import run_group

from engine.models import SyncableBatchNorm1d, SyncableBatchNorm2d, set_sync_bn

SHAPES = {"2d": (8, 3, 5, 5), "1d": (8, 6)}


def _bn(kind: str, momentum: float | None) -> torch.nn.Module:
    torch.manual_seed(0)
    bn = SyncableBatchNorm2d(3, momentum=momentum) if kind == "2d" else SyncableBatchNorm1d(6, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    return bn


def _batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(SHAPES[kind], generator=generator, dtype=torch.float64).float() + 1
    return x, torch.randn(SHAPES[kind], generator=generator)  # images, a weight of each output in the loss


def _whole(kind: str, momentum: float | None) -> dict[str, torch.Tensor]:
    """One process, the whole batch, two steps: what the ranks must give."""
    bn, (x, w) = _bn(kind, momentum), _batch(kind)
    x.requires_grad_(True)
    for _ in range(2):
        y = bn(x)
        (y * w).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
            "mean": bn.running_mean, "var": bn.running_var}  # fmt: skip


def _rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(minutes=2))
    results = {}
    for kind in SHAPES:
        for momentum in (0.1, None):
            bn, (x, w) = _bn(kind, momentum), _batch(kind)
            assert set_sync_bn(bn, True) == 1
            half = len(x) // world
            mine = x[rank * half : (rank + 1) * half].clone().requires_grad_(True)
            for _ in range(2):
                y = bn(mine)
                (y * w[rank * half : (rank + 1) * half]).sum().backward()
            grads = [bn.weight.grad.clone(), bn.bias.grad.clone()]
            for g in grads:  # the parameter gradients summed over the ranks (DDP averages them: the same scale)
                dist.all_reduce(g)
            found = {"y": y.detach(), "x_grad": mine.grad, "w_grad": grads[0], "b_grad": grads[1],
                     "mean": bn.running_mean, "var": bn.running_var}  # fmt: skip
            results[f"{kind}-{momentum}"] = {k: v.tolist() for k, v in found.items()}
    Path(out, f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_normalize_over_the_whole_batch_as_one_process_does(tmp_path):
    """Each rank holds half the batch: outputs, input gradients (through the statistics, over both ranks), summed
    parameter gradients and running statistics (momentum 0.1, and None: SWA's cumulative average) equal one process
    normalizing the whole batch."""
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    for kind in SHAPES:
        for momentum in (0.1, None):
            want, key = _whole(kind, momentum), f"{kind}-{momentum}"
            for name in ("y", "x_grad"):  # each rank's half of the batch
                both = torch.cat([torch.tensor(got[r][key][name]) for r in (0, 1)])
                torch.testing.assert_close(both, want[name], rtol=1e-4, atol=1e-5, msg=f"{key} {name}")
            for name in ("w_grad", "b_grad", "mean", "var"):  # the same on both ranks
                for r in (0, 1):
                    torch.testing.assert_close(torch.tensor(got[r][key][name]), want[name], rtol=1e-4, atol=1e-5,
                                               msg=f"{key} {name} rank {r}")  # fmt: skip


def test_unmarked_or_in_eval_mode_it_is_a_plain_batch_norm():
    """Off (the default), and in eval mode when on, the forward is nn.BatchNorm's own (no process group needed)."""
    x = torch.randn(4, 3, 5, 5)
    plain, syncable = torch.nn.BatchNorm2d(3), SyncableBatchNorm2d(3)
    torch.testing.assert_close(syncable(x), plain(x), rtol=0, atol=0)
    set_sync_bn(syncable, True)
    syncable.eval(), plain.eval()
    torch.testing.assert_close(syncable(x), plain(x), rtol=0, atol=0)
    assert syncable.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.slow
def test_a_two_rank_run_with_sync_bn_keeps_one_set_of_bn_statistics(tmp_path):
    """Under torchrun with dist.sync_bn every rank's BN statistics are the global batch's: the two ranks' saved
    statistics are equal (without it they differ: tests/test_distributed.py); the start line says so."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "engine.cli",
           "train", "--recipe", "smoke", "--no-eval", "--set", "train.epochs=1", "--set", "dist.sync_bn=true",
           "--out", str(tmp_path / "run")]  # fmt: skip
    proc = run_group(cmd, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sync_bn (BN statistics over every rank's batch)" in proc.stdout
    ranks = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=False)["rank_buffers"]
    stats = [k for k in ranks[0] if k.endswith(("running_mean", "running_var"))]
    assert any(".predictor" in k or "predictors" in k for k in stats), stats  # AR-AT's predictors' BatchNorm1d too
    for key in stats:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=1e-5, atol=1e-6, msg=key)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_rank(rank: int, world: int, port: int, out: str) -> None:
    """Rank `rank` of `world` (world 1: one process) takes one AR-AT step on its share of one batch."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    import torch.distributed as dist

    from engine.config import apply_overrides
    from engine.recipes import get_recipe
    from engine.train import build_run, train_step

    torch.set_num_threads(1)
    cfg = apply_overrides(get_recipe("smoke"), ["dist.sync_bn=true", "perf.dtype=fp32", "attack.start=none",
                                                "perf.device=cpu", "dist.timeout_min=2"])  # fmt: skip
    if world > 1:  # compile's auto as on CUDA (on): where BN synchronizes it must resolve to off
        import engine.perf

        engine.perf.compile_wanted = lambda perf_cfg, device: perf_cfg.compile != "off"
    run = build_run(cfg)
    assert not run.perf.compiled
    if world == 1:  # the same synchronized batch norm over one rank's whole batch: the reference, formula for formula
        from engine.models import set_sync_bn

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        set_sync_bn(run.nets.raw, True)
        set_sync_bn(run.method, True)
    generator = torch.Generator().manual_seed(5)
    x, y = torch.rand(32, 3, 32, 32, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    share = 32 // world
    mine = slice(rank * share, (rank + 1) * share)
    train_step(run, x[mine].contiguous(memory_format=torch.channels_last), y[mine])
    if rank == 0:
        state = {k: v.tolist() for k, v in run.nets.raw.state_dict().items() if v.is_floating_point()}
        state |= {f"method.{k}": v.tolist() for k, v in run.method.state_dict().items() if v.is_floating_point()}
        Path(out, f"world{world}.json").write_text(json.dumps(state))
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.slow
def test_an_ar_at_step_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    """The whole step, with its attack (train-mode BN, started at x so both draw nothing), Split-BN's dual forward,
    DDP's gradient average and the predictors' own: the weights after one step on 2 x 16 images with dist.sync_bn
    equal one process's on the 32 through the same batch norm (each layer's against nn.BatchNorm: above; through
    20 layers and AR-AT's cosine their last bits part by ~0.3% at width 8, as two orders of summation do)."""
    for world in (2, 1):  # the reference in a process of its own too (its environment and threads stay there)
        mp.spawn(_step_rank, args=(world, _free_port(), str(tmp_path)), nprocs=world)
    two, one = (json.loads((tmp_path / f"world{w}.json").read_text()) for w in (2, 1))
    assert two.keys() == one.keys() and any(k.startswith("method.predictors") for k in one)
    for key in one:
        torch.testing.assert_close(torch.tensor(two[key]), torch.tensor(one[key]), rtol=1e-4, atol=1e-5, msg=key)


def test_sync_bn_refusals_and_one_process_without_anything_to_synchronize(tmp_path):
    """Compiled or captured, or in fp16, synchronized BN is refused (the first two not yet supported; fp16 mixes
    each rank's loss scale); one process has nothing to synchronize and trains with them."""
    from engine.config import apply_overrides
    from engine.recipes import get_recipe
    from engine.train import build_run

    run = build_run(apply_overrides(get_recipe("smoke"), ["dist.sync_bn=true", "perf.compile=on",
                                                          "perf.compile_backend=eager"]))  # fmt: skip
    assert run.perf.compiled
    for switch, says in (("perf.compile=on", "dist.sync_bn runs uncompiled and uncaptured"),
                         ("perf.dtype=fp16", "dist.sync_bn with fp16")):  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "engine.cli",
               "train", "--recipe", "smoke", "--no-eval", "--set", "dist.sync_bn=true", "--set", switch,
               "--out", str(tmp_path / switch)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = run_group(cmd, timeout=600, env=env)
        assert proc.returncode != 0 and says in proc.stderr, proc.stderr[-2000:]


def test_a_marked_batch_norm_without_a_process_group_is_a_plain_one():
    """After the run's process group is gone (or before there is one), a marked BN in train mode normalizes as
    nn.BatchNorm does (it raised: no default process group)."""
    x = torch.randn(4, 3, 5, 5)
    plain, syncable = torch.nn.BatchNorm2d(3), SyncableBatchNorm2d(3)
    set_sync_bn(syncable, True)
    torch.testing.assert_close(syncable(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(syncable.running_var, plain.running_var, rtol=0, atol=0)


def test_the_network_evaluated_is_unmarked(tiny_cfg):
    """The closing evaluation's ranks take unequal shares of the chunks: the network they evaluate synchronizes no
    BN (a train-mode forward there would pair one rank's all-reduce with nothing); SWA's average too."""
    from engine.train import build_run, final_model

    for swa in (False, True):
        tiny_cfg.swa.enabled, tiny_cfg.swa.start_epoch, tiny_cfg.swa.every = swa, 1, 4
        run = build_run(tiny_cfg)
        set_sync_bn(run.nets.raw, True)
        run.swa.maybe_update(run.nets.raw, epoch=1, step=4)  # one average (SWA's BN re-estimation then runs)
        model = final_model(run)
        marked = [m for m in model.modules() if getattr(m, "sync", False)]
        assert not marked and any(isinstance(m, SyncableBatchNorm2d) for m in model.modules()), swa


def test_a_resume_whose_config_turns_sync_bn_on_is_refused(tmp_path, capsys):
    """`--set dist.sync_bn` is refused on a resume; config.json edited to it (as raising train.epochs is) was
    trained on, each rank's own running means then the shifts of one sum (its statistics wrong by their spread,
    for good). Now one line, exit 2, the run as it was."""
    from engine.cli import main

    run = tmp_path / "run"
    assert main(["train", "--recipe", "smoke", "--set", "train.epochs=1", "--no-eval", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    config["dist"]["sync_bn"], config["epochs"] = True, 2
    (run / "config.json").write_text(json.dumps(config))
    checkpoint = (run / "checkpoints" / "latest.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json's dist.sync_bn (true) is not the checkpoint's (false)" in err and "\n" not in err
    assert (run / "checkpoints" / "latest.pt").read_bytes() == checkpoint
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
