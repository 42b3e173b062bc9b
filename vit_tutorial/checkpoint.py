"""Saving and loading models as safetensors, with their config inside (notebooks 05-08).

A checkpoint is one `.safetensors` file: the weights, plus JSON in the header with the
`ViTConfig` and free-form metadata (accuracy, the command that trained it, ...). Loading
never unpickles and never runs code. Writes go to a temporary file that is renamed into
place, so an interrupted save leaves the old checkpoint intact. A SHA-256 of the weights
is stored too, so that a corrupted file is reported instead of silently loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .embeddings import resample_pos_embed
from .interop import check_state_dict
from .vit import VisionTransformer, ViTConfig

__all__ = ["save_checkpoint", "load_checkpoint", "read_metadata", "resize_state_dict",
           "atomic_write"]

FORMAT = "vit_tutorial/1"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(
    model: VisionTransformer,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    **metadata,
) -> Path:
    """Write `model` (weights cast to `dtype` if given) and JSON-able `metadata` atomically."""
    path = Path(path)
    tensors = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
        .cpu()
        .contiguous()
        for k, v in model.state_dict().items()
    }
    header = {
        "format": FORMAT,
        "config": json.dumps(model.config.to_dict()),
        "metadata": json.dumps(metadata),
        "sha256": _digest(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def atomic_write(path: str | os.PathLike, write) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it to `path`.

    A rename within one folder is atomic: readers, and a run resumed after a kill, see
    the old file or the new one, never half of one. The temporary file is removed if
    `write` fails.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors checkpoint (truncated or corrupt?): {e}"
        ) from e
    if header.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a vit_tutorial checkpoint: header format is "
            f"{header.get('format')!r}, expected {FORMAT!r}"
        )
    return header, tensors


def read_metadata(path: str | os.PathLike) -> tuple[ViTConfig, dict]:
    """The config and metadata stored in a checkpoint, without building the model."""
    header, _ = _read(Path(path))
    return ViTConfig.from_dict(json.loads(header["config"])), json.loads(header["metadata"])


def resize_state_dict(
    state_dict: dict[str, torch.Tensor], model: VisionTransformer, old_config: ViTConfig
) -> dict[str, torch.Tensor]:
    """Adapt learned position tables saved for `old_config`'s grid to `model`'s grid (2-D)."""
    old_grid = VisionTransformer(old_config.replace(depth=0), num_classes=0)
    old_grid = old_grid.patch_embed.grid_size
    new_grid = model.patch_embed.grid_size
    if old_grid == new_grid:
        return state_dict
    out = dict(state_dict)
    if "pos_embed.weight" in out:  # learned 1-D: bicubic in 2-D (ViT paper, section 3.2)
        out["pos_embed.weight"] = resample_pos_embed(
            out["pos_embed.weight"],
            new_grid,
            old_size=old_grid,
            num_prefix_tokens=model.num_prefix_tokens,
        )
    for axis, key in enumerate(("pos_embed.row", "pos_embed.col")):  # learned 2-D: each in 1-D
        if key in out:
            t = out[key].float().T[None]  # (1, D/2, old)
            t = torch.nn.functional.interpolate(
                t, size=new_grid[axis], mode="linear", align_corners=False
            )
            out[key] = t[0].T.to(state_dict[key].dtype)
    return out


def load_checkpoint(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", **overrides
) -> tuple[VisionTransformer, dict]:
    """Build the checkpoint's model (float32) and load its weights. Returns (model, metadata).

    `overrides` change the config; with `img_size=...` the learned position embeddings are
    resampled to the new grid, as for fine-tuning at a higher resolution.
    """
    path = Path(path)
    header, tensors = _read(path)
    if header.get("sha256") != _digest(tensors):
        raise ValueError(f"{path} is corrupt: the weights do not match the SHA-256 in its header")
    config = ViTConfig.from_dict(json.loads(header["config"]))
    model = VisionTransformer(config.replace(**overrides) if overrides else config)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    if "img_size" in overrides:
        tensors = resize_state_dict(tensors, model, config)
    try:
        check_state_dict(model, tensors)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    model.load_state_dict(tensors, strict=True)
    return model.to(map_location), json.loads(header["metadata"])
