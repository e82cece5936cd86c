"""DDP on CPU: two processes under torchrun (gloo), the smoke recipe."""

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from launch import run_group


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "engine.cli",
        "train",
        "--recipe",
        "smoke",
        "--out",
        str(out),
        "--set",
        "eval.attacks=clean,pgd20",
        "--set",
        "eval.chunk_size=16",  # 4 chunks of the 64 images, 2 per rank (one CPU chunk of 500 left rank 1 idle)
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_group(cmd, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("arat: recipe=smoke") == 1  # only rank 0 prints
    assert "world_size=2" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["images_per_s"] > 0
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    assert len(state["rng"]) == 2  # both ranks' RNG states, for an exact resume
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["clean"]["num_examples"] == 64 and results["clean"]["chunks"] == results["pgd20"]["chunks"] == 4
    # the evaluation ending training ran on both ranks, on rank 0's network (broadcast_state: each rank's BN
    # statistics are its own): one chunk folder per attack (its key holds the network's hash), 4 chunks in each
    for attack in ("clean", "pgd20"):
        folders = list((out / "eval" / "chunks").glob(f"{attack}-*"))
        assert len(folders) == 1 and len(list(folders[0].glob("0*.json"))) == 4, attack
    # one process gives the same per-image flags
    single = tmp_path / "single"
    cmd = [sys.executable, "-m", "engine.cli", "eval", str(out), "--attacks", "clean,pgd20", "--num-examples", "64",
           "--batch-size", "64", "--chunk-size", "16", "--out", str(single)]  # fmt: skip
    proc = run_group(cmd, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((single / "flags.json").read_text()) == json.loads((out / "eval" / "flags.json").read_text())
    # a run in use (here this test holds it) is refused by rank 0 before the evaluation, and every rank says so (the
    # others waited in the group's start until torchrun stopped them)
    from engine.rundir import RunDir

    with RunDir(out).open_for_writing(resume=True):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "engine.cli", "eval", str(out), "--attacks", "clean", "--num-examples", "64"]  # fmt: skip
        proc = run_group(cmd, timeout=300, env=env)
    assert proc.returncode != 0 and proc.stderr.count("arat: error: rank 0 (") == 2, proc.stderr[-3000:]
    assert proc.stderr.count("in use") >= 2
    # flags of both kinds: the comparison is not of all-equal bits. Clean only: PGD-20 leaves the smoke network (2
    # epochs on synthetic data) no robust image, so its flags compare all-zero bits; mixed robust flags of 2
    # processes against 1 are test_evaluation_chunks.py::test_two_processes_give_the_flags_of_one's
    assert 0 < results["clean"]["accuracy"] < 1


DIVERGE_ON_RANK_1 = """
import sys
import engine.train as train

step = train.train_step


def nan_on_rank_1(run, x, y):
    out = step(run, x, y)
    if run.dist.rank == 1 and run.step == 0:  # rank 1's first loss only: rank 0's stays finite at that step
        out["loss"] = out["loss"] * float("nan")
    return out


train.train_step = nan_on_rank_1
from engine.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_loss_diverging_on_one_rank_stops_every_rank(tmp_path):
    """Issue 11 item 4 under DDP: the finite-loss check reads the loss summed over ranks, so all ranks stop together
    with one line (before, the diverged rank stopped and the other waited forever in its next all-reduce)."""
    script = tmp_path / "diverge.py"
    script.write_text(DIVERGE_ON_RANK_1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "train",
           "--recipe", "smoke", "--out", str(tmp_path / "run"), "--set", "eval.attacks=clean"]  # fmt: skip
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    proc = run_group(cmd, timeout=300, env=env)
    assert proc.returncode != 0 and proc.stderr.count("training diverged") == 2, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "results.json").exists()


def test_an_out_folder_rank0_refuses_stops_every_rank(tmp_path):
    """Only rank 0 opens the run directory: its refusal (here, --out holds another run) stops every rank at once with
    the same line (before, the other ranks trained on until torchrun killed them), and the folder is left as it was."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "engine.cli",
           "train", "--recipe", "smoke", "--out", str(out), "--set", "eval.attacks=clean"]  # fmt: skip
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    proc = run_group(cmd, timeout=240, env=env)
    assert proc.returncode != 0 and proc.stderr.count("is not empty and holds no run") == 2, proc.stderr[-3000:]
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_a_rank_leaving_after_an_error_picks_abort_for_nccl_and_never_raises(monkeypatch, caplog):
    """On the way out of an error: NCCL's destroy waits for the rank's pending work (a collective a failed peer never
    joins, until NCCL's timeout), so an NCCL group is aborted instead; gloo's is destroyed, and so is a group whose
    backend cannot be read or a torch without the abort. A failure there is logged with the rank, not raised: the
    error being handled is the one to tell. Only the choice is tested: torch's calls are stood in (the NCCL abort
    never ran here; gloo's destroy runs in the two-rank tests)."""
    import torch.distributed as dist

    from engine import distributed

    calls, marks = [], {}
    store = type("Store", (), {"set": lambda self, key, value: marks.update({key: value})})()
    monkeypatch.setattr(distributed, "_rounds", distributed._rounds)  # (put back after the test)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda: calls.append("abort"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))

    def unreadable():
        raise RuntimeError("no default group")

    for backend, expected in (("nccl", "abort"), ("gloo", "destroy"), (unreadable, "destroy")):
        monkeypatch.setattr(dist, "get_backend", backend if callable(backend) else lambda b=backend: b)
        calls.clear()
        next_round = distributed._rounds + 1
        distributed.shutdown(distributed.DistInfo(0, 2), wait=False)
        assert calls == [expected], backend
        # the exchange this rank will not reach is marked for the ranks waiting in it, and its round used up
        assert marks.pop(distributed._failed_key(next_round)) == "0" and distributed._rounds == next_round
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.delattr(dist.distributed_c10d, "_abort_process_group")
    calls.clear()
    distributed.shutdown(distributed.DistInfo(0, 2), wait=False)
    assert calls == ["destroy"]

    def fails():
        raise RuntimeError("the group is gone")

    monkeypatch.setattr(dist, "destroy_process_group", fails)
    with caplog.at_level("WARNING", logger="engine"):
        distributed.shutdown(distributed.DistInfo(1, 2), wait=False)
    assert "[rank 1] leaving the process group after an error failed too: the group is gone" in caplog.text


def test_an_error_on_rank_0_opening_the_run_is_raised_there_and_said_to_the_other_ranks(tmp_path, monkeypatch):
    """Only rank 0 opens the run directory. A refusal was shared with the other ranks, but any other error there (a
    disk's) left them waiting in the gather for the group's timeout where torchrun did not stop them (another node):
    rank 0 raises it as it is, the others a line naming it. One process: raised as before."""
    from types import SimpleNamespace

    from engine import distributed, train
    from engine.distributed import DistInfo
    from engine.rundir import RunDir, RunDirError

    def broken_disk(self, resume, unwritable, wait_s=0.0):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(RunDir, "open_for_writing", broken_disk)
    monkeypatch.setattr(distributed, "shutdown", lambda info, wait=True: None)
    said = []
    monkeypatch.setattr(distributed, "gather_objects", lambda obj, info: said.append(obj) or [said[0], None])
    rundir = RunDir(tmp_path / "run")
    for info in (DistInfo(), DistInfo(0, 2)):
        with (
            pytest.raises(OSError, match="Input/output error"),
            train.opened_by_rank0(SimpleNamespace(dist=info), rundir, False),
        ):
            pass
    assert said[-1] == f"rank 0 could not open or read {rundir.path}: [Errno 5] Input/output error (rank 0 says more)"
    rank1 = SimpleNamespace(dist=DistInfo(1, 2))
    with pytest.raises(RunDirError, match="rank 0 could not open"), train.opened_by_rank0(rank1, rundir, False):
        pass


def test_collectives_wait_dist_timeout_min_not_nccls_ten_minutes(monkeypatch):
    """An evaluation's ranks wait in a gather for the slowest rank's AutoAttack chunk; the process group is made
    with dist.timeout_min (NCCL's own default, 10 minutes, would end a healthy long evaluation)."""
    from datetime import timedelta

    import torch.distributed as dist

    from engine import distributed
    from engine.config import ConfigError, DistConfig
    from engine.errors import UserError

    made = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: made.update(backend=backend, **kw))
    monkeypatch.setattr(distributed, "agree_on_group_token", lambda info: None)  # (no group stood in for it)
    monkeypatch.setattr(distributed, "_joined", False)  # (put back after the test: a later main() must not leave)
    info = distributed.init(DistConfig(), "cpu")
    assert (info.rank, info.world_size) == (1, 2) and distributed.joined_a_group()
    assert made == {"backend": "gloo", "timeout": timedelta(minutes=180)}
    distributed.init(DistConfig(timeout_min=30), "cpu")
    assert made["timeout"] == timedelta(minutes=30)
    made.clear()
    with pytest.raises(UserError, match="dist.backend=nccl needs CUDA"):  # was NCCL's traceback on every rank
        distributed.init(DistConfig(backend="nccl"), "cpu")
    assert not made  # refused before any process group
    with pytest.raises(ConfigError, match="dist.timeout_min"):
        DistConfig(timeout_min=0)


def test_each_process_uses_its_local_rank_s_gpu_or_the_only_one_it_sees():
    """torchrun shows every process all GPUs of the node (GPU = LOCAL_RANK); a launcher that shows each process its
    own GPU only leaves one visible (GPU 0); more processes than GPUs is a one-line error, not a CUDA fault."""
    from engine.distributed import gpu_index
    from engine.errors import UserError

    assert [gpu_index(r, 8) for r in range(8)] == list(range(8))
    assert [gpu_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    with pytest.raises(UserError, match="LOCAL_RANK 5 but this process sees 4 GPUs"):
        gpu_index(5, 4)


def test_two_ranks_on_one_gpu_are_refused_on_every_rank(monkeypatch):
    """torchrun --nproc_per_node 2 where one GPU is visible: both processes would take GPU 0 (as srun with one GPU
    per process does, rightly) and NCCL would fail at the first collective with its own error. Every rank compares
    the gathered (host, GPU UUID) pairs and stops with one line; the process group is left again."""
    import torch.distributed as dist

    from engine import distributed
    from engine.config import DistConfig
    from engine.errors import UserError

    left = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: None)
    monkeypatch.setattr(distributed, "agree_on_group_token", lambda info: None)  # (no group stood in for it)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: left.append(True))
    monkeypatch.setattr(distributed, "_joined", False)  # (put back after the test, as above)
    monkeypatch.setattr(distributed, "gpu_identity", lambda index: f"node GPU-{index}")
    monkeypatch.setattr(distributed, "gather_objects", lambda obj, info: ["node GPU-0", obj])
    with pytest.raises(UserError, match=r"ranks 0 and 1 share one GPU \(node GPU-0\): start at most one process"):
        distributed.init(DistConfig(), "cuda")
    assert left == [True]
    monkeypatch.setattr(distributed, "gather_objects", lambda obj, info: ["other GPU-0", obj])  # srun: own GPUs
    assert distributed.init(DistConfig(), "cuda").gpu == 0 and left == [True]
    assert distributed.shared_gpus(["a 1", "a 2", "b 1", "a 2"]) == "ranks 1 and 3 share one GPU (a 2)"
    assert distributed.shared_gpus(["a 1", "b 1"]) is None


def _gathering_rank(rank: int, init: str, out: str) -> None:
    import time

    import torch.distributed as dist

    from engine import distributed

    def no_collective(*args, **kwargs):
        raise AssertionError("gather_objects ran a backend collective")

    # a rank stuck in a collective fails after 5 min (gloo's default: 30) instead of outliving pytest's own limit
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(minutes=5))
    dist.all_gather_object = dist.all_gather = dist.all_gather_into_tensor = no_collective
    info = distributed.DistInfo(rank, 2)
    rounds = [distributed.gather_objects({"rank": rank, "round": k, "big": [rank] * 1000 * k}, info) for k in range(3)]
    store = dist.distributed_c10d._get_default_store()
    record = {"rounds": rounds, "left": [store.check([distributed._gather_key(n, rank)]) for n in (1, 2, 3)]}
    if rank == 1:
        time.sleep(0.5)  # rank 0 must not leave before this rank is done with the store
    record["shutdown_called"] = time.time()
    distributed.shutdown(info)
    record["shutdown_returned"] = time.time()
    if rank == 0:  # the last gather's entries and the exit keys are cleared
        keys = [distributed._gather_key(3, 0), distributed._gather_key(3, 1), f"{distributed.store_prefix()}/done/4/1"]
        record["after"] = [store.check([key]) for key in keys]
    Path(out, f"{rank}.json").write_text(json.dumps(record))


def _rank_left_behind(rank: int, init: str, out: str) -> None:
    import time

    import torch.distributed as dist

    from engine import distributed
    from engine.errors import UserError

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(minutes=5))
    dist.distributed_c10d._get_default_store().set_timeout(timedelta(seconds=30))  # the group's, as its gathers wait
    distributed.POLL_S = 0.2
    info = distributed.DistInfo(rank, 2)
    distributed.gather_objects(rank, info)
    if rank == 1:  # an error here: this rank leaves, and never writes its entry of the next round
        distributed.shutdown(info, wait=False)
        return
    started = time.monotonic()
    try:
        distributed.gather_objects(rank, info, wait=timedelta(seconds=60))  # an evaluation's wait for the chunks
        said = "returned"
    except UserError as e:
        said = str(e)
    Path(out, "0.json").write_text(json.dumps({"said": said, "waited": time.monotonic() - started}))
    dist.destroy_process_group()


def test_a_rank_waiting_in_a_gather_stops_when_another_left_on_an_error(tmp_path):
    """A rank that left on an error never writes its entry of the next gather; the others waited for it the whole
    time (the group's timeout, or hours in an evaluation's gather), unless torchrun stopped them, which it does on
    the failed rank's own node only. The rank leaving marks the round it will not reach, and the waiting ranks look
    for that mark as they wait: one line, within a poll, here 0.2 s."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_left_behind, args=(f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2)
    got = json.loads((tmp_path / "0.json").read_text())
    assert got["said"] == "rank 1 stopped on an error (its own output says which); this rank stops too"
    assert got["waited"] < 20  # the store's timeout is 30 s, the gather's own wait a minute (hours in evaluations)


def test_gathered_objects_go_through_the_store_not_a_backend_collective(tmp_path):
    """The evaluation's gathers (the last exchange before a rank exits) use the process group's store: a gloo
    collective's worker thread may still be dropping its tensors, GIL needed, as the interpreter finalizes, which
    aborted the process after its results were written. Each round's entries are deleted once every rank is past it;
    at shutdown rank 0 (which may host the store) waits for every rank, then clears the rest."""
    import torch.multiprocessing as mp

    mp.spawn(_gathering_rank, args=(f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2)
    expected = [[{"rank": r, "round": k, "big": [r] * 1000 * k} for r in range(2)] for k in range(3)]
    got = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for record in got:
        assert record["rounds"] == expected
        assert record["left"] == [False, False, True]  # a rank's entry of round n is deleted at round n + 1
    assert got[0]["after"] == [False, False, False]
    assert got[0]["shutdown_returned"] >= got[1]["shutdown_called"]


def _wrapping_rank(rank: int, init: str, out: str) -> None:
    import copy
    import warnings

    import torch.distributed as dist

    from engine import distributed

    # a rank stuck in a collective fails after 5 min (gloo's default: 30) instead of outliving pytest's own limit
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(minutes=5))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    alone = copy.deepcopy(model)  # the same forwards without DDP: this rank's own statistics
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp = distributed.wrap(model, distributed.DistInfo(rank, 2), torch.device("cpu"))
    for _ in range(3):  # DDP syncing buffers would overwrite them with rank 0's before the second and third forward
        x = torch.full((2, 3, 4, 4), float(rank + 1)) + torch.randn(2, 3, 4, 4)
        ddp(x), alone(x)
    record = {
        "mean": model[1].running_mean.tolist(),
        "alone": alone[1].running_mean.tolist(),
        "warnings": [str(w.message)[:200] for w in caught],
    }
    Path(out, f"{rank}.json").write_text(json.dumps(record))
    del ddp  # DDP's reducer and its gloo work before the group, not left to the interpreter's finalization
    dist.destroy_process_group()
    # (once in CI, 2026-12-07, a rank aborted after this point: "terminate called without an active exception", gloo's
    # thread at interpreter exit, as docs/verification.md's first entry tells; 0 in 40 reruns. This test's claims are
    # in the files written above: the rank leaves without the interpreter's finalization)
    os._exit(0)


def test_ddp_keeps_batch_norm_statistics_per_rank_without_a_deprecation_warning(tmp_path):
    """wrap: each rank's BN running statistics come from its own batches (no broadcast of rank 0's before each
    forward), through the switch this torch has for it, with no deprecation warning on every rank."""
    import torch.multiprocessing as mp

    mp.spawn(_wrapping_rank, args=(f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for record in got:
        assert record["mean"] == pytest.approx(record["alone"], rel=1e-6)
    assert got[0]["mean"] != pytest.approx(got[1]["mean"], rel=1e-3)  # the ranks' batches differ
    assert got[0]["warnings"] == got[1]["warnings"] == []


def _failing_rank(rank: int, init: str, out: str) -> None:
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from engine import distributed

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=20))
    if rank == 1:  # never reaches shutdown, as a rank whose evaluation failed
        time.sleep(3)
        return
    start = time.time()
    distributed.shutdown(distributed.DistInfo(0, 2), wait=False)
    Path(out, "0.json").write_text(json.dumps({"seconds": time.time() - start}))


def test_leaving_on_an_error_does_not_wait_for_the_other_ranks(tmp_path):
    """`arat eval` leaving on an exception: rank 0 must not wait (the group's timeout, 3 hours by default) for ranks
    that will never be done, which would keep torchrun from seeing the failure."""
    import torch.multiprocessing as mp

    mp.spawn(_failing_rank, args=(f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2)
    assert json.loads((tmp_path / "0.json").read_text())["seconds"] < 2  # rank 1 stays 3 s; waiting would be 20


COMPILED_EPOCHS = """
import json
import sys
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from engine import distributed
from engine.config import apply_overrides
from engine.evaluate import evaluate
from engine.recipes import get_recipe
from engine.train import build_run, final_model, train_epoch

families, out = json.loads(sys.argv[1]), Path(sys.argv[2])
for family, recipe, overrides in families:  # one process group for them all: each family's graphs from nothing
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()
    counters.clear()
    cfg = apply_overrides(get_recipe(recipe), overrides)
    run = build_run(cfg)
    for epoch in range(1, cfg.epochs):  # the warm-up: every training graph is built here (ARREST's fine-tuning too)
        train_epoch(run, epoch)
    warm = counters["stats"]["unique_graphs"]
    torch._dynamo.config.error_on_recompile = True  # a recompile from here on raises
    train_epoch(run, cfg.epochs)
    trained = counters["stats"]["unique_graphs"]
    model = final_model(run)  # SWA: the average, its BN statistics re-estimated on every rank's shard
    distributed.broadcast_state(model, run.dist)
    results = evaluate(model, run.test_split, cfg.eval, run.perf.device, cfg.seed, cfg.perf, run.dist)
    record = {
        "world_size": run.dist.world_size,
        "warm_graphs": warm,
        "graphs_in_last_epoch": trained - warm,
        "eval_graphs": counters["stats"]["unique_graphs"] - trained,
        "graph_breaks": sum(counters["graph_break"].values()),
        "accuracy": {name: r["accuracy"] for name, r in results.items()},
    }
    (out / f"{family}-rank{run.dist.rank}.json").write_text(json.dumps(record))
distributed.shutdown(run.dist)
"""


@pytest.mark.slow
def test_compiled_ddp_epochs_have_no_recompiles_or_graph_breaks(tmp_path):
    """Issue 9 item 1 under DDP, for every method family of tests/test_compile.py (the ablations, SWA, grad-sim and
    the perf switches included): two gloo processes, each role compiled (dynamo with backend "eager": recompiles and
    graph breaks do not depend on the backend), DDP around the compiled training role. After the warm-up epochs no
    rank recompiles (dynamo's error_on_recompile is on) or builds a training graph, no graph breaks anywhere, and the
    evaluation (its last batch padded, its chunks shared by the ranks) adds only its two roles' graphs."""
    from test_compile import FAMILIES, SHAPE  # the per-role compile tests' cases: the last epoch is the one checked

    script = tmp_path / "compiled_ddp.py"
    script.write_text(COMPILED_EPOCHS)
    extra = ["perf.compile=on", "eval.chunk_size=16"]  # 40 images: chunks of 16, 16, 8 (padded) for 2 ranks
    families = [(name, recipe, SHAPE + overrides + extra) for name, (recipe, overrides) in FAMILIES.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           json.dumps(families), str(tmp_path)]  # fmt: skip
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    proc = run_group(cmd, timeout=840, env=env)  # within pytest's own 900 s: this one says what ran
    assert proc.returncode == 0, proc.stderr[-3000:]
    for family in FAMILIES:
        ranks = [json.loads((tmp_path / f"{family}-rank{r}.json").read_text()) for r in (0, 1)]
        for record in ranks:
            assert record["world_size"] == 2
            assert record["warm_graphs"] > 0, f"{family}: nothing was compiled"
            assert record["graphs_in_last_epoch"] == 0 and record["graph_breaks"] == 0, (family, record)
            assert record["eval_graphs"] == 2, (family, record)  # compiled, and its two roles only
        assert ranks[0]["accuracy"] == ranks[1]["accuracy"], family  # rank 0 gathers every chunk, every rank has it


def test_swa_statistics_are_averaged_over_the_ranks_shards(monkeypatch):
    """Each rank re-estimates the adv BNs on its shard of the training set (a cumulative average over its batches);
    averaged over the ranks (equal shares of batches) they are the average over every batch, as one pass over the
    whole set gives, where rank 0's alone were kept before."""
    import torch.distributed as dist

    from engine import distributed
    from engine.distributed import DistInfo

    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(1.0), bn.running_var.fill_(4.0), bn.num_batches_tracked.fill_(5)
    rank1 = {id(bn.running_mean): torch.full((3,), 3.0), id(bn.running_var): torch.full((3,), 2.0),
             id(bn.num_batches_tracked): torch.tensor(5)}  # fmt: skip

    def all_reduce(t):  # the sum with rank 1's values
        t += rank1[id(t)]

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    distributed.average_bn_statistics(torch.nn.Sequential(bn), DistInfo(rank=0, world_size=2))
    assert torch.equal(bn.running_mean, torch.full((3,), 2.0)) and torch.equal(bn.running_var, torch.full((3,), 3.0))
    assert bn.num_batches_tracked.item() == 10
    distributed.average_bn_statistics(torch.nn.Sequential(bn), DistInfo())  # one process: unchanged
    assert torch.equal(bn.running_mean, torch.full((3,), 2.0))


def _torchrun_train(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "engine.cli",
           "train", *args]  # fmt: skip
    return run_group(cmd, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_a_resumed_two_rank_run_equals_an_uninterrupted_one(tmp_path):
    """Each rank's BN statistics are its own under DDP (not synced) and feed the epoch-start balance pass and the
    eval-mode attacks; the checkpoint held rank 0's alone, which every rank loaded on resume. Now each rank's are
    saved and restored: 1 epoch, then trained on to 2 (its end set aside), equals 2 epochs straight."""
    common = ["--recipe", "smoke", "--no-eval"]
    proc = _torchrun_train(*common, "--out", str(tmp_path / "full"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.batch_size=32 is per process: 64 images per step over 2 processes" in proc.stdout
    # the final network's BN statistics: the ranks' average (rank 0's alone before, a sample of half the batches)
    latest = torch.load(tmp_path / "full" / "checkpoints" / "latest.pt", weights_only=False)["rank_buffers"]
    final = torch.load(tmp_path / "full" / "checkpoints" / "final.pt", weights_only=False)["model"]
    for key in ("bn1.adv.running_mean", "bn1.clean.running_var"):
        per_rank = [r[f"model.{key}"] for r in latest]
        assert torch.allclose(final[key], (per_rank[0] + per_rank[1]) / 2) and not torch.equal(final[key], per_rank[0])
    part = tmp_path / "part"
    proc = _torchrun_train(*common, "--set", "train.epochs=1", "--out", str(part))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(part / "checkpoints" / "latest.pt", weights_only=False)
    ranks = state["rank_buffers"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["model.bn1.adv.running_mean"],
                                               ranks[1]["model.bn1.adv.running_mean"])  # fmt: skip
    config = json.loads((part / "config.json").read_text())
    (part / "config.json").write_text(json.dumps(config | {"epochs": 2}))
    proc = _torchrun_train("--resume", str(part), "--no-eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    drop = ("epoch_seconds", "images_per_s", "tflop_per_s", "wall_seconds")
    rows = [
        [{k: v for k, v in json.loads(line).items() if k not in drop} for line in (run / "metrics.jsonl").open()]
        for run in (tmp_path / "full", part)
    ]
    assert rows[0] == rows[1]
    a, b = (
        torch.load(run / "checkpoints" / "final.pt", weights_only=False)["model"] for run in (tmp_path / "full", part)
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    # rank 1's statistics after epoch 2 (only rank 0's are in final.pt): they started from rank 0's on resume before
    a, b = (
        torch.load(run / "checkpoints" / "latest.pt", weights_only=False)["rank_buffers"][1]
        for run in (tmp_path / "full", part)
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_grad_sim_runs_under_two_ranks(tmp_path):
    """grad-sim under DDP averages each term's gradient over the ranks (one all-reduce each) before the cosine: two
    ranks take its extra backwards and collectives with DDP's own in step, and the epoch's figure is written."""
    run = tmp_path / "run"
    proc = _torchrun_train("--recipe", "smoke", "--no-eval", "--set", "train.epochs=1", "--set",
                           "analysis.grad_sim=true", "--out", str(run))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert -1 <= row["grad_sim"] <= 1 and 0 <= row["grad_conflict"] <= 1, row


def test_each_rank_s_noise_stream_is_apart_from_the_others_the_weights_and_every_epoch_s_data():
    """Rank r drew its attack noise from seed + r: at seed 0, epoch r's shuffle and augmentation generator's seed,
    the same stream. Then from seed + r * 2**40, which torch's CPU generator (it keeps the low 32 bits) reads as
    `seed` on every rank: every CPU rank drew the same noise, and it replayed the stream that drew the initial
    weights (`seed`, rank 0's noise seed too). The streams themselves are compared, on the CPU generator."""
    from engine.data.loader import epoch_generator
    from engine.distributed import rank_seed

    def stream(seed: int) -> tuple[float, ...]:
        return tuple(torch.rand(4, generator=torch.Generator().manual_seed(seed)).tolist())

    low32 = 2**32 - 1
    for seed in range(4):
        data = {epoch_generator(seed, epoch).initial_seed() & low32 for epoch in range(1, 401)}
        ranks = [rank_seed(seed, rank) for rank in range(64)]
        assert all(0 <= r < 2**63 for r in ranks) and rank_seed(seed, 3) == ranks[3]  # (a seed torch takes; fixed)
        low = {r & low32 for r in ranks}
        assert len(low) == 64 and not low & data and seed & low32 not in low, seed
        streams = {stream(r) for r in ranks[:8]}
        assert len(streams) == 8 and stream(seed) not in streams, seed  # apart from each other and the weights'


PER_RANK_DATA = """
import os
import sys

from engine.cli import main

# each rank reads its own copy, as two nodes would (their LOCAL_RANK is 0 on each; here two ranks of one node)
sys.exit(main(sys.argv[1:] + ["--data-dir", os.environ[f"ARAT_RANK{os.environ['RANK']}_DATA"]]))
"""


def _write_cifar10(root: Path, changed: tuple[str, ...] = ()) -> None:
    """A tiny CIFAR-10 in the official layout; in each batch file named in `changed` one pixel differs."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (32, 3072), dtype=np.uint8)
        if name in changed:
            data[-1, -1] ^= 1
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": [i % 10 for i in range(32)]}))


@pytest.mark.slow
def test_ranks_reading_other_copies_of_the_dataset_are_refused(tmp_path):
    """Each rank loads its node's copy of the dataset: on two nodes with two copies (another download, the
    JPEG-degraded one, a relative data folder), training and the sharded evaluation mixed them without a word (the
    fingerprint was rank 0's alone). Now every rank stops at once with one line naming the rank and what differs,
    before any run folder is made; the same copies on both ranks train as before (the other torchrun tests). Each
    case fails on the old code (the run trained, the evaluation evaluated)."""
    from engine.config import ModelConfig
    from engine.models import build_model

    copies = {"same": (), "train": ("data_batch_5",), "test": ("test_batch",)}
    for name, changed in copies.items():
        _write_cifar10(tmp_path / name, changed)
    (tmp_path / "none").mkdir()  # a node without the data: the smoke recipe falls back to synthetic images
    script = tmp_path / "per_rank_data.py"
    script.write_text(PER_RANK_DATA)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    weights = tmp_path / "net.pt"
    torch.save(build_model(ModelConfig(width=4, split_bn=False), 10).state_dict(), weights)
    train = ["train", "--recipe", "smoke", "--set", "data.dataset=cifar10", "--set", "data.synthetic_fallback=true"]
    evaluate = ["eval", str(weights), "--model", "resnet18", "--width", "4", "--attacks", "clean"]
    cases = [  # (rank 1's copy, command, the line each rank ends with)
        ("train", train, "reads other training images than rank 0"),
        ("test", train, "reads other test images than rank 0"),
        ("none", train, f"synthetic data (no cifar10 under {tmp_path / 'none'}: data.synthetic_fallback) against"),
        ("test", evaluate, "reads other test images than rank 0"),
    ]
    for copy, command, line in cases:
        out = tmp_path / f"out-{copy}-{command[0]}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
               "ARAT_RANK0_DATA": str(tmp_path / "same"), "ARAT_RANK1_DATA": str(tmp_path / copy)}  # fmt: skip
        proc = run_group([*launch, *command, "--out", str(out)], timeout=300, env=env)
        assert proc.returncode != 0, proc.stderr[-2000:]
        lines = [text for text in proc.stderr.splitlines() if line in text]
        # every rank raises it (the gather is the same on each: the test below); torchrun may kill the second to
        # exit before it prints (its monitor stops the group at the first failure)
        assert lines and all("rank 1 (" in text for text in lines), (copy, proc.stderr[-3000:])
        assert "/engine/" not in proc.stderr and not out.exists()  # no worker's traceback (torchrun prints its own)


def test_a_rank_without_the_data_or_with_other_data_says_so_on_every_rank(monkeypatch):
    """distributed.check_same_data on rank 0's side of a two-rank gather: rank 1's loading error is raised on every
    rank (before, the others waited in their first collective for the group's timeout, on another node); other
    images or another source are named; the same data passes; one process raises its own error as it is."""
    from engine import distributed
    from engine.data import DataError
    from engine.errors import UserError

    info = distributed.DistInfo(rank=0, world_size=2)
    mine = {"training images": "aaaa", "test images": "bbbb"}

    def rank1_sends(theirs, source="cifar10 in /d"):
        monkeypatch.setattr(distributed, "gather_objects", lambda obj, info: [obj, ("node-b", source, theirs)])

    rank1_sends(dict(mine))
    distributed.check_same_data(mine, "cifar10 in /d", info)  # the same: nothing said
    rank1_sends("cifar10 not found: expected the official layout /d/cifar-10-batches-py/")
    with pytest.raises(UserError, match=r"^rank 1 \(node-b\): cifar10 not found"):
        distributed.check_same_data(mine, "cifar10 in /d", info)
    rank1_sends(mine | {"test images": "cccc"}, "cifar10 in /e")
    with pytest.raises(UserError, match=r"rank 1 \(node-b\) reads other test images than rank 0 \(.*\): cifar10 in /e "
                                        r"against cifar10 in /d; fingerprint cccc against bbbb"):  # fmt: skip
        distributed.check_same_data(mine, "cifar10 in /d", info)
    with pytest.raises(DataError, match="gone"):
        distributed.check_same_data(DataError("gone"), "cifar10 in /d", distributed.DistInfo())


def test_the_engine_s_warnings_say_which_rank_met_them(caplog):
    """Under torchrun each rank prints the engine's own warnings (a failed attack capture): each copy names its rank,
    and joining again (a second group in one process) does not tag them twice."""
    import logging

    from engine import distributed

    log = logging.getLogger("engine")
    try:
        distributed.tag_engine_warnings(3)
        distributed.tag_engine_warnings(3)
        log.warning("CUDA graph capture of an attack failed (%s); attacks run eagerly from now on", "x")
        distributed.shutdown(distributed.DistInfo())  # the group left: untagged (later tests' messages are exact)
        log.warning("after")
    finally:
        for f in [f for f in log.filters if isinstance(f, distributed._RankTag)]:
            log.removeFilter(f)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["[rank 3] CUDA graph capture of an attack failed (x); attacks run eagerly from now on", "after"]


def test_a_torchrun_rank_leaves_after_its_exit_handlers_without_the_interpreter_s_finalization(monkeypatch, capsys):
    """A two-rank sync-BN training run under the whole suite in one process aborted at exit (rank 1: "terminate
    called without an active exception", 2026-12-07): a process-group thread still dropping tensors while the
    interpreter finalized. A rank run as a program now runs the exit handlers and leaves with os._exit, after an
    uncaught error too (code 1; the torchrun tests above run that path for real: their output and files complete,
    their exit codes kept)."""
    from engine import cli, distributed

    class Left(BaseException):
        pass

    ran, left = [], []

    def leave(code):
        left.append(code)
        raise Left

    monkeypatch.setattr(cli.atexit, "_run_exitfuncs", lambda: ran.append(len(left)))
    monkeypatch.setattr(cli.os, "_exit", leave)
    monkeypatch.setattr(sys, "argv", ["arat", "recipes"])
    monkeypatch.setattr(distributed, "_joined", True)
    with pytest.raises(Left):
        cli.main()
    assert ran == [0] and left == [0]  # the handlers first, then the recipes' exit code
    assert "arat-resnet18-cifar10" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["arat", "recipes", "--set", "x=1"])  # a refusal: its code 2
    with pytest.raises(Left):
        cli.main()
    assert left == [0, 2]

    def boom(args):
        raise ValueError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "recipes", boom)
    monkeypatch.setattr(sys, "argv", ["arat", "recipes"])
    with pytest.raises(Left):  # an uncaught error: its traceback, then the same way out with 1
        cli.main()
    assert left == [0, 2, 1] and "ValueError: a bug" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a bug"):  # a caller's main([...]) gets the error itself
        cli.main(["recipes"])
    monkeypatch.undo()
    monkeypatch.setattr(cli.os, "_exit", leave)
    monkeypatch.setattr(distributed, "_joined", True)
    assert cli.main(["recipes"]) == 0  # a caller's main([...]) returns, in a rank too
    monkeypatch.setattr(distributed, "_joined", False)
    monkeypatch.setattr(sys, "argv", ["arat", "recipes"])
    assert cli.main() == 0 and left == [0, 2, 1]  # a process that joined no group exits as before


def test_a_restarted_attempt_reads_none_of_the_killed_attempt_s_store_entries(monkeypatch):
    """helper-152: `torchrun --max-restarts` starts the workers again on the rendezvous store the killed ones used;
    their entries of the same round numbers (a failure mark, a gather's payload) were the new attempt's: a rank said
    to have failed, or another attempt's states gathered into a checkpoint. The keys carry the group's token, rank
    0's draw broadcast when the group forms (helper-155: not TORCHELASTIC_RESTART_COUNT, which each node's agent
    counts for itself); the 2-process tests form their groups through it."""
    import torch.distributed as dist

    from engine import distributed
    from engine.errors import UserError

    store, round_n = dist.HashStore(), 3
    monkeypatch.setattr(distributed, "_group_token", "killed")
    keys = [distributed._gather_key(round_n, r) for r in range(2)]
    store.set(distributed._failed_key(round_n), "1")  # the killed attempt's rank 1 marked this round
    store.set(distributed._gather_key(round_n, 0), b"killed attempt")
    with pytest.raises(UserError, match="rank 1 stopped on an error"):  # (the same group: as it should)
        distributed.wait_for_entries(store, keys, round_n, timedelta(seconds=0.3))
    monkeypatch.setattr(distributed, "_group_token", "restarted")
    restarted = [distributed._gather_key(round_n, r) for r in range(2)]
    assert not set(restarted) & set(keys) and not store.check(restarted + [distributed._failed_key(round_n)])
    with pytest.raises(RuntimeError) as waited:  # the store's own timeout: no entry, no failure mark of this group
        distributed.wait_for_entries(store, restarted, round_n, timedelta(seconds=0.3))
    assert not isinstance(waited.value, UserError)
