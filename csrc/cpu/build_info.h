// What the torch-free core was compiled with, for `mtlfast info` and the C++ unit tests.
#pragma once

#include <string>

namespace mtlfast {

// e.g. "openmp=yes(201511) threads=2 compiler=gcc-12.2.0"
std::string cpu_build_info();

}  // namespace mtlfast
