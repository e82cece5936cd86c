"""AutoAttack `standard` against `legacy-10` (the protocol of the torchattacks AutoAttack the AR-AT paper evaluated
with) on the same model, images and per-chunk seeds: each protocol's robust accuracy and per-stage figures, the time
each takes, and, image by image, how many images `legacy-10` counts robust that `standard` breaks (its over-read).

Issue 10 item 4: "so a user can see how much the paper's protocol over-reads robustness on the same model". Both
evaluations run the original AutoAttack code (pyautoattack) through engine.evaluate, fp32, chunk by chunk.

    python bench/aa_protocols.py --run runs/demo             # a run directory, an exported .pt or a state_dict
    python bench/aa_protocols.py --run $PYAUTOATTACK/examples/model_test.pt --num-examples 200
"""

from __future__ import annotations

import argparse
import time

from autoattack_bench import add_model_arguments, model_and_test_split, warm_up
from harness import append_jsonl, markdown_table, provenance, run_cli

from engine import autoattack
from engine.config import EvalConfig
from engine.evaluate import evaluate, unpack

PROTOCOLS = ("standard", "legacy-10")


def paired(standard: dict, legacy: dict) -> dict:
    """Image-by-image counts of two AutoAttack results on the same images."""
    n = standard["num_examples"]
    s, leg = unpack(standard["flags"], n), unpack(legacy["flags"], n)
    return {
        "robust_both": int((s & leg).sum()),
        "legacy_only": int((leg & ~s).sum()),  # counted robust by legacy-10, broken by standard: the over-read
        "standard_only": int((s & ~leg).sum()),
        "over_read_points": round(100 * (int(leg.sum()) - int(s.sum())) / n, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p, num_examples=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/aa_protocols.jsonl")
    args = p.parse_args()
    source, net, split, device = model_and_test_split(args)
    results, seconds = {}, {}
    for version in PROTOCOLS:
        cfg = EvalConfig(attacks=("clean", "aa"), num_examples=args.num_examples, batch_size=args.batch_size,
                         chunk_size=args.batch_size, aa_version=version)  # fmt: skip
        if not results:
            warm_up(net, split, cfg, device)  # the first protocol does not pay the first forwards alone
        start = time.perf_counter()
        results[version] = evaluate(net, split, cfg, device, seed=args.seed)
        seconds[version] = time.perf_counter() - start
    pairs = paired(results["standard"]["aa"], results["legacy-10"]["aa"])
    stamp = provenance(device)
    rows = [
        {"bench": "aa_protocols", "version": version, "model": str(source), "num_examples": args.num_examples,
         "clean_accuracy": results[version]["clean"]["accuracy"], "robust_accuracy": results[version]["aa"]["accuracy"],
         "stages": results[version]["aa"]["stages"], "seconds": round(seconds[version], 1),
         "protocol": autoattack.PROTOCOLS[version].describe()} | pairs | stamp
        for version in PROTOCOLS
    ]  # fmt: skip
    append_jsonl(args.out, rows)
    print(f"{stamp['cpu']} ({stamp['cpu_threads']} threads), {source}, first {args.num_examples} test images")
    for row in rows:  # the table's column: robust % after each stage, as AutoAttack logs it
        row["clean > apgd-ce > apgd-t > fab-t > square (%)"] = " > ".join(
            f"{100 * v:.1f}" for v in row["stages"].values()
        )
    columns = ["version", "num_examples", "robust_accuracy", "clean > apgd-ce > apgd-t > fab-t > square (%)", "seconds"]
    print(markdown_table(rows, columns))
    print(
        f"robust under both {pairs['robust_both']}; legacy-10 only (over-read) {pairs['legacy_only']}; "
        f"standard only {pairs['standard_only']}; legacy-10 reads {pairs['over_read_points']} points higher"
    )


if __name__ == "__main__":
    run_cli(main, "bench/aa_protocols.py")
