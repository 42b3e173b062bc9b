"""Train a model from `presets` on Fashion-MNIST (notebooks 05-08 load what this writes).

    python -m vit_tutorial.train --model vit_mini_patch4_28 --out runs/vit --epochs 100

The recipe is the ViT paper's (AdamW, linear warm-up then cosine decay, gradient clipping
at norm 1, label smoothing) plus the data augmentation small datasets need (random crop,
flip, random erasing; `vit_tutorial.data`). The whole dataset lives on the training device
and is augmented there, batch by batch, so the GPU never waits for a CPU loader.

Every epoch ends with an atomic save of `DIR/last.safetensors` (the model) and
`DIR/state.pt` (optimizer, schedule, step and metrics). Run the same command again after
an interruption and it resumes from the last finished epoch; each epoch's data order and
augmentation come from (seed, epoch), so a resumed run repeats the uninterrupted one.
`DIR/metrics.json` logs every epoch. At the end `DIR/model.safetensors` holds the final
weights with their test accuracy and the command that produced them.

`--init CKPT --img-size S` fine-tunes a checkpoint at another resolution, resampling its
position embeddings in 2-D (ViT paper, section 3.2). Under `torchrun --nproc_per_node=N`
the same command trains with DistributedDataParallel; the global batch stays
`--batch-size`, split evenly across processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import atomic_write, load_checkpoint, save_checkpoint
from .data import augment, load_fashion_mnist, mixup_cutmix
from .evaluate import predict, preprocess
from .presets import create_model, get_config

__all__ = ["main", "parse_args", "train", "cosine_schedule", "param_groups"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vit_tutorial.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a name from vit_tutorial.list_models()")
    p.add_argument("--out", required=True, help="folder for checkpoints and logs")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256, help="global batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=5, help="warm-up epochs (may be fractional)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm; 0: off")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--crop-padding", type=int, default=4)
    p.add_argument("--erasing", type=float, default=0.25, help="random-erasing probability")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    p.add_argument("--mixup", type=float, default=0.0,
                   help="mixup Beta(alpha, alpha) parameter; 0: off")
    p.add_argument("--cutmix", type=float, default=0.0,
                   help="CutMix Beta(alpha, alpha) parameter; 0: off (with --mixup: half each)")
    p.add_argument("--img-size", type=int, default=None, help="train at this size (default 28)")
    p.add_argument("--init", default=None, help="start from this checkpoint's weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 autocast; auto: on for CUDA, off on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--limit-train", type=int, default=None,
                   help="use only the first N training images (for quick tests)")
    p.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="measure the test accuracy every N epochs (and after the last); "
                        "the others log test_acc null")
    p.add_argument("--limit-test", type=int, default=None,
                   help="evaluate each epoch on the first N test images only")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"],
                   default="float32", help="dtype of the weights in model.safetensors")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.eval_every < 1:
        p.error(f"--eval-every must be a positive number of epochs, got {args.eval_every}")
    return args


# Settings that must not change between an interrupted run and its resumption.
_RESUME_KEYS = ("model", "epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup",
                "label_smoothing", "clip_grad", "drop_path", "dropout", "crop_padding",
                "erasing", "no_flip", "mixup", "cutmix", "img_size", "init", "seed", "limit_train")


def cosine_schedule(step: int, *, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from 0 to `lr` over `warmup` steps, then cosine decay to `min_lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, the class token and position tables (1-D tensors
    and the embeddings), as in the reference ViT training code."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.startswith(("cls_token", "pos_embed"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


def _setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return 0, 1, torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, torch.device(device)


def _batches(n: int, batch_size: int, *, seed: int, device) -> list[torch.Tensor]:
    """This epoch's shuffled index batches: a function of the epoch's seed alone."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).to(device)
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def train(args: argparse.Namespace) -> dict:
    started = time.time()
    rank, world, device = _setup_distributed(args.device)
    main_process = rank == 0
    out = Path(args.out)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by {world} processes")
    amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    command = "python -m vit_tutorial.train " + " ".join(shlex.quote(a) for a in args.argv)

    # Data: uint8 on the device; float conversion and augmentation happen per batch.
    images, labels = load_fashion_mnist("train")
    if args.limit_train:
        images, labels = images[: args.limit_train], labels[: args.limit_train]
    images, labels = images.to(device), labels.to(device)
    # The per-epoch log may use the first --limit-test images; the final count uses all.
    all_test_images, all_test_labels = load_fashion_mnist("test")
    test_images = all_test_images[: args.limit_test]
    test_labels = all_test_labels[: args.limit_test]

    # Model: a preset, optionally initialised from a checkpoint (at another resolution).
    torch.manual_seed(args.seed)
    overrides = dict(drop_path_rate=args.drop_path, drop_rate=args.dropout)
    if args.img_size:
        overrides["img_size"] = args.img_size
    if args.init:
        model, parent_meta = load_checkpoint(args.init, **overrides)
        if parent_meta.get("preset", args.model) != args.model:
            raise ValueError(
                f"--init {args.init} holds a {parent_meta['preset']!r} model, not {args.model!r}"
            )
        # The checkpoint's config builds the model, so check it too: a file saved without
        # a preset name would otherwise train another architecture under this name.
        want = get_config(args.model, **{**overrides, "img_size": model.config.img_size})
        differ = [f"{k}={getattr(model.config, k)!r} (preset: {v!r})"
                  for k, v in want.to_dict().items() if getattr(model.config, k) != v]
        if differ:
            raise ValueError(f"--init {args.init} is not a {args.model!r} model: "
                             f"{', '.join(differ)}")
    else:
        model, parent_meta = create_model(args.model, **overrides), None
    model.to(device)
    img_size = model.config.img_size

    steps_per_epoch = len(images) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(images)} images")
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = round(args.warmup * steps_per_epoch)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                            betas=(0.9, 0.999), fused=device.type == "cuda")

    # Resume from the last finished epoch, if this folder holds one.
    start_epoch, step, history, elapsed = 0, 0, [], 0.0
    state_path = out / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        saved = state["args"]
        changed = {k: (saved.get(k), getattr(args, k)) for k in _RESUME_KEYS
                   if saved.get(k) != getattr(args, k)}
        if changed:
            raise ValueError(
                f"{out} holds a run with other settings {changed} (saved, now); "
                f"use another --out or delete {state_path}"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        history, elapsed = state["history"], state["elapsed"]
        if main_process:
            print(f"resuming {out} after epoch {start_epoch}/{args.epochs}", flush=True)

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        net = torch.compile(net)

    local = args.batch_size // world
    mine = slice(rank * local, (rank + 1) * local)  # this process's part of each batch
    mixing = args.mixup > 0 or args.cutmix > 0
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        # Data order, augmentation, mixing, dropout and drop-path are functions of (seed, epoch).
        epoch_seed = args.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)  # dropout / drop-path
        aug_gen = torch.Generator(device=device).manual_seed(epoch_seed)
        mix_gen = torch.Generator().manual_seed(epoch_seed)  # on the CPU: drawing waits for no GPU
        net.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bad_step = torch.full((), -1, device=device, dtype=torch.long)
        batches = _batches(len(images), args.batch_size, seed=epoch_seed, device=device)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=args.no_progress or not main_process, mininterval=1.0)
        for i, idx in enumerate(bar):
            # Every process augments the whole global batch with the same generator and
            # keeps its slice: the result equals one process with the same global batch.
            x = images[idx].unsqueeze(1).float() / 255.0  # (B, 1, 28, 28)
            x = augment(x, crop_padding=args.crop_padding, flip=not args.no_flip,
                        erasing_p=args.erasing, generator=aug_gen)
            y = labels[idx]  # (B,)
            target = None
            if mixing:  # soft targets (B, 10), label smoothing included
                x, target = mixup_cutmix(x, y, num_classes=10, mixup_alpha=args.mixup,
                                         cutmix_alpha=args.cutmix,
                                         label_smoothing=args.label_smoothing,
                                         generator=mix_gen)
                target = target[mine]
            x = preprocess(x, img_size)[mine]
            y = y[mine]
            lr = cosine_schedule(step, total=total_steps, warmup=warmup_steps,
                                 lr=args.lr, min_lr=args.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x)
            if target is None:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            else:
                loss = F.cross_entropy(logits.float(), target)
            # Remember the first non-finite step on the device; look at it every few steps
            # only, since reading a GPU value waits for the GPU.
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
            if i % 25 == 24 or i == len(batches) - 1:
                _stop_if_nonfinite(bad_step, epoch, steps_per_epoch, args.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()
            step += 1
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if main_process and not args.no_progress and i % 20 == 0:
                seen = (i + 1) * args.batch_size
                bar.set_postfix(loss=f"{loss.item():.3f}",
                                acc=f"{correct.item() / ((i + 1) * local):.3f}",
                                img_s=f"{seen / (time.time() - t0):.0f}")
        if world > 1:  # each process saw its slice of every batch: log the whole batches
            dist.all_reduce(loss_sum)
            dist.all_reduce(correct)
        train_loss = loss_sum.item() / (len(batches) * world)
        train_acc = correct.item() / (len(batches) * args.batch_size)
        epoch_time = time.time() - t0
        elapsed += epoch_time
        test_acc = None
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            # bf16 on the GPU for this per-epoch log; the final count below is float32.
            test_pred = predict(model, test_images, device=device, amp=amp).argmax(1)
            test_acc = round((test_pred == test_labels).float().mean().item(), 5)
        history.append(dict(epoch=epoch + 1, train_loss=round(train_loss, 5),
                            train_acc=round(train_acc, 5), test_acc=test_acc,
                            lr=lr, seconds=round(epoch_time, 2),
                            img_per_s=round(len(batches) * args.batch_size / epoch_time, 1)))
        if main_process:
            print(json.dumps(history[-1]), flush=True)
            state = dict(model=model.state_dict(), optimizer=opt.state_dict(),
                         epoch=epoch + 1, step=step, history=history, elapsed=elapsed,
                         args={k: getattr(args, k) for k in _RESUME_KEYS})
            save_checkpoint(model, out / "last.safetensors", preset=args.model, epoch=epoch + 1)
            atomic_write(state_path, lambda tmp, s=state: torch.save(s, tmp))
            _write_json(out / "metrics.json", history)
        if world > 1:
            dist.barrier()

    # The final model, evaluated on the whole test set.
    result = {}
    if main_process:
        pred = predict(model, all_test_images, device=device).argmax(1)
        correct_n, total = int((pred == all_test_labels).sum()), len(all_test_labels)
        result = dict(
            preset=args.model, accuracy=correct_n / total, correct=correct_n,
            epochs=args.epochs, seed=args.seed,
            command=command, seconds=round(elapsed, 1), device=_device_name(device),
            # wall-clock time of the invocation that finished the run: data loading,
            # compilation, evaluations and saves included ("seconds" sums the epochs)
            wall_seconds=round(time.time() - started, 1),
            parent=args.init, parent_accuracy=(parent_meta or {}).get("accuracy"),
        )
        save_checkpoint(model, out / "model.safetensors",
                        dtype=getattr(torch, args.save_dtype), **result)
        print(f"accuracy: {result['accuracy']:.4f} ({correct_n}/{total}) on {result['device']}, "
              f"{elapsed:.0f} s", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return result


def _stop_if_nonfinite(bad_step: torch.Tensor, epoch: int, steps_per_epoch: int, lr: float):
    step = int(bad_step)
    if step >= 0:
        raise FloatingPointError(
            f"the loss became non-finite at step {step} (epoch {epoch + 1}, batch "
            f"{step - epoch * steps_per_epoch + 1}); stopping without saving this epoch. "
            f"Try a lower --lr (now {lr}) or --amp off."
        )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        train(args)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
