"""Fake (meta) implementations of the compiled kernels' torch operators.

``csrc/cpu/contrastive.cpp`` registers ``mimac_cpu::{forward, backward, rect_forward,
rect_backward}`` for the CPU dispatch key, ``csrc/cuda/binding.cpp`` the same four as
``mimac_cuda::*`` for CUDA (the GPU build) and as ``mimac_cuda_emu::*`` for CPU (its
CPU emulation). A fake implementation gives the outputs' shapes, dtypes and devices
without running a kernel, so ``torch.compile``, ``torch.library.opcheck`` and meta
tensors can trace the ops. ``extension.load`` registers these once its library is
loaded (registering needs the op to exist).

Schemas (all outputs float32, dense, on the inputs' device):

- ``forward(a, b, inv_tau, critic, all_pairs, eps) -> (row_lse, col_lse)``:
  a, b ``(H, N, D)``; row_lse ``(H, 2N)`` and col_lse ``(H, 0)`` when ``all_pairs``,
  else ``(H, N)`` each.
- ``backward(a, b, inv_tau, critic, all_pairs, eps, row_lse, col_lse, g_row, g_col,
  row_center, col_center) -> (grad_a, grad_b, grad_tau)``: ``(H, N, D)`` twice and 0-dim.
- ``rect_forward(x, y, inv_tau, critic, offset, eps, row_labels=None, col_labels=None)
  -> lse``: x ``(H, R, D)``, y ``(H, C, D)``, optional int32 class ids ``(R,)`` and
  ``(C,)`` (the cpu kernels leave pairs of one id out; cuda refuses them); lse ``(H, R)``.
- ``rect_backward(x, y, inv_tau, critic, offset, eps, lse, g, center, columns_grad=True,
  row_labels=None, col_labels=None) -> (grad_x, grad_y, grad_tau)``: ``(H, R, D)``,
  ``(H, C, D)`` and 0-dim.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

#: Ops namespace -> the backend whose kernels it holds (named in error messages).
NAMESPACES = {"mimac_cpu": "cpu", "mimac_cuda": "cuda", "mimac_cuda_emu": "cuda"}
#: The kernel ops every namespace of ``NAMESPACES`` defines.
KERNEL_OPS = ("forward", "backward", "rect_forward", "rect_backward")

_LOCK = threading.Lock()
_REGISTERED: set[str] = set()


def _one_device(backend: str, **tensors: Tensor) -> None:
    """The kernels read every tensor where the first one lives: refuse a mix (a meta
    ``inv_tau`` beside real data reaches here, as the Meta key wins the dispatch)."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise RuntimeError(f"the {backend} backend takes tensors on one device, got {where}")


def _check_3d(backend: str, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        torch._check(t.dim() == 3, lambda n=name, t=t: (
            f"the {backend} backend: {n} must be (H, N, D), got shape {tuple(t.shape)}"))


def _f32(like: Tensor, *shape) -> Tensor:
    return like.new_empty(shape, dtype=torch.float32)


def _fakes(backend: str) -> dict[str, object]:
    """The four fake implementations, naming ``backend`` in their errors."""

    def forward(a, b, inv_tau, critic, all_pairs, eps):
        _one_device(backend, a=a, b=b, inv_tau=inv_tau)
        _check_3d(backend, a=a, b=b)
        h, n = a.shape[0], a.shape[1]
        return _f32(a, h, 2 * n if all_pairs else n), _f32(a, h, 0 if all_pairs else n)

    def backward(a, b, inv_tau, critic, all_pairs, eps, *stats):
        # stats: row_lse, col_lse, g_row, g_col, row_center, col_center
        named = dict(zip(("row_lse", "col_lse", "g_row", "g_col", "row_center", "col_center"),
                         stats))  # fmt: skip
        _one_device(backend, a=a, b=b, inv_tau=inv_tau, **named)
        _check_3d(backend, a=a, b=b)
        return _f32(a, *a.shape), _f32(a, *b.shape), _f32(a)

    def rect_forward(x, y, inv_tau, critic, offset, eps, row_labels=None, col_labels=None):
        _one_device(backend, x=x, y=y, inv_tau=inv_tau)
        _check_3d(backend, x=x, y=y)
        return _f32(x, x.shape[0], x.shape[1])

    def rect_backward(x, y, inv_tau, critic, offset, eps, lse, g, center, columns_grad=True,
                      row_labels=None, col_labels=None):
        # columns_grad=False: zeros for y (no dY product).
        _one_device(backend, x=x, y=y, inv_tau=inv_tau, lse=lse, g=g, center=center)
        _check_3d(backend, x=x, y=y)
        return _f32(x, *x.shape), _f32(x, *y.shape), _f32(x)

    return {"forward": forward, "backward": backward, "rect_forward": rect_forward,
            "rect_backward": rect_backward}  # fmt: skip


def register(namespace: str) -> None:
    """Register the fake implementations of ``namespace``'s kernel ops (once per process;
    the namespace's library must be loaded). Namespaces without kernel ops are ignored."""
    backend = NAMESPACES.get(namespace)
    if backend is None:
        return
    with _LOCK:
        if namespace in _REGISTERED:
            return
        for name, fake in _fakes(backend).items():
            torch.library.register_fake(f"{namespace}::{name}", fake)
        _REGISTERED.add(namespace)


def kernel_ops(namespace: str) -> list[torch._ops.OpOverload]:
    """The default overloads of ``namespace``'s kernel ops (loaded library), for opcheck."""
    ns = getattr(torch.ops, namespace)
    return [getattr(ns, name).default for name in KERNEL_OPS]
