"""The sigmoid loss (SigLIP): every backend that runs here against the float64 formula,
the drop-in against open_clip's ``SigLipLoss``, its bad inputs and its ranks."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mimac_kernels import BackendUnavailable, SigLipLoss, siglip, sigmoid_contrastive_loss
from mimac_kernels.demo import peak_rss_mb
from tests.kernels.accuracy import HALF_DTYPES, error_bound, max_abs_err, weight_eps
from tests.peers import open_clip_loss_module
from tests.ranks import run_ranks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ("torch", "triton", "cpu")
NAMES = ["loss", "grad_x", "grad_y", "grad_scale", "grad_bias"]


def triton_runs_here() -> bool:
    return DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _backend_or_skip(name: str) -> str:
    """``name`` if it runs the sigmoid loss here; skip where it cannot run on this
    machine (triton without GPU or interpreter, cpu beside a GPU); fail otherwise."""
    if name == "triton" and not triton_runs_here():
        pytest.skip("triton needs a CUDA device or TRITON_INTERPRET=1")
    if name == "cpu" and DEVICE.type != "cpu":
        pytest.skip("the cpu backend takes CPU tensors")
    why = siglip.refusal(name, torch.empty(1, 1, 1, device=DEVICE))
    assert why is None, f"{name} should run the sigmoid loss here: {why}"
    return name


def formula(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The loss written out with the full matrix, in the inputs' dtype (the oracle in float64):
    ``-(1/N) sum_ij log sigmoid(z_ij (t x_i . y_j + b))``, averaged over heads."""
    x3, y3 = (x, y) if x.dim() == 3 else (x[None], y[None])
    n = x3.shape[1]
    logits = t * (x3 @ y3.transpose(1, 2)) + b
    z = 2 * torch.eye(n, dtype=x3.dtype, device=x3.device) - 1
    return -F.logsigmoid(z * logits).sum(dim=(1, 2)).mean() / n


def _value_and_grads(fn, x, y, t, b, dtype, scalar_dtype=None) -> list[torch.Tensor]:
    """``fn(x, y, t, b)`` and its four gradients, x and y in ``dtype``, t and b in
    ``scalar_dtype`` (default ``dtype``)."""
    xs = [x.detach().to(dtype), y.detach().to(dtype)]
    xs += [v.detach().to(scalar_dtype or dtype) for v in (t, b)]
    xs = [v.clone().requires_grad_() for v in xs]
    out = fn(*xs)
    return [out, *torch.autograd.grad(out, xs)]


def _inputs(shape, seed: int, unit: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = x + 0.8 * torch.randn(shape, generator=g, dtype=torch.float64)
    if unit:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    else:
        x, y = 0.3 * x, 0.3 * y
    return x.to(DEVICE), y.to(DEVICE)


def assert_matches_float64(backend: str, x, y, t: float, b: float, dtype: torch.dtype) -> None:
    """Loss and the four gradients within the accuracy rule: twice plain PyTorch's own
    error in ``dtype`` against float64 on the same rounded inputs (``tests.kernels.accuracy``);
    for half inputs plus the rounding of the backward's weights to ``dtype`` (triton)."""
    x, y = x.to(dtype), y.to(dtype)
    tt = torch.tensor(t, dtype=torch.float64, device=DEVICE)
    bb = torch.tensor(b, dtype=torch.float64, device=DEVICE)
    compute = torch.float64 if dtype == torch.float64 else torch.float32

    def ours(*a):
        return sigmoid_contrastive_loss(*a, backend=backend)

    got = _value_and_grads(ours, x, y, tt, bb, dtype, compute)
    ref = _value_and_grads(formula, x, y, tt, bb, torch.float64)
    plain = _value_and_grads(formula, x, y, tt, bb, dtype)
    assert got[0].dtype == compute and got[0].dim() == 0
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for name, o, r, p in zip(NAMES, got, ref, plain, strict=True):
        bound = error_bound(max_abs_err(p, r), dtype, r)
        if dtype in HALF_DTYPES:
            bound += 2 * weight_eps(backend, dtype) * float(r.detach().abs().max())
        err = max_abs_err(o, r)
        assert err <= bound, f"{backend} {name}: error {err:.3g} > bound {bound:.3g} ({dtype})"


CASES = [
    # (shape, unit rows, t, b): open_clip's init (t = 10, b = -10), a positive bias,
    # raw rows, heads, a ragged tile count (70 > 64 rows), D over one gradient slice.
    ((13, 7), True, 10.0, -10.0),
    ((3, 70, 33), True, 2.3, 0.7),
    ((2, 19, 300), False, 1.5, -0.4),
    ((1, 1, 5), True, 4.0, 1.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])  # fmt: skip
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_backend_matches_float64(backend, dtype, case):
    name = _backend_or_skip(backend)
    shape, unit, t, b = case
    x, y = _inputs(shape, seed=len(shape) + shape[-1], unit=unit)
    assert_matches_float64(name, x, y, t, b, dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_torch_backend_float64(case):
    shape, unit, t, b = case
    x, y = _inputs(shape, seed=3, unit=unit)
    assert_matches_float64("torch", x, y, t, b, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_logits(backend):
    """Large |l|: softplus far in both tails (terms ~ 1e3 and ~ e^-1000), sigmoid 0 and 1."""
    name = _backend_or_skip(backend)
    x, y = _inputs((2, 21, 16), seed=5)
    assert_matches_float64(name, x, y, 1000.0, -3.0, torch.float32)


def test_triton_many_tiles_and_panels(monkeypatch):
    """The smallest tiles: several row and column tiles, two column panels and a ragged
    third (a panel of 24 columns, not a whole number of 16-column tiles), GEMMs over
    three feature tiles of D = 40, the column gradient's reduction whole and split."""
    _backend_or_skip("triton")
    from mimac_kernels.triton import siglip_backend

    x, y = _inputs((2, 37, 40), seed=6)
    for split in (1, 3):  # the column gradient's reduction whole, and in three ranges
        small = siglip_backend.SiglipTiles(block_m=16, block_n=16, block_d=16, panel=24,
                                           gemm_m=16, gemm_n=16, gemm_k=16, split=split)  # fmt: skip
        monkeypatch.setattr(siglip_backend, "tiles", lambda d, cfg=small: cfg)
        assert_matches_float64("triton", x, y, 3.0, -1.0, torch.float32)
        assert_matches_float64("triton", x, y, 3.0, -1.0, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0, 7, 40])
def test_rectangular_columns_with_offset(backend, offset):
    """The op as the ranks call it: 17 rows against 60 gathered columns, the positive of
    row i at column i + offset (none for rows past the last column), every output and
    gradient against the float64 formula."""
    name = _backend_or_skip(backend)
    g = torch.Generator().manual_seed(12)
    x = F.normalize(torch.randn(2, 17, 9, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(2, 60, 9, generator=g, dtype=torch.float64), dim=-1)
    up = torch.rand(2, 17, generator=g, dtype=torch.float64)  # a non-uniform upstream
    t, b = torch.tensor(6.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)

    def rows(x, y, t, b, op=True):
        if op:
            return siglip.siglip_fwd(x, y, t, b, offset=offset, backend=name)
        logits = t * (x @ y.transpose(1, 2)) + b
        pos = torch.arange(60)[None, :] == torch.arange(17)[:, None] + offset
        return -F.logsigmoid(torch.where(pos, logits, -logits)).sum(-1)

    def weighted(op):
        def fn(x, y, t, b):
            return (rows(x, y, t, b, op) * up.to(x.dtype if op else torch.float64)).sum()

        return fn

    args = [v.to(DEVICE) for v in (x, y, t, b)]
    got = _value_and_grads(weighted(True), *args, torch.float32)
    ref = _value_and_grads(weighted(False), *args, torch.float64)
    plain = _value_and_grads(weighted(False), *args, torch.float32)
    for n, o, r, p in zip(NAMES, got, ref, plain, strict=True):
        err, bound = max_abs_err(o, r), error_bound(max_abs_err(p, r), torch.float32, r)
        assert err <= bound, f"{name} offset {offset} {n}: error {err:.3g} > bound {bound:.3g}"


def test_cuda_refuses_with_reason():
    x = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(BackendUnavailable, match="cuda.*no sigmoid-loss kernel"):
        sigmoid_contrastive_loss(x, x, 1.0, 0.0, backend="cuda")


def test_auto_picks_a_backend_and_float64_runs_on_torch():
    x, y = _inputs((9, 4), seed=7)
    want = formula(x, y, torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1.0,
                   dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(sigmoid_contrastive_loss(x, y, 2.0, -1.0), want)
    with pytest.raises(BackendUnavailable, match="float64"):
        sigmoid_contrastive_loss(x, y, 2.0, -1.0, backend="cpu")


def test_compiles_without_graph_breaks():
    """``torch.compile(fullgraph=True)`` traces the op (fake implementations, no host reads)
    and gives the value and gradients within the accuracy rule (inductor's fused code
    rounds differently from eager, and differently on AVX2 and AVX-512)."""
    loss = SigLipLoss(backend="torch")

    def eager(*a):
        return loss(a[0], a[1], a[2].exp(), a[3])

    compiled = torch.compile(eager, fullgraph=True)
    x, y = _inputs((10, 6), seed=13)
    t, b = torch.tensor(1.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    got = _value_and_grads(compiled, x, y, t, b, torch.float32)
    ref = _value_and_grads(eager, x, y, t, b, torch.float64)
    plain = _value_and_grads(eager, x, y, t, b, torch.float32)
    for n, o, r, p in zip(NAMES, got, ref, plain, strict=True):
        bound = error_bound(max_abs_err(p, r), torch.float32, r)
        assert max_abs_err(o, r) <= bound, f"{n}: {max_abs_err(o, r):.3g} > {bound:.3g}"


def test_op_passes_opcheck():
    x, y = _inputs((2, 6, 5), seed=8)
    x, y = x.float().requires_grad_(), y.float().requires_grad_()
    t = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(-1.0, requires_grad=True)
    torch.library.opcheck(siglip.siglip_fwd, (x, y, t, b), {"offset": 0, "backend": "torch"})


def _memory_probe(n: int, backend: str | None) -> str:
    """Source of a probe: ``(n, 128)`` inputs and, for a backend (None: the plain
    full-matrix loss in float32), one forward + backward of the sigmoid loss."""
    code = (
        "import torch, torch.nn.functional as F, mimac_kernels\n"
        "torch.set_num_threads(1)\n"
        "g = torch.Generator().manual_seed(0)\n"
        f"a = torch.randn({n}, 128, generator=g).requires_grad_()\n"
        f"b = torch.randn({n}, 128, generator=g).requires_grad_()\n"
        "x = (a.sum() + b.sum()).item()\n"
    )
    if backend is None:
        call = f"-F.logsigmoid((2 * torch.eye({n}) - 1) * (10.0 * a @ b.T - 10.0)).sum() / {n}"
    else:
        call = f"mimac_kernels.sigmoid_contrastive_loss(a, b, 10.0, -10.0, backend={backend!r})"
    return code + f"loss = {call}\nloss.backward()\n"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
def test_memory_grows_with_n_not_n_squared():
    """Peak RSS of forward + backward at N = 8,192, D = 128 in fresh processes: above the
    same call at N = 256 (the first call's fixed cost: libraries, the extension, autograd),
    the fused loss (torch and cpu backends) takes under a tenth of what the plain loss's
    N x N matrices take."""

    def extra(n: int, backend: str | None) -> float:
        code = _memory_probe(n, backend)
        return peak_rss_mb(code) - peak_rss_mb(code[: code.index("loss =")])

    plain = extra(8192, None)
    assert plain > 1000, "the plain loss must hold several N x N float32 matrices"
    for backend in ("torch", "cpu"):
        fixed, fused = extra(256, backend), extra(8192, backend)
        assert fused - max(fixed, 0.0) < 0.10 * plain, (backend, fused, fixed, plain)


# --- bad input --------------------------------------------------------------------------


def _good():
    return torch.randn(5, 3), torch.randn(5, 3)


@pytest.mark.parametrize("which", ["logit_scale", "logit_bias"])
@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.ones(2), ValueError, "0-dim"),
        (torch.tensor(1), ValueError, "floating-point"),
        (float("nan"), ValueError, "finite"),
        (float("inf"), ValueError, "finite"),
        (torch.tensor(float("nan")), ValueError, "finite"),
        (torch.tensor(-float("inf")), ValueError, "finite"),
        (torch.tensor(1e39, dtype=torch.float64), ValueError, "finite"),  # inf in float32
        ("1.0", TypeError, "float or a 0-dim tensor"),
        (True, TypeError, "float or a 0-dim tensor"),
        (torch.tensor(1.0, device="meta"), ValueError, "is on meta"),
    ],
)
def test_bad_scalars_are_refused(which, bad, error, message):
    x, y = _good()
    args = {"logit_scale": 2.0, "logit_bias": 0.0, which: bad}
    with pytest.raises(error, match=f"{which}.*{message}|{message}.*{which}"):
        SigLipLoss()(x, y, args["logit_scale"], args["logit_bias"])


@pytest.mark.parametrize(
    "x, y, error, message",
    [
        (torch.randn(5, 3), torch.randn(4, 3), ValueError, "same shape"),
        (torch.randn(5, 3), torch.randn(5, 3, dtype=torch.float64), TypeError, "same dtype"),
        (torch.randn(5, 3), torch.randn(5, 3, device="meta"), ValueError, "same device"),
        (torch.randn(5), torch.randn(5), ValueError, "image_features must have shape"),
        (torch.randn(5, 3), torch.ones(5, 3, dtype=torch.int64), TypeError, "text_features"),
        (torch.randn(0, 3), torch.randn(0, 3), ValueError, "non-empty"),
        ([1.0], torch.randn(5, 3), TypeError, "image_features must be a torch.Tensor"),
    ],
)
def test_bad_features_are_refused(x, y, error, message):
    with pytest.raises(error, match=message):
        sigmoid_contrastive_loss(x, y, 1.0, 0.0)


def test_unknown_backend_is_refused():
    x, y = _good()
    with pytest.raises(ValueError, match="backend must be"):
        sigmoid_contrastive_loss(x, y, 1.0, 0.0, backend="cudnn")


def test_group_without_init_is_refused():
    x, y = _good()
    with pytest.raises(ValueError, match="not initialised"):
        sigmoid_contrastive_loss(x, y, 1.0, 0.0, group=object())


# --- the peer: open_clip's SigLipLoss ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_in_matches_open_clip(backend):
    """Value and the gradients of image and text features, of the log-scale parameter
    (``logit_scale.exp()`` passed, as open_clip's models do) and of the bias."""
    name = _backend_or_skip(backend)
    peer = open_clip_loss_module().SigLipLoss()
    x, y = _inputs((23, 12), seed=9)
    log_scale = torch.tensor(2.3026, dtype=torch.float64)  # t = 10
    bias = torch.tensor(-10.0, dtype=torch.float64)
    mine = SigLipLoss(backend=name)

    def ours(a, b, s, c):
        return mine(a, b, s.exp(), c)

    def theirs(a, b, s, c):
        return peer(a, b, s.exp(), c)

    got = _value_and_grads(ours, x, y, log_scale, bias, torch.float32)
    ref = _value_and_grads(theirs, x, y, log_scale, bias, torch.float64)
    plain = _value_and_grads(theirs, x, y, log_scale, bias, torch.float32)
    for n, o, r, p in zip(NAMES, got, ref, plain, strict=True):
        err, bound = max_abs_err(o, r), error_bound(max_abs_err(p, r), torch.float32, r)
        assert err <= bound, f"{n}: error {err:.3g} > bound {bound:.3g}"
    out = mine(x.float(), y.float(), 10.0, -10.0, output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].dim() == 0


# --- across ranks -----------------------------------------------------------------------

N_LOCAL, D = 5, 6


def _global(world: int, heads: int | None = None):
    g = torch.Generator().manual_seed(11)
    shape = (world * N_LOCAL, D) if heads is None else (heads, world * N_LOCAL, D)
    x = F.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)
    return x, y


def _params():
    return (torch.tensor(1.7, dtype=torch.float64, requires_grad=True),
            torch.tensor(-2.5, dtype=torch.float64, requires_grad=True))  # fmt: skip


def _rank_backends() -> list[tuple[str, torch.dtype]]:
    """The backends the ranks run (CPU tensors): torch in float64, cpu in float32, and
    triton in float32 under the interpreter."""
    out = [("torch", torch.float64), ("cpu", torch.float32)]
    return out + ([("triton", torch.float32)] if triton_runs_here() else [])


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        peer = open_clip_loss_module() if importlib.util.find_spec("open_clip") else None
        results = {}
        for heads in (None, 2):
            x, y = _global(world, heads)
            sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
            x, y = x[..., sl, :].clone().requires_grad_(), y[..., sl, :].clone().requires_grad_()
            for backend, dtype in _rank_backends():
                xs = x.detach().to(dtype).requires_grad_()
                ys = y.detach().to(dtype).requires_grad_()
                t, b = _params()
                loss = SigLipLoss(backend=backend, group=dist.group.WORLD)(xs, ys, t.exp(), b)
                grads = torch.autograd.grad(loss, (xs, ys, t, b))
                results[(heads, backend)] = [loss.detach(), *[g.detach() for g in grads]]
            if peer is not None and heads is None:
                for impl in ("bidir", "gather"):
                    t, b = _params()
                    theirs = peer.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)
                    loss = theirs(x, y, t.exp(), b)
                    grads = torch.autograd.grad(loss, (x, y, t, b))
                    results[("open_clip", impl)] = [loss.detach(), *[g.detach() for g in grads]]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done before any tears gloo down: a peer's last transfer may
        # still be in flight (a rank aborted in teardown without this, under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_match_single_process_and_open_clip(world, tmp_path):
    """Each rank against the single process on the concatenated batch (the README's
    convention: ranks' mean = the loss, input gradients world_size x, t and b gradients
    averaged by DDP), and against open_clip's multi-rank loss rank by rank."""
    run_ranks(_rank_worker, world, (str(tmp_path / "init"), str(tmp_path)), timeout=150)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for heads in (None, 2):
        x, y = _global(world, heads)
        x.requires_grad_(), y.requires_grad_()
        t, b = _params()
        single = formula(x, y, t.exp(), b)
        ref = torch.autograd.grad(single, (x, y, t, b))
        for backend, dtype in _rank_backends():
            # The accuracy rule: plain PyTorch's error on the global problem in ``dtype``
            # sets each quantity's bound (rank gradients are ``world`` times the global).
            xp, yp = x.detach().to(dtype).requires_grad_(), y.detach().to(dtype).requires_grad_()
            tp, bp = (v.detach().to(dtype).requires_grad_() for v in _params())
            plain_value = formula(xp, yp, tp.exp(), bp)
            plain = [plain_value, *torch.autograd.grad(plain_value, (xp, yp, tp, bp))]
            want = [single.detach(), *ref]
            bound = [error_bound(max_abs_err(p, r), dtype, r) for p, r in zip(plain, want)]
            key = (heads, backend)
            values = torch.stack([r[key][0].double() for r in per_rank])
            assert max_abs_err(values.mean(), single) <= bound[0], f"{key} loss"
            for rank, r in enumerate(per_rank):
                sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
                for i in (1, 2):
                    err = max_abs_err(r[key][i], world * ref[i - 1][..., sl, :])
                    assert err <= world * bound[i], f"{key} rank {rank} {NAMES[i]}: {err:.3g}"
            for i in (3, 4):  # DDP averages the ranks' scale and bias gradients
                mean = torch.stack([r[key][i].double() for r in per_rank]).mean()
                assert max_abs_err(mean, ref[i - 1]) <= bound[i], f"{key} {NAMES[i]}"
    if importlib.util.find_spec("open_clip") is None:
        if os.environ.get("CI"):
            pytest.fail("open_clip is not installed (CI installs open_clip_torch --no-deps)")
        return
    for r in per_rank:
        for impl in ("bidir", "gather"):
            for mine, theirs in zip(r[(None, "torch")], r[("open_clip", impl)], strict=True):
                torch.testing.assert_close(mine, theirs, msg=impl)
