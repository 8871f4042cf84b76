"""Backend selection: probes cached per device (with its index) and dtype, refusals per
problem, ``auto`` falling back on either, and the ``override_backend`` seam."""

from __future__ import annotations

import pytest
import torch

from mimac_kernels import BackendUnavailable, dispatch, fused_contrastive_loss, torch_backend
from mimac_kernels.contract import Grads, Problem, Stats, Upstream

CPU = torch.device("cpu")


class _Recorder:
    """A backend that refuses problems with more than ``max_rows`` rows and records
    its probes; it computes with the torch backend."""

    def __init__(self, max_rows: int = 1 << 30) -> None:
        self.max_rows = max_rows
        self.probed: list[tuple[torch.device, torch.dtype]] = []
        self.ran = 0

    def probe(self, device: torch.device, dtype: torch.dtype) -> str | None:
        self.probed.append((device, dtype))
        return None

    def refusal(self, problem: Problem) -> str | None:
        n = problem.a.shape[1]
        return f"at most {self.max_rows} rows, got {n}" if n > self.max_rows else None

    def forward(self, problem: Problem) -> Stats:
        self.ran += 1
        return torch_backend.forward(problem)

    def backward(self, problem: Problem, stats: Stats, upstream: Upstream) -> Grads:
        return torch_backend.backward(problem, stats, upstream)


def _problem(n: int, device: str | torch.device = "cpu") -> Problem:
    x = torch.randn(1, n, 3, device=device)
    return Problem(x, x, torch.tensor(2.0, device=device), "dot", "all", 1e-12)


def test_auto_falls_back_on_a_refusal_by_shape():
    """A backend that refuses one problem's shape is passed over under auto (not an
    error) and still runs the problems it takes; asked for by name, it raises with
    the reason and the inputs."""
    fake = _Recorder(max_rows=5)
    with dispatch.override_backend("cpu", fake):
        assert dispatch.resolve("auto", _problem(5)) == "cpu"
        assert dispatch.resolve("auto", _problem(6)) == "torch"
        a = torch.randn(6, 3)
        assert torch.isfinite(fused_contrastive_loss(a, a + 1))
        assert fake.ran == 0
        fused_contrastive_loss(a[:5], a[:5] + 1)
        assert fake.ran == 1
        with pytest.raises(BackendUnavailable, match=r"inputs of shape \(1, 6, 3\): at most 5 rows"):
            fused_contrastive_loss(a, a + 1, backend="cpu")
    assert dispatch.get_backend("cpu") is not fake  # the override ends with the block


def test_probe_is_cached_per_device_index_and_dtype():
    """GPUs of one node may differ: the probe sees the inputs' device with its index."""
    fake = _Recorder()
    with dispatch.override_backend("cuda", fake):
        for _ in range(2):
            for dev in ("cuda:0", "cuda:1"):
                assert dispatch.unavailable_reason("cuda", torch.device(dev), torch.float32) is None
        dispatch.unavailable_reason("cuda", torch.device("cuda:1"), torch.float16)
    assert fake.probed == [
        (torch.device("cuda:0"), torch.float32),
        (torch.device("cuda:1"), torch.float32),
        (torch.device("cuda:1"), torch.float16),
    ]


def test_no_backend_names_every_reason():
    class Never(_Recorder):
        def probe(self, device, dtype):
            return "never here"

    message = "no backend can run .*cpu: never here; torch: never here"
    with (
        dispatch.override_backend("cpu", Never()),
        dispatch.override_backend("torch", Never()),
        pytest.raises(BackendUnavailable, match=message),
    ):
        dispatch.resolve("auto", _problem(3))


def test_override_rejects_unknown_names():
    with pytest.raises(ValueError, match="name must be one of"), \
            dispatch.override_backend("fast", _Recorder()):
        pass


def test_problem_checks_name_the_argument():
    x = torch.randn(1, 4, 3)
    it = torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"shape \(H, N, D\)"):
        Problem(x[0], x[0], it, "dot", "all", 1e-12)
    with pytest.raises(TypeError, match="one dtype"):
        Problem(x, x.double(), it, "dot", "all", 1e-12)
    with pytest.raises(ValueError, match="inv_tau must be a 0-dim"):
        Problem(x, x, it[None], "dot", "all", 1e-12)
    with pytest.raises(ValueError, match="negatives must be one of"):
        Problem(x, x, it, "dot", "some", 1e-12)
    assert Problem(x, x, it, "dot", "cross", 1e-12).stat_shapes == ((1, 4), (1, 4))
