"""Training and inference throughput of the tutorial ViT against timm's, in images per second.

Two models: ViT-B/16 at 224x224 (`vit_base_patch16_224`) and the 28x28 Fashion-MNIST model
the notebooks train (`vit_mini_patch4_28`: 1 channel, 10 classes, D=192, L=9, 3 heads). For
each, timm's VisionTransformer is built with the same config, its weights are loaded into
the tutorial model with `vt.load_timm_state_dict`, and the two logits are checked to agree
before anything is timed: both compute the same function on the same batch, in the same
dtype, with the same settings.

A training step is forward + cross-entropy + backward + AdamW step; an inference step is a
forward under `torch.no_grad()`. Runs alternate between the two implementations (and which
goes first alternates too), so drift in clock speed or background load hits both alike; each
reports the median over the repetitions, and the ratio tutorial / timm (> 1: the tutorial is
faster). On CUDA the timed regions are bracketed by `torch.cuda.synchronize()`.

Run from the repository root:
    python benchmarks/throughput.py                       # CUDA if available, else CPU
    python benchmarks/throughput.py --device cuda --json benchmarks/cuda.json
    python benchmarks/throughput.py --models mini --modes infer --batch-size mini=512
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import interleaved  # benchmarks/, the script's folder
from torch import nn

try:
    import vit_tutorial as vt
except ModuleNotFoundError:  # a checkout without `pip install -e .`: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import vit_tutorial as vt

try:
    import timm
    from timm.models.vision_transformer import VisionTransformer as TimmViT
except ModuleNotFoundError as e:
    raise SystemExit("this benchmark compares against timm: pip install timm") from e

MODELS = ("vit_base_patch16_224", "vit_mini_patch4_28")
ALIASES = {"base": "vit_base_patch16_224", "mini": "vit_mini_patch4_28"}
# Batch sizes: on CPU small enough that both models, both modes, finish in a few minutes on
# 2 cores; on a GPU large enough to fill it.
DEFAULT_BATCH = {
    "cpu": {"vit_base_patch16_224": 8, "vit_mini_patch4_28": 256},
    "cuda": {"vit_base_patch16_224": 128, "vit_mini_patch4_28": 1024},
}
# Timed steps in one repetition: a repetition should last well over the timer's resolution.
DEFAULT_STEPS = {"cpu": 1, "cuda": 10}
DEFAULT_REPEATS = {"cpu": 7, "cuda": 10}
DEFAULT_WARMUP = {"cpu": 2, "cuda": 5}
# (max - min) / median of one implementation's runs above which the figures are suspect.
NOISY = 0.15
# No float16: its training step would need a GradScaler, which bfloat16 does without.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_timm(name: str) -> nn.Module:
    """timm's model for the preset `name`, with the same config as the tutorial's."""
    if name == "vit_base_patch16_224":
        return timm.create_model(name, pretrained=False)
    cfg = vt.get_config(name)
    return TimmViT(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
    )


def build_pair(name: str, device: torch.device) -> dict[str, nn.Module]:
    """{"tutorial": ..., "timm": ...}, holding the same weights, on `device`."""
    ref = build_timm(name)
    ours = vt.create_model(name)
    vt.load_timm_state_dict(ours, ref.state_dict())
    return {"tutorial": ours.to(device), "timm": ref.to(device)}


@torch.no_grad()
def check_same_function(models: dict[str, nn.Module], x: torch.Tensor) -> float:
    """Assert both models give the same float32 logits on `x`; return the largest difference."""
    ours, ref = models["tutorial"].eval(), models["timm"].eval()
    a, b = ours(x), ref(x)
    if b.std() == 0:
        raise AssertionError("timm's logits are constant: the comparison would prove nothing")
    # Same ops on the same weights; on CUDA, cuDNN may pick different TF32 convolution
    # algorithms for the patch projection, hence the looser tolerance there.
    tol = 1e-5 if x.device.type == "cpu" else 2e-3
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    return (a - b).abs().max().item()


def make_step(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, autocast):
    """A closure that runs one training or inference step of `model` on the batch (x, y)."""
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with autocast():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    else:
        model.eval()

        def step():
            with torch.no_grad(), autocast():
                model(x)

    return step


def images_per_second(step, steps: int, batch: int, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - t0)


def bench(
    models: dict[str, nn.Module],
    mode: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    autocast,
    sync,
    steps: int,
    repeats: int,
    warmup: int,
) -> dict[str, list[float]]:
    """Images/s of every repetition, per implementation, runs interleaved."""
    fns = {impl: make_step(m, mode, x, y, autocast) for impl, m in models.items()}
    impls = list(fns)
    for _ in range(warmup):
        for impl in impls:
            fns[impl]()
    sync()
    return interleaved(
        {impl: lambda f=fn: images_per_second(f, steps, x.shape[0], sync)
         for impl, fn in fns.items()},
        repeats,
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu} ({torch.get_num_threads()} threads)"


def parse_batch_sizes(items: list[str] | None, models: list[str], device: str) -> dict[str, int]:
    """`--batch-size 64` sets every model; `--batch-size base=16 mini=512` sets each one."""
    table = DEFAULT_BATCH["cuda" if device == "cuda" else "cpu"]
    sizes = {m: table[m] for m in models}
    for item in items or []:
        name, sep, value = item.rpartition("=")
        if not sep:
            sizes = {m: int(value) for m in models}
            continue
        name = ALIASES.get(name, name)
        if name not in MODELS:
            raise SystemExit(f"--batch-size: unknown model {name!r}; expected one of {MODELS}")
        sizes[name] = int(value)
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda, cuda:1, cpu, ...; default cuda when available",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=list(MODELS) + list(ALIASES),
        metavar="MODEL",
        help=f"presets to compare, of {', '.join(MODELS)} (or base, mini); default both",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=["train", "infer"],
        choices=["train", "infer"],
        help="train: forward + cross-entropy + backward + AdamW step; infer: forward; default both",
    )
    p.add_argument(
        "--batch-size",
        nargs="+",
        metavar="[MODEL=]N",
        help="one N for every model, or MODEL=N each; default: CPU base=8 mini=256, "
        "CUDA base=128 mini=1024",
    )
    p.add_argument("--repeats", type=int, help="timed repetitions per model (CPU 7, CUDA 10)")
    p.add_argument("--steps", type=int, help="steps per repetition (CPU 1, CUDA 10)")
    p.add_argument("--warmup", type=int, help="untimed steps per model first (CPU 2, CUDA 5)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="auto: bfloat16 autocast on CUDA, float32 on CPU; others autocast to that dtype",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.models = list(dict.fromkeys(ALIASES.get(m, m) for m in args.models))
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    args.batch_size = parse_batch_sizes(args.batch_size, args.models, kind)
    args.repeats = args.repeats or DEFAULT_REPEATS[kind]
    args.steps = args.steps or DEFAULT_STEPS[kind]
    warmup = DEFAULT_WARMUP[kind] if args.warmup is None else args.warmup
    # The first calls of a compiled model compile it (forward and, when training, backward).
    args.warmup = max(warmup, 3) if args.compile else warmup
    if args.dtype == "auto":
        args.dtype = "bfloat16" if kind == "cuda" else "float32"
    return args


def fmt_rate(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.1f}"


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| model | mode | batch | dtype | tutorial img/s | timm img/s | ratio |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch']} | {r['dtype']} | "
            f"{fmt_rate(r['tutorial_img_s'])} | {fmt_rate(r['timm_img_s'])} | {r['ratio']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    dtype = DTYPES[args.dtype]
    if dtype == torch.float32:
        autocast = contextlib.nullcontext
    else:
        autocast = lambda: torch.autocast(device_type=device.type, dtype=dtype)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": device_name(device),
        "compile": args.compile,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    print(f"torch {meta['torch']}, timm {meta['timm']}, device {meta['device']}")
    print(
        f"dtype {args.dtype}, compile {args.compile}, {args.repeats} repetitions x "
        f"{args.steps} steps after {args.warmup} warm-up steps, runs interleaved\n"
    )

    results = []
    for name in args.models:
        torch.manual_seed(args.seed)
        models = build_pair(name, device)
        cfg = models["tutorial"].config
        B = args.batch_size[name]
        x = torch.randn(B, cfg.in_chans, *cfg.img_size, device=device)  # (B, C, H, W)
        y = torch.randint(0, cfg.num_classes, (B,), device=device)
        diff = check_same_function(models, x[:8])
        print(f"{name}: same logits as timm (max |diff| {diff:.1e}), batch {B}")
        if args.compile:
            models = {impl: torch.compile(m) for impl, m in models.items()}
        for mode in args.modes:
            rates = bench(
                models,
                mode,
                x,
                y,
                autocast=autocast,
                sync=sync,
                steps=args.steps,
                repeats=args.repeats,
                warmup=args.warmup,
            )
            med = {impl: statistics.median(v) for impl, v in rates.items()}
            spread = {impl: (max(v) - min(v)) / med[impl] for impl, v in rates.items()}
            r = {
                "model": name,
                "mode": mode,
                "batch": B,
                "dtype": args.dtype,
                "tutorial_img_s": med["tutorial"],
                "timm_img_s": med["timm"],
                "ratio": med["tutorial"] / med["timm"],
                "runs_img_s": rates,
                "spread": spread,
                "max_abs_logit_diff": diff,
            }
            results.append(r)
            print(
                f"  {mode:5s} tutorial {fmt_rate(med['tutorial']):>7s} img/s "
                f"(spread {spread['tutorial']:.0%}), timm {fmt_rate(med['timm']):>7s} img/s "
                f"(spread {spread['timm']:.0%}), ratio {r['ratio']:.3f}"
            )
            if max(spread.values()) > NOISY:
                print(
                    f"  warning: runs differ by more than {NOISY:.0%} of their median; "
                    "something else is using the machine? Re-run, or raise --repeats"
                )
            gc.collect()  # the optimizer states go here, before the next mode
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del models
        gc.collect()

    print()
    print(markdown_table(results))
    print(f"\ntorch {meta['torch']}, timm {meta['timm']}, {meta['device']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
