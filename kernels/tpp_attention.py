"""Triton kernels for ``tpp_attention`` (BridgeNet Task Pattern Propagation, DESIGN.md §3 op 2).

Inputs are viewed channel-major: q (B, C, Nq, D), k (B, C, Nk, D), v (B, C, Nk, Dv) with C = T·H and
channel c = t·H + h; the mixing matrix is W (C, C) with rows j = t·H + o (output map of task t, head o)
and columns c (input map). A shared (H, T·H) weight arrives expanded to (C, C) by the op wrapper, so
the kernels see one case. The bias never reaches the kernels: it is constant along the softmax axis.

    S_c = scale · q_c k_cᵀ                      C score tiles, computed ONCE per (query block, key block)
    Ā_j = Σ_c W[j, c] S_c                        mixed in registers, never stored
    O_j = softmax(Ā_j) v_j                       online softmax per output map j, logsumexp L_j saved

Backward (Δ_j = rowsum(dO_j ∘ O_j), P_j = exp(Ā_j − L_j)):

    dP_j = dO_j v_jᵀ,  dĀ_j = P_j ∘ (dP_j − Δ_j),  dv_j = P_jᵀ dO_j,
    dS_c = Σ_j W[j, c] dĀ_j   (mix back),  dq_c = scale · dS_c k_c,  dk_c = scale · dS_cᵀ q_c,
    dW[j, c] = Σ_{query, key} dĀ_j ∘ S_c   (per-program partial sums, reduced on the host: deterministic),
    computed as Σ (dĀ_j − r_j P_j) ∘ S_c with r_j = Σ_key dĀ_j per query: r is 0 in exact arithmetic, but Δ
    comes from the rounded 16-bit output, and where dW's terms nearly cancel the residue times the P-weighted
    mean score made float16 dW 1.7-2.8x PyTorch's own error (medians over perturbed inputs); corrected,
    0.3-0.4x. The q program sums r and Σ_key P ∘ S_c over its key loop and subtracts at the end.

Work per (query block, key block) tile: one batched dot (C_pad, rows, D) x (C_pad, D, cols) for the C
score tiles (the literal formula's QK FLOPs; the widened rewrite Σ_c W_c q_c k_cᵀ = [W_1 q_1|…][k_1|…]ᵀ
would cost C times more), the mixing in registers (:func:`_mix`: per output map a weighted sum over the
map axis, about 2·C² multiply-adds per score element; the same helper with the strides of W swapped mixes
the gradient back), one batched dot of width Dv for P·V.

Choices and their costs (block sizes are a :class:`Config`, pinned by the tests):

- Output widths are split over the grid when a whole row of every map does not fit the register budget
  (a program holds its output block for all T·H maps at once: T·H times a flash kernel's state): the
  forward uses ``block_dv`` columns of Dv per program, the backward ``block_dgrad`` columns of D (dq, dk)
  and of Dv (dv). A program that owns one chunk recomputes the score tiles. The reduction over D inside
  a dot is chunked by ``block_d`` (no extra work).
- Backward: one kernel per key block (dk, dv; loops over query blocks) and one per query block (dq and the
  dW partial sums, from the unmixed score tiles it keeps; loops over key blocks), both recomputing the
  tiles, as FlashAttention-2 does.
- Cost in units QK = 2·B·C·Nq·Nk·D and PV = 2·B·C·Nq·Nk·Dv (the literal forward is QK + PV), with
  f = ceil(Dv / block_dv), g = ceil(max(D, Dv) / block_dgrad), h = ceil(D / block_dgrad):
  forward f·QK + PV (the literal QK FLOPs when f = 1, the default up to Dv = 128 at T·H = 8; the widened
  rewrite costs C·QK + PV); backward (g + h)·(QK + PV) to recompute P and dP, plus PV + 2·QK for dv,
  dk and dq.
- Accumulation in float32; P and dĀ are rounded to the input dtype before the P·V, dS·k and dSᵀ·q dots
  (as in FlashAttention). Δ is computed with torch in float32. Dot precision as attention's
  (:func:`mtlfast.kernels.attention.dot_precision`): float32 inputs get exact dots unless PyTorch's float32
  matmul precision was lowered; Triton's own default on CUDA would be TF32, which truncates the operands
  (errors 1-3e-3 at the test shapes, simulated; the interpreter cannot show it).
- GPU rules: every dot dimension is a block size >= 16; T·H is padded to a power of two (masked).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import triton
import triton.language as tl

from mtlfast._alloc import empty
from mtlfast.kernels.attention import _on_device, dot, dot_precision

__all__ = ["Config", "default_config", "current_config", "use_config", "forward", "backward", "MAX_CHANNELS"]

#: T·H beyond this does not fit the per-program register tiles (C_pad x block_m x block_n, C_pad x C_pad).
MAX_CHANNELS = 16


@dataclass(frozen=True)
class Config:
    """Launch configuration. Every block size is a power of two >= 16 (tl.dot and tl.arange rules)."""

    block_m: int = 16      # query rows per program
    block_n: int = 32      # key rows per loop step
    block_d: int = 64      # chunk of the q·k reduction over D
    block_dv: int = 64     # output columns of Dv per forward program; chunk of the dO·vᵀ reduction
    block_dgrad: int = 64  # output columns per backward program: of D for dq and dk, of Dv for dv
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_d", "block_dv", "block_dgrad"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"Config.{name}: expected a power of two >= 16, got {value}")

    def as_list(self) -> list[int]:
        """The fields in order (the custom ops take a list; dataclasses.astuple/asdict deep-copy, which
        torch.compile 2.11 cannot trace)."""
        return [self.block_m, self.block_n, self.block_d, self.block_dv, self.block_dgrad, self.num_warps,
                self.num_stages]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


#: float32 elements of one program's output accumulators (C_pad x rows x columns) the defaults aim for.
_ACC_BUDGET = 16384


def default_config(channels: int, d: int, dv: int, element_size: int) -> Config:
    """A starting point for the GPU, NOT tuned by timing (no GPU measurement yet): the blocks for which
    ptxas (sm_90, bf16) reports no or few register spills for T·H in {1, ..., 16}: 16-row tiles and
    8 warps (larger tiles spilled even at T·H = 1 or 2), output column chunks up to the accumulator
    budget (the forward holds one accumulator, the dk/dv program two), at most 128 (forward) and 64
    (backward) columns. At BridgeNet's shape (T·H = 8, D = Dv = 288): 3 forward and 5 backward chunks.
    (Measured without the divisibility hints a launch adds; with them the backward kernels sit at 255
    registers with 200-408 B of stack.) Shared memory follows the tiles' bytes: with 16-bit inputs up to
    64 KB per block at T·H = 9..16; float32 inputs (``element_size`` 4) get half the accumulator columns and
    q·k chunk, the same bytes (with bfloat16's tiles float32 needed 128 KB, over the 99 KB of sm_86/89 GPUs)."""
    c_pad = _pow2(channels)
    block = 16
    budget = _ACC_BUDGET * 2 // element_size
    block_dv = max(16, min(_pow2(dv), budget // (c_pad * block), 128))
    block_dgrad = max(16, min(_pow2(max(d, dv)), budget // (2 * c_pad * block), 64))
    return Config(block, block, max(16, min(128 // element_size, _pow2(d))), block_dv, block_dgrad, 8, 2)


# A module global rather than a ContextVar: torch.compile traces reads of globals, not ContextVar.get.
_pinned: Config | None = None


@contextlib.contextmanager
def use_config(config: Config) -> Iterator[None]:
    """Pins the launch configuration of the tpp_attention kernels (tests, benchmarks) in this block
    (process-wide, not per thread)."""
    global _pinned
    previous, _pinned = _pinned, config
    try:
        yield
    finally:
        _pinned = previous


def current_config(channels: int, d: int, dv: int, element_size: int) -> Config:
    return _pinned or default_config(channels, d, dv, element_size)


# --- device helpers ----------------------------------------------------------------------------------

@triton.jit
def _load3(ptr, s0, s1, s2, o0, o1, o2, n0, n1, n2):
    """The (len o0, len o1, len o2) tile ptr[o0, o1, o2] with zeros outside (n0, n1, n2)."""
    return tl.load(ptr + o0[:, None, None] * s0 + o1[None, :, None] * s1 + o2[None, None, :] * s2,
                   mask=(o0[:, None, None] < n0) & (o1[None, :, None] < n1) & (o2[None, None, :] < n2),
                   other=0.0)


@triton.jit
def _batched_scores(a_ptr, a_sc, a_sn, a_sd, offs_a, n_a, b_ptr, b_sc, b_sn, b_sd, offs_b, n_b, width,
                    offs_c, C: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, C_PAD: tl.constexpr,
                    BLOCK_W: tl.constexpr, PRECISION: tl.constexpr):
    """Per channel c: a_c[offs_a] · b_c[offs_b]ᵀ over `width` columns -> (C_PAD, BA, BB) float32."""
    acc = tl.zeros((C_PAD, BA, BB), dtype=tl.float32)
    offs_w = tl.arange(0, BLOCK_W)
    for w0 in range(0, width, BLOCK_W):
        cols = w0 + offs_w
        a = _load3(a_ptr, a_sc, a_sn, a_sd, offs_c, offs_a, cols, C, n_a, width)
        bt = _load3(b_ptr, b_sc, b_sd, b_sn, offs_c, cols, offs_b, C, width, n_b)
        acc = dot(a, bt, acc, PRECISION)
    return acc


@triton.jit
def _mix(x, w_ptr, w_so, w_si, offs_c, C: tl.constexpr):
    """out[o] = Σ_i W[o, i] · x[i] for (C_PAD, R, S) float32 x, W read at w_ptr + o·w_so + i·w_si: the
    1×1 convolution across maps (w_so, w_si = row, column strides) and its transpose (swapped)."""
    out = tl.zeros(x.shape, dtype=tl.float32)
    for o in tl.static_range(C):
        w_o = tl.load(w_ptr + o * w_so + offs_c * w_si, mask=offs_c < C, other=0.0).to(tl.float32)
        out += tl.where(offs_c[:, None, None] == o, tl.sum(w_o[:, None, None] * x, 0)[None, :, :], 0.0)
    return out


# --- kernels -----------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(q, k, v, w, out, lse,
                sqb, sqc, sqn, sqd, skb, skc, skn, skd, svb, svc, svn, svd, swj, swc,
                sob, soc, son, sod, slb, slc, sln,
                Nq, Nk, D, Dv, scale,
                C: tl.constexpr, C_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, C_PAD)
    offs_dv = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q += pid_b * sqb
    k += pid_b * skb
    v += pid_b * svb

    m_i = tl.full((C_PAD, BLOCK_M), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((C_PAD, BLOCK_M), dtype=tl.float32)
    acc = tl.zeros((C_PAD, BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for n0 in range(0, Nk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _batched_scores(q, sqc, sqn, sqd, offs_m, Nq, k, skc, skn, skd, offs_n, Nk, D, offs_c,
                            C, BLOCK_M, BLOCK_N, C_PAD, BLOCK_D, PRECISION)
        s = _mix(s * scale, w, swj, swc, offs_c, C)
        s = tl.where((offs_n < Nk)[None, None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 2))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        vt = _load3(v, svc, svn, svd, offs_c, offs_n, offs_dv, C, Nk, Dv)
        acc = dot(p.to(vt.dtype), vt, acc * alpha[:, :, None], PRECISION)
        m_i = m_new

    acc = acc / l_i[:, :, None]
    out += pid_b * sob
    o_ptrs = out + offs_c[:, None, None] * soc + offs_m[None, :, None] * son + offs_dv[None, None, :] * sod
    o_mask = (offs_c[:, None, None] < C) & (offs_m[None, :, None] < Nq) & (offs_dv[None, None, :] < Dv)
    tl.store(o_ptrs, acc.to(out.dtype.element_ty), mask=o_mask)
    l_ptrs = lse + pid_b * slb + offs_c[:, None] * slc + offs_m[None, :] * sln
    tl.store(l_ptrs, m_i + tl.log(l_i), mask=(offs_c[:, None] < C) & (offs_m[None, :] < Nq) & (pid_v == 0))


@triton.jit
def _bwd_kv_kernel(q, k, v, w, do, lse, delta, dk, dv,
                   sqb, sqc, sqn, sqd, skb, skc, skn, skd, svb, svc, svn, svd, swj, swc,
                   sdb, sdc, sdn, sdd, slb, slc, sln,
                   Nq, Nk, D, Dv, scale,
                   C: tl.constexpr, C_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DG: tl.constexpr, PRECISION: tl.constexpr):
    """One key block: dk and dv, columns chunk pid_x of D and of Dv (a chunk past one of them is all
    masked), tiles transposed (keys x queries). dk/dv are contiguous (B, C, Nk, D/Dv); lse and delta
    share the (B, C, Nq) strides."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_x = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, C_PAD)
    offs_dk = pid_x * BLOCK_DG + tl.arange(0, BLOCK_DG)
    offs_dv = pid_x * BLOCK_DG + tl.arange(0, BLOCK_DG)
    q += pid_b * sqb
    k += pid_b * skb
    v += pid_b * svb
    do += pid_b * sdb
    lse += pid_b * slb
    delta += pid_b * slb

    dk_acc = tl.zeros((C_PAD, BLOCK_N, BLOCK_DG), dtype=tl.float32)
    dv_acc = tl.zeros((C_PAD, BLOCK_N, BLOCK_DG), dtype=tl.float32)
    for m0 in range(0, Nq, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_mask = (offs_c[:, None] < C) & (offs_m[None, :] < Nq)
        # rows outside (padded queries or maps) get L = +inf, hence P = 0
        lse_m = tl.load(lse + offs_c[:, None] * slc + offs_m[None, :] * sln, mask=row_mask, other=float("inf"))
        delta_m = tl.load(delta + offs_c[:, None] * slc + offs_m[None, :] * sln, mask=row_mask, other=0.0)
        st = _batched_scores(k, skc, skn, skd, offs_n, Nk, q, sqc, sqn, sqd, offs_m, Nq, D, offs_c,
                             C, BLOCK_N, BLOCK_M, C_PAD, BLOCK_D, PRECISION)
        st = _mix(st * scale, w, swj, swc, offs_c, C)
        st = tl.where((offs_n < Nk)[None, :, None], st, float("-inf"))
        pt = tl.exp(st - lse_m[:, None, :])                                     # (C_PAD, BLOCK_N, BLOCK_M)
        do_t = _load3(do, sdc, sdn, sdd, offs_c, offs_m, offs_dv, C, Nq, Dv)
        dv_acc = dot(pt.to(do_t.dtype), do_t, dv_acc, PRECISION)
        dpt = _batched_scores(v, svc, svn, svd, offs_n, Nk, do, sdc, sdn, sdd, offs_m, Nq, Dv, offs_c,
                              C, BLOCK_N, BLOCK_M, C_PAD, BLOCK_DV, PRECISION)
        dst = _mix(pt * (dpt - delta_m[:, None, :]), w, swc, swj, offs_c, C)   # mixed back to the C maps
        q_t = _load3(q, sqc, sqn, sqd, offs_c, offs_m, offs_dk, C, Nq, D)
        dk_acc = dot(dst.to(q_t.dtype), q_t, dk_acc, PRECISION)

    # dk, dv: contiguous (B, C, Nk, D) and (B, C, Nk, Dv)
    dk_ptrs = dk + pid_b * C * Nk * D + offs_c[:, None, None] * Nk * D + offs_n[None, :, None] * D \
        + offs_dk[None, None, :]
    dk_mask = (offs_c[:, None, None] < C) & (offs_n[None, :, None] < Nk) & (offs_dk[None, None, :] < D)
    tl.store(dk_ptrs, (dk_acc * scale).to(dk.dtype.element_ty), mask=dk_mask)
    dv_ptrs = dv + pid_b * C * Nk * Dv + offs_c[:, None, None] * Nk * Dv + offs_n[None, :, None] * Dv \
        + offs_dv[None, None, :]
    dv_mask = (offs_c[:, None, None] < C) & (offs_n[None, :, None] < Nk) & (offs_dv[None, None, :] < Dv)
    tl.store(dv_ptrs, dv_acc.to(dv.dtype.element_ty), mask=dv_mask)


@triton.jit
def _bwd_q_kernel(q, k, v, w, do, lse, delta, dq, dw_part,
                  sqb, sqc, sqn, sqd, skb, skc, skn, skd, svb, svc, svn, svd, swj, swc,
                  sdb, sdc, sdn, sdd, slb, slc, sln,
                  Nq, Nk, D, Dv, scale,
                  C: tl.constexpr, C_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DG: tl.constexpr, PRECISION: tl.constexpr):
    """One query block: dq (columns chunk pid_x of D); programs with pid_x == 0 also write this block's
    dW partial sum to dw_part (B, cdiv(Nq, BLOCK_M), C, C). dq is contiguous (B, C, Nq, D)."""
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_x = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, C_PAD)
    offs_dq = pid_x * BLOCK_DG + tl.arange(0, BLOCK_DG)
    q += pid_b * sqb
    k += pid_b * skb
    v += pid_b * svb
    do += pid_b * sdb

    row_mask = (offs_c[:, None] < C) & (offs_m[None, :] < Nq)
    row_offs = pid_b * slb + offs_c[:, None] * slc + offs_m[None, :] * sln
    lse_m = tl.load(lse + row_offs, mask=row_mask, other=float("inf"))
    delta_m = tl.load(delta + row_offs, mask=row_mask, other=0.0)
    dq_acc = tl.zeros((C_PAD, BLOCK_M, BLOCK_DG), dtype=tl.float32)
    dw_acc = tl.zeros((C_PAD, C_PAD), dtype=tl.float32)
    # for dW's residue correction: per output row, Σ_j dĀ (0 but for the rounding of Δ) and Σ_j P A_c
    ds_sum = tl.zeros((C_PAD, BLOCK_M), dtype=tl.float32)
    pa_sum = tl.zeros((C_PAD, BLOCK_M, C_PAD), dtype=tl.float32)
    for n0 in range(0, Nk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        a = _batched_scores(q, sqc, sqn, sqd, offs_m, Nq, k, skc, skn, skd, offs_n, Nk, D, offs_c,
                            C, BLOCK_M, BLOCK_N, C_PAD, BLOCK_D, PRECISION) * scale
        s = tl.where((offs_n < Nk)[None, None, :], _mix(a, w, swj, swc, offs_c, C), float("-inf"))
        p = tl.exp(s - lse_m[:, :, None])                                       # (C_PAD, BLOCK_M, BLOCK_N)
        dp = _batched_scores(do, sdc, sdn, sdd, offs_m, Nq, v, svc, svn, svd, offs_n, Nk, Dv, offs_c,
                             C, BLOCK_M, BLOCK_N, C_PAD, BLOCK_DV, PRECISION)
        ds = p * (dp - delta_m[:, :, None])
        k_t = _load3(k, skc, skn, skd, offs_c, offs_n, offs_dq, C, Nk, D)
        dq_acc = dot(_mix(ds, w, swc, swj, offs_c, C).to(k_t.dtype), k_t, dq_acc,  # mixed back to the C maps
                     PRECISION)
        if pid_x == 0:  # dW[:, c] += Σ dĀ_j ∘ A_c
            ds_sum += tl.sum(ds, 2)
            for c in tl.static_range(C):
                a_c = tl.sum(tl.where(offs_c[:, None, None] == c, a, 0.0), 0)
                dw_c = tl.sum(tl.sum(ds * a_c[None, :, :], 2), 1)
                dw_acc += tl.where(offs_c[None, :] == c, dw_c[:, None], 0.0)
                pa_c = tl.sum(p * a_c[None, :, :], 2)
                pa_sum += tl.where(offs_c[None, None, :] == c, pa_c[:, :, None], 0.0)
    # Δ comes from the rounded output, so each row's dĀ sums to a residue r instead of 0; dW takes the dĀ
    # made consistent, dĀ − r P (an exact rewrite: r = 0 in exact arithmetic): dW −= Σ_rows r Σ_j P A_c
    dw_acc -= tl.sum(ds_sum[:, :, None] * pa_sum, 1)

    dq_ptrs = dq + pid_b * C * Nq * D + offs_c[:, None, None] * Nq * D + offs_m[None, :, None] * D \
        + offs_dq[None, None, :]
    dq_mask = (offs_c[:, None, None] < C) & (offs_m[None, :, None] < Nq) & (offs_dq[None, None, :] < D)
    tl.store(dq_ptrs, (dq_acc * scale).to(dq.dtype.element_ty), mask=dq_mask)
    dw_ptrs = dw_part + (pid_b * tl.num_programs(0) + pid_m) * C * C + offs_c[:, None] * C + offs_c[None, :]
    tl.store(dw_ptrs, dw_acc, mask=(offs_c[:, None] < C) & (offs_c[None, :] < C) & (pid_x == 0))


# --- launchers ---------------------------------------------------------------------------------------

def _channels(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, N, W) -> (B, T·H, N, W), a view whenever the strides allow."""
    return x.flatten(1, 2)


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, scale: float,
            config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, T, H, Nq, Dv) in q's dtype and the logsumexp (B, T·H, Nq) float32 of every mixed row.

    q (B, T, H, Nq, D), k (B, T, H, Nk, D), v (B, T, H, Nk, Dv), w (T·H, T·H) with rows t·H + o."""
    B, T, H, Nq, D = q.shape
    Nk, Dv, C = k.shape[3], v.shape[4], T * H
    q4, k4, v4 = _channels(q), _channels(k), _channels(v)
    out = empty((B, T, H, Nq, Dv), dtype=q.dtype, device=q.device)
    lse = empty((B, C, Nq), dtype=torch.float32, device=q.device)
    cfg = config
    grid = (triton.cdiv(Nq, cfg.block_m), B, triton.cdiv(Dv, cfg.block_dv))
    with _on_device(q):
        _fwd_kernel[grid](q4, k4, v4, w, out, lse, *_strides(q4, k4, v4, w, out.flatten(1, 2), lse),
                          Nq, Nk, D, Dv, scale, C=C, C_PAD=_pow2(C), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          BLOCK_D=cfg.block_d, BLOCK_DV=cfg.block_dv, PRECISION=dot_precision(q.dtype),
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, scale: float, config: Config):
    """(dq, dk, dv, dw) for the forward above; dw (T·H, T·H) float32 summed over every query block."""
    B, T, H, Nq, D = q.shape
    Nk, Dv, C = k.shape[3], v.shape[4], T * H
    cfg = config
    q4, k4, v4, do4 = _channels(q), _channels(k), _channels(v), _channels(do)
    delta = (do.to(torch.float32) * out.to(torch.float32)).sum(-1).reshape(B, C, Nq)  # Δ_j = rowsum(dO∘O)
    lse = lse.contiguous()
    dq = empty((B, T, H, Nq, D), dtype=q.dtype, device=q.device)
    dk = empty((B, T, H, Nk, D), dtype=k.dtype, device=k.device)
    dv = empty((B, T, H, Nk, Dv), dtype=v.dtype, device=v.device)
    m_blocks = triton.cdiv(Nq, cfg.block_m)
    dw_part = empty((B, m_blocks, C, C), dtype=torch.float32, device=q.device)
    common = dict(C=C, C_PAD=_pow2(C), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                  BLOCK_DV=cfg.block_dv, BLOCK_DG=cfg.block_dgrad, PRECISION=dot_precision(q.dtype),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    strides = _strides(q4, k4, v4, w, do4, lse)
    kv_chunks = triton.cdiv(max(D, Dv), cfg.block_dgrad)
    with _on_device(q):
        _bwd_kv_kernel[(triton.cdiv(Nk, cfg.block_n), B, kv_chunks)](
            q4, k4, v4, w, do4, lse, delta, dk, dv, *strides, Nq, Nk, D, Dv, scale, **common)
        _bwd_q_kernel[(m_blocks, B, triton.cdiv(D, cfg.block_dgrad))](
            q4, k4, v4, w, do4, lse, delta, dq, dw_part, *strides, Nq, Nk, D, Dv, scale, **common)
    return dq, dk, dv, dw_part.sum((0, 1))
