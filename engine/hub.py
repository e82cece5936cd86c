"""Load an exported network for other tools: an eval-mode `nn.Module` mapping [0, 1] images to logits.

    from engine.hub import load_model
    model = load_model("rn18_plain.pt")              # `arat export` output, a run directory, or a checkpoint
    logits = model(images)                            # (N, 3, 32, 32) in [0, 1] -> (N, classes)

That is the convention AutoAttack, torchattacks and RobustBench expect (no normalization inside or outside). The
architecture comes from the weights' names and shapes (so a plain state_dict of either network loads too).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .models import CheckpointError, build_model, export_state_dict, load_plain, read_weights, run_network_file
from .perf import EvalForward


def info_path(weights: str | Path) -> Path:
    """Where `arat export OUT.pt` writes the model_info JSON: OUT.json."""
    return Path(weights).with_suffix(".json")


def infer_config(state: dict[str, torch.Tensor]) -> tuple[ModelConfig, int]:
    """(architecture, number of classes) from a plain state_dict's names and shapes."""
    if "linear.weight" in state and "layer4.1.conv2.weight" in state:
        return ModelConfig(arch="resnet18", width=int(state["conv1.weight"].shape[0]), split_bn=False), int(
            state["linear.weight"].shape[0]
        )
    if "fc.weight" in state and "block3.layer.0.conv1.weight" in state:
        return ModelConfig(arch="wrn34-10", split_bn=False), int(state["fc.weight"].shape[0])
    raise CheckpointError("the weights are neither this engine's ResNet-18 nor its WRN-34-10 (by their names)")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The network at `path` (an `arat export` file, an engine checkpoint, or a run directory: its final network,
    adv BNs), in eval mode, on `device`, taking [0, 1] inputs."""
    source = run_network_file(path)
    state, _ = read_weights(source)
    net = plain_network(export_state_dict(state), str(source))
    return EvalForward(net).to(device).eval()  # the plain network's single BN holds the adv-BN statistics


def plain_network(plain: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The plain network `plain` (a plain state_dict) loads into, named by its weights' names and shapes (a
    model_info JSON beside them is not needed: one that is foreign or broken, a common name, raised before)."""
    cfg, classes = infer_config(plain)
    net = build_model(cfg, classes, split_bn=False)
    load_plain(net, plain, source)
    return net
