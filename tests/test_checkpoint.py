import json
import os
from pathlib import Path

import pytest
import torch

from vit_tutorial import create_model
from vit_tutorial.checkpoint import atomic_write, load_checkpoint, read_metadata, save_checkpoint


@pytest.fixture
def model():
    return create_model("vit_nano_patch4_28").eval()


def test_round_trip_keeps_weights_config_and_metadata(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.safetensors", accuracy=0.9, command="make it")
    loaded, meta = load_checkpoint(path)
    assert meta == {"accuracy": 0.9, "command": "make it"}
    assert loaded.config == model.config
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded.eval()(x), model(x))
    cfg, meta2 = read_metadata(path)
    assert cfg == model.config and meta2 == meta
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_half_precision_storage(model, tmp_path):
    full = save_checkpoint(model, tmp_path / "f.safetensors")
    half = save_checkpoint(model, tmp_path / "h.safetensors", dtype=torch.bfloat16)
    assert os.path.getsize(half) < 0.6 * os.path.getsize(full)
    loaded, _ = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    w = model.head.weight
    torch.testing.assert_close(loaded.head.weight, w.to(torch.bfloat16).float())


def test_fine_tune_size_resamples_pos_embed(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    big, _ = load_checkpoint(path, img_size=56)
    assert big.pos_embed.weight.shape == (1, 1 + 14 * 14, 64)
    torch.testing.assert_close(big.pos_embed.weight[:, 0], model.pos_embed.weight[:, 0])
    assert big(torch.randn(1, 1, 56, 56)).shape == (1, 10)
    m2d = create_model("vit_nano_patch4_28", pos_embed="learn2d")
    big2d, _ = load_checkpoint(save_checkpoint(m2d, tmp_path / "2d.safetensors"), img_size=56)
    assert big2d.pos_embed.row.shape == (14, 32)


def test_shape_mismatch_names_the_keys(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"m.safetensors: .*mis-shaped keys \[head.bias: expected "
                                         r"\(5,\), got \(10,\); head.weight"):
        load_checkpoint(path, num_classes=5)


def test_truncated_and_corrupt_files(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.safetensors is not a readable safetensors"):
        load_checkpoint(tmp_path / "cut.safetensors")
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF  # a byte inside the weights
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"flip.safetensors is corrupt"):
        load_checkpoint(tmp_path / "flip.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a vit_tutorial checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_failed_write_keeps_old_file(model, tmp_path, monkeypatch):
    path = save_checkpoint(model, tmp_path / "m.safetensors", version=1)
    import vit_tutorial.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path, version=2)
    assert read_metadata(path)[1] == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "log.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text("old"))
    assert path.read_text() == "old"

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["log.json"]  # no temporary file left
    atomic_write(path, lambda tmp: Path(tmp).write_text("new"))
    assert path.read_text() == "new"


def test_metadata_is_plain_json(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.safetensors", note="ok")
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + n])
    assert json.loads(header["__metadata__"]["config"])["embed_dim"] == 64
