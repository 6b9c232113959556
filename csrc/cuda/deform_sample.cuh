// deform_sample (DESIGN.md §3 op 6), torch-free CUDA launchers. Semantics, layout and the bilinear geometry are
// those of csrc/cpu/deform_sample.h: values[s] channels-last (B, H_s, W_s, C), points (B, N, 2), weights (B, N, S),
// out / grad_out (B, N, C), all contiguous. All S stages are served by ONE launch (a table of per-stage pointers
// and sizes passed by value), so S <= kDeformMaxStages.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mtlfast::cuda {

enum class DeformDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kDeformMaxStages = 16;

// 0 = ok; 1..99 argument errors; 1000 + e for a cudaError_t e raised by the launch.
enum DeformSampleStatus : int {
  kDeformOk = 0,
  kDeformBadSize = 1,        // a size < 1, or H_s / W_s / N >= 2^31
  kDeformNullPointer = 2,
  kDeformTooManyStages = 3,  // S > kDeformMaxStages
  kDeformBadDtype = 4,       // an unsupported dtype, or pair of value and point dtypes
  kDeformCudaErrorBase = 1000,
};

const char* deform_sample_status_string(int status);

// dtype: the values' and out's (grad_out's); point_dtype: the points' and weights' (and their gradients'), dtype or
// kFloat32 with 16-bit values (mixed precision); other pairs return kDeformBadDtype.
// out (dtype) = sum_s weights[..., s] * bilinear(values[s], points), accumulated in fp32.
int deform_sample_forward(DeformDtype dtype, DeformDtype point_dtype, const void* const* values,
                          const int64_t* heights, const int64_t* widths, int64_t stages, const void* points,
                          const void* weights, int64_t batch, int64_t num_points, int64_t channels, void* out,
                          cudaStream_t stream);

// grad_points (B, N, 2) and grad_weights (B, N, S) in point_dtype, fully written; the value gradients are ADDED
// (fp32 atomics) into grad_values[s], fp32 channels-last (B, H_s, W_s, C) buffers the caller zero-fills.
int deform_sample_backward(DeformDtype dtype, DeformDtype point_dtype, const void* grad_out,
                           const void* const* values, const int64_t* heights, const int64_t* widths, int64_t stages,
                           const void* points, const void* weights, int64_t batch, int64_t num_points,
                           int64_t channels, float* const* grad_values, void* grad_points, void* grad_weights,
                           cudaStream_t stream);

}  // namespace mtlfast::cuda
