"""Chunked, seeded, resumable, sharded evaluation (issue 10): per-image flags that do not depend on how the
evaluation ran, AutoAttack's protocols and stage figures, records, and the exported model for other tools."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from precision import torch_threads

from engine import autoattack
from engine.config import EvalConfig, ModelConfig
from engine.data.synthetic import synthetic_split
from engine.evaluate import (
    balance_note,
    chunk_for_memory,
    chunk_seed,
    evaluate,
    format_results,
    rank_balance,
    resolve_chunk_size,
    unpack,
)
from engine.models import build_model

REPO = Path(__file__).resolve().parents[1]


class SparseLinear(torch.nn.Module):
    """A linear classifier reading 24 pixels: its margins are comparable to what an 8/255 change of those pixels
    moves, so AutoAttack breaks some images and not others (a mixed robust set, found within seconds)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.zeros(10, 3 * 32 * 32))
        with torch.no_grad():
            self.weight[:, :24] = torch.randn(10, 24, generator=generator)

    def forward(self, x, bn="adv"):
        return 4 * (x.flatten(1) - 0.5) @ self.weight.T


def labelled_split(n=32):
    """Synthetic images labelled by the model itself (clean accuracy 100%)."""
    split = synthetic_split(n, 10, seed=0)
    with torch.no_grad():
        x = torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255
        split.labels = SparseLinear()(x).argmax(1).numpy()
    return split


CFG = EvalConfig(attacks=("clean", "pgd20", "aa"), num_examples=32, batch_size=16, chunk_size=16)


def flags(results):
    return {name: unpack(r["flags"], r["num_examples"]).tolist() for name, r in results.items()}


def one_thread():
    """Evaluations compared image by image run with one thread, as the processes these tests start do: a CPU
    matmul's summation order (so an image whose margin is within rounding of zero) may change with the thread count,
    which is not what they test."""
    return torch_threads(1)


@pytest.fixture(scope="module")
def reference():
    with one_thread():
        return evaluate(SparseLinear(), labelled_split(), CFG, torch.device("cpu"), seed=3)


def test_flags_are_mixed_and_stages_add_up(reference):
    aa = reference["aa"]
    robust = sum(flags(reference)["aa"])
    assert 0 < robust < 32, "the test model should be partly robust"
    assert aa["stages"]["clean"] == 1.0 and aa["stages"]["square"] == aa["accuracy"] == robust / 32
    values = [aa["stages"][s] for s in ("clean", *autoattack.STAGES)]
    assert values == sorted(values, reverse=True)  # each stage can only remove robust images
    assert aa["version"] == "standard" and aa["config"]["protocol"]["iterations"] == 100
    assert aa["chunks"] == 2 and aa["config"]["chunk_size"] == 16 and aa["config"]["seed"] == 3
    assert aa["config"]["chunk_size_rule"] == "set"
    assert set(aa["stage_seconds"]) == set(autoattack.STAGES) and all(v >= 0 for v in aa["stage_seconds"].values())
    assert sum(aa["stage_seconds"].values()) <= aa["chunk_seconds"] + 0.2  # AutoAttack's share of the chunks' time


def test_stage_seconds_add_up_over_chunks_and_are_none_beside_an_older_engine_s_chunk():
    from engine.evaluate import _stage_seconds

    protocol, chunk = autoattack.PROTOCOLS["standard"], {"stage_seconds": {"apgd-ce": 1.0, "apgd-t": 2.0,
                                                                           "fab-t": 0.5, "square": 3.25}}  # fmt: skip
    assert _stage_seconds([chunk, chunk], protocol) == {"apgd-ce": 2.0, "apgd-t": 4.0, "fab-t": 1.0, "square": 6.5}
    assert _stage_seconds([chunk, {"counts": {}}], protocol) is None  # a reused chunk saved without them


def test_the_default_chunk_is_sized_for_the_device():
    """eval.chunk_size=0: 500 on a CPU; on CUDA the largest chunk whose attack (3x an input-gradient pass's peak per
    image) fits half the device's total memory, so a given network and GPU model always get the same chunks."""
    mib, gib = 2**20, 2**30
    assert chunk_for_memory(8 * mib, 141 * gib) == 1000  # a ResNet-18-sized pass on an H200
    assert chunk_for_memory(60 * mib, 141 * gib) == 250  # a WRN-34-10-sized one
    assert chunk_for_memory(8 * mib, 16 * gib) == 250
    assert chunk_for_memory(16 * gib, 16 * gib) == 50  # never less than the smallest choice
    cpu = torch.device("cpu")
    assert resolve_chunk_size(EvalConfig(), SparseLinear(), (3, 32, 32), cpu) == (500, "auto: CPU")
    assert resolve_chunk_size(EvalConfig(chunk_size=64), SparseLinear(), (3, 32, 32), cpu) == (64, "set")


def test_a_cpu_chunk_fits_the_machine_s_memory(monkeypatch):
    """helper-153: a CPU evaluation took 500 images per chunk for any network: WRN-34-10's input-gradient pass keeps
    ~5x ResNet-18's per image, and 500 of them ran a 16-32 GB machine out of memory (the kernel's OOM killer: no
    line). The CPU chunk follows chunk_for_memory's rule on the machine's memory, at most 500."""
    import engine.evaluate
    from engine.evaluate import cpu_bytes_per_image

    cpu, model = torch.device("cpu"), build_model(ModelConfig(width=8), 10)
    per_image = cpu_bytes_per_image(model, (3, 32, 32))
    wider = cpu_bytes_per_image(build_model(ModelConfig(width=16), 10), (3, 32, 32))
    assert per_image > 0 and wider == pytest.approx(2 * per_image, rel=0.05)  # activations scale with the width
    monkeypatch.setattr(engine.evaluate, "physical_memory", lambda: int(2 * 3 * per_image * 120))  # room for 120
    size, why = resolve_chunk_size(EvalConfig(), model, (3, 32, 32), cpu)
    assert size == 100 and why.startswith("auto: CPU, ~") and "memory" in why
    monkeypatch.setattr(engine.evaluate, "physical_memory", lambda: 2**40)
    assert resolve_chunk_size(EvalConfig(), model, (3, 32, 32), cpu) == (500, "auto: CPU")
    monkeypatch.setattr(engine.evaluate, "physical_memory", lambda: None)  # unknown: as before
    assert resolve_chunk_size(EvalConfig(), model, (3, 32, 32), cpu) == (500, "auto: CPU")


def test_too_few_chunks_for_the_ranks_are_named_with_a_chunk_size_that_fits():
    """10k images in chunks of 1000 (the H200 default for ResNet-18) over 8 ranks: 2 chunks for two ranks, 1 for the
    six others, who wait: 62% at best; chunks of 250 (40) keep all 8 busy."""
    assert rank_balance(10000, 1000, 8) == 10 / 16 and rank_balance(10000, 250, 8) == 1.0
    assert rank_balance(10000, 1000, 1) == 1.0 and rank_balance(100, 25, 2) == 1.0
    # the last chunk holds the rest (helper-156: counted full, 64 images in 50 + 14 read as 100% busy)
    assert rank_balance(90, 50, 2) == 0.9 and rank_balance(64, 50, 2) == 0.64
    assert balance_note(64, 500, 2).startswith("eval: 1 chunk of 64 images over 2 ranks keep them busy 50%")
    assert balance_note(64, 50, 2).startswith("eval: 2 chunks of 50 images (the last 14) over 2 ranks")
    note = balance_note(10000, 1000, 8)
    assert note.startswith("eval: 10 chunks of 1000 images over 8 ranks keep them busy 62% of the time at best")
    assert "chunks of 250 (--chunk-size / eval.chunk_size) would keep them 100% busy" in note
    assert "chunks of 500" in balance_note(10000, 1000, 4)  # 83% -> 100%: the largest size that fits is named
    assert balance_note(10000, 1000, 1) is None and balance_note(10000, 500, 4) is None
    assert balance_note(100, 50, 3).endswith("67% of the time at best")  # no listed size below 50


def test_chunk_seeds_differ_per_chunk_and_attack():
    seeds = {chunk_seed(0, attack, k) for attack in ("pgd20", "aa") for k in range(100)}
    assert len(seeds) == 200 and all(0 <= s < 2**31 for s in seeds)
    assert chunk_seed(0, "aa", 5) != chunk_seed(1, "aa", 5)
    # pinned: another derivation would redo every saved chunk and change a rerun's flags (sha256 of "seed:attack:k")
    assert (chunk_seed(0, "aa", 5), chunk_seed(0, "pgd20", 0), chunk_seed(1, "aa", 5)) == (
        1672099489,
        310343898,
        591731609,
    )


def test_pgd_20_draws_each_chunk_s_random_start_from_its_seed(monkeypatch):
    """helper-85: the tests record the seed each chunk's PGD-20 is handed, and the linear model's flags ignore the
    random start, so PGD-20 not seeding from it would pass them: the generator's state as the attack starts is the
    seed's."""
    import engine.evaluate as ev

    states = []

    def pgd(attacker, x, y, cfg, **kwargs):
        states.append(torch.get_rng_state())
        return x

    monkeypatch.setattr(ev, "pgd", pgd)
    net = SparseLinear()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for seed in (chunk_seed(3, "pgd20", 0), chunk_seed(3, "pgd20", 1)):
        torch.manual_seed(12345)  # whatever ran before
        ev._pgd_flags(net, net, x, y, 4, seed)
        expected = torch.Generator().manual_seed(seed).get_state()
        assert torch.equal(states[-1], expected)


def record_seeds(set_attr=setattr) -> dict[str, list[int]]:
    """The seeds the attacks are handed, per attack, in call order (the linear test model's flags do not depend on
    its random starts, so its flags alone cannot show that each chunk is seeded by its index). `set_attr`:
    monkeypatch.setattr in this process (undone after the test), setattr in a spawned one."""
    import engine.autoattack
    import engine.evaluate

    seeds: dict[str, list[int]] = {"pgd20": [], "aa": []}
    pgd_flags, attack_chunk = engine.evaluate._pgd_flags, engine.autoattack.attack_chunk

    def seeded_pgd(classifier, attacker, x, y, batch_size, seed):
        seeds["pgd20"].append(seed)
        return pgd_flags(classifier, attacker, x, y, batch_size, seed)

    def seeded_aa(model, x, y, protocol, seed, *args, **kwargs):
        seeds["aa"].append(seed)
        return attack_chunk(model, x, y, protocol, seed, *args, **kwargs)

    set_attr(engine.evaluate, "_pgd_flags", seeded_pgd)
    set_attr(engine.autoattack, "attack_chunk", seeded_aa)
    return seeds


def _rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    import engine.evaluate
    from engine.distributed import DistInfo

    torch.set_num_threads(1)
    if rank == 1:  # a rank whose own measure gives another chunk size (on CUDA: its free memory) must take rank 0's
        engine.evaluate.resolve_chunk_size = lambda *args: (8, "rank 1's own measure")
    # a rank stuck in a collective fails after 5 min (gloo's default: 30) instead of outliving pytest's own limit
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(minutes=5))
    mine = Path(out, f"chunks-{rank}")  # each rank's own folder: what it attacked itself
    seeds = record_seeds()
    results = evaluate(SparseLinear(), labelled_split(), CFG, torch.device("cpu"), 3, None, DistInfo(rank, world), mine)
    chunks = {name: (r["chunks"], r["config"]["chunk_size"]) for name, r in results.items()}
    done = sorted(p.parent.name.split("-")[0] + "/" + p.stem for p in mine.glob("chunks/*/0*.json"))
    saved = {p.parent.name.split("-")[0] + "/" + p.stem: json.loads(p.read_text())["seed"]
             for p in mine.glob("chunks/*/0*.json")}  # fmt: skip
    Path(out, f"{rank}.json").write_text(json.dumps({"flags": flags(results), "chunks": chunks, "attacked": done,
                                                     "seeds": seeds, "saved_seeds": saved}))  # fmt: skip
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_flags_of_one(tmp_path, reference):
    """The chunks go round-robin to two gloo processes; both end with every flag, bit-identical to one process, in
    rank 0's chunks although rank 1 alone would have chosen others."""
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2)
    expected = {"flags": flags(reference), "chunks": {name: [2, 16] for name in CFG.attacks}}
    for rank in (0, 1):  # round-robin: rank r attacked chunk r of each attack, and no other, seeded by its index
        attacked = [f"{name}/0000{rank}" for name in sorted(CFG.attacks)]
        seeds = {"pgd20": [chunk_seed(3, "pgd20", rank)], "aa": [chunk_seed(3, "aa", rank)]}
        saved = {f"{name}/0000{rank}": chunk_seed(3, name, rank) for name in CFG.attacks}
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == expected | {"attacked": attacked, "seeds": seeds, "saved_seeds": saved}


def _slow_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    import engine.evaluate
    from engine.distributed import DistInfo

    torch.set_num_threads(1)
    attack_chunk = engine.evaluate._attack_chunk

    def slow(*args, **kwargs):  # rank 0's chunk takes longer than the group's timeout
        time.sleep(6)
        return attack_chunk(*args, **kwargs)

    if rank == 0:
        engine.evaluate._attack_chunk = slow
    # started with time to spare (a loaded machine's imports), then the group's timeout cut below the chunk's 6 s
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(minutes=2))
    dist.distributed_c10d._get_default_store().set_timeout(timedelta(seconds=3))
    cfg = EvalConfig(attacks=("clean",), num_examples=32, batch_size=16, chunk_size=16)
    results = evaluate(SparseLinear(), labelled_split(), cfg, torch.device("cpu"), 3, None, DistInfo(rank, world))
    Path(out, f"{rank}.json").write_text(json.dumps(flags(results)))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_wait_for_a_chunk_longer_than_the_group_s_timeout(tmp_path):
    """A rank done with its chunks waited for the others' within the process group's timeout (180 min by default):
    a CPU's AutoAttack chunk at full width takes hours, and the waiting rank failed (DistStoreError), the working
    one was stopped and its chunk lost, every rerun the same. Now they wait for each other's chunks."""
    mp.spawn(_slow_rank, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert got[0] == got[1] and len(got[0]["clean"]) == 32


KILLABLE = """
import sys, time, torch
sys.path.insert(0, {tests!r}); sys.path.insert(0, {repo!r})
from test_evaluation_chunks import CFG, SparseLinear, labelled_split
from engine.evaluate import ChunkStore, evaluate
save = ChunkStore.save
def save_then_hang(store, index, record):  # the kill lands while the second AutoAttack chunk is under way
    save(store, index, record)
    if store.path.name.startswith("aa-"):
        time.sleep(600)
ChunkStore.save = save_then_hang
evaluate(SparseLinear(), labelled_split(), CFG, torch.device("cpu"), 3, record_dir={record!r})
"""


@pytest.mark.slow
def test_a_killed_evaluation_resumes_from_its_finished_chunks(tmp_path, reference, monkeypatch):
    record = tmp_path / "eval"
    script = KILLABLE.format(tests=str(REPO / "tests"), repo=str(REPO), record=str(record))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(record.glob("chunks/aa-*/00000.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the evaluation ended before it could be killed"
    assert [p.name for p in record.glob("chunks/aa-*/0*.json")] == ["00000.json"]  # one of two AutoAttack chunks
    seeds = record_seeds(monkeypatch.setattr)
    with one_thread():
        resumed = evaluate(SparseLinear(), labelled_split(), CFG, torch.device("cpu"), 3, record_dir=record)
    assert flags(resumed) == flags(reference)
    assert seeds == {"pgd20": [], "aa": [chunk_seed(3, "aa", 1)]}  # the redone chunk keeps its index's seed
    assert resumed["clean"]["reused_chunks"] == 2 and resumed["aa"]["reused_chunks"] == 1
    assert resumed["pgd20"]["reused_chunks"] == 2
    assert resumed["aa"]["stages"] == reference["aa"]["stages"]


def test_saved_chunks_of_another_model_are_not_reused(tmp_path):
    split, record = labelled_split(), tmp_path / "eval"
    cfg = EvalConfig(attacks=("clean",), num_examples=32, batch_size=16, chunk_size=16)
    first = evaluate(SparseLinear(), split, cfg, torch.device("cpu"), 3, record_dir=record)
    assert first["clean"]["reused_chunks"] == 0
    assert (
        evaluate(SparseLinear(), split, cfg, torch.device("cpu"), 3, record_dir=record)["clean"]["reused_chunks"] == 2
    )
    other = SparseLinear()
    with torch.no_grad():
        other.weight.mul_(-1)
    assert evaluate(other, split, cfg, torch.device("cpu"), 3, record_dir=record)["clean"]["reused_chunks"] == 0


def test_chunks_an_older_engine_saved_are_redone(tmp_path, monkeypatch):
    """The key held what the evaluation was given, not what the engine computes: chunks saved under bf16 autocast
    before the evaluation forced fp32 were reused as fp32 ones (helper-113). The engine's evaluation version is in
    the key: raised, every chunk is redone."""
    import engine.evaluate

    split, record = labelled_split(), tmp_path / "eval"
    cfg = EvalConfig(attacks=("clean",), num_examples=32, batch_size=16, chunk_size=16)
    first = evaluate(SparseLinear(), split, cfg, torch.device("cpu"), 3, record_dir=record)
    assert first["clean"]["config"]["engine_evaluation"] == engine.evaluate.EVAL_VERSION
    monkeypatch.setattr(engine.evaluate, "EVAL_VERSION", engine.evaluate.EVAL_VERSION + 1)
    assert (
        evaluate(SparseLinear(), split, cfg, torch.device("cpu"), 3, record_dir=record)["clean"]["reused_chunks"] == 0
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r | {"flags": ""},  # short flags: the accuracy read silently low (0 of 16)
        lambda r: r | {"flags": "zz"},  # not hex: a traceback
        lambda r: [r],  # not a record
        lambda r: {k: v for k, v in r.items() if k != "counts"},
        lambda r: r | {"start": 16, "stop": 32},  # another chunk's place
        lambda r: r | {"seed": r["seed"] + 1},
    ],
)
def test_a_damaged_or_edited_chunk_record_is_attacked_again(tmp_path, damage):
    split, record = labelled_split(), tmp_path / "eval"
    cfg = EvalConfig(attacks=("clean",), num_examples=32, batch_size=16, chunk_size=16)
    first = evaluate(SparseLinear(), split, cfg, torch.device("cpu"), 3, record_dir=record)
    (chunk,) = (record / "chunks").glob("clean-*/00000.json")
    chunk.write_text(json.dumps(damage(json.loads(chunk.read_text()))))
    again = evaluate(SparseLinear(), split, cfg, torch.device("cpu"), 3, record_dir=record)["clean"]
    assert again["reused_chunks"] == 1 and again["accuracy"] == first["clean"]["accuracy"] == 1.0


def test_saved_chunks_of_other_hardware_are_not_reused(tmp_path, monkeypatch):
    """A rerun on another GPU model (or cuDNN, CUDA, CPU instruction set, torch) attacks again: its kernels differ
    in their last bits, and one evaluation's flags would mix the two (the key held none of these)."""
    import engine.evaluate as ev

    split, record = labelled_split(), tmp_path / "eval"
    cfg = EvalConfig(attacks=("clean",), num_examples=32, batch_size=16, chunk_size=16)
    cpu = torch.device("cpu")
    assert "torch " + torch.__version__ in ev.hardware_id(cpu) and ev.cpu_key() in ev.hardware_id(cpu)
    for isa in ("avx2-1234abcd", "avx512-1234abcd"):  # the same CPU model, another instruction set: attacked again
        monkeypatch.setattr(ev, "cpu_key", lambda isa=isa: isa)
        assert evaluate(SparseLinear(), split, cfg, cpu, 3, record_dir=record)["clean"]["reused_chunks"] == 0
    assert evaluate(SparseLinear(), split, cfg, cpu, 3, record_dir=record)["clean"]["reused_chunks"] == 2
    monkeypatch.setattr(ev, "hardware_id", lambda device: "NVIDIA H100 80GB HBM3; cuDNN 91900; CUDA 13.0")
    assert (
        evaluate(SparseLinear(), split, cfg, torch.device("cpu"), 3, record_dir=record)["clean"]["reused_chunks"] == 0
    )
    assert (
        evaluate(SparseLinear(), split, cfg, torch.device("cpu"), 3, record_dir=record)["clean"]["reused_chunks"] == 2
    )
    monkeypatch.setattr(ev, "hardware_id", lambda device: "NVIDIA H200; cuDNN 91900; CUDA 13.0")
    assert (
        evaluate(SparseLinear(), split, cfg, torch.device("cpu"), 3, record_dir=record)["clean"]["reused_chunks"] == 0
    )


def test_each_autoattack_stage_is_reported_as_it_ends():
    """The progress bar's line within a chunk: the clean accuracy, then each stage's robust accuracy, in
    AutoAttack's order, each reported between the model calls of the stages around it (as it ends, not after the
    chunk), and each the count the chunk's result records."""
    from engine.evaluate import test_tensors

    model, calls, seen = SparseLinear(), [], []
    model.register_forward_hook(lambda *_: calls.append(None))
    x, y = test_tensors(labelled_split(), 32, torch.device("cpu"))
    y[:4] = (y[:4] + 1) % 10  # 4 images misclassified: clean accuracy 28/32, told apart from 100%

    def on_stage(stage, accuracy):
        seen.append((stage, accuracy, len(calls)))

    seconds = {}
    with one_thread():
        begun = time.perf_counter()
        flags, counts = autoattack.attack_chunk(model, x, y, autoattack.PROTOCOLS["legacy-10"], 0, 16, on_stage,
                                                seconds)  # fmt: skip
        took = time.perf_counter() - begun
    # each stage's seconds as AutoAttack logs them (its totals to 0.1 s): every stage, and they add up to the chunk
    assert list(seconds) == list(autoattack.STAGES) and all(s >= 0 for s in seconds.values()), seconds
    assert abs(sum(seconds.values()) - took) <= 0.05 + 0.1 * len(seconds), (seconds, took)
    stages = [stage for stage, _, _ in seen]
    assert stages == ["clean", *autoattack.STAGES], stages  # the model stays partly robust: every stage runs
    assert seen[0][1] == 28 / 32
    accuracies, model_calls = [a for _, a, _ in seen], [c for _, _, c in seen]
    assert accuracies == sorted(accuracies, reverse=True) and 0 < accuracies[-1] < 28 / 32
    assert all(before < after for before, after in zip(model_calls, model_calls[1:], strict=False)), model_calls
    assert model_calls[1] - model_calls[0] >= 10, model_calls  # APGD-CE's 10 iterations run after the clean report
    assert all(round(accuracy * 32) == counts[stage] for stage, accuracy, _ in seen)
    assert round(accuracies[-1] * 32) == int(flags.sum())


def test_the_bar_says_which_stage_ran_and_which_runs_now():
    from engine.evaluate import _postfix

    class Bar:
        text = None

        def set_postfix_str(self, text):
            self.text = text

    bar = Bar()
    show = _postfix(bar, autoattack.STAGES)
    expected = [("clean", 0.75, "clean 75.0%, now apgd-ce"), ("apgd-t", 0.316, "after apgd-t 31.6%, now fab-t"),
                ("square", 0.3, "after square 30.0%"), ("apgd-dlr", 0.3, "after apgd-dlr 30.0%")]  # fmt: skip
    for stage, accuracy, text in expected:  # a stage the protocol does not name is shown, never raised on
        show(stage, accuracy)
        assert bar.text == text


def test_legacy_10_is_torchattacks_autoattack_and_says_so():
    """torchattacks' AutoAttack "standard" (the paper's evaluation code): APGD-CE and APGD-T at their default 10
    iterations, FAB-T at its default 100 (torchattacks' FAB has steps=100; its AutoAttack passes none), Square at
    5,000 queries with the schedule rescaled to them (torchattacks' resc_schedule=True); pyautoattack's standard
    keeps 100 everywhere and Square's 10,000-query schedule."""
    from pyautoattack.autopgd_base import APGDAttack

    model = SparseLinear()
    legacy = autoattack.adversary(model, autoattack.PROTOCOLS["legacy-10"], 0, torch.device("cpu"))
    standard = autoattack.adversary(model, autoattack.PROTOCOLS["standard"], 0, torch.device("cpu"))
    assert legacy.attacks_to_run == standard.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    for aa, iterations, rescaled in ((legacy, 10, True), (standard, 100, False)):
        assert aa.apgd.n_iter == aa.apgd_targeted.n_iter == iterations and aa.fab.n_iter == 100
        assert aa.square.rescale_schedule is rescaled
        # APGD's step-size schedule is the one an attack built for these iterations has (pyautoattack derives it
        # at construction; at 10 iterations the first checkpoint is 2, not the 100-iteration 22)
        built = APGDAttack(model, n_iter=iterations, eps=8 / 255, device="cpu")
        schedule = ("n_iter", "n_iter_orig", "n_iter_2", "n_iter_min", "size_decr")
        for apgd in (aa.apgd, aa.apgd_targeted):
            assert [getattr(apgd, k) for k in schedule] == [getattr(built, k) for k in schedule]
        assert aa.apgd.n_restarts == aa.apgd_targeted.n_restarts == aa.fab.n_restarts == 1
        assert aa.apgd_targeted.n_target_classes == aa.fab.n_target_classes == 9
        assert aa.square.n_queries == 5000 and aa.seed == 0
    assert (legacy.apgd.n_iter_2, legacy.apgd.n_iter_min, legacy.apgd.size_decr) == (2, 1, 1)
    cfg = EvalConfig(attacks=("aa",), num_examples=16, batch_size=16, chunk_size=16, aa_version="legacy-10")
    results = evaluate(model, labelled_split(16), cfg, torch.device("cpu"), 3)
    assert results["aa"]["version"] == "legacy-10" and "AutoAttack (legacy-10)" in format_results(results)
    protocol = results["aa"]["config"]["protocol"]
    assert protocol["iterations"] == 10 and protocol["fab_iterations"] == 100 and protocol["square_rescaled_schedule"]
    assert results["aa"]["config"]["protocol"]["apgd_checkpoints"] == [2, 1, 1]  # recorded (and in the chunks' key)


def test_autoattack_leaves_the_weights_without_gradients():
    """FAB-T's backward is a plain .backward(): with the weights frozen it computes the input gradient only and
    leaves no .grad on them (and they require gradients again afterwards)."""
    model, split = SparseLinear(), labelled_split(16)
    x = torch.from_numpy(split.images).permute(0, 3, 1, 2).float().contiguous() / 255
    y = torch.from_numpy(split.labels)
    with one_thread():
        flags, counts = autoattack.attack_chunk(model, x, y, autoattack.PROTOCOLS["legacy-10"], 3, 16)
    assert counts["apgd-t"] > 0, "FAB-T should have images to attack"
    assert model.weight.grad is None and model.weight.requires_grad


def test_export_writes_model_info_and_hub_loads_the_network(tmp_path, capsys):
    from engine.cli import main
    from engine.hub import load_model
    from engine.models import read_weights

    run = tmp_path / "run"
    assert main(["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1",
                 "--set", "eval.attacks=clean"]) == 0  # fmt: skip
    out = tmp_path / "plain.pt"
    assert main(["export", str(run), str(out)]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    record = json.loads((run / "results.json").read_text())
    results = record["results"]
    env = record["environment"]  # issue 10 item 5: the end-of-training evaluation's versions and hardware
    assert env["torch"] == torch.__version__ and env["world_size"] == 1
    assert {"pyautoattack", "cpu", "device"} <= set(env)
    assert info["architecture"] == "ResNet-18 (width 8)" and info["eps"] == "8/255"
    assert info["clean_acc"] == f"{100 * results['clean']['accuracy']:.2f}" and info["autoattack_acc"] == ""
    assert info["additional_data"] is False and info["dataset"] == "synthetic"
    model = load_model(out)
    assert not model.training
    x = torch.rand(4, 3, 32, 32)
    state, _ = read_weights(run / "checkpoints" / "final.pt")
    from engine.config import ModelConfig
    from engine.models import build_model

    split_bn = build_model(ModelConfig(width=8), 10)
    split_bn.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x), split_bn.eval()(x, bn="adv").float())
        torch.testing.assert_close(load_model(run)(x), model(x))  # a run directory loads the same network
        out.with_suffix(".json").write_text("{")  # a foreign or broken JSON of that common name: the weights decide
        torch.testing.assert_close(load_model(out)(x), model(x))
    flags_file = json.loads((run / "eval" / "flags.json").read_text())
    assert flags_file["clean"]["num_examples"] == results["clean"]["num_examples"]


def test_a_trained_runs_autoattack_record_is_read_back_from_disk(tmp_path, capsys):
    """Issue 10 item 5 end to end: `arat train` ending in standard AutoAttack (two chunks), then what a user reads
    back from the files themselves: results.json's AutoAttack entry (accuracy, stages as AutoAttack logs them,
    protocol, chunking, seeds, wall time, images/s, versions and hardware), flags.json's per-image bits agreeing with
    it, and `arat export`'s model_info publishing that figure."""
    from engine.cli import main

    run = tmp_path / "run"
    assert main(["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=2",
                 "--set", "eval.attacks=clean,aa", "--set", "eval.num_examples=16",
                 "--set", "eval.chunk_size=8"]) == 0  # fmt: skip
    record = json.loads((run / "results.json").read_text())
    clean, aa = record["results"]["clean"], record["results"]["aa"]
    assert aa["version"] == "standard" and aa["num_examples"] == clean["num_examples"] == 16
    assert (aa["chunks"], aa["reused_chunks"]) == (2, 0)
    stages = aa["stages"]
    assert list(stages) == ["clean", *autoattack.STAGES]
    values = list(stages.values())
    assert values[0] == clean["accuracy"] and values[-1] == aa["accuracy"]  # clean, then after each attack
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    config = aa["config"]
    seed = json.loads((run / "config.json").read_text())["seed"]
    assert config["chunk_size"] == 8 and config["seed"] == seed and "per chunk" in config["seeds"]
    (store,) = (run / "eval" / "chunks").glob("aa-*")  # each chunk's record names the seed it drew from
    assert [json.loads((store / f"{k:05d}.json").read_text())["seed"] for k in (0, 1)] == [chunk_seed(seed, "aa", k)
                                                                                       for k in (0, 1)]  # fmt: skip
    protocol = config["protocol"]
    assert (protocol["version"], protocol["iterations"], protocol["target_classes"]) == ("standard", 100, 9)
    assert protocol["square_queries"] == 5000 and protocol["eps"] == "8/255"
    # both rounded to 0.01: seconds off by up to 0.005 moves 16 / seconds by up to 16 * 0.005 / seconds^2
    seconds = aa["seconds"]
    assert seconds > 0 and aa["images_per_s"] == pytest.approx(16 / seconds, abs=0.0051 + 0.08 / (seconds - 0.005) ** 2)
    assert {"torch", "pyautoattack", "cpu", "device"} <= set(record["environment"])
    flags = json.loads((run / "eval" / "flags.json").read_text())
    robust, correct = (unpack(flags[k]["bits"], 16) for k in ("aa", "clean"))
    assert flags["aa"]["version"] == "standard" and flags["aa"]["num_examples"] == 16
    assert int(robust.sum()) == round(16 * aa["accuracy"]) and not (robust & ~correct).any()  # robust => correct
    # not vacuous (two epochs: here 4 of 16 right, 3 robust): some image is right, and AutoAttack broke one or
    # left one standing
    assert values[0] > 0 and (values[0] > values[-1] or robust.any()), stages
    assert main(["export", str(run), str(tmp_path / "model.pt")]) == 0
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["autoattack_acc"] == f"{100 * aa['accuracy']:.2f}" and info["clean_acc"] == f"{100 * values[0]:.2f}"
    assert "standard on the first 16 test images" in info["footnote"]
    capsys.readouterr()


def test_each_autoattack_protocol_keeps_its_figure_and_export_publishes_only_standard(tmp_path):
    """`arat eval RUN --aa-version legacy-10` after a standard evaluation replaced the standard figure in eval.json,
    and `arat export` then published legacy-10's higher reading as RobustBench's autoattack_acc. Each protocol now
    has its own entry, whichever ran last, and model_info's autoattack_acc is standard's or empty."""
    from engine.cli import main, merged_evaluation
    from engine.evaluate import summary
    from engine.rundir import atomic_json

    run = tmp_path / "run"
    assert main(["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1",
                 "--set", "eval.attacks=clean"]) == 0  # fmt: skip
    standard = {"accuracy": 0.40, "num_examples": 500, "version": "standard", "flags": "00"}
    legacy = {"accuracy": 0.52, "num_examples": 500, "version": "legacy-10", "flags": "00"}

    def evaluated(aa: dict) -> None:  # what `arat eval RUN --attacks aa` writes into RUN/eval.json
        atomic_json(run / "eval.json", merged_evaluation(run / "eval.json", "synthetic", summary({"aa": aa})))

    def exported(name: str) -> dict:
        assert main(["export", str(run), str(tmp_path / f"{name}.pt")]) == 0
        return json.loads((tmp_path / f"{name}.json").read_text())

    evaluated(legacy)
    assert exported("legacy")["autoattack_acc"] == ""  # legacy-10 alone is no RobustBench figure
    evaluated(standard)
    evaluated(legacy)  # run last: it must not replace the standard figure
    results = json.loads((run / "eval.json").read_text())["results"]
    assert (results["aa"]["accuracy"], results["aa-legacy-10"]["accuracy"]) == (0.40, 0.52)
    info = exported("both")
    assert info["autoattack_acc"] == "40.00" and "standard" in info["footnote"]
    assert info["engine"]["results"]["aa-legacy-10"]["accuracy"] == 0.52


def test_fewer_images_than_a_chunk_are_not_padded_up_to_it():
    cfg = EvalConfig(attacks=("clean",), num_examples=8, batch_size=1000, chunk_size=0)  # a CPU chunk: 500
    results = evaluate(SparseLinear(), labelled_split(8), cfg, torch.device("cpu"))
    assert results["clean"]["config"]["chunk_size"] == 500 and results["clean"]["config"]["batch_size"] == 8
    assert results["clean"]["config"]["dtype"] == "fp32" and results["clean"]["config"]["tf32_convolutions"] is False


def test_autoattacks_subsets_are_neither_padded_to_the_chunk_nor_split_below_it():
    from engine.evaluate import SubsetBatch

    seen = []

    def net(x):
        seen.append(len(x))
        return x.flatten(1)[:, :10]

    subset = SubsetBatch(net, 16)
    for n in (5, 1, 40):
        x = torch.rand(n, 3, 32, 32)
        assert torch.equal(subset(x), x.flatten(1)[:, :10])
    assert seen == [5, 2, 16, 16, 8]  # a single image goes as two (dynamo specializes size 1)


@pytest.mark.slow
def test_a_compiled_evaluation_keeps_its_graphs_few_and_finds_the_same_flags(reference):
    """Issue 10 item 7: compiled (backend "eager": dynamo's capture), clean and PGD-20 pad their last batch (static
    shapes) and AutoAttack's shrinking subsets go through SubsetBatch (a dynamic batch dimension), so the graphs stay
    few; the flags equal the eager ones."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from engine.config import PerfConfig

    torch._dynamo.reset()
    counters.clear()
    try:
        perf = PerfConfig(compile="on", compile_backend="eager", device="cpu")
        cfg = EvalConfig(attacks=("clean", "pgd20", "aa"), num_examples=16, batch_size=16, chunk_size=16)
        with one_thread():
            results = evaluate(SparseLinear(), labelled_split(), cfg, torch.device("cpu"), 3, perf)
        assert flags(results) == {k: v[:16] for k, v in flags(reference).items()}  # chunk 0: same seeds, same flags
        # predictions; PGD-20; AutoAttack's forwards with and without input gradients (weights frozen in both
        # attacks): a handful of graphs, none per subset size (5 with torch 2.13), and at least one per role
        assert 3 <= counters["stats"]["unique_graphs"] <= 6 and not counters["graph_break"], dict(counters["stats"])
        assert not reference["aa"]["config"]["compiled"]  # not reused; nor chunks of another compile backend
        assert results["aa"]["config"]["compiled"] == "eager"
    finally:
        torch._dynamo.reset()


def test_a_compiled_resnet_serves_every_autoattack_subset_size_from_a_few_graphs():
    """AutoAttack's role on the ResNet the engine trains (batch norm, residual adds, pooling: shapes the linear model
    above does not have), called as AutoAttack calls it: subsets shrinking as images fall, with and without input
    gradients. A first pass over the sizes builds at most two graphs per grad mode (on a CPU the convolution's
    backend, and with it the graph, differs below a batch of 16); a second pass over other sizes builds none."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from engine.config import ModelConfig, PerfConfig
    from engine.evaluate import SubsetBatch
    from engine.models import build_model
    from engine.perf import eval_network

    torch._dynamo.reset()
    counters.clear()
    try:
        torch.manual_seed(0)
        net = build_model(ModelConfig(width=8), 10).eval().to(memory_format=torch.channels_last)
        perf = PerfConfig(compile="on", compile_backend="eager", device="cpu")
        attacker = SubsetBatch(eval_network(net, perf, torch.device("cpu"), attack="autoattack"), 32)

        def sizes_pass(sizes):
            for n in sizes:
                x = torch.rand(n, 3, 32, 32).contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    assert attacker(x).shape == (n, 10)
                x.requires_grad_(True)
                (grad,) = torch.autograd.grad(attacker(x).sum(), x)
                assert grad.shape == x.shape
            return counters["stats"]["unique_graphs"]

        with one_thread():
            first = sizes_pass([32, 20, 13, 9, 5, 2, 1])
            assert 2 <= first <= 4 and not counters["graph_break"], dict(counters["stats"])
            assert sizes_pass([31, 17, 15, 11, 7, 3, 40]) == first, dict(counters["stats"])  # none per size
    finally:
        torch._dynamo.reset()


def test_cudnn_picks_repeatable_algorithms_while_evaluating(monkeypatch):
    """Training turns cudnn.benchmark on (CUDA): each process would time its own algorithms for a shape, and an
    image's flags would depend on the rank that attacked it. The evaluation runs with cuDNN's heuristic choice,
    deterministic algorithms only, records it, and gives training its settings back."""
    import torch._inductor.config as inductor

    from engine import evaluate as ev

    seen = []
    clean_flags = ev._clean_flags
    monkeypatch.setattr(ev, "_clean_flags", lambda *a: seen.append(
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, getattr(inductor, "deterministic", None)))
        or clean_flags(*a))  # fmt: skip
    mode = hasattr(inductor, "deterministic")  # torch >= 2.10 (before it Inductor had no such mode to pin)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    cfg = EvalConfig(attacks=("clean",), num_examples=32, batch_size=16, chunk_size=16)
    results = evaluate(SparseLinear(), labelled_split(), cfg, torch.device("cpu"), 3)
    # Inductor too (helper-85: it times reduction configs per process)
    assert seen == [(False, True, True if mode else None)] * 2
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
    assert getattr(inductor, "deterministic", False) is False  # given back as it was (False), not merely falsy
    assert results["clean"]["config"]["cudnn_algorithms"] == "heuristic, deterministic"
    assert results["clean"]["config"]["inductor"] == ("deterministic" if mode else "default")


def test_the_network_is_evaluated_in_the_training_layout(tmp_path):
    """perf.channels_last (the default) puts the network channels-last for evaluation, as training left it (an
    exported or loaded model comes contiguous); the record says so, and chunks saved under the other layout (other
    convolution kernels, other last bits) are not reused."""
    from engine.config import PerfConfig
    from engine.models import build_model
    from engine.recipes import get_recipe

    torch.manual_seed(0)
    model = build_model(get_recipe("smoke").model, 10)
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[2:] != (1, 1)]  # a 1x1 kernel is both
    split, cpu = synthetic_split(16, 10, seed=0), torch.device("cpu")
    cfg = EvalConfig(attacks=("clean",), num_examples=16, batch_size=16, chunk_size=16)
    assert all(p.is_contiguous() for p in convs)
    with one_thread():
        first = evaluate(model, split, cfg, cpu, 0, PerfConfig(compile="off"), record_dir=tmp_path)
        assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
        other = evaluate(model, split, cfg, cpu, 0, PerfConfig(compile="off", channels_last=False), record_dir=tmp_path)
    assert all(p.is_contiguous() for p in convs)
    assert first["clean"]["config"]["memory_format"] == "channels_last"
    assert other["clean"]["config"]["memory_format"] == "contiguous" and other["clean"]["reused_chunks"] == 0


def test_chunks_of_other_threads_other_convolutions_or_another_attack_code_are_not_reused(tmp_path, monkeypatch):
    """helper-84/85: chunks are keyed by torch's CPU threads (torchrun's ranks run one each, a lone `arat eval` every
    core: a reduction split otherwise may sum in another order), by the convolutions computed as matrix products
    (perf.gemm_conv: the evaluation ending a CPU training run inherits them, `arat eval` of the run does not) and
    by pyautoattack's version (an upgrade may find other images)."""
    import engine.evaluate as ev
    from engine.autoattack import PROTOCOLS
    from engine.config import PerfConfig
    from engine.models import build_model
    from engine.models.gemm_conv import set_gemm_convs
    from engine.recipes import get_recipe

    cpu, perf = torch.device("cpu"), PerfConfig(compile="off")
    assert f"; {torch.get_num_threads()} threads;" in ev.hardware_id(cpu)
    assert PROTOCOLS["standard"].describe()["code"].startswith("pyautoattack ")
    import importlib.metadata

    import pyautoattack

    def no_metadata(package):  # the GPU check's copy of the module: its files without the package metadata
        raise importlib.metadata.PackageNotFoundError(package)

    monkeypatch.setattr(importlib.metadata, "version", no_metadata)
    code = PROTOCOLS["standard"].describe()["code"]
    assert code == f"pyautoattack {pyautoattack.__version__}" != "pyautoattack None"  # the module's own (helper-87)
    torch.manual_seed(0)
    model = build_model(get_recipe("smoke").model, 10)
    split = synthetic_split(16, 10, seed=0)
    cfg = EvalConfig(attacks=("clean",), num_examples=16, batch_size=16, chunk_size=16)

    def reused(net) -> int:
        return evaluate(net, split, cfg, cpu, 0, perf, record_dir=tmp_path)["clean"]["reused_chunks"]

    with one_thread():
        assert reused(model) == 0 and reused(model) == 1
        monkeypatch.setattr(ev, "hardware_id", lambda device: "cpu same-isa; 2 threads; torch same")
        assert reused(model) == 0
        torch.use_deterministic_algorithms(True, warn_only=True)  # the evaluation ending a perf.deterministic run
        try:
            assert reused(model) == 0
        finally:
            torch.use_deterministic_algorithms(False)
        assert reused(model) == 1
        gemm = copy.deepcopy(model)
        assert set_gemm_convs(gemm, 8)  # the same weights (the same hash), other kernels
        assert reused(gemm) == 0 and reused(gemm) == 1


def broken_compile(role, cfg, device):
    """torch.compile with a backend that fails as Inductor would on a GPU it cannot build for."""

    def backend(gm, inputs):
        raise RuntimeError("no kernel image is available for execution on the device")

    return torch.compile(role, dynamic=False, backend=backend)


def test_a_failed_compile_names_the_eager_rerun_and_keeps_its_traceback(tmp_path, monkeypatch):
    from engine import perf as perf_module
    from engine.config import PerfConfig
    from engine.errors import CompiledEvaluationFailed

    monkeypatch.setattr(perf_module, "compile_role", broken_compile)
    cfg = EvalConfig(attacks=("clean",), num_examples=16, batch_size=16, chunk_size=16)
    compiled = PerfConfig(compile="on", compile_backend="eager", device="cpu")
    with pytest.raises(CompiledEvaluationFailed, match="evaluation failed .RuntimeError: no kernel.*compile_error.txt"):
        evaluate(SparseLinear(), labelled_split(16), cfg, torch.device("cpu"), 3, compiled, record_dir=tmp_path)
    assert "no kernel image" in (tmp_path / "compile_error.txt").read_text()
    eager = PerfConfig(compile="off", device="cpu")  # the same failure without compile: not this error
    results = evaluate(SparseLinear(), labelled_split(16), cfg, torch.device("cpu"), 3, eager, record_dir=tmp_path)
    assert results["clean"]["accuracy"] == 1.0


def test_arat_eval_compile_switch_overrides_the_run_s(tmp_path, capsys, monkeypatch):
    from engine import perf as perf_module
    from engine.cli import main

    run = tmp_path / "run"
    assert main(["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1", "--no-eval"]) == 0
    monkeypatch.setattr(perf_module, "compile_role", broken_compile)
    capsys.readouterr()
    assert main(["eval", str(run), "--attacks", "clean", "--num-examples", "16", "--compile", "on"]) == 2
    err = capsys.readouterr().err
    assert f"`arat eval {run} --compile off`" in err and err.count("arat: error") == 1, err
    assert "(RuntimeError: no kernel image is available" in err  # the backend's own error, not dynamo's wrapper
    assert (run / "eval" / "compile_error.txt").exists()
    assert main(["eval", str(run), "--attacks", "clean", "--num-examples", "16", "--compile", "off"]) == 0
    assert main(["eval", str(run), "--attacks", "clean", "--num-examples", "16"]) == 0  # the run's: off on a CPU


def test_a_training_run_whose_compiled_evaluation_fails_names_its_eager_rerun(tmp_path, capsys, monkeypatch):
    import engine.evaluate
    from engine.cli import main
    from engine.perf import EvalAttackForward, EvalForward

    def broken_eval_network(net, cfg, device, attack=False):  # training's roles compile; evaluation's fail
        return broken_compile((EvalAttackForward if attack else EvalForward)(net), cfg, device)

    monkeypatch.setattr(engine.evaluate, "eval_network", broken_eval_network)
    run = tmp_path / "run"
    args = ["train", "--recipe", "smoke", "--out", str(run), "--set", "train.epochs=1", "--set", "eval.attacks=clean",
            "--set", "perf.compile=on", "--set", "perf.compile_backend=eager"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"`arat eval {run} --compile off`" in err and (run / "checkpoints" / "final.pt").exists(), err


def test_evaluation_compiles_in_inductors_default_mode_whatever_training_used(monkeypatch):
    """max-autotune times kernels in each process (an image's flags would follow its rank) and reduce-overhead
    records a CUDA graph per AutoAttack subset size: the evaluation roles take the default mode."""
    from engine import evaluate as evaluate_module
    from engine.config import PerfConfig

    modes = []
    build = evaluate_module.eval_network

    def recording(net, perf_cfg, device, attack=False):
        modes.append(perf_cfg.compile_mode)
        return build(net, perf_cfg, device, attack)

    monkeypatch.setattr(evaluate_module, "eval_network", recording)
    cfg = EvalConfig(attacks=("clean", "aa"), num_examples=8, aa_num_examples=2, batch_size=8, chunk_size=8)
    for mode in ("max-autotune", "reduce-overhead"):  # compiled (the eager backend), AutoAttack's role built too
        perf = PerfConfig(compile="on", compile_backend="eager", compile_mode=mode, device="cpu")
        evaluate(SparseLinear(), labelled_split(8), cfg, torch.device("cpu"), 0, perf)
    assert modes == ["default"] * 6  # per run: the classifier, the attacker, AutoAttack's classifier


def test_autoattacks_reliability_warnings_are_shown_not_swallowed(capsys, monkeypatch):
    """AutoAttack's own checks (a randomized or gradient-masking defense, Square lowering the robust accuracy) log
    warnings; the stage-figure handler, the logger's only one during a chunk, prints them once each per network
    in a process: each chunk has a handler of its own (a 10k evaluation printed the same warning in each of its 20
    chunks); another network evaluated in the same process is told its own."""
    import logging

    monkeypatch.setattr(autoattack, "_WARNED", set())
    log = logging.getLogger("auto-attack")
    level, log.level = log.level, logging.DEBUG  # as attack_chunk sets it
    handlers = []
    try:
        for chunk in range(2):
            handler = autoattack._StageLog(network=1)
            log.addHandler(handler)
            for _ in range(2):
                log.warning('it seems to be a randomized defense! Please use version="rand".')
            if chunk:
                log.warning("Square lowered the robust accuracy")
            log.info("robust accuracy after APGD-CE: 42.00%")
            log.removeHandler(handler)
            handlers.append(handler)
        other = autoattack._StageLog(network=2)  # another network evaluated in this process: told its own
        log.addHandler(other)
        log.warning('it seems to be a randomized defense! Please use version="rand".')
        log.removeHandler(other)
    finally:
        for handler in handlers:
            log.removeHandler(handler)
        log.setLevel(level)
    err = capsys.readouterr().err
    assert err.count("AutoAttack warning: it seems to be a randomized defense!") == 2
    assert err.count("AutoAttack warning: Square lowered the robust accuracy") == 1
    assert all(handler.after == {"apgd-ce": 0.42} for handler in handlers)


def test_each_network_is_told_autoattack_s_warnings_once(capsys, monkeypatch):
    """attack_chunk keys AutoAttack's warnings by the caller's name for the network (the evaluation passes its
    weights' fingerprint): keyed by the wrapper's id, a second network evaluated in the process was told nothing,
    the freed wrapper's id coming back for the next one (helper-126)."""
    import logging
    from types import SimpleNamespace

    class Adversary:
        def run_standard_evaluation(self, x, y, batch_size):
            log = logging.getLogger("auto-attack")
            log.info("initial accuracy: 100.00%")
            log.warning("it seems to be a randomized defense!")
            Adversary.zero += 1  # pyautoattack's check quotes a tensor: each chunk its own count
            log.warning(f"there are {torch.tensor(Adversary.zero)} points with zero gradient! This might be ...")
            log.info("robust accuracy after APGD-CE: 100.00%")
            return x, y  # (every image robust: the labels kept)

        zero = 0

    monkeypatch.setattr(autoattack, "_WARNED", set())
    monkeypatch.setattr(autoattack, "adversary", lambda model, protocol, seed, device: Adversary())
    model, x, y = torch.nn.Linear(2, 2), torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    for network in ("weights-a", "weights-a", "weights-b"):  # the same module object: one id for all three
        autoattack.attack_chunk(model, x, y, SimpleNamespace(attacks=("apgd-ce",), eps=8 / 255), 0, 3,
                                network=network)  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("AutoAttack warning: it seems to be a randomized defense!") == 2
    assert err.count("points with zero gradient!") == 2  # (once per network, not once per count)


@pytest.mark.parametrize("case", ["inside", "beyond eps", "above 1", "below 0", "nan"])
def test_autoattack_examples_outside_the_eps_ball_or_0_1_are_refused(monkeypatch, case):
    """AutoAttack only logs its examples' reach (at debug level): the chunk now checks them, since an image counted
    as broken by an example outside the ball would read robustness low. At exactly eps (fp32) it passes."""
    import logging
    from types import SimpleNamespace

    eps = 8 / 255
    x = torch.tensor([[0.5, 0.99, 0.01], [0.2, 0.3, 0.4]])
    step = {"beyond eps": [0.05, 0.0, 0.0], "above 1": [0.0, 0.02, 0.0], "below 0": [0.0, 0.0, -0.02]}
    x_adv = (x + eps).clamp(0, 1) if case == "inside" else x + torch.tensor(step.get(case, [float("nan")] * 3))
    # (each case breaks one rule only: 0.5 + 0.05 stays in [0, 1]; 0.99 + 0.02 and 0.01 - 0.02 stay within eps)
    y = torch.tensor([0, 1])

    class Adversary:
        def run_standard_evaluation(self, x, y, batch_size):
            log = logging.getLogger("auto-attack")
            log.info("initial accuracy: 100.00%")
            log.info("robust accuracy after APGD-CE: 50.00%")
            return x_adv, torch.tensor([0, 0])  # the second image broken

    monkeypatch.setattr(autoattack, "adversary", lambda model, protocol, seed, device: Adversary())
    protocol = SimpleNamespace(attacks=("apgd-ce",), eps=eps)
    if case == "inside":
        flags, counts = autoattack.attack_chunk(torch.nn.Linear(3, 2), x, y, protocol, 0, 2)
        assert flags.tolist() == [True, False] and counts == {"clean": 2, "apgd-ce": 1}
        return
    with pytest.raises(RuntimeError, match="outside the eps-ball or"):
        autoattack.attack_chunk(torch.nn.Linear(3, 2), x, y, protocol, 0, 2)


def test_flags_of_other_attacks_are_kept_and_each_entry_says_its_network_data_and_version(tmp_path):
    """`arat eval RUN --attacks pgd20` rewrote RUN/eval/flags.json with PGD-20 alone, losing the run's AutoAttack
    flags, and a legacy-10 AutoAttack's flags were stored under "aa" with no version, then in the standard
    protocol's place. Each protocol's flags now have their own entry, an older engine's "aa" entry of legacy-10
    included."""
    from engine.evaluate import pack, write_flags

    bits, other = pack(torch.tensor([True, False, True])), pack(torch.tensor([False, False, True]))
    aa = {"num_examples": 3, "flags": bits, "version": "legacy-10", "config": {"model": "m1", "data": "d1"}}
    write_flags(tmp_path, {"aa": aa})
    write_flags(tmp_path, {"pgd20": {"num_examples": 3, "flags": bits, "config": {"model": "m1", "data": "d1"}}})
    flags = json.loads((tmp_path / "flags.json").read_text())
    assert set(flags) == {"aa-legacy-10", "pgd20"} and flags["aa-legacy-10"]["version"] == "legacy-10"
    assert flags["pgd20"]["model"] == flags["aa-legacy-10"]["model"] == "m1" and flags["pgd20"]["data"] == "d1"
    write_flags(tmp_path, {"aa": aa | {"version": "standard", "flags": other}})
    flags = json.loads((tmp_path / "flags.json").read_text())
    assert (flags["aa"]["bits"], flags["aa"]["version"], flags["aa-legacy-10"]["bits"]) == (other, "standard", bits)
    older = flags | {"aa": flags.pop("aa-legacy-10")}  # an older engine's file: legacy-10 under "aa"
    (tmp_path / "flags.json").write_text(json.dumps(older))
    write_flags(tmp_path, {"aa": aa | {"version": "standard", "flags": other}})
    flags = json.loads((tmp_path / "flags.json").read_text())
    assert (flags["aa"]["version"], flags["aa-legacy-10"]["bits"]) == ("standard", bits)


def test_chunks_made_on_other_test_images_are_not_reused(tmp_path):
    """The chunk key held the number of images, not which: another --data-dir (or the synthetic fallback) of as
    many images reused the saved chunks. The key now holds a hash of the images and labels."""
    from engine.evaluate import attack_spec, data_fingerprint

    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    assert data_fingerprint(x, y) == data_fingerprint(x.clone(), y.clone())
    other = x.clone()
    other[0, 0, 0, 0] += 0.5
    assert data_fingerprint(other, y) != data_fingerprint(x, y) != data_fingerprint(x, y.flip(0))
    cfg = EvalConfig(attacks=("clean",), num_examples=4, chunk_size=2)
    specs = [attack_spec("clean", cfg, 4, 0, "m", 2, data_hash=data_fingerprint(a, y)) for a in (x, other)]
    assert specs[0] != specs[1] and specs[0]["data"] == data_fingerprint(x, y)
    # through evaluate: one pixel changed in the last of 32 images (the hash covers every image evaluated)
    from engine.data.cifar import ArraySplit

    split, record = labelled_split(), tmp_path / "eval"
    images = split.images.copy()
    images[31, 0, 0, 0] ^= 1
    changed = ArraySplit(images, split.labels.copy())
    cfg = EvalConfig(attacks=("clean",), num_examples=32, batch_size=16, chunk_size=16)
    runs = [
        evaluate(SparseLinear(), s, cfg, torch.device("cpu"), 3, record_dir=record) for s in (split, split, changed)
    ]
    assert [r["clean"]["reused_chunks"] for r in runs] == [0, 2, 0]


def test_the_ranks_wait_for_a_whole_chunk_at_their_own_pace(monkeypatch):
    """The wait for the other ranks' chunks: four whole chunks at this rank's own pace per image (its last chunk may
    be a short tail: the others' are whole), a week where this rank had no chunk to time."""
    import engine.evaluate
    from engine.distributed import DistInfo

    waits = []

    def gather(obj, info, wait=None):
        waits.append(wait)
        return [obj]

    monkeypatch.setattr(engine.evaluate, "gather_objects", gather)
    cfg = EvalConfig(attacks=("clean",), num_examples=520, batch_size=20, chunk_size=500)
    flags = engine.evaluate.pack(torch.ones(20, dtype=torch.bool))
    tail = {"index": 1, "start": 500, "stop": 520, "seed": 0, "flags": flags, "counts": None, "seconds": 900.0}
    for records in ([], [tail]):
        waits.clear()
        with pytest.raises(RuntimeError, match="do not tile"):  # one rank's records alone: not the whole set
            engine.evaluate._attack_result("clean", records, 520, cfg, None, {}, 0, 0.0, DistInfo(0, 2))
        # 45 s per image (20 images in 900 s): four chunks of 500 and 600 s; a week with no chunk of its own
        assert waits == [timedelta(days=7) if not records else timedelta(seconds=4 * 45 * 500 + 600)]


def test_the_memory_limit_of_a_nested_cgroup_is_found(tmp_path):
    """helper-155: only a container's cgroup v2 root limit was read; SLURM's --mem (a nested group) and cgroup v1
    were not, so a CPU evaluation's chunk could be sized for the whole machine."""
    from engine.evaluate import cgroup_memory_files

    root, own = tmp_path / "cgroup", tmp_path / "self_cgroup"
    own.write_text("0::/slurm/job_7/step_0\n4:memory:/slurm/job_7\n3:cpu,cpuacct:/slurm/job_7\n")
    files = cgroup_memory_files(root, own)
    assert root / "slurm/job_7/step_0/memory.max" in files
    assert root / "memory/slurm/job_7/memory.limit_in_bytes" in files
    assert root / "memory.max" in files and not any("cpu" in str(f) for f in files)
