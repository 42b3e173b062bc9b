"""The class token and position embeddings, and resampling them to a new grid (notebooks 02, 08).

ViT paper eq. 1: z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos. The learnable class token
x_class gathers the image's representation; E_pos tells the encoder where each patch came
from. Appendix D.4 compares no position embedding, learned 1-D, learned 2-D and
relative embeddings; all four are here, with two fixed tables:

    "learn"     learned 1-D table, one vector per position in raster order (paper default)
    "learn2d"   learned 2-D: a row table and a column table of D/2 each, concatenated
    "relative"  learned embeddings of the 1-D offset between two patches, entering every
                attention layer's logits (`RelativePositionLogits`); nothing is added to
                the tokens
    "none"      no position information: the encoder sees a bag of patches
    "sincos2d"  fixed 2-D sine-cosine (the row and column halves of Vaswani et al.'s table)
    "sincos1d"  the fixed 1-D table of Vaswani et al., which T2T-ViT uses

Section 3.2: at a higher fine-tuning resolution the patch grid grows, so the learned table
is resampled in 2-D (`resample_pos_embed`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "POS_EMBED_TYPES",
    "ClassToken",
    "LearnedPosEmbed",
    "LearnedPosEmbed2D",
    "SinCosPosEmbed2D",
    "SinCosPosEmbed1D",
    "NoPosEmbed",
    "RelativePosEmbed",
    "RelativePositionLogits",
    "relative_offset_index",
    "build_pos_embed",
    "pos_embed_class",
    "sincos_1d_table",
    "sincos_2d_table",
    "resample_pos_embed",
]

class ClassToken(nn.Module):
    """Prepends the learnable x_class to every sequence: (B, N, D) -> (B, 1 + N, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.weight, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.weight.expand(x.shape[0], -1, -1), x], dim=1)


def sincos_1d_table(num_positions: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Vaswani et al.'s table, (num_positions, dim): sin on even channels, cos on odd ones."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]  # (L, 1)
    i = torch.arange(dim, dtype=torch.float64)[None, :]  # (1, D)
    angle = pos / temperature ** (2 * (i // 2) / dim)  # (L, D)
    table = torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()


def sincos_2d_table(
    grid_size: tuple[int, int], dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 2-D table, (rows * cols, dim): the first half encodes the row, the second the column.

    Each half is [sin(p w_1..w_{D/4}), cos(p w_1..w_{D/4})] with w_k = temperature^(-k / (D/4)).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs dim divisible by 4, got dim={dim}")
    rows, cols = grid_size
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y, x = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )
    y = y.flatten()[:, None] * omega[None]  # (N, D/4)
    x = x.flatten()[:, None] * omega[None]  # (N, D/4)
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).float()  # (N, D)


class LearnedPosEmbed(nn.Module):
    """Learned 1-D table (1, prefix + N, D) added to the tokens; the paper's default."""

    def __init__(self, *, grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 1):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        n = grid_size[0] * grid_size[1] + num_prefix_tokens
        self.weight = nn.Parameter(torch.randn(1, n, dim) * 0.02)

    def table(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight

    @staticmethod
    def resample_state(
        state: dict[str, torch.Tensor], *, old_grid, new_grid, num_prefix_tokens: int
    ) -> dict[str, torch.Tensor]:
        """This module's saved tensors for another grid: bicubic in 2-D (section 3.2)."""
        return {"weight": resample_pos_embed(state["weight"], new_grid, old_size=old_grid,
                                             num_prefix_tokens=num_prefix_tokens)}


class LearnedPosEmbed2D(nn.Module):
    """Learned 2-D embedding (appendix D.4): E_pos[i, j] = [row_i; col_j], D/2 channels each.

    The class token, which has no grid position, gets a learned vector of its own.
    """

    def __init__(self, *, grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 1):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the learned 2-D embedding needs an even dim, got dim={dim}")
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.row = nn.Parameter(torch.randn(grid_size[0], dim // 2) * 0.02)
        self.col = nn.Parameter(torch.randn(grid_size[1], dim // 2) * 0.02)
        self.prefix = nn.Parameter(torch.randn(1, num_prefix_tokens, dim) * 0.02)

    def table(self) -> torch.Tensor:
        rows, cols = self.grid_size
        grid = torch.cat(
            [
                self.row[:, None, :].expand(rows, cols, -1),  # (rows, cols, D/2)
                self.col[None, :, :].expand(rows, cols, -1),  # (rows, cols, D/2)
            ],
            dim=-1,
        ).reshape(1, rows * cols, -1)  # (1, N, D)
        return torch.cat([self.prefix, grid], dim=1)  # (1, prefix + N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table()

    @staticmethod
    def resample_state(
        state: dict[str, torch.Tensor], *, old_grid, new_grid, num_prefix_tokens: int
    ) -> dict[str, torch.Tensor]:
        """The row and the column tables, each interpolated linearly in 1-D to the new grid."""
        out = dict(state)
        for axis, key in enumerate(("row", "col")):
            t = state[key].float().T[None]  # (1, D/2, old)
            t = F.interpolate(t, size=new_grid[axis], mode="linear", align_corners=False)
            out[key] = t[0].T.to(state[key].dtype)  # (new, D/2)
        return out


class _FixedPosEmbed(nn.Module):
    """A fixed table, recomputed from the grid (not saved: it is a function of the grid)."""

    @staticmethod
    def resample_state(state, *, old_grid, new_grid, num_prefix_tokens):
        return dict(state)  # nothing saved: the new grid's table is computed afresh

    def __init__(self, table: torch.Tensor, *, grid_size, num_prefix_tokens: int):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.register_buffer("weight", table[None], persistent=False)  # (1, L, D)

    def table(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class SinCosPosEmbed2D(_FixedPosEmbed):
    """Fixed 2-D sin-cos table; prefix tokens get zeros (they have no grid position)."""

    def __init__(self, *, grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 1):
        table = torch.cat([torch.zeros(num_prefix_tokens, dim), sincos_2d_table(grid_size, dim)])
        super().__init__(table, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens)


class SinCosPosEmbed1D(_FixedPosEmbed):
    """Fixed 1-D sin-cos table over prefix + N positions, as T2T-ViT uses it."""

    def __init__(self, *, grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 1):
        n = grid_size[0] * grid_size[1] + num_prefix_tokens
        super().__init__(
            sincos_1d_table(n, dim), grid_size=grid_size, num_prefix_tokens=num_prefix_tokens
        )


class NoPosEmbed(nn.Module):
    """No position information at all: the identity."""

    resample_state = staticmethod(_FixedPosEmbed.resample_state)

    def __init__(self, *, grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 1):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens

    def table(self) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class RelativePositionLogits(nn.Module):
    """Appendix D.4's relative positional embedding, for one attention layer.

    "1-dimensional Relative Attention": every pair of patches has an offset p_q - p_k in the
    raster sequence, from -(N-1) to N-1, and every offset a learned embedding r. An extra
    attention uses the original query but the embeddings as keys, and its logits are added to
    the content logits before the softmax: bias[b, h, i, j] = scale * q_i . r_{p_i - p_j}.
    The embeddings have the head width and are shared by the heads (as in Shaw et al. 2018).
    Pairs with a prefix (class) token, which has no grid position, share one more learned
    embedding, the table's last row. `forward(q, scale)` returns the bias, (B, H, N, N).
    """

    def __init__(self, *, num_patches: int, head_dim: int, num_prefix_tokens: int = 1):
        super().__init__()
        self.num_patches = num_patches
        self.num_prefix_tokens = num_prefix_tokens
        self.weight = nn.Parameter(torch.randn(2 * num_patches, head_dim) * 0.02)  # (2N-1 + 1, d)
        self.register_buffer(
            "index", relative_offset_index(num_patches, num_prefix_tokens), persistent=False
        )

    def forward(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        B, H, L, _ = q.shape
        if L != self.index.shape[0]:
            raise ValueError(f"relative positions were built for {self.index.shape[0]} tokens, "
                             f"got {L}")
        logits = (q * scale) @ self.weight.transpose(0, 1)  # (B, H, L, 2N): q against every r
        return logits.gather(-1, self.index.expand(B, H, L, L))  # (B, H, L, L): r_{p_i - p_j}

    def extra_repr(self) -> str:
        return f"num_patches={self.num_patches}, offsets={2 * self.num_patches - 1} + 1 (prefix)"


def relative_offset_index(num_patches: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """(L, L) rows of the relative table, L = prefix + N: p_i - p_j + N - 1 for two patches
    (0 .. 2N - 2), and 2N - 1 for any pair that involves a prefix token."""
    p = torch.arange(num_patches)
    patches = p[:, None] - p[None, :] + num_patches - 1  # (N, N)
    L = num_prefix_tokens + num_patches
    index = torch.full((L, L), 2 * num_patches - 1, dtype=torch.long)
    index[num_prefix_tokens:, num_prefix_tokens:] = patches
    return index


class RelativePosEmbed(NoPosEmbed):
    """pos_embed="relative": nothing is added to the tokens; each attention layer holds a
    `RelativePositionLogits` instead (`VisionTransformer` builds them when it sees this)."""

    relative = True

    @staticmethod
    def resample_state(state, *, old_grid, new_grid, num_prefix_tokens):
        if tuple(old_grid) != tuple(new_grid):
            raise ValueError(
                f"relative position embeddings are learned per offset of the raster sequence of "
                f"a {old_grid[0]}x{old_grid[1]} grid, which has no 2-D resampling to "
                f"{new_grid[0]}x{new_grid[1]}; train at the new size instead"
            )
        return dict(state)


_POS_EMBEDS = {
    "learn": LearnedPosEmbed,
    "learn2d": LearnedPosEmbed2D,
    "relative": RelativePosEmbed,
    "sincos2d": SinCosPosEmbed2D,
    "sincos1d": SinCosPosEmbed1D,
    "none": NoPosEmbed,
}
# The names ViTConfig.pos_embed accepts: a new kind is one class and one entry above.
POS_EMBED_TYPES = tuple(_POS_EMBEDS)


def build_pos_embed(
    kind: str, *, grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 1
) -> nn.Module:
    """The position embedding called `kind` (one of POS_EMBED_TYPES) for this grid."""
    if kind not in _POS_EMBEDS:
        raise ValueError(f"unknown pos_embed {kind!r}; expected one of {POS_EMBED_TYPES}")
    return _POS_EMBEDS[kind](grid_size=grid_size, dim=dim, num_prefix_tokens=num_prefix_tokens)


def pos_embed_class(kind: str) -> type[nn.Module]:
    """The class behind `kind`, e.g. to call its `resample_state` without building one."""
    if kind not in _POS_EMBEDS:
        raise ValueError(f"unknown pos_embed {kind!r}; expected one of {POS_EMBED_TYPES}")
    return _POS_EMBEDS[kind]


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_size: int | tuple[int, int],
    *,
    old_size: int | tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, prefix + H*W, D) position table to the grid `new_size` in 2-D.

    The prefix (class token) rows are kept apart and unchanged; the grid rows are viewed as
    an (H, W) image with D channels and interpolated in float32. `old_size` defaults to a
    square grid. Returns `pos_embed` itself when the grid does not change.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected pos_embed of shape (1, L, D), got {tuple(pos_embed.shape)}")
    new_size = (new_size, new_size) if isinstance(new_size, int) else tuple(new_size)
    if len(new_size) != 2 or not all(isinstance(v, int) and v >= 1 for v in new_size):
        raise ValueError(f"new_size must be a positive grid (rows, cols), got {new_size}")
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if not 0 <= num_prefix_tokens or num_grid < 1:
        raise ValueError(
            f"num_prefix_tokens={num_prefix_tokens} leaves no grid rows in a table of "
            f"{pos_embed.shape[1]} rows; expected 0 <= num_prefix_tokens < {pos_embed.shape[1]}"
        )
    if old_size is None:
        side = math.isqrt(num_grid)
        if side * side != num_grid:
            raise ValueError(
                f"{num_grid} position rows (after {num_prefix_tokens} prefix) are not a square "
                f"grid; pass old_size=(rows, cols)"
            )
        old_size = (side, side)
    old_size = (old_size, old_size) if isinstance(old_size, int) else tuple(old_size)
    if old_size[0] * old_size[1] != num_grid:
        raise ValueError(
            f"old_size {old_size[0]}x{old_size[1]} holds {old_size[0] * old_size[1]} positions, "
            f"but pos_embed has {num_grid} after {num_prefix_tokens} prefix rows"
        )
    if new_size == old_size:
        return pos_embed

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid.shape[-1]
    grid = grid.reshape(1, *old_size, D).permute(0, 3, 1, 2)  # (1, D, H, W)
    kwargs = {} if interpolation == "nearest" else {"antialias": antialias}
    grid = F.interpolate(grid.float(), size=new_size, mode=interpolation, **kwargs)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)  # (1, H'W', D)
    return torch.cat([prefix, grid], dim=1)
