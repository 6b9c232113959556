// The core reports how it was built; `mtlfast info` relies on the "openmp=" field.
#include <string>

#include "check.h"
#include "cpu/build_info.h"
#include "cpu/parallel.h"

int main() {
  const std::string info = mtlfast::cpu_build_info();
  CHECK(info.rfind("openmp=yes", 0) == 0);  // this build links OpenMP (CMake requires it)
  CHECK(mtlfast::cpu::max_threads() >= 1);

  // parallel_for visits every index exactly once.
  int hits[257] = {0};
  mtlfast::cpu::parallel_for(257, [&](int64_t i) { hits[i] += 1; });
  int total = 0;
  for (int h : hits) {
    CHECK(h == 1);
    total += h;
  }
  CHECK(total == 257);
  return TEST_MAIN_RESULT();
}
