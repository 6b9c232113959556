// The only translation unit that includes torch: op schemas (TORCH_LIBRARY), argument checks, output
// allocation, and dispatch to the torch-free CPU launchers (csrc/cpu) and CUDA launchers (csrc/cuda).
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <atomic>
#include <string>

#include "cpu/build_info.h"
#ifdef MTLFAST_WITH_CUDA
#include "cuda/build_info.cuh"
#endif

namespace {

// When set (mtlfast.testing.poison_outputs), outputs are filled with NaN instead of left uninitialised,
// so that a kernel which fails to write an element is caught by the tests.
std::atomic<bool> g_poison_outputs{false};

[[maybe_unused]] at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (g_poison_outputs.load()) return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  return at::empty(sizes, options);
}

std::string build_info() {
  std::string info = mtlfast::cpu_build_info();
#ifdef MTLFAST_WITH_CUDA
  info += " cuda=yes cudart=" + std::to_string(mtlfast::cuda::compiled_cudart_version());
#ifdef MTLFAST_CUDA_ARCHS
  info += " archs=" MTLFAST_CUDA_ARCHS;
#endif
#else
  info += " cuda=no";
#endif
  return info;
}

void set_poison_outputs(bool enabled) { g_poison_outputs.store(enabled); }

}  // namespace

TORCH_LIBRARY(mtlfast, m) {
  m.def("build_info() -> str", &build_info);
  m.def("set_poison_outputs(bool enabled) -> ()", &set_poison_outputs);
}

// A plain module init so that `import mtlfast._C` loads the library and runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mtlfast compiled ops (see torch.ops.mtlfast)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
