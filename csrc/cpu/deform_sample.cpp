// deform_sample CPU kernels (float32 / float64, OpenMP). Layout and semantics: deform_sample.h.
//
// Forward and the point/weight gradients run one (batch, point) per loop index: the four corner rows of each
// stage are contiguous (channels-last), so the inner loops are unit-stride and vectorise.
//
// The value gradient is a GATHER, not a scatter: for every (batch, stage) the corner contributions
// (point index, factor) are bucketed by pixel with a counting sort filled in increasing point order; then each
// pixel row sums factor * grad_out[point] over its bucket in that order. No two threads write the same row and
// the summation order does not depend on the thread count, so the result is deterministic (bit-identical for
// any number of threads) without atomics or per-thread copies of grad_values.
#include "deform_sample.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "parallel.h"

namespace mtlfast::cpu {

namespace {

using deform::bilinear_corners;
using deform::Corners;

template <typename T>
int check_args(const T* const* values, const int64_t* heights, const int64_t* widths, int64_t stages,
               const void* points, const void* weights, int64_t batch, int64_t num_points, int64_t channels) {
  if (batch < 1 || num_points < 1 || channels < 1 || stages < 1) return kDeformBadSize;
  if (num_points > std::numeric_limits<int32_t>::max()) return kDeformTooManyPoints;
  if (!values || !heights || !widths || !points || !weights) return kDeformNullPointer;
  for (int64_t s = 0; s < stages; ++s) {
    if (heights[s] < 1 || widths[s] < 1) return kDeformBadSize;
    if (!values[s]) return kDeformNullPointer;
  }
  return kDeformOk;
}

// parallel_for unless the loop is too small to pay for waking the thread team (results do not depend on it:
// every index writes its own outputs). `cost` is the approximate work per index, in multiply-adds.
template <typename Body>
void maybe_parallel_for(int64_t n, int64_t cost, Body body) {
  constexpr int64_t kMinParallelWork = int64_t(1) << 15;
  if (n * cost < kMinParallelWork) {
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
    parallel_for(n, body);
  }
}

// dst[c] += a * src[c]
template <typename T>
inline void axpy(T* __restrict dst, const T* __restrict src, T a, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) dst[c] += a * src[c];
}

}  // namespace

const char* deform_sample_status_string(int status) {
  switch (status) {
    case kDeformOk: return "ok";
    case kDeformBadSize: return "a size is < 1";
    case kDeformNullPointer: return "a null pointer was passed";
    case kDeformTooManyPoints: return "N >= 2^31 points";
    default: return "unknown status";
  }
}

template <typename T>
int deform_sample_forward(const T* const* values, const int64_t* heights, const int64_t* widths, int64_t stages,
                          const T* points, const T* weights, int64_t batch, int64_t num_points, int64_t channels,
                          T* out) {
  if (int st = check_args(values, heights, widths, stages, points, weights, batch, num_points, channels)) return st;
  if (!out) return kDeformNullPointer;
  const int64_t C = channels;
  maybe_parallel_for(batch * num_points, 4 * stages * C, [&](int64_t bn) {
    const int64_t b = bn / num_points;
    T* __restrict o = out + bn * C;
    if (!(std::isfinite(points[2 * bn]) && std::isfinite(points[2 * bn + 1]))) {
      std::fill(o, o + C, std::numeric_limits<T>::quiet_NaN());  // grid_sample's value (inf - inf, or NaN)
      return;
    }
    std::fill(o, o + C, T(0));
    for (int64_t s = 0; s < stages; ++s) {
      const int64_t H = heights[s], W = widths[s];
      const T w = weights[bn * stages + s];
      const Corners<T> cr = bilinear_corners<T>(points[2 * bn], points[2 * bn + 1], H, W);
      const T* v = values[s] + b * H * W * C;
      for (int k = 0; k < 4; ++k)
        if (cr.inside[k]) axpy(o, v + cr.pixel[k] * C, w * cr.coef[k], C);
    }
  });
  return kDeformOk;
}

template <typename T>
int deform_sample_backward(const T* grad_out, const T* const* values, const int64_t* heights, const int64_t* widths,
                           int64_t stages, const T* points, const T* weights, int64_t batch, int64_t num_points,
                           int64_t channels, T* const* grad_values, T* grad_points, T* grad_weights) {
  if (int st = check_args(values, heights, widths, stages, points, weights, batch, num_points, channels)) return st;
  if (!grad_out || !grad_values || !grad_points || !grad_weights) return kDeformNullPointer;
  for (int64_t s = 0; s < stages; ++s)
    if (!grad_values[s]) return kDeformNullPointer;
  const int64_t C = channels, N = num_points, S = stages;

  // 1. Point and weight gradients: per point and stage, the four dots <grad_out row, corner row>.
  maybe_parallel_for(batch * N, 4 * S * C, [&](int64_t bn) {
    const int64_t b = bn / N;
    const T* __restrict g = grad_out + bn * C;
    T gx = 0, gy = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t H = heights[s], W = widths[s];
      const T w = weights[bn * S + s];
      const Corners<T> cr = bilinear_corners<T>(points[2 * bn], points[2 * bn + 1], H, W);
      const T* v = values[s] + b * H * W * C;
      T d[4] = {0, 0, 0, 0};
      for (int k = 0; k < 4; ++k) {
        if (!cr.inside[k]) continue;
        const T* __restrict row = v + cr.pixel[k] * C;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < C; ++c) dot += g[c] * row[c];
        d[k] = dot;
      }
      const deform::PointGrads<T> pg = deform::point_grads<T>(cr, d, w, H, W);
      grad_weights[bn * S + s] = pg.weight;
      gx += pg.x;
      gy += pg.y;
    }
    grad_points[2 * bn] = gx;
    grad_points[2 * bn + 1] = gy;
  });

  // 2. Value gradients by gather. Bucket (b, s) owns the pixel range [pixel_base, pixel_base + H_s W_s) of the
  //    global pixel index (stage-major, then batch) and at most 4 N entries starting at entry_base.
  std::vector<int64_t> stage_pixel_base(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) stage_pixel_base[s + 1] = stage_pixel_base[s] + batch * heights[s] * widths[s];
  const int64_t entries_per_bucket = 4 * N;
  std::vector<int64_t> begin(stage_pixel_base[S]), count(stage_pixel_base[S]);
  std::vector<int32_t> entry_point(S * batch * entries_per_bucket);
  std::vector<T> entry_factor(S * batch * entries_per_bucket);

  maybe_parallel_for(S * batch, 8 * N, [&](int64_t sb) {
    const int64_t s = sb / batch, b = sb % batch;
    const int64_t H = heights[s], W = widths[s];
    const int64_t pixel_base = stage_pixel_base[s] + b * H * W;
    int64_t* __restrict cnt = count.data() + pixel_base;
    int64_t* __restrict beg = begin.data() + pixel_base;
    std::fill(cnt, cnt + H * W, int64_t(0));
    for (int64_t n = 0; n < N; ++n) {
      const int64_t bn = b * N + n;
      const Corners<T> cr = bilinear_corners<T>(points[2 * bn], points[2 * bn + 1], H, W);
      for (int k = 0; k < 4; ++k) cnt[cr.pixel[k]] += cr.inside[k];
    }
    int64_t next = sb * entries_per_bucket;
    for (int64_t p = 0; p < H * W; ++p) {
      beg[p] = next;
      next += cnt[p];
      cnt[p] = 0;  // reused as the fill cursor; ends equal to the count again
    }
    for (int64_t n = 0; n < N; ++n) {
      const int64_t bn = b * N + n;
      const Corners<T> cr = bilinear_corners<T>(points[2 * bn], points[2 * bn + 1], H, W);
      const T w = weights[bn * S + s];
      for (int k = 0; k < 4; ++k) {
        if (!cr.inside[k]) continue;
        const int64_t e = beg[cr.pixel[k]] + cnt[cr.pixel[k]]++;
        entry_point[e] = static_cast<int32_t>(n);
        entry_factor[e] = w * cr.coef[k];
      }
    }
  });

  // One loop over the pixels of every stage, split into chunks of equal work (a coarse stage's pixel has far
  // more entries than a fine one's): fewer thread-team wake-ups than one loop per stage, still balanced.
  const int64_t total_pixels = stage_pixel_base[S];
  std::vector<int64_t> work(total_pixels + 1, 0);  // prefix sums of (entries + 1) row operations
  for (int64_t p = 0; p < total_pixels; ++p) work[p + 1] = work[p] + count[p] + 1;
  const int64_t chunks = std::min<int64_t>(total_pixels, work.back() * C < (int64_t(1) << 15) ? 1 : 4 * max_threads());
  auto chunk_start = [&](int64_t t) {
    return std::lower_bound(work.begin(), work.end() - 1, work.back() * t / chunks) - work.begin();
  };
  maybe_parallel_for(chunks, work.back() * C / chunks, [&](int64_t t) {
    int64_t s = 0;
    for (int64_t pixel = chunk_start(t), end = chunk_start(t + 1); pixel < end; ++pixel) {
      while (pixel >= stage_pixel_base[s + 1]) ++s;
      const int64_t bp = pixel - stage_pixel_base[s];  // b * H_s * W_s + y * W_s + x
      const int64_t b = bp / (heights[s] * widths[s]);
      T* __restrict gv = grad_values[s] + bp * C;
      std::fill(gv, gv + C, T(0));
      const int64_t e0 = begin[pixel], e1 = e0 + count[pixel];
      for (int64_t e = e0; e < e1; ++e) axpy(gv, grad_out + (b * N + entry_point[e]) * C, entry_factor[e], C);
    }
  });
  return kDeformOk;
}

#define MTLFAST_INSTANTIATE(T)                                                                                    \
  template int deform_sample_forward<T>(const T* const*, const int64_t*, const int64_t*, int64_t, const T*,      \
                                        const T*, int64_t, int64_t, int64_t, T*);                                 \
  template int deform_sample_backward<T>(const T*, const T* const*, const int64_t*, const int64_t*, int64_t,     \
                                         const T*, const T*, int64_t, int64_t, int64_t, T* const*, T*, T*);
MTLFAST_INSTANTIATE(float)
MTLFAST_INSTANTIATE(double)
#undef MTLFAST_INSTANTIATE

}  // namespace mtlfast::cpu
