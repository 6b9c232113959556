"""em_attention benchmark: SEM's inter-task EM module at C = 512, K = 64 bases, R = 3 (EMANet) and 5 (SEM),
N from 1k to 16k tokens.

Providers: mtlfast (Triton on a GPU), the eager literal reference and torch.compile of it.

Shapes: B = 8 (batch 2 x 4 NYUD tasks, each task its own EM run from the shared bases), C = 512, K = 64,
N in {1024, 4096, 16384} (16384 = 128 x 128 tokens), full unrolled gradient; plus the EMANet training mode
(``detach_iterations=True``) at the largest N. Tokens have rows of norm about 1 and the bases unit rows, as
after EMANet's normalised projections.

Rates: ``bytes`` is (R + 1) reads of x, the roofline DESIGN/issue 4 measure the forward against (the kernel
reads x once per iteration and once for x_rec/z); ``flops`` counts the two K x C products per pass over x,
4 B N K C (R + 1).
"""
from __future__ import annotations

import torch

from mtlfast.bench.harness import Benchmark, Case, Target, register, standard_providers
from mtlfast.ops.em_attention import em_attention
from mtlfast.reference.em_attention import em_attention as reference_em


def _case(name, B, N, C, K, R, detach=False):
    def make(device, dtype):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, N, C, generator=g) * C ** -0.5
        mu = torch.nn.functional.normalize(torch.randn(B, K, C, generator=g), dim=-1)
        return {"x": x.to(device=device, dtype=dtype), "mu": mu.to(device=device, dtype=dtype), "n_iter": R,
                "detach_iterations": detach}

    elem = 2  # bf16/fp16; the harness runs bf16 unless told otherwise
    return Case(name, make, flops=4.0 * B * N * K * C * (R + 1), bytes=float((R + 1) * B * N * C * elem),
                params=dict(B=B, N=N, C=C, K=K, R=R, detach_iterations=detach))


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
                   ]))
