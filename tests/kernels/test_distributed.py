"""The loss across 2 and 3 gloo ranks against one process on the concatenated batch."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from mimac_kernels import (
    BackendUnavailable,
    ClipLoss,
    NTXentLoss,
    ProbabilityContrastLoss,
    dispatch,
    fused_contrastive_loss,
    reference_contrastive_loss,
)
from mimac_kernels.distributed import gather_with_grad
from tests.kernels.accuracy import error_bound, max_abs_err
from tests.ranks import run_ranks

N_LOCAL, D, H = 5, 6, 2
CASES = [
    ("cosine", "all", 0.3), ("dot", "all", 0.7), ("log_dot", "all", 0.5), ("log_dot", "all", 1.0),
    ("cosine", "cross", 0.3), ("dot", "cross", 0.7), ("log_dot", "cross", 0.5),
    ("log_dot", "cross", 1.0),
]


def _global_inputs(world: int, critic: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(H, world * N_LOCAL, D, generator=g, dtype=torch.float64)
    b = torch.randn(H, world * N_LOCAL, D, generator=g, dtype=torch.float64)
    if critic == "log_dot":
        a, b = a.softmax(-1), b.softmax(-1)
    return a, b


def _loss(a, b, tau, critic, negatives, group=None):
    # A learnable tau except at tau = 1, where log_dot must take the closed form.
    return fused_contrastive_loss(a, b, temperature=tau, critic=critic, negatives=negatives,
                                  backend="torch", group=group)


def _tau(value: float, critic: str):
    if critic == "log_dot" and value == 1.0:
        return 1.0
    return torch.tensor(value, dtype=torch.float64, requires_grad=True)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        for critic, negatives, tau_value in CASES:
            a, b = _global_inputs(world, critic)
            a, b = a[:, sl].clone().requires_grad_(), b[:, sl].clone().requires_grad_()
            tau = _tau(tau_value, critic)
            loss = _loss(a, b, tau, critic, negatives, group=dist.group.WORLD)
            params = (a, b, tau) if isinstance(tau, torch.Tensor) else (a, b)
            grads = torch.autograd.grad(loss, params)
            results[(critic, negatives, tau_value)] = (loss.detach(), [g.detach() for g in grads])
        # The modules take the group too (lightly's gather_distributed, open_clip's local loss).
        a, b = _global_inputs(world, "cosine", seed=3)
        p, q = _global_inputs(world, "log_dot", seed=4)
        results["modules"] = torch.stack([
            NTXentLoss(0.3, backend="torch", group=dist.group.WORLD)(a[0, sl], b[0, sl]),
            ClipLoss(backend="torch", group=dist.group.WORLD)(a[0, sl], b[0, sl], 2.0),
            ProbabilityContrastLoss(group=dist.group.WORLD)(p[:, sl], q[:, sl])])
        # The gather with a non-contiguous incoming gradient (a transposed tensor).
        x = torch.arange(N_LOCAL * D, dtype=torch.float64).reshape(1, N_LOCAL, D) + rank
        x.requires_grad_()
        up = torch.randn(D, world * N_LOCAL, 1, generator=torch.Generator().manual_seed(7),
                         dtype=torch.float64).permute(2, 1, 0)
        assert not up.is_contiguous()
        gather_with_grad(x).backward(up)
        results["gather"] = (x.grad.detach(), up.detach().contiguous())
        try:  # unequal batches are refused on every rank
            m = N_LOCAL + rank
            fused_contrastive_loss(torch.randn(m, D), torch.randn(m, D), group=dist.group.WORLD)
            results["unequal"] = "no error"
        except ValueError as exc:
            results["unequal"] = str(exc)
        try:  # so are unequal widths (the all-gather itself would abort the process)
            fused_contrastive_loss(torch.randn(N_LOCAL, D + rank), torch.randn(N_LOCAL, D + rank),
                                   group=dist.group.WORLD)
            results["unequal_d"] = "no error"
        except ValueError as exc:
            results["unequal_d"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done before any tears gloo down: a peer's last transfer may
        # still be in flight (a rank aborted in teardown without this, under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(world: int, tmp_path) -> list[dict]:
    run_ranks(_worker, world, (str(tmp_path / "init"), str(tmp_path)), timeout=120)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_process(world, tmp_path):
    per_rank = _run(world, tmp_path)
    for critic, negatives, tau_value in CASES:
        a, b = _global_inputs(world, critic)
        a.requires_grad_(), b.requires_grad_()
        tau = _tau(tau_value, critic)
        single = _loss(a, b, tau, critic, negatives)
        params = (a, b, tau) if isinstance(tau, torch.Tensor) else (a, b)
        ref = torch.autograd.grad(single, params)
        key = (critic, negatives, tau_value)
        values = torch.stack([r[key][0] for r in per_rank])
        torch.testing.assert_close(values.mean(), single.detach(), msg=str(key))
        for rank, r in enumerate(per_rank):
            sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
            ga, gb = r[key][1][:2]
            torch.testing.assert_close(ga, world * ref[0][:, sl], msg=str(key))
            torch.testing.assert_close(gb, world * ref[1][:, sl], msg=str(key))
        if len(ref) == 3:  # DDP averages the ranks' temperature gradients
            mean_tau = torch.stack([r[key][1][2] for r in per_rank]).mean()
            torch.testing.assert_close(mean_tau, ref[2], msg=str(key))
    a, b = _global_inputs(world, "cosine", seed=3)
    p, q = _global_inputs(world, "log_dot", seed=4)
    single = torch.stack([NTXentLoss(0.3, backend="torch")(a[0], b[0]),
                          ClipLoss(backend="torch")(a[0], b[0], 2.0),
                          ProbabilityContrastLoss()(p, q)])
    torch.testing.assert_close(torch.stack([r["modules"] for r in per_rank]).mean(0), single)
    for rank, r in enumerate(per_rank):
        grad, up = r["gather"]
        want = world * up[:, rank * N_LOCAL : (rank + 1) * N_LOCAL]
        torch.testing.assert_close(grad, want)
        assert "same batch size" in r["unequal"]
        assert f"H=1, D={D + world - 1}, torch.float32" in r["unequal_d"]


def test_group_without_init_is_refused():
    with pytest.raises(ValueError, match="not initialised"):
        fused_contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), group=object())


def _world_one_worker(rank: int, world: int, init_file: str, out_dir: str, pg_backend: str) -> None:
    device = "cuda" if pg_backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(pg_backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for critic, negatives, tau_value in CASES:
            a0, b0 = (x.float().to(device) for x in _global_inputs(world, critic))
            per_call = []
            for group in (dist.group.WORLD, None):
                a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
                tau = _tau(tau_value, critic)
                if isinstance(tau, torch.Tensor):
                    tau = tau.detach().float().to(device).requires_grad_()
                # The torch backend on both sides: the distributed path tiles with it too.
                loss = fused_contrastive_loss(a, b, temperature=tau, critic=critic,
                                              negatives=negatives, backend="torch", group=group)
                params = (a, b, tau) if isinstance(tau, torch.Tensor) else (a, b)
                grads = torch.autograd.grad(loss, params)
                per_call.append([loss.detach().cpu()] + [g.cpu() for g in grads])
            results[(critic, negatives, tau_value)] = per_call
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        if device == "cpu":  # an explicit backend that cannot run is refused here too
            try:
                fused_contrastive_loss(a0, b0, backend="cuda", group=dist.group.WORLD)
                refusal = "no error"
            except BackendUnavailable as e:
                refusal = str(e)
            with open(os.path.join(out_dir, "refusal.txt"), "w") as f:
                f.write(refusal)
        # Every rank done before any tears gloo down: a peer's last transfer may
        # still be in flight (a rank aborted in teardown without this, under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("pg_backend", [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs CUDA and NCCL")),
])
def test_world_of_one_equals_the_plain_call(tmp_path, pg_backend):
    run_ranks(_world_one_worker, 1, (str(tmp_path / "init"), str(tmp_path), pg_backend), timeout=120)
    results = torch.load(tmp_path / "rank0.pt", weights_only=False)
    for key, (with_group, plain) in results.items():
        for got, want in zip(with_group, plain):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=str(key))
    if pg_backend == "gloo":
        assert "backend 'cuda' cannot run" in (tmp_path / "refusal.txt").read_text()


class _Counting:
    """A backend implementation that counts its calls of the rectangular functions."""

    def __init__(self, impl) -> None:
        self.impl, self.calls = impl, Counter()

    def __getattr__(self, name: str):
        fn = getattr(self.impl, name)
        if not name.startswith("rect_"):
            return fn

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return counted


#: Backend labels of the multi-rank runs: (name asked for, implementation counted).
_RANK_BACKENDS = {"auto-cpu": ("auto", "cpu"), "triton": ("triton", "triton"),
                  "cuda-emulated": ("cuda", "cuda")}  # fmt: skip


def _float32_tau(value: float, critic: str):
    tau = _tau(value, critic)
    return tau.detach().float().requires_grad_() if isinstance(tau, torch.Tensor) else tau


def _backend_worker(rank: int, world: int, init_file: str, out_dir: str, label: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        asked, name = _RANK_BACKENDS[label]
        with contextlib.ExitStack() as stack:
            if label == "cuda-emulated":
                from tests.kernels.emulation import emulated_cuda_backend

                stack.enter_context(emulated_cuda_backend())
            counting = _Counting(dispatch.get_backend(name))
            stack.enter_context(dispatch.override_backend(name, counting))
            results = {}
            sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
            for critic, negatives, tau_value in CASES:
                a, b = (x[:, sl].float().requires_grad_() for x in _global_inputs(world, critic))
                tau = _float32_tau(tau_value, critic)
                loss = fused_contrastive_loss(a, b, temperature=tau, critic=critic,
                                              negatives=negatives, backend=asked,
                                              group=dist.group.WORLD)  # fmt: skip
                params = (a, b, tau) if isinstance(tau, torch.Tensor) else (a, b)
                grads = torch.autograd.grad(loss, params)
                results[(critic, negatives, tau_value)] = (loss.detach(), [g for g in grads])
            results["calls"] = dict(counting.calls)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done before any tears gloo down: a peer's last transfer may
        # still be in flight (a rank aborted in teardown without this, under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rank_backend_skip(label: str) -> str | None:
    """Why the backend of ``label`` cannot run on CPU tensors here, or ``None``."""
    if label in ("auto-cpu", "cuda-emulated") and shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on this machine"
    if label == "triton":
        return dispatch.unavailable_reason("triton", torch.device("cpu"), torch.float32)
    if label == "auto-cpu":
        assert dispatch.unavailable_reason("cpu", torch.device("cpu"), torch.float32) is None
    if label == "cuda-emulated":
        from tests.kernels.emulation import cuda_emulation

        cuda_emulation()  # built here once, not by every rank at the same time
    return None


@pytest.mark.parametrize("label", [
    "auto-cpu", "triton", pytest.param("cuda-emulated", marks=pytest.mark.emulated)])
def test_ranks_run_the_fused_kernels(label, tmp_path):
    """float32 across 2 gloo ranks: the local rows against the gathered columns reach the
    chosen backend's rectangular kernels (``auto`` on CPU: the C++ kernel), forward and
    backward, and the ranks' mean loss and gradients match one process on the whole
    batch in float64 within the project's rule (twice plain float32's error)."""
    why = _rank_backend_skip(label)
    if why is not None:
        pytest.skip(why)
    world = 2
    run_ranks(_backend_worker, world, (str(tmp_path / "init"), str(tmp_path), label), timeout=300)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r in per_rank:
        assert r["calls"].get("rect_forward", 0) > 0 and r["calls"].get("rect_backward", 0) > 0
    for critic, negatives, tau_value in CASES:
        key = (critic, negatives, tau_value)
        a64, b64 = _global_inputs(world, critic)
        a32, b32 = a64.float(), b64.float()
        kw = {"critic": critic, "negatives": negatives}
        ref, ref_grads = _loss_grads(reference_contrastive_loss, a64, b64, _tau(tau_value, critic),
                                     kw)  # fmt: skip
        plain, plain_grads = _loss_grads(reference_contrastive_loss, a32, b32,
                                         _float32_tau(tau_value, critic), kw, dtype=None)
        got = torch.stack([r[key][0] for r in per_rank]).mean()
        got_grads = [torch.cat([r[key][1][i] for r in per_rank], dim=1) / world for i in (0, 1)]
        if len(ref_grads) == 3:  # DDP averages the ranks' temperature gradients
            got_grads.append(torch.stack([r[key][1][2] for r in per_rank]).mean())
        for name, x, r, p in zip(["loss", "grad_a", "grad_b", "grad_tau"],
                                 [got, *got_grads], [ref, *ref_grads], [plain, *plain_grads]):
            err, bound = max_abs_err(x, r), error_bound(max_abs_err(p, r), torch.float32, r)
            assert err <= bound, f"{label} {key} {name}: error {err:.3g} > bound {bound:.3g}"


def _loss_grads(fn, a, b, tau, kw, **extra):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = fn(a, b, temperature=tau, **kw, **extra)
    params = (a, b, tau) if isinstance(tau, torch.Tensor) else (a, b)
    return loss.detach(), list(torch.autograd.grad(loss, params))
