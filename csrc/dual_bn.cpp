// Dual batch norm on CPU for a (2B, C, H, W) batch, contiguous or channels-last: rows [0, B) use the clean
// parameters and statistics, rows [B, 2B) the adversarial ones. Reductions split each half into a fixed number of
// sample chunks (independent of the thread count, so results are deterministic), accumulate in double, and add the
// chunk partials in order; element-wise passes run over rows (channels-last) or (sample, channel) planes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "arat_native.h"

namespace arat_native {
namespace {

constexpr int64_t kChunksPerHalf = 32;

struct Geometry {
  int64_t half;      // B, samples per half
  int64_t channels;  // C
  int64_t spatial;   // H * W
  bool channels_last;

  int64_t offset(int64_t n, int64_t c, int64_t s) const {
    return channels_last ? (n * spatial + s) * channels + c : (n * channels + c) * spatial + s;
  }
  double count() const { return static_cast<double>(half * spatial); }
};

Geometry geometry_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.size(0) % 2 == 0, "dual_bn: x must be (2B, C, H, W)");
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || x.is_contiguous(), "dual_bn: x must be contiguous or channels-last");
  return {x.size(0) / 2, x.size(1), x.size(2) * x.size(3), channels_last};
}

// Sums of term(h, c, i) over one sample's rows, channels-last: float accumulators (S terms), added into double.
template <typename Term>
void reduce_sample_channels_last(const Geometry& geo, const Term term, int64_t h, int64_t n, float* acc,
                                 double* first, double* second) {
  const int64_t C = geo.channels;
  float* acc_first = acc;
  float* acc_second = acc + C;
  std::fill_n(acc, 2 * C, 0.f);
  for (int64_t s = 0; s < geo.spatial; ++s) {
    const int64_t row = geo.offset(n, 0, s);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const std::pair<float, float> t = term(h, c, row + c);
      acc_first[c] += t.first;
      acc_second[c] += t.second;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    first[c] += acc_first[c];
    second[c] += acc_second[c];
  }
}

// The same for a contiguous (N, C, S) sample: one contiguous plane of S values per channel.
template <typename Term>
void reduce_sample_planes(const Geometry& geo, const Term term, int64_t h, int64_t n, double* first, double* second) {
  for (int64_t c = 0; c < geo.channels; ++c) {
    const int64_t plane = geo.offset(n, c, 0);
    float a = 0.f, b = 0.f;
#pragma omp simd reduction(+ : a, b)
    for (int64_t s = 0; s < geo.spatial; ++s) {
      const std::pair<float, float> t = term(h, c, plane + s);
      a += t.first;
      b += t.second;
    }
    first[c] += a;
    second[c] += b;
  }
}

// Per (half, channel) sums of the two values term(half, c, offset) returns: a (2 sums, 2 halves, C) vector.
template <typename Term>
std::vector<double> reduce_per_channel(const Geometry& geo, const Term& term) {
  const int64_t C = geo.channels, chunks = std::min(geo.half, kChunksPerHalf);
  std::vector<double> partial(2 * chunks * 2 * C, 0.0);  // (half, chunk, sum, C)
  at::parallel_for(0, 2 * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(2 * C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / chunks, chunk = task % chunks;
      double* first = partial.data() + task * 2 * C;
      for (int64_t n = h * geo.half + chunk; n < (h + 1) * geo.half; n += chunks) {
        if (geo.channels_last) {
          reduce_sample_channels_last(geo, term, h, n, acc.data(), first, first + C);
        } else {
          reduce_sample_planes(geo, term, h, n, first, first + C);
        }
      }
    }
  });
  std::vector<double> sums(2 * 2 * C, 0.0);  // (sum, half, C)
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t k = 0; k < 2; ++k)
        for (int64_t c = 0; c < C; ++c) sums[(k * 2 + h) * C + c] += partial[((h * chunks + chunk) * 2 + k) * C + c];
  return sums;
}

// Calls body(half, c, offset) for every element: rows (channels-last) or (sample, channel) planes in parallel.
template <typename Body>
void for_each_element(const Geometry& geo, const Body& body) {
  const int64_t C = geo.channels, S = geo.spatial;
  if (geo.channels_last) {
    at::parallel_for(0, 2 * geo.half * S, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t h = row / (geo.half * S);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) body(h, c, row * C + c);
      }
    });
    return;
  }
  at::parallel_for(0, 2 * geo.half * C, std::max<int64_t>(1, 16384 / S), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t h = plane / (geo.half * C), c = plane % C;
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) body(h, c, plane * S + s);
    }
  });
}

// (2, C) float values: clean tensor in row 0, adversarial in row 1.
std::vector<float> per_half(const at::Tensor& clean, const at::Tensor& adv) {
  TORCH_CHECK(clean.scalar_type() == at::kFloat && adv.scalar_type() == at::kFloat && clean.is_contiguous() &&
                  adv.is_contiguous(),
              "dual_bn: parameters and statistics must be contiguous float32");
  std::vector<float> out(clean.numel() + adv.numel());
  std::copy_n(clean.const_data_ptr<float>(), clean.numel(), out.begin());
  std::copy_n(adv.const_data_ptr<float>(), adv.numel(), out.begin() + clean.numel());
  return out;
}

at::Tensor stat_tensor(const std::vector<float>& values, int64_t channels) {
  at::Tensor out = at::empty({2, channels}, at::TensorOptions().dtype(at::kFloat));
  std::copy(values.begin(), values.end(), out.mutable_data_ptr<float>());
  return out;
}

template <typename scalar_t>
void batch_stats(const at::Tensor& x, const Geometry& geo, std::vector<float>& mean, std::vector<float>& var) {
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  const int64_t C = geo.channels;
  std::vector<float> shift(2 * C);  // x[first sample of the half, c, 0]: keeps E[(x-k)^2] - E[x-k]^2 stable
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t c = 0; c < C; ++c) shift[h * C + c] = static_cast<float>(data[geo.offset(h * geo.half, c, 0)]);
  const float* k = shift.data();
  const std::vector<double> sums = reduce_per_channel(geo, [=](int64_t h, int64_t c, int64_t i) {
    const float d = static_cast<float>(data[i]) - k[h * C + c];
    return std::pair<float, float>(d, d * d);
  });
  for (int64_t i = 0; i < 2 * C; ++i) {
    const double shifted_mean = sums[i] / geo.count();
    mean[i] = static_cast<float>(shift[i] + shifted_mean);
    var[i] = static_cast<float>(std::max(sums[2 * C + i] / geo.count() - shifted_mean * shifted_mean, 0.0));
  }
}

template <typename scalar_t>
void normalize(const at::Tensor& x, at::Tensor& y, const Geometry& geo, const std::vector<float>& scale,
               const std::vector<float>& shift, bool relu) {
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* out = y.mutable_data_ptr<scalar_t>();
  const float *a = scale.data(), *b = shift.data();
  const int64_t C = geo.channels;
  const float floor = relu ? 0.f : -INFINITY;
  for_each_element(geo, [=](int64_t h, int64_t c, int64_t i) {
    out[i] = static_cast<scalar_t>(std::max(static_cast<float>(in[i]) * a[h * C + c] + b[h * C + c], floor));
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_bn_forward(
    const at::Tensor& x, const at::Tensor& clean_weight, const at::Tensor& clean_bias, const at::Tensor& adv_weight,
    const at::Tensor& adv_bias, const at::Tensor& clean_running_mean, const at::Tensor& clean_running_var,
    const at::Tensor& adv_running_mean, const at::Tensor& adv_running_var, bool training, double eps, bool relu) {
  const Geometry geo = geometry_of(x);
  std::vector<float> mean(2 * geo.channels), var(2 * geo.channels);
  if (training) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dual_bn_stats",
                                    [&] { batch_stats<scalar_t>(x, geo, mean, var); });
  } else {
    mean = per_half(clean_running_mean, adv_running_mean);
    var = per_half(clean_running_var, adv_running_var);
  }
  std::vector<float> scale = per_half(clean_weight, adv_weight), shift = per_half(clean_bias, adv_bias);
  for (size_t i = 0; i < scale.size(); ++i) {
    scale[i] = static_cast<float>(scale[i] / std::sqrt(static_cast<double>(var[i]) + eps));
    shift[i] -= mean[i] * scale[i];
  }
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dual_bn_normalize",
                                  [&] { normalize<scalar_t>(x, y, geo, scale, shift, relu); });
  return {y, stat_tensor(mean, geo.channels), stat_tensor(var, geo.channels)};
}

namespace {

// kRelu is a template parameter so the ReLU mask is a branch-free select and the loops vectorise.
template <typename scalar_t, bool kRelu>
void backward_impl(const at::Tensor& grad_y, const at::Tensor& x, const scalar_t* y, const Geometry& geo,
                   const std::vector<float>& weight, const float* mean, const float* var, bool training, double eps,
                   at::Tensor& grad_x, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const scalar_t *g = grad_y.const_data_ptr<scalar_t>(), *in = x.const_data_ptr<scalar_t>();
  const int64_t C = geo.channels;
  auto grad_at = [=](int64_t i) {  // the incoming gradient, zero where the fused ReLU was off
    const float v = static_cast<float>(g[i]);
    if constexpr (kRelu) return static_cast<float>(y[i]) <= 0.f ? 0.f : v;  // NaN passes, as in torch
    return v;
  };
  const std::vector<double> sums = reduce_per_channel(geo, [=](int64_t h, int64_t c, int64_t i) {
    const float gi = grad_at(i);
    return std::pair<float, float>(gi, gi * (static_cast<float>(in[i]) - mean[h * C + c]));
  });
  std::vector<float> coef_g(2 * C), coef_x(2 * C, 0.f), coef_b(2 * C, 0.f);
  float *gw = grad_weight.mutable_data_ptr<float>(), *gb = grad_bias.mutable_data_ptr<float>();
  for (int64_t i = 0; i < 2 * C; ++i) {
    const double invstd = 1.0 / std::sqrt(static_cast<double>(var[i]) + eps);
    gb[i] = static_cast<float>(sums[i]);
    gw[i] = static_cast<float>(sums[2 * C + i] * invstd);
    coef_g[i] = static_cast<float>(weight[i] * invstd);
    if (training) {  // batch statistics depend on x: grad_x = scale * (g - mean(g) - xhat * mean(g * xhat))
      coef_x[i] = static_cast<float>(-weight[i] * invstd * invstd * gw[i] / geo.count());
      coef_b[i] = static_cast<float>(-weight[i] * invstd * sums[i] / geo.count());
    }
  }
  scalar_t* dx = grad_x.mutable_data_ptr<scalar_t>();
  const float *cg = coef_g.data(), *cx = coef_x.data(), *cb = coef_b.data();
  if (training) {
    for_each_element(geo, [=](int64_t h, int64_t c, int64_t i) {
      const int64_t j = h * C + c;
      dx[i] = static_cast<scalar_t>(cg[j] * grad_at(i) + cx[j] * (static_cast<float>(in[i]) - mean[j]) + cb[j]);
    });
  } else {  // running statistics are constants: x is not read (0 * NaN would make a NaN input's gradient NaN)
    for_each_element(geo, [=](int64_t h, int64_t c, int64_t i) {
      dx[i] = static_cast<scalar_t>(cg[h * C + c] * grad_at(i));
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_bn_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& y, const at::Tensor& clean_weight,
    const at::Tensor& adv_weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    bool relu) {
  const Geometry geo = geometry_of(x);
  TORCH_CHECK(grad_y.strides() == x.strides() && grad_y.scalar_type() == x.scalar_type(),
              "dual_bn_backward: grad_y must match x's strides and dtype");
  TORCH_CHECK(!relu || (y.has_value() && y->strides() == x.strides() && y->scalar_type() == x.scalar_type()),
              "dual_bn_backward: relu needs the forward output y, laid out like x");
  const at::Tensor mean_c = mean.contiguous(), var_c = var.contiguous();
  TORCH_CHECK(mean_c.scalar_type() == at::kFloat && var_c.scalar_type() == at::kFloat, "dual_bn_backward: fp32 stats");
  const std::vector<float> weight = per_half(clean_weight, adv_weight);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty({2, geo.channels}, mean_c.options());
  at::Tensor grad_bias = at::empty({2, geo.channels}, mean_c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dual_bn_backward", [&] {
    const float *mean_data = mean_c.const_data_ptr<float>(), *var_data = var_c.const_data_ptr<float>();
    if (relu) {
      backward_impl<scalar_t, true>(grad_y, x, y->const_data_ptr<scalar_t>(), geo, weight, mean_data, var_data,
                                    training, eps, grad_x, grad_weight, grad_bias);
    } else {
      backward_impl<scalar_t, false>(grad_y, x, nullptr, geo, weight, mean_data, var_data, training, eps, grad_x,
                                     grad_weight, grad_bias);
    }
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace arat_native
