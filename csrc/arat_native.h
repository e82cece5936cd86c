// Native CPU kernels for the arat fused ops. They are registered as their own operator namespace
// `arat_native` (see registration.cpp); the public `arat::*` ops (Python custom ops in kernels/) call them on CPU
// after their eligibility check, so these functions may assume what that check guarantees and only TORCH_CHECK it.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace arat_native {

// clamp(clamp(x_adv + alpha * sign(grad), x - eps, x + eps), 0, 1); x, x_adv, grad dense with equal strides.
at::Tensor pgd_step(const at::Tensor& x, const at::Tensor& x_adv, const at::Tensor& grad, double eps, double alpha);

// (y like x, mean (2, C) fp32, biased var (2, C) fp32) for a (2B, C, H, W) batch, contiguous or channels-last.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_bn_forward(
    const at::Tensor& x, const at::Tensor& clean_weight, const at::Tensor& clean_bias, const at::Tensor& adv_weight,
    const at::Tensor& adv_bias, const at::Tensor& clean_running_mean, const at::Tensor& clean_running_var,
    const at::Tensor& adv_running_mean, const at::Tensor& adv_running_var, bool training, double eps, bool relu);

// (grad_x like x, grad_weight (2, C) fp32, grad_bias (2, C) fp32); grad_y has x's strides, y is needed for relu.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_bn_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& clean_weight,
    const at::Tensor& adv_weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    bool relu);

}  // namespace arat_native
