"""The labelled losses (``mimac_kernels.labels``): SupCon on every backend with rectangular
kernels and PML's NTXent with labels on torch, triton and cpu (cuda refuses it), against independent float64 formulas
(values, input and temperature gradients, under ``tests.kernels.accuracy``'s rule), the
drop-ins against pytorch-metric-learning, and their bad inputs."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mimac_kernels import (
    BackendUnavailable,
    NTXentLoss,
    SupConLoss,
    dispatch,
    labels_kernels,
    labels_torch,
    supervised_contrastive_loss,
    supervised_ntxent_loss,
    torch_backend,
)
from mimac_kernels.demo import peak_rss_mb
from tests.kernels.accuracy import (
    HALF_DTYPES,
    assert_within_bound,
    error_bound,
    max_abs_err,
    weight_eps,
)
from tests.ranks import run_ranks

# --- the formulas, dense and written out (float64 as the oracle, float32 as "plain") ---


def _scores(z: torch.Tensor, tau: torch.Tensor, critic: str) -> torch.Tensor:
    if critic == "cosine":
        z = F.normalize(z, dim=-1, eps=1e-12)
    return z @ z.transpose(-1, -2) / tau


def _pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives (same label, not the diagonal) and negatives (other label), ``(N, N)``."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def supcon_formula(z, labels, tau, critic="cosine", reduction="mean"):
    """``-(1/|P(i)|) sum_p log softmax_{k != i}(S_i)_p``, mean over anchors with a positive."""
    s = _scores(z, tau, critic)
    pos, _ = _pair_masks(labels)
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=z.device)
    log_prob = s - torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=-1, keepdim=True)
    n_pos = pos.sum(-1)
    per = -(log_prob * pos).sum(-1) / n_pos.clamp_min(1)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / (max(int((n_pos > 0).sum()), 1) * (z.shape[0] if z.dim() == 3 else 1))


def ntxent_formula(z, labels, tau, critic="cosine", reduction="mean"):
    """Per positive pair ``-log(e^{S_ap} / (e^{S_ap} + sum_{n in Q(a)} e^{S_an}))``."""
    s = _scores(z, tau, critic)
    pos, neg = _pair_masks(labels)
    neg_exp = (s.exp() * neg).sum(-1, keepdim=True)  # small scores here: no overflow
    pair = -torch.log(s.exp() / (s.exp() + neg_exp))
    per = (pair * pos).sum(-1)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    pairs = max(int(pos.sum()), 1) * (z.shape[0] if z.dim() == 3 else 1)
    return per.sum() / pairs


# --- inputs and the comparison ----------------------------------------------------------


def _case(shape, classes, seed=0, device="cpu"):
    """Rows (correlated within a class, so positives score higher) and labels: a few
    classes with large and negative label values, and one singleton (no positive)."""
    gen = torch.Generator().manual_seed(seed)
    n = shape[-2]
    labels = torch.randint(0, classes, (n,), generator=gen) * 1000 - 7
    labels[n // 2] = 10**9  # a singleton: dropped from SupCon's mean, no pairs in NTXent
    centres = torch.randn(classes + 1, shape[-1], generator=gen)
    idx = torch.div(labels + 7, 1000, rounding_mode="floor").clamp(max=classes)
    z = centres[idx] + 0.8 * torch.randn(shape, generator=gen)
    return z.to(device), labels.to(device)


def _value_and_grads(fn, z, labels, tau, dtype):
    """``fn``'s value and its gradients w.r.t. z and a learnable tau, as a list."""
    zz = z.detach().to(dtype).requires_grad_()
    t = torch.tensor(tau, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     device=z.device, requires_grad=True)  # fmt: skip
    out = fn(zz, labels, t)
    return [out.detach(), *torch.autograd.grad(out, (zz, t))]


def _assert_matches_formula(ours, formula, z, labels, tau, dtype=torch.float32):
    """Value, grad z and grad tau of ``ours`` (inputs in ``dtype``) within the accuracy rule
    of ``formula`` in ``dtype`` against ``formula`` in float64, on the same rounded rows."""
    z = z.to(dtype)
    got = _value_and_grads(ours, z, labels, tau, dtype)
    plain = _value_and_grads(formula, z, labels, tau, dtype)
    ref = _value_and_grads(formula, z.double(), labels, tau, torch.float64)
    assert_within_bound([g.cpu() for g in got], [p.cpu() for p in plain],
                        [r.cpu() for r in ref], dtype, ["loss", "grad z", "grad tau"])  # fmt: skip


#: (shape, classes): odd sizes, heads, several row blocks of the kernels, D = 1.
SHAPES = [((9, 1), 2), ((17, 5), 3), ((2, 29, 7), 4), ((3, 70, 40), 6)]


@pytest.mark.parametrize("critic", ["cosine", "dot"])
@pytest.mark.parametrize("shape,classes", SHAPES, ids=str)
def test_supcon_matches_float64(runner, shape, classes, critic):
    if runner.interpreted and shape[-2] > 30:
        pytest.skip("Triton's interpreter: the small shapes cover its rectangular kernels")
    z, labels = _case(shape, classes, device=runner.device)
    if critic == "dot":
        z = 0.3 * z

    def ours(x, y, t):
        return supervised_contrastive_loss(x, y, temperature=t, critic=critic,
                                           backend=runner.name)  # fmt: skip

    def formula(x, y, t):
        return supcon_formula(x, y, t, critic)

    _assert_matches_formula(ours, formula, z, labels, 0.1 if critic == "cosine" else 0.5)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_supcon_half_inputs_match_float64(runner, dtype):
    """bfloat16 and float16 rows: the kernels take the normalised rows in that dtype; the
    rule's slack for a backward that rounds its weights (``weight_eps``) is added to the
    gradient's bound."""
    _assert_half_matches_float64(supervised_contrastive_loss, supcon_formula, runner, dtype)


def _assert_half_matches_float64(loss, formula, runner, dtype) -> None:
    """``loss`` on ``runner``'s backend with half rows ``(2, 29, 7)``, 4 classes, against
    ``formula`` in float64; bound: the rule's plain error in ``dtype`` plus, for the
    gradients, twice the backend's rounding of its weights (``weight_eps``)."""
    z, labels = _case((2, 29, 7), 4, seed=9, device=runner.device)
    z = z.to(dtype)

    def ours(x, y, t):
        return loss(x, y, temperature=t, backend=runner.name)

    got = _value_and_grads(ours, z, labels, 0.1, dtype)
    plain = _value_and_grads(formula, z, labels, 0.1, dtype)
    ref = _value_and_grads(formula, z.double(), labels, 0.1, torch.float64)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for i, (name, x, p, r) in enumerate(zip(["loss", "grad z", "grad tau"], got, plain, ref)):
        bound = error_bound(max_abs_err(p, r), dtype, r)
        if i:
            bound += 2.0 * weight_eps(runner.name, dtype) * float(r.abs().max())
        err = max_abs_err(x, r)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({dtype})"


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,classes", SHAPES, ids=str)
def test_supcon_torch_reductions_and_float64(shape, classes, dtype, reduction):
    z, labels = _case(shape, classes, seed=1)
    weights = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(2), dtype=dtype)

    def weighted(fn):  # a non-uniform upstream gradient for "none"
        def f(x, y, t):
            out = fn(x, y, t)
            return out if reduction == "sum" else (out * weights.to(out.dtype)).sum()
        return f

    ours = weighted(lambda x, y, t: supervised_contrastive_loss(
        x, y, temperature=t, reduction=reduction, backend="torch"))
    formula = weighted(lambda x, y, t: supcon_formula(x, y, t, reduction=reduction))
    _assert_matches_formula(ours, formula, z, labels, 0.1, dtype)


@pytest.mark.parametrize("critic", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF_DTYPES], ids=str)
@pytest.mark.parametrize("shape,classes", SHAPES, ids=str)
def test_ntxent_with_labels_matches_float64(shape, classes, dtype, critic):
    z, labels = _case(shape, classes, seed=3)
    if critic == "dot":
        z = 0.3 * z
    tau = 0.07 if critic == "cosine" else 0.5

    def ours(x, y, t):
        return supervised_ntxent_loss(x, y, temperature=t, critic=critic)

    def formula(x, y, t):
        return ntxent_formula(x, y, t, critic)

    _assert_matches_formula(ours, formula, z, labels, tau, dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_ntxent_with_labels_reductions(reduction):
    z, labels = _case((2, 23, 6), 3, seed=4)
    weights = torch.rand(2, 23, generator=torch.Generator().manual_seed(5))

    def weighted(fn):
        def f(x, y, t):
            out = fn(x, y, t, reduction=reduction)
            return out if reduction == "sum" else (out * weights.to(out.dtype)).sum()
        return f

    ours = weighted(lambda x, y, t, **k: supervised_ntxent_loss(x, y, temperature=t, **k))
    _assert_matches_formula(ours, weighted(ntxent_formula), z, labels, 0.1)


def test_row_blocks_give_the_one_block_result(monkeypatch):
    """Blocks of a few rows (every block boundary inside a class) give the result of one
    block, for both losses on the torch backend."""
    z, labels = _case((2, 31, 5), 3, seed=6)
    z = z.double().requires_grad_()
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    fns = (lambda: supervised_contrastive_loss(z, labels, temperature=t, backend="torch"),
           lambda: supervised_ntxent_loss(z, labels, temperature=t))  # fmt: skip
    whole = [[fn(), *torch.autograd.grad(fn(), (z, t))] for fn in fns]
    monkeypatch.setattr(labels_torch, "TILE_ELEMS", 4 * 2 * 3 * 31)  # 3 rows per block
    monkeypatch.setattr(torch_backend, "TILE_ELEMS", 4 * 31)
    for fn, ref in zip(fns, whole, strict=True):
        out = fn()
        for x, r in zip([out, *torch.autograd.grad(out, (z, t))], ref, strict=True):
            torch.testing.assert_close(x, r, rtol=1e-12, atol=1e-14)


def _memory_probe(n: int, call: str) -> str:
    """Source of a probe: ``(n, 32)`` rows, 100 labels, one forward + backward of ``call``."""
    return (
        "import torch, mimac_kernels\n"
        "torch.set_num_threads(1)\n"
        "g = torch.Generator().manual_seed(0)\n"
        f"z = torch.randn({n}, 32, generator=g).requires_grad_()\n"
        f"y = torch.randint(0, 100, ({n},), generator=g)\n"
        f"loss = {call}\nloss.backward()\n"
    )


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
def test_memory_grows_with_n_not_n_squared():
    """Peak RSS of forward + backward at N = 8,192 in fresh processes, above both losses at
    N = 256 (the fixed cost: libraries, the extension, autograd): under half of one
    N x N float32 matrix (256 MiB; the dense formulas hold several, 1.5-2.4 GB here)."""
    supcon = "mimac_kernels.supervised_contrastive_loss(z, y)"
    ntxent = "mimac_kernels.supervised_ntxent_loss(z, y)"
    fixed = peak_rss_mb(_memory_probe(256, f"{supcon} + {ntxent}"))
    for call in (supcon, ntxent):
        extra = peak_rss_mb(_memory_probe(8192, call)) - fixed
        assert extra < 128, (call, extra)


# --- batches without positives or negatives --------------------------------------------


@pytest.mark.parametrize("fn", [supervised_contrastive_loss, supervised_ntxent_loss])
def test_no_positive_gives_zero_and_zero_gradient(fn):
    z = torch.randn(7, 4, requires_grad=True)
    loss = fn(z, torch.arange(7))
    (grad,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    one = torch.randn(1, 4, requires_grad=True)  # N = 1: no pair at all
    assert fn(one, torch.zeros(1, dtype=torch.long)).item() == 0.0


# N = 1: Triton's interpreter (numpy) warns on the row with no column, log(0) and 0 * inf,
# inside kernels whose result the test checks.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_supcon_without_positives_is_zero_on_every_backend(runner):
    """No positive (distinct labels), and N = 1 (a row without any other column: its
    log-sum-exp is -inf): 0 and a zero gradient, never NaN, on each backend."""
    for n in (7, 1):
        z = torch.randn(2, n, 4, device=runner.device, requires_grad=True)
        loss = supervised_contrastive_loss(z, torch.arange(n, device=runner.device),
                                           backend=runner.name)  # fmt: skip
        (grad,) = torch.autograd.grad(loss, z)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad)), (n, grad)


def test_one_label_supcon_is_the_formula_ntxent_is_zero():
    """Every row one label: SupCon's denominator holds only positives (a finite, positive
    value); NTXent's pairs have no negative, each pair's loss is log(1) = 0."""
    z, labels = torch.randn(9, 5, dtype=torch.float64), torch.full((9,), 4)
    sc = supervised_contrastive_loss(z, labels, temperature=0.3)
    torch.testing.assert_close(sc, supcon_formula(z, labels, torch.tensor(0.3, dtype=z.dtype)))
    assert sc.item() > 0
    assert supervised_ntxent_loss(z, labels, temperature=0.3).item() == 0.0


# --- the drop-ins against pytorch-metric-learning ---------------------------------------


def _pml_losses():
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        if os.environ.get("CI"):
            pytest.fail("pytorch-metric-learning is not installed (CI installs it, --no-deps)")
        pytest.skip("pytorch-metric-learning is not installed")
    from pytorch_metric_learning import losses

    return losses


def _peer_value_and_grads(loss_fn, z, labels, dtype):
    zz = z.detach().to(dtype).requires_grad_()
    out = loss_fn(zz, labels)
    return [out.detach(), *torch.autograd.grad(out, zz)]


def _assert_matches_peer(ours, peer, z, labels):
    """``ours`` (float32) against the peer in float64, within the rule of the peer's float32."""
    assert_within_bound(
        _peer_value_and_grads(ours, z, labels, torch.float32),
        _peer_value_and_grads(peer, z, labels, torch.float32),
        _peer_value_and_grads(peer, z, labels, torch.float64), torch.float32,
        ["loss", "grad"],
    )


#: (N, D, classes): singletons and pairs, many classes, few classes.
PEER_CASES = [(13, 6, 5), (40, 16, 3), (64, 9, 30)]


@pytest.mark.parametrize("n,d,classes", PEER_CASES, ids=str)
def test_supcon_matches_pytorch_metric_learning(n, d, classes):
    losses = _pml_losses()
    z, labels = _case((n, d), classes, seed=n)
    _assert_matches_peer(SupConLoss(temperature=0.1), losses.SupConLoss(temperature=0.1),
                         z, labels)  # fmt: skip


@pytest.mark.parametrize("n,d,classes", PEER_CASES, ids=str)
def test_ntxent_with_labels_matches_pytorch_metric_learning(n, d, classes):
    losses = _pml_losses()
    z, labels = _case((n, d), classes, seed=n + 1)
    _assert_matches_peer(NTXentLoss(temperature=0.07), losses.NTXentLoss(temperature=0.07),
                         z, labels)  # fmt: skip
    # PML's positional call and labels= are the same call.
    torch.testing.assert_close(NTXentLoss(0.07)(z, labels), NTXentLoss(0.07)(z, labels=labels))


@pytest.mark.parametrize("labels", [torch.arange(6), torch.full((6,), 3)], ids=["distinct", "one"])
def test_degenerate_batches_match_pytorch_metric_learning(labels):
    """No positive pair, or no negative pair: PML's 0 (and zero gradient) in both."""
    losses = _pml_losses()
    z = torch.randn(6, 4)
    for ours, peer in ((SupConLoss(0.1), losses.SupConLoss(0.1)),
                       (NTXentLoss(0.07), losses.NTXentLoss(0.07))):  # fmt: skip
        mine = _peer_value_and_grads(ours, z, labels, torch.float32)
        theirs = _peer_value_and_grads(peer, z, labels, torch.float32)
        for x, r in zip(mine, theirs, strict=True):
            assert torch.equal(x, torch.zeros_like(x)) and torch.equal(r, torch.zeros_like(r))


def test_ntxent_without_labels_is_still_lightlys():
    """Two float views still take the two-view loss."""
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    from mimac_kernels import fused_contrastive_loss

    expected = fused_contrastive_loss(a, b, temperature=0.5)
    torch.testing.assert_close(NTXentLoss()(a, b), expected, rtol=0, atol=0)


# --- bad inputs -------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [supervised_contrastive_loss, supervised_ntxent_loss])
@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (torch.zeros(5), TypeError, "labels must be an integer tensor"),
        (torch.zeros(5, dtype=torch.bool), TypeError, "labels must be an integer tensor"),
        ([0, 1, 0, 1, 0], TypeError, "labels must be a torch.Tensor"),
        (torch.zeros(5, 1, dtype=torch.long), ValueError, r"labels must have shape \(N,\)"),
        (torch.zeros(4, dtype=torch.long), ValueError, r"labels must have shape \(N,\)"),
        (torch.zeros(5, dtype=torch.long, device="meta"), ValueError, "labels are on meta"),
    ],
    ids=["float", "bool", "list", "2d", "short", "device"],
)
def test_bad_labels_are_refused(fn, bad, exc, match):
    with pytest.raises(exc, match=match):
        fn(torch.randn(5, 3), bad)


@pytest.mark.parametrize("fn", [supervised_contrastive_loss, supervised_ntxent_loss])
def test_log_dot_is_refused_with_its_reason(fn):
    p = torch.rand(5, 3).softmax(-1)
    with pytest.raises(ValueError, match="critic='log_dot' takes no labels: .* not linear"):
        fn(p, torch.zeros(5, dtype=torch.long), critic="log_dot")


def test_cuda_refuses_labelled_problems():
    """The cuda backend's refusal and a direct call, never an unmasked run."""
    from mimac_kernels import cuda_backend, extension_backend
    from mimac_kernels.contract import RectProblem

    z, lab = torch.randn(1, 5, 3), torch.zeros(5, dtype=torch.long)
    problem = RectProblem(z, z, torch.tensor(2.0), "dot", 1e-12, 0, row_labels=lab,
                          col_labels=lab)  # fmt: skip
    assert "label mask" in cuda_backend.refusal(problem)
    with pytest.raises(ValueError, match="label mask"):
        extension_backend.rect_forward("cuda", problem)


def test_modules_refuse_bad_calls():
    z, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(temperature=0.0)
    with pytest.raises(TypeError, match="not both"):
        NTXentLoss()(z, z, labels=labels)
    with pytest.raises(TypeError, match="out1"):
        NTXentLoss()(z)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        SupConLoss()(z, labels.float())


# --- across ranks -----------------------------------------------------------------------

N_LOCAL = 7


def _rank_backends() -> list[tuple[str, torch.dtype]]:
    """torch in float64 and cpu in float32 (the ranks run CPU tensors)."""
    return [("torch", torch.float64), ("cpu", torch.float32)]


def _ntxent_rank_cases() -> list[tuple[str, torch.dtype]]:
    """NTXent across ranks: auto in float64 (torch) and float32 (cpu), and triton where it
    runs on CPU tensors (its interpreter)."""
    cases = [("auto", torch.float64), ("auto", torch.float32)]
    if dispatch.unavailable_reason("triton", torch.device("cpu"), torch.float32) is None:
        cases.append(("triton", torch.float32))
    return cases


def _global_case(world: int, heads: int | None):
    shape = (world * N_LOCAL, 5) if heads is None else (heads, world * N_LOCAL, 5)
    z, labels = _case(shape, 3, seed=20 + world)
    return z.double(), labels


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        for heads in (None, 2):
            z, labels = _global_case(world, heads)
            for backend, dtype in _rank_backends():
                x = z[..., sl, :].to(dtype).requires_grad_()
                t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
                loss = supervised_contrastive_loss(x, labels[sl], temperature=t,
                                                   backend=backend, group=dist.group.WORLD)
                module = SupConLoss(0.2, backend=backend, group=dist.group.WORLD)(x, labels[sl])
                results[(heads, backend)] = [loss.detach(), *torch.autograd.grad(loss, (x, t)),
                                             module.detach()]  # fmt: skip
            for backend, dtype in _ntxent_rank_cases():
                x = z[..., sl, :].to(dtype).requires_grad_()
                t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
                loss = supervised_ntxent_loss(x, labels[sl], temperature=t, backend=backend,
                                              group=dist.group.WORLD)  # fmt: skip
                module = NTXentLoss(0.2, backend=backend, group=dist.group.WORLD)(x, labels[sl])
                results[(heads, "ntxent", backend, dtype)] = [
                    loss.detach(), *torch.autograd.grad(loss, (x, t)), module.detach()
                ]
        # One label per rank: each rank alone has no negative, the batch has.
        split = torch.full((N_LOCAL,), rank)
        x = _global_case(world, None)[0][sl]
        results["split"] = SupConLoss(0.2, backend="torch", group=dist.group.WORLD)(x, split)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done before any tears gloo down: a peer's last transfer may
        # still be in flight (a rank aborted in teardown without this, under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_match_single_process(tmp_path):
    """Both losses on two ranks against the single process on the concatenated batch
    (positives and negatives on both ranks, a singleton anchor): the ranks' mean is the
    loss, input gradients world_size x, the temperature gradients averaged (DDP) the
    loss's."""
    world = 2
    run_ranks(_rank_worker, world, (str(tmp_path / "init"), str(tmp_path)), timeout=150)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for heads in (None, 2):
        z, labels = _global_case(world, heads)
        z.requires_grad_()
        t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        cases = [(supcon_formula, (heads, backend), dtype) for backend, dtype in _rank_backends()]
        cases += [(ntxent_formula, (heads, "ntxent", backend, dtype), dtype)
                  for backend, dtype in _ntxent_rank_cases()]  # fmt: skip
        for formula, key, dtype in cases:
            single = formula(z, labels, t)
            grad_z, grad_t = torch.autograd.grad(single, (z, t))
            tol = 1e-10 if dtype == torch.float64 else 2e-5
            close = {"rtol": tol, "atol": tol, "check_dtype": False, "msg": str(key)}
            values = torch.stack([r[key][0].double() for r in per_rank])
            torch.testing.assert_close(values.mean(), single.detach(), **close)
            modules = torch.stack([r[key][3].double() for r in per_rank])
            torch.testing.assert_close(modules.mean(), single.detach(), **close)
            for rank, r in enumerate(per_rank):
                sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
                torch.testing.assert_close(r[key][1].double(), world * grad_z[..., sl, :], **close)
            mean_t = torch.stack([r[key][2].double() for r in per_rank]).mean()
            torch.testing.assert_close(mean_t, grad_t, **close)
    z, _ = _global_case(world, None)
    split = torch.arange(world).repeat_interleave(N_LOCAL)
    expected = supcon_formula(z, split, torch.tensor(0.2, dtype=torch.float64))
    assert expected > 0
    values = torch.stack([r["split"] for r in per_rank])
    torch.testing.assert_close(values.mean(), expected, rtol=1e-10, atol=1e-10)


# --- NTXent with labels on the backends ----------------------------------------------------


def _ntxent_on(runner, shape, **kwargs):
    """Whether ``runner`` runs PML's NTXent with labels: cuda refuses it by name (checked
    here), triton in its interpreter takes the small shapes only."""
    if runner.name == "cuda":
        z = torch.randn(shape, device=runner.device)
        with pytest.raises(BackendUnavailable, match="label mask"):
            supervised_ntxent_loss(z, torch.zeros(shape[-2], dtype=torch.long,
                                                  device=runner.device), backend=runner.name)
        return False
    if runner.interpreted and shape[-2] > 30:
        pytest.skip("Triton's interpreter: the small shapes cover its labelled kernels")
    return True


@pytest.mark.parametrize("critic", ["cosine", "dot"])
@pytest.mark.parametrize("shape,classes", SHAPES, ids=str)
def test_ntxent_with_labels_on_backends_matches_float64(runner, shape, classes, critic):
    if not _ntxent_on(runner, shape):
        return
    z, labels = _case(shape, classes, seed=3, device=runner.device)
    if critic == "dot":
        z = 0.3 * z

    def ours(x, y, t):
        return supervised_ntxent_loss(x, y, temperature=t, critic=critic, backend=runner.name)

    def formula(x, y, t):
        return ntxent_formula(x, y, t, critic)

    _assert_matches_formula(ours, formula, z, labels, 0.07 if critic == "cosine" else 0.5)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_ntxent_with_labels_on_backends_reductions(runner, reduction):
    if not _ntxent_on(runner, (2, 23, 6)):
        return
    z, labels = _case((2, 23, 6), 3, seed=4, device=runner.device)
    weights = torch.rand(2, 23, generator=torch.Generator().manual_seed(5)).to(runner.device)

    def weighted(fn):
        def f(x, y, t):
            out = fn(x, y, t, reduction=reduction)
            return out if reduction == "sum" else (out * weights.to(out.dtype)).sum()
        return f

    ours = weighted(lambda x, y, t, **k: supervised_ntxent_loss(
        x, y, temperature=t, backend=runner.name, **k))
    _assert_matches_formula(ours, weighted(ntxent_formula), z, labels, 0.1)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_ntxent_with_labels_half_inputs_match_float64(runner, dtype):
    """Half rows: the kernels take the normalised rows in that dtype (the slack of a
    backward that rounds its weights added to the gradients' bound, as for SupCon)."""
    if not _ntxent_on(runner, (2, 29, 7)):
        return
    _assert_half_matches_float64(supervised_ntxent_loss, ntxent_formula, runner, dtype)


@pytest.mark.parametrize(
    "labels",
    [torch.arange(9), torch.zeros(9, dtype=torch.long), torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 2])],
    ids=["classes-of-one", "no-negative", "big-class"],
)
def test_ntxent_with_labels_edge_batches_on_backends(runner, labels):
    """Classes of one row (no positive pair: 0, gradient 0), one label for all (no anchor
    has a negative: PML's 0), and a large class with two singletons."""
    if not _ntxent_on(runner, (9, 4)):
        return
    z = _case((9, 4), 2, seed=11)[0].to(runner.device)
    labels = labels.to(runner.device)

    def ours(x, y, t):
        return supervised_ntxent_loss(x, y, temperature=t, backend=runner.name)

    got = _value_and_grads(ours, z, labels, 0.2, torch.float32)
    if labels.unique().numel() in (1, 9):
        assert all(float(g.abs().max()) == 0.0 for g in got)
    _assert_matches_formula(ours, ntxent_formula, z, labels, 0.2)


def test_ntxent_kernels_against_gathered_columns(runner):
    """The rectangular path of ``group=``: local rows against more columns (another
    rank's before and after them, ``offset``), with a class only on the other ranks and
    an anchor whose negatives all lie there, against the torch blocks in float64."""
    if not _ntxent_on(runner, (2, 11, 5)) or runner.name == "torch":
        return
    gen = torch.Generator().manual_seed(13)
    cols = F.normalize(torch.randn(2, 29, 5, generator=gen), dim=-1)
    offset = 9
    rows = cols[:, offset : offset + 11]
    col_labels = torch.randint(0, 3, (29,), generator=gen)
    col_labels[offset : offset + 11] = torch.randint(0, 2, (11,), generator=gen)
    col_labels[0] = 7  # a class of the other ranks only
    row_labels = col_labels[offset : offset + 11]
    g = torch.rand(2, 11, generator=gen)
    it = torch.tensor(1 / 0.1)

    def run(fn, x, y, t):
        x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
        t = t.clone().requires_grad_()
        out = fn(x, y, t)
        return [out.detach(), *torch.autograd.grad((out * g.to(out.dtype)).sum(), (x, y, t))]

    dev = runner.device
    ours = run(lambda x, y, t: labels_kernels.LabelledNTXentKernels.apply(
        x, y, t, row_labels.to(dev), col_labels.to(dev), offset, "cosine", 1e-12, runner.name),
        rows.to(dev), cols.to(dev), it.to(dev))
    ref = run(lambda x, y, t: labels_torch_function(x, y, t, row_labels, col_labels, offset),
              rows.double(), cols.double(), it.double())
    for name, a, r in zip(["sums", "grad x", "grad y", "grad inv_tau"], ours, ref):
        torch.testing.assert_close(a.cpu().double(), r, rtol=1e-4, atol=1e-5, msg=name)


def labels_torch_function(x, y, t, row_labels, col_labels, offset):
    """The torch blocks' per-anchor sums with their gradients (``labels._LabelledNTXent``)."""
    from mimac_kernels.labels import _LabelledNTXent

    return _LabelledNTXent.apply(x, y, t, row_labels, col_labels, offset)
