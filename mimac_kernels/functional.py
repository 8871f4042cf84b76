"""``fused_contrastive_loss``: NT-Xent / InfoNCE / CLIP losses without the N x N matrix."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mimac_kernels import dispatch, distributed, ops
from mimac_kernels.contract import Problem
from mimac_kernels.options import CRITICS, DEFAULT_EPS, DTYPES, NEGATIVES, REDUCTIONS


def fused_contrastive_loss(
    a: Tensor,
    b: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "cosine",
    negatives: str = "all",
    symmetric: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    eps: float = DEFAULT_EPS,
    group: object | None = None,
) -> Tensor:
    """Contrastive loss of two views, computed in one fused pass per direction.

    ``negatives="all"`` is NT-Xent (SimCLR, lightly's ``NTXentLoss``): rows
    ``Z = [a; b]``, each row's positive is its other view and its denominator
    runs over every other row. ``negatives="cross"`` is InfoNCE / CLIP: the
    ``N x N`` matrix ``S_ij = f(a_i, b_j)``, row losses and (``symmetric``)
    column losses averaged. ``critic`` is ``"cosine"`` (``x^.y^ / tau``),
    ``"dot"`` (``x.y / tau``) or ``"log_dot"`` (``log(max(x.y, eps)) / tau``
    on probability vectors). ``log_dot`` at ``tau == 1`` takes an exact
    linear-time closed form automatically; that form assumes non-negative
    rows (probabilities), as the critic does.

    Args:
        a, b: the two views, same shape, dtype (float16/bfloat16/float32; float64
            on the torch backend) and device.
        temperature: ``tau > 0``, a float or a 0-dim tensor (may require grad).
        critic, negatives, symmetric: see above.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-row values).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpu"`` or ``"cuda"``. The
            log_dot closed form and ``group=`` run plain torch ops whatever it is; an
            explicit backend that cannot run these inputs still raises.
        eps: clamp for norms (cosine) and dot products (log_dot).
        group: a ``torch.distributed`` process group (or ``dist.group.WORLD``): this
            rank's rows are scored against the all-gathered rows of every rank. With
            ``reduction="mean"`` the value is the mean over this rank's rows, so the
            ranks' mean is the single-process loss, and input gradients are
            ``world_size x`` the single-process ones (what DDP's averaging expects).
            With ``"sum"`` the ranks' values add up to the single-process sum and the
            gradients equal its gradients (DDP's averaging then divides them by
            ``world_size``); ``"none"`` gives this rank's rows. Every rank must pass the
            same N, H, D and dtype. See ``mimac_kernels.distributed``.

    Shape:
        a, b: ``(N, D)`` or ``(H, N, D)`` (H independent heads).
        Output: scalar for ``mean``/``sum``; for ``none``, ``(2N,)`` (``all``) or
        ``(N,)`` (``cross``), with a leading ``H`` for 3-d inputs. float32
        (float64 for float64 inputs).

    Example:
        >>> a, b = torch.randn(8, 16), torch.randn(8, 16)
        >>> fused_contrastive_loss(a, b, temperature=0.5).shape
        torch.Size([])
    """
    _check(a, b, critic, negatives, symmetric, reduction, backend, eps)
    if group is not None:
        _check_group(group)
    inv_tau = _inverse_temperature(temperature, a)
    squeeze = a.dim() == 2
    if squeeze:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if critic == "cosine":
        a, b = _normalize(a, eps), _normalize(b, eps)

    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    pos_dot = (a.to(acc) * b.to(acc)).sum(-1)  # (H, N), linear work
    pos_raw = pos_dot.clamp_min(eps).log() if critic == "log_dot" else pos_dot  # unscaled s_ii
    closed = critic == "log_dot" and _is_unit_temperature(temperature)
    if closed or group is not None:
        problem = Problem(a, b, inv_tau, critic, negatives, eps)
        if backend != "auto" and not torch.compiler.is_compiling():
            dispatch.resolve(backend, problem)  # an explicit backend must be able to run
        row_loss, col_loss = _losses_without_op(problem, pos_raw, group, closed)
    else:
        # The backend is resolved inside the op, where tracing does not look. The
        # positives are the centres of the temperature sum (see ``ops``).
        row_center = torch.cat([pos_raw, pos_raw], dim=-1) if negatives == "all" else pos_raw
        col_center = pos_raw[..., :0] if negatives == "all" else pos_raw
        row_loss, col_loss, _, _ = ops.lse_fwd(
            a, b, inv_tau, row_center, col_center, critic=critic, negatives=negatives, eps=eps,
            backend=backend,
        )

    if negatives == "all" or not symmetric:
        per_row = row_loss
    else:
        per_row = 0.5 * (row_loss + col_loss)
    if squeeze:
        per_row = per_row.squeeze(0)
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def _losses_without_op(
    problem: Problem, pos_raw: Tensor, group: object | None, closed: bool
) -> tuple[Tensor, Tensor]:
    """Row and column losses by the paths that need no fused op: the distributed loss
    and the log_dot closed form (linear time, plain torch, so autograd is exact; across
    ranks it needs only the summed columns)."""
    if not closed:
        return distributed.distributed_losses(problem, pos_raw, group)
    if group is not None:
        distributed.check_equal_inputs(problem.a, group)
    a, b = problem.a.to(pos_raw.dtype), problem.b.to(pos_raw.dtype)
    row_lse, col_lse = _log_dot_unit_lse(a, b, problem.negatives, problem.eps, group)
    pos = problem.inv_tau * pos_raw
    if problem.all_pairs:
        return row_lse - torch.cat([pos, pos], dim=-1), col_lse
    return row_lse - pos, col_lse - pos


def _log_dot_unit_lse(
    a: Tensor, b: Tensor, negatives: str, eps: float, group: object | None
) -> tuple[Tensor, Tensor]:
    """Closed form at tau = 1: ``sum_k exp(S_ik) = z_i . sum_k z_k`` (minus self for ``all``).

    O(M D) time and memory; plain torch ops, so autograd gives the exact gradient.
    With a group, the column sums run over every rank's rows: ``O(D)`` traffic per head.
    """

    def column_sum(x: Tensor) -> Tensor:  # (H, 1, D)
        total = x.sum(dim=1, keepdim=True)
        return total if group is None else distributed.sum_with_grad(total, group)

    # The critic clamps each term, max(z_i . z_k, eps); the sum of n non-negative
    # terms clamped at n * eps agrees wherever no term is below eps, and where all are.
    world = 1 if group is None else torch.distributed.get_world_size(group)
    if negatives == "all":
        # z_i . s - |z_i|^2 cancels when z_i is nearly orthogonal to the other rows
        # (sharp probabilities): float64 keeps the digits float32 would lose.
        z = torch.cat([a, b], dim=1)
        z64 = z.to(_wide_dtype(z))
        denom = (z64 * column_sum(z64)).sum(-1) - (z64 * z64).sum(-1)
        terms = z.shape[1] * world - 1
        return denom.clamp_min(terms * eps).log().to(z.dtype), z.new_empty(z.shape[0], 0)
    terms = a.shape[1] * world
    row = (a * column_sum(b)).sum(-1)
    col = (b * column_sum(a)).sum(-1)
    return row.clamp_min(terms * eps).log(), col.clamp_min(terms * eps).log()


def _wide_dtype(x: Tensor) -> torch.dtype:
    """float64 where the device has it (MPS does not), else ``x``'s dtype."""
    return x.dtype if x.device.type == "mps" else torch.float64


def _normalize(x: Tensor, eps: float) -> Tensor:
    """``x / max(|x|, eps)`` along the last axis, computed in float32 for half inputs
    (in float16, eps = 1e-12 is 0 and a norm above 65504 is inf), returned in x's dtype."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.normalize(x.float(), dim=-1, eps=eps).to(x.dtype)
    return F.normalize(x, dim=-1, eps=eps)


def _is_unit_temperature(temperature: float | Tensor) -> bool:
    if isinstance(temperature, Tensor):
        # A learnable tau needs sum_k P_ik S_ik, which does not factor; reading a
        # tensor's value would also break a compiled graph.
        if temperature.requires_grad or torch.compiler.is_compiling():
            return False
        return bool(temperature.detach().cpu() == 1.0)
    return float(temperature) == 1.0


def _inverse_temperature(temperature: float | Tensor, like: Tensor) -> Tensor:
    """``1 / tau`` as a 0-dim tensor on ``like``'s device (float32, or float64 for float64)."""
    dt = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(temperature, Tensor):
        if temperature.dim() != 0:
            raise ValueError(
                f"temperature must be a float or a 0-dim tensor, got shape {tuple(temperature.shape)}"
            )
        if not temperature.is_floating_point():
            raise TypeError(f"temperature tensor must be floating point, got {temperature.dtype}")
        if temperature.device != like.device:
            raise ValueError(
                f"temperature is on {temperature.device} but the inputs are on {like.device}"
            )
        _check_positive_tensor(temperature)
        return 1.0 / temperature.to(dt)
    value = check_positive_number(temperature, "temperature", "a float or a 0-dim tensor")
    return torch.tensor(1.0 / value, dtype=dt, device=like.device)


def check_positive_number(value: object, name: str, accepted: str = "a float") -> float:
    """``value`` as a float if it is a finite real number > 0 (not a bool); else TypeError
    or ValueError naming ``name`` (``accepted``: what the caller takes, for the message)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def _check_positive_tensor(t: Tensor, name: str = "temperature") -> None:
    ok = torch.isfinite(t) & (t > 0)
    msg = f"{name} must be finite and > 0"
    if torch.compiler.is_compiling() or t.device.type != "cpu":
        torch._assert_async(ok, msg)  # no host sync on accelerators / in graphs
    elif not bool(ok):
        raise ValueError(f"{msg}, got {t.item()}")


def _check_group(group: object) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")


def _check(
    a: Tensor,
    b: Tensor,
    critic: str,
    negatives: str,
    symmetric: bool,
    reduction: str,
    backend: str,
    eps: float,
) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must have shape (N, D) or (H, N, D), got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    for name, value, allowed in (
        ("critic", critic, CRITICS),
        ("negatives", negatives, NEGATIVES),
        ("reduction", reduction, REDUCTIONS),
        ("backend", backend, ("auto",) + dispatch.BACKENDS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (0 < eps < 1):
        raise ValueError(f"eps must be a float in (0, 1), got {eps!r}")
