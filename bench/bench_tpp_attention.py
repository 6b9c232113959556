"""tpp_attention benchmark: BridgeNet's TPP at 1/16 scale of NYUD 448x576 plus a sweep over N.

Providers: mtlfast (the fused Triton kernel on a GPU), the eager literal reference, torch.compile of the
reference, and SDPA on the widened rewrite (each SDPA backend separately). The widened rewrite is exact:

    Σ_c W[j, c] · scale · q_c k_cᵀ = scale · [W[j,1] q_1 | … | W[j,C] q_C] [k_1 | … | k_C]ᵀ,

so output map j is ordinary attention with queries and keys of width C·D (C = T·H; the bias cancels in
the softmax and is dropped). It costs C times the literal QK FLOPs, and C·D exceeds the 256 limit of
SDPA's flash backend at every BridgeNet shape.

Shapes: TPP runs on the 1/16-scale task features (28 x 36 = 1008 tokens for a 448 x 576 NYUD crop),
T = 4 tasks, H = 2 heads of width 288 (decoder stage dim 576, DESIGN.md §4), batch 6 (the paper's), queries
and keys over all tokens (BridgeNet may downsample them; this is the upper bound), per-task mix weights
with bias. The sweep varies N = Nq = Nk at batch 1 to show the O(N) memory of the kernel
(target: <= 1/20 of eager at N = 4096). ``tpp_bridgenet_s32`` is the shape this library's BridgeNet runs
(models/bridgenet.py: TPP at embed_dim 512 = 2 heads of 256 on the coarsest ViT level, 14 x 18 at 1/32,
queries by the stride-2 conv and keys pooled by 2: 7 x 9 = 63 each, batch 6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mtlfast.ops
from mtlfast.bench.bench_attention import flash_backward_factor
from mtlfast.bench.harness import (Benchmark, Case, Provider, Target, register, saved_bytes_eager_vs_kernel,
                                   standard_providers)
from mtlfast.reference import tpp_attention as reference


def widened_rewrite(q, k, mix_weight):
    """(queries (B, T·H, Nq, C·D), keys (B, T·H, Nk, C·D)) whose plain dot products are the mixed maps
    Σ_c W[j, c] q_c k_cᵀ, j = t·H + o (a shared (H, T·H) weight is expanded over the tasks)."""
    B, T, H, Nq, D = q.shape
    C = T * H
    w = mix_weight.expand(T, H, C).reshape(C, C)
    q_wide = (w[None, :, :, None, None] * q.flatten(1, 2)[:, None]).permute(0, 1, 3, 2, 4).reshape(B, C, Nq, C * D)
    k_wide = k.flatten(1, 2).permute(0, 2, 1, 3).reshape(B, 1, k.shape[3], C * D).expand(B, C, -1, -1)
    return q_wide, k_wide


def _sdpa_widened(backend):
    def run(q, k, v, mix_weight, mix_bias=None, *, scale=None):
        B, T, H, Nq, D = q.shape
        q_wide, k_wide = widened_rewrite(q, k, mix_weight)
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q_wide, k_wide, v.flatten(1, 2), scale=D ** -0.5 if scale is None else scale)
        return out.view(B, T, H, Nq, -1)
    return run


def _flash_refuse(inputs):
    width = inputs["q"].shape[1] * inputs["q"].shape[2] * inputs["q"].shape[4]
    if width > 256 or width != inputs["v"].shape[-1]:
        return f"SDPA flash needs equal q/v widths <= 256; the widened queries are {width} wide"
    return None


def _case(name, B, T, H, Nq, Nk, D, Dv):
    def make(device, dtype):
        g = torch.Generator().manual_seed(0)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        C = T * H
        return {"q": rand(B, T, H, Nq, D), "k": rand(B, T, H, Nk, D), "v": rand(B, T, H, Nk, Dv),
                "mix_weight": rand(T, H, C, scale=C ** -0.5), "mix_bias": rand(T, H)}

    flops = 2.0 * B * T * H * Nq * Nk * (D + Dv)  # literal QK + PV (the mixing is not counted)
    return Case(name, make, flops=flops, backward_factor=flash_backward_factor(D, Dv),
                params=dict(B=B, T=T, H=H, Nq=Nq, Nk=Nk, D=D, Dv=Dv, **_saved_memory(B, T, H, Nq, Nk, D, Dv)))


def _saved_memory(B, T, H, Nq, Nk, D, Dv, dtype=torch.bfloat16) -> dict[str, object]:
    """Bytes autograd keeps for the backward (counted on meta tensors): the literal reference vs the
    Triton path (as the op runs it: centred keys, expanded weight; the kernels' fake implementations)."""
    from mtlfast.ops.tpp_attention import _triton

    C = T * H
    shapes = {"q": (B, T, H, Nq, D), "k": (B, T, H, Nk, D), "v": (B, T, H, Nk, Dv), "mix_weight": (T, H, C),
              "mix_bias": (T, H)}
    return saved_bytes_eager_vs_kernel(reference.tpp_attention, lambda **kw: _triton(**kw, scale=D ** -0.5), shapes,
                                       dtype)


def cases(device):
    if device != "cuda":  # eager / compile only on CPU: small shapes
        return [_case("tpp_cpu_n256", 1, 4, 2, 256, 256, 64, 64)]
    return ([_case("tpp_nyud_s16", 6, 4, 2, 1008, 1008, 288, 288),
             _case("tpp_bridgenet_s32", 6, 4, 2, 63, 63, 256, 256)]
            + [_case(f"tpp_sweep_n{n}", 1, 4, 2, n, n, 288, 288) for n in (256, 1024, 2048, 4096)])


_BACKENDS = {"sdpa_math": "MATH", "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
             "sdpa_flash": "FLASH_ATTENTION"}

register(Benchmark(
    "tpp_attention", cases,
    standard_providers("tpp_attention", mtlfast.ops.tpp_attention, reference.tpp_attention)
    + [Provider(name, _sdpa_widened(getattr(SDPBackend, backend)),
                devices=("cuda", "cpu") if name == "sdpa_math" else ("cuda",),
                refuse=_flash_refuse if name == "sdpa_flash" else (lambda inputs: None))
       for name, backend in _BACKENDS.items()],
    targets=[  # issue 3, bf16 on an H100/H200, T = 4, H = 2
        Target(">= 3x eager", r"tpp_.*", "speedup", against=("eager",), at_least=3.0),
        Target(">= 1.3x the best SDPA path on the widened rewrite", r"tpp_.*", "speedup", against=("sdpa_.*",),
               at_least=1.3),
        Target("saved activations <= 1/20 of eager at N = 4096", r"tpp_sweep_n4096", "param:saved_ratio",
               at_most=0.05),
    ]))
