"""mtlfast.ops.attention: Triton kernels vs the literal reference, forward and every gradient.

CPU: Triton through its interpreter (float32 and float16; bfloat16 is refused there), small odd shapes, one
pinned launch configuration per case. The cases cover Nq = 1, Nq != Nk, Dqk != Dv, Dqk = 300 (> 256,
several head-dim chunks), several Dv chunks, several chunks of both widths with own != stream tiles,
and non-contiguous inputs: every specialisation of the kernels (one or several chunks per width).
GPU-only tests (marker ``gpu``) add the paper widths, 4096-wide heads and Inductor.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import mtlfast
from mtlfast.backends import BackendError
from mtlfast.kernels.attention import _tf32_rounded
from mtlfast.ops.attention import attention_triton, center_keys
from mtlfast.reference.attention import attention as reference_attention
from mtlfast.testing import (check_against_reference, float32_dots_are_tf32, fresh_seed, randn, rel_error,
                             run_without_interpreter, tolerance, compile_for_gpu, transposed_layout)


def _inputs(B, H, n_q, n_k, d_qk, d_v, *, seed, permuted=False):
    gen = torch.Generator().manual_seed(seed)
    if permuted:  # (B, N, H, D) storage viewed as (B, H, N, D): strides of a split-heads projection
        return {"q": randn(B, n_q, H, d_qk, generator=gen).transpose(1, 2),
                "k": randn(B, n_k, H, d_qk, generator=gen).transpose(1, 2),
                "v": randn(B, n_k, H, d_v, generator=gen).transpose(1, 2)}
    return {"q": randn(B, H, n_q, d_qk, generator=gen), "k": randn(B, H, n_k, d_qk, generator=gen),
            "v": randn(B, H, n_k, d_v, generator=gen)}


def _blocks(own, stream, dqk, dv, dqk_tail=0, dv_tail=0):
    from mtlfast.kernels.attention import Blocks

    return Blocks(own=own, stream=stream, dqk=dqk, dv=dv, dqk_tail=dqk_tail, dv_tail=dv_tail)


# (B, H, Nq, Nk, Dqk, Dv, scale, blocks or None for the default, permuted inputs)
CASES = {
    "odd_noncontiguous": (1, 2, 37, 50, 24, 40, None, None, True),  # Dv 40 = 32 + a tail of 16
    "nq1_tiny_widths": (2, 1, 1, 7, 7, 3, 0.3, None, False),
    "dqk300": (1, 1, 63, 17, 300, 33, None, None, False),  # 3 Dqk chunks of 128: dq/dk chunk grid
    "dv300": (1, 1, 17, 30, 20, 300, None, None, False),  # 3 Dv chunks, 1 Dqk chunk: out/dv chunk grid
    "tails_both": (1, 1, 17, 30, 150, 144, None, None, False),  # 128 + 32 and 128 + 16, one program each
    "chunks_both": (1, 2, 21, 19, 20, 36, 1.7, (32, 16, 16, 16), False),  # 2 Dqk x 3 Dv chunks
    # one width held with a tail, the other in chunks (the split dk / dv passes of the backward)
    "tail_dqk_chunked_dv": (1, 2, 21, 19, 40, 50, None, (16, 16, 32, 16, 16, 0), False),
    "chunked_dqk_tail_dv": (2, 1, 19, 23, 50, 40, None, (16, 16, 16, 32, 0, 16), False),
    # one key: out = v and the q, k gradients are exactly zero (compared by absolute norm)
    "nk1": (2, 1, 5, 1, 6, 4, None, None, False),
    "dqk1_dv1": (1, 2, 9, 7, 1, 1, None, None, False),  # widths of 1
    "n257": (1, 1, 257, 257, 12, 9, None, None, False),  # DESIGN.md §6's largest odd size, the default blocks
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_reference(case, kernel_dtype, device):
    B, H, n_q, n_k, d_qk, d_v, scale, blocks, permuted = CASES[case]
    inputs = {name: t.to(device) for name, t in _inputs(B, H, n_q, n_k, d_qk, d_v, seed=fresh_seed(),
                                                          permuted=permuted).items()}
    if blocks is None:
        def fn(q, k, v):
            return mtlfast.ops.attention(q, k, v, scale=scale, backend="triton")
    else:
        pinned = _blocks(*blocks)

        def fn(q, k, v):
            return attention_triton(q, k, v, scale=scale if scale is not None else d_qk ** -0.5,
                                    fwd_blocks=pinned, bwd_blocks=pinned)

    def reference(q, k, v):
        return reference_attention(q, k, v, scale=scale)

    check_against_reference(fn, reference, inputs, dtype=kernel_dtype, tf32_dots=float32_dots_are_tf32())


# (Nq, Nk, Dqk, Dv) run with the GPU's default blocks: widths held with tails (72 = 64 + 16; 16-bit forward tiles of
# 128 x 64 over two query tiles), 288 = 256 + 32 (16 x 16 backward tiles in 16-bit), a held Dqk with a tailed Dv,
# Dqk 300 in chunks beside a held Dv, Dv 400 in chunks
GPU_BLOCK_SHAPES = [(150, 70, 72, 72), (37, 70, 288, 288), (37, 41, 40, 150), (29, 33, 300, 33), (21, 23, 24, 400)]


@pytest.mark.parametrize("shape", GPU_BLOCK_SHAPES, ids=[f"Dqk{s[2]}-Dv{s[3]}" for s in GPU_BLOCK_SHAPES])
def test_gpu_default_blocks_match_reference(device, kernel_dtype, shape):
    """The launch configurations a GPU takes by default (default_blocks for "cuda" in this dtype: 16-bit and float32
    tiles, chunks and tails), run here through the interpreter: the GPU's tiling (partial tiles, tails, chunk grids)
    is checked against the reference, not only compiled (test_kernels_compile_for_sm90). On a GPU they are the
    defaults."""
    from mtlfast.kernels.attention import default_blocks

    n_q, n_k, d_qk, d_v = shape
    inputs = {name: t.to(device) for name, t in _inputs(1, 2, n_q, n_k, d_qk, d_v, seed=fresh_seed()).items()}
    fwd = default_blocks(d_qk, d_v, "cuda", kernel_dtype)
    bwd = default_blocks(d_qk, d_v, "cuda", kernel_dtype, backward=True)

    def fn(q, k, v):
        return attention_triton(q, k, v, scale=d_qk ** -0.5, fwd_blocks=fwd, bwd_blocks=bwd)

    check_against_reference(fn, reference_attention, inputs, dtype=kernel_dtype, tf32_dots=float32_dots_are_tf32())


@triton.jit
def _tf32_rounded_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _tf32_rounded(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def test_dot_precision_follows_both_matmul_precision_apis():
    """dot_precision reads PyTorch's new float32 precision API (torch.backends.cuda.matmul.fp32_precision,
    torch.backends.fp32_precision) and the legacy one, whose getter raises once the new one was used: every float32
    Triton call failed then. (A subprocess: the settings are process-wide.)"""
    script = """
import torch
from mtlfast.kernels.attention import dot_precision
seen = [dot_precision(torch.float32)]
torch.set_float32_matmul_precision("high"); seen.append(dot_precision(torch.float32))
torch.set_float32_matmul_precision("highest"); seen.append(dot_precision(torch.float32))
torch.backends.cuda.matmul.fp32_precision = "tf32"; seen.append(dot_precision(torch.float32))
torch.backends.cuda.matmul.fp32_precision = "ieee"; seen.append(dot_precision(torch.float32))
torch.backends.cuda.matmul.fp32_precision = "none"; torch.backends.fp32_precision = "tf32"
seen.append(dot_precision(torch.float32))
print(seen, dot_precision(torch.bfloat16))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "['ieee', 'tf32', 'ieee', 'tf32', 'ieee', 'tf32'] tf32", out.stdout


def test_tf32_rounding_is_to_nearest_ties_away(device):
    """kernels.attention._tf32_rounded (the operands of TF32 dots) against TF32 rounding computed in float64:
    the mantissa to 10 bits, to nearest, ties away from zero (cuBLAS's cvt.rna), through exact ties, signs, the
    largest float (to inf), inf and NaN. (Normal numbers: subnormals round at their fixed bit positions.)"""
    gen = torch.Generator().manual_seed(fresh_seed())
    tie = torch.tensor([0x3F801000, 0x3F803000, 0xBF801000, 0x3F800FFF, 0x3F801001], dtype=torch.int64)
    special = torch.tensor([0.0, -0.0, 1.0, float(torch.finfo(torch.float32).max), float("inf"), -float("inf")])
    x = torch.cat([randn(200, generator=gen, dtype=torch.float32) * 10.0 ** torch.randint(-30, 30, (200,),
                                                                                            generator=gen),
                   tie.to(torch.int32).view(torch.float32), special, torch.tensor([float("nan")])])
    y = torch.empty_like(x, device=device)
    _tf32_rounded_kernel[(1,)](x.to(device), y, x.numel(), BLOCK=256)
    y = y.cpu()
    mantissa, exponent = torch.frexp(x[:-1].double())
    scaled = mantissa * 2.0 ** 11
    want = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5) / 2.0 ** 11 * 2.0 ** exponent.double()).float()
    want = torch.where(torch.isfinite(x[:-1]), want, x[:-1])
    assert torch.equal(y[:-1], want) and torch.isnan(y[-1])
    assert y[200:205].tolist() == [1.0009765625, 1.001953125, -1.0009765625, 1.0, 1.0009765625]  # ties away


def test_width_split_and_plan():
    """split_width holds a width in one program as chunk + tail with the least padding (the BridgeNet/TIF
    widths pad at most 8 columns), width_plan refuses a tail that does not hold the rest of the width."""
    from mtlfast.kernels.attention import split_width, width_plan

    assert [split_width(w, 384) for w in (7, 16, 24, 40, 72, 144, 200, 256, 288, 384)] == [
        (16, 0), (16, 0), (32, 0), (32, 16), (64, 16), (128, 16), (256, 0), (256, 0), (256, 32), (256, 128)]
    assert split_width(400, 384) is None and split_width(288, 256) is None
    plan = width_plan(_blocks(16, 16, 32, 16, dqk_tail=16), 40, 50)
    assert (plan.one_dqk, plan.tail_dqk, plan.chunks_dqk, plan.one_dv, plan.chunks_dv) == (True, 16, 1, False, 4)
    for width in (32, 49):
        with pytest.raises(ValueError, match=rf"Blocks.dqk_tail=16: .* needs dqk=32 < width <= 48; got width {width}"):
            width_plan(_blocks(16, 16, 32, 16, dqk_tail=16), width, 16)
    with pytest.raises(ValueError, match=r"Blocks.dv_tail: expected a power of two >= 16 \(or 0\), got 24"):
        _blocks(16, 16, 16, 16, dv_tail=24)
    # the GPU defaults at 288 (BridgeNet's 1/32 stage), and without tails (the benchmark's comparison)
    from mtlfast.kernels.attention import Blocks, default_blocks

    bf16 = torch.bfloat16
    assert default_blocks(288, 288, "cuda", bf16) == Blocks(64, 32, 32, 256, 8, 2, dv_tail=32)
    assert default_blocks(288, 288, "cuda", bf16, backward=True) == Blocks(16, 16, 256, 256, 8, 2, 32, 32)
    assert default_blocks(288, 288, "cuda", bf16, tails=False) == Blocks(64, 64, 32, 256, 8, 2)
    assert default_blocks(288, 288, "cuda", bf16, backward=True, tails=False) == Blocks(64, 32, 128, 128, 8, 2)


def test_centred_keys_change_nothing_float64():
    """softmax is invariant to a per-row shift, so attention on center_keys(k) equals attention on k (the
    literal reference in float64), and the gradient of a key shift common to all keys is zero."""
    gen = torch.Generator().manual_seed(fresh_seed())
    q, k, v = _inputs(2, 3, 11, 9, 7, 5, seed=int(torch.randint(2 ** 31, (1,), generator=gen))).values()
    shift = randn(2, 3, 1, 7, generator=gen, scale=10.0).requires_grad_()
    out = reference_attention(q, k + shift, v)
    torch.testing.assert_close(reference_attention(q, center_keys(k + shift), v), out, rtol=1e-12, atol=1e-12)
    (g_shift,) = torch.autograd.grad(out, [shift], randn(*out.shape, generator=gen))
    assert g_shift.abs().max() < 1e-12


def test_keys_with_a_large_common_shift(device):
    """Keys = spread of order 1 + a shift of order 1000 common to all keys, both exact in float32, so the
    float64 reference sees the same keys. Uncentred float32 scores lose ~1e-4 of their spread to rounding
    (dq then misses the 1e-4 bound: 1.5-2e-4 measured); the Triton path centres the keys first
    (:func:`center_keys`) and stays at ~2e-7."""
    gen = torch.Generator().manual_seed(fresh_seed())
    B, H, n_q, n_k, d_qk, d_v = 1, 2, 37, 29, 24, 17
    inputs = {"q": randn(B, H, n_q, d_qk, generator=gen, device=device),
              "k": (randn(B, H, n_k, d_qk, generator=gen) * 256).round().div(256).to(device),
              "key_shift": (randn(B, H, 1, d_qk, generator=gen) * 1024).round().to(device),
              "v": randn(B, H, n_k, d_v, generator=gen, device=device)}

    def shifted(attend):
        return lambda q, k, key_shift, v: attend(q, k + key_shift, v)

    check_against_reference(shifted(lambda q, k, v: mtlfast.ops.attention(q, k, v, backend="triton")),
                            shifted(reference_attention), inputs, dtype=torch.float32, grad=["q", "k", "v"],
                            tf32_dots=float32_dots_are_tf32())


def test_kernels_on_rows_with_every_score_far_below_zero(device):
    """The kernels without the centring (called directly) on scores -400 + O(1): exp(s - lse) of a padding
    key row (s = 0) would overflow, so the dq kernel masks those rows. Nk = 20 leaves 12 padding rows in the
    last 16-key block. q and k are on a 1/16 grid with the -400 in one coordinate, so float32 forms the
    scores exactly; what remains is the rounding of exp's argument at |s| = 400 (~1e-5 relative), hence
    the 1e-3 bound: this test is about overflow, the accuracy tests are above."""
    from mtlfast.kernels.attention import attention_backward, attention_forward

    gen = torch.Generator().manual_seed(fresh_seed())
    B, H, n_q, n_k, d = 1, 1, 5, 20, 16

    def grid_values(n, first):
        x = (randn(B, H, n, d, generator=gen) * 8).round() / 16
        x[..., 0] = first
        return x.float().to(device)

    q, k = grid_values(n_q, 20.0), grid_values(n_k, -20.0)
    v, grad_out = (randn(B, H, n, 3, generator=gen).float().to(device) for n in (n_k, n_q))
    blocks = _blocks(16, 16, 16, 16)
    out, lse = attention_forward(q, k, v, 1.0, blocks)
    assert lse.max() < -300
    grads = attention_backward(grad_out, q, k, v, out, lse, 1.0, blocks)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(reference_attention(*leaves, scale=1.0), leaves, grad_out.double())
    for name, got, ref in zip("qkv", grads, want):
        assert rel_error(got, ref) < 1e-3, f"grad {name}: {rel_error(got, ref):.2e}"


def test_logsumexp_output(device):
    """The saved row logsumexp is log Σ_j exp(scale q_i·(k_j − k̄)) (the op works on the centred keys;
    natural log, float32)."""
    ins = _inputs(1, 2, 19, 45, 9, 5, seed=fresh_seed())
    q, k, v = (t.to(device=device, dtype=torch.float32) for t in ins.values())
    out, lse = torch.ops.mtlfast.attention_fwd(q, k, v, 0.4, [], [])
    want = torch.logsumexp(0.4 * ins["q"] @ center_keys(ins["k"]).transpose(-2, -1), dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 19)
    assert (lse.double().cpu() - want).norm() / want.norm() < 1e-5
    assert not lse.requires_grad


def test_torch_library_registration(device):
    """opcheck: schema, fake (meta) implementation, autograd registration, AOT dispatch."""
    ins = _inputs(1, 1, 5, 6, 3, 4, seed=fresh_seed())
    q, k, v = (t.to(device=device, dtype=torch.float32).requires_grad_() for t in ins.values())
    torch.library.opcheck(torch.ops.mtlfast.attention_fwd.default, (q, k, v, 0.5, [], []))
    # the backward on inputs of any layout: its fake gives the kernels' contiguous gradients (inductor checks it)
    q, k, v = (transposed_layout(t.detach()) for t in (q, k, v))
    out, lse = torch.ops.mtlfast.attention_fwd(q, k, v, 0.5, [], [])
    torch.library.opcheck(torch.ops.mtlfast.attention_bwd.default,
                          (transposed_layout(torch.randn_like(out)), q, k, v, out, lse, 0.5, []),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_with_aot_autograd(device):
    """torch.compile through AOTAutograd (fake tensors + the registered backward), without Inductor."""
    ins = _inputs(1, 2, 9, 11, 5, 6, seed=fresh_seed())
    q, k, v = (t.to(device=device, dtype=torch.float32).requires_grad_() for t in ins.values())

    def f(q, k, v):
        return mtlfast.ops.attention(q, k, v, scale=0.45, backend="triton") * 2

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)  # dispatch included
    out.sum().backward()
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    want = reference_attention(*leaves, scale=0.45) * 2
    want.sum().backward()
    assert rel_error(out.cpu(), want) < 1e-5
    for name, got, ref in zip("qkv", (q, k, v), leaves):
        bound = tolerance(torch.float32, tf32_dots=float32_dots_are_tf32())
        assert rel_error(got.grad.cpu(), ref.grad) < bound, f"grad {name}"


# --- bad inputs ---------------------------------------------------------------------------------------


def _good(dtype=torch.float32):
    return (torch.randn(2, 3, 5, 4, dtype=dtype), torch.randn(2, 3, 7, 4, dtype=dtype),
            torch.randn(2, 3, 7, 6, dtype=dtype))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs(backend):
    q, k, v = _good()
    op = mtlfast.ops.attention
    with pytest.raises(ValueError, match=r"k: expected shape \(B, H, Nk, Dqk\) with Dqk=4"):
        op(q, torch.randn(2, 3, 7, 5), v, backend=backend)
    with pytest.raises(ValueError, match=r"v: expected shape \(B, H, Nk, Dv\) with Nk=7"):
        op(q, k, torch.randn(2, 3, 8, 6), backend=backend)
    with pytest.raises(ValueError, match=r"k: expected shape .* with H=3"):
        op(q, torch.randn(2, 1, 7, 4), v, backend=backend)
    with pytest.raises(ValueError, match=r"q: expected a 4-d tensor"):
        op(q[0], k, v, backend=backend)
    with pytest.raises(TypeError, match=r"q: expected a floating-point tensor .* got int64"):
        op(q.long(), k, v, backend=backend)
    with pytest.raises(TypeError, match=r"v: expected dtype float32 \(as q\), got float64"):
        op(q, k, v.double(), backend=backend)
    with pytest.raises(ValueError, match=r"k: expected device cpu \(as q\), got meta"):
        op(q, k.to("meta"), v, backend=backend)
    with pytest.raises(ValueError, match=r"k: every dimension must be >= 1"):
        op(q, k[:, :, :0], v[:, :, :0], backend=backend)
    with pytest.raises(TypeError, match=r"scale: expected a real number or None, got Tensor"):
        op(q, k, v, scale=torch.tensor(0.5), backend=backend)
    with pytest.raises(ValueError, match=r"scale: expected a finite number, got inf"):
        op(q, k, v, scale=float("inf"), backend=backend)
    # the public function converts the scale for every backend; run it where these CPU tensors run everywhere
    torch.testing.assert_close(op(q, k, v, scale=np.float32(0.5), backend="reference"),
                               op(q, k, v, scale=0.5, backend="reference"), rtol=0, atol=0)


def test_backend_refusals():
    q, k, v = _good(torch.bfloat16)
    if torch.cuda.is_available():
        pytest.skip("the bfloat16 refusal is the CPU interpreter's")
    with pytest.raises(BackendError, match="interpreter .* no bfloat16"):
        mtlfast.ops.attention(q, k, v, backend="triton")
    with pytest.raises(BackendError, match="no cpp implementation"):
        mtlfast.ops.attention(*_good(), backend="cpp")


def test_grid_limits_reported():
    from mtlfast.kernels.attention import grid_limits

    big = torch.empty(1, 70000, 1, 1, device="meta")
    assert any("B*H = 70000" in r for r in grid_limits(big, big, big))
    huge = torch.empty(1, 1, 2**20 + 1, 2**11, device="meta")  # max offset 2**31 + 2047
    assert any("32-bit" in r for r in grid_limits(huge, huge, huge))
    small = torch.empty(1, 2, 3, 4, device="meta")
    assert grid_limits(small, small, small) == []
    # inputs within the limit whose output slice is not: out is 2**20 x 4096 = 2**32 elements per slice
    q, k, v = (torch.empty(1, 1, n, d, device="meta") for n, d in ((2**20, 64), (16, 64), (16, 4096)))
    assert [r.split(":")[0] for r in grid_limits(q, k, v)] == ["out"]
    q = torch.empty(1, 1, 2**25, 64, device="meta")  # 2**31 elements in q and dq, q's max offset 2**31 - 1
    assert [r.split(":")[0] for r in grid_limits(q, q, q)] == ["out", "dq", "dk", "dv"]


# --- GPU rules the interpreter does not enforce ---------------------------------------------------------


@pytest.mark.compile_only
def test_kernels_compile_for_sm90():
    """Every kernel specialisation compiles to sm_90a cubin (tl.dot shapes, constexpr branches, globals),
    with Triton's own compiler and ptxas, in a subprocess without the interpreter. Needs no GPU."""
    assert "compiled" in run_without_interpreter([__file__, "--compile-sm90"])


def _compile_sm90() -> None:
    """Compiles, at the default GPU configurations, the forward and every backward pass of the launchers
    (the same compile-time parameters, from fwd_constexprs / bwd_constexprs): in bfloat16 at every width the
    models call (one program per width, with tails), a chunked one (1000) and every (Dqk, Dv) of the GPU
    benchmarks (attention's, and lthd_attention's widened 2D with C), plus float32 (exact "ieee" dots) at 64 and
    288; each within TRITON_SHARED_BYTES as compiled with hints only, and as a launch compiles it (unit strides
    constant) within what an H100 offers."""
    from mtlfast.bench.bench_attention import cases as attention_cases
    from mtlfast.bench.bench_lthd_attention import cases as lthd_cases
    from mtlfast.kernels import attention as A
    from mtlfast.testing import GPU_MAX_SHARED_BYTES

    pointers = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LSE", "DELTA"}

    def build(fn, meta, dtype):
        meta = dict(meta)
        options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages", 2))
        sig = {}
        for name in fn.arg_names:
            if name in meta:
                sig[name] = "constexpr"
            elif name in pointers:
                sig[name] = "*fp32" if name in ("LSE", "DELTA") else dtype
            else:
                sig[name] = "fp32" if name.endswith("scale") else "i32"
        compile_for_gpu(fn, sig, meta, **options)
        # as a launch with contiguous tensors compiles it: the unit strides as the constant 1, which vectorises the
        # loads further and takes more shared memory (up to 128 KB at 16-bit widths <= 128): an H100's 227 KB
        unit_strides = [name for name in fn.arg_names if name.startswith("s") and name.endswith("_d")]
        compile_for_gpu(fn, sig, meta, ones=unit_strides, max_shared=GPU_MAX_SHARED_BYTES[90], **options)

    count = 0
    # bf16 widths: BridgeNet/TIF's 72, 144, 288, 384 and those the paper-size models call (36, 80, 128, and
    # LTHD's concatenated 160; found by planning them on meta tensors), and a chunked one
    models = {(w, w) for w in (36, 72, 80, 128, 144, 160, 288, 384, 1000)}
    benchmarks = ({(c.params["Dqk"], c.params["Dv"]) for c in attention_cases("cuda")}
                  | {(2 * c.params["D"], c.params["C"]) for c in lthd_cases("cuda")})
    for torch_dtype, dtype, pairs in ((torch.bfloat16, "*bf16", sorted(models | benchmarks)),
                                      (torch.float32, "*fp32", ((64, 64), (288, 288)))):
        for d_qk, d_v in pairs:
            fwd = A.default_blocks(d_qk, d_v, "cuda", torch_dtype)
            build(A._attn_fwd_kernel, A.fwd_constexprs(fwd, A.width_plan(fwd, d_qk, d_v), torch_dtype), dtype)
            bwd = A.default_blocks(d_qk, d_v, "cuda", torch_dtype, backward=True)
            passes, dq = A.bwd_constexprs(bwd, A.width_plan(bwd, d_qk, d_v), torch_dtype)
            for meta, _ in passes:
                build(A._attn_bwd_dkdv_kernel, meta, dtype)
            build(A._attn_bwd_dq_kernel, dq, dtype)
            build(A._attn_bwd_delta_kernel, dict(BLOCK_M=bwd.own, BLOCK_DV=bwd.dv, num_warps=bwd.num_warps), dtype)
            count += 3 + len(passes)
    print(f"compiled {count} kernels for sm_90a")


# --- GPU only -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 2, 1000, 333, 72, 72), (1, 2, 513, 1024, 288, 288),
                                   (1, 2, 257, 300, 384, 144), (1, 1, 129, 100, 4096, 4096),
                                   (2, 3, 200, 17, 128, 256)])
def test_attention_paper_widths_gpu(shape, kernel_dtype):
    inputs = {n: t.cuda() for n, t in _inputs(*shape, seed=fresh_seed()).items()}
    check_against_reference(lambda q, k, v: mtlfast.ops.attention(q, k, v, backend="triton"),
                            reference_attention, inputs, dtype=kernel_dtype, tf32_dots=float32_dots_are_tf32())


@pytest.mark.gpu
def test_inductor_compile_gpu():
    """torch.compile (Inductor, fullgraph) around the op in bfloat16: forward and the q, k, v gradients against the
    float64 reference, within twice PyTorch's own bfloat16 error (check_against_reference)."""
    inputs = {n: t.cuda() for n, t in _inputs(2, 2, 300, 200, 96, 64, seed=fresh_seed()).items()}
    compiled = torch.compile(lambda q, k, v: mtlfast.ops.attention(q, k, v, backend="triton"), fullgraph=True)
    check_against_reference(compiled, reference_attention, inputs, dtype=torch.bfloat16)


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    _compile_sm90()


def test_saved_for_backward_is_the_output_and_logsumexp():
    """The Triton path keeps q, k, v (the caller's, no centred copy) plus out and the float32 logsumexp:
    O(N) beyond the inputs (counted on meta tensors with the ops' fake implementations)."""
    from mtlfast.bench.harness import saved_activation_bytes

    B, H, n_q, n_k, d_qk, d_v = 2, 3, 513, 257, 288, 144
    inputs = {n: torch.empty(s, device="meta", dtype=torch.bfloat16).requires_grad_()
              for n, s in (("q", (B, H, n_q, d_qk)), ("k", (B, H, n_k, d_qk)), ("v", (B, H, n_k, d_v)))}
    saved = saved_activation_bytes(lambda q, k, v: attention_triton(q, k, v, scale=0.1), inputs)
    assert saved == B * H * n_q * d_v * 2 + B * H * n_q * 4
