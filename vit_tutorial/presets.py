"""Named models: the paper's ViTs and hybrid, T2T-ViT, and the small 28x28 models we train.

Names of the paper's models follow timm (`vit_base_patch16_224`, ...). Table 1 of the ViT
paper gives Base/Large/Huge; "Tiny" and "Small" are DeiT's (Touvron et al. 2021). T2T-ViT
sizes are Table 1 of Yuan et al. 2021. The `_28` models read 28x28 grayscale Fashion-MNIST.
"""

from __future__ import annotations

import difflib

from .vit import VisionTransformer, ViTConfig

__all__ = ["PRESETS", "create_model", "get_config", "list_models"]

_T2T = dict(tokenizer="t2t", pos_embed="sincos1d", qkv_bias=False, norm_eps=1e-5)
_FMNIST = dict(img_size=28, in_chans=1, num_classes=10)
_HYBRID_MINI = dict(_FMNIST, tokenizer="hybrid", hybrid_layers=(2, 2, 2), hybrid_stem="small",
                    patch_size=1, embed_dim=192, depth=6, num_heads=3)

PRESETS: dict[str, dict] = {
    # ViT paper, Table 1 (+ DeiT's Tiny and Small), patch size in the name.
    "vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch32_224": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_large_patch32_224": dict(patch_size=32, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # The paper's hybrid: ResNet-50 stages (3, 4, 9) (output stride 16), then ViT-B on 1x1 patches.
    "vit_base_r50_s16_224": dict(
        tokenizer="hybrid", hybrid_layers=(3, 4, 9), patch_size=1,
        embed_dim=768, depth=12, num_heads=12,
    ),
    # T2T-ViT_t (transformer token layers), Yuan et al. 2021, Table 1.
    "t2t_vit_7": dict(_T2T, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_10": dict(_T2T, embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_12": dict(_T2T, embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_14": dict(_T2T, embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    "t2t_vit_19": dict(_T2T, embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
    "t2t_vit_24": dict(_T2T, embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
    # Small models for 28x28 Fashion-MNIST, trained by `python -m vit_tutorial.train`.
    # nano: trains for a minute on a laptop CPU in notebook 05.
    "vit_nano_patch4_28": dict(
        _FMNIST, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0
    ),
    # mini: the shipped `vit` checkpoint, under 6M parameters.
    "vit_mini_patch4_28": dict(
        _FMNIST, patch_size=4, embed_dim=192, depth=9, num_heads=3, mlp_ratio=4.0
    ),
    # A ResNet-v2 stem (28 -> 7, output stride 4) under a narrow ViT.
    "vit_mini_r26_s4_28": dict(_HYBRID_MINI, hybrid_width=32),
    # The same with a CNN 1.5x as wide (stages of 192, 384, 768 channels): the shipped `hybrid`.
    "vit_mini_r26_w48_s4_28": dict(_HYBRID_MINI, hybrid_width=48),
    # T2T with a gentler first split for small images: 28 -> 14 -> 7 -> 7 (49 tokens).
    "t2t_vit_mini_28": dict(
        _FMNIST, **_T2T, t2t_kernels=((5, 2, 2), (3, 2, 1), (3, 1, 1)),
        embed_dim=192, depth=9, num_heads=3, mlp_ratio=3.0,
    ),
}


def list_models(pattern: str = "") -> list[str]:
    """Names of all presets, sorted; `pattern` keeps those that contain it."""
    return sorted(n for n in PRESETS if pattern in n)


def get_config(name: str, **overrides) -> ViTConfig:
    """The preset's ViTConfig with `overrides` (img_size, num_classes, in_chans, ...) applied."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint} (list_models() gives all {len(PRESETS)} names)"
        )
    return ViTConfig.from_dict({**PRESETS[name], **overrides})  # a typo lists the known fields


def create_model(name: str, **overrides) -> VisionTransformer:
    """Build the preset `name`, e.g. create_model("vit_base_patch16_224", num_classes=10)."""
    return VisionTransformer(get_config(name, **overrides))
