"""Throughput of the GPU-side augmentation on the CPU (recorded, never asserted).

``pytest benchmarks/test_augment_throughput.py --benchmark-only`` times one batch
of 512 3x32x32 images through the STL-10 preset (every transform on, blur
included) on one torch thread.
"""

from __future__ import annotations

import pytest
import torch

from mimac.data import BatchAugment, preset


@pytest.fixture
def one_thread():
    # One thread: intra-op threads stall on a busy machine and the figure would wander.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_augment_batch_512(benchmark, one_thread) -> None:
    aug = BatchAugment(preset("stl10"))
    x = torch.rand(512, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator()
    aug(x, gen.manual_seed(0))  # warm-up (allocator, kernels)
    out = benchmark.pedantic(lambda: aug(x, gen.manual_seed(1)), rounds=5, iterations=1)
    assert out.shape == x.shape and torch.isfinite(out).all()
    benchmark.extra_info.update(images=512, shape="3x32x32", preset="stl10", threads=1)
