"""Training-time analysis (METHOD 5): gradient similarity and conflict ratio between the classification and the
invariance loss, per step, over the concatenated weights of every Conv2d and Linear of the backbone (no BN, no
biases, no predictors). It costs two extra backward passes per step; results stay on the device.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError, TrainConfig
from .distributed import DistInfo, mean_over_ranks_of
from .perf import compile_wanted, resolve_device


def backbone_weights(networks: list[nn.Module]) -> list[nn.Parameter]:
    """The weight of every Conv2d and Linear of `networks` that is trained (frozen teachers drop out)."""
    return [
        m.weight
        for net in networks
        for m in net.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.requires_grad
    ]


def grad_similarity(grads_a: list[torch.Tensor], grads_b: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cosine between the two concatenated gradients, and the fraction of weights where they disagree in sign."""
    dot, norm_a, norm_b, conflicts, count = 0, 0, 0, 0, 0
    for a, b in zip(grads_a, grads_b, strict=True):
        a, b = a.float(), b.float()
        dot = dot + (a * b).sum()
        norm_a, norm_b = norm_a + a.square().sum(), norm_b + b.square().sum()
        conflicts = conflicts + (a.sign() * b.sign() < 0).sum()  # not a * b: a product of tiny values underflows
        count += a.numel()
    cosine = dot / (norm_a.sqrt() * norm_b.sqrt()).clamp_min(1e-12)
    # a step whose scaled fp16 gradients overflowed (GradScaler skips it too) counts in no mean: `grad_sim_steps`
    finite = torch.isfinite(cosine)
    zero = torch.zeros((), device=cosine.device)
    conflict = conflicts.float() / count
    return {"grad_sim": torch.where(finite, cosine, zero), "grad_conflict": torch.where(finite, conflict, zero),
            "grad_sim_steps": finite.float()}  # fmt: skip


class GradSim:
    """Per-step gradient similarity of the `cls` and `inv` loss terms over fixed backbone weights. Under DDP each
    term's gradient is averaged over the ranks first: the cosine of the synchronized gradients, as one process over
    the whole batch measures it (a mean of per-rank cosines reads lower: each rank's gradient is noisier)."""

    def __init__(self, weights: list[nn.Parameter], dist: DistInfo | None = None):
        self.weights = weights
        self.dist = dist or DistInfo()

    def __call__(self, terms: dict[str, torch.Tensor], scale=None) -> dict[str, torch.Tensor]:
        """`scale`: the step's GradScaler.scale: under fp16 the terms' gradients are taken scaled, as the step's own
        are (unscaled, the small invariance gradients underflow to zero and read as agreement); the cosine and the
        signs do not change under a common scale."""
        if "cls" not in terms or "inv" not in terms:  # no invariance term (AT, standard training)
            return {}
        grads = [self._grads(terms[k] if scale is None else scale(terms[k])) for k in ("cls", "inv")]
        return grad_similarity(*(mean_over_ranks_of(g, self.dist) for g in grads))

    def _grads(self, loss: torch.Tensor) -> list[torch.Tensor]:
        # retain_graph: the step's own backward runs on the same graph afterwards
        grads = torch.autograd.grad(loss, self.weights, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for w, g in zip(self.weights, grads, strict=True)]


def build_grad_sim(
    cfg: TrainConfig, model: nn.Module, extra: list[nn.Module], dist: DistInfo | None = None
) -> GradSim | None:
    """The analysis for a run (None unless `analysis.grad_sim`): the model plus the method's other trained
    networks (`Method.backbones`, e.g. LBGAT's clean model). Its first backward keeps the graph for the step's own
    (retain_graph), so no compiled backward may overwrite its saved tensors: `keep_saved_tensors`."""
    if not cfg.analysis.grad_sim:
        return None
    if compile_wanted(cfg.perf, resolve_device(cfg.perf.device)):  # (uncompiled, no backward reuses saved tensors:
        keep_saved_tensors()  # the process's compiled functions and Inductor's caches are left alone; helper-154)
    return GradSim(backbone_weights([model, *extra]), dist)


def keep_saved_tensors() -> None:
    """Compiled backwards from here on in this process keep their saved tensors (process-wide; call it before the
    first compile). torch.compile's backward may reuse the tensors it saved as its own buffers ("donated buffers"),
    which a second backward over the same graph then reads overwritten: gradients silently wrong. So: donated
    buffers off; graphs this process compiled with them dropped (dynamo does not guard on the switch: they would be
    reused); and Inductor's on-disk caches neither read nor written, since Inductor's graph cache does not key on
    donated buffers (torch 2.13): a backward compiled with them by a run without grad-sim (an ablation after
    `arat-...`) was loaded and gave gradients up to 5.8 away from eager's on a 3-layer test network
    (tests/test_analysis.py). A grad-sim run compiles from scratch: minutes on a CPU, about one on a GPU. An
    environment that forces the caches on is refused in one line."""
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config
    import torch.compiler.config

    if torch._functorch.config.donated_buffer:
        torch._functorch.config.donated_buffer = False
        torch._dynamo.reset()
    # force_disable_caches too: TORCHINDUCTOR_FX_GRAPH_CACHE / TORCHINDUCTOR_AUTOGRAD_CACHE set in the environment
    # override the two switches (helper-114 reproduced the wrong gradients with them set); read back, since the
    # environment can override that one as well
    torch._inductor.config.force_disable_caches = True  # (torch.compiler.config's from torch 2.9, aliased here)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    if not torch._inductor.config.force_disable_caches:
        raise ConfigError(
            "analysis.grad_sim under torch.compile needs Inductor's caches off, and TORCHINDUCTOR_FORCE_DISABLE_CACHES"
            " (or TORCH_COMPILE_FORCE_DISABLE_CACHES) in the environment keeps them on: unset it, or perf.compile=off"
        )
