"""Data: Fashion-MNIST, one photograph, normalization and the model's input (notebooks 01, 05).

Used by notebook 01 (`load_photo`, a 224x224 photograph to cut into 16x16 patches),
notebook 05 (`load_fashion_mnist`, training a small ViT on 28x28 images) and by
`vit_tutorial.train`.

Fashion-MNIST: H. Xiao, K. Rasul, R. Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017. 60,000 training and
10,000 test grey images of 28x28 pixels, 10 classes, stored in the IDX format of MNIST.
The four gzip files ship in ``data/fashion-mnist/`` (see ``data/README.md`` for their
source, licence and checksums); nothing is downloaded at run time.

`preprocess` turns the stored uint8 images into what a model reads: normalised, and
resized to the model's input size. The training augmentations live in `augment.py`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATA_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_SHA256",
    "PHOTOS",
    "load_fashion_mnist",
    "parse_idx",
    "load_photo",
    "normalize",
    "denormalize",
    "preprocess",
]

# The repository's data/ folder; set VIT_TUTORIAL_DATA to read the data from elsewhere.
DATA_DIR = Path(
    os.environ.get("VIT_TUTORIAL_DATA") or Path(__file__).resolve().parent.parent / "data"
)

# Label i is FASHION_MNIST_CLASSES[i] (Xiao et al. 2017, table 1).
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Mean and standard deviation of all 60,000 x 28 x 28 training pixels scaled to [0, 1]
# (tests/test_data.py recomputes them).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

# split -> (images file, labels file), inside DATA_DIR / "fashion-mnist".
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# SHA-256 of the gzip files as shipped (Debian's dataset-fashion-mnist; data/README.md).
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
    ),
    "train-labels-idx1-ubyte.gz": (
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"
    ),
}

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (N, rows, cols)
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (N,)
_IMAGE_SIZE = (28, 28)
_SPLIT_SIZES = {"train": 60_000, "test": 10_000}

# name -> file under DATA_DIR; each is 224x224 RGB (data/images/make_photo.py).
PHOTOS = {"chelsea": "images/chelsea_224.png"}


# ---------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------


def parse_idx(raw: bytes, *, expected_magic: int, source: str = "<bytes>") -> np.ndarray:
    """Parse decompressed IDX bytes of unsigned bytes into a read-only uint8 array.

    Header: a big-endian int32 magic number (0x0000 0x08 ndim), then ndim big-endian
    int32 sizes, then the payload, which must hold exactly prod(sizes) bytes.
    `source` names the data in error messages.
    """
    if len(raw) < 4:
        raise ValueError(f"{source}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{source}: IDX magic number is {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(f"{source}: {len(raw)} bytes is too short for a {ndim}-d IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_len = math.prod(dims)
    if len(raw) - offset != expected_len:
        raise ValueError(
            f"{source}: IDX payload is {len(raw) - offset} bytes, expected {expected_len} "
            f"for dims {dims}"
        )
    # frombuffer shares the bytes, which are immutable, so the array is read-only.
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _read_gzip_idx(path: Path, *, expected_magic: int, verify: bool) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: Fashion-MNIST file not found (expected the four gzip IDX files of "
            f"data/fashion-mnist/ there; set VIT_TUTORIAL_DATA or pass root=)"
        )
    compressed = path.read_bytes()
    expected_sha = FASHION_MNIST_SHA256.get(path.name)
    if verify and expected_sha is not None:
        sha = hashlib.sha256(compressed).hexdigest()
        if sha != expected_sha:
            raise ValueError(f"{path}: SHA-256 is {sha}, expected {expected_sha}")
    try:
        raw = gzip.decompress(compressed)
    except (OSError, EOFError, zlib.error) as err:  # bad header, truncated, corrupt
        raise ValueError(f"{path}: not a valid gzip file ({err})") from err
    return parse_idx(raw, expected_magic=expected_magic, source=str(path))


def _file_key(path: Path) -> tuple:
    # Part of the cache key, so a file replaced on disk is read again.
    try:
        st = path.stat()
    except FileNotFoundError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_cached(
    images_key: tuple, labels_key: tuple, verify: bool
) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = Path(images_key[0]), Path(labels_key[0])
    images = _read_gzip_idx(images_path, expected_magic=_IDX_IMAGES_MAGIC, verify=verify)
    labels = _read_gzip_idx(labels_path, expected_magic=_IDX_LABELS_MAGIC, verify=verify)
    if images.shape[1:] != _IMAGE_SIZE:
        raise ValueError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
            f"expected {_IMAGE_SIZE[0]}x{_IMAGE_SIZE[1]}"
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path}: {labels.shape[0]} labels, expected one per image of "
            f"{images_path} ({images.shape[0]})"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"{labels_path}: label {int(labels.max())} out of range, "
            f"expected 0..{len(FASHION_MNIST_CLASSES) - 1}"
        )
    return images, labels  # read-only arrays; callers get copies


def load_fashion_mnist(
    split: str = "train", *, root: str | os.PathLike | None = None, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split as (images, labels).

    Returns uint8 images (N, 28, 28) with pixels 0..255 and int64 labels (N,) in 0..9;
    N is 60,000 for "train" and 10,000 for "test". `root` is the folder holding the four
    gzip IDX files (default ``DATA_DIR / "fashion-mnist"``). With `verify` (the default)
    each file's SHA-256 must equal `FASHION_MNIST_SHA256`; ``verify=False`` accepts other
    gzip bytes of the same data (e.g. the upstream downloads, compressed differently) and
    still checks the IDX structure. Parsed files are cached in-process; every call returns
    fresh tensors, so changing them in place cannot corrupt the cache.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    folder = Path(root) if root is not None else DATA_DIR / "fashion-mnist"
    images_name, labels_name = FASHION_MNIST_FILES[split]
    images, labels = _load_cached(
        _file_key(folder.resolve() / images_name),
        _file_key(folder.resolve() / labels_name),
        verify,
    )
    if len(images) != _SPLIT_SIZES[split]:  # verify=False trusts the bytes, not the count
        raise ValueError(
            f"{folder / images_name}: {len(images)} images, expected the {_SPLIT_SIZES[split]:,} "
            f"of Fashion-MNIST's {split} split"
        )
    # (N, 28, 28) uint8 and (N,) int64, both copies of the cached arrays.
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------
# The photograph of notebook 01
# ---------------------------------------------------------------------------------------


def load_photo(name: str = "chelsea") -> torch.Tensor:
    """Load a shipped photograph as a float32 tensor (3, 224, 224) with values in [0, 1].

    "chelsea" is Chelsea the cat (CC0, Stefan van der Walt; from scikit-image's sample
    data, centre-cropped and resized by data/images/make_photo.py).
    """
    import matplotlib.image  # here, so importing vit_tutorial.data stays light

    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}, available: {sorted(PHOTOS)}")
    path = DATA_DIR / PHOTOS[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: photo {name!r} not found")
    array = matplotlib.image.imread(path)  # (H, W, C); PNG -> float32 in [0, 1]
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"{path}: expected an RGB(A) image, got array of shape {array.shape}")
    rgb = np.ascontiguousarray(array[:, :, :3], dtype=np.float32)  # drop alpha if any
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # (3, H, W)


# ---------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------


def normalize(
    images: torch.Tensor, *, mean: float = FASHION_MNIST_MEAN, std: float = FASHION_MNIST_STD
) -> torch.Tensor:
    """Turn a (B, 28, 28) or (B, 1, H, W) batch into float (B, 1, H, W) (x - mean) / std.

    uint8 input is scaled by 1/255 first; floating input must already be in [0, 1].
    """
    if images.ndim == 3:
        images = images.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"expected a (B, H, W) or (B, 1, H, W) batch, got shape {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif not images.is_floating_point():
        raise ValueError(f"expected uint8 or floating images, got dtype {images.dtype}")
    return (images - mean) / std


def denormalize(
    images: torch.Tensor, *, mean: float = FASHION_MNIST_MEAN, std: float = FASHION_MNIST_STD
) -> torch.Tensor:
    """Undo `normalize`: pixels back in [0, 1] (for plotting), same shape."""
    return images * std + mean


def preprocess(images: torch.Tensor, img_size: int | tuple[int, int] = (28, 28)) -> torch.Tensor:
    """Stored images -> a model's input: uint8 (B, 28, 28) or float [0, 1] (B, 1, H, W) in,
    normalised float (B, 1, *img_size) out.

    Images are resized bilinearly when the model reads another size (a model fine-tuned at
    56x56 reads upsampled 28x28 images).
    """
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    x = images.unsqueeze(1) if images.ndim == 3 else images  # (B, 1, H, W)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x
    if tuple(x.shape[-2:]) != img_size:
        x = F.interpolate(x, size=img_size, mode="bilinear", align_corners=False)
    return normalize(x)
