"""The Vision Transformer: config, model, heads and attention maps (notebook 05).

Dosovitskiy et al. 2020, eq. 1-4:
    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos          tokens (eq. 1)
    z_l = encoder block l applied to z_{l-1}, l = 1..L      (eq. 2-3)
    y   = LN(z_L^0)                                         the class token's output (eq. 4)
followed by the classification head: an MLP with one tanh hidden layer at pre-training
time (`representation_size`) or a single Linear layer when fine-tuning.

One `VisionTransformer` serves the whole family: only the tokenizer changes.
    tokenizer="patch"   linear projection of flattened patches (the ViT)
    tokenizer="hybrid"  1x1 patches of a ResNet-v2 feature map (section 3.1, notebook 06)
    tokenizer="t2t"     Tokens-to-Token module (Yuan et al. 2021, notebook 07)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .embeddings import POS_EMBED_TYPES, ClassToken, build_pos_embed
from .encoder import Encoder, init_weights
from .patches import PatchEmbed, to_2tuple

__all__ = ["ViTConfig", "VisionTransformer", "Tokenizer", "TokenizerSpec", "TOKENIZERS",
           "POOLS", "token_grid"]

# How the encoder's output z_L (B, prefix + N, D) becomes one vector (B, D) per image.
# A new pooling is one entry here; `num_prefix` is the number of class tokens in front.
POOLS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "token": lambda z, num_prefix: z[:, 0],  # the class token's output, eq. 4
    "gap": lambda z, num_prefix: z[:, num_prefix:].mean(dim=1),  # the patch tokens' mean
}


@dataclass
class ViTConfig:
    """Everything that defines a ViT's shape. Defaults are ViT-B/16 at 224x224 (Table 1)."""

    img_size: int | tuple[int, int] = 224  # input H, W (an int means square)
    patch_size: int = 16  # P: patches are P x P pixels; hybrid models use 1 (feature pixels)
    in_chans: int = 3  # C: 3 for RGB, 1 for Fashion-MNIST
    num_classes: int = 1000  # 0 keeps the features and drops the head
    embed_dim: int = 768  # D, the width of every token
    depth: int = 12  # L, the number of encoder blocks
    num_heads: int = 12  # k heads of D/k channels each
    mlp_ratio: float = 4.0  # the MLP's hidden width is mlp_ratio * D
    qkv_bias: bool = True  # bias on the q, k, v projections (T2T-ViT has none)
    class_token: bool = True  # prepend the learnable x_class (eq. 1)
    pool: str = "token"  # "token": read the class token; "gap": average the patch tokens
    fc_norm: bool = False  # the final LayerNorm after pooling (timm's GAP), not on every token
    pos_embed: str = "learn"  # one of embeddings.POS_EMBED_TYPES
    representation_size: int | None = None  # pre-logits Linear + tanh of this width, or None
    tokenizer: str = "patch"  # "patch" | "hybrid" | "t2t"
    hybrid_layers: tuple[int, ...] = ()  # ResNet-v2 blocks per stage, e.g. (3, 4, 9) for R50
    hybrid_stem: str = "resnet"  # "resnet" (7x7/2 + max-pool) or "small" (3x3/1, for 28x28)
    hybrid_width: int = 64  # channels of the ResNet-v2 stem
    t2t_token_dim: int = 64  # width of the tokens inside the T2T module
    t2t_token_type: str = "transformer"  # "transformer" (T2T-ViT_t) or "performer"
    t2t_kernels: tuple[tuple[int, int, int], ...] = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
    drop_rate: float = 0.0  # dropout after the embeddings, the MLPs and attention projections
    attn_drop_rate: float = 0.0  # dropout on the attention weights
    drop_path_rate: float = 0.0  # stochastic depth of the last block (linear from 0)
    norm_eps: float = 1e-6  # LayerNorm epsilon (the ViT code uses 1e-6, T2T-ViT's 1e-5)

    def __post_init__(self):
        # JSON turns tuples into lists; put them back so configs compare equal.
        self.img_size = to_2tuple(self.img_size)
        self.hybrid_layers = tuple(self.hybrid_layers)
        self.t2t_kernels = tuple(tuple(k) for k in self.t2t_kernels)
        _check_ranges(self)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        for name, value, allowed in [
            ("pool", self.pool, tuple(POOLS)),
            ("pos_embed", self.pos_embed, POS_EMBED_TYPES),
            ("tokenizer", self.tokenizer, tuple(TOKENIZERS)),
        ]:
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if self.pool == "token" and not self.class_token:
            raise ValueError('pool="token" needs class_token=True; use pool="gap" without it')
        if self.fc_norm and self.pool == "token":
            raise ValueError('fc_norm=True normalises after pooling, which for pool="token" is '
                             'the same as fc_norm=False; use it with pool="gap"')
        _check_tokenizer_fields(self)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, cols) of the tokens the tokenizer makes, computed without building it."""
        return TOKENIZERS[self.tokenizer].grid(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        """A config from a dict of fields; an unknown name is refused with the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> ViTConfig:
        return dataclasses.replace(self, **changes)


def _check_ranges(cfg: ViTConfig) -> None:
    """Every size positive, every rate a probability: zero heads or a zero MLP ratio would
    otherwise divide by zero deep inside, or quietly build another model."""
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    rules = [
        ("img_size", cfg.img_size, all(positive_int(v) for v in cfg.img_size),
         "positive (height, width)"),
        ("patch_size", cfg.patch_size, positive_int(cfg.patch_size), "a positive int"),
        ("in_chans", cfg.in_chans, positive_int(cfg.in_chans), "a positive int"),
        ("num_classes", cfg.num_classes, isinstance(cfg.num_classes, int)
         and cfg.num_classes >= 0, "an int >= 0 (0: no head)"),
        ("embed_dim", cfg.embed_dim, positive_int(cfg.embed_dim), "a positive int"),
        ("depth", cfg.depth, isinstance(cfg.depth, int) and cfg.depth >= 0, "an int >= 0"),
        ("num_heads", cfg.num_heads, positive_int(cfg.num_heads), "a positive int"),
        ("mlp_ratio", cfg.mlp_ratio, cfg.mlp_ratio > 0 and int(cfg.embed_dim * cfg.mlp_ratio)
         >= 1, "> 0, with a hidden width int(embed_dim * mlp_ratio) >= 1"),
        ("representation_size", cfg.representation_size, cfg.representation_size is None
         or (isinstance(cfg.representation_size, int) and cfg.representation_size >= 0),
         "None or an int >= 0"),
        ("hybrid_width", cfg.hybrid_width, positive_int(cfg.hybrid_width), "a positive int"),
        ("t2t_token_dim", cfg.t2t_token_dim, positive_int(cfg.t2t_token_dim), "a positive int"),
        ("norm_eps", cfg.norm_eps, cfg.norm_eps > 0, "> 0"),
        *[(name, getattr(cfg, name), 0 <= getattr(cfg, name) < 1, "in [0, 1)")
          for name in ("drop_rate", "attn_drop_rate", "drop_path_rate")],
    ]
    problems = [f"{name} must be {rule}, got {value!r}" for name, value, ok, rule in rules
                if not ok]
    if problems:
        raise ValueError("; ".join(problems))


class Tokenizer(Protocol):
    """What `VisionTransformer` needs of a tokenizer (`PatchEmbed`, `HybridEmbed`, `T2TModule`).

    Called on images (B, in_chans, *img_size), it returns tokens (B, N, embed_dim) that lie on
    a `grid_size` = (rows, cols) grid in row-major order, N = `num_patches` = rows * cols. The
    grid sizes the position embedding, and position tables are resampled on it.
    """

    grid_size: tuple[int, int]
    num_patches: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TokenizerSpec:
    """How a config names one tokenizer: how to build it, its grid without building it, and
    the ViTConfig fields that only it reads (set for another tokenizer, they are refused)."""

    build: Callable[[ViTConfig], Tokenizer]
    grid: Callable[[ViTConfig], tuple[int, int]]
    fields: tuple[str, ...]


def _patch(cfg: ViTConfig) -> Tokenizer:
    return PatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                      embed_dim=cfg.embed_dim)


def _patch_grid(cfg: ViTConfig) -> tuple[int, int]:
    (H, W), P = cfg.img_size, cfg.patch_size
    if H % P or W % P:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {P}x{P}")
    return (H // P, W // P)


def _hybrid(cfg: ViTConfig) -> Tokenizer:
    from .hybrid import HybridEmbed

    return HybridEmbed(img_size=cfg.img_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                       layers=cfg.hybrid_layers, stem=cfg.hybrid_stem, width=cfg.hybrid_width)


def _hybrid_grid(cfg: ViTConfig) -> tuple[int, int]:
    from .hybrid import feature_grid

    return feature_grid(cfg.img_size, layers=cfg.hybrid_layers, stem=cfg.hybrid_stem)


def _t2t(cfg: ViTConfig) -> Tokenizer:
    from .t2t import T2TModule

    return T2TModule(img_size=cfg.img_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                     token_dim=cfg.t2t_token_dim, token_type=cfg.t2t_token_type,
                     kernels=cfg.t2t_kernels)


def _t2t_grid(cfg: ViTConfig) -> tuple[int, int]:
    from .t2t import stage_grids

    return stage_grids(cfg.img_size, cfg.t2t_kernels)[-1]


# The tokenizers a config can name. A new one is a module with the `Tokenizer` contract,
# its config fields in ViTConfig, and one entry here.
TOKENIZERS: dict[str, TokenizerSpec] = {
    "patch": TokenizerSpec(_patch, _patch_grid, ("patch_size",)),
    # Section 3.1: the hybrid cuts its feature map into 1x1 patches; patch_size must be 1.
    "hybrid": TokenizerSpec(_hybrid, _hybrid_grid,
                            ("patch_size", "hybrid_layers", "hybrid_stem", "hybrid_width")),
    "t2t": TokenizerSpec(_t2t, _t2t_grid, ("t2t_token_dim", "t2t_token_type", "t2t_kernels")),
}


def _check_tokenizer_fields(cfg: ViTConfig) -> None:
    """Fields of another tokenizer must keep their defaults: this one would ignore them."""
    own = set(TOKENIZERS[cfg.tokenizer].fields)
    defaults = {f.name: f.default for f in dataclasses.fields(ViTConfig)}
    foreign = [
        f"{name}={getattr(cfg, name)!r} (read by tokenizer "
        f"{' or '.join(repr(t) for t, s in TOKENIZERS.items() if name in s.fields)})"
        for name in dict.fromkeys(f for s in TOKENIZERS.values() for f in s.fields)
        if name not in own and getattr(cfg, name) != defaults[name]
    ]
    if foreign:
        raise ValueError(f"tokenizer={cfg.tokenizer!r} does not read {', '.join(foreign)}; "
                         f"leave them at their defaults or choose that tokenizer")
    if cfg.tokenizer == "hybrid":
        if not cfg.hybrid_layers:
            raise ValueError("tokenizer='hybrid' needs hybrid_layers, e.g. (3, 4, 9)")
        if cfg.patch_size != 1:
            raise ValueError(f"tokenizer='hybrid' cuts the CNN's feature map into 1x1 patches "
                             f"(section 3.1): patch_size must be 1, got {cfg.patch_size}")


def token_grid(cfg: ViTConfig) -> tuple[int, int]:
    """(rows, cols) of the tokens for `cfg`, without building a model (`cfg.grid_size`)."""
    return TOKENIZERS[cfg.tokenizer].grid(cfg)


def build_tokenizer(cfg: ViTConfig) -> Tokenizer:
    """The module that turns (B, C, H, W) images into (B, N, D) tokens, with `grid_size`."""
    return TOKENIZERS[cfg.tokenizer].build(cfg)


class VisionTransformer(nn.Module):
    """ViT: tokenizer -> [class token] -> + E_pos -> L encoder blocks -> LN -> pool -> head."""

    def __init__(self, config: ViTConfig | None = None, **overrides):
        super().__init__()
        config = config or ViTConfig()
        self.config = cfg = config.replace(**overrides) if overrides else config
        D = cfg.embed_dim
        self.num_prefix_tokens = 1 if cfg.class_token else 0

        self.patch_embed = build_tokenizer(cfg)
        if tuple(self.patch_embed.grid_size) != cfg.grid_size:  # the Tokenizer contract
            raise RuntimeError(f"tokenizer {cfg.tokenizer!r} made a {self.patch_embed.grid_size} "
                               f"grid; its spec says {cfg.grid_size}")
        self.cls_token = ClassToken(D) if cfg.class_token else None
        self.pos_embed = build_pos_embed(
            cfg.pos_embed,
            grid_size=self.patch_embed.grid_size,
            dim=D,
            num_prefix_tokens=self.num_prefix_tokens,
        )
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.blocks = Encoder(
            depth=cfg.depth,
            drop_path_rate=cfg.drop_path_rate,
            dim=D,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            drop=cfg.drop_rate,
            attn_drop=cfg.attn_drop_rate,
            norm_eps=cfg.norm_eps,
            relative_positions=((self.patch_embed.num_patches, self.num_prefix_tokens)
                                if getattr(self.pos_embed, "relative", False) else None),
        )
        # The final LayerNorm: on every token of z_L (eq. 4 reads the class token's, and the
        # official code averages the normalised tokens for GAP), or, with fc_norm, on the
        # pooled vector (timm's default for GAP). One module either way, so the keys agree.
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        if cfg.representation_size:
            self.pre_logits = nn.Sequential(nn.Linear(D, cfg.representation_size), nn.Tanh())
            head_in = cfg.representation_size
        else:
            self.pre_logits = nn.Identity()
            head_in = D
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(head_in, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.apply(init_weights)  # timm's and DeiT's init, not the official ViT code's

    @property
    def num_features(self) -> int:
        """The width of the features the last Linear reads (`forward_head(..., pre_logits=True)`):
        `representation_size` with a pre-logits layer, else the embedding width D."""
        return self.config.representation_size or self.config.embed_dim

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW must not decay (as timm's): the class token, the position
        tables (relative ones too), and every bias and norm weight (all 1-D)."""
        return {name for name, p in self.named_parameters()
                if p.ndim <= 1 or name.startswith(("cls_token.", "pos_embed."))
                or ".logit_bias." in name}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 1: images (B, C, H, W) -> z_0 (B, prefix + N, D)."""
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = self.cls_token(x)  # (B, 1 + N, D)
        return self.pos_drop(self.pos_embed(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the encoder's output z_L, (B, prefix + N, D); normalised unless fc_norm."""
        x = self.blocks(self.embed(x))
        return x if self.config.fc_norm else self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """z_L (B, prefix + N, D) -> y (B, D), by `config.pool` (see POOLS), then fc_norm."""
        y = POOLS[self.config.pool](x, self.num_prefix_tokens)  # (B, D)
        return self.norm(y) if self.config.fc_norm else y

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """z_L -> logits (B, num_classes); `pre_logits=True` stops before the last Linear."""
        x = self.head_drop(self.pre_logits(self.pool(x)))  # (B, num_features)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def get_attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Every block's attention weights, (depth, B, heads, N, N), N counting the class token."""
        _, maps = self.blocks(self.embed(x), return_attention=True)
        return torch.stack(maps)

