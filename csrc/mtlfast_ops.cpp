// The only translation unit that includes torch: op schemas (TORCH_LIBRARY), argument checks, output
// allocation, and dispatch to the torch-free CPU launchers (csrc/cpu) and CUDA launchers (csrc/cuda).
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/build_info.h"
#include "cpu/deform_sample.h"
#ifdef MTLFAST_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "cuda/build_info.cuh"
#include "cuda/deform_sample.cuh"
#endif

namespace {

// When set (mtlfast.testing.poison_outputs), outputs are filled with NaN instead of left uninitialised,
// so that a kernel which fails to write an element is caught by the tests.
std::atomic<bool> g_poison_outputs{false};

[[maybe_unused]] at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (g_poison_outputs.load()) return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  return at::empty(sizes, options);
}

#ifndef MTLFAST_SOURCES
#define MTLFAST_SOURCES "unknown"
#endif

// "<cpu build> sources=<csrc digest, mtlfast/_sources.py> cuda=..." (archs last: mtlfast.backends parses it)
std::string build_info() {
  std::string info = mtlfast::cpu_build_info() + " sources=" MTLFAST_SOURCES;
#ifdef MTLFAST_WITH_CUDA
  info += " cuda=yes cudart=" + std::to_string(mtlfast::cuda::compiled_cudart_version());
#ifdef MTLFAST_CUDA_ARCHS
  info += " archs=" MTLFAST_CUDA_ARCHS;
#endif
#else
  info += " cuda=no";
#endif
  return info;
}

void set_poison_outputs(bool enabled) { g_poison_outputs.store(enabled); }

}  // namespace

TORCH_LIBRARY(mtlfast, m) {
  m.def("build_info() -> str", &build_info);
  m.def("set_poison_outputs(bool enabled) -> ()", &set_poison_outputs);
}

// ---- deform_sample (DESIGN.md §3 op 6): csrc/cpu/deform_sample.{h,cpp}, csrc/cuda/deform_sample.{cuh,cu} ----
// values are handed to the kernels channels-last ((B,C,H,W) tensors with NHWC strides; already channels-last
// inputs are not copied); value gradients come back as channels-last views of (B,H,W,C) buffers.
namespace {
namespace deform_sample {

struct Inputs {
  std::vector<at::Tensor> values;  // channels-last contiguous
  at::Tensor points, weights;      // contiguous
  std::vector<const void*> value_ptrs;
  std::vector<int64_t> heights, widths;
  int64_t batch, num_points, channels, stages;
  at::ScalarType value_dtype;  // the output's and the value gradients' dtype
};

// mixed: float16/bfloat16 values with float32 points and weights are accepted (the CUDA kernel's mixed precision).
Inputs prepare(at::TensorList values, const at::Tensor& points, const at::Tensor& weights, bool mixed) {
  TORCH_CHECK(!values.empty(), "deform_sample: values must hold at least one (B, C, H, W) stage tensor");
  TORCH_CHECK(points.dim() == 3 && points.size(2) == 2, "deform_sample: points must have shape (B, N, 2), got ",
              points.sizes());
  Inputs in;
  in.batch = points.size(0);
  in.num_points = points.size(1);
  in.stages = static_cast<int64_t>(values.size());
  TORCH_CHECK(values[0].dim() == 4, "deform_sample: values[0] must have shape (B, C, H, W), got ", values[0].sizes());
  in.channels = values[0].size(1);
  in.value_dtype = values[0].scalar_type();
  const bool mixed_ok = mixed && points.scalar_type() == at::kFloat &&
                        (in.value_dtype == at::kHalf || in.value_dtype == at::kBFloat16);
  TORCH_CHECK(in.value_dtype == points.scalar_type() || mixed_ok, "deform_sample: values must have the dtype of ",
              "points (", points.scalar_type(), ")", mixed ? " or be float16/bfloat16 with float32 points" : "",
              ", got ", in.value_dtype);
  TORCH_CHECK(weights.dim() == 3 && weights.size(0) == in.batch && weights.size(1) == in.num_points &&
                  weights.size(2) == in.stages,
              "deform_sample: weights must have shape (B, N, S) = (", in.batch, ", ", in.num_points, ", ", in.stages,
              "), got ", weights.sizes());
  TORCH_CHECK(weights.device() == points.device() && weights.scalar_type() == points.scalar_type(),
              "deform_sample: weights must have the device and dtype of points");
  for (int64_t s = 0; s < in.stages; ++s) {
    const at::Tensor& v = values[s];
    TORCH_CHECK(v.dim() == 4 && v.size(0) == in.batch && v.size(1) == in.channels,
                "deform_sample: values[", s, "] must have shape (B, C, H_s, W_s) with B=", in.batch,
                " and C=", in.channels, ", got ", v.sizes());
    TORCH_CHECK(v.device() == points.device() && v.scalar_type() == in.value_dtype, "deform_sample: values[", s,
                "] must have the device of points (", points.device(), ") and the dtype of values[0] (",
                in.value_dtype, ")");
    in.values.push_back(v.contiguous(at::MemoryFormat::ChannelsLast));
    in.value_ptrs.push_back(in.values.back().data_ptr());
    in.heights.push_back(v.size(2));
    in.widths.push_back(v.size(3));
  }
  TORCH_CHECK(in.batch > 0 && in.num_points > 0 && in.channels > 0,
              "deform_sample: B, N and C must be >= 1 (empty tensors are not supported)");
  in.points = points.contiguous();
  in.weights = weights.contiguous();
  return in;
}

// grad_out of the backward ops, checked against the forward's output (B, N, C) and made contiguous.
at::Tensor checked_grad_out(const at::Tensor& grad_out, const Inputs& in, const at::Tensor& points) {
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({in.batch, in.num_points, in.channels}) &&
                  grad_out.scalar_type() == in.value_dtype && grad_out.device() == points.device(),
              "deform_sample_backward: grad_out must be (B, N, C) = (", in.batch, ", ", in.num_points, ", ",
              in.channels, ") with the dtype of values and the device of points, got ", grad_out.sizes(), " ",
              grad_out.scalar_type(), " on ", grad_out.device());
  return grad_out.contiguous();
}

// A (B, C, H, W) view with channels-last strides of a fresh (B, H, W, C) buffer.
at::Tensor channels_last_view(const at::Tensor& nhwc) { return nhwc.permute({0, 3, 1, 2}); }

template <typename T>
std::vector<const T*> typed(const std::vector<const void*>& ptrs) {
  std::vector<const T*> out;
  for (const void* p : ptrs) out.push_back(static_cast<const T*>(p));
  return out;
}

at::Tensor forward_cpu(at::TensorList values, const at::Tensor& points, const at::Tensor& weights) {
  const Inputs in = prepare(values, points, weights, /*mixed=*/false);
  at::Tensor out = new_output({in.batch, in.num_points, in.channels}, points.options());
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "deform_sample_forward (cpu)", [&] {
    const auto vals = typed<scalar_t>(in.value_ptrs);
    const int st = mtlfast::cpu::deform_sample_forward<scalar_t>(
        vals.data(), in.heights.data(), in.widths.data(), in.stages, in.points.data_ptr<scalar_t>(),
        in.weights.data_ptr<scalar_t>(), in.batch, in.num_points, in.channels, out.data_ptr<scalar_t>());
    TORCH_CHECK(st == 0, "deform_sample_forward (cpu): ", mtlfast::cpu::deform_sample_status_string(st));
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_out,
                                                                         at::TensorList values,
                                                                         const at::Tensor& points,
                                                                         const at::Tensor& weights) {
  const Inputs in = prepare(values, points, weights, /*mixed=*/false);
  const at::Tensor g = checked_grad_out(grad_out, in, points);
  std::vector<at::Tensor> grad_values;
  for (int64_t s = 0; s < in.stages; ++s)
    grad_values.push_back(new_output({in.batch, in.heights[s], in.widths[s], in.channels}, points.options()));
  at::Tensor grad_points = new_output({in.batch, in.num_points, 2}, points.options());
  at::Tensor grad_weights = new_output({in.batch, in.num_points, in.stages}, points.options());
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "deform_sample_backward (cpu)", [&] {
    const auto vals = typed<scalar_t>(in.value_ptrs);
    std::vector<scalar_t*> gv;
    for (auto& t : grad_values) gv.push_back(t.data_ptr<scalar_t>());
    const int st = mtlfast::cpu::deform_sample_backward<scalar_t>(
        g.data_ptr<scalar_t>(), vals.data(), in.heights.data(), in.widths.data(), in.stages,
        in.points.data_ptr<scalar_t>(), in.weights.data_ptr<scalar_t>(), in.batch, in.num_points, in.channels,
        gv.data(), grad_points.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>());
    TORCH_CHECK(st == 0, "deform_sample_backward (cpu): ", mtlfast::cpu::deform_sample_status_string(st));
  });
  for (auto& t : grad_values) t = channels_last_view(t);
  return {grad_values, grad_points, grad_weights};
}

#ifdef MTLFAST_WITH_CUDA
mtlfast::cuda::DeformDtype cuda_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "deform_sample (cuda): dtype ", t,
              " not supported (float32, float16, bfloat16)");
  using mtlfast::cuda::DeformDtype;
  return t == at::kFloat ? DeformDtype::kFloat32 : t == at::kHalf ? DeformDtype::kFloat16 : DeformDtype::kBFloat16;
}

at::Tensor forward_cuda(at::TensorList values, const at::Tensor& points, const at::Tensor& weights) {
  const c10::DeviceGuard guard(points.device());
  const Inputs in = prepare(values, points, weights, /*mixed=*/true);
  at::Tensor out = new_output({in.batch, in.num_points, in.channels}, points.options().dtype(in.value_dtype));
  const int st = mtlfast::cuda::deform_sample_forward(
      cuda_dtype(in.value_dtype), cuda_dtype(points.scalar_type()), in.value_ptrs.data(), in.heights.data(),
      in.widths.data(), in.stages, in.points.data_ptr(), in.weights.data_ptr(), in.batch, in.num_points,
      in.channels, out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(st == 0, "deform_sample_forward (cuda): ", mtlfast::cuda::deform_sample_status_string(st));
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out,
                                                                          at::TensorList values,
                                                                          const at::Tensor& points,
                                                                          const at::Tensor& weights) {
  // The value gradient is scattered with fp32 atomics into zero-filled fp32 buffers: not bit-reproducible. The
  // Python side refuses this backend for gradients in deterministic mode; this catches the mode switched on
  // between forward and backward, and direct calls of the op.
  at::globalContext().alertNotDeterministic("mtlfast::deform_sample_backward (cuda)");
  const c10::DeviceGuard guard(points.device());
  Inputs in = prepare(values, points, weights, /*mixed=*/true);
  const at::Tensor g = checked_grad_out(grad_out, in, points);
  std::vector<at::Tensor> grad_values;
  std::vector<float*> gv;
  for (int64_t s = 0; s < in.stages; ++s) {
    grad_values.push_back(
        at::zeros({in.batch, in.heights[s], in.widths[s], in.channels}, points.options().dtype(at::kFloat)));
    gv.push_back(grad_values.back().data_ptr<float>());
  }
  at::Tensor grad_points = new_output({in.batch, in.num_points, 2}, points.options());
  at::Tensor grad_weights = new_output({in.batch, in.num_points, in.stages}, points.options());
  const int st = mtlfast::cuda::deform_sample_backward(
      cuda_dtype(in.value_dtype), cuda_dtype(points.scalar_type()), g.data_ptr(), in.value_ptrs.data(),
      in.heights.data(), in.widths.data(), in.stages, in.points.data_ptr(), in.weights.data_ptr(), in.batch,
      in.num_points, in.channels, gv.data(), grad_points.data_ptr(), grad_weights.data_ptr(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(st == 0, "deform_sample_backward (cuda): ", mtlfast::cuda::deform_sample_status_string(st));
  // Peak memory (16-bit values, V = the values' bytes): the channels-last copies go before the casts, and each
  // fp32 buffer as soon as its stage is cast, smallest stage first: 2V + max_k (V_k - sum_{i<k} V_i) instead of
  // 4V for non-channels-last inputs. Frees are stream-ordered (the caching allocator reuses these blocks only for
  // work queued after the kernel).
  in.values.clear();
  std::vector<int64_t> order(in.stages);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return in.heights[a] * in.widths[a] < in.heights[b] * in.widths[b];
  });
  for (const int64_t s : order) grad_values[s] = channels_last_view(grad_values[s].to(in.value_dtype));
  return {grad_values, grad_points, grad_weights};
}
#endif

}  // namespace deform_sample
}  // namespace

// Own fragment so that set_python_module (where torch finds the fake implementations) covers only these ops.
TORCH_LIBRARY_FRAGMENT(mtlfast, m) {
  m.set_python_module("mtlfast.ops.deform_sample");
  m.def("deform_sample_forward(Tensor[] values, Tensor points, Tensor weights) -> Tensor");
  m.def("deform_sample_backward(Tensor grad_out, Tensor[] values, Tensor points, Tensor weights) "
        "-> (Tensor[] grad_values, Tensor grad_points, Tensor grad_weights)");
}

TORCH_LIBRARY_IMPL(mtlfast, CPU, m) {
  m.impl("deform_sample_forward", &deform_sample::forward_cpu);
  m.impl("deform_sample_backward", &deform_sample::backward_cpu);
}

// Autograd is registered in Python (mtlfast/ops/deform_sample.py): the forward's formula, and for the backward a
// derivative that raises with the way out (backend="reference"), as for the Triton ops.

#ifdef MTLFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mtlfast, CUDA, m) {
  m.impl("deform_sample_forward", &deform_sample::forward_cuda);
  m.impl("deform_sample_backward", &deform_sample::backward_cuda);
}
#endif

// A plain module init so that `import mtlfast._C` loads the library and runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mtlfast compiled ops (see torch.ops.mtlfast)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
