"""Scaled dot-product and multi-head self-attention (notebook 03).

Vaswani et al. 2017, eq. 1: Attention(Q, K, V) = softmax(Q K^T / sqrt(d_h)) V.
ViT (Dosovitskiy et al. 2020, appendix A, eq. 5-8) runs k heads of it side by side on
one input sequence z: [q, k, v] = z U_qkv, and MSA(z) = [SA_1(z); ...; SA_k(z)] U_msa.

`attend` is the one attention core of the package (multi-head attention here, T2T's token
attention in `t2t.py`). It has two paths that compute the same thing: the fused kernel
`F.scaled_dot_product_attention` (fast, memory-efficient, never materialises the N x N
weights) and the written-out softmax path, which also returns the weights for plots.
Asking for the weights picks the written-out path for that call only. Both take an additive
`bias` on the logits, which is how relative position information enters (appendix D.4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["scaled_dot_product_attention", "attend", "MultiHeadAttention"]


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + bias) v, written out. Returns (output, attention weights).

    q, k: (..., N, d); v: (..., N, d_v); `bias` broadcasts to (..., N, N). Output
    (..., N, d_v), weights (..., N, N); each row of the weights sums to one (before dropout).
    `scale` defaults to 1/sqrt(d).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # Without the scale the logits' variance grows with d and the softmax saturates.
    logits = (q * scale) @ k.transpose(-2, -1)  # (..., N, N)
    if bias is not None:
        logits = logits + bias
    weights = logits.softmax(dim=-1)
    out = F.dropout(weights, p=dropout_p, training=training) @ v  # (..., N, d_v)
    return out, weights


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    fused: bool = True,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale + bias) v for (B, H, N, d) heads: (output, weights or None).

    The fused kernel when `fused` and the weights are not needed, else the written-out
    path, which returns the (B, H, N, N) weights. Dropout on the weights acts in training only.
    """
    dropout_p = dropout_p if training else 0.0
    if fused and not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                             scale=scale)
        return out, None
    return scaled_dot_product_attention(q, k, v, scale=scale, bias=bias, dropout_p=dropout_p,
                                        training=training)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention (MSA): (B, N, D) -> (B, N, D), eq. 5-8 of the ViT paper.

    `fused=True` uses `F.scaled_dot_product_attention`; `forward(x, return_attention=True)`
    always takes the written-out path and also returns the (B, heads, N, N) weights.
    `logit_bias`, a module called as `logit_bias(q, scale)` that returns (B, heads, N, N), is
    added to the logits: relative position embeddings (`embeddings.RelativePositionLogits`).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
        logit_bias: nn.Module | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(
                f"dim {dim} is not divisible by num_heads {num_heads}; "
                f"the head dimension dim/num_heads must be a whole number"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)  # U_qkv, all heads at once
        self.proj = nn.Linear(dim, dim)  # U_msa
        self.proj_drop = nn.Dropout(proj_drop)
        self.logit_bias = logit_bias

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        bias = None if self.logit_bias is None else self.logit_bias(q, self.scale)  # (B, H, N, N)
        out, weights = attend(q, k, v, scale=self.scale, bias=bias, dropout_p=self.attn_drop,
                              training=self.training, fused=self.fused,
                              need_weights=return_attention)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, H, N, Dh) -> (B, N, H*Dh)
        out = self.proj_drop(self.proj(out))
        return (out, weights) if return_attention else out
