"""Triton kernels of ``deform_sample`` (DESIGN.md §3 op 6; SEM eq. 1-4): the low-memory, deterministic path.

out[b, n] = Σ_s w[b, n, s] Σ_k c_k(p_bn) values[s][b, :, y_k, x_k] with grid_sample's bilinear corners k
(padding zeros, align_corners=False): ix = ((x + 1) W_s - 1) / 2, x0 = floor(ix), fx = ix - x0 (likewise y);
c_00 = (1-fx)(1-fy), c_01 = fx(1-fy), c_10 = (1-fx)fy, c_11 = fx fy for the corners (y0, x0), (y0, x0+1),
(y0+1, x0), (y0+1, x0+1); out-of-image corners read zero.

Per stage s (one launch each; stages may differ in size and layout):

- ``_forward_kernel``, grid (N / BLOCK_N, C / BLOCK_C, B): the four corner rows of BLOCK_N points, weighted,
  added to a float32 (B, N, C) accumulator (the first stage stores, the others load-add-store; one cast at
  the end).
- ``_point_grad_kernel``, grid (N / BLOCK_N, B): the corner dots d_k = <g_bn, corner row k> over C chunks,
  then ∂L/∂w_s = Σ_k c_k d_k and ∂L/∂(x, y) += w_s (W_s/2 ((1-fy)(d01-d00) + fy(d11-d10)),
  H_s/2 ((1-fx)(d10-d00) + fx(d11-d01))) (float32 accumulator over stages).
- The value gradient is a GATHER, not an atomic scatter: ``_corner_keys_kernel`` lists every in-image corner
  contribution as (pixel key b·H·W + y·W + x, c_k w_s); a stable sort by key (torch.sort) groups them by
  pixel in increasing point order, a binary search (torch.searchsorted) gives each pixel's range, and
  ``_gather_kernel``, grid (B·H·W / BLOCK_P, C / BLOCK_C), sums each pixel's contributions c_k w_s g_bn in
  float32 and writes the gradient once, in the values' dtype, channels-last. No float32 copy of the values' size
  exists and the sum order is fixed: the value gradient is bit-identical from run to run (grid_sample's
  atomics are not).

The backward computes the point/weight gradients first (they read the values), drops the channels-last copy
of a stage that was not channels-last, and only then allocates that stage's value gradient: its peak is about
the values' size V, where the CUDA kernel's fp32 atomic buffers take 3V. The coefficients of the gather are
computed once, by the kernel that lists them, so the corner a contribution goes to and its weight come from
one evaluation of the coordinates.

Every load is converted to float32, so the values may be 16-bit while the points and weights are float32 (mixed
precision): the output and value gradients take the values' dtype, the point/weight gradients the points'.

GPU rules: all aranges are powers of two, there are no dots; sizes are masked, so any B, N, C, H, W >= 1 work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mtlfast._alloc import empty
from mtlfast.kernels.attention import _on_device

#: The gather's pixel keys (B·H_s·W_s + 1 per stage) and corner entries (4·B·N) are int32.
MAX_KEYS = 2 ** 31 - 2


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int  # points per program (forward, point gradients; the corner-key kernel takes 4x as many)
    block_c: int  # channels per program (forward, gather) or per chunk (point gradients)
    block_p: int  # pixels per program of the gather
    num_warps: int


def launch_config(channels: int, device: torch.device) -> LaunchConfig:
    """GPU: 32 points x 64 channels (each corner row a 128-byte bf16 segment of a channels-last stage), 4 warps:
    chosen without a GPU (compiles for sm_90 without local memory), not yet timed. Under the interpreter few,
    large programs."""
    on_gpu = device.type == "cuda"
    block_c = min(triton.next_power_of_2(channels), 64 if on_gpu else 128)
    if on_gpu:
        return LaunchConfig(block_n=32, block_c=block_c, block_p=32, num_warps=4)
    return LaunchConfig(block_n=64, block_c=block_c, block_p=64, num_warps=4)


@triton.jit
def _corner_coordinates(P, WTS, row, s, S, mask, H, W):
    """Point rows ``row`` (b·N + n): x0, y0 (int32), fx, fy, the stage weight w (float32) and whether the point
    is finite (|NaN| < inf is false). Coordinates are clamped to [-2, size + 1] first, which keeps every
    out-of-image corner out of the image and the int32 conversion in range for points of any magnitude (the
    forward then writes NaN at non-finite points)."""
    px = tl.load(P + row * 2, mask=mask, other=0.0).to(tl.float32)
    py = tl.load(P + row * 2 + 1, mask=mask, other=0.0).to(tl.float32)
    finite = (tl.abs(px) < float("inf")) & (tl.abs(py) < float("inf"))
    w = tl.load(WTS + row * S + s, mask=mask, other=0.0).to(tl.float32)
    ix = ((px + 1.0) * W - 1.0) * 0.5
    iy = ((py + 1.0) * H - 1.0) * 0.5
    ix = tl.minimum(tl.maximum(ix, -2.0), W + 1.0)
    iy = tl.minimum(tl.maximum(iy, -2.0), H + 1.0)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    return x0f.to(tl.int32), y0f.to(tl.int32), ix - x0f, iy - y0f, w, finite


@triton.jit
def _corner_weight(fx, fy, w, K: tl.constexpr):
    """c_k · w for corner K = 0..3 at (y0 + K // 2, x0 + K % 2)."""
    return (fx if K % 2 else 1.0 - fx) * (fy if K // 2 else 1.0 - fy) * w


@triton.jit
def _corner_rows(V, b, x, y, mask, H, W, sv_b, sv_h, sv_w):
    """Offsets of the corner rows (int64) and whether each is inside the image."""
    inside = mask & (x >= 0) & (x < W) & (y >= 0) & (y < H)
    offset = b.to(tl.int64) * sv_b + y.to(tl.int64) * sv_h + x.to(tl.int64) * sv_w
    return V + tl.where(inside, offset, 0), inside


@triton.jit
def _forward_kernel(V, P, WTS, ACC, s, S, N, C, H, W, sv_b, sv_c, sv_h, sv_w,
                    FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    n_mask = n < N
    c_mask = c < C
    row = b * N + n
    x0, y0, fx, fy, w, finite = _corner_coordinates(P, WTS, row, s, S, n_mask, H, W)
    c_off = c.to(tl.int64)[None, :] * sv_c
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(4):
        coef = _corner_weight(fx, fy, w, k)
        base, inside = _corner_rows(V, b, x0 + k % 2, y0 + k // 2, n_mask, H, W, sv_b, sv_h, sv_w)
        v = tl.load(base[:, None] + c_off, mask=inside[:, None] & c_mask[None, :], other=0.0)
        acc += coef[:, None] * v.to(tl.float32)
    acc = tl.where(finite[:, None], acc, float("nan"))  # CPU grid_sample's value there (weights inf - inf, or NaN)
    out = ACC + row.to(tl.int64)[:, None] * C + c[None, :]
    mask = n_mask[:, None] & c_mask[None, :]
    if not FIRST:
        acc += tl.load(out, mask=mask, other=0.0)
    tl.store(out, acc, mask=mask)


@triton.jit
def _row_dots(g, base, inside, c_off, c_mask):
    """<g_n, corner row_n> over one channel chunk, per point (float32)."""
    v = tl.load(base[:, None] + c_off, mask=inside[:, None] & c_mask[None, :], other=0.0)
    return tl.sum(g * v.to(tl.float32), 1)


@triton.jit
def _point_grad_kernel(V, P, WTS, G, GP, GW, s, S, N, C, H, W, sv_b, sv_c, sv_h, sv_w,
                       FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1)
    n_mask = n < N
    row = b * N + n
    x0, y0, fx, fy, w, _ = _corner_coordinates(P, WTS, row, s, S, n_mask, H, W)
    b00, in00 = _corner_rows(V, b, x0, y0, n_mask, H, W, sv_b, sv_h, sv_w)
    b01, in01 = _corner_rows(V, b, x0 + 1, y0, n_mask, H, W, sv_b, sv_h, sv_w)
    b10, in10 = _corner_rows(V, b, x0, y0 + 1, n_mask, H, W, sv_b, sv_h, sv_w)
    b11, in11 = _corner_rows(V, b, x0 + 1, y0 + 1, n_mask, H, W, sv_b, sv_h, sv_w)
    d00 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    d01 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    d10 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    d11 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_rows = G + row.to(tl.int64)[:, None] * C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        c_off = c.to(tl.int64)[None, :] * sv_c
        g = tl.load(g_rows + c[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        d00 += _row_dots(g, b00, in00, c_off, c_mask)
        d01 += _row_dots(g, b01, in01, c_off, c_mask)
        d10 += _row_dots(g, b10, in10, c_off, c_mask)
        d11 += _row_dots(g, b11, in11, c_off, c_mask)
    grad_w = (1.0 - fx) * (1.0 - fy) * d00 + fx * (1.0 - fy) * d01 + (1.0 - fx) * fy * d10 + fx * fy * d11
    grad_x = w * (W * 0.5) * ((1.0 - fy) * (d01 - d00) + fy * (d11 - d10))
    grad_y = w * (H * 0.5) * ((1.0 - fx) * (d10 - d00) + fx * (d11 - d01))
    tl.store(GW + row * S + s, grad_w.to(GW.dtype.element_ty), mask=n_mask)
    if not FIRST:
        grad_x += tl.load(GP + row * 2, mask=n_mask, other=0.0)
        grad_y += tl.load(GP + row * 2 + 1, mask=n_mask, other=0.0)
    tl.store(GP + row * 2, grad_x, mask=n_mask)
    tl.store(GP + row * 2 + 1, grad_y, mask=n_mask)


@triton.jit
def _corner_keys_kernel(P, WTS, KEYS, COEF, s, S, N, BN, H, W, num_pixels, BLOCK: tl.constexpr):
    """Entry 4·row + k: the pixel key b·H·W + y·W + x of corner k of point row (b·N + n), or the sentinel
    ``num_pixels`` (= B·H·W) if that corner is outside the image; and its weight c_k w_s."""
    row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = row < BN
    x0, y0, fx, fy, w, _ = _corner_coordinates(P, WTS, row, s, S, mask, H, W)
    b = row // N
    for k in tl.static_range(4):
        x = x0 + k % 2
        y = y0 + k // 2
        inside = (x >= 0) & (x < W) & (y >= 0) & (y < H)
        key = tl.where(inside, (b * H + y) * W + x, num_pixels)
        coef = _corner_weight(fx, fy, w, k)
        tl.store(KEYS + row * 4 + k, key, mask=mask)
        tl.store(COEF + row * 4 + k, coef, mask=mask)


@triton.jit
def _gather_kernel(G, ROWS, COEF, START, COUNT, GV, num_pixels, C,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """GV[pixel, c] = Σ over the pixel's entries j (in sorted order) of COEF[j] · G[ROWS[j], c]."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < num_pixels
    c_mask = c < C
    start = tl.load(START + p, mask=p_mask, other=0)
    count = tl.load(COUNT + p, mask=p_mask, other=0)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for j in range(0, tl.max(count, 0)):
        has = j < count
        entry = start + j
        g_row = tl.load(ROWS + entry, mask=has, other=0).to(tl.int64)
        coef = tl.load(COEF + entry, mask=has, other=0.0)
        g = tl.load(G + g_row[:, None] * C + c[None, :], mask=has[:, None] & c_mask[None, :], other=0.0)
        acc += coef[:, None] * g.to(tl.float32)
    out = GV + p.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(out, acc.to(GV.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


def _strides(v: torch.Tensor) -> tuple[int, int, int, int]:
    return v.stride(0), v.stride(1), v.stride(2), v.stride(3)


def _channels_last(v: torch.Tensor) -> torch.Tensor:
    """The stage as the kernels read it best: channel rows contiguous (a copy only if it is not already)."""
    return v.contiguous(memory_format=torch.channels_last)


def forward(values: list[torch.Tensor], points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, N, C) = Σ_s weights[..., s] · bilinear(values[s], points); the stages are read channels-last."""
    with _on_device(points):
        return _forward(values, points, weights)


def _forward(values, points, weights):
    B, N, _ = points.shape
    C, S = values[0].shape[1], len(values)
    cfg = launch_config(C, points.device)
    points, weights = points.contiguous(), weights.contiguous()
    acc = empty((B, N, C), device=points.device, dtype=torch.float32)  # the first stage writes every element
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(C, cfg.block_c), B)
    for s, stage in enumerate(values):
        v = _channels_last(stage)
        _forward_kernel[grid](v, points, weights, acc, s, S, N, C, v.shape[2], v.shape[3], *_strides(v),
                              FIRST=s == 0, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return acc.to(values[0].dtype)


def _value_gradient(grad_out: torch.Tensor, points: torch.Tensor, weights: torch.Tensor, s: int, H: int, W: int,
                    cfg: LaunchConfig) -> torch.Tensor:
    """The gradient of stage s (B, C, H, W), channels-last, by the sorted gather."""
    B, N, C = grad_out.shape
    S = weights.shape[2]
    device = points.device
    keys = torch.empty(B * N * 4, device=device, dtype=torch.int32)
    coef = torch.empty(B * N * 4, device=device, dtype=torch.float32)
    block = cfg.block_n * 4
    num_pixels = B * H * W
    _corner_keys_kernel[(triton.cdiv(B * N, block),)](points, weights, keys, coef, s, S, N, B * N, H, W, num_pixels,
                                                       BLOCK=block, num_warps=cfg.num_warps)
    sorted_keys, order = torch.sort(keys, stable=True)
    # Pixel p's entries are the run [start_p, start_p + count_p) of the sorted keys: found by binary search, which
    # is deterministic on every device (CUDA's bincount uses atomics and refuses deterministic mode in some torch
    # releases), so this path serves torch.use_deterministic_algorithms(True).
    bounds = torch.searchsorted(sorted_keys, torch.arange(num_pixels + 1, device=device, dtype=keys.dtype))
    start, count = bounds[:-1], bounds.diff()
    rows = (order // 4).to(torch.int32)
    coef = coef[order]
    del keys, sorted_keys, order, bounds
    grad = empty((B, H, W, C), device=device, dtype=grad_out.dtype)
    grid = (triton.cdiv(num_pixels, cfg.block_p), triton.cdiv(C, cfg.block_c))
    _gather_kernel[grid](grad_out, rows, coef, start, count, grad, num_pixels, C,
                         BLOCK_P=cfg.block_p, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return grad.permute(0, 3, 1, 2)


def backward(grad_out: torch.Tensor, values: list[torch.Tensor], points: torch.Tensor, weights: torch.Tensor):
    """-> (value gradients (channels-last (B, C, H_s, W_s) views), ∂L/∂points, ∂L/∂weights)."""
    with _on_device(points):
        return _backward(grad_out, values, points, weights)


def _backward(grad_out, values, points, weights):
    B, N, C = grad_out.shape
    S = len(values)
    cfg = launch_config(C, points.device)
    grad_out, points, weights = grad_out.contiguous(), points.contiguous(), weights.contiguous()
    grad_points = empty((B, N, 2), device=points.device, dtype=torch.float32)
    grad_weights = empty((B, N, S), device=points.device, dtype=weights.dtype)
    grad_values = []
    for s, stage in enumerate(values):
        v = _channels_last(stage)
        H, W = v.shape[2], v.shape[3]
        _point_grad_kernel[(triton.cdiv(N, cfg.block_n), B)](
            v, points, weights, grad_out, grad_points, grad_weights, s, S, N, C, H, W, *_strides(v),
            FIRST=s == 0, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
        del v  # a channels-last copy is not needed by the gather: freed before its gradient is allocated
        grad_values.append(_value_gradient(grad_out, points, weights, s, H, W, cfg))
    return grad_values, grad_points.to(points.dtype), grad_weights
