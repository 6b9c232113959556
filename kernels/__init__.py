"""Triton kernels and their launchers, one file per op (installed as ``mtlfast.kernels``).

Modules here import triton at import time; :mod:`mtlfast.ops` imports them only when a Triton backend is
first called, so ``TRITON_INTERPRET=1`` can still be set after ``import mtlfast``."""
