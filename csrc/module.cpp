// The Python module `cnnfuse._C`: build facts only. Ops register themselves with the
// dispatcher (TORCH_LIBRARY_IMPL in each op's sources) when this library is loaded.
#include <pybind11/pybind11.h>

#include <stdexcept>
#ifdef CNNFUSE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef CNNFUSE_CUDA_ARCHS
#define CNNFUSE_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", [] {
    py::dict info;
#ifdef CNNFUSE_WITH_CUDA
    info["cuda"] = true;
    info["cuda_version"] = CNNFUSE_CUDA_VERSION;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = CNNFUSE_CUDA_ARCHS;
#ifdef CNNFUSE_WITH_CUDNN_FRONTEND
    info["cudnn_frontend"] = true;
#else
    info["cudnn_frontend"] = false;
#endif
    return info;
  });
#ifdef CNNFUSE_WITH_CUDA
  // This thread's stream-capture mode (0 global, 1 thread-local, 2 relaxed); returns the old
  // one. Relaxed lets a kernel be loaded while a CUDA graph is being captured.
  m.def("exchange_capture_mode", [](int mode) {
    auto value = static_cast<cudaStreamCaptureMode>(mode);
    cudaError_t err = cudaThreadExchangeStreamCaptureMode(&value);
    if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
    return static_cast<int>(value);
  });
#endif
}
