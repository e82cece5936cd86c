"""The headline numbers of gpu_check.json (`summary`) and the printed tables. Torch-free."""

from __future__ import annotations

from typing import Any

CELL_CHARS = 220


def summarize(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers, each taken from the figures of the stage that measured it (None: not measured)."""
    fig = {name: record["figures"] for name, record in stages.items()}
    correct, speed, compiled = fig["kernels_correct"], fig["kernels_speed"], fig["compile"]
    return {
        "eager": {"b128": fig["step_eager"].get("b128"), "b512": fig["step_eager"].get("b512")},
        "cudnn_benchmark": fig["step_eager"].get("cudnn_benchmark"),
        "compiled": {
            "b128": compiled.get("b128"),
            "compile_s": compiled.get("compile_s"),
            "compile_s_at_least": compiled.get("compile_s_at_least"),  # cut at the cap before the first step ended
            "main_phase": compiled.get("main_phase"),  # where the main case was, "done" when it finished
            "compile_cache": compiled.get("compile_cache"),
        },
        "cuda_graphs": {"b128": fig["step_eager"].get("b128_cuda_graphs")},
        "conv_ceiling": fig["step_eager"].get("conv_ceiling"),
        "compile_variants": compiled.get("speed_vs_main"),
        "defaults": compiled.get("defaults"),  # what `arat train` runs, profiled
        "compile_variant_problems": compiled.get("extra_problems"),
        "graphs": compiled.get("unique_graphs"),
        "graph_breaks": compiled.get("graph_breaks"),
        "eager_frames": compiled.get("eager_frames"),
        "recompiles_after_warmup": compiled.get("recompiles_after_warmup"),
        "kernels": {
            "passed": correct.get("passed"),
            "total": correct.get("total"),
            "not_run": correct.get("not_run"),
            "pgd_stream_tb_s": speed.get("pgd_stream_tb_s"),
            "bn_stream_tb_s": speed.get("bn_stream_tb_s"),
            "inductor_beats_triton": speed.get("inductor_beats_triton"),
        },
        "methods": {k: fig["methods"].get(k) for k in ("ok", "total", "failed", "skipped")},
        "wrn34_10": fig["methods"].get("wrn34_10"),
        "real_run": {k: v for k, v in fig["real_run"].items() if k != "aa_projection"},
        "aa": fig["real_run"].get("aa_projection"),
        "evaluation": evaluation_summary(fig.get("eval", {})),
        "probes": fig["probes"] or None,
        "pytest_kernels": fig["pytest_kernels"] or None,
    }


def evaluation_summary(f: dict[str, Any]) -> dict[str, Any] | None:
    """The eval stage's figures: the chunk rule, eager vs compiled img/s and flag agreement, compiled AA."""
    if not f:
        return None
    keys = ("network", "images", "chunk_rule", "images_per_s", "images_per_s_replayed", "agreement",
            "pgd20_accuracy_gap", "compiled_first_chunk_s", "compiled_graphs", "compiled_chunks_done_s",
            "cut")  # fmt: skip
    return {k: f.get(k) for k in keys} | {"aa_compiled": f.get("aa_projection_compiled")}


def evaluation_line(e: dict[str, Any] | None) -> str:
    if not e:
        return "not measured"
    rule, ips, agree = e.get("chunk_rule") or {}, e.get("images_per_s") or {}, e.get("agreement") or {}
    if isinstance(agree, str):  # cut at the cap while compiling: the chunks it finished
        agree = {"(cut)": f"{agree}; compiled chunks done {e.get('compiled_chunks_done_s')}"}
    last = e.get("images_per_s_replayed") or {}
    speeds = "; ".join(f"{kind} " + ", ".join(f"{a} {fmt(v)} (replayed chunks {fmt((last.get(kind) or {}).get(a))})"
                                              for a, v in (ips.get(kind) or {}).items())
                       for kind in ("eager", "compiled"))  # fmt: skip
    return (f"chunk rule {fmt(rule.get('chunk_size'))} ({rule.get('reason')}, repeats: {rule.get('repeats')}); "
            f"img/s after the first chunk: {speeds}; compiled flags = eager on "
            + ", ".join(f"{a} {fmt(v)}" for a, v in agree.items())
            + f" (PGD-20 accuracy gap {fmt(e.get('pgd20_accuracy_gap'))})"
            + f"; first compiled chunk {e.get('compiled_first_chunk_s')} s; {e.get('network')}, "
            f"{e.get('images')}")  # fmt: skip


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c)[:CELL_CHARS] for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stage_rows(doc: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, r in doc["stages"].items():
        note = r["error"] or r["reason"] or ""
        rows.append([name, r["status"], fmt(r["seconds"]), fmt(r["cap_s"]), str(note).replace("|", "/")[:160]])
    return rows


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if not isinstance(value, float):
        return f"{value}{unit}"
    return (f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}") + unit


def throughput(h: dict[str, Any] | None) -> str:
    """One img/s headline: throughput, TFLOP/s, % of 989 and of the ceiling, epoch and 100-epoch time, memory."""
    if not h:
        return "not measured"
    return (
        f"{fmt(h.get('images_per_s'))} img/s, {fmt(h.get('tflops'))} TFLOP/s ({fmt(h.get('pct_989'), '%')} of 989, "
        f"{fmt(h.get('pct_ceiling'), '%')} of ceiling), {fmt(h.get('step_ms'))} ms/step, epoch "
        f"{fmt(h.get('epoch_s'))} s, 100 epochs {fmt(h.get('run100_min'))} min, {fmt(h.get('peak_mem_gib'))} GiB, "
        f"busy {fmt(h.get('busy_fraction'))}"
    )


def versions(env: dict[str, Any]) -> str:
    if not env:
        return "not recorded"
    keys = ("gpu_name", "driver", "torch", "triton", "cuda", "cudnn", "python", "numpy", "pyautoattack")
    return ", ".join(f"{k} {env.get(k)}" for k in keys if env.get(k) is not None)


def headline_rows(doc: dict[str, Any]) -> list[list[str]]:
    s, env, c = doc["summary"], doc["env"], doc["ceilings"]
    k, m, real = s["kernels"], s["methods"], s["real_run"]
    flags = doc["stages"]["ceilings"]["figures"].get("flags")
    dtype = doc["stages"]["ceilings"]["figures"].get("matmul_dtype") or "bf16"
    return [
        ["versions", versions(env)],
        ["ceilings", f"copy {fmt(c['copy_tb_s'])} TB/s, {dtype} matmul {fmt(c['bf16_matmul_tflops'])} TFLOP/s"
         + (f" FLAGGED: {'; '.join(flags)}" if flags else "")],
        ["kernels correct", f"{fmt(k['passed'])}/{fmt(k['total'])} pass"
                            + (f", {k['not_run']} not run (budget)" if k.get("not_run") else "")],
        ["kernels speed", f"pgd_step 64M stream {fmt(k['pgd_stream_tb_s'])} TB/s, dual BN stream "
         f"{fmt(k['bn_stream_tb_s'])} TB/s, Inductor beats Triton at: {fmt(k['inductor_beats_triton'])}"],
        ["RN18 B=128 eager", throughput(s["eager"]["b128"])],
        ["RN18 B=512 eager", throughput(s["eager"]["b512"])],
        ["cudnn.benchmark", cudnn_line(s.get("cudnn_benchmark"))],
        ["RN18 B=128 compiled", throughput(s["compiled"]["b128"]) + f"; graphs {fmt(s['graphs'])}, breaks "
         f"{fmt(s['graph_breaks'])}, recompiles after warm-up {fmt(s['recompiles_after_warmup'])}, "
         + (f"{s['eager_frames']} functions left uncompiled, " if s.get("eager_frames") else "") +
         f"{'cold' if s['compiled'].get('compile_cache') != 'warm' else 'warm-cache'} compile "
         f"{compile_seconds(s['compiled'])}"],
        ["RN18 B=128 eager + CUDA graphs", throughput(s["cuda_graphs"]["b128"])],
        ["RN18 B=128 convolutions alone", conv_line(s.get("conv_ceiling"), s["cuda_graphs"]["b128"] or s["eager"]["b128"])],  # noqa: E501
        ["compile variants", variants_line(s.get("compile_variants"), s.get("compile_variant_problems"))],
        ["RN18 B=128 `arat train` step", defaults_line(s.get("defaults"))],
        ["methods", f"{fmt(m['ok'])}/{fmt(m['total'])} ok" + (f" (failed: {', '.join(m['failed'])})" if m["failed"]
                                                              else "") + (f", {m['skipped']} skipped (budget)"
                                                                          if m.get("skipped") else "")],
        ["WRN-34-10 AR-AT", throughput(s["wrn34_10"])],
        ["2-epoch run", real_run_line(real)],
        ["AA projection", aa_line(s["aa"])],
        ["evaluation (CUDA)", evaluation_line(s.get("evaluation"))],
        ["AA projection, compiled", aa_line((s.get("evaluation") or {}).get("aa_compiled"))],
        ["probes", pytest_line(s["probes"])],
        ["pytest kernels", pytest_line(s["pytest_kernels"])],
    ]  # fmt: skip


def conv_line(conv: dict[str, Any] | None, step: dict[str, Any] | None) -> str:
    """The network's convolutions alone per dtype, and the share of that rate the uncompiled step reaches (its attack
    captured where measured)."""
    rates = (conv or {}).get("conv_ceiling_tflops")
    if not rates:
        return "not measured"
    line = ", ".join(f"{dtype} {fmt(tflops)}" for dtype, tflops in rates.items()) + " TFLOP/s"
    low = next((rates[d] for d in ("bfloat16", "float16") if d in rates), None)
    if low and step and step.get("tflops"):
        share = 100 * step["tflops"] / low
        line += f"; the step ({step.get('config')}) reaches {share:.0f}% of the lower precision's"
    return f"{line} ({conv.get('conv_ceiling_case')}, channels-last)"


def compile_seconds(c: dict[str, Any]) -> str:
    """The first compiled step's seconds, or where the main case stopped (a cut at the cap, a failure)."""
    text = f"{fmt(c.get('compile_s'))} s"
    if c.get("compile_s") is None and c.get("compile_s_at_least") is not None:
        text = f"> {fmt(c['compile_s_at_least'])} s"
    phase = c.get("main_phase")
    return text + (f" (main case stopped in: {phase})" if phase not in (None, "done") else "")


def defaults_line(d: dict[str, Any] | None) -> str:
    """The compile stage's `defaults` case (every perf switch at its default: compiled, attack captured)."""
    if not d:
        return "not measured"
    graphs = d.get("cuda_graphs") or {}
    captured = (
        f"; attacks: {graphs.get('captures')} captures, {graphs.get('replays')} replays, "
        f"{graphs.get('eager_calls')} eager calls after warm-up"
        if graphs
        else "; attacks not graphed"
    )
    return (f"{fmt(d.get('images_per_s'))} img/s, {fmt(d.get('step_ms'))} ms/step, GPU busy "
            f"{fmt(d.get('busy_fraction'))}, {fmt(d.get('kernels_per_step'))} kernels, "
            f"{fmt(d.get('launches_per_step'))} host kernel launches and "
            f"{fmt(d.get('graph_launches_per_step'))} graph launches per step{captured}")  # fmt: skip


def variants_line(v: dict[str, Any] | None, problems: list[str] | None = None) -> str:
    parts = ["speed vs compiled + kernels on: " + ", ".join(f"{k} {fmt(x)}x" for k, x in v.items())] if v else []
    if problems:
        parts.append("problems: " + "; ".join(problems))
    return "; ".join(parts) or "not measured"


def cudnn_line(c: dict[str, Any] | None) -> str:
    if not c:
        return "not measured"
    return "; ".join(
        f"B={b}: off {fmt(v.get('off'))} -> on {fmt(v.get('on'))} img/s ({fmt(v.get('gain_pct'), '%')})"
        for b, v in c.items()
    )


def real_run_line(r: dict[str, Any]) -> str:
    if not r:
        return "not run"
    pct = lambda v: fmt(None if v is None else round(100 * v, 2), "%")  # noqa: E731
    return (
        f"clean {pct(r.get('clean'))}, PGD-20 {pct(r.get('pgd20'))}, AA {pct(r.get('aa'))} (n={fmt(r.get('aa_n'))}); "
        + epochs_note(r)
        + (f"; FLAG: {r['epoch2_flag']}" if r.get("epoch2_flag") else "")
        + graphs_note(r.get("cuda_graphs"))
        + (f"; model_test.pt clean {pct(r['model_test_clean'])}" if r.get("model_test_clean") is not None else "")
    )


def epochs_note(r: dict[str, Any]) -> str:
    """Epoch 2's time, or epoch 1's where real_run planned one epoch (step_eager's step said two would not fit)."""
    if r.get("epochs_planned") == 1:
        return f"1 epoch planned ({r.get('one_epoch_because')}): epoch 1 {fmt(r.get('epoch1_s'))} s, warm-up included"
    return f"epoch 2 {fmt(r.get('epoch2_s'))} s ({fmt(r.get('epoch2_images_per_s'))} img/s)"


def graphs_note(stats: dict[str, Any] | None) -> str:
    """The captured attacks of a training run, where any ran uncaptured."""
    if not stats or not stats.get("eager_calls"):
        return ""
    return f"; FLAG: {stats['eager_calls']} attacks ran uncaptured ({stats.get('captures')} captures)"


def aa_line(a: dict[str, Any] | None) -> str:
    if not a:
        return "not measured"
    return f"standard AA on 10k ~{fmt(a.get('aa_10k_min'))} min ({a.get('basis', '')})"


def pytest_line(p: dict[str, Any] | None) -> str:
    if not p:
        return "not run"
    counts = ", ".join(f"{p[k]} {k}" for k in ("passed", "failed", "errors", "skipped", "collected") if p.get(k))
    first = p.get("failures") or []
    return (
        (counts or "no result")
        + (" (partial: cut at the cap)" if p.get("partial") else "")
        + (f"; first: {first[0]}" if first else "")
    )
