"""Batched augmentation: shapes, determinism, exact no-ops, geometry and colour correctness."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimac.data import AugmentConfig, BatchAugment, normalize, preset, to_float
from mimac.data.augment import DATASET_STATS, _shift_hue

OFF = {"crop_scale": (1.0, 1.0), "hflip": 0.0, "jitter_p": 0.0, "grey_p": 0.0, "blur_p": 0.0}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 16, c: int = 3, h: int = 32, w: int | None = None, seed: int = 0):
    return torch.rand(b, c, h, w or h, generator=gen(seed))


def ramp(b: int, side: int) -> torch.Tensor:
    """Images whose value is the column index / (side - 1): slopes reveal the geometry."""
    x = torch.arange(side, dtype=torch.float32) / (side - 1)
    return x.expand(b, 1, side, side).clone()


@pytest.mark.parametrize("name", ["digits", "mnist", "fashion_mnist", "cifar10", "cifar20",
                                  "stl10", "folder"])
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_shape_range(name, channels):
    x = images(8, channels, 28)
    y = BatchAugment(preset(name))(x, gen(1))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1 and torch.isfinite(y).all()


def test_output_size_and_uint8_input():
    x = (images(4, 3, 24) * 255).to(torch.uint8)
    y = BatchAugment(AugmentConfig(size=16))(x, gen(0))
    assert y.shape == (4, 3, 16, 16) and y.dtype == torch.float32
    y = BatchAugment(AugmentConfig(size=20))(images(4, 1, 24, 30), gen(0))  # non-square input
    assert y.shape == (4, 1, 20, 20)
    assert BatchAugment(AugmentConfig(size=8))(images(0, 3, 16), gen(0)).shape == (0, 3, 8, 8)


def test_same_seed_same_views_different_seeds_differ():
    aug = BatchAugment(AugmentConfig(blur_p=0.5, affine_deg=10, affine_translate=0.1))
    x = images()
    a, b = aug(x, gen(123)), aug(x, gen(123))
    assert torch.equal(a, b)
    assert not torch.allclose(a, aug(x, gen(124)))
    g = gen(5)
    v1, v2 = aug(x, g), aug(x, g)  # the generator advances: two different views
    assert not torch.allclose(v1, v2)


def test_noop_config_is_exact_identity():
    x = images(8, 3, 17)
    assert torch.equal(BatchAugment(AugmentConfig(**OFF))(x, gen(0)), x)
    assert torch.equal(BatchAugment(AugmentConfig(**OFF, size=17))(x, gen(0)), x)
    g = images(8, 1, 9)
    assert torch.equal(BatchAugment(AugmentConfig(**OFF))(g, gen(0)), g)
    # Blur switched on with probability 0 and jitter with zero strength are no-ops too.
    cfg = AugmentConfig(**(OFF | {"jitter": (0, 0, 0, 0), "jitter_p": 1.0}))
    assert torch.equal(BatchAugment(cfg)(x, gen(0)), x)


def test_flip_exact_and_per_sample():
    x = images(64, 3, 8)
    assert torch.equal(BatchAugment(AugmentConfig(**(OFF | {"hflip": 1.0})))(x), x.flip(-1))
    y = BatchAugment(AugmentConfig(**(OFF | {"hflip": 0.5})))(x, gen(3))
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert (flipped | kept).all() and 10 < flipped.sum() < 54


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_full_crop_resize_matches_bilinear_interpolate(flip):
    # The grid path with a whole-image crop is a bilinear resize (border padding: no dark rim).
    x = images(4, 3, 12)
    y = BatchAugment(AugmentConfig(**(OFF | {"hflip": flip, "size": 24})))(x, gen(0))
    ref = F.interpolate(x.flip(-1) if flip else x, size=24, mode="bilinear",
                        align_corners=False)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_crop_scale_sets_zoom(flip):
    # Area 1/4 with ratio 1 is a half-side crop: resized to 16 px from a 32-px ramp, each
    # output pixel advances one input pixel; a flip reverses the slope.
    cfg = AugmentConfig(**(OFF | {"crop_scale": (0.25, 0.25), "crop_ratio": (1.0, 1.0),
                                      "size": 16, "hflip": flip}))
    y = BatchAugment(cfg)(ramp(8, 32), gen(0))
    step = torch.diff(y, dim=-1)
    expect = (-1 if flip else 1) / 31
    torch.testing.assert_close(step, torch.full_like(step, expect), atol=1e-5, rtol=0)
    starts = y[:, 0, 0, 0] if not flip else y[:, 0, 0, -1]
    assert starts.std() > 0  # crop positions differ per sample


def test_affine_zoom_and_translate():
    cfg = AugmentConfig(**(OFF | {"affine_scale": (2.0, 2.0)}))
    y = BatchAugment(cfg)(ramp(4, 32), gen(0))
    step = torch.diff(y, dim=-1)
    torch.testing.assert_close(step, torch.full_like(step, 0.5 / 31), atol=1e-5, rtol=0)
    # A shift with zero padding brings black in from one side on some images.
    cfg = AugmentConfig(**(OFF | {"affine_translate": 0.25, "padding": "zeros"}))
    y = BatchAugment(cfg)(torch.ones(16, 1, 16, 16), gen(0))
    assert (y.flatten(1).min(1).values < 0.5).float().mean() > 0.8
    # A rotation keeps a centred disc's mass (it is rotation invariant).
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    disc = (((yy - 7.5) ** 2 + (xx - 7.5) ** 2) < 25).float().expand(8, 1, 16, 16)
    y = BatchAugment(AugmentConfig(**(OFF | {"affine_deg": 45.0})))(disc, gen(0))
    torch.testing.assert_close(y.sum((1, 2, 3)), disc.sum((1, 2, 3)), rtol=0.03, atol=0)


def test_greyscale_correct_and_skipped_for_one_channel():
    x = images(6, 3, 8)
    y = BatchAugment(AugmentConfig(**(OFF | {"grey_p": 1.0})))(x, gen(0))
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(y[:, c], luma)
    g = images(6, 1, 8)
    assert torch.equal(BatchAugment(AugmentConfig(**(OFF | {"grey_p": 1.0})))(g, gen(0)), g)


def test_jitter_factors_per_sample():
    x = images(32, 3, 8) * 0.5  # no clamping at brightness <= 1.5
    cfg = AugmentConfig(**(OFF | {"jitter": (0.5, 0, 0, 0), "jitter_p": 1.0}))
    y = BatchAugment(cfg)(x, gen(0))
    ratio = (y / x).flatten(1)
    torch.testing.assert_close(ratio.min(1).values, ratio.max(1).values, rtol=1e-4, atol=0)
    assert ratio[:, 0].min() >= 0.5 - 1e-6 and ratio[:, 0].max() <= 1.5 + 1e-6
    assert ratio[:, 0].std() > 0.1
    # Grey images have no hue or saturation to change.
    grey = images(8, 1, 8).expand(8, 3, 8, 8)
    cfg = AugmentConfig(**(OFF | {"jitter": (0, 0, 0.4, 0.1), "jitter_p": 1.0}))
    torch.testing.assert_close(BatchAugment(cfg)(grey, gen(0)), grey, atol=1e-6, rtol=0)
    # jitter_p = 0.5: the untouched half is exactly the input.
    cfg = AugmentConfig(**(OFF | {"jitter_p": 0.5}))
    same = (BatchAugment(cfg)(x, gen(1)) == x).flatten(1).all(1)
    assert 4 < same.sum() < 28


def test_hue_shift_matches_colorsys():
    x = images(3, 3, 4)
    x[0, :, 0, 0] = torch.tensor([0.3, 0.3, 0.3])  # grey pixel
    x[1, :, 1, 1] = torch.tensor([1.0, 1.0, 0.0])  # ties in the max
    shift = torch.tensor([0.25, -0.1, 0.5])
    y = _shift_hue(x, shift)
    for b in range(3):
        for i in range(4):
            for j in range(4):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                ref = colorsys.hsv_to_rgb((h + shift[b].item()) % 1.0, s, v)
                np.testing.assert_allclose(y[b, :, i, j].numpy(), ref, atol=1e-5)


def test_blur():
    cfg = AugmentConfig(**(OFF | {"blur_p": 1.0, "blur_sigma": (1.0, 2.0)}))
    const = torch.full((4, 3, 16, 16), 0.7)
    torch.testing.assert_close(BatchAugment(cfg)(const, gen(0)), const)
    imp = torch.zeros(4, 1, 17, 17)
    imp[:, :, 8, 8] = 1.0
    y = BatchAugment(cfg)(imp, gen(0))
    torch.testing.assert_close(y.sum((1, 2, 3)), torch.ones(4), atol=1e-5, rtol=0)
    assert (y[:, 0, 8, 8] < 0.2).all() and y[:, 0, 8, 8].std() > 0  # per-sample sigma
    assert torch.equal(y, y.flip(-1))  # symmetric kernel
    imps = imp[:1].expand(32, 1, 17, 17)
    half = BatchAugment(AugmentConfig(**(OFF | {"blur_p": 0.5})))(imps, gen(0))
    kept = (half == imp[:1]).flatten(1).all(1)
    assert 4 < kept.sum() < 28


def test_config_validation_and_unknown_preset():
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="hflip"):
        AugmentConfig(hflip=2.0)
    with pytest.raises(ValueError, match="padding"):
        AugmentConfig(padding="wrap")
    with pytest.raises(ValueError, match="choose one of"):
        preset("imagenet")
    with pytest.raises(ValueError, match="B, C, H, W"):
        BatchAugment(AugmentConfig())(torch.rand(3, 8, 8))


def test_to_float_and_normalize():
    u8 = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert torch.equal(to_float(u8), torch.tensor([[[[0.0, 1.0]]]]))
    mean, std = DATASET_STATS["cifar10"]
    x = torch.rand(2, 3, 4, 4)
    y = normalize(x, mean, std)
    torch.testing.assert_close(y[:, 1], (x[:, 1] - mean[1]) / std[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_with_cpu_generator_matches_cpu():
    aug = BatchAugment(preset("stl10"))
    x = images(64, 3, 32)
    cpu = aug(x, gen(7))
    gpu = aug(x.cuda(), gen(7))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-4, rtol=0)
    dev_gen = torch.Generator(device="cuda").manual_seed(7)
    a = aug(x.cuda(), dev_gen)
    assert torch.equal(a, aug(x.cuda(), torch.Generator(device="cuda").manual_seed(7)))
