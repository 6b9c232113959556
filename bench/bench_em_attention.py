"""em_attention benchmark: SEM's inter-task EM module at C = 512, K = 64 bases, R = 3 (EMANet) and 5 (SEM),
N from 1k to 16k tokens.

Providers: mtlfast (Triton on a GPU), the eager literal reference and torch.compile of it.

Shapes: B = 8 (batch 2 x 4 NYUD tasks, each task its own EM run from the shared bases), C = 512, K = 64,
N in {1024, 4096, 16384} (16384 = 128 x 128 tokens), full unrolled gradient; plus the EMANet training mode
(``detach_iterations=True``) at the largest N. Tokens have rows of norm about 1 and the bases unit rows, as
after EMANet's normalised projections.

Rates: ``elements`` is (R + 1) reads of x, the roofline issue 4 measures the forward against (the kernel
reads x once per iteration and once for x_rec/z); ``flops`` counts the formula's products, two per iteration
(x μᵀ and zᵀx) and x_rec = z μ once: 2 B N K C (2R + 1) (the kernel's final pass recomputes the last z, which
is not counted); with ``detach_iterations`` one more E step, 2 B N K C (2R + 2), and a backward of two
products only (through that E step and x_rec).

Each case records in ``params`` the bytes autograd saves for the backward (inputs excluded) by the eager
reference and by the kernel path, counted on meta tensors, and those of the kernel path over the issue's
bound of one N x K and one K x C map per iteration (``saved_per_iteration_bound_ratio``, target <= 1).
"""
from __future__ import annotations

import torch

from mtlfast.bench.harness import Benchmark, Case, Target, register, saved_bytes_eager_vs_kernel, standard_providers
from mtlfast.ops.em_attention import em_attention
from mtlfast.reference.em_attention import em_attention as reference_em


def _saved_memory(B, N, C, K, R, detach, dtype=torch.bfloat16) -> dict[str, object]:
    """Bytes kept for the backward (meta tensors): eager reference vs the Triton path, and the Triton path's
    over B·R·(N·K + K·C) elements of ``dtype``."""
    from mtlfast.ops.em_attention import _triton as triton_path

    options = dict(tau=1.0, eps=1e-6, detach_iterations=detach)
    saved = saved_bytes_eager_vs_kernel(lambda x, mu: reference_em(x, mu, R, **options),
                                        lambda x, mu: triton_path(x, mu, R, **options),
                                        {"x": (B, N, C), "mu": (B, K, C)}, dtype)
    bound = B * R * (N * K + K * C) * dtype.itemsize
    return {**saved, "saved_per_iteration_bound_ratio": saved["saved_bytes_mtlfast"] / bound}


def _case(name, B, N, C, K, R, detach=False):
    def make(device, dtype):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, N, C, generator=g) * C ** -0.5
        mu = torch.nn.functional.normalize(torch.randn(B, K, C, generator=g), dim=-1)
        return {"x": x.to(device=device, dtype=dtype), "mu": mu.to(device=device, dtype=dtype), "n_iter": R,
                "detach_iterations": detach}

    products = 2 * R + (2 if detach else 1)  # each 2·B·N·K·C FLOPs
    return Case(name, make, flops=2.0 * B * N * K * C * products, backward_factor=2 / products if detach else 2.0,
                elements=float((R + 1) * B * N * C),
                params=dict(B=B, N=N, C=C, K=K, R=R, detach_iterations=detach, **_saved_memory(B, N, C, K, R, detach)))


def cases(device):
    if device != "cuda":  # eager / compile only on a CPU: small shapes
        return [_case("em_cpu_n1024_r3", 2, 1024, 128, 16, 3)]
    return ([_case(f"em_n{n}_r{r}", 8, n, 512, 64, r) for r in (3, 5) for n in (1024, 4096, 16384)]
            + [_case("em_n16384_r3_detach", 8, 16384, 512, 64, 3, detach=True)])


register(Benchmark("em_attention", cases, standard_providers("em_attention", em_attention, reference_em),
                   targets=[  # issue 4, bf16 on an H100/H200
                       Target(">= 3x eager", r"em_n\d+_r\d", "speedup", against=("eager",), at_least=3.0),
                       Target(">= 1.5x torch.compile", r"em_n\d+_r\d", "speedup", against=("compile",), at_least=1.5),
                       Target("forward >= 60% of the copy rate for (R+1) reads of x", r"em_n\d+_r\d", "pct_copy_peak",
                              mode="fwd", at_least=60.0),
                       Target("saved activations <= one N x K and one K x C map per iteration", r"em_n.*",
                              "param:saved_per_iteration_bound_ratio", at_most=1.0),
                   ]))
