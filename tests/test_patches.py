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
from vit_tutorial.patches import to_2tuple


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


def test_patchify_non_square_patches_by_hand():
    x = torch.randn(2, 3, 4, 9)
    p = patchify(x, (2, 3))  # a 2x3 grid of 2x3 patches
    assert p.shape == (2, 6, 18)
    for r in range(2):
        for c in range(3):
            patch = x[:, :, 2 * r : 2 * r + 2, 3 * c : 3 * c + 3]  # (B, C, p1, p2)
            torch.testing.assert_close(p[:, 3 * r + c], patch.permute(0, 2, 3, 1).reshape(2, 18))
    torch.testing.assert_close(unpatchify(p, (2, 3), grid_size=(2, 3), channels=3), x)


def test_to_2tuple():
    assert to_2tuple(5) == (5, 5)
    assert to_2tuple([3, 4]) == (3, 4) and isinstance(to_2tuple([3, 4]), tuple)
    with pytest.raises(TypeError, match="an int or a pair of ints"):
        to_2tuple((1, 2, 3))


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match=r"image size 30x28 is not divisible by patch size 4x4"):
        patchify(torch.zeros(1, 1, 30, 28), 4)


def test_unpatchify_infers_a_square_grid_and_the_channels():
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(unpatchify(patchify(x, 4), 4), x)  # 16 patches: 4x4
    torch.testing.assert_close(unpatchify(patchify(x[:, :1], 8), 8), x[:, :1])  # 2x2, C=1


def test_unpatchify_takes_an_int_grid_and_non_square_patches():
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(unpatchify(patchify(x, 4), 4, grid_size=3), x)
    y = torch.randn(2, 3, 8, 9)  # patches of 2 rows and 3 columns: a 4x3 grid
    torch.testing.assert_close(unpatchify(patchify(y, (2, 3)), (2, 3), grid_size=(4, 3)), y)


def test_non_square_patch_weights_convert_both_ways():
    conv = PatchEmbed(img_size=(8, 9), patch_size=(2, 3), in_chans=2, embed_dim=5)
    lin = LinearPatchEmbed(img_size=(8, 9), patch_size=(2, 3), in_chans=2, embed_dim=5)
    lin.proj.load_state_dict(conv_to_linear_weights(conv.proj))
    x = torch.randn(2, 2, 8, 9)
    torch.testing.assert_close(lin(x), conv(x), atol=1e-5, rtol=1e-5)
    back = PatchEmbed(img_size=(8, 9), patch_size=(2, 3), in_chans=2, embed_dim=5)
    back.proj.load_state_dict(linear_to_conv_weights(lin.proj, (2, 3), 2))
    torch.testing.assert_close(back.proj.weight, conv.proj.weight)


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
    H, W = conv.img_size
    assert conv.grid_size == lin.grid_size == (H // patch, W // patch)


def test_patch_embed_by_hand():
    # token 3r + c is E applied to the patch at grid row r, column c (eq. 1), plus the bias
    pe = PatchEmbed(img_size=(16, 24), patch_size=8, in_chans=2, embed_dim=5)
    assert pe.grid_size == (2, 3) and pe.num_patches == 6 and pe.patch_size == (8, 8)
    x = torch.randn(3, 2, 16, 24)
    tokens = pe(x)
    assert tokens.shape == (3, 6, 5)
    W = pe.proj.weight.reshape(5, -1)  # (D, C*P*P)
    for r in range(2):
        for c in range(3):
            patch = x[:, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8].reshape(3, -1)
            torch.testing.assert_close(tokens[:, 3 * r + c], patch @ W.T + pe.proj.bias,
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chans", [1, 2])  # with one channel the rearrange is only a view
def test_weight_conversions_are_detached_copies(chans):
    conv = PatchEmbed(img_size=8, patch_size=4, in_chans=chans, embed_dim=3).proj
    lin = torch.nn.Linear(16 * chans, 3)
    for out, module in [(conv_to_linear_weights(conv), conv),
                        (linear_to_conv_weights(lin, 4, chans), lin)]:
        assert set(out) == {"weight", "bias"}
        for name, t in out.items():
            assert not t.requires_grad
            assert t.untyped_storage().data_ptr() != getattr(
                module, name).untyped_storage().data_ptr()
    no_bias = torch.nn.Conv2d(2, 3, 4, stride=4, bias=False)
    assert set(conv_to_linear_weights(no_bias)) == {"weight"}
    assert set(linear_to_conv_weights(torch.nn.Linear(32, 3, bias=False), 4, 2)) == {"weight"}


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
    linear = LinearPatchEmbed(img_size=28, patch_size=4, in_chans=1, embed_dim=8)
    with pytest.raises(ValueError, match="expected 1 input channels, got 3"):
        linear(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"image size 32x32 does not match the model's 28x28"):
        linear(torch.zeros(1, 1, 32, 32))
