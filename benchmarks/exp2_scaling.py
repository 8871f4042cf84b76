"""Why the Triton kernels scale ``S - shift`` by log2(e) in its own step before ``exp2``.

Folding 1/tau and log2(e) into one constant, ``exp2(fma(s, k, -c))`` with
``k = rn(log2(e) / tau)`` and ``c = rn(log2(e) shift)``, saves one multiply per
score element, but k carries its own rounding, a relative error of the whole
exponent: the forward's lse of a row whose largest term dominates is then up to an
ulp of |S| away from that term's S as the backward rounds it, and the backward's
weight of the dominant term, ``exp(rn(S) - lse)`` (exactly 1 with the kernels' two
steps), drifts with |S|. This emulates both forms in float32 (numpy, float64 products
rounded once, as an FMA) on rows with one dominant term, against that exact 1.

    python -m benchmarks.exp2_scaling
"""

from __future__ import annotations

import numpy as np

LOG2E = np.float32(1.4426950408889634)


def _rn(x) -> np.ndarray:
    """Round to float32 once (float64 holds the exact product of two float32)."""
    return np.asarray(x, dtype=np.float64).astype(np.float32)


def dominant_weight_error(scale: float, rows: int = 20_000, seed: int = 0) -> dict[str, float]:
    """Largest ``|exp(rn(S) - lse) - 1|`` over ``rows`` rows whose one term, S ~ ``scale``,
    lies e^20 above the shift, for the two-step and the folded exponent."""
    rng = np.random.default_rng(seed)
    inv_tau = np.float32(10.0)
    s = _rn(rng.uniform(0.5, 1.0, rows) * scale / float(inv_tau))
    exact = s.astype(np.float64) * float(inv_tau)
    shift = _rn(exact - 20.0)
    two = np.exp2(_rn(_rn(exact - shift) * LOG2E).astype(np.float64))
    k, c = _rn(float(inv_tau) * float(LOG2E)), _rn(shift * float(LOG2E))
    folded = np.exp2(_rn(s.astype(np.float64) * float(k) - c).astype(np.float64))
    out = {}
    for name, e in (("two steps", two), ("folded", folded)):
        lse = _rn(shift + _rn(np.log(e)))
        weight = np.exp(_rn(exact).astype(np.float64) - lse.astype(np.float64))
        out[name] = float(np.abs(weight - 1.0).max())
    return out


def main() -> int:
    print("|S|      two steps   folded (max |weight - 1| of the dominant term)")
    for scale in (1e2, 1e3, 1e4, 6e4):
        r = dominant_weight_error(scale)
        print(f"{scale:<8g} {r['two steps']:.2e}    {r['folded']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
