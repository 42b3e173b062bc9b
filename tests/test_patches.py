import pytest
import torch

from vit_tutorial import (
    LinearPatchEmbed,
    PatchEmbed,
    conv_to_linear_weights,
    linear_to_conv_weights,
    patchify,
    unpatchify,
)


def test_patchify_shape_and_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    p = patchify(x, 2)
    assert p.shape == (2, (4 // 2) * (6 // 2), 2 * 2 * 3)
    # patch 1 is row 0, column 1 of the grid: pixels rows 0-1, columns 2-3, order (p1 p2 c)
    expected = x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(p[0, 1], expected)


@pytest.mark.parametrize("size,patch", [((28, 28), 4), ((28, 28), 7), ((32, 48), (8, 16))])
def test_unpatchify_inverts_patchify(size, patch):
    x = torch.randn(3, 2, *size)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    grid = (size[0] // ph, size[1] // pw)
    torch.testing.assert_close(unpatchify(patchify(x, patch), patch, grid), x)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match=r"image size 30x28 is not divisible by patch size 4x4"):
        patchify(torch.zeros(1, 1, 30, 28), 4)


def test_unpatchify_needs_grid_for_non_square():
    with pytest.raises(ValueError, match="square grid"):
        unpatchify(torch.zeros(1, 6, 16), 4)


@pytest.mark.parametrize("img_size,patch,chans", [(28, 4, 1), (32, 8, 3), ((16, 24), 8, 3)])
def test_conv_and_linear_patch_embeddings_agree(img_size, patch, chans):
    conv = PatchEmbed(img_size=img_size, patch_size=patch, in_chans=chans, embed_dim=16)
    lin = LinearPatchEmbed(img_size=img_size, patch_size=patch, in_chans=chans, embed_dim=16)
    lin.proj.load_state_dict(conv_to_linear_weights(conv.proj))
    x = torch.randn(2, chans, *conv.img_size)
    torch.testing.assert_close(lin(x), conv(x), atol=1e-5, rtol=1e-5)
    # and back again
    conv2 = PatchEmbed(img_size=img_size, patch_size=patch, in_chans=chans, embed_dim=16)
    conv2.proj.load_state_dict(linear_to_conv_weights(lin.proj, patch, chans))
    torch.testing.assert_close(conv2(x), conv(x))
    assert conv.num_patches == conv.grid_size[0] * conv.grid_size[1]


def test_patch_embed_errors_name_expected_and_received():
    pe = PatchEmbed(img_size=28, patch_size=4, in_chans=1, embed_dim=8)
    with pytest.raises(ValueError, match="expected 1 input channels, got 3"):
        pe(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"image size 32x32 does not match the model's 28x28.*"
                                         r"resample_pos_embed"):
        pe(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        pe(torch.zeros(1, 28, 28))
    with pytest.raises(TypeError, match="torch.Tensor"):
        pe([[0.0]])
    with pytest.raises(ValueError, match="not divisible by patch size"):
        PatchEmbed(img_size=30, patch_size=4)
