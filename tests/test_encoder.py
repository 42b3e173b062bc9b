import pytest
import torch

from vit_tutorial import Block, DropPath, Encoder, drop_path


def test_block_parameter_count_formula():
    # Per block: qkv 3D^2+3D, proj D^2+D, MLP 8D^2+4D+D, two LayerNorms 4D -> 12D^2 + 13D.
    for D in (64, 192, 768):
        block = Block(D, num_heads=4, mlp_ratio=4.0)
        assert sum(p.numel() for p in block.parameters()) == 12 * D * D + 13 * D


def test_block_is_pre_norm_with_residuals():
    torch.manual_seed(0)
    block = Block(16, num_heads=2).eval()
    x = torch.randn(2, 5, 16)
    z1 = x + block.attn(block.norm1(x))
    z2 = z1 + block.mlp(block.norm2(z1))
    torch.testing.assert_close(block(x), z2)
    out, weights = block(x, return_attention=True)
    torch.testing.assert_close(out, z2, atol=1e-5, rtol=1e-5)
    assert weights.shape == (2, 2, 5, 5)


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(10_000, 3, 4)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    # each sample is either all zeros or all 1/0.75
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1))
    assert abs(y.mean().item() - 1.0) < 0.03
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    assert torch.equal(DropPath(0.5).eval()(x), x)
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\), got 1.0"):
        DropPath(1.0)


def test_encoder_stochastic_depth_schedule_and_maps():
    enc = Encoder(depth=4, dim=8, num_heads=2, drop_path_rate=0.3)
    rates = [b.drop_path1.drop_prob for b in enc]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    enc.eval()
    x = torch.randn(1, 3, 8)
    out, maps = enc(x, return_attention=True)
    assert len(maps) == 4 and maps[0].shape == (1, 2, 3, 3)
    torch.testing.assert_close(out, enc(x), atol=1e-5, rtol=1e-5)
