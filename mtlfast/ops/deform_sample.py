"""``deform_sample``: weighted multi-stage bilinear sampling at deformed points (DESIGN.md §3 op 6; SEM eq. 1-4).

values S x (B, C, H_s, W_s), points (B, N, 2) normalised (x, y), weights (B, N, S) ->
out (B, N, C) = Σ_s weights[..., s] · grid_sample(values[s], points) with exactly
``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` semantics; the literal definition
is :func:`mtlfast.reference.deform_sample.deform_sample`.

Backends:

- ``cpp`` (CPU, float32/float64; csrc/cpu/deform_sample.cpp): OpenMP over batch x points, all stages of a point
  in one pass over contiguous channel rows. The value gradient is a GATHER: the corner contributions of every
  (batch, stage) are bucketed by pixel (a counting sort in increasing point order) and each pixel row sums its
  bucket in that order, so it is deterministic, bit-identical for any thread count, without atomics.
- ``cuda`` (CUDA, float16/bfloat16/float32; csrc/cuda/deform_sample.cu): all S <= 16 stages in one launch
  through a by-value pointer table; a group of up to 32 threads per point with 16-byte vector channel loads
  where C and the pointers allow; fp32 accumulation; value gradient by fp32 atomic scatter (vector atomics on
  sm_90) into fp32 buffers, then cast; point and weight gradients by a shuffle reduction of four corner dots.
  The backward's peak for 16-bit values of V bytes: 3V (channels-last copy + fp32 buffers), or about 2.5V for
  channels-last inputs of a stride-2 pyramid (the buffers cast stage by stage, smallest first); grid_sample's is V.
- ``triton`` (CUDA in float16/bfloat16/float32, CPU through the interpreter in float16/float32;
  kernels/deform_sample.py): the low-memory, deterministic path, one launch per stage. The value gradient is a
  GATHER over the corner contributions sorted by pixel (stable sort: bit-identical from run to run), summed in
  float32 registers and written once in the input dtype; the point/weight gradients are computed first and
  a stage's channels-last copy is freed before its gradient is allocated, so the backward's peak is about V
  (grid_sample's). ``auto`` takes it on a GPU where the CUDA kernel refuses: more than 16 stages, or a
  gradient under ``torch.use_deterministic_algorithms(True)``; otherwise the CUDA kernel stays the GPU default
  until the two are timed side by side (``mtlfast bench deform_sample``, provider ``mtlfast_triton``). Ask for
  it with ``backend="triton"``.
- ``reference`` (any device and float dtype): one grid_sample per stage.

Choices the paper and grid_sample leave to the kernels (exact reformulations, proven in the tests):
both kernels read ``values`` channels-last. Inputs that are not channels-last (``torch.channels_last``) are
copied to that layout at every call (forward and backward): pass channels-last features to avoid the copy.
The value gradients are returned as channels-last tensors. The point/weight gradients use, per stage, the
four dots d_k = <grad_out, corner row k>: dL/dw_s = Σ_k coef_k d_k, dL/dx = w_s W_s/2 ((1-fy)(d01-d00) +
fy(d11-d10)), dL/dy = w_s H_s/2 ((1-fx)(d10-d00) + fx(d11-d01)), with grid_sample's one-sided derivative
(floor) on pixel-centre lines. The backward always computes all three gradients. A point with an infinite
or NaN coordinate gives a NaN output row on every kernel backend and device, as CPU grid_sample does (its
bilinear weights become inf - inf, or NaN): bad coordinates show instead of vanishing. CUDA's grid_sample,
and so the reference backend on a GPU, gives 0 there (ATen moves non-finite and huge coordinates outside
the image). The gradients at such points are not specified (they differ between backends). Finite points
agree while grid_sample's unnormalised coordinate ((x + 1) W_s - 1) / 2 is finite in the points' dtype
(|x| below about 3e38 / W_s in float32); beyond, CPU grid_sample's arithmetic overflows to NaN, while the
kernels (and CUDA's grid_sample) return the definition's value for a point outside every stage: 0.

Dtypes: ``points`` and ``weights`` share one dtype; the values share one dtype, either the points' or, in mixed
precision, float16/bfloat16 values with float32 points and weights (SEM under a 16-bit autocast: float32
coordinates, 16-bit feature maps, no float32 copies of them). The output and the value gradients have the
values' dtype, the point and weight gradients the points'; the arithmetic is float32 (float64 for float64
inputs) on every backend, so a mixed call equals ``deform_sample([v.float() for v in values], points,
weights).to(values[0].dtype)`` up to float32 rounding. The cpp kernel takes no 16-bit values (refused: auto
then takes the reference on a CPU). The op ignores torch.autocast: every backend computes in these dtypes
(grid_sample alone would be upcast to float32 under autocast; the reference turns autocast off).

The cpp and cuda paths are the C++ ops ``mtlfast::deform_sample_forward`` / ``mtlfast::deform_sample_backward``
(TORCH_LIBRARY in csrc/mtlfast_ops.cpp, CPU and CUDA kernels) with their fake implementations and autograd
registered here through torch.library; the triton path is the Python ops ``mtlfast::deform_sample_triton`` /
``mtlfast::deform_sample_triton_backward`` (plain eager calls run the same functions without the dispatcher,
:mod:`mtlfast.ops._kernel_op`). All compose with torch.compile. Second derivatives are not implemented on the
kernel paths (use ``backend="reference"`` for double backward).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from mtlfast import _ext
from mtlfast.backends import (FLOAT_DTYPES, GPU_DTYPES, Op, atomic_gradient_refusals, extension_unavailable,
                              grid_axis_refusals, triton_unavailable, vmap_refusal)
from mtlfast.ops._checks import (autocast_dtype, check_floating_same_device_dtype, check_shapes, check_tensor,
                                 dtype_name)
from mtlfast.ops._kernel_op import KernelAutograd, kernel_function, refuse_double_backward
from mtlfast.reference import deform_sample as _reference

Tensor = torch.Tensor

#: Stages one CUDA launch takes (the size of the kernel's by-value pointer table, csrc/cuda/deform_sample.cuh).
CUDA_MAX_STAGES = 16
#: The values' dtypes that float32 points and weights may come with (mixed precision; see the module docstring).
MIXED_VALUE_DTYPES = (torch.float16, torch.bfloat16)
#: The CPU value-gradient buckets store int32 point indices; the CUDA launcher refuses more points too (its
#: indexing is 64-bit, the limit is kept for one contract across the compiled backends).
MAX_POINTS = 2 ** 31 - 1

_OP = Op("deform_sample", auto_order={"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")})


# --- the compiled ops: fake implementations and autograd ------------------------------------------------

def _fake_forward(values, points, weights):
    B, N, _ = points.shape
    return values[0].new_empty(B, N, values[0].shape[1])


def _fake_backward(grad_out, values, points, weights):
    # Value gradients are channels-last views of (B, H, W, C) buffers, exactly as the C++ op returns them.
    grad_values = [v.new_empty(v.shape[0], v.shape[2], v.shape[3], v.shape[1]).permute(0, 3, 1, 2)
                   for v in values]
    return grad_values, points.new_empty(points.shape), weights.new_empty(weights.shape)


def _setup_context(ctx, inputs, output):
    values, points, weights = inputs
    ctx.save_for_backward(points, weights, *values)


def _autograd_backward(backward_op):
    """The autograd backward of a forward op whose backward op is ``backward_op`` (the C++ or the Triton one)."""
    def backward(ctx, grad_out):
        points, weights, *values = ctx.saved_tensors
        grad_values, grad_points, grad_weights = backward_op(grad_out, values, points, weights)
        return list(grad_values), grad_points, grad_weights

    return backward


def _register_compiled_ops() -> None:
    """Fake implementations + autograd of the C++ ops (the C++ side names this module as their home)."""
    torch.library.register_fake("mtlfast::deform_sample_forward", _fake_forward)
    torch.library.register_fake("mtlfast::deform_sample_backward", _fake_backward)
    torch.library.register_autograd("mtlfast::deform_sample_forward",
                                    _autograd_backward(torch.ops.mtlfast.deform_sample_backward),
                                    setup_context=_setup_context)
    refuse_double_backward("mtlfast::deform_sample_backward", "deform_sample")


if _ext.status().loaded:
    _register_compiled_ops()


# --- the Triton path as custom ops ---------------------------------------------------------------------

@kernel_function("deform_sample_triton", fake=_fake_forward)
def _triton_forward(values: list[Tensor], points: Tensor, weights: Tensor) -> Tensor:
    from mtlfast.kernels import deform_sample as kernels

    return kernels.forward(values, points, weights)


@kernel_function("deform_sample_triton_backward", fake=_fake_backward, refuse_grad="deform_sample")
def _triton_backward(grad_out: Tensor, values: list[Tensor], points: Tensor,
                     weights: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
    from mtlfast.kernels import deform_sample as kernels

    return kernels.backward(grad_out, values, points, weights)


_triton_autograd = KernelAutograd(_triton_forward, setup_context=_setup_context,
                                  backward=_autograd_backward(_triton_backward))


def _triton(values, points, weights):
    return _triton_autograd(list(values), points, weights)


def _triton_limits(values, points, weights) -> list[str]:
    from mtlfast.kernels.deform_sample import MAX_KEYS

    B, N, _ = points.shape
    S = len(values)
    reasons = grid_axis_refusals("B", B) + vmap_refusal()
    if 4 * B * N > MAX_KEYS:
        reasons.append(f"4·B·N = {4 * B * N} corner entries exceed the kernel's limit of {MAX_KEYS} (int32)")
    if B * N * S > MAX_KEYS:
        reasons.append(f"B·N·S = {B * N * S} weights exceed the kernel's limit of {MAX_KEYS} (int32 offsets)")
    for s, v in enumerate(values):
        if B * v.shape[2] * v.shape[3] > MAX_KEYS:
            reasons.append(f"values[{s}]: B·H·W = {B * v.shape[2] * v.shape[3]} pixels exceed the kernel's limit "
                           f"of {MAX_KEYS} (int32 pixel keys)")
    return reasons


def _compiled(values, points, weights):
    return torch.ops.mtlfast.deform_sample_forward(list(values), points, weights)


def _limits(max_stages: int | None):
    def limits(values, points, weights) -> list[str]:
        reasons = vmap_refusal()
        if max_stages is not None and len(values) > max_stages:
            reasons.append(f"S={len(values)} stages exceed the kernel's limit of {max_stages} (one launch, "
                           "by-value pointer table)")
        if points.shape[1] > MAX_POINTS:
            reasons.append(f"N={points.shape[1]} points exceed the kernel's limit of {MAX_POINTS} (int32 indices)")
        return reasons

    return limits


def _reference_in_input_dtype(values, points, weights) -> Tensor:
    """The reference with autocast off: grid_sample is on autocast's float32 list, so under autocast the
    reference alone would compute and return float32 from 16-bit inputs; every backend computes in the inputs'
    dtypes instead (mixed precision as the reference defines it)."""
    device_type = points.device.type
    off = (torch.autocast(device_type, enabled=False) if autocast_dtype(device_type) is not None
           else contextlib.nullcontext())  # also meta tensors (planning), which have no autocast
    with off:
        return _reference.deform_sample(values, points, weights)


_OP.register("reference", _reference_in_input_dtype, devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES)
_OP.register("cpp", _compiled, devices=("cpu",), dtypes=(torch.float32, torch.float64),
             available=extension_unavailable, limits=_limits(None))


_cuda_shape_limits = _limits(CUDA_MAX_STAGES)


def _cuda_limits(values, points, weights) -> list[str]:
    """The CUDA kernel's value gradient is a float atomic scatter: refused for gradients in deterministic mode,
    where auto takes the Triton path (a gather in a fixed order). Its argument check takes stage sides up to
    2**31 - 1."""
    sides = [f"values[{s}]: H={v.shape[2]}, W={v.shape[3]} exceed the kernel's limit of {MAX_POINTS} per side"
             for s, v in enumerate(values) if max(v.shape[2], v.shape[3]) > MAX_POINTS]
    return _cuda_shape_limits(values, points, weights) + sides[:1] + atomic_gradient_refusals(
        (*values, points, weights), "its value gradient is a float atomic scatter",
        "the triton backend's gather is deterministic")


_OP.register("cuda", _compiled, devices=("cuda",), dtypes=GPU_DTYPES, available=extension_unavailable,
             limits=_cuda_limits)
_OP.register("triton", _triton, devices=("cuda", "cpu"), dtypes=GPU_DTYPES, available=triton_unavailable,
             limits=_triton_limits)


# --- public function -----------------------------------------------------------------------------------

def _check_inputs(values, points: Tensor, weights: Tensor) -> list[Tensor]:
    if isinstance(values, Tensor) or not isinstance(values, Sequence):
        raise TypeError("values: expected a sequence (list or tuple) of S stage tensors of shape (B, C, H_s, W_s), "
                        f"got {type(values).__name__}")
    values = list(values)
    if not values:
        raise ValueError("values: expected at least one stage tensor of shape (B, C, H_s, W_s), got an empty sequence")
    check_tensor("weights", weights)
    if weights.dim() == 3 and weights.shape[2] != len(values):
        raise ValueError(f"weights: expected shape (B, N, S) with S={len(values)} (the number of stages in values), "
                         f"got {tuple(weights.shape)}")
    stage_specs = {f"values[{s}]": (v, f"B C H{s} W{s}") for s, v in enumerate(values)}
    check_shapes(points=(points, "B N 2"), weights=(weights, "B N S"), **stage_specs)
    check_floating_same_device_dtype(points=points, weights=weights)
    check_floating_same_device_dtype(**{k: v for k, (v, _) in stage_specs.items()})
    if values[0].device != points.device:
        raise ValueError(f"values: expected device {points.device} (as points), got {values[0].device}")
    mixed = values[0].dtype in MIXED_VALUE_DTYPES and points.dtype == torch.float32
    if values[0].dtype != points.dtype and not mixed:
        raise TypeError(f"values: expected the dtype of points ({dtype_name(points.dtype)}), or float16/bfloat16 with "
                        f"float32 points and weights (mixed precision), got {dtype_name(values[0].dtype)} values with "
                        f"{dtype_name(points.dtype)} points")
    for name, (t, spec) in {"points": (points, "B N 2"), **stage_specs}.items():
        if t.numel() == 0:
            raise ValueError(f"{name}: expected every size of ({', '.join(spec.split())}) >= 1, got {tuple(t.shape)}")
    return values


def deform_sample(values: Sequence[Tensor], points: Tensor, weights: Tensor, *, backend: str | None = None) -> Tensor:
    """Σ_s weights[..., s] · bilinear(values[s], points): SEM's hierarchy-adaptive key/value sampling.

    Args:
        values: S stage features (B, C, H_s, W_s); sizes may differ per stage; channels-last memory format
            avoids a layout copy on the kernel paths.
        points: (B, N, 2) normalised (x, y); [-1, 1] spans the image (grid_sample, align_corners=False);
            points outside read zeros. The values' dtype, or float32 with float16/bfloat16 values (mixed
            precision, see the module docstring).
        weights: (B, N, S) per-point stage weights, in the points' dtype.
        backend: see :mod:`mtlfast.backends`.

    Returns:
        (B, N, C) in the values' dtype. Gradients flow to every stage of ``values``, to ``points`` and to
        ``weights``.
    """
    values = _check_inputs(values, points, weights)
    impl = _OP.select(backend, points.device, values[0].dtype, (values, points, weights))
    return impl.fn(values, points, weights)
