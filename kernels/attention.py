"""Flash-style attention in Triton: ``out = softmax(scale · q kᵀ) v`` with independent head widths.

Shapes: q (B, H, Nq, Dqk), k (B, H, Nk, Dqk), v (B, H, Nk, Dv) -> out (B, H, Nq, Dv), plus the
row logsumexp ``lse = log Σ_j exp(scale · q_i·k_j)`` (B, H, Nq) in float32 (natural log), which the
backward uses to recompute ``P = exp(scale · q kᵀ − lse)`` tile by tile. No Nq × Nk map is ever stored.

Forward (online softmax, FlashAttention-2 style): a program owns ``own`` query rows and one chunk of
``dv`` output columns and streams the keys in blocks of ``stream``, keeping the running row max ``m``,
the running denominator ``l`` and the unnormalised output chunk in registers.

Backward (with ``delta_i = Σ_d dO_id O_id`` computed by a small kernel first):
``dS = P ∘ (dO vᵀ − delta)``, ``dv = Pᵀ dO``, ``dk = scale · dSᵀ q``, ``dq = scale · dS k``.
One kernel owns ``own`` keys and streams the queries (dk, dv); another owns ``own`` queries and streams
the keys (dq), so no gradient needs atomics and results are deterministic.

Wide heads (Dqk, Dv up to 4096 and beyond). A head dim up to a few hundred columns is held by one
program as one chunk of ``dqk`` / ``dv`` columns plus, where that pads less, a narrower tail chunk
(``dqk_tail`` / ``dv_tail``; both powers of two >= 16, the last columns masked): 288 = 256 + 32,
144 = 128 + 16, 72 = 64 + 16. Its tiles and accumulators are then two register tiles, and nothing is
recomputed. Wider heads are cut into chunks:

- a head dim that is *reduced over* (Dqk in q kᵀ, Dv in dO vᵀ) is looped over chunk by chunk inside the
  kernel, accumulating the score tile in float32;
- a head dim that is an *output* (Dv of out and dv, Dqk of dq and dk) is split over the third grid axis:
  each program writes one output chunk and recomputes the score tile it needs. So a width of at most
  one chunk costs nothing extra, and a width of c chunks costs c times the q kᵀ work for that output.
  This is the choice between "loop Dv chunks in an outer grid axis, recomputing scores" and "keep all
  of Dv in one program": the latter needs Nq_block × Dv float32 accumulators, which does not fit in
  registers or shared memory for Dv in the thousands.
- when a width fits one chunk, the tile the program owns (q in the forward, k and v in the dk/dv
  kernel, q and dO in the dq kernel) is loaded once, outside the streaming loop.
- when both widths fit one chunk, dk and dv come from one program (as in FlashAttention-2); otherwise
  dv chunks and dk chunks are separate programs of the same kernel (constexpr ``DO_DK``/``DO_DV``).

Masking: key columns past Nk get score −inf in the forward; out-of-range rows load zeros and are never
stored; in the backward, query rows past Nq load ``lse = +inf`` so their P is exactly 0. Any Nq, Nk >= 1.

Precision: scores, P, dS and all accumulators are float32; P and dS are rounded to the input dtype
before their dots (as in FlashAttention). float32 inputs use exact float32 dots unless PyTorch's float32
matmul precision was lowered (then TF32, operands rounded to nearest), see :func:`dot_precision` and :func:`dot`.

Launch configuration (:class:`Blocks`): explicit for tests (the interpreter must never autotune) and
chosen by :func:`default_blocks` otherwise (see there for the per-width table).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mtlfast._alloc import empty
from mtlfast.backends import MAX_GRID_YZ, grid_axis_refusals, offset_refusals, slice_extent

# Kernels read module globals only as constexpr; the launchers use ``.value``.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@dataclass(frozen=True)
class Blocks:
    """One launch configuration.

    own: rows a program owns (queries in the forward and the dq kernel, keys in the dk/dv kernel);
    stream: rows streamed through the inner loop; dqk / dv: head-dim chunk widths. All powers of two
    >= 16 (tl.dot needs every dim >= 16 on the GPU, tl.arange powers of two).
    dqk_tail / dv_tail: 0, or a second power of two >= 16: the head dim is then held by one program as
    one chunk plus this tail (dqk < Dqk <= dqk + dqk_tail), e.g. 288 = 256 + 32 instead of two chunks of
    256 (each recomputing q kᵀ) or one padded chunk of 512.
    """

    own: int
    stream: int
    dqk: int
    dv: int
    num_warps: int = 4
    num_stages: int = 2
    dqk_tail: int = 0
    dv_tail: int = 0

    def __post_init__(self) -> None:
        for name in ("own", "stream", "dqk", "dv", "dqk_tail", "dv_tail"):
            value = getattr(self, name)
            if name.endswith("_tail") and value == 0:
                continue
            if value < 16 or value & (value - 1):
                raise ValueError(f"Blocks.{name}: expected a power of two >= 16{' (or 0)' * name.endswith('_tail')}, "
                                 f"got {value}")

    def as_list(self) -> list[int]:
        return [self.own, self.stream, self.dqk, self.dv, self.num_warps, self.num_stages, self.dqk_tail,
                self.dv_tail]

    @classmethod
    def from_list(cls, values) -> "Blocks":
        return cls(*[int(v) for v in values])


@dataclass(frozen=True)
class WidthPlan:
    """How a launch covers Dqk and Dv with a :class:`Blocks`: ``one_*`` the width is held by one program
    (one chunk, plus the tail ``tail_*`` when it is > 0), ``chunks_*`` the programs of grid axis 2 when the
    width is an output. ``constexprs`` are the kernels' width parameters."""

    one_dqk: bool
    one_dv: bool
    tail_dqk: int
    tail_dv: int
    chunks_dqk: int
    chunks_dv: int

    @property
    def constexprs(self) -> dict:
        return dict(ONE_DQK=self.one_dqk, ONE_DV=self.one_dv, TAIL_DQK=self.tail_dqk, TAIL_DV=self.tail_dv)


def width_plan(blocks: Blocks, d_qk: int, d_v: int) -> WidthPlan:
    """The :class:`WidthPlan` of ``blocks`` at these widths; ValueError for a tail that does not fit."""
    sides = {}
    for name, width in (("dqk", d_qk), ("dv", d_v)):
        chunk, tail = getattr(blocks, name), getattr(blocks, f"{name}_tail")
        if tail and not chunk < width <= chunk + tail:
            raise ValueError(f"Blocks.{name}_tail={tail}: a tail holds the columns past one chunk, so it needs "
                             f"{name}={chunk} < width <= {chunk + tail}; got width {width}")
        chunks = 1 if tail else triton.cdiv(width, chunk)
        if chunks > MAX_GRID_YZ:
            raise ValueError(f"Blocks.{name}={chunk} gives {chunks} chunks (> {MAX_GRID_YZ})")
        sides[name] = (chunks == 1, tail, chunks)
    (one_dqk, tail_dqk, chunks_dqk), (one_dv, tail_dv, chunks_dv) = sides["dqk"], sides["dv"]
    return WidthPlan(one_dqk, one_dv, tail_dqk, tail_dv, chunks_dqk, chunks_dv)


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def split_width(width: int, cap: int) -> tuple[int, int] | None:
    """(chunk, tail) holding ``width`` in one program with the least padding, tail 0 when one power of two
    pads no more than chunk + tail does (72 -> 64 + 16, 144 -> 128 + 16, 288 -> 256 + 32, 200 -> 256 + 0);
    None when chunk + tail would exceed ``cap``."""
    full = _pow2_at_least_16(width)
    main = max(16, 1 << (width.bit_length() - 1))
    if main < width:
        tail = _pow2_at_least_16(width - main)
        if main + tail < full:
            return (main, tail) if main + tail <= cap else None
    return (full, 0) if full <= cap else None


def _one_chunk(width: int, cap: int) -> tuple[int, int] | None:
    """(the power of two holding ``width``, no tail), or None above ``cap``: :func:`default_blocks` without tails."""
    full = _pow2_at_least_16(width)
    return (full, 0) if full <= cap else None


def default_blocks(d_qk: int, d_v: int, device: torch.device | str, dtype: torch.dtype,
                   backward: bool = False, tails: bool = True) -> Blocks:
    """The launch configuration used when none is given.

    ``tails=False`` gives the configuration without tails (a width is one padded power of two up to 256,
    float32 backward 128, else chunks): the benchmark's ``mtlfast_no_tails`` provider times it beside the
    default, to measure what the tails buy at the BridgeNet widths.

    Interpreter (CPU): 32 × 32 tiles; a width up to 192 is held by one program (with a tail where that
    pads less), wider ones in chunks of 128 (numpy cost grows with the number of tile operations; this
    exercises tails and chunking at small sizes).

    GPU: NOT yet timed on a GPU (open item). Chosen so that ptxas (sm_90a) reported at most 72 bytes of
    register spills and at most 70 KB of shared memory for widths 16…4096 in bf16 and float32, compiled
    without the divisibility hints a launch of aligned tensors adds; with them (vectorised, pipelined loads)
    the bf16 forward takes up to 128 KB and the backward at width 1000 spills 216-384 B, still within an
    H100 block's 227 KB (the sm_90 compile test compiles with the hints); and so that the BridgeNet/TIF
    widths (72, 144, 288, 384) each run in one program per output (:func:`split_width`: 64 + 16, 128 + 16,
    256 + 32, 256 + 128), i.e. without recomputing q kᵀ and with at most 16 padded columns. 8 warps
    throughout.

    - forward, Dv (an output): held by one program up to 384 columns (float32: 256), else chunks of 256
      (one recomputation of q kᵀ per chunk). Dqk (reduced over): q stays in registers (one chunk and its
      tail) while both widths are <= 128 (float32: 64); otherwise chunks of 32, or of 64 for Dqk > 64 when
      that pads less (288 -> 9 × 32, 384 -> 6 × 64). Tiles: 128 queries × 64 keys when Dv is <= 128, else
      64 × 64; float32 64 × 32 (its exact dots run on FMA units and need the registers).
    - backward (dk, dv and dq are all outputs): each width held by one program up to 384 columns (float32:
      128), else chunks of 128; owned × streamed tiles 64 × 32 when both widths are <= 128 (float32:
      64), else 32 × 32, and with a tail wider than 128 (bf16/fp16) 32 × 16 up to 160 columns, 16 × 16
      beyond: a program then holds k, v, dk and dv (or q, dO, dq) at full width. Trade-off to time on a
      GPU: at 288 this does 1/2.9 of the q kᵀ / dO vᵀ work of 128-column chunks (six programs per key
      block recomputing both), on smaller tiles.
    """
    if torch.device(device).type == "cpu":
        dqk, dqk_tail = split_width(d_qk, 192) or (128, 0)
        dv, dv_tail = split_width(d_v, 192) or (128, 0)
        return Blocks(own=32, stream=32, dqk=dqk, dv=dv, dqk_tail=dqk_tail, dv_tail=dv_tail)
    half = dtype != torch.float32
    split = split_width if tails else lambda width, cap: _one_chunk(width, min(cap, 256))
    if backward:
        cap = 384 if half else 128
        dqk, dqk_tail = split(d_qk, cap) or (128, 0)
        dv, dv_tail = split(d_v, cap) or (128, 0)
        held = max(dqk + dqk_tail, dv + dv_tail)
        if held <= (128 if half else 64):
            own, stream = 64, 32
        elif not (dqk_tail or dv_tail) or not half:
            own, stream = 32, 32
        else:  # a program holds k, v, dk, dv (or q, dO, dq) of up to 384 columns
            own, stream = (32, 16) if held <= 160 else (16, 16)
        return Blocks(own=own, stream=stream, dqk=dqk, dv=dv, num_warps=8, num_stages=2, dqk_tail=dqk_tail,
                      dv_tail=dv_tail)
    dv, dv_tail = split(d_v, 384 if half else 256) or (256, 0)
    hoist = 128 if half else 64
    dqk_tail = 0
    if d_qk <= hoist and dv + dv_tail <= hoist:
        dqk, dqk_tail = split(d_qk, hoist)
    elif d_qk <= 64 or not half:
        dqk = 32
    else:
        dqk = min((64, 32), key=lambda c: triton.cdiv(d_qk, c) * c)
    tails = dict(dqk_tail=dqk_tail, dv_tail=dv_tail)
    if not half:
        return Blocks(own=64, stream=32, dqk=dqk, dv=dv, num_warps=8, num_stages=2, **tails)
    if dv + dv_tail <= 128:
        return Blocks(own=128, stream=64, dqk=dqk, dv=dv, num_warps=8, num_stages=3, **tails)
    return Blocks(own=64, stream=64 if dv + dv_tail <= 256 else 32, dqk=dqk, dv=dv, num_warps=8, num_stages=2,
                  **tails)


# --- kernels -----------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, offs_r, offs_c, n_r, n_c, stride_r, stride_c):
    """(len(offs_r), len(offs_c)) tile of a row-major-by-strides matrix; zeros outside [0,n_r)×[0,n_c)."""
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, value, offs_r, offs_c, n_r, n_c, stride_r, stride_c):
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    tl.store(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, value, mask=mask)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """``tl.dot(a, b, acc)`` (acc None: a fresh float32 tile) at ``PRECISION``, "ieee" or "tf32"
    (:func:`dot_precision`). In TF32, float32 operands are first rounded to TF32 (10-bit mantissa, to nearest,
    ties away, as cuBLAS converts): Triton hands the tensor cores float32 bits, which drop the low 13 (it emits no
    cvt.rna), a bias toward zero that made its TF32 error 4x cuBLAS's (attention forward against float64,
    simulated: 1.6e-3 truncated, 4.2e-4 rounded; DESIGN.md §6 bounds TF32 dots at 1e-3). A rounded operand is a
    TF32 value, so the hardware's truncation leaves it as it is; the interpreter, which ignores input_precision,
    computes the same rounded products, so the CPU tests check the TF32 bound too."""
    if PRECISION == "tf32":
        if a.dtype == tl.float32:
            a = _tf32_rounded(a)
        if b.dtype == tl.float32:
            b = _tf32_rounded(b)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tf32_rounded(x):
    """float32 ``x`` rounded to TF32's 10-bit mantissa, to nearest, ties away from zero (magnitudes round in the
    bit pattern; inf stays inf, a NaN stays itself)."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def _dot_nt(A, B, offs_a, offs_b, n_a, n_b, width, sa_r, sa_d, sb_r, sb_d,
            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """float32 tile A[offs_a] · B[offs_b]ᵀ, reducing over ``width`` columns in chunks of BLOCK_D."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, width, BLOCK_D):
        a = _load_tile(A, offs_a, d0 + offs_d, n_a, width, sa_r, sa_d)
        b = _load_tile(B, offs_b, d0 + offs_d, n_b, width, sb_r, sb_d)
        acc += dot(a, tl.trans(b), None, PRECISION)
    return acc


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, qk_scale, H, N_Q, N_K, D_QK, D_V,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_b, so_h, so_n, so_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    TAIL_DQK: tl.constexpr, TAIL_DV: tl.constexpr, ONE_DQK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_bh, pid_dv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    O += b * so_b + h * so_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    if ONE_DQK:
        q = _load_tile(Q, offs_m, offs_dqk, N_Q, D_QK, sq_n, sq_d)
        if TAIL_DQK > 0:
            offs_dqk_t = BLOCK_DQK + tl.arange(0, TAIL_DQK)
            q_t = _load_tile(Q, offs_m, offs_dqk_t, N_Q, D_QK, sq_n, sq_d)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    if TAIL_DV > 0:  # one program holds all of Dv: BLOCK_DV + TAIL_DV columns
        offs_dv_t = BLOCK_DV + tl.arange(0, TAIL_DV)
        acc_t = tl.zeros((BLOCK_M, TAIL_DV), dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if ONE_DQK:
            k = _load_tile(K, offs_n, offs_dqk, N_K, D_QK, sk_n, sk_d)
            s = dot(q, tl.trans(k), None, PRECISION)
            if TAIL_DQK > 0:
                k_t = _load_tile(K, offs_n, offs_dqk_t, N_K, D_QK, sk_n, sk_d)
                s = dot(q_t, tl.trans(k_t), s, PRECISION)
        else:
            s = _dot_nt(Q, K, offs_m, offs_n, N_Q, N_K, D_QK, sq_n, sq_d, sk_n, sk_d,
                        BLOCK_M, BLOCK_N, BLOCK_DQK, PRECISION)
        s = tl.where(offs_n[None, :] < N_K, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has >= 1 valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(V.dtype.element_ty)
        v = _load_tile(V, offs_n, offs_dv, N_K, D_V, sv_n, sv_d)
        acc = acc * alpha[:, None] + dot(p, v, None, PRECISION)
        if TAIL_DV > 0:
            v_t = _load_tile(V, offs_n, offs_dv_t, N_K, D_V, sv_n, sv_d)
            acc_t = acc_t * alpha[:, None] + dot(p, v_t, None, PRECISION)
        m_i = m_new
    _store_tile(O, (acc / l_i[:, None]).to(O.dtype.element_ty), offs_m, offs_dv, N_Q, D_V, so_n, so_d)
    if TAIL_DV > 0:
        _store_tile(O, (acc_t / l_i[:, None]).to(O.dtype.element_ty), offs_m, offs_dv_t, N_Q, D_V, so_n, so_d)
    # Every Dv chunk computes the same lse; chunk 0 writes it.
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=(offs_m < N_Q) & (pid_dv == 0))


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, H, N_Q, D_V, so_b, so_h, so_n, so_d, sdo_b, sdo_h, sdo_n, sdo_d,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta = rowsum(dO ∘ O) in float32, looping over Dv chunks."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    O += b * so_b + h * so_h
    DO += b * sdo_b + h * sdo_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D_V, BLOCK_DV):
        o = _load_tile(O, offs_m, d0 + offs_d, N_Q, D_V, so_n, so_d).to(tl.float32)
        do = _load_tile(DO, offs_m, d0 + offs_d, N_Q, D_V, sdo_n, sdo_d).to(tl.float32)
        acc += tl.sum(o * do, 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, acc, mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale, H, N_Q, N_K, D_QK, D_V,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_n, sdo_d, sdk_b, sdk_h, sdk_n, sdk_d, sdv_b, sdv_h, sdv_n, sdv_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    TAIL_DQK: tl.constexpr, TAIL_DV: tl.constexpr, ONE_DQK: tl.constexpr, ONE_DV: tl.constexpr,
    DO_DK: tl.constexpr, DO_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Owns BLOCK_N keys, streams the queries. DO_DK and DO_DV: both gradients (grid axis 2 has one
    program, both widths fit one chunk, each with its tail); one of them: grid axis 2 enumerates that
    gradient's chunks (one program if its width fits one chunk and its tail)."""
    pid_n, pid_bh, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    DO += b * sdo_b + h * sdo_h
    DK += b * sdk_b + h * sdk_h
    DV += b * sdv_b + h * sdv_h
    LSE += pid_bh.to(tl.int64) * N_Q
    DELTA += pid_bh.to(tl.int64) * N_Q
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # pid_c is the chunk of the gradient this program writes (0 when it writes both).
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dqk_out = pid_c * BLOCK_DQK + offs_dqk
    if DO_DV:
        offs_dv = pid_c * BLOCK_DV + tl.arange(0, BLOCK_DV)
    else:
        offs_dv = tl.arange(0, BLOCK_DV)
    # Tails (TAIL_* > 0 only with ONE_*): the columns past the one chunk.
    if TAIL_DQK > 0:
        offs_dqk_t = BLOCK_DQK + tl.arange(0, TAIL_DQK)
    if TAIL_DV > 0:
        offs_dv_t = BLOCK_DV + tl.arange(0, TAIL_DV)
    if ONE_DQK:
        k = _load_tile(K, offs_n, offs_dqk, N_K, D_QK, sk_n, sk_d)
        if TAIL_DQK > 0:
            k_t = _load_tile(K, offs_n, offs_dqk_t, N_K, D_QK, sk_n, sk_d)
    if ONE_DV and DO_DK:
        v = _load_tile(V, offs_n, offs_dv, N_K, D_V, sv_n, sv_d)
        if TAIL_DV > 0:
            v_t = _load_tile(V, offs_n, offs_dv_t, N_K, D_V, sv_n, sv_d)

    dk = tl.zeros((BLOCK_N, BLOCK_DQK), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    if TAIL_DQK > 0 and DO_DK:
        dk_t = tl.zeros((BLOCK_N, TAIL_DQK), dtype=tl.float32)
    if TAIL_DV > 0 and DO_DV:
        dv_t = tl.zeros((BLOCK_N, TAIL_DV), dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        lse2 = tl.load(LSE + offs_m, mask=offs_m < N_Q, other=float("inf")) * LOG2E
        if ONE_DQK:
            q = _load_tile(Q, offs_m, offs_dqk, N_Q, D_QK, sq_n, sq_d)
            st = dot(k, tl.trans(q), None, PRECISION)
            if TAIL_DQK > 0:
                q_t = _load_tile(Q, offs_m, offs_dqk_t, N_Q, D_QK, sq_n, sq_d)
                st = dot(k_t, tl.trans(q_t), st, PRECISION)
        else:
            st = _dot_nt(K, Q, offs_n, offs_m, N_K, N_Q, D_QK, sk_n, sk_d, sq_n, sq_d,
                         BLOCK_N, BLOCK_M, BLOCK_DQK, PRECISION)
        pt = tl.exp2(st * qk_scale - lse2[None, :])  # Pᵀ tile; 0 for query rows past N_Q
        if DO_DV or ONE_DV:
            do = _load_tile(DO, offs_m, offs_dv, N_Q, D_V, sdo_n, sdo_d)
            if TAIL_DV > 0:
                do_t = _load_tile(DO, offs_m, offs_dv_t, N_Q, D_V, sdo_n, sdo_d)
        if DO_DV:
            dv += dot(pt.to(do.dtype), do, None, PRECISION)
            if TAIL_DV > 0:
                dv_t += dot(pt.to(do.dtype), do_t, None, PRECISION)
        if DO_DK:
            if ONE_DV:
                dpt = dot(v, tl.trans(do), None, PRECISION)
                if TAIL_DV > 0:
                    dpt = dot(v_t, tl.trans(do_t), dpt, PRECISION)
            else:
                dpt = _dot_nt(V, DO, offs_n, offs_m, N_K, N_Q, D_V, sv_n, sv_d, sdo_n, sdo_d,
                              BLOCK_N, BLOCK_M, BLOCK_DV, PRECISION)
            delta = tl.load(DELTA + offs_m, mask=offs_m < N_Q, other=0.0)
            dst = (pt * (dpt - delta[None, :])).to(Q.dtype.element_ty)
            if not ONE_DQK:
                q = _load_tile(Q, offs_m, offs_dqk_out, N_Q, D_QK, sq_n, sq_d)
            dk += dot(dst, q, None, PRECISION)
            if TAIL_DQK > 0:
                dk_t += dot(dst, q_t, None, PRECISION)
    if DO_DV:
        _store_tile(DV, dv.to(DV.dtype.element_ty), offs_n, offs_dv, N_K, D_V, sdv_n, sdv_d)
        if TAIL_DV > 0:
            _store_tile(DV, dv_t.to(DV.dtype.element_ty), offs_n, offs_dv_t, N_K, D_V, sdv_n, sdv_d)
    if DO_DK:
        _store_tile(DK, (dk * sm_scale).to(DK.dtype.element_ty), offs_n, offs_dqk_out, N_K, D_QK, sdk_n, sdk_d)
        if TAIL_DQK > 0:
            _store_tile(DK, (dk_t * sm_scale).to(DK.dtype.element_ty), offs_n, offs_dqk_t, N_K, D_QK, sdk_n, sdk_d)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale, H, N_Q, N_K, D_QK, D_V,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_n, sdo_d, sdq_b, sdq_h, sdq_n, sdq_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    TAIL_DQK: tl.constexpr, TAIL_DV: tl.constexpr, ONE_DQK: tl.constexpr, ONE_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Owns BLOCK_M queries, streams the keys; grid axis 2 enumerates the Dqk chunks of dq (one program
    writing the chunk and its tail when TAIL_DQK > 0)."""
    pid_m, pid_bh, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    DO += b * sdo_b + h * sdo_h
    DQ += b * sdq_b + h * sdq_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dqk = pid_c * BLOCK_DQK + tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, mask=offs_m < N_Q, other=0.0) * LOG2E
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, mask=offs_m < N_Q, other=0.0)
    if ONE_DQK:
        q = _load_tile(Q, offs_m, offs_dqk, N_Q, D_QK, sq_n, sq_d)
        if TAIL_DQK > 0:
            offs_dqk_t = BLOCK_DQK + tl.arange(0, TAIL_DQK)
            q_t = _load_tile(Q, offs_m, offs_dqk_t, N_Q, D_QK, sq_n, sq_d)
            dq_t = tl.zeros((BLOCK_M, TAIL_DQK), dtype=tl.float32)
    if ONE_DV:
        do = _load_tile(DO, offs_m, offs_dv, N_Q, D_V, sdo_n, sdo_d)
        if TAIL_DV > 0:
            offs_dv_t = BLOCK_DV + tl.arange(0, TAIL_DV)
            do_t = _load_tile(DO, offs_m, offs_dv_t, N_Q, D_V, sdo_n, sdo_d)

    dq = tl.zeros((BLOCK_M, BLOCK_DQK), dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, offs_n, offs_dqk, N_K, D_QK, sk_n, sk_d)
        if ONE_DQK:
            s = dot(q, tl.trans(k), None, PRECISION)
            if TAIL_DQK > 0:
                k_t = _load_tile(K, offs_n, offs_dqk_t, N_K, D_QK, sk_n, sk_d)
                s = dot(q_t, tl.trans(k_t), s, PRECISION)
        else:
            s = _dot_nt(Q, K, offs_m, offs_n, N_Q, N_K, D_QK, sq_n, sq_d, sk_n, sk_d,
                        BLOCK_M, BLOCK_N, BLOCK_DQK, PRECISION)
        if ONE_DV:
            v = _load_tile(V, offs_n, offs_dv, N_K, D_V, sv_n, sv_d)
            dp = dot(do, tl.trans(v), None, PRECISION)
            if TAIL_DV > 0:
                v_t = _load_tile(V, offs_n, offs_dv_t, N_K, D_V, sv_n, sv_d)
                dp = dot(do_t, tl.trans(v_t), dp, PRECISION)
        else:
            dp = _dot_nt(DO, V, offs_m, offs_n, N_Q, N_K, D_V, sdo_n, sdo_d, sv_n, sv_d,
                         BLOCK_M, BLOCK_N, BLOCK_DV, PRECISION)
        # Key rows past N_K: masked, since exp2(0 - lse2) overflows when every score of a row is < -88.
        p = tl.where(offs_n[None, :] < N_K, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = (p * (dp - delta[:, None])).to(K.dtype.element_ty)
        dq += dot(ds, k, None, PRECISION)
        if TAIL_DQK > 0:
            dq_t += dot(ds, k_t, None, PRECISION)
    _store_tile(DQ, (dq * sm_scale).to(DQ.dtype.element_ty), offs_m, offs_dqk, N_Q, D_QK, sdq_n, sdq_d)
    if TAIL_DQK > 0:
        _store_tile(DQ, (dq_t * sm_scale).to(DQ.dtype.element_ty), offs_m, offs_dqk_t, N_Q, D_QK, sdq_n, sdq_d)


# --- launchers ---------------------------------------------------------------------------------------


def grid_limits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Reasons these kernels cannot take these inputs (empty list: they can). In-slice offsets are 32-bit: the
    inputs with their strides, and the contiguous outputs and gradients (Nq·Dv, Nq·Dqk, Nk·Dqk, Nk·Dv)."""
    reasons = grid_axis_refusals("B*H", q.shape[0] * q.shape[1])
    reasons += offset_refusals("(batch, head)", q=slice_extent(q, 2), k=slice_extent(k, 2), v=slice_extent(v, 2))
    n_q, n_k, d_qk, d_v = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    for name, rows, width in (("out", n_q, d_v), ("dq", n_q, d_qk), ("dk", n_k, d_qk), ("dv", n_k, d_v)):
        if rows * width >= 2**31:
            reasons.append(f"{name}: one (batch, head) slice has {rows} x {width} elements; in-slice offsets are "
                           "32-bit (< 2**31)")
    return reasons


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 inputs follow PyTorch's float32 matmul setting
    (torch.set_float32_matmul_precision: "highest", the default, -> exact "ieee" dots; "high"/"medium"
    -> TF32); half-precision inputs use the tensor cores as they are. Every dot of the kernels passes it (:func:`dot`,
    which rounds float32 operands to TF32 first): Triton's own default on CUDA is TF32."""
    if dtype == torch.float32 and not _float32_matmul_is_tf32():
        return "ieee"
    return "tf32"


def _float32_matmul_is_tf32() -> bool:
    """PyTorch's float32 CUDA matmul setting, from the new API (torch.backends.cuda.matmul.fp32_precision,
    "tf32" / "ieee", or "none": inherited from torch.backends.fp32_precision) or the legacy one
    (torch.set_float32_matmul_precision), whose getter raises once the new API was used ("mix of the legacy and
    new APIs")."""
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if matmul == "none":
        matmul = getattr(torch.backends, "fp32_precision", "none")
    if matmul != "none":
        return matmul == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU, whichever is current (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      blocks: Blocks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B,H,Nq,Dv) in q's dtype and lse (B,H,Nq) float32. Inputs may have any strides."""
    B, H, n_q, d_qk = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    blocks = blocks or default_blocks(d_qk, d_v, q.device, q.dtype)
    plan = width_plan(blocks, d_qk, d_v)
    out = empty((B, H, n_q, d_v), dtype=q.dtype, device=q.device)
    lse = empty((B, H, n_q), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(n_q, blocks.own), B * H, plan.chunks_dv)
    with _on_device(q):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, scale * LOG2E.value, H, n_q, n_k, d_qk, d_v,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), **fwd_constexprs(blocks, plan, q.dtype))
    return out, lse


def fwd_constexprs(blocks: Blocks, plan: WidthPlan, dtype: torch.dtype) -> dict:
    """The forward kernel's compile-time parameters (and launch options)."""
    return dict(BLOCK_M=blocks.own, BLOCK_N=blocks.stream, BLOCK_DQK=blocks.dqk, BLOCK_DV=blocks.dv,
                TAIL_DQK=plan.tail_dqk, TAIL_DV=plan.tail_dv, ONE_DQK=plan.one_dqk, PRECISION=dot_precision(dtype),
                num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def bwd_constexprs(blocks: Blocks, plan: WidthPlan, dtype: torch.dtype) -> tuple[list[tuple[dict, int]], dict]:
    """The backward kernels' compile-time parameters: [(dk/dv kernel parameters, grid axis 2)] per pass
    (both widths held by one program: one pass writing dk and dv; else a dv pass and a dk pass, each
    enumerating its chunks), and the dq kernel's."""
    launch = dict(PRECISION=dot_precision(dtype), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
                  BLOCK_DQK=blocks.dqk, BLOCK_DV=blocks.dv, **plan.constexprs)
    passes = [(True, True, 1)] if plan.one_dqk and plan.one_dv else \
        [(False, True, plan.chunks_dv), (True, False, plan.chunks_dqk)]
    dkdv = [(dict(launch, BLOCK_M=blocks.stream, BLOCK_N=blocks.own, DO_DK=do_dk, DO_DV=do_dv), chunks)
            for do_dk, do_dv, chunks in passes]
    return dkdv, dict(launch, BLOCK_M=blocks.own, BLOCK_N=blocks.stream)


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float,
                       blocks: Blocks | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for ``out, lse = attention_forward(q, k, v, scale)`` and the cotangent ``grad_out``."""
    B, H, n_q, d_qk = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    blocks = blocks or default_blocks(d_qk, d_v, q.device, q.dtype, backward=True)
    plan = width_plan(blocks, d_qk, d_v)
    lse = lse.contiguous()
    if slice_extent(grad_out, 2) > 2**31:  # 32-bit in-slice offsets; out's contiguous size is within the limits
        grad_out = grad_out.contiguous()
    delta = empty((B, H, n_q), dtype=torch.float32, device=q.device)
    dq, dk, dv = (empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    common = (scale * LOG2E.value, scale, H, n_q, n_k, d_qk, d_v)
    dkdv_passes, dq_meta = bwd_constexprs(blocks, plan, q.dtype)
    with _on_device(q):
        _attn_bwd_delta_kernel[(triton.cdiv(n_q, blocks.own), B * H)](
            out, grad_out, delta, H, n_q, d_v, *out.stride(), *grad_out.stride(),
            BLOCK_M=blocks.own, BLOCK_DV=blocks.dv, num_warps=blocks.num_warps)
        for meta, chunks in dkdv_passes:
            _attn_bwd_dkdv_kernel[(triton.cdiv(n_k, blocks.own), B * H, chunks)](
                q, k, v, grad_out, lse, delta, dk, dv, *common,
                *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), **meta)
        _attn_bwd_dq_kernel[(triton.cdiv(n_q, blocks.own), B * H, plan.chunks_dqk)](
            q, k, v, grad_out, lse, delta, dq, *common,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), **dq_meta)
    return dq, dk, dv
