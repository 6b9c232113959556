// deform_sample (DESIGN.md §3 op 6), torch-free CPU kernels, plus the bilinear geometry shared with the CUDA
// kernels (csrc/cuda/deform_sample.cu includes this header; the geometry functions are __host__ __device__).
//
//   out[b,n,:] = sum_s weights[b,n,s] * bilinear(values[s][b], points[b,n])
//
// with exactly F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False) semantics:
// a point (x, y) in [-1, 1] maps to the pixel coordinates ix = ((x + 1) W - 1) / 2, iy = ((y + 1) H - 1) / 2
// (pixel centres at integers), the four corners floor(ix)+{0,1} x floor(iy)+{0,1} are weighted bilinearly, and
// corners outside the image read zero (in the value and in the gradient w.r.t. the point).
//
// Memory layout expected by the launchers (the torch binding csrc/mtlfast_ops.cpp arranges it):
//   values[s]      (B, H_s, W_s, C) contiguous, i.e. channels-last: one pixel is a contiguous row of C values
//   points         (B, N, 2) contiguous, (x, y)
//   weights        (B, N, S) contiguous
//   out, grad_out  (B, N, C) contiguous
//   grad_values[s] (B, H_s, W_s, C) contiguous; grad_points (B, N, 2); grad_weights (B, N, S)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MTLFAST_HOST_DEVICE __host__ __device__
#else
#define MTLFAST_HOST_DEVICE
#endif

namespace mtlfast::deform {

// The four bilinear corners of one point on one H x W stage, in the order (y0,x0), (y0,x1), (y1,x0), (y1,x1).
// `pixel[k]` is the corner's pixel index y*W + x, valid only where `inside[k]`; `coef[k]` is its bilinear
// weight (zero where the corner is outside). fx, fy are the fractional parts of ix, iy.
template <typename A>
struct Corners {
  int64_t pixel[4];
  A coef[4];
  bool inside[4];
  A fx, fy;
};

// Corners of the point (x, y) on an H x W grid. The bounds are tested on the floored coordinates as floating
// point before any integer conversion, so points far outside [-1, 1] (even +-inf or NaN) are safe: every corner
// is outside (the forwards then write CPU grid_sample's NaN at non-finite points). A finite point whose pixel
// coordinate overflows (|x| ~ 1e38 in float32) has fraction 0, not inf - inf: its gradients are 0, not NaN.
template <typename A>
MTLFAST_HOST_DEVICE inline Corners<A> bilinear_corners(A x, A y, int64_t height, int64_t width) {
  const A ix = ((x + A(1)) * A(width) - A(1)) / A(2);
  const A iy = ((y + A(1)) * A(height) - A(1)) / A(2);
  using std::floor;
  using std::isfinite;
  const A x0 = floor(ix), y0 = floor(iy);
  Corners<A> c;
  c.fx = isfinite(ix) ? ix - x0 : A(0);
  c.fy = isfinite(iy) ? iy - y0 : A(0);
  const bool x_in[2] = {x0 >= A(0) && x0 < A(width), x0 + A(1) >= A(0) && x0 + A(1) < A(width)};
  const bool y_in[2] = {y0 >= A(0) && y0 < A(height), y0 + A(1) >= A(0) && y0 + A(1) < A(height)};
  const A wx[2] = {A(1) - c.fx, c.fx};
  const A wy[2] = {A(1) - c.fy, c.fy};
  for (int k = 0; k < 4; ++k) {
    const int dy = k >> 1, dx = k & 1;
    c.inside[k] = y_in[dy] && x_in[dx];
    c.coef[k] = c.inside[k] ? wy[dy] * wx[dx] : A(0);
    c.pixel[k] = c.inside[k] ? (static_cast<int64_t>(y0) + dy) * width + static_cast<int64_t>(x0) + dx : 0;
  }
  return c;
}

// Gradients of one stage's contribution given the four corner dot products d[k] = <grad_out row, corner k row>
// (zero for corners outside): d(loss)/d(weight_s) and d(loss)/d(x), d(loss)/d(y) for stage weight w.
// bilinear = sum_k coef_k v_k is linear in the corner rows, so these dots are all the backward needs:
//   d/dfx = (1-fy)(v01 - v00) + fy (v11 - v10),  d/dfy = (1-fx)(v10 - v00) + fx (v11 - v01),
//   dix/dx = W/2, diy/dy = H/2 (align_corners=False).
template <typename A>
struct PointGrads {
  A weight, x, y;
};

template <typename A>
MTLFAST_HOST_DEVICE inline PointGrads<A> point_grads(const Corners<A>& c, const A d[4], A w, int64_t height,
                                                     int64_t width) {
  PointGrads<A> g;
  g.weight = c.coef[0] * d[0] + c.coef[1] * d[1] + c.coef[2] * d[2] + c.coef[3] * d[3];
  const A dfx = (A(1) - c.fy) * (d[1] - d[0]) + c.fy * (d[3] - d[2]);
  const A dfy = (A(1) - c.fx) * (d[2] - d[0]) + c.fx * (d[3] - d[1]);
  g.x = w * dfx * (A(width) / A(2));
  g.y = w * dfy * (A(height) / A(2));
  return g;
}

}  // namespace mtlfast::deform

namespace mtlfast::cpu {

// Error codes of the CPU launchers (the binding validates first, these guard the raw-pointer contract).
enum DeformSampleStatus : int {
  kDeformOk = 0,
  kDeformBadSize = 1,     // a size < 1 (B, N, C, S, H_s, W_s)
  kDeformNullPointer = 2,
  kDeformTooManyPoints = 3,  // N >= 2^31 (the value-gradient buckets store int32 point indices)
};

const char* deform_sample_status_string(int status);

// out = sum_s weights[..., s] * bilinear(values[s], points); T = float or double (accumulation in T).
// OpenMP over batch x points; each output row is written by one thread.
template <typename T>
int deform_sample_forward(const T* const* values, const int64_t* heights, const int64_t* widths, int64_t stages,
                          const T* points, const T* weights, int64_t batch, int64_t num_points, int64_t channels,
                          T* out);

// Gradients of <grad_out, out> w.r.t. values, points and weights. Every output buffer is fully written.
// grad_values is computed as a gather (each pixel row sums its contributions in increasing point order, see
// deform_sample.cpp), so it is bit-identical from run to run and for any thread count.
template <typename T>
int deform_sample_backward(const T* grad_out, const T* const* values, const int64_t* heights, const int64_t* widths,
                           int64_t stages, const T* points, const T* weights, int64_t batch, int64_t num_points,
                           int64_t channels, T* const* grad_values, T* grad_points, T* grad_weights);

}  // namespace mtlfast::cpu
