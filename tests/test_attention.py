import math

import pytest
import torch
import torch.nn.functional as F

from vit_tutorial import MultiHeadAttention, scaled_dot_product_attention


def test_written_out_attention_matches_fused_kernel():
    q, k, v = torch.randn(3, 2, 4, 10, 8).unbind(0)
    out, weights = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert weights.shape == (2, 4, 10, 10)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 10))


def test_attention_by_hand_for_one_query():
    q, k, v = torch.randn(1, 4), torch.randn(5, 4), torch.randn(5, 3)
    out, w = scaled_dot_product_attention(q, k, v)
    expected_w = torch.softmax(k @ q[0] / math.sqrt(4), dim=0)
    torch.testing.assert_close(w[0], expected_w)
    torch.testing.assert_close(out[0], expected_w @ v)


@pytest.mark.parametrize("dim,heads", [(32, 4), (48, 3), (16, 1)])
def test_fused_and_explicit_paths_agree(dim, heads):
    mha = MultiHeadAttention(dim, num_heads=heads).eval()
    x = torch.randn(2, 7, dim)
    fast = mha(x)
    slow, weights = mha(x, return_attention=True)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert weights.shape == (2, heads, 7, 7)
    mha.fused = False
    torch.testing.assert_close(mha(x), fast, atol=1e-5, rtol=1e-5)


def test_matches_torch_multihead_attention():
    dim, heads = 24, 3
    ours = MultiHeadAttention(dim, num_heads=heads).eval()
    ref = torch.nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    ref.in_proj_weight.data.copy_(ours.qkv.weight)  # both stack q, k, v along the output axis
    ref.in_proj_bias.data.copy_(ours.qkv.bias)
    ref.out_proj.load_state_dict(ours.proj.state_dict())
    x = torch.randn(2, 5, dim)
    out, w = ours(x, return_attention=True)
    ref_out, ref_w = ref(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)


def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="dim 30 is not divisible by num_heads 4"):
        MultiHeadAttention(30, num_heads=4)


def test_attention_dropout_applies_in_training_on_both_paths():
    mha = MultiHeadAttention(16, num_heads=2, attn_drop=0.5).train()
    x = torch.randn(2, 6, 16)
    assert not torch.allclose(mha(x), mha(x))  # fused path drops
    a, _ = mha(x, return_attention=True)
    b, _ = mha(x, return_attention=True)
    assert not torch.allclose(a, b)  # explicit path drops too
