// Unit tests of the torch-free deform_sample CPU kernels: known values, comparison with a naive per-element
// loop (written independently, in the style of grid_sample's own kernel: per corner, per channel), finite
// differences for the point/weight gradients, and bit-identical value gradients across thread counts.
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/deform_sample.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// CHECK with a printf-style description of what failed.
void expect(bool ok, const char* fmt, ...) {
  if (ok) return;
  ++mtlfast::test::failures();
  std::va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "CHECK failed: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  va_end(args);
}

using mtlfast::cpu::deform_sample_backward;
using mtlfast::cpu::deform_sample_forward;

// A problem in the launchers' layout: values[s] (B, H_s, W_s, C), points (B, N, 2), weights (B, N, S).
template <typename T>
struct Problem {
  int64_t B, N, C;
  std::vector<int64_t> H, W;
  std::vector<std::vector<T>> values;
  std::vector<T> points, weights;

  int64_t S() const { return static_cast<int64_t>(H.size()); }
  std::vector<const T*> value_ptrs() const {
    std::vector<const T*> p;
    for (const auto& v : values) p.push_back(v.data());
    return p;
  }
  T value(int64_t s, int64_t b, int64_t y, int64_t x, int64_t c) const {
    if (y < 0 || y >= H[s] || x < 0 || x >= W[s]) return T(0);
    return values[s][((b * H[s] + y) * W[s] + x) * C + c];
  }
};

template <typename T>
Problem<T> random_problem(std::mt19937& rng, int64_t B, int64_t N, int64_t C, std::vector<int64_t> H,
                          std::vector<int64_t> W) {
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> coord(-1.3, 1.3);  // includes points outside [-1, 1]
  Problem<T> p{B, N, C, H, W, {}, {}, {}};
  for (size_t s = 0; s < H.size(); ++s) {
    p.values.emplace_back(B * H[s] * W[s] * C);
    for (auto& v : p.values.back()) v = T(normal(rng));
  }
  p.points.resize(B * N * 2);
  for (auto& v : p.points) v = T(coord(rng));
  p.weights.resize(B * N * p.S());
  for (auto& v : p.weights) v = T(normal(rng));
  return p;
}

// Forward output and every gradient of a problem, each element preset to `fill` (NaN for the kernels' results:
// every element must be written).
template <typename U>
struct Outputs {
  std::vector<U> out, grad_points, grad_weights;
  std::vector<std::vector<U>> grad_values;
};

template <typename U, typename T>
Outputs<U> allocate_outputs(const Problem<T>& p, U fill) {
  Outputs<U> r;
  r.out.assign(p.B * p.N * p.C, fill);
  r.grad_points.assign(p.B * p.N * 2, fill);
  r.grad_weights.assign(p.B * p.N * p.S(), fill);
  for (int64_t s = 0; s < p.S(); ++s) r.grad_values.emplace_back(p.B * p.H[s] * p.W[s] * p.C, fill);
  return r;
}

// Naive forward and backward in double, one output element at a time, corner validity tested on integers.
template <typename T>
Outputs<double> naive(const Problem<T>& p, const std::vector<T>& grad_out) {
  auto r = allocate_outputs<double>(p, 0.0);
  const int64_t S = p.S();
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t n = 0; n < p.N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t bn = b * p.N + n;
        const double x = p.points[2 * bn], y = p.points[2 * bn + 1], w = p.weights[bn * S + s];
        const double ix = ((x + 1) * p.W[s] - 1) / 2, iy = ((y + 1) * p.H[s] - 1) / 2;
        const int64_t x0 = static_cast<int64_t>(std::floor(ix)), y0 = static_cast<int64_t>(std::floor(iy));
        const double fx = ix - x0, fy = iy - y0;
        for (int64_t c = 0; c < p.C; ++c) {
          const double v00 = p.value(s, b, y0, x0, c), v01 = p.value(s, b, y0, x0 + 1, c);
          const double v10 = p.value(s, b, y0 + 1, x0, c), v11 = p.value(s, b, y0 + 1, x0 + 1, c);
          const double sample = (1 - fy) * ((1 - fx) * v00 + fx * v01) + fy * ((1 - fx) * v10 + fx * v11);
          const double g = grad_out[bn * p.C + c];
          r.out[bn * p.C + c] += w * sample;
          r.grad_weights[bn * S + s] += g * sample;
          r.grad_points[2 * bn] += w * g * ((1 - fy) * (v01 - v00) + fy * (v11 - v10)) * p.W[s] / 2;
          r.grad_points[2 * bn + 1] += w * g * ((1 - fx) * (v10 - v00) + fx * (v11 - v01)) * p.H[s] / 2;
          const double cw[4] = {(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx};
          for (int k = 0; k < 4; ++k) {
            const int64_t yy = y0 + (k >> 1), xx = x0 + (k & 1);
            if (yy < 0 || yy >= p.H[s] || xx < 0 || xx >= p.W[s]) continue;
            r.grad_values[s][((b * p.H[s] + yy) * p.W[s] + xx) * p.C + c] += w * cw[k] * g;
          }
        }
      }
  return r;
}

template <typename T>
double max_rel_diff(const std::vector<T>& got, const std::vector<double>& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    diff = std::fmax(diff, std::fabs(double(got[i]) - want[i]));
    norm = std::fmax(norm, std::fabs(want[i]));
  }
  return norm > 0 ? diff / norm : diff;
}

template <typename T>
Outputs<T> run_kernels(const Problem<T>& p, const std::vector<T>& grad_out) {
  auto r = allocate_outputs<T>(p, T(std::nan("")));
  std::vector<T*> gv_ptrs;
  for (auto& g : r.grad_values) gv_ptrs.push_back(g.data());
  const auto vp = p.value_ptrs();
  int st = deform_sample_forward<T>(vp.data(), p.H.data(), p.W.data(), p.S(), p.points.data(), p.weights.data(),
                                    p.B, p.N, p.C, r.out.data());
  expect(st == 0, "forward status %d", st);
  st = deform_sample_backward<T>(grad_out.data(), vp.data(), p.H.data(), p.W.data(), p.S(), p.points.data(),
                                 p.weights.data(), p.B, p.N, p.C, gv_ptrs.data(), r.grad_points.data(),
                                 r.grad_weights.data());
  expect(st == 0, "backward status %d", st);
  return r;
}

template <typename T>
void test_against_naive(double tol, const char* name) {
  std::mt19937 rng(1234);
  // S = 1..4 stages of different sizes, odd channel counts, one batch of a single point.
  const std::vector<std::vector<int64_t>> Hs = {{5}, {7, 3}, {6, 1, 4}, {9, 5, 3, 2}};
  const std::vector<std::vector<int64_t>> Ws = {{4}, {2, 6}, {8, 3, 1}, {11, 4, 7, 1}};
  const int64_t shapes[][3] = {{1, 1, 1}, {2, 13, 5}, {3, 29, 17}, {2, 57, 33}};
  for (size_t i = 0; i < Hs.size(); ++i) {
    const auto p = random_problem<T>(rng, shapes[i][0], shapes[i][1], shapes[i][2], Hs[i], Ws[i]);
    std::vector<T> grad_out(p.B * p.N * p.C);
    std::normal_distribution<double> normal;
    for (auto& g : grad_out) g = T(normal(rng));
    const auto want = naive(p, grad_out);
    const auto got = run_kernels(p, grad_out);
    double e = max_rel_diff(got.out, want.out);
    expect(e < tol, "%s S=%zu out err %g", name, i + 1, e);
    e = max_rel_diff(got.grad_points, want.grad_points);
    expect(e < tol, "%s S=%zu grad_points err %g", name, i + 1, e);
    e = max_rel_diff(got.grad_weights, want.grad_weights);
    expect(e < tol, "%s S=%zu grad_weights err %g", name, i + 1, e);
    for (int64_t s = 0; s < p.S(); ++s) {
      e = max_rel_diff(got.grad_values[s], want.grad_values[s]);
      expect(e < tol, "%s S=%zu grad_values[%ld] err %g", name, i + 1, static_cast<long>(s), e);
    }
  }
}

// Known values on a 2 x 4 image with one channel holding 10 y + x + 1, single stage, weight 2.
void test_known_values() {
  Problem<double> p{1, 5, 1, {2}, {4}, {{1, 2, 3, 4, 11, 12, 13, 14}}, {}, {}};
  p.points = {
      -1, -1,                  // image corner: only pixel (0,0) inside, with weight 1/4
      -0.75, -0.5,             // centre of pixel (0,0)
      0.25, 0.0,               // between the rows, x at pixel centre 2: (3 + 13) / 2
      1.0, 1.0,                // opposite corner: only pixel (1,3) inside, weight 1/4
      3.0, 0.0,                // far outside: zero
  };
  p.weights = {2, 2, 2, 2, 2};
  std::vector<double> out(5, std::nan(""));
  const auto vp = p.value_ptrs();
  expect(deform_sample_forward<double>(vp.data(), p.H.data(), p.W.data(), 1, p.points.data(), p.weights.data(), 1,
                                      5, 1, out.data()) == 0, "status");
  const double want[5] = {2 * 0.25 * 1, 2 * 1, 2 * 8.0, 2 * 0.25 * 14, 0};
  for (int i = 0; i < 5; ++i) expect(std::fabs(out[i] - want[i]) < 1e-12, "point %d: got %g want %g", i, out[i], want[i]);
}

// Point and weight gradients against central differences of the forward (double, points away from pixel borders).
void test_finite_differences() {
  std::mt19937 rng(99);
  auto p = random_problem<double>(rng, 2, 9, 6, {5, 3}, {7, 4});
  std::vector<double> grad_out(p.B * p.N * p.C);
  std::normal_distribution<double> normal;
  for (auto& g : grad_out) g = normal(rng);
  const auto got = run_kernels(p, grad_out);
  auto loss = [&](const Problem<double>& q) {
    std::vector<double> out(q.B * q.N * q.C);
    const auto vp = q.value_ptrs();
    deform_sample_forward<double>(vp.data(), q.H.data(), q.W.data(), q.S(), q.points.data(), q.weights.data(), q.B,
                                  q.N, q.C, out.data());
    double l = 0;
    for (size_t i = 0; i < out.size(); ++i) l += out[i] * grad_out[i];
    return l;
  };
  const double h = 1e-6;
  auto fd = [&](std::vector<double>& param, size_t i) {
    const double keep = param[i];
    param[i] = keep + h;
    const double up = loss(p);
    param[i] = keep - h;
    const double down = loss(p);
    param[i] = keep;
    return (up - down) / (2 * h);
  };
  for (size_t i = 0; i < p.points.size(); ++i) {
    const double want = fd(p.points, i);
    expect(std::fabs(got.grad_points[i] - want) < 1e-5 * (1 + std::fabs(want)), "grad_points[%zu] %g vs fd %g", i,
          got.grad_points[i], want);
  }
  for (size_t i = 0; i < p.weights.size(); ++i) {
    const double want = fd(p.weights, i);
    expect(std::fabs(got.grad_weights[i] - want) < 1e-6 * (1 + std::fabs(want)), "grad_weights[%zu] %g vs fd %g", i,
          got.grad_weights[i], want);
  }
}

// Many points on few pixels (heavy bucket sharing): grad_values bit-identical for 1 and 2 threads and reruns.
void test_deterministic_value_gradient() {
  std::mt19937 rng(7);
  const auto p = random_problem<float>(rng, 2, 2001, 24, {3, 2}, {4, 1});
  std::vector<float> grad_out(p.B * p.N * p.C);
  std::normal_distribution<double> normal;
  for (auto& g : grad_out) g = float(normal(rng));
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
#endif
  const auto one = run_kernels(p, grad_out);
#ifdef _OPENMP
  omp_set_num_threads(std::max(2, threads));
#endif
  const auto many = run_kernels(p, grad_out);
  const auto again = run_kernels(p, grad_out);
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  for (int64_t s = 0; s < p.S(); ++s) {
    expect(one.grad_values[s] == many.grad_values[s], "grad_values[%ld] differs between thread counts",
          static_cast<long>(s));
    expect(again.grad_values[s] == many.grad_values[s], "grad_values[%ld] differs between runs", static_cast<long>(s));
  }
}

void test_errors() {
  float v = 1, pt[2] = {0, 0}, w = 1, out = 0;
  const float* vp[1] = {&v};
  int64_t one = 1, zero = 0;
  expect(deform_sample_forward<float>(vp, &one, &one, 1, pt, &w, 1, 1, 0, &out) == mtlfast::cpu::kDeformBadSize,
        "C = 0 accepted");
  expect(deform_sample_forward<float>(vp, &zero, &one, 1, pt, &w, 1, 1, 1, &out) == mtlfast::cpu::kDeformBadSize,
        "H = 0 accepted");
  expect(deform_sample_forward<float>(vp, &one, &one, 1, pt, &w, 1, 1, 1, nullptr) ==
            mtlfast::cpu::kDeformNullPointer, "null output accepted");
}

}  // namespace

int main() {
  test_known_values();
  test_against_naive<double>(1e-12, "float64");
  test_against_naive<float>(1e-5, "float32");
  test_finite_differences();
  test_deterministic_value_gradient();
  test_errors();
  return TEST_MAIN_RESULT();
}
