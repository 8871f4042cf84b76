"""Whether a case's data keep the CUDA backward in its one-exponential form.

The backward (``csrc/cuda/contrastive_kernels.cu``) takes one exponential per element
on a tile when every row and column log-sum-exp of the tile lies within
``exp_window`` of the CTA's shift (the largest lse of its ``BM`` rows) and the factors
``g e^(shift - lse)`` stay below ``exp_factor_max``; other tiles take two. This runs
that test on the synthetic data of ``static_cost`` (unit rows, positives at the case's
cosine) at the case's full size, on sampled row and column blocks, with the mean loss's
``g = 1 / rows``.
"""

from __future__ import annotations

import math

import torch

from benchmarks.static_cases import StaticCase, synthetic_views


def _lse(x: torch.Tensor, y: torch.Tensor, inv_tau: float, idx: torch.Tensor,
         self_offset: int | None) -> torch.Tensor:  # fmt: skip
    """Log-sum-exps of rows ``idx`` of ``x`` against every row of ``y`` (float64), the
    pair ``(i, i + self_offset)`` left out when ``self_offset`` is given."""
    s = (x[idx].double() @ y.double().T) * inv_tau
    if self_offset is not None:
        s[torch.arange(len(idx)), idx + self_offset] = -math.inf
    return torch.logsumexp(s, dim=1)


def _side_ok(lse: torch.Tensor, shift: float, g: float, consts: dict) -> bool:
    factor = g * torch.exp(shift - lse)
    return bool(((lse - shift).abs() <= consts["exp_window"]).all()
                and (factor.abs() < consts["exp_factor_max"]).all())  # fmt: skip


def one_exp_share(case: StaticCase, consts: dict, sample_blocks: int = 4, seed: int = 0) -> float:
    """Share of sampled tiles (row block x column block, of every backward pass) that
    take one exponential; 0 for the rectangular problem (one side weighted: one
    exponential per element anyway, in the two-exponential loop) and float32 inputs.
    ``consts``: ``cuda_compile.kernel_constants()``."""
    if case.pairing not in ("all", "cross") or case.dtype == "fp32":
        return 0.0
    a, b = synthetic_views(case.n, case.d, case.positive_cos, seed)
    inv_tau, bm = 1.0 / case.tau, consts["BM"]
    if case.pairing == "all":
        z = torch.cat([a, b])
        passes = [(z, z, 0)]  # rows and columns Z, the self-pair masked
    else:
        passes = [(a, b, None), (b, a, None)]  # rows a vs columns b, then the reverse
    gen = torch.Generator().manual_seed(seed + 1)
    ok = seen = 0
    for x, y, offset in passes:
        g = 1.0 / x.shape[0]
        blocks = math.ceil(x.shape[0] / bm)
        rows = torch.randperm(blocks, generator=gen)[:sample_blocks].tolist()
        cols = torch.randperm(math.ceil(y.shape[0] / bm), generator=gen)[:sample_blocks].tolist()
        col_lse = {}
        for cb in cols:
            idx = torch.arange(cb * bm, min((cb + 1) * bm, y.shape[0]))
            # a column's statistic: its lse as a row of the transposed problem
            col_lse[cb] = _lse(y, x, inv_tau, idx, None if offset is None else -offset)
        for rb in rows:
            idx = torch.arange(rb * bm, min((rb + 1) * bm, x.shape[0]))
            lse = _lse(x, y, inv_tau, idx, offset)
            shift = float(lse.max())
            rows_ok = _side_ok(lse, shift, g, consts)
            for cb in cols:
                ok += rows_ok and _side_ok(col_lse[cb], shift, g, consts)
                seen += 1
    return ok / seen
