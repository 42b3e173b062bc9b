"""Tests for vit_tutorial/data.py: the shipped data, its checks, and batch augmentation."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_tutorial import data
from vit_tutorial.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_SHA256,
    FASHION_MNIST_STD,
    Augment,
    augment,
    denormalize,
    load_fashion_mnist,
    load_photo,
    normalize,
    parse_idx,
    random_crop,
    random_erasing,
    random_hflip,
)

REPO = Path(__file__).resolve().parent.parent
README = REPO / "data" / "README.md"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SPLIT_SIZES = {"train": 60_000, "test": 10_000}


# ---------------------------------------------------------------------------------------
# The real data
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_mnist_shapes_dtypes_and_balance(split):
    images, labels = load_fashion_mnist(split)
    N = SPLIT_SIZES[split]
    assert images.shape == (N, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (N,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    # Fashion-MNIST is exactly balanced: 6000 per class in train, 1000 in test.
    assert torch.bincount(labels, minlength=10).tolist() == [N // 10] * 10
    assert int(images.max()) == 255 and int(images.min()) == 0


def test_classes_in_label_order():
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top"
    assert FASHION_MNIST_CLASSES[5] == "Sandal"
    assert FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_returned_tensors_cannot_corrupt_the_cache():
    images, labels = load_fashion_mnist("test")
    expected_first = images[0].clone()
    images.zero_()
    labels.fill_(7)
    again_images, again_labels = load_fashion_mnist("test")
    assert torch.equal(again_images[0], expected_first)
    assert torch.bincount(again_labels, minlength=10).tolist() == [1000] * 10


def test_bad_split_names_allowed_and_received():
    with pytest.raises(ValueError, match=r"'test'.*'train'.*got 'val'"):
        load_fashion_mnist("val")


def test_mean_std_constants_recompute_to_4_decimals():
    images, _ = load_fashion_mnist("train")
    # A histogram of the 256 grey levels gives the exact moments in float64.
    counts = torch.bincount(images.flatten(), minlength=256).double()  # (256,)
    levels = torch.arange(256, dtype=torch.float64) / 255.0  # (256,)
    n = counts.sum()
    mean = (counts * levels).sum() / n
    std = torch.sqrt((counts * (levels - mean) ** 2).sum() / n)
    assert round(float(mean), 4) == FASHION_MNIST_MEAN
    assert round(float(std), 4) == FASHION_MNIST_STD


def _readme_table() -> dict[str, tuple[int, str]]:
    """path -> (bytes, sha256) from the table rows of data/README.md."""
    row = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*(\d+)\s*\|\s*`([0-9a-f]{64})`\s*\|\s*$")
    table = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        match = row.match(line.strip())
        if match:
            table[match.group(1)] = (int(match.group(2)), match.group(3))
    return table


def test_module_checksums_match_readme():
    table = _readme_table()
    for name, sha in FASHION_MNIST_SHA256.items():
        assert table[f"fashion-mnist/{name}"][1] == sha, name
    names = {name for pair in FASHION_MNIST_FILES.values() for name in pair}
    assert names == set(FASHION_MNIST_SHA256)


def test_readme_lists_every_shipped_file_with_size_and_sha256():
    table = _readme_table()
    data_dir = REPO / "data"
    shipped = [
        p
        for folder in ("fashion-mnist", "images", "checkpoints")
        for p in sorted((data_dir / folder).rglob("*"))
        if p.is_file() and p.suffix != ".md" and "__pycache__" not in p.parts
    ]
    assert shipped, "no data files found"
    for path in shipped:
        rel = path.relative_to(data_dir).as_posix()
        assert rel in table, f"{rel} is missing from data/README.md"
        raw = path.read_bytes()
        assert table[rel] == (len(raw), hashlib.sha256(raw).hexdigest()), rel


def test_data_dir_default_and_env_override(tmp_path):
    assert data.DATA_DIR == REPO / "data"
    code = "from vit_tutorial.data import DATA_DIR; print(DATA_DIR)"
    env = {**os.environ, "VIT_TUTORIAL_DATA": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(tmp_path)


# ---------------------------------------------------------------------------------------
# Damaged copies: every problem is an error that names the file
# ---------------------------------------------------------------------------------------

IMAGES, LABELS = FASHION_MNIST_FILES["test"]


@pytest.fixture
def test_copy(tmp_path):
    """A copy of the (small) test split in tmp_path."""
    for name in (IMAGES, LABELS):
        shutil.copyfile(data.DATA_DIR / "fashion-mnist" / name, tmp_path / name)
    return tmp_path


def _rewrite(path: Path, edit) -> None:
    """Decompress, edit the IDX bytes, recompress reproducibly."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    path.write_bytes(gzip.compress(bytes(edit(raw)), compresslevel=1, mtime=0))


def test_valid_copy_loads_like_the_default(test_copy):
    images, labels = load_fashion_mnist("test", root=test_copy)
    default_images, default_labels = load_fashion_mnist("test")
    assert torch.equal(images, default_images) and torch.equal(labels, default_labels)


def test_missing_file(test_copy):
    (test_copy / LABELS).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(LABELS)):
        load_fashion_mnist("test", root=test_copy)


def test_flipped_byte_fails_checksum(test_copy):
    path = test_copy / IMAGES
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    received = hashlib.sha256(raw).hexdigest()
    with pytest.raises(ValueError, match=re.escape(IMAGES)) as err:
        load_fashion_mnist("test", root=test_copy)
    assert received in str(err.value) and FASHION_MNIST_SHA256[IMAGES] in str(err.value)


def test_truncated_gzip(test_copy):
    path = test_copy / IMAGES
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(ValueError, match=re.escape(IMAGES) + ".*SHA-256"):
        load_fashion_mnist("test", root=test_copy)
    with pytest.raises(ValueError, match=re.escape(IMAGES) + ".*not a valid gzip"):
        load_fashion_mnist("test", root=test_copy, verify=False)


def test_bad_magic(test_copy):
    _rewrite(test_copy / IMAGES, lambda raw: (2049).to_bytes(4, "big") + raw[4:])
    with pytest.raises(ValueError, match=re.escape(IMAGES) + ".*SHA-256"):
        load_fashion_mnist("test", root=test_copy)
    with pytest.raises(
        ValueError, match=re.escape(IMAGES) + ".*magic number is 2049, expected 2051"
    ):
        load_fashion_mnist("test", root=test_copy, verify=False)


def test_wrong_payload_length(test_copy):
    _rewrite(test_copy / IMAGES, lambda raw: raw[:-5])
    with pytest.raises(ValueError, match=re.escape(IMAGES) + ".*7839995 bytes, expected 7840000"):
        load_fashion_mnist("test", root=test_copy, verify=False)


def test_label_count_differs_from_image_count(test_copy):
    # A valid IDX file of 9,999 labels: header count and payload both shortened.
    _rewrite(test_copy / LABELS, lambda raw: raw[:4] + (9999).to_bytes(4, "big") + raw[8:-1])
    with pytest.raises(ValueError, match=re.escape(LABELS) + ".*9999 labels.*10000"):
        load_fashion_mnist("test", root=test_copy, verify=False)


def test_cache_notices_a_replaced_file(test_copy):
    load_fashion_mnist("test", root=test_copy)
    path = test_copy / IMAGES
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=re.escape(IMAGES)):
        load_fashion_mnist("test", root=test_copy)


def test_parse_idx_short_header():
    with pytest.raises(ValueError, match="<bytes>: 2 bytes is too short"):
        parse_idx(b"\x00\x00", expected_magic=2049)
    with pytest.raises(ValueError, match="too short for a 3-d IDX header"):
        parse_idx((2051).to_bytes(4, "big") + b"\x00" * 4, expected_magic=2051)


# ---------------------------------------------------------------------------------------
# Photo and normalization
# ---------------------------------------------------------------------------------------


def test_load_photo():
    photo = load_photo()
    assert photo.shape == (3, 224, 224) and photo.dtype == torch.float32
    assert 0.0 <= float(photo.min()) and float(photo.max()) <= 1.0
    assert float(photo.std()) > 0.05  # a real photograph, not a flat image
    assert torch.equal(load_photo("chelsea"), photo)


def test_load_photo_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"'dog'.*\['chelsea'\]"):
        load_photo("dog")


def test_normalize_uint8_and_float_agree():
    images, _ = load_fashion_mnist("test")
    batch = images[:8]  # (8, 28, 28) uint8
    out = normalize(batch)
    assert out.shape == (8, 1, 28, 28) and out.dtype == torch.float32
    as_float = normalize(batch.unsqueeze(1).float() / 255.0)
    torch.testing.assert_close(out, as_float)
    torch.testing.assert_close(out[batch.unsqueeze(1) == 0].max(), torch.tensor(-0.2860 / 0.3530))
    torch.testing.assert_close(denormalize(out), batch.unsqueeze(1).float() / 255.0)


def test_normalize_bad_shape():
    with pytest.raises(ValueError, match=r"\(2, 3, 28, 28\)"):
        normalize(torch.zeros(2, 3, 28, 28))


# ---------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------

AUGMENTATIONS = {
    "random_crop": lambda x, g: random_crop(x, 4, generator=g),
    "random_hflip": lambda x, g: random_hflip(x, 0.5, generator=g),
    "random_erasing": lambda x, g: random_erasing(x, 0.5, generator=g),
    "augment": lambda x, g: augment(x, generator=g),
    "Augment": lambda x, g: Augment()(x, generator=g),
}


def _batch(device="cpu", dtype=torch.float32, B=32, C=1, H=28, W=28) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return (torch.rand(B, C, H, W, generator=g) * 0.9 + 0.1).to(device=device, dtype=dtype)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_augmentation_keeps_shape_dtype_device(name, device, dtype):
    x = _batch(device, dtype, C=3, H=20, W=24)
    out = AUGMENTATIONS[name](x, None)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentation_reproducible_with_seeded_generator(name):
    x = _batch(B=64)
    first = AUGMENTATIONS[name](x, torch.Generator().manual_seed(0))
    second = AUGMENTATIONS[name](x, torch.Generator().manual_seed(0))
    other = AUGMENTATIONS[name](x, torch.Generator().manual_seed(1))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_augment_class_equals_function():
    x = _batch()
    by_class = Augment(crop_padding=2, flip=False, erasing_p=1.0)(
        x, generator=torch.Generator().manual_seed(5)
    )
    by_function = augment(
        x, crop_padding=2, flip=False, erasing_p=1.0, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(by_class, by_function)


def test_augmentation_rejects_non_batches():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(28, 28\)"):
        random_crop(torch.zeros(28, 28))


def test_random_crop_padding_zero_is_identity():
    x = _batch()
    assert torch.equal(random_crop(x, 0, generator=torch.Generator().manual_seed(0)), x)


def test_random_crop_takes_one_window_of_the_padded_image():
    x = _batch(B=16, C=2, H=10, W=12)
    p = 3
    out = random_crop(x, p, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets = set()
    for b in range(x.shape[0]):
        found = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[b], padded[b, :, dy : dy + 10, dx : dx + 12])
        ]
        assert found, f"image {b} is not a window of its padded input"
        offsets.add(found[0])
    assert len(offsets) > 1  # offsets differ between images


def test_random_hflip_p1_is_flip_and_p0_is_identity():
    x = _batch()
    assert torch.equal(random_hflip(x, 1.0), torch.flip(x, dims=[-1]))
    assert torch.equal(random_hflip(x, 0.0), x)


def test_random_hflip_flips_some_images():
    x = _batch(B=64)
    out = random_hflip(x, 0.5, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[b], x[b].flip(-1)) for b in range(64)]
    assert 10 < sum(flipped) < 54


def test_random_erasing_p0_is_identity():
    x = _batch()
    assert torch.equal(random_erasing(x, 0.0, generator=torch.Generator().manual_seed(0)), x)


def test_random_erasing_p1_erases_one_rectangle_per_image():
    x = _batch(B=64, C=3)  # values in [0.1, 1], so -1 only appears where erased
    out = random_erasing(x, 1.0, value=-1.0, generator=torch.Generator().manual_seed(0))
    erased = out == -1.0  # (B, C, H, W)
    assert torch.equal(erased, erased[:, :1].expand_as(erased))  # same pixels in every channel
    for b in range(x.shape[0]):
        mask = erased[b, 0]  # (H, W)
        rows = mask.any(1).nonzero().flatten()
        cols = mask.any(0).nonzero().flatten()
        assert len(rows) > 0, f"image {b} has no erased pixel"
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all(), f"image {b}: erased pixels do not form a rectangle"
        assert int(mask.sum()) <= 0.33 * 28 * 28 * 1.5  # near the largest scale at most
    torch.testing.assert_close(out[~erased], x[~erased], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
@pytest.mark.parametrize("device", DEVICES)
def test_seeded_cpu_generator_gives_the_same_result_on_every_device(name, device):
    x = _batch(B=64)
    on_cpu = AUGMENTATIONS[name](x, torch.Generator().manual_seed(3))
    on_device = AUGMENTATIONS[name](x.to(device), torch.Generator().manual_seed(3))
    assert on_device.device.type == device
    assert torch.equal(on_device.cpu(), on_cpu)


# --- mixup / CutMix -----------------------------------------------------------------------


def _mix(x, y, **kw):
    g = torch.Generator().manual_seed(kw.pop("seed", 0))
    return data.mixup_cutmix(x, y, num_classes=10, generator=g, **kw)


def test_mixup_blends_images_and_labels_with_one_lambda():
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    mixed, target = _mix(x, y, mixup_alpha=0.8, cutmix_alpha=0.0)
    lam = target[0, 0].item()  # image 0 keeps lam of class 0 and gives 1 - lam to class 5
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(target.sum(1), torch.ones(6))
    assert target[0, 5].item() == pytest.approx(1 - lam)


def test_cutmix_pastes_one_box_and_lambda_is_the_area_kept():
    x = torch.zeros(4, 1, 16, 16)
    x[1::2] = 1.0  # images 0 and 2 black, 1 and 3 white; partners are 3, 2, 1, 0
    y = torch.tensor([0, 1, 2, 3])
    for seed in range(5):
        mixed, target = _mix(x, y, mixup_alpha=0.0, cutmix_alpha=1.0, seed=seed)
        pasted = (mixed[0] == 1.0).float().mean().item()  # white pixels from image 3
        assert target[0, 0].item() == pytest.approx(1 - pasted)
        assert target[0, 3].item() == pytest.approx(pasted)
        assert set(mixed.unique().tolist()) <= {0.0, 1.0}  # pasted, never blended


def test_mix_targets_include_label_smoothing_and_are_reproducible():
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([1, 1, 1, 1])
    mixed, target = _mix(x, y, label_smoothing=0.1, seed=3)
    torch.testing.assert_close(target, torch.full((4, 10), 0.01).index_fill(1, torch.tensor([1]),
                                                                           0.91))
    again, target2 = _mix(x, y, label_smoothing=0.1, seed=3)
    assert torch.equal(mixed, again) and torch.equal(target, target2)


def test_mix_rejects_bad_input():
    with pytest.raises(ValueError, match=r"labels of shape \(4,\), got \(3,\)"):
        _mix(torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        _mix(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), mixup_alpha=0,
             cutmix_alpha=0)


def test_unverified_files_must_still_hold_the_whole_split(test_copy):
    # A valid IDX pair of 9,999 images and labels: structurally fine, one image short.
    _rewrite(test_copy / IMAGES,
             lambda raw: raw[:4] + (9999).to_bytes(4, "big") + raw[8:-28 * 28])
    _rewrite(test_copy / LABELS, lambda raw: raw[:4] + (9999).to_bytes(4, "big") + raw[8:-1])
    with pytest.raises(ValueError, match=re.escape(IMAGES) + r": 9999 images, expected the "
                                         r"10,000 of Fashion-MNIST's test split"):
        load_fashion_mnist("test", root=test_copy, verify=False)
