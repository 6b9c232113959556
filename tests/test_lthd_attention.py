"""mtlfast.ops.lthd_attention: the rewrite proved in float64, the Triton path vs the literal reference.

The kernel path rests on Up(q_c k_cᵀ) = up(q_c) up(k_c)ᵀ (bilinear resize is linear per axis), i.e.
A = scale · [q_f | up(q_c)] [k_f | up(k_c)]ᵀ. test_rewrite_is_exact checks it in float64 with pure
PyTorch (no kernel) at odd grids, including a coarse grid that is not half the fine one.
"""
import numpy as np
import pytest
import torch

import mtlfast
from mtlfast.backends import BackendError
from mtlfast.ops.lthd_attention import widened_qk
from mtlfast.reference.attention import attention as reference_attention
from mtlfast.reference.lthd_attention import lthd_attention as reference_lthd
from mtlfast.testing import (check_against_reference, float32_dots_are_tf32, fresh_seed, randn, rel_error,
                             tolerance, transposed_layout)


def _inputs(B, size_fine, size_coarse, D, C, *, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    n_f, n_c = size_fine[0] * size_fine[1], size_coarse[0] * size_coarse[1]
    return {"q_fine": randn(B, n_f, D, generator=gen, device=device),
            "k_fine": randn(B, n_f, D, generator=gen, device=device),
            "q_coarse": randn(B, n_c, D, generator=gen, device=device),
            "k_coarse": randn(B, n_c, D, generator=gen, device=device),
            "v": randn(B, n_f, C, generator=gen, device=device)}


def _rewrite(q_fine, k_fine, q_coarse, k_coarse, v, size_fine, size_coarse, scale):
    q, k = widened_qk(q_fine, k_fine, q_coarse, k_coarse, size_fine, size_coarse)
    return reference_attention(q, k, v, scale=scale)


@pytest.mark.parametrize("size_fine,size_coarse", [((7, 5), (4, 3)),    # hc*2 != hf, odd everything
                                                     ((6, 4), (3, 2)),    # exact 2x
                                                     ((3, 5), (1, 1)),    # one coarse token
                                                     ((4, 4), (4, 4)),    # identity resize
                                                     ((5, 9), (6, 2))])   # coarse taller than fine
def test_rewrite_is_exact(size_fine, size_coarse):
    """Literal (resize the Nc x Nc score map) == rewrite (resize the tokens, widen, one attention), float64,
    forward and the gradients of all five inputs."""
    ins = {k: t.requires_grad_() for k, t in _inputs(2, size_fine, size_coarse, 6, 5, seed=fresh_seed()).items()}
    scale = 0.37
    literal = reference_lthd(*ins.values(), size_fine, size_coarse, scale=scale)
    rewrite = _rewrite(*ins.values(), size_fine, size_coarse, scale)
    assert (literal - rewrite).norm() / literal.norm() < 1e-12
    cotangent = torch.randn_like(literal)
    g_lit = torch.autograd.grad(literal, list(ins.values()), cotangent)
    g_rew = torch.autograd.grad(rewrite, list(ins.values()), cotangent)
    for name, a, b in zip(ins, g_lit, g_rew):
        # absolute floor 1: with one coarse token the coarse term is constant along the keys, cancels in
        # the softmax, and the coarse gradients are exactly zero (both sides give rounding noise)
        assert (a - b).norm() <= 1e-12 * max(a.norm().item(), 1.0), name


def test_reference_upsamples_the_score_map_bilinearly():
    """The reference's Up equals F.interpolate of the 4-d map (hc, wc, hc, wc) read both ways."""
    from mtlfast.reference.lthd_attention import upsample_score_map

    hc, wc, hf, wf = 3, 2, 5, 7
    a = torch.randn(1, hc * wc, hc * wc, dtype=torch.float64)
    up = upsample_score_map(a, (hc, wc), (hf, wf)).reshape(hf, wf, hf, wf)
    interp = torch.nn.functional.interpolate
    # key grid as an image per query, then query grid as an image per (fine) key
    keys = interp(a.reshape(hc * wc, 1, hc, wc), size=(hf, wf), mode="bilinear", align_corners=False)
    queries = interp(keys.reshape(hc, wc, hf * wf).permute(2, 0, 1)[:, None], size=(hf, wf), mode="bilinear",
                     align_corners=False)
    want = queries.reshape(hf, wf, hf, wf).permute(2, 3, 0, 1)
    assert torch.allclose(up, want, rtol=0, atol=1e-13)


CASES = {
    "odd_grids": (2, (7, 5), (4, 3), 12, 9, None),
    "wide_values": (1, (9, 6), (5, 3), 5, 20, 0.7),
    "one_coarse_token": (2, (1, 3), (1, 1), 4, 3, None),  # the coarse gradients vanish
    "one_token": (2, (1, 1), (1, 1), 4, 3, None),  # out = v: every q and k gradient is exactly zero
    "coarse_larger_than_fine": (1, (2, 3), (3, 5), 4, 3, 0.6),  # some coarse tokens are never sampled
    "strip_257": (1, (1, 257), (1, 129), 6, 5, None),  # 257 tokens (DESIGN.md §6's odd sizes) on a one-row grid
}


def _exact_zero_gradient(t: torch.Tensor) -> torch.Tensor:
    """t, with an exactly zero gradient in float64: for an input whose gradient vanishes in exact arithmetic, which
    the float64 reference leaves as rounding noise (~1e-16) that no relative error can compare with, so that
    check_against_reference compares the kernel's by absolute norm. In float16 the literal reference's own
    rounding (PyTorch's error, ~1e-3 here) still sets the bound."""
    return t.detach() + 0 * t if t.dtype == torch.float64 else t


@pytest.mark.parametrize("case", list(CASES))
def test_lthd_matches_reference(case, kernel_dtype, device):
    B, size_fine, size_coarse, D, C, scale = CASES[case]
    inputs = _inputs(B, size_fine, size_coarse, D, C, seed=fresh_seed(), device=device)
    # one coarse token: its score term is constant along the keys and cancels in the softmax
    vanishing = {"q_coarse", "k_coarse"} if size_coarse == (1, 1) else set()

    def fn(**t):
        return mtlfast.ops.lthd_attention(*t.values(), size_fine, size_coarse, scale=scale, backend="triton")

    def reference(**t):
        t = {name: _exact_zero_gradient(x) if name in vanishing else x for name, x in t.items()}
        return reference_lthd(*t.values(), size_fine, size_coarse, scale=scale)

    check_against_reference(fn, reference, inputs, dtype=kernel_dtype, tf32_dots=float32_dots_are_tf32())


def test_torch_library_registration(device):
    """opcheck of the forward custom op (schema, fake implementation, autograd registration, AOT dispatch) and of
    the backward's schema and fake implementation, on inputs of any layout (inductor checks the fake's strides);
    the resize's adjoint equals F.interpolate's autograd."""
    from mtlfast.ops.lthd_attention import upsample_tokens, upsample_tokens_adjoint

    ins = {k: t.to(device).requires_grad_() for k, t in _inputs(2, (3, 5), (2, 3), 4, 3, seed=fresh_seed()).items()}
    torch.library.opcheck(torch.ops.mtlfast.lthd_attention_fwd.default, (*ins.values(), [3, 5], [2, 3], 0.5))
    for layout in (lambda t: t, transposed_layout):
        tensors = [layout(t.detach()) for t in ins.values()]
        out, lse = torch.ops.mtlfast.lthd_attention_fwd(*tensors, [3, 5], [2, 3], 0.5)
        torch.library.opcheck(torch.ops.mtlfast.lthd_attention_bwd.default,
                              (layout(torch.randn_like(out)), *tensors, out, lse, [3, 5], [2, 3], 0.5),
                              test_utils=("test_schema", "test_faketensor"))
    coarse = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 15, 4, dtype=torch.float64)
    (want,) = torch.autograd.grad(upsample_tokens(coarse, (2, 3), (3, 5)), coarse, grad)
    assert torch.equal(upsample_tokens_adjoint(grad, (2, 3), (3, 5)), want)


def test_saved_activations_are_the_output_and_logsumexp():
    """The kernel path keeps only its output and row logsumexp for the backward besides the inputs (the widened
    q/k are formed again in the backward): counted on meta tensors at TIF's NYUD 1/16 shape, D = C = 384, where
    keeping the widened pair would be more than eager keeps."""
    from mtlfast.bench.bench_lthd_attention import _saved_memory

    B, n_f, C = 8, 28 * 36, 384
    saved = _saved_memory(B, (28, 36), (14, 18), 384, C)
    assert saved["saved_bytes_mtlfast"] == B * n_f * C * 2 + B * n_f * 4, saved  # bf16 output, float32 lse
    assert saved["saved_bytes_mtlfast"] < saved["saved_bytes_eager"] / 2, saved


def test_compiles_with_aot_autograd(device):
    """torch.compile (AOTAutograd, no Inductor) of the Triton path, forward and backward, one graph."""
    ins = {k: t.float().requires_grad_() for k, t in _inputs(1, (3, 5), (2, 3), 4, 3, seed=fresh_seed(),
                                                               device=device).items()}
    f = torch.compile(lambda **t: mtlfast.ops.lthd_attention(*t.values(), (3, 5), (2, 3), backend="triton"),
                      backend="aot_eager", fullgraph=True)
    out = f(**ins)
    out.sum().backward()
    leaves = {name: t.detach().double().cpu().requires_grad_() for name, t in ins.items()}
    want = reference_lthd(*leaves.values(), (3, 5), (2, 3))
    want.sum().backward()
    assert rel_error(out.cpu(), want) < 1e-5
    for name, t in ins.items():
        bound = tolerance(torch.float32, tf32_dots=float32_dots_are_tf32())
        assert rel_error(t.grad.cpu(), leaves[name].grad) < bound, f"grad {name}"


@pytest.mark.gpu
def test_lthd_tif_shape_gpu(kernel_dtype):
    """TIF at NYUD 448x576: fine 1/16 (28x36), coarse 1/32 (14x18)."""
    size_fine, size_coarse = (28, 36), (14, 18)
    inputs = _inputs(2, size_fine, size_coarse, 64, 128, seed=fresh_seed(), device="cuda")
    check_against_reference(
        lambda **t: mtlfast.ops.lthd_attention(*t.values(), size_fine, size_coarse, backend="triton"),
        lambda **t: reference_lthd(*t.values(), size_fine, size_coarse), inputs, dtype=kernel_dtype,
        tf32_dots=float32_dots_are_tf32())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs(backend):
    t = _inputs(2, (3, 4), (2, 2), 5, 6, seed=0)
    args = [t["q_fine"].float(), t["k_fine"].float(), t["q_coarse"].float(), t["k_coarse"].float(), t["v"].float()]
    op = mtlfast.ops.lthd_attention

    def call(*, replace=None, size_fine=(3, 4), size_coarse=(2, 2)):
        a = list(args)
        for i, value in (replace or {}).items():
            a[i] = value
        return op(*a, size_fine, size_coarse, backend=backend)

    with pytest.raises(ValueError, match=r"size_fine: the grid 4x4 has 16 tokens, but q_fine \(dim 1\) has 12"):
        call(size_fine=(4, 4))
    with pytest.raises(ValueError, match=r"size_coarse: the grid 1x3 has 3 tokens, but q_coarse \(dim 1\) has 4"):
        call(size_coarse=(1, 3))
    with pytest.raises(ValueError, match=r"size_fine: expected \(height, width\)"):
        call(size_fine=12)
    with pytest.raises(ValueError, match=r"size_coarse: expected \(height, width\)"):
        call(size_coarse=(2.0, 2))
    with pytest.raises(ValueError, match=r"size_coarse: expected \(height, width\)"):
        call(size_coarse=(True, 4))
    # numpy integers and torch.Size are grids too (converted by the public function for every backend; run where
    # these CPU tensors run everywhere)
    torch.testing.assert_close(op(*args, (np.int64(3), np.int32(4)), torch.Size([2, 2]), backend="reference"),
                               op(*args, (3, 4), (2, 2), backend="reference"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"k_coarse: expected shape \(B, Nc, D\) with D=5"):
        call(replace={3: torch.randn(2, 4, 6)})
    with pytest.raises(ValueError, match=r"k_fine: expected shape \(B, Nf, D\) with Nf=12"):
        call(replace={1: torch.randn(2, 11, 5)})
    with pytest.raises(ValueError, match=r"v: expected shape \(B, Nf, C\) with B=2"):
        call(replace={4: torch.randn(3, 12, 6)})
    with pytest.raises(TypeError, match=r"q_coarse: expected a floating-point tensor .* got int32"):
        call(replace={2: args[2].int()})
    with pytest.raises(ValueError, match=r"v: expected device cpu \(as q_fine\), got meta"):
        call(replace={4: args[4].to("meta")})
    with pytest.raises(ValueError, match=r"v: every dimension must be >= 1"):
        call(replace={4: args[4][..., :0]})


def test_backend_refusal_names_the_reason():
    if torch.cuda.is_available():
        pytest.skip("the bfloat16 refusal is the CPU interpreter's")
    t = _inputs(1, (2, 2), (1, 1), 4, 3, seed=0)
    with pytest.raises(BackendError, match=r"(?s)lthd_attention.*interpreter .* no bfloat16"):
        mtlfast.ops.lthd_attention(*(x.bfloat16() for x in t.values()), (2, 2), (1, 1), backend="triton")


def test_benchmark_baseline_computes_lthd():
    """The benchmark's SDPA-on-the-widened-rewrite baseline computes the op (float64, SDPA math on CPU)."""
    from mtlfast.bench.harness import load_benchmarks

    providers = {p.name: p for p in load_benchmarks()["lthd_attention"].providers}
    ins = _inputs(2, (5, 3), (2, 2), 4, 6, seed=fresh_seed())
    kwargs = dict(ins, size_fine=(5, 3), size_coarse=(2, 2))
    want = reference_lthd(**kwargs)
    got = providers["sdpa_math"].fn(**kwargs)
    assert (got - want).norm() / want.norm() < 1e-12
