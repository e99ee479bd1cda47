#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "depthwise_conv2d.h"

namespace cnnfuse {

DwParams dw_params(const at::Tensor& x, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation,
                   double act_p0, double act_p1, const c10::optional<at::Tensor>& residual,
                   const at::Tensor& out) {
  TORCH_CHECK_VALUE(x.dim() == 4, "depthwise_conv2d: x must be 4-D, got ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == 1,
                    "depthwise_conv2d: weight must be (K, 1, KH, KW), got ", weight.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && dilation.size() == 2 && padding.size() == 4,
                    "depthwise_conv2d: stride and dilation take 2 values, padding 4 "
                    "(left, right, top, bottom)");
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0,
                    "depthwise_conv2d: stride and dilation must be positive");
  TORCH_CHECK_VALUE(activation >= 0 && activation < kNumActivations,
                    "depthwise_conv2d: unknown activation code ", activation);
  const int64_t C = x.size(1), K = weight.size(0);
  TORCH_CHECK_VALUE(C > 0 && K % C == 0,
                    "depthwise_conv2d: weight has ", K, " output channels, not a multiple of x's ",
                    C, " channels");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
                   "depthwise_conv2d: x, weight and out must share one dtype");
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const int64_t OH = (x.size(2) + padding[2] + padding[3] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t OW = (x.size(3) + padding[0] + padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(out.dim() == 4 && out.size(0) == x.size(0) && out.size(1) == K &&
                        out.size(2) == OH && out.size(3) == OW,
                    "depthwise_conv2d: out has shape ", out.sizes(), ", expected [", x.size(0),
                    ", ", K, ", ", OH, ", ", OW, "]");
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == K && bias->is_contiguous(),
                      "depthwise_conv2d: bias must be a contiguous vector of ", K, " values");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type() || bias->scalar_type() == at::kFloat,
                     "depthwise_conv2d: bias must be float32 or x's dtype");
  }
  if (residual) {
    TORCH_CHECK_VALUE(residual->sizes() == out.sizes(),
                      "depthwise_conv2d: residual shape differs from out");
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(),
                     "depthwise_conv2d: residual dtype differs from x");
  }
  for (const at::Tensor* t : {&weight, &out}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), "depthwise_conv2d: all tensors must be on ",
                      x.device());
  }
  DwParams p{};
  p.N = x.size(0), p.C = C, p.H = x.size(2), p.W = x.size(3), p.K = K, p.OH = OH, p.OW = OW;
  p.kh = int(kh), p.kw = int(kw), p.sh = int(stride[0]), p.sw = int(stride[1]);
  p.dh = int(dilation[0]), p.dw = int(dilation[1]);
  p.pad_top = int(padding[2]), p.pad_left = int(padding[0]);
  p.mult = int(K / C), p.act = int(activation);
  p.act_p0 = float(act_p0), p.act_p1 = float(act_p1);
  p.bias_fp32 = bias && bias->scalar_type() == at::kFloat;
  p.bias_wide = bias && reinterpret_cast<uintptr_t>(bias->const_data_ptr()) % 16 == 0;
  p.pool_scale = 1.f / float(OH * OW);
  p.x = strides_of(x), p.out = strides_of(out);
  p.res = residual ? strides_of(*residual) : Strides4{0, 0, 0, 0};
  p.w_k = weight.stride(0), p.w_r = weight.stride(2), p.w_s = weight.stride(3);
  return p;
}

bool dw_wide(const at::Tensor& x, const at::Tensor& weight,
             const c10::optional<at::Tensor>& residual, const at::Tensor& out) {
  // Weights are read as vectors only when tap-major (channels fastest); in the usual
  // (K, 1, KH, KW) order they are read per channel, which any alignment allows.
  const int64_t item = weight.element_size();
  const bool weight_ok =
      weight.stride(0) != 1 ||
      (reinterpret_cast<uintptr_t>(weight.const_data_ptr()) % 16 == 0 &&
       (weight.stride(2) * item) % 16 == 0 && (weight.stride(3) * item) % 16 == 0);
  return weight_ok && rows_aligned(x, 16) && rows_aligned(out, 16) &&
         (!residual || rows_aligned(*residual, 16));
}

float* dw_pool(const c10::optional<at::Tensor>& pool, const at::Tensor& out) {
  if (!pool) return nullptr;
  TORCH_CHECK_VALUE(pool->dim() == 2 && pool->size(0) == out.size(0) &&
                        pool->size(1) == out.size(1) && pool->is_contiguous(),
                    "depthwise_conv2d: pool must be a contiguous (", out.size(0), ", ",
                    out.size(1), ") tensor, got ", pool->sizes());
  TORCH_CHECK_TYPE(pool->scalar_type() == at::kFloat, "depthwise_conv2d: pool must be float32");
  TORCH_CHECK_VALUE(pool->device() == out.device(), "depthwise_conv2d: pool must be on ",
                    out.device());
  pool->zero_();
  return pool->mutable_data_ptr<float>();
}

namespace {

// Block and thread counts of the CPU build: small, so the tests' small shapes still split
// images over several blocks and chunks as a GPU's large ones do.
constexpr int64_t kCpuThreads = 32, kCpuBlocks = 64;

void depthwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation,
                          const c10::optional<at::Tensor>& residual, const at::Tensor& out,
                          const c10::optional<at::Tensor>& pool, double act_p0, double act_p1) {
  const DwParams p = dw_params(x, weight, bias, stride, padding, dilation, activation, act_p0,
                               act_p1, residual, out);
  const bool wide = dw_wide(x, weight, residual, out);
  float* pool_sums = dw_pool(pool, out);
  if (p.N * p.K * p.OH * p.OW == 0) return;  // nothing to compute (a zeroed pool stays so)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "depthwise_conv2d",
                                  [&] {
    const DwOperands<scalar_t> o = dw_operands<scalar_t>(x, weight, bias, residual, out,
                                                         pool_sums);
    // Strips of 4 wherever a row has room for one, so the CPU build covers both strip widths.
    dw_dispatch<scalar_t>(p, wide, p.OW >= 4, [&](auto variant) {
      using V = decltype(variant);
      const DwGrid g = dw_grid<V>(p, kCpuThreads, kCpuBlocks);
      // A task owns one (chunk, image) pair, all its splits: the pool sums it adds to are its
      // own, so no atomics.
      at::parallel_for(0, g.chunks * p.N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t pair = begin; pair < end; ++pair) {
          const int64_t chunk = pair % g.chunks, image = pair / g.chunks;
          for (int64_t split = 0; split < g.splits; ++split) {
            const int64_t block = chunk + g.chunks * (split + g.splits * image);
            for (int64_t t = 0; t < g.threads(); ++t) {
              float sum[V::vec];
              int64_t n, k0;
              dw_thread<scalar_t, V>(p, o, g, block, t, sum, &n, &k0);
              if (pool_sums == nullptr || k0 >= p.K) continue;
              for (int j = 0; j < V::vec; ++j)
                pool_sums[n * p.K + k0 + j] += sum[j] * p.pool_scale;
            }
          }
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnfuse, CPU, m) { m.impl("depthwise_conv2d", &depthwise_conv2d_cpu); }

}  // namespace cnnfuse
