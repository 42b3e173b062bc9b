"""The Transformer encoder: MLP, DropPath, the pre-norm block and the stack (notebook 04).

ViT paper eq. 2-3, for l = 1..L:
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}
    z_l  = MLP(LN(z'_l)) + z'_l
The MLP is two Linear layers with a GELU between them. LayerNorm comes *before* each
sub-layer (pre-norm), which keeps a clean residual path from input to output and lets
deep stacks train without warm-up tricks. DropPath (stochastic depth, Huang et al. 2016)
randomly skips a whole residual branch per sample while training.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import MultiHeadAttention
from .embeddings import RelativePositionLogits

__all__ = ["Mlp", "DropPath", "drop_path", "Block", "Encoder", "init_weights"]


def init_weights(m: nn.Module) -> None:
    """The Transformer layers' initialisation, for `module.apply(init_weights)`.

    timm's and DeiT's choice, which the T2T-ViT code copies: Linear weights from a normal
    distribution with std 0.02 truncated at +-2 (absolute, i.e. at 100 std), zero biases,
    LayerNorm at weight 1 and bias 0. The official ViT code (google-research/vision_transformer)
    differs: Xavier-uniform Linear kernels, MLP biases from a normal of std 1e-6, and a zero
    head. Other modules (convolutions) keep PyTorch's default.
    """
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Mlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout: (B, N, D) -> (B, N, D_out)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        *,
        drop: float = 0.0,
    ):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()  # exact (erf) GELU, as in the paper's code
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero the whole residual branch for a random subset of samples; rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
    return x * mask / keep  # dividing by keep leaves the expected value unchanged


class DropPath(nn.Module):
    """Stochastic depth as a module; the identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """One pre-norm Transformer encoder layer (eq. 2-3): (B, N, D) -> (B, N, D).

    `relative_positions=(num_patches, num_prefix_tokens)` gives its attention learned
    relative position embeddings (appendix D.4, `RelativePositionLogits`).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        relative_positions: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        logit_bias = None
        if relative_positions is not None:
            num_patches, num_prefix_tokens = relative_positions
            logit_bias = RelativePositionLogits(num_patches=num_patches, head_dim=dim // num_heads,
                                                num_prefix_tokens=num_prefix_tokens)
        self.attn = MultiHeadAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
            logit_bias=logit_bias,
        )
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if return_attention:
            y, weights = self.attn(self.norm1(x), return_attention=True)
        else:
            y, weights = self.attn(self.norm1(x)), None
        x = x + self.drop_path1(y)  # z'_l = MSA(LN(z_{l-1})) + z_{l-1}
        del y  # free the (B, N, D) attention output before the MLP allocates its own
        x = x + self.drop_path2(self.mlp(self.norm2(x)))  # z_l = MLP(LN(z'_l)) + z'_l
        return (x, weights) if return_attention else x


class Encoder(nn.ModuleList):
    """The stack of L blocks. Stochastic depth grows linearly from 0 to `drop_path_rate`
    (DeiT's and timm's schedule; Huang et al.'s linear rule starts above zero).

    `block_args` are `Block`'s keyword arguments (dim, num_heads, mlp_ratio, ...), the same
    for every block: `Encoder(depth=12, dim=768, num_heads=12)`.
    """

    def __init__(self, *, depth: int, drop_path_rate: float = 0.0, **block_args):
        if "drop_path" in block_args:
            raise TypeError("Encoder sets each block's drop_path from drop_path_rate")
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        super().__init__(Block(**block_args, drop_path=rate) for rate in rates)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        maps = []
        for block in self:
            if return_attention:
                x, weights = block(x, return_attention=True)
                maps.append(weights)
            else:
                x = block(x)
        return (x, maps) if return_attention else x
