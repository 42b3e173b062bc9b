"""Make ``chelsea_224.png``, the photograph that notebook 01 cuts into 16x16 patches.

The source is "Chelsea the cat" from scikit-image's bundled sample data
(``skimage/data/chelsea.png`` in the scikit-image 0.26.0 wheel; 451x300 RGB).
Its docstring in ``skimage/data/_fetchers.py`` says: "No copyright restrictions.
CC0 by the photographer (Stefan van der Walt)."

The derivation: take the centred 300x300 square, resize it to 224x224 with a
Lanczos filter, save as an RGB PNG without metadata. Pillow is used here only;
it is not a run-time dependency of ``vit_tutorial`` (``vit_tutorial.data.load_photo``
reads the result with matplotlib).

Reproduce (from the repository root)::

    pip download scikit-image==0.26.0 --no-deps -d /tmp/skimage
    python data/images/make_photo.py /tmp/skimage/scikit_image-0.26.0-*.whl

The argument may be the wheel itself or the extracted ``chelsea.png``. The source's
SHA-256 is checked so a different photograph cannot slip in silently. The pixels are
determined by the source and Pillow's resampling; the PNG bytes were made with
Pillow 13.0.0 (another zlib may compress the same pixels to other bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import zipfile
from pathlib import Path

from PIL import Image

SOURCE_MEMBER = "skimage/data/chelsea.png"  # path inside the scikit-image wheel
SOURCE_SHA256 = "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"
SIZE = 224  # ViT-B/16 input resolution: 14x14 patches of 16x16 pixels
OUT = Path(__file__).resolve().parent / f"chelsea_{SIZE}.png"


def read_source(path: Path) -> bytes:
    """Return the bytes of chelsea.png from a wheel (``.whl``) or a plain PNG file."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            data = wheel.read(SOURCE_MEMBER)
    else:
        data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256:
        raise ValueError(f"{path}: sha256 is {digest}, expected {SOURCE_SHA256}")
    return data


def center_square_resize(image: Image.Image, size: int) -> Image.Image:
    """Crop the centred square (side = shorter edge), then resize to ``size`` x ``size``."""
    W, H = image.size
    side = min(W, H)
    left, top = (W - side) // 2, (H - side) // 2
    square = image.crop((left, top, left + side, top + side))  # (side, side)
    # Lanczos: the sharpest of Pillow's filters without visible ringing at 0.75x.
    return square.resize((size, size), resample=Image.Resampling.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="scikit-image wheel or chelsea.png")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output PNG (default {OUT})")
    args = parser.parse_args()

    image = Image.open(io.BytesIO(read_source(args.source))).convert("RGB")
    result = center_square_resize(image, SIZE)
    result.save(args.out, format="PNG", optimize=True)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} {result.size[0]}x{result.size[1]} sha256 {digest}")


if __name__ == "__main__":
    main()
