// Activations shared by every C++/CUDA epilogue. The enum follows cnnfuse.ref.ACTIVATIONS
// (the order there is the ABI; tests/ops/test_activations.py parses this enum to check it),
// and the formulas are those of cnnfuse.ref.activation: PyTorch's, with p0, p1 the
// parameters of the activations that have them (leaky_relu's slope, elu's and celu's alpha,
// hardtanh's min_val and max_val, softplus' beta and threshold), 0 for the others.
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
  kLeakyRelu, kElu, kCelu, kSelu, kMish, kTanh, kHardtanh, kSoftplus,
  kNumActivations
};

// SELU's constants (Klambauer et al. 2017), as torch.nn.SELU has them.
constexpr float kSeluAlpha = 1.6732632423543772848170429916717f;
constexpr float kSeluScale = 1.0507009873554804934193349852946f;

CNNFUSE_HD float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }
// Clamps that let NaN through, as PyTorch's kernels do: fmaxf/fminf return the operand that
// is not NaN (relu(NaN) would be 0). A comparison with NaN is false, so x comes out.
CNNFUSE_HD float maxf_(float x, float lo) { return x < lo ? lo : x; }
CNNFUSE_HD float clampf_(float x, float lo, float hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

CNNFUSE_HD float activate(float x, int act, float p0 = 0.f, float p1 = 0.f) {
  switch (act) {
    case kRelu: return maxf_(x, 0.f);
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
    case kLeakyRelu: return x > 0.f ? x : x * p0;
    case kElu: return x > 0.f ? x : p0 * expm1f(x);
    case kCelu: return x > 0.f ? x : p0 * expm1f(x * (1.f / p0));
    case kSelu: return kSeluScale * (x > 0.f ? x : kSeluAlpha * expm1f(x));
    case kMish: return x * tanhf(log1pf(expf(x)));  // tanh(inf) = 1: no overflow case
    case kTanh: return tanhf(x);
    case kHardtanh: return clampf_(x, p0, p1);
    case kSoftplus: {
      const float z = x * p0;
      return z > p1 ? x : log1pf(expf(z)) / p0;
    }
    default: return x;
  }
}

}  // namespace cnnfuse
