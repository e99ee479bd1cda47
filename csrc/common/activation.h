// Activations shared by every C++/CUDA epilogue. The codes match cnnfuse.ref.ACTIVATIONS
// (the order there is the ABI).
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define CNNFUSE_HD __host__ __device__ __forceinline__
#else
#define CNNFUSE_HD inline
#endif

namespace cnnfuse {

enum Activation : int {
  kNone = 0, kRelu, kRelu6, kSilu, kHardswish, kHardsigmoid, kSigmoid, kGelu, kGeluTanh,
  kNumActivations
};

CNNFUSE_HD float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }
CNNFUSE_HD float clampf_(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }

CNNFUSE_HD float activate(float x, int act) {
  switch (act) {
    case kRelu: return fmaxf(x, 0.f);
    case kRelu6: return clampf_(x, 0.f, 6.f);
    case kSilu: return x * sigmoidf_(x);
    case kHardswish: return x * clampf_(x + 3.f, 0.f, 6.f) * (1.f / 6.f);
    case kHardsigmoid: return clampf_(x + 3.f, 0.f, 6.f) * (1.f / 6.f);
    case kSigmoid: return sigmoidf_(x);
    case kGelu: return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
    case kGeluTanh: {
      const float z = 0.7978845608028654f * (x + 0.044715f * x * x * x);
      return 0.5f * x * (1.f + tanhf(z));
    }
    default: return x;
  }
}

}  // namespace cnnfuse
