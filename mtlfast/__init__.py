"""mtlfast: compiled kernels and models for multi-task dense prediction.

``mtlfast.ops`` (the fast ops, backend-switched), ``mtlfast.reference`` (their literal PyTorch
definitions), ``mtlfast.nn`` (the papers' blocks), ``mtlfast.models`` (registry + ``create_model``),
``mtlfast.kernels`` (Triton kernels).

``import mtlfast`` itself imports nothing heavy: the names below load their module on first use (PEP 562),
so the edge metric's worker processes (:mod:`mtlfast.edge_eval`, numpy only) start without torch, and
``TRITON_INTERPRET`` may still be set after ``import mtlfast``. The ops register under ``torch.ops.mtlfast``
when :mod:`mtlfast.ops` is first imported (``import mtlfast.ops`` or any ``mtlfast.ops.<op>``).
"""
import importlib

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendError", "current_backend", "use_backend", "ops", "__version__"]

_LAZY = {"BACKENDS": "mtlfast.backends", "BackendError": "mtlfast.backends", "current_backend": "mtlfast.backends",
         "use_backend": "mtlfast.backends"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "ops":
        return importlib.import_module("mtlfast.ops")
    raise AttributeError(f"module 'mtlfast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
