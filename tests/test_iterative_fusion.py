"""iterative_fusion (DESIGN.md §3 op 4, the TPIM Iterative Fusion Block): Triton kernels vs the literal
reference, forward and the gradients to q, k, v and alpha, every variant in both modes; a float64 proof of
the adjoint recursion the backward kernels implement; saved-activation memory against eager autograd;
torch.library / torch.compile composition; compilation for sm_80, sm_86 and sm_90 within each one's shared
memory; input errors."""
import sys

import pytest
import torch

from mtlfast.backends import BackendError
from mtlfast.bench.harness import saved_activation_bytes
from mtlfast.ops.iterative_fusion import choose_materialize, iterative_fusion
from mtlfast.reference.iterative_fusion import iterative_fusion as reference
from mtlfast.testing import (check_against_reference, compile_for_gpu, fresh_seed, randn, run_without_interpreter,
                             transposed_layout)

VARIANTS = ("A", "B", "C")
MODES = ("materialize", "recompute")


def _inputs(B, N, D, C, n_iter, device, seed, alpha=(0.3, 0.7)):
    """Random q, k, v and alpha uniform in [alpha[0], alpha[1]) (the paper initialises 0.3)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = alpha
    return {"q": randn(B, N, D, generator=gen, device=device), "k": randn(B, N, D, generator=gen, device=device),
            "v": randn(B, N, C, generator=gen, device=device),
            "alpha": (lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64)).to(device),
            "n_iter": n_iter}


def _check(device, dtype, variant, mode, B, N, D, C, n_iter, scale=None, alpha=(0.3, 0.7)):
    """Forward and the four gradients. dα is one number summing B·N·C·n terms of random sign; where a draw makes
    them nearly cancel, PyTorch's own float32 misses 1e-4 too (1 draw in ~1500 at n = 1 in a float32
    simulation), so its bound is max(1e-4, 2x PyTorch's float32 error on these inputs and on two copies
    perturbed by one float32 epsilon) (check_against_reference's ``conditioned``)."""
    # independent seeds for the inputs and the cotangent (one seed made the cotangent a copy of q's first values);
    # both derive from the test's seed, which reproduces a failure
    check_against_reference(
        lambda **kw: iterative_fusion(**kw, scale=scale, variant=variant, mode=mode, backend="triton"),
        lambda **kw: reference(**kw, scale=scale, variant=variant),
        _inputs(B, N, D, C, n_iter, device, fresh_seed(), alpha), dtype=dtype, conditioned=("grad alpha",))


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles: N = 37 gives 3 token tiles (the last one 5 rows), C = 35 gives 3 channel tiles, so the
    per-c-block partial sums and every masked edge are exercised."""
    from mtlfast.kernels import iterative_fusion as kernels

    config = kernels.LaunchConfig(block_x=16, block_y=16, block_c=16, block_k=16, num_warps=4, num_stages=1)
    monkeypatch.setattr(kernels, "default_config", lambda device: config)


# --- kernels vs the literal reference -------------------------------------------------------------------

@pytest.mark.parametrize("n_iter", [1, 4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(device, kernel_dtype, variant, mode, n_iter):
    _check(device, kernel_dtype, variant, mode, B=2, N=33, D=9, C=19, n_iter=n_iter)


@pytest.mark.parametrize("variant,mode", [("A", "recompute"), ("B", "materialize"), ("C", "materialize"),
                                          ("C", "recompute")])
def test_matches_reference_18_steps(device, kernel_dtype, variant, mode):
    """n = 18 (the paper's NYUD setting): four checkpoint segments of 5, 5, 5, 3 steps. α in [0.05, 0.1):
    with α ≈ 0.5 the variant-C blend of these small random maps has all but converged after 18 steps, so
    dα = n·⟨Gⁿ, (Co − I)Vⁿ⁻¹⟩ is far below float32's resolution of Vⁿ⁻¹ and PyTorch's own float32 dα misses
    1e-4 in a third of the draws (float32 simulation, 400 draws; 0 of 400 with α in [0.05, 0.1)). In float16
    the kernels' dα was 0.20x its bound in the median draw and over it in 2 of 80 draws while Vᵗ and Gᵗ were
    stored in float16; with them in float32 scratch 0.09x, at most 0.69x (80 draws, materialize; 0 failures in
    300 draws of both modes)."""
    _check(device, kernel_dtype, variant, mode, B=2, N=23, D=9, C=17, n_iter=18, alpha=(0.05, 0.1))


@pytest.mark.parametrize("variant,mode", [("B", "materialize"), ("C", "recompute")])
def test_matches_reference_many_tiles(small_tiles, device, kernel_dtype, variant, mode):
    """Several token and channel tiles, D = 20 padded to 32; n = 5 gives segments of 3 and 2 steps; an
    explicit scale."""
    _check(device, kernel_dtype, variant, mode, B=2, N=37, D=20, C=35, n_iter=5, scale=0.4)


@pytest.mark.parametrize("variant,mode", [("B", "recompute"), ("C", "materialize")])
def test_matches_reference_257_tokens(device, kernel_dtype, variant, mode):
    """DESIGN.md §6's odd size 257 at the default launch configuration (a last token tile of one row)."""
    _check(device, kernel_dtype, variant, mode, B=1, N=257, D=7, C=9, n_iter=3)


@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_size_one(device, kernel_dtype, mode):
    _check(device, kernel_dtype, "C", mode, B=1, N=1, D=1, C=1, n_iter=3)


@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_float16(device, mode):
    """float16 inputs, Co, checkpoints and Pᵗ (Vᵗ and Gᵗ in float32 scratch, float32 accumulation) against 2x
    PyTorch's own float16 error; runs on the CPU interpreter too, which has float16 but no bfloat16 math."""
    _check(device, torch.float16, "C", mode, B=2, N=23, D=9, C=17, n_iter=4)


def test_non_contiguous_inputs_and_alpha_of_another_dtype(device):
    """A transposed view of q and a float64 alpha (as a float32 parameter next to 16-bit activations would be)
    give exactly what contiguous inputs and a float32 alpha give; alpha's gradient comes back in its dtype."""
    ins = _inputs(2, 17, 5, 6, 3, device, fresh_seed())
    q, k, v, alpha = (ins[n].float() for n in ("q", "k", "v", "alpha"))
    cot = randn(2, 17, 6, generator=torch.Generator().manual_seed(fresh_seed()), device=device, dtype=torch.float32)

    def run(q, alpha):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, alpha)]
        out = iterative_fusion(*leaves, 3, backend="triton")
        out.backward(cot)
        return out, [t.grad for t in leaves]

    out, grads = run(q, alpha)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_view.is_contiguous()
    out_2, grads_2 = run(q_view, alpha.double())
    assert torch.equal(out, out_2) and all(torch.equal(a, b) for a, b in zip(grads[:3], grads_2[:3]))
    assert grads_2[3].dtype == torch.float64 and torch.equal(grads_2[3].float(), grads[3])


# --- float64 proof of the adjoint recursion ---------------------------------------------------------------

def _adjoint_backward(q, k, v, alpha, n_iter, scale, variant, grad_out):
    """The backward exactly as the kernels organise it, in plain PyTorch: checkpoint segments replayed from the
    last, Gᵗ = a·Coᵀ Gᵗ⁺¹ + b·Gᵗ⁺¹, dCo of a segment as one product of the concatenated G/V, the softmax row
    term r from per-row dots of Gᵗ⁺¹ and Pᵗ = Co Vᵗ, dα from the same dots."""
    from mtlfast.kernels.iterative_fusion import segment_length

    a, b = {"A": (1.0, 0.0), "B": (alpha, 1.0), "C": (alpha, 1 - alpha)}[variant]
    co = torch.softmax(scale * q @ k.transpose(-1, -2), -1)
    seg = segment_length(n_iter)
    checkpoints, x = {0: v}, v
    for t in range(n_iter):
        x = a * (co @ x) + b * x
        if (t + 1) % seg == 0:
            checkpoints[t + 1] = x
    dq, dk, dalpha, g = torch.zeros_like(q), torch.zeros_like(k), torch.zeros(()), grad_out
    for s in reversed(range(0, n_iter, seg)):
        e = min(s + seg, n_iter)
        vs, ps = [checkpoints[s]], []
        for _ in range(s, e):
            ps.append(co @ vs[-1])
            vs.append(a * ps[-1] + b * vs[-1])
        gs = {e - s: g}
        r = torch.zeros(q.shape[:2], dtype=q.dtype)
        for j in reversed(range(e - s)):
            r = r + (gs[j + 1] * ps[j]).sum(-1)
            if variant != "A":
                dalpha = dalpha + (gs[j + 1] * (ps[j] - (vs[j] if variant == "C" else 0))).sum()
            gs[j] = a * (co.transpose(-1, -2) @ gs[j + 1]) + b * gs[j + 1]
        gcat = torch.cat([gs[j + 1] for j in range(e - s)], -1)
        vcat = torch.cat(vs[:-1], -1)
        ds = a * co * (gcat @ vcat.transpose(-1, -2) - r[..., None])
        dq, dk = dq + scale * ds @ k, dk + scale * ds.transpose(-1, -2) @ q
        g = gs[0]
    return dq, dk, g, dalpha


def test_variant_a_output_does_not_require_grad_through_alpha(device):
    """Variant A does not use α: with only α requiring grad the output requires none, on both backends (the
    Triton op would otherwise mark it and a backward would silently give α no gradient)."""
    inputs = _inputs(1, 7, 4, 3, 2, device, fresh_seed())
    inputs["q"], inputs["k"], inputs["v"] = (inputs[n].float() for n in ("q", "k", "v"))
    alpha = inputs.pop("alpha").float().requires_grad_()
    for backend in ("reference", "triton"):
        assert not iterative_fusion(**inputs, alpha=alpha, variant="A", backend=backend).requires_grad, backend
        assert iterative_fusion(**inputs, alpha=alpha, variant="C", backend=backend).requires_grad, backend


def test_reference_blends_in_the_wider_dtype():
    """A float16 α with float32 activations: the reference computes 1 − α in float32 (as the kernels do), so it
    equals the run with the same α given in float32. α = 1229/4096 is a float16 number whose 1 − α = 2867/4096
    is not (float16 has 11 significant bits in [0.5, 1))."""
    ins = _inputs(1, 9, 4, 3, 6, "cpu", fresh_seed())
    q, k, v = (ins[n].float() for n in ("q", "k", "v"))
    alpha = torch.tensor(1229 / 4096, dtype=torch.float16)
    torch.testing.assert_close(reference(q, k, v, alpha, 6), reference(q, k, v, alpha.float(), 6), rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_iter", [1, 2, 5, 18])
def test_adjoint_recursion_float64(variant, n_iter):
    ins = _inputs(2, 13, 4, 6, n_iter, "cpu", fresh_seed())
    q, k, v, alpha = (ins[n].requires_grad_() for n in ("q", "k", "v", "alpha"))
    out = reference(q, k, v, alpha, n_iter, scale=0.7, variant=variant)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    want = torch.autograd.grad(out, (q, k, v, alpha), grad_out, allow_unused=True)
    with torch.no_grad():
        got = _adjoint_backward(q, k, v, alpha, n_iter, 0.7, variant, grad_out)
    for name, g, w in zip(("q", "k", "v", "alpha"), got, want):
        w = torch.zeros(()) if w is None else w
        assert (g - w).norm() <= 1e-11 * max(w.norm(), 1.0), name


# --- memory ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_saved_memory_at_most_a_fifth_of_eager(device, mode):
    """Eager autograd saves Co and two (B, N, C) tensors per step; the kernel path lse and ⌈n/L⌉ − 1
    checkpoints (here 3 of (1, 64, 16) against 64² + 36·64·16 elements: ~1/13)."""
    ins = _inputs(1, 64, 8, 16, 18, device, fresh_seed())
    ins = {n: t.float().requires_grad_() if isinstance(t, torch.Tensor) else t for n, t in ins.items()}
    eager = saved_activation_bytes(lambda **kw: reference(**kw), ins)
    ours = saved_activation_bytes(lambda **kw: iterative_fusion(**kw, mode=mode, backend="triton"), ins)
    assert eager > 0 and ours <= eager / 5, (ours, eager)
    assert ours == (3 * 64 * 16 + 64) * 4  # the checkpoints and lse, nothing else


def test_auto_mode_rule():
    small = torch.empty(2, 1000, 64, device="meta", dtype=torch.bfloat16)
    large = torch.empty(4, 16384, 64, device="meta", dtype=torch.bfloat16)  # Co: 2 GiB > 4 GiB / 4
    assert choose_materialize("auto", small) and not choose_materialize("auto", large)
    assert choose_materialize("materialize", large) and not choose_materialize("recompute", small)


# --- torch.library / torch.compile ------------------------------------------------------------------------

def test_torch_library_registration(device):
    """opcheck: schema, fake (meta) implementation, autograd registration, AOT dispatch."""
    ins = _inputs(1, 5, 3, 4, 2, device, fresh_seed())
    q, k, v, alpha = (ins[n].float().requires_grad_() for n in ("q", "k", "v", "alpha"))
    torch.library.opcheck(torch.ops.mtlfast.iterative_fusion_fwd.default, (q, k, v, alpha, 2, 0.5, "C", False))
    # the backward on inputs of any layout: its fake gives the kernels' contiguous gradients (inductor checks it)
    q, k, v = (transposed_layout(t.detach()) for t in (q, k, v))
    out, lse, ckpt = torch.ops.mtlfast.iterative_fusion_fwd(q, k, v, alpha.detach(), 2, 0.5, "C", False)
    torch.library.opcheck(torch.ops.mtlfast.iterative_fusion_bwd.default,
                          (transposed_layout(torch.randn_like(out)), q, k, v, alpha.detach(), lse, ckpt, 2, 0.5, "C",
                           False), test_utils=("test_schema", "test_faketensor"))


def test_compiles_with_aot_autograd(device):
    """torch.compile through AOTAutograd (fake tensors + the registered backward), without Inductor."""
    ins = _inputs(2, 9, 5, 6, 4, device, fresh_seed())
    q, k, v, alpha = (ins[n].float().requires_grad_() for n in ("q", "k", "v", "alpha"))

    def f(q, k, v, alpha):
        return iterative_fusion(q, k, v, alpha, 4, variant="B", mode="materialize", backend="triton") * 2

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, alpha)
    out.sum().backward()
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, alpha)]
    want = reference(*leaves, 4, variant="B") * 2
    want.sum().backward()
    assert (out.detach().double().cpu() - want).norm() / want.norm() < 1e-5
    for got, ref in zip((q, k, v, alpha), leaves):
        assert (got.grad.double().cpu() - ref.grad).norm() <= 1e-4 * ref.grad.norm()


# --- input errors -----------------------------------------------------------------------------------------

def _good(dtype=torch.float32):
    return torch.randn(2, 7, 4, dtype=dtype), torch.randn(2, 7, 4, dtype=dtype), torch.randn(2, 7, 5, dtype=dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs(backend):
    q, k, v = _good()
    alpha = torch.tensor(0.3)

    def call(q=q, k=k, v=v, alpha=alpha, n_iter=2, **kw):
        return iterative_fusion(q, k, v, alpha, n_iter, backend=backend, **kw)

    with pytest.raises(ValueError, match=r"alpha: expected a 0-d tensor .* got shape \(1,\)"):
        call(alpha=torch.tensor([0.3]))
    with pytest.raises(TypeError, match=r"alpha: expected a torch.Tensor, got float"):
        call(alpha=0.3)
    with pytest.raises(TypeError, match=r"alpha: expected a floating-point tensor, got int64"):
        call(alpha=torch.tensor(1))
    with pytest.raises(ValueError, match=r"alpha: expected device cpu \(as q\), got meta"):
        call(alpha=alpha.to("meta"))
    with pytest.raises(ValueError, match=r"k: expected shape \(B, N, D\) with N=7"):
        call(k=torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match=r"k: expected shape \(B, N, D\) with D=4"):
        call(k=torch.randn(2, 7, 3))
    with pytest.raises(ValueError, match=r"v: expected shape \(B, N, C\) with N=7"):
        call(v=torch.randn(2, 6, 5))
    with pytest.raises(ValueError, match=r"v: expected shape \(B, N, C\) with B=2"):
        call(v=torch.randn(3, 7, 5))
    with pytest.raises(ValueError, match=r"q: expected a 3-d tensor"):
        call(q=q[0])
    with pytest.raises(ValueError, match=r"v: expected every size >= 1"):
        call(v=v[..., :0])
    with pytest.raises(TypeError, match=r"q: expected a floating-point tensor .* got int64"):
        call(q=q.long())
    with pytest.raises(TypeError, match=r"v: expected dtype float32 \(as q\), got float64"):
        call(v=v.double())
    with pytest.raises(ValueError, match=r"k: expected device cpu \(as q\), got meta"):
        call(k=k.to("meta"))
    for bad, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match=r"n_iter: expected an integer >= 1"):
            call(n_iter=bad)
    with pytest.raises(ValueError, match=r"variant: expected one of A, B, C, got 'D'"):
        call(variant="D")
    with pytest.raises(ValueError, match=r"mode: expected one of materialize, recompute, auto, got 'fast'"):
        call(mode="fast")
    with pytest.raises(TypeError, match=r"scale: expected a real number or None, got Tensor"):
        call(scale=torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"scale: expected a finite number, got nan"):
        call(scale=float("nan"))


def test_backend_refusals(device):
    q, k, v = _good()
    wide = torch.randn(1, 3, 300, device=device)
    with pytest.raises(BackendError, match=r"D=300 > 256"):
        iterative_fusion(wide, wide, torch.randn(1, 3, 5, device=device), torch.tensor(0.3, device=device), 2,
                         backend="triton")
    with pytest.raises(BackendError, match="no cpp implementation"):
        iterative_fusion(q, k, v, torch.tensor(0.3), 2, backend="cpp")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="interpreter .* no bfloat16"):
            iterative_fusion(*_good(torch.bfloat16), torch.tensor(0.3), 2, backend="triton")


# --- GPU rules the interpreter does not enforce ------------------------------------------------------------

#: GPU classes the tile choice is compiled for, each at its shared memory per block (K.row_tile_bytes), and the
#: (dtype, dot precision, D) cases whose row tiles are the largest that class allows (a case with a smaller tile
#: needs less; float32 "ieee" dots need less than TF32's at the same tile in every measured case, one is kept per
#: class): bfloat16 stands for float16 (same tiles).
GPU_CLASSES = {
    90: [("bf16", "tf32", 64), ("bf16", "tf32", 256), ("fp32", "tf32", 128), ("fp32", "tf32", 256),
         ("fp32", "ieee", 64)],  # H100 / H200: 227 KB
    86: [("bf16", "tf32", 128), ("bf16", "tf32", 256), ("fp32", "tf32", 64), ("fp32", "tf32", 128),
         ("fp32", "tf32", 256), ("fp32", "ieee", 128)],  # RTX 30xx/40xx, A10, L4, L40: 99 KB
    80: [("bf16", "tf32", 256), ("fp32", "tf32", 128)],  # A100: 163 KB
}


@pytest.mark.compile_only
@pytest.mark.parametrize("arch", sorted(GPU_CLASSES))
def test_kernels_fit_each_gpus_shared_memory(arch):
    """Every kernel, in the specialisations the launchers use, compiles for sm_80, sm_86 and sm_90 with Triton's
    own compiler and ptxas, in a subprocess without the interpreter, at the row tiles K.fit_rows picks for that GPU
    class's shared memory, and fits it (compile_for_gpu fails above it). Needs no GPU."""
    count = 14 * len(GPU_CLASSES[arch])
    assert f"compiled {count} kernels for sm_{arch}" in run_without_interpreter([__file__, "--compile", str(arch)])


def _compile(arch: int) -> None:
    """At the default GPU configuration with the rows fit_rows picks for GPU_CLASSES[arch]: per case the softmax
    pass, the step with the blend only (the forward: from a checkpoint, or from the float32 scratch), with the
    product too and with the product only (the backward's replay), both modes, the adjoint step (variants A and C)
    and the dq/dk pass."""
    from mtlfast.kernels import iterative_fusion as K
    from mtlfast.testing import GPU_MAX_SHARED_BYTES

    fp32 = {"lse_ptr", "coef_ptr", "r_ptr", "dq_ptr", "dk_ptr"}
    limit = GPU_MAX_SHARED_BYTES[arch]
    compiled = []
    for dtype, precision, block_d in GPU_CLASSES[arch]:
        cfg = K.fit_rows(K.GPU_CONFIG, 2 if dtype == "bf16" else 4, block_d, limit)
        blocks = dict(BLOCK_X=cfg.block_x, BLOCK_Y=cfg.block_y, BLOCK_D=block_d, DOT_PRECISION=precision)

        def build(fn, none=(), scratch=(), **constexprs):
            constexprs = {n: v for n, v in {**blocks, **constexprs}.items() if n in fn.arg_names}
            constexprs.update({n: None for n in none})
            sig = {n: "constexpr" if n in constexprs else "*fp64" if n == "da_ptr" else
                   ("*fp32" if n in fp32 | set(scratch) else f"*{dtype}") if n.endswith("_ptr") else
                   "fp32" if n.endswith("scale") else "i32" for n in fn.arg_names}
            compiled.append(compile_for_gpu(fn, sig, constexprs, arch=arch, max_shared=limit,
                                            num_warps=cfg.num_warps, num_stages=cfg.num_stages))

        build(K._softmax_kernel, COMPUTE_LSE=True)
        build(K._softmax_kernel, COMPUTE_LSE=False)
        for materialized in (True, False):
            none = () if materialized else ("co_ptr",)
            step = dict(MATERIALIZED=materialized, BLOCK_C=cfg.block_c)
            variant = 0 if materialized else 2
            build(K._step_kernel, none + ("p_ptr",), ("out_ptr",), VARIANT=2, **step)
            build(K._step_kernel, none + ("p_ptr",), ("x_ptr",), VARIANT=2, **step)
            build(K._step_kernel, none, ("x_ptr", "out_ptr"), VARIANT=variant, **step)
            build(K._step_kernel, none + ("out_ptr",), ("x_ptr",), VARIANT=variant, **step)
            build(K._adjoint_step_kernel, none, ("g_ptr", "out_ptr", "v_ptr"), VARIANT=variant, **step)
            build(K._dqdk_kernel, none, ("g_ptr", "v_ptr"), MATERIALIZED=materialized, BLOCK_K=cfg.block_k)
    print(f"compiled {len(compiled)} kernels for sm_{arch}")


def test_row_tiles_follow_the_gpus_shared_memory():
    """fit_rows: 64-row tiles (the GPU default) up to 512 bytes of q/k per row where a block may use >= 160 KB
    (H100/H200, A100) and on the interpreter, 32 rows above; on 99 KB GPUs 64 rows up to 256 bytes, 32 up to 512,
    16 above. (Whether each choice fits is the compile test's: this one pins the choice it compiles.)"""
    from mtlfast.kernels import iterative_fusion as K

    expected = {  # (element size, BLOCK_D) -> rows on (a 99 KB GPU, an A100, an H100, no GPU)
        (2, 64): (64, 64, 64, 64), (2, 128): (64, 64, 64, 64), (2, 256): (32, 64, 64, 64),
        (4, 64): (64, 64, 64, 64), (4, 128): (32, 64, 64, 64), (4, 256): (16, 32, 32, 32)}
    for (size, block_d), rows in expected.items():
        got = tuple(K.fit_rows(K.GPU_CONFIG, size, block_d, shared) for shared in (99 * 1024, 163 * 1024, 227 * 1024,
                                                                                   None))
        assert tuple((c.block_x, c.block_y) for c in got) == tuple((r, r) for r in rows), (size, block_d, got)
        assert all(c.block_c == K.GPU_CONFIG.block_c and c.block_k == K.GPU_CONFIG.block_k for c in got)


# (shared KB per block, dtype, N, D, C, n_iter, variants, expected (block_x, block_y, block_c, block_d)): GPU_CONFIG's
# 128-channel tiles over two row and two channel tiles, every variant; float32 at D = 200 (BLOCK_D 256) in 32-row
# tiles on an H100, 16 on a 99 KB GPU (refused there before the tiles shrank)
GPU_TILE_CASES = [
    (227, torch.float32, 77, 40, 150, 2, "ABC", (64, 64, 128, 64)),
    (227, torch.float16, 77, 40, 150, 2, "ABC", (64, 64, 128, 64)),
    (227, torch.float32, 37, 200, 19, 3, "C", (32, 32, 32, 256)),
    (99, torch.float32, 37, 200, 19, 3, "C", (16, 16, 32, 256)),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GPU_TILE_CASES, ids=[f"{c[0]}kb-{str(c[1])[6:]}-D{c[3]}" for c in GPU_TILE_CASES])
def test_matches_reference_with_each_gpus_tiles(monkeypatch, device, case, mode):
    """The GPU launch configuration (GPU_CONFIG, with the row tiles fit_rows gives for an H100's 227 KB per block or
    a 99 KB GPU's), run here through the interpreter: the GPU's tiling is checked against the reference, not only
    compiled (test_kernels_fit_each_gpus_shared_memory). The test asserts the tiles in effect."""
    from mtlfast.kernels import iterative_fusion as K

    shared_kb, dtype, N, D, C, n_iter, variants, tiles = case
    monkeypatch.setattr(K, "default_config", lambda device: K.GPU_CONFIG)
    monkeypatch.setattr(K, "device_shared_bytes", lambda device: shared_kb * 1024)
    q = torch.empty(2, N, D, device=device, dtype=dtype)
    problem = K._Problem.of(q, torch.empty(2, N, C, device=device, dtype=dtype), 0.1, "C", mode == "materialize")
    assert (problem.block_x, problem.block_y, problem.block_c, problem.block_d) == tiles, problem
    for variant in variants:
        _check(device, dtype, variant, mode, B=2, N=N, D=D, C=C, n_iter=n_iter)


# --- GPU only -----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_tpim_shape_gpu(kernel_dtype, mode):
    """A TPIM layer at 1/16 of NYUD (28x36 tokens), 2 tasks (2 ordered pairs) x batch 2, C = 256, n = 18,
    with the default (unpinned) GPU configuration; α in [0.05, 0.1) as in test_matches_reference_18_steps."""
    _check("cuda", kernel_dtype, "C", mode, B=4, N=28 * 36, D=64, C=256, n_iter=18, alpha=(0.05, 0.1))


@pytest.mark.gpu
def test_inductor_compile_gpu():
    """torch.compile (Inductor, fullgraph) around the op in bfloat16: forward and the gradients to q, k, v and
    alpha against the float64 reference, within twice PyTorch's own bfloat16 error (check_against_reference; dα
    sums B·N·C·n = 7e5 products of bfloat16 Vᵗ and Gᵗ, so it is ``conditioned``: PyTorch's own bfloat16 dα is
    9-22% off at this shape, measured on the CPU)."""
    compiled = torch.compile(lambda q, k, v, alpha, n_iter: iterative_fusion(q, k, v, alpha, n_iter, backend="triton"),
                             fullgraph=True)
    check_against_reference(compiled, reference, _inputs(4, 300, 64, 96, 6, "cuda", fresh_seed()),
                            dtype=torch.bfloat16, conditioned=("grad alpha",))


if __name__ == "__main__" and sys.argv[1:2] == ["--compile"]:
    _compile(int(sys.argv[2]))


def test_triton_refuses_gradients_in_deterministic_mode(device):
    """The backward's dq is a float atomic sum over key blocks: under torch.use_deterministic_algorithms(True)
    the triton backend refuses calls that need a gradient (naming the reason and the reference), and only those;
    warn-only mode and inference are served."""
    gen = torch.Generator().manual_seed(fresh_seed())
    q, k, v = (torch.randn(1, 9, 8, generator=gen).to(device) for _ in range(3))
    alpha = torch.tensor(0.3, device=device, requires_grad=True)
    was = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(BackendError, match=r"use_deterministic_algorithms\(True\) is on and its dq .* reference"):
            iterative_fusion(q, k, v, alpha, 2, backend="triton")
        with torch.no_grad():
            iterative_fusion(q, k, v, alpha, 2, backend="triton")
        iterative_fusion(q, k, v, alpha.detach(), 2, backend="triton")
        torch.use_deterministic_algorithms(True, warn_only=True)
        iterative_fusion(q, k, v, alpha, 2, backend="triton")
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn_only)
