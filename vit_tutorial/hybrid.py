"""The hybrid ViT tokenizer: a ResNet's feature map, cut into 1x1 patches (notebook 06).

Dosovitskiy et al. 2020, section 3.1 "Hybrid Architecture": instead of raw image patches,
the input sequence can be formed from the feature map of a CNN; the patch embedding E of
eq. 1 is applied to patches of that map, and "as a special case, the patches can have
spatial size 1x1", so each feature-map position becomes one token. Notebook
`notebooks/06_hybrid.ipynb` builds this module step by step.

The CNN (section 4.1, "Model Variants") is a ResNet as in BiT (Kolesnikov et al. 2020):
Batch Normalization is replaced by Group Normalization (Wu & He 2018, 32 groups) and every
convolution is weight-standardized (Qiao et al. 2019). For R50+ViT-B/16 the paper removes
stage 4 of ResNet-50 and puts its 3 blocks into stage 3, giving layers (3, 4, 9) and a
feature map 16x smaller than the image: 14x14 = 196 tokens at 224x224, as for ViT-B/16.

Two details exist only so that Google's released weights (as ported by timm, model
`vit_base_r50_s16_224`) load here unchanged and give the same numbers:
  * the blocks are post-activation bottlenecks (ReLU after the residual sum), although
    the backbone keeps BiT's name "ResNetV2";
  * padding is TensorFlow's "SAME": pad so that the output has ceil(size / stride) pixels,
    and put the odd pixel at the bottom/right. PyTorch's symmetric padding=1 shifts a
    stride-2 3x3 window by one pixel on even inputs, which a pretrained net notices.
Parameter and buffer names follow timm's (`stem.conv`, `stages.0.blocks.0.conv1`, ...), so
timm's `patch_embed.*` state dict loads with no renaming.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .patches import check_image_batch, to_2tuple

__all__ = [
    "standardize_weight",
    "standardize_weight_fused",
    "same_padding",
    "pad_same",
    "max_pool2d_same",
    "group_norm_groups",
    "StdConv2d",
    "Stem",
    "Bottleneck",
    "ResNetStage",
    "ResNetV2",
    "HybridEmbed",
    "feature_grid",
]


def standardize_weight(weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Weight standardization: each output filter to mean 0, (biased) variance 1.

    `(w - mean) / sqrt(var + eps)` over all inputs of one output channel, (O, I, kh, kw).
    """
    dims = tuple(range(1, weight.ndim))
    var, mean = torch.var_mean(weight, dim=dims, keepdim=True, correction=0)  # (O, 1, 1, 1)
    return (weight - mean) / torch.sqrt(var + eps)


def standardize_weight_fused(weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`standardize_weight` in one fused kernel; what `StdConv2d` runs.

    Training-mode BatchNorm over a batch of one sample whose "channels" are the O filters
    computes the same per-filter mean and biased variance. Besides being one kernel, it
    rounds exactly as timm's hybrid does, so outputs agree bit for bit rather than to
    ~1e-6 (float32 rounding that 16 random residual blocks can grow to ~1e-4).
    """
    flat = weight.reshape(1, weight.shape[0], -1)  # (1, O, I*kh*kw)
    out = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=eps)
    return out.reshape_as(weight)  # (O, I, kh, kw)


def same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one axis: (before, after), so the output has ceil(size / stride)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel_size - size, 0)
    # TF puts the odd pixel after (bottom/right); the pretrained weights expect that.
    return total // 2, total - total // 2


def pad_same(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    value: float = 0.0,
) -> torch.Tensor:
    """Pad (B, C, H, W) for a TF "SAME" window; depends on H and W, so it runs per call."""
    top, bottom = same_padding(x.shape[-2], kernel_size[0], stride[0])
    left, right = same_padding(x.shape[-1], kernel_size[1], stride[1])
    return F.pad(x, (left, right, top, bottom), value=value)


def max_pool2d_same(x: torch.Tensor, kernel_size: int = 3, stride: int = 2) -> torch.Tensor:
    """Max pooling with TF "SAME" padding: (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s))."""
    k, s = to_2tuple(kernel_size), to_2tuple(stride)
    # -inf, not 0: a padded cell must never win the max (TF ignores padding when pooling).
    x = pad_same(x, k, s, value=float("-inf"))
    return F.max_pool2d(x, k, s)


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """BiT's 32 groups, halved until they divide `channels` with >= 2 channels per group.

    Every R50 width (64, 128, ..., 1024) keeps 32 groups; the narrow layers of the small
    stem get fewer, because a group of one channel would be InstanceNorm, not GroupNorm.
    """
    groups = max_groups
    while groups > 1 and (channels % groups or channels // groups < 2):
        groups //= 2
    return groups


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_norm_groups(channels), channels, eps=1e-5)


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardization, no bias, TF "SAME" padding by default.

    The stored `weight` is free; the convolution uses its standardized copy. With
    GroupNorm after it, this stands in for BatchNorm without depending on the batch, which
    is what makes BiT-style transfer work with tiny fine-tuning batches. `eps=1e-8` is the
    hybrid ViT's value. `padding` is "same" (TF, computed per input size) or an int
    (PyTorch's symmetric padding).
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        *,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | str = "same",
        eps: float = 1e-8,
        bias: bool = False,
    ):
        if isinstance(padding, str) and padding != "same":
            raise ValueError(f'padding must be "same" or an int, got {padding!r}')
        same = padding == "same"
        super().__init__(
            in_chans,
            out_chans,
            kernel_size,
            stride=stride,
            padding=0 if same else padding,
            bias=bias,
        )
        self.same = same
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = pad_same(x, self.kernel_size, self.stride)
        weight = standardize_weight_fused(self.weight, self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", same={self.same}, eps={self.eps}"


STEM_STRIDES = {"resnet": (2, 2), "small": (1,)}  # the stem's conv (and max-pool) strides


def feature_grid(
    img_size: int | tuple[int, int], *, layers: tuple[int, ...], stem: str = "resnet"
) -> tuple[int, int]:
    """(rows, cols) of the ResNet-v2 feature map for `img_size`, without building the net.

    Every SAME layer gives ceil(size / stride), and ceil(ceil(n/a)/b) == ceil(n/(ab)), so
    the whole net is one ceil-division by its total stride: the stem's, then 1 for the first
    stage and 2 for each later one.
    """
    if stem not in STEM_STRIDES:
        raise ValueError(f"stem must be one of {tuple(STEM_STRIDES)}, got {stem!r}")
    h, w = to_2tuple(img_size)
    reduction = math.prod(STEM_STRIDES[stem]) * 2 ** (len(layers) - 1)
    return (math.ceil(h / reduction), math.ceil(w / reduction))


class Stem(nn.Module):
    """The first layer: StdConv -> GroupNorm -> ReLU (-> max-pool).

    `kind="resnet"` is ResNet's 7x7 stride-2 conv and 3x3 stride-2 max-pool (stride 4, for
    224x224 photos). `kind="small"` is one 3x3 stride-1 conv and no pool (stride 1), so a
    28x28 digit is not shrunk to 7x7 before the residual stages even start.
    """

    def __init__(self, *, in_chans: int, out_chans: int, kind: str = "resnet"):
        super().__init__()
        if kind == "resnet":
            kernel_size, stride, self.pool = 7, 2, True
        elif kind == "small":
            kernel_size, stride, self.pool = 3, 1, False
        else:
            raise ValueError(f"stem must be 'resnet' or 'small', got {kind!r}")
        self.conv = StdConv2d(in_chans, out_chans, kernel_size=kernel_size, stride=stride)
        self.norm = _group_norm(out_chans)
        self.strides = (stride, 2) if self.pool else (stride,)
        assert self.strides == STEM_STRIDES[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))  # (B, C, H/s, W/s)
        if self.pool:
            x = max_pool2d_same(x, kernel_size=3, stride=2)  # (B, C, H/2s, W/2s)
        return x


class Bottleneck(nn.Module):
    """Post-activation bottleneck: 1x1 reduce, 3x3 (carries the stride), 1x1 expand, + x, ReLU.

    The middle width is out_chans / 4. When the shape changes, the shortcut is a strided
    1x1 StdConv + GroupNorm ("projection shortcut") so that it can be added.
    """

    def __init__(self, in_chans: int, out_chans: int, *, stride: int = 1):
        super().__init__()
        mid_chans = out_chans // 4
        self.downsample = None
        if stride != 1 or in_chans != out_chans:
            self.downsample = nn.Sequential(
                OrderedDict(
                    conv=StdConv2d(in_chans, out_chans, kernel_size=1, stride=stride),
                    norm=_group_norm(out_chans),
                )
            )
        self.conv1 = StdConv2d(in_chans, mid_chans, kernel_size=1)
        self.norm1 = _group_norm(mid_chans)
        self.conv2 = StdConv2d(mid_chans, mid_chans, kernel_size=3, stride=stride)
        self.norm2 = _group_norm(mid_chans)
        self.conv3 = StdConv2d(mid_chans, out_chans, kernel_size=1)
        self.norm3 = _group_norm(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)  # (B, C_out, H/s, W/s)
        x = F.relu(self.norm1(self.conv1(x)))  # (B, C_mid, H, W)
        x = F.relu(self.norm2(self.conv2(x)))  # (B, C_mid, H/s, W/s)
        x = self.norm3(self.conv3(x))  # (B, C_out, H/s, W/s)
        # ReLU after the sum (post-activation), as in the hybrid's released weights.
        return F.relu(x + shortcut)


class ResNetStage(nn.Module):
    """`depth` bottlenecks; only the first changes the width and applies the stride."""

    def __init__(self, *, in_chans: int, out_chans: int, depth: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(
            Bottleneck(in_chans, out_chans, stride=stride),
            *(Bottleneck(out_chans, out_chans) for _ in range(depth - 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """BiT-style ResNet (GroupNorm + StdConv) used as the hybrid's feature extractor.

    (B, C_in, H, W) -> (B, out_chans, ceil(H / reduction), ceil(W / reduction)). Stage i has
    `layers[i]` blocks, `width * 4 * 2**i` output channels and stride 1 for the first stage,
    2 for the others. `layers=(3, 4, 9)` with the "resnet" stem is the paper's R50 variant
    (out_chans 1024, reduction 16); `layers=(2, 2, 2)` with `stem="small"` maps a 28x28
    image to 7x7 (reduction 4).
    """

    def __init__(
        self,
        *,
        layers: tuple[int, ...],
        in_chans: int = 3,
        stem: str = "resnet",
        width: int = 64,
    ):
        super().__init__()
        layers = tuple(layers)
        if not layers or not all(isinstance(d, int) and d >= 1 for d in layers):
            raise ValueError(f"layers must be a non-empty tuple of positive ints, got {layers!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        self.layers = layers
        self.in_chans = in_chans
        self.stem_kind = stem
        self.stem = Stem(in_chans=in_chans, out_chans=width, kind=stem)

        strides = list(self.stem.strides)
        prev_chans = width
        self.stages = nn.Sequential()
        for i, depth in enumerate(layers):
            out_chans = width * 4 * 2**i
            stride = 1 if i == 0 else 2
            self.stages.add_module(
                str(i),
                ResNetStage(in_chans=prev_chans, out_chans=out_chans, depth=depth, stride=stride),
            )
            strides.append(stride)
            prev_chans = out_chans
        self.out_chans = prev_chans
        self.reduction = math.prod(strides)
        self._init_weights()

    def _init_weights(self) -> None:
        # Standardization removes each filter's scale from the forward pass, but the
        # gradient still shrinks as the raw weight grows; He init keeps that scale sane.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_size(self, img_size: int | tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the feature map for an image of `img_size`, without a forward pass."""
        return feature_grid(img_size, layers=self.layers, stem=self.stem_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, width, H/s0, W/s0)
        return self.stages(x)  # (B, out_chans, H/r, W/r)


class HybridEmbed(nn.Module):
    """Section 3.1's hybrid tokenizer: ResNet feature map -> 1x1 patches -> (B, N, D).

    The projection E of eq. 1 is a 1x1 Conv2d on the feature map, i.e. one Linear applied
    to each position's feature vector. `grid_size` is the feature map's (rows, cols) and
    `num_patches` = rows * cols; the defaults are R50+ViT-B/16 at 224x224 (14x14 tokens).
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dim: int = 768,
        layers: tuple[int, ...] = (3, 4, 9),
        stem: str = "resnet",
        width: int = 64,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        if min(self.img_size) < 1:
            raise ValueError(f"img_size must be positive, got {self.img_size}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.patch_size = (1, 1)  # patches of the feature map, not of the image
        self.backbone = ResNetV2(layers=layers, in_chans=in_chans, stem=stem, width=width)
        self.grid_size = self.backbone.feature_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(self.backbone.out_chans, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, in_chans=self.in_chans, img_size=self.img_size)
        x = self.backbone(x)  # (B, C, Hf, Wf)
        x = self.proj(x)  # (B, D, Hf, Wf)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), N = Hf * Wf, row-major
