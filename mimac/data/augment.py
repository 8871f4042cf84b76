"""Batched, seeded image augmentation on any device, without torchvision.

The whole batch is transformed with a handful of tensor ops: crop + resize + flip + affine are
one ``affine_grid``/``grid_sample`` call with a per-sample matrix, colour jitter and greyscale
are per-sample factors broadcast over the batch, Gaussian blur is one grouped (depthwise)
convolution with a per-sample kernel. There is no Python loop over images.

Order (as in SimCLR/CRLC's torchvision pipeline): random resized crop, horizontal flip, small
affine, colour jitter (with probability ``jitter_p``; brightness, contrast, saturation, hue in
that fixed order, where torchvision shuffles the order per image), greyscale, blur.

Randomness: every call draws one ``(B, N_DRAWS)`` block of uniforms from ``generator`` (on the
generator's device, then moved to the images' device), whatever the config, so the same seed
gives the same views on any device and the columns never shift when an option is switched off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DATASET_STATS", "AugmentConfig", "BatchAugment", "normalize", "preset", "to_float"]

# Columns of the uniform block drawn per call.
_CROP_TRIES = 10  # torchvision's RandomResizedCrop also makes 10 attempts, then falls back
_C_SCALE = 0
_C_RATIO = _C_SCALE + _CROP_TRIES
_C_POS = _C_RATIO + _CROP_TRIES  # 2 columns: x, y
_C_FLIP = _C_POS + 2
_C_AFFINE = _C_FLIP + 1  # 4 columns: angle, tx, ty, scale
_C_JITTER = _C_AFFINE + 4  # 5 columns: apply, brightness, contrast, saturation, hue
_C_GREY = _C_JITTER + 5
_C_BLUR = _C_GREY + 1  # 2 columns: apply, sigma
N_DRAWS = _C_BLUR + 2

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL/torchvision greyscale

# Per-channel (mean, std) of the training images in [0, 1], for optional normalisation.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.305,), (0.376,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar20": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``(..., C, H, W)`` in 0..255 -> float32 in [0, 1] (floats pass through)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or floating images, got {images.dtype}")
    return images


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` for ``x`` of shape ``(B, C, H, W)``.

    ``mean``/``std`` of length 1 broadcast over channels; see :data:`DATASET_STATS`.
    """
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass
class AugmentConfig:
    """Parameters of :class:`BatchAugment` (torchvision's meanings where they overlap).

    Attributes:
        size: output side; ``None`` keeps the input's ``(H, W)``.
        crop_scale: range of the crop's area as a fraction of the image (RandomResizedCrop).
        crop_ratio: range of the crop's aspect ratio w/h (sampled log-uniformly).
        hflip: probability of a horizontal flip.
        jitter: brightness, contrast, saturation, hue strengths (ColorJitter); factors are
            drawn from ``[max(0, 1 - s), 1 + s]``, the hue shift from ``[-h, h]`` (h <= 0.5).
        jitter_p: probability that an image gets colour jitter.
        grey_p: probability of greyscale (colour images only).
        blur_p: probability of Gaussian blur.
        blur_sigma: range of the blur's sigma in pixels; the kernel spans 3 sigma_max.
        affine_deg: rotation drawn from ``[-deg, deg]``.
        affine_translate: shift drawn from ``[-t, t]`` times the side, per axis.
        affine_scale: zoom factor range.
        padding: ``grid_sample`` padding for points outside the image: ``"border"``
            (right for crops: upsampling does not darken the edges) or ``"zeros"`` (black fill
            like torchvision's affine, right for digits) or ``"reflection"``.
    """

    size: int | None = None
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grey_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    affine_deg: float = 0.0
    affine_translate: float = 0.0
    affine_scale: tuple[float, float] = (1.0, 1.0)
    padding: str = "border"

    def __post_init__(self) -> None:
        def rng(name: str, lo: float, hi: float, positive: bool = True) -> None:
            if lo > hi or (positive and lo <= 0):
                raise ValueError(f"AugmentConfig.{name} must be an increasing positive range, "
                                 f"got ({lo}, {hi})")

        rng("crop_scale", *self.crop_scale)
        if self.crop_scale[1] > 1:
            raise ValueError(f"AugmentConfig.crop_scale must lie in (0, 1], got {self.crop_scale}")
        rng("crop_ratio", *self.crop_ratio)
        rng("blur_sigma", *self.blur_sigma)
        rng("affine_scale", *self.affine_scale)
        for name in ("hflip", "jitter_p", "grey_p", "blur_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"AugmentConfig.{name} is a probability in [0, 1], got {p}")
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"AugmentConfig.jitter must be 4 non-negative strengths with hue "
                             f"<= 0.5, got {self.jitter}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"AugmentConfig.size must be positive or None, got {self.size}")
        if self.affine_deg < 0 or self.affine_translate < 0:
            raise ValueError("AugmentConfig.affine_deg and affine_translate must be >= 0")
        if self.padding not in ("zeros", "border", "reflection"):
            raise ValueError(f"AugmentConfig.padding must be zeros|border|reflection, "
                             f"got {self.padding!r}")


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _grey(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> luma ``(B, 1, H, W)``."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of ``x`` ``(B, 3, H, W)`` in [0, 1] by ``shift`` ``(B,)`` turns.

    Written with in-place ops on few temporaries: this is the costliest step on the CPU.
    """
    maxc, argmax = x.max(dim=1)
    delta = maxc - x.amin(dim=1)
    vs = delta  # v * s == max - min: HSV -> RGB below needs only v and v*s
    d = torch.where(delta > 0, delta, torch.ones_like(delta))  # avoid 0/0 on grey pixels
    r, g, b = x.unbind(1)
    # Hue in sixths of a turn, by which channel is the maximum (ties: r before g before b).
    h = torch.where(argmax == 0, g - b, torch.where(argmax == 1, b - r, r - g)).div_(d)
    h.add_(argmax.to(x.dtype).mul_(2)).add_(6 * shift.view(-1, 1, 1)).remainder_(6.0)
    # Closed-form HSV -> RGB: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1)
    # with k = (n + 6 h) mod 6.
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (h.unsqueeze(1) + n).remainder_(6.0)
    k = torch.minimum(k, 4 - k).clamp_(0, 1).mul_(vs.unsqueeze(1))
    return k.neg_().add_(maxc.unsqueeze(1))


class BatchAugment:
    """Random augmentation of a whole batch at once, reproducible from a generator.

    Args:
        cfg: an :class:`AugmentConfig` (see :func:`preset` for per-dataset defaults).

    Shape:
        input ``(B, C, H, W)`` float in [0, 1] (uint8 is converted), any device;
        output ``(B, C, size, size)`` (``(B, C, H, W)`` when ``cfg.size`` is None) float in
        [0, 1].

    Example:
        >>> aug = BatchAugment(preset("cifar10"))
        >>> g = torch.Generator().manual_seed(0)
        >>> v1, v2 = aug(x, g), aug(x, g)   # two views of x
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def __repr__(self) -> str:
        return f"BatchAugment({self.cfg})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """Augment ``x`` ``(B, C, H, W)``; draws from ``generator`` (or the device's default).

        A CPU generator works for CUDA images (its draws are moved over), and gives the same
        random parameters as on the CPU.
        """
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        x = to_float(x)
        out_dtype = x.dtype
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # half-precision grid_sample/conv are not available on every device
        B = x.shape[0]
        dev = generator.device if generator is not None else x.device
        u = torch.rand(B, N_DRAWS, generator=generator, device=dev, dtype=torch.float32)
        u = u.to(device=x.device, dtype=x.dtype)
        if B == 0:
            size = self.cfg.size
            return x.new_empty(x.shape[:2] + ((size, size) if size else x.shape[2:]))
        x = self._geometry(x, u)
        x = self._jitter(x, u)
        if x.shape[1] == 3 and self.cfg.grey_p > 0:
            grey = u[:, _C_GREY] < self.cfg.grey_p
            x = torch.where(grey.view(-1, 1, 1, 1), _grey(x).expand_as(x), x)
        x = self._blur(x, u)
        return x.clamp_(0.0, 1.0).to(out_dtype)

    # ---------------------------------------------------------------- geometry

    def _is_identity_geometry(self, h: int, w: int) -> bool:
        c = self.cfg
        return (tuple(c.crop_scale) == (1.0, 1.0) and c.affine_deg == 0
                and c.affine_translate == 0 and tuple(c.affine_scale) == (1.0, 1.0)
                and (c.size is None or c.size == h == w))

    def _geometry(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Crop + resize + flip + affine as one ``grid_sample`` with per-sample matrices."""
        c = self.cfg
        B, C, H, W = x.shape
        flip = u[:, _C_FLIP] < c.hflip
        if self._is_identity_geometry(H, W):
            # Exact fast path: a full-image crop at the input size is the identity; a flip is
            # a pure index reversal, no interpolation error.
            return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x) if c.hflip > 0 else x
        out_h, out_w = (c.size, c.size) if c.size is not None else (H, W)
        # Random resized crop: 10 tries per image at once, keep the first that fits.
        area = _uniform(u[:, _C_SCALE:_C_SCALE + _CROP_TRIES], *c.crop_scale)
        log_lo, log_hi = math.log(c.crop_ratio[0]), math.log(c.crop_ratio[1])
        ratio = torch.exp(_uniform(u[:, _C_RATIO:_C_RATIO + _CROP_TRIES], log_lo, log_hi))
        fw = torch.sqrt(area * ratio * (H / W))  # crop width as a fraction of W
        fh = torch.sqrt(area / ratio * (W / H))
        fits = (fw <= 1) & (fh <= 1)
        first = fits.to(x.dtype).argmax(dim=1, keepdim=True)  # first fitting try
        ok = fits.any(dim=1)
        one = torch.ones(B, dtype=x.dtype, device=x.device)
        # No try fits (e.g. scale near 1 with a wide ratio range): fall back to the whole image.
        fw = torch.where(ok, fw.gather(1, first).squeeze(1), one)
        fh = torch.where(ok, fh.gather(1, first).squeeze(1), one)
        # Crop centre in normalised [-1, 1] coordinates, uniform over positions that fit.
        cx = (2 * u[:, _C_POS] - 1) * (1 - fw)
        cy = (2 * u[:, _C_POS + 1] - 1) * (1 - fh)
        sx = torch.where(flip, -fw, fw)  # a flip mirrors the output's x axis inside the crop
        zero = torch.zeros_like(one)
        crop = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, fh, cy], 1),
                            torch.stack([zero, zero, one], 1)], 1)  # (B, 3, 3)
        theta = crop
        if c.affine_deg > 0 or c.affine_translate > 0 or tuple(c.affine_scale) != (1.0, 1.0):
            # The image is rotated/zoomed/shifted, then cropped: input point = A^-1 (p - t),
            # A = scale * R(angle) in pixel units (so rotations stay rigid on non-square images).
            angle = _uniform(u[:, _C_AFFINE], -c.affine_deg, c.affine_deg) * (math.pi / 180)
            t = 2 * c.affine_translate
            tx = _uniform(u[:, _C_AFFINE + 1], -t, t)
            ty = _uniform(u[:, _C_AFFINE + 2], -t, t)
            inv_s = 1.0 / _uniform(u[:, _C_AFFINE + 3], *c.affine_scale)
            cos, sin = torch.cos(angle) * inv_s, torch.sin(angle) * inv_s
            a = W / H  # normalised -> pixel aspect correction
            inv = torch.stack([
                torch.stack([cos, sin / a, -(cos * tx + sin / a * ty)], 1),
                torch.stack([-sin * a, cos, -(-sin * a * tx + cos * ty)], 1),
                torch.stack([zero, zero, one], 1)], 1)
            theta = inv @ crop
        grid = F.affine_grid(theta[:, :2], [B, C, out_h, out_w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=c.padding,
                             align_corners=False)

    # ---------------------------------------------------------------- photometric

    def _jitter(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Colour jitter with per-sample factors; saturation and hue need 3 channels."""
        c = self.cfg
        bri, con, sat, hue = c.jitter
        colour = x.shape[1] == 3
        if c.jitter_p == 0 or not (bri or con or (colour and (sat or hue))):
            return x
        view = (-1, 1, 1, 1)
        y = x.clone()  # x is kept for the images that get no jitter; y is updated in place
        if bri > 0:
            f = _uniform(u[:, _C_JITTER + 1], max(0.0, 1 - bri), 1 + bri).view(view)
            y.mul_(f).clamp_(0, 1)
        if con > 0:
            f = _uniform(u[:, _C_JITTER + 2], max(0.0, 1 - con), 1 + con).view(view)
            lum = _grey(y) if colour else y.mean(dim=1, keepdim=True)
            mean = lum.mean(dim=(1, 2, 3), keepdim=True)
            y.mul_(f).add_((1 - f) * mean).clamp_(0, 1)
        if colour and sat > 0:
            f = _uniform(u[:, _C_JITTER + 3], max(0.0, 1 - sat), 1 + sat).view(view)
            grey = _grey(y).mul_(1 - f)  # before y changes in place
            y.mul_(f).add_(grey).clamp_(0, 1)
        if colour and hue > 0:
            y = _shift_hue(y, _uniform(u[:, _C_JITTER + 4], -hue, hue))
        apply = (u[:, _C_JITTER] < c.jitter_p).view(view)
        return torch.where(apply, y, x)

    def _blur(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Gaussian blur with a per-sample sigma: one depthwise conv per axis, whole batch."""
        c = self.cfg
        if c.blur_p == 0:
            return x
        B, C, H, W = x.shape
        radius = min(math.ceil(3 * c.blur_sigma[1]), H - 1, W - 1)  # reflect pad needs < side
        if radius < 1:
            return x
        sigma = _uniform(u[:, _C_BLUR + 1], *c.blur_sigma).view(-1, 1)
        offs = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype).view(1, -1)
        ker = torch.exp(-0.5 * (offs / sigma) ** 2)
        ker = ker / ker.sum(dim=1, keepdim=True)
        # Images not blurred get a delta kernel: exactly the identity, no branch per image.
        delta = (offs == 0).to(x.dtype).expand_as(ker)
        ker = torch.where((u[:, _C_BLUR] < c.blur_p).view(-1, 1), ker, delta)
        ker = ker.repeat_interleave(C, dim=0)  # (B*C, k): one kernel per (image, channel)
        k = 2 * radius + 1
        y = F.pad(x.reshape(1, B * C, H, W), (radius,) * 4, mode="reflect")
        y = F.conv2d(y, ker.view(B * C, 1, 1, k), groups=B * C)
        y = F.conv2d(y, ker.view(B * C, 1, k, 1), groups=B * C)
        return y.view(B, C, H, W)


def preset(dataset: str) -> AugmentConfig:
    """Per-dataset default augmentation.

    * ``digits`` (8x8): small affine jitter (rotation 12 deg, shift 1/8 side, zoom 0.9-1.1) and
      mild crops; no flip (digits are not mirror-symmetric), no colour ops.
    * ``mnist``: the same idea at 28x28, plus brightness/contrast jitter.
    * ``fashion_mnist``: crops (0.4-1), flips (garments are near-symmetric), brightness/contrast
      jitter, a small affine jitter.
    * ``cifar10`` / ``cifar20`` / ``folder``: CRLC's settings (crop 0.2-1, flip, jitter
      (0.4, 0.4, 0.4, 0.1) p 0.8, greyscale p 0.2).
    * ``stl10``: as CIFAR plus Gaussian blur (p 0.5, sigma 0.1-2).
    """
    if dataset == "digits":
        return AugmentConfig(crop_scale=(0.7, 1.0), crop_ratio=(0.9, 1.1), hflip=0.0,
                             jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, grey_p=0.0,
                             affine_deg=12.0, affine_translate=0.125, affine_scale=(0.9, 1.1),
                             padding="zeros")
    if dataset == "mnist":
        return AugmentConfig(crop_scale=(0.6, 1.0), crop_ratio=(0.9, 1.1), hflip=0.0,
                             jitter=(0.4, 0.4, 0.0, 0.0), jitter_p=0.5, grey_p=0.0,
                             affine_deg=12.0, affine_translate=0.1, affine_scale=(0.9, 1.1),
                             padding="zeros")
    if dataset == "fashion_mnist":
        return AugmentConfig(crop_scale=(0.4, 1.0), hflip=0.5, jitter=(0.4, 0.4, 0.0, 0.0),
                             jitter_p=0.5, grey_p=0.0, affine_deg=8.0, affine_translate=0.05,
                             padding="zeros")
    if dataset in ("cifar10", "cifar20", "folder"):
        return AugmentConfig()
    if dataset == "stl10":
        return AugmentConfig(blur_p=0.5, blur_sigma=(0.1, 2.0))
    from .datasets import DATASETS

    raise ValueError(f"no augmentation preset for {dataset!r}; choose one of {DATASETS}")
