"""Memory-bank / queue negatives (MoCo, lightly's ``NTXentLoss(memory_bank_size=...)``)
without the N x K matrix.

Row ``i`` of the queries ``q`` has its positive key ``k_i`` and, as negatives, the K rows
of a detached queue ``Q`` (no in-batch negatives). With ``S = s / tau``:

    l_i = -S(q_i, k_i) + log(exp(S(q_i, k_i)) + sum_k exp(S(q_i, Q_k)))
        = softplus(lse_i - S(q_i, k_i)),    lse_i = log sum_k exp(S(q_i, Q_k))

``lse`` is the rectangular problem of ``contract.RectProblem`` (rows ``q`` against
columns ``Q``, nothing skipped) on whatever backend ``dispatch`` picks for it. Its
gradient: ``dl_i / d lse_i = sigmoid(lse_i - S_ii)``, handed to the backend's
``rect_backward`` as the row weights ``g``; the positive's gradient is plain autograd
of the O(N D) positive term; the temperature gradient is the backend's centred sum
``sum_ik W_ik (s_ik - s_ii)`` (``ops``: summed element by element, nothing cancels).
The queue gets no gradient (it must not require one). docs/losses.md, "Memory-bank
and queue negatives".

The custom ops ``mimac_kernels::bank_fwd`` / ``bank_bwd`` carry fake implementations and
``register_autograd`` joins them, as in ``ops``, so the pair traces under
``torch.compile`` and passes ``torch.library.opcheck``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mimac_kernels import dispatch
from mimac_kernels.contract import RectProblem
from mimac_kernels.ops import _unaliased


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def queue_row_losses(
    q: Tensor, k: Tensor, queue: Tensor, inv_tau: Tensor, critic: str, eps: float,
    backend: str,
) -> Tensor:
    """Per-row losses ``softplus(lse_i - S_ii)`` (module docstring) of checked inputs.

    Shape:
        q, k: ``(H, N, D)``, already normalised for the cosine critic; queue ``(H, K, D)``
        likewise, of q's dtype and device, not requiring grad; inv_tau 0-dim (float32,
        float64 for float64 inputs). Returns ``(H, N)``, float32 (float64 for float64).
    """
    acc = _stat_dtype(q)
    pos_dot = (q.to(acc) * k.to(acc)).sum(-1)  # (H, N): the O(N D) positive term
    pos_raw = pos_dot.clamp_min(eps).log() if critic == "log_dot" else pos_dot
    shifted, _ = bank_fwd(q, queue, inv_tau, pos_raw, critic=critic, eps=eps, backend=backend)
    # log(e^pos + e^lse) - pos = softplus(lse - pos); its gradient sigmoid(lse - pos)
    # reaches the op as the weights of its rows.
    return torch.nn.functional.softplus(shifted)


def check_queue(queue: object, a: Tensor, name: str = "queue") -> None:
    """Refuse a queue that cannot be the negatives of the rows ``a`` (``(N, D)`` or
    ``(H, N, D)``): ValueError/TypeError naming ``name`` and what was expected."""
    if not isinstance(queue, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(queue).__name__}")
    want = "(K, D)" if a.dim() == 2 else "(H, K, D)"
    if queue.dim() != a.dim():
        raise ValueError(
            f"{name} must have shape {want} for inputs of shape {tuple(a.shape)}, got "
            f"{tuple(queue.shape)}"
        )
    if queue.shape[-1] != a.shape[-1]:
        raise ValueError(
            f"{name} must have the inputs' width D={a.shape[-1]} (shape {want}), got "
            f"{tuple(queue.shape)}"
        )
    if a.dim() == 3 and queue.shape[0] != a.shape[0]:
        raise ValueError(
            f"{name} must have the inputs' H={a.shape[0]} heads (shape {want}), got "
            f"{tuple(queue.shape)}"
        )
    if queue.shape[-2] == 0:
        raise ValueError(f"{name} must have at least one row (K >= 1), got {tuple(queue.shape)}")
    if queue.dtype != a.dtype:
        raise TypeError(f"{name} must have the inputs' dtype {a.dtype}, got {queue.dtype}")
    if queue.device != a.device:
        raise ValueError(f"{name} must be on the inputs' device {a.device}, got {queue.device}")
    if queue.requires_grad:
        raise ValueError(
            f"{name} must not require grad (its rows are detached negatives and receive no "
            f"gradient): pass {name}.detach()"
        )


# --- the custom ops --------------------------------------------------------------------


@torch.library.custom_op("mimac_kernels::bank_fwd", mutates_args=())
def bank_fwd(
    x: Tensor, bank: Tensor, inv_tau: Tensor, center: Tensor, *, critic: str, eps: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(lse - inv_tau * center, lse)``: the log-sum-exp of each row of x over every
    bank row, shifted by the row's scaled centre (its raw positive score).

    Shape: x ``(H, R, D)``, bank ``(H, K, D)``, center ``(H, R)``; returns two ``(H, R)``,
    float32 (float64 for float64 inputs).
    """
    problem = RectProblem(x, bank, inv_tau, critic, eps, None)
    lse = dispatch.get_backend(dispatch.resolve(backend, problem)).rect_forward(problem)
    dt = _stat_dtype(x)
    lse = lse.to(dt)
    outs = (lse - inv_tau.to(dt) * center.to(dt), lse)
    return _unaliased(outs, (x, bank, inv_tau, center))


@bank_fwd.register_fake
def _(x, bank, inv_tau, center, *, critic, eps, backend):
    dt = _stat_dtype(x)
    return (x.new_empty(x.shape[0], x.shape[1], dtype=dt),
            x.new_empty(x.shape[0], x.shape[1], dtype=dt))  # fmt: skip


@torch.library.custom_op("mimac_kernels::bank_bwd", mutates_args=())
def bank_bwd(
    x: Tensor, bank: Tensor, inv_tau: Tensor, lse: Tensor, g: Tensor, center: Tensor, *,
    critic: str, eps: float, backend: str,
) -> tuple[Tensor, Tensor]:
    """Gradient of ``sum(g * lse)`` w.r.t. x and the centred temperature sum
    ``sum_ik W_ik (s_ik - center_i)``, ``W_ik = g_i exp(S_ik - lse_i)`` (``contract``).
    The bank is detached: its gradient is not asked for (``columns_grad=False``: every
    backend skips that product).
    """
    problem = RectProblem(x, bank, inv_tau, critic, eps, None, columns_grad=False)
    grads = dispatch.get_backend(dispatch.resolve(backend, problem)).rect_backward(
        problem, lse.contiguous(), g.contiguous(), center.contiguous()
    )
    outs = (grads.x.to(x.dtype), grads.inv_tau.to(inv_tau.dtype).reshape(()))
    return _unaliased(outs, (x, bank, inv_tau, lse, g, center))


@bank_bwd.register_fake
def _(x, bank, inv_tau, lse, g, center, *, critic, eps, backend):
    return torch.empty_like(x), torch.empty_like(inv_tau)


def _setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    x, bank, inv_tau, center = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(x, bank, inv_tau, lse, center)
    ctx.options = dict(keyword_only_inputs)


def _backward(ctx, g: Tensor | None, _g_lse=None):
    x, bank, inv_tau, lse, center = ctx.saved_tensors
    # A `.sum().backward()` hands in a stride-0 (expanded) gradient: densify.
    g = torch.zeros_like(lse) if g is None else g.contiguous()
    gx, gt = bank_bwd(x, bank, inv_tau, lse, g, center, **ctx.options)
    g_center = (-inv_tau.to(g.dtype) * g).to(center.dtype)
    return gx, None, gt, g_center


bank_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- the FIFO bank of the drop-in module ------------------------------------------------


class MemoryBank(nn.Module):
    """A FIFO queue of K detached rows of width D, as lightly's ``MemoryBankModule``
    keeps it: a float32 buffer ``bank`` ``(K, D)`` of random unit rows at first
    (``torch.randn`` from the global generator, then normalised) and a pointer
    ``bank_ptr`` ``(1,)``. ``enqueue`` writes a batch at the pointer; a batch that
    reaches the end fills the bank up to it, drops its remaining rows and moves the
    pointer back to 0 (lightly's rule, no wrap-around). Neither buffer is saved in a
    state dict (lightly's ``persistent=False``).

    Args:
        size: ``(K, D)``, allocated now; or an int K, the width D taken from the first
            batch (``materialize``), the random rows drawn then.
        group: a process group: ``enqueue`` writes every rank's batch, in rank order
            (lightly's ``gather_distributed=True``), so every rank holds the same bank.
    """

    bank: Tensor | None
    bank_ptr: Tensor

    def __init__(self, size: int | Sequence[int], group: Any = None) -> None:
        super().__init__()
        self.size, self.dim = _bank_size(size)
        self.group = group
        self.register_buffer("bank", None, persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if self.dim is not None:
            self._initialize(self.dim, torch.device("cpu"))

    def _initialize(self, dim: int, device: torch.device) -> None:
        rows = torch.randn(self.size, dim)  # the global generator, as lightly draws it
        self.bank = torch.nn.functional.normalize(rows, dim=-1).to(device)
        self.bank_ptr.zero_()

    def materialize(self, like: Tensor) -> Tensor:
        """The bank, drawn now with ``like``'s width (``(N, D)``) if it has none yet."""
        if self.bank is None:
            self.dim = like.shape[-1]
            self._initialize(self.dim, like.device)
        assert self.bank is not None
        return self.bank

    @torch.no_grad()
    def enqueue(self, batch: Tensor) -> None:
        """Write the rows of ``batch`` ``(N, D)`` (detached, cast to the bank's dtype and
        device) at the pointer, lightly's ``_dequeue_and_enqueue``."""
        bank = self.materialize(batch)
        if self.group is not None and torch.distributed.get_world_size(self.group) > 1:
            parts = [torch.empty_like(batch) for _ in range(torch.distributed.get_world_size(
                self.group))]  # fmt: skip
            torch.distributed.all_gather(parts, batch.contiguous(), group=self.group)
            batch = torch.cat(parts)
        n, ptr = batch.shape[0], int(self.bank_ptr)
        if ptr + n >= self.size:
            bank[ptr:] = batch[: self.size - ptr].detach()
            self.bank_ptr.zero_()
        else:
            bank[ptr : ptr + n] = batch.detach()
            self.bank_ptr[0] = ptr + n


def _bank_size(size: object) -> tuple[int, int | None]:
    """``(K, D)`` of a memory bank from ``memory_bank_size`` (an int K, D not yet known:
    None; or a ``(K, D)`` pair); ValueError naming it otherwise."""
    def count(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if count(size):
        return int(size), None  # type: ignore[call-overload]
    if isinstance(size, Sequence) and len(size) == 2 and all(count(v) for v in size):
        k, d = (int(v) for v in size)
        if k > 0 and d == 0:
            raise ValueError(f"memory_bank_size (K, D) needs D >= 1, got {tuple(size)}")
        return k, d
    raise ValueError(
        "memory_bank_size must be an int K >= 0 (0: no bank; D from the first batch) or a "
        f"(K, D) pair of ints >= 0, got {size!r}"
    )
