"""Saving and loading models as safetensors, with their config inside (notebooks 05-08).

A checkpoint is one `.safetensors` file: the weights, plus JSON in the header with the
`ViTConfig` and free-form metadata (accuracy, the command that trained it, ...). Loading
never unpickles and never runs code. Writes go to a temporary file that is flushed to
the disk and renamed into place, so an interrupted save leaves the old checkpoint intact.

What loading checks, before it builds anything: the header has every key; a SHA-256 over
the header's config and metadata and over every tensor matches the one stored (a flipped
bit anywhere is reported, not loaded); every tensor is float32, float16 or bfloat16 and
finite; the tensors' names and shapes fit the config (checked on the `meta` device, so a
damaged header cannot make it allocate a large model). Files of the first format
(`vit_tutorial/1`) still load; their SHA-256 covers the weights only.
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

from .interop import check_state_dict
from .vit import VisionTransformer, ViTConfig

__all__ = ["save_checkpoint", "load_checkpoint", "read_metadata", "resize_state_dict",
           "atomic_write", "remove_stale_temporaries", "upgrade_checkpoint"]

FORMAT = "vit_tutorial/2"  # the SHA-256 covers the config and metadata too
OLD_FORMATS = ("vit_tutorial/1",)  # its SHA-256 covers the weights only
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEADER_KEYS = ("format", "config", "metadata", "sha256")


def _digest(tensors: dict[str, torch.Tensor], *, config: str | None = None,
            metadata: str | None = None) -> str:
    h = hashlib.sha256()
    if config is not None:  # format 2: the header's JSON first, as stored
        h.update(f"config:{len(config)}:{config};metadata:{len(metadata)}:{metadata};".encode())
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
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    tensors = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
        .cpu()
        .contiguous()
        for k, v in model.state_dict().items()
    }
    config, meta = json.dumps(model.config.to_dict()), json.dumps(metadata)
    header = {"format": FORMAT, "config": config, "metadata": meta,
              "sha256": _digest(tensors, config=config, metadata=meta)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def atomic_write(path: str | os.PathLike, write) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it to `path`.

    A rename within one folder is atomic: readers, and a run resumed after a kill, see
    the old file or the new one, never half of one. The data is flushed to the disk
    (fsync) before the rename, and the folder after it, so that a power cut cannot leave
    a renamed but empty file. The file gets the permissions of a new file under the
    umask (as `open` would give it). The temporary file is removed if `write` fails; one
    left by a kill is named `.NAME.*.tmp` and `remove_stale_temporaries` clears it.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that `atomic_write` calls left behind when killed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder; its renames are durable
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a .safetensors checkpoint file "
                                f"(e.g. {path / 'model.safetensors'})")
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
    if header.get("format") not in (FORMAT, *OLD_FORMATS):
        raise ValueError(
            f"{path} is not a vit_tutorial checkpoint: header format is "
            f"{header.get('format')!r}, expected {FORMAT!r}"
        )
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise ValueError(f"{path} is corrupt: its header lacks {missing} "
                         f"(expected the keys {list(HEADER_KEYS)})")
    return header, tensors


def _verify(path: Path, header: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """The SHA-256, then dtypes and values: anything else is refused, never loaded."""
    if header["format"] == FORMAT:
        digest = _digest(tensors, config=header["config"], metadata=header["metadata"])
    else:
        digest = _digest(tensors)
    if header["sha256"] != digest:
        raise ValueError(f"{path} is corrupt: its weights or header do not match the SHA-256 "
                         f"in its header")
    wrong = {k: str(t.dtype) for k, t in tensors.items() if t.dtype not in FLOAT_DTYPES}
    if wrong:
        raise ValueError(f"{path}: expected float32, float16 or bfloat16 tensors, got {wrong}")
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path} holds non-finite values (NaN or inf) in {bad}")


def _parse_header(path: Path, header: dict[str, str]) -> tuple[ViTConfig, dict]:
    try:
        return (ViTConfig.from_dict(json.loads(header["config"])),
                json.loads(header["metadata"]))
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: the config in its header is invalid: {e}") from None


def read_metadata(path: str | os.PathLike) -> tuple[ViTConfig, dict]:
    """The config and metadata stored in a checkpoint, verified, without building the model."""
    path = Path(path)
    header, tensors = _read(path)
    _verify(path, header, tensors)
    return _parse_header(path, header)


def upgrade_checkpoint(path: str | os.PathLike) -> Path:
    """Rewrite a verified format-1 file in format 2, tensors bit for bit unchanged.

        python -c "import vit_tutorial.checkpoint as c; c.upgrade_checkpoint('FILE')"
    """
    path = Path(path)
    header, tensors = _read(path)
    _verify(path, header, tensors)
    if header["format"] == FORMAT:
        return path
    config, metadata = header["config"], header["metadata"]
    new = {"format": FORMAT, "config": config, "metadata": metadata,
           "sha256": _digest(tensors, config=config, metadata=metadata)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=new))
    return path


def resize_state_dict(
    state_dict: dict[str, torch.Tensor], model: VisionTransformer, old_config: ViTConfig
) -> dict[str, torch.Tensor]:
    """Adapt the position embedding saved for `old_config`'s grid to `model`'s grid.

    The embedding's own class does it (`resample_state`): a learned 1-D table bicubic in
    2-D (ViT paper, section 3.2), a learned 2-D one per axis, fixed tables not at all.
    """
    old_grid = old_config.grid_size  # from the config alone: nothing is built
    new_grid = model.patch_embed.grid_size
    if old_grid == new_grid:
        return state_dict
    prefix = "pos_embed."
    mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    resampled = type(model.pos_embed).resample_state(
        mine, old_grid=old_grid, new_grid=new_grid, num_prefix_tokens=model.num_prefix_tokens)
    out = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    out.update({prefix + k: v for k, v in resampled.items()})
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
    _verify(path, header, tensors)
    config, metadata = _parse_header(path, header)
    with torch.device("meta"):  # shapes first: a bad file never allocates a whole model
        saved = VisionTransformer(config)
    try:
        check_state_dict(saved, tensors)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    model = VisionTransformer(config.replace(**overrides) if overrides else config)
    tensors = {k: v.float() for k, v in tensors.items()}
    if "img_size" in overrides:
        tensors = resize_state_dict(tensors, model, config)
    try:
        check_state_dict(model, tensors)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    model.load_state_dict(tensors, strict=True)
    return model.to(map_location), metadata
