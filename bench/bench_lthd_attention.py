"""lthd_attention benchmark: TIF's Low-To-High Diffusion at NYUD 448x576 (fine 1/16, coarse 1/32), plus a
sweep over N.

Providers: mtlfast (the exact rewrite -> one Triton attention on a GPU), the eager literal reference
(forms the Nf x Nf map and resizes the Nc x Nc map), torch.compile of the reference, and SDPA (each
backend) / xformers on the same widened rewrite: q = [q_f | up(q_c)], k = [k_f | up(k_c)] of width 2D
(resize, concatenation and attention all inside the timed call).

Shapes: the fine grid 28x36 (1008 tokens) and the coarse grid 14x18 (252 tokens) of a 448x576 crop,
batch 8 (TIF's). The paper does not give the attention width; ``lthd_nyud_d384`` uses 384 (the Swin-T
1/16 stage width, our choice) for q/k and v, so the widened q/k are 768 wide; ``lthd_nyud_d64`` uses 64
(widened 128, inside SDPA flash's limit when v is 128 wide too). The sweep doubles the grids
(56x72 / 28x36 and 112x144 / 56x72) at batch 1, width 64, to show memory O(N) against the eager O(N²).

Each case records in ``params`` the bytes autograd saves for the backward (inputs excluded; counted on meta
tensors) by the eager reference and by the kernel path; the larger sweep case also their growth from the
smaller one (4x the fine tokens: x4 is O(N), x16 O(N²)). Besides its inputs (kept for the backward, which
forms the widened q/k again; in TIF the caller holds them anyway) the kernel path keeps its output and row
logsumexp only: at ``lthd_nyud_d384`` 6.2 MB against eager's 16.3 MB (keeping the 768-wide q/k instead of the
inputs would have been 31 MB; with the inputs counted, 27.9 MB now, 37.2 MB that way, 37.9 MB eager).
"""
from __future__ import annotations

import torch

from mtlfast.bench.bench_attention import flash_backward_factor, sdpa_providers
from mtlfast.bench.harness import Benchmark, Case, Target, register, saved_bytes_eager_vs_kernel, standard_providers
from mtlfast.ops.lthd_attention import lthd_attention, widened_qk
from mtlfast.reference.lthd_attention import lthd_attention as reference_lthd


def _to_sdpa(q_fine, k_fine, q_coarse, k_coarse, v, size_fine, size_coarse, scale=None):
    q, k = widened_qk(q_fine, k_fine, q_coarse, k_coarse, size_fine, size_coarse)
    return q[:, None], k[:, None], v[:, None], q_fine.shape[-1] ** -0.5 if scale is None else scale


def _from_sdpa(out, **inputs):
    return out[:, 0]


def _saved_memory(B, size_fine, size_coarse, D, C, dtype=torch.bfloat16) -> dict[str, float]:
    """Bytes kept for the backward (meta tensors): the eager reference vs the kernel path."""
    from mtlfast.ops.lthd_attention import _triton as triton_path

    n_f, n_c = size_fine[0] * size_fine[1], size_coarse[0] * size_coarse[1]
    shapes = {"q_fine": (B, n_f, D), "k_fine": (B, n_f, D), "q_coarse": (B, n_c, D), "k_coarse": (B, n_c, D),
              "v": (B, n_f, C)}
    sizes = dict(size_fine=size_fine, size_coarse=size_coarse)
    return saved_bytes_eager_vs_kernel(lambda **kw: reference_lthd(**kw, **sizes),
                                       lambda **kw: triton_path(**kw, **sizes, scale=D ** -0.5), shapes, dtype)


def _case(name, B, size_fine, size_coarse, D, C, grown_from=None):
    """``grown_from``: (size_fine, size_coarse) of a smaller case: params get the saved bytes' growth from it."""
    n_f, n_c = size_fine[0] * size_fine[1], size_coarse[0] * size_coarse[1]

    def make(device, dtype):
        g = torch.Generator().manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        return {"q_fine": rand(B, n_f, D), "k_fine": rand(B, n_f, D), "q_coarse": rand(B, n_c, D),
                "k_coarse": rand(B, n_c, D), "v": rand(B, n_f, C), "size_fine": size_fine, "size_coarse": size_coarse}

    params = dict(B=B, Nf=n_f, Nc=n_c, size_fine=list(size_fine), size_coarse=list(size_coarse), D=D, C=C,
                  **_saved_memory(B, size_fine, size_coarse, D, C))
    if grown_from is not None:
        smaller = _saved_memory(B, *grown_from, D, C)
        params.update({f"saved_growth_{who}": params[f"saved_bytes_{who}"] / smaller[f"saved_bytes_{who}"]
                       for who in ("eager", "mtlfast")})
    # the formula's products (eq. 11-12): fine scores Nf² x D, coarse scores Nc² x D, P·V Nf² x C (resize and
    # softmax not counted, as for attention); as one attention of score width d_scores = D (Nf² + Nc²) / Nf². The
    # rewrite computes its fine-grid scores over 2D instead: its TFLOP/s count the formula's work, not its own.
    d_scores = D * (n_f * n_f + n_c * n_c) / (n_f * n_f)
    return Case(name, make, flops=2.0 * B * n_f * n_f * (d_scores + C),
                backward_factor=flash_backward_factor(d_scores, C), params=params)


def cases(device):
    if device != "cuda":  # eager / compile only on a CPU: small shapes
        return [_case("lthd_cpu_14x18", 1, (14, 18), (7, 9), 64, 64)]
    return [_case("lthd_nyud_d384", 8, (28, 36), (14, 18), 384, 384),
            _case("lthd_nyud_d64", 8, (28, 36), (14, 18), 64, 128),
            _case("lthd_sweep_56x72", 1, (56, 72), (28, 36), 64, 64),
            _case("lthd_sweep_112x144", 1, (112, 144), (56, 72), 64, 64, grown_from=((56, 72), (28, 36)))]


register(Benchmark(
    "lthd_attention", cases,
    standard_providers("lthd_attention", lthd_attention, reference_lthd) + sdpa_providers(_to_sdpa, _from_sdpa),
    targets=[  # issue 3, bf16 on an H100/H200
        Target(">= 3x eager", r"lthd_.*", "speedup", against=("eager",), at_least=3.0),
        Target("saved activations O(N): x4 for 4x the tokens (56x72 -> 112x144)", r"lthd_sweep_112x144",
               "param:saved_growth_mtlfast", at_most=4.0 * 1.05),
    ]))
