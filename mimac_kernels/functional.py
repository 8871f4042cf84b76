"""``fused_contrastive_loss``: NT-Xent / InfoNCE / CLIP losses without the N x N matrix."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mimac_kernels import dispatch, distributed, memory_bank, ops
from mimac_kernels.contract import Problem, RectProblem
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
    queue: Tensor | None = None,
) -> Tensor:
    """Contrastive loss of two views, computed in one fused pass per direction.

    ``negatives="all"`` is NT-Xent (SimCLR, lightly's ``NTXentLoss``): rows
    ``Z = [a; b]``, each row's positive is its other view and its denominator
    runs over every other row. ``negatives="cross"`` is InfoNCE / CLIP: the
    ``N x N`` matrix ``S_ij = f(a_i, b_j)``, row losses and (``symmetric``)
    column losses averaged. ``critic`` is ``"cosine"`` (``x^.y^ / tau``),
    ``"dot"`` (``x.y / tau``) or ``"log_dot"`` (``log(max(x.y, eps)) / tau``
    on probability vectors). ``log_dot`` at ``tau == 1`` takes a linear-time
    closed form automatically where it is exact (non-negative rows where no
    term, or every term, is clamped at eps; docs/losses.md); elsewhere the tiled path,
    so the loss at ``tau == 1`` is the function beside it. Cosine rows are
    normalised without overflow (scaled by their largest entry first), so any
    finite input gives the float64 value.

    Args:
        a, b: the two views, same shape, dtype (float16/bfloat16/float32; float64
            on the torch backend) and device.
        temperature: ``tau > 0``, a float or a 0-dim tensor (may require grad);
            ``1 / tau`` must be finite in the compute dtype.
        critic, negatives, symmetric: see above.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-row values).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpu"`` or ``"cuda"``. The
            log_dot closed form runs plain torch ops whatever it is; with ``group=``
            the local rows against the gathered columns run on this backend (``auto``:
            the same choice as without a group). An explicit backend that cannot run
            these inputs still raises.
        eps: clamp for norms (cosine) and dot products (log_dot), in (0, 1) and at
            least ``min_eps(a.dtype)``, the smallest normal number of the compute dtype
            (1.18e-38; 2.2e-308 for float64); smaller values are refused.
        group: a ``torch.distributed`` process group (or ``dist.group.WORLD``): this
            rank's rows are scored against the all-gathered rows of every rank. With
            ``reduction="mean"`` the value is the mean over this rank's rows, so the
            ranks' mean is the single-process loss, and input gradients are
            ``world_size x`` the single-process ones (what DDP's averaging expects).
            With ``"sum"`` the ranks' values add up to the single-process sum and the
            gradients equal its gradients (DDP's averaging then divides them by
            ``world_size``); ``"none"`` gives this rank's rows. Every rank must pass the
            same N, H, D and dtype. See ``mimac_kernels.distributed``.
        queue: MoCo's queue of negatives (``mimac_kernels.memory_bank``): ``a`` are the
            queries, ``b`` their positive keys, and row i's loss is
            ``-S(a_i, b_i) + log(exp(S(a_i, b_i)) + sum_k exp(S(a_i, queue_k)))``: no
            in-batch negatives, no column losses (leave ``negatives`` and ``symmetric``
            at their defaults), no gradient into the queue (it must not require grad).
            Same width D, dtype and device as ``a``; the cosine critic normalises its
            rows too. Never an N x K matrix. With ``group=``, each rank's rows against
            its own queue (nothing gathered; the convention above holds).

    Shape:
        a, b: ``(N, D)`` or ``(H, N, D)`` (H independent heads).
        queue: ``(K, D)``, or ``(H, K, D)`` for 3-d inputs.
        Output: scalar for ``mean``/``sum``; for ``none``, ``(2N,)`` (``all``) or
        ``(N,)`` (``cross``, and with a queue), with a leading ``H`` for 3-d inputs.
        float32 (float64 for float64 inputs).

    Example:
        >>> a, b = torch.randn(8, 16), torch.randn(8, 16)
        >>> fused_contrastive_loss(a, b, temperature=0.5).shape
        torch.Size([])
    """
    _check(a, b, critic, negatives, symmetric, reduction, backend, eps)
    if group is not None:
        _check_group(group)
    inv_tau = _inverse_temperature(temperature, a)
    if queue is not None:
        return _queue_loss(a, b, queue, inv_tau, (critic, negatives, symmetric, reduction,
                                                  backend, eps, group))  # fmt: skip
    unit = _is_unit_temperature(temperature)
    options = (critic, negatives, symmetric, reduction, backend, eps, group)
    return _fused_loss(a, b, inv_tau, options, unit_temperature=unit)


def contrastive_loss_with_scale(
    a: Tensor,
    b: Tensor,
    scale: float | Tensor,
    *,
    scale_name: str = "logit_scale",
    critic: str = "dot",
    negatives: str = "cross",
    symmetric: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    eps: float = DEFAULT_EPS,
    group: object | None = None,
) -> Tensor:
    """``fused_contrastive_loss`` with ``temperature = 1 / scale``, for callers that hold
    the multiplier (open_clip's ``logit_scale``): its gradient is formed directly, without
    the float32 overflow of ``dL/dtau * dtau/dscale`` at large scales (NaN at 1e30).

    Args:
        scale: ``1 / tau``, a float or a 0-dim floating tensor (may require grad), finite
            and > 0 in the compute dtype; ``scale_name`` names it in errors.
        others: as ``fused_contrastive_loss``.

    Shape: as ``fused_contrastive_loss``.
    """
    _check(a, b, critic, negatives, symmetric, reduction, backend, eps)
    if group is not None:
        _check_group(group)
    inv_tau = inverse_of_scale(scale, a, scale_name)
    unit = not isinstance(scale, Tensor) and float(scale) == 1.0
    options = (critic, negatives, symmetric, reduction, backend, eps, group)
    return _fused_loss(a, b, inv_tau, options, unit_temperature=unit)


def _fused_loss(
    a: Tensor,
    b: Tensor,
    inv_tau: Tensor,
    options: tuple[str, str, bool, str, str, float, object | None],
    *,
    unit_temperature: bool = False,
) -> Tensor:
    """The loss given the checked inverse temperature ``1 / tau``.

    Args:
        inv_tau: 0-dim tensor on the inputs' device, float32 (float64 for float64
            inputs), finite and > 0 (``_inverse_temperature``, ``inverse_of_scale``).
        options: ``(critic, negatives, symmetric, reduction, backend, eps, group)``,
            already checked (``_check``).
        unit_temperature: ``tau == 1`` and not learnable (log_dot's closed form).
    """
    critic, negatives, symmetric, reduction, backend, eps, group = options
    squeeze = a.dim() == 2
    if squeeze:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if critic == "cosine":
        a, b = _normalize(a, eps), _normalize(b, eps)

    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    pos_dot = (a.to(acc) * b.to(acc)).sum(-1)  # (H, N), linear work
    pos_raw = pos_dot.clamp_min(eps).log() if critic == "log_dot" else pos_dot  # unscaled s_ii
    closed = critic == "log_dot" and unit_temperature
    row_loss = col_loss = None
    if closed or group is not None:
        problem = Problem(a, b, inv_tau, critic, negatives, eps)
        if backend != "auto" and not torch.compiler.is_compiling():
            dispatch.resolve(backend, problem)  # an explicit backend must be able to run
        row_loss, col_loss = _losses_without_op(problem, pos_raw, group, closed, backend)
    if row_loss is None:  # the tiled op (also where log_dot's closed form would not be exact)
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
    return _reduce(per_row, reduction)


def _queue_loss(
    a: Tensor,
    b: Tensor,
    queue: object,
    inv_tau: Tensor,
    options: tuple[str, str, bool, str, str, float, object | None],
) -> Tensor:
    """MoCo's loss of queries ``a`` with keys ``b`` against ``queue`` (``memory_bank``)."""
    critic, negatives, symmetric, reduction, backend, eps, group = options
    if negatives != "all" or symmetric is not True:
        raise ValueError(
            "with queue=, the negatives are the queue's rows and there are no column losses: "
            f"leave negatives and symmetric at their defaults, got negatives={negatives!r}, "
            f"symmetric={symmetric!r}"
        )
    memory_bank.check_queue(queue, a)
    assert isinstance(queue, Tensor)
    squeeze = a.dim() == 2
    if squeeze:
        a, b, queue = a.unsqueeze(0), b.unsqueeze(0), queue.unsqueeze(0)
    if group is not None:
        distributed.check_equal_inputs(a, group)  # the ranks' mean is the global mean
    if critic == "cosine":
        a, b, queue = _normalize(a, eps), _normalize(b, eps), _normalize(queue, eps)
    if backend != "auto" and not torch.compiler.is_compiling():
        # An explicit backend that cannot run the rows against the queue raises here.
        dispatch.resolve(backend, RectProblem(a, queue, inv_tau, critic, eps, None))
    per_row = memory_bank.queue_row_losses(a, b, queue, inv_tau, critic, eps, backend)
    if squeeze:
        per_row = per_row.squeeze(0)
    return _reduce(per_row, reduction)


def _losses_without_op(
    problem: Problem, pos_raw: Tensor, group: object | None, closed: bool, backend: str
) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """Row and column losses by the paths outside the custom op: the distributed loss
    (local rows against the gathered columns on ``backend``, see ``distributed``) and
    the log_dot closed form (linear time, plain torch, so autograd is exact; across
    ranks it needs only the summed columns). ``(None, None)``: the tiled op must run
    (the closed form would not be exact on these inputs and there is no group)."""
    if closed:
        if group is not None:
            distributed.check_equal_inputs(problem.a, group)
        a, b = problem.a.to(pos_raw.dtype), problem.b.to(pos_raw.dtype)
        lse = _log_dot_unit_lse(a, b, problem.negatives, problem.eps, group)
        if lse is not None:
            row_lse, col_lse = lse
            pos = problem.inv_tau * pos_raw
            if problem.all_pairs:
                return row_lse - torch.cat([pos, pos], dim=-1), col_lse
            return row_lse - pos, col_lse - pos
    if group is None:
        return None, None
    return distributed.distributed_losses(problem, pos_raw, group, backend)


def _log_dot_unit_lse(
    a: Tensor, b: Tensor, negatives: str, eps: float, group: object | None
) -> tuple[Tensor, Tensor] | None:
    """Closed form at tau = 1: ``sum_k exp(S_ik) = z_i . sum_k z_k`` (minus self for ``all``).

    O(M D) time and memory; plain torch ops, so autograd gives the exact gradient.
    With a group, the column sums run over every rank's rows: ``O(D)`` traffic per head.
    ``None`` where the closed form is not the critic's function on these inputs
    (``_closed_form_is_exact``); the caller then takes the per-term path.
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
        total = (z64 * column_sum(z64)).sum(-1)
        denom = total - (z64 * z64).sum(-1)
        terms = z.shape[1] * world - 1
        # The subtraction loses log2(total / denom) bits of the wide dtype: allowed while
        # the result keeps about its own precision (2^-23 for float32, 2^-33 for float64).
        goal = 2.0**-23 if z.dtype != torch.float64 else 2.0**-33
        ratio = max(4.0, goal / torch.finfo(z64.dtype).eps)
        kept = (total <= ratio * denom).all()
        if not _closed_form_is_exact(((z64, z64, denom),), eps, group, kept):
            return None
        return denom.clamp_min(terms * eps).log().to(z.dtype), z.new_empty(z.shape[0], 0)
    terms = a.shape[1] * world
    row = (a * column_sum(b)).sum(-1)
    col = (b * column_sum(a)).sum(-1)
    if not _closed_form_is_exact(((a, b, row), (b, a, col)), eps, group):
        return None
    return row.clamp_min(terms * eps).log(), col.clamp_min(terms * eps).log()


def _closed_form_is_exact(
    sides: tuple[tuple[Tensor, Tensor, Tensor], ...],
    eps: float,
    group: object | None,
    accurate: Tensor | None = None,
) -> bool:
    """Whether ``max(d_i, n eps)``, ``d_i = sum_k x_i . y_k``, is ``sum_k max(x_i . y_k, eps)``,
    in value and gradient.

    ``sides``: ``(x, y, d)`` per direction, x ``(H, R, D)`` the rows, y ``(H, C, D)`` the
    columns (this rank's), d ``(H, R)``; ``accurate``: a 0-dim bool, False where the
    caller's own rounding check fails. It is where every entry is >= 0 (so every term
    is) and either no term is clamped (a lower bound of every term, from
    ``x_i . y_k >= min(x_i) sum(y_k)`` and ``>= min(y_k) sum(x_i)``, is >= eps) or every
    term is (every ``d_i <= eps``). A single clamped term beside unclamped ones changes
    the value by up to eps and the gradient by O(1): a clamped term's gradient is 0,
    the closed form's is not. Elsewhere the caller takes the per-term path, so the loss
    at tau = 1 is the function it is beside tau = 1. One host read (with a group, two
    all-reduces of a few numbers, so every rank takes the same path); a compiled graph
    cannot branch on data, so there negative entries are refused instead.
    """
    if torch.compiler.is_compiling():
        negative = torch.stack([(t < 0).any() for x, y, _ in sides for t in (x, y)]).any()
        torch._assert_async(
            ~negative,
            "log_dot at temperature 1 (closed form) needs non-negative rows in a compiled graph",
        )
        return True
    dt = sides[0][2].dtype
    mins = [(y.amin(dim=(-2, -1)), y.sum(-1).amin(-1)) for _, y, _ in sides]  # (H,) each
    if group is not None:  # over every rank's columns
        flat = torch.stack([t.to(dt) for pair in mins for t in pair])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MIN, group=group)
        mins = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(sides))]
    negative = torch.zeros((), dtype=torch.bool, device=sides[0][2].device)
    unclamped, all_clamped = negative.clone(), ~negative
    for (x, _, d), (y_min, y_sum_min) in zip(sides, mins):
        x_min, x_sum = x.amin(-1).to(dt), x.sum(-1).to(dt)  # (H, R)
        y_min, y_sum_min = y_min.to(dt)[:, None], y_sum_min.to(dt)[:, None]
        lower = torch.maximum(x_min * y_sum_min, y_min * x_sum)
        negative = negative | (x_min < 0).any() | (y_min < 0).any()
        unclamped = unclamped | (lower >= eps).all()  # any side's bound covers every term
        all_clamped = all_clamped & (d <= eps).all()
    ok = unclamped | all_clamped if accurate is None else (unclamped | all_clamped) & accurate
    bad = (negative | ~ok).to(torch.int32)
    if group is not None:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX, group=group)
    return not bool(bad)


def _wide_dtype(x: Tensor) -> torch.dtype:
    """float64 where the device has it (MPS does not), else ``x``'s dtype."""
    return x.dtype if x.device.type == "mps" else torch.float64


def _normalize(x: Tensor, eps: float) -> Tensor:
    """``x / max(|x|, eps)`` along the last axis, for any finite x; float32 for half inputs
    (in float16, eps = 1e-12 is 0 and a norm above 65504 is inf), returned in x's dtype.

    ``|x|^2`` overflows float32 above ``|x|`` ~ 1.8e19 (and underflows below ~1e-19), so
    each row is first divided by its largest magnitude m: the unit vector is that of
    ``x / m``, whose norm lies in [1, sqrt(D)]. m is a constant to autograd: the unit
    vector does not depend on the row's scale, so its gradient is exact without m's.
    """
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    m = xf.detach().abs().amax(dim=-1, keepdim=True)
    m = torch.where(m > 0, m, torch.ones_like(m))  # a zero row stays 0; NaN rows stay NaN
    scaled = xf / m
    norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    # |x| < eps, i.e. |x / m| < eps / m, gives x / eps = (x / m) / (eps / m). eps / m stays
    # finite: eps is at least the dtype's smallest normal (min_eps), m at least its
    # smallest subnormal.
    limit = eps / m
    return (scaled / torch.where(norm < limit, limit, norm)).to(x.dtype)


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
        # Inverted in the wider of the two dtypes: a float64 tau above float32's range
        # has a representable 1 / tau.
        inv_tau = (1.0 / temperature.to(torch.promote_types(temperature.dtype, dt))).to(dt)
        _check_positive_tensor(inv_tau, "1 / temperature", f"representable in {dt}")
        return inv_tau
    value = check_positive_number(temperature, "temperature", "a float or a 0-dim tensor")
    inv_tau = torch.tensor(1.0 / value, dtype=dt, device=like.device)
    _check_positive_tensor(inv_tau, "1 / temperature", f"representable in {dt}")
    return inv_tau


def inverse_of_scale(scale: float | Tensor, like: Tensor, name: str) -> Tensor:
    """A multiplier ``1 / tau`` given as such (``logit_scale``), as ``_inverse_temperature``
    returns it: checked finite and > 0 in the compute dtype, its gradient kept."""
    dt = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(scale, Tensor):
        if scale.dim() != 0 or not scale.is_floating_point():
            raise ValueError(
                f"{name} must be a float or a 0-dim floating-point tensor, got a "
                f"{scale.dtype} tensor of shape {tuple(scale.shape)}"
            )
        if scale.device != like.device:
            raise ValueError(f"{name} is on {scale.device} but the inputs are on {like.device}")
        inv_tau = scale.to(dt)
    else:
        value = check_positive_number(scale, name, "a float or a 0-dim tensor")
        inv_tau = torch.tensor(value, dtype=dt, device=like.device)
    _check_positive_tensor(inv_tau, name, f"representable in {dt}")
    return inv_tau


def check_positive_number(value: object, name: str, accepted: str = "a float") -> float:
    """``value`` as a float if it is a finite real number > 0 (not a bool); else TypeError
    or ValueError naming ``name`` (``accepted``: what the caller takes, for the message)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def _check_positive_tensor(t: Tensor, name: str = "temperature", where: str = "") -> None:
    """Raise ValueError naming ``name`` unless ``t`` is finite and > 0 (``where``: in what;
    a device-side assert on accelerators and in compiled graphs)."""
    ok = torch.isfinite(t) & (t > 0)
    msg = f"{name} must be finite and > 0" + (f" ({where})" if where else "")
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
    tiny = min_eps(a.dtype)
    if eps < tiny:
        raise ValueError(
            f"eps must be >= {tiny!r}, the smallest normal number of the compute dtype "
            f"({_compute_dtype_name(a.dtype)} for {a.dtype} inputs), got {eps!r}: smaller "
            "values lose their digits or become 0 there (NaN or inf instead of the loss)"
        )


def min_eps(dtype: torch.dtype) -> float:
    """The smallest ``eps`` the loss accepts for ``dtype`` inputs: the smallest normal
    number of the dtype it computes in (float32, float64 for float64). Subnormal
    values keep few digits and are flushed to zero by some hardware paths."""
    return float(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny)


def _compute_dtype_name(dtype: torch.dtype) -> str:
    return "float64" if dtype == torch.float64 else "float32"


def _reduce(per_row: Tensor, reduction: str) -> Tensor:
    """``per_row`` reduced as ``reduction`` asks ("mean", "sum" or "none")."""
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row
