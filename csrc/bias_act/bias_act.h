// cnnfuse::bias_act — out = act(x · scale + bias + residual) over (N, C, H, W) tensors given
// by strides, so `out` may be a channel slice of a wider NHWC buffer; scale is an optional
// per-image, per-channel float32 (N, C) factor (a squeeze-and-excitation gate), its product
// rounded to x's dtype as eager's multiply would. The element walk is in NHWC order (channel
// fastest) on CPU and GPU alike.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "../common/activation.h"
#include "../common/nhwc.h"

namespace cnnfuse {

struct BiasActShape {
  int64_t N, C, H, W;
  Strides4 x, res, out;
  int64_t scale_n, scale_c;
};

void check_bias_act(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& residual, int64_t activation,
                    const at::Tensor& out, const c10::optional<at::Tensor>& scale);

// The activation of one call: its code and parameters (csrc/common/activation.h).
struct ActParams {
  int code;
  float p0, p1;
};

BiasActShape bias_act_shape(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                            const at::Tensor& out, const c10::optional<at::Tensor>& scale);

// x · scale, rounded to T (nothing when there is no scale).
template <typename T>
CNNFUSE_HD float scaled(float v, const float* scale, int64_t at) {
  return scale ? static_cast<float>(static_cast<T>(v * scale[at])) : v;
}

}  // namespace cnnfuse
