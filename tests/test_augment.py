"""Tests for vit_tutorial/augment.py: every augmentation keeps shape, dtype and device, is
reproducible from a seeded generator on any device, and does what it says by hand."""

from __future__ import annotations

import pytest
import torch

from vit_tutorial.augment import (
    Augment,
    augment,
    mixup_cutmix,
    random_crop,
    random_erasing,
    random_hflip,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
    return mixup_cutmix(x, y, num_classes=10, generator=g, **kw)


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
