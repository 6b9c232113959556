"""deform_sample (DESIGN.md §3 op 6): the C++ CPU kernel (``cpp``) and the CUDA kernel (``cuda``, GPU only) vs the
literal grid_sample reference, forward and the gradients to every stage, the points and the weights; float64
gradcheck; a float64 proof of the corner-dot rewrite the kernels use for the point/weight gradients;
determinism of the value gradient; layouts; torch.library registration (opcheck, torch.compile); input errors.
The torch-free kernel itself is also unit-tested under ctest (csrc/tests/test_deform_sample.cpp)."""
import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F

import mtlfast
from mtlfast.backends import BackendError
from mtlfast.ops.deform_sample import MIXED_VALUE_DTYPES, deform_sample
from mtlfast.reference import deform_sample as reference
from mtlfast.testing import (OpNames, check_against_reference, compile_for_gpu, fresh_seed, kernel_dtypes,
                             poison_outputs, randn, rel_error, rerun_hint, run_without_interpreter, tolerance)

# The cpp and cuda backends are the compiled extension; the triton backend and the reference need none.
needs_extension = pytest.mark.skipif(mtlfast._ext.status().loaded is False,
                                     reason=f"compiled extension missing: {mtlfast._ext.status().reason}")

# (B, N, C, stage sizes (H, W)): S = 1..4 stages of different sizes, C not a multiple of 8 (and 1), N odd.
# The (4, 8) stage has power-of-two sizes, so the pixel-centre lines hit by _points are exact in float32.
CASES = [
    (2, 37, 5, [(4, 8)]),
    (1, 63, 13, [(4, 8), (3, 5)]),
    (2, 33, 1, [(7, 3), (4, 8), (1, 1)]),
    (2, 57, 19, [(9, 11), (4, 8), (5, 2), (1, 3)]),
    (1, 257, 7, [(17, 15), (4, 8), (9, 7)]),  # DESIGN.md §6's odd size 257
]
IDS = [f"S{len(c[3])}-N{c[1]}-C{c[2]}" for c in CASES]


def _points(B, N, gen):
    """Uniform in [-1.3, 1.3]^2 (some outside the image), then special points: the image corners and edges
    (±1 exactly), pixel-centre lines of the 4 x 8 stage ((2k+1)/8 - 1, (2k+1)/4 - 1: fx or fy exactly 0), and
    far outside (±5, inf handling is not needed)."""
    p = torch.rand(B, N, 2, generator=gen, dtype=torch.float64) * 2.6 - 1.3
    special = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, 0.3], [0.2, 1.0], [-0.875, -0.75], [0.125, 0.25],
                            [0.625, 0.1], [-0.4, 0.75], [5.0, 0.0], [0.0, -5.0], [1.0, -1.0]], dtype=torch.float64)
    k = min(N, len(special))
    p[:, :k] = special[:k]
    return p


def _inputs(B, N, C, sizes, gen, device="cpu"):
    return {
        "values": [randn(B, C, H, W, generator=gen, device=device) for H, W in sizes],
        "points": _points(B, N, gen).to(device),
        "weights": randn(B, N, len(sizes), generator=gen, device=device),
    }


def _grad_names(S):
    return [f"values[{s}]" for s in range(S)] + ["points", "weights"]


def _cpp(**kwargs):
    return deform_sample(**kwargs, backend="cpp")


#: The CUDA kernel, in the tests that also run the other backends (GPU machine only).
CUDA = pytest.param("cuda", marks=[needs_extension, pytest.mark.gpu])


def _cuda(**kwargs):
    return deform_sample(**kwargs, backend="cuda")


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("B,N,C,sizes", CASES, ids=IDS)
def test_cpp_matches_reference(B, N, C, sizes, dtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    check_against_reference(_cpp, reference.deform_sample, _inputs(B, N, C, sizes, gen), dtype=dtype,
                            grad=_grad_names(len(sizes)))


@needs_extension
def test_cpp_gradcheck_float64():
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _inputs(2, 5, 3, [(3, 4), (2, 1)], gen)
    # Random points only: gradcheck's finite differences are meaningless on pixel-centre lines (kinks).
    inputs["points"] = torch.rand(2, 5, 2, generator=gen, dtype=torch.float64) * 2.4 - 1.2
    leaves = [t.requires_grad_() for t in (*inputs["values"], inputs["points"], inputs["weights"])]

    def fn(v0, v1, points, weights):
        return deform_sample([v0, v1], points, weights, backend="cpp")

    assert torch.autograd.gradcheck(fn, leaves)


def _triton(**kwargs):
    return deform_sample(**kwargs, backend="triton")


@pytest.mark.parametrize("B,N,C,sizes", CASES, ids=IDS)
def test_triton_matches_reference(device, kernel_dtype, B, N, C, sizes):
    gen = torch.Generator().manual_seed(fresh_seed())
    check_against_reference(_triton, reference.deform_sample, _inputs(B, N, C, sizes, gen, device=device),
                            dtype=kernel_dtype, grad=_grad_names(len(sizes)))


#: The values' dtypes of the mixed-precision tests here (float16 under the interpreter, bfloat16 too on a GPU).
MIXED_DTYPES = [d for d in kernel_dtypes() if d in MIXED_VALUE_DTYPES]


@pytest.mark.parametrize("backend", ["reference", "triton", CUDA])
@pytest.mark.parametrize("dtype", MIXED_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("B,N,C,sizes", [CASES[1], CASES[3], CASES[4]], ids=[IDS[1], IDS[3], IDS[4]])
def test_mixed_precision_matches_float64(backend, dtype, device, B, N, C, sizes):
    """16-bit values with float32 points and weights (SEM under a 16-bit autocast): the output and the value
    gradients come in the values' dtype and the point and weight gradients in float32, computed in float32: against
    float64 on the same 16-bit values and cotangent the 16-bit results are within 1.1x the rounding of the exact
    result to that dtype (+1e-6), the float32 ones within float32's bound (DESIGN §6). The float64 run takes the
    float64 points and weights, as check_against_reference does: on a pixel-centre line a float32 coordinate
    evaluated in float64 can fall on the other side of the kink than in float32 arithmetic (x = -0.4 on a 5-wide
    stage: 10% of the point gradient)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    raw = _inputs(B, N, C, sizes, gen, device=device)
    S = len(sizes)
    leaves = [v.to(dtype) for v in raw["values"]] + [raw["points"].float(), raw["weights"].float()]
    leaves = [t.requires_grad_() for t in leaves]
    exact = [t.detach().double().requires_grad_() for t in leaves[:S] + [raw["points"], raw["weights"]]]
    want = reference.deform_sample(exact[:S], exact[S], exact[S + 1])
    cotangent = randn(*want.shape, generator=gen, device=device).to(dtype)
    wants = [want, *torch.autograd.grad(want, exact, cotangent.double())]
    with poison_outputs():
        out = deform_sample(leaves[:S], leaves[S], leaves[S + 1], backend=backend)
        gots = [out, *torch.autograd.grad(out, leaves, cotangent)]
    assert [g.dtype for g in gots] == [dtype] * (S + 1) + [torch.float32] * 2
    for name, got, want in zip(["out"] + _grad_names(S), gots, wants):
        bound = (1.1 * rel_error(want.to(dtype), want) + 1e-6 if got.dtype == dtype
                 else tolerance(torch.float32, tf32_dots=False))
        assert rel_error(got, want) <= bound, f"{name}: {rel_error(got, want):.2e} > {bound:.2e} {rerun_hint(seed)}"


# (B, N, C, stage sizes, channel block) with the GPU's tiles (32 points, 32 pixels, up to 64 channels): channels in
# two chunks (100, 300) and one narrow chunk (7), 2-3 point tiles
GPU_CONFIG_CASES = [(2, 77, 100, [(9, 11), (5, 6), (3, 3)], 64), (1, 40, 7, [(17, 13)], 8),
                    (2, 50, 300, [(7, 9), (4, 5)], 64)]


@pytest.mark.parametrize("B,N,C,sizes,block_c", GPU_CONFIG_CASES,
                         ids=[f"S{len(c[3])}-N{c[1]}-C{c[2]}" for c in GPU_CONFIG_CASES])
def test_triton_matches_reference_with_the_gpu_configuration(monkeypatch, device, kernel_dtype, B, N, C, sizes,
                                                              block_c):
    """The Triton path at the launch configuration it takes on a GPU, run here through the interpreter (on a GPU it
    is the default): checked against the reference, not only compiled (test_triton_kernels_compile_for_sm90)."""
    from mtlfast.kernels import deform_sample as kernels

    on_gpu = kernels.launch_config(C, torch.device("cuda"))
    assert (on_gpu.block_n, on_gpu.block_c, on_gpu.block_p) == (32, block_c, 32)
    monkeypatch.setattr(kernels, "launch_config", lambda channels, device: on_gpu)
    gen = torch.Generator().manual_seed(fresh_seed())
    check_against_reference(_triton, reference.deform_sample, _inputs(B, N, C, sizes, gen, device=device),
                            dtype=kernel_dtype, grad=_grad_names(len(sizes)))


def test_triton_value_gradient_deterministic(device):
    """Many points on few pixels (long per-pixel runs of the gather): every gradient bit-identical across runs
    (stable sort by pixel, float32 sums in a fixed order; grid_sample's atomic backward is not)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _float32(_inputs(2, 1001, 24, [(3, 2), (2, 5)], gen), device)
    g = randn(2, 1001, 24, generator=gen, dtype=torch.float32, device=device)
    first = _backward_grads(inputs, g, "triton")
    for a, b in zip(first, _backward_grads(inputs, g, "triton")):
        assert torch.equal(a, b)


#: torch ops whose CUDA kernels accumulate with atomics (nondeterministic; torch.use_deterministic_algorithms(True)
#: makes them raise, e.g. bincount in the releases that alert for it without weights).
ATOMIC_ON_CUDA = {"bincount", "histc", "index_add", "scatter_add", "scatter_reduce", "put"}


def test_triton_backward_calls_no_atomic_torch_op(device):
    """auto serves gradient calls under torch.use_deterministic_algorithms(True) with the Triton path, so besides
    its own kernels (no atomics) the backward may call no torch op that accumulates with atomics on CUDA: the
    per-pixel ranges of the gather come from a sort and a binary search (they came from bincount, which alerts
    in deterministic mode)."""
    from mtlfast.kernels import deform_sample as kernels

    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _float32(_inputs(2, 33, 5, [(3, 4), (2, 5)], gen), device)
    g = randn(2, 33, 5, generator=gen, dtype=torch.float32, device=device)
    with OpNames() as calls:
        kernels.backward(g, inputs["values"], inputs["points"], inputs["weights"])
    names = {name.removeprefix("aten.").rstrip("_") for name in calls.names}
    assert {"sort", "searchsorted"} <= names, names  # the mode sees the launcher's torch ops
    assert not names & ATOMIC_ON_CUDA, names & ATOMIC_ON_CUDA


def test_triton_infinite_and_far_points(device):
    """Coordinates clamped before the int32 conversion: points at ±1e30 agree with grid_sample (zeros, zero
    gradients); an infinite coordinate gives a NaN row, as CPU grid_sample and the C++/CUDA kernels."""
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _float32(_inputs(1, 6, 5, [(4, 8), (3, 5)], gen), device)
    inputs["points"][0, :4] = torch.tensor([[1e30, 0.0], [-1e30, 0.5], [0.2, 1e30], [0.1, -1e30]])
    got = _backward_grads(inputs, torch.ones(1, 6, 5, device=device), "triton")
    leaves = [t.detach().requires_grad_() for t in (*inputs["values"], inputs["points"], inputs["weights"])]
    want_out = reference.deform_sample(leaves[:2], leaves[2], leaves[3])
    want = torch.autograd.grad(want_out, leaves, torch.ones_like(want_out))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    inputs["points"][0, 0] = torch.tensor([float("inf"), 0.0])
    out = deform_sample(**inputs, backend="triton")
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[0, 1:]).all()  # CPU grid_sample: NaN there


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_extension), "triton", CUDA])
def test_non_finite_points_give_nan_rows(backend, device):
    """CPU grid_sample's value at a point with an infinite or NaN coordinate is NaN (its bilinear weights become
    inf - inf, or NaN); every kernel returns NaN there on every device, never a silent zero, and the other rows
    are exact. CUDA's grid_sample instead moves such coordinates outside the image (ATen's
    safe_downgrade_to_int_range) and gives 0: the reference backend on a GPU is checked for that.
    (cpp on the CPU; reference and triton on the kernel device; the expected rows from the CPU.)"""
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _float32(_inputs(1, 7, 5, [(4, 8), (3, 5)], gen), "cpu" if backend == "cpp" else device)
    bad = [[float("nan"), 0.1], [0.2, float("nan")], [float("inf"), 0.0], [0.3, -float("inf")]]
    inputs["points"][0, :4] = torch.tensor(bad, device=inputs["points"].device)
    out = deform_sample(**inputs, backend=backend).cpu()
    want = reference.deform_sample([v.cpu() for v in inputs["values"]], inputs["points"].cpu(),
                                   inputs["weights"].cpu())
    assert torch.isnan(want[0, :4]).all()
    if backend == "reference" and inputs["points"].is_cuda:
        assert torch.equal(out[0, :4], torch.zeros_like(out[0, :4]))
    else:
        assert torch.isnan(out[0, :4]).all()
    torch.testing.assert_close(out[0, 4:], want[0, 4:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_extension), "triton", CUDA])
def test_points_whose_pixel_coordinate_overflows_float32(backend, device):
    """A finite point far enough out that ((x + 1) W - 1) / 2 overflows float32 (|x| ~ 1e38) reads nothing: a
    zero row and zero gradients for the point and its weights, as the float64 definition gives (the C++/CUDA
    fraction was inf - inf there, NaN point gradients; CPU grid_sample's float32 forward is NaN)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _float32(_inputs(1, 7, 5, [(4, 8), (3, 5)], gen), "cpu" if backend == "cpp" else device)
    far = [[3e38, 0.0], [1e38, 0.5], [0.2, -3e38], [-2e38, 2e38]]
    inputs["points"][0, :4] = torch.tensor(far, device=inputs["points"].device)
    g = torch.ones(1, 7, 5, device=inputs["points"].device)
    got = [t.cpu() for t in _backward_grads(inputs, g, backend)]
    leaves = [t.detach().cpu().double().requires_grad_() for t in (*inputs["values"], inputs["points"],
                                                                   inputs["weights"])]
    want_out = reference.deform_sample(leaves[:2], leaves[2], leaves[3])
    want = torch.autograd.grad(want_out, leaves, torch.ones_like(want_out))
    assert torch.equal(want[2][0, :4], torch.zeros(4, 2, dtype=torch.float64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_corner_dot_rewrite_float64():
    """The kernels' point/weight gradients from the four corner dots d_k = <g, v_k> (deform_sample.h:
    point_grads) equal autograd through grid_sample, in float64."""
    gen = torch.Generator().manual_seed(fresh_seed())
    B, N, C, H, W = 2, 29, 6, 5, 7
    v = randn(B, C, H, W, generator=gen)
    p = (torch.rand(B, N, 2, generator=gen, dtype=torch.float64) * 2.6 - 1.3).requires_grad_()
    w = randn(B, N, 1, generator=gen).requires_grad_()
    g = randn(B, N, C, generator=gen)
    want_p, want_w = torch.autograd.grad(reference.deform_sample([v], p, w), (p, w), g)

    p, w = p.detach(), w.detach()
    ix, iy = ((p[..., 0] + 1) * W - 1) / 2, ((p[..., 1] + 1) * H - 1) / 2
    x0, y0 = ix.floor(), iy.floor()
    fx, fy = ix - x0, iy - y0
    d = []
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        xs, ys = (x0 + dx).long(), (y0 + dy).long()
        inside = (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
        rows = v.permute(0, 2, 3, 1)[torch.arange(B)[:, None], ys.clamp(0, H - 1), xs.clamp(0, W - 1)]  # (B,N,C)
        d.append(torch.where(inside, (g * rows).sum(-1), 0.0))
    coef = [(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx]
    got_w = sum(c * dk for c, dk in zip(coef, d))
    got_x = w[..., 0] * ((1 - fy) * (d[1] - d[0]) + fy * (d[3] - d[2])) * W / 2
    got_y = w[..., 0] * ((1 - fx) * (d[2] - d[0]) + fx * (d[3] - d[1])) * H / 2
    torch.testing.assert_close(got_w, want_w[..., 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.stack([got_x, got_y], -1), want_p, rtol=1e-12, atol=1e-12)


def _backward_grads(inputs, g, backend="cpp"):
    leaves = [t.detach().requires_grad_() for t in (*inputs["values"], inputs["points"], inputs["weights"])]
    S = len(inputs["values"])
    out = deform_sample(leaves[:S], leaves[S], leaves[S + 1], backend=backend)
    return torch.autograd.grad(out, leaves, g)


def _assert_same_grads(got, want, backend):
    """Bit-identical gradients, but for the CUDA kernel's value gradients: float32 atomics scatter them, and
    the order of the adds across warps (so the last bits) can change from run to run."""
    for a, b in zip(got, want):
        exact = backend != "cuda" or a.dim() != 4  # values (B, C, H, W); points and weights are not scattered
        torch.testing.assert_close(a, b, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)


def _float32(inputs, device="cpu"):
    def cast(t):
        return t.to(device, torch.float32)

    return {k: cast(v) if isinstance(v, torch.Tensor) else [cast(t) for t in v] for k, v in inputs.items()}


@needs_extension
def test_cpp_value_gradient_deterministic():
    """Many points on few pixels (long per-pixel buckets): every gradient bit-identical across runs and across
    thread counts (the value gradient is a gather in a fixed order, deform_sample.cpp)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _float32(_inputs(2, 2001, 24, [(3, 2), (2, 5)], gen))
    g = randn(2, 2001, 24, generator=gen, dtype=torch.float32)
    first = _backward_grads(inputs, g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the extension shares torch's OpenMP runtime
        single = _backward_grads(inputs, g)
    finally:
        torch.set_num_threads(threads)
    again = _backward_grads(inputs, g)
    for a, b, c in zip(first, single, again):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_extension), "triton", CUDA])
def test_layouts(backend, device):
    """Channels-last and non-contiguous inputs give the same results; value gradients have the inputs' shapes."""
    device = "cpu" if backend == "cpp" else device
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _float32(_inputs(2, 9, 6, [(5, 4), (3, 3)], gen), device)
    g = randn(2, 9, 6, generator=gen, dtype=torch.float32, device=device)
    base = _backward_grads(inputs, g, backend)
    other = {
        "values": [inputs["values"][0].contiguous(memory_format=torch.channels_last),
                   inputs["values"][1].transpose(2, 3).contiguous().transpose(2, 3)],
        "points": inputs["points"].transpose(0, 1).contiguous().transpose(0, 1),
        "weights": inputs["weights"].transpose(1, 2).contiguous().transpose(1, 2),
    }
    assert not any(t.is_contiguous() for t in (other["values"][1], other["points"], other["weights"]))
    other_grads = _backward_grads(other, g, backend)
    assert [a.shape for a in base] == [b.shape for b in other_grads]
    _assert_same_grads(base, other_grads, backend)
    for gv, v in zip(base, inputs["values"]):
        assert gv.shape == v.shape


@needs_extension
def test_auto_backend_choice():
    from mtlfast.ops.deform_sample import _OP

    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _inputs(1, 3, 2, [(2, 2)], gen)
    args = (inputs["values"], inputs["points"], inputs["weights"])
    with mtlfast.use_backend("auto"):
        assert _OP.select(None, "cpu", torch.float32, args).backend == "cpp"
        assert _OP.select(None, "cpu", torch.float16, args).backend == "reference"
    half = {k: (v.half() if isinstance(v, torch.Tensor) else [t.half() for t in v]) for k, v in inputs.items()}
    with pytest.raises(BackendError, match="cpp: dtype float16 not supported"):
        deform_sample(**half, backend="cpp")
    # mixed precision: the backends are chosen by the values' dtype (the cpp kernel takes no 16-bit values)
    mixed = dict(half, points=inputs["points"].float(), weights=inputs["weights"].float())
    with pytest.raises(BackendError, match="cpp: dtype float16 not supported"):
        deform_sample(**mixed, backend="cpp")
    with mtlfast.use_backend("auto"):
        assert deform_sample(**mixed).dtype == torch.float16
        assert _OP.select(None, "cpu", torch.float16, tuple(mixed.values())).backend == "reference"
    with pytest.raises(BackendError, match="cuda: device 'cpu' not supported"):
        deform_sample(**inputs, backend="cuda")


#: The custom ops (forward, backward) of each kernel backend.
_OPS = {"cpp": ("deform_sample_forward", "deform_sample_backward"),
        "cuda": ("deform_sample_forward", "deform_sample_backward"),
        "triton": ("deform_sample_triton", "deform_sample_triton_backward")}


@pytest.mark.parametrize("backend, mixed", [pytest.param("cpp", False, marks=needs_extension), ("triton", False),
                                            ("triton", True), pytest.param(*CUDA.values, False, marks=CUDA.marks),
                                            pytest.param(*CUDA.values, True, marks=CUDA.marks)])
def test_opcheck_and_compile(backend, mixed, device):
    """Schemas, fake implementations (shapes, dtypes and the channels-last strides) and autograd registration of
    the backend's custom ops; the public function under torch.compile (AOT autograd) matches eager exactly,
    forward and backward (_assert_same_grads: the CUDA kernel's value gradients to the atomics' order).
    ``mixed``: float16 values with float32 points and weights."""
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _inputs(2, 7, 5, [(4, 6), (1, 2)], gen)
    if backend != "cpp":
        inputs = _float32(inputs, device)
    if mixed:
        inputs["values"] = [v.half() for v in inputs["values"]]
    leaves = [t.requires_grad_() for t in (*inputs["values"], inputs["points"], inputs["weights"])]
    args = (leaves[:2], leaves[2], leaves[3])
    forward_op, backward_op = (getattr(torch.ops.mtlfast, name).default for name in _OPS[backend])
    torch.library.opcheck(forward_op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    g = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64).to(leaves[0])  # the values' dtype
    torch.library.opcheck(backward_op, (g, *args), test_utils=("test_schema", "test_faketensor"))

    compiled = torch.compile(lambda v0, v1, p, w: deform_sample([v0, v1], p, w, backend=backend),
                             backend="aot_eager", fullgraph=True)
    out = compiled(*leaves)
    got = torch.autograd.grad(out, leaves, g)
    torch.testing.assert_close(out, deform_sample(*args, backend=backend), rtol=0, atol=0)
    _assert_same_grads(got, _backward_grads(inputs, g, backend), backend)


@contextlib.contextmanager
def _deterministic_algorithms(warn_only=False):
    """torch.use_deterministic_algorithms(True, warn_only=...) inside the block; the previous mode after it."""
    was = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn_only)


def test_triton_backend_declarations(device):
    """On a GPU auto takes the Triton path only where the CUDA kernel refuses (it stays the default until both
    are timed); the CUDA kernel refuses a call that will need a gradient under
    torch.use_deterministic_algorithms(True) (its atomic value gradient), not an inference call and not in
    warn-only mode. Asked for, the Triton path refuses float64 with the reason (bfloat16 under the interpreter:
    test_backends)."""
    from mtlfast.ops.deform_sample import _OP

    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _inputs(1, 3, 2, [(2, 2)], gen, device=device)
    args = (inputs["values"], inputs["points"], inputs["weights"])
    assert _OP.auto_order["cuda"] == ("cuda", "triton", "reference") and "triton" not in _OP.auto_order["cpu"]
    with pytest.raises(BackendError, match="dtype float64 not supported"):
        deform_sample(*args, backend="triton")

    cuda_limits = _OP.implementations["cuda"].limits
    grad_args = (args[0], args[1], args[2].clone().requires_grad_())
    assert cuda_limits(*grad_args) == []
    with _deterministic_algorithms():
        (reason,) = cuda_limits(*grad_args)
        assert "use_deterministic_algorithms(True)" in reason and "triton" in reason
        assert cuda_limits(*args) == []  # nothing needs a gradient
        with torch.no_grad():
            assert cuda_limits(*grad_args) == []
    with _deterministic_algorithms(warn_only=True):
        assert cuda_limits(*grad_args) == []


def test_cuda_limits_trace_under_torch_compile():
    """The deterministic-mode query inside the CUDA kernel's limits does not break a fullgraph torch.compile
    (Dynamo cannot trace torch.is_deterministic_algorithms_warn_only_enabled itself)."""
    from mtlfast.ops.deform_sample import _OP

    cuda_limits = _OP.implementations["cuda"].limits
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _float32(_inputs(1, 3, 2, [(2, 2)], gen))
    points = inputs["points"].requires_grad_()
    count = torch.compile(lambda v, p, w: p * len(cuda_limits([v], p, w)), fullgraph=True, backend="aot_eager")
    try:
        with _deterministic_algorithms():
            torch._dynamo.reset()
            assert torch.equal(count(inputs["values"][0], points, inputs["weights"]), points)
    finally:
        torch._dynamo.reset()


@needs_extension
def test_double_backward_raises():
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _inputs(1, 4, 3, [(3, 3)], gen)
    w = inputs["weights"].requires_grad_()
    out = deform_sample(inputs["values"], inputs["points"], w, backend="cpp")
    (gw,) = torch.autograd.grad(out.square().sum(), w, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"mtlfast.ops.deform_sample: double backward .* use backend='reference'"):
        gw.sum().backward()


# --- errors --------------------------------------------------------------------------------------------

def _good():
    gen = torch.Generator().manual_seed(0)
    return _inputs(2, 5, 3, [(4, 4), (2, 3)], gen)


@needs_extension
@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(values=[]), ValueError, r"values: expected at least one stage"),
    (lambda a: a.update(values=a["values"][0]), TypeError, r"values: expected a sequence"),
    (lambda a: a.update(weights=a["weights"][..., :1]), ValueError, r"weights: expected shape \(B, N, S\) with S=2"),
    (lambda a: a.update(points=a["points"][..., :1]), ValueError,
     r"points: expected shape \(B, N, 2\) with size 2 at dim 2, got .* \(size 1 at dim 2\)"),
    (lambda a: a.update(points=a["points"][0]), ValueError, r"points: expected a 3-d tensor"),
    (lambda a: a["values"].__setitem__(1, a["values"][1][:1]), ValueError, r"values\[1\]: .*B=2"),
    (lambda a: a["values"].__setitem__(1, a["values"][1][:, :2]), ValueError, r"values\[1\]: .*C=3"),
    (lambda a: a["values"].__setitem__(0, a["values"][0][0]), ValueError, r"values\[0\]: expected a 4-d tensor"),
    (lambda a: a.update(weights=a["weights"][:, :4]), ValueError, r"weights: .*N=5"),
    (lambda a: a.update(weights=a["weights"].float()), TypeError, r"weights: expected dtype float64"),
    (lambda a: a["values"].__setitem__(1, a["values"][1].to("meta")), ValueError, r"values\[1\]: expected device cpu"),
    (lambda a: a.update(points=a["points"].long()), TypeError, r"points: expected a floating-point tensor"),
    (lambda a: a["values"].__setitem__(0, a["values"][0][:, :, :0]), ValueError, r"values\[0\]: expected every size"),
    (lambda a: a["values"].__setitem__(1, a["values"][1].float()), TypeError,
     r"values\[1\]: expected dtype float64 \(as values\[0\]\)"),
    (lambda a: a.update(values=[v.half() for v in a["values"]]), TypeError,
     r"values: expected the dtype of points \(float64\), or float16/bfloat16 with float32 points and weights "
     r"\(mixed precision\), got float16 values with float64 points"),
    (lambda a: a.update(values=[v.float() for v in a["values"]], points=a["points"].half(),
                        weights=a["weights"].half()), TypeError, r"values: expected the dtype of points \(float16\)"),
    (lambda a: a.update(points=a["points"].float()), TypeError, r"weights: expected dtype float32 \(as points\)"),
])
def test_bad_inputs(change, error, match):
    args = _good()
    change(args)
    with pytest.raises(error, match=match):
        deform_sample(**args, backend="cpp")


@needs_extension
def test_cpp_op_checks_inputs():
    """The C++ op validates on its own too (it can be called directly through torch.ops)."""
    a = _good()
    with pytest.raises(RuntimeError, match=r"weights must have shape \(B, N, S\)"):
        torch.ops.mtlfast.deform_sample_forward(a["values"], a["points"], a["weights"][..., :1])
    with pytest.raises(RuntimeError, match="at least one"):
        torch.ops.mtlfast.deform_sample_forward([], a["points"], a["weights"])
    # mixed precision is the CUDA kernel's: the CPU kernel takes one dtype
    with pytest.raises(RuntimeError, match=r"values must have the dtype of points \(Float\), got Half"):
        torch.ops.mtlfast.deform_sample_forward([v.half() for v in a["values"]], a["points"].float(),
                                                a["weights"].float())
    g = torch.zeros(2, 5, 3, dtype=a["points"].dtype)
    torch.ops.mtlfast.deform_sample_backward(g, a["values"], a["points"], a["weights"])  # the right grad_out passes
    for bad in (g[:, :4], g.float()):
        with pytest.raises(RuntimeError, match=r"grad_out must be \(B, N, C\) = \(2, 5, 3\) with the dtype of values"):
            torch.ops.mtlfast.deform_sample_backward(bad, a["values"], a["points"], a["weights"])


# --- GPU -----------------------------------------------------------------------------------------------

# Shapes exercising each vector width: C = 256 (16-byte loads, several lanes per point in fp32), C = 32 (fp32:
# 8 lanes of 16 bytes), C = 20 (fp16/bf16: 8-byte loads; fp32: 16-byte), C = 6 (8-byte fp32 / 4-byte fp16 loads),
# C = 257 (scalar), and a SEM-like 4-stage pyramid.
GPU_CASES = [
    (2, 1001, 256, [(28, 36), (14, 18), (7, 9), (4, 5)]),
    (2, 65, 32, [(6, 7), (3, 4)]),
    (2, 65, 20, [(6, 7), (3, 4)]),
    (2, 257, 6, [(9, 11), (4, 8), (5, 2)]),
    (1, 63, 257, [(4, 8), (3, 5)]),
    (1, 7, 1, [(1, 1)]),
]


GPU_BACKENDS = [pytest.param("cuda", marks=needs_extension), "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("B,N,C,sizes", GPU_CASES, ids=[f"S{len(c[3])}-N{c[1]}-C{c[2]}" for c in GPU_CASES])
def test_gpu_matches_reference(backend, kernel_dtype, B, N, C, sizes):
    gen = torch.Generator().manual_seed(fresh_seed())
    check_against_reference(lambda **kw: deform_sample(**kw, backend=backend), reference.deform_sample,
                            _inputs(B, N, C, sizes, gen, device="cuda"), dtype=kernel_dtype,
                            grad=_grad_names(len(sizes)))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_misaligned_and_channels_last(backend, kernel_dtype):
    """A channels-last stage starting one element into its storage (so the CUDA launch falls back to scalar
    loads and atomics) next to an ordinary one."""
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _inputs(2, 65, 16, [(6, 7), (3, 4)], gen, device="cuda")

    def fn(values, points, weights):
        v0 = values[0]
        B, C, H, W = v0.shape
        flat = torch.cat([v0.new_zeros(1), v0.permute(0, 2, 3, 1).reshape(-1)])
        shifted = flat[1:].view(B, H, W, C).permute(0, 3, 1, 2)  # channels-last, misaligned
        assert shifted.is_contiguous(memory_format=torch.channels_last) and shifted.data_ptr() % 16 != 0
        return deform_sample([shifted, values[1]], points, weights, backend=backend)

    check_against_reference(fn, reference.deform_sample, inputs, dtype=kernel_dtype, grad=_grad_names(2))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inductor_compile_gpu(backend):
    """torch.compile (Inductor) of a graph around the op, bfloat16: forward and the gradients to both stages, the
    points and the weights against the float32 reference on the same bfloat16 inputs (the kernels compute the
    coordinates and sums in float32; PyTorch's own bfloat16 grid_sample, coordinates in bfloat16, is ~10% off and
    sets no useful bound)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _inputs(2, 301, 64, [(28, 36), (14, 18)], gen, device="cuda")
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (*inputs["values"], inputs["points"], inputs["weights"])]
    f = torch.compile(lambda v0, v1, p, w: deform_sample([v0, v1], p, w, backend=backend).float().sin(),
                      fullgraph=True)
    out = f(*leaves)
    out.sum().backward()
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    want = reference.deform_sample(ref_leaves[:2], ref_leaves[2], ref_leaves[3]).sin()
    want.sum().backward()
    assert rel_error(out, want) < 2e-2
    for name, t, ref in zip(_grad_names(2), leaves, ref_leaves):
        assert rel_error(t.grad, ref.grad) < 2e-2, f"grad {name}"


@needs_extension
@pytest.mark.gpu
def test_auto_is_deterministic_under_deterministic_algorithms():
    """With torch.use_deterministic_algorithms(True), auto serves a call that needs gradients with the Triton
    path, and the value gradient is bit-identical across runs."""
    from mtlfast.ops.deform_sample import _OP

    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _float32(_inputs(2, 3001, 32, [(3, 2), (2, 5)], gen), "cuda")
    g = randn(2, 3001, 32, generator=gen, dtype=torch.float32, device="cuda")
    with _deterministic_algorithms():
        leaves = [t.requires_grad_() for t in (*inputs["values"], inputs["points"], inputs["weights"])]
        assert _OP.select("auto", "cuda", torch.float32, (leaves[:2], leaves[2], leaves[3])).backend == "triton"
        first = _backward_grads(inputs, g, "auto")
        for a, b in zip(first, _backward_grads(inputs, g, "auto")):
            assert torch.equal(a, b)


#: The caching allocator counts a large block whole when the rest of its segment is too small to split off
#: (under 1 MiB; segments are rounded to 2 MiB): up to 2 MiB more than asked, per large allocation.
ALLOCATOR_SLACK = 2 * 2**20


def _bf16_gpu_inputs(channels_last):
    """SEM-like stages (not in size order), bfloat16 on the GPU, NCHW or channels-last; V = 111 MB, large
    against the allocator's rounding."""
    gen = torch.Generator().manual_seed(fresh_seed())
    B, N, C, sizes = 4, 1000, 512, [(128, 160), (16, 20), (64, 80), (32, 40)]
    inputs = _inputs(B, N, C, sizes, gen, device="cuda")
    values = [v.to(torch.bfloat16) for v in inputs["values"]]
    if channels_last:
        values = [v.contiguous(memory_format=torch.channels_last) for v in values]
    points, weights = inputs["points"].to(torch.bfloat16), inputs["weights"].to(torch.bfloat16)
    grad_out = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16)
    return grad_out, values, points, weights


def _peak_bytes(fn, *args):
    """(peak CUDA bytes allocated during fn(*args) above what was allocated before, its result)."""
    from mtlfast.bench.harness import peak_memory_cuda

    result = []
    return peak_memory_cuda(lambda: result.append(fn(*args))), result[0]


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_backward_peak_memory(channels_last):
    """The Triton backward's peak is the values' size V plus O(B·N + B·H·W) bookkeeping, for either layout:
    point/weight gradients first, then each stage's channels-last copy freed before its gradient exists; the
    gather's keys, coefficients, sort order (4·B·N entries) and per-pixel counts/starts are small."""
    grad_out, values, points, weights = _bf16_gpu_inputs(channels_last)
    B, N, C = grad_out.shape
    total = sum(v.numel() * 2 for v in values)
    pixels = max(B * v.shape[2] * v.shape[3] for v in values)
    entries = 4 * B * N
    # keys, coefficients, sort order and its temporaries (generously 64 bytes an entry), per-pixel int64 arrays
    bookkeeping = entries * 64 + 8 * 8 * (pixels + 1) + B * N * (8 + 4 + 2 * len(values))
    peak, grads = _peak_bytes(torch.ops.mtlfast.deform_sample_triton_backward, grad_out, values, points, weights)
    assert [g.shape for g in grads[0]] == [v.shape for v in values]
    bound = total + bookkeeping + ALLOCATOR_SLACK * (2 * len(values) + 4)  # copies, gradients, point/weight
    assert peak <= bound, f"peak {peak / total:.3f} V, bound {bound / total:.3f} V"


@needs_extension
@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cuda_backward_peak_memory(channels_last):
    """Peak bytes the bfloat16 CUDA backward allocates (V = the values' bytes): the point/weight gradients, the
    channels-last copies (none for channels-last inputs) next to the fp32 value-gradient buffers (2V), then the
    casts smallest stage first, each fp32 buffer freed after its cast: 2V + max_k (V_k - sum_{i<k} V_i). Casting
    with the copies still alive (or all buffers kept) would be 4V / 3V; the bounds are 3.26V / 2.77V here."""
    grad_out, values, points, weights = _bf16_gpu_inputs(channels_last)
    B, N, C = grad_out.shape
    stage_bytes = sorted(v.numel() * 2 for v in values)
    total = sum(stage_bytes)
    casts = max(b - sum(stage_bytes[:k]) for k, b in enumerate(stage_bytes))
    small = B * N * (2 + len(values)) * 2 + ALLOCATOR_SLACK * (3 * len(values) + 2)  # copies, buffers, casts
    bound = small + max((0 if channels_last else total) + 2 * total, 2 * total + casts)
    peak, grads = _peak_bytes(torch.ops.mtlfast.deform_sample_backward, grad_out, values, points, weights)
    assert [g.shape for g in grads[0]] == [v.shape for v in values]
    assert peak <= bound, f"peak {peak / total:.3f} V, bound {bound / total:.3f} V"


def test_cuda_limits_refuse_a_side_over_int32():
    """The CUDA kernel's argument check takes stage sides up to 2**31 - 1: its limits say so at selection (a
    BackendError, and auto goes on), not a RuntimeError from inside the op. (Stride-0 views: no memory.)"""
    from mtlfast.ops.deform_sample import _cuda_limits

    wide = torch.zeros(1, 1, 1, 1).expand(1, 1, 3, 2**31)
    assert _cuda_limits([torch.zeros(1, 1, 2, 2), wide], torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)) == [
        "values[1]: H=3, W=2147483648 exceed the kernel's limit of 2147483647 per side"]
    assert _cuda_limits([wide[..., :2**31 - 1]], torch.zeros(1, 3, 2), torch.zeros(1, 3, 1)) == []


@needs_extension
@pytest.mark.gpu
def test_cuda_backward_alerts_deterministic_mode_switched_on_after_the_forward():
    """Selection refuses the CUDA kernel for gradients in deterministic mode; the mode switched on between
    forward and backward is caught by the op itself (at::globalContext().alertNotDeterministic), as PyTorch's own
    nondeterministic backwards do."""
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _float32(_inputs(1, 7, 4, [(3, 2)], gen), "cuda")
    leaves = [t.requires_grad_() for t in (*inputs["values"], inputs["points"], inputs["weights"])]
    out = deform_sample(leaves[:1], leaves[1], leaves[2], backend="cuda")
    with _deterministic_algorithms():
        with pytest.raises(RuntimeError, match=r"deform_sample_backward \(cuda\) does not have a deterministic"):
            out.sum().backward()


@needs_extension
@pytest.mark.gpu
def test_cuda_stage_limit():
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _inputs(1, 3, 2, [(2, 2)] * 17, gen, device="cuda")
    with pytest.raises(BackendError, match="S=17 stages exceed"):
        deform_sample(**inputs, backend="cuda")
    assert deform_sample(**inputs, backend="auto").shape == (1, 3, 2)  # auto falls to the Triton path


def test_reference_is_grid_sample():
    """The reference is one grid_sample per stage: a single stage with weight 1 is grid_sample itself."""
    gen = torch.Generator().manual_seed(fresh_seed())
    v = randn(2, 3, 5, 6, generator=gen)
    p = _points(2, 13, gen)
    want = F.grid_sample(v, p[:, :, None], mode="bilinear", padding_mode="zeros", align_corners=False)
    got = reference.deform_sample([v], p, torch.ones(2, 13, 1, dtype=torch.float64))
    torch.testing.assert_close(got, want[..., 0].transpose(1, 2), rtol=0, atol=0)


# --- GPU compilation of the Triton kernels without a GPU ----------------------------------------------------

@pytest.mark.compile_only
def test_triton_kernels_compile_for_sm90():
    """Every Triton kernel of the path compiles to sm_90a cubin at the GPU launch configuration (power-of-two
    aranges, constexpr branches, the int64 offsets) in bfloat16, float32 and mixed precision (bfloat16 values,
    float32 points and weights), with Triton's compiler and ptxas, in a subprocess without the interpreter. Needs
    no GPU."""
    out = run_without_interpreter([__file__, "--compile-sm90"])
    assert "compiled 21" in out, out


def _compile_sm90() -> None:
    from mtlfast.kernels import deform_sample as D

    count = 0
    pointer_types = {"ACC": "*fp32", "GP": "*fp32", "KEYS": "*i32", "COEF": "*fp32", "ROWS": "*i32",
                     "START": "*i64", "COUNT": "*i64"}
    same_as_values, same_as_points = {"V", "G", "GV"}, {"P", "WTS", "GW"}

    def build(fn, constexprs, dtypes, num_warps):
        nonlocal count
        sig = {name: "constexpr" if name in constexprs else dtypes[0] if name in same_as_values
               else dtypes[1] if name in same_as_points else pointer_types.get(name, "i32") for name in fn.arg_names}
        compile_for_gpu(fn, sig, constexprs, num_warps=num_warps)
        count += 1

    for dtypes in (("*bf16", "*bf16"), ("*fp32", "*fp32"), ("*bf16", "*fp32")):  # (values, points and weights)
        cfg = D.launch_config(256, torch.device("cuda"))
        for first in (True, False):
            tiles = dict(FIRST=first, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c)
            build(D._forward_kernel, tiles, dtypes, cfg.num_warps)
            build(D._point_grad_kernel, tiles, dtypes, cfg.num_warps)
        build(D._corner_keys_kernel, dict(BLOCK=4 * cfg.block_n), dtypes, cfg.num_warps)
        build(D._gather_kernel, dict(BLOCK_P=cfg.block_p, BLOCK_C=cfg.block_c), dtypes, cfg.num_warps)
        build(D._gather_kernel, dict(BLOCK_P=cfg.block_p, BLOCK_C=1), dtypes, cfg.num_warps)  # C = 1
    print(f"compiled {count}")


if __name__ == "__main__" and "--compile-sm90" in sys.argv:
    _compile_sm90()
