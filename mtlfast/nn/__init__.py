"""The papers' blocks (DESIGN.md §4). Every attention-like computation calls :mod:`mtlfast.ops`, so the
blocks follow the backend switch (``mtlfast.use_backend(...)`` or ``MTLFAST_BACKEND``).

- BridgeNet: TaskPatternPropagation, BridgeFeatureExtractor, TaskFeatureRefiner.
- TPIM network: IterativeFusionBlock, CrossTaskInteractionBlock, TaskPairInteraction.
- TIF: ScaleAttentiveFeatureFusion, SelfFeatureDistillation, LowToHighDiffusion.
- SEM: HierarchyAdaptiveAttention, EMInteraction.
- MTI-Net: MultiModalDistillation (also PAD-Net's distillation), FeaturePropagation, FeatureAggregation.

Dropping blocks into your own decoder (task features are dicts {task: (B, C, H, W)}; tests/test_nn_blocks.py
runs this example):

.. code-block:: python

    # example: drop-in
    import torch
    import mtlfast
    from mtlfast.nn import EMInteraction, TaskPatternPropagation

    tasks = ["semseg", "depth", "normals"]
    tpp = TaskPatternPropagation(tasks, channels=64, dim=64, heads=2)  # BridgeNet eq. 1-2
    em = EMInteraction(tasks, channels=64, num_bases=16, n_iter=3)     # SEM eq. 8-10
    features = {t: torch.randn(2, 64, 15, 20) for t in tasks}          # your decoder's task features
    with mtlfast.use_backend("reference"):  # "auto": the kernels on a GPU; "triton", "cuda", "cpp"
        out = em(tpp(features))             # {task: (2, 64, 15, 20)}
    sum(o.square().mean() for o in out.values()).backward()
    # end example
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
