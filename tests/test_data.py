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
    denormalize,
    load_fashion_mnist,
    load_photo,
    normalize,
    parse_idx,
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


def test_unverified_files_must_still_hold_the_whole_split(test_copy):
    # A valid IDX pair of 9,999 images and labels: structurally fine, one image short.
    _rewrite(test_copy / IMAGES,
             lambda raw: raw[:4] + (9999).to_bytes(4, "big") + raw[8:-28 * 28])
    _rewrite(test_copy / LABELS, lambda raw: raw[:4] + (9999).to_bytes(4, "big") + raw[8:-1])
    with pytest.raises(ValueError, match=re.escape(IMAGES) + r": 9999 images, expected the "
                                         r"10,000 of Fashion-MNIST's test split"):
        load_fashion_mnist("test", root=test_copy, verify=False)
