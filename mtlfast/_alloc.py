"""Output allocation for every launcher (Triton and compiled), with the test-suite's poisoning switch.

Launchers allocate outputs and gradient buffers with :func:`empty` instead of ``torch.empty``. Inside
:func:`mtlfast.testing.poison_outputs` those buffers are filled with NaN (and the compiled extension does
the same for the outputs it allocates), so an element a kernel forgets to write cannot pass a test.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import torch

_poison: contextvars.ContextVar[bool] = contextvars.ContextVar("mtlfast_poison_outputs", default=False)


def empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled (integer: max-filled) tensor while outputs are poisoned."""
    if not _poison.get():
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max
    return torch.full(tuple(shape), fill, dtype=dtype, device=device)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, dtype=t.dtype, device=t.device)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    from mtlfast import _ext

    token = _poison.set(True)
    compiled = _ext.status().loaded
    if compiled:
        _ext.ops().set_poison_outputs(True)
    try:
        yield
    finally:
        _poison.reset(token)
        if compiled:
            _ext.ops().set_poison_outputs(False)
