"""Tests for `vit_tutorial.train`: resumption, atomic saves, non-finite losses, fine-tuning
at another resolution, DistributedDataParallel, the schedule and the weight-decay groups.

Every run is tiny (64 training images, batches of 16, 3 epochs of 4 steps): what is under
test is the bookkeeping around the training loop, not what the model learns.
"""

import functools
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
from vit_tutorial import (
    create_model,
    load_checkpoint,
    load_fashion_mnist,
    read_metadata,
    resample_pos_embed,
)
from vit_tutorial.checkpoint import save_checkpoint
from vit_tutorial.train import TrainConfig, cosine_schedule, param_groups, train_step

REPO = Path(__file__).resolve().parent.parent
MODEL = "vit_nano_patch4_28"
EPOCHS, STEPS = 3, 4  # 64 images in batches of 16: 4 steps per epoch


def _argv(out: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return ["--model", MODEL, "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "16", "--limit-train", "64", "--limit-test", "64",
            "--warmup", "1", "--device", "cpu", "--no-progress", *extra]


@functools.cache
def _data(n_test: int = 500) -> tuple[torch.Tensor, ...]:
    """Fashion-MNIST with the test split cut to its first `n_test` images.

    The final evaluation reads the whole test split: ~3 s on one thread at 28x28, ~20 s at
    56x56. Tests of what happens before it train on this.
    """
    test_images, test_labels = load_fashion_mnist("test")
    return (*load_fashion_mnist("train"), test_images[:n_test], test_labels[:n_test])


def _train(argv: list[str], **kwargs) -> dict:
    return train_module.train(train_module.parse_args(argv), data=_data(), **kwargs)


def _state(out: Path) -> dict:
    return train_module.read_state(out / "state.pt")


def _without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ("seconds", "img_per_s")} for h in history]


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` in train() can catch it."""


def _kill_at_batch(n: int):
    """An on_step callback that kills the run as it starts its n-th batch of this process."""
    calls = itertools.count(1)

    def on_step(run, i):
        if next(calls) == n:
            raise Killed

    return on_step


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here trains or evaluates on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, _one_thread) -> Path:
    """An uninterrupted run (with drop-path, so its random masks must be repeated too)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _train(_argv(out))
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


def test_killed_run_resumes_and_repeats_the_uninterrupted_run(reference, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _argv(out)
    with pytest.raises(Killed):  # at batch 3 of epoch 2, after epoch 1 was saved
        _train(argv, on_step=_kill_at_batch(STEPS + 3))
    state = _state(out)
    assert (state["epoch"], state["step"]) == (1, STEPS)
    assert len(json.loads((out / "metrics.json").read_text())) == 1
    assert not (out / "model.safetensors").exists()

    batches = []
    capsys.readouterr()
    _train(argv, on_step=lambda run, i: batches.append((run.epoch, i)))  # the same command
    assert f"resuming {out} after epoch 1/{EPOCHS}" in capsys.readouterr().out
    assert batches == [(e, i) for e in (1, 2) for i in range(STEPS)]  # epochs 2 and 3 only
    _assert_same_run(out, reference, argv)


def test_resuming_with_other_settings_names_them(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "state.pt").read_bytes()
    with pytest.raises(ValueError, match="holds a run with other settings") as info:
        _train(_argv(out, "--lr", "2e-3", "--no-flip"))
    message = str(info.value)
    assert "'lr': (0.001, 0.002)" in message  # (saved, now)
    assert "'no_flip': (False, True)" in message
    for same in ("epochs", "batch_size", "seed", "drop_path", "model"):
        assert f"'{same}'" not in message
    assert (out / "state.pt").read_bytes() == before


def test_a_finished_run_is_never_overwritten(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    # The same command again: nothing to do, the recorded result comes back.
    result = _train(_argv(out))
    assert "already holds this finished run" in capsys.readouterr().out
    assert result == read_metadata(out / "model.safetensors")[1]
    # Without its state.pt, the folder's model and log belong to another run: refused.
    (out / "state.pt").unlink()
    del files["state.pt"]
    with pytest.raises(ValueError, match=r"holds another run's model.safetensors, "
                                         r"metrics.json but no state.pt to resume it from; "
                                         r"use another --out"):
        _train(_argv(out, "--lr", "2e-3"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == files


def test_a_second_run_in_the_same_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first = train_module.setup(train_module.parse_args(_argv(out)), data=_data())
    try:
        with pytest.raises(ValueError, match=rf"{re.escape(str(out))} is in use by pid "
                                             rf"{os.getpid()} on .*: python -m "
                                             rf"vit_tutorial.train --model {MODEL}"):
            _train(_argv(out))
    finally:
        first.close()
    _train(_argv(out, epochs=1))  # released: the folder can be used again


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*file is a file; expected a folder"):
        _train(_argv(tmp_path / "file"))


def test_a_damaged_state_is_reported_not_resumed(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    raw = bytearray((out / "state.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit inside the state's bytes
    (out / "state.pt").write_bytes(bytes(raw))
    with pytest.raises(ValueError) as info:
        _train(_argv(out))
    message = str(info.value)
    assert message.startswith(f"{out / 'state.pt'} ")
    assert "use another --out" in message and "weights_only" not in message
    (out / "state.pt").write_bytes(b"not a state")
    with pytest.raises(ValueError, match=r"is not a readable training state \(truncated or "
                                         r"corrupt: .*\); use another --out"):
        _train(_argv(out))


def test_eval_every_skips_evaluations_and_changes_nothing_else(reference, tmp_path):
    out = tmp_path / "run"
    _train(_argv(out, "--eval-every", "2"))
    history = json.loads((out / "metrics.json").read_text())
    ref_history = json.loads((reference / "metrics.json").read_text())
    assert [h["test_acc"] for h in history] == [None, ref_history[1]["test_acc"],
                                                ref_history[2]["test_acc"]]
    for h, ref in zip(_without_timings(history), _without_timings(ref_history), strict=True):
        assert {**h, "test_acc": None} == {**ref, "test_acc": None}
    weights = load_file(out / "model.safetensors")
    ref_weights = load_file(reference / "model.safetensors")
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--eval-every", "0", "eval_every must be a positive number of epochs, got 0"),
        ("--eval-every", "-1", "eval_every must be a positive number of epochs, got -1"),
        ("--epochs", "0", "epochs must be at least 1, got 0"),
        ("--epochs", "-1", "epochs must be at least 1, got -1"),
        ("--lr", "0", "lr must be a positive number, got 0.0"),
        ("--limit-train", "0", "limit_train must be at least 1, got 0"),
        ("--limit-test", "-5", "limit_test must be at least 1, got -5"),
        ("--img-size", "0", "img_size must be a positive number of pixels, got 0"),
        ("--clip-grad", "-1", "clip_grad must be >= 0 (0: off), got -1.0"),
        ("--warmup", "-1", "warmup must be >= 0 epochs, got -1.0"),
        ("--weight-decay", "-0.1", "weight_decay must be >= 0, got -0.1"),
        ("--label-smoothing", "-0.1", "label_smoothing must be in [0, 1), got -0.1"),
        ("--label-smoothing", "1", "label_smoothing must be in [0, 1), got 1.0"),
        ("--mixup", "-1", "mixup must be >= 0 (0: off), got -1.0"),
        ("--dropout", "1", "dropout must be in [0, 1), got 1.0"),
        ("--drop-path", "1", "drop_path must be in [0, 1), got 1.0"),
        ("--batch-size", "0", "batch_size must be at least 1, got 0"),
        ("--min-lr", "1", "min_lr must be in [0, lr=0.001], got 1.0"),
        ("--model-arg", "pool", "--model-arg: expected KEY=VALUE, got 'pool'"),
        ("--model-arg", "pos_embd=relative", "--model-arg: unknown ViTConfig fields ['pos_embd']"),
        ("--model-arg", "pool=max", "--model-arg: unknown pool 'max'"),
        ("--model-arg", "drop_path_rate=0.2", "drop_path_rate is set by --drop-path"),
        ("--model-arg", "depth=-1", "depth must be an int >= 0, got -1"),
    ],
)
def test_bad_settings_exit_2_with_a_message_naming_them(flag, value, message, tmp_path,
                                                         capsys):
    with pytest.raises(SystemExit) as info:
        train_module.parse_args(_argv(tmp_path / "run", flag, value))
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # argparse's one-line refusal, after the usage
    assert last.startswith("python -m vit_tutorial.train: error: ") and message in last
    assert not (tmp_path / "run").exists()


def test_model_args_change_the_preset_and_define_the_run(tmp_path):
    cfg = train_module.parse_args(_argv(tmp_path / "run", "--model-arg", "pos_embed=relative",
                                        "--model-arg", "class_token=False",
                                        "--model-arg", "pool=gap", "--epochs", "1"))
    assert cfg.model_overrides() == {"pos_embed": "relative", "class_token": False,
                                     "pool": "gap"}
    assert "model_arg" in TrainConfig.resume_fields()
    _train(_argv(tmp_path / "run", "--model-arg", "pos_embed=relative", "--model-arg",
                 "class_token=False", "--model-arg", "pool=gap", epochs=1))
    config, meta = read_metadata(tmp_path / "run" / "model.safetensors")
    assert (config.pos_embed, config.class_token, config.pool) == ("relative", False, "gap")
    assert meta["preset"] == MODEL and "--model-arg pos_embed=relative" in meta["command"]
    model, _ = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert model.blocks[0].attn.logit_bias is not None and model.cls_token is None


def test_unknown_model_names_the_closest_presets(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_module.parse_args(["--model", "vit_nano_patch4", "--out", str(tmp_path)])
    assert "unknown model 'vit_nano_patch4'; did you mean vit_nano_patch4_28" in (
        capsys.readouterr().err)


def test_train_config_separates_the_run_from_this_invocation():
    defining = TrainConfig.resume_fields()
    assert {"model", "epochs", "lr", "seed", "img_size", "init", "limit_train"} <= set(defining)
    invocation = {"out", "device", "compile", "amp", "eval_every", "limit_test", "save_dtype",
                  "no_progress", "argv"}
    assert invocation.isdisjoint(defining)
    names = {f.name for f in __import__("dataclasses").fields(TrainConfig)}
    assert set(defining) | invocation == names
    # The preset's own size is the same run as no size at all (and resumes as one).
    assert TrainConfig(model=MODEL, out="x", img_size=28).img_size is None
    assert TrainConfig(model=MODEL, out="x", img_size=56).img_size == 56


@pytest.mark.parametrize("killed_file", ["last.safetensors", "state.pt"])
def test_kill_while_saving_keeps_the_previous_epoch(
    killed_file, reference, tmp_path, monkeypatch
):
    """A kill half-way through writing epoch 2's file leaves epoch 1's file readable."""
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
        save, states = torch.save, itertools.count(1)

        def dying_save(obj, f, *args, **kwargs):
            # state.pt holds a SHA-256 and the bytes of the state: this is its second write
            if isinstance(obj, dict) and "payload" in obj and next(states) == 2:
                Path(f).write_bytes(b"half a pickle")
                raise Killed
            return save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Killed):
        _train(argv)

    state = _state(out)  # loads: it is epoch 1's, whole
    assert (state["epoch"], state["step"], len(state["history"])) == (1, STEPS, 1)
    model, meta = load_checkpoint(out / "last.safetensors")  # checks the SHA-256 too
    if killed_file == "last.safetensors":
        assert meta["epoch"] == 1
        for name, t in model.state_dict().items():
            assert torch.equal(t, state["model"][name]), name
    else:
        assert meta["epoch"] == 2  # written before state.pt; resuming does not read it
    # The temporary file was removed (after a real SIGKILL a hidden .tmp would remain, and
    # the next start removes it: below).
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "last.safetensors", "metrics.json", "state.pt"
    ]

    monkeypatch.undo()
    (out / ".state.pt.k1ll3d.tmp").write_bytes(b"what a SIGKILL leaves")
    _train(argv)
    assert not list(out.glob(".*.tmp"))
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
        "error: the loss or the gradient became non-finite at step 1 (epoch 1, batch 2); "
        "stopping without saving this epoch. Try a lower --lr (now 1e+30)"
    )
    assert "accuracy" not in captured.out
    assert [p.name for p in out.iterdir()] == [".lock"]  # nothing saved


def _model_with_nan_logits_at(bad_step: int) -> torch.nn.Module:
    """The preset whose logits become NaN at training step `bad_step` (counting from 0)."""
    torch.manual_seed(0)
    model = create_model(MODEL, drop_path_rate=0.1)
    steps = itertools.count()

    def hook(module, inputs, output):
        if module.training and next(steps) == bad_step:
            return output * float("nan")  # still part of the graph

    model.register_forward_hook(hook)
    return model


def _model_with_nan_gradient_at(bad_step: int) -> torch.nn.Module:
    """The preset whose head gets a NaN gradient at step `bad_step`; every loss is finite."""
    torch.manual_seed(0)
    model = create_model(MODEL, drop_path_rate=0.1)
    steps = itertools.count()
    model.head.weight.register_hook(
        lambda grad: grad * float("nan") if next(steps) == bad_step else grad)
    return model


@pytest.mark.parametrize(
    "batch_size, bad_step, where",
    [
        (16, 5, "epoch 2, batch 2"),  # 4 steps an epoch; checked at the epoch's last batch
        (2, 40, "epoch 2, batch 9"),  # 32 steps an epoch; checked after its 25th batch
    ],
)
def test_nonfinite_loss_names_its_first_step_and_keeps_the_last_epoch(
    batch_size, bad_step, where, tmp_path
):
    # The loss is read every 25 steps only; NaN weights make every later loss NaN too,
    # so the message must name the first bad step, not the step that noticed it.
    out = tmp_path / "run"
    argv = _argv(out, "--batch-size", str(batch_size), epochs=2)
    with pytest.raises(FloatingPointError, match=re.escape(f"at step {bad_step} ({where})")):
        _train(argv, model=_model_with_nan_logits_at(bad_step))
    state = _state(out)
    assert state["epoch"] == 1  # epoch 2 was not saved
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert read_metadata(out / "last.safetensors")[1]["epoch"] == 1
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())] == [1]


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_nan_gradient_on_the_last_step_saves_nothing(clip, tmp_path):
    """A finite loss with a NaN gradient on the run's very last step: epoch 1 stays the last
    saved epoch and no model.safetensors is written (with clipping on and off)."""
    out = tmp_path / "run"
    argv = _argv(out, "--clip-grad", clip, epochs=2)
    last = 2 * STEPS - 1
    with pytest.raises(FloatingPointError, match=re.escape(f"at step {last} (epoch 2, batch 4)")):
        _train(argv, model=_model_with_nan_gradient_at(last))
    state = _state(out)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    model, meta = load_checkpoint(out / "last.safetensors")
    assert meta["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert not (out / "model.safetensors").exists()


def test_train_step_is_the_step_written_out():
    """One `train_step` equals forward, cross-entropy, backward, clipping and AdamW by hand."""
    x = torch.randn(8, 1, 28, 28)
    y = torch.arange(8) % 10
    models = [create_model(MODEL) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(param_groups(m, 0.05), lr=1.0) for m in models]
    loss, logits, norm = train_step(models[0], opts[0], x, y, lr=3e-3, clip_grad=0.5,
                                    label_smoothing=0.1)
    for group in opts[1].param_groups:
        group["lr"] = 3e-3
    by_hand = torch.nn.functional.cross_entropy(models[1](x), y, label_smoothing=0.1)
    by_hand.backward()
    norm_by_hand = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in models[1].parameters()]))
    torch.nn.utils.clip_grad_norm_(models[1].parameters(), 0.5)
    opts[1].step()
    torch.testing.assert_close(loss, by_hand.detach())
    torch.testing.assert_close(norm, norm_by_hand)
    assert logits.shape == (8, 10) and norm > 0.5  # the clipping did something
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, msg=name)


# ---------------------------------------------------------------------------------------
# Fine-tuning from a checkpoint at another resolution
# ---------------------------------------------------------------------------------------


def test_init_at_56_resamples_pos_embed_in_2d_and_records_the_parent(tmp_path):
    parent = create_model(MODEL)
    ckpt = save_checkpoint(parent, tmp_path / "parent.safetensors", preset=MODEL, accuracy=0.5)
    out = tmp_path / "fine_tuned"
    argv = _argv(out, "--init", str(ckpt), "--img-size", "56", epochs=1)
    run = train_module.setup(train_module.parse_args(argv), data=_data())
    start = {"pos_embed": run.model.pos_embed.weight.detach().clone()}  # what train() starts from
    run.close()  # release the folder
    result = _train(argv)

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
