// deform_sample CUDA kernels (fp32 / fp16 / bf16 in, fp32 math). Layout and geometry: csrc/cpu/deform_sample.h.
// T is the values' (and output's) type, P the points' and weights': T, or float with 16-bit T (mixed precision).
//
// Mapping: a group of `lanes` consecutive threads (a power of two <= 32, sized to C / V) serves one (b, n) point;
// each lane handles V consecutive channels per step with one vector load (16 bytes where C and every base
// pointer allow it, else narrower), stepping by lanes * V. All stages are read from a by-value pointer table,
// so any mix of stage sizes is one launch.
// Backward: the same mapping; per stage each lane accumulates the four corner dots <grad_out, corner row>,
// the group reduces them with shuffles (point / weight gradients follow from the dots, see point_grads), and
// the value gradient is scattered with fp32 atomicAdd (vector atomics on sm_90) into fp32 buffers.
#include "deform_sample.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <type_traits>

#include "../cpu/deform_sample.h"
#include "common.cuh"

namespace mtlfast::cuda {

namespace {

using deform::bilinear_corners;
using deform::Corners;

constexpr int kThreads = 256;

template <typename T>
struct StageTable {
  const T* values[kDeformMaxStages];
  float* grad_values[kDeformMaxStages];
  int64_t height[kDeformMaxStages];
  int64_t width[kDeformMaxStages];
  int stages;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// V consecutive elements moved with one load / store instruction.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  const Vec<T, V> vec = *reinterpret_cast<const Vec<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_float(vec.v[j]);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  Vec<T, V> vec;
#pragma unroll
  for (int j = 0; j < V; ++j) vec.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Vec<T, V>*>(p) = vec;
}

// dst[0:V] += v (fp32 atomics; 128/64-bit vector atomics exist from sm_90 on).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kVectorAtomics = true;
#else
constexpr bool kVectorAtomics = false;
#endif

template <int V>
__device__ __forceinline__ void atomic_add(float* dst, const float (&v)[V]) {
  if constexpr (kVectorAtomics && V % 4 == 0) {
#pragma unroll
    for (int j = 0; j < V; j += 4)
      atomicAdd(reinterpret_cast<float4*>(dst + j), make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
  } else if constexpr (kVectorAtomics && V % 2 == 0) {
#pragma unroll
    for (int j = 0; j < V; j += 2) atomicAdd(reinterpret_cast<float2*>(dst + j), make_float2(v[j], v[j + 1]));
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) atomicAdd(dst + j, v[j]);
  }
}

template <typename T, typename P, int V>
__global__ void __launch_bounds__(kThreads)
forward_kernel(StageTable<T> tab, const P* __restrict__ points, const P* __restrict__ weights, int64_t bn_total,
               int64_t num_points, int64_t channels, int lanes, T* __restrict__ out) {
  const int64_t bn = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / lanes;
  const int lane = threadIdx.x & (lanes - 1);
  if (bn >= bn_total) return;
  const int64_t b = bn / num_points;
  const int S = tab.stages;
  const float x = to_float(points[2 * bn]), y = to_float(points[2 * bn + 1]);
  const bool finite = isfinite(x) && isfinite(y);  // else NaN, as CPU grid_sample (CUDA's gives 0)
  for (int64_t c0 = static_cast<int64_t>(lane) * V; c0 < channels; c0 += static_cast<int64_t>(lanes) * V) {
    float acc[V] = {};
    for (int s = 0; s < S; ++s) {
      const int64_t H = tab.height[s], W = tab.width[s];
      const Corners<float> cr = bilinear_corners<float>(x, y, H, W);
      const float w = to_float(weights[bn * S + s]);
      const T* base = tab.values[s] + b * H * W * channels + c0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (!cr.inside[k]) continue;
        float v[V];
        load<T, V>(base + cr.pixel[k] * channels, v);
        const float f = w * cr.coef[k];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = fmaf(f, v[j], acc[j]);
      }
    }
    if (!finite) {
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = __int_as_float(0x7fc00000);  // quiet NaN
    }
    store<T, V>(out + bn * channels + c0, acc);
  }
}

template <typename T, typename P, int V>
__global__ void __launch_bounds__(kThreads)
backward_kernel(StageTable<T> tab, const T* __restrict__ grad_out, const P* __restrict__ points,
                const P* __restrict__ weights, int64_t bn_total, int64_t num_points, int64_t channels, int lanes,
                P* __restrict__ grad_points, P* __restrict__ grad_weights) {
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / lanes;
  const int lane = threadIdx.x & (lanes - 1);
  // Groups past the end stay (reading point 0, writing nothing) so that every lane of a warp reaches the shuffles.
  const bool active = group < bn_total;
  const int64_t bn = active ? group : 0;
  const int64_t c_end = active ? channels : 0;
  const int64_t b = bn / num_points;
  const int S = tab.stages;
  const float x = to_float(points[2 * bn]), y = to_float(points[2 * bn + 1]);
  const T* g_row = grad_out + bn * channels;
  float gx = 0.f, gy = 0.f;
  for (int s = 0; s < S; ++s) {
    const int64_t H = tab.height[s], W = tab.width[s];
    const Corners<float> cr = bilinear_corners<float>(x, y, H, W);
    const float w = to_float(weights[bn * S + s]);
    const int64_t stage_offset = b * H * W * channels;
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t c0 = static_cast<int64_t>(lane) * V; c0 < c_end; c0 += static_cast<int64_t>(lanes) * V) {
      float g[V];
      load<T, V>(g_row + c0, g);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (!cr.inside[k]) continue;
        const int64_t offset = stage_offset + cr.pixel[k] * channels + c0;
        float v[V], scatter[V];
        load<T, V>(tab.values[s] + offset, v);
        const float f = w * cr.coef[k];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          d[k] = fmaf(g[j], v[j], d[k]);
          scatter[j] = f * g[j];
        }
        if (f != 0.f) atomic_add<V>(tab.grad_values[s] + offset, scatter);
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k)
      for (int m = lanes >> 1; m > 0; m >>= 1) d[k] += __shfl_xor_sync(0xffffffffu, d[k], m, lanes);
    const deform::PointGrads<float> pg = deform::point_grads<float>(cr, d, w, H, W);
    if (active && lane == 0) grad_weights[bn * S + s] = from_float<P>(pg.weight);
    gx += pg.x;
    gy += pg.y;
  }
  if (active && lane == 0) {
    grad_points[2 * bn] = from_float<P>(gx);
    grad_points[2 * bn + 1] = from_float<P>(gy);
  }
}

int check_args(const void* const* values, const int64_t* heights, const int64_t* widths, int64_t stages,
               const void* points, const void* weights, int64_t batch, int64_t num_points, int64_t channels) {
  if (stages > kDeformMaxStages) return kDeformTooManyStages;
  if (batch < 1 || num_points < 1 || channels < 1 || stages < 1 || num_points > INT_MAX) return kDeformBadSize;
  if (!values || !heights || !widths || !points || !weights) return kDeformNullPointer;
  for (int64_t s = 0; s < stages; ++s) {
    if (heights[s] < 1 || widths[s] < 1 || heights[s] > INT_MAX || widths[s] > INT_MAX) return kDeformBadSize;
    if (!values[s]) return kDeformNullPointer;
  }
  return kDeformOk;
}

template <typename T>
StageTable<T> make_table(const void* const* values, float* const* grad_values, const int64_t* heights,
                         const int64_t* widths, int64_t stages) {
  StageTable<T> tab{};
  tab.stages = static_cast<int>(stages);
  for (int64_t s = 0; s < stages; ++s) {
    tab.values[s] = static_cast<const T*>(values[s]);
    tab.grad_values[s] = grad_values ? grad_values[s] : nullptr;
    tab.height[s] = heights[s];
    tab.width[s] = widths[s];
  }
  return tab;
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Widest V (16, 8, 4 bytes, or one element) that divides C and keeps every row pointer aligned.
template <typename T>
int vector_width(int64_t channels, const void* const* values, float* const* grad_values, int64_t stages,
                 const void* row_a, const void* row_b) {
  for (int v = 16 / static_cast<int>(sizeof(T)); v > 1; v /= 2) {
    const int64_t bytes = v * static_cast<int64_t>(sizeof(T));
    bool ok = channels % v == 0 && aligned(row_a, bytes) && aligned(row_b, bytes);
    for (int64_t s = 0; s < stages && ok; ++s)
      ok = aligned(values[s], bytes) && (!grad_values || aligned(grad_values[s], v * sizeof(float)));
    if (ok) return v;
  }
  return 1;
}

int lanes_for(int64_t channels, int v) {
  const int64_t steps = ceil_div(channels, v);
  int lanes = 1;
  while (lanes < 32 && lanes < steps) lanes *= 2;
  return lanes;
}

int finish() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? kDeformOk : kDeformCudaErrorBase + static_cast<int>(err);
}

template <typename T, typename P, int V>
int launch_forward(const StageTable<T>& tab, const void* points, const void* weights, int64_t bn_total,
                   int64_t num_points, int64_t channels, void* out, cudaStream_t stream) {
  const int lanes = lanes_for(channels, V);
  const int64_t blocks = ceil_div(bn_total * lanes, kThreads);
  forward_kernel<T, P, V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      tab, static_cast<const P*>(points), static_cast<const P*>(weights), bn_total, num_points, channels, lanes,
      static_cast<T*>(out));
  return finish();
}

template <typename T, typename P, int V>
int launch_backward(const StageTable<T>& tab, const void* grad_out, const void* points, const void* weights,
                    int64_t bn_total, int64_t num_points, int64_t channels, void* grad_points, void* grad_weights,
                    cudaStream_t stream) {
  const int lanes = lanes_for(channels, V);
  const int64_t blocks = ceil_div(bn_total * lanes, kThreads);
  backward_kernel<T, P, V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      tab, static_cast<const T*>(grad_out), static_cast<const P*>(points), static_cast<const P*>(weights), bn_total,
      num_points, channels, lanes, static_cast<P*>(grad_points), static_cast<P*>(grad_weights));
  return finish();
}

// Calls fn(std::integral_constant<int, V>{}) for the vector width v chosen at run time (V <= 16 bytes of T).
template <typename T, typename Fn>
int with_width(int v, Fn&& fn) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(T));
  if (v == kMax) return fn(std::integral_constant<int, kMax>{});
  if constexpr (kMax / 2 > 1) {
    if (v == kMax / 2) return fn(std::integral_constant<int, kMax / 2>{});
  }
  if constexpr (kMax / 4 > 1) {
    if (v == kMax / 4) return fn(std::integral_constant<int, kMax / 4>{});
  }
  return fn(std::integral_constant<int, 1>{});
}

// Calls fn(T{}, P{}) for the values' type T and the points' type P: both one dtype, or 16-bit T with float P.
template <typename Fn>
int with_dtypes(DeformDtype dtype, DeformDtype point_dtype, Fn&& fn) {
  const bool mixed = point_dtype == DeformDtype::kFloat32 && dtype != DeformDtype::kFloat32;
  if (point_dtype != dtype && !mixed) return kDeformBadDtype;
  switch (dtype) {
    case DeformDtype::kFloat32: return fn(float{}, float{});
    case DeformDtype::kFloat16: return mixed ? fn(__half{}, float{}) : fn(__half{}, __half{});
    case DeformDtype::kBFloat16: return mixed ? fn(__nv_bfloat16{}, float{}) : fn(__nv_bfloat16{}, __nv_bfloat16{});
  }
  return kDeformBadDtype;
}

}  // namespace

const char* deform_sample_status_string(int status) {
  if (status >= kDeformCudaErrorBase) return cudaGetErrorString(static_cast<cudaError_t>(status - kDeformCudaErrorBase));
  switch (status) {
    case kDeformOk: return "ok";
    case kDeformBadSize: return "a size is < 1 or >= 2^31";
    case kDeformNullPointer: return "a null pointer was passed";
    case kDeformTooManyStages: return "more stages than kDeformMaxStages (16)";
    case kDeformBadDtype: return "unsupported dtype";
    default: return "unknown status";
  }
}

int deform_sample_forward(DeformDtype dtype, DeformDtype point_dtype, const void* const* values,
                          const int64_t* heights, const int64_t* widths, int64_t stages, const void* points,
                          const void* weights, int64_t batch, int64_t num_points, int64_t channels, void* out,
                          cudaStream_t stream) {
  if (int st = check_args(values, heights, widths, stages, points, weights, batch, num_points, channels)) return st;
  if (!out) return kDeformNullPointer;
  return with_dtypes(dtype, point_dtype, [&](auto tag, auto point_tag) {
    using T = decltype(tag);
    using P = decltype(point_tag);
    const StageTable<T> tab = make_table<T>(values, nullptr, heights, widths, stages);
    const int v = vector_width<T>(channels, values, nullptr, stages, out, out);
    return with_width<T>(v, [&](auto width) {
      return launch_forward<T, P, decltype(width)::value>(tab, points, weights, batch * num_points, num_points,
                                                          channels, out, stream);
    });
  });
}

int deform_sample_backward(DeformDtype dtype, DeformDtype point_dtype, const void* grad_out,
                           const void* const* values, const int64_t* heights, const int64_t* widths, int64_t stages,
                           const void* points, const void* weights, int64_t batch, int64_t num_points,
                           int64_t channels, float* const* grad_values, void* grad_points, void* grad_weights,
                           cudaStream_t stream) {
  if (int st = check_args(values, heights, widths, stages, points, weights, batch, num_points, channels)) return st;
  if (!grad_out || !grad_values || !grad_points || !grad_weights) return kDeformNullPointer;
  for (int64_t s = 0; s < stages; ++s)
    if (!grad_values[s]) return kDeformNullPointer;
  return with_dtypes(dtype, point_dtype, [&](auto tag, auto point_tag) {
    using T = decltype(tag);
    using P = decltype(point_tag);
    const StageTable<T> tab = make_table<T>(values, grad_values, heights, widths, stages);
    const int v = vector_width<T>(channels, values, grad_values, stages, grad_out, grad_out);
    return with_width<T>(v, [&](auto width) {
      return launch_backward<T, P, decltype(width)::value>(tab, grad_out, points, weights, batch * num_points,
                                                           num_points, channels, grad_points, grad_weights, stream);
    });
  });
}

}  // namespace mtlfast::cuda
