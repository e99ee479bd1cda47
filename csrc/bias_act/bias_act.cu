#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/vec.h"
#include "bias_act.h"

namespace cnnfuse {
namespace {

// One thread handles VEC consecutive channels of one pixel. VEC > 1 only when every operand
// has unit channel stride and 16-byte-aligned rows, so each access is one wide load/store.
template <typename T, typename B, int VEC>
__global__ void bias_act_kernel(const T* __restrict__ x, const B* __restrict__ bias,
                                const T* __restrict__ res, const float* __restrict__ scale,
                                T* __restrict__ out, BiasActShape s, ActParams act) {
  const int64_t groups = s.C / VEC;
  const int64_t total = s.N * s.H * s.W * groups;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c0 = (i % groups) * VEC;
    const int64_t p = i / groups;
    const int64_t w = p % s.W, h = (p / s.W) % s.H, n = p / (s.W * s.H);
    Vec<T, VEC> xv, rv, ov;
    const T* xp = x + n * s.x.n + h * s.x.h + w * s.x.w + c0 * s.x.c;
    const T* rp = res ? res + n * s.res.n + h * s.res.h + w * s.res.w + c0 * s.res.c : nullptr;
    if constexpr (VEC > 1) {
      xv = *reinterpret_cast<const Vec<T, VEC>*>(xp);
      if (rp) rv = *reinterpret_cast<const Vec<T, VEC>*>(rp);
    } else {
      xv.v[0] = *xp;
      if (rp) rv.v[0] = *rp;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float v = scaled<T>(static_cast<float>(xv.v[j]), scale,
                          n * s.scale_n + (c0 + j) * s.scale_c);
      if (bias) v += static_cast<float>(bias[c0 + j]);
      if (rp) v += static_cast<float>(rv.v[j]);
      ov.v[j] = static_cast<T>(activate(v, act.code, act.p0, act.p1));
    }
    T* op = out + n * s.out.n + h * s.out.h + w * s.out.w + c0 * s.out.c;
    if constexpr (VEC > 1) {
      *reinterpret_cast<Vec<T, VEC>*>(op) = ov;
    } else {
      *op = ov.v[0];
    }
  }
}

template <typename T, typename B, int VEC>
void launch(const at::Tensor& x, const B* bias, const c10::optional<at::Tensor>& residual,
            const float* scale, const at::Tensor& out, const BiasActShape& s, ActParams act) {
  const int64_t total = s.N * s.H * s.W * (s.C / VEC);
  if (total == 0) return;
  const int threads = 256;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t(sms) * 16);
  const T* res = residual ? residual->const_data_ptr<T>() : nullptr;
  bias_act_kernel<T, B, VEC><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<T>(), bias, res, scale, out.mutable_data_ptr<T>(), s, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename B>
void dispatch_vec(const at::Tensor& x, const B* bias, const c10::optional<at::Tensor>& residual,
                  const float* scale, const at::Tensor& out, const BiasActShape& s, ActParams act) {
  constexpr int kVec = 16 / sizeof(T);
  const bool wide = s.C % kVec == 0 && rows_aligned(x, 16) && rows_aligned(out, 16) &&
                    (!residual || rows_aligned(*residual, 16));
  if (wide) launch<T, B, kVec>(x, bias, residual, scale, out, s, act);
  else launch<T, B, 1>(x, bias, residual, scale, out, s, act);
}

void bias_act_cuda_impl(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& residual, int64_t activation,
                        const at::Tensor& out, const c10::optional<at::Tensor>& scale,
                        double act_p0, double act_p1) {
  check_bias_act(x, bias, residual, activation, out, scale);
  TORCH_CHECK_VALUE(x.is_cuda(), "bias_act: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const BiasActShape shape = bias_act_shape(x, residual, out, scale);
  const ActParams act{static_cast<int>(activation), float(act_p0), float(act_p1)};
  const float* sc = scale ? scale->const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act", [&] {
    if (!bias) dispatch_vec<scalar_t, scalar_t>(x, nullptr, residual, sc, out, shape, act);
    else if (bias->scalar_type() == at::kFloat)
      dispatch_vec<scalar_t, float>(x, bias->const_data_ptr<float>(), residual, sc, out, shape,
                                    act);
    else
      dispatch_vec<scalar_t, scalar_t>(x, bias->const_data_ptr<scalar_t>(), residual, sc, out,
                                       shape, act);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnfuse, CUDA, m) { m.impl("bias_act", &bias_act_cuda_impl); }

}  // namespace cnnfuse
