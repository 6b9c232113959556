"""em_attention (DESIGN.md §3 op 5): Triton kernels vs the literal reference, forward and the gradients to x
and mu, both gradient modes; a float64 proof of the adjoint rewrite the backward kernels use; what the
backward saves; torch.compile composition; input errors."""
import sys

import numpy as np
import pytest
import torch

import mtlfast
from mtlfast.backends import BackendError
from mtlfast.ops.em_attention import em_attention
from mtlfast.reference import em_attention as reference
from mtlfast.testing import (check_against_reference, compile_for_gpu, fresh_seed, randn, run_without_interpreter,
                             transposed_layout)

OUTPUTS = ["x_rec", "mu_out", "z"]

# (B, N, C, K, n_iter, detach_iterations, tau, logit): odd N and C; K = 1 (padded to 16), 16, 64 (> N).
# Tokens are randn * logit * tau / sqrt(C), so the logits x muᵀ / tau have a standard deviation of about
# `logit` once the bases are unit rows. The scale matters for float32 conditioning, measured with PyTorch's own
# float32 computation against float64 over 40 seeds: at logit 4, 18 full iterations reach 1.6e-4 (dx);
# at logit 1 the detached mode with K = 64 and 18 iterations reaches 3e-2 (the bases collapse onto nearly one
# direction and dx = Σ_k dS_k mu_k cancels). At the scales below it stays under 1e-5 (100 seeds).
CASES = [
    (2, 37, 21, 16, 1, False, 1.0, 1.0),
    (2, 37, 21, 1, 4, False, 0.5, 1.0),
    (1, 37, 21, 64, 4, False, 1.0, 1.0),
    (1, 23, 19, 16, 18, False, 1.0, 1.0),
    (2, 37, 21, 16, 4, True, 2.0, 2.0),
    (1, 23, 19, 64, 18, True, 1.0, 2.0),
    (1, 71, 33, 1, 1, True, 1.0, 2.0),
    (1, 257, 7, 16, 3, False, 1.0, 1.0),  # DESIGN.md §6's odd size 257: 9 E+M tiles, 17 backward tiles
]


@pytest.fixture
def pinned(monkeypatch):
    """One small launch configuration. Backward passes (16-token tiles): N = 37 gives 3 tiles on P = 2 programs
    (2 tiles each, the last one fully masked). E+M passes (32-token tiles): N = 71 gives 3 tiles on P = 2; at
    N = 23 they use P = 1 while the backward uses P = 2 (one partial buffer serves both). C = 21 gives 2 channel
    chunks; K = 64 gives 4 row blocks in the M-step kernels."""
    from mtlfast.kernels import em_attention as kernels

    config = kernels.LaunchConfig(block_n=16, block_n_em=32, block_c=16, max_programs=2, rows=16, num_warps=4)
    monkeypatch.setattr(kernels, "launch_config", lambda *args: config)
    return config


def _triton(**kwargs):
    return em_attention(**kwargs, backend="triton")


def _inputs(B, N, C, K, device, gen, x_scale=1.0):
    """x (B, N, C) with rows of norm about x_scale, mu (B, K, C) standard normal (not unit rows)."""
    return {"x": randn(B, N, C, generator=gen, device=device, scale=x_scale * C ** -0.5),
            "mu": randn(B, K, C, generator=gen, device=device)}


@pytest.mark.parametrize("B,N,C,K,n_iter,detach,tau,logit", CASES,
                         ids=[f"N{c[1]}-C{c[2]}-K{c[3]}-R{c[4]}-{'detach' if c[5] else 'full'}" for c in CASES])
def test_matches_reference(pinned, device, kernel_dtype, B, N, C, K, n_iter, detach, tau, logit):
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = {**_inputs(B, N, C, K, device, gen, x_scale=logit * tau), "n_iter": n_iter, "tau": tau,
              "detach_iterations": detach}
    check_against_reference(_triton, reference.em_attention, inputs, dtype=kernel_dtype, grad=["x", "mu"],
                            output_names=OUTPUTS)


# (B, N, C, K, n_iter, detach_iterations) at eps = 0.05, where eps changes every output and gradient by several
# percent (a kernel that ignores eps fails them all): ordinary sizes, one token, one channel. The size-one cases
# need an eps this large: at eps = 1e-6 the M step's gradient is a cancellation no float32 implementation computes
# (the derivative of z / (eps + Σ_N z) with one token, of m / (eps + ‖m‖) with one channel, is of order
# eps / (eps + ·)²; PyTorch's own float32 grad mu is 2-20% off float64 there).
EPS_CASES = [
    (2, 37, 21, 16, 4, False),
    (2, 37, 21, 16, 4, True),
    (2, 1, 21, 16, 4, False),
    (2, 1, 21, 16, 4, True),
    (2, 37, 1, 16, 4, False),
    (2, 37, 1, 16, 4, True),
]


@pytest.mark.parametrize("B,N,C,K,n_iter,detach", EPS_CASES,
                         ids=[f"N{c[1]}-C{c[2]}-{'detach' if c[5] else 'full'}" for c in EPS_CASES])
def test_matches_reference_large_eps(pinned, device, kernel_dtype, B, N, C, K, n_iter, detach):
    """eps reaches every kernel (the other cases use the default 1e-6, where a kernel that ignores eps stays
    inside the bounds), and single-token and single-channel inputs, forward and gradients."""
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = {**_inputs(B, N, C, K, device, gen), "n_iter": n_iter, "eps": 0.05, "detach_iterations": detach}
    # One token, detached iterations: every final base is a multiple of that token x, so ∂L/∂x = x̂ Σ_k ds_k ‖mu_k‖
    # with Σ_k ds_k = 0, a cancellation (PyTorch's own float32 is ~20% off float64); the full mode's one-token case
    # compares ∂L/∂x, and this one the forward.
    grad = [] if detach and N == 1 else ["x", "mu"]
    # One channel or one token: the gradients pass through the same near-cancellation at eps = 0.05 too, only
    # milder; rounding the inputs to float32 alone moved the float64 gradients by 6.7e-5 on a draw where the
    # kernel's error was 1.13e-4 (MTLFAST_TEST_SEED=3433957831, N=37, C=1): bound relative to that.
    conditioned = ("grad x", "grad mu") if C == 1 or N == 1 else ()
    check_against_reference(_triton, reference.em_attention, inputs, dtype=kernel_dtype, grad=grad,
                            output_names=OUTPUTS, conditioned=conditioned)


# (B, N, C, K, n_iter, detach_iterations) with gpu_config's tiles: 16-bit E+M tiles of 128 tokens (3 of them at
# N = 300; float32 64) and 64 in the other passes, 32-channel chunks; at K > 128 16-token tiles and 16-channel chunks
GPU_CONFIG_CASES = [(2, 150, 40, 16, 3, False), (1, 300, 37, 64, 2, True), (1, 45, 21, 130, 2, False)]


@pytest.mark.parametrize("sms", [132, 3], ids=["132-SMs", "3-SMs"])
@pytest.mark.parametrize("B,N,C,K,n_iter,detach", GPU_CONFIG_CASES,
                         ids=[f"N{c[1]}-C{c[2]}-K{c[3]}" for c in GPU_CONFIG_CASES])
def test_matches_reference_with_the_gpu_configuration(monkeypatch, device, kernel_dtype, B, N, C, K, n_iter, detach,
                                                      sms):
    """gpu_config's launch configuration, run here through the interpreter (on a GPU it is the default): one
    M-step row per program and up to SMs / B programs per batch element, i.e. on an H100 (132 SMs) one token tile
    per program, on a 3-SM GPU several (P = 1 at B = 2; at B = 1, N = 300 the 16-bit backward's 5 tiles as
    2 + 2 + 1), with the GPU's token tiles and channel chunks. Checked against the reference, not only compiled
    (test_kernels_compile_for_sm90)."""
    from mtlfast.kernels import em_attention as kernels

    config = kernels.gpu_config(B, K, C, kernel_dtype, sms)
    assert config.rows == 1 and config.max_programs == max(1, sms // B)
    monkeypatch.setattr(kernels, "launch_config", lambda *args: config)
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = {**_inputs(B, N, C, K, device, gen), "n_iter": n_iter, "detach_iterations": detach}
    check_against_reference(_triton, reference.em_attention, inputs, dtype=kernel_dtype, grad=["x", "mu"],
                            output_names=OUTPUTS)


@pytest.mark.gpu
@pytest.mark.parametrize("detach", [False, True])
def test_matches_reference_paper_shape_gpu(kernel_dtype, detach):
    """SEM-like sizes with the default (unpinned) GPU launch configuration."""
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = {**_inputs(2, 1000, 512, 64, "cuda", gen, x_scale=2.0 if detach else 1.0), "n_iter": 5,
              "detach_iterations": detach}
    check_against_reference(_triton, reference.em_attention, inputs, dtype=kernel_dtype, grad=["x", "mu"],
                            output_names=OUTPUTS)


def test_adjoint_rewrite_float64():
    """The backward kernels' adjoint of one E+M iteration (kernels/em_attention.py docstring) equals autograd
    of the literal reference: the l2normalize adjoint written with u = mu_r, the column-sum adjoint
    w = (dm·m) / (eps + s) computed from K x C quantities, and the softmax/logit adjoint."""
    gen = torch.Generator().manual_seed(fresh_seed())
    B, N, C, K, tau, eps = 2, 29, 13, 5, 0.7, 1e-3
    x = randn(B, N, C, generator=gen).requires_grad_()
    mu_prev = randn(B, K, C, generator=gen).requires_grad_()
    mu_r = reference._m_step(x, reference._e_step(x, mu_prev, tau), eps)
    dmu = randn(B, K, C, generator=gen)
    dx_ref, dmu_prev_ref = torch.autograd.grad(mu_r, [x, mu_prev], dmu)

    with torch.no_grad():
        z = torch.softmax(x @ mu_prev.transpose(1, 2) / tau, -1)
        s = z.sum(1)  # (B, K)
        m = (z / (eps + s[:, None, :])).transpose(1, 2) @ x
        n = m.norm(dim=-1)
        u = m / (eps + n[..., None])
        dm = dmu / (eps + n[..., None]) - u * ((dmu * u).sum(-1) / n)[..., None]
        a = dm / (eps + s[..., None])
        w = (dm * u).sum(-1) * (eps + n) / (eps + s)
        dz = x @ a.transpose(1, 2) - w[:, None, :]
        ds = z * (dz - (z * dz).sum(-1, keepdim=True))
        dx = z @ a + ds @ mu_prev / tau
        dmu_prev = ds.transpose(1, 2) @ x / tau
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dmu_prev, dmu_prev_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("detach", [False, True])
def test_backward_saves_no_per_iteration_nk(pinned, device, detach):
    """What autograd keeps: x, the bases of every iteration (float32) and two K-vectors per iteration."""
    B, N, C, K, n_iter = 1, 37, 21, 16, 4
    gen = torch.Generator().manual_seed(fresh_seed())
    x, mu = (t.float().requires_grad_() for t in _inputs(B, N, C, K, device, gen).values())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        em_attention(x, mu, n_iter, detach_iterations=detach, backend="triton")
    assert sum(saved) == B * N * C + B * (n_iter + 1) * K * C + 2 * B * n_iter * K


def test_composes_with_torch_compile(pinned, device):
    gen = torch.Generator().manual_seed(fresh_seed())
    inputs = _inputs(1, 23, 19, 16, device, gen)

    def loss(fn, x, mu):
        x_rec, mu_out, z = fn(x, mu, 3, tau=0.5, backend="triton")
        return x_rec.square().sum() + mu_out.sum() + z.square().sum()

    def run(fn):
        x, mu = (t.float().requires_grad_() for t in inputs.values())
        value = loss(fn, x, mu)
        return (value, *torch.autograd.grad(value, [x, mu]))

    eager = run(em_attention)
    compiled = run(torch.compile(em_attention, backend="aot_eager", fullgraph=True))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_library_registration(pinned, device):
    """opcheck of the forward custom op (schema, fake implementation, autograd registration) and of both backward
    ops' schemas and fake implementations, also on inputs of a transposed layout (inductor checks the fake's
    strides against the kernels' contiguous gradients)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    x, mu = (t.float() for t in _inputs(2, 9, 16, 4, device, gen).values())
    torch.library.opcheck(torch.ops.mtlfast.em_attention_fwd.default,
                          (x.requires_grad_(), mu.requires_grad_(), 2, 1.0, 1e-6, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    for layout in (lambda t: t, transposed_layout):
        x_t, mu_t = layout(x.detach()), layout(mu.detach())
        x_rec, mu_out, z, bases, stats = torch.ops.mtlfast.em_attention_fwd(x_t, mu_t, 2, 1.0, 1e-6, False)
        g_xrec, g_mu, g_z = (layout(torch.randn_like(t)) for t in (x_rec, mu_out, z))
        torch.library.opcheck(torch.ops.mtlfast.em_attention_bwd.default,
                              (g_xrec, g_mu, g_z, x_t, bases, stats, 2, 1.0, 1e-6), test_utils=("test_schema",
                                                                                             "test_faketensor"))
        torch.library.opcheck(torch.ops.mtlfast.em_attention_bwd_detached.default, (g_xrec, g_z, x_t, bases, 1.0),
                              test_utils=("test_schema", "test_faketensor"))


def test_detached_mu_out_has_no_grad(pinned, device):
    gen = torch.Generator().manual_seed(fresh_seed())
    x, mu = (t.float().requires_grad_() for t in _inputs(1, 7, 17, 16, device, gen).values())
    x_rec, mu_out, z = em_attention(x, mu, 2, detach_iterations=True, backend="triton")
    assert x_rec.requires_grad and z.requires_grad and not mu_out.requires_grad
    # the initial bases enter only through the detached iterations: with only mu requiring grad, no output does
    for backend in ("reference", "triton"):
        outs = em_attention(x.detach(), mu, 2, detach_iterations=True, backend=backend)
        assert not any(o.requires_grad for o in outs), backend


# --- input errors ------------------------------------------------------------------------------------------

def _x_mu(B=2, N=5, C=8, K=3, dtype=torch.float32):
    return torch.randn(B, N, C).to(dtype), torch.randn(B, K, C).to(dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs(backend):
    x, mu = _x_mu()
    call = lambda *a, **k: em_attention(*a, **k, backend=backend)  # noqa: E731
    with pytest.raises(ValueError, match=r"mu: expected shape \(B, K, C\) with C=8"):
        call(x, torch.randn(2, 3, 9), 3)
    with pytest.raises(ValueError, match=r"mu: expected shape \(B, K, C\) with B=2"):
        call(x, torch.randn(1, 3, 8), 3)
    with pytest.raises(ValueError, match=r"x: expected a 3-d tensor"):
        call(x[0], mu, 3)
    with pytest.raises(ValueError, match=r"mu: expected every size"):
        call(x, mu[:, :0], 3)
    for n_iter, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="n_iter: expected an integer >= 1"):
            call(x, mu, n_iter)
    # converted by the public function for every backend; run where these CPU tensors run everywhere
    torch.testing.assert_close(em_attention(x, mu, np.int64(3), backend="reference")[0],
                               em_attention(x, mu, 3, backend="reference")[0], rtol=0, atol=0)
    torch.testing.assert_close(em_attention(x, mu, 3, tau=np.float32(0.5), eps=np.float32(0.0), backend="reference"),
                               em_attention(x, mu, 3, tau=0.5, eps=0.0, backend="reference"), rtol=0, atol=0)
    for tau in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau"):
            call(x, mu, 3, tau=tau)
    with pytest.raises(TypeError, match="tau"):
        call(x, mu, 3, tau=torch.tensor(1.0))
    with pytest.raises(ValueError, match="eps"):
        call(x, mu, 3, eps=-1e-6)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        call(x.to(torch.int32), mu, 3)
    with pytest.raises(TypeError, match="mu: expected a floating-point tensor"):
        call(x, mu.to(torch.int64), 3)
    with pytest.raises(TypeError, match="mu: expected dtype float32"):
        call(x, mu.double(), 3)
    with pytest.raises(ValueError, match="mu: expected device cpu"):
        call(x, mu.to("meta"), 3)
    with pytest.raises(TypeError, match="detach_iterations"):
        call(x, mu, 3, detach_iterations=1)


def test_triton_refusals(device):
    x, mu = _x_mu(K=257)
    with pytest.raises(BackendError, match="K=257 bases exceed"):  # on the device: a limit is asked of a usable backend
        em_attention(x.to(device), mu.to(device), 1, backend="triton")
    with pytest.raises(BackendError, match="float64 not supported"):
        em_attention(*(t.to(device) for t in _x_mu(dtype=torch.float64)), 1, backend="triton")


def test_reference_is_the_auto_choice_on_cpu():
    """auto serves a CPU call with the reference (the Triton path runs there only through the interpreter)."""
    from mtlfast.ops.em_attention import _OP

    x, mu = _x_mu()
    with mtlfast.use_backend("auto"):
        kwargs = dict(tau=1.0, eps=1e-6, detach_iterations=False)
        assert _OP.select(None, "cpu", x.dtype, (x, mu, 2), kwargs).backend == "reference"
        got = em_attention(x, mu, 2)
    for g, w in zip(got, reference.em_attention(x, mu, 2)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# --- GPU compilation without a GPU -------------------------------------------------------------------------

@pytest.mark.compile_only
def test_kernels_compile_for_sm90():
    """Every kernel specialisation the launchers use compiles to sm_90a cubin at the default GPU configuration
    (tl.dot shapes >= 16, power-of-two aranges, constexpr branches) with Triton's compiler and ptxas, in a
    subprocess without the interpreter. Needs no GPU."""
    out = run_without_interpreter([__file__, "--compile-sm90"])
    assert "compiled 42" in out, out


def _compile_sm90() -> None:
    """bfloat16 and float32 (exact dots), K = 1 (padded to 16), K = 64 and K = 256 (the largest, with the smaller
    channel chunks), C = 256 and 512 (the token passes' tiles do not depend on C, the M-step's row width does)."""
    import triton

    from mtlfast.kernels import em_attention as E
    from mtlfast.kernels.attention import dot_precision

    same_as_x = {"x_ptr", "v_ptr", "xrec_ptr", "z_ptr", "gx_ptr", "gz_ptr", "extra_ptr", "dmu_ptr", "dxout_ptr"}
    count = 0

    def build(fn, constexprs, dtype, cfg):
        nonlocal count
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + ({torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype] if name in same_as_x
                                   else "fp32")
            else:
                sig[name] = "fp32" if name in ("scale", "eps") else "i32"
        compile_for_gpu(fn, sig, constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        count += 1

    for dtype in (torch.bfloat16, torch.float32):
        for K in (1, 64, 256):
            cfg = E.gpu_config(8, K, 512, dtype, 132)
            tiles = dict(BLOCK_N=cfg.block_n, BLOCK_K=max(16, triton.next_power_of_2(K)), BLOCK_C=cfg.block_c,
                         DOT_PRECISION=dot_precision(dtype))
            build(E._em_accumulate_kernel, dict(tiles, BLOCK_N=cfg.block_n_em), dtype, cfg)
            build(E._em_output_kernel, tiles, dtype, cfg)
            for has_m, has_ext, accum in ((True, True, False), (True, False, True), (False, True, False)):
                build(E._em_backward_kernel, dict(tiles, HAS_M=has_m, HAS_EXT=has_ext, ACCUM=accum, NEED_DMU=has_m),
                      dtype, cfg)
        for block_cr in (256, 512):  # C = 256 (SEM's models) and 512 (the benchmark)
            rows = dict(ROWS=cfg.rows, BLOCK_CR=block_cr)
            build(E._em_mstep_kernel, rows, dtype, cfg)
            for extra, final in ((True, False), (False, True)):
                build(E._em_mstep_backward_kernel, dict(rows, HAS_EXTRA=extra, FINAL=final), dtype, cfg)
    print(f"compiled {count}")


if __name__ == "__main__" and "--compile-sm90" in sys.argv:
    _compile_sm90()
