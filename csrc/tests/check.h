// Minimal assertion helpers for the torch-free C++ unit tests (run by ctest: a test passes when main
// returns 0). CHECK records a failure with its location and keeps going, so one run reports all of them.
#pragma once

#include <cmath>
#include <cstdio>

namespace mtlfast::test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline bool near(double a, double b, double tol) { return std::fabs(a - b) <= tol * (1.0 + std::fabs(b)); }

}  // namespace mtlfast::test

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++mtlfast::test::failures();                                               \
    }                                                                            \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                                        \
  do {                                                                                               \
    double a_ = (a), b_ = (b);                                                                       \
    if (!mtlfast::test::near(a_, b_, (tol))) {                                                       \
      std::fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s=%.17g vs %s=%.17g\n", __FILE__, __LINE__, #a, \
                   a_, #b, b_);                                                                      \
      ++mtlfast::test::failures();                                                                   \
    }                                                                                                \
  } while (0)

#define TEST_MAIN_RESULT()                                                       \
  (mtlfast::test::failures() == 0                                               \
       ? (std::printf("all checks passed\n"), 0)                                 \
       : (std::fprintf(stderr, "%d check(s) failed\n", mtlfast::test::failures()), 1))
