"""The papers' experiments in miniature, on Fashion-MNIST.

    python -m vit_tutorial.experiments pos_embed --jobs 8        # on a GPU: every arm x seed
    python -m vit_tutorial.experiments pos_embed --quick         # every arm a few CPU steps
    python -m vit_tutorial.experiments --list
    python -m vit_tutorial.experiments --summary                 # the shipped results

Each experiment tests one claim of the ViT paper (Dosovitskiy et al. 2020) or the T2T-ViT
paper (Yuan et al. 2021). Its arms differ in one thing (a model setting or the learning
rate); every arm trains for the same budget with the same recipe, once per seed. A run is
an ordinary `python -m vit_tutorial.train` run (its `--model-arg` flags change the preset),
so an interrupted experiment resumes: finished runs are kept, half-finished ones resume
from their last epoch. `--jobs N` runs N of them side by side, which keeps one GPU busy
with these small models. The results, with every run's command, per-epoch metrics, times
and GPU, are written to `data/experiments/NAME.json` (no checkpoints); `load_results`
reads them back and `compare` says whether two arms differ. `--quick` trains every arm of
one seed for one epoch of 32 images on the CPU and writes `NAME.quick.json` into `--out`:
a test of the machinery, not a result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import train as train_module
from .checkpoint import atomic_write
from .data import DATA_DIR
from .presets import get_config
from .utils import count_parameters
from .vit import VisionTransformer

__all__ = ["Arm", "Experiment", "EXPERIMENTS", "RECIPE", "run_experiment", "forward_flops",
           "load_results", "final_accuracies", "epoch_accuracies", "compare", "summarize",
           "main"]

# One recipe for every run: the shipped checkpoints' augmentation and regularisation, but
# no mixup or CutMix (they slow the first epochs, and these budgets are short).
RECIPE = ("--batch-size", "512", "--lr", "1e-3", "--min-lr", "1e-5", "--warmup", "2",
          "--weight-decay", "0.05", "--drop-path", "0.1", "--crop-padding", "2",
          "--erasing", "0.25", "--label-smoothing", "0.1")
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Arm:
    """One setting of an experiment: a preset, its changes, and training flags of its own."""

    name: str
    model: str
    model_args: tuple[str, ...] = ()  # --model-arg KEY=VALUE changes of the preset
    train_args: tuple[str, ...] = ()  # flags after RECIPE (a later flag wins), e.g. --lr
    epochs: int | None = None  # None: the experiment's budget

    def config(self):
        overrides = train_module.TrainConfig(model=self.model, out="-",
                                             model_arg=self.model_args).model_overrides()
        return get_config(self.model, **overrides)


@dataclass(frozen=True)
class Experiment:
    name: str
    claim: str  # what the paper says, with where
    arms: tuple[Arm, ...]
    epochs: int  # the budget of every arm that does not set its own
    seeds: tuple[int, ...] = SEEDS
    notes: str = ""

    def runs(self) -> list[tuple[Arm, int]]:
        return [(arm, seed) for arm in self.arms for seed in self.seeds]


MINI = "vit_mini_patch4_28"
# The same backbone behind three tokenizers (T2T ablation): D = 192, 7 blocks, 3 heads, MLP
# ratio 3, learned 1-D positions, q/k/v biases; 49 tokens for each.
_BACKBONE = ("depth=7", "mlp_ratio=3.0", "pos_embed=learn", "qkv_bias=True")

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in [
    Experiment(
        name="pos_embed",
        claim="ViT appendix D.4, Table 8: any position embedding beats none by a wide margin, "
              "and the kinds of position embedding (1-D, 2-D, relative) differ little.",
        arms=(
            Arm("none", MINI, ("pos_embed=none",)),
            Arm("learned 1-D", MINI, ("pos_embed=learn",)),
            Arm("learned 2-D", MINI, ("pos_embed=learn2d",)),
            Arm("relative", MINI, ("pos_embed=relative",)),
            Arm("sin-cos 2-D", MINI, ("pos_embed=sincos2d",)),
        ),
        epochs=8,
    ),
    Experiment(
        name="pool",
        claim="ViT appendix D.3, Fig. 9: the class token and global average pooling reach the "
              "same accuracy, but they need different learning rates: GAP at the class "
              "token's learning rate does worse.",
        arms=(
            Arm("class token, lr 1e-3", MINI),
            Arm("GAP, lr 1e-3", MINI, ("class_token=False", "pool=gap")),
            Arm("class token, lr 3e-4", MINI, (), ("--lr", "3e-4")),
            Arm("GAP, lr 3e-4", MINI, ("class_token=False", "pool=gap"), ("--lr", "3e-4")),
        ),
        epochs=8,
        notes="1e-3 is the recipe's rate, which every other experiment uses; 3e-4 keeps about "
              "the ratio of the two rates of Fig. 9 (8e-4 and 3e-4).",
    ),
    Experiment(
        name="hybrid_budget",
        claim="ViT section 4.4, Fig. 5: for small training budgets hybrids beat pure ViTs of "
              "the same compute; the gap closes as the budget grows.",
        arms=tuple(
            Arm(f"{kind}, {epochs} epochs", model, epochs=epochs)
            for epochs in (2, 4, 12)
            for kind, model in (("ViT", MINI), ("hybrid", "vit_mini_r26_s4_28"))
        ),
        epochs=4,
        notes="Each arm's budget is its epochs; on one axis they are training "
              "FLOPs (3 x forward FLOPs per image x images seen).",
    ),
    Experiment(
        name="t2t_tokenizer",
        claim="T2T-ViT section 4.3 (ablation): in front of the same backbone, the T2T module "
              "beats plain patches (and a convolutional stem).",
        arms=(
            Arm("patches 4x4", MINI, _BACKBONE),
            Arm("convolutional stem", "vit_mini_r26_s4_28",
                (*_BACKBONE, "hybrid_layers=(1, 1, 1)", "hybrid_width=16")),
            Arm("T2T module", "t2t_vit_mini_28", _BACKBONE),
        ),
        epochs=8,
    ),
    Experiment(
        name="deep_narrow",
        claim="T2T-ViT section 3.2 and Table 7: at a similar parameter count a deep-narrow "
              "backbone (more blocks, smaller width) beats a shallow-wide one.",
        arms=(
            Arm("deep-narrow: 12 blocks of 192", "t2t_vit_mini_28",
                ("depth=12", "embed_dim=192", "num_heads=3")),
            Arm("shallow-wide: 3 blocks of 384", "t2t_vit_mini_28",
                ("depth=3", "embed_dim=384", "num_heads=6")),
        ),
        epochs=8,
    ),
]}


@torch.no_grad()
def forward_flops(model: VisionTransformer) -> int:
    """FLOPs of one image's forward pass, a multiply-add counted as two.

    The attention layers run their written-out path while counting: `FlopCounterMode`
    cannot see inside the fused attention kernel on the CPU.
    """
    fused = [(m, m.fused) for m in model.modules() if hasattr(m, "fused")]
    try:
        for m, _ in fused:
            m.fused = False
        with FlopCounterMode(display=False) as counter:
            model.eval()(torch.zeros(1, model.config.in_chans, *model.config.img_size))
    finally:
        for m, flag in fused:
            m.fused = flag
    return counter.get_total_flops()


def _seeds(exp: Experiment, *, quick: bool, seeds: tuple[int, ...] | None) -> tuple[int, ...]:
    return (exp.seeds[:1] if quick else exp.seeds) if seeds is None else tuple(seeds)


def _epochs(exp: Experiment, arm: Arm, *, quick: bool, override: int | None) -> int:
    return 1 if quick else override or arm.epochs or exp.epochs


def _argv(exp: Experiment, arm: Arm, seed: int, out: Path, *, quick: bool,
          extra: tuple[str, ...], epochs: int | None = None) -> list[str]:
    epochs = _epochs(exp, arm, quick=quick, override=epochs)
    argv = ["--model", arm.model, "--out", str(out), "--seed", str(seed),
            "--epochs", str(epochs), *RECIPE, *arm.train_args]
    for item in arm.model_args:
        argv += ["--model-arg", item]
    if quick:
        argv += ["--limit-train", "32", "--limit-test", "32", "--batch-size", "16",
                 "--warmup", "0", "--device", "cpu"]
    return argv + ["--no-progress", *extra]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _run_folder(root: Path, exp: Experiment, arm: Arm, seed: int) -> Path:
    return root / exp.name / _slug(arm.name) / f"seed{seed}"


def _launch_all(jobs: list[tuple[list[str], Path]], n_parallel: int) -> None:
    """Run `python -m vit_tutorial.train ARGV` for every job, n at a time; logs beside each."""
    pending, running, failed = list(jobs), [], []
    try:
        _pool_loop(pending, running, failed, n_parallel)
    finally:  # interrupted (Ctrl+C, SIGTERM): stop the runs; each resumes from its last epoch
        for proc, log, _ in running:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            log.close()
    if failed:
        raise RuntimeError(f"{len(failed)} runs failed; see train.log in {failed}")


def _pool_loop(pending: list, running: list, failed: list, n_parallel: int) -> None:
    while pending or running:
        while pending and len(running) < n_parallel:
            argv, folder = pending.pop(0)
            folder.mkdir(parents=True, exist_ok=True)
            log = open(folder / "train.log", "a")
            cmd = [sys.executable, "-m", "vit_tutorial.train", *argv]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log,
                            folder))
            print(f"started {folder}", flush=True)
        time.sleep(1.0)
        for item in list(running):
            proc, log, folder = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                print(f"finished {folder} (exit {proc.returncode})", flush=True)
                if proc.returncode:
                    failed.append(folder)


def _collect(folder: Path) -> dict:
    meta = json.loads((folder / "metrics.json").read_text())
    from .checkpoint import read_metadata

    _, final = read_metadata(folder / "model.safetensors")
    return {"history": meta, "final": {k: final.get(k) for k in (
        "accuracy", "correct", "seconds", "wall_seconds", "device", "command")}}


def plan_runs(name: str, *, out: str | Path, quick: bool = False,
              seeds: tuple[int, ...] | None = None, extra: tuple[str, ...] = (),
              epochs: int | None = None) -> list[tuple[list[str], Path]]:
    """(train argv, run folder) of every arm x seed of experiment `name`."""
    exp = EXPERIMENTS[name]
    seeds = _seeds(exp, quick=quick, seeds=seeds)
    root = Path(out)
    return [(_argv(exp, arm, seed, _run_folder(root, exp, arm, seed), quick=quick, extra=extra,
                   epochs=epochs), _run_folder(root, exp, arm, seed))
            for arm in exp.arms for seed in seeds]


def run_experiment(name: str, *, out: str | Path, jobs: int = 1, quick: bool = False,
                   seeds: tuple[int, ...] | None = None, results: str | Path | None = None,
                   extra: tuple[str, ...] = (), command: str | None = None,
                   data: tuple[torch.Tensor, ...] | None = None,
                   epochs: int | None = None, launch: bool = True,
                   wall_seconds: float | None = None) -> Path:
    """Run every arm x seed of experiment `name` and write its results JSON. Returns its path.

    `data` (train images, labels, test images, labels) replaces Fashion-MNIST in runs made
    in this process (`jobs=1`), as `train(..., data=)` does: the tests pass a short test split.
    `epochs` replaces every arm's budget (a trial of the machinery, not the experiment).
    `launch=False` only collects runs made already (`plan_runs` in one shared pool, which
    took `wall_seconds` for all its experiments together).
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {tuple(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    seeds = _seeds(exp, quick=quick, seeds=seeds)
    runs = [(arm, seed) for arm in exp.arms for seed in seeds]
    plan = plan_runs(name, out=out, quick=quick, seeds=seeds, extra=extra, epochs=epochs)
    start = time.time()
    if launch and jobs <= 1:
        for argv, _ in plan:
            train_module.train(train_module.parse_args(argv), data=data)
    elif launch:
        _launch_all(plan, jobs)
    wall = time.time() - start if launch else wall_seconds

    arms = []
    for arm in exp.arms:
        config = arm.config()
        model = VisionTransformer(config)
        arms.append({
            "name": arm.name, "model": arm.model, "model_args": list(arm.model_args),
            "train_args": list(arm.train_args),
            "epochs": _epochs(exp, arm, quick=quick, override=epochs),
            "parameters": count_parameters(model), "forward_flops": forward_flops(model),
            "config": config.to_dict(),
        })
    result = {
        "experiment": exp.name, "claim": exp.claim, "notes": exp.notes, "quick": quick,
        "epochs_override": epochs,
        "command": command,
        "recipe": list(RECIPE), "seeds": list(seeds), "jobs": jobs,
        "wall_seconds": None if wall is None else round(wall, 1),
        "shared_pool": None if launch else "every run of this command in one pool of --jobs",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not quick else None,
        "arms": arms,
        "runs": [{"arm": arm.name, "seed": seed,
                  "command": "python -m vit_tutorial.train " + shlex.join(argv),
                  **_collect(folder)}
                 for (arm, seed), (argv, folder) in zip(runs, plan, strict=True)],
    }
    path = Path(results) if results else (
        Path(out) / f"{name}.quick.json" if quick else DATA_DIR / "experiments" / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def load_results(name: str, folder: str | Path | None = None) -> dict:
    """The results JSON of experiment `name` (from data/experiments/ unless `folder`)."""
    path = Path(folder or DATA_DIR / "experiments") / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results for {name!r} at {path}; run "
                                f"`python -m vit_tutorial.experiments {name}`")
    return json.loads(path.read_text())


def final_accuracies(result: dict) -> dict[str, list[float]]:
    """arm name -> the final test accuracy (float32, all test images) of each seed's run."""
    out = {arm["name"]: [] for arm in result["arms"]}
    for run in result["runs"]:
        out[run["arm"]].append(run["final"]["accuracy"])
    return out


def epoch_accuracies(result: dict) -> dict[str, list[list[float]]]:
    """arm name -> one list per seed's run of the test accuracy logged after every epoch
    (under bf16 autocast on a GPU): the learning curves."""
    out = {arm["name"]: [] for arm in result["arms"]}
    for run in result["runs"]:
        out[run["arm"]].append([epoch["test_acc"] for epoch in run["history"]])
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1; NaN for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def compare(result: dict, a: str, b: str) -> dict:
    """Arm `a` against arm `b`: the difference of their mean accuracies, and whether it
    counts. A difference under two standard deviations (of the seeds, pooled over the two
    arms: sqrt((s_a^2 + s_b^2) / 2)) is no difference (`resolved` False)."""
    acc = final_accuracies(result)
    for name in (a, b):
        if name not in acc:
            raise ValueError(f"no arm {name!r} in {result['experiment']}; arms: {list(acc)}")
        if len(acc[name]) < 2:
            raise ValueError(f"arm {name!r} has {len(acc[name])} run; a spread needs two")
    (mean_a, std_a), (mean_b, std_b) = _mean_std(acc[a]), _mean_std(acc[b])
    pooled = ((std_a**2 + std_b**2) / 2) ** 0.5
    diff = mean_a - mean_b
    return {"a": a, "b": b, "mean_a": mean_a, "mean_b": mean_b, "difference": diff,
            "pooled_std": pooled, "resolved": abs(diff) >= 2 * pooled}


def summarize(result: dict) -> str:
    """A table of one experiment's results: per arm its parameters, forward GFLOPs per
    image, epochs, and the final accuracy's mean and sample standard deviation over the
    seeds, then each seed's accuracy."""
    acc = final_accuracies(result)
    seeds = ", ".join(str(s) for s in result["seeds"])
    width = max(len(a["name"]) for a in result["arms"])
    lines = [f"{result['experiment']}: {result['claim']}",
             f"{'arm':{width}s}  parameters  GFLOPs  epochs  accuracy, mean +- std  "
             f"(seeds {seeds})"]
    for arm in result["arms"]:
        values = acc[arm["name"]]
        mean, std = _mean_std(values)
        lines.append(f"{arm['name']:{width}s}  {arm['parameters']:10,d}  "
                     f"{arm['forward_flops'] / 1e9:6.3f}  {arm['epochs']:6d}  "
                     f"{mean:.4f} +- {std:.4f}       "
                     f"({', '.join(f'{v:.4f}' for v in values)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vit_tutorial.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help=f"of {tuple(EXPERIMENTS)}")
    p.add_argument("--list", action="store_true", help="list the experiments and their arms")
    p.add_argument("--summary", action="store_true",
                   help="print the results in data/experiments/ (of NAMEs, default all)")
    p.add_argument("--out", default="runs/experiments", help="folder for the runs")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (subprocesses)")
    p.add_argument("--quick", action="store_true", help="one CPU epoch of 32 images per arm")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    p.add_argument("--results", help="the JSON to write (one experiment only)")
    p.add_argument("--compile", action="store_true", help="torch.compile every run's model")
    p.add_argument("--epochs", type=int, help="replace every arm's budget (a trial run)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiments {unknown}; expected some of {tuple(EXPERIMENTS)}")
    if args.summary:
        for name in args.names or EXPERIMENTS:
            print(summarize(load_results(name)), end="\n\n")
        return 0
    if args.list or not args.names:
        for exp in EXPERIMENTS.values():
            print(f"{exp.name}: {exp.claim}")
            for arm in exp.arms:
                print(f"  {arm.name}: {arm.model} {' '.join(arm.model_args)} "
                      f"{' '.join(arm.train_args)}".rstrip())
        return 0
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.results and len(args.names) > 1:
        p.error("--results names one file: give one experiment")
    extra = ("--compile",) if args.compile else ()
    seeds = tuple(args.seeds) if args.seeds else None
    pooled = args.jobs > 1 and len(args.names) > 1
    if pooled:  # every run of every named experiment in one pool: no wave waits for another
        start = time.time()
        _launch_all([job for name in args.names for job in plan_runs(
            name, out=args.out, quick=args.quick, seeds=seeds, extra=extra, epochs=args.epochs)],
            args.jobs)
        pool_wall = time.time() - start
        print(f"all runs done in {pool_wall:.0f} s", flush=True)
    for name in args.names:
        path = run_experiment(name, out=args.out, jobs=args.jobs, quick=args.quick, seeds=seeds,
                              results=args.results, extra=extra, epochs=args.epochs,
                              command="python -m vit_tutorial.experiments " + shlex.join(argv),
                              launch=not pooled, wall_seconds=pool_wall if pooled else None)
        print(f"wrote {path}", flush=True)
    return 0


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through _launch_all, which stops its runs


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
