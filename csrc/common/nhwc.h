// (N, C, H, W) operands addressed through their strides, so any of them may be a channel
// slice of a wider NHWC buffer.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace cnnfuse {

// Strides of one (N, C, H, W) operand, in elements.
struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// True when every pixel's channel row starts on a `bytes` boundary and channels are unit
// stride: the condition for loading `bytes / element_size` channels in one access.
inline bool rows_aligned(const at::Tensor& t, int64_t bytes) {
  const int64_t item = t.element_size();
  return t.stride(1) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0 &&
         (t.stride(0) * item) % bytes == 0 && (t.stride(2) * item) % bytes == 0 &&
         (t.stride(3) * item) % bytes == 0;
}

}  // namespace cnnfuse
