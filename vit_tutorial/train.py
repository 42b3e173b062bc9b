"""Train a model from `presets` on Fashion-MNIST (notebooks 05-08 load what this writes).

    python -m vit_tutorial.train --model vit_mini_patch4_28 --out runs/vit --epochs 100

The recipe is the ViT paper's (AdamW, linear warm-up then cosine decay, gradient clipping
at norm 1, label smoothing) plus the data augmentation small datasets need (random crop,
flip, random erasing, mixup and CutMix; `vit_tutorial.data`). The whole dataset lives on
the training device and is augmented there, batch by batch, so the GPU never waits for a
CPU loader.

Every epoch ends with an atomic save of `DIR/last.safetensors` (the model) and
`DIR/state.pt` (optimizer, schedule, step, metrics and the `TrainConfig`). Run the same
command again after an interruption and it resumes from the last finished epoch; each
epoch's data order and augmentation come from (seed, epoch), so a resumed run repeats the
uninterrupted one. `DIR/metrics.json` logs every epoch. At the end `DIR/model.safetensors`
holds the final weights with their test accuracy and the command that produced them.

`--init CKPT --img-size S` fine-tunes a checkpoint at another resolution, resampling its
position embeddings in 2-D (ViT paper, section 3.2). Under `torchrun --nproc_per_node=N`
the same command trains with DistributedDataParallel; the global batch stays
`--batch-size`, split evenly across processes.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import io
import json
import math
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .augment import augment, mixup_cutmix
from .checkpoint import (
    atomic_write,
    load_checkpoint,
    read_metadata,
    remove_stale_temporaries,
    save_checkpoint,
)
from .data import load_fashion_mnist
from .evaluate import predict, preprocess
from .presets import create_model, get_config

__all__ = [
    "TrainConfig",
    "Run",
    "parse_args",
    "setup",
    "get_lr",
    "get_batch",
    "train_step",
    "train_epoch",
    "estimate_accuracy",
    "save_run",
    "finish",
    "train",
    "read_state",
    "main",
    "cosine_schedule",
    "param_groups",
]

NUM_CLASSES = 10  # Fashion-MNIST
STATE_FORMAT = "vit_tutorial.state/1"  # state.pt: a SHA-256 and the pickled state's bytes
CHOICES = {"amp": ("auto", "bf16", "off"), "save_dtype": ("float32", "bfloat16", "float16")}
# ViTConfig fields that a flag of their own sets (--model-arg refuses them).
_FLAG_FIELDS = {"drop_path_rate": "drop-path", "drop_rate": "dropout", "img_size": "img-size"}


def _setting(default, help: str, *, resume: bool = True):
    """A field of TrainConfig with its --help text. `resume=False`: a setting of this
    invocation only (where to write, on which device, how to report), which may change
    when an interrupted run resumes."""
    return field(default=default, metadata={"help": help, "resume": resume})


@dataclass
class TrainConfig:
    """Every setting of a training run; validated once, saved in `state.pt`.

    The CLI's flags are these fields (`--batch-size` is `batch_size`). All fields but the
    run-only ones define the run: resuming with any of them changed is refused.
    """

    model: str = field(metadata={"help": "a name from vit_tutorial.list_models()"})
    out: str = field(metadata={"help": "folder for checkpoints and logs", "resume": False})
    model_arg: tuple[str, ...] = _setting((), "change one field of the preset's ViTConfig, "
                                              "KEY=VALUE; repeatable, e.g. --model-arg "
                                              "pos_embed=relative --model-arg pool=gap")
    epochs: int = _setting(100, "epochs to train")
    batch_size: int = _setting(256, "global batch size, split evenly across DDP processes")
    lr: float = _setting(1e-3, "peak learning rate, reached at the end of the warm-up")
    min_lr: float = _setting(1e-5, "learning rate at the last step")
    weight_decay: float = _setting(0.05, "AdamW's weight decay (weight matrices only)")
    warmup: float = _setting(5, "warm-up epochs (may be fractional)")
    label_smoothing: float = _setting(0.1, "label smoothing of the targets")
    clip_grad: float = _setting(1.0, "max gradient norm; 0: off")
    drop_path: float = _setting(0.1, "stochastic depth rate of the last block")
    dropout: float = _setting(0.0, "dropout rate")
    crop_padding: int = _setting(4, "random crop after zero-padding by this many pixels")
    erasing: float = _setting(0.25, "random-erasing probability")
    no_flip: bool = _setting(False, "no horizontal flips")
    mixup: float = _setting(0.0, "mixup Beta(alpha, alpha) parameter; 0: off")
    cutmix: float = _setting(0.0, "CutMix Beta(alpha, alpha) parameter; 0: off "
                                  "(with --mixup: half each)")
    img_size: int | None = _setting(None, "train at this size (default: the preset's, 28)")
    init: str | None = _setting(None, "start from this checkpoint's weights")
    seed: int = _setting(0, "seed of the initial weights, data order and augmentation")
    limit_train: int | None = _setting(None, "use only the first N training images "
                                             "(for quick tests)")
    amp: str = _setting("auto", "bf16 autocast; auto: on for CUDA, off on the CPU",
                        resume=False)
    compile: bool = _setting(False, "torch.compile the model", resume=False)
    device: str | None = _setting(None, "default: cuda if available, else cpu", resume=False)
    eval_every: int = _setting(1, "measure the test accuracy every N epochs (and after the "
                                  "last); the others log test_acc null", resume=False)
    limit_test: int | None = _setting(None, "evaluate each epoch on the first N test images "
                                            "only", resume=False)
    save_dtype: str = _setting("float32", "dtype of the weights in model.safetensors",
                               resume=False)
    no_progress: bool = _setting(False, "no progress bar", resume=False)
    argv: tuple[str, ...] | None = _setting(None, "the command line, for the record",
                                            resume=False)

    def __post_init__(self):
        problems = [
            f"{name} must be {rule}, got {value!r}"
            for name, value, ok, rule in [
                ("epochs", self.epochs, self.epochs >= 1, "at least 1"),
                ("batch_size", self.batch_size, self.batch_size >= 1, "at least 1"),
                ("lr", self.lr, self.lr > 0 and math.isfinite(self.lr), "a positive number"),
                ("min_lr", self.min_lr, 0 <= self.min_lr <= self.lr, f"in [0, lr={self.lr}]"),
                ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
                ("warmup", self.warmup, self.warmup >= 0, ">= 0 epochs"),
                ("label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1,
                 "in [0, 1)"),
                ("clip_grad", self.clip_grad, self.clip_grad >= 0, ">= 0 (0: off)"),
                ("drop_path", self.drop_path, 0 <= self.drop_path < 1, "in [0, 1)"),
                ("dropout", self.dropout, 0 <= self.dropout < 1, "in [0, 1)"),
                ("crop_padding", self.crop_padding, self.crop_padding >= 0, ">= 0"),
                ("erasing", self.erasing, 0 <= self.erasing <= 1, "in [0, 1]"),
                ("mixup", self.mixup, self.mixup >= 0, ">= 0 (0: off)"),
                ("cutmix", self.cutmix, self.cutmix >= 0, ">= 0 (0: off)"),
                ("img_size", self.img_size, self.img_size is None or self.img_size >= 1,
                 "a positive number of pixels"),
                ("limit_train", self.limit_train,
                 self.limit_train is None or self.limit_train >= 1, "at least 1"),
                ("limit_test", self.limit_test, self.limit_test is None or self.limit_test >= 1,
                 "at least 1"),
                ("eval_every", self.eval_every, self.eval_every >= 1,
                 "a positive number of epochs"),
                *[(name, getattr(self, name), getattr(self, name) in allowed,
                   f"one of {allowed}") for name, allowed in CHOICES.items()],
            ]
            if not ok
        ]
        if not self.out:
            problems.append("out must name a folder, got ''")
        if problems:
            raise ValueError("; ".join(problems))
        self.model_arg = tuple(self.model_arg)
        try:
            self.model_overrides()  # a bad KEY=VALUE fails here, not after the data is loaded
        except (ValueError, TypeError) as e:
            raise ValueError(f"--model-arg: {e}") from None
        preset = get_config(self.model)  # an unknown name fails here, with the closest names
        if self.init is None and self.img_size is not None and (
                (self.img_size, self.img_size) == preset.img_size):
            self.img_size = None  # the preset's own size: the same run as leaving it out
        if self.argv is not None:
            self.argv = tuple(self.argv)

    def model_overrides(self) -> dict:
        """`model_arg` as ViTConfig overrides, checked against the preset: {"pool": "gap"}."""
        overrides = {}
        for item in self.model_arg:
            key, sep, text = item.partition("=")
            if not sep or not key:
                raise ValueError(f"expected KEY=VALUE, got {item!r}")
            if key in _FLAG_FIELDS:
                raise ValueError(f"{key} is set by --{_FLAG_FIELDS[key]}, not by --model-arg")
            try:
                overrides[key] = ast.literal_eval(text)  # 0.1, True, (3, 4, 9), "gap"
            except (ValueError, SyntaxError):
                overrides[key] = text  # a bare word: pos_embed=relative
        get_config(self.model, **overrides)  # unknown fields and bad values fail here
        return overrides

    @classmethod
    def resume_fields(cls) -> tuple[str, ...]:
        """The fields that define a run: a resumed run must have them all unchanged."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume", True))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def command(self) -> str:
        return "python -m vit_tutorial.train " + shlex.join(self.argv or ())


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The command line as a validated `TrainConfig`; a bad value exits with status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m vit_tutorial.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, f in defaults.items():
        flag, help = "--" + name.replace("_", "-"), f.metadata["help"]
        if name in ("model", "out"):
            p.add_argument(flag, required=True, help=help)
        elif name == "argv":
            continue
        elif name == "model_arg":
            p.add_argument(flag, action="append", default=[], metavar="KEY=VALUE", help=help)
        elif f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=help)
        elif name in CHOICES:
            p.add_argument(flag, choices=CHOICES[name], default=f.default, help=help)
        else:  # "int", "float | None", ...: the type before any "| None"
            kind = {"int": int, "float": float, "str": str}[f.type.split(" | ")[0]]
            p.add_argument(flag, type=kind, default=f.default, help=help)
    ns = p.parse_args(argv)
    try:
        return TrainConfig(**vars(ns), argv=argv)
    except ValueError as e:
        p.error(str(e))


# ---------------------------------------------------------------------------------------
# The pieces: schedule, batches, one step, one epoch, evaluation, saving
# ---------------------------------------------------------------------------------------


def cosine_schedule(step: int, *, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from 0 to `lr` over `warmup` steps, then cosine decay to `min_lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups: no weight decay on what `model.no_weight_decay()` names (biases,
    norms, the class token and position tables), `weight_decay` on the rest."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def train_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    clip_grad: float = 1.0,
    label_smoothing: float = 0.0,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch. Returns (loss, logits, gradient norm), unsynced.

    x: (B, C, H, W) normalised images; y: (B,) class indices or (B, K) soft targets
    (mixup/CutMix, label smoothing already in them). The gradient norm is the one before
    clipping (`clip_grad` 0: no clipping); a non-finite norm means the step went wrong,
    and the caller must not keep these weights.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = net(x)  # (B, K)
    smoothing = label_smoothing if y.ndim == 1 else 0.0
    loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    # With clipping off, max_norm=inf only measures the norm (the scale factor is 1).
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or math.inf)
    opt.step()
    return loss.detach(), logits.detach(), grad_norm


@dataclass
class Run:
    """What `setup` builds and the loop updates: model, optimizer, data and progress."""

    cfg: TrainConfig
    model: torch.nn.Module  # the model itself (saved, evaluated)
    net: torch.nn.Module  # what the steps call: the model, or it wrapped in DDP / compiled
    opt: torch.optim.Optimizer
    device: torch.device
    images: torch.Tensor  # (N, 28, 28) uint8 training images, on the device
    labels: torch.Tensor  # (N,)
    test_images: torch.Tensor  # (M, 28, 28) uint8, on the CPU: the final count uses all
    test_labels: torch.Tensor  # (M,)
    steps_per_epoch: int
    amp: bool
    rank: int = 0
    world: int = 1
    parent_meta: dict | None = None
    epoch: int = 0  # epochs finished
    step: int = 0  # optimisation steps taken
    history: list[dict] = field(default_factory=list)
    elapsed: float = 0.0  # seconds spent in epochs
    started: float = field(default_factory=time.time)
    lock: io.TextIOBase | None = None  # held on DIR/.lock while the run is set up

    def close(self) -> None:
        """Release the folder for the next run (exiting the process releases it too)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    @property
    def warmup_steps(self) -> int:
        return round(self.cfg.warmup * self.steps_per_epoch)


def get_lr(run: Run, step: int) -> float:
    """The learning rate of optimisation step `step` (warm-up, then cosine decay)."""
    return cosine_schedule(step, total=run.total_steps, warmup=run.warmup_steps,
                           lr=run.cfg.lr, min_lr=run.cfg.min_lr)


def epoch_seed(cfg: TrainConfig, epoch: int) -> int:
    """Data order, augmentation, mixing, dropout and drop-path of an epoch come from this."""
    return cfg.seed * 100_003 + epoch


def epoch_batches(n: int, batch_size: int, *, seed: int, device) -> list[torch.Tensor]:
    """This epoch's shuffled index batches (the last partial batch dropped)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).to(device)
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def get_batch(
    run: Run, idx: torch.Tensor, *, aug_gen: torch.Generator, mix_gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This process's share of the global batch `idx`: images x (b, C, H, W), labels y (b,)
    and, with mixup or CutMix, the soft targets (b, K) to train on instead of y (else None).

    Every process augments the whole global batch with the same generators and keeps its
    slice, so N processes see exactly what one process with the same batch would.
    """
    cfg = run.cfg
    local = cfg.batch_size // run.world
    mine = slice(run.rank * local, (run.rank + 1) * local)
    x = run.images[idx].unsqueeze(1).float() / 255.0  # (B, 1, 28, 28) in [0, 1]
    x = augment(x, crop_padding=cfg.crop_padding, flip=not cfg.no_flip,
                erasing_p=cfg.erasing, generator=aug_gen)
    y, target = run.labels[idx], None  # (B,)
    if cfg.mixup > 0 or cfg.cutmix > 0:  # soft targets (B, K), label smoothing included
        x, target = mixup_cutmix(x, y, num_classes=NUM_CLASSES, mixup_alpha=cfg.mixup,
                                 cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                                 generator=mix_gen)
        target = target[mine]
    x = preprocess(x, run.model.config.img_size)
    return x[mine], y[mine], target


def train_epoch(run: Run, *, on_step: Callable[[Run, int], None] | None = None) -> dict:
    """Train epoch `run.epoch + 1`; returns its log entry (test_acc not yet measured).

    `on_step(run, i)` is called before batch i (tests use it to stop a run anywhere).
    Raises FloatingPointError, naming the first bad step, when a loss or a gradient norm
    is not finite: the weights in memory are then unusable, and nothing has been saved.
    """
    cfg, epoch = run.cfg, run.epoch
    t0 = time.time()
    seed = epoch_seed(cfg, epoch)
    torch.manual_seed(seed)  # dropout / drop-path
    aug_gen = torch.Generator(device=run.device).manual_seed(seed)
    mix_gen = torch.Generator().manual_seed(seed)  # on the CPU: drawing waits for no GPU
    run.net.train()
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    bad_step = torch.full((), -1, device=run.device, dtype=torch.long)
    batches = epoch_batches(len(run.images), cfg.batch_size, seed=seed, device=run.device)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=cfg.no_progress or not run.main_process, mininterval=1.0)
    local = cfg.batch_size // run.world
    for i, idx in enumerate(bar):
        if on_step is not None:
            on_step(run, i)
        x, y, target = get_batch(run, idx, aug_gen=aug_gen, mix_gen=mix_gen)
        lr = get_lr(run, run.step)
        loss, logits, grad_norm = train_step(run.net, run.opt, x, y if target is None else target,
                                             lr=lr,
                                             clip_grad=cfg.clip_grad,
                                             label_smoothing=cfg.label_smoothing, amp=run.amp)
        # Remember the first bad step on the device; look at it every few steps only,
        # since reading a GPU value waits for the GPU.
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        bad_step = torch.where((bad_step < 0) & ~finite, run.step, bad_step)
        if i % 25 == 24 or i == len(batches) - 1:
            _stop_if_nonfinite(bad_step, run)
        run.step += 1
        loss_sum += loss
        correct += (logits.argmax(1) == y).sum()
        if run.main_process and not cfg.no_progress and i % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            acc=f"{correct.item() / ((i + 1) * local):.3f}",
                            img_s=f"{(i + 1) * cfg.batch_size / (time.time() - t0):.0f}")
    if run.world > 1:  # each process saw its slice of every batch: log the whole batches
        dist.all_reduce(loss_sum)
        dist.all_reduce(correct)
    seconds = time.time() - t0
    run.elapsed += seconds
    run.epoch += 1
    return dict(epoch=run.epoch, train_loss=round(loss_sum.item() / (len(batches) * run.world), 5),
                train_acc=round(correct.item() / (len(batches) * cfg.batch_size), 5),
                test_acc=None, lr=lr, seconds=round(seconds, 2),
                img_per_s=round(len(batches) * cfg.batch_size / seconds, 1))


def _stop_if_nonfinite(bad_step: torch.Tensor, run: Run) -> None:
    step = int(bad_step)
    if step >= 0:
        epoch = step // run.steps_per_epoch
        raise FloatingPointError(
            f"the loss or the gradient became non-finite at step {step} (epoch {epoch + 1}, "
            f"batch {step - epoch * run.steps_per_epoch + 1}); stopping without saving this "
            f"epoch. Try a lower --lr (now {run.cfg.lr}) or --amp off in a new --out."
        )


def estimate_accuracy(run: Run, *, limit: int | None = None, amp: bool = False
                      ) -> tuple[int, int]:
    """(correct, total) of `run.model` on the first `limit` test images (all by default)."""
    images, labels = run.test_images[:limit], run.test_labels[:limit]
    pred = predict(run.model, images, device=run.device, amp=amp).argmax(1)
    return int((pred == labels).sum()), len(labels)


def _write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


def save_run(run: Run) -> None:
    """Write the finished epoch: last.safetensors, then state.pt (what resuming reads), then
    metrics.json, each atomically. The weights are checked first: non-finite ones are never
    written over a good epoch."""
    _check_finite_weights(run)
    state = dict(model=run.model.state_dict(), optimizer=run.opt.state_dict(),
                 epoch=run.epoch, step=run.step, history=run.history, elapsed=run.elapsed,
                 config={k: getattr(run.cfg, k) for k in TrainConfig.resume_fields()})
    save_checkpoint(run.model, run.out / "last.safetensors", preset=run.cfg.model,
                    epoch=run.epoch)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    wrapped = dict(format=STATE_FORMAT, sha256=hashlib.sha256(payload).hexdigest(),
                   payload=torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    atomic_write(run.out / "state.pt", lambda tmp: torch.save(wrapped, tmp))
    _write_json(run.out / "metrics.json", run.history)


def _check_finite_weights(run: Run) -> None:
    bad = [n for n, t in run.model.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"non-finite weights after epoch {run.epoch} in {bad[:3]}; "
                                 f"not saving over the last good epoch")


def read_state(path: str | os.PathLike) -> dict:
    """The training state in `path`, verified against its SHA-256 (never unpickling code)."""
    path = Path(path)
    what = f"{path} is not a readable training state"
    try:
        wrapped = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own text may advise weights_only=False: never do that
        raise ValueError(f"{what} (truncated or corrupt: {type(e).__name__}); "
                         f"use another --out to start afresh") from None
    if not isinstance(wrapped, dict) or "payload" not in wrapped:
        if isinstance(wrapped, dict) and {"model", "optimizer", "epoch"} <= set(wrapped):
            return wrapped  # written before states carried a SHA-256
        raise ValueError(f"{what}: expected a {STATE_FORMAT!r} file")
    payload = wrapped["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != wrapped.get("sha256"):
        raise ValueError(f"{path} is corrupt: its content does not match its SHA-256; "
                         f"use another --out to start afresh")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def _load_state(run: Run) -> None:
    """Continue from `state.pt` when the folder holds one, with the same settings only."""
    path = run.out / "state.pt"
    if not path.exists():
        # Without a state, a finished model or a log is another run's result: keep it.
        others = [n for n in ("model.safetensors", "metrics.json") if (run.out / n).exists()]
        if others:
            raise ValueError(f"{run.out} holds another run's {', '.join(others)} but no "
                             f"state.pt to resume it from; use another --out")
        return
    state = read_state(path)
    saved = state["config"] if "config" in state else state["args"]  # older runs: "args"
    changed = {k: (saved.get(k), getattr(run.cfg, k)) for k in TrainConfig.resume_fields()
               if saved.get(k) != getattr(run.cfg, k)}
    if changed:
        raise ValueError(f"{run.out} holds a run with other settings {changed} (saved, now); "
                         f"use another --out")
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.epoch, run.step = state["epoch"], state["step"]
    run.history, run.elapsed = state["history"], state["elapsed"]
    if run.main_process:
        print(f"resuming {run.out} after epoch {run.epoch}/{run.cfg.epochs}", flush=True)


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


def _build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, dict | None]:
    """The preset, or the `--init` checkpoint (resampled to `--img-size`) checked against it."""
    torch.manual_seed(cfg.seed)
    overrides = dict(cfg.model_overrides(), drop_path_rate=cfg.drop_path, drop_rate=cfg.dropout)
    if cfg.img_size:
        overrides["img_size"] = cfg.img_size
    if not cfg.init:
        return create_model(cfg.model, **overrides), None
    model, parent_meta = load_checkpoint(cfg.init, **overrides)
    if parent_meta.get("preset", cfg.model) != cfg.model:
        raise ValueError(f"--init {cfg.init} holds a {parent_meta['preset']!r} model, "
                         f"not {cfg.model!r}")
    # The checkpoint's config builds the model, so check it too: a file saved without
    # a preset name would otherwise train another architecture under this name.
    want = get_config(cfg.model, **{**overrides, "img_size": model.config.img_size})
    differ = [f"{k}={getattr(model.config, k)!r} (preset: {v!r})"
              for k, v in want.to_dict().items() if getattr(model.config, k) != v]
    if differ:
        raise ValueError(f"--init {cfg.init} is not a {cfg.model!r} model: {', '.join(differ)}")
    return model, parent_meta


def setup(
    cfg: TrainConfig,
    *,
    data: tuple[torch.Tensor, ...] | None = None,
    model: torch.nn.Module | None = None,
) -> Run:
    """Everything a run needs, resumed from `cfg.out` when it holds an unfinished run.

    `data` = (train_images, train_labels, test_images, test_labels) replaces Fashion-MNIST
    (uint8 (N, 28, 28) and (N,)); `model` replaces the preset (both for tests and notebooks).
    """
    rank, world, device = _setup_distributed(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    lock = _claim_folder(Path(cfg.out), cfg.command) if rank == 0 else None
    try:
        return _setup(cfg, data=data, model=model, rank=rank, world=world, device=device,
                      lock=lock)
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def _claim_folder(out: Path, command: str) -> io.TextIOBase:
    """Create `out`, lock it for this process and clear what a killed write left there.

    A second run in the same folder is refused with the first one's pid, host and command.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a folder for the run")
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a+")
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{out} is in use by {holder}; wait for it to end or use "
                         f"another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} "
            f"(since {time.strftime('%Y-%m-%d %H:%M:%S')}): {command}\n")
    f.flush()
    remove_stale_temporaries(out)
    return f


def _setup(cfg, *, data, model, rank, world, device, lock) -> Run:
    if data is None:
        data = (*load_fashion_mnist("train"), *load_fashion_mnist("test"))
    images, labels, test_images, test_labels = data
    if cfg.limit_train:
        images, labels = images[: cfg.limit_train], labels[: cfg.limit_train]
    steps_per_epoch = len(images) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {len(images)} images")
    parent_meta = None
    if model is None:
        model, parent_meta = _build_model(cfg)
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(0.9, 0.999), fused=device.type == "cuda")
    run = Run(cfg=cfg, model=model, net=model, opt=opt, device=device,
              images=images.to(device), labels=labels.to(device),
              test_images=test_images, test_labels=test_labels,
              steps_per_epoch=steps_per_epoch,
              amp=cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda"),
              rank=rank, world=world, parent_meta=parent_meta, lock=lock)
    _load_state(run)
    if world > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        run.net = torch.compile(run.net)
    return run


def finish(run: Run) -> dict:
    """Count the final model's correct test images (float32) and save model.safetensors."""
    cfg = run.cfg
    _check_finite_weights(run)
    correct, total = estimate_accuracy(run)
    result = dict(
        preset=cfg.model, accuracy=correct / total, correct=correct,
        epochs=cfg.epochs, seed=cfg.seed,
        command=cfg.command, seconds=round(run.elapsed, 1), device=_device_name(run.device),
        # wall-clock time of the invocation that finished the run: data loading,
        # compilation, evaluations and saves included ("seconds" sums the epochs)
        wall_seconds=round(time.time() - run.started, 1),
        parent=cfg.init, parent_accuracy=(run.parent_meta or {}).get("accuracy"),
    )
    save_checkpoint(run.model, run.out / "model.safetensors",
                    dtype=getattr(torch, cfg.save_dtype), **result)
    print(f"accuracy: {result['accuracy']:.4f} ({correct}/{total}) on {result['device']}, "
          f"{run.elapsed:.0f} s", flush=True)
    return result


def train(
    cfg: TrainConfig,
    *,
    data: tuple[torch.Tensor, ...] | None = None,
    model: torch.nn.Module | None = None,
    on_step: Callable[[Run, int], None] | None = None,
) -> dict:
    """The whole run: set up (or resume), train and save every epoch, then finish."""
    run = setup(cfg, data=data, model=model)
    try:
        return _loop(run, on_step=on_step)
    finally:
        run.close()


def _loop(run: Run, *, on_step) -> dict:
    cfg = run.cfg
    final = run.out / "model.safetensors"
    if run.epoch >= cfg.epochs and final.exists():  # the same command, already finished
        if run.main_process:
            print(f"{run.out} already holds this finished run; nothing to do", flush=True)
        return read_metadata(final)[1]
    while run.epoch < cfg.epochs:
        log = train_epoch(run, on_step=on_step)
        if run.epoch % cfg.eval_every == 0 or run.epoch == cfg.epochs:
            # bf16 on the GPU for this per-epoch log; the final count is float32.
            correct, total = estimate_accuracy(run, limit=cfg.limit_test, amp=run.amp)
            log["test_acc"] = round(correct / total, 5)
        run.history.append(log)
        if run.main_process:
            print(json.dumps(log), flush=True)
            save_run(run)
        if run.world > 1:
            dist.barrier()
    result = finish(run) if run.main_process else {}
    if run.world > 1:
        dist.destroy_process_group()
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except FloatingPointError as e:  # the run went wrong: status 1
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, IsADirectoryError) as e:  # refused: status 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
