"""The papers' blocks (DESIGN.md §4). Every attention-like computation calls :mod:`mtlfast.ops`, so the
blocks follow the backend switch (``mtlfast.use_backend(...)`` or ``MTLFAST_BACKEND``).

- BridgeNet: TaskPatternPropagation, BridgeFeatureExtractor, TaskFeatureRefiner.
- TPIM network: IterativeFusionBlock, CrossTaskInteractionBlock, TaskPairInteraction.
- MTI-Net: MultiModalDistillation (also PAD-Net's distillation), FeaturePropagation, FeatureAggregation.
"""
from mtlfast.nn.bridgenet import BridgeFeatureExtractor, TaskFeatureRefiner, TaskPatternPropagation
from mtlfast.nn.tpim import CrossTaskInteractionBlock, IterativeFusionBlock, TaskPairInteraction
from mtlfast.nn.mtinet import FeatureAggregation, FeaturePropagation, MultiModalDistillation

__all__ = ["BridgeFeatureExtractor", "TaskFeatureRefiner", "TaskPatternPropagation",
           "CrossTaskInteractionBlock", "IterativeFusionBlock", "TaskPairInteraction",
           "FeatureAggregation", "FeaturePropagation", "MultiModalDistillation"]
