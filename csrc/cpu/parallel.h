// Thread-parallel loops for the CPU kernels (torch-free: OpenMP when compiled with it, serial otherwise).
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mtlfast::cpu {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Calls body(i) for i in [0, n), statically partitioned so that each index always goes to the same thread
// for a given thread count (the kernels rely on this for deterministic per-thread accumulation).
template <typename Body>
inline void parallel_for(int64_t n, Body body) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) body(i);
#else
  for (int64_t i = 0; i < n; ++i) body(i);
#endif
}

}  // namespace mtlfast::cpu
