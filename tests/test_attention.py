import math

import pytest
import torch
import torch.nn.functional as F

from vit_tutorial import MultiHeadAttention, scaled_dot_product_attention
from vit_tutorial.attention import attend


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


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_multi_head_attention_written_out_head_by_head(qkv_bias):
    # eq. 5-8: [q, k, v] = z U_qkv; head h uses channels h*Dh .. (h+1)*Dh of each.
    D, H, N = 12, 3, 5
    mha = MultiHeadAttention(D, num_heads=H, qkv_bias=qkv_bias).eval()
    assert mha.head_dim == 4 and mha.scale == 0.5
    assert (mha.qkv.bias is not None) == qkv_bias
    if qkv_bias:
        with torch.no_grad():
            mha.qkv.bias.normal_()
    x = torch.randn(2, N, D)
    q, k, v = mha.qkv(x).split(D, dim=-1)
    heads, maps = [], []
    for h in range(H):
        part = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(w @ v[..., part])
        maps.append(w)
    expected = mha.proj(torch.cat(heads, dim=-1))  # [SA_1; ...; SA_k] U_msa
    out, weights = mha(x, return_attention=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, torch.stack(maps, dim=1))
    torch.testing.assert_close(mha(x), expected, atol=1e-5, rtol=1e-5)  # the fused path


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
    mha.eval()  # and neither path drops in eval mode
    torch.testing.assert_close(mha(x), mha(x, return_attention=True)[0], atol=1e-5, rtol=1e-5)


def test_written_out_dropout_drops_weights_after_the_softmax():
    q, k, v = torch.randn(3, 2, 6, 4).unbind(0)
    out, weights = scaled_dot_product_attention(q, k, v, dropout_p=0.5, training=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 6))  # returned before dropout
    clean, _ = scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(out, clean)
    same, _ = scaled_dot_product_attention(q, k, v, dropout_p=0.5, training=False)
    torch.testing.assert_close(same, clean)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, scale=0.1)[1],
                               torch.softmax(0.1 * q @ k.transpose(-2, -1), dim=-1))


def test_attend_adds_the_bias_to_the_logits_on_both_paths():
    q, k, v = torch.randn(3, 2, 3, 5, 4).unbind(0)  # (B, H, N, d)
    bias = torch.randn(2, 3, 5, 5)
    by_hand = torch.softmax(q @ k.transpose(-2, -1) * 0.3 + bias, dim=-1)  # (B, H, N, N)
    out, weights = attend(q, k, v, scale=0.3, bias=bias, need_weights=True)
    torch.testing.assert_close(weights, by_hand)
    torch.testing.assert_close(out, by_hand @ v)
    fused, none = attend(q, k, v, scale=0.3, bias=bias)
    assert none is None
    torch.testing.assert_close(fused, out, atol=1e-5, rtol=1e-5)
    explicit, _ = attend(q, k, v, scale=0.3, bias=bias, fused=False)
    torch.testing.assert_close(explicit, out)


def test_both_paths_use_the_module_scale():
    # The fused kernel once ignored `scale` and used its own 1/sqrt(d): equal only by default.
    mha = MultiHeadAttention(16, num_heads=2).eval()
    x = torch.randn(2, 6, 16)
    default = mha(x)
    mha.scale = 0.05
    written_out, weights = mha(x, return_attention=True)
    torch.testing.assert_close(mha(x), written_out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(written_out, default, atol=1e-3)
    q, k, _ = mha.qkv(x).reshape(2, 6, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    torch.testing.assert_close(weights, torch.softmax(0.05 * q @ k.transpose(-2, -1), dim=-1))


def test_logit_bias_is_called_with_the_query_and_the_scale_and_added():
    # The contract of `logit_bias` (relative position embeddings use it): called once per
    # forward as logit_bias(q, scale) with q (B, H, N, Dh), it returns (B, H, N, N) logits.
    class QueryBias(torch.nn.Module):
        def forward(self, q, scale):
            self.seen = (q.shape, scale)
            return scale * q.sum(-1, keepdim=True).expand(*q.shape[:-1], q.shape[-2])

    D, H, N = 12, 3, 5
    mha = MultiHeadAttention(D, num_heads=H, logit_bias=QueryBias()).eval()
    x = torch.randn(2, N, D)
    q, k, _ = mha.qkv(x).reshape(2, N, 3, H, 4).permute(2, 0, 3, 1, 4).unbind(0)
    bias = 0.5 * q.sum(-1, keepdim=True).expand(2, H, N, N)  # (B, H, N, N)
    out, weights = mha(x, return_attention=True)
    assert mha.logit_bias.seen == ((2, H, N, 4), 0.5)
    torch.testing.assert_close(weights, torch.softmax(q @ k.transpose(-2, -1) * 0.5 + bias, -1))
    torch.testing.assert_close(mha(x), out, atol=1e-5, rtol=1e-5)  # the fused path


def test_projection_dropout_acts_in_training_only():
    mha = MultiHeadAttention(16, num_heads=2, proj_drop=0.5)
    x = torch.randn(2, 6, 16)
    torch.manual_seed(0)
    out = mha.train()(x)
    assert 0.3 < (out == 0).float().mean() < 0.7  # half of U_msa's outputs dropped
    assert not (mha.eval()(x) == 0).any()
