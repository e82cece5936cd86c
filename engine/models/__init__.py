"""Networks: CIFAR ResNet-18 and WRN-34-10 with Split-BN, feature taps, and export to a plain network."""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserError, shell_word
from .gemm_conv import GemmConv2d, set_gemm_convs
from .resnet import ResNet18
from .splitbn import BRANCHES, SplitBatchNorm2d, check_branch, set_dual_kernel, split_bn_layers
from .syncbn import SyncableBatchNorm1d, SyncableBatchNorm2d, set_sync_bn
from .wrn import WideResNet

__all__ = [
    "BRANCHES",
    "GemmConv2d",
    "ResNet18",
    "SplitBatchNorm2d",
    "SyncableBatchNorm1d",
    "SyncableBatchNorm2d",
    "WideResNet",
    "build_model",
    "check_branch",
    "export_state_dict",
    "read_weights",
    "run_network_file",
    "set_dual_kernel",
    "set_gemm_convs",
    "set_sync_bn",
    "split_bn_layers",
]


class CheckpointError(UserError):
    """A checkpoint that can't be read or doesn't fit the model; the message says what to do."""


def build_model(cfg: ModelConfig, num_classes: int, split_bn: bool | None = None) -> nn.Module:
    split = cfg.split_bn if split_bn is None else split_bn
    if cfg.arch == "resnet18":
        return ResNet18(num_classes, cfg.width, split)
    return WideResNet(num_classes, depth=34, widen=10, split_bn=split)


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's / DataParallel's, torch.compile's


def unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict without the key prefixes of DDP / DataParallel (`module.`) and torch.compile (`_orig_mod.`)
    wrappers, in either order and nested (`torch.compile(DDP(model))` saves `_orig_mod.module.`)."""
    return {unprefixed(k): v for k, v in state.items()}


def unprefixed(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def export_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split-BN state_dict (wrapped or not) -> plain state_dict: each adv BN becomes the ordinary BN, clean BNs are
    dropped, wrapper prefixes too (the file loads into a plain network)."""
    plain = {}
    for key, value in unwrapped(state).items():
        if ".clean." in key:
            continue
        plain[key.replace(".adv.", ".")] = value
    return plain


def load_plain(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a plain state_dict, with a one-line error when it belongs to another network."""
    own = model.state_dict()
    # TRADES's WideResNet builds a `sub_block1` that its forward never calls: its checkpoints carry those keys
    state = {k: v for k, v in unwrapped(state).items() if k in own or not k.startswith("sub_block1.")}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and state[k].shape != own[k].shape]
    classes = other_class_count(model, own, state, resized)
    if classes is not None and not missing and not unexpected:
        outputs = own[resized[0]].shape[0]
        raise CheckpointError(
            f"{source} classifies into {classes} classes, this network into {outputs}: weights for another dataset "
            f"(CIFAR-10: 10 classes, CIFAR-100: 100): use them on the dataset they were trained on (arat eval "
            f"--dataset, data.dataset), or weights trained on this one"
        )
    if missing or unexpected or resized:
        what = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else (f"shape of {resized[:3]}")
        )
        raise CheckpointError(f"{source} does not fit this model ({what}...): check --model / --width / model.width")
    model.load_state_dict(state)


def other_class_count(
    model: nn.Module, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], resized: list[str]
) -> int | None:
    """The weights' class count where only the classifier (the network's last linear layer) differs from `model`
    (whose state_dict is `own`) in its number of outputs, else None."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or not resized:
        return None
    head = {f"{linears[-1]}.weight", f"{linears[-1]}.bias"}
    if not set(resized) <= head or any(state[k].shape[1:] != own[k].shape[1:] for k in resized):
        return None
    return int(state[resized[0]].shape[0])


def read_checkpoint(path: str | Path, own: bool = False) -> dict:
    """What `torch.load(weights_only=True)` reads at `path`, on the CPU. `own`: a file this engine wrote (a run's
    training checkpoint), where an object of code is no other tool's way of saving but a damaged or foreign file."""
    try:
        with torch.serialization.safe_globals(data_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as e:  # weights_only's refusal of an object of code (named), or a broken pickle
        if (what := refused_object(e)) is not None and own:
            raise CheckpointError(f"{path} is not a readable checkpoint ({what}, which this engine never writes; "
                                  "loading it runs code from the file): restore the run's checkpoint from a copy "
                                  "you trust, or start the run again") from None  # fmt: skip
        if what is not None:
            raise CheckpointError(resave_line(path, what)) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}); it is corrupt or not a "
                              "PyTorch file") from None  # fmt: skip
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}); it is corrupt or not a PyTorch file"
        ) from None
    plain_numbers_only(loaded, path)
    return loaded


def plain_numbers_only(loaded, path: str | Path) -> None:
    """Refuse numpy values `data_globals` let through whose dtype is not a plain number type: a dtype's state in
    the file can give it fields of Python objects, which numpy then reads from the file's bytes as pointers (a
    crash, or worse, when a caller reads the value; helper-155)."""
    stack, seen = [loaded], set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
        elif isinstance(value, argparse.Namespace):
            stack.extend(vars(value).values())
        elif isinstance(value, np.ndarray | np.generic | np.dtype):
            dtype = value if isinstance(value, np.dtype) else value.dtype
            plain = dtype.fields is None and dtype.subdtype is None and not dtype.hasobject and dtype.kind in "biuf"
            if not plain or dtype != np.dtype(dtype.str):
                raise CheckpointError(f"{path} holds a numpy value of dtype {dtype!r}, not a plain number type: "
                                      "not loaded (its bytes could be read as pointers)")  # fmt: skip


def data_globals() -> list:
    """What other tools' checkpoints often hold beside their weights and what builds only data, allowed to
    `torch.load(weights_only=True)`: an `argparse.Namespace` of the run's options, numpy numbers and numeric arrays
    (an epoch, a best accuracy), under numpy 1's and numpy 2's module names. Objects of any other code stay
    refused (loading them runs that code)."""
    scalar, rebuild = np.int64(0).__reduce__()[0], np.zeros(1).__reduce__()[0]
    named = [(fn, f"numpy.{core}.multiarray.{fn.__name__}") for fn in (scalar, rebuild) for core in ("core", "_core")]
    numeric = {type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                            np.uint32, np.uint64, np.float16, np.float32, np.float64)}  # fmt: skip
    return [argparse.Namespace, np.ndarray, np.dtype, *named, *numeric]


def resave_line(path: str | Path, what: str) -> str:
    """One line for a checkpoint that `weights_only` refused (`what`: the object), and how a user who trusts the
    file saves its weights alone (the first of the layouts `nested_weights` knows, a whole network's state_dict)."""
    keys = ", ".join(repr(k) for k in ("model", *NESTED_KEYS))
    code = (
        f"import torch; c = torch.load({str(path)!r}, weights_only=False); w = next((c[k] for k in ({keys}) "
        "if isinstance(c, dict) and k in c), c); torch.save(getattr(w, 'state_dict', lambda: w)(), 'weights.pt')"
    )
    resave = f"python -c {shell_word(code)}"
    return (
        f"{path} holds {what} beside its weights, which this engine does not load (loading it runs code from the "
        f"file); if you trust the file, save the weights alone: {resave}, then use weights.pt"
    )


def refused_object(error: Exception) -> str | None:
    """What `weights_only` refused, from its message ("... GLOBAL argparse.Namespace was not an allowed global");
    None where it names none (a broken pickle, not an object refused)."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    return f"an object of {found.group(1)}" if found else None


NESTED_KEYS = ("state_dict", "model_state_dict", "net")  # where other tools' checkpoints hold the weights


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state_dict, config or None) from an engine checkpoint ({"model": ..., "config": ...}) or a plain state_dict.

    Anything else (a tensor, a list, values that are not tensors, a config that is not a mapping) is a
    `CheckpointError` with one line, before any of it reaches a model."""
    state = read_checkpoint(path)
    config = None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # (not {"model": "resnet18", ...})
        config = state.get("config")
        if config is not None and not isinstance(config, dict):
            raise CheckpointError(f"{path}: its 'config' is a {type(config).__name__}, not a config mapping")
        state = state["model"]
    elif isinstance(state, dict) and (key := nested_weights(state)):  # another tool's {"state_dict": ..., "epoch": ..}
        state = state[key]
    if not isinstance(state, dict) or not state:
        kind = "an empty dict" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointError(
            f"{path} holds {kind}, not network weights: pass an engine checkpoint, a run directory or a state_dict"
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} entries are not named tensors (e.g. {str(bad[0])[:60]!r}); it is not a state_dict"
        )
    return state, config


def nested_weights(checkpoint: dict) -> str | None:
    """The key under which another tool's checkpoint holds its state_dict (RobustBench's and most training codes'
    `state_dict`, `model_state_dict`, pytorch-cifar's `net`) beside other entries; None for a state_dict itself."""
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return None
    found = [k for k in NESTED_KEYS if isinstance(checkpoint.get(k), dict) and checkpoint[k]]
    if found and all(isinstance(v, torch.Tensor) for v in checkpoint[found[0]].values()):
        return found[0]
    return None


def run_network_file(path: str | Path) -> Path:
    """The file holding the network at `path`: a run directory's final network (checkpoints/final.pt), else `path`
    itself. A run without final.pt (not finished, or not started) is said in one line naming what it holds."""
    source = Path(path)
    if not source.is_dir():
        return source
    final, latest = source / "checkpoints" / "final.pt", source / "checkpoints" / "latest.pt"
    if final.exists():
        return final
    if latest.exists():
        finish = f"finish it with `arat train --resume {shell_word(source)}`"
        raise CheckpointError(f"{source} has not finished (no checkpoints/final.pt): {finish}, or name {latest} "
                              "for its last finished epoch's network")  # fmt: skip
    raise CheckpointError(f"{source} holds no network (no checkpoints/final.pt or latest.pt): name a finished run's "
                          "directory, a checkpoint or an exported file")  # fmt: skip
