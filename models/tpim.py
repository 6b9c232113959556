"""The iterative-fusion TPIM network ("Cross-task interaction with iterative fusion", §3.1, Fig. 1).

Four modules (§3.1): a shared HRNet feature extractor; an intermediate prediction module (per task
features and predictions: deep supervision ``aux["initial"]``); the Task Pair Interaction Module; and
task-specific final heads. The paper compares against PAD-Net/MTI-Net "by replacing our TPIM with the
distillation modules ... before the final prediction module" (§4.1), so everything but the TPIM is the
PAD-Net network of :mod:`mtlfast.models.padnet` (HRNet scales fused at 1/4, two bottleneck blocks per task to
``channels`` and a 1×1 predictor, two bottleneck blocks + 1×1 conv per final head).

TPIM options: ``dim`` (width of Q/K, default channels/4), ``downscale`` (sc of eq. 2, default 2),
``n_iter`` (default 18 on NYUD-v2, 4 otherwise, §4.3), ``variant`` (IFB A/B/C, default C), ``alpha``
(initial α, 0.3), ``shared_alpha`` (one α for all task pairs, default, or one per pair: the paper does not say,
see :mod:`mtlfast.nn.tpim`), ``mode`` (iterative_fusion: auto/materialize/recompute). With auxiliary tasks every
front-end task is a source and only the main tasks are targets: the pairs (s, t) with t a main task, so no
interaction is computed (or has parameters) whose output would be dropped.
"""
from __future__ import annotations

from mtlfast.models.base import build_backbone, method
from mtlfast.models.padnet import PADNet
from mtlfast.nn import TaskPairInteraction

__all__ = ["tpim"]


@method("tpim")
def tpim(tasks, *, backbone="hrnet_w18_small_v2", dataset="nyud", pretrained=None, img_size=None,
         backbone_kwargs=None, aux_tasks=(), channels=256, dim=None, downscale=2, n_iter=None, variant="C",
         alpha=0.3, mode="auto", shared_alpha=True) -> PADNet:
    if n_iter is None:
        n_iter = 18 if dataset.lower().startswith("nyud") else 4

    def interaction(targets, sources, width):
        return TaskPairInteraction(sources, width, dim=dim, downscale=downscale, n_iter=n_iter, variant=variant,
                                   alpha=alpha, mode=mode, targets=targets, shared_alpha=shared_alpha)

    return PADNet(tasks, dataset, build_backbone(backbone, dataset, pretrained, img_size, backbone_kwargs),
                  aux_tasks=aux_tasks, channels=channels, interaction=interaction)
