"""Memory is measured, not assumed: peak RSS of fwd+bwd in fresh processes."""

from __future__ import annotations

import pytest

from mimac_kernels.demo import loss_memory_code, peak_rss_mb

N, D = 8192, 128  # M = 2N = 16,384 rows


@pytest.mark.parametrize("backend", ["torch"])
def test_fused_peak_under_ten_percent_of_plain(backend):
    base = peak_rss_mb(loss_memory_code(N, D, "inputs"))
    plain = peak_rss_mb(loss_memory_code(N, D, "plain")) - base
    fused = peak_rss_mb(loss_memory_code(N, D, backend)) - base
    print(f"M={2 * N} D={D}: plain {plain:.0f} MiB, {backend} {fused:.0f} MiB above inputs")
    assert plain > 1000, "the plain loss must hold at least one M x M float32 matrix"
    assert fused < 0.10 * plain
