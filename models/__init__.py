"""Model definitions and their registry (installed as ``mtlfast.models``).

>>> from mtlfast.models import create_model, list_models
>>> model = create_model("mtinet", tasks=["semseg", "depth"], backbone="hrnet_w18_small_v2")
"""
from mtlfast.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
from mtlfast.models import mtinet  # noqa: E402,F401  (registers the method)
from mtlfast.models import baseline, padnet  # noqa: E402,F401
from mtlfast.models import bridgenet  # noqa: E402,F401
from mtlfast.models import tpim  # noqa: E402,F401
from mtlfast.models import tif  # noqa: E402,F401
from mtlfast.models import sem  # noqa: E402,F401
