"""Input validation shared by every op: errors name the argument and the expected shape/dtype/device.

>>> sizes = check_shapes(q=(q, "B H Nq D"), k=(k, "B H Nk D"), v=(v, "B H Nk Dv"))
>>> check_floating_same_device_dtype(q=q, k=k, v=v)

A symbol fixes a size the first time it is seen; later tensors must match it. A digit string fixes it
to that number ("B N 2"); "*" matches anything.
"""
from __future__ import annotations

import math
import numbers
import operator

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype's name in error messages: "float32" for torch.float32."""
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_shapes(known: dict[str, tuple[int, str]] | None = None, /,
                 **specs: tuple[torch.Tensor, str]) -> dict[str, int]:
    """Checks ``name=(tensor, "A B C")`` specs against each other and against the ``known`` sizes
    (symbol -> (size, where it comes from), for the error message); returns the symbol -> size map."""
    sizes = {symbol: size for symbol, (size, _) in (known or {}).items()}
    origin = {symbol: source for symbol, (_, source) in (known or {}).items()}
    for name, (tensor, spec) in specs.items():
        check_tensor(name, tensor)
        symbols = spec.split()
        if tensor.dim() != len(symbols):
            raise ValueError(f"{name}: expected a {len(symbols)}-d tensor of shape ({', '.join(symbols)}), "
                             f"got shape {tuple(tensor.shape)}")
        for axis, (symbol, size) in enumerate(zip(symbols, tensor.shape)):
            if symbol == "*":
                continue
            expected = int(symbol) if symbol.isdigit() else sizes.get(symbol)
            if expected is not None and expected != size:
                which = (f"size {expected} at dim {axis}" if symbol.isdigit()
                         else f"{symbol}={expected} (from {origin[symbol]})")
                raise ValueError(f"{name}: expected shape ({', '.join(symbols)}) with {which}, "
                                 f"got {tuple(tensor.shape)} (size {size} at dim {axis})")
            if not symbol.isdigit() and symbol not in sizes:
                sizes[symbol], origin[symbol] = size, name
    return sizes


def check_floating_same_device_dtype(**tensors: torch.Tensor | None) -> None:
    """All given tensors (None skipped) are floating point, on one device, of one dtype."""
    first_name, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        check_tensor(name, t)
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32, float64), "
                            f"got {dtype_name(t.dtype)}")
        if first is None:
            first_name, first = name, t
            continue
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (as {first_name}), got {t.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {dtype_name(first.dtype)} (as {first_name}), "
                            f"got {dtype_name(t.dtype)}")


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)
#: The device types whose autocast state the library reads (its devices; meta tensors have no autocast).
_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the ``torch.autocast`` in force on ``device_type`` (cpu or cuda), None when off or elsewhere.
    torch.compile traces it (torch 2.11's Dynamo cannot trace ``torch.amp.is_autocast_available``)."""
    if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_inputs(*tensors):
    """Under ``torch.autocast`` for the first tensor's device type, the float32/float16/bfloat16 tensors cast to
    the autocast dtype (as torch's own attention, SDPA, does: float64 and non-tensors pass unchanged); outside
    autocast, the arguments as given. So every backend computes from the same inputs and returns the autocast
    dtype (the references' matmuls follow autocast by themselves, the custom kernel ops would not)."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    dtype = None if first is None else autocast_dtype(first.device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CASTS else t for t in tensors)


def check_positive_int(name: str, value) -> int:
    """An integer >= 1: a Python or numpy integer (``operator.index``), not a bool, float or tensor."""
    if isinstance(value, (bool, torch.Tensor)):
        raise TypeError(f"{name}: expected an integer >= 1, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer >= 1, got {type(value).__name__} {value!r}") from None
    if number < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return number


def check_positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (>= 0 with ``allow_zero``; Python or numpy, not bool or a tensor), as a float."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def resolve_scale(scale: float | None, width: int) -> float:
    """``scale=None`` means ``width ** -0.5`` (DESIGN.md §3); otherwise a finite real number (Python or numpy;
    not a tensor, which would have to be read back from the device)."""
    if scale is None:
        return width ** -0.5
    if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale!r}")
    return float(scale)
