"""Batch augmentation for training: crops, flips, erasing, mixup and CutMix (notebook 05).

The augmentations (`random_crop`, `random_hflip`, `random_erasing`, `augment`) are whole-
batch tensor operations: they draw every random number for the batch at once and run on
the batch's device, so a GPU batch never goes back to the CPU. Apply them to pixels in
[0, 1] *before* `data.normalize`: zero is then black, which is Fashion-MNIST's background.
`mixup_cutmix` mixes a batch and its labels (Zhang et al. 2018; Yun et al. 2019), as
`vit_tutorial.train` does with `--mixup` and `--cutmix`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "random_crop",
    "random_hflip",
    "random_erasing",
    "augment",
    "Augment",
    "mixup_cutmix",
]


# ---------------------------------------------------------------------------------------
# Batch augmentation (vectorized; runs on the batch's device)
# ---------------------------------------------------------------------------------------


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")


def _rand(n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """n uniform numbers in [0, 1) on x's device, drawn from `generator` where it lives.

    Drawing on the generator's device and moving the result keeps a seeded CPU generator
    reproducible for a batch on any device.
    """
    device = generator.device if generator is not None else x.device
    return torch.rand(n, generator=generator, device=device).to(x.device)


def random_crop(
    x: torch.Tensor, padding: int = 4, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pad each image by `padding` zeros on every side, then crop it back at a random offset.

    Zero is the value in whatever `x` holds: black for pixels in [0, 1] (use it before
    `normalize`), the mean pixel for normalized images. Shape, dtype and device are kept.
    """
    _check_batch(x)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x.clone()
    B, C, H, W = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    # Offsets in 0..2p for each image, drawn as floats so a generator on any device works.
    dy = (_rand(B, x, generator) * (2 * padding + 1)).long().clamp_max(2 * padding)  # (B,)
    dx = (_rand(B, x, generator) * (2 * padding + 1)).long().clamp_max(2 * padding)  # (B,)
    rows = dy[:, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(W, device=x.device)  # (B, W)
    batch = torch.arange(B, device=x.device)[:, None, None]  # (B, 1, 1)
    # Advanced indexing on (B, H+2p, W+2p, C) gathers one (H, W) window per image.
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def random_hflip(
    x: torch.Tensor, p: float = 0.5, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mirror each image left-right with probability `p`. Shape, dtype, device kept."""
    _check_batch(x)
    flip = _rand(x.shape[0], x, generator) < p  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_erasing(
    x: torch.Tensor,
    p: float = 0.25,
    *,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Set a random rectangle of each image to `value` with probability `p`.

    Zhong et al. 2017, "Random Erasing Data Augmentation": the rectangle covers a fraction
    of the image drawn from `scale`, with aspect ratio h/w drawn log-uniformly from `ratio`.
    Where torchvision retries rectangles that do not fit, this clamps h and w to the
    image, so every selected image loses at least one pixel. Shape, dtype, device kept.
    """
    _check_batch(x)
    B, C, H, W = x.shape
    area = (scale[0] + (scale[1] - scale[0]) * _rand(B, x, generator)) * (H * W)  # (B,)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * _rand(B, x, generator))  # (B,) h / w
    h = torch.sqrt(area * aspect).round().long().clamp(1, H)  # (B,)
    w = torch.sqrt(area / aspect).round().long().clamp(1, W)  # (B,)
    top = (_rand(B, x, generator) * (H - h + 1)).long()  # (B,) in 0..H-h
    left = (_rand(B, x, generator) * (W - w + 1)).long()  # (B,) in 0..W-w
    erase = _rand(B, x, generator) < p  # (B,)
    rows = torch.arange(H, device=x.device)[None, :]  # (1, H)
    cols = torch.arange(W, device=x.device)[None, :]  # (1, W)
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (B, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]  # (B, H, W)
    return torch.where(mask[:, None], torch.full_like(x, value), x)  # (B, C, H, W)


def augment(
    x: torch.Tensor,
    *,
    crop_padding: int = 4,
    flip: bool = True,
    erasing_p: float = 0.25,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop, horizontal flip, then random erasing: the recipe of notebook 05.

    Give it a (B, C, H, W) float batch with pixels in [0, 1] and `normalize` afterwards.
    """
    x = random_crop(x, crop_padding, generator=generator)
    if flip:
        x = random_hflip(x, 0.5, generator=generator)
    if erasing_p > 0:
        x = random_erasing(x, erasing_p, generator=generator)
    return x


def mixup_cutmix(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with the batch's mirror image (x[B-1-i]) and mix the labels alike.

    Mixup (Zhang et al. 2018) blends whole images, x = lam x_i + (1 - lam) x_j; CutMix
    (Yun et al. 2019) pastes a box of x_j over x_i and sets lam to the area kept. One lam
    per batch, drawn from Beta(alpha, alpha); each batch is a CutMix batch with probability
    `switch_prob` (when both alphas are > 0). Returns the mixed (B, C, H, W) images and
    (B, num_classes) soft targets, label smoothing included, for `F.cross_entropy`.
    """
    _check_batch(x)
    if y.shape != (x.shape[0],):
        raise ValueError(f"expected labels of shape ({x.shape[0]},), got {tuple(y.shape)}")
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mixup_cutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
    B, C, H, W = x.shape
    # Beta draws have no torch generator argument: seed a NumPy generator from `generator`,
    # so the result is still a function of the torch generator's state.
    seed = torch.randint(2**62, (1,), generator=generator,
                         device=generator.device if generator is not None else "cpu")
    rng = np.random.default_rng(int(seed))
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix
                else rng.beta(mixup_alpha, mixup_alpha))
    partner = x.flip(0)  # (B, C, H, W), image i meets image B-1-i
    if use_cutmix:
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2 + cut_h % 2, H)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2 + cut_w % 2, W)
        x = x.clone()
        x[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (H * W)  # the area that stayed x_i
    else:
        x = lam * x + (1 - lam) * partner
    off = label_smoothing / num_classes
    target = F.one_hot(y, num_classes).to(x.dtype) * (1 - label_smoothing) + off  # (B, K)
    return x, lam * target + (1 - lam) * target.flip(0)


@dataclass(frozen=True)
class Augment:
    """The settings of `augment` kept together; ``Augment()(x)`` augments a batch."""

    crop_padding: int = 4  # pixels of zero padding before the random 28x28 crop
    flip: bool = True  # mirror half of the images left-right
    erasing_p: float = 0.25  # probability of erasing one rectangle per image

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return augment(
            x,
            crop_padding=self.crop_padding,
            flip=self.flip,
            erasing_p=self.erasing_p,
            generator=generator,
        )
