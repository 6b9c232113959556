// Shared helpers for the torch-free CUDA launchers: error codes are returned, never thrown across the
// binding (which turns them into a TORCH_CHECK with the kernel's name).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mtlfast::cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mtlfast::cuda
