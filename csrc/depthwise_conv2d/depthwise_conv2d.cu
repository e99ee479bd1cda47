#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "depthwise_conv2d.h"

namespace cnnfuse {
namespace {

constexpr int kThreads = 256;

template <typename T, typename V>
__global__ void __launch_bounds__(kThreads)
    depthwise_conv2d_kernel(const DwParams p, const DwOperands<T> o, int64_t items) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < items;
       i += int64_t(gridDim.x) * kThreads)
    dw_item<T, V>(p, o, i);
}

void depthwise_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation,
                           const c10::optional<at::Tensor>& residual, const at::Tensor& out) {
  const DwParams p = dw_params(x, weight, bias, stride, padding, dilation, activation, residual,
                               out);
  TORCH_CHECK_VALUE(x.is_cuda(), "depthwise_conv2d: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool wide = dw_wide(x, weight, residual, out);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d",
                                  [&] {
    const DwOperands<scalar_t> o = dw_operands<scalar_t>(x, weight, bias, residual, out);
    // Strips of 4 only when they still leave a few full waves of 2048 threads per SM; at
    // batch 1 one output per thread is what keeps every SM busy.
    const int64_t vecs = p.K / (16 / sizeof(scalar_t));
    const bool strips = p.N * p.OH * ((p.OW + 3) / 4) * vecs >= int64_t(sms) * 2048 * 2;
    dw_dispatch<scalar_t>(p, wide, strips, [&](auto variant) {
      using V = decltype(variant);
      const int64_t items = dw_items<V>(p);
      if (items == 0) return;
      const int64_t blocks = std::min<int64_t>((items + kThreads - 1) / kThreads,
                                               int64_t(sms) * 256);
      depthwise_conv2d_kernel<scalar_t, V>
          <<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(p, o, items);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnfuse, CUDA, m) { m.impl("depthwise_conv2d", &depthwise_conv2d_cuda); }

}  // namespace cnnfuse
