// Schemas and CPU kernels of the `arat_native` namespace, loaded with torch.ops.load_library.
#include <torch/library.h>

#include "arat_native.h"

#ifndef ARAT_NATIVE_SOURCE_HASH
#define ARAT_NATIVE_SOURCE_HASH "unknown"
#endif
// What kernels/native.py compares with the checkout's csrc/ before using the library (read from the file's bytes).
extern "C" __attribute__((used, visibility("default"))) const char arat_native_sources[] =
    "arat-native-sources:" ARAT_NATIVE_SOURCE_HASH;

TORCH_LIBRARY(arat_native, m) {
  m.def("pgd_step(Tensor x, Tensor x_adv, Tensor grad, float eps, float alpha) -> Tensor");
  m.def(
      "dual_bn_forward(Tensor x, Tensor clean_weight, Tensor clean_bias, Tensor adv_weight, Tensor adv_bias, "
      "Tensor clean_running_mean, Tensor clean_running_var, Tensor adv_running_mean, Tensor adv_running_var, "
      "bool training, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dual_bn_backward(Tensor grad_y, Tensor x, Tensor? y, Tensor clean_weight, Tensor adv_weight, Tensor mean, "
      "Tensor var, bool training, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(arat_native, CPU, m) {
  m.impl("pgd_step", &arat_native::pgd_step);
  m.impl("dual_bn_forward", &arat_native::dual_bn_forward);
  m.impl("dual_bn_backward", &arat_native::dual_bn_backward);
}
