"""Moving weights between this package and timm (notebooks 05, 06, 08).

Our module names follow the paper and timm (`patch_embed`, `blocks.i.attn.qkv`, `norm`,
`head`), so the mapping is short: the class token and the learned position table are
modules here (`cls_token.weight`, `pos_embed.weight`) and bare parameters in timm, and
timm calls the final LayerNorm `fc_norm` when it follows the pooling (our `fc_norm=True`).
Nothing here downloads: with internet, `timm.create_model(name, pretrained=True).state_dict()`
gives a dict that `load_timm_state_dict` accepts.
"""

from __future__ import annotations

import torch

from .vit import VisionTransformer

__all__ = ["load_timm_state_dict", "to_timm_state_dict", "from_timm_key", "check_state_dict"]


def _check_convertible(model: VisionTransformer) -> None:
    cfg = model.config
    if cfg.tokenizer == "t2t":
        raise ValueError("timm has no T2T-ViT; T2T models cannot be converted to or from timm")
    if cfg.pos_embed not in ("learn", "none"):
        raise ValueError(
            f"timm's VisionTransformer has learned 1-D position embeddings only; "
            f"this model uses pos_embed={cfg.pos_embed!r}"
        )
    if cfg.representation_size:
        raise ValueError(
            "timm's VisionTransformer has no pre-logits layer; this model has "
            f"representation_size={cfg.representation_size}"
        )


def from_timm_key(key: str, *, fc_norm: bool = False) -> str:
    """The name in our model of timm's parameter `key`."""
    if key in ("cls_token", "pos_embed"):
        return f"{key}.weight"
    if fc_norm and key.startswith("fc_norm."):
        return "norm." + key[len("fc_norm.") :]
    return key


_SHOWN = 8  # names listed in an error; the rest are counted


def _some(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    more = f", ... {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"[{shown}{more}] ({len(names)})"


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError listing missing, unexpected and mis-shaped keys, if any."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(
        f"{k}: expected {expected[k]}, got {given[k]}"
        for k in set(expected) & set(given)
        if expected[k] != given[k]
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_some(unexpected)}")
        if shapes:
            parts.append(f"mis-shaped keys [{'; '.join(shapes[:_SHOWN])}"
                         f"{f'; ... {len(shapes) - _SHOWN} more' if len(shapes) > _SHOWN else ''}]")
        hint = ""
        if any(k.startswith("pos_embed") for k in shapes):
            hint = " (a different image size? see vit_tutorial.resample_pos_embed)"
        raise ValueError("state dict does not match the model: " + ", ".join(parts) + hint)


@torch.no_grad()
def load_timm_state_dict(
    model: VisionTransformer, state_dict: dict[str, torch.Tensor]
) -> VisionTransformer:
    """Load a timm ViT or hybrid state dict into the matching model, strictly. Returns `model`."""
    _check_convertible(model)
    ours = {from_timm_key(k, fc_norm=model.config.fc_norm): v for k, v in state_dict.items()}
    check_state_dict(model, ours)
    model.load_state_dict(ours, strict=True)
    return model


def to_timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The model's weights under timm's names, for `timm_model.load_state_dict`."""
    _check_convertible(model)
    fc_norm = model.config.fc_norm
    inverse = {}
    for key, value in model.state_dict().items():
        if key in ("cls_token.weight", "pos_embed.weight"):
            name = key.split(".")[0]
        elif fc_norm and key.startswith("norm."):
            name = "fc_norm." + key[len("norm.") :]
        else:
            name = key
        inverse[name] = value
    return inverse
