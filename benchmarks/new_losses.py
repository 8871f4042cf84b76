"""The labelled, queue and sigmoid losses against their peers: cases and providers.

Losses (``LossCase.loss``), ours against the peer's eager loss:

``supcon``
    ``SupConLoss(0.1)(z, labels)`` against pytorch-metric-learning's ``SupConLoss``.
``ntxent-labels``
    ``NTXentLoss(0.07)(z, labels)`` (labelled rectangular kernels; cuda refuses) against
    pytorch-metric-learning's ``NTXentLoss``.
``queue``
    ``NTXentLoss(0.1, memory_bank_size=(K, D))(q, k)`` (``fused_contrastive_loss(q, k,
    queue=bank)`` plus the FIFO bank update) against lightly's ``NTXentLoss`` with the
    same bank size; both draw their bank from the global generator, seeded alike.
``siglip``
    ``SigLipLoss()(x, y, t, b)`` against open_clip's ``SigLipLoss`` (t = 10, b = -10,
    open_clip's initial values; unit rows).

Axes: M rows of embeddings (``supcon``, ``ntxent-labels``: labels ``arange(M) //
views``, i.e. M / 2 classes of 2 rows at ``views=2``; ``queue``: M queries and M keys
against K bank rows; ``siglip``: M images and M texts). D = 128, float32.

Ours runs on the first backend of the device's list (CPU: ``cpu``, then ``torch``)
that runs the loss, SigLIP on the one ``auto`` picks: on a CPU that is ``cpu`` for
SupCon, the queue and ``ntxent-labels``, ``torch`` for SigLIP. The provider's name
says which (``mimac-cpu``, ``mimac-torch``).

This module is also a memory-child suite (``benchmarks.memory``): it defines
``case_from_dict``, ``make_inputs``, ``tiny`` and ``providers``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import peer_losses
from benchmarks.providers import Provider
from mimac_kernels import (
    NTXentLoss,
    SigLipLoss,
    SupConLoss,
    dispatch,
    siglip,
)

LOSSES: tuple[str, ...] = ("supcon", "ntxent-labels", "queue", "siglip")
#: Temperatures: PML's SupCon examples (0.1), PML's NTXent default (0.07), MoCo's (0.1).
TAU: dict[str, float] = {"supcon": 0.1, "ntxent-labels": 0.07, "queue": 0.1, "siglip": 1.0}
#: SigLIP's scale and bias (open_clip's initial values).
SIGLIP_T, SIGLIP_B = 10.0, -10.0
#: Our backends in order of preference per device type (the first that runs the loss).
OUR_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}
#: The peer of each loss: provider name, importable module, and what it is.
PEERS: dict[str, tuple[str, str, str]] = {
    "supcon": ("pml", "pytorch_metric_learning", "pytorch-metric-learning SupConLoss"),
    "ntxent-labels": ("pml", "pytorch_metric_learning", "pytorch-metric-learning NTXentLoss"),
    "queue": ("lightly", "lightly", "lightly NTXentLoss(memory_bank_size=(K, D))"),
    "siglip": ("open_clip", "open_clip", "open_clip SigLipLoss"),
}

LossFn = Callable[..., Tensor]


@dataclass(frozen=True)
class LossCase:
    """One problem: which loss, M rows, width, dtype, rows per class, bank rows.

    ``exclude`` and ``memory`` as in ``benchmarks.cases.Case`` (``modes``: fwd+bwd).
    """

    loss: str
    rows: int
    d: int = 128
    dtype: str = "float32"
    views: int = 2
    bank: int = 16384
    exclude: tuple[str, ...] = ()
    memory: bool = True
    modes: tuple[str, ...] = ("fwd+bwd",)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def tau(self) -> float:
        return TAU[self.loss]

    @property
    def critic(self) -> str:
        return "sigmoid" if self.loss == "siglip" else "cosine"

    @property
    def pairing(self) -> str:
        """The report's grouping key: the loss (and the bank size for ``queue``)."""
        return f"queue-K{self.bank}" if self.loss == "queue" else self.loss

    @property
    def columns(self) -> int:
        """Columns of the score matrix: the bank for ``queue``, else M."""
        return self.bank if self.loss == "queue" else self.rows

    @property
    def group(self) -> str:
        return f"{self.pairing}-{self.critic}-tau{self.tau:g}-{self.dtype}-d{self.d}"

    @property
    def id(self) -> str:
        return f"{self.group}-M{self.rows}"

    @property
    def quadratic(self) -> bool:
        """Whether the work grows as M^2 (else as M: the queue's K is fixed)."""
        return self.loss != "queue"

    def with_rows(self, rows: int) -> LossCase:
        return dataclasses.replace(self, rows=rows)

    def to_dict(self) -> dict:
        keys = ("loss", "rows", "d", "dtype", "views", "bank")
        return {k: getattr(self, k) for k in keys}


def case_from_dict(d: dict) -> LossCase:
    return LossCase(**{k: d[k] for k in ("loss", "rows", "d", "dtype", "views", "bank")})


def flop(case: LossCase) -> float:
    """Nominal FLOPs of forward + backward, the same for ours and the peer: the score
    matrix once forward (2 M C D) and its two input gradients backward, C the columns
    (``queue``: one gradient, the bank takes none: 2 M K D backward)."""
    m, c, d = case.rows, case.columns, case.d
    backward = 2.0 if case.loss == "queue" else 4.0
    return (2.0 + backward) * m * c * d


def tiny(case: LossCase) -> LossCase:
    """The same configuration at 64 rows (and a 64-row bank): warms lazily built state."""
    return dataclasses.replace(case, rows=64, bank=min(case.bank, 64))


def make_inputs(case: LossCase, device: torch.device, seed: int = 0) -> tuple[Tensor, ...]:
    """The loss's arguments: embeddings and labels (``supcon``, ``ntxent-labels``), or
    the two views (``queue``, ``siglip``: unit rows); floating leaves require grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (case.rows, case.d)
    a = torch.randn(shape, generator=gen, device=device)
    if case.loss in ("supcon", "ntxent-labels"):
        labels = torch.arange(case.rows, device=device) // case.views
        return a.to(case.torch_dtype).requires_grad_(), labels
    b = a + 0.7 * torch.randn(shape, generator=gen, device=device)  # correlated views
    if case.loss == "siglip":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return tuple(t.to(case.torch_dtype).requires_grad_() for t in (a, b))


@contextlib.contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    """The global generator at ``seed`` inside (both queue modules draw their bank from
    it), restored after: building a provider leaves no trace in the caller's draws."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- ours


def runs_loss(backend: str, case: LossCase, device: torch.device) -> str | None:
    """Why our ``backend`` cannot run ``case`` on ``device`` (None: it can)."""
    if case.loss == "ntxent-labels" and backend == "cuda":
        return "the cuda kernels have no label mask for the labelled NTXent"
    if case.loss == "siglip":
        probe = torch.empty(1, 1, case.d, dtype=case.torch_dtype, device=device)
        return siglip.refusal(backend, probe)
    why = dispatch.unavailable_reason(backend, device, case.torch_dtype)
    if why is None and not hasattr(dispatch.get_backend(backend), "rect_forward"):
        why = "no rectangular (rows against columns) kernels"
    return why


def our_backend(case: LossCase, device: torch.device) -> str:
    """The first backend of ``OUR_ORDER`` that runs ``case`` on ``device``; for SigLIP the
    one ``backend="auto"`` picks (on a CPU its torch backend's BLAS blocks, faster there
    than its C++ loops)."""
    if case.loss == "siglip":
        return siglip.resolve("auto", torch.empty(1, 1, case.d, dtype=case.torch_dtype,
                                                  device=device))  # fmt: skip
    order = OUR_ORDER.get(device.type, ("torch",))
    return next((b for b in order if runs_loss(b, case, device) is None), "torch")


def _make_ours(backend: str) -> Callable[[LossCase], LossFn]:
    def make(case: LossCase) -> LossFn:
        if case.loss == "supcon":
            return SupConLoss(case.tau, backend=backend)
        if case.loss == "ntxent-labels":
            return NTXentLoss(case.tau, backend=backend)
        if case.loss == "queue":
            with _seeded():  # the bank's random rows, drawn as the peer draws them
                return NTXentLoss(case.tau, memory_bank_size=(case.bank, case.d), backend=backend)
        module = SigLipLoss(backend=backend)
        return lambda x, y: module(x, y, SIGLIP_T, SIGLIP_B)

    return make


def _ours_reason(backend: str) -> Callable[[LossCase, torch.device], str | None]:
    def reason(case: LossCase, device: torch.device) -> str | None:
        why = runs_loss(backend, case, device)
        return None if why is None else f"mimac backend {backend!r}: {why}"

    return reason


# --------------------------------------------------------------------------- peers


def _make_peer(case: LossCase) -> LossFn:
    if case.loss in ("supcon", "ntxent-labels"):
        from pytorch_metric_learning import losses

        cls = losses.SupConLoss if case.loss == "supcon" else losses.NTXentLoss
        return cls(temperature=case.tau)
    if case.loss == "queue":
        cls = peer_losses.cached_lightly_ntxent_class()
        with _seeded():
            return cls(temperature=case.tau, memory_bank_size=(case.bank, case.d))
    module = peer_losses.cached_open_clip_loss_module().SigLipLoss()
    t, b = torch.tensor(SIGLIP_T), torch.tensor(SIGLIP_B)
    return lambda x, y: module(x, y, t.to(x), b.to(x))


def _peer_reason(case: LossCase, device: torch.device) -> str | None:
    _, module, label = PEERS[case.loss]
    try:
        if module in ("lightly", "open_clip"):  # their files alone: the packages need torchvision
            peer_losses.package_root(module)
        else:
            importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - absent or broken: either way it cannot run
        return f"{label}: {type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------- the suite


def applies(name: str, case: LossCase, device: torch.device) -> bool:
    """Whether provider ``name`` belongs to ``case``'s comparison (ours or its peer)."""
    if name.startswith("mimac-"):
        return name == f"mimac-{our_backend(case, device)}"
    return name == PEERS[case.loss][0]


@functools.cache
def _providers(device_type: str) -> dict[str, Provider]:
    out = {}
    for backend in OUR_ORDER.get(device_type, ("torch",)):
        name = f"mimac-{backend}"
        out[name] = Provider(name, "ours", _make_ours(backend), _ours_reason(backend))
    for name in dict.fromkeys(p[0] for p in PEERS.values()):
        out[name] = Provider(name, "peer", _make_peer, _peer_reason, full_matrix=True)
    return out


def providers(device: torch.device, *, interpreted: bool = False) -> dict[str, Provider]:
    """Our backends of the device and the three peers (``interpreted``: unused, the
    memory child's signature). Which run a case: ``applies``."""
    return dict(_providers(device.type))


def smoke_cases() -> list[LossCase]:
    """Each loss once at 64 rows (bank 128): CI. Peak memory (a child process per
    provider) on the first only, as the throughput suite's smoke cases."""
    return [LossCase(loss, 64, d=32, bank=128, memory=i == 0) for i, loss in enumerate(LOSSES)]


def cpu_cases() -> list[LossCase]:
    """The ladder M = 4,096 to 32,768, D = 128, float32, bank K = 16,384; NTXent with
    labels from M = 1,024 too, where its peer (M^3 memory: 5.4 GB there) still runs."""
    cases = [LossCase(loss, m) for loss in LOSSES for m in (4096, 8192, 16384, 32768)]
    return [LossCase("ntxent-labels", 1024), *cases]


SIZES: dict[str, Callable[[], list[LossCase]]] = {
    "smoke": smoke_cases,
    "cpu": cpu_cases,
    "gpu": cpu_cases,
}
