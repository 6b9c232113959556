"""attention benchmark: BridgeNet's BFE shapes at NYUD 448x576, plus sweeps over N and head width.

Providers: mtlfast (the Triton kernel on a GPU), mtlfast_no_tails (the same kernels with every head width a
padded power of two or chunks, no tails: what the tails buy at 72/144/288/384), the eager literal reference, torch.compile of the
reference, F.scaled_dot_product_attention pinned to each backend (flash / efficient / cudnn / math; on a
GPU a backend that does not accept the shape is skipped with PyTorch's own verdict; on a CPU only flash
and math run, PyTorch's CPU kernels), and xformers' memory_efficient_attention when xformers is
importable.

Shapes (our reading of BridgeNet's official code, DESIGN.md §4): the decoder stages at 1/32, 1/16, 1/8 of
a 448 x 576 crop (grids 14x18, 28x36, 56x72) have widths 576/288/144 split into 2 heads (288/144/72);
queries come from a stride-2 depth-wise conv (grids 7x9, 14x18, 28x36), keys/values from average
pooling with stride 2/4/8 (grid 7x9 at every stage) of each of the T = 4 task maps, concatenated along
the tokens (Nk = 4 x 63 = 252). ``bfe_vit_s16`` is the 1/16 stage with the ViT-L decoder width 768
(2 heads of 384). ``bfe_official_s32/s16/s8`` are the stages of the official ViT layout that the ViT configs
use (models/bridgenet.py): the generic features stay at stride 16, so every stage has 14x18 = 252 queries,
with the task maps at 1/32, 1/16, 1/8 pooled to 7x9 again. Batch 6. The sweeps: N = Nq = Nk over {1024, 4096, 8192} at width 128 (8 heads) for
the "forward >= 50% of the matmul rate" target, and widths {64, 128, 256, 288, 512, 1024, 4096} at
N = 4096 (2 heads), where SDPA's flash path stops at 256.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mtlfast.bench.harness import Benchmark, Case, Provider, Target, register, standard_providers
from mtlfast.ops.attention import attention
from mtlfast.reference.attention import attention as reference_attention

SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}
_CAN_USE = {"sdpa_flash": "can_use_flash_attention", "sdpa_efficient": "can_use_efficient_attention",
            "sdpa_cudnn": "can_use_cudnn_attention"}


def sdpa_providers(to_sdpa: Callable[..., tuple], from_sdpa: Callable = lambda out, **inputs: out) -> list[Provider]:
    """One provider per SDPA backend (and xformers if importable) for an op that reduces to attention.

    ``to_sdpa(**inputs) -> (q, k, v, scale)`` in SDPA's (B, H, N, D) layout, ``from_sdpa(out, **inputs)``
    maps the result back to the op's output (both run inside the timed call).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def make(backend):
        def run(**inputs):
            q, k, v, scale = to_sdpa(**inputs)
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            return from_sdpa(out, **inputs)
        return run

    def make_refuse(name):
        def refuse(inputs):
            q, k, v, _ = to_sdpa(**inputs)
            if q.device.type != "cuda":  # CPU: math takes anything, flash needs equal q/v widths
                if name == "sdpa_flash" and q.shape[-1] != v.shape[-1]:
                    return f"SDPA flash on CPU needs equal q/k and v widths, got {q.shape[-1]} and {v.shape[-1]}"
                return None
            if name not in _CAN_USE:
                return None
            params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
            if not getattr(torch.backends.cuda, _CAN_USE[name])(params):
                return f"{name} does not accept q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} {q.dtype}"
            return None
        return refuse

    cpu_too = ("sdpa_flash", "sdpa_math")  # PyTorch has CPU kernels for these two
    providers = [Provider(name, make(getattr(SDPBackend, backend)), refuse=make_refuse(name),
                          devices=("cuda", "cpu") if name in cpu_too else ("cuda",))
                 for name, backend in SDPA_BACKENDS.items()]
    try:
        import xformers.ops as xops
    except Exception:  # not installed (or broken): no provider
        return providers

    def xformers_run(**inputs):
        q, k, v, scale = to_sdpa(**inputs)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return from_sdpa(out.transpose(1, 2), **inputs)

    return providers + [Provider("xformers", xformers_run, devices=("cuda",))]


def flash_backward_factor(d_qk: float, d_v: float) -> float:
    """Backward FLOPs over forward FLOPs of flash-style attention, FlashAttention-2's count: the forward's
    q kᵀ (width d_qk) and P v (width d_v) against the backward's recomputed q kᵀ, dv = Pᵀ dO, dP = dO vᵀ,
    dq = dS k and dk = dSᵀ q: (3 d_qk + 2 d_v) / (d_qk + d_v), 2.5 for equal widths."""
    return (3 * d_qk + 2 * d_v) / (d_qk + d_v)


def _attention_case(name, B, H, n_q, n_k, d_qk, d_v):
    def make(device, dtype):
        g = torch.Generator().manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        return {"q": rand(B, H, n_q, d_qk), "k": rand(B, H, n_k, d_qk), "v": rand(B, H, n_k, d_v)}

    return Case(name, make, flops=2.0 * B * H * n_q * n_k * (d_qk + d_v),
                backward_factor=flash_backward_factor(d_qk, d_v),
                params=dict(B=B, H=H, Nq=n_q, Nk=n_k, Dqk=d_qk, Dv=d_v))


def cases(device):
    if device != "cuda":  # eager / compile only on a CPU: small shapes
        return [_attention_case("attn_cpu_n256", 1, 2, 256, 256, 64, 64),
                _attention_case("attn_cpu_w288", 1, 2, 256, 252, 288, 288)]
    T, B = 4, 6
    bfe = [("bfe_s32", 7 * 9, 288), ("bfe_s16", 14 * 18, 144), ("bfe_s8", 28 * 36, 72), ("bfe_vit_s16", 14 * 18, 384),
           ("bfe_official_s32", 14 * 18, 288), ("bfe_official_s16", 14 * 18, 144), ("bfe_official_s8", 14 * 18, 72)]
    return ([_attention_case(name, B, 2, n_q, T * 7 * 9, w, w) for name, n_q, w in bfe]
            + [_attention_case(f"sweep_n{n}_w128", 1, 8, n, n, 128, 128) for n in (1024, 4096, 8192)]
            + [_attention_case(f"sweep_w{w}_n4096", 1, 2, 4096, 4096, w, w)
               for w in (64, 128, 256, 288, 512, 1024, 4096)])


def _no_tails(q, k, v):
    """The Triton kernels with :func:`~mtlfast.kernels.attention.default_blocks` (tails=False): each head width
    a padded power of two or chunks, recomputing q kᵀ per output chunk (the configuration before tails)."""
    from mtlfast.kernels.attention import default_blocks
    from mtlfast.ops.attention import attention_triton

    d_qk, d_v = q.shape[-1], v.shape[-1]
    fwd, bwd = (default_blocks(d_qk, d_v, q.device, q.dtype, backward=b, tails=False) for b in (False, True))
    return attention_triton(q, k, v, scale=d_qk ** -0.5, fwd_blocks=fwd, bwd_blocks=bwd)


register(Benchmark(
    "attention", cases,
    standard_providers("attention", attention, reference_attention)
    + [Provider("mtlfast_no_tails", _no_tails, devices=("cuda",))]
    + sdpa_providers(lambda q, k, v, scale=None: (q, k, v, scale)),
    targets=[  # issue 3, bf16 on an H100/H200
        Target(">= 0.9x the best SDPA backend (widths <= 256)",
               r"bfe_(official_)?s(16|8)|sweep_n\d+_w128|sweep_w(64|128|256)_n4096", "speedup",
               against=("sdpa_.*", "xformers"), at_least=0.9),
        Target(">= 2x the best PyTorch path (widths 288-4096)",
               r"bfe_(official_)?s32|bfe_vit_s16|sweep_w(288|512|1024|4096)_n4096", "speedup",
               against=("eager", "compile", "sdpa_.*", "xformers"), at_least=2.0),
        Target("forward >= 50% of the bf16 matmul rate (N >= 4096, width 128)", r"sweep_n(4096|8192)_w128",
               "pct_matmul_peak", mode="fwd", at_least=50.0),
    ]))
