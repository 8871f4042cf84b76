"""mimac_kernels: fused contrastive losses (NT-Xent, InfoNCE/CLIP) that never store N x N.

Public API: ``fused_contrastive_loss`` (with ``queue=``: MoCo's queue negatives),
the drop-in modules ``NTXentLoss`` (optionally with lightly's memory bank),
``ClipLoss``, ``ProbabilityContrastLoss``, ``SigLipLoss`` (with
``sigmoid_contrastive_loss``), ``SupConLoss`` (with ``supervised_contrastive_loss``;
``supervised_ntxent_loss`` is ``NTXentLoss`` called with labels), ``available_backends``, and
``reference_contrastive_loss`` (the full-matrix formula, float64 by default).
"""

from mimac_kernels.dispatch import BackendUnavailable, available_backends
from mimac_kernels.functional import fused_contrastive_loss
from mimac_kernels.labels import supervised_contrastive_loss, supervised_ntxent_loss
from mimac_kernels.modules import (
    ClipLoss,
    NTXentLoss,
    ProbabilityContrastLoss,
    SigLipLoss,
    SupConLoss,
)
from mimac_kernels.reference import reference_contrastive_loss
from mimac_kernels.siglip import sigmoid_contrastive_loss

__all__ = [
    "BackendUnavailable",
    "ClipLoss",
    "NTXentLoss",
    "ProbabilityContrastLoss",
    "SigLipLoss",
    "SupConLoss",
    "available_backends",
    "fused_contrastive_loss",
    "reference_contrastive_loss",
    "sigmoid_contrastive_loss",
    "supervised_contrastive_loss",
    "supervised_ntxent_loss",
]
__version__ = "0.1.0"
