"""Output allocation for every launcher (Triton and compiled), with the test-suite's poisoning switch.

Launchers allocate outputs and gradient buffers with :func:`empty` instead of ``torch.empty``. Inside
:func:`mtlfast.testing.poison_outputs` those buffers are filled with NaN (and the compiled extension does
the same for the outputs it allocates), so an element a kernel forgets to write cannot pass a test. The switch is
process-wide, as the extension's: on a GPU autograd runs the backward launchers on its device thread, where a
per-thread switch set by the test's thread would be off.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

_poison = False


def empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled (integer: max-filled) tensor while outputs are poisoned."""
    if not _poison:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max
    return torch.full(tuple(shape), fill, dtype=dtype, device=device)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, dtype=t.dtype, device=t.device)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Launchers' outputs NaN-filled in the block (process-wide: not for blocks on concurrent threads)."""
    from mtlfast import _ext

    global _poison
    previous, _poison = _poison, True
    compiled = _ext.status().loaded
    if compiled:
        _ext.ops().set_poison_outputs(True)
    try:
        yield
    finally:
        _poison = previous
        if compiled:
            _ext.ops().set_poison_outputs(previous)
