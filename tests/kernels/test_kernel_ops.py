"""The compiled kernels as torch operators: their registration, and ``torch.library.opcheck``.

``csrc/cpu/contrastive.cpp`` registers ``torch.ops.mimac_cpu`` (CPU key);
``csrc/cuda/binding.cpp`` registers ``torch.ops.mimac_cuda`` (CUDA key) in the GPU
build and ``torch.ops.mimac_cuda_emu`` (CPU key) in the CPU emulation's build. opcheck
checks each kernel op's schema (no input mutated, no output aliasing an input), its
autograd registration (none of them is differentiable: a fallthrough), its fake
implementation (``mimac_kernels.extension_fakes``) against the real outputs, and its
tracing under AOT dispatch with dynamic shapes. The Python ops of ``mimac_kernels.ops``
have their own opcheck tests in ``test_ops.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from mimac_kernels import cuda_backend, extension, extension_fakes

#: Namespace -> (dispatch key of its kernels, device type of its tensors).
NAMESPACES = {
    "mimac_cpu": ("CPU", "cpu"),
    "mimac_cuda_emu": ("CPU", "cpu"),
    "mimac_cuda": ("CUDA", "cuda"),
}


def _needs_compiler() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the extensions cannot be built")


@pytest.fixture(
    scope="module",
    params=[
        "mimac_cpu",
        pytest.param("mimac_cuda_emu", marks=pytest.mark.emulated),
        pytest.param("mimac_cuda", marks=pytest.mark.gpu),
    ],
)
def namespace(request) -> str:
    """A loaded ops namespace of the compiled kernels (a failed build fails, never skips)."""
    name = request.param
    if name == "mimac_cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: the cuda build registers its ops only on a GPU machine")
        why = cuda_backend.probe(torch.device("cuda"), torch.float32)
        assert why is None, why
    elif name == "mimac_cuda_emu":
        _needs_compiler()
        from tests.kernels.emulation import cuda_emulation

        cuda_emulation()
    else:
        _needs_compiler()
        why = extension.unavailable_reason("cpu")
        assert why is None, why
    return name


def _device(namespace: str) -> torch.device:
    return torch.device(NAMESPACES[namespace][1])


def _inputs(namespace: str, shape, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=_device(namespace), dtype=dtype)


def _grad(t: torch.Tensor) -> torch.Tensor:
    # opcheck's autograd-registration test needs an input that requires grad.
    return t.detach().clone().requires_grad_()


def _ops(namespace: str):
    return getattr(torch.ops, namespace)


# --- registration -----------------------------------------------------------------------


def test_kernels_are_registered_for_their_dispatch_key(namespace):
    key, _ = NAMESPACES[namespace]
    for name in extension_fakes.KERNEL_OPS:
        qualname = f"{namespace}::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), qualname
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"), qualname
        other = "CUDA" if key == "CPU" else "CPU"
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, other), qualname


def test_cpu_and_cuda_kernels_share_their_schemas(namespace):
    """One contract: the same schemas under every namespace (``extension_backend`` calls them
    all alike), checked against ``mimac_cpu``'s."""
    _needs_compiler()
    extension.load("cpu")
    for name in extension_fakes.KERNEL_OPS:
        mine = str(getattr(_ops(namespace), name).default._schema)
        cpu = str(getattr(torch.ops.mimac_cpu, name).default._schema)
        assert mine.replace(namespace + "::", "") == cpu.replace("mimac_cpu::", ""), name


def test_load_returns_the_ops_namespace():
    """The extensions are operator libraries now, not pybind modules."""
    _needs_compiler()
    ops = extension.load("cpu")
    assert ops is torch.ops.mimac_cpu
    assert isinstance(ops, torch._ops._OpNamespace)
    assert ops.isa() in ops.available_isas()
    assert ops.block() == 64
    assert isinstance(ops.group(1024, 128), int)


# --- opcheck ----------------------------------------------------------------------------


@pytest.mark.parametrize("all_pairs", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_forward(namespace, all_pairs, dtype):
    a, b = _inputs(namespace, (2, 11, 7), dtype, 1), _inputs(namespace, (2, 11, 7), dtype, 2)
    it = torch.tensor(2.0, device=a.device)
    op = _ops(namespace).forward.default
    torch.library.opcheck(op, (_grad(a), _grad(b), it, 1, all_pairs, 1e-12))


@pytest.mark.parametrize("all_pairs", [True, False])
def test_opcheck_backward(namespace, all_pairs):
    a, b = _inputs(namespace, (2, 11, 7), seed=3), _inputs(namespace, (2, 11, 7), seed=4)
    it = torch.tensor(2.0, device=a.device)
    ops = _ops(namespace)
    row, col = ops.forward(a, b, it, 0, all_pairs, 1e-12)
    upstream = [torch.rand_like(row), torch.rand_like(col), torch.randn_like(row),
                torch.randn_like(col)]  # fmt: skip
    args = (_grad(a), _grad(b), it, 0, all_pairs, 1e-12, row, col, *upstream)
    torch.library.opcheck(ops.backward.default, args)


@pytest.mark.parametrize("offset", [None, 3])
def test_opcheck_rect(namespace, offset):
    x, y = _inputs(namespace, (2, 5, 7), seed=5), _inputs(namespace, (2, 13, 7), seed=6)
    it = torch.tensor(2.0, device=x.device)
    ops = _ops(namespace)
    torch.library.opcheck(ops.rect_forward.default, (_grad(x), _grad(y), it, 0, offset, 1e-12))
    lse = ops.rect_forward(x, y, it, 0, offset, 1e-12)
    args = (_grad(x), _grad(y), it, 0, offset, 1e-12, lse, torch.rand_like(lse),
            torch.randn_like(lse))  # fmt: skip
    torch.library.opcheck(ops.rect_backward.default, args)


@pytest.mark.parametrize("offset", [None, 3])
def test_opcheck_rect_with_labels(namespace, offset):
    """The labelled rectangular ops (int32 class ids): the cpu kernels mask pairs of one
    id; the cuda ones take the same schema and refuse labels by name."""
    x, y = _inputs(namespace, (2, 5, 7), seed=5), _inputs(namespace, (2, 13, 7), seed=6)
    it = torch.tensor(2.0, device=x.device)
    ops = _ops(namespace)
    labels = {"row_labels": torch.tensor([0, 1, 2, 0, 1], dtype=torch.int32, device=x.device),
              "col_labels": torch.arange(13, dtype=torch.int32, device=x.device) % 4}
    if namespace != "mimac_cpu":
        with pytest.raises(RuntimeError, match="no label mask"):
            ops.rect_forward(x, y, it, 0, offset, 1e-12, **labels)
        return
    fwd = (_grad(x), _grad(y), it, 0, offset, 1e-12, labels["row_labels"], labels["col_labels"])
    torch.library.opcheck(ops.rect_forward.default, fwd)
    lse = ops.rect_forward(x, y, it, 0, offset, 1e-12, **labels)
    assert not torch.allclose(lse, ops.rect_forward(x, y, it, 0, offset, 1e-12))
    args = (_grad(x), _grad(y), it, 0, offset, 1e-12, lse, torch.rand_like(lse),
            torch.randn_like(lse), True, labels["row_labels"], labels["col_labels"])
    torch.library.opcheck(ops.rect_backward.default, args)


# --- what the registrations promise ------------------------------------------------------


def test_outputs_are_not_differentiable(namespace):
    """Inputs that require grad: the outputs are plain tensors (the Autograd fallthrough),
    with no warning, rather than a graph node that warns once a backward reaches it."""
    a = _grad(_inputs(namespace, (1, 9, 4)))
    it = torch.tensor(2.0, device=a.device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row, col = _ops(namespace).forward(a, a, it, 0, False, 1e-12)
    assert row.grad_fn is None and not row.requires_grad and not col.requires_grad


def test_meta_tensors_give_shapes(namespace):
    """The fakes serve meta tensors (shapes of ``extension_fakes``), and refuse a mix."""
    ops = _ops(namespace)
    a = torch.empty(3, 10, 5, device="meta")
    x = torch.empty(3, 4, 5, device="meta")
    it = torch.empty((), device="meta")
    assert [t.shape for t in ops.forward(a, a, it, 0, True, 0.0)] == [(3, 20), (3, 0)]
    assert [t.shape for t in ops.forward(a, a, it, 0, False, 0.0)] == [(3, 10), (3, 10)]
    s = torch.empty(3, 10, device="meta")
    shapes = [t.shape for t in ops.backward(a, a, it, 0, False, 0.0, s, s, s, s, s, s)]
    assert shapes == [(3, 10, 5), (3, 10, 5), ()]
    assert ops.rect_forward(x, a, it, 0, 1, 0.0).shape == (3, 4)
    r = torch.empty(3, 4, device="meta")
    shapes = [t.shape for t in ops.rect_backward(x, a, it, 0, None, 0.0, r, r, r)]
    assert shapes == [(3, 4, 5), (3, 10, 5), ()]
    real = _inputs(namespace, (1, 9, 4))
    with pytest.raises(RuntimeError, match="takes tensors on one device.*inv_tau on meta"):
        ops.forward(real, real, it, 0, True, 0.0)


def test_prebuilt_library_loads_without_building(tmp_path):
    """``MIMAC_KERNELS_NO_BUILD=1`` loads the cached operator library (no Python module to
    import) in a fresh process: the ops and their fakes are there."""
    _needs_compiler()
    assert extension.unavailable_reason("cpu") is None  # built (or found) in the cache
    code = (
        "import torch\n"
        "from mimac_kernels import extension\n"
        "ops = extension.load('cpu')\n"
        "a = torch.randn(1, 9, 4)\n"
        "row, col = ops.forward(a, a, torch.tensor(2.0), 0, True, 0.0)\n"
        "meta = ops.forward(a.to('meta'), a.to('meta'), torch.empty((), device='meta'), 0,"
        " True, 0.0)\n"
        "print('OK', tuple(row.shape), tuple(meta[0].shape))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, extension.ENV_NO_BUILD: "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK (1, 18) (1, 18)" in proc.stdout


def test_calls_from_two_threads_match_one_at_a_time(namespace):
    """The dispatcher releases the GIL around a call, so two Python threads may call at
    once; the results must be those of one call at a time (the emulation, whose launch
    state is global, serialises its calls)."""
    ops = _ops(namespace)
    inputs = [_inputs(namespace, (1, 70, 24), seed=s) for s in range(4)]
    it = torch.tensor(2.0, device=inputs[0].device)
    expected = [ops.forward(x, x.flip(1), it, 0, False, 1e-12) for x in inputs]
    results: dict[int, tuple] = {}

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = ops.forward(inputs[i], inputs[i].flip(1), it, 0, False, 1e-12)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(expected):
        for got, ref in zip(results[i], want):
            assert torch.equal(got, ref), i


def test_compiles_without_graph_breaks(namespace):
    """The dispatcher sees the kernels: ``torch.compile(fullgraph=True)`` traces a call
    (through the fake implementation) and runs it, with the eager results."""
    ops = _ops(namespace)
    a = _inputs(namespace, (2, 9, 6), seed=7)
    it = torch.tensor(2.0, device=a.device)

    def step(x: torch.Tensor) -> torch.Tensor:
        row, col = ops.forward(x, x.flip(1), it, 0, False, 1e-12)
        return row.sum() + col.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(a), step(a), rtol=0, atol=0)
