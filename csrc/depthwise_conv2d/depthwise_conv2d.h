// cnnfuse::depthwise_conv2d — out = act(depthwise_conv(x, w) + bias + residual) on
// NHWC-strided operands, with a channel multiplier (K = mult · C; output k reads input k / mult).
//
// The work item is a strip of TW outputs along W for VEC consecutive channels. The GPU runs one
// item per thread; the CPU build loops over the same items with the same functions, so CI
// tests the indexing and arithmetic that the GPU executes. Variants:
//   * fixed: square 3/5/7 kernels, stride 1 or 2, no dilation, mult 1, 16-byte channel vectors.
//     Each input row window of (TW-1)·S + KW columns is loaded once and reused by all TW
//     outputs and all KW taps; TW = 4 for large grids, 1 when the grid must be spread over
//     every SM (batch 1).
//   * generic: any kernel, stride, dilation and multiplier; VEC-wide when the channels allow.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <type_traits>

#include "../common/activation.h"
#include "../common/nhwc.h"
#include "../common/vec.h"

namespace cnnfuse {

struct DwParams {
  int64_t N, C, H, W, K, OH, OW;
  int kh, kw, sh, sw, dh, dw, pad_top, pad_left, mult, act;
  bool bias_fp32;  // bias is float32 (else x's dtype)
  Strides4 x, res, out;
  int64_t w_k, w_r, w_s;  // weight strides: output channel, kernel row, kernel column
};

template <typename T>
struct DwOperands {
  const T* x;
  const T* w;
  const void* bias;  // nullptr, or K values of float or T (DwParams::bias_fp32)
  const T* res;
  T* out;
};

template <int VEC_, int KH_, int KW_, int S_, int TW_>
struct DwVariant {
  static constexpr int vec = VEC_, kh = KH_, kw = KW_, stride = S_, tw = TW_;
  static constexpr bool fixed = KH_ > 0;
};

template <typename T, int VEC>
CNNFUSE_HD void dw_load(const T* p, int64_t step, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = static_cast<float>(*p);
  } else if (step == 1) {
    const Vec<T, VEC> raw = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = static_cast<float>(raw.v[j]);
  } else {  // weights in (K, 1, KH, KW) order: one scalar per channel, from L1
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = static_cast<float>(p[j * step]);
  }
}

// bias + residual + activation for VEC channels of one output pixel, then one wide store.
template <typename T, int VEC>
CNNFUSE_HD void dw_store(const DwParams& p, const DwOperands<T>& o, int64_t n, int64_t oh,
                         int64_t ow, int64_t k0, float (&acc)[VEC]) {
  if (o.bias) {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      acc[j] += p.bias_fp32 ? static_cast<const float*>(o.bias)[k0 + j]
                            : static_cast<float>(static_cast<const T*>(o.bias)[k0 + j]);
  }
  if (o.res) {
    float r[VEC];
    dw_load<T, VEC>(o.res + n * p.res.n + oh * p.res.h + ow * p.res.w + k0 * p.res.c, 1, r);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] += r[j];
  }
  T* dst = o.out + n * p.out.n + oh * p.out.h + ow * p.out.w + k0 * p.out.c;
  if constexpr (VEC == 1) {
    *dst = static_cast<T>(activate(acc[0], p.act));
  } else {
    Vec<T, VEC> v;
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = static_cast<T>(activate(acc[j], p.act));
    *reinterpret_cast<Vec<T, VEC>*>(dst) = v;
  }
}

template <typename T, typename V>
CNNFUSE_HD void dw_fixed_strip(const DwParams& p, const DwOperands<T>& o, int64_t n, int64_t oh,
                               int64_t ow0, int64_t c0) {
  constexpr int VEC = V::vec, KH = V::kh, KW = V::kw, S = V::stride, TW = V::tw;
  constexpr int WIN = (TW - 1) * S + KW;
  float acc[TW][VEC];
#pragma unroll
  for (int t = 0; t < TW; ++t)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[t][j] = 0.f;
  const int64_t ih0 = oh * S - p.pad_top, iw0 = ow0 * S - p.pad_left;
  const T* xn = o.x + n * p.x.n + c0;
  const T* wc = o.w + c0 * p.w_k;
#pragma unroll
  for (int r = 0; r < KH; ++r) {
    const int64_t ih = ih0 + r;
    if (ih < 0 || ih >= p.H) continue;
    float win[WIN][VEC];
#pragma unroll
    for (int i = 0; i < WIN; ++i) {
      const int64_t iw = iw0 + i;
      if (iw >= 0 && iw < p.W) {
        dw_load<T, VEC>(xn + ih * p.x.h + iw * p.x.w, 1, win[i]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) win[i][j] = 0.f;
      }
    }
#pragma unroll
    for (int s = 0; s < KW; ++s) {
      float wv[VEC];
      dw_load<T, VEC>(wc + r * p.w_r + s * p.w_s, p.w_k, wv);
#pragma unroll
      for (int t = 0; t < TW; ++t)
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[t][j] += win[t * S + s][j] * wv[j];
    }
  }
#pragma unroll
  for (int t = 0; t < TW; ++t)
    if (ow0 + t < p.OW) dw_store<T, VEC>(p, o, n, oh, ow0 + t, c0, acc[t]);
}

template <typename T, int VEC>
CNNFUSE_HD void dw_generic_point(const DwParams& p, const DwOperands<T>& o, int64_t n,
                                 int64_t oh, int64_t ow, int64_t k0) {
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
  const int64_t ih0 = oh * p.sh - p.pad_top, iw0 = ow * p.sw - p.pad_left;
  const T* xc = o.x + n * p.x.n + (k0 / p.mult) * p.x.c;  // VEC > 1 only when mult == 1
  const T* wc = o.w + k0 * p.w_k;
  for (int r = 0; r < p.kh; ++r) {
    const int64_t ih = ih0 + int64_t(r) * p.dh;
    if (ih < 0 || ih >= p.H) continue;
    for (int s = 0; s < p.kw; ++s) {
      const int64_t iw = iw0 + int64_t(s) * p.dw;
      if (iw < 0 || iw >= p.W) continue;
      float xv[VEC], wv[VEC];
      dw_load<T, VEC>(xc + ih * p.x.h + iw * p.x.w, 1, xv);
      dw_load<T, VEC>(wc + r * p.w_r + s * p.w_s, p.w_k, wv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += xv[j] * wv[j];
    }
  }
  dw_store<T, VEC>(p, o, n, oh, ow, k0, acc);
}

// Items are numbered channel-vector fastest, so neighbouring GPU threads read neighbouring
// 16-byte vectors of one pixel (coalesced), then strips along W, then rows, then images.
template <typename V>
CNNFUSE_HD int64_t dw_items(const DwParams& p) {
  return p.N * p.OH * ((p.OW + V::tw - 1) / V::tw) * (p.K / V::vec);
}

template <typename T, typename V>
CNNFUSE_HD void dw_item(const DwParams& p, const DwOperands<T>& o, int64_t i) {
  const int64_t vecs = p.K / V::vec, strips = (p.OW + V::tw - 1) / V::tw;
  const int64_t k0 = (i % vecs) * V::vec;
  int64_t rest = i / vecs;
  const int64_t ow0 = (rest % strips) * V::tw;
  rest /= strips;
  const int64_t oh = rest % p.OH, n = rest / p.OH;
  if constexpr (V::fixed) dw_fixed_strip<T, V>(p, o, n, oh, ow0, k0);
  else dw_generic_point<T, V::vec>(p, o, n, oh, ow0, k0);
}

// Calls `run(DwVariant<...>{})` with the variant for these parameters. `wide`: every operand
// allows 16-byte channel vectors; `strips`: the grid is large enough for TW = 4.
template <typename T, typename Run>
void dw_dispatch(const DwParams& p, bool wide, bool strips, Run&& run) {
  constexpr int kVec = 16 / sizeof(T);
  wide = wide && p.mult == 1 && p.K % kVec == 0;
  const bool fixed = wide && p.dh == 1 && p.dw == 1 && p.kh == p.kw && p.sh == p.sw &&
                     (p.sh == 1 || p.sh == 2) && (p.kh == 3 || p.kh == 5 || p.kh == 7);
  if (!fixed) {
    if (wide) run(DwVariant<kVec, 0, 0, 0, 1>{});
    else run(DwVariant<1, 0, 0, 0, 1>{});
    return;
  }
  auto by_stride = [&](auto k) {
    constexpr int K = decltype(k)::value;
    auto by_strip = [&](auto s) {
      constexpr int S = decltype(s)::value;
      if (strips) run(DwVariant<kVec, K, K, S, 4>{});
      else run(DwVariant<kVec, K, K, S, 1>{});
    };
    if (p.sh == 1) by_strip(std::integral_constant<int, 1>{});
    else by_strip(std::integral_constant<int, 2>{});
  };
  if (p.kh == 3) by_stride(std::integral_constant<int, 3>{});
  else if (p.kh == 5) by_stride(std::integral_constant<int, 5>{});
  else by_stride(std::integral_constant<int, 7>{});
}

// Host side (depthwise_conv2d_cpu.cpp): argument checks shared by both devices.
DwParams dw_params(const at::Tensor& x, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation,
                   const c10::optional<at::Tensor>& residual, const at::Tensor& out);

bool dw_wide(const at::Tensor& x, const at::Tensor& weight,
             const c10::optional<at::Tensor>& residual, const at::Tensor& out);

template <typename T>
DwOperands<T> dw_operands(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& residual, const at::Tensor& out) {
  return {x.const_data_ptr<T>(), weight.const_data_ptr<T>(),
          bias ? bias->const_data_ptr() : nullptr,
          residual ? residual->const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>()};
}

}  // namespace cnnfuse
