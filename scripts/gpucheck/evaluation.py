"""Stage `eval` (beyond the specification's ten, and last: it runs in the time the others leave): the evaluation on
CUDA as `arat eval` runs it (engine.evaluate), eager against compiled. It measures what issue 10 still lacks from a
GPU: the chunk size the CUDA memory probe picks, the compiled evaluation (never run on a GPU before), and AutoAttack
through the compiled network.

Network: the ResNet-18 real_run trained ($W/real_run/checkpoints/final.pt) when that stage left one, else the
recipe's network at its initial weights (the flags still compare). Images: the prepared CIFAR-10 test split (run
alone, the stage waits up to 20 s for the background preparation, as real_run does), else synthetic ones. With
less than ~35 s left when it starts, the stage skips itself (budget).
1. `chunk rule`: resolve_chunk_size twice: the same size both times.
2. `eager`: clean and PGD-20 on 2000 test images in five full chunks of 400 (a short last chunk is padded on CUDA
   and would count half its work in the images/s; the attack is captured in the third chunk's call, so the
   fourth and fifth are the steady state, `images_per_s_replayed`), compile off.
3. `compiled`: the same with perf.compile=on: each chunk's seconds (the first compiles), img/s of the later chunks,
   graphs made, and how many images' flags agree with the eager ones.
Optional, while time remains: 4. each standard-AA attack timed at small iteration counts on 500 images through the
compiled network (SubsetBatch: one graph per grad mode, dynamic batch), after an untimed pass on 8 correctly
classified images that builds the graphs, under what engine.autoattack runs them with (no grad outside the
attacks' own, frozen weights, repeatable cuDNN), projected to a 10k standard AA as real_run projects the eager one.
Pass: the chunk rule gives one size twice; compiled clean flags agree with eager on >= 99% of the images; compiled
PGD-20 accuracy within 1 point of eager's (its agreement is recorded, flagged below 99%: PGD-20's sign steps can flip
borderline images under Inductor's fused batch norm and TF32 convolutions, which moves images, not the accuracy). A
compiled evaluation that raises fails the stage after the compiled AA timing has had its try.
A cut at the cap during 3 or 4 leaves the stage ok (a `cut` row; the compiled chunks finished by then are kept).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from engine.config import EvalConfig, apply_overrides
from engine.data import load_test_split
from engine.data.cifar import find_layout
from engine.evaluate import SubsetBatch, evaluate, resolve_chunk_size, test_tensors, unpack
from engine.models import build_model
from engine.perf import eval_network
from engine.recipes import get_recipe

from .common import peak_mem_gib, read_figures, reset_peak, shape_overrides, smoke_compile, sync
from .real_run import (
    RECIPE,
    SMOKE_TIMING_IMAGES,
    TIMING_IMAGES,
    aa_projection,
    autoattack_importable,
    time_attacks,
    timing_plan,
    wait_for_data,
)
from .record import BUDGET_SKIP, StageFailed, StageRecord, error_line, guarded, traceback_tail

ATTACKS = ("clean", "pgd20")
# five full chunks (a short one is padded to 400: its images would undercount the work). A captured attack (one
# per chunk here) runs eagerly twice, then is captured in the third call and replayed: chunks 4 and 5 are the
# steady state (with three, the "last chunk" was the capture's)
IMAGES, CHUNK = 2000, 400
STEADY_FROM = 3  # the first chunk that replays a captured attack (0-based)
SMOKE_IMAGES, SMOKE_CHUNK = 40, 16
AGREEMENT = 0.99  # compiled vs eager flags: TF32 convolutions and Inductor's fused code round differently
PGD20_POINTS = 0.01  # compiled vs eager PGD-20 accuracy (its flags' agreement is recorded, not judged)
MIN_SECONDS = 35  # start-up, the chunk rule and the eager evaluation (a cut there would fail the check)
AA_SECONDS = 45.0  # the compiled AA timing's cold graphs (two or three) and its four timed attacks
WARMUP_IMAGES = 8


def eval_setup(record: StageRecord) -> tuple[Any, torch.nn.Module, str, Any]:
    """(config, network on the device, where its weights came from, test split)."""
    data_dir = record.work / "data"
    if not record.smoke:
        try:
            reason = wait_for_data(record, data_dir)
        except StageFailed as exc:  # the preparation failed or is slow: synthetic images still compare the flags
            reason = str(exc)
        if reason:
            record.figure("no_cifar10", reason)
    real = not record.smoke and find_layout("cifar10", data_dir) is not None
    overrides = shape_overrides(128, record.smoke) + [f"data.data_dir={data_dir}"]  # its data: synthetic, one batch
    if real:
        overrides.append("data.dataset=cifar10")
    else:
        overrides.append(f"data.synthetic_size={4 * IMAGES}")  # a synthetic test split of IMAGES
    cfg = apply_overrides(get_recipe(RECIPE), overrides)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, cfg.data.num_classes)
    source = "initial weights"
    checkpoint = record.work / "real_run" / "checkpoints" / "final.pt"
    if checkpoint.is_file():
        try:
            model.load_state_dict(torch.load(checkpoint, map_location="cpu")["model"])
            source = "real_run's trained network"
        except (RuntimeError, KeyError) as exc:  # a smoke-sized or foreign checkpoint: keep the initial weights
            source = f"initial weights (real_run's checkpoint did not fit: {str(exc).splitlines()[0][:120]})"
    record.figure("network", source)
    record.figure("images", "CIFAR-10 test split" if real else "synthetic")
    model = model.to(dev).eval()
    if cfg.perf.channels_last:  # as engine.evaluate has it when it sizes the chunks
        model = model.to(memory_format=torch.channels_last)
    return cfg, model, source, load_test_split(cfg.data, cfg.seed)


def chunk_rule_row(record: StageRecord, cfg, model, dev) -> dict[str, Any]:
    """The chunk size resolve_chunk_size picks (its CUDA memory probe), twice: it must not depend on the first."""
    auto = dataclasses.replace(cfg.eval, chunk_size=0)
    first, second = (resolve_chunk_size(auto, model, (3, 32, 32), dev) for _ in range(2))
    # the size is the rule's answer; its reason quotes the probe's MiB per image, which may wobble by 0.1
    row = {"case": "chunk rule", "chunk_size": first[0], "reason": first[1], "again": second[0],
           "reason_again": second[1], "repeats": first[0] == second[0]}  # fmt: skip
    record.figure("chunk_rule", {"chunk_size": first[0], "reason": first[1], "repeats": first[0] == second[0]})
    return record.row(row)


def chunk_records(directory: Path, attack: str) -> list[dict[str, Any]]:
    """Each saved chunk's record (start, stop, seconds, ...), in chunk order."""
    folders = sorted(directory.glob(f"chunks/{attack}-*"))
    if not folders:
        return []
    files = sorted(p for p in folders[0].glob("*.json") if p.name != "spec.json")
    return [json.loads(p.read_text()) for p in files]


def chunk_seconds(directory: Path, attack: str) -> list[float]:
    return [r["seconds"] for r in chunk_records(directory, attack)]


def replayed_rate(chunks: list[dict[str, Any]]) -> float | None:
    """img/s over the chunks whose attacks replayed a capture (None: no such chunk, as in a cut run)."""
    images, seconds = sum(c["stop"] - c["start"] for c in chunks), sum(c["seconds"] for c in chunks)
    return round(images / seconds, 1) if chunks and seconds > 0 else None


def evaluation_row(record: StageRecord, name: str, model, split, cfg, dev, compiled: bool) -> dict[str, Any]:
    n, chunk = (SMOKE_IMAGES, SMOKE_CHUNK) if record.smoke else (IMAGES, CHUNK)
    eval_cfg = EvalConfig(attacks=ATTACKS, num_examples=n, chunk_size=chunk, batch_size=chunk)
    perf_cfg = dataclasses.replace(cfg.perf, device=str(dev), compile="on" if compiled else "off")
    directory = record.work / f"eval_{name}"
    shutil.rmtree(directory, ignore_errors=True)  # fresh chunks: none reused from an earlier run of this stage
    graphs_before = counters["stats"]["unique_graphs"]
    reset_peak(dev)
    sync(dev)
    start = time.perf_counter()
    results = evaluate(model, split, eval_cfg, dev, seed=0, perf_cfg=perf_cfg, record_dir=directory)
    sync(dev)
    seconds = round(time.perf_counter() - start, 2)
    row: dict[str, Any] = {"case": name, "images": results[ATTACKS[0]]["num_examples"], "chunk_size": chunk,
                           "seconds": seconds, "peak_mem_gib": peak_mem_gib(dev)}  # fmt: skip
    if compiled:
        row["graphs"] = counters["stats"]["unique_graphs"] - graphs_before
    for attack in ATTACKS:
        r, chunks = results[attack], chunk_records(directory, attack)
        later = chunks[1:]  # the first chunk compiles (compiled) or warms cuDNN and the capture (eager)
        images, seconds = sum(c["stop"] - c["start"] for c in later), sum(c["seconds"] for c in later)
        row[attack] = {
            "accuracy": r["accuracy"],
            "images": r["num_examples"],
            "chunk_seconds": [c["seconds"] for c in chunks],
            "images_per_s_after_first_chunk": round(images / seconds, 1) if seconds > 0 else None,
            # a captured attack warms up over two calls and is captured in the third (one chunk each)
            "images_per_s_replayed": replayed_rate(chunks[STEADY_FROM:]),
            "compiled": r["config"]["compiled"],
        }
    record.row(row)
    return row | {"flags": {attack: results[attack]["flags"] for attack in ATTACKS}}  # compared, not recorded


def paired_flags(eager: dict[str, Any], compiled: dict[str, Any], n: int) -> dict[str, tuple]:
    """Per attack, the per-image flags (eager's, compiled's)."""
    return {a: (unpack(eager["flags"][a], n), unpack(compiled["flags"][a], n)) for a in ATTACKS}


def agreement(pairs: dict[str, tuple]) -> dict[str, float]:
    """Per attack, the share of images whose flag is the same eager and compiled."""
    return {attack: round(float((a == b).float().mean()), 4) for attack, (a, b) in pairs.items()}


def compiled_aa_row(record: StageRecord, model, split, cfg, dev, figures: dict[str, Any]) -> dict[str, Any]:
    """Standard AA's attacks timed through the compiled network, after an untimed pass of the same attacks on a few
    correctly classified images (the attacks skip the others): it builds the graphs, one per grad mode with the
    batch dimension dynamic, so the timed pass compiles nothing."""
    from engine.perf import EvalForward

    n = SMOKE_TIMING_IMAGES if record.smoke else TIMING_IMAGES
    x, y = test_tensors(split, n, dev)
    with torch.no_grad():
        right = (EvalForward(model)(x).argmax(1) == y).nonzero().flatten()[:WARMUP_IMAGES]
    if len(right) == 0 and record.smoke:  # a smoke network is near chance: exercise the path anyway
        right = torch.arange(min(WARMUP_IMAGES, n), device=dev)
    if len(right) == 0:
        return record.row({"case": "compiled AA projection", "status": "skipped: no test image classified right"})
    perf_cfg = dataclasses.replace(cfg.perf, device=str(dev), compile="on")
    net = SubsetBatch(eval_network(model, perf_cfg, dev, attack="autoattack"), n)  # as engine.evaluate builds it
    start = time.perf_counter()
    time_attacks(record, model, x[right], y[right], forward=net, label="compiled warm-up ")
    record.figure("compiled_aa_warmup_s", round(time.perf_counter() - start, 2))
    per_image_pass = time_attacks(record, model, x, y, forward=net, label="compiled ")
    plan = timing_plan(record)
    projection = aa_projection(per_image_pass, figures, f"{len(y)} images, (targets, iterations) {plan}, compiled")
    record.figure("aa_projection_compiled", projection)
    return record.row({"case": "compiled AA projection", **projection})


def biased(one: int, other: int) -> bool:
    """Images that flipped one way against the other: beyond three standard deviations of fair coin flips (each
    borderline image rounding either way), a weaker or stronger attack, not rounding (on 2,000 images of a 1-epoch
    network, a 1-point gap can come from chance alone)."""
    return abs(one - other) > 3 * math.sqrt(max(one + other, 1))


def judge_compiled(record: StageRecord, eager: dict[str, Any], compiled: dict[str, Any]) -> None:
    """Compiled against eager: clean's flags agree on >= AGREEMENT of the images; PGD-20's accuracy within
    PGD20_POINTS unless the flips are one-sided beyond chance (a gap within chance, and its agreement below
    AGREEMENT, are flagged, not failed)."""
    pairs = paired_flags(eager, compiled, eager["images"])
    agree = agreement(pairs)
    record.figure("agreement", agree)
    record.figure("images_per_s", {
        kind: {a: row[a]["images_per_s_after_first_chunk"] for a in ATTACKS} for kind, row in
        (("eager", eager), ("compiled", compiled))
    })  # fmt: skip
    record.figure("images_per_s_replayed", {
        kind: {a: row[a]["images_per_s_replayed"] for a in ATTACKS} for kind, row in
        (("eager", eager), ("compiled", compiled))
    })  # fmt: skip
    record.figure("compiled_first_chunk_s", {a: (compiled[a]["chunk_seconds"] or [None])[0] for a in ATTACKS})
    record.figure("compiled_graphs", compiled.get("graphs"))
    gap = round(abs(compiled["pgd20"]["accuracy"] - eager["pgd20"]["accuracy"]), 4)
    record.figure("pgd20_accuracy_gap", gap)
    if agree["pgd20"] < AGREEMENT:
        record.figure("pgd20_agreement_flag", f"PGD-20 flags agree on {agree['pgd20']} of the images (< {AGREEMENT})")
    failed = []
    if agree["clean"] < AGREEMENT:
        failed.append(f"compiled clean flags agree with eager on {agree['clean']} of the images (< {AGREEMENT})")
    a, b = pairs["pgd20"]
    only_compiled, only_eager = int((b & ~a).sum()), int((a & ~b).sum())  # robust under one attack alone
    record.figure("pgd20_flips", {"robust_only_compiled": only_compiled, "robust_only_eager": only_eager})
    if gap > PGD20_POINTS and biased(only_compiled, only_eager):
        failed.append(f"compiled PGD-20 accuracy {gap} from eager's (> {PGD20_POINTS}), one-sided: "
                      f"{only_compiled} images robust only compiled, {only_eager} only eager")  # fmt: skip
    elif gap > PGD20_POINTS:
        record.figure("pgd20_gap_flag", f"PGD-20 accuracy gap {gap} (> {PGD20_POINTS}), within the borderline "
                      f"images' chance ({only_compiled} vs {only_eager} flipped)")  # fmt: skip
    if failed:
        record.fail("; ".join(failed))


def salvage(record: StageRecord) -> None:
    """At the cap inside the compiled evaluation: the seconds of the chunks it finished (the first compiles), and
    the agreement marked as not measured (the stage ends ok, its criterion unsettled)."""
    directory = record.work / "eval_compiled"
    record.data["figures"]["compiled_chunks_done_s"] = {a: chunk_seconds(directory, a) for a in ATTACKS}
    record.data["figures"]["agreement"] = "not measured: cut at the stage's cap while compiling"


def eval_stage(record: StageRecord) -> None:
    with smoke_compile(record.smoke):
        _eval_stage(record)


def _eval_stage(record: StageRecord) -> None:
    if not record.smoke and not record.has_time(MIN_SECONDS):  # last in the check: what the others left
        return record.skip(f"budget: {record.remaining():.0f} s left, the eager evaluation needs ~{MIN_SECONDS} s")
    cfg, model, source, split = eval_setup(record)
    dev = next(model.parameters()).device
    rule = chunk_rule_row(record, cfg, model, dev)
    if not rule["repeats"]:
        record.fail(f"the chunk rule gave {rule['chunk_size']}, then {rule['again']}")
    eager = evaluation_row(record, "eager", model, split, cfg, dev, compiled=False)
    # last in the check, the stage runs in what the others leave: a cut while compiling leaves it ok, with the
    # chunks the compiled evaluation finished (their seconds) and a `cut` row
    with record.optional("compiled evaluation"):
        record.on_timeout = lambda: salvage(record)
        try:
            compiled = evaluation_row(record, "compiled", model, split, cfg, dev, compiled=True)
        except Exception as exc:  # noqa: BLE001 -- recorded as the stage's failure; the AA timing still gets its try
            compiled = None  # the whole traceback to the stage log, its end in a row (an Inductor error's first line
            traceback.print_exc()  # names only the subprocess that raised it)
            record.row({"case": "compiled", "ok": False, "error": error_line(exc),
                        "traceback": traceback_tail(exc, lines=20)})  # fmt: skip
            record.fail(f"compiled evaluation: {error_line(exc)}")
        record.on_timeout = None
    if compiled is not None:
        judge_compiled(record, eager, compiled)
    with record.optional("compiled AA timing"):
        if missing := autoattack_importable():
            record.row({"case": "compiled AA projection", "status": f"skipped: {missing}"})
        elif not record.has_time(AA_SECONDS):
            record.row({"case": "compiled AA projection", "status": BUDGET_SKIP})
        else:
            figures = {"clean": eager["clean"]["accuracy"], "pgd20": eager["pgd20"]["accuracy"]}
            if source.startswith("real_run"):  # its 200-image AA: the share of images Square and FAB-T face
                figures["aa"] = read_figures(record, "real_run").get("aa")
            guarded(record, "compiled AA projection", compiled_aa_row, record, model, split, cfg, dev, figures)
    if record.failed:
        raise StageFailed(record.data["error"])
