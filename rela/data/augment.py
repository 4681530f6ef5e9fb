"""Augmentation of whole uint8 batches on the training device, per-sample random.

torchvision's v2 transforms draw one set of parameters per call, so random
crops of a batch would all be the same crop; applying them image by image in
worker processes is what makes small-image SSL data-bound on a CPU. Here each
view is one ``affine_grid``/``grid_sample`` (random resized crop + flip, with
parameters drawn per sample) followed by per-sample colour operations, all as
tensor arithmetic on whatever device holds the batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewAugment:
    """Parameters of one augmented view (the torchvision/lightly meaning)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    solarize_p: float = 0.0
    blur_p: float = 0.0  # Gaussian blur, kernel ~10% of the side (blur_kernel), sigma uniform in blur_sigma
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __call__(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """uint8 or [0, 1] float N x C x H x W -> float N x C x size x size in [0, 1]."""
        return self._apply(images, size, {name: getattr(self, name) for name in PROBABILITIES})

    def _apply(self, images: torch.Tensor, size: int | None, p: dict) -> torch.Tensor:
        # p: each probability as a float, or as one value per image (views stacked by augment_views)
        x = to_float(images)
        x = random_resized_crop(x, size or x.shape[-1], self.crop_scale, self.crop_ratio, p["flip_p"])
        x = color_jitter(x, *self.jitter, p=p["jitter_p"])
        x = random_grayscale(x, p["gray_p"])
        x = random_blur(x, p["blur_p"], self.blur_sigma)
        x = random_solarize(x, p["solarize_p"])
        return x


PROBABILITIES = ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p")
_PER_IMAGE: dict[tuple, torch.Tensor] = {}  # per-image probabilities by (values, batch size, device), made once


def augment_views(views, images: torch.Tensor) -> list[torch.Tensor]:
    """Every view of a batch, the views stacked along the batch and each operation run once for all of them.

    A step's views (BYOL's two, ReLA's two) differ at most in their probabilities (BYOL's second view
    solarizes, its first does not), so one call on the stacked batch, with each image's probability, draws
    what separate calls would (every parameter is drawn per image) with half the operator launches: on a
    GPU the host launching kernels is what a small-image step waits for (benchmarks/step_overhead.py).
    Views that differ in more (crop scale, jitter strength) are made one call each.
    """
    views = list(views)
    first = views[0]
    same = all(dataclasses.replace(v, **{name: getattr(first, name) for name in PROBABILITIES}) == first
               for v in views)
    if len(views) == 1 or not same:
        return [view(images) for view in views]
    n = images.shape[0]
    p = {}
    for name in PROBABILITIES:
        values = tuple(float(getattr(v, name)) for v in views)
        if len(set(values)) == 1:
            p[name] = values[0]
            continue
        key = (values, n, images.device)
        if key not in _PER_IMAGE:  # made on the device by fills, no copy from the host
            _PER_IMAGE[key] = torch.cat([torch.full((n,), v, device=images.device) for v in values])
        p[name] = _PER_IMAGE[key]
    stacked = images.repeat(len(views), *([1] * (images.dim() - 1)))
    return list(first._apply(stacked, None, p).split(n))


def _off(p) -> bool:
    """A probability that is 0 for every image (a per-image tensor is only made when some value is not)."""
    return not isinstance(p, torch.Tensor) and p <= 0


# The ReLA phase (spec step 4): milder crops, strong colour jitter.
RELA_VIEW = ViewAugment(crop_scale=(0.5, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2)
# BYOL's two asymmetric views (Grill et al.), without Gaussian blur: on 28-32 px images
# the authors drop it too.
BYOL_VIEW_1 = ViewAugment(solarize_p=0.0)
BYOL_VIEW_2 = ViewAugment(solarize_p=0.2)
SIMCLR_VIEW = ViewAugment(jitter=(0.8, 0.8, 0.8, 0.2))
MOCO_VIEW = ViewAugment(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1))
SIMSIAM_VIEW = ViewAugment(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1))
DINO_VIEW_1 = ViewAugment(crop_scale=(0.4, 1.0))  # DINO's global crops
DINO_VIEW_2 = ViewAugment(crop_scale=(0.4, 1.0), solarize_p=0.2)
# Crops and flips only: supervised training's views, and the ReLA phase's with rela_augment "weak".
WEAK_VIEW = ViewAugment(crop_scale=(0.5, 1.0), jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, gray_p=0.0)
SUPERVISED_VIEW = WEAK_VIEW


def rela_view(name: str, method_views: tuple) -> ViewAugment:
    """The ReLA phase's views by config name (TrainConfig.rela_augment): the spec's, weak, or the base
    method's first view (then the inputs do not change at the hand-over, only the objective)."""
    return {"rela": RELA_VIEW, "weak": WEAK_VIEW, "method": method_views[0]}[name]


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def _uniform(n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) * (high - low) + low


CROP_TRIES = 10  # torchvision's RandomResizedCrop attempts


def random_resized_crop(x, size, scale, ratio, flip_p=0.0) -> torch.Tensor:
    """Per-sample RandomResizedCrop (+ horizontal flip) as one batched resampling."""
    n, device = x.shape[0], x.device
    # torchvision's rule, batched: up to CROP_TRIES draws of (area, aspect) per sample, the first
    # whose width and height (fractions of the image side) fit is taken, else the whole image.
    # (Clamping misfits instead would favour large crops: +0.05 mean area at scale (0.08, 1).)
    area = _uniform(n * CROP_TRIES, *scale, device).view(n, CROP_TRIES)
    aspect = torch.exp(_uniform(n * CROP_TRIES, math.log(ratio[0]), math.log(ratio[1]), device)).view(n, CROP_TRIES)
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w <= 1) & (h <= 1)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first draw that fits (0 if none)
    found = fits.any(1)
    w = torch.where(found, w.gather(1, first).squeeze(1), torch.ones_like(found, dtype=w.dtype))
    h = torch.where(found, h.gather(1, first).squeeze(1), torch.ones_like(found, dtype=h.dtype))
    cx = (torch.rand(n, device=device) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, device=device) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, device=device) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


_GRAY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
_GRAY: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # the weights per device, copied once


def grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    key = (x.device, x.dtype)
    if key not in _GRAY:
        _GRAY[key] = _GRAY_WEIGHTS.to(device=x.device, dtype=x.dtype)
    # one weighted sum over the channels: 3 operators instead of 23 for 0.299 r + 0.587 g + 0.114 b, and
    # the same values (the same products, added in the same order)
    return (x * _GRAY[key]).sum(1, keepdim=True)


def _blend(a, b, factor):  # factor * a + (1 - factor) * b, per sample
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp_(0, 1)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
# both matrices per device, copied once: inverting per batch checked the result for errors on the host
# (a sync on a GPU), and a copy from pageable memory per batch waits for the device too
_YIQ: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _hue_shift(x, shift):
    """Rotate the chroma plane of YIQ by ``shift`` turns: a linear map, so batchable."""
    if x.device not in _YIQ:
        _YIQ[x.device] = (_RGB_TO_YIQ.to(x.device), _YIQ_TO_RGB.to(x.device))
    yiq, inv = _YIQ[x.device]
    angle = shift * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = inv @ rot @ yiq  # N x 3 x 3
    return torch.einsum("nij,njhw->nihw", m, x).clamp_(0, 1)


def color_jitter(x, brightness, contrast, saturation, hue, p=1.0) -> torch.Tensor:
    """Per-sample colour jitter applied with probability ``p`` (fixed order b, c, s, h)."""
    n, device = x.shape[0], x.device
    y = x
    if brightness:
        y = (y * _uniform(n, max(0, 1 - brightness), 1 + brightness, device).view(-1, 1, 1, 1)).clamp_(0, 1)
    if contrast:
        mean = grayscale(y).mean(dim=(1, 2, 3), keepdim=True)
        y = _blend(y, mean.expand_as(y), _uniform(n, max(0, 1 - contrast), 1 + contrast, device))
    if x.shape[1] == 3:
        if saturation:
            y = _blend(y, grayscale(y).expand_as(y), _uniform(n, max(0, 1 - saturation), 1 + saturation, device))
        if hue:
            y = _hue_shift(y, _uniform(n, -hue, hue, device))
    keep = (torch.rand(n, device=device) >= p).view(-1, 1, 1, 1)
    return torch.where(keep, x, y)


def random_grayscale(x: torch.Tensor, p) -> torch.Tensor:
    if x.shape[1] == 1 or _off(p):
        return x
    mask = (torch.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(mask, grayscale(x).expand_as(x), x)


def blur_kernel(size: int) -> int:
    """Gaussian-blur kernel side: about 10% of the image side (BYOL's rule), odd, at least 3."""
    k = max(3, int(0.1 * size))
    return k if k % 2 else k + 1


def random_blur(x: torch.Tensor, p, sigma: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    """Per-sample Gaussian blur (sigma drawn per sample) with probability ``p``: two grouped 1-D convolutions."""
    if _off(p):
        return x
    n, c, h, w = x.shape
    k = blur_kernel(w)
    s = _uniform(n, *sigma, x.device)
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kernel = torch.exp(-(r[None] ** 2) / (2 * s[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * c) x k
    y = F.pad(x.reshape(1, n * c, h, w), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c).reshape(n, c, h, w)
    mask = (torch.rand(n, device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(mask, y, x)


def random_solarize(x: torch.Tensor, p, threshold: float = 0.5) -> torch.Tensor:
    if _off(p):
        return x
    mask = (torch.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(mask & (x >= threshold), 1 - x, x)


def resize_center(images: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation transform: resize the shorter side to ``size`` then center-crop."""
    x = to_float(images)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=nh < h, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top: top + size, left: left + size]
    return x


class Normalize(torch.nn.Module):
    """Per-channel normalisation that also adapts the channel count (gray <-> RGB)."""

    def __init__(self, mean, std, channels: int | None = None):
        super().__init__()
        self.channels = channels or len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else grayscale(x)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
