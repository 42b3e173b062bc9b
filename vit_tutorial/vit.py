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
from dataclasses import dataclass

import torch
from torch import nn

from .embeddings import POS_EMBED_TYPES, ClassToken, build_pos_embed
from .encoder import Encoder
from .patches import PatchEmbed, to_2tuple

__all__ = ["ViTConfig", "VisionTransformer"]

TOKENIZERS = ("patch", "hybrid", "t2t")
POOLS = ("token", "gap")


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
            ("pool", self.pool, POOLS),
            ("pos_embed", self.pos_embed, POS_EMBED_TYPES),
            ("tokenizer", self.tokenizer, TOKENIZERS),
        ]:
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if self.pool == "token" and not self.class_token:
            raise ValueError('pool="token" needs class_token=True; use pool="gap" without it')
        if self.tokenizer == "hybrid" and not self.hybrid_layers:
            raise ValueError("tokenizer='hybrid' needs hybrid_layers, e.g. (3, 4, 9)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
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


def build_tokenizer(cfg: ViTConfig) -> nn.Module:
    """The module that turns (B, C, H, W) images into (B, N, D) tokens, with `grid_size`."""
    if cfg.tokenizer == "patch":
        return PatchEmbed(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            embed_dim=cfg.embed_dim,
        )
    if cfg.tokenizer == "hybrid":
        from .hybrid import HybridEmbed

        return HybridEmbed(
            img_size=cfg.img_size,
            in_chans=cfg.in_chans,
            embed_dim=cfg.embed_dim,
            layers=cfg.hybrid_layers,
            stem=cfg.hybrid_stem,
            width=cfg.hybrid_width,
        )
    from .t2t import T2TModule

    return T2TModule(
        img_size=cfg.img_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        token_dim=cfg.t2t_token_dim,
        token_type=cfg.t2t_token_type,
        kernels=cfg.t2t_kernels,
    )


class VisionTransformer(nn.Module):
    """ViT: tokenizer -> [class token] -> + E_pos -> L encoder blocks -> LN -> pool -> head."""

    def __init__(self, config: ViTConfig | None = None, **overrides):
        super().__init__()
        config = config or ViTConfig()
        self.config = cfg = config.replace(**overrides) if overrides else config
        D = cfg.embed_dim
        self.num_prefix_tokens = 1 if cfg.class_token else 0

        self.patch_embed = build_tokenizer(cfg)
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
            dim=D,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            drop=cfg.drop_rate,
            attn_drop=cfg.attn_drop_rate,
            drop_path_rate=cfg.drop_path_rate,
            norm_eps=cfg.norm_eps,
        )
        # Eq. 4 normalises the class token; with GAP the norm follows the pooling instead.
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        if cfg.representation_size:
            self.pre_logits = nn.Sequential(nn.Linear(D, cfg.representation_size), nn.Tanh())
            head_in = cfg.representation_size
        else:
            self.pre_logits = nn.Identity()
            head_in = D
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(head_in, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.apply(_init_weights)

    @property
    def num_features(self) -> int:
        return self.config.embed_dim

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW must not decay (as timm's): the class token, the position
        tables, and every bias and norm weight (all 1-D)."""
        return {name for name, p in self.named_parameters()
                if p.ndim <= 1 or name.startswith(("cls_token.", "pos_embed."))}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 1: images (B, C, H, W) -> z_0 (B, prefix + N, D)."""
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = self.cls_token(x)  # (B, 1 + N, D)
        return self.pos_drop(self.pos_embed(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the encoder's output z_L, (B, prefix + N, D); normalised unless GAP."""
        x = self.blocks(self.embed(x))
        return x if self.config.pool == "gap" else self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """z_L -> logits (B, num_classes); `pre_logits=True` stops before the last Linear."""
        if self.config.pool == "gap":
            x = self.norm(x[:, self.num_prefix_tokens :].mean(dim=1))  # (B, D)
        else:
            x = x[:, 0]  # y = LN(z_L^0), the class token (B, D)
        x = self.head_drop(self.pre_logits(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def get_attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Every block's attention weights, (depth, B, heads, N, N), N counting the class token."""
        _, maps = self.blocks(self.embed(x), return_attention=True)
        return torch.stack(maps)


def _init_weights(m: nn.Module) -> None:
    # As in the reference ViT code: truncated-normal Linear weights, zero biases; the patch
    # convolution keeps PyTorch's default (fan-in uniform).
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
