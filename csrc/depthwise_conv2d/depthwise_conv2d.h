// cnnfuse::depthwise_conv2d — out = act(depthwise_conv(x, w) + bias + residual) on
// NHWC-strided operands, with a channel multiplier (K = mult · C; output k reads input k / mult),
// and optionally pool = mean_hw(out), the squeeze of a squeeze-and-excitation block.
//
// The work item is a strip of TW outputs along W for VEC consecutive channels. A block takes one
// image, a chunk of at most 32 channel vectors and a range of strips (DwGrid); its threads keep
// the chunk's vectors side by side (coalesced) and step through the strips. Each thread sums
// what it stores, so the pool costs a block reduction and one atomic per channel per block,
// instead of a pass over `out`. The CPU build runs the same blocks thread by thread with the
// same functions, so CI tests the indexing and arithmetic that the GPU executes. Variants:
//   * fixed: square 3/5/7 kernels, stride 1 or 2, no dilation, mult 1, 16-byte channel vectors.
//     Each input row window of (TW-1)·S + KW columns is loaded once (streamed, column by
//     column) and reused by all TW outputs and all KW taps; TW = 4 for large grids, 1 when the grid must be spread over
//     every SM (batch 1).
//   * generic: any kernel, stride, dilation and multiplier; VEC-wide when the channels allow.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/activation.h"
#include "../common/nhwc.h"
#include "../common/vec.h"

namespace cnnfuse {

struct DwParams {
  int64_t N, C, H, W, K, OH, OW;
  int kh, kw, sh, sw, dh, dw, pad_top, pad_left, mult, act;
  float act_p0, act_p1;  // the activation's parameters (csrc/common/activation.h)
  bool bias_fp32;  // bias is float32 (else x's dtype)
  bool bias_wide;  // bias starts on a 16-byte boundary: read in 16-byte vectors
  float pool_scale;  // 1 / (OH · OW)
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
  float* pool;  // nullptr, or (N, K) float32, contiguous: the means of out over OH x OW
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

// The VEC bias values of a strip, read once for all its outputs, in 16-byte accesses where the
// bias is aligned (p.bias_wide); zeros without a bias. Held across a thread's strips they
// would cost 8 registers that the strips' 128-register bound cannot spare.
template <typename B, int VEC>
CNNFUSE_HD void dw_load_bias(const B* b, bool wide, float (&v)[VEC]) {
  constexpr int kPer = 16 / int(sizeof(B)) < VEC ? 16 / int(sizeof(B)) : VEC;
  if (wide) {
#pragma unroll
    for (int i = 0; i < VEC; i += kPer) {
      const Vec<B, kPer> raw = *reinterpret_cast<const Vec<B, kPer>*>(b + i);
#pragma unroll
      for (int j = 0; j < kPer; ++j) v[i + j] = static_cast<float>(raw.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = static_cast<float>(b[j]);
  }
}

template <typename T, int VEC>
CNNFUSE_HD void dw_bias(const DwParams& p, const DwOperands<T>& o, int64_t k0,
                        float (&v)[VEC]) {
  if (o.bias == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = 0.f;
  } else if (p.bias_fp32) {
    dw_load_bias<float, VEC>(static_cast<const float*>(o.bias) + k0, p.bias_wide, v);
  } else {
    dw_load_bias<T, VEC>(static_cast<const T*>(o.bias) + k0, p.bias_wide, v);
  }
}

#ifdef __CUDACC__
template <typename T>
__device__ __forceinline__ uint32_t dw_bits(const T& v) {  // raw bits, zero-extended
  if constexpr (sizeof(T) == 2) {
    uint16_t b;
    memcpy(&b, &v, 2);
    return b;
  } else {
    uint32_t b;
    memcpy(&b, &v, 4);
    return b;
  }
}
#endif

// One vector of channels to global memory. On the GPU a 16-byte vector of 2- or 4-byte values
// is packed into four 32-bit words and stored by one st.global.v4 (STG.E.128): stored as a Vec,
// nvcc splits it into 32-bit (or 16-bit) stores. The callers guarantee 16-byte alignment.
template <typename T, int VEC>
CNNFUSE_HD void dw_store_vec(T* dst, const Vec<T, VEC>& v) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(Vec<T, VEC>) == 16 && sizeof(T) <= 4) {
    constexpr int kPer = 4 / int(sizeof(T));
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = dw_bits(v.v[i * kPer]);
      if constexpr (kPer == 2) w[i] |= dw_bits(v.v[i * kPer + 1]) << 16;
    }
    // in PTX: through a uint4, nvcc still splits the store (the alignment is not carried)
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3])
                 : "memory");
    return;
  }
#endif
  if constexpr (VEC == 1) *dst = v.v[0];
  else *reinterpret_cast<Vec<T, VEC>*>(dst) = v;
}

// bias + residual + activation for VEC channels of one output pixel, then one wide store; the
// stored (rounded) values are added to `sum`, so the pool sees exactly what `out` holds.
template <typename T, int VEC>
CNNFUSE_HD void dw_store(const DwParams& p, const DwOperands<T>& o, int64_t n, int64_t oh,
                         int64_t ow, int64_t k0, const float (&bias)[VEC], float (&acc)[VEC],
                         float (&sum)[VEC]) {
  if (o.bias) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] += bias[j];
  }
  if (o.res) {
    float r[VEC];
    dw_load<T, VEC>(o.res + n * p.res.n + oh * p.res.h + ow * p.res.w + k0 * p.res.c, 1, r);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] += r[j];
  }
  Vec<T, VEC> v;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    v.v[j] = static_cast<T>(activate(acc[j], p.act, p.act_p0, p.act_p1));
    sum[j] += static_cast<float>(v.v[j]);
  }
  dw_store_vec<T, VEC>(o.out + n * p.out.n + oh * p.out.h + ow * p.out.w + k0 * p.out.c, v);
}

template <typename T, typename V>
CNNFUSE_HD void dw_fixed_strip(const DwParams& p, const DwOperands<T>& o, int64_t n, int64_t oh,
                               int64_t ow0, int64_t c0, float (&sum)[V::vec]) {
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
  // The row's window is streamed: column i feeds, at once, every (output t, tap s) with
  // t·S + s = i, then dies, so only the accumulators and the row's weights stay live (a
  // window held whole does not fit two blocks' 128 registers). Each accumulator still sums
  // its taps in (r, s) order.
#pragma unroll
  for (int r = 0; r < KH; ++r) {
    const int64_t ih = ih0 + r;
    if (ih < 0 || ih >= p.H) continue;
    float wv[KW][VEC];
#pragma unroll
    for (int s = 0; s < KW; ++s) dw_load<T, VEC>(wc + r * p.w_r + s * p.w_s, p.w_k, wv[s]);
#pragma unroll
    for (int i = 0; i < WIN; ++i) {
      const int64_t iw = iw0 + i;
      float col[VEC];
      if (iw >= 0 && iw < p.W) {
        dw_load<T, VEC>(xn + ih * p.x.h + iw * p.x.w, 1, col);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) col[j] = 0.f;
      }
#pragma unroll
      for (int s = 0; s < KW; ++s) {
        const int t = (i - s) / S;
        if (i < s || (i - s) % S != 0 || t >= TW) continue;
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[t][j] += col[j] * wv[s][j];
      }
    }
  }
  float bias[VEC];
  dw_bias<T, VEC>(p, o, c0, bias);
#pragma unroll
  for (int t = 0; t < TW; ++t)
    if (ow0 + t < p.OW) dw_store<T, VEC>(p, o, n, oh, ow0 + t, c0, bias, acc[t], sum);
}

template <typename T, int VEC>
CNNFUSE_HD void dw_generic_point(const DwParams& p, const DwOperands<T>& o, int64_t n,
                                 int64_t oh, int64_t ow, int64_t k0, float (&sum)[VEC]) {
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
  float bias[VEC];
  dw_bias<T, VEC>(p, o, k0, bias);
  dw_store<T, VEC>(p, o, n, oh, ow, k0, bias, acc, sum);
}

// Blocks are (channel chunk, range of strips, image), chunk fastest. A chunk holds vb channel
// vectors (at most 32, evened out over the chunks); the block's vb · lanes threads are lanes
// of vb, thread t taking vector t % vb of every lanes-th strip of its range.
struct DwGrid {
  int64_t vecs, chunks, vb, lanes, strips_w, strips, per_block, splits;
  int64_t threads() const { return vb * lanes; }
  int64_t blocks(int64_t images) const { return chunks * splits * images; }
};

// `threads`: the block size to fill; `min_blocks`: how many blocks the device wants (a few
// waves), reached by splitting each image's strips while a thread still has one to do.
template <typename V>
DwGrid dw_grid(const DwParams& p, int64_t threads, int64_t min_blocks) {
  DwGrid g{};
  g.vecs = p.K / V::vec;
  g.chunks = (g.vecs + 31) / 32;
  g.vb = (g.vecs + g.chunks - 1) / g.chunks;
  g.lanes = threads / g.vb;
  g.strips_w = (p.OW + V::tw - 1) / V::tw;
  g.strips = p.OH * g.strips_w;
  const int64_t per_image = g.chunks * p.N;
  const int64_t most = (g.strips + g.lanes - 1) / g.lanes;  // one strip per thread
  const int64_t want = (min_blocks + per_image - 1) / std::max<int64_t>(per_image, 1);
  g.splits = std::max<int64_t>(1, std::min(most, want));
  g.per_block = (g.strips + g.splits - 1) / g.splits;
  g.splits = (g.strips + g.per_block - 1) / g.per_block;  // no empty tail block
  return g;
}

// One thread of one block: its outputs, and in `sum` the total of what it stored for channels
// *k0 .. *k0 + VEC of image *n (left zero for a thread past the last vector).
template <typename T, typename V>
CNNFUSE_HD void dw_thread(const DwParams& p, const DwOperands<T>& o, const DwGrid& g,
                          int64_t block, int64_t thread, float (&sum)[V::vec], int64_t* n,
                          int64_t* k0) {
#pragma unroll
  for (int j = 0; j < V::vec; ++j) sum[j] = 0.f;
  const int64_t chunk = block % g.chunks, rest = block / g.chunks;
  const int64_t split = rest % g.splits;
  const int64_t vec = chunk * g.vb + thread % g.vb;
  *n = rest / g.splits;
  *k0 = vec * V::vec;
  if (vec >= g.vecs) return;
  const int64_t end = std::min(g.strips, (split + 1) * g.per_block);
  for (int64_t s = split * g.per_block + thread / g.vb; s < end; s += g.lanes) {
    const int64_t oh = s / g.strips_w, ow0 = (s % g.strips_w) * V::tw;
    if constexpr (V::fixed) dw_fixed_strip<T, V>(p, o, *n, oh, ow0, *k0, sum);
    else dw_generic_point<T, V::vec>(p, o, *n, oh, ow0, *k0, sum);
  }
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
                   double act_p0, double act_p1, const c10::optional<at::Tensor>& residual,
                   const at::Tensor& out);

bool dw_wide(const at::Tensor& x, const at::Tensor& weight,
             const c10::optional<at::Tensor>& residual, const at::Tensor& out);

// Checks `pool` against the output and zeroes it (the blocks add into it); nullptr if absent.
float* dw_pool(const c10::optional<at::Tensor>& pool, const at::Tensor& out);

template <typename T>
DwOperands<T> dw_operands(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& residual, const at::Tensor& out,
                          float* pool) {
  return {x.const_data_ptr<T>(), weight.const_data_ptr<T>(),
          bias ? bias->const_data_ptr() : nullptr,
          residual ? residual->const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>(), pool};
}

}  // namespace cnnfuse
