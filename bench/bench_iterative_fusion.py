"""iterative_fusion benchmark: the TPIM network's Iterative Fusion Block at NYUD shapes.

Providers: mtlfast (backend auto, mode auto; its rows record the mode auto chose), mtlfast_materialize and
mtlfast_recompute (the two kernel modes pinned, GPU only), the eager literal reference, torch.compile of the
reference.

Shapes (TPIM paper, NYUD 448x576 crops): the pixel-wise global attention runs on features downscaled to
1/16 and 1/8 (token grids 28x36 = 1008 and 56x72 = 4032) with C = 256 value channels, n = 18 iterations
(the NYUD setting), variant C, α = 0.3. Every ordered task pair of a TPIM layer is one batch entry:
B = batch · T·(T − 1) with batch 2 and T = 2 or 4 tasks. The paper does not give the width d of the
reduced queries/keys; we take D = 64. ``n16k_*`` is the large-N case for the recompute mode: 128x128
tokens, where the eager path holds B·N² attention weights plus n·B·N·C saved products (at batch 4, T = 4:
37 GB saved by eager, 1.2 GB by the kernel path).

Each case records, in ``params``, the bytes autograd saves for the backward (inputs excluded) by the eager
reference and by the kernel path, measured with saved-tensor hooks on meta tensors (exact, device
independent; both kernel modes save the same tensors): the target is mtlfast <= 1/5 of eager.
"""
from __future__ import annotations

import torch

from mtlfast.bench.harness import (Benchmark, Case, Provider, Target, register, saved_bytes_eager_vs_kernel,
                                   standard_providers)
from mtlfast.ops.iterative_fusion import choose_materialize, iterative_fusion
from mtlfast.reference.iterative_fusion import iterative_fusion as reference

N_ITER = 18
C = 256
D = 64
BATCH = 2


def _saved_memory(B, N, c, d, n_iter, dtype=torch.bfloat16) -> dict[str, object]:
    """Bytes kept for the backward (meta tensors; alpha in ``dtype`` as the benchmark's inputs): the eager reference
    vs the kernel path (both modes save the same tensors)."""
    def kernel(q, k, v, alpha):
        return torch.ops.mtlfast.iterative_fusion_fwd(q, k, v, alpha, n_iter, d ** -0.5, "C", False)[0]

    return saved_bytes_eager_vs_kernel(lambda **kw: reference(**kw, n_iter=n_iter), kernel,
                                       {"q": (B, N, d), "k": (B, N, d), "v": (B, N, c), "alpha": ()}, dtype)


def _case(name, B, N, c=C, d=D, n_iter=N_ITER):
    def make(device, dtype):
        g = torch.Generator().manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        return {"q": rand(B, N, d), "k": rand(B, N, d), "v": rand(B, N, c),
                "alpha": torch.tensor(0.3, device=device, dtype=dtype), "n_iter": n_iter}

    flops = 2 * B * N * N * d + n_iter * 2 * B * N * N * c  # scores once, n products Co·Vᵗ
    params = {"B": B, "N": N, "C": c, "D": d, "n_iter": n_iter, "variant": "C", **_saved_memory(B, N, c, d, n_iter)}
    return Case(name, make, flops=flops, params=params)


def cases(device: str) -> list[Case]:
    if device != "cuda":
        return [_case("cpu_small", B=2, N=64, c=32, d=16, n_iter=4)]
    out = []
    for grid, N in (("28x36", 28 * 36), ("56x72", 56 * 72)):
        for T in (2, 4):
            out.append(_case(f"n{grid}_T{T}", B=BATCH * T * (T - 1), N=N))
    out += [_case("n16k_T2", B=BATCH * 2, N=128 * 128), _case("n16k_T4", B=BATCH * 12, N=128 * 128),
            _case("n16k_T4_b4", B=4 * 12, N=128 * 128)]
    return out


def _pinned(mode):
    def run(**inputs):
        return iterative_fusion(**inputs, mode=mode, backend="triton")
    return run


def _auto_mode(inputs) -> dict[str, str]:
    """The mode ``auto`` takes on these inputs now (it reads the free device memory)."""
    return {"mode": "materialize" if choose_materialize("auto", inputs["q"]) else "recompute"}


register(Benchmark("iterative_fusion", cases,
                   standard_providers("iterative_fusion", iterative_fusion, reference, resolve=_auto_mode)
                   + [Provider(f"mtlfast_{mode}", _pinned(mode), devices=("cuda",))
                      for mode in ("materialize", "recompute")],
                   targets=[  # issue 4, bf16 on an H100/H200, n = 18
                       Target(">= 3x eager", r"n(28x36|56x72)_T[24]", "speedup", against=("eager",), at_least=3.0),
                       Target(">= 1.5x torch.compile", r"n(28x36|56x72)_T[24]", "speedup", against=("compile",),
                              at_least=1.5),
                       Target("saved activations <= 1/5 of eager", r"n.*", "param:saved_ratio", at_most=0.2),
                       Target("recompute mode runs N = 16k", r"n16k_.*", "runs", provider="mtlfast_recompute",
                              against=("eager",), at_least=1.0),
                   ]))
