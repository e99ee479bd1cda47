// The Python module `cnnfuse._C`: build facts only. Ops register themselves with the
// dispatcher (TORCH_LIBRARY_IMPL in each op's sources) when this library is loaded.
#include <pybind11/pybind11.h>

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
}
