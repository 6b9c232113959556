"""The papers' blocks (DESIGN.md §4). Every attention-like computation calls :mod:`mtlfast.ops`, so the
blocks follow the backend switch (``mtlfast.use_backend(...)`` or ``MTLFAST_BACKEND``).

- BridgeNet: TaskPatternPropagation, BridgeFeatureExtractor, TaskFeatureRefiner.
- TPIM network: IterativeFusionBlock, CrossTaskInteractionBlock, TaskPairInteraction.
- TIF: ScaleAttentiveFeatureFusion, SelfFeatureDistillation, LowToHighDiffusion.
- SEM: HierarchyAdaptiveAttention, EMInteraction.
- MTI-Net: MultiModalDistillation (also PAD-Net's distillation), FeaturePropagation, FeatureAggregation.
"""
from mtlfast.nn.bridgenet import BridgeFeatureExtractor, TaskFeatureRefiner, TaskPatternPropagation
from mtlfast.nn.tpim import CrossTaskInteractionBlock, IterativeFusionBlock, TaskPairInteraction
from mtlfast.nn.tif import LowToHighDiffusion, ScaleAttentiveFeatureFusion, SelfFeatureDistillation
from mtlfast.nn.sem import EMInteraction, HierarchyAdaptiveAttention
from mtlfast.nn.mtinet import FeatureAggregation, FeaturePropagation, MultiModalDistillation

__all__ = ["BridgeFeatureExtractor", "TaskFeatureRefiner", "TaskPatternPropagation",
           "CrossTaskInteractionBlock", "IterativeFusionBlock", "TaskPairInteraction",
           "LowToHighDiffusion", "ScaleAttentiveFeatureFusion", "SelfFeatureDistillation",
           "EMInteraction", "HierarchyAdaptiveAttention",
           "FeatureAggregation", "FeaturePropagation", "MultiModalDistillation"]
