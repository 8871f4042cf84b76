"""The options of the losses and the kernels, defined once for every module and test."""

from __future__ import annotations

import torch

#: Similarity functions: ``x^.y^`` (cosine), ``x.y`` (dot), ``log(max(x.y, eps))`` (log_dot).
CRITICS: tuple[str, ...] = ("cosine", "dot", "log_dot")
#: ``all``: NT-Xent over the stacked rows ``[a; b]``; ``cross``: InfoNCE / CLIP on ``a`` x ``b``.
NEGATIVES: tuple[str, ...] = ("all", "cross")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
#: Input dtypes of ``fused_contrastive_loss`` (float64 runs on the torch backend only).
DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Input dtypes of the compiled and Triton kernels.
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_EPS = 1e-12
