"""Tests for `vit_tutorial.evaluate`: the command line, `evaluate` against `predict`, the
confusion matrix and `preprocess`, on a small model trained for a few steps."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vit_tutorial import FASHION_MNIST_CLASSES, create_model, load_checkpoint, load_fashion_mnist
from vit_tutorial.checkpoint import save_checkpoint
from vit_tutorial.data import normalize
from vit_tutorial.evaluate import confusion_matrix, evaluate, predict, preprocess

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here trains or evaluates on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, _one_thread) -> Path:
    """vit_nano after 20 steps: an untrained model answers one class for nearly every image,
    which would leave most of the confusion matrix at zero."""
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_28")
    images, labels = load_fashion_mnist("train")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i in range(20):
        batch = slice(32 * i, 32 * (i + 1))
        loss = F.cross_entropy(model(preprocess(images[batch])), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("checkpoint") / "nano.safetensors"
    return save_checkpoint(model, path, preset="vit_nano_patch4_28")


@pytest.fixture(scope="module")
def result(checkpoint) -> dict:
    model, _ = load_checkpoint(checkpoint)
    return evaluate(model)


def test_cli_prints_one_line_and_writes_the_confusion_matrix(checkpoint, result, tmp_path):
    confusion_path = tmp_path / "confusion.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vit_tutorial.evaluate", str(checkpoint),
         "--confusion", str(confusion_path)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    match = re.fullmatch(r"accuracy: (0\.\d{4}) \((\d+)/10000\)", lines[0])
    assert match, lines[0]
    correct = int(match[2])
    assert match[1] == f"{correct / 10_000:.4f}"
    assert correct == result["correct"]  # the same model gives the same count in-process

    saved = json.loads(confusion_path.read_text())
    assert saved["classes"] == list(FASHION_MNIST_CLASSES)
    matrix = torch.tensor(saved["matrix"])
    assert matrix.shape == (10, 10)
    assert int(matrix.sum()) == 10_000
    assert int(matrix.trace()) == correct
    assert saved["matrix"] == result["confusion"]


def test_evaluate_agrees_with_predict(checkpoint, result):
    model, _ = load_checkpoint(checkpoint)
    images, labels = load_fashion_mnist("test")
    logits = predict(model, images)
    assert logits.shape == (10_000, 10) and logits.dtype == torch.float32
    pred = logits.argmax(1)
    assert len(pred.unique()) >= 4  # the trained model spreads its answers
    assert torch.equal(result["predictions"], pred)
    assert result["correct"] == int((pred == labels).sum())
    assert result["total"] == 10_000
    assert result["accuracy"] == result["correct"] / 10_000
    matrix = torch.tensor(result["confusion"])
    # Rows are the true classes (1,000 test images each), columns the predictions.
    assert torch.equal(matrix.sum(1), torch.bincount(labels, minlength=10))
    assert torch.equal(matrix.sum(0), torch.bincount(pred, minlength=10))
    assert int(matrix.trace()) == result["correct"]


def test_predictions_do_not_depend_on_the_batch_size(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    images = load_fashion_mnist("test")[0][:300]
    one_batch = predict(model, images, batch_size=300)
    for batch_size in (1, 7, 50):  # 7 leaves a last batch of 6
        torch.testing.assert_close(predict(model, images, batch_size=batch_size), one_batch)


def test_predict_on_the_cpu_defaults_to_batches_of_50(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    predict(model, load_fashion_mnist("test")[0][:120])
    assert seen == [50, 50, 20]


def test_predict_under_bf16_autocast_is_close_to_float32(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    images = load_fashion_mnist("test")[0][:500]
    exact = predict(model, images)
    fast = predict(model, images, amp=True)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert not torch.equal(fast, exact)  # autocast really ran in bfloat16
    torch.testing.assert_close(fast, exact, atol=0.1, rtol=0.05)
    assert (fast.argmax(1) == exact.argmax(1)).float().mean() > 0.97


def test_predict_reads_any_model_given_its_input_size(checkpoint):
    model, _ = load_checkpoint(checkpoint)
    images = load_fashion_mnist("test")[0][:60]

    class Wrapped(torch.nn.Module):  # no .config, as a learner's own model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(ValueError, match=r"Wrapped has no .config to read the input size "
                                         r"from; pass img_size="):
        predict(Wrapped(model), images)
    torch.testing.assert_close(predict(Wrapped(model), images, img_size=28),
                               predict(model, images))


def test_confusion_matrix_rows_are_true_classes():
    target = torch.tensor([0, 0, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 0, 2])
    expected = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert torch.equal(confusion_matrix(pred, target, num_classes=3), expected)


def test_preprocess_reads_uint8_and_float_alike_and_resizes():
    images, _ = load_fashion_mnist("test")
    batch = images[:8]  # (8, 28, 28) uint8
    x = preprocess(batch)
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x, normalize(batch))
    torch.testing.assert_close(preprocess(batch.unsqueeze(1).float() / 255.0), x)
    big = preprocess(batch, (56, 56))
    assert big.shape == (8, 1, 56, 56)
    # Bilinear upsampling by 2 keeps the mean of each image (up to the border).
    torch.testing.assert_close(big.mean((2, 3)), x.mean((2, 3)), atol=2e-2, rtol=0)


def test_predict_refuses_an_empty_batch_and_a_zero_batch_size():
    model = create_model("vit_nano_patch4_28")
    with pytest.raises(ValueError, match=r"expected at least one image, got a batch of shape "
                                         r"\(0, 28, 28\)"):
        predict(model, torch.zeros(0, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="batch_size must be a positive int or None, got 0"):
        predict(model, torch.zeros(2, 28, 28, dtype=torch.uint8), batch_size=0)


@pytest.mark.parametrize("num_classes", [5, 100, 0])
def test_evaluate_refuses_a_model_of_other_classes_before_the_pass(num_classes, tmp_path):
    model = create_model("vit_nano_patch4_28", num_classes=num_classes)
    with pytest.raises(ValueError, match=rf"expected a Fashion-MNIST model \(in_chans=1, "
                                         rf"num_classes=10\), got in_chans=1, "
                                         rf"num_classes={num_classes}"):
        evaluate(model)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    proc = subprocess.run([sys.executable, "-m", "vit_tutorial.evaluate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("python -m vit_tutorial.evaluate: error: "
                                                   "expected a Fashion-MNIST model")


@pytest.mark.parametrize("what", ["folder", "missing", "batch"])
def test_evaluate_cli_refusals_are_one_line(what, tmp_path):
    argv = {"folder": [str(tmp_path)], "missing": [str(tmp_path / "none.safetensors")],
            "batch": [str(tmp_path / "none.safetensors"), "--batch-size", "0"]}[what]
    proc = subprocess.run([sys.executable, "-m", "vit_tutorial.evaluate", *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    expected = {"folder": "is a folder; expected a .safetensors checkpoint file",
                "missing": "no checkpoint at", "batch": "--batch-size must be a positive"}[what]
    assert expected in proc.stderr.splitlines()[-1]
