"""Memory-bank / queue negatives: ``fused_contrastive_loss(queue=)`` (MoCo) on every backend
that runs here against the float64 formula, the drop-in ``NTXentLoss(memory_bank_size=)``
against lightly's over consecutive calls (values, gradients, bank contents), its memory,
and bad inputs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mimac_kernels import NTXentLoss, fused_contrastive_loss, memory_bank
from tests.kernels.accuracy import HALF_DTYPES, TAU, error_bound, make_views, max_abs_err
from tests.peers import lightly_ntxent_class
from tests.ranks import run_ranks

NAMES = ["loss", "grad_q", "grad_k", "grad_tau"]
#: (q shape, K): a single pair and D = 1; odd shapes; heads; more bank rows than one block.
CASES = [((1, 1), 1), ((7, 5), 19), ((2, 13, 9), 30), ((33, 16), 70), ((3, 5, 6), 4)]


def moco_formula(q, k, queue, tau, critic: str = "cosine", eps: float = 1e-12):
    """MoCo's loss written out, per row: logits ``[q.k | q.queue^T] / tau``, cross-entropy
    with the positive at index 0 (the dense N x K matrix, in the inputs' dtype)."""
    if critic == "cosine":
        q, k, queue = (F.normalize(t, dim=-1, eps=eps) for t in (q, k, queue))
    l_pos = (q * k).sum(-1, keepdim=True)
    l_neg = q @ queue.transpose(-1, -2)
    if critic == "log_dot":
        l_pos, l_neg = l_pos.clamp_min(eps).log(), l_neg.clamp_min(eps).log()
    logits = torch.cat([l_pos, l_neg], dim=-1) / tau
    return torch.logsumexp(logits, dim=-1) - logits[..., 0]


def _loss_and_grads(fn, q, k, queue, tau, upstream, dtype):
    """``fn(q, k, queue, tau)`` (per-row losses) in ``dtype`` and the gradients of
    ``sum(loss * upstream)`` w.r.t. q, k and tau."""
    q, k = (t.detach().to(dtype).requires_grad_() for t in (q, k))
    t = torch.tensor(tau, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     requires_grad=True)  # fmt: skip
    loss = fn(q, k, queue.detach().to(dtype), t)
    total = (loss * upstream.to(loss.dtype)).sum()
    return [loss.detach(), *torch.autograd.grad(total, (q, k, t))]


def _inputs(shape, kk, critic, seed):
    q, k = make_views(shape, critic, seed=seed)
    queue, _ = make_views((*shape[:-2], kk, shape[-1]), critic, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    return q, k, queue, torch.rand(shape[:-1], generator=gen)


def assert_queue_matches_float64(backend, shape, kk, critic, dtype, device, seed=0):
    """``fused_contrastive_loss(queue=)`` on ``backend`` against ``moco_formula`` in float64:
    per-row values and the gradients of q, k and a learnable tau within the project's
    bound (twice plain PyTorch's error in ``dtype``: the formula in ``dtype``)."""
    q, k, queue, upstream = _inputs(shape, kk, critic, seed)
    q, k, queue = (t.to(dtype) for t in (q, k, queue))  # everyone sees the same rounded inputs
    tau = TAU[critic]

    def ours(a, b, bank, t):
        return fused_contrastive_loss(a.to(device), b.to(device), temperature=t.to(device),
                                      critic=critic, reduction="none", backend=backend,
                                      queue=bank.to(device))  # fmt: skip

    def formula(a, b, bank, t):
        return moco_formula(a, b, bank, t, critic)

    got = _loss_and_grads(ours, q, k, queue, tau, upstream, dtype)
    ref = _loss_and_grads(formula, q, k, queue, tau, upstream, torch.float64)
    plain = _loss_and_grads(formula, q, k, queue, tau, upstream, dtype)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[0].shape == shape[:-1]
    for i, (name, x, r, p) in enumerate(zip(NAMES, got, ref, plain, strict=True)):
        bound = error_bound(max_abs_err(p, r), dtype, r)
        if i in (1, 2) and dtype in HALF_DTYPES:
            # The positive's gradient and the backend's are each rounded to the inputs'
            # dtype before they are added: one more rounding of their size.
            bound += 2 * torch.finfo(dtype).eps * float(r.abs().max())
        if i in (1, 2):
            assert x.dtype == dtype, f"{name}: {x.dtype}"
        err = max_abs_err(x, r)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({critic}, {dtype})"


@pytest.mark.parametrize("critic", ["cosine", "dot", "log_dot"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-K{c[1]}")
def test_queue_matches_float64(runner, case, critic):
    shape, kk = case
    assert_queue_matches_float64(runner.name, shape, kk, critic, torch.float32, runner.device)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_queue_half_inputs(runner, dtype):
    assert_queue_matches_float64(runner.name, (2, 13, 9), 30, "cosine", dtype, runner.device)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-K{c[1]}")
def test_queue_float64_on_torch(case):
    shape, kk = case
    assert_queue_matches_float64("torch", shape, kk, "cosine", torch.float64, "cpu", seed=4)


def test_queue_reductions_and_no_gradient_into_the_queue():
    """``mean`` and ``sum`` reduce the per-row values; the queue is read, never written,
    and nothing flows into it; the extreme logits of a sharp temperature stay finite."""
    q, k, queue, _ = _inputs((9, 7), 23, "cosine", seed=5)
    rows = fused_contrastive_loss(q, k, temperature=0.01, reduction="none", queue=queue)
    torch.testing.assert_close(rows, moco_formula(q.double(), k.double(), queue.double(),
                                                  0.01).float(), rtol=1e-5, atol=1e-4)  # fmt: skip
    before = queue.clone()
    q.requires_grad_()
    mean = fused_contrastive_loss(q, k, temperature=0.01, queue=queue)
    total = fused_contrastive_loss(q, k, temperature=0.01, reduction="sum", queue=queue)
    torch.testing.assert_close(mean, rows.mean())
    torch.testing.assert_close(total, rows.sum())
    mean.backward()
    assert torch.isfinite(q.grad).all() and torch.equal(queue, before) and queue.grad is None


def test_queue_loss_compiles_without_graph_breaks():
    """``torch.compile(fullgraph=True)`` traces the queue path (fake implementations, no
    host reads) and gives the eager value and gradients."""
    q, k, queue, _ = _inputs((6, 5), 9, "cosine", seed=6)
    q.requires_grad_(), k.requires_grad_()
    tau = torch.tensor(0.3, requires_grad=True)

    def loss(a, b, t):
        return fused_contrastive_loss(a, b, temperature=t, queue=queue, backend="torch")

    compiled = torch.compile(loss, fullgraph=True)(q, k, tau)
    eager = loss(q, k, tau)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, (q, k, tau)),
                         torch.autograd.grad(eager, (q, k, tau)), strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_queue_op_passes_opcheck():
    x = F.normalize(torch.randn(2, 5, 4), dim=-1).requires_grad_()
    bank = F.normalize(torch.randn(2, 7, 4), dim=-1)
    center = torch.randn(2, 5, requires_grad=True)
    t = torch.tensor(3.0, requires_grad=True)
    kw = {"critic": "cosine", "eps": 1e-12, "backend": "torch"}
    torch.library.opcheck(memory_bank.bank_fwd, (x, bank, t, center), kw)


# --- the drop-in against lightly ---------------------------------------------------------


def _step(module, out0, out1, dtype=None):
    """One call of ``module`` and the gradients of its value w.r.t. out0 and out1."""
    a, b = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (out0, out1))
    loss = module(a, b)
    return [loss.detach(), *torch.autograd.grad(loss, (a, b))]


@pytest.mark.parametrize("n", [7, 9], ids=lambda n: f"N{n}")
def test_drop_in_matches_lightly_over_consecutive_calls(runner, n):
    """``NTXentLoss(0.5, memory_bank_size=(K, D))`` against lightly's over three training
    calls, the third wrapping the bank (K = 20): the same random bank at the start (the
    global generator, seeded alike), loss and gradients within the accuracy rule (lightly
    in float32 the plain error, lightly in float64 the reference), the same bank contents
    and pointer after each call; an evaluation call (no grad) leaves the bank alone."""
    peer_class = lightly_ntxent_class()
    kk, d = 20, 11
    torch.manual_seed(7)
    peer = peer_class(temperature=0.5, memory_bank_size=(kk, d))
    torch.manual_seed(7)
    mine = NTXentLoss(temperature=0.5, memory_bank_size=(kk, d), backend=runner.name).to(
        runner.device)
    assert torch.equal(mine.memory_bank.bank.cpu(), peer.memory_bank.bank)
    gen = torch.Generator().manual_seed(n)
    for step in range(3):
        out0, out1 = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
        oracle = copy.deepcopy(peer)
        oracle.memory_bank.bank = oracle.memory_bank.bank.double()
        ref = _step(oracle, out0, out1, torch.float64)
        plain = _step(peer, out0, out1)
        got = _step(mine, out0.to(runner.device), out1.to(runner.device))
        for name, x, r, p in zip(["loss", "grad_out0", "grad_out1"], got, ref, plain,
                                 strict=True):  # fmt: skip
            err, bound = max_abs_err(x.cpu(), r), error_bound(max_abs_err(p, r), torch.float32, r)
            assert err <= bound, f"call {step}, {name}: error {err:.3g} > bound {bound:.3g}"
        assert torch.equal(mine.memory_bank.bank.cpu(), peer.memory_bank.bank), f"call {step}"
        assert int(mine.memory_bank.bank_ptr) == int(peer.memory_bank.bank_ptr), f"call {step}"
    assert int(peer.memory_bank.bank_ptr) == (0 if 3 * n >= kk else 3 * n)
    before = mine.memory_bank.bank.clone()
    with torch.no_grad():
        value = mine(out1.to(runner.device), out0.to(runner.device))
        torch.testing.assert_close(value.cpu(), peer(out1, out0), rtol=1e-5, atol=1e-5)
    assert torch.equal(mine.memory_bank.bank, before)


def _lightly_fifo(bank: torch.Tensor, ptr: int, batch: torch.Tensor) -> int:
    """lightly's bank update written out (in place; returns the new pointer)."""
    size = bank.shape[0]
    if ptr + batch.shape[0] >= size:
        bank[ptr:] = batch[: size - ptr]
        return 0
    bank[ptr : ptr + batch.shape[0]] = batch
    return ptr + batch.shape[0]


@pytest.mark.parametrize("kk, last", [(10, 4), (12, 4), (17, 16)], ids=["drop", "exact", "none"])
def test_drop_in_matches_the_written_out_bank(kk, last):
    """Without lightly installed too: over four calls the loss is the formula on the
    bank as it was before the call (``out0`` the queries, ``out1`` the keys), then the
    normalised ``out1`` is written in FIFO order (lightly's pointer rule: a batch that
    reaches the end, exactly or past it, fills it and the pointer returns to 0, the rest
    of the batch dropped); an int ``memory_bank_size`` draws the bank's unit rows at the
    first call, with its width."""
    d, n = 6, 4
    mine = NTXentLoss(temperature=0.2, memory_bank_size=kk, backend="torch")
    gen = torch.Generator().manual_seed(3)
    bank, ptr = None, 0
    for step in range(4):
        out0 = torch.randn(n, d, generator=gen, requires_grad=True)
        out1 = torch.randn(n, d, generator=gen, requires_grad=True)
        torch.manual_seed(11)
        loss = mine(out0, out1)
        if bank is None:
            torch.manual_seed(11)
            bank = F.normalize(torch.randn(kk, d), dim=-1)
        want = moco_formula(out0.double(), out1.double(), bank.double(), 0.2).mean()
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
        ptr = _lightly_fifo(bank, ptr, F.normalize(out1.detach(), dim=1))
        assert torch.equal(mine.memory_bank.bank, bank), f"call {step}"
        assert int(mine.memory_bank.bank_ptr) == ptr
    assert ptr == last
    assert list(mine.state_dict()) == []  # lightly's buffers are not persistent either


# --- memory -------------------------------------------------------------------------------


#: One fresh process: the inputs, a small warm-up call (the first call's fixed cost: the
#: extension, autograd), then per loss the peak RSS above the resident set before it, the
#: peak reset in between (``/proc/self/clear_refs``). The fused loss runs first, so that
#: memory the dense loss frees cannot be reused by it unseen.
_MEMORY_PROBE = """
import torch, torch.nn.functional as F, mimac_kernels
torch.set_num_threads(1)
def mib(key):
    return [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)][0] / 1024
def fused(q, k, queue):
    return mimac_kernels.fused_contrastive_loss(q, k, temperature=0.2, queue=queue, backend='cpu')
def dense(q, k, queue):
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ queue.T], 1) / 0.2
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
g = torch.Generator().manual_seed(0)
def inputs(n, kk):
    q = torch.randn(n, 128, generator=g).requires_grad_()
    k = torch.randn(n, 128, generator=g).requires_grad_()
    return q, k, F.normalize(torch.randn(kk, 128, generator=g), dim=-1)
fused(*inputs(16, 64)).backward()
dense(*inputs(16, 64)).backward()
big = inputs(N, K)
for name, loss in (('fused', fused), ('dense', dense)):
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        print('noreset 0')
        break
    base = mib('VmRSS:')
    loss(*big).backward()
    print(name, mib('VmHWM:') - base)
    big[0].grad = big[1].grad = None
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak-RSS reset")
def test_memory_is_linear_not_n_times_k():
    """Peak RSS of forward + backward at N = 2,048 rows against K = 16,384 queue rows,
    D = 128 (after a warm-up call): the dense N x K logits (128 MiB each in float32,
    several held for the backward) against the fused loss on the cpu backend, which
    holds O((N + K) D) (the queue's normalised copy and its unused gradient: 8 MiB each)."""
    code = _MEMORY_PROBE.replace("N, K", "2048, 16384")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = {ln.split()[0]: float(ln.split()[1]) for ln in out.stdout.splitlines()}
    if "noreset" in peaks:
        pytest.skip("this kernel does not let a process reset its peak RSS (clear_refs)")
    assert peaks["dense"] > 300, f"the dense loss must hold N x K float32 matrices: {peaks}"
    assert peaks["fused"] < 0.15 * peaks["dense"], peaks


# --- bad input ----------------------------------------------------------------------------


def _qk(n=4, d=6, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)


@pytest.mark.parametrize(
    "queue, error, message",
    [
        (torch.randn(5, 7), ValueError, r"queue must have the inputs' width D=6"),
        (torch.randn(5, 6, dtype=torch.float64), TypeError, r"dtype torch.float32, got .*64"),
        (torch.randn(5, 6, requires_grad=True), ValueError, r"queue must not require grad"),
        (torch.randn(5, 6, device="meta"), ValueError, r"queue must be on the inputs' device"),
        (torch.randn(2, 5, 6), ValueError, r"queue must have shape \(K, D\)"),
        (torch.randn(0, 6), ValueError, r"queue must have at least one row"),
        ([[0.0] * 6], TypeError, r"queue must be a torch.Tensor"),
    ],
    ids=["width", "dtype", "requires-grad", "device", "dims", "empty", "list"],
)  # fmt: skip
def test_bad_queue_is_refused(queue, error, message):
    q, k = _qk()
    with pytest.raises(error, match=message):
        fused_contrastive_loss(q, k, queue=queue)


def test_bad_queue_of_heads_and_options_are_refused():
    q, k = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match=r"queue must have the inputs' H=2 heads"):
        fused_contrastive_loss(q, k, queue=torch.randn(3, 5, 6))
    q, k = _qk()
    with pytest.raises(ValueError, match=r"leave negatives and symmetric at their defaults"):
        fused_contrastive_loss(q, k, negatives="cross", queue=torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"leave negatives and symmetric at their defaults"):
        fused_contrastive_loss(q, k, symmetric=False, queue=torch.randn(5, 6))


@pytest.mark.parametrize(
    "size, message",
    [(-1, "an int K >= 0"), ((4, 6, 1), "an int K >= 0"), ((4, 0), "needs D >= 1"),
     (2.5, "an int K >= 0"), ((4, True), "an int K >= 0")],
)  # fmt: skip
def test_bad_memory_bank_size_is_refused(size, message):
    with pytest.raises(ValueError, match=rf"memory_bank_size .*{message}"):
        NTXentLoss(memory_bank_size=size)


def test_drop_in_refuses_inputs_of_another_width():
    loss = NTXentLoss(memory_bank_size=(8, 5), backend="torch")
    with pytest.raises(ValueError, match=r"out0 and out1 must have the memory bank's width D=5"):
        loss(*_qk(4, 6))
    with pytest.raises(ValueError, match=r"out0 must have a non-empty shape \(N, D\)"):
        loss(torch.randn(2, 4, 5), torch.randn(2, 4, 5))
    lazy = NTXentLoss(memory_bank_size=8)
    with pytest.raises(ValueError, match=r"out1 must have a non-empty shape \(N, D\)"):
        lazy(torch.randn(4, 5), torch.randn(4, 0))
    assert lazy.memory_bank.bank is None  # a refused call draws no bank
    assert int(loss.memory_bank.bank_ptr) == 0  # a refused call writes nothing


def test_drop_in_with_bank_refuses_labels():
    """PML's call with labels has no bank form: refused by name, the bank untouched."""
    loss = NTXentLoss(memory_bank_size=(8, 5), backend="torch")
    before = loss.memory_bank.bank.clone()
    with pytest.raises(ValueError, match=r"with labels takes no memory bank \(memory_bank_size=8"):
        loss(torch.randn(4, 5, requires_grad=True), torch.tensor([0, 1, 0, 1]))
    assert torch.equal(loss.memory_bank.bank, before) and int(loss.memory_bank.bank_ptr) == 0


def test_drop_in_without_bank_is_unchanged():
    """``memory_bank_size=0`` (and ``(0, D)``, as lightly) is the SimCLR loss over
    ``[out0; out1]``."""
    out0, out1 = _qk(6, 5)
    want = NTXentLoss(0.5)(out0, out1)
    for size in (0, (0, 5)):
        torch.testing.assert_close(NTXentLoss(0.5, memory_bank_size=size)(out0, out1), want)


# --- across ranks -------------------------------------------------------------------------

N_LOCAL, D_RANKS, K_RANKS = 5, 6, 16


def _rank_inputs(world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global queries and keys ``(world * N_LOCAL, D)`` and one queue, float64."""
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(world * N_LOCAL, D_RANKS, generator=gen, dtype=torch.float64)
    k = q + 0.5 * torch.randn(q.shape, generator=gen, dtype=torch.float64)
    queue = torch.randn(K_RANKS, D_RANKS, generator=gen, dtype=torch.float64)
    return q, k, queue


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q, k, queue = _rank_inputs(world)
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        a, b = q[sl].clone().requires_grad_(), k[sl].clone().requires_grad_()
        tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        loss = fused_contrastive_loss(a, b, temperature=tau, queue=queue, backend="torch",
                                      group=dist.group.WORLD)  # fmt: skip
        grads = torch.autograd.grad(loss, (a, b, tau))
        torch.manual_seed(5)  # every rank draws the same initial bank
        module = NTXentLoss(0.3, memory_bank_size=(K_RANKS, D_RANKS), backend="torch",
                            group=dist.group.WORLD)  # fmt: skip
        value = module(q[sl].float().requires_grad_(), k[sl].float())
        out = {"loss": loss.detach(), "grads": [g.detach() for g in grads],
               "module": value.detach(), "bank": module.memory_bank.bank.clone(),
               "ptr": int(module.memory_bank.bank_ptr)}  # fmt: skip
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done before any tears gloo down: a peer's last transfer may
        # still be in flight (a rank aborted in teardown without this, under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_match_single_process(tmp_path):
    """Two gloo ranks: ``fused_contrastive_loss(queue=, group=)`` follows the README's
    convention (ranks' mean = the single-process loss, input gradients world x, the
    temperature's averaged); the drop-in's ``group`` (lightly's ``gather_distributed``)
    writes every rank's normalised ``out1`` into the bank, in rank order, on each rank."""
    world = 2
    run_ranks(_rank_worker, world, (str(tmp_path / "init"), str(tmp_path)), timeout=120)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    q, k, queue = _rank_inputs(world)
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    single = fused_contrastive_loss(q, k, temperature=tau, queue=queue, backend="torch")
    ref = torch.autograd.grad(single, (q, k, tau))
    torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), single.detach())
    for rank, r in enumerate(per_rank):
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        torch.testing.assert_close(r["grads"][0], world * ref[0][sl])
        torch.testing.assert_close(r["grads"][1], world * ref[1][sl])
    torch.testing.assert_close(torch.stack([r["grads"][2] for r in per_rank]).mean(), ref[2])
    torch.manual_seed(5)
    bank = F.normalize(torch.randn(K_RANKS, D_RANKS), dim=-1)
    want = moco_formula(q.detach(), k.detach(), bank.double(), 0.3).mean()
    torch.testing.assert_close(torch.stack([r["module"] for r in per_rank]).double().mean(), want)
    bank[: world * N_LOCAL] = F.normalize(k.detach().float(), dim=1)
    for r in per_rank:
        assert torch.equal(r["bank"], bank) and r["ptr"] == world * N_LOCAL
