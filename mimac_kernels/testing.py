"""Float64 references and the tolerance rule shared by tests and benchmarks."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from unittest import mock

import torch
from torch import Tensor

#: Absolute slack added to the "2x plain PyTorch error" rule, per input dtype.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def naive_contrastive_loss(
    a: Tensor,
    b: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "cosine",
    negatives: str = "all",
    symmetric: bool = True,
    reduction: str = "mean",
    eps: float = 1e-12,
    dtype: torch.dtype | None = torch.float64,
    positives_only: bool = False,
) -> Tensor:
    """The losses of docs/losses.md written out directly, with the full similarity matrix.

    This is also "plain PyTorch": with ``dtype=None`` it computes in the inputs'
    dtype (float32 accumulation is *not* forced), as the eager baseline does.
    ``positives_only`` keeps only the ``-S_pos`` terms (their gradient is the
    part that reaches the inputs outside the backends, see ``error_bound``).

    Shape: as ``fused_contrastive_loss``.
    """
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
        if isinstance(temperature, Tensor):
            temperature = temperature.to(dtype)
    squeeze = a.dim() == 2
    if squeeze:
        a, b = a[None], b[None]
    if critic == "cosine":
        a = a / a.norm(dim=-1, keepdim=True).clamp_min(eps)
        b = b / b.norm(dim=-1, keepdim=True).clamp_min(eps)

    def f(x: Tensor, y: Tensor) -> Tensor:
        d = x @ y.transpose(-1, -2)
        return (d.clamp_min(eps).log() if critic == "log_dot" else d) / temperature

    n = a.shape[1]
    if negatives == "all":
        z = torch.cat([a, b], dim=1)
        s = f(z, z)
        eye = torch.eye(2 * n, dtype=torch.bool, device=a.device)
        pos = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(a.device)
        s_pos = s.gather(-1, pos.expand(s.shape[0], -1)[..., None])[..., 0]
        lse = torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=-1)
        per_row = (0 if positives_only else lse) - s_pos
    else:
        s = f(a, b)
        diag = s.diagonal(dim1=-2, dim2=-1)
        rows = torch.logsumexp(s, dim=-1) - diag
        cols = torch.logsumexp(s, dim=-2) - diag
        per_row = 0.5 * (rows + cols) if symmetric else rows
        if positives_only:
            per_row = -diag
    if squeeze:
        per_row = per_row[0]
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def error_bound(plain_error: float, dtype: torch.dtype, ref: Tensor | None = None) -> float:
    """Allowed error of a backend: twice plain PyTorch's error in ``dtype`` plus ``ATOL``.

    With ``ref`` (the float64 result) two float32 ulps of its largest magnitude are
    added: losses and the temperature gradient come back as float32 scalars, whose
    own rounding the plain loss may happen to dodge on a given input.
    """
    ulps = 0.0
    if ref is not None and ref.numel():
        ulps = 2.0 * torch.finfo(torch.float32).eps * float(ref.detach().abs().max())
    return 2.0 * plain_error + ATOL[dtype] + ulps


def max_abs_err(x: Tensor, ref: Tensor) -> float:
    """Largest absolute difference, in float64; NaN anywhere gives ``inf``."""
    d = (x.detach().double() - ref.detach().double()).abs()
    return float("inf") if torch.isnan(d).any() else float(d.max()) if d.numel() else 0.0


def peak_rss_mb(code: str, timeout: float = 600.0) -> float:
    """Peak resident memory (MiB) of a fresh Python process running ``code``.

    Each measurement gets its own process, so earlier allocations in the caller
    cannot hide or inflate it. It reads ``VmHWM`` (KiB) from ``/proc/self/status``:
    unlike ``ru_maxrss``, which survives ``exec`` and so reports the parent's peak
    when the parent was larger, it belongs to the new process image alone.
    """
    import subprocess
    import sys

    probe = code + (
        "\nfor _l in open('/proc/self/status'):\n"
        "    if _l.startswith('VmHWM:'): print('PEAK_KB', _l.split()[1])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-2000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PEAK_KB")][-1]
    return int(line.split()[1]) / 1024.0


def loss_memory_code(n: int, d: int, provider: str, critic: str = "cosine", seed: int = 0) -> str:
    """Source of a probe that allocates ``(n, d)`` views and, unless ``provider`` is
    ``"inputs"``, runs one forward + backward of the loss (``"plain"`` or a backend name)."""
    setup = (
        "import torch, mimac_kernels\n"
        "from mimac_kernels.testing import naive_contrastive_loss\n"
        "torch.set_num_threads(1)\n"  # thread pools would add per-thread noise
        f"g = torch.Generator().manual_seed({seed})\n"
        f"a = torch.randn({n}, {d}, generator=g).requires_grad_()\n"
        f"b = torch.randn({n}, {d}, generator=g).requires_grad_()\n"
        "x = (a.sum() + b.sum()).item()\n"  # touch the pages so the baseline counts them
    )
    if provider == "inputs":
        return setup
    if provider == "plain":
        call = f"naive_contrastive_loss(a, b, temperature=0.1, critic={critic!r}, dtype=None)"
    else:
        call = (
            f"mimac_kernels.fused_contrastive_loss(a, b, temperature=0.1, critic={critic!r}, "
            f"backend={provider!r})"
        )
    return setup + f"loss = {call}\nloss.backward()\n"


def make_views(
    shape: tuple[int, ...],
    critic: str,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dot_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Two correlated float32 views; probability rows for ``log_dot``, rows scaled by
    ``dot_scale`` for ``dot`` (so a caller can keep ``x.y / tau`` moderate)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen)
    b = a + 0.7 * torch.randn(shape, generator=gen)
    if critic == "log_dot":
        a, b = torch.softmax(2 * a, dim=-1), torch.softmax(2 * b, dim=-1)
    elif critic == "dot":
        a, b = dot_scale * a, dot_scale * b
    return a.to(device), b.to(device)


def loss_and_grads(
    fn, a: Tensor, b: Tensor, tau: float, upstream: Tensor | None, learnable: bool, **kw
) -> tuple[Tensor, list[Tensor]]:
    """``fn``'s loss and its gradients w.r.t. (a, b[, tau]) of ``sum(loss * upstream)``.

    ``learnable``: tau is passed as a 0-dim tensor that requires grad.
    """
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    inputs = [a, b]
    temperature: float | Tensor = tau
    if learnable:
        dt = torch.float64 if a.dtype == torch.float64 else torch.float32
        temperature = torch.tensor(tau, dtype=dt, device=a.device, requires_grad=True)
        inputs.append(temperature)
    loss = fn(a, b, temperature=temperature, **kw)
    total = loss.sum() if upstream is None else (loss * upstream.to(loss.dtype)).sum()
    return loss.detach(), list(torch.autograd.grad(total, inputs))


def assert_backend_matches_float64(
    backend: str, a: Tensor, b: Tensor, dtype: torch.dtype, *, tau: float,
    learnable: bool = True, **kw,
) -> None:
    """``fused_contrastive_loss(backend=...)`` against the float64 formula: the loss and the
    gradients of a, b (and a learnable tau) within ``error_bound`` of plain PyTorch's own
    error in ``dtype``. ``kw``: critic, negatives, symmetric, reduction."""
    from mimac_kernels.functional import fused_contrastive_loss

    a, b = a.to(dtype), b.to(dtype)  # every computation sees the same rounded inputs
    upstream = None
    if kw.get("reduction") == "none":  # a non-uniform upstream gradient
        rows = a.shape[-2] * (2 if kw.get("negatives", "all") == "all" else 1)
        gen = torch.Generator().manual_seed(1)
        upstream = torch.rand((*a.shape[:-2], rows), generator=gen).to(a.device)

    def ours(x: Tensor, y: Tensor, **k) -> Tensor:
        return fused_contrastive_loss(x, y, backend=backend, **k)

    def plain(x: Tensor, y: Tensor, **k) -> Tensor:
        return naive_contrastive_loss(x, y, dtype=None, **k)

    out, grads = loss_and_grads(ours, a, b, tau, upstream, learnable, **kw)
    ref, ref_grads = loss_and_grads(
        naive_contrastive_loss, a.double(), b.double(), tau, upstream, learnable, **kw
    )
    p_out, p_grads = loss_and_grads(plain, a, b, tau, upstream, learnable, **kw)
    # The positive pairs' gradient reaches a and b through autograd, rounded to
    # the inputs' dtype on its own, and is added to the backend's (also rounded)
    # gradient: one rounding of each part, up to an ulp of the parts' size, which
    # plain PyTorch dodges where the parts cancel exactly (N = 1: the loss is 0).
    _, pos_grads = loss_and_grads(
        naive_contrastive_loss, a.double(), b.double(), tau, upstream, False,
        positives_only=True, **kw,
    )  # fmt: skip
    part = {"grad_a": pos_grads[0], "grad_b": pos_grads[1]}
    assert out.dtype == torch.float32 and out.shape == ref.shape
    names = ["loss", "grad_a", "grad_b", "grad_tau"]
    for name, x, r, p in zip(names, [out, *grads], [ref, *ref_grads], [p_out, *p_grads]):
        bound = error_bound(max_abs_err(p, r), dtype, r)
        if name in part:
            assert x.dtype == dtype and x.device == a.device, f"{name}: {x.dtype} on {x.device}"
            if dtype in (torch.float16, torch.bfloat16):
                bound += torch.finfo(dtype).eps * float(part[name].abs().max())
        err = max_abs_err(x, r)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({kw}, {dtype})"


#: Temperatures the kernel-level checks use (log_dot at tau = 1 bypasses the backends).
KERNEL_TAU = {"cosine": 0.1, "dot": 0.5, "log_dot": 0.5}


@dataclass
class KernelCase:
    """Inputs of the kernel-level contract (``mimac_kernels.dispatch``) for one case.

    Shape: a, b ``(H, N, D)`` in the case's dtype (cosine rows unit-normed);
    inv_tau 0-dim; g_row/c_row ``(H, 2N)`` for ``all``, ``(H, N)`` for ``cross``;
    g_col/c_col ``(H, N)`` for ``cross``, ``(H, 0)`` for ``all``; float32.
    """

    critic: str
    negatives: str
    a: Tensor
    b: Tensor
    inv_tau: Tensor
    g_row: Tensor
    g_col: Tensor
    c_row: Tensor  # temperature centres
    c_col: Tensor


def kernel_case(
    shape: tuple[int, int, int], critic: str, negatives: str, dtype: torch.dtype,
    device: str | torch.device, seed: int = 8,
) -> KernelCase:
    """Seeded inputs for a backend's ``forward``/``backward`` (``KERNEL_TAU[critic]``)."""
    h, n, _ = shape
    a, b = make_views(shape, critic, seed=seed, device=device, dot_scale=0.3)
    if critic == "cosine":
        a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    rows = 2 * n if negatives == "all" else n
    gen = torch.Generator().manual_seed(seed + 1)
    g_row = torch.rand(h, rows, generator=gen) / rows
    g_col = torch.rand(h, n if negatives == "cross" else 0, generator=gen) / n
    c_row, c_col = torch.randn(g_row.shape, generator=gen), torch.randn(g_col.shape, generator=gen)
    return KernelCase(
        critic, negatives, a.to(dtype), b.to(dtype),
        torch.tensor(1.0 / KERNEL_TAU[critic], device=device),
        *(t.to(device) for t in (g_row, g_col, c_row, c_col)),
    )  # fmt: skip


def kernel_outputs(backend: ModuleType, case: KernelCase) -> tuple[Tensor, ...]:
    """``backend``'s forward, then its backward from its own log-sum-exps:
    (row_lse, col_lse, grad_a, grad_b, grad_temperature_sum)."""
    row, col = backend.forward(case.a, case.b, case.inv_tau, case.critic, case.negatives, 1e-12)
    grads = backend.backward(
        case.a, case.b, case.inv_tau, case.critic, case.negatives, 1e-12, row, col,
        case.g_row, case.g_col, case.c_row, case.c_col,
    )  # fmt: skip
    return (row, col, *grads)


def kernel_level_errors(
    backend: ModuleType, case: KernelCase, grad_rtol: float | None = None
) -> list[str]:
    """Where ``backend`` misses the tiled float64 reference on the same rounded inputs
    (empty: it matches). Log-sum-exps within 2e-5 (float32) / 2e-4 (half types),
    relative and absolute; gradients from the reference's log-sum-exps within
    ``grad_rtol`` of their largest entry (default 1e-4 / 2e-3: for bf16/fp16 the
    kernels round V to TF32, 11 significant bits) plus 1e-7.
    """
    from mimac_kernels import reference

    dtype, crit, neg = case.a.dtype, case.critic, case.negatives
    d64 = [t.double() for t in (case.a, case.b, case.inv_tau)]
    r_row, r_col = reference.forward(*d64, crit, neg, 1e-12)
    row, col = backend.forward(case.a, case.b, case.inv_tau, crit, neg, 1e-12)
    lse_tol = 2e-5 if dtype == torch.float32 else 2e-4
    errors = []
    for name, x, r in (("row_lse", row, r_row), ("col_lse", col, r_col)):
        if not torch.isclose(x.double(), r, rtol=lse_tol, atol=lse_tol).all():
            errors.append(f"{name}: {max_abs_err(x, r):.3g} off")
    stats = [t.double() for t in (case.g_row, case.g_col, case.c_row, case.c_col)]
    r_grads = reference.backward(*d64, crit, neg, 1e-12, r_row, r_col, *stats)
    grads = backend.backward(
        case.a, case.b, case.inv_tau, crit, neg, 1e-12, r_row.float(), r_col.float(),
        case.g_row, case.g_col, case.c_row, case.c_col,
    )  # fmt: skip
    g_tol = grad_rtol if grad_rtol is not None else (1e-4 if dtype == torch.float32 else 2e-3)
    for name, g, r in zip(("grad_a", "grad_b", "grad_temperature"), grads, r_grads):
        err, scale = max_abs_err(g, r), float(r.abs().max())
        if not err <= g_tol * max(scale, 1e-12) + 1e-7:  # NaN fails too
            errors.append(f"{name}: {err:.3g} off (scale {scale:.3g})")
    return errors


def run_ranks(worker, world: int, args: tuple, timeout: float = 180.0) -> None:
    """Spawn ``world`` processes running ``worker(rank, world, *args)``; fail after ``timeout`` s.

    The worker must be a module-level function (it is pickled); a rank that raises
    makes this raise with its traceback, and a hung rank is killed.
    """
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=(world, *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{world} ranks did not finish within {timeout:.0f} s")


@functools.cache
def cuda_emulation() -> ModuleType:
    """The CUDA emulation's extension (``extension.cuda_emulation_spec``), built or
    loaded once per process; it also registers ``torch.ops.mimac_emu`` and
    ``torch.ops.mimac_emu_selftest``."""
    from mimac_kernels import extension

    return extension.build(extension.cuda_emulation_spec())


@contextlib.contextmanager
def emulated_cuda_backend() -> Iterator[ModuleType]:
    """Inside the block, ``backend="cuda"`` runs the CUDA kernels' own source (and
    ``binding.cpp``) on CPU tensors, through the CPU emulation of ``csrc/emulation``.

    For tests and debugging where no GPU is: a CTA at a time, so only small
    shapes are practical. It checks the kernels' logic (indexing, masking,
    staging, barriers, launch configuration), not the hardware; see
    ``csrc/emulation/cuda_emu.h``. Builds the emulation on first use (about a
    minute); raises ``extension.ExtensionUnavailable`` if that fails.
    """
    from mimac_kernels import cuda_backend, dispatch, extension, extension_backend

    module = cuda_emulation()

    def reason(device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cpu":
            return "the emulated cuda backend runs on CPU tensors"
        return extension_backend.dtype_reason(dtype)

    dispatch.forget_probes()
    try:
        with extension.substitute("cuda", module), \
                mock.patch.object(cuda_backend, "unavailable_reason", reason):
            yield module
    finally:
        dispatch.forget_probes()


#: Thread and block orders of the CUDA emulation (``csrc/emulation/cuda_emu.h``).
EMULATION_SCHEDULES = ("in_order", "reversed", "shuffled", "warps_in_order", "warps_reversed")


@contextlib.contextmanager
def emulation_schedule(schedule: str, seed: int = 0) -> Iterator[None]:
    """Inside the block, emulated CUDA launches run their blocks, and the threads of
    each block between two barriers, in ``schedule`` order: every thread to its next
    barrier per sweep ("in_order", "reversed", "shuffled" with ``seed``), or one warp
    at a time to its next block barrier ("warps_in_order", "warps_reversed"). A
    kernel without races between barriers gives the same bits under every order;
    comparing them is the emulation's race check.
    """
    if schedule not in EMULATION_SCHEDULES:
        raise ValueError(f"schedule must be one of {EMULATION_SCHEDULES}, got {schedule!r}")
    cuda_emulation()  # registers torch.ops.mimac_emu
    torch.ops.mimac_emu.set_schedule(EMULATION_SCHEDULES.index(schedule), seed)
    try:
        yield
    finally:
        torch.ops.mimac_emu.set_schedule(0, 0)
