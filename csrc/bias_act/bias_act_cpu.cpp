#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bias_act.h"

namespace cnnfuse {

void check_bias_act(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& residual, int64_t activation,
                    const at::Tensor& out, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK_VALUE(x.dim() == 4, "bias_act: x must be 4-D, got ", x.sizes());
  TORCH_CHECK_VALUE(out.sizes() == x.sizes(), "bias_act: out has shape ", out.sizes(),
                    " but x has ", x.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), "bias_act: out dtype differs from x");
  TORCH_CHECK_VALUE(activation >= 0 && activation < kNumActivations,
                    "bias_act: unknown activation code ", activation);
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == x.size(1),
                      "bias_act: bias must have x.size(1) elements");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type() ||
                         bias->scalar_type() == at::kFloat,
                     "bias_act: bias must be float32 or x's dtype");
  }
  if (residual) {
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "bias_act: residual shape differs from x");
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(),
                     "bias_act: residual dtype differs from x");
  }
  if (scale) {
    TORCH_CHECK_VALUE(scale->dim() == 2 && scale->size(0) == x.size(0) &&
                          scale->size(1) == x.size(1),
                      "bias_act: scale must be (", x.size(0), ", ", x.size(1), "), got ",
                      scale->sizes());
    TORCH_CHECK_TYPE(scale->scalar_type() == at::kFloat, "bias_act: scale must be float32");
  }
  for (const auto* t : {&bias, &residual, &scale}) {
    TORCH_CHECK_VALUE(!*t || (*t)->device() == x.device(), "bias_act: all tensors must be on ",
                      x.device());
  }
  TORCH_CHECK_VALUE(out.device() == x.device(), "bias_act: out must be on ", x.device());
}

BiasActShape bias_act_shape(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                            const at::Tensor& out, const c10::optional<at::Tensor>& scale) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), strides_of(x),
          residual ? strides_of(*residual) : Strides4{0, 0, 0, 0}, strides_of(out),
          scale ? scale->stride(0) : 0, scale ? scale->stride(1) : 0};
}

namespace {

template <typename T, typename B>
void run_cpu(const T* x, const B* bias, const T* res, const float* scale, T* out,
             const BiasActShape& s, ActParams act) {
  at::parallel_for(0, s.N * s.H * s.W, 64, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t w = p % s.W, h = (p / s.W) % s.H, n = p / (s.W * s.H);
      const T* xp = x + n * s.x.n + h * s.x.h + w * s.x.w;
      const T* rp = res ? res + n * s.res.n + h * s.res.h + w * s.res.w : nullptr;
      T* op = out + n * s.out.n + h * s.out.h + w * s.out.w;
      for (int64_t c = 0; c < s.C; ++c) {
        float v = scaled<T>(static_cast<float>(xp[c * s.x.c]), scale,
                            n * s.scale_n + c * s.scale_c);
        if (bias) v += static_cast<float>(bias[c]);
        if (rp) v += static_cast<float>(rp[c * s.res.c]);
        op[c * s.out.c] = static_cast<T>(activate(v, act.code, act.p0, act.p1));
      }
    }
  });
}

void bias_act_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& residual, int64_t activation,
                  const at::Tensor& out, const c10::optional<at::Tensor>& scale, double act_p0,
                  double act_p1) {
  check_bias_act(x, bias, residual, activation, out, scale);
  const ActParams act{static_cast<int>(activation), float(act_p0), float(act_p1)};
  const BiasActShape shape = bias_act_shape(x, residual, out, scale);
  const float* scale_ptr = scale ? scale->const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act", [&] {
    const scalar_t* res = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
    auto go = [&](auto* b) {
      run_cpu(x.const_data_ptr<scalar_t>(), b, res, scale_ptr, out.mutable_data_ptr<scalar_t>(),
              shape, act);
    };
    if (!bias) go(static_cast<const scalar_t*>(nullptr));
    else if (bias->scalar_type() == at::kFloat) go(bias->const_data_ptr<float>());
    else go(bias->const_data_ptr<scalar_t>());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnfuse, CPU, m) { m.impl("bias_act", &bias_act_cpu); }

}  // namespace cnnfuse
