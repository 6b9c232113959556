"""Kernel path vs reference path of a whole module (block or model) on the same weights and inputs.

The reference path runs the module in float64 with every op on ``backend="reference"``; the kernel path
runs a float32 copy with the same state on the kernel backends (on a CPU: Triton through its interpreter,
and the C++ kernel for deform_sample, which has no Triton kernel). Every output and the gradient of every
parameter and input (from one backward of Σ ⟨out, random cotangent⟩) must agree to the float32 bound of
DESIGN.md §6 (relative error < 1e-4 against float64; 1e-3 on a GPU). All three paths run with cuDNN's TF32
convolutions off: torch.backends.cudnn.allow_tf32 is on by default and gives float32 convolutions a 10-bit
mantissa, which would put the float32 paths 1e-3 to 1e-1 off (cuDNN TF32 emulated on the CPU: the float32
reference path as much as the kernel path).

A quantity whose float64 value is numerically zero (norm below 1e-12 of the largest compared quantity's: a
gradient that vanishes in exact arithmetic, such as a bias that cancels, is left as rounding noise) is
compared by its absolute norm against the same bound, as check_against_reference does for an exact zero.
Only the quantities the caller names in ``conditioned`` get a looser bound (see :func:`compare_paths`).

With ``autocast=`` (the trainer's mixed precision) the float32 reference path and the kernel path both run
under torch.autocast in that 16-bit dtype; every quantity's bound is then ``factor`` (2) times the autocast
reference path's error (at least two epsilons of the dtype), and the outputs must have the reference path's dtypes.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import statistics

import torch

import mtlfast
from mtlfast.testing import fresh_seed, rel_error, rerun_hint, tolerance

#: The kernel path on this machine, as ``use_backend`` arguments.
KERNEL_PATH = (("auto", {}) if torch.cuda.is_available() else ("triton", {"deform_sample": "cpp"}))
#: The same in 16 bits (deform_sample's C++ CPU kernel is float32/float64 only: Triton there too).
KERNEL_PATH_16_BIT = ("auto", {}) if torch.cuda.is_available() else ("triton", {})
#: The autocast dtype the kernels take on this machine: bfloat16 on a GPU (the trainer's default there); float16
#: on a CPU, where the Triton interpreter refuses bfloat16.
AUTOCAST_DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float16


def flatten_outputs(out, prefix="out") -> list[tuple[str, torch.Tensor]]:
    """The tensors in nested dicts/tuples/lists, each named by its path ("out[0][depth]")."""
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, dict):
        return [item for k, v in out.items() for item in flatten_outputs(v, f"{prefix}[{k}]")]
    if isinstance(out, (tuple, list)):
        return [item for i, v in enumerate(out) for item in flatten_outputs(v, f"{prefix}[{i}]")]
    return []


def _run(module, inputs: dict, dtype, backend, per_op, cotangents, device, seed, autocast=None, unit=False):
    inputs = {k: (v.detach().to(device=device, dtype=dtype).requires_grad_(True) if v.is_floating_point() else v)
              for k, v in inputs.items()}
    mixed = torch.autocast(device, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with mtlfast.use_backend(backend, **per_op), mixed:
        outs = flatten_outputs(module(**inputs))
    outs = [(n, o) for n, o in outs if o.is_floating_point()]
    if cotangents is None:
        gen = torch.Generator().manual_seed(seed)
        # unit: cotangents of norm ~1, so that float16 weight gradients summed over every pixel stay below 65504
        cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64) * (o.numel() ** -0.5 if unit else 1)
                      for _, o in outs]
    total = sum((o * c.to(device=o.device, dtype=o.dtype)).sum() for (_, o), c in zip(outs, cotangents))
    total.backward()
    grads = [(f"grad {n}", p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()]
    grads += [(f"grad input {k}", v.grad) for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.grad is not None]
    return outs + grads, cotangents


@contextlib.contextmanager
def _float32_convolutions():
    was = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = was


def _named(name: str, entry: str) -> bool:
    """``entry`` is the quantity's name (which may hold brackets: "out[0][depth]") or a pattern matching it."""
    return name == entry or fnmatch.fnmatchcase(name, entry)


#: Draws compared by their median errors under autocast: the inputs and four copies perturbed by one epsilon.
AUTOCAST_DRAWS = 5


def _perturbed(inputs: dict, dtype: torch.dtype, seed: int) -> dict:
    """``inputs`` with every float tensor times (1 + eps·n), n standard normal, eps that of ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.finfo(dtype).eps
    return {k: v * (1 + eps * torch.randn(v.shape, generator=gen, dtype=v.dtype)) if v.is_floating_point() else v
            for k, v in inputs.items()}


def path_errors(module: torch.nn.Module, inputs: dict, *, device: str, seed: int,
                autocast: torch.dtype | None = None) -> dict[str, list[tuple[float, float]]]:
    """{quantity: [(kernel path error, float32 reference path error) per draw]} against the float64 reference path
    (one draw; under ``autocast`` AUTOCAST_DRAWS, see compare_paths). ``seed``: the cotangents' and perturbations'."""
    backend, per_op = KERNEL_PATH if autocast is None else KERNEL_PATH_16_BIT
    draws = [inputs] if autocast is None else [inputs] + [_perturbed(inputs, autocast, seed + d)
                                                         for d in range(1, AUTOCAST_DRAWS)]
    errors: dict[str, list[tuple[float, float]]] = {}
    for draw in draws:
        paths, cot = {}, None
        for key, dtype, b, ops, mixed in (("ref64", torch.float64, "reference", {}, None),
                                          ("ref32", torch.float32, "reference", {}, autocast),
                                          ("kernel", torch.float32, backend, per_op, autocast)):
            copy_ = copy.deepcopy(module).to(device=device, dtype=dtype)
            with _float32_convolutions():
                paths[key], cot = _run(copy_, draw, dtype, b, ops, cot, device, seed, mixed, unit=autocast is not None)
        if autocast is not None:
            dtypes = {key: [(n, t.dtype) for n, t in paths[key] if not n.startswith("grad ")]
                      for key in ("ref32", "kernel")}
            assert dtypes["kernel"] == dtypes["ref32"], f"output dtypes under autocast: {dtypes}"
        scale = max(torch.linalg.vector_norm(w.detach().double()).item() for _, w in paths["ref64"])
        for i, (n, want) in enumerate(paths["ref64"]):
            want = want.detach()
            if torch.linalg.vector_norm(want.double()).item() <= 1e-12 * scale:
                want = torch.zeros_like(want)  # rel_error then takes the absolute norm
            errors.setdefault(n, []).append((rel_error(paths["kernel"][i][1], want),
                                             rel_error(paths["ref32"][i][1], want)))
    return errors


def compare_paths(module: torch.nn.Module, inputs: dict, *, device: str = "cpu", conditioned: tuple[str, ...] = (),
                  autocast: torch.dtype | None = None, factor: float = 2.0):
    """Runs the reference path in float64 and in float32 and the kernel path in float32 on copies of
    ``module``; raises AssertionError listing every quantity over its bound (see the module docstring).
    Returns {quantity: (kernel path error, float32 reference path error)}.

    ``conditioned`` names ill-conditioned quantities (as in the failure table, e.g. ``"grad model.fuse.0.bias"``,
    or fnmatch patterns such as ``"grad model.backbone.*"``); their bound is max(fixed bound, 2x the float32
    reference path's error), as check_against_reference's ``conditioned``. Each entry must name a quantity.

    ``autocast``: a 16-bit dtype for both float32 paths. Every quantity is then conditioned, and the errors
    compared are the medians over AUTOCAST_DRAWS draws (the inputs, and copies perturbed by one epsilon of the
    dtype, each against its own float64 reference): one draw's 16-bit error scatters by factors of several
    between implementations of equal accuracy (a SEM gradient: 4.7x in one draw, 1.0x in the median), as
    check_against_reference found for the ops. The outputs must have the reference path's dtypes.
    ``factor``: the multiple of the reference path's error a conditioned quantity may reach (2 by default)."""
    seed = fresh_seed()
    errors = path_errors(module, inputs, device=device, seed=seed, autocast=autocast)
    draws = len(next(iter(errors.values())))
    unmatched = [c for c in conditioned if not any(_named(n, c) for n in errors)]
    if unmatched:
        raise ValueError(f"conditioned: {unmatched} name no compared quantity")
    if autocast is not None:
        conditioned = ("*",)
    fixed = (tolerance(torch.float32, tf32_dots=device == "cuda") if autocast is None
             else 2 * torch.finfo(autocast).eps)
    rows, bounds = {}, {}
    for n, pairs in errors.items():
        rows[n] = (statistics.median(e for e, _ in pairs), statistics.median(r for _, r in pairs))
        loose = any(_named(n, c) for c in conditioned)
        bounds[n] = max(fixed, factor * rows[n][1]) if loose else fixed
    bad = {n: (e, r) for n, (e, r) in rows.items() if not e <= bounds[n]}
    if bad:
        reference = "float32" if autocast is None else f"{str(autocast)[6:]} autocast"
        what = "" if autocast is None else f", medians of {draws} draws"
        lines = "\n".join(f"  {n}: kernel {e:.3e}, bound {bounds[n]:.3e}, {reference} reference {r:.3e}"
                          for n, (e, r) in sorted(bad.items(), key=lambda kv: -kv[1][0]))
        raise AssertionError(f"kernel path vs float64 reference path over the bound ({len(bad)} of {len(rows)} "
                             f"quantities{what}; cotangent seed {seed}, {rerun_hint(seed)} reruns it):\n{lines}")
    return rows
