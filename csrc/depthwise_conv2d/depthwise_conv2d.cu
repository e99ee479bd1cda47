#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "depthwise_conv2d.h"

namespace cnnfuse {
namespace {

constexpr int kThreads = 256;

// Strips of 4 (large grids) are bounded to 128 registers, two blocks (16 warps) per SM: at
// their natural 141-202 registers one block fits and its loads have nothing to hide behind.
// 7x7 (and fp32 5x5) strips spill under that bound, so they keep one block; one output per
// thread needs fewer registers anyway.
template <typename T, typename V>
constexpr int kMinBlocks =
    V::tw > 1 && (V::kh == 3 || (V::kh == 5 && sizeof(T) <= 2)) ? 2 : 1;

template <typename T, typename V>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T, V>)
    depthwise_conv2d_kernel(const DwParams p, const DwOperands<T> o, const DwGrid g) {
  float sum[V::vec];
  int64_t n, k0;
  dw_thread<T, V>(p, o, g, blockIdx.x, threadIdx.x, sum, &n, &k0);
  if (o.pool == nullptr) return;
  // The block's lanes hold partial sums of the same vb vectors: add them up in shared memory,
  // then one atomic per channel.
  extern __shared__ float partial[];  // VEC x threads: consecutive threads, consecutive banks
  const int64_t threads = blockDim.x;  // = g.threads()
#pragma unroll
  for (int j = 0; j < V::vec; ++j) partial[j * threads + threadIdx.x] = sum[j];
  __syncthreads();
  if (threadIdx.x >= g.vb || k0 >= p.K) return;
#pragma unroll
  for (int j = 0; j < V::vec; ++j) {
    float total = 0.f;
    for (int64_t lane = 0; lane < g.lanes; ++lane)
      total += partial[j * threads + lane * g.vb + threadIdx.x];
    atomicAdd(o.pool + n * p.K + k0 + j, total * p.pool_scale);
  }
}

void depthwise_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation,
                           const c10::optional<at::Tensor>& residual, const at::Tensor& out,
                           const c10::optional<at::Tensor>& pool, double act_p0,
                           double act_p1) {
  const DwParams p = dw_params(x, weight, bias, stride, padding, dilation, activation, act_p0,
                               act_p1, residual, out);
  TORCH_CHECK_VALUE(x.is_cuda(), "depthwise_conv2d: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool wide = dw_wide(x, weight, residual, out);
  float* pool_sums = dw_pool(pool, out);
  if (p.N * p.K * p.OH * p.OW == 0) return;  // nothing to compute (a zeroed pool stays so)
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d",
                                  [&] {
    const DwOperands<scalar_t> o = dw_operands<scalar_t>(x, weight, bias, residual, out,
                                                         pool_sums);
    // Strips of 4 only when they still leave a few full waves of 2048 threads per SM; at
    // batch 1 one output per thread is what keeps every SM busy.
    const int64_t vecs = p.K / (16 / sizeof(scalar_t));
    const bool strips = p.N * p.OH * ((p.OW + 3) / 4) * vecs >= int64_t(sms) * 2048 * 2;
    dw_dispatch<scalar_t>(p, wide, strips, [&](auto variant) {
      using V = decltype(variant);
      // Four waves of 8 blocks per SM: enough to balance, few enough that each thread does
      // several strips and the pool's atomics stay few.
      const DwGrid g = dw_grid<V>(p, kThreads, int64_t(sms) * 8 * 4);
      const int64_t blocks = g.blocks(p.N);
      TORCH_CHECK(blocks < (int64_t(1) << 31), "depthwise_conv2d: output too large");
      const size_t shared = pool_sums ? g.threads() * V::vec * sizeof(float) : 0;
      depthwise_conv2d_kernel<scalar_t, V>
          <<<blocks, g.threads(), shared, at::cuda::getCurrentCUDAStream()>>>(p, o, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnfuse, CUDA, m) { m.impl("depthwise_conv2d", &depthwise_conv2d_cuda); }

}  // namespace cnnfuse
