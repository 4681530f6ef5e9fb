"""Parity of the batched on-device augmentation (memory mode) with torchvision v2 (stream mode), per op.

The two draw their random parameters differently, so pixels differ; what must agree is the
distribution of what each op does. Every test applies one op to the same images many times,
measures one statistic per output (crop area, flip, brightness/contrast/saturation factor, hue
shift, grayscale, blur strength, solarization) and compares the two distributions' mean and spread.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2

from rela.data.augment import (blur_kernel, color_jitter, grayscale, random_blur, random_grayscale,
                               random_resized_crop, random_solarize)

N, SIZE, OUT = 600, 48, 32


def batched_and_v2(images: torch.Tensor, batched, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """float [0, 1] outputs of the batched op and of the v2 transform applied image by image (uint8)."""
    torch.manual_seed(0)
    a = batched(images.float() / 255)
    torch.manual_seed(1)
    b = torch.stack([transform(im) for im in images]).float() / 255
    return a, b


def assert_same_distribution(a: torch.Tensor, b: torch.Tensor, tol_mean: float, tol_std: float) -> None:
    assert abs(a.mean() - b.mean()) < tol_mean, (a.mean(), b.mean())
    assert abs(a.std() - b.std()) < tol_std, (a.std(), b.std())


def coordinate_images() -> torch.Tensor:
    """Red = x, green = y (0..255 across the image), blue = 128: a crop's position shows in its colours."""
    ramp = torch.linspace(0, 255, SIZE)
    img = torch.stack([ramp.expand(SIZE, SIZE), ramp[:, None].expand(SIZE, SIZE), torch.full((SIZE, SIZE), 128.0)])
    return img.round().to(torch.uint8).expand(N, -1, -1, -1).contiguous()


def colour_images(seed: int = 0) -> torch.Tensor:
    """Smooth mid-saturation colour fields with texture, values away from 0 and 255 (little clipping)."""
    g = torch.Generator().manual_seed(seed)
    base = 0.3 + 0.4 * torch.rand(N, 3, 1, 1, generator=g)
    texture = 0.08 * torch.randn(N, 1, 8, 8, generator=g)
    texture = torch.nn.functional.interpolate(texture, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return ((base + texture).clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0)])
def test_random_resized_crop_area(scale):
    images = coordinate_images()
    a, b = batched_and_v2(images, lambda x: random_resized_crop(x, OUT, scale, (3 / 4, 4 / 3)),
                          v2.RandomResizedCrop(OUT, scale=scale, antialias=True))

    def area(x):  # width x height of the crop, read off the coordinate colours
        return (x[:, 0].amax((1, 2)) - x[:, 0].amin((1, 2))) * (x[:, 1].amax((1, 2)) - x[:, 1].amin((1, 2)))

    area_a, area_b = area(a), area(b)
    assert area_a.min() > scale[0] * 0.7 and area_b.min() > scale[0] * 0.7
    assert_same_distribution(area_a, area_b, tol_mean=0.04, tol_std=0.04)
    for q in (0.1, 0.5, 0.9):
        assert abs(area_a.quantile(q) - area_b.quantile(q)) < 0.08, q


def test_flip_rate():
    images = coordinate_images()
    a, b = batched_and_v2(images, lambda x: random_resized_crop(x, OUT, (1.0, 1.0), (1.0, 1.0), flip_p=0.5),
                          v2.Compose([v2.Resize(OUT, antialias=True), v2.RandomHorizontalFlip(0.5)]))

    def flipped(x):  # red falls from left to right
        return (x[:, 0, :, 0].mean(1) > x[:, 0, :, -1].mean(1)).float()

    fa, fb = flipped(a), flipped(b)
    assert abs(fa.mean() - 0.5) < 0.07 and abs(fb.mean() - 0.5) < 0.07
    assert torch.equal(a.flip(-1)[fa.bool()][:, 2], a[fa.bool()][:, 2])  # blue is constant: flips keep it


def _jitter_pair(images, **factors):
    b, c, s, h = (factors.get(k, 0.0) for k in ("brightness", "contrast", "saturation", "hue"))
    return batched_and_v2(images, lambda x: color_jitter(x, b, c, s, h, p=1.0),
                          v2.ColorJitter(brightness=b or None, contrast=c or None, saturation=s or None,
                                         hue=h or None))


def _mean(y):
    return y.mean((1, 2, 3))


def _gray_spread(y):
    return grayscale(y).std((1, 2, 3))


def _chroma(y):
    return (y - grayscale(y)).abs().mean((1, 2, 3))


@pytest.mark.parametrize("op,statistic", [("brightness", _mean), ("contrast", _gray_spread),
                                          ("saturation", _chroma)])
def test_jitter_factor(op, statistic):
    """Each factor is uniform in [0.6, 1.4]: the statistic it scales (mean, gray spread, chroma) moves by it."""
    images = colour_images()
    a, b = _jitter_pair(images, **{op: 0.4})
    before = statistic(images.float() / 255)
    ratio_a, ratio_b = statistic(a) / before, statistic(b) / before
    assert_same_distribution(ratio_a, ratio_b, tol_mean=0.04, tol_std=0.04)
    assert 0.17 < ratio_a.std() < 0.25  # 0.8 / sqrt(12) = 0.23, a little less where pixels clip


def hue(x: torch.Tensor) -> torch.Tensor:
    """HSV hue in turns of each image's mean colour."""
    r, g, b = x.mean((2, 3)).unbind(1)
    mx, mn = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    d = (mx - mn).clamp_min(1e-6)
    h = torch.where(mx == r, (g - b) / d % 6, torch.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h / 6


def test_hue_shift():
    images = colour_images()
    x = images.float() / 255
    keep = (x.mean((2, 3)).amax(1) - x.mean((2, 3)).amin(1)) > 0.15  # colours with a well-defined hue
    a, b = _jitter_pair(images, hue=0.1)
    shift_a = ((hue(a) - hue(x) + 0.5) % 1 - 0.5)[keep]
    shift_b = ((hue(b) - hue(x) + 0.5) % 1 - 0.5)[keep]
    # v2 shifts the HSV hue by a uniform draw in [-0.1, 0.1] turns (std 0.058); the batched op rotates the
    # YIQ chroma plane by the same angle, which moves the HSV hue about as far
    assert keep.sum() > N // 3
    assert_same_distribution(shift_a, shift_b, tol_mean=0.01, tol_std=0.012)
    assert abs(shift_b.std() - 0.2 / math.sqrt(12)) < 0.01


def test_grayscale_rate_and_weights():
    images = colour_images()
    a, b = batched_and_v2(images, lambda x: random_grayscale(x, 0.2), v2.RandomGrayscale(0.2))

    def is_gray(y):
        return (y.amax(1) - y.amin(1)).amax((1, 2)) < 1.5 / 255

    ga, gb = is_gray(a), is_gray(b)
    assert abs(ga.float().mean() - 0.2) < 0.05 and abs(gb.float().mean() - 0.2) < 0.05
    x = images.float() / 255
    # both use the ITU-R 601 luma weights: the gray level matches the weighted mean within rounding
    assert (a[ga][:, 0] - grayscale(x[ga])[:, 0]).abs().max() < 1e-5
    assert (b[gb][:, 0] - grayscale(x[gb])[:, 0]).abs().max() < 1.5 / 255


def test_gaussian_blur_strength():
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(N, 3, OUT, OUT, generator=g) * 255).round().to(torch.uint8)  # white noise
    sigma = (0.1, 2.0)
    a, b = batched_and_v2(images, lambda x: random_blur(x, 1.0, sigma),
                          v2.GaussianBlur(blur_kernel(OUT), sigma))

    def sharpness(y):  # mean absolute difference of horizontal neighbours, relative to the input's
        return (y[..., 1:] - y[..., :-1]).abs().mean((1, 2, 3))

    x = images.float() / 255
    ratio_a, ratio_b = sharpness(a) / sharpness(x), sharpness(b) / sharpness(x)
    assert_same_distribution(ratio_a, ratio_b, tol_mean=0.03, tol_std=0.03)
    assert ratio_a.min() < 0.7 and ratio_a.max() > 0.95  # from a strong blur to none at sigma 0.1


def test_solarize_rate_and_threshold():
    images = colour_images()
    a, b = batched_and_v2(images, lambda x: random_solarize(x, 0.2), v2.RandomSolarize(threshold=128, p=0.2))
    x = images.float() / 255
    sa, sb = (a - x).abs().amax((1, 2, 3)) > 1e-6, (b - x).abs().amax((1, 2, 3)) > 1e-6
    assert abs(sa.float().mean() - 0.2) < 0.05 and abs(sb.float().mean() - 0.2) < 0.05
    # the same threshold: a solarized image inverts exactly the pixels >= 128/255
    solar = torch.where(x >= 0.5, 1 - x, x)
    assert (a[sa] - solar[sa]).abs().max() < 1e-6 and (b[sb] - solar[sb]).abs().max() < 1e-6
