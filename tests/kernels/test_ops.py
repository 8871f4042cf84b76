"""The custom ops: opcheck, and a compiled training step without graph breaks."""

from __future__ import annotations

import pytest
import torch

from mimac_kernels import fused_contrastive_loss, ops
from mimac_kernels.options import CRITICS, NEGATIVES


def _sample(negatives: str, critic: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 11, 7, generator=g, dtype=dtype)
    b = torch.randn(2, 11, 7, generator=g, dtype=dtype)
    if critic == "log_dot":
        a, b = a.softmax(-1), b.softmax(-1)
    return a.requires_grad_(), b.requires_grad_()


@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("critic", CRITICS)
def test_opcheck_forward(negatives, critic):
    a, b = _sample(negatives, critic)
    inv_tau = torch.tensor(2.0, requires_grad=True)
    row_center, col_center = _positives(a, b, negatives)
    options = {"critic": critic, "negatives": negatives, "eps": 1e-12, "backend": "torch"}
    torch.library.opcheck(ops.lse_fwd, (a, b, inv_tau, row_center, col_center), options)


def _positives(a, b, negatives):
    pos = (a.detach() * b.detach()).sum(-1).requires_grad_()
    if negatives == "all":
        return torch.cat([pos, pos], dim=-1), pos[..., :0]
    return pos, pos.detach().clone().requires_grad_()


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_opcheck_backward(negatives):
    a, b = _sample(negatives, "dot")
    inv_tau = torch.tensor(2.0)
    row_center, col_center = (p.detach() for p in _positives(a, b, negatives))
    options = {"critic": "dot", "negatives": negatives, "eps": 1e-12, "backend": "torch"}
    _, _, row, col = ops.lse_fwd(a.detach(), b.detach(), inv_tau, row_center, col_center, **options)
    upstream = [torch.rand_like(row), torch.rand_like(col), row_center, col_center]
    args = (a.detach(), b.detach(), inv_tau, [row, col], upstream)
    torch.library.opcheck(ops.lse_bwd, args, options)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(12, 8)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x1, x2):
        z1, z2 = self.net(x1), self.net(x2)
        feat = fused_contrastive_loss(z1, z2, temperature=0.1, backend="torch")
        clip = fused_contrastive_loss(
            z1, z2, temperature=1.0 / self.log_scale.exp(), critic="dot", negatives="cross",
            backend="torch",
        )
        p1, p2 = z1.softmax(-1), z2.softmax(-1)
        prob = fused_contrastive_loss(p1, p2, temperature=1.0, critic="log_dot")
        return feat + clip + prob


def test_compile_fullgraph_training_step():
    torch.manual_seed(0)
    model = _Tiny()
    x1, x2 = torch.randn(16, 12), torch.randn(16, 12)
    eager_loss = model(x1, x2)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x1, x2)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.slow
def test_compile_inductor_step():
    """The real compiler (inductor) on a full optimizer step."""
    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = torch.compile(lambda a, b: model(a, b), fullgraph=True)
    x1, x2 = torch.randn(16, 12), torch.randn(16, 12)
    before = model.net.weight.detach().clone()
    loss = step(x1, x2)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.net.weight)
