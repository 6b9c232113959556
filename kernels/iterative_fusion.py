"""Triton kernels and launchers of the Iterative Fusion Block (DESIGN.md §3 op 4, TPIM paper eq. 6–8).

Every variant is one recursion  Vᵗ⁺¹ = a·Co Vᵗ + b·Vᵗ  with (a, b) = (1, 0) for A, (α, 1) for B,
(α, 1 − α) for C, and Co = softmax(scale·q kᵀ). Shapes: q, k (B, N, D); v (B, N, C); B covers every task
pair × batch of a TPIM layer, so each launch serves all of them.

Forward: one pass computes the row log-sum-exp of scale·q kᵀ (and, in materialize mode, writes Co once);
then one launch per step computes a tile of Co·Vᵗ and fuses the blend a·(Co Vᵗ) + b·Vᵗ into its epilogue.
In recompute mode the step re-forms its Co tiles from q, k and the saved log-sum-exp (flash-style), so no
N×N buffer ever exists.

Backward (adjoint recursion, no autograd over the steps), with Pᵗ = Co Vᵗ and Gᵗ = ∂L/∂Vᵗ:
    Gⁿ = dOut;  Gᵗ = a·Coᵀ Gᵗ⁺¹ + b·Gᵗ⁺¹                      (dv = G⁰)
    dCo = a Σₜ Gᵗ⁺¹ Vᵗᵀ = a·[G¹ | … | Gⁿ] [V⁰ | … | Vⁿ⁻¹]ᵀ      (one product over the concatenated channels)
    dα  = Σₜ ⟨Gᵗ⁺¹, Pᵗ⟩ (B),  Σₜ ⟨Gᵗ⁺¹, Pᵗ − Vᵗ⟩ (C)
    dS  = Co ⊙ (dCo − r 1ᵀ),  rᵢ = Σⱼ dCoᵢⱼ Coᵢⱼ = a Σₜ ⟨Gᵗ⁺¹ᵢ, Pᵗᵢ⟩   (a per-row dot of stored vectors)
    dq  = scale·dS k,  dk = scale·dSᵀ q.
dCo is never formed: a flash-style pass per key block recomputes (or loads) Co tiles, forms dCo tiles from
the concatenated G/V rows, turns them into dS in registers, accumulates dk in registers and adds dq
atomically. dS, r and dq/dk are linear in the per-step terms, so the sums split over segments of steps.
dα: the step map M = a·Co + b·I commutes with ∂M/∂α, so all n terms of the sum are equal and
dα = n·⟨Gⁿ, (∂M/∂α)Vⁿ⁻¹⟩ would need the last step only; we keep the sum: it averages the rounding of n
terms where the one-term form multiplies one term's rounding by n (2.5x PyTorch's float32 error in the
median in a float32 simulation at n = 18, against 0.7x for the sum).

Saved between forward and backward: lse (B, N) and the checkpoints V^L, V^2L, … (L = ⌈√n⌉, ⌈n/L⌉ − 1 of
them, each (B, N, C)); nothing N×N, no per-step products. Eager autograd saves Co plus two (B, N, C) tensors
per step (Vᵗ for the product and Co Vᵗ for the α-multiply), i.e. N² + 2nNC per batch element against our
(⌈n/L⌉ − 1)·NC + N. The backward replays each segment once from its checkpoint (n extra forward steps in
total), keeping Vᵗ, Pᵗ and Gᵗ⁺¹ of one segment ((3L + 1)·NC of scratch) and Co in materialize mode.

Precision: the Vᵗ between checkpoints (forward and replay) and every Gᵗ live in float32 scratch; only the
checkpoints, Pᵗ, the output and dv are stored in the input dtype, and every product takes its operands as
tiles in the dtype of q, k (the tensor cores' input). The replay thus retraces the forward exactly, and dα,
a sum of n·B·N·C terms that nearly cancel in variant C, does not inherit the rounding of 16-bit Vᵗ and Gᵗ
at every step: in float16 at the n = 18 test shape (α ≈ 0.07) that rounding made dα up to 3 ε off on draws
where PyTorch's own error was below 1 ε. Scratch in bytes: 2·4·NC in the forward, (4·(2L + 1) + 2·L)·NC in
a 16-bit backward (was 2·(3L + 1)·NC).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from mtlfast._alloc import empty, empty_like
from mtlfast.backends import cuda_max_shared_bytes
from mtlfast.kernels.attention import _on_device, dot, dot_precision

LOG2E = 1.4426950408889634
VARIANT_IDS = {"A": 0, "B": 1, "C": 2}
MAX_HEAD_DIM = 256  # q/k rows are held whole in registers (BLOCK_D = next power of two >= D)
#: Shared memory per block from which a q/k row tile (rows × BLOCK_D × element size) may take 32 KB rather than 16 KB
#: (:func:`row_tile_bytes`).
WIDE_TILE_SHARED_BYTES = 160 * 1024


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes: block_x rows of a product tile, block_y tokens per reduction step, block_c channels per
    tile, block_k concatenated channels per step of the dCo reduction. All >= 16 (tl.dot), powers of two."""

    block_x: int
    block_y: int
    block_c: int
    block_k: int
    num_warps: int
    num_stages: int


# The GPU numbers are an untuned starting point (no GPU was available when this was written).
GPU_CONFIG = LaunchConfig(block_x=64, block_y=64, block_c=128, block_k=64, num_warps=8, num_stages=2)
# Under the interpreter few, large programs are fastest; tests pin this one.
INTERPRETER_CONFIG = LaunchConfig(block_x=64, block_y=64, block_c=64, block_k=128, num_warps=4, num_stages=1)


def default_config(device: torch.device) -> LaunchConfig:
    return GPU_CONFIG if device.type == "cuda" else INTERPRETER_CONFIG


def segment_length(n_iter: int) -> int:
    """Steps between checkpoints, ⌈√n⌉: saved memory and backward scratch both O(√n·NC)."""
    return math.isqrt(n_iter - 1) + 1


def num_checkpoints(n_iter: int) -> int:
    """Checkpoints V^L, V^2L, … strictly before Vⁿ (V⁰ is the input v)."""
    return (n_iter - 1) // segment_length(n_iter)


def _block(size: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(size)))


def row_tile_bytes(max_shared: int | None) -> int:
    """Bytes a q/k row tile (rows × BLOCK_D × element size) may take where a block may use ``max_shared`` bytes of
    shared memory (None: no GPU, the interpreter). The kernels' need grows with the tile (compiled with the
    launch hints; the recompute mode's step, adjoint and dq/dk passes need most): with 32 KB tiles up to 160 KB
    for sm_90 and 128 KB for sm_80/86, so they need WIDE_TILE_SHARED_BYTES (H100/H200 227 KB, A100 163 KB); with
    16 KB tiles up to 80 KB for sm_80/86/89, within the 99 KB of RTX 30xx/40xx and A10/L4/L40-class GPUs (112 KB for
    sm_90, whose GPUs all offer 227 KB). The compile tests check each GPU class at its own limit."""
    return 16 * 1024 if max_shared is not None and max_shared < WIDE_TILE_SHARED_BYTES else 32 * 1024


def fit_rows(cfg: LaunchConfig, element_size: int, block_d: int, max_shared: int | None) -> LaunchConfig:
    """``cfg`` with row tiles of at most row_tile_bytes(max_shared) bytes of q/k, i.e. 64 rows (the GPU default)
    at up to 512 bytes per row on H100/A100-class GPUs (bfloat16 up to D = 256, float32 up to 128), 32 rows above;
    on 99 KB GPUs 64 rows up to 256 bytes, 32 up to 512, 16 (tl.dot's minimum) for float32 at D > 128."""
    rows = max(16, row_tile_bytes(max_shared) // (element_size * block_d))
    return replace(cfg, block_x=min(cfg.block_x, rows), block_y=min(cfg.block_y, rows))


def device_shared_bytes(device: torch.device) -> int | None:
    """Shared memory one block may use on ``device`` (the current CUDA device, as launches run); None on a CPU."""
    return cuda_max_shared_bytes() if device.type == "cuda" else None


# --- device functions --------------------------------------------------------------------------------
# Tiles are addressed through block pointers (zero padding past N, C, D): padded rows of X, G, V, q, k
# load as zeros, so they add nothing to any product; score tiles are still masked past N because
# 2^(s − lse) of a padded key is not small.

@triton.jit
def _mix_tile(co_ptr, rows_ptr, stride_rn, cols_ptr, stride_cn, lse_ptr, x_ptr, stride_xn,
              x0, c0, N, C, D, qk_scale,
              MATERIALIZED: tl.constexpr, TRANSPOSED: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc[x, c] = Σ_y W[x, y]·X[y, c] for rows x0… and channels c0… of X, with W = Co, or Coᵀ if TRANSPOSED.

    MATERIALIZED: W tiles are read from co (B-slice, row-major N×N). Otherwise they are re-formed from the
    token rows: W[x, y] = 2^(qk_scale·rows_x·cols_y − lse), with rows q, cols k and lse at x for W = Co, or
    rows k, cols q and lse at y for W = Coᵀ (lse in the log2 domain). X may be float32 scratch: both operands go
    to the tensor cores in the dtype of q, k."""
    dot_dtype = rows_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_X, BLOCK_C), dtype=tl.float32)
    x_bp = tl.make_block_ptr(x_ptr, (N, C), (stride_xn, 1), (0, c0), (BLOCK_Y, BLOCK_C), (1, 0))
    if MATERIALIZED:
        if TRANSPOSED:
            w_bp = tl.make_block_ptr(co_ptr, (N, N), (N, 1), (0, x0), (BLOCK_Y, BLOCK_X), (1, 0))
        else:
            w_bp = tl.make_block_ptr(co_ptr, (N, N), (N, 1), (x0, 0), (BLOCK_X, BLOCK_Y), (1, 0))
    else:
        rows_bp = tl.make_block_ptr(rows_ptr, (N, D), (stride_rn, 1), (x0, 0), (BLOCK_X, BLOCK_D), (1, 0))
        rows = tl.load(rows_bp, boundary_check=(0, 1), padding_option="zero")
        cols_bp = tl.make_block_ptr(cols_ptr, (N, D), (stride_cn, 1), (0, 0), (BLOCK_Y, BLOCK_D), (1, 0))
        if not TRANSPOSED:
            offs_x = x0 + tl.arange(0, BLOCK_X)
            lse_x = tl.load(lse_ptr + offs_x, mask=offs_x < N, other=0.0)
    for y0 in range(0, N, BLOCK_Y):
        xt = tl.load(x_bp, boundary_check=(0, 1), padding_option="zero")
        if MATERIALIZED:
            w = tl.load(w_bp, boundary_check=(0, 1), padding_option="zero")
            if TRANSPOSED:
                w = tl.trans(w)
                w_bp = tl.advance(w_bp, (BLOCK_Y, 0))
            else:
                w_bp = tl.advance(w_bp, (0, BLOCK_Y))
        else:
            cols = tl.load(cols_bp, boundary_check=(0, 1), padding_option="zero")
            s = dot(rows, tl.trans(cols), None, DOT_PRECISION) * qk_scale
            offs_y = y0 + tl.arange(0, BLOCK_Y)
            if TRANSPOSED:
                s = s - tl.load(lse_ptr + offs_y, mask=offs_y < N, other=0.0)[None, :]
            else:
                s = s - lse_x[:, None]
            w = tl.where((offs_y < N)[None, :], tl.exp2(s), 0.0)
            cols_bp = tl.advance(cols_bp, (BLOCK_Y, 0))
        acc = dot(w.to(dot_dtype), xt.to(dot_dtype), acc, DOT_PRECISION)
        x_bp = tl.advance(x_bp, (BLOCK_Y, 0))
    return acc


# --- kernels -----------------------------------------------------------------------------------------

@triton.jit
def _softmax_kernel(q_ptr, k_ptr, lse_ptr, co_ptr, N, D, qk_scale,
                    stride_qb, stride_qn, stride_kb, stride_kn,
                    COMPUTE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row log-sum-exp (log2 domain) of qk_scale·q kᵀ by an online pass over key blocks (COMPUTE_LSE), else
    read; with co_ptr, a second pass writes Co = 2^(s − lse). Grid (⌈N/BLOCK_X⌉, B)."""
    pid_x = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # batch offsets can pass 2**31 elements
    x0 = pid_x * BLOCK_X
    offs_x = x0 + tl.arange(0, BLOCK_X)
    mask_x = offs_x < N
    q_bp = tl.make_block_ptr(q_ptr + b * stride_qb, (N, D), (stride_qn, 1), (x0, 0), (BLOCK_X, BLOCK_D), (1, 0))
    qt = tl.load(q_bp, boundary_check=(0, 1), padding_option="zero")
    k_base = k_ptr + b * stride_kb
    lse_ptrs = lse_ptr + b * N + offs_x
    if COMPUTE_LSE:
        m = tl.full((BLOCK_X,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_X,), dtype=tl.float32)
        k_bp = tl.make_block_ptr(k_base, (N, D), (stride_kn, 1), (0, 0), (BLOCK_Y, BLOCK_D), (1, 0))
        for y0 in range(0, N, BLOCK_Y):
            kt = tl.load(k_bp, boundary_check=(0, 1), padding_option="zero")
            s = dot(qt, tl.trans(kt), None, DOT_PRECISION) * qk_scale
            s = tl.where((y0 + tl.arange(0, BLOCK_Y) < N)[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m = m_new
            k_bp = tl.advance(k_bp, (BLOCK_Y, 0))
        lse = m + tl.log2(l)
        tl.store(lse_ptrs, lse, mask=mask_x)
    else:
        lse = tl.load(lse_ptrs, mask=mask_x, other=0.0)
    if co_ptr is not None:
        k_bp = tl.make_block_ptr(k_base, (N, D), (stride_kn, 1), (0, 0), (BLOCK_Y, BLOCK_D), (1, 0))
        co_bp = tl.make_block_ptr(co_ptr + b * N * N, (N, N), (N, 1), (x0, 0), (BLOCK_X, BLOCK_Y), (1, 0))
        for y0 in range(0, N, BLOCK_Y):
            kt = tl.load(k_bp, boundary_check=(0, 1), padding_option="zero")
            s = dot(qt, tl.trans(kt), None, DOT_PRECISION) * qk_scale
            tl.store(co_bp, tl.exp2(s - lse[:, None]).to(co_ptr.dtype.element_ty), boundary_check=(0, 1))
            k_bp = tl.advance(k_bp, (BLOCK_Y, 0))
            co_bp = tl.advance(co_bp, (0, BLOCK_Y))


@triton.jit
def _step_kernel(co_ptr, q_ptr, k_ptr, lse_ptr, coef_ptr, x_ptr, out_ptr, p_ptr,
                 N, C, D, qk_scale,
                 stride_qb, stride_qn, stride_kb, stride_kn, stride_xb, stride_xn,
                 stride_ob, stride_on, stride_pb, stride_pn,
                 VARIANT: tl.constexpr, MATERIALIZED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """One forward step on a (BLOCK_X, BLOCK_C) tile: out = a·(Co X) + b·X (if out_ptr), and the product
    P = Co X itself (if p_ptr; the backward needs it). Grid (⌈N/BLOCK_X⌉, ⌈C/BLOCK_C⌉, B)."""
    x0 = tl.program_id(0) * BLOCK_X
    c0 = tl.program_id(1) * BLOCK_C
    b = tl.program_id(2).to(tl.int64)  # batch offsets can pass 2**31 elements
    co_b = co_ptr
    if MATERIALIZED:
        co_b = co_ptr + b * N * N
    x_b = x_ptr + b * stride_xb
    acc = _mix_tile(co_b, q_ptr + b * stride_qb, stride_qn, k_ptr + b * stride_kb, stride_kn, lse_ptr + b * N,
                    x_b, stride_xn, x0, c0, N, C, D, qk_scale,
                    MATERIALIZED, False, DOT_PRECISION, BLOCK_X, BLOCK_Y, BLOCK_C, BLOCK_D)
    if p_ptr is not None:
        p_bp = tl.make_block_ptr(p_ptr + b * stride_pb, (N, C), (stride_pn, 1), (x0, c0), (BLOCK_X, BLOCK_C), (1, 0))
        tl.store(p_bp, acc.to(p_ptr.dtype.element_ty), boundary_check=(0, 1))
    if out_ptr is not None:
        res = tl.load(coef_ptr) * acc
        if VARIANT != 0:
            xr_bp = tl.make_block_ptr(x_b, (N, C), (stride_xn, 1), (x0, c0), (BLOCK_X, BLOCK_C), (1, 0))
            xr = tl.load(xr_bp, boundary_check=(0, 1), padding_option="zero")
            res += tl.load(coef_ptr + 1) * xr.to(tl.float32)
        o_bp = tl.make_block_ptr(out_ptr + b * stride_ob, (N, C), (stride_on, 1), (x0, c0), (BLOCK_X, BLOCK_C), (1, 0))
        tl.store(o_bp, res.to(out_ptr.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _adjoint_step_kernel(co_ptr, q_ptr, k_ptr, lse_ptr, coef_ptr, g_ptr, out_ptr, p_ptr, v_ptr, r_ptr, da_ptr,
                         N, C, D, qk_scale,
                         stride_qb, stride_qn, stride_kb, stride_kn, stride_gb, stride_gn,
                         stride_ob, stride_on, stride_pb, stride_pn, stride_vb, stride_vn,
                         VARIANT: tl.constexpr, MATERIALIZED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """One adjoint step on a (BLOCK_X, BLOCK_C) tile: Gᵗ = a·Coᵀ Gᵗ⁺¹ + b·Gᵗ⁺¹, and in the epilogue the
    partial sums r[b, c-block, x] += Σ_c Gᵗ⁺¹·Pᵗ and (variants B, C; float64) dα[b, c-block, x-block] +=
    Σ Gᵗ⁺¹·Pᵗ (B) or Σ Gᵗ⁺¹·(Pᵗ − Vᵗ) (C). Each program owns its partial-sum slots (deterministic, no atomics).
    Grid (⌈N/BLOCK_X⌉, ⌈C/BLOCK_C⌉, B)."""
    pid_x = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # batch offsets can pass 2**31 elements
    x0 = pid_x * BLOCK_X
    c0 = pid_c * BLOCK_C
    co_b = co_ptr
    if MATERIALIZED:
        co_b = co_ptr + b * N * N
    g_b = g_ptr + b * stride_gb
    acc = _mix_tile(co_b, k_ptr + b * stride_kb, stride_kn, q_ptr + b * stride_qb, stride_qn, lse_ptr + b * N,
                    g_b, stride_gn, x0, c0, N, C, D, qk_scale,
                    MATERIALIZED, True, DOT_PRECISION, BLOCK_X, BLOCK_Y, BLOCK_C, BLOCK_D)
    g_bp = tl.make_block_ptr(g_b, (N, C), (stride_gn, 1), (x0, c0), (BLOCK_X, BLOCK_C), (1, 0))
    g = tl.load(g_bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    res = tl.load(coef_ptr) * acc
    if VARIANT != 0:
        res += tl.load(coef_ptr + 1) * g
    o_bp = tl.make_block_ptr(out_ptr + b * stride_ob, (N, C), (stride_on, 1), (x0, c0), (BLOCK_X, BLOCK_C), (1, 0))
    tl.store(o_bp, res.to(out_ptr.dtype.element_ty), boundary_check=(0, 1))
    p_bp = tl.make_block_ptr(p_ptr + b * stride_pb, (N, C), (stride_pn, 1), (x0, c0), (BLOCK_X, BLOCK_C), (1, 0))
    gp_rows = tl.sum(g * tl.load(p_bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32), 1)
    offs_x = x0 + tl.arange(0, BLOCK_X)
    r_ptrs = r_ptr + (b * tl.num_programs(1) + pid_c) * N + offs_x
    tl.store(r_ptrs, tl.load(r_ptrs, mask=offs_x < N, other=0.0) + gp_rows, mask=offs_x < N)
    if VARIANT != 0:
        # float64 from the row sums on: the partials of different tiles can be far larger than their total
        # (every step adds the same value per batch entry, of either sign) and grow over n steps
        d = tl.sum(gp_rows.to(tl.float64), 0)
        if VARIANT == 2:
            v_bp = tl.make_block_ptr(v_ptr + b * stride_vb, (N, C), (stride_vn, 1), (x0, c0), (BLOCK_X, BLOCK_C),
                                     (1, 0))
            gv = g * tl.load(v_bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
            d -= tl.sum(tl.sum(gv, 1).to(tl.float64), 0)
        da_ptrs = da_ptr + (b * tl.num_programs(1) + pid_c) * tl.num_programs(0) + pid_x
        tl.store(da_ptrs, tl.load(da_ptrs) + d)


@triton.jit
def _dqdk_kernel(co_ptr, q_ptr, k_ptr, lse_ptr, coef_ptr, g_ptr, v_ptr, r_ptr, dq_ptr, dk_ptr,
                 N, D, KC, qk_scale, scale,
                 stride_qb, stride_qn, stride_kb, stride_kn, stride_gb, stride_gn, stride_vb, stride_vn,
                 MATERIALIZED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Softmax backward of one segment of steps, flash-style, for key block y:
        dCo[x, y] = a·Σ_κ Gcat[x, κ]·Vcat[y, κ]   (κ over the KC = steps·C concatenated channels)
        dS = Co ⊙ (dCo − a·r[x]),  dk[y] += scale·dSᵀ q (registers, then added to the fp32 buffer),
        dq[x] += scale·dS k (fp32 atomics).
    Co tiles are loaded (MATERIALIZED) or re-formed from q, k, lse. Grid (⌈N/BLOCK_Y⌉, B)."""
    y0 = tl.program_id(0) * BLOCK_Y
    b = tl.program_id(1).to(tl.int64)  # batch offsets can pass 2**31 elements
    offs_y = y0 + tl.arange(0, BLOCK_Y)
    mask_y = offs_y < N
    offs_d = tl.arange(0, BLOCK_D)
    k_bp = tl.make_block_ptr(k_ptr + b * stride_kb, (N, D), (stride_kn, 1), (y0, 0), (BLOCK_Y, BLOCK_D), (1, 0))
    kt = tl.load(k_bp, boundary_check=(0, 1), padding_option="zero")
    ds_scale = tl.load(coef_ptr) * scale
    dk_acc = tl.zeros((BLOCK_Y, BLOCK_D), dtype=tl.float32)
    q_bp = tl.make_block_ptr(q_ptr + b * stride_qb, (N, D), (stride_qn, 1), (0, 0), (BLOCK_X, BLOCK_D), (1, 0))
    g_b = g_ptr + b * stride_gb
    v_b = v_ptr + b * stride_vb
    if MATERIALIZED:
        co_bp = tl.make_block_ptr(co_ptr + b * N * N, (N, N), (N, 1), (0, y0), (BLOCK_X, BLOCK_Y), (1, 0))
    for x0 in range(0, N, BLOCK_X):
        offs_x = x0 + tl.arange(0, BLOCK_X)
        mask_x = offs_x < N
        qt = tl.load(q_bp, boundary_check=(0, 1), padding_option="zero")
        if MATERIALIZED:
            p = tl.load(co_bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
            co_bp = tl.advance(co_bp, (BLOCK_X, 0))
        else:
            s = dot(qt, tl.trans(kt), None, DOT_PRECISION) * qk_scale
            lse_x = tl.load(lse_ptr + b * N + offs_x, mask=mask_x, other=0.0)
            p = tl.where(mask_x[:, None] & mask_y[None, :], tl.exp2(s - lse_x[:, None]), 0.0)
        dp = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
        g_bp = tl.make_block_ptr(g_b, (N, KC), (stride_gn, 1), (x0, 0), (BLOCK_X, BLOCK_K), (1, 0))
        v_bp = tl.make_block_ptr(v_b, (N, KC), (stride_vn, 1), (y0, 0), (BLOCK_Y, BLOCK_K), (1, 0))
        for c0 in range(0, KC, BLOCK_K):
            gt = tl.load(g_bp, boundary_check=(0, 1), padding_option="zero")
            vt = tl.load(v_bp, boundary_check=(0, 1), padding_option="zero")
            dp = dot(gt.to(qt.dtype), tl.trans(vt.to(qt.dtype)), dp, DOT_PRECISION)
            g_bp = tl.advance(g_bp, (0, BLOCK_K))
            v_bp = tl.advance(v_bp, (0, BLOCK_K))
        r = tl.load(r_ptr + b * N + offs_x, mask=mask_x, other=0.0)
        ds = p * (dp - r[:, None]) * ds_scale
        dk_acc = dot(tl.trans(ds.to(qt.dtype)), qt, dk_acc, DOT_PRECISION)
        dq_part = dot(ds.to(kt.dtype), kt, None, DOT_PRECISION)
        tl.atomic_add(dq_ptr + (b * N + offs_x[:, None]) * D + offs_d[None, :], dq_part,
                      mask=mask_x[:, None] & (offs_d < D)[None, :])
        q_bp = tl.advance(q_bp, (BLOCK_X, 0))
    dk_bp = tl.make_block_ptr(dk_ptr + b * N * D, (N, D), (D, 1), (y0, 0), (BLOCK_Y, BLOCK_D), (1, 0))
    tl.store(dk_bp, tl.load(dk_bp, boundary_check=(0, 1), padding_option="zero") + dk_acc, boundary_check=(0, 1))


# --- launchers ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Problem:
    """Sizes, scalars and tile sizes shared by every launch of one call."""

    B: int
    N: int
    D: int
    C: int
    qk_scale: float  # scale·log2(e): the kernels work in the log2 domain
    variant: int
    materialized: bool
    dot_precision: str
    cfg: LaunchConfig
    block_x: int
    block_y: int
    block_c: int
    block_d: int

    @classmethod
    def of(cls, q, v, scale, variant, materialized):
        B, N, D = q.shape
        C = v.shape[-1]
        if D > MAX_HEAD_DIM:
            raise ValueError(f"q: width D={D} exceeds the Triton kernels' limit of {MAX_HEAD_DIM}")
        block_d = _block(D, MAX_HEAD_DIM)
        cfg = fit_rows(default_config(q.device), q.element_size(), block_d, device_shared_bytes(q.device))
        return cls(B, N, D, C, scale * LOG2E, VARIANT_IDS[variant], materialized, dot_precision(q.dtype), cfg,
                   _block(N, cfg.block_x), _block(N, cfg.block_y), _block(C, cfg.block_c), block_d)

    def step_grid(self):
        return (triton.cdiv(self.N, self.block_x), triton.cdiv(self.C, self.block_c), self.B)

    def launch_opts(self):
        return dict(num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)


def _coefficients(alpha: torch.Tensor, variant: str) -> torch.Tensor:
    """[a, b] of Vᵗ⁺¹ = a·Co Vᵗ + b·Vᵗ as a float32 device tensor (read by the kernels: no host sync)."""
    al = alpha.detach().to(torch.float32).reshape(1)
    one = torch.ones_like(al)
    if variant == "A":
        return torch.cat([one, torch.zeros_like(al)])
    return torch.cat([al, one if variant == "B" else one - al])


def _softmax(pb: _Problem, q, k, lse, co, compute_lse: bool) -> None:
    _softmax_kernel[(triton.cdiv(pb.N, pb.block_x), pb.B)](
        q, k, lse, co, pb.N, pb.D, pb.qk_scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        COMPUTE_LSE=compute_lse, DOT_PRECISION=pb.dot_precision,
        BLOCK_X=pb.block_x, BLOCK_Y=pb.block_y, BLOCK_D=pb.block_d, **pb.launch_opts())


def _step(pb: _Problem, co, q, k, lse, coefs, x, out, p) -> None:
    """out = a·Co x + b·x and/or p = Co x (either may be None)."""
    ob = out if out is not None else x  # strides only
    pr = p if p is not None else x
    _step_kernel[pb.step_grid()](
        co, q, k, lse, coefs, x, out, p, pb.N, pb.C, pb.D, pb.qk_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), x.stride(0), x.stride(1),
        ob.stride(0), ob.stride(1), pr.stride(0), pr.stride(1),
        VARIANT=pb.variant, MATERIALIZED=pb.materialized, DOT_PRECISION=pb.dot_precision,
        BLOCK_X=pb.block_x, BLOCK_Y=pb.block_y, BLOCK_C=pb.block_c, BLOCK_D=pb.block_d, **pb.launch_opts())


def _adjoint_step(pb: _Problem, co, q, k, lse, coefs, g, out, p, v, r_part, da_part) -> None:
    _adjoint_step_kernel[pb.step_grid()](
        co, q, k, lse, coefs, g, out, p, v, r_part, da_part, pb.N, pb.C, pb.D, pb.qk_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), g.stride(0), g.stride(1),
        out.stride(0), out.stride(1), p.stride(0), p.stride(1), v.stride(0), v.stride(1),
        VARIANT=pb.variant, MATERIALIZED=pb.materialized, DOT_PRECISION=pb.dot_precision,
        BLOCK_X=pb.block_x, BLOCK_Y=pb.block_y, BLOCK_C=pb.block_c, BLOCK_D=pb.block_d, **pb.launch_opts())


def _dqdk(pb: _Problem, co, q, k, lse, coefs, gcat, vcat, r, dq, dk, scale: float) -> None:
    kc = gcat.shape[-1]
    _dqdk_kernel[(triton.cdiv(pb.N, pb.block_y), pb.B)](
        co, q, k, lse, coefs, gcat, vcat, r, dq, dk, pb.N, pb.D, kc, pb.qk_scale, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), gcat.stride(0), gcat.stride(1),
        vcat.stride(0), vcat.stride(1),
        MATERIALIZED=pb.materialized, DOT_PRECISION=pb.dot_precision,
        BLOCK_X=pb.block_x, BLOCK_Y=pb.block_y, BLOCK_K=_block(kc, pb.cfg.block_k), BLOCK_D=pb.block_d,
        **pb.launch_opts())


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, n_iter: int, scale: float,
            variant: str, materialize: bool):
    """Vⁿ, plus what the backward needs: lse (B, N) float32 (log2 domain) and the checkpoints
    (num_checkpoints(n_iter), B, N, C) holding V^L, V^2L, …"""
    with _on_device(q):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        coefs = _coefficients(alpha, variant)
        pb = _Problem.of(q, v, scale, variant, materialize)
        seg = segment_length(n_iter)
        lse = empty((pb.B, pb.N), dtype=torch.float32, device=q.device)
        co = empty((pb.B, pb.N, pb.N), dtype=v.dtype, device=q.device) if materialize else None
        _softmax(pb, q, k, lse, co, compute_lse=True)
        ckpt = empty((num_checkpoints(n_iter), pb.B, pb.N, pb.C), dtype=v.dtype, device=v.device)
        out = empty_like(v)
        scratch = [empty(v.shape, dtype=torch.float32, device=v.device) for _ in range(2 if n_iter > 1 else 0)]
        src = v
        for t in range(n_iter):
            if t + 1 == n_iter:
                dst = out
            elif (t + 1) % seg == 0:
                dst = ckpt[(t + 1) // seg - 1]
            else:
                dst = scratch[t % 2]  # never src: src is v, a checkpoint or the other scratch buffer
            _step(pb, co, q, k, lse, coefs, src, dst, None)
            src = dst
        return out, lse, ckpt


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
             lse: torch.Tensor, ckpt: torch.Tensor, n_iter: int, scale: float, variant: str, materialize: bool):
    """(dq, dk, dv, dalpha) by the adjoint recursion, segment by segment from the last one (module docstring).

    Per segment [s, e): replay the steps from the checkpoint Vˢ into Vbuf (Vˢ…Vᵉ⁻¹) and Pbuf (Pˢ…Pᵉ⁻¹);
    run the adjoint steps t = e−1…s into Gbuf, whose slot j holds Gˢ⁺ʲ (slot e−s is Gᵉ on entry, slot 0 is
    Gˢ on exit); then one dq/dk pass over the concatenated slots. dalpha for variant A is zero (unused)."""
    with _on_device(q):
        q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
        coefs = _coefficients(alpha, variant)
        pb = _Problem.of(q, v, scale, variant, materialize)
        B, N, D, C = pb.B, pb.N, pb.D, pb.C
        seg = segment_length(n_iter)
        co = None
        if materialize:
            co = empty((B, N, N), dtype=v.dtype, device=v.device)
            _softmax(pb, q, k, lse, co, compute_lse=False)
        vbuf = empty((B, N, seg * C), dtype=torch.float32, device=v.device)
        pbuf = empty((B, N, seg * C), dtype=v.dtype, device=v.device)
        gbuf = empty((B, N, (seg + 1) * C), dtype=torch.float32, device=v.device)
        n_xblk, n_cblk = pb.step_grid()[:2]
        r_part = torch.empty((B, n_cblk, N), dtype=torch.float32, device=v.device)
        da_part = torch.zeros((B, n_cblk, n_xblk), dtype=torch.float64, device=v.device)
        dq_acc = torch.zeros((B, N, D), dtype=torch.float32, device=v.device)
        dk_acc = torch.zeros((B, N, D), dtype=torch.float32, device=v.device)

        def slot(buf, j):
            return buf[:, :, j * C:(j + 1) * C]

        starts = list(range(0, n_iter, seg))
        for s in reversed(starts):
            e = min(s + seg, n_iter)
            length = e - s
            slot(vbuf, 0).copy_(v if s == 0 else ckpt[s // seg - 1])
            for t in range(s, e):
                j = t - s
                _step(pb, co, q, k, lse, coefs, slot(vbuf, j), slot(vbuf, j + 1) if t + 1 < e else None,
                      slot(pbuf, j))
            slot(gbuf, length).copy_(grad_out if e == n_iter else slot(gbuf, 0))
            r_part.zero_()
            for t in reversed(range(s, e)):
                j = t - s
                _adjoint_step(pb, co, q, k, lse, coefs, slot(gbuf, j + 1), slot(gbuf, j), slot(pbuf, j),
                              slot(vbuf, j), r_part, da_part)
            _dqdk(pb, co, q, k, lse, coefs, gbuf[:, :, C:(length + 1) * C], vbuf[:, :, :length * C],
                  r_part.sum(1), dq_acc, dk_acc, scale)

        dq, dk, dv = empty_like(q), empty_like(k), empty_like(v)
        dq.copy_(dq_acc)
        dk.copy_(dk_acc)
        dv.copy_(slot(gbuf, 0))
        dalpha = da_part.sum().to(alpha.dtype)  # zero for variant A
        return dq, dk, dv, dalpha
