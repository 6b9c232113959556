"""The papers' blocks (DESIGN.md §4). Every attention-like computation calls :mod:`mtlfast.ops`, so the
blocks follow the backend switch (``backend=`` is not a block argument: use ``mtlfast.use_backend``).

MTI-Net: MultiModalDistillation (also PAD-Net's distillation), FeaturePropagation, FeatureAggregation.
"""
from mtlfast.nn.mtinet import FeatureAggregation, FeaturePropagation, MultiModalDistillation

__all__ = ["FeatureAggregation", "FeaturePropagation", "MultiModalDistillation"]
