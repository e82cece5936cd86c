// The fused PGD step on CPU: one pass over flat storage, computed in float, split across torch's OpenMP pool.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "arat_native.h"

namespace arat_native {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task: amortises the fork, fits L2

template <typename scalar_t>
void pgd_step_kernel(const scalar_t* x, const scalar_t* x_adv, const scalar_t* grad, scalar_t* out, int64_t numel,
                     float eps, float alpha) {
  // Captured by value and written as selects (no std::min/max), so the loop if-converts and vectorises.
  at::parallel_for(0, numel, kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float g = static_cast<float>(grad[i]);
      const float center = static_cast<float>(x[i]);
      const float step = (g > 0.f ? alpha : 0.f) - (g < 0.f ? alpha : 0.f);  // torch.sign: 0 for 0 and NaN
      float moved = static_cast<float>(x_adv[i]) + step;
      // A NaN fails every comparison and is kept, as torch.clamp propagates it; a NaN bound (x) is taken, as
      // torch.clamp with tensor bounds takes it.
      const float lo = center - eps, hi = center + eps;
      moved = (lo != lo || moved < lo) ? lo : moved;
      moved = (hi != hi || moved > hi) ? hi : moved;
      moved = moved < 0.f ? 0.f : moved;
      out[i] = static_cast<scalar_t>(moved > 1.f ? 1.f : moved);
    }
  });
}

}  // namespace

at::Tensor pgd_step(const at::Tensor& x, const at::Tensor& x_adv, const at::Tensor& grad, double eps, double alpha) {
  TORCH_CHECK(x.strides() == x_adv.strides() && grad.strides() == x_adv.strides(), "pgd_step: strides must match");
  TORCH_CHECK(x.scalar_type() == x_adv.scalar_type() && grad.scalar_type() == x_adv.scalar_type(),
              "pgd_step: dtypes must match");
  TORCH_CHECK(x_adv.is_non_overlapping_and_dense(), "pgd_step: x_adv must be dense");
  at::Tensor out = at::empty_like(x_adv);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_adv.scalar_type(), "pgd_step", [&] {
    pgd_step_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), x_adv.const_data_ptr<scalar_t>(),
                              grad.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x_adv.numel(),
                              static_cast<float>(eps), static_cast<float>(alpha));
  });
  return out;
}

}  // namespace arat_native
