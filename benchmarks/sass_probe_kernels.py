"""Small ``@triton.jit`` kernels whose SASS counts are known by construction.

The static cost model's tests compile these for sm_90 (and sm_80) and check
that its counts per loop iteration are exactly what the source says: ``K_EXP``
``exp2`` per element of a ``BLOCK`` vector, one ``tl.dot`` of a known shape,
one atomic add of ``BLOCK`` floats. Never launched.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def exp2_loop_kernel(X, OUT, n, K_EXP: tl.constexpr, BLOCK: tl.constexpr):
    """``OUT = sum over blocks of sum_j exp2(x + j)``, j < K_EXP: K_EXP exp2 per element."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        x = tl.load(X + start + offs)
        for j in tl.static_range(K_EXP):
            acc += tl.exp2(x + j)  # distinct arguments: no common subexpression
    tl.store(OUT + offs, acc)


@triton.jit
def dot_loop_kernel(A, B, OUT, k, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``OUT = A @ B`` for one (BM, BN) tile, walking k in BK steps: one dot per iteration."""
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, k, BK):
        a = tl.load(A + rm[:, None] * k + (k0 + rk)[None, :])
        b = tl.load(B + (k0 + rk)[:, None] * BN + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(OUT + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def atomic_loop_kernel(X, SUM, n, BLOCK: tl.constexpr):
    """``SUM[j] += X[i * BLOCK + j]`` for every block i: one atomic add of BLOCK floats each."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        x = tl.load(X + start + offs)
        tl.atomic_add(SUM + offs, x, sem="relaxed")
