"""Test accuracy of a checkpoint on all 10,000 Fashion-MNIST test images (notebook 05).

    python -m vit_tutorial.evaluate data/checkpoints/vit.safetensors
    accuracy: 0.9456 (9456/10000)

`--confusion PATH` also writes the 10x10 confusion matrix (rows: true class, columns:
predicted) as JSON. Runs on the CPU in float32 by default, so the count is reproducible.

`recorded_outputs(kind)` returns what a shipped checkpoint computed on the test set when
`data/checkpoints/manifest.py` measured it, so that a notebook can use all 10,000
predictions without spending minutes of CPU on them; `make checkpoints` re-computes the
recorded logits, and `make checkpoints-full` every prediction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import load_checkpoint
from .data import DATA_DIR, FASHION_MNIST_CLASSES, load_fashion_mnist, preprocess

# `preprocess` lives in data.py, beside `normalize`; it is named here too, where the
# notebooks of the course first met it.
__all__ = ["preprocess", "predict", "evaluate", "confusion_matrix",
           "check_fashion_mnist_model", "recorded_outputs", "RECORDED_LOGITS", "main"]

# data/checkpoints/test_outputs.safetensors holds, for each shipped checkpoint KIND,
# "KIND.predictions" (10000,) uint8 and "KIND.logits" of the first RECORDED_LOGITS images.
RECORDED_FILE = "test_outputs.safetensors"
RECORDED_LOGITS = 1000


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    amp: bool = False,
    img_size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits (N, num_classes) for uint8 images (N, 28, 28), computed batch by batch.

    The images are resized to `img_size` (default: `model.config.img_size`, which every
    model of the package has; give it for any other model, e.g. a CNN of your own).

    `batch_size` defaults to 50 on the CPU and 1000 elsewhere. Small batches are the fast
    ones on a CPU: 50 images keep each layer's activations in the caches, where 500 of them
    (600 MB a layer in the hybrid's 28x28 stage) do not; all four shipped models evaluate
    1.3-2.2x faster (`benchmarks/RESULTS.md`). A GPU wants large batches.

    `amp=True` runs under bfloat16 autocast: fast on a GPU, but the count may differ by a
    few images from float32, so reported accuracies use the default.
    """
    if len(images) == 0:
        raise ValueError(f"expected at least one image, got a batch of shape "
                         f"{tuple(images.shape)}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    model = model.eval().to(device)
    device = torch.device(device)
    if batch_size is None:
        batch_size = 50 if device.type == "cpu" else 1000
    if img_size is None:
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"{type(model).__name__} has no .config to read the input size "
                             f"from; pass img_size=, e.g. img_size=28")
        img_size = config.img_size
    out = []
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i : i + batch_size].to(device), img_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(model(x).float())
    return torch.cat(out).cpu()


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 10):
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    idx = target * num_classes + pred
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def evaluate(
    model: torch.nn.Module, *, batch_size: int | None = None, device: str | torch.device = "cpu"
) -> dict:
    """Accuracy and confusion matrix on the full test set."""
    check_fashion_mnist_model(model)
    images, labels = load_fashion_mnist("test")
    pred = predict(model, images, batch_size=batch_size, device=device).argmax(1)
    correct = int((pred == labels).sum())
    return {
        "correct": correct,
        "total": len(labels),
        "accuracy": correct / len(labels),
        "confusion": confusion_matrix(pred, labels).tolist(),
        "predictions": pred,
    }


def recorded_outputs(kind: str, *, folder: str | Path | None = None) -> dict[str, torch.Tensor]:
    """A shipped checkpoint's recorded test-set outputs (CPU, float32, 28x28 test images).

    `kind` is one of the checkpoints in `data/checkpoints/MANIFEST.json` ("vit", "hybrid",
    "t2t", "vit_hires"). Returns `predictions`, (10000,) int64, the class predicted for every
    test image, and `logits`, (RECORDED_LOGITS, 10) float32, of the first test images.
    """
    path = Path(folder or DATA_DIR / "checkpoints") / RECORDED_FILE
    with safe_open(path, framework="pt") as f:
        kinds = sorted({key.split(".")[0] for key in f.keys()})
        if kind not in kinds:
            raise ValueError(f"no recorded outputs for {kind!r} in {path}; expected one of {kinds}")
        return {"predictions": f.get_tensor(f"{kind}.predictions").long(),
                "logits": f.get_tensor(f"{kind}.logits")}


def check_fashion_mnist_model(model: torch.nn.Module) -> None:
    """A model that reads 1-channel images and scores the 10 classes, or a ValueError."""
    cfg = model.config
    if cfg.num_classes != len(FASHION_MNIST_CLASSES) or cfg.in_chans != 1:
        raise ValueError(
            f"expected a Fashion-MNIST model (in_chans=1, num_classes="
            f"{len(FASHION_MNIST_CLASSES)}), got in_chans={cfg.in_chans}, "
            f"num_classes={cfg.num_classes}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vit_tutorial.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by vit_tutorial")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 50 on the CPU, 1000 on a GPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--confusion", metavar="PATH", help="write the confusion matrix as JSON")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size must be a positive number of images, got {args.batch_size}")
    try:
        model, _ = load_checkpoint(args.checkpoint)
        check_fashion_mnist_model(model)
    except (ValueError, FileNotFoundError, IsADirectoryError) as e:
        p.error(str(e))
    result = evaluate(model, batch_size=args.batch_size, device=args.device)
    print(f"accuracy: {result['accuracy']:.4f} ({result['correct']}/{result['total']})")
    if args.confusion:
        with open(args.confusion, "w") as f:
            json.dump({"classes": FASHION_MNIST_CLASSES, "matrix": result["confusion"]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
