// cnnfuse::bias_act — out = act(x + bias + residual) over (N, C, H, W) tensors given by
// strides, so `out` may be a channel slice of a wider NHWC buffer. The element walk is in
// NHWC order (channel fastest) on CPU and GPU alike.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "../common/activation.h"
#include "../common/nhwc.h"

namespace cnnfuse {

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
