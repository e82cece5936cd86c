"""The Triton kernel x config list that kernels.aot compiles ahead of time for dual batch norm."""

from __future__ import annotations

from .triton_impl import (
    BLOCK_P,
    FINALIZE_BLOCK_C,
    NUM_WARPS,
    Plan,
    _backward_dx_kernel,
    _backward_finalize_kernel,
    _backward_partial_kernel,
    _normalize_kernel,
    _stats_finalize_kernel,
    _stats_partial_kernel,
    make_plan,
)

AOT_SHAPES = ((64, 32 * 32), (128, 16 * 16), (256, 8 * 8), (512, 4 * 4))  # (C, H*W) of ResNet-18 on CIFAR
AOT_BATCH = 2 * 128  # clean + adversarial halves of a 128-image batch
AOT_PROGRAMS = 4 * 132  # program_target() on an H100 SXM (132 SMs)


def aot_specs() -> list[dict]:
    """Every kernel x config the launchers produce for ResNet-18 activations, both layouts, fp32, bf16 and fp16.

    Integer arguments carry the values the launcher passes for that activation ("values"), so kernels.aot
    specialises them as the runtime does (1 -> constant, multiple of 16 -> divisibility hint).
    """
    plans = {}
    for channels, spatial in AOT_SHAPES:
        for channels_last in (True, False):
            p = make_plan((AOT_BATCH, channels, spatial, 1), channels_last, AOT_PROGRAMS)
            plans.setdefault((channels_last, p.block_s, p.block_c), p)  # one activation per distinct tile config
    first = next(iter(plans.values()))
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):  # fp16: autocast's dtype on a GPU without bf16 (and perf.dtype=fp16)
        for p in plans.values():
            specs += _tile_specs(dtype, p)
        specs += [_stats_finalize_spec(dtype, True, channels_last, first) for channels_last in (True, False)]
        specs.append(_stats_finalize_spec(dtype, False, True, first))  # eval never reads x: the layout is unused
    specs += [_backward_finalize_spec(training, first) for training in (True, False)]
    return specs


def _values(p: Plan, *names: str) -> dict[str, int]:
    known = {
        "B": p.half,
        "C": p.channels,
        "S": p.spatial,
        "num_s_blocks": p.num_s_blocks,
        "tiles_per_prog": p.tiles_per_prog,
        "num_chunks": p.num_chunks,
    }
    return {name: known[name] for name in names}


def _spec(name: str, fn, args: dict[str, str], constexprs: dict, values: dict[str, int]) -> dict:
    signature = {**args, **dict.fromkeys(constexprs, "constexpr")}
    label = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())
    return {
        "name": f"{name}[{label}]",
        "fn": fn,
        "signature": signature,
        "constexprs": constexprs,
        "values": values,
        "num_warps": NUM_WARPS,
    }


def _tile_specs(dtype: str, p: Plan) -> list[dict]:
    x, f32 = f"*{dtype}", "*fp32"
    tile = {"CHANNELS_LAST": p.channels_last, "BLOCK_S": p.block_s, "BLOCK_C": p.block_c}
    reduce_ints = ("B", "C", "S", "num_s_blocks", "tiles_per_prog")
    map_ints = ("B", "C", "S", "num_s_blocks")
    stats_args = {"x_ptr": x, "sum_ptr": f32, "sumsq_ptr": f32, **_ints(*reduce_ints)}
    stats_values = _values(p, *reduce_ints)
    specs = [_spec(f"dual_bn_stats_partial[{dtype}]", _stats_partial_kernel, stats_args, tile, stats_values)]
    for relu in (False, True):
        flags = {"CHANNELS_LAST": p.channels_last, "RELU": relu, "BLOCK_S": p.block_s, "BLOCK_C": p.block_c}
        maps = _pointers(("x_ptr", "y_ptr"), x) | _pointers(("scale_ptr", "shift_ptr"), f32)
        specs.append(
            _spec(
                f"dual_bn_normalize[{dtype}]",
                _normalize_kernel,
                {**maps, **_ints(*map_ints)},
                flags,
                _values(p, *map_ints),
            )
        )
        maps = _pointers(("grad_ptr", "x_ptr", "y_ptr"), x) | _pointers(("mean_ptr", "sum_g_ptr", "sum_gx_ptr"), f32)
        specs.append(
            _spec(
                f"dual_bn_backward_partial[{dtype}]",
                _backward_partial_kernel,
                {**maps, **_ints(*reduce_ints)},
                flags,
                _values(p, *reduce_ints),
            )
        )
        maps = _pointers(("grad_ptr", "x_ptr", "y_ptr"), x) | _pointers(("mean_ptr", "coef_ptr"), f32)
        for training in (True, False):
            specs.append(
                _spec(
                    f"dual_bn_backward_dx[{dtype}]",
                    _backward_dx_kernel,
                    {**maps, "dx_ptr": x, **_ints(*map_ints)},
                    {"TRAINING": training, **flags},
                    _values(p, *map_ints),
                )
            )
    return specs


def _stats_finalize_spec(dtype: str, training: bool, channels_last: bool, p: Plan) -> dict:
    params = (
        "clean_weight_ptr",
        "clean_bias_ptr",
        "adv_weight_ptr",
        "adv_bias_ptr",
        "clean_mean_ptr",
        "clean_var_ptr",
        "adv_mean_ptr",
        "adv_var_ptr",
        "mean_ptr",
        "var_ptr",
        "scale_ptr",
        "shift_ptr",
    )
    args = {
        "x_ptr": f"*{dtype}",
        **_pointers(("sum_ptr", "sumsq_ptr"), "*fp32"),
        "num_chunks": "i32",
        **_pointers(params, "*fp32"),
        **_ints("B", "C", "S"),
        "eps": "fp32",
    }
    flags = {"TRAINING": training, "CHANNELS_LAST": channels_last, "BLOCK_P": BLOCK_P, "BLOCK_C": FINALIZE_BLOCK_C}
    values = _values(p, "num_chunks", "B", "C", "S")
    return _spec(f"dual_bn_stats_finalize[{dtype}]", _stats_finalize_kernel, args, flags, values)


def _backward_finalize_spec(training: bool, p: Plan) -> dict:
    names = (
        "sum_g_ptr",
        "sum_gx_ptr",
        "var_ptr",
        "clean_weight_ptr",
        "adv_weight_ptr",
        "grad_weight_ptr",
        "grad_bias_ptr",
        "coef_ptr",
    )
    pointers = _pointers(names, "*fp32")
    args = {
        **{k: pointers[k] for k in names[:2]},
        "num_chunks": "i32",
        **{k: pointers[k] for k in names[2:]},
        **_ints("B", "C", "S"),
        "eps": "fp32",
    }
    flags = {"TRAINING": training, "BLOCK_P": BLOCK_P, "BLOCK_C": FINALIZE_BLOCK_C}
    values = _values(p, "num_chunks", "B", "C", "S")
    return _spec("dual_bn_backward_finalize", _backward_finalize_kernel, args, flags, values)


def _pointers(names, kind: str) -> dict[str, str]:
    return dict.fromkeys(names, kind)


def _ints(*names: str) -> dict[str, str]:
    return dict.fromkeys(names, "i32")
