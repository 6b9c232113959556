"""mtlfast: compiled kernels and models for multi-task dense prediction.

``mtlfast.ops`` (the fast ops, backend-switched), ``mtlfast.reference`` (their literal PyTorch
definitions), ``mtlfast.nn`` (the papers' blocks), ``mtlfast.models`` (registry + ``create_model``),
``mtlfast.kernels`` (Triton kernels). Triton is imported lazily, so ``TRITON_INTERPRET`` may still be set
after ``import mtlfast``.
"""
from mtlfast.backends import BACKENDS, BackendError, current_backend, use_backend
from mtlfast import ops

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendError", "current_backend", "use_backend", "ops", "__version__"]
