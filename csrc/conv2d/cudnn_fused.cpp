// cnnfuse::conv2d_cudnn — y = act(conv2d(x, w) + bias + residual) as one cuDNN
// runtime-fusion graph (cudnn_frontend v1 Graph API). Inputs are validated in
// Python (NHWC x/weight/residual, 4-int padding left/right/top/bottom); only
// cheap sanity checks are repeated here.
//
// Errors whose message starts with "cudnn_fused: no engine" mean cuDNN cannot
// run this graph (and never will for these parameters): the caller falls back.
//
// This is the only translation unit that includes cudnn_frontend.h (about a
// minute to compile on 2 cores); keep it that way.

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/cudnn/Handle.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

// JSON (de)serialization of graphs is unused here and costs ~25% of this
// file's compile time. Safe to set per TU: no other TU includes the frontend.
#define CUDNN_FRONTEND_SKIP_JSON_LIB
// The frontend defines static helpers it does not always use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include <cudnn_frontend.h>
#pragma GCC diagnostic pop

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "../common/activation.h"

namespace cnnfuse {
namespace {

namespace fe = cudnn_frontend;
using fe::graph::Graph;
using fe::graph::Pointwise_attributes;
using TensorAttr = fe::graph::Tensor_attributes;
using TensorPtr = std::shared_ptr<TensorAttr>;
using PwMode = fe::PointwiseMode_t;

// Fixed UIDs so execute() can bind pointers without keeping Tensor_attributes.
enum : int64_t { kUidX = 1, kUidW, kUidBias, kUidRes, kUidY };

// The activations this graph builds: codes kNone..kGeluTanh of ../common/activation.h. The
// parametrised ones after them have no graph here; conv2d's backend choice
// (CUDNN_FUSED_CODES in pyext/ops/conv2d.py) never sends them.
constexpr int64_t kCudnnActivations = kGeluTanh + 1;

fe::DataType_t fe_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return fe::DataType_t::HALF;
    case at::kBFloat16: return fe::DataType_t::BFLOAT16;
    case at::kFloat: return fe::DataType_t::FLOAT;
    default: TORCH_CHECK(false, "cudnn_fused: unsupported dtype ", t);
  }
  return fe::DataType_t::NOT_SET;
}

// cuDNN is told each pointer's alignment (default assumption: 16 bytes), so it
// is part of the cache key: a sliced bias or residual may be less aligned.
int64_t ptr_alignment(const void* p) {
  auto addr = reinterpret_cast<uintptr_t>(p);
  int64_t a = 16;
  while (a > 1 && addr % a != 0) a /= 2;
  return a;
}

// Dense NHWC strides for an (N, C, H, W) shape. Derived from the sizes rather
// than read from the tensor because PyTorch leaves strides of size-1 dims
// arbitrary, and cuDNN wants one consistent layout.
std::vector<int64_t> nhwc_strides(const std::vector<int64_t>& d) {
  return {d[1] * d[2] * d[3], 1, d[3] * d[1], d[1]};
}

struct Problem {
  std::vector<int64_t> x_dim, w_dim, y_dim;
  int64_t pad_l, pad_r, pad_t, pad_b;
  int64_t stride_h, stride_w, dil_h, dil_w;
  int64_t activation;
  at::ScalarType dtype;
  std::optional<at::ScalarType> bias_dtype, res_dtype;
  int64_t align_x, align_w, align_b, align_r;
  bool allow_tf32, deterministic;
  int device;

  std::vector<int64_t> key() const {
    std::vector<int64_t> k;
    k.reserve(40);
    for (auto* v : {&x_dim, &w_dim, &y_dim}) k.insert(k.end(), v->begin(), v->end());
    k.insert(k.end(), {pad_l, pad_r, pad_t, pad_b, stride_h, stride_w, dil_h, dil_w, activation,
                       static_cast<int64_t>(dtype),
                       bias_dtype ? static_cast<int64_t>(*bias_dtype) : -1,
                       res_dtype ? static_cast<int64_t>(*res_dtype) : -1,
                       align_x, align_w, align_b, align_r, allow_tf32, deterministic, device});
    // Groups are implied by x_dim[1] / w_dim[1].
    return k;
  }
};

// A built graph, or (graph == nullptr) the remembered reason why there is none,
// so that unsupported shapes do not re-run heuristics on every call.
struct Plan {
  std::shared_ptr<Graph> graph;
  int64_t workspace = 0;
  std::string error;
};

TensorPtr scalar(Graph& g, float v) {
  // Passed by value at execute time; 4-d so it broadcasts like the other operands.
  auto t = g.tensor(TensorAttr(v));
  t->set_dim({1, 1, 1, 1}).set_stride({1, 1, 1, 1});
  return t;
}

TensorPtr pointwise(Graph& g, const TensorPtr& a, PwMode mode) {
  return g.pointwise(a, Pointwise_attributes().set_mode(mode));
}

TensorPtr pointwise(Graph& g, const TensorPtr& a, const TensorPtr& b, PwMode mode) {
  return g.pointwise(a, b, Pointwise_attributes().set_mode(mode));
}

TensorPtr relu_clipped(Graph& g, const TensorPtr& a, float upper) {
  return g.pointwise(a, Pointwise_attributes().set_mode(PwMode::RELU_FWD).set_relu_upper_clip(upper));
}

// hardsigmoid(v) = relu6(v + 3) / 6, as torch defines it; cuDNN has no mode for it.
TensorPtr hardsigmoid(Graph& g, const TensorPtr& v) {
  auto t = pointwise(g, v, scalar(g, 3.f), PwMode::ADD);
  t = relu_clipped(g, t, 6.f);
  return pointwise(g, t, scalar(g, 1.f / 6.f), PwMode::MUL);
}

TensorPtr apply_activation(Graph& g, const TensorPtr& v, int64_t act) {
  switch (act) {
    case kNone: return v;
    case kRelu: return pointwise(g, v, PwMode::RELU_FWD);
    case kRelu6: return relu_clipped(g, v, 6.f);
    case kSilu:
      return g.pointwise(v, Pointwise_attributes().set_mode(PwMode::SWISH_FWD).set_swish_beta(1.f));
    case kHardswish: return pointwise(g, v, hardsigmoid(g, v), PwMode::MUL);
    case kHardsigmoid: return hardsigmoid(g, v);
    case kSigmoid: return pointwise(g, v, PwMode::SIGMOID_FWD);
    case kGelu: return pointwise(g, v, PwMode::GELU_FWD);  // erf form
    case kGeluTanh: return pointwise(g, v, PwMode::GELU_APPROX_TANH_FWD);
    default: TORCH_CHECK_VALUE(false, "cudnn_fused: activation code ", act, " has no cuDNN graph");
  }
  return v;
}

std::shared_ptr<Plan> build_plan(const Problem& p, cudnnHandle_t handle) {
  auto plan = std::make_shared<Plan>();
  auto g = std::make_shared<Graph>();
  const auto io = fe_dtype(p.dtype);
  g->set_io_data_type(io)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);

  auto X = g->tensor(TensorAttr().set_name("x").set_uid(kUidX).set_data_type(io)
                         .set_dim(p.x_dim).set_stride(nhwc_strides(p.x_dim)).set_alignment(p.align_x));
  auto W = g->tensor(TensorAttr().set_name("w").set_uid(kUidW).set_data_type(io)
                         .set_dim(p.w_dim).set_stride(nhwc_strides(p.w_dim)).set_alignment(p.align_w));
  auto conv = fe::graph::Conv_fprop_attributes()
                  .set_name("conv")
                  .set_pre_padding({p.pad_t, p.pad_l})
                  .set_post_padding({p.pad_b, p.pad_r})
                  .set_stride({p.stride_h, p.stride_w})
                  .set_dilation({p.dil_h, p.dil_w});
  auto y = g->conv_fprop(X, W, conv);

  if (p.bias_dtype) {
    const int64_t K = p.w_dim[0];
    auto B = g->tensor(TensorAttr().set_name("bias").set_uid(kUidBias).set_data_type(fe_dtype(*p.bias_dtype))
                           .set_dim({1, K, 1, 1}).set_stride({K, 1, K, K}).set_alignment(p.align_b));
    y = pointwise(*g, y, B, PwMode::ADD);
  }
  if (p.res_dtype) {
    auto R = g->tensor(TensorAttr().set_name("residual").set_uid(kUidRes).set_data_type(fe_dtype(*p.res_dtype))
                           .set_dim(p.y_dim).set_stride(nhwc_strides(p.y_dim)).set_alignment(p.align_r));
    y = pointwise(*g, y, R, PwMode::ADD);
  }
  y = apply_activation(*g, y, p.activation);
  y->set_output(true).set_name("y").set_uid(kUidY).set_data_type(io)
      .set_dim(p.y_dim).set_stride(nhwc_strides(p.y_dim));

  // A failing validate() means this file built a malformed graph: report it
  // as such instead of hiding it behind a silent fallback.
  auto st = g->validate();
  TORCH_CHECK(st.is_good(), "cudnn_fused: invalid graph: ", st.get_message());

  auto no_engine = [&](const char* stage, fe::error_t& e) {
    plan->error = std::string("cudnn_fused: no engine (") + stage + "): " + e.get_message();
    return plan;
  };
  if ((st = g->build_operation_graph(handle)).is_bad()) return no_engine("operation graph", st);
  if ((st = g->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK})).is_bad())
    return no_engine("heuristics", st);

  // Same engine filtering as ATen's cuDNN convolutions: fp32 never silently
  // drops to fp16 inputs, and uses TF32 tensor cores only when allowed.
  if (p.dtype == at::kFloat) {
    g->deselect_numeric_notes({fe::NumericalNote_t::DOWN_CONVERT_INPUTS});
    if (!p.allow_tf32) g->deselect_numeric_notes({fe::NumericalNote_t::TENSOR_CORE});
  }
  if (p.deterministic) g->deselect_numeric_notes({fe::NumericalNote_t::NONDETERMINISTIC});

  if ((st = g->check_support()).is_bad()) return no_engine("check_support", st);
  if ((st = g->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE)).is_bad())
    return no_engine("build_plans", st);
  if ((st = g->get_workspace_size(plan->workspace)).is_bad()) return no_engine("workspace", st);

  plan->graph = std::move(g);
  return plan;
}

std::shared_ptr<Plan> get_plan(const Problem& p, cudnnHandle_t handle, cudaStream_t stream) {
  // Leaked on purpose: destroying cuDNN plans at exit can run after the CUDA
  // and cuDNN libraries are torn down. Plans never leave the cache, so CUDA
  // graphs captured from them stay valid.
  static std::mutex mutex;
  static auto& cache = *new std::map<std::vector<int64_t>, std::shared_ptr<Plan>>();
  // Plans are keyed by handle too, as ATen's cuDNN v8 plan cache is per
  // thread: nothing promises a plan may run on a handle it was not built with.
  auto key = p.key();
  key.push_back(reinterpret_cast<intptr_t>(handle));
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;

  // A first call may happen inside CUDA graph capture. Plan building calls
  // capture-unsafe APIs (module loads after NVRTC), which relaxed mode allows
  // for this thread; it enqueues no work on the stream.
  std::unique_ptr<c10::cuda::CUDAStreamCaptureModeGuard> relax;
  if (c10::cuda::captureStatusMayInitCtx(stream) != c10::cuda::CaptureStatus::None)
    relax = std::make_unique<c10::cuda::CUDAStreamCaptureModeGuard>(cudaStreamCaptureModeRelaxed);

  std::shared_ptr<Plan> plan;
  try {
    plan = build_plan(p, handle);
  } catch (const c10::Error&) {
    throw;  // our own checks: not a cuDNN limitation, and not cached
  } catch (const std::exception& e) {
    // The frontend throws (rather than returns) on some backend API failures.
    plan = std::make_shared<Plan>();
    plan->error = std::string("cudnn_fused: no engine (exception): ") + e.what();
  }
  cache.emplace(std::move(key), plan);
  return plan;
}

at::Tensor conv2d_cudnn(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        int64_t activation, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && weight.dim() == 4, "cudnn_fused: expected 4-d CUDA x and weight");
  TORCH_CHECK(stride.size() == 2 && dilation.size() == 2 && padding.size() == 4,
              "cudnn_fused: stride/dilation need 2 ints, padding 4 (left, right, top, bottom)");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0,
              "cudnn_fused: stride and dilation must be positive");
  TORCH_CHECK_VALUE(activation >= 0 && activation < kCudnnActivations, "cudnn_fused: activation code ",
                    activation, " has no cuDNN graph (codes 0 to ", kCudnnActivations - 1, " only)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "cudnn_fused: weight dtype must match x");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  weight.is_contiguous(at::MemoryFormat::ChannelsLast),
              "cudnn_fused: x and weight must be channels_last");
  TORCH_CHECK(groups >= 1 && x.size(1) == weight.size(1) * groups && weight.size(0) % groups == 0,
              "cudnn_fused: channel counts do not match groups=", groups);

  c10::cuda::CUDAGuard device_guard(x.device());

  Problem p;
  p.x_dim = x.sizes().vec();
  p.w_dim = weight.sizes().vec();
  p.pad_l = padding[0];
  p.pad_r = padding[1];
  p.pad_t = padding[2];
  p.pad_b = padding[3];
  p.stride_h = stride[0];
  p.stride_w = stride[1];
  p.dil_h = dilation[0];
  p.dil_w = dilation[1];
  const int64_t oh = (p.x_dim[2] + p.pad_t + p.pad_b - p.dil_h * (p.w_dim[2] - 1) - 1) / p.stride_h + 1;
  const int64_t ow = (p.x_dim[3] + p.pad_l + p.pad_r - p.dil_w * (p.w_dim[3] - 1) - 1) / p.stride_w + 1;
  TORCH_CHECK(oh > 0 && ow > 0, "cudnn_fused: empty output spatial size");
  p.y_dim = {p.x_dim[0], p.w_dim[0], oh, ow};
  p.activation = activation;
  p.dtype = x.scalar_type();
  p.align_x = ptr_alignment(x.const_data_ptr());
  p.align_w = ptr_alignment(weight.const_data_ptr());
  p.align_b = p.align_r = 0;
  if (bias) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == p.w_dim[0], "cudnn_fused: bias must be contiguous (K,)");
    p.bias_dtype = bias->scalar_type();
    p.align_b = ptr_alignment(bias->const_data_ptr());
  }
  if (residual) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(p.y_dim) &&
                    residual->is_contiguous(at::MemoryFormat::ChannelsLast),
                "cudnn_fused: residual must be channels_last with the output's shape");
    p.res_dtype = residual->scalar_type();
    p.align_r = ptr_alignment(residual->const_data_ptr());
  }
  // Read per call: the flags may change at run time and select other engines.
  p.allow_tf32 = p.dtype == at::kFloat && at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
  p.deterministic = at::globalContext().deterministicCuDNN();
  p.device = x.get_device();

  auto y = at::empty(p.y_dim, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;

  cudnnHandle_t handle = at::native::getCudnnHandle();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  TORCH_CHECK(cudnnSetStream(handle, stream) == CUDNN_STATUS_SUCCESS, "cudnn_fused: cudnnSetStream failed");

  auto plan = get_plan(p, handle, stream);
  TORCH_CHECK(plan->graph, plan->error);

  // Stream-ordered caching-allocator memory: safe to free on return, and drawn
  // from the graph's private pool under capture.
  at::Tensor workspace;
  if (plan->workspace > 0) workspace = at::empty({plan->workspace}, x.options().dtype(at::kByte));

  std::unordered_map<int64_t, void*> ptrs = {
      {kUidX, const_cast<void*>(x.const_data_ptr())},
      {kUidW, const_cast<void*>(weight.const_data_ptr())},
      {kUidY, y.data_ptr()},
  };
  if (bias) ptrs[kUidBias] = const_cast<void*>(bias->const_data_ptr());
  if (residual) ptrs[kUidRes] = const_cast<void*>(residual->const_data_ptr());

  auto st = plan->graph->execute(handle, ptrs, workspace.defined() ? workspace.data_ptr() : nullptr);
  TORCH_CHECK(st.is_good(), "cudnn_fused: execute failed: ", st.get_message());
  return y;
}

}  // namespace
}  // namespace cnnfuse

TORCH_LIBRARY_IMPL(cnnfuse, CUDA, m) {
  m.impl("conv2d_cudnn", &cnnfuse::conv2d_cudnn);
}
