"""A tiny Split-BN network run as ONE pass over cat([clean, adv]) with dual_batch_norm equals TWO passes (clean
through the clean BNs, adv through the adversarial BNs): same losses, same gradients of every parameter, same
running buffers, over two optimizer steps and then in eval mode. fp32; tolerance 1e-5 abs / 1e-4 rel on losses
and gradients (the reductions run in another order), 1e-6 / 1e-5 on buffers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import dual_batch_norm

BATCH, CLASSES = 5, 4


class TinySplitBNNet(nn.Module):
    """conv -> BN -> relu -> conv -> BN -> pool -> linear, with a clean and an adversarial BN at each BN site."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 7, 3, padding=1, bias=False)
        self.clean_bn = nn.ModuleList([nn.BatchNorm2d(6), nn.BatchNorm2d(7)])
        self.adv_bn = nn.ModuleList([nn.BatchNorm2d(6), nn.BatchNorm2d(7)])
        self.fc = nn.Linear(7, CLASSES)
        for bn in [*self.clean_bn, *self.adv_bn]:  # distinct, non-trivial affine parameters per set
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.3, 0.3)

    def forward_split(self, x: torch.Tensor, bns: nn.ModuleList) -> torch.Tensor:
        h = F.relu(bns[0](self.conv1(x)))
        h = bns[1](self.conv2(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def forward_dual(self, x_cat: torch.Tensor) -> torch.Tensor:
        h = self._dual_bn(self.conv1(x_cat), 0, relu=True)  # (2B, 6, H, W)
        h = self._dual_bn(self.conv2(h), 1, relu=False)  # (2B, 7, H, W)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def _dual_bn(self, h: torch.Tensor, site: int, relu: bool) -> torch.Tensor:
        clean, adv = self.clean_bn[site], self.adv_bn[site]
        return dual_batch_norm(
            h,
            clean.weight,
            clean.bias,
            clean.running_mean,
            clean.running_var,
            adv.weight,
            adv.bias,
            adv.running_mean,
            adv.running_var,
            self.training,
            clean.momentum,
            clean.eps,
            relu,
        )


def loss_of(logits_clean, logits_adv, labels):
    """Cross-entropy on both halves plus a clean/adv consistency term that couples them, as AR-AT does."""
    consistency = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_clean, 1), reduction="batchmean")
    return F.cross_entropy(logits_clean, labels) + F.cross_entropy(logits_adv, labels) + consistency


def two_pass_step(net, x_clean, x_adv, labels):
    return loss_of(net.forward_split(x_clean, net.clean_bn), net.forward_split(x_adv, net.adv_bn), labels)


def one_pass_step(net, x_clean, x_adv, labels):
    logits = net.forward_dual(torch.cat([x_clean, x_adv]))
    return loss_of(logits[:BATCH], logits[BATCH:], labels)


@pytest.mark.parametrize("channels_last", [True, False])
def test_one_dual_pass_equals_two_split_passes(backend, channels_last):
    _, device = backend
    torch.manual_seed(0)
    two = TinySplitBNNet().to(device)
    one = copy.deepcopy(two)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    two, one = two.to(memory_format=fmt), one.to(memory_format=fmt)
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1) for net in (two, one)]
    for _ in range(2):
        x_clean = torch.rand(BATCH, 3, 7, 5, device=device).contiguous(memory_format=fmt)
        x_adv = (x_clean + 0.1 * torch.randn_like(x_clean)).clamp(0, 1)
        labels = torch.randint(0, CLASSES, (BATCH,), device=device)
        losses = [step(net, x_clean, x_adv, labels) for step, net in ((two_pass_step, two), (one_pass_step, one))]
        for loss, optimizer in zip(losses, optimizers, strict=True):
            optimizer.zero_grad()
            loss.backward()
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-4)
        for (name, p_two), p_one in zip(two.named_parameters(), one.parameters(), strict=True):
            torch.testing.assert_close(p_one.grad, p_two.grad, atol=1e-5, rtol=1e-4, msg=name)
        for optimizer in optimizers:
            optimizer.step()
    for (name, b_two), b_one in zip(two.named_buffers(), one.buffers(), strict=True):
        if not name.endswith("num_batches_tracked"):  # counted by nn.BatchNorm2d.forward, not by F.batch_norm
            torch.testing.assert_close(b_one, b_two, atol=1e-6, rtol=1e-5, msg=name)
    two.eval(), one.eval()
    with torch.no_grad():
        eval_losses = [two_pass_step(two, x_clean, x_adv, labels), one_pass_step(one, x_clean, x_adv, labels)]
    torch.testing.assert_close(eval_losses[1], eval_losses[0], atol=1e-5, rtol=1e-4)
