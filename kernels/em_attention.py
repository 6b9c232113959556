"""Triton kernels of ``em_attention`` (DESIGN.md §3 op 5; SEM eq. 8-9, the EMANet iteration).

Notation per batch element: x (N, C); bases mu_r (K, C), r = 0..R (R = n_iter); tau; eps.

Forward, per iteration r = 1..R, one pass over x and one small kernel:

- ``_em_accumulate_kernel``, grid (B, P): each program walks ``tiles_per_prog`` tiles of BLOCK_N tokens.
  Per tile it forms the logits S = x mu_{r-1}ᵀ / tau over C chunks, the softmax z over K in registers,
  and accumulates the column sums Σ_N z and the partial bases zᵀ x (K x C) into its own slab of
  ``part`` (B, P, K, C) (float32, program-private, loaded, added and stored back per tile: small enough to
  be expected to stay in L2). z is never written to memory.
- ``_em_mstep_kernel``, grid (B, K / ROWS): sums the P partials, divides by (eps + Σ_N z), and l2-normalises
  each row: mu_r = m_r / (eps + ‖m_r‖) with m_r = zn_rᵀ x. mu_r goes to ``bases[:, r]`` (float32) and
  s_r = Σ_N z_r, n_r = ‖m_r‖ to ``stats[:, r-1]`` for the backward.

Then ``_em_output_kernel`` (one pass): z = softmax(x mu_eᵀ / tau) is written (the op returns it) and
x_rec = z mu_R. mu_e = mu_{R-1} (the last E step's z) or, with detach_iterations, mu_R (the extra E step).
So a call reads x R + 1 times.

Backward (full unrolled; nothing per-iteration of size N x K is saved: z_r is recomputed from x and the
saved mu_{r-1}). With G = ∂L/∂x_rec, Gz = ∂L/∂z, Gmu = ∂L/∂mu_out:

- dmu_R = Gmu + z_Rᵀ G (``_em_accumulate_kernel`` with G in place of x: one pass).
- For r = R..1, the M-step adjoint on K x C quantities (``_em_mstep_backward_kernel``), with u = mu_r,
  n = n_r, s = s_r, m = u (eps + n):
      dm = dmu_r / (eps + n) − u (dmu_r·u) / n              (l2normalize adjoint)
      a  = dm / (eps + s),   w = (dm·m) / (eps + s)         (column-sum normaliser adjoint)
  where w uses Σ_n z_nk (x_n·dm_k) = dm_k·(zᵀx)_k = dm_k·m_k (eps + s_k), so it needs no pass over x.
  Then one pass (``_em_backward_kernel``) recomputes z_r and forms
      dz = x aᵀ − w  (+ Gz + G mu_Rᵀ at r = R),   dS = z ⊙ (dz − Σ_K z ⊙ dz)
      dx += z a + dS mu_{r-1} / tau,                dmu_{r-1} = dSᵀ x / tau  (partials, reduced next).
  So the full backward reads x R + 1 times (G twice, Gz once) and reads/writes a float32 dx accumulator.
- detach_iterations=True: one pass, dz = Gz + G mu_Rᵀ, dx = dS mu_R / tau; no gradient to mu.

Dots run on the input dtype (float16/bfloat16 operands, float32 accumulation); float32 inputs follow
PyTorch's float32 matmul precision like every mtlfast kernel (exact by default, TF32 when lowered; see
:func:`mtlfast.kernels.attention.dot_precision`). Softmax, sums, the bases and all partials are float32.
GPU rules: every tl.dot dimension is >= 16 (K is padded to BLOCK_K >= 16 and masked, so K = 1 works), all
aranges are powers of two, odd N and C are masked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mtlfast._alloc import empty
from mtlfast.kernels.attention import _on_device, dot, dot_precision

#: Largest K the kernels take: the (BLOCK_N, BLOCK_K) logits tile lives in registers.
MAX_K = 256


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int  # tokens per tile of the output and backward passes
    block_n_em: int  # tokens per tile of the E+M accumulation passes (fewer live tiles: can be larger)
    block_c: int  # channels per chunk of a dot
    max_programs: int  # programs per batch element of the accumulating passes (P <= this)
    rows: int  # bases rows per program of the small M-step kernels
    num_warps: int
    num_stages: int = 2


def launch_config(B: int, N: int, K: int, C: int, device: torch.device, dtype: torch.dtype) -> LaunchConfig:
    """The one launch configuration for these sizes (no autotuning; tests replace this function): on a GPU
    :func:`gpu_config`, under the interpreter few, large programs."""
    if device.type != "cuda":
        return LaunchConfig(block_n=64, block_n_em=64, block_c=max(16, min(32, triton.next_power_of_2(C))),
                            max_programs=2, rows=max(16, triton.next_power_of_2(K)), num_warps=4)
    return gpu_config(B, K, C, dtype, torch.cuda.get_device_properties(device).multi_processor_count)


def gpu_config(B: int, K: int, C: int, dtype: torch.dtype, sms: int) -> LaunchConfig:
    """8 warps, 2 stages, channel chunks of 32; token tiles of 64 (K <= 64), 32 (K <= 128), 16 (K <= 256),
    halved for float32 (at least 16), and twice that in the E+M accumulation passes for K <= 128 (each tile
    reads and writes its program's K x C partial slab, so larger tiles mean less of that L2 traffic per
    token). Measured with ``ptxas -v`` for sm_90a (triton 3.6; not yet run on a GPU): in bfloat16 no
    register spills for K <= 64 and at most 64 bytes at K = 128 (at 4 warps or 3 stages the K = 64 backward
    spilled 0.8-2.4 KB, hence 8 warps, 2 stages); in float32 at most 100 bytes for K <= 128; K = 256 spills
    up to about 1 KB (compiled without the divisibility hints a launch adds; with them, at K = 1 and 64:
    bfloat16 without stack, float32 at most 16 B, at most 45 KB of shared memory). One program per SM in
    all (P = SMs / B per batch element), each walking its share of the token tiles. At K > 128 channel chunks
    of 16: with 32 the backward pass needed 98 KB (bfloat16) and 100 KB (float32) of shared memory per block
    (sm_86 and sm_90), over the 99 KB of sm_86/89 GPUs; with 16 at most 65 KB."""
    block_k = max(16, triton.next_power_of_2(K))
    block_n = max(16, 64 * 64 // max(block_k, 64) // (2 if dtype == torch.float32 else 1))
    return LaunchConfig(block_n=block_n, block_n_em=2 * block_n if block_k <= 128 else block_n,
                        block_c=max(16, min(32 if block_k <= 128 else 16, triton.next_power_of_2(C))),
                        max_programs=max(1, sms // B), rows=1, num_warps=8)


# --- shared pieces -------------------------------------------------------------------------------------

@triton.jit
def _scores(x_b, mu_b, a_b, g_b, mr_b, offs_n, n_mask, offs_k, k_mask, C,
            HAS_M: tl.constexpr, HAS_EXT: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Over C chunks: s = x muᵀ and, when asked, xa = x aᵀ (HAS_M) and gm = g mrᵀ (HAS_EXT); (BLOCK_N, BLOCK_K)."""
    s = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    xa = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    gm = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        nc = offs_n[:, None] * C + offs_c[None, :]
        nc_mask = n_mask[:, None] & c_mask[None, :]
        kc = offs_k[:, None] * C + offs_c[None, :]
        kc_mask = k_mask[:, None] & c_mask[None, :]
        xt = tl.load(x_b + nc, mask=nc_mask, other=0.0)
        mt = tl.load(mu_b + kc, mask=kc_mask, other=0.0).to(xt.dtype)
        s = dot(xt, tl.trans(mt), s, DOT_PRECISION)
        if HAS_M:
            at = tl.load(a_b + kc, mask=kc_mask, other=0.0).to(xt.dtype)
            xa = dot(xt, tl.trans(at), xa, DOT_PRECISION)
        if HAS_EXT:
            gt = tl.load(g_b + nc, mask=nc_mask, other=0.0)
            rt = tl.load(mr_b + kc, mask=kc_mask, other=0.0).to(gt.dtype)
            gm = dot(gt, tl.trans(rt), gm, DOT_PRECISION)
    return s, xa, gm


@triton.jit
def _softmax_k(s, n_mask, k_mask):
    """Row softmax over the valid K columns; rows past N are zero (they must not enter Σ_N z)."""
    s = tl.where(k_mask[None, :], s, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    z = e / tl.sum(e, axis=1)[:, None]
    return tl.where(n_mask[:, None], z, 0.0)


@triton.jit
def _accumulate_partial(part_b, lhs, v_b, offs_n, n_mask, offs_k, k_mask, C, add,
                        BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """part_b[K, C] = lhs (BLOCK_K, BLOCK_N) @ v[tile, :], added to the slab's content when ``add``."""
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        vt = tl.load(v_b + offs_n[:, None] * C + offs_c[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        pp = part_b + offs_k[:, None] * C + offs_c[None, :]
        p_mask = k_mask[:, None] & c_mask[None, :]
        prev = tl.load(pp, mask=p_mask & add, other=0.0)
        tl.store(pp, prev + dot(lhs.to(vt.dtype), vt, None, DOT_PRECISION), mask=p_mask)


# --- forward -------------------------------------------------------------------------------------------

@triton.jit
def _em_accumulate_kernel(x_ptr, mu_ptr, v_ptr, part_ptr, colsum_ptr, N, K, C, mu_stride_b, tiles_per_prog, scale,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """part[b, p] = Σ_tiles zᵀ v and colsum[b, p] = Σ_tiles Σ_N z, z = softmax(x muᵀ * scale) (v = x: E+M step)."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    x_b = x_ptr + b * N * C
    v_b = v_ptr + b * N * C
    mu_b = mu_ptr + b * mu_stride_b
    part_b = part_ptr + (b * P + p) * K * C
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    colsum = tl.zeros((BLOCK_K,), tl.float32)
    for t in range(tiles_per_prog):
        offs_n = (p * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        s, _, _ = _scores(x_b, mu_b, mu_b, x_b, mu_b, offs_n, n_mask, offs_k, k_mask, C, False, False,
                          BLOCK_N, BLOCK_K, BLOCK_C, DOT_PRECISION)
        z = _softmax_k(s * scale, n_mask, k_mask)
        colsum += tl.sum(z, axis=0)
        _accumulate_partial(part_b, tl.trans(z), v_b, offs_n, n_mask, offs_k, k_mask, C, t > 0,
                            BLOCK_C, DOT_PRECISION)
        tl.debug_barrier()  # the slab is re-read next tile, possibly by other threads of this program
    tl.store(colsum_ptr + (b * P + p) * K + offs_k, colsum, mask=k_mask)


@triton.jit
def _em_mstep_kernel(part_ptr, colsum_ptr, mu_ptr, stats_ptr, P, K, C, mu_stride_b, stats_stride_b, eps,
                     ROWS: tl.constexpr, BLOCK_CR: tl.constexpr):
    """mu = l2normalize((Σ_p part) / (eps + Σ_p colsum)); stats = (Σ_N z, ‖m‖) per row."""
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    k_mask = offs_k < K
    offs_c = tl.arange(0, BLOCK_CR)
    kc = offs_k[:, None] * C + offs_c[None, :]
    kc_mask = k_mask[:, None] & (offs_c < C)[None, :]
    m = tl.zeros((ROWS, BLOCK_CR), tl.float32)
    s = tl.zeros((ROWS,), tl.float32)
    for p in range(P):
        m += tl.load(part_ptr + (b * P + p) * K * C + kc, mask=kc_mask, other=0.0)
        s += tl.load(colsum_ptr + (b * P + p) * K + offs_k, mask=k_mask, other=0.0)
    m = m / (eps + s)[:, None]
    n = tl.sqrt(tl.sum(m * m, axis=1))
    tl.store(mu_ptr + b * mu_stride_b + kc, m / (eps + n)[:, None], mask=kc_mask)
    tl.store(stats_ptr + b * stats_stride_b + offs_k, s, mask=k_mask)
    tl.store(stats_ptr + b * stats_stride_b + K + offs_k, n, mask=k_mask)


@triton.jit
def _em_output_kernel(x_ptr, mue_ptr, mur_ptr, xrec_ptr, z_ptr, N, K, C, mu_stride_b, scale,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """z = softmax(x mu_eᵀ * scale) (written) and x_rec = z mu_r; grid (token tiles, B)."""
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    x_b = x_ptr + b * N * C
    mur_b = mur_ptr + b * mu_stride_b
    s, _, _ = _scores(x_b, mue_ptr + b * mu_stride_b, x_b, x_b, x_b, offs_n, n_mask, offs_k, k_mask, C, False, False,
                      BLOCK_N, BLOCK_K, BLOCK_C, DOT_PRECISION)
    z = _softmax_k(s * scale, n_mask, k_mask)
    tl.store(z_ptr + (b * N + offs_n[:, None]) * K + offs_k[None, :], z.to(z_ptr.dtype.element_ty),
             mask=n_mask[:, None] & k_mask[None, :])
    zc = z.to(x_ptr.dtype.element_ty)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        mr = tl.load(mur_b + offs_k[:, None] * C + offs_c[None, :], mask=k_mask[:, None] & c_mask[None, :],
                     other=0.0).to(zc.dtype)
        out = dot(zc, mr, None, DOT_PRECISION)
        tl.store(xrec_ptr + (b * N + offs_n[:, None]) * C + offs_c[None, :], out.to(xrec_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & c_mask[None, :])


# --- backward ------------------------------------------------------------------------------------------

@triton.jit
def _em_mstep_backward_kernel(part_ptr, extra_ptr, mu_ptr, stats_ptr, a_ptr, w_ptr, dmu_ptr, P, K, C,
                              mu_stride_b, stats_stride_b, eps,
                              HAS_EXTRA: tl.constexpr, FINAL: tl.constexpr, ROWS: tl.constexpr,
                              BLOCK_CR: tl.constexpr):
    """dmu_r = Σ_p part (+ extra); FINAL: store it as the gradient of the input bases; else the M-step
    adjoint a = dm / (eps + s), w = (dm·m) / (eps + s) with dm the l2normalize adjoint (module docstring)."""
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    k_mask = offs_k < K
    offs_c = tl.arange(0, BLOCK_CR)
    kc = offs_k[:, None] * C + offs_c[None, :]
    kc_mask = k_mask[:, None] & (offs_c < C)[None, :]
    dmu = tl.zeros((ROWS, BLOCK_CR), tl.float32)
    for p in range(P):
        dmu += tl.load(part_ptr + (b * P + p) * K * C + kc, mask=kc_mask, other=0.0)
    if HAS_EXTRA:
        dmu += tl.load(extra_ptr + b * K * C + kc, mask=kc_mask, other=0.0).to(tl.float32)
    if FINAL:
        tl.store(dmu_ptr + b * K * C + kc, dmu.to(dmu_ptr.dtype.element_ty), mask=kc_mask)
    else:
        u = tl.load(mu_ptr + b * mu_stride_b + kc, mask=kc_mask, other=0.0)
        s = tl.load(stats_ptr + b * stats_stride_b + offs_k, mask=k_mask, other=1.0)
        n = tl.load(stats_ptr + b * stats_stride_b + K + offs_k, mask=k_mask, other=1.0)
        dm = dmu / (eps + n)[:, None] - u * (tl.sum(dmu * u, axis=1) / n)[:, None]
        tl.store(a_ptr + b * K * C + kc, dm / (eps + s)[:, None], mask=kc_mask)
        tl.store(w_ptr + b * K + offs_k, tl.sum(dm * u, axis=1) * (eps + n) / (eps + s), mask=k_mask)


@triton.jit
def _em_backward_kernel(x_ptr, mue_ptr, a_ptr, w_ptr, gx_ptr, gz_ptr, mur_ptr, dxin_ptr, dxout_ptr, part_ptr,
                        N, K, C, mu_stride_b, tiles_per_prog, scale,
                        HAS_M: tl.constexpr, HAS_EXT: tl.constexpr, ACCUM: tl.constexpr, NEED_DMU: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """One E step's adjoint (module docstring): dx (+)= z a + dS mu_e * scale; part[b, p] = Σ_tiles dSᵀ x * scale.

    HAS_M: the M step's a, w terms enter dz; HAS_EXT: Gz + G mu_rᵀ enter dz (the step whose z is the output);
    ACCUM: add dx_in (float32) to this step's dx; NEED_DMU: write the partials of dmu_e."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    x_b = x_ptr + b * N * C
    mue_b = mue_ptr + b * mu_stride_b
    a_b = a_ptr + b * K * C
    part_b = part_ptr + (b * P + p) * K * C
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    if HAS_M:
        w = tl.load(w_ptr + b * K + offs_k, mask=k_mask, other=0.0)
    for t in range(tiles_per_prog):
        offs_n = (p * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        s, xa, gm = _scores(x_b, mue_b, a_b, gx_ptr + b * N * C, mur_ptr + b * mu_stride_b, offs_n, n_mask,
                            offs_k, k_mask, C, HAS_M, HAS_EXT, BLOCK_N, BLOCK_K, BLOCK_C, DOT_PRECISION)
        z = _softmax_k(s * scale, n_mask, k_mask)
        dz = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        if HAS_M:
            dz = xa - w[None, :]
        if HAS_EXT:
            nk_mask = n_mask[:, None] & k_mask[None, :]
            dz += gm + tl.load(gz_ptr + (b * N + offs_n[:, None]) * K + offs_k[None, :], mask=nk_mask,
                               other=0.0).to(tl.float32)
        ds = z * (dz - tl.sum(z * dz, axis=1)[:, None])  # zero on padded rows and columns (z is)
        zc = z.to(x_ptr.dtype.element_ty)
        dsc = ds.to(x_ptr.dtype.element_ty)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_mask = offs_c < C
            kc = offs_k[:, None] * C + offs_c[None, :]
            kc_mask = k_mask[:, None] & c_mask[None, :]
            nc = (b * N + offs_n[:, None]) * C + offs_c[None, :]
            nc_mask = n_mask[:, None] & c_mask[None, :]
            me = tl.load(mue_b + kc, mask=kc_mask, other=0.0).to(dsc.dtype)
            dx = dot(dsc, me, None, DOT_PRECISION) * scale
            if HAS_M:
                at = tl.load(a_b + kc, mask=kc_mask, other=0.0).to(zc.dtype)
                dx = dot(zc, at, dx, DOT_PRECISION)
            if ACCUM:
                dx += tl.load(dxin_ptr + nc, mask=nc_mask, other=0.0)
            tl.store(dxout_ptr + nc, dx.to(dxout_ptr.dtype.element_ty), mask=nc_mask)
        if NEED_DMU:
            _accumulate_partial(part_b, tl.trans(ds * scale), x_b, offs_n, n_mask, offs_k, k_mask, C, t > 0,
                                BLOCK_C, DOT_PRECISION)
            tl.debug_barrier()


# --- launchers -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Split:
    """A pass over the token tiles of BLOCK_N tokens by P programs per batch element, tiles_per_prog each."""
    block_n: int
    tiles_per_prog: int
    programs: int  # P


def _split(N: int, block_n: int, max_programs: int) -> _Split:
    tiles = triton.cdiv(N, block_n)
    tiles_per_prog = triton.cdiv(tiles, min(tiles, max_programs))
    return _Split(block_n, tiles_per_prog, triton.cdiv(tiles, tiles_per_prog))


@dataclass(frozen=True)
class _Plan:
    cfg: LaunchConfig
    em: _Split  # the E+M accumulation passes (_em_accumulate_kernel)
    step: _Split  # the backward step passes (_em_backward_kernel)
    block_k: int
    block_cr: int
    dot_precision: str

    def partials(self, B: int, K: int, C: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial bases (B, P, K, C) and column sums (B, P, K) for the larger P of the two passes."""
        P = max(self.em.programs, self.step.programs)
        return (empty((B, P, K, C), dtype=torch.float32, device=device),
                empty((B, P, K), dtype=torch.float32, device=device))

    def tiles(self, split: _Split) -> dict:
        return dict(BLOCK_N=split.block_n, BLOCK_K=self.block_k, BLOCK_C=self.cfg.block_c,
                    DOT_PRECISION=self.dot_precision, num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)

    def row_grid(self, B: int, K: int) -> tuple[int, int]:
        return (B, triton.cdiv(K, self.cfg.rows))


def _plan(x: torch.Tensor, K: int) -> _Plan:
    B, N, C = x.shape
    cfg = launch_config(B, N, K, C, x.device, x.dtype)
    return _Plan(cfg, _split(N, cfg.block_n_em, cfg.max_programs), _split(N, cfg.block_n, cfg.max_programs),
                 max(16, triton.next_power_of_2(K)), triton.next_power_of_2(C), dot_precision(x.dtype))


def _accumulate(plan: _Plan, x, mu, v, part, colsum, scale):
    B, N, C = x.shape
    _em_accumulate_kernel[(B, plan.em.programs)](
        x, mu, v, part, colsum, N, mu.shape[-2], C, mu.stride(0), plan.em.tiles_per_prog, scale,
        **plan.tiles(plan.em))


def forward(x: torch.Tensor, mu: torch.Tensor, n_iter: int, tau: float, eps: float, detach_iterations: bool):
    """-> (x_rec, mu_out, z, bases (B, n_iter+1, K, C) float32, stats (B, n_iter, 2, K) float32).

    bases[:, r] = mu_r (bases[:, 0] the input), stats[:, r-1] = (Σ_N z_r, ‖m_r‖): what the backward needs."""
    x, mu = x.contiguous(), mu.contiguous()
    with _on_device(x):
        B, N, C = x.shape
        K = mu.shape[1]
        plan = _plan(x, K)
        scale = 1.0 / tau
        bases = empty((B, n_iter + 1, K, C), dtype=torch.float32, device=x.device)
        bases[:, 0].copy_(mu)
        stats = empty((B, n_iter, 2, K), dtype=torch.float32, device=x.device)
        part, colsum = plan.partials(B, K, C, x.device)
        for r in range(1, n_iter + 1):
            _accumulate(plan, x, bases[:, r - 1], x, part, colsum, scale)
            _em_mstep_kernel[plan.row_grid(B, K)](
                part, colsum, bases[:, r], stats[:, r - 1], plan.em.programs, K, C, bases.stride(0),
                stats.stride(0), eps, ROWS=plan.cfg.rows, BLOCK_CR=plan.block_cr)
        x_rec = empty((B, N, C), dtype=x.dtype, device=x.device)
        z = empty((B, N, K), dtype=x.dtype, device=x.device)
        mu_e = bases[:, n_iter] if detach_iterations else bases[:, n_iter - 1]
        _em_output_kernel[(triton.cdiv(N, plan.step.block_n), B)](
            x, mu_e, bases[:, n_iter], x_rec, z, N, K, C, bases.stride(0), scale, **plan.tiles(plan.step))
        mu_out = empty((B, K, C), dtype=mu.dtype, device=mu.device)
        mu_out.copy_(bases[:, n_iter])
        return x_rec, mu_out, z, bases, stats


def _step_backward(plan, x, mu_e, a, w, g_xrec, g_z, mu_r, dx_in, dx_out, part, scale, *,
                   has_m, has_ext, accum, need_dmu):
    B, N, C = x.shape
    _em_backward_kernel[(B, plan.step.programs)](
        x, mu_e, a, w, g_xrec, g_z, mu_r, dx_in, dx_out, part, N, mu_e.shape[-2], C, mu_e.stride(0),
        plan.step.tiles_per_prog, scale, HAS_M=has_m, HAS_EXT=has_ext, ACCUM=accum, NEED_DMU=need_dmu,
        **plan.tiles(plan.step))


def backward(g_xrec, g_mu, g_z, x, bases, stats, n_iter: int, tau: float, eps: float):
    """Full unrolled backward -> (dx, dmu) for the input x and bases (module docstring)."""
    x, g_xrec, g_mu, g_z = x.contiguous(), g_xrec.contiguous(), g_mu.contiguous(), g_z.contiguous()
    with _on_device(x):
        B, N, C = x.shape
        K = bases.shape[2]
        plan = _plan(x, K)
        scale = 1.0 / tau
        dev = x.device
        part, colsum = plan.partials(B, K, C, dev)
        a = empty((B, K, C), dtype=torch.float32, device=dev)
        w = empty((B, K), dtype=torch.float32, device=dev)
        dx = empty((B, N, C), dtype=x.dtype, device=dev)
        dx_acc = dx if x.dtype == torch.float32 else empty((B, N, C), dtype=torch.float32, device=dev)
        dmu = empty((B, K, C), dtype=g_mu.dtype, device=dev)

        def mstep_backward(r, programs, *, extra=None, final=False):
            # r >= 1: a, w of iteration r from dmu_r = Σ part (+ extra); final (r = 0): dmu_0 -> dmu.
            _em_mstep_backward_kernel[plan.row_grid(B, K)](
                part, g_mu if extra is None else extra, bases[:, r], stats[:, max(r - 1, 0)], a, w, dmu, programs,
                K, C, bases.stride(0), stats.stride(0), eps, HAS_EXTRA=extra is not None, FINAL=final,
                ROWS=plan.cfg.rows, BLOCK_CR=plan.block_cr)

        # dmu_R = Gmu + z_Rᵀ G
        _accumulate(plan, x, bases[:, n_iter - 1], g_xrec, part, colsum, scale)
        mstep_backward(n_iter, plan.em.programs, extra=g_mu)
        for r in range(n_iter, 0, -1):
            _step_backward(plan, x, bases[:, r - 1], a, w, g_xrec, g_z, bases[:, n_iter], dx_acc,
                           dx if r == 1 else dx_acc, part, scale,
                           has_m=True, has_ext=r == n_iter, accum=r < n_iter, need_dmu=True)
            mstep_backward(r - 1, plan.step.programs, final=r == 1)
        return dx, dmu


def backward_detached(g_xrec, g_z, x, bases, tau: float):
    """detach_iterations=True: the gradient of the last E step and x_rec to x only -> dx."""
    x, g_xrec, g_z = x.contiguous(), g_xrec.contiguous(), g_z.contiguous()
    with _on_device(x):
        B, N, C = x.shape
        plan = _plan(x, bases.shape[2])
        mu_r = bases[:, -1]
        dx = empty((B, N, C), dtype=x.dtype, device=x.device)
        _step_backward(plan, x, mu_r, x, x, g_xrec, g_z, mu_r, dx, dx, x, 1.0 / tau,
                       has_m=False, has_ext=True, accum=False, need_dmu=False)
        return dx
