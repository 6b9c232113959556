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

Wide heads (Dqk, Dv up to 4096 and beyond). The head dims are cut into chunks of ``dqk`` / ``dv``
columns (powers of two >= 16; the tails are masked):

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
matmul precision was lowered (then TF32), see :func:`dot_precision`.

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

# Kernels read module globals only as constexpr; the launchers use ``.value``.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: Grid axes 1 and 2 are limited to 65535 programs on CUDA.
MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class Blocks:
    """One launch configuration.

    own: rows a program owns (queries in the forward and the dq kernel, keys in the dk/dv kernel);
    stream: rows streamed through the inner loop; dqk / dv: head-dim chunk widths. All powers of two
    >= 16 (tl.dot needs every dim >= 16 on the GPU, tl.arange powers of two).
    """

    own: int
    stream: int
    dqk: int
    dv: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("own", "stream", "dqk", "dv"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"Blocks.{name}: expected a power of two >= 16, got {value}")

    def as_list(self) -> list[int]:
        return [self.own, self.stream, self.dqk, self.dv, self.num_warps, self.num_stages]

    @classmethod
    def from_list(cls, values) -> "Blocks":
        return cls(*[int(v) for v in values])


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def default_blocks(d_qk: int, d_v: int, device: torch.device | str, dtype: torch.dtype,
                   backward: bool = False) -> Blocks:
    """The launch configuration used when none is given.

    Interpreter (CPU): 32 × 32 tiles and chunks of at most 128 columns (numpy cost grows with the number
    of tile operations; 128 keeps a program's working set small and exercises chunking at width > 128).

    GPU: NOT yet timed on a GPU (open item). Chosen so that ptxas (sm_90a) reports at most 68 bytes of
    register spills and at most 70 KB of shared memory (checked for widths 16…4096 in bf16 and float32),
    and so that the BridgeNet/TIF widths (72, 144, 288, 384) need few chunks. 8 warps throughout.

    - forward, Dv (an output: one recomputation of q kᵀ per chunk): the whole padded width if <= 256,
      else chunks of 256. Dqk (reduced over): q stays in registers (one chunk) while both padded widths
      are <= 128 (float32: 64); otherwise chunks of 32, or of 64 for Dqk > 64 when that pads less
      (288 -> 9 × 32, 384 -> 6 × 64). Tiles: 128 queries × 64 keys when the Dv chunk is <= 128, else
      64 × 64; float32 64 × 32 (its exact dots run on FMA units and need the registers).
    - backward (dk, dv and dq are all outputs): chunks of the whole padded width if <= 256 (float32:
      128), else 128; owned × streamed tiles 64 × 32, or 32 × 32 when a chunk is wider than 128
      (float32: 64).
    """
    if torch.device(device).type == "cpu":
        return Blocks(own=32, stream=32, dqk=_pow2_at_least_16(min(d_qk, 128)), dv=_pow2_at_least_16(min(d_v, 128)))
    half = dtype != torch.float32
    if backward:
        cap = 256 if half else 128
        dqk, dv = (_pow2_at_least_16(d) if d <= cap else 128 for d in (d_qk, d_v))
        own = 64 if max(dqk, dv) <= (128 if half else 64) else 32
        return Blocks(own=own, stream=32, dqk=dqk, dv=dv, num_warps=8, num_stages=2)
    dv = _pow2_at_least_16(d_v) if d_v <= 256 else 256
    hoist = 128 if half else 64
    if d_qk <= hoist and dv <= hoist:
        dqk = _pow2_at_least_16(d_qk)
    elif d_qk <= 64 or not half:
        dqk = 32
    else:
        dqk = min((64, 32), key=lambda c: triton.cdiv(d_qk, c) * c)
    if not half:
        return Blocks(own=64, stream=32, dqk=dqk, dv=dv, num_warps=8, num_stages=2)
    if dv <= 128:
        return Blocks(own=128, stream=64, dqk=dqk, dv=dv, num_warps=8, num_stages=3)
    return Blocks(own=64, stream=64, dqk=dqk, dv=dv, num_warps=8, num_stages=2)


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
def _dot_nt(A, B, offs_a, offs_b, n_a, n_b, width, sa_r, sa_d, sb_r, sb_d,
            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """float32 tile A[offs_a] · B[offs_b]ᵀ, reducing over ``width`` columns in chunks of BLOCK_D."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, width, BLOCK_D):
        a = _load_tile(A, offs_a, d0 + offs_d, n_a, width, sa_r, sa_d)
        b = _load_tile(B, offs_b, d0 + offs_d, n_b, width, sb_r, sb_d)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return acc


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, qk_scale, H, N_Q, N_K, D_QK, D_V,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_b, so_h, so_n, so_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    ONE_DQK: tl.constexpr, PRECISION: tl.constexpr,
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

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if ONE_DQK:
            k = _load_tile(K, offs_n, offs_dqk, N_K, D_QK, sk_n, sk_d)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            s = _dot_nt(Q, K, offs_m, offs_n, N_Q, N_K, D_QK, sq_n, sq_d, sk_n, sk_d,
                        BLOCK_M, BLOCK_N, BLOCK_DQK, PRECISION)
        s = tl.where(offs_n[None, :] < N_K, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has >= 1 valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, offs_n, offs_dv, N_K, D_V, sv_n, sv_d)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    _store_tile(O, acc.to(O.dtype.element_ty), offs_m, offs_dv, N_Q, D_V, so_n, so_d)
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
    ONE_DQK: tl.constexpr, ONE_DV: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Owns BLOCK_N keys, streams the queries. DO_DK and DO_DV: both gradients (grid axis 2 has one
    program, both widths fit one chunk); one of them: grid axis 2 enumerates that gradient's chunks."""
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
    if ONE_DQK:
        k = _load_tile(K, offs_n, offs_dqk, N_K, D_QK, sk_n, sk_d)
    if ONE_DV and DO_DK:
        v = _load_tile(V, offs_n, offs_dv, N_K, D_V, sv_n, sv_d)

    dk = tl.zeros((BLOCK_N, BLOCK_DQK), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        lse2 = tl.load(LSE + offs_m, mask=offs_m < N_Q, other=float("inf")) * LOG2E
        if ONE_DQK:
            q = _load_tile(Q, offs_m, offs_dqk, N_Q, D_QK, sq_n, sq_d)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        else:
            st = _dot_nt(K, Q, offs_n, offs_m, N_K, N_Q, D_QK, sk_n, sk_d, sq_n, sq_d,
                         BLOCK_N, BLOCK_M, BLOCK_DQK, PRECISION)
        pt = tl.exp2(st * qk_scale - lse2[None, :])  # Pᵀ tile; 0 for query rows past N_Q
        if DO_DV or ONE_DV:
            do = _load_tile(DO, offs_m, offs_dv, N_Q, D_V, sdo_n, sdo_d)
        if DO_DV:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        if DO_DK:
            if ONE_DV:
                dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            else:
                dpt = _dot_nt(V, DO, offs_n, offs_m, N_K, N_Q, D_V, sv_n, sv_d, sdo_n, sdo_d,
                              BLOCK_N, BLOCK_M, BLOCK_DV, PRECISION)
            delta = tl.load(DELTA + offs_m, mask=offs_m < N_Q, other=0.0)
            dst = pt * (dpt - delta[None, :])
            if not ONE_DQK:
                q = _load_tile(Q, offs_m, offs_dqk_out, N_Q, D_QK, sq_n, sq_d)
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    if DO_DV:
        _store_tile(DV, dv.to(DV.dtype.element_ty), offs_n, offs_dv, N_K, D_V, sdv_n, sdv_d)
    if DO_DK:
        _store_tile(DK, (dk * sm_scale).to(DK.dtype.element_ty), offs_n, offs_dqk_out, N_K, D_QK, sdk_n, sdk_d)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale, H, N_Q, N_K, D_QK, D_V,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_n, sdo_d, sdq_b, sdq_h, sdq_n, sdq_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    ONE_DQK: tl.constexpr, ONE_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Owns BLOCK_M queries, streams the keys; grid axis 2 enumerates the Dqk chunks of dq."""
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
    if ONE_DV:
        do = _load_tile(DO, offs_m, offs_dv, N_Q, D_V, sdo_n, sdo_d)

    dq = tl.zeros((BLOCK_M, BLOCK_DQK), dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, offs_n, offs_dqk, N_K, D_QK, sk_n, sk_d)
        if ONE_DQK:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            s = _dot_nt(Q, K, offs_m, offs_n, N_Q, N_K, D_QK, sq_n, sq_d, sk_n, sk_d,
                        BLOCK_M, BLOCK_N, BLOCK_DQK, PRECISION)
        if ONE_DV:
            v = _load_tile(V, offs_n, offs_dv, N_K, D_V, sv_n, sv_d)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        else:
            dp = _dot_nt(DO, V, offs_m, offs_n, N_Q, N_K, D_V, sdo_n, sdo_d, sv_n, sv_d,
                         BLOCK_M, BLOCK_N, BLOCK_DV, PRECISION)
        # Key rows past N_K: masked, since exp2(0 - lse2) overflows when every score of a row is < -88.
        p = tl.where(offs_n[None, :] < N_K, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_tile(DQ, (dq * sm_scale).to(DQ.dtype.element_ty), offs_m, offs_dqk, N_Q, D_QK, sdq_n, sdq_d)


# --- launchers ---------------------------------------------------------------------------------------


def grid_limits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Reasons these kernels cannot take these inputs (empty list: they can)."""
    reasons = []
    bh = q.shape[0] * q.shape[1]
    if bh > MAX_GRID_YZ:
        reasons.append(f"B*H = {bh} exceeds the CUDA grid limit of {MAX_GRID_YZ} programs")
    for name, t in (("q", q), ("k", k), ("v", v)):
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[2:], t.stride()[2:]))
        if extent >= 2**31:
            reasons.append(f"{name}: one (batch, head) slice spans {extent + 1} elements; "
                           "in-slice offsets are 32-bit (< 2**31)")
    return reasons


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 inputs follow PyTorch's float32 matmul setting
    (torch.set_float32_matmul_precision: "highest", the default, -> exact "ieee" dots; "high"/"medium"
    -> TF32); half-precision inputs use the tensor cores as they are."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU, whichever is current (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_blocks(blocks: Blocks, d_qk: int, d_v: int) -> None:
    for name, count in (("dqk", triton.cdiv(d_qk, blocks.dqk)), ("dv", triton.cdiv(d_v, blocks.dv))):
        if count > MAX_GRID_YZ:
            raise ValueError(f"Blocks.{name}={getattr(blocks, name)} gives {count} chunks (> {MAX_GRID_YZ})")


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      blocks: Blocks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B,H,Nq,Dv) in q's dtype and lse (B,H,Nq) float32. Inputs may have any strides."""
    B, H, n_q, d_qk = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    blocks = blocks or default_blocks(d_qk, d_v, q.device, q.dtype)
    _check_blocks(blocks, d_qk, d_v)
    out = empty((B, H, n_q, d_v), dtype=q.dtype, device=q.device)
    lse = empty((B, H, n_q), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(n_q, blocks.own), B * H, triton.cdiv(d_v, blocks.dv))
    with _on_device(q):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, scale * LOG2E.value, H, n_q, n_k, d_qk, d_v,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            BLOCK_M=blocks.own, BLOCK_N=blocks.stream, BLOCK_DQK=blocks.dqk, BLOCK_DV=blocks.dv,
            ONE_DQK=d_qk <= blocks.dqk, PRECISION=dot_precision(q.dtype),
            num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    return out, lse


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float,
                       blocks: Blocks | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for ``out, lse = attention_forward(q, k, v, scale)`` and the cotangent ``grad_out``."""
    B, H, n_q, d_qk = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    blocks = blocks or default_blocks(d_qk, d_v, q.device, q.dtype, backward=True)
    _check_blocks(blocks, d_qk, d_v)
    lse = lse.contiguous()
    launch = dict(PRECISION=dot_precision(q.dtype), num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    one_dqk, one_dv = d_qk <= blocks.dqk, d_v <= blocks.dv
    delta = empty((B, H, n_q), dtype=torch.float32, device=q.device)
    dq, dk, dv = (empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    common = (scale * LOG2E.value, scale, H, n_q, n_k, d_qk, d_v)
    # Both widths in one chunk: one program per key block writes dk and dv; else one launch each.
    passes = [(True, True, 1)] if one_dqk and one_dv else \
        [(False, True, triton.cdiv(d_v, blocks.dv)), (True, False, triton.cdiv(d_qk, blocks.dqk))]
    with _on_device(q):
        _attn_bwd_delta_kernel[(triton.cdiv(n_q, blocks.own), B * H)](
            out, grad_out, delta, H, n_q, d_v, *out.stride(), *grad_out.stride(),
            BLOCK_M=blocks.own, BLOCK_DV=blocks.dv, num_warps=blocks.num_warps)
        for do_dk, do_dv, chunks in passes:
            _attn_bwd_dkdv_kernel[(triton.cdiv(n_k, blocks.own), B * H, chunks)](
                q, k, v, grad_out, lse, delta, dk, dv, *common,
                *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
                BLOCK_M=blocks.stream, BLOCK_N=blocks.own, BLOCK_DQK=blocks.dqk, BLOCK_DV=blocks.dv,
                ONE_DQK=one_dqk, ONE_DV=one_dv, DO_DK=do_dk, DO_DV=do_dv, **launch)
        _attn_bwd_dq_kernel[(triton.cdiv(n_q, blocks.own), B * H, triton.cdiv(d_qk, blocks.dqk))](
            q, k, v, grad_out, lse, delta, dq, *common,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            BLOCK_M=blocks.own, BLOCK_N=blocks.stream, BLOCK_DQK=blocks.dqk, BLOCK_DV=blocks.dv,
            ONE_DQK=one_dqk, ONE_DV=one_dv, **launch)
    return dq, dk, dv
