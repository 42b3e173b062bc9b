"""Cutting images into patches: the first step of the ViT (notebook 01).

Dosovitskiy et al. 2020, section 3.1: an image x in R^{H x W x C} is reshaped into a
sequence of N = HW / P^2 flattened patches x_p in R^{N x (P^2 C)}, which a trainable
linear map E projects to D dimensions (eq. 1). A Conv2d whose kernel and stride are both
P computes exactly that projection; `PatchEmbed` uses it, `LinearPatchEmbed` writes the
reshape + Linear out, and `conv_to_linear_weights` / `linear_to_conv_weights` map one
onto the other.

The flattening order inside a patch is (p1 p2 c): row within the patch, column within
the patch, channel. It matches the order of a Conv2d kernel after `permute(0, 2, 3, 1)`.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

__all__ = [
    "patchify",
    "unpatchify",
    "PatchEmbed",
    "LinearPatchEmbed",
    "conv_to_linear_weights",
    "linear_to_conv_weights",
    "to_2tuple",
    "check_image_batch",
]


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """`16 -> (16, 16)`; a pair is returned as a tuple."""
    if isinstance(x, int):
        return (x, x)
    t = tuple(x)
    if len(t) != 2 or not all(isinstance(v, int) for v in t):
        raise TypeError(f"expected an int or a pair of ints, got {x!r}")
    return t


def _check_divisible(h: int, w: int, patch_size: tuple[int, int]) -> None:
    ph, pw = patch_size
    if h % ph or w % pw:
        raise ValueError(
            f"image size {h}x{w} is not divisible by patch size {ph}x{pw}; "
            f"crop or resize the image to a multiple of the patch size"
        )


def patchify(images: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) images -> (B, N, P*P*C) flattened patches, N = (H/P)(W/P), row-major."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    ph, pw = to_2tuple(patch_size)
    _check_divisible(images.shape[-2], images.shape[-1], (ph, pw))
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=ph, p2=pw)


def unpatchify(
    patches: torch.Tensor,
    patch_size: int | tuple[int, int],
    grid_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, P*P*C) -> (B, C, H, W).

    `grid_size` (rows, columns of patches) defaults to a square grid; `channels` is inferred
    from the patch length.
    """
    if patches.ndim != 3:
        raise ValueError(f"expected patches of shape (B, N, P*P*C), got {tuple(patches.shape)}")
    ph, pw = to_2tuple(patch_size)
    _, n, d = patches.shape
    if grid_size is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid_size=(rows, cols)")
        grid_size = (side, side)
    gh, gw = to_2tuple(grid_size)
    if gh * gw != n:
        raise ValueError(f"grid {gh}x{gw} holds {gh * gw} patches, but got N={n}")
    c = channels if channels is not None else d // (ph * pw)
    if c * ph * pw != d:
        raise ValueError(f"patch length {d} is not {ph}*{pw}*channels (channels={channels})")
    return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=gh, w=gw, p1=ph, p2=pw)


class _PatchGrid(nn.Module):
    """What both patch embeddings share: the signature, the patch grid, the input checks.
    A subclass says how it projects (`make_proj`) and applies it (`forward`)."""

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        _check_divisible(*self.img_size, self.patch_size)
        self.in_chans = in_chans
        self.grid_size = (
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = self.make_proj(in_chans, embed_dim, bias)

    def make_proj(self, in_chans: int, embed_dim: int, bias: bool) -> nn.Module:
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming what was expected when `x` is not a batch this model takes."""
        check_image_batch(x, in_chans=self.in_chans, img_size=self.img_size)


def check_image_batch(
    x: torch.Tensor, *, in_chans: int, img_size: tuple[int, int]
) -> None:
    """Shared boundary check of every tokenizer: (B, C, H, W) with the model's C, H and W."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    _, c, h, w = x.shape
    if c != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {c} (shape {tuple(x.shape)})")
    if (h, w) != tuple(img_size):
        raise ValueError(
            f"image size {h}x{w} does not match the model's {img_size[0]}x{img_size[1]}; "
            f"create the model with img_size=({h}, {w}) and resample its position embeddings "
            f"with vit_tutorial.resample_pos_embed"
        )


class PatchEmbed(_PatchGrid):
    """Eq. 1's patch projection x_p E as a strided convolution: (B, C, H, W) -> (B, N, D).

    Keyword arguments: img_size, patch_size, in_chans, embed_dim, bias.
    """

    def make_proj(self, in_chans: int, embed_dim: int, bias: bool) -> nn.Module:
        P = self.patch_size
        return nn.Conv2d(in_chans, embed_dim, kernel_size=P, stride=P, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class LinearPatchEmbed(_PatchGrid):
    """The same projection written as the paper says it: flatten the patches, then a Linear.

    Keyword arguments: img_size, patch_size, in_chans, embed_dim, bias (as `PatchEmbed`).
    """

    def make_proj(self, in_chans: int, embed_dim: int, bias: bool) -> nn.Module:
        ph, pw = self.patch_size
        return nn.Linear(ph * pw * in_chans, embed_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.proj(patchify(x, self.patch_size))  # (B, N, P*P*C) -> (B, N, D)


def conv_to_linear_weights(conv: nn.Conv2d) -> dict[str, torch.Tensor]:
    """A Conv2d patch projection's weights laid out for the equivalent Linear."""
    w = rearrange(conv.weight, "d c p1 p2 -> d (p1 p2 c)")
    out = {"weight": w.detach().clone()}
    if conv.bias is not None:
        out["bias"] = conv.bias.detach().clone()
    return out


def linear_to_conv_weights(
    linear: nn.Linear, patch_size: int | tuple[int, int], in_chans: int
) -> dict[str, torch.Tensor]:
    """A Linear patch projection's weights laid out for the equivalent Conv2d."""
    ph, pw = to_2tuple(patch_size)
    w = rearrange(linear.weight, "d (p1 p2 c) -> d c p1 p2", p1=ph, p2=pw, c=in_chans)
    out = {"weight": w.detach().clone()}
    if linear.bias is not None:
        out["bias"] = linear.bias.detach().clone()
    return out
