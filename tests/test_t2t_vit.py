"""The T2T-ViT backbone: a VisionTransformer whose tokenizer is the T2T module."""

import math

import pytest
import torch

from vit_tutorial import count_parameters, create_model, sincos_1d_table

# Exact counts of our T2T-ViT_t (transformer token layers), 1000 classes, 224x224.
# The paper (Yuan et al. 2021, Table 1) reports 4.3 / 6.9 / 21.5 / 39.2 / 64.1 M for
# T2T-ViT-7 / 12 / 14 / 19 / 24. Two differences explain every gap:
# * the official code keeps the fixed sinusoid table as an nn.Parameter with
#   requires_grad=False, so `parameters()` counts its (N + 1) * D = 197 * D entries; ours is a
#   non-persistent buffer (it is a function of the grid, not a weight);
# * the paper's T2T-ViT-7/12 numbers are for Performer token layers, whose fixed random
#   features `w` (2 x 32 x 64 = 4,096 entries) and kqv biases (384) add 4,480.
# mmpretrain's configs/t2t_vit/README.md lists T2T-ViT_t-14 / 19 / 24 (converted from the
# official weights) at 21.47 / 39.08 / 64.00 M: ours to the digit (test below). No source
# gives T2T-ViT_t-7 / 10 / 12 (transformer layers) or T2T-ViT-10: those pins are our own.
# tests/test_vit.py checks that every preset has a pinned count, these included.
EXPECTED = {
    "t2t_vit_7": 4_255_310,
    "t2t_vit_10": 5_834_318,
    "t2t_vit_12": 6_886_990,
    "t2t_vit_14": 21_465_422,
    "t2t_vit_19": 39_084_686,
    "t2t_vit_24": 64_000_590,
}
PAPER_M = {"t2t_vit_7": 4.3, "t2t_vit_12": 6.9, "t2t_vit_14": 21.5, "t2t_vit_19": 39.2,
           "t2t_vit_24": 64.1}
MMPRETRAIN_M = {"t2t_vit_14": 21.47, "t2t_vit_19": 39.08, "t2t_vit_24": 64.00}


def meta_count(name, **kw):
    with torch.device("meta"):
        return count_parameters(create_model(name, **kw))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_counts(name):
    assert meta_count(name) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(MMPRETRAIN_M))
def test_counts_round_to_mmpretrain(name):
    assert round(EXPECTED[name] / 1e6, 2) == MMPRETRAIN_M[name]


@pytest.mark.parametrize("name", sorted(PAPER_M))
def test_counts_as_the_official_code_reports_them_round_to_the_paper(name):
    with torch.device("meta"):
        model = create_model(name, t2t_token_type="performer")
    official = count_parameters(model) + model.pos_embed.weight.numel()  # + the frozen table
    assert round(official / 1e6, 1) == PAPER_M[name]


def test_backbone_details_follow_the_official_code():
    model = create_model("t2t_vit_7", img_size=64)
    assert model.patch_embed.grid_size == (4, 4)
    assert model.blocks[0].attn.qkv.bias is None  # qkv_bias=False
    assert model.blocks[0].norm1.eps == 1e-5
    assert "pos_embed.weight" not in model.state_dict()  # fixed, recomputed from the grid
    table = model.pos_embed.weight[0]
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0] * 128))  # sin 0, cos 0
    # the official get_sinusoid_encoding over 1 + 16 positions, class token first
    assert table.shape == (17, 256)
    torch.testing.assert_close(table[5, 2], torch.tensor(math.sin(5 / 10000 ** (2 / 256))))
    torch.testing.assert_close(table[16, 255], torch.tensor(math.cos(16 / 10000 ** (254 / 256))))
    torch.testing.assert_close(table, sincos_1d_table(17, 256))


def test_small_t2t_runs_on_fashion_mnist_shapes():
    model = create_model("t2t_vit_mini_28").eval()
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    assert model.get_attention_maps(x).shape == (9, 2, 3, 50, 50)


def test_t2t_vit_forward_written_out():
    # tokens from T2T, the class token, the fixed 1-D table, the blocks, LN, the head
    model = create_model("t2t_vit_mini_28", depth=2).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        tokens = model.patch_embed(x)  # (B, 49, 192)
        z = torch.cat([model.cls_token.weight.expand(2, 1, 192), tokens], dim=1)
        z = z + sincos_1d_table(50, 192)
        for block in model.blocks:
            z = block(z)
        expected = model.head(model.norm(z)[:, 0])
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
