"""deform_sample benchmark: SEM's hierarchy-adaptive key sampling (4 stages, per-point stage weights).

Providers: mtlfast (backend ``auto``: the CUDA kernel on a GPU, the C++ OpenMP kernel on a CPU),
mtlfast_triton (the Triton path: deterministic gather backward, peak about the values' size; GPU only), the
eager reference (one F.grid_sample per stage + weighted sum) and torch.compile of the reference.

Shapes. GPU: a Swin-style 4-stage pyramid of a 448 x 576 NYUD crop (strides 4/8/16/32: grids 112x144,
56x72, 28x36, 14x18), C = 256 and 512, batch 4. The deformed points follow SEM eq. 1: reference grids of
stride r_s per stage, N = Σ_s ⌊H_s/r_s⌋⌊W_s/r_s⌋; ``r8421`` uses r_s = 8, 4, 2, 1 (every stage contributes
14 x 18 points, N = 1008), ``r2`` uses r_s = 2 everywhere (N = 5355). CPU: the issue's target shape C = 256,
N = 4096 on the same pyramid for a 224 x 288 crop (56x72 ... 7x9), batch 2. Points are the normalised
reference points plus tanh offsets of up to 1/4 of the image (some leave [-1, 1]); weights a softmax over
the stages (SEM eq. 3). Values are ordinary contiguous (B, C, H, W) tensors, i.e. the kernels' channels-last
copy is inside the measured time (and its memory in the peak), except in the ``_cl`` case, whose values are
channels-last already (as a channels-last model would produce them; the reference gets the same tensors).
``_mixed``: values in the run's dtype with float32 points and weights, as SEM calls it under a 16-bit autocast
(deform_sample's mixed precision); the reference then samples float32 copies of the values, as grid_sample code
does under autocast (grid_sample is on autocast's float32 list), and casts the result back.

``elements`` is the compulsory traffic of the forward (values, points and weights read once, output
written); GB/s takes the run's element size (also for the float32 points and weights of ``_mixed``).
"""
from __future__ import annotations

import torch

from mtlfast.bench.harness import Benchmark, Case, Provider, Target, register, standard_providers
from mtlfast.ops.deform_sample import deform_sample
from mtlfast.reference.deform_sample import deform_sample as reference_deform_sample


def _points(B, sizes, strides, g):
    """SEM eq. 1: stride-r_s reference grids (cell centres, normalised to [-1, 1]) + bounded offsets."""
    pts = []
    for (H, W), r in zip(sizes, strides):
        h, w = H // r, W // r
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, -1, 2).expand(B, -1, -1)
        pts.append(grid + 0.5 * torch.tanh(torch.randn(B, h * w, 2, generator=g)))
    return torch.cat(pts, 1)


def _case(name, B, C, sizes, strides=None, n_points=None, channels_last=False, mixed=False):
    def make(device, dtype):
        g = torch.Generator().manual_seed(0)
        points = (_points(B, sizes, strides, g) if strides is not None
                  else torch.rand(B, n_points, 2, generator=g) * 2.5 - 1.25)
        N = points.shape[1]
        values = [torch.randn(B, C, H, W, generator=g).to(device=device, dtype=dtype) for H, W in sizes]
        if channels_last:
            values = [v.contiguous(memory_format=torch.channels_last) for v in values]
        weights = torch.softmax(torch.randn(B, N, len(sizes), generator=g), -1)
        point_dtype = torch.float32 if mixed else dtype
        return {"values": values, "points": points.to(device=device, dtype=point_dtype),
                "weights": weights.to(device=device, dtype=point_dtype)}

    N = n_points if strides is None else sum((H // r) * (W // r) for (H, W), r in zip(sizes, strides))
    elements = sum(B * C * H * W for H, W in sizes) + B * N * (2 + len(sizes) + C)
    return Case(name, make, elements=elements, params={"B": B, "C": C, "N": N, "stages": sizes, "strides": strides,
                                                       "channels_last": channels_last, "mixed": mixed})


SWIN_448x576 = [(112, 144), (56, 72), (28, 36), (14, 18)]
SWIN_224x288 = [(56, 72), (28, 36), (14, 18), (7, 9)]


def cases(device):
    if device != "cuda":
        return [_case("cpu_c256_n4096", 2, 256, SWIN_224x288, n_points=4096)]
    return [_case(f"sem_c{C}_{tag}", 4, C, SWIN_448x576, strides)
            for C in (256, 512) for tag, strides in (("r8421", (8, 4, 2, 1)), ("r2", (2, 2, 2, 2)))] + [
        _case("sem_c256_r2_cl", 4, 256, SWIN_448x576, (2, 2, 2, 2), channels_last=True),
        _case("sem_c256_r2_mixed", 4, 256, SWIN_448x576, (2, 2, 2, 2), mixed=True)]


#: The issue's targets are over the one-dtype cases; ``_mixed`` (SEM's autocast call) is measured for the record.
_TARGET_CASES = r"sem_(?!.*_mixed$).*"

register(Benchmark("deform_sample", cases,
                   standard_providers("deform_sample", deform_sample, reference_deform_sample)
                   + [Provider("mtlfast_triton", lambda **inputs: deform_sample(**inputs, backend="triton"),
                               devices=("cuda",))],
                   targets=[  # issue 5
                       Target(">= 5x the grid_sample reference (H100/H200)", _TARGET_CASES, "speedup",
                              against=("eager",), at_least=5.0),
                       Target("<= 1/3 of the reference's peak memory (H100/H200)", _TARGET_CASES, "memory",
                              against=("eager",), at_most=1 / 3),
                       # the Triton path is the low-memory one: the same goals, for the record beside the CUDA kernel
                       Target(">= 5x the grid_sample reference, Triton path", _TARGET_CASES, "speedup",
                              against=("eager",), at_least=5.0, provider="mtlfast_triton"),
                       Target("<= 1/3 of the reference's peak memory, Triton path", _TARGET_CASES, "memory",
                              against=("eager",), at_most=1 / 3, provider="mtlfast_triton"),
                       Target(">= 3x the reference on the 2-core CPU", r"cpu_c256_n4096", "speedup", against=("eager",),
                              at_least=3.0, device="cpu"),
                   ]))
