"""The rectangular problem of ``contract.RectProblem`` (rows against the columns of every
rank, the self-pair at ``col == row + offset`` left out) on every backend that runs here,
against the float64 formula, under the kernel-level rule of ``tests.kernels.accuracy``."""

from __future__ import annotations

import pytest
import torch

from mimac_kernels import dispatch, torch_backend
from mimac_kernels.contract import RectProblem
from mimac_kernels.options import CRITICS, KERNEL_DTYPES
from tests.kernels.accuracy import TAU, make_views, rect_formula, rect_level_errors, weight_eps

#: (H, R, C, D, offset): a few pairs (D = 1: S at its Cauchy-Schwarz bound); odd shapes with and without an offset; offsets that
#: put the skipped pairs at the last rank's columns, partly past the columns, and before
#: them (negative); more rows than columns; several row and column blocks; D over one
#: staging chunk.
RECT_SHAPES = [
    (1, 2, 3, 1, None),
    (1, 1, 3, 2, 1),
    (2, 7, 19, 5, None),
    (2, 7, 19, 5, 3),
    (3, 40, 120, 16, 80),
    (1, 20, 30, 8, 25),
    (2, 45, 30, 6, -20),
    (1, 150, 70, 33, 10),
    (2, 70, 260, 72, 130),
]


def _case(shape, critic, dtype, device, seed=3):
    h, r, c, d, offset = shape
    x, _ = make_views((h, r, d), critic, seed=seed, device=device)
    y, _ = make_views((h, c, d), critic, seed=seed + 1, device=device)
    if critic == "cosine":
        x, y = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    gen = torch.Generator().manual_seed(seed + 2)
    g = (torch.rand(h, r, generator=gen) / r).to(device)
    center = torch.randn(h, r, generator=gen).to(device)
    inv_tau = torch.tensor(1.0 / TAU[critic], device=device)
    return RectProblem(x.to(dtype), y.to(dtype), inv_tau, critic, 1e-12, offset), g, center


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("critic", CRITICS)
@pytest.mark.parametrize("shape", RECT_SHAPES, ids=str)
def test_rect_matches_float64(runner, shape, critic, dtype):
    problem, g, center = _case(shape, critic, dtype, runner.device)
    assert dispatch.refusal(runner.name, problem) is None
    errors = rect_level_errors(runner.impl, problem, g, center, weight_eps(runner.name, dtype))
    assert errors == []


#: (H, R, C, D, offset) of the labelled problem: odd shapes, several row and column
#: blocks, an offset and none.
LABELLED_SHAPES = [(1, 5, 9, 3, 0), (2, 17, 17, 5, 0), (2, 33, 70, 7, 20), (1, 40, 66, 6, None)]


def _labelled(shape, critic, dtype, device, seed=5):
    """A labelled problem: 3 classes, the rows' own columns of their label (as the gathered
    batch has them), every row with a negative."""
    problem, g, center = _case(shape, critic, dtype, device, seed)
    r, c, offset = shape[1], shape[2], shape[4]
    gen = torch.Generator().manual_seed(seed + 7)
    rl, cl = torch.randint(0, 3, (r,), generator=gen), torch.randint(0, 3, (c,), generator=gen)
    if offset is not None:
        cl[offset : offset + r] = rl[: c - offset]
    cl[0], cl[1] = 100, 101  # labels of no row: every row has a negative
    p = RectProblem(problem.x, problem.y, problem.inv_tau, critic, 1e-12, offset,
                    row_labels=rl.to(device) * 1000 - 5, col_labels=cl.to(device) * 1000 - 5)
    return p, g, center


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("critic", ["cosine", "dot"])
@pytest.mark.parametrize("shape", LABELLED_SHAPES, ids=str)
def test_labelled_rect_matches_float64(runner, shape, critic, dtype):
    """Pairs of one label left out like the self-pair (PML's NTXent negatives) on the
    backends with the label mask; cuda refuses by name."""
    problem, g, center = _labelled(shape, critic, dtype, runner.device)
    if runner.name == "cuda":
        assert "label mask" in runner.impl.refusal(problem)
        return
    assert dispatch.refusal(runner.name, problem) is None
    errors = rect_level_errors(runner.impl, problem, g, center, weight_eps(runner.name, dtype))
    assert errors == []


def test_labelled_rect_differs_from_unlabelled():
    """The label mask changes the sums (a test of it can fail)."""
    problem, _, _ = _labelled((2, 17, 17, 5, 0), "cosine", torch.float64, "cpu")
    plain = RectProblem(problem.x, problem.y, problem.inv_tau, "cosine", 1e-12, 0)
    assert not torch.allclose(torch_backend.rect_forward(plain),
                              torch_backend.rect_forward(problem))  # fmt: skip


def test_labelled_rect_problem_checks_its_labels():
    x, y, it = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.tensor(2.0)
    with pytest.raises(ValueError, match="together"):
        RectProblem(x, y, it, "dot", 1e-12, row_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="col_labels must be an integer"):
        RectProblem(x, y, it, "dot", 1e-12, row_labels=torch.zeros(3, dtype=torch.long),
                    col_labels=torch.zeros(5))
    with pytest.raises(ValueError, match=r"row_labels must have shape \(3,\)"):
        RectProblem(x, y, it, "dot", 1e-12, row_labels=torch.zeros(5, dtype=torch.long),
                    col_labels=torch.zeros(5, dtype=torch.long))


def test_rect_offset_outside_the_columns_skips_nothing():
    """An offset whose pairs all lie past the columns is the problem without an offset."""
    problem, _, _ = _case((2, 6, 9, 4, None), "cosine", torch.float64, "cpu")
    far = RectProblem(problem.x, problem.y, problem.inv_tau, "cosine", 1e-12, 9)
    assert torch.equal(torch_backend.rect_forward(far), torch_backend.rect_forward(problem))


def test_rect_problem_checks_its_inputs():
    x, y, it = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.tensor(2.0)
    with pytest.raises(ValueError, match=r"\(H, R, D\) and \(H, C, D\)"):
        RectProblem(x, torch.randn(1, 5, 4), it, "dot", 1e-12)
    with pytest.raises(TypeError, match="one dtype"):
        RectProblem(x, y.double(), it, "dot", 1e-12)
    with pytest.raises(TypeError, match="offset must be an int"):
        RectProblem(x, y, it, "dot", 1e-12, torch.tensor(1))
    with pytest.raises(ValueError, match="critic"):
        RectProblem(x, y, it, "cos", 1e-12)


class _SquareOnly:
    """A backend implementation without the rectangular functions."""

    probe = staticmethod(torch_backend.probe)
    refusal = staticmethod(torch_backend.refusal)
    forward = staticmethod(torch_backend.forward)
    backward = staticmethod(torch_backend.backward)


def test_implementation_without_rect_functions_is_refused():
    """Through the refusal path: an explicit request raises with the reason, ``auto`` moves on."""
    problem, _, _ = _case((1, 4, 8, 3, 2), "dot", torch.float32, "cpu")
    with dispatch.override_backend("cpu", _SquareOnly()):
        assert "no rectangular" in dispatch.refusal("cpu", problem)
        with pytest.raises(dispatch.BackendUnavailable, match="no rectangular"):
            dispatch.resolve("cpu", problem)
        assert dispatch.resolve("auto", problem) == "torch"


@pytest.mark.parametrize("critic", CRITICS)
def test_rect_nan_propagates(runner, critic):
    """A NaN in one row of x and one row of y gives NaN exactly where float64 PyTorch does
    (that row's lse, and every row through the NaN column), and NaN gradients."""
    problem, g, center = _case((1, 20, 30, 8, 5), critic, torch.float32, runner.device)
    x, y = problem.x.clone(), problem.y.clone()
    x[0, 3, 2] = float("nan")
    y[0, 11, 1] = float("nan")
    problem = RectProblem(x, y, problem.inv_tau, critic, problem.eps, 5)
    got = runner.impl.rect_forward(problem)
    ref = rect_formula(x.double(), y.double(), problem.inv_tau, critic, problem.eps, 5, g,
                       center)[0]  # fmt: skip
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), (got, ref)
    grads = runner.impl.rect_backward(problem, ref.float(), g, center)
    assert torch.isnan(grads.x).any() and torch.isnan(grads.y).any()


@pytest.mark.parametrize("offset", [None, 3])
def test_rect_backward_without_the_columns_gradient(runner, offset):
    """``columns_grad=False`` (a detached queue) leaves the row gradient and the
    temperature sum exactly as they are with it; the columns' gradient is zeros (every
    backend skips its product)."""
    problem, g, center = _case((2, 7, 19, 5, offset), "dot", torch.float32, runner.device)
    lse = runner.impl.rect_forward(problem)
    full = runner.impl.rect_backward(problem, lse, g, center)
    fields = {k: getattr(problem, k) for k in ("x", "y", "inv_tau", "critic", "eps", "offset")}
    rows_only = runner.impl.rect_backward(RectProblem(**fields, columns_grad=False), lse, g,
                                          center)  # fmt: skip
    assert torch.equal(rows_only.x, full.x) and torch.equal(rows_only.inv_tau, full.inv_tau)
    assert rows_only.y.shape == full.y.shape and bool(full.y.abs().sum() > 0)
    assert torch.equal(rows_only.y, torch.zeros_like(full.y))
