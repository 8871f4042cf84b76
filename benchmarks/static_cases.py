"""The headline cases of the static cost model (Triton and CUDA estimates alike).

Kept apart from ``static_cost`` so that the CUDA model (``cuda_cost``) imports no
Triton compiler: the cases are plain data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StaticCase:
    """One headline case: pairing, rows of S per side, D, tau and the data's positive cosine.

    ``rect``: the rectangular problem: one rank of the losses across ranks, ``rows``
    local rows of ``Z = [a; b]`` against ``cols`` gathered columns, its self-pairs at
    ``col == row + offset``; SupCon (rows = columns, offset 0); or the queue's rows
    against unrelated bank rows, nothing masked (``offset=None``).
    """

    name: str
    pairing: str
    rows: int  # M for ``all`` (2N rows of Z), N for ``cross``, local rows for ``rect``
    d: int
    tau: float
    positive_cos: float = 0.3
    dtype: str = "bf16"
    cols: int = 0  # rect: gathered columns
    offset: int | None = 0  # rect: where this rank's own columns start; None: no mask
    columns_grad: bool = True  # rect: False where the columns are a detached queue
    labels: bool = False  # rect: pairs of one label masked (PML's NTXent with labels)

    @property
    def n(self) -> int:
        return self.rows // 2 if self.pairing == "all" else self.rows


CASES = (
    StaticCase("NT-Xent M=65,536 D=128", "all", 65536, 128, 0.1),
    StaticCase("NT-Xent M=65,536 D=512", "all", 65536, 512, 0.1),
    StaticCase("CLIP N=65,536 D=128", "cross", 65536, 128, 0.1),
    StaticCase("CLIP N=65,536 D=128, tau=0.01, positives ~0.3 cos", "cross", 65536, 128, 0.01),
    # NT-Xent over 8 ranks of 4,096 pairs: the launches of one rank (the last, whose
    # own columns close the gathered [a_0; b_0; ...; a_7; b_7]).
    StaticCase("8 ranks: 8,192 local rows x 65,536 gathered columns D=128", "rect", 8192, 128,
               0.1, cols=65536, offset=7 * 8192),
    # SupCon (supervised_contrastive_loss): every row against every row but itself, the
    # rectangular kernels at offset 0 (no symmetry shared: dX and dY each recompute S).
    StaticCase("SupCon M=65,536 D=128 (rows = columns, self-masked)", "rect", 65536, 128,
               0.1, cols=65536, offset=0),
    # Queue negatives (fused_contrastive_loss(q, k, queue=)): the queries against the
    # bank, nothing masked; the bank is detached: no launch forms its gradient.
    StaticCase("Queue 65,536 queries x K=65,536 D=128 (nothing masked)", "rect", 65536, 128,
               0.1, cols=65536, offset=None, columns_grad=False),
    # PML's NTXent with labels: its negatives' log-sum-exp, every row against every row
    # with the pairs of one label masked in every tile (the positives' per-pair terms
    # run in torch over label-sorted blocks: not modelled). The cuda backend refuses it.
    StaticCase("NTXent with labels M=65,536 D=128 (label-masked negatives)", "rect", 65536,
               128, 0.07, cols=65536, offset=None, labels=True),
)


def synthetic_views(n: int, d: int, positive_cos: float, seed: int = 0) -> tuple:
    """Unit rows ``a``, ``b`` (float32 ``(n, d)``) with ``a_i . b_i`` near ``positive_cos``
    and unrelated pairs near 0 (random directions)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    noise = torch.randn(n, d, generator=g)
    noise = torch.nn.functional.normalize(noise - (noise * a).sum(1, keepdim=True) * a, dim=1)
    b = positive_cos * a + math.sqrt(1 - positive_cos**2) * noise
    return a, b


def resweep_fraction(case: StaticCase, block_m: int, shift_of: Callable, window: tuple,
                     sample_blocks: int = 4, seed: int = 0) -> dict:  # fmt: skip
    """Estimated share of row blocks a one-pass forward re-sweeps, on synthetic data.

    The one-pass rule of both backends: shift = ``shift_of`` (the runtime's level below
    the bound) of (1/tau) max|x| max|y| (the Cauchy-Schwarz bound of S); a row needs the
    running-max sweep when its shifted float32 exp-sum leaves ``window`` = (low, high),
    and its whole row block of ``block_m`` rows is then redone. ``sample_blocks`` blocks
    of consecutive rows are evaluated against every column of the case's full size. For
    ``cross`` the column statistics (the second side) use the same data transposed.
    Returns ``{side: {"rows": share, "blocks": share, "sampled_rows": n}}``.
    """
    pairs = case.cols // 2 if case.pairing == "rect" else case.n
    a, b = synthetic_views(pairs, case.d, case.positive_cos, seed)
    inv_tau = 1.0 / case.tau
    low, high = window
    out = {}
    sides = {"rows": (a, b)} if case.pairing != "cross" else {"rows": (a, b), "cols": (b, a)}
    for side, (x, y) in sides.items():
        if case.pairing == "all":
            x = y = torch.cat([a, b])
        elif case.pairing == "rect" and case.offset is None:
            # Queries against a bank of unrelated rows (MoCo's queue): nothing masked.
            y = torch.cat([a, b])
            x = synthetic_views(case.rows, case.d, case.positive_cos, seed + 2)[0]
        elif case.pairing == "rect":
            # The columns in any order (the sums do not see it); the local rows are
            # columns [offset, offset + rows) of them, with their positives among them.
            y = torch.cat([a, b])
            x = y[case.offset : case.offset + case.rows]
        shift = shift_of(inv_tau * x.norm(dim=1).max() * y.norm(dim=1).max())
        g = torch.Generator().manual_seed(seed + 1)
        n_blocks = -(-x.shape[0] // block_m)
        picks = torch.randperm(n_blocks, generator=g)[:sample_blocks].tolist()
        need_rows, need_blocks, seen = 0, 0, 0
        for blk in picks:
            rows = torch.arange(blk * block_m, min((blk + 1) * block_m, x.shape[0]))
            s = (x[rows] @ y.T) * inv_tau - shift
            if case.pairing == "all" or (case.pairing == "rect" and case.offset is not None):
                # the self-pair is masked
                s[torch.arange(len(rows)), rows + (case.offset or 0)] = -math.inf
            sums = torch.exp(s).sum(dim=1)
            need = (sums < low) | (sums > high)
            need_rows += int(need.sum())
            need_blocks += int(need.any())
            seen += len(rows)
        out[side] = {"rows": need_rows / seen, "blocks": need_blocks / len(picks),
                     "sampled_rows": seen}  # fmt: skip
    return out


def resweep_lines(results: list[dict], launch: str) -> list[str]:
    """Markdown lines of the estimated re-sweep shares of ``results`` (each with a
    ``resweep_fraction_estimated`` from :func:`resweep_fraction`, or None where nothing
    re-sweeps); ``launch`` names the launch that re-sweeps."""
    found = [r for r in results if r.get("resweep_fraction_estimated")]
    if not found:
        return []
    lines = [
        "",
        f"Re-sweep of out-of-window row blocks ({launch}), *estimated* on synthetic",
        "data (unit rows, positives at the stated cosine; sampled row blocks of the",
        "full-size problem, the launcher's shift rule and the kernel's threshold):",
        "",
    ]
    for r in found:
        lines.append(f"- {r['case']['name']} (tau = {r['case']['tau']:g}): " + "; ".join(
            f"{side}: {100 * v['rows']:.0f} % of {v['sampled_rows']} sampled rows, "
            f"{100 * v['blocks']:.0f} % of their blocks"
            for side, v in r["resweep_fraction_estimated"].items()))  # fmt: skip
    return lines
