// CUDA runtime version this extension was compiled against, reported by `mtlfast info`.
#include "build_info.cuh"

#include "common.cuh"

namespace mtlfast::cuda {

int compiled_cudart_version() { return CUDART_VERSION; }

int runtime_cudart_version() {
  int version = 0;
  return cudaRuntimeGetVersion(&version) == cudaSuccess ? version : -1;
}

}  // namespace mtlfast::cuda
