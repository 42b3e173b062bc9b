import math

import pytest
import torch

from vit_tutorial import Block, DropPath, Encoder, Mlp, count_parameters, drop_path
from vit_tutorial.encoder import init_weights


def test_init_weights_is_truncated_normal_002_with_zero_biases():
    lin, norm, conv = torch.nn.Linear(400, 500), torch.nn.LayerNorm(8), torch.nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        norm.weight.fill_(3.0)
        norm.bias.fill_(1.0)
    conv_before = conv.weight.clone()
    for m in (lin, norm, conv):
        m.apply(init_weights)
    assert abs(lin.weight.std().item() - 0.02) < 0.0005  # 200,000 draws
    assert lin.weight.abs().max() <= 2.0 and torch.count_nonzero(lin.bias) == 0
    assert torch.equal(norm.weight, torch.ones(8)) and torch.equal(norm.bias, torch.zeros(8))
    assert torch.equal(conv.weight, conv_before)  # convolutions keep PyTorch's default


def test_block_parameter_count_formula():
    # Per block: qkv 3D^2+3D, proj D^2+D, MLP 8D^2+4D+D, two LayerNorms 4D -> 12D^2 + 13D.
    for D in (64, 192, 768):
        block = Block(D, num_heads=4, mlp_ratio=4.0)
        assert count_parameters(block) == 12 * D * D + 13 * D


def test_mlp_is_linear_exact_gelu_linear():
    mlp = Mlp(6, 10, 4).eval()
    assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features) == (6, 10, 4)
    x = torch.randn(2, 3, 6)
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # the exact GELU, not the tanh one
    torch.testing.assert_close(mlp(x), h @ mlp.fc2.weight.T + mlp.fc2.bias)
    default = Mlp(6)
    assert (default.fc1.out_features, default.fc2.out_features) == (6, 6)
    dropping = Mlp(6, 10, 4, drop=0.5).train()  # dropout after the GELU and after fc2
    zeros = (dropping(torch.randn(100, 10, 6)) == 0).float().mean()
    assert 0.45 < zeros < 0.55


def test_block_is_pre_norm_with_residuals():
    block = Block(16, num_heads=2).eval()
    assert block.norm1.eps == block.norm2.eps == 1e-6
    assert block.mlp.fc1.out_features == 64  # mlp_ratio 4
    x = torch.randn(2, 5, 16)
    z1 = x + block.attn(block.norm1(x))
    z2 = z1 + block.mlp(block.norm2(z1))
    torch.testing.assert_close(block(x), z2)
    out, weights = block(x, return_attention=True)
    torch.testing.assert_close(out, z2, atol=1e-5, rtol=1e-5)
    assert weights.shape == (2, 2, 5, 5)
    # the weights are those of the first sub-layer, which sees LN(x)
    _, expected = block.attn(block.norm1(x), return_attention=True)
    torch.testing.assert_close(weights, expected)


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean():
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
    module = DropPath(0.25).train()  # the module calls drop_path with its rate in training
    per_sample = module(x).flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1))
    assert 0.2 < (per_sample == 0).all(1).float().mean() < 0.3
    assert "drop_prob=0.25" in repr(module)


def test_block_drops_each_residual_branch_per_sample_in_training():
    block = Block(8, num_heads=2, drop_path=0.5).train()
    x = torch.randn(64, 3, 8)
    rng = torch.get_rng_state()
    out = block(x)
    torch.set_rng_state(rng)  # the same two masks, drawn in the block's order
    y = x + drop_path(block.attn(block.norm1(x)), 0.5, training=True)
    y = y + drop_path(block.mlp(block.norm2(y)), 0.5, training=True)
    torch.testing.assert_close(out, y)
    kept = (out - x).flatten(1).abs().amax(1) > 0  # at least one branch kept for the sample
    assert 0 < kept.sum() < 64


def test_encoder_stochastic_depth_schedule_and_maps():
    enc = Encoder(depth=4, dim=8, num_heads=2, drop_path_rate=0.3)
    rates = [b.drop_path1.drop_prob for b in enc]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [b.drop_path2.drop_prob for b in enc] == rates
    assert Encoder(depth=1, dim=8, num_heads=2, drop_path_rate=0.3)[0].drop_path1.drop_prob == 0
    enc.eval()
    x = torch.randn(1, 3, 8)
    out, maps = enc(x, return_attention=True)
    assert len(maps) == 4 and maps[0].shape == (1, 2, 3, 3)
    torch.testing.assert_close(out, enc(x), atol=1e-5, rtol=1e-5)
    # block l's map is taken on block l's input: the output of blocks 1..l-1, in order
    h = x
    for block, weights in zip(enc, maps, strict=True):
        _, expected = block.attn(block.norm1(h), return_attention=True)
        torch.testing.assert_close(weights, expected)
        h = block(h)
    torch.testing.assert_close(out, h, atol=1e-5, rtol=1e-5)
