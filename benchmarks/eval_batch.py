"""CPU evaluation speed of the shipped checkpoints against the batch size of `predict`.

    .venv/bin/python benchmarks/eval_batch.py            # about 4 minutes on 2 cores

For each checkpoint in data/checkpoints/, times `vit_tutorial.evaluate.predict` on the
first `--images` test images (float32, the CPU, torch's default threads) at each batch
size, in runs that alternate between the sizes and change which goes first each
repetition, and prints the median images per second of each and their ratio to the first
size. Before timing it checks that every size gives the same logits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from timing import interleaved  # noqa: E402  (benchmarks/, the script's folder)

import vit_tutorial as vt  # noqa: E402
from vit_tutorial.evaluate import predict  # noqa: E402

CHECKPOINTS = ("vit", "hybrid", "t2t", "vit_hires")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[500, 50])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    images = vt.load_fashion_mnist("test")[0][: args.images]
    sizes = args.batch_sizes
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{len(images)} images, {args.repeats} repetitions")
    print(f"| checkpoint | {' | '.join(f'batch {b} img/s' for b in sizes)} | "
          f"{' | '.join(f'{b} / {sizes[0]}' for b in sizes[1:])} |")
    print("| --- |" + " ---: |" * (2 * len(sizes) - 1))
    for name in CHECKPOINTS:
        model, _ = vt.load_checkpoint(vt.data.DATA_DIR / "checkpoints" / f"{name}.safetensors")
        reference = predict(model, images, batch_size=sizes[0])
        for b in sizes[1:]:
            torch.testing.assert_close(predict(model, images, batch_size=b), reference)
        def seconds(b, model=model):
            t0 = time.perf_counter()
            predict(model, images, batch_size=b)
            return time.perf_counter() - t0

        times = interleaved({b: lambda b=b: seconds(b) for b in sizes}, args.repeats)
        speed = {b: len(images) / statistics.median(t) for b, t in times.items()}
        ratios = " | ".join(f"{speed[b] / speed[sizes[0]]:.2f}" for b in sizes[1:])
        print(f"| `{name}` | {' | '.join(f'{speed[b]:.0f}' for b in sizes)} | {ratios} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
