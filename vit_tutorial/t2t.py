"""Tokens-to-Token: a tokenizer that models local structure (notebook 07).

Yuan et al. 2021, "Tokens-to-Token ViT: Training Vision Transformers from Scratch on
ImageNet", section 3.1. Instead of cutting the image into hard, disjoint
patches, T2T repeats two steps:

    soft split          T_i -> unfold into overlapping k x k windows, each window's
                        tokens concatenated into one longer token (the "T2T" step)
    re-structurization  T'_i = MLP(MSA(T_i)); I_i = Reshape(T'_i), back to an image

Overlapping windows let neighbouring tokens share pixels, so edges and lines that a hard
patch would cut in two survive; each split also shortens the sequence (224 -> 56 -> 28 ->
14 per side with the paper's (kernel, stride, padding) = (7, 4, 2), (3, 2, 1), (3, 2, 1)).
A Linear maps the last split's tokens to the backbone width. The backbone itself (class
token, sinusoid positions, blocks, head) lives in the model module, which uses
`T2TModule` as its tokenizer.

Follows the official code (yitu-opensource/T2T-ViT, `models/t2t_vit.py`,
`models/token_transformer.py`, `models/token_performer.py`), including its quirks, so its
`tokens_to_token.*` checkpoint keys map onto this module by prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .encoder import Mlp, init_weights
from .patches import check_image_batch, to_2tuple

__all__ = [
    "soft_split",
    "restructurize",
    "split_grid",
    "stage_grids",
    "TokenAttention",
    "TokenTransformer",
    "TokenPerformer",
    "orthogonal_random_features",
    "T2TModule",
]

Kernel = tuple[int, int, int]  # (kernel_size, stride, padding) of one soft split


def soft_split(x: torch.Tensor, *, kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*k*k): every k x k window (zero-padded) becomes one token.

    Windows are visited row by row; inside a token the order is (c, row, col) as in
    `nn.Unfold`, whose output this is, with the token axis moved to the middle.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    cols = F.unfold(x, kernel_size=kernel_size, stride=stride, padding=padding)  # (B, C*k*k, N)
    return cols.transpose(1, 2)  # (B, N, C*k*k)


def restructurize(tokens: torch.Tensor, grid_size: int | tuple[int, int]) -> torch.Tensor:
    """(B, N, C) tokens on a row-major h x w grid -> (B, C, h, w) image: the paper's Reshape."""
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, N, C), got {tuple(tokens.shape)}")
    h, w = to_2tuple(grid_size)
    B, N, C = tokens.shape
    if h * w != N:
        raise ValueError(f"grid {h}x{w} holds {h * w} tokens, but got N={N}")
    return tokens.transpose(1, 2).reshape(B, C, h, w)  # (B, C, N) -> (B, C, h, w)


def split_grid(size: int, kernel: int, stride: int, padding: int) -> int:
    """Windows along one side of a soft split: floor((size + 2p - k) / s) + 1 (as nn.Unfold)."""
    return (size + 2 * padding - kernel) // stride + 1


class TokenAttention(nn.Module):
    """Single-stream attention that changes the width, dim -> in_dim: (B, N, dim) -> (B, N, in_dim).

    The residual path cannot be x (its width is dim), so, as in the official code, the
    skip connection adds v instead: out = v + proj(softmax(q k^T * scale) v).
    """

    def __init__(self, dim: int, in_dim: int, *, num_heads: int = 1, fused: bool = True):
        super().__init__()
        if in_dim % num_heads:
            raise ValueError(f"in_dim {in_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_dim = in_dim
        # Quirk kept from the official code: the scale uses the *input* width dim
        # (147 or 576 in T2T-ViT), not the width of q and k (in_dim = 64). Checkpoints
        # were trained with it, so changing it would change their outputs.
        self.scale = (dim // num_heads) ** -0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, in_dim * 3, bias=False)
        self.proj = nn.Linear(in_dim, in_dim)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        H, Dh = self.num_heads, self.in_dim // self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, H, Dh)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        out, weights = attend(q, k, v, scale=self.scale, fused=self.fused,
                              need_weights=return_attention)
        out = out.transpose(1, 2).reshape(B, N, self.in_dim)  # (B, N, in_dim)
        v = v.transpose(1, 2).reshape(B, N, self.in_dim)  # (B, N, in_dim), heads merged
        out = v + self.proj(out)  # skip through v: x has the wrong width
        return (out, weights) if return_attention else out


class TokenTransformer(nn.Module):
    """The T2T layer of T2T-ViT_t: (B, N, dim) -> (B, N, in_dim).

    x = TokenAttention(LN(x))   (its own skip connection goes through v)
    x = x + MLP(LN(x))
    LayerNorms use PyTorch's default eps = 1e-5, as the official code does.
    The official code only runs with num_heads=1; more heads split in_dim between them.
    """

    def __init__(self, dim: int, in_dim: int, *, num_heads: int = 1, mlp_ratio: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, in_dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_dim, int(in_dim * mlp_ratio), in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))  # (B, N, dim) -> (B, N, in_dim)
        return x + self.mlp(self.norm2(x))  # (B, N, in_dim)


def orthogonal_random_features(m: int, dim: int) -> torch.Tensor:
    """The performer's fixed projection: (m, dim), m <= dim orthogonal rows of length sqrt(m).

    Orthogonal rows lower the variance of the kernel estimate (Performer, section 2.4).
    FAVOR+ scales them to length sqrt(dim), like Gaussian rows; the official T2T code uses
    sqrt(m). At kernel_ratio=1 the two agree; at the default 0.5 the shorter rows make
    phi(q) . phi(k) a biased, flatter estimate of exp(q . k). Kept so checkpoints behave.
    """
    return nn.init.orthogonal_(torch.empty(m, dim)) * math.sqrt(m)


class TokenPerformer(nn.Module):
    """The T2T layer of T2T-ViT (the default): linear-cost attention, (B, N, dim) -> (B, N, in_dim).

    Performer (Choromanski et al. 2021, FAVOR+): positive random features
    phi(x) = exp(w x - |x|^2 / 2) / sqrt(m) make phi(q) . phi(k) an estimate of exp(q . k)
    (`orthogonal_random_features` says how the official scaling biases it), so the softmax
    attention D^-1 exp(Q K^T) V becomes D^-1 phi(Q) (phi(K)^T V) with D = phi(Q) phi(K)^T 1,
    which never forms the N x N matrix: at 224 px the first layer sees N = 3136 tokens.
    Note that q . k is not scaled by 1/sqrt(d) here, unlike in `TokenTransformer`.

    The m = in_dim * kernel_ratio random directions `w` are drawn once, kept fixed
    (requires_grad=False), and stored as a parameter so checkpoints carry them.
    """

    def __init__(self, dim: int, in_dim: int, *, kernel_ratio: float = 0.5, dropout: float = 0.1):
        super().__init__()
        self.emb = in_dim
        self.m = int(in_dim * kernel_ratio)
        if self.m < 1:
            raise ValueError(
                f"kernel_ratio {kernel_ratio} leaves no random features for in_dim {in_dim}"
            )
        self.epsilon = 1e-8  # keeps the division by D finite
        self.norm1 = nn.LayerNorm(dim)
        # The official name and order: one Linear (with bias) whose output splits as k, q, v.
        self.kqv = nn.Linear(dim, 3 * in_dim)
        self.dp = nn.Dropout(dropout)  # the official default is 0.1 on both dropouts
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm2 = nn.LayerNorm(in_dim)
        # A Sequential, not `Mlp`, so the keys are the official mlp.0 / mlp.2.
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim), nn.Dropout(dropout)
        )
        self.w = nn.Parameter(orthogonal_random_features(self.m, in_dim), requires_grad=False)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) = exp(w x - |x|^2 / 2) / sqrt(m): (B, N, in_dim) -> (B, N, m), in float32."""
        x = x.float()  # exp overflows easily in half precision
        wx = x @ self.w.float().t()  # (B, N, m)
        half_sq_norm = (x * x).sum(dim=-1, keepdim=True) / 2  # (B, N, 1)
        return torch.exp(wx - half_sq_norm) / math.sqrt(self.m)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The linear attention with its skip through v: (B, N, dim) -> (B, N, in_dim)."""
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)  # each (B, N, in_dim)
        kp, qp = self.feature_map(k), self.feature_map(q)  # each (B, N, m)
        D = qp @ kp.sum(dim=1).unsqueeze(-1)  # (B, N, m) @ (B, m, 1) -> (B, N, 1)
        kptv = kp.transpose(1, 2) @ v.float()  # (B, m, N) @ (B, N, in_dim) -> (B, m, in_dim)
        y = (qp @ kptv) / (D + self.epsilon)  # (B, N, in_dim)
        return v + self.dp(self.proj(y.to(v.dtype)))  # skip through v, as in TokenAttention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.norm1(x))  # (B, N, dim) -> (B, N, in_dim)
        return x + self.mlp(self.norm2(x))  # (B, N, in_dim)


class T2TModule(nn.Module):
    """Tokens-to-Token tokenizer: (B, C, H, W) -> (B, N, embed_dim).

    One soft split per (kernel, stride, padding) in `kernels` (the paper uses three). A token
    layer (`attention1`, `attention2`, ...) and a re-structurization follow every split but
    the last; a Linear `project` follows the last. `forward(x, return_stages=True)` also
    returns the tokens after each stage, whose grids are in `stage_grids`.
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dim: int = 768,
        token_dim: int = 64,
        token_type: str = "transformer",
        kernels: tuple[Kernel, ...] = ((7, 4, 2), (3, 2, 1), (3, 2, 1)),
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.token_dim = token_dim
        self.token_type = token_type
        self.kernels = _check_kernels(kernels)
        self.stage_grids = stage_grids(self.img_size, self.kernels)
        self.grid_size = self.stage_grids[-1]
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        if token_type == "transformer":
            layer = lambda dim: TokenTransformer(dim, token_dim, num_heads=1, mlp_ratio=1.0)
        elif token_type == "performer":
            layer = lambda dim: TokenPerformer(dim, token_dim, kernel_ratio=0.5)
        else:
            raise ValueError(f"token_type must be 'transformer' or 'performer', got {token_type!r}")
        channels = in_chans  # of the image the next split cuts: pixels, then tokens
        for i, (k, _, _) in enumerate(self.kernels[:-1], start=1):
            self.add_module(f"attention{i}", layer(channels * k * k))
            channels = token_dim
        k_last = self.kernels[-1][0]
        self.project = nn.Linear(channels * k_last * k_last, embed_dim)
        # The official T2T_ViT applies this init to every Linear and LayerNorm it holds,
        # this module included; `w` of the performer is neither and keeps its draw.
        self.apply(init_weights)

    @property
    def token_layers(self) -> list[nn.Module]:
        """`attention1`, `attention2`, ...: one per soft split but the last."""
        return [getattr(self, f"attention{i}") for i in range(1, len(self.kernels))]

    def forward(
        self, x: torch.Tensor, return_stages: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        check_image_batch(x, in_chans=self.in_chans, img_size=self.img_size)
        stages = []
        splits = zip(self.kernels[:-1], self.stage_grids[:-1], self.token_layers, strict=True)
        for (k, s, p), grid, layer in splits:
            x = soft_split(x, kernel_size=k, stride=s, padding=p)  # (B, N_i, C*k*k)
            x = layer(x)  # (B, N_i, token_dim)
            stages.append(x)
            x = restructurize(x, grid)  # (B, token_dim, h_i, w_i)
        k, s, p = self.kernels[-1]
        x = soft_split(x, kernel_size=k, stride=s, padding=p)  # (B, N, token_dim*k*k)
        x = self.project(x)  # (B, N, embed_dim)
        stages.append(x)
        return (x, stages) if return_stages else x

    def extra_repr(self) -> str:
        h, w = self.img_size
        grids = " -> ".join(f"{gh}x{gw}" for gh, gw in ((h, w), *self.stage_grids))
        return f"kernels={self.kernels}, grids {grids}"


def _is_kernel(t: tuple) -> bool:
    if len(t) != 3 or not all(isinstance(v, int) for v in t):
        return False
    kernel_size, stride, padding = t
    return kernel_size >= 1 and stride >= 1 and padding >= 0


def _check_kernels(kernels) -> tuple[Kernel, ...]:
    """One or more (kernel, stride, padding) triples of ints, kernel and stride >= 1,
    padding >= 0."""
    try:
        triples = tuple(tuple(k) for k in kernels)
    except TypeError:
        triples = ()
    ok = len(triples) >= 1 and all(_is_kernel(t) for t in triples)
    if not ok:
        raise ValueError(
            "kernels must be one or more (kernel_size, stride, padding) triples of ints with "
            f"kernel_size, stride >= 1 and padding >= 0, e.g. ((7, 4, 2), (3, 2, 1), (3, 2, 1)); "
            f"got {kernels!r}"
        )
    return triples


def stage_grids(
    img_size: int | tuple[int, int], kernels: tuple[Kernel, ...]
) -> tuple[tuple[int, int], ...]:
    """(rows, cols) of the token grid after each soft split; raises if one would be empty."""
    kernels = _check_kernels(kernels)
    img_size = to_2tuple(img_size)
    grids, (h, w) = [], img_size
    for i, (k, s, p) in enumerate(kernels):
        h, w = split_grid(h, k, s, p), split_grid(w, k, s, p)
        if h < 1 or w < 1:
            raise ValueError(
                f"kernel schedule {kernels} is too coarse for a {img_size[0]}x{img_size[1]} "
                f"image: soft split {i} (kernel {k}, stride {s}, padding {p}) leaves a "
                f"{h}x{w} grid; use a larger image or smaller kernels/strides"
            )
        grids.append((h, w))
    return tuple(grids)
