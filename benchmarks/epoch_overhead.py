"""Time what a training run spends between epochs: test-set evaluation and saves (GPU).

    PYTHONPATH=. python benchmarks/epoch_overhead.py --out /tmp/run --compile --no-progress \
        --model vit_mini_r26_s4_28 --epochs 25 --batch-size 1024 --lr 1.5e-3 --warmup 10 \
        --crop-padding 2 --erasing 0.25 --mixup 0.8 --cutmix 1.0

Runs `python -m vit_tutorial.train` with the same arguments, with the evaluation and the
writes of each epoch wrapped in timers that wait for the GPU before and after, and prints
the median of each (the first and last calls left out: compilation, final evaluation).
Compare with the `seconds` of an epoch in DIR/metrics.json, which excludes them.
"""

from __future__ import annotations

import collections
import statistics
import sys
import time

import torch

import vit_tutorial.train as train_module

# (module, attribute) -> what it does once an epoch
TIMED = {
    (train_module, "estimate_accuracy"): "test-set evaluation",
    (train_module, "save_checkpoint"): "model save (last.safetensors)",
    (torch, "save"): "state save (state.pt: model, optimizer, history)",
    (train_module, "_write_json"): "metrics.json write",
}


def _timed(what: str, fn, times: dict):
    def wrapper(*args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times[what].append(time.perf_counter() - start)
        return result

    return wrapper


def main(argv: list[str]) -> int:
    times = collections.defaultdict(list)
    for (module, name), what in TIMED.items():
        setattr(module, name, _timed(what, getattr(module, name), times))
    code = train_module.main(argv)
    for what in TIMED.values():
        calls = times[what][1:-1] or times[what]
        if calls:
            print(f"{what}: median {statistics.median(calls):.3f} s over {len(calls)} calls")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
