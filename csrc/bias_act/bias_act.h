// cnnfuse::bias_act — out = act(x + bias + residual) over (N, C, H, W) tensors given by
// strides, so `out` may be a channel slice of a wider NHWC buffer. The element walk is in
// NHWC order (channel fastest) on CPU and GPU alike.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "../common/activation.h"

namespace cnnfuse {

// Strides of one (N, C, H, W) operand, in elements.
struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct BiasActShape {
  int64_t N, C, H, W;
  Strides4 x, res, out;
};

void check_bias_act(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& residual, int64_t activation,
                    const at::Tensor& out);

BiasActShape bias_act_shape(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                            const at::Tensor& out);


}  // namespace cnnfuse
