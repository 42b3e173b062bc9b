"""Tests for vit_tutorial/t2t.py: soft split, re-structurization, token layers, T2TModule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vit_tutorial import count_parameters
from vit_tutorial.t2t import (
    T2TModule,
    TokenAttention,
    TokenPerformer,
    TokenTransformer,
    orthogonal_random_features,
    restructurize,
    soft_split,
    split_grid,
    stage_grids,
)

PAPER_KERNELS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
MNIST_KERNELS = ((5, 2, 2), (3, 2, 1), (3, 1, 1))  # 28 -> 14 -> 7 -> 7
TOKEN_TYPES = ["transformer", "performer"]


# --- soft split, re-structurization, grid sizes ------------------------------------------


def test_soft_split_equals_manual_window_extraction():
    B, C, H, W, k, s, p = 2, 2, 5, 6, 3, 2, 1
    x = torch.randn(B, C, H, W)
    tokens = soft_split(x, kernel_size=k, stride=s, padding=p)
    padded = F.pad(x, (p, p, p, p))  # zeros around the border, as Unfold pads
    rows, cols = split_grid(H, k, s, p), split_grid(W, k, s, p)
    manual = [
        padded[:, :, r * s : r * s + k, c * s : c * s + k].reshape(B, C * k * k)  # (c, i, j)
        for r in range(rows)
        for c in range(cols)  # windows row by row
    ]
    torch.testing.assert_close(tokens, torch.stack(manual, dim=1))
    assert tokens.shape == (B, rows * cols, C * k * k)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_restructurize_inverts_the_token_layout(grid):
    h, w = grid
    image = torch.randn(2, 7, h, w)
    tokens = image.flatten(2).transpose(1, 2)  # (B, N, C), token r*w + c is pixel (r, c)
    torch.testing.assert_close(restructurize(tokens, grid), image)
    torch.testing.assert_close(restructurize(tokens, grid)[:, :, 1, 2], tokens[:, 1 * w + 2])


def test_restructurize_of_a_soft_split_with_kernel_one_is_the_identity():
    x = torch.randn(1, 3, 6, 4)
    tokens = soft_split(x, kernel_size=1, stride=1, padding=0)
    torch.testing.assert_close(restructurize(tokens, (6, 4)), x)


@pytest.mark.parametrize("size", [7, 8, 14, 28, 31, 56, 224])
@pytest.mark.parametrize("kernel", [(7, 4, 2), (3, 2, 1), (3, 1, 1), (5, 2, 2), (2, 2, 0)])
def test_split_grid_matches_unfold(size, kernel):
    k, s, p = kernel
    expected = split_grid(size, k, s, p)
    if expected < 1:
        pytest.skip("schedule too coarse for this size")
    out = nn.Unfold(kernel_size=k, stride=s, padding=p)(torch.zeros(1, 1, size, size))
    assert out.shape[-1] == expected * expected


# --- T2TModule shapes -------------------------------------------------------------------


@pytest.mark.parametrize("token_type", TOKEN_TYPES)
def test_t2t_at_224_gives_196_tokens(token_type):
    t2t = T2TModule(img_size=224, embed_dim=32, token_dim=16, token_type=token_type).eval()
    assert t2t.grid_size == (14, 14) and t2t.num_patches == 196
    assert t2t.stage_grids == ((56, 56), (28, 28), (14, 14))
    with torch.no_grad():
        tokens, stages = t2t(torch.randn(2, 3, 224, 224), return_stages=True)
    assert tokens.shape == (2, 196, 32)
    assert [tuple(s.shape) for s in stages] == [(2, 3136, 16), (2, 784, 16), (2, 196, 32)]
    torch.testing.assert_close(stages[-1], tokens)


@pytest.mark.parametrize("token_type", TOKEN_TYPES)
def test_fashion_mnist_schedule_gives_49_tokens(token_type):
    t2t = T2TModule(
        img_size=28, in_chans=1, embed_dim=48, token_type=token_type, kernels=MNIST_KERNELS
    )
    assert t2t.stage_grids == ((14, 14), (7, 7), (7, 7))
    assert t2t.grid_size == (7, 7) and t2t.num_patches == 49
    assert (t2t.img_size, t2t.in_chans, t2t.embed_dim, t2t.token_dim, t2t.token_type) == (
        (28, 28), 1, 48, 64, token_type)
    assert t2t.attention1.norm1.normalized_shape == (1 * 5 * 5,)
    assert t2t(torch.randn(3, 1, 28, 28)).shape == (3, 49, 48)


@pytest.mark.parametrize("token_type", TOKEN_TYPES)
def test_non_square_images(token_type):
    # rows 32 -> 8 -> 4 -> 2, columns 48 -> 12 -> 6 -> 3
    t2t = T2TModule(img_size=(32, 48), embed_dim=24, token_dim=8, token_type=token_type)
    assert t2t.img_size == (32, 48)
    assert t2t.stage_grids == ((8, 12), (4, 6), (2, 3))
    assert t2t.grid_size == (2, 3) and t2t.num_patches == 6
    tokens, stages = t2t(torch.randn(2, 3, 32, 48), return_stages=True)
    assert tokens.shape == (2, 6, 24)
    assert [s.shape[1] for s in stages] == [96, 24, 6]
    assert restructurize(stages[0], t2t.stage_grids[0]).shape == (2, 8, 8, 12)
    assert "grids 32x48 -> 8x12 -> 4x6 -> 2x3" in repr(t2t)  # rows before columns


def test_kernels_given_as_lists_become_triples():
    kernels = [[5, 2, 2], [3, 2, 1], [3, 1, 1]]
    t2t = T2TModule(img_size=28, in_chans=1, embed_dim=8, token_dim=4, kernels=kernels)
    assert t2t.kernels == ((5, 2, 2), (3, 2, 1), (3, 1, 1))
    assert stage_grids(28, [[5, 2, 2]]) == stage_grids((28, 28), ((5, 2, 2),)) == ((14, 14),)


def t2t_by_hand(t2t: T2TModule, x: torch.Tensor, kernels) -> list[torch.Tensor]:
    """Section 3.1 step by step, from the schedule alone: the tokens after each stage."""
    stages, image = [], x
    layers = [getattr(t2t, f"attention{i}") for i in range(1, len(kernels))] + [t2t.project]
    for (k, s, p), layer in zip(kernels, layers, strict=True):
        B, C, H, W = image.shape
        rows, cols = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
        padded = F.pad(image, (p, p, p, p))
        windows = [padded[:, :, r * s : r * s + k, c * s : c * s + k].reshape(B, C * k * k)
                   for r in range(rows) for c in range(cols)]  # soft split, row by row
        tokens = layer(torch.stack(windows, dim=1))  # (B, rows * cols, D)
        stages.append(tokens)
        image = torch.zeros(B, tokens.shape[-1], rows, cols)  # re-structurization
        for r in range(rows):
            for c in range(cols):
                image[:, :, r, c] = tokens[:, r * cols + c]
    return stages


@pytest.mark.parametrize("token_type", TOKEN_TYPES)
@pytest.mark.parametrize(
    "img_size, kernels",
    [((32, 48), PAPER_KERNELS), (28, MNIST_KERNELS), ((20, 13), ((3, 2, 0), (2, 1, 1), (3, 3, 1)))],
)
def test_t2t_stages_equal_the_written_out_soft_splits(token_type, img_size, kernels):
    t2t = T2TModule(img_size=img_size, in_chans=2, embed_dim=12, token_dim=8,
                    token_type=token_type, kernels=kernels).eval()
    x = torch.randn(2, 2, *t2t.img_size)
    with torch.no_grad():
        tokens, stages = t2t(x, return_stages=True)
        expected = t2t_by_hand(t2t, x, kernels)
    assert len(stages) == 3
    for got, want in zip(stages, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens, expected[-1], atol=1e-5, rtol=1e-5)
    assert [s.shape[1] for s in stages] == [h * w for h, w in t2t.stage_grids]


@pytest.mark.parametrize("token_type", TOKEN_TYPES)
def test_t2t_layers_and_init_follow_the_official_code(token_type):
    t2t = T2TModule(img_size=28, in_chans=1, embed_dim=48, token_dim=16, token_type=token_type,
                    kernels=MNIST_KERNELS)
    for layer in (t2t.attention1, t2t.attention2):
        if token_type == "transformer":
            assert layer.attn.num_heads == 1 and layer.mlp.fc1.out_features == 16
        else:
            assert layer.m == 8  # kernel_ratio 0.5
            torch.testing.assert_close(layer.w @ layer.w.T, 8.0 * torch.eye(8))  # kept its draw
    linears = [m for m in t2t.modules() if isinstance(m, nn.Linear)]
    assert all(m.bias is None or not m.bias.any() for m in linears)
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 0.002  # trunc_normal_(std=0.02)
    for m in t2t.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    assert "grids 28x28 -> 14x14 -> 7x7 -> 7x7" in repr(t2t)
    assert "kernels=((5, 2, 2), (3, 2, 1), (3, 1, 1))" in repr(t2t)


# --- parameter counts, by formula -------------------------------------------------------


def linear(n_in, n_out, bias=True):
    return n_in * n_out + (n_out if bias else 0)


def layer_norm(d):
    return 2 * d  # weight and bias


def token_transformer_params(dim, in_dim, mlp_ratio=1.0):
    hidden = int(in_dim * mlp_ratio)
    return (
        layer_norm(dim)  # norm1
        + linear(dim, 3 * in_dim, bias=False)  # attn.qkv
        + linear(in_dim, in_dim)  # attn.proj
        + layer_norm(in_dim)  # norm2
        + linear(in_dim, hidden)  # mlp.fc1
        + linear(hidden, in_dim)  # mlp.fc2
    )


def token_performer_params(dim, in_dim, kernel_ratio=0.5):
    return (
        layer_norm(dim)  # norm1
        + linear(dim, 3 * in_dim)  # kqv, with bias
        + linear(in_dim, in_dim)  # proj
        + layer_norm(in_dim)  # norm2
        + linear(in_dim, in_dim)  # mlp.0
        + linear(in_dim, in_dim)  # mlp.2
        + int(in_dim * kernel_ratio) * in_dim  # w, fixed but stored
    )


def t2t_params(token_type, embed_dim, in_chans=3, token_dim=64):
    layer = token_transformer_params if token_type == "transformer" else token_performer_params
    return (
        layer(in_chans * 7 * 7, token_dim)  # attention1 on 7x7 windows of the image
        + layer(token_dim * 3 * 3, token_dim)  # attention2 on 3x3 windows of tokens
        + linear(token_dim * 3 * 3, embed_dim)  # project
    )


EXPECTED_PARAMS = {  # the formula above, evaluated, to pin the numbers
    ("transformer", 256): 313_190,
    ("transformer", 384): 387_046,
    ("performer", 256): 317_670,
    ("performer", 384): 391_526,
}


@pytest.mark.parametrize("token_type", TOKEN_TYPES)
@pytest.mark.parametrize("embed_dim", [256, 384])
def test_exact_parameter_counts(token_type, embed_dim):
    t2t = T2TModule(img_size=224, embed_dim=embed_dim, token_type=token_type)
    n = count_parameters(t2t)
    assert n == t2t_params(token_type, embed_dim) == EXPECTED_PARAMS[token_type, embed_dim]


@pytest.mark.parametrize("token_type", TOKEN_TYPES)
def test_state_dict_keys_follow_the_official_names(token_type):
    t2t = T2TModule(img_size=224, embed_dim=64, token_type=token_type)
    if token_type == "transformer":
        layer = [
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight",
            "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
            "mlp.fc2.weight", "mlp.fc2.bias",
        ]  # fmt: skip
    else:
        layer = [
            "kqv.weight", "kqv.bias", "proj.weight", "proj.bias", "norm1.weight", "norm1.bias",
            "norm2.weight", "norm2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
            "mlp.2.bias", "w",
        ]  # fmt: skip
    expected = {f"attention{i}.{k}" for i in (1, 2) for k in layer}
    expected |= {"project.weight", "project.bias"}
    assert set(t2t.state_dict()) == expected


# --- the token transformer --------------------------------------------------------------


def test_token_attention_skip_connection_goes_through_v():
    dim, in_dim = 12, 8
    attn = TokenAttention(dim, in_dim)
    x = torch.randn(2, 5, dim)
    v = x @ attn.qkv.weight[2 * in_dim :].t()  # (B, N, in_dim), the last third of qkv
    with torch.no_grad():
        attn.proj.weight.zero_()
        attn.proj.bias.zero_()
    torch.testing.assert_close(attn(x), v)  # the attention branch is off: only v is left


def test_token_attention_written_out():
    dim, in_dim = 12, 8
    attn = TokenAttention(dim, in_dim)
    x = torch.randn(2, 5, dim)
    q, k, v = (x @ attn.qkv.weight.t()).split(in_dim, dim=-1)
    # The scale uses the input width dim, not in_dim (a quirk of the official code).
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim), dim=-1)
    expected = v + attn.proj(weights @ v)
    torch.testing.assert_close(attn(x), expected)
    out, w = attn(x, return_attention=True)  # the written-out path agrees with the fused one
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(w[:, 0], weights)


def test_token_attention_with_two_heads_written_out():
    # The presets use one head; with two, each head takes its half of q, k and v.
    dim, in_dim, heads = 12, 8, 2
    attn = TokenAttention(dim, in_dim, num_heads=heads)
    assert attn.scale == (dim // heads) ** -0.5
    x = torch.randn(2, 5, dim)
    q, k, v = (x @ attn.qkv.weight.t()).split(in_dim, dim=-1)  # each (B, N, in_dim)
    outs, maps = [], []
    for h in range(heads):
        part = slice(h * 4, (h + 1) * 4)
        w = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) * attn.scale, dim=-1)
        outs.append(w @ v[..., part])
        maps.append(w)
    expected = v + attn.proj(torch.cat(outs, dim=-1))
    torch.testing.assert_close(attn(x), expected)
    out, weights = attn(x, return_attention=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, torch.stack(maps, dim=1))


def test_token_transformer_written_out():
    dim, in_dim = 12, 8
    layer = TokenTransformer(dim, in_dim)
    assert layer.norm1.eps == 1e-5 and layer.norm2.eps == 1e-5  # PyTorch's default
    assert layer.attn.qkv.bias is None
    assert layer.mlp.fc1.out_features == in_dim  # mlp_ratio = 1
    x = torch.randn(2, 5, dim)
    y = layer.attn(layer.norm1(x))  # no residual around attention: widths differ
    expected = y + layer.mlp.fc2(F.gelu(layer.mlp.fc1(layer.norm2(y))))
    torch.testing.assert_close(layer(x), expected)
    wide = TokenTransformer(dim, in_dim, mlp_ratio=2.0)
    assert (wide.mlp.fc1.in_features, wide.mlp.fc1.out_features) == (in_dim, 2 * in_dim)
    assert wide.mlp.fc2.out_features == in_dim


# --- the token performer ----------------------------------------------------------------


def test_performer_w_is_fixed_and_stored():
    layer = TokenPerformer(10, 16, kernel_ratio=0.5)
    assert layer.w.shape == (8, 16) and not layer.w.requires_grad
    assert "w" in layer.state_dict()
    assert any(p is layer.w for p in layer.parameters())
    torch.testing.assert_close(layer.w @ layer.w.t(), 8.0 * torch.eye(8))  # rows: length sqrt(m)
    layer(torch.randn(2, 6, 10)).sum().backward()
    assert layer.w.grad is None and layer.kqv.weight.grad is not None


def test_performer_linear_attention_equals_its_quadratic_form():
    layer = TokenPerformer(10, 16).eval()  # eval: no dropout
    x = torch.randn(2, 7, 10)
    assert layer(x).shape == (2, 7, 16)
    k, q, v = layer.kqv(x).split(16, dim=-1)  # the official order is k, q, v
    kernel = layer.feature_map(q) @ layer.feature_map(k).transpose(1, 2)  # (B, N, N)
    weights = kernel / (kernel.sum(dim=-1, keepdim=True) + layer.epsilon)
    torch.testing.assert_close(layer.attention(x), v + layer.proj(weights @ v))


def test_performer_feature_map_by_hand():
    layer = TokenPerformer(4, 4, kernel_ratio=0.5)  # m = 2 random features
    with torch.no_grad():
        layer.w.copy_(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 2.0, -1.0, 0.0]]))
    x = torch.tensor([[[0.5, -1.0, 0.25, 0.0]]])  # |x|^2 / 2 = 0.65625
    expected = torch.tensor([[[math.exp(0.5 - 0.65625), math.exp(-2.25 - 0.65625)]]])
    torch.testing.assert_close(layer.feature_map(x), expected / math.sqrt(2))


def test_performer_layer_written_out():
    layer = TokenPerformer(10, 16).eval()
    assert layer.norm1.eps == layer.norm2.eps == 1e-5
    x = torch.randn(2, 7, 10)
    y = layer.attention(layer.norm1(x))
    mlp = layer.mlp
    expected = y + mlp[2](F.gelu(mlp[0](layer.norm2(y))))
    torch.testing.assert_close(layer(x), expected)


def test_performer_dropout_acts_on_the_projection_in_training_only():
    layer = TokenPerformer(10, 16, dropout=0.5)
    x = torch.randn(2, 7, 10)
    torch.manual_seed(0)
    trained = layer.train().attention(x)
    layer.eval()
    assert not torch.allclose(trained, layer.attention(x))
    v = layer.kqv(x).split(16, dim=-1)[2]
    # dropout zeroes about half of proj(y), leaving the skip v alone in those places
    assert 0.3 < (trained == v).float().mean() < 0.7


def test_performer_runs_in_bfloat16_with_float32_features():
    layer = TokenPerformer(10, 16).eval()
    x = torch.randn(2, 7, 10)
    half = TokenPerformer(10, 16).eval().to(torch.bfloat16)
    half.load_state_dict(layer.state_dict())
    k = torch.randn(2, 7, 16, dtype=torch.bfloat16)
    assert layer.feature_map(k).dtype == torch.float32
    torch.testing.assert_close(layer.feature_map(k), layer.feature_map(k.float()))
    out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x), atol=0.1, rtol=0.05)


def test_performer_features_estimate_the_softmax_kernel():
    # With kernel_ratio=1 the rows have length sqrt(dim), the FAVOR+ setting, and
    # phi(q) . phi(k) averages to about exp(q . k); one draw is much noisier.
    d = 16
    layer = TokenPerformer(4, d, kernel_ratio=1.0)
    q, k = 0.15 * torch.randn(1, 6, d), 0.15 * torch.randn(1, 6, d)
    exact = torch.exp(q @ k.transpose(1, 2))  # (1, 6, 6), entries roughly 0.85 .. 1.2
    total = torch.zeros_like(exact)
    draws = 2000
    with torch.no_grad():
        for _ in range(draws):
            layer.w.copy_(orthogonal_random_features(d, d))
            total += layer.feature_map(q) @ layer.feature_map(k).transpose(1, 2)
    torch.testing.assert_close(total / draws, exact, rtol=0.06, atol=0.0)


# --- errors at the boundary -------------------------------------------------------------


def test_wrong_input_raises_naming_expected_and_received():
    t2t = T2TModule(img_size=28, in_chans=1, embed_dim=16, token_dim=8, kernels=MNIST_KERNELS)
    with pytest.raises(ValueError, match=r"expected 1 input channels, got 3"):
        t2t(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"32x32 does not match the model's 28x28"):
        t2t(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        t2t(torch.randn(1, 28, 28))


def test_too_coarse_schedule_raises_naming_size_and_schedule():
    with pytest.raises(ValueError, match=r"\(\(7, 4, 2\), \(3, 2, 1\), \(3, 2, 1\)\).*2x2"):
        T2TModule(img_size=2, kernels=PAPER_KERNELS)
    with pytest.raises(ValueError, match=r"28x3 image: soft split 2"):
        T2TModule(img_size=(28, 3), in_chans=1, kernels=((1, 1, 0), (1, 1, 0), (5, 1, 0)))


@pytest.mark.parametrize(
    "kernels", [(), ((7, 4), (3, 2, 1), (3, 2, 1)), ((7, 0, 2),) * 3,
                ((7.0, 4, 2), (3, 2, 1), (3, 2, 1)), ((7, 4, -1), (3, 2, 1), (3, 2, 1))]
)
def test_malformed_kernels_raise(kernels):
    with pytest.raises(ValueError, match="one or more \\(kernel_size, stride, padding\\) triples"):
        T2TModule(img_size=224, kernels=kernels)


@pytest.mark.parametrize("kernels", [((3, 3, 0),), ((5, 2, 2), (3, 2, 1)),
                                     ((3, 1, 1), (3, 2, 1), (3, 2, 1), (3, 1, 1))])
def test_any_number_of_soft_splits(kernels):
    """One split is a patch embedding of overlapping windows; each extra split adds a token
    layer `attention<i>` and a re-structurization before it."""
    t2t = T2TModule(img_size=12, in_chans=2, embed_dim=16, token_dim=8, kernels=kernels).eval()
    names = sorted(n for n, _ in t2t.named_children())
    assert names == sorted([f"attention{i}" for i in range(1, len(kernels))] + ["project"])
    x = torch.randn(2, 2, 12, 12)
    tokens, stages = t2t(x, return_stages=True)
    assert len(stages) == len(kernels) and t2t.grid_size == t2t.stage_grids[-1]
    with torch.no_grad():
        for ours, by_hand in zip(stages, t2t_by_hand(t2t, x, kernels), strict=True):
            torch.testing.assert_close(ours, by_hand, atol=1e-5, rtol=1e-5)


def test_unknown_token_type_and_bad_grid_raise():
    with pytest.raises(ValueError, match=r"'transformer' or 'performer', got 'conv'"):
        T2TModule(img_size=224, token_type="conv")
    with pytest.raises(ValueError, match=r"grid 3x3 holds 9 tokens, but got N=10"):
        restructurize(torch.randn(1, 10, 4), 3)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        soft_split(torch.randn(3, 8, 8), kernel_size=3, stride=2, padding=1)
