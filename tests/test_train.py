"""Tests for `vit_tutorial.train`: resumption, atomic saves, non-finite losses, fine-tuning
at another resolution, DistributedDataParallel, the schedule and the weight-decay groups.

Every run is tiny (64 training images, batches of 16, 3 epochs of 4 steps): what is under
test is the bookkeeping around the training loop, not what the model learns.
"""

import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vit_tutorial.checkpoint as checkpoint_module
import vit_tutorial.train as train_module
from vit_tutorial import create_model, load_checkpoint, read_metadata, resample_pos_embed
from vit_tutorial.checkpoint import save_checkpoint
from vit_tutorial.train import cosine_schedule, param_groups

REPO = Path(__file__).resolve().parent.parent
MODEL = "vit_nano_patch4_28"
EPOCHS, STEPS = 3, 4  # 64 images in batches of 16: 4 steps per epoch


def _argv(out: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return ["--model", MODEL, "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "16", "--limit-train", "64", "--limit-test", "64",
            "--warmup", "1", "--device", "cpu", "--no-progress", *extra]


def _train(argv: list[str]) -> dict:
    args = train_module.parse_args(argv)
    args.argv = argv
    return train_module.train(args)


def _state(out: Path) -> dict:
    return torch.load(out / "state.pt", map_location="cpu", weights_only=True)


def _without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ("seconds", "img_per_s")} for h in history]


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` in train() can catch it."""


def _kill_at_batch(monkeypatch, n: int) -> None:
    """Kill the run when it starts its n-th batch (counting from 1 over the whole run)."""
    calls = itertools.count(1)
    augment = train_module.augment

    def killing_augment(*args, **kwargs):
        if next(calls) == n:
            raise Killed
        return augment(*args, **kwargs)

    monkeypatch.setattr(train_module, "augment", killing_augment)


def _count_batches(monkeypatch) -> list[int]:
    counter = [0]
    augment = train_module.augment

    def counting_augment(*args, **kwargs):
        counter[0] += 1
        return augment(*args, **kwargs)

    monkeypatch.setattr(train_module, "augment", counting_augment)
    return counter


def _small_test_split(monkeypatch, n: int = 500) -> None:
    """Cut the test split that train() reads to its first `n` images.

    The final evaluation reads the whole test set: ~3 s on one thread at 28x28, ~20 s at
    56x56. Tests of what happens before it use this.
    """
    load = train_module.load_fashion_mnist

    def small_load(split="train", **kwargs):
        images, labels = load(split, **kwargs)
        return (images[:n], labels[:n]) if split == "test" else (images, labels)

    monkeypatch.setattr(train_module, "load_fashion_mnist", small_load)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here trains or evaluates on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, _one_thread) -> Path:
    """An uninterrupted run (with drop-path, so its random masks must be repeated too)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _small_test_split(monkeypatch)
        assert train_module.main(_argv(out)) == 0
    return out


def _assert_same_run(out: Path, ref: Path, argv: list[str]) -> None:
    """`out` ended exactly as the uninterrupted `ref`: weights, optimizer, metrics, metadata."""
    weights = load_file(out / "model.safetensors")
    ref_weights = load_file(ref / "model.safetensors")
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], ref_weights[key]), key
    state, ref_state = _state(out), _state(ref)
    assert (state["epoch"], state["step"]) == (ref_state["epoch"], ref_state["step"])
    for name, t in state["model"].items():
        assert torch.equal(t, ref_state["model"][name]), name
    opt, ref_opt = state["optimizer"]["state"], ref_state["optimizer"]["state"]
    assert opt.keys() == ref_opt.keys()
    for i in opt:
        for name, t in opt[i].items():  # step, exp_avg, exp_avg_sq
            assert torch.equal(t, ref_opt[i][name]), (i, name)
    history = json.loads((out / "metrics.json").read_text())
    ref_history = json.loads((ref / "metrics.json").read_text())
    assert len(history) == EPOCHS
    assert _without_timings(history) == _without_timings(ref_history)
    assert _without_timings(state["history"]) == _without_timings(history)
    _, meta = read_metadata(out / "model.safetensors")
    _, ref_meta = read_metadata(ref / "model.safetensors")
    assert meta["command"] == "python -m vit_tutorial.train " + shlex.join(argv)
    skip = ("seconds", "wall_seconds", "command")  # timings; the command names another --out
    assert {k: v for k, v in meta.items() if k not in skip} == {
        k: v for k, v in ref_meta.items() if k not in skip
    }


# ---------------------------------------------------------------------------------------
# Resumption and atomic saves
# ---------------------------------------------------------------------------------------


def test_killed_run_resumes_and_repeats_the_uninterrupted_run(
    reference, tmp_path, monkeypatch, capsys
):
    _small_test_split(monkeypatch)
    out = tmp_path / "run"
    argv = _argv(out)
    _kill_at_batch(monkeypatch, STEPS + 3)  # batch 3 of epoch 2, after epoch 1 was saved
    with pytest.raises(Killed):
        train_module.main(argv)
    state = _state(out)
    assert (state["epoch"], state["step"]) == (1, STEPS)
    assert len(json.loads((out / "metrics.json").read_text())) == 1
    assert not (out / "model.safetensors").exists()

    monkeypatch.undo()
    _small_test_split(monkeypatch)
    batches = _count_batches(monkeypatch)
    capsys.readouterr()
    assert train_module.main(argv) == 0  # the same command
    assert f"resuming {out} after epoch 1/{EPOCHS}" in capsys.readouterr().out
    assert batches[0] == (EPOCHS - 1) * STEPS  # epochs 2 and 3 only
    _assert_same_run(out, reference, argv)


def test_resuming_with_other_settings_names_them(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "state.pt").read_bytes()
    with pytest.raises(ValueError, match="holds a run with other settings") as info:
        train_module.main(_argv(out, "--lr", "2e-3", "--no-flip"))
    message = str(info.value)
    assert "'lr': (0.001, 0.002)" in message  # (saved, now)
    assert "'no_flip': (False, True)" in message
    for same in ("epochs", "batch_size", "seed", "drop_path", "model"):
        assert f"'{same}'" not in message
    assert (out / "state.pt").read_bytes() == before


def test_eval_every_skips_evaluations_and_changes_nothing_else(reference, tmp_path,
                                                              monkeypatch):
    _small_test_split(monkeypatch)
    evaluations = []
    predict = train_module.predict

    def counting_predict(*args, **kwargs):
        evaluations.append(1)
        return predict(*args, **kwargs)

    monkeypatch.setattr(train_module, "predict", counting_predict)
    out = tmp_path / "run"
    assert train_module.main(_argv(out, "--eval-every", "2")) == 0
    assert len(evaluations) == 2 + 1  # after epochs 2 and 3 (the last), then the final one
    history = json.loads((out / "metrics.json").read_text())
    ref_history = json.loads((reference / "metrics.json").read_text())
    assert [h["test_acc"] for h in history] == [None, ref_history[1]["test_acc"],
                                                ref_history[2]["test_acc"]]
    for h, ref in zip(_without_timings(history), _without_timings(ref_history), strict=True):
        assert {**h, "test_acc": None} == {**ref, "test_acc": None}
    weights = load_file(out / "model.safetensors")
    ref_weights = load_file(reference / "model.safetensors")
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_eval_every_must_be_positive(value, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_module.parse_args(_argv(tmp_path, "--eval-every", value))
    assert f"--eval-every must be a positive number of epochs, got {value}" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("killed_file", ["last.safetensors", "state.pt"])
def test_kill_while_saving_keeps_the_previous_epoch(
    killed_file, reference, tmp_path, monkeypatch
):
    """A kill half-way through writing epoch 2's file leaves epoch 1's file readable."""
    _small_test_split(monkeypatch)
    out = tmp_path / "run"
    argv = _argv(out)
    if killed_file == "last.safetensors":
        save_file = checkpoint_module.save_file

        def dying_save_file(tensors, filename, metadata=None):
            if json.loads(metadata["metadata"]).get("epoch") == 2:
                Path(filename).write_bytes(b"half a safetensors file")
                raise Killed
            return save_file(tensors, filename, metadata=metadata)

        monkeypatch.setattr(checkpoint_module, "save_file", dying_save_file)
    else:
        save = torch.save

        def dying_save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("epoch") == 2:
                Path(f).write_bytes(b"half a pickle")
                raise Killed
            return save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Killed):
        train_module.main(argv)

    state = _state(out)  # loads: it is epoch 1's, whole
    assert (state["epoch"], state["step"], len(state["history"])) == (1, STEPS, 1)
    model, meta = load_checkpoint(out / "last.safetensors")  # checks the SHA-256 too
    if killed_file == "last.safetensors":
        assert meta["epoch"] == 1
        for name, t in model.state_dict().items():
            assert torch.equal(t, state["model"][name]), name
    else:
        assert meta["epoch"] == 2  # written before state.pt; resuming does not read it
    # The temporary file was removed (after a real SIGKILL a hidden .tmp would remain).
    assert sorted(p.name for p in out.iterdir()) == [
        "last.safetensors", "metrics.json", "state.pt"
    ]

    monkeypatch.undo()
    _small_test_split(monkeypatch)
    assert train_module.main(argv) == 0
    _assert_same_run(out, reference, argv)


# ---------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------


def test_absurd_lr_stops_with_the_step_on_stderr(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_module.main(_argv(out, "--lr", "1e30")) == 1
    captured = capsys.readouterr()
    # Step 0 sees the initial weights; its update at lr ~1e29 overflows the next forward.
    assert captured.err.startswith(
        "error: the loss became non-finite at step 1 (epoch 1, batch 2); "
        "stopping without saving this epoch. Try a lower --lr (now 1e+30)"
    )
    assert "accuracy" not in captured.out
    assert list(out.iterdir()) == []  # nothing saved


def _nan_at_step(monkeypatch, bad_step: int) -> None:
    """The model's logits become NaN at training step `bad_step` (counting from 0)."""
    create = train_module.create_model

    def create_model(*args, **kwargs):
        model = create(*args, **kwargs)
        steps = itertools.count()

        def hook(module, inputs, output):
            if module.training and next(steps) == bad_step:
                return output * float("nan")  # still part of the graph

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "create_model", create_model)


@pytest.mark.parametrize(
    "batch_size, bad_step, where",
    [
        (16, 5, "epoch 2, batch 2"),  # 4 steps an epoch; checked at the epoch's last batch
        (2, 40, "epoch 2, batch 9"),  # 32 steps an epoch; checked after its 25th batch
    ],
)
def test_nonfinite_loss_names_its_first_step_and_keeps_the_last_epoch(
    batch_size, bad_step, where, tmp_path, monkeypatch
):
    # The loss is read every 25 steps only; NaN weights make every later loss NaN too,
    # so the message must name the first bad step, not the step that noticed it.
    _nan_at_step(monkeypatch, bad_step)
    out = tmp_path / "run"
    argv = _argv(out, "--batch-size", str(batch_size), epochs=2)
    with pytest.raises(FloatingPointError, match=re.escape(f"at step {bad_step} ({where})")):
        _train(argv)
    state = _state(out)
    assert state["epoch"] == 1  # epoch 2 was not saved
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert read_metadata(out / "last.safetensors")[1]["epoch"] == 1
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())] == [1]


# ---------------------------------------------------------------------------------------
# Fine-tuning from a checkpoint at another resolution
# ---------------------------------------------------------------------------------------


def test_init_at_56_resamples_pos_embed_in_2d_and_records_the_parent(tmp_path, monkeypatch):
    parent = create_model(MODEL)
    ckpt = save_checkpoint(parent, tmp_path / "parent.safetensors", preset=MODEL, accuracy=0.5)
    start = {}
    load = train_module.load_checkpoint

    def spying_load(path, **overrides):  # the model train() starts from
        model, meta = load(path, **overrides)
        start["pos_embed"] = model.pos_embed.weight.detach().clone()
        return model, meta

    monkeypatch.setattr(train_module, "load_checkpoint", spying_load)
    _small_test_split(monkeypatch)
    out = tmp_path / "fine_tuned"
    result = _train(_argv(out, "--init", str(ckpt), "--img-size", "56", epochs=1))

    # 28/4 = 7x7 patches become 56/4 = 14x14; the class token's row stays as it was.
    table = parent.pos_embed.weight.detach()  # (1, 1 + 49, 64)
    expected = resample_pos_embed(table, (14, 14), old_size=(7, 7), num_prefix_tokens=1)
    assert expected.shape == (1, 1 + 196, 64)
    assert torch.equal(start["pos_embed"], expected)
    assert torch.equal(start["pos_embed"][:, :1], table[:, :1])

    model, meta = load_checkpoint(out / "model.safetensors")
    assert model.config.img_size == (56, 56)
    assert model.pos_embed.weight.shape == (1, 1 + 196, 64)
    assert not torch.equal(model.pos_embed.weight, start["pos_embed"])  # it was trained
    assert meta["parent"] == str(ckpt) and meta["parent_accuracy"] == 0.5
    assert meta["preset"] == MODEL
    assert result["parent"] == str(ckpt)


@pytest.mark.parametrize("with_preset_name", [True, False])
def test_init_from_another_preset_is_refused(with_preset_name, tmp_path):
    other = create_model("vit_mini_patch4_28")
    meta = {"preset": "vit_mini_patch4_28"} if with_preset_name else {}
    ckpt = save_checkpoint(other, tmp_path / "mini.safetensors", **meta)
    out = tmp_path / "run"
    if with_preset_name:
        match = "holds a 'vit_mini_patch4_28' model, not 'vit_nano_patch4_28'"
    else:  # no name to compare: the config must give it away
        match = r"is not a 'vit_nano_patch4_28' model: embed_dim=192 \(preset: 64\), depth=9"
    with pytest.raises(ValueError, match=match):
        _train(_argv(out, "--init", str(ckpt)))
    assert not (out / "state.pt").exists()


# ---------------------------------------------------------------------------------------
# DistributedDataParallel on the CPU
# ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_processes_matches_one_process(tmp_path):
    # Every process seeds dropout and drop-path alike but draws masks for its own half of
    # the batch, so process 1 repeats process 0's masks where one process would draw new
    # ones. Augmentation is drawn for the whole global batch in every process, so without
    # drop-path the two runs see the same pixels.
    extra = ("--drop-path", "0")
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               "-m", "vit_tutorial.train", *_argv(ddp, *extra)]
    # TMPDIR: torchrun leaves a log folder there after every run.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("accuracy: ") == 1  # only process 0 reports
    with pytest.MonkeyPatch.context() as monkeypatch:
        _small_test_split(monkeypatch)
        _train(_argv(single, *extra))

    weights, ref = load_file(ddp / "model.safetensors"), load_file(single / "model.safetensors")
    torch.manual_seed(0)  # --seed 0: the weights both runs started from
    init = create_model(MODEL).state_dict()
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref)
    assert moved > 5e-3  # 12 AdamW steps at lr <= 1e-3 (measured: 7e-3)
    # DDP averages two half-batch gradients where one process averages the whole batch:
    # the same math in another float32 summation order. Adam divides by sqrt(v), so the
    # rounding in tiny gradients grows to ~1e-5 in 12 steps: measured 8e-6 here, and 1e-5
    # between two single-process runs on 1 and on 2 threads. A wrong slice, unaveraged
    # gradients or other augmentation or drop-path masks (9e-3 with --drop-path 0.1) show
    # up at the scale of `moved`, far above this tolerance.
    assert weights.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(weights[key], ref[key], rtol=0, atol=5e-5, msg=key)

    # The logged metrics cover the whole global batch, not process 0's half of it.
    history = json.loads((ddp / "metrics.json").read_text())
    ref_history = json.loads((single / "metrics.json").read_text())
    for h, r in zip(history, ref_history, strict=True):
        assert h["train_loss"] == pytest.approx(r["train_loss"], abs=1e-4)
        assert h["train_acc"] == pytest.approx(r["train_acc"], abs=1 / 64)  # 1 image
        assert h["test_acc"] == pytest.approx(r["test_acc"], abs=1 / 64)


# ---------------------------------------------------------------------------------------
# The learning-rate schedule and the weight-decay groups
# ---------------------------------------------------------------------------------------


def test_cosine_schedule_warms_up_linearly_then_decays_to_min_lr():
    total, warmup, lr, min_lr = 100, 10, 1e-3, 1e-5
    lrs = [cosine_schedule(s, total=total, warmup=warmup, lr=lr, min_lr=min_lr)
           for s in range(total + 1)]
    # Warm-up: equal increments of lr / warmup, reaching lr at its last step, never 0.
    assert lrs[:warmup] == pytest.approx([lr * (s + 1) / warmup for s in range(warmup)])
    assert lrs[warmup - 1] == pytest.approx(lr) and lrs[warmup] == pytest.approx(lr)
    # Cosine: never rises, half-way between lr and min_lr half-way, min_lr at the end.
    decay = lrs[warmup:]
    assert all(a >= b for a, b in zip(decay[:-1], decay[1:], strict=True))
    assert decay[0] > decay[1]
    assert lrs[warmup + (total - warmup) // 2] == pytest.approx((lr + min_lr) / 2)
    assert lrs[total] == pytest.approx(min_lr) and min(lrs) >= min_lr
    assert cosine_schedule(2 * total, total=total, warmup=warmup, lr=lr, min_lr=min_lr) == (
        pytest.approx(min_lr)
    )
    assert cosine_schedule(0, total=total, warmup=0, lr=lr, min_lr=min_lr) == lr


def test_param_groups_skip_weight_decay_on_1d_params_cls_token_and_pos_embed():
    model = create_model(MODEL)
    model.head.bias.requires_grad_(False)  # frozen parameters go to neither group
    decay, no_decay = param_groups(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    with_decay = [names[id(p)] for p in decay["params"]]
    without = [names[id(p)] for p in no_decay["params"]]
    assert set(with_decay).isdisjoint(without)
    assert sorted(with_decay + without) == sorted(set(names.values()) - {"head.bias"})
    params = dict(model.named_parameters())
    embeddings = {"cls_token.weight", "pos_embed.weight"}  # 3-D, but no decay either
    assert embeddings <= set(without)
    assert all(params[n].ndim == 1 for n in set(without) - embeddings)
    assert all(params[n].ndim >= 2 for n in with_decay)
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"} <= set(
        with_decay
    )
    assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias"} <= set(without)
    # A learned 2-D table has 2-D row and column parameters, still without decay.
    model2d = create_model(MODEL, pos_embed="learn2d")
    _, no_decay2d = param_groups(model2d, 0.05)
    names2d = {id(p): n for n, p in model2d.named_parameters()}
    assert {"pos_embed.row", "pos_embed.col"} <= {names2d[id(p)] for p in no_decay2d["params"]}
