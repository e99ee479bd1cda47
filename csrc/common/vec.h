// Vectors of consecutive channels, loaded and stored as one wide (up to 16-byte) access.
#pragma once

namespace cnnfuse {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

}  // namespace cnnfuse
