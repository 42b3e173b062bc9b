"""Tests for vit_tutorial/hybrid.py: the R50 hybrid tokenizer against timm, and the small stem."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vit_tutorial import count_parameters
from vit_tutorial.hybrid import (
    Bottleneck,
    HybridEmbed,
    ResNetV2,
    StdConv2d,
    Stem,
    feature_grid,
    group_norm_groups,
    max_pool2d_same,
    pad_same,
    same_padding,
    standardize_weight,
    standardize_weight_fused,
)

# Pinned counts. The timm total is for 1000 classes; timm's default config for this model
# (the in21k "orig" weights) has no head and counts 97,890,112.
TIMM_VIT_R50_S16_224_PARAMS = 98_659_112
R50_HYBRID_EMBED_PARAMS = 12_682_048  # backbone 11,894,848 + proj 1024 * 768 + 768
R50_BACKBONE_PARAMS = 11_894_848


def timm_hybrid(timm, **kwargs):
    return timm.create_model("vit_base_r50_s16_224", pretrained=False, **kwargs).eval()


@pytest.fixture(scope="module")
def timm_full(timm):
    """The whole timm model with a 1000-class head, on the meta device: shapes only, no time."""
    with torch.device("meta"):
        return timm_hybrid(timm, num_classes=1000)


@pytest.fixture(scope="module")
def ours_r50():
    with torch.device("meta"):  # only counts, names and shapes are read
        return HybridEmbed(img_size=224, layers=(3, 4, 9), embed_dim=768)


def test_r50_param_count(ours_r50):
    assert count_parameters(ours_r50) == R50_HYBRID_EMBED_PARAMS
    assert count_parameters(ours_r50.backbone) == R50_BACKBONE_PARAMS


def test_r50_param_count_matches_timm(timm_full, ours_r50):
    assert count_parameters(timm_full) == TIMM_VIT_R50_S16_224_PARAMS
    assert count_parameters(timm_full.patch_embed) == R50_HYBRID_EMBED_PARAMS
    assert count_parameters(ours_r50) == R50_HYBRID_EMBED_PARAMS
    assert count_parameters(ours_r50.backbone) == R50_BACKBONE_PARAMS


def test_r50_state_dict_keys_match_timm(timm_full, ours_r50):
    theirs = timm_full.patch_embed.state_dict()
    ours = ours_r50.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_r50_interface(ours_r50):
    assert ours_r50.img_size == (224, 224)
    assert ours_r50.in_chans == 3
    assert ours_r50.grid_size == (14, 14)
    assert ours_r50.num_patches == 196
    assert ours_r50.backbone.out_chans == 1024
    assert ours_r50.backbone.reduction == 16
    assert [len(stage.blocks) for stage in ours_r50.backbone.stages] == [3, 4, 9]
    # BiT's 32 groups everywhere in the R50 preset.
    groups = {m.num_groups for m in ours_r50.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {32}


def test_r50_interface_matches_timm(timm_full, ours_r50):
    assert ours_r50.grid_size == tuple(timm_full.patch_embed.grid_size) == (14, 14)
    assert ours_r50.num_patches == timm_full.patch_embed.num_patches == 196


@pytest.fixture(scope="module")
def timm_embed(timm):
    """timm's R50 hybrid `patch_embed` with random weights, built once.

    Its forward takes any image size, so one instance serves every size below. The encoder
    depth does not touch `patch_embed`; depth=1 keeps construction fast.
    """
    torch.manual_seed(0)  # module-scoped: built before the per-test seed fixture runs
    embed = timm_hybrid(timm, img_size=64, depth=1, num_classes=0).patch_embed
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
def test_std_conv_matches_timm(timm, kernel_size, stride, size):
    theirs = timm.layers.StdConv2dSame(4, 8, kernel_size, stride=stride, eps=1e-8)
    ours = StdConv2d(4, 8, kernel_size=kernel_size, stride=stride, eps=1e-8)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 4, size, size + 1)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert ours(x).shape[-2:] == (-(-size // stride), -(-(size + 1) // stride))


def test_fused_standardization_matches_explicit():
    w = torch.randn(16, 5, 3, 3) * 0.02 + 0.01
    torch.testing.assert_close(standardize_weight_fused(w), standardize_weight(w))


def test_standardized_weight_statistics():
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
    assert count_parameters(embed.backbone) == bottleneck_stack_params(width, (2, 2, 2),
                                                                       in_chans=1)
    # + the 1x1 projection
    assert count_parameters(embed) == count_parameters(embed.backbone) + 16 * width * 192 + 192


@pytest.mark.parametrize(
    "stem, img_size, layers", [("small", (28, 28), (1, 1, 1)), ("small", (30, 17), (1, 1, 1)),
                               ("resnet", (45, 70), (1, 1, 1)), ("small", (28, 28), (1,)),
                               ("small", (30, 17), (1, 1)), ("resnet", (70, 45), (1, 1, 1, 1))]
)
def test_grid_size_equals_real_output(stem, img_size, layers):
    backbone = ResNetV2(layers=layers, stem=stem, width=4)
    out = backbone(torch.zeros(1, 3, *img_size))
    assert tuple(out.shape[-2:]) == backbone.feature_size(img_size)
    assert feature_grid(img_size, layers=layers, stem=stem) == tuple(out.shape[-2:])


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


# --- the pieces written out, without timm ------------------------------------------------


def std_conv_by_hand(conv: StdConv2d, x: torch.Tensor) -> torch.Tensor:
    """Weight standardization (biased variance, eps 1e-8) and TF "SAME" padding, spelled out."""
    w = conv.weight
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    w = (w - mean) / torch.sqrt(var + 1e-8)
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    pads = []
    for size, k, s in ((x.shape[-1], kw, sw), (x.shape[-2], kh, sh)):  # F.pad: last axis first
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]  # the odd pixel after
    return F.conv2d(F.pad(x, pads), w, stride=conv.stride)


def group_norm_by_hand(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    g = x.reshape(B, norm.num_groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True)
                                                    + norm.eps)
    return g.reshape(B, C, H, W) * norm.weight[:, None, None] + norm.bias[:, None, None]


def randomize_affines(module: nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)


@pytest.mark.parametrize("kernel_size, stride, size", [(3, 2, (8, 7)), (7, 2, (9, 12)),
                                                       (3, 1, (5, 5)), (1, 2, (6, 5))])
def test_std_conv_written_out(kernel_size, stride, size):
    conv = StdConv2d(3, 6, kernel_size=kernel_size, stride=stride)
    x = torch.randn(2, 3, *size)
    torch.testing.assert_close(conv(x), std_conv_by_hand(conv, x), atol=1e-5, rtol=1e-5)
    assert conv(x).shape[-2:] == tuple(math.ceil(n / stride) for n in size)
    assert conv.bias is None and conv.same and conv.eps == 1e-8
    assert repr(conv).endswith("bias=False, same=True, eps=1e-08)")



def test_std_conv_with_int_padding_pads_symmetrically():
    conv = StdConv2d(3, 6, kernel_size=3, stride=2, padding=1)
    assert not conv.same and conv.padding == (1, 1)
    x = torch.randn(2, 3, 8, 7)
    weight = standardize_weight(conv.weight, 1e-8)
    torch.testing.assert_close(conv(x), F.conv2d(x, weight, stride=2, padding=1),
                               atol=1e-5, rtol=1e-5)


def test_pad_same_and_max_pool_same_by_hand():
    x = torch.arange(1.0, 13.0).reshape(1, 1, 3, 4)
    # a 3x3 stride-2 window on 3 rows pads (1, 1), on 4 columns (0, 1): the odd pixel last
    padded = pad_same(x, (3, 3), (2, 2))
    assert padded.shape == (1, 1, 5, 5)
    torch.testing.assert_close(padded[0, 0, 1:4, 0:4], x[0, 0])
    assert padded[0, 0, 0].abs().sum() == 0 and padded[0, 0, :, 4].abs().sum() == 0
    neg = -x  # every value negative: a padded zero must never win the max
    pooled = max_pool2d_same(neg, kernel_size=3, stride=2)
    expected = torch.tensor([[-1.0, -3.0], [-5.0, -7.0]])
    torch.testing.assert_close(pooled[0, 0], expected)


def test_small_stem_written_out():
    stem = Stem(in_chans=2, out_chans=8, kind="small")
    randomize_affines(stem)
    assert stem.strides == (1,) and not stem.pool and stem.conv.kernel_size == (3, 3)
    assert stem.norm.num_groups == 4 and stem.norm.eps == 1e-5
    x = torch.randn(2, 2, 9, 10)
    expected = F.relu(group_norm_by_hand(stem.norm, std_conv_by_hand(stem.conv, x)))
    torch.testing.assert_close(stem(x), expected, atol=1e-5, rtol=1e-5)


def test_resnet_stem_written_out():
    stem = Stem(in_chans=3, out_chans=8, kind="resnet")
    randomize_affines(stem)
    assert stem.strides == (2, 2) and stem.conv.kernel_size == (7, 7)
    x = torch.randn(1, 3, 17, 20)
    y = F.relu(group_norm_by_hand(stem.norm, std_conv_by_hand(stem.conv, x)))  # (9, 10)
    y = F.max_pool2d(F.pad(y, (0, 1, 1, 1), value=float("-inf")), 3, 2)  # SAME: (5, 5)
    torch.testing.assert_close(stem(x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_chans, out_chans, stride", [(8, 16, 2), (16, 16, 1), (8, 16, 1)])
def test_bottleneck_written_out(in_chans, out_chans, stride):
    block = Bottleneck(in_chans, out_chans, stride=stride)
    randomize_affines(block)
    assert block.conv2.stride == (stride, stride) and block.conv1.out_channels == out_chans // 4
    x = torch.randn(2, in_chans, 7, 6)

    def conv_norm(conv, norm, t):
        return group_norm_by_hand(norm, std_conv_by_hand(conv, t))

    if in_chans == out_chans and stride == 1:
        assert block.downsample is None
        shortcut = x
    else:
        shortcut = conv_norm(block.downsample.conv, block.downsample.norm, x)
    y = F.relu(conv_norm(block.conv1, block.norm1, x))
    y = F.relu(conv_norm(block.conv2, block.norm2, y))
    y = conv_norm(block.conv3, block.norm3, y)
    torch.testing.assert_close(block(x), F.relu(y + shortcut), atol=1e-5, rtol=1e-5)


def test_resnet_stages_widths_and_strides():
    net = ResNetV2(layers=[2, 1, 3], in_chans=1, stem="small", width=4)
    assert net.layers == (2, 1, 3)  # a list (from JSON) is kept as a tuple
    widths = [(s.blocks[0].conv1.in_channels, s.blocks[-1].conv3.out_channels)
              for s in net.stages]
    assert widths == [(4, 16), (16, 32), (32, 64)]
    assert [s.blocks[0].conv2.stride for s in net.stages] == [(1, 1), (2, 2), (2, 2)]
    assert [len(s.blocks) for s in net.stages] == [2, 1, 3]
    assert net.out_chans == 64 and net.reduction == 4
    x = torch.randn(1, 1, 12, 9)
    torch.testing.assert_close(net(x), net.stages(net.stem(x)))
    assert net(x).shape == (1, 64, 3, 3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    # He init, fan-out: std sqrt(2 / (out * k * k)) for every convolution
    big = max(convs, key=lambda m: m.weight.numel())
    fan_out = big.out_channels * big.kernel_size[0] * big.kernel_size[1]
    assert abs(big.weight.std().item() / math.sqrt(2 / fan_out) - 1) < 0.15


def test_hybrid_tokens_are_the_feature_pixels_row_by_row():
    embed = HybridEmbed(img_size=(12, 20), in_chans=1, embed_dim=8, layers=(1, 1),
                        stem="small", width=4)
    assert embed.grid_size == (6, 10) and embed.num_patches == 60
    assert embed.patch_size == (1, 1)
    x = torch.randn(2, 1, 12, 20)
    feats = embed.backbone(x)  # (B, 32, 6, 10)
    tokens = embed(x)
    proj = embed.proj.weight[:, :, 0, 0]  # (D, C): a 1x1 conv is one Linear per pixel
    for r, c in [(0, 0), (0, 9), (5, 3), (2, 7)]:
        torch.testing.assert_close(tokens[:, 10 * r + c],
                                   feats[:, :, r, c] @ proj.T + embed.proj.bias,
                                   atol=1e-5, rtol=1e-5)
