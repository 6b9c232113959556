"""The fast ops (DESIGN.md §3). Each is an autograd-capable function with a ``backend=`` argument,
dispatched through :mod:`mtlfast.backends`; its literal definition lives in :mod:`mtlfast.reference`."""
from mtlfast.ops.tpp_attention import tpp_attention  # noqa: F401
from mtlfast.ops.attention import attention  # noqa: F401
from mtlfast.ops.lthd_attention import lthd_attention  # noqa: F401
from mtlfast.ops.deform_sample import deform_sample  # noqa: F401
from mtlfast.ops.iterative_fusion import iterative_fusion  # noqa: F401
from mtlfast.ops.em_attention import em_attention  # noqa: F401
