#include "build_info.h"

#include "parallel.h"

namespace mtlfast {

std::string cpu_build_info() {
  std::string info;
#ifdef _OPENMP
  info += "openmp=yes(" + std::to_string(_OPENMP) + ")";
#else
  info += "openmp=no";
#endif
  info += " threads=" + std::to_string(cpu::max_threads());
#if defined(__clang__)
  info += " compiler=clang-" + std::to_string(__clang_major__) + "." + std::to_string(__clang_minor__);
#elif defined(__GNUC__)
  info += " compiler=gcc-" + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
          std::to_string(__GNUC_PATCHLEVEL__);
#endif
  return info;
}

}  // namespace mtlfast
