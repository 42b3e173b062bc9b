"""Data: Fashion-MNIST, one photograph, normalization and batch augmentation.

Used by notebook 01 (`load_photo`, a 224x224 photograph to cut into 16x16 patches),
notebook 05 (`load_fashion_mnist`, training a small ViT on 28x28 images) and by
`vit_tutorial.train`.

Fashion-MNIST: H. Xiao, K. Rasul, R. Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017. 60,000 training and
10,000 test grey images of 28x28 pixels, 10 classes, stored in the IDX format of MNIST.
The four gzip files ship in ``data/fashion-mnist/`` (see ``data/README.md`` for their
source, licence and checksums); nothing is downloaded at run time.

The augmentations (`random_crop`, `random_hflip`, `random_erasing`, `augment`) are whole-
batch tensor operations: they draw every random number for the batch at once and run on
the batch's device, so a GPU batch never goes back to the CPU. Apply them to pixels in
[0, 1] *before* `normalize`: zero is then black, which is Fashion-MNIST's background.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import zlib
from dataclasses import dataclass
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
    "random_crop",
    "random_hflip",
    "random_erasing",
    "augment",
    "Augment",
    "mixup_cutmix",
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


# ---------------------------------------------------------------------------------------
# Batch augmentation (vectorized; runs on the batch's device)
# ---------------------------------------------------------------------------------------


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")


def _rand(n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """n uniform numbers in [0, 1) on x's device, drawn from `generator` where it lives.

    Drawing on the generator's device and moving the result keeps a seeded CPU generator
    reproducible for a batch on any device.
    """
    device = generator.device if generator is not None else x.device
    return torch.rand(n, generator=generator, device=device).to(x.device)


def random_crop(
    x: torch.Tensor, padding: int = 4, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pad each image by `padding` zeros on every side, then crop it back at a random offset.

    Zero is the value in whatever `x` holds: black for pixels in [0, 1] (use it before
    `normalize`), the mean pixel for normalized images. Shape, dtype and device are kept.
    """
    _check_batch(x)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x.clone()
    B, C, H, W = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    # Offsets in 0..2p for each image, drawn as floats so a generator on any device works.
    dy = (_rand(B, x, generator) * (2 * padding + 1)).long().clamp_max(2 * padding)  # (B,)
    dx = (_rand(B, x, generator) * (2 * padding + 1)).long().clamp_max(2 * padding)  # (B,)
    rows = dy[:, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(W, device=x.device)  # (B, W)
    batch = torch.arange(B, device=x.device)[:, None, None]  # (B, 1, 1)
    # Advanced indexing on (B, H+2p, W+2p, C) gathers one (H, W) window per image.
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def random_hflip(
    x: torch.Tensor, p: float = 0.5, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mirror each image left-right with probability `p`. Shape, dtype, device kept."""
    _check_batch(x)
    flip = _rand(x.shape[0], x, generator) < p  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_erasing(
    x: torch.Tensor,
    p: float = 0.25,
    *,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Set a random rectangle of each image to `value` with probability `p`.

    Zhong et al. 2017, "Random Erasing Data Augmentation": the rectangle covers a fraction
    of the image drawn from `scale`, with aspect ratio h/w drawn log-uniformly from `ratio`.
    Where torchvision retries rectangles that do not fit, this clamps h and w to the
    image, so every selected image loses at least one pixel. Shape, dtype, device kept.
    """
    _check_batch(x)
    B, C, H, W = x.shape
    area = (scale[0] + (scale[1] - scale[0]) * _rand(B, x, generator)) * (H * W)  # (B,)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * _rand(B, x, generator))  # (B,) h / w
    h = torch.sqrt(area * aspect).round().long().clamp(1, H)  # (B,)
    w = torch.sqrt(area / aspect).round().long().clamp(1, W)  # (B,)
    top = (_rand(B, x, generator) * (H - h + 1)).long()  # (B,) in 0..H-h
    left = (_rand(B, x, generator) * (W - w + 1)).long()  # (B,) in 0..W-w
    erase = _rand(B, x, generator) < p  # (B,)
    rows = torch.arange(H, device=x.device)[None, :]  # (1, H)
    cols = torch.arange(W, device=x.device)[None, :]  # (1, W)
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (B, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]  # (B, H, W)
    return torch.where(mask[:, None], torch.full_like(x, value), x)  # (B, C, H, W)


def augment(
    x: torch.Tensor,
    *,
    crop_padding: int = 4,
    flip: bool = True,
    erasing_p: float = 0.25,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop, horizontal flip, then random erasing: the recipe of notebook 05.

    Give it a (B, C, H, W) float batch with pixels in [0, 1] and `normalize` afterwards.
    """
    x = random_crop(x, crop_padding, generator=generator)
    if flip:
        x = random_hflip(x, 0.5, generator=generator)
    if erasing_p > 0:
        x = random_erasing(x, erasing_p, generator=generator)
    return x


def mixup_cutmix(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with the batch's mirror image (x[B-1-i]) and mix the labels alike.

    Mixup (Zhang et al. 2018) blends whole images, x = lam x_i + (1 - lam) x_j; CutMix
    (Yun et al. 2019) pastes a box of x_j over x_i and sets lam to the area kept. One lam
    per batch, drawn from Beta(alpha, alpha); each batch is a CutMix batch with probability
    `switch_prob` (when both alphas are > 0). Returns the mixed (B, C, H, W) images and
    (B, num_classes) soft targets, label smoothing included, for `F.cross_entropy`.
    """
    _check_batch(x)
    if y.shape != (x.shape[0],):
        raise ValueError(f"expected labels of shape ({x.shape[0]},), got {tuple(y.shape)}")
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mixup_cutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
    B, C, H, W = x.shape
    # Beta draws have no torch generator argument: seed a NumPy generator from `generator`,
    # so the result is still a function of the torch generator's state.
    seed = torch.randint(2**62, (1,), generator=generator,
                         device=generator.device if generator is not None else "cpu")
    rng = np.random.default_rng(int(seed))
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix
                else rng.beta(mixup_alpha, mixup_alpha))
    partner = x.flip(0)  # (B, C, H, W), image i meets image B-1-i
    if use_cutmix:
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2 + cut_h % 2, H)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2 + cut_w % 2, W)
        x = x.clone()
        x[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (H * W)  # the area that stayed x_i
    else:
        x = lam * x + (1 - lam) * partner
    off = label_smoothing / num_classes
    target = F.one_hot(y, num_classes).to(x.dtype) * (1 - label_smoothing) + off  # (B, K)
    return x, lam * target + (1 - lam) * target.flip(0)


@dataclass(frozen=True)
class Augment:
    """The settings of `augment` kept together; ``Augment()(x)`` augments a batch."""

    crop_padding: int = 4  # pixels of zero padding before the random 28x28 crop
    flip: bool = True  # mirror half of the images left-right
    erasing_p: float = 0.25  # probability of erasing one rectangle per image

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return augment(
            x,
            crop_padding=self.crop_padding,
            flip=self.flip,
            erasing_p=self.erasing_p,
            generator=generator,
        )
