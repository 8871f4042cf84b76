"""The sigmoid loss (SigLIP) without the N x N matrix: API, custom ops, backend choice.

``sigmoid_contrastive_loss(x, y, logit_scale, logit_bias)`` is
``-(1/N) sum_ij log sigmoid(z_ij (t x_i . y_j + b))`` with ``z_ii = +1`` and
``z_ij = -1`` otherwise (docs/losses.md, "The sigmoid loss"). The quadratic part is
the custom op ``mimac_kernels::siglip_fwd`` (per-row sums) with its backward
``mimac_kernels::siglip_bwd``; both recompute scores tile by tile on the chosen
backend (``siglip_torch``, ``triton.siglip_backend``, ``siglip_cpu``; the ``cuda``
backend has no kernel for this loss and refuses it).
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch
from torch import Tensor

from mimac_kernels import dispatch, distributed
from mimac_kernels.contract import MAX_GRID_HEADS
from mimac_kernels.functional import _check_group
from mimac_kernels.options import DTYPES
from mimac_kernels.siglip_torch import compute_dtype

#: Backend name -> module with ``forward``/``backward`` of the sigmoid loss.
SIGLIP_MODULES: dict[str, str] = {
    "triton": "mimac_kernels.triton.siglip_backend",
    "cpu": "mimac_kernels.siglip_cpu",
    "torch": "mimac_kernels.siglip_torch",
}
#: Why a backend runs no sigmoid loss at all (whatever the inputs).
NO_KERNEL = {
    "cuda": "the cuda backend has no sigmoid-loss kernel (the triton backend runs it on CUDA "
    "devices)",
}
#: ``backend="auto"`` per device type. On CPUs the torch backend comes first: its row
#: blocks run on the BLAS, 3-4x faster than the C++ loops of the cpu backend (measured
#: on 2 cores: N = 4,096, D = 256, forward + backward 0.3 s against 1.1 s), which stays
#: available by name (float32 throughout, deterministic).
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("torch", "cpu")}


def sigmoid_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor,
    *,
    backend: str = "auto",
    group: object | None = None,
) -> Tensor:
    """SigLIP's loss of rows ``x = image_features`` against columns ``y = text_features``,
    fused.

    Args:
        image_features, text_features: same shape, dtype (float16/bfloat16/float32;
            float64 on the torch backend) and device. Used as given (open_clip
            normalises before the loss).
        logit_scale: t, the multiplier of the scores (open_clip passes
            ``model.logit_scale.exp()``); a float or a 0-dim floating tensor, finite;
            a tensor may require grad.
        logit_bias: b, added to every logit; as ``logit_scale``.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpu"`` (``"cuda"`` refuses).
        group: a ``torch.distributed`` process group: this rank's rows against every
            rank's columns (gathered with gradient), the positive of row i at column
            ``rank * N + i``; the value is the sum over this rank's rows divided by
            its N, so the ranks' mean is the single-process loss and input gradients
            are ``world_size x`` the single-process ones (README, "Across GPUs and
            machines"); t and b get this rank's own gradient. Every rank passes the
            same shape and dtype.

    Shape:
        image_features, text_features: ``(N, D)`` or ``(H, N, D)`` (H heads, averaged).
        Output: scalar, float32 (float64 for float64 inputs).

    Example:
        >>> x, y = torch.randn(8, 16), torch.randn(8, 16)
        >>> sigmoid_contrastive_loss(x, y, 10.0, -10.0).shape
        torch.Size([])
    """
    x, y = image_features, text_features
    _check_inputs(x, y, backend)
    scale = _scalar(logit_scale, "logit_scale", x)
    bias = _scalar(logit_bias, "logit_bias", x)
    if group is not None:
        _check_group(group)
    if x.dim() == 2:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    offset = 0
    if group is not None:
        distributed.check_equal_inputs(x, group)
        offset = torch.distributed.get_rank(group) * x.shape[1]
        y = distributed.gather_with_grad(y, group)
    if backend != "auto" and not torch.compiler.is_compiling():
        resolve(backend, x)  # an explicit backend that cannot run these inputs raises here
    rows = siglip_fwd(x, y, scale, bias, offset=offset, backend=backend)
    return rows.sum() / (x.shape[0] * x.shape[1])


# --- backend choice ------------------------------------------------------------------


def refusal(name: str, x: Tensor) -> str | None:
    """Why backend ``name`` cannot run the sigmoid loss on ``x``'s device, dtype and heads."""
    if name in NO_KERNEL:
        return NO_KERNEL[name]
    why = dispatch.unavailable_reason(name, x.device, x.dtype)
    if why is None and name == "triton" and x.shape[0] > MAX_GRID_HEADS:
        why = f"at most {MAX_GRID_HEADS} heads (a grid axis), got H={x.shape[0]}"
    return why


def resolve(backend: str, x: Tensor) -> str:
    """The backend that runs the sigmoid loss on ``x`` (``(H, N, D)``).

    Raises:
        ValueError: unknown name. dispatch.BackendUnavailable: an explicit backend that
            cannot run it, or none under ``"auto"``, with the reasons.
    """
    described = f"the sigmoid loss on {x.device}/{x.dtype} inputs of shape {tuple(x.shape)}"
    if backend == "auto":
        reasons = []
        for name in _AUTO_ORDER.get(x.device.type, ("torch",)):
            why = refusal(name, x)
            if why is None:
                return name
            reasons.append(f"{name}: {why}")
        raise dispatch.BackendUnavailable(f"no backend can run {described}: " + "; ".join(reasons))
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {dispatch.BACKENDS}, got {backend!r}")
    why = refusal(backend, x)
    if why is not None:
        raise dispatch.BackendUnavailable(f"backend {backend!r} cannot run {described}: {why}")
    return backend


def _module(name: str) -> ModuleType:
    return importlib.import_module(SIGLIP_MODULES[name])


# --- the custom ops --------------------------------------------------------------------


@torch.library.custom_op("mimac_kernels::siglip_fwd", mutates_args=())
def siglip_fwd(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, offset: int, backend: str
) -> Tensor:
    """Per-row sums ``sum_j softplus(-z_ij l_ij)``, ``(H, R)``, float32 (float64 for float64).

    Shape: x ``(H, R, D)``, y ``(H, C, D)``; scale, bias 0-dim of the compute dtype; the
    positive of row i is column ``i + offset``.
    """
    out = _module(resolve(backend, x)).forward(x, y, scale, bias, offset)
    return out.to(compute_dtype(x.dtype)).contiguous().clone()


@siglip_fwd.register_fake
def _(x, y, scale, bias, *, offset, backend):
    return x.new_empty(x.shape[0], x.shape[1], dtype=compute_dtype(x.dtype))


@torch.library.custom_op("mimac_kernels::siglip_bwd", mutates_args=())
def siglip_bwd(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, g: Tensor, *, offset: int, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``sum_i g_i rowsum_i`` (g ``(H, R)``) w.r.t. x, y, scale and bias."""
    gx, gy, gt, gb = _module(resolve(backend, x)).backward(x, y, scale, bias, g, offset)
    outs = (gx.to(x.dtype), gy.to(y.dtype), gt.to(scale.dtype).reshape(()),
            gb.to(bias.dtype).reshape(()))  # fmt: skip
    return tuple(t.contiguous().clone() for t in outs)


@siglip_bwd.register_fake
def _(x, y, scale, bias, g, *, offset, backend):
    return (torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale),
            torch.empty_like(bias))  # fmt: skip


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    ctx.save_for_backward(*inputs)
    ctx.options = dict(keyword_only_inputs)


def _backward(ctx, g: Tensor):
    x, y, scale, bias = ctx.saved_tensors
    return siglip_bwd(x, y, scale, bias, g.contiguous(), **ctx.options)


siglip_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- input checks ----------------------------------------------------------------------


def _check_inputs(x: object, y: object, backend: object) -> None:
    for name, t in (("image_features", x), ("text_features", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must have shape (N, D) or (H, N, D), got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    assert isinstance(x, Tensor) and isinstance(y, Tensor)
    if x.shape != y.shape:
        raise ValueError(
            f"image_features and text_features must have the same shape, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.dtype != y.dtype:
        raise TypeError(
            f"image_features and text_features must have the same dtype, got {x.dtype} "
            f"and {y.dtype}"
        )
    if x.device != y.device:
        raise ValueError(
            f"image_features and text_features must be on the same device, got {x.device} "
            f"and {y.device}"
        )
    if backend != "auto" and backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {dispatch.BACKENDS}, got {backend!r}")


def _scalar(value: float | Tensor, name: str, like: Tensor) -> Tensor:
    """``value`` as a 0-dim tensor of the compute dtype on ``like``'s device, gradient kept;
    refused (naming ``name``) unless a finite real number or a finite 0-dim float tensor."""
    dt = compute_dtype(like.dtype)
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(
                f"{name} must be a float or a 0-dim floating-point tensor, got a {value.dtype} "
                f"tensor of shape {tuple(value.shape)}"
            )
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the inputs are on {like.device}")
        out = value.to(dt)
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        out = torch.tensor(float(value), dtype=dt, device=like.device)
    ok = torch.isfinite(out)
    msg = f"{name} must be finite (in {dt})"
    if torch.compiler.is_compiling() or out.device.type != "cpu":
        torch._assert_async(ok, msg)  # no host sync on accelerators / in graphs
    elif not bool(ok):
        raise ValueError(f"{msg}, got {value.item() if isinstance(value, Tensor) else value}")
    return out
