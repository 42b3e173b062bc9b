"""Tests for vit_tutorial/hybrid.py: the R50 hybrid tokenizer against timm, and the small stem."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vit_tutorial.hybrid import (
    HybridEmbed,
    ResNetV2,
    StdConv2d,
    group_norm_groups,
    same_padding,
    standardize_weight,
    standardize_weight_fused,
)

timm = pytest.importorskip("timm")

# Pinned counts. The timm total is for 1000 classes; timm's default config for this model
# (the in21k "orig" weights) has no head and counts 97,890,112.
TIMM_VIT_R50_S16_224_PARAMS = 98_659_112
R50_HYBRID_EMBED_PARAMS = 12_682_048  # backbone 11,894,848 + proj 1024 * 768 + 768
R50_BACKBONE_PARAMS = 11_894_848


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def timm_hybrid(**kwargs):
    return timm.create_model("vit_base_r50_s16_224", pretrained=False, **kwargs).eval()


@pytest.fixture(scope="module")
def timm_full():
    """The whole timm model with a 1000-class head, on the meta device: shapes only, no time."""
    with torch.device("meta"):
        return timm_hybrid(num_classes=1000)


@pytest.fixture(scope="module")
def ours_r50():
    return HybridEmbed(img_size=224, layers=(3, 4, 9), embed_dim=768)


def test_r50_param_count_matches_timm(timm_full, ours_r50):
    assert n_params(timm_full) == TIMM_VIT_R50_S16_224_PARAMS
    assert n_params(timm_full.patch_embed) == R50_HYBRID_EMBED_PARAMS
    assert n_params(ours_r50) == R50_HYBRID_EMBED_PARAMS
    assert n_params(ours_r50.backbone) == R50_BACKBONE_PARAMS


def test_r50_state_dict_keys_match_timm(timm_full, ours_r50):
    theirs = timm_full.patch_embed.state_dict()
    ours = ours_r50.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_r50_interface(timm_full, ours_r50):
    assert ours_r50.img_size == (224, 224)
    assert ours_r50.in_chans == 3
    assert ours_r50.grid_size == tuple(timm_full.patch_embed.grid_size) == (14, 14)
    assert ours_r50.num_patches == timm_full.patch_embed.num_patches == 196
    assert ours_r50.backbone.out_chans == 1024
    assert ours_r50.backbone.reduction == 16
    # BiT's 32 groups everywhere in the R50 preset.
    groups = {m.num_groups for m in ours_r50.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {32}


@pytest.fixture(scope="module")
def timm_embed():
    """timm's R50 hybrid `patch_embed` with random weights, built once.

    Its forward takes any image size, so one instance serves every size below. The encoder
    depth does not touch `patch_embed`; depth=1 keeps construction fast.
    """
    torch.manual_seed(0)
    embed = timm_hybrid(img_size=64, depth=1, num_classes=0).patch_embed
    # Non-trivial GroupNorm affines, so a swapped weight/bias or a wrong group count shows.
    with torch.no_grad():
        for m in embed.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
    return embed


# 64: even sizes (SAME pads the odd pixel last); (100, 72): non-square; 97: odd everywhere.
@pytest.mark.parametrize("img_size", [64, (100, 72), 97])
def test_numerical_parity_with_timm(timm_embed, img_size):
    ours = HybridEmbed(img_size=img_size).eval()
    ours.load_state_dict(timm_embed.state_dict(), strict=True)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *ours.img_size)
    with torch.no_grad():
        expected = timm_embed(x)
        actual = ours(x)
        feats = timm_embed.backbone(x)  # (B, C, Hf, Wf)
    assert ours.grid_size == tuple(feats.shape[-2:])
    assert actual.shape == (2, ours.num_patches, 768)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_numerical_parity_with_timm_float64(timm_embed):
    """Same maths, not just the same rounding: in float64 the two agree to ~1e-12."""
    theirs = copy.deepcopy(timm_embed).double()
    ours = HybridEmbed(img_size=(100, 72)).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 100, 72, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "kernel_size, stride, size",
    [(7, 2, 28), (7, 2, 27), (3, 2, 14), (3, 2, 13), (1, 2, 9), (3, 1, 5)],
)
def test_std_conv_matches_timm(kernel_size, stride, size):
    from timm.layers import StdConv2dSame

    torch.manual_seed(0)
    theirs = StdConv2dSame(4, 8, kernel_size, stride=stride, eps=1e-8)
    ours = StdConv2d(4, 8, kernel_size=kernel_size, stride=stride, eps=1e-8)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 4, size, size + 1)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert ours(x).shape[-2:] == (-(-size // stride), -(-(size + 1) // stride))


def test_fused_standardization_matches_explicit():
    torch.manual_seed(0)
    w = torch.randn(16, 5, 3, 3) * 0.02 + 0.01
    torch.testing.assert_close(standardize_weight_fused(w), standardize_weight(w))


def test_standardized_weight_statistics():
    torch.manual_seed(0)
    conv = StdConv2d(5, 16, kernel_size=3)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(3.0)  # any scale and offset is removed
    w = standardize_weight(conv.weight, conv.eps).flatten(1)  # (O, I*kh*kw)
    torch.testing.assert_close(w.mean(dim=1), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.var(dim=1, unbiased=False), torch.ones(16), atol=1e-4, rtol=0)


def test_same_padding_puts_the_odd_pixel_last():
    assert same_padding(224, 7, 2) == (2, 3)
    assert same_padding(112, 3, 2) == (0, 1)
    assert same_padding(113, 3, 2) == (1, 1)
    assert same_padding(9, 1, 2) == (0, 0)


def test_group_norm_groups():
    assert [group_norm_groups(c) for c in (64, 128, 256, 1024)] == [32, 32, 32, 32]
    assert group_norm_groups(16) == 8  # >= 2 channels per group
    assert group_norm_groups(12) == 4
    assert group_norm_groups(1) == 1


@pytest.mark.parametrize("width", [8, 16])
def test_small_stem_28x28(width):
    torch.manual_seed(0)
    embed = HybridEmbed(
        img_size=28, in_chans=1, embed_dim=32, layers=(2, 2, 2), stem="small", width=width
    )
    assert embed.backbone.reduction == 4
    assert embed.grid_size == (7, 7)
    assert embed.num_patches == 49
    x = torch.randn(3, 1, 28, 28)
    feats = embed.backbone(x)
    assert feats.shape == (3, width * 16, 7, 7)
    assert tuple(feats.shape[-2:]) == embed.grid_size
    assert embed(x).shape == (3, 49, 32)


def bottleneck_stack_params(width: int, layers, in_chans: int) -> int:
    """Parameters of ResNetV2 with the small stem, by hand: convolutions have no bias, every
    GroupNorm has a scale and a shift (2 per channel). Stage i outputs 4w * 2^i channels
    through bottlenecks of middle width w * 2^i; the first block of a stage also has a 1x1
    projection shortcut."""
    total = 9 * in_chans * width + 2 * width  # stem: 3x3 conv + norm
    prev = width
    for i, depth in enumerate(layers):
        mid, out = width * 2**i, 4 * width * 2**i
        for b in range(depth):
            c_in = prev if b == 0 else out
            if b == 0:
                total += c_in * out + 2 * out  # shortcut: 1x1 conv + norm
            total += c_in * mid + 2 * mid  # conv1 1x1
            total += 9 * mid * mid + 2 * mid  # conv2 3x3
            total += mid * out + 2 * out  # conv3 1x1
        prev = out
    return total


@pytest.mark.parametrize("width", [32, 48])
def test_small_backbone_parameter_count_by_formula(width):
    """The shipped hybrids' CNNs (width 32 and 48) hold exactly the weights the design says."""
    embed = HybridEmbed(img_size=28, in_chans=1, embed_dim=192, layers=(2, 2, 2),
                        stem="small", width=width)
    assert n_params(embed.backbone) == bottleneck_stack_params(width, (2, 2, 2), in_chans=1)
    assert n_params(embed) == n_params(embed.backbone) + 16 * width * 192 + 192  # + 1x1 proj


@pytest.mark.parametrize(
    "stem, img_size", [("small", (28, 28)), ("small", (30, 17)), ("resnet", (45, 70))]
)
def test_grid_size_equals_real_output(stem, img_size):
    backbone = ResNetV2(layers=(1, 1, 1), stem=stem, width=8)
    out = backbone(torch.zeros(1, 3, *img_size))
    assert tuple(out.shape[-2:]) == backbone.feature_size(img_size)


def test_gradients_reach_the_stem():
    embed = HybridEmbed(img_size=28, in_chans=1, embed_dim=16, layers=(1, 1), stem="small", width=8)
    embed(torch.randn(2, 1, 28, 28)).sum().backward()
    assert embed.backbone.stem.conv.weight.grad is not None
    assert embed.backbone.stem.conv.weight.grad.abs().sum() > 0


def test_bad_input_channels():
    embed = HybridEmbed(img_size=28, in_chans=1, embed_dim=16, layers=(1, 1), stem="small", width=8)
    with pytest.raises(ValueError, match=r"expected 1 input channels, got 3"):
        embed(torch.randn(2, 3, 28, 28))


def test_bad_image_size():
    embed = HybridEmbed(img_size=28, in_chans=1, embed_dim=16, layers=(1, 1), stem="small", width=8)
    with pytest.raises(ValueError, match=r"32x32.*28x28"):
        embed(torch.randn(2, 1, 32, 32))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"stem must be 'resnet' or 'small', got 'tiny'"):
        ResNetV2(layers=(1,), stem="tiny")
    with pytest.raises(ValueError, match=r"layers must be .* got \(\)"):
        ResNetV2(layers=())
    with pytest.raises(ValueError, match=r"padding must be \"same\" or an int, got 'valid'"):
        StdConv2d(1, 1, kernel_size=3, padding="valid")
