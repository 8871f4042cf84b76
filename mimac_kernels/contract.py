"""The kernel-level contract every backend implements: one problem, its statistics, the
incoming gradients, and the ``Backend`` protocol over them.

A backend sees the *kernel-level* problem: heads explicit, cosine inputs already
normalised. With ``S = inv_tau * s`` and the critics ``s = x.y`` (``dot``, and
``cosine`` on unit rows, so ``|s| <= 1``) or ``s = log(max(x.y, eps))`` (``log_dot``):

``forward(problem) -> Stats``
    ``negatives="all"``: ``row_lse`` is ``(H, 2N)``, ``log sum_{k != i} exp(S_ik)``
    over the stacked rows ``Z = [a; b]``; ``col_lse`` is ``(H, 0)``.
    ``negatives="cross"``: ``row_lse[h, i] = log sum_j exp(S_ij)`` and
    ``col_lse[h, j] = log sum_i exp(S_ij)``, both ``(H, N)``. float32 (float64 for
    float64 inputs on the torch backend).
``backward(problem, stats, upstream) -> Grads``
    Gradients of ``sum(g_row * row_lse) + sum(g_col * col_lse)`` w.r.t. a and b, float32
    ``(H, N, D)``. With ``W_row_ik = g_row_i exp(S_ik - row_lse_i)`` (the self-pair
    excluded for ``all``) and ``W_col_ik = g_col_k exp(S_ik - col_lse_k)``,
    ``dL/dS = W_row + W_col``. ``Grads.inv_tau``, a 0-dim tensor, is the *centred*
    temperature sum ``sum_ik W_row_ik (s_ik - row_center_i) + sum_ik W_col_ik (s_ik -
    col_center_k)``: with the raw positive scores as centres it is the gradient of the
    losses ``lse - inv_tau * center`` w.r.t. ``inv_tau``, formed element by element so
    that nothing cancels in float32.
``probe(device, dtype) -> str | None`` and ``refusal(problem) -> str | None``
    Why the backend cannot run, or ``None``. ``probe`` holds the expensive part that
    depends only on where the inputs live (a compiler build, a driver query, the
    capability of ``device``, including its index); ``dispatch`` caches it. ``refusal``
    sees the whole problem (shapes, heads; a ``Problem`` or a ``RectProblem``) and must
    be cheap: it runs at every call.

The rectangular problem (``RectProblem``: rows ``x`` ``(H, R, D)`` against columns ``y``
``(H, C, D)``, row ``i`` optionally leaving out column ``i + offset`` and, with labels,
every column of its own label) is what the
losses across ranks need: local rows against every rank's gathered columns.
``rect_forward(problem) -> Tensor``
    ``lse[h, i] = log sum_{k valid} exp(S_ik)``, ``(H, R)`` float32 (float64 for
    float64 inputs on the torch backend).
``rect_backward(problem, lse, g, center) -> RectGrads``
    With ``W_ik = g_i exp(S_ik - lse_i)`` (0 for the skipped pair): the gradients of
    ``sum(g * lse)`` w.r.t. x ``(H, R, D)`` and y ``(H, C, D)``, float32, and the centred
    temperature sum ``sum_ik W_ik (s_ik - center_i)`` (0-dim), as ``Grads.inv_tau``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from mimac_kernels.options import CRITICS, KERNEL_DTYPES, NEGATIVES


@dataclass(frozen=True)
class Problem:
    """One kernel-level call: ``a``, ``b`` ``(H, N, D)`` of one dtype and device (made
    contiguous here), ``inv_tau`` a 0-dim float tensor beside them, the critic, the
    negatives and ``eps``."""

    a: Tensor
    b: Tensor
    inv_tau: Tensor
    critic: str
    negatives: str
    eps: float

    def __post_init__(self) -> None:
        a, b = self.a, self.b
        if a.dim() != 3 or a.shape != b.shape:
            raise ValueError(
                f"a and b must both have shape (H, N, D), got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.dtype != b.dtype:
            raise TypeError(f"a and b must have one dtype, got {a.dtype} and {b.dtype}")
        if a.device != b.device or self.inv_tau.device != a.device:
            raise ValueError(
                f"a, b and inv_tau must share a device, got {a.device}, {b.device}, "
                f"{self.inv_tau.device}"
            )
        if self.inv_tau.dim() != 0:
            raise ValueError(f"inv_tau must be a 0-dim tensor, got shape {tuple(self.inv_tau.shape)}")
        if self.critic not in CRITICS:
            raise ValueError(f"critic must be one of {CRITICS}, got {self.critic!r}")
        if self.negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {self.negatives!r}")
        object.__setattr__(self, "a", a.contiguous())
        object.__setattr__(self, "b", b.contiguous())

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def heads(self) -> int:
        return self.a.shape[0]

    @property
    def all_pairs(self) -> bool:
        """``negatives == "all"``: rows and columns are both the stacked ``[a; b]``."""
        return self.negatives == "all"

    @property
    def stat_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of the row and column statistics: ``(H, 2N), (H, 0)`` or ``(H, N), (H, N)``."""
        h, n, _ = self.a.shape
        return ((h, 2 * n), (h, 0)) if self.all_pairs else ((h, n), (h, n))


@dataclass(frozen=True)
class Stats:
    """What the forward saves: the row and column log-sum-exps (shapes: ``Problem.stat_shapes``)."""

    row_lse: Tensor
    col_lse: Tensor


@dataclass(frozen=True)
class Upstream:
    """What the backward receives: the gradients of the row and column log-sum-exps and
    the centres of the temperature sum (the raw positive scores), shaped like ``Stats``."""

    g_row: Tensor
    g_col: Tensor
    row_center: Tensor
    col_center: Tensor


@dataclass(frozen=True)
class Grads:
    """Gradients w.r.t. ``a`` and ``b`` (``(H, N, D)``) and the centred temperature sum
    (0-dim), the gradient w.r.t. ``inv_tau``."""

    a: Tensor
    b: Tensor
    inv_tau: Tensor


@dataclass(frozen=True)
class RectProblem:
    """Rows against columns: ``x`` ``(H, R, D)`` and ``y`` ``(H, C, D)`` of one dtype and
    device (made contiguous here), ``inv_tau`` a 0-dim float tensor beside them, the
    critic and ``eps``. ``offset``: row ``i`` leaves column ``i + offset`` out of its sum
    (its self-pair, where that column exists); ``None``: every column counts.

    The losses across ranks: this rank's rows against every rank's gathered columns,
    its own columns starting at ``offset``. ``columns_grad=False``: the caller drops the
    columns' gradient (a detached queue), so ``rect_backward`` may skip its product and
    return zeros for it (every backend does). ``row_labels`` ``(R,)`` and ``col_labels``
    ``(C,)`` (integers, both or neither; stored as int64): a pair of equal labels is left
    out like the self-pair (PML's NTXent with labels: the negatives' log-sum-exp).
    Backends without the label mask refuse such a problem.
    """

    x: Tensor
    y: Tensor
    inv_tau: Tensor
    critic: str
    eps: float
    offset: int | None = None
    columns_grad: bool = True
    row_labels: Tensor | None = None
    col_labels: Tensor | None = None

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
            raise ValueError(
                f"x and y must have shapes (H, R, D) and (H, C, D), got {tuple(x.shape)} "
                f"and {tuple(y.shape)}"
            )
        if x.dtype != y.dtype:
            raise TypeError(f"x and y must have one dtype, got {x.dtype} and {y.dtype}")
        if x.device != y.device or self.inv_tau.device != x.device:
            raise ValueError(
                f"x, y and inv_tau must share a device, got {x.device}, {y.device}, "
                f"{self.inv_tau.device}"
            )
        if self.inv_tau.dim() != 0:
            raise ValueError(f"inv_tau must be a 0-dim tensor, got shape {tuple(self.inv_tau.shape)}")
        if self.critic not in CRITICS:
            raise ValueError(f"critic must be one of {CRITICS}, got {self.critic!r}")
        if self.offset is not None and (isinstance(self.offset, bool) or not isinstance(
            self.offset, int
        )):
            raise TypeError(f"offset must be an int or None, got {self.offset!r}")
        object.__setattr__(self, "x", x.contiguous())
        object.__setattr__(self, "y", y.contiguous())
        if (self.row_labels is None) != (self.col_labels is None):
            raise ValueError("row_labels and col_labels must be given together or not at all")
        if self.row_labels is not None:
            for name, lab, n in (("row_labels", self.row_labels, x.shape[1]),
                                 ("col_labels", self.col_labels, y.shape[1])):  # fmt: skip
                if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
                    raise TypeError(f"{name} must be an integer tensor, got {lab.dtype}")
                if lab.shape != (n,) or lab.device != x.device:
                    raise ValueError(
                        f"{name} must have shape ({n},) on {x.device}, got "
                        f"{tuple(lab.shape)} on {lab.device}"
                    )
                object.__setattr__(self, name, lab.to(torch.int64).contiguous())

    @property
    def labelled(self) -> bool:
        """Whether pairs of equal labels are left out like the self-pair."""
        return self.row_labels is not None

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def heads(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class RectGrads:
    """Gradients w.r.t. ``x`` ``(H, R, D)`` and ``y`` ``(H, C, D)`` and the centred
    temperature sum (0-dim) of a ``RectProblem``."""

    x: Tensor
    y: Tensor
    inv_tau: Tensor


class Backend(Protocol):
    """A backend: a module (or any object) with these functions. ``rect_forward`` and
    ``rect_backward`` may be missing: ``dispatch`` then refuses rectangular problems."""

    def probe(self, device: torch.device, dtype: torch.dtype) -> str | None: ...

    def refusal(self, problem: Problem | RectProblem) -> str | None: ...

    def forward(self, problem: Problem) -> Stats: ...

    def backward(self, problem: Problem, stats: Stats, upstream: Upstream) -> Grads: ...

    def rect_forward(self, problem: RectProblem) -> Tensor: ...

    def rect_backward(
        self, problem: RectProblem, lse: Tensor, g: Tensor, center: Tensor
    ) -> RectGrads: ...


def kernel_dtype_refusal(dtype: torch.dtype) -> str | None:
    """Why the compiled and Triton kernels refuse ``dtype``, or ``None``."""
    if dtype == torch.float64:
        return "dtype float64 not supported (use backend='torch')"
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} not supported (float32, float16 or bfloat16)"
    return None


#: Why a backend without the label mask refuses a labelled ``RectProblem``.
LABEL_MASK_REFUSAL = (
    "labelled rectangular problems (PML's NTXent with labels) need a label mask inside "
    "the score loop, which these kernels lack (backends torch, triton and cpu have it)"
)

#: Largest y/z extent of a CUDA grid: the kernels put the heads on one such axis.
MAX_GRID_HEADS = 65535


def heads_refusal(problem: Problem | RectProblem, limit: int = MAX_GRID_HEADS) -> str | None:
    """Why a kernel with one grid axis per head refuses ``problem``, or ``None``."""
    if problem.heads > limit:
        return f"at most {limit} heads (a grid axis), got H={problem.heads}"
    return None
