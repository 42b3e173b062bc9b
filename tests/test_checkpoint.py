import json
import os
from pathlib import Path

import pytest
import torch

import vit_tutorial.checkpoint as ck
from vit_tutorial import create_model, get_config
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


# ---------------------------------------------------------------------------------------
# What loading refuses (format 2: the SHA-256 covers the header too)
# ---------------------------------------------------------------------------------------


def _write_raw(path, tensors, *, config, metadata="{}", fmt=ck.FORMAT, digest=None):
    """A checkpoint file written by hand, with a correct digest unless one is given."""
    from safetensors.torch import save_file

    if digest is None:
        digest = (ck._digest(tensors, config=config, metadata=metadata) if fmt == ck.FORMAT
                  else ck._digest(tensors))
    header = {"format": fmt, "config": config, "metadata": metadata, "sha256": digest}
    save_file(tensors, str(path), metadata=header)
    return path


def _header_span(raw: bytes) -> tuple[int, int]:
    n = int.from_bytes(raw[:8], "little")
    return 8, 8 + n


def test_a_flipped_bit_in_the_metadata_is_reported(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.safetensors", accuracy=0.9457)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"0.9457", *_header_span(raw)) + 3  # 0.9457 -> 0.9557: one bit
    assert raw[at : at + 1] == b"4"
    raw[at] ^= 0x01
    (tmp_path / "flip.safetensors").write_bytes(bytes(raw))
    for read in (load_checkpoint, read_metadata):
        with pytest.raises(ValueError, match=r"flip.safetensors is corrupt: its weights or "
                                             r"header do not match the SHA-256"):
            read(tmp_path / "flip.safetensors")


def test_a_flipped_bit_in_the_config_is_reported(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    raw = bytearray(path.read_bytes())
    at = raw.index(b'\\"depth\\": 4', *_header_span(raw)) + len(b'\\"depth\\": ')
    raw[at] ^= 0x01  # depth 4 -> 5
    (tmp_path / "flip.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is corrupt"):
        load_checkpoint(tmp_path / "flip.safetensors")


def test_wrong_dtypes_and_non_finite_values_are_refused(model, tmp_path):
    config = json.dumps(model.config.to_dict())
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    as_int = {**tensors, "head.bias": tensors["head.bias"].to(torch.int32)}
    with pytest.raises(ValueError, match=r"expected float32, float16 or bfloat16 tensors, "
                                         r"got \{'head.bias': 'torch.int32'\}"):
        load_checkpoint(_write_raw(tmp_path / "int.safetensors", as_int, config=config))
    nan = {**tensors, "norm.weight": torch.full_like(tensors["norm.weight"], float("nan"))}
    with pytest.raises(ValueError, match=r"holds non-finite values \(NaN or inf\) in "
                                         r"\['norm.weight'\]"):
        load_checkpoint(_write_raw(tmp_path / "nan.safetensors", nan, config=config))
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_checkpoint(model, tmp_path / "x.safetensors", dtype=torch.int8)


def test_a_small_file_claiming_a_huge_model_fails_before_building_it(tmp_path, monkeypatch):
    huge = json.dumps(get_config("vit_huge_patch14_224").to_dict())  # 632M parameters
    path = _write_raw(tmp_path / "tiny.safetensors", {"head.bias": torch.zeros(1)},
                      config=huge)
    assert path.stat().st_size < 1000
    built = []
    init = ck.VisionTransformer.__init__

    def counting_init(self, *args, **kwargs):
        built.append(torch.empty(0).device.type)  # the device new tensors land on
        init(self, *args, **kwargs)

    monkeypatch.setattr(ck.VisionTransformer, "__init__", counting_init)
    with pytest.raises(ValueError, match=r"tiny.safetensors: state dict does not match the "
                                         r"model: missing keys \['blocks.0.attn.proj.bias', "
                                         r".*, \.\.\. 383 more\] \(391\)"):
        load_checkpoint(path)
    assert built == ["meta"]  # only the shape check ran; no real model was allocated


def test_header_problems_get_messages(model, tmp_path):
    config = json.dumps(model.config.to_dict())
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "nokeys.safetensors"), metadata={"format": ck.FORMAT})
    with pytest.raises(ValueError, match=r"its header lacks \['config', 'metadata', 'sha256'\]"):
        load_checkpoint(tmp_path / "nokeys.safetensors")
    bad = config.replace('"depth": 4', '"depth": -4')
    with pytest.raises(ValueError, match=r"the config in its header is invalid: depth must be "
                                         r"an int >= 0, got -4"):
        load_checkpoint(_write_raw(tmp_path / "neg.safetensors", tensors, config=bad))
    typo = config.replace('"depth"', '"depht"')
    with pytest.raises(ValueError, match=r"unknown ViTConfig fields \['depht'\]"):
        load_checkpoint(_write_raw(tmp_path / "typo.safetensors", tensors, config=typo))
    with pytest.raises(IsADirectoryError, match=r"is a folder; expected a .safetensors "
                                                r"checkpoint file"):
        load_checkpoint(tmp_path)


def test_format_1_files_still_load_and_upgrade_bit_for_bit(model, tmp_path):
    config = json.dumps(model.config.to_dict())
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = _write_raw(tmp_path / "v1.safetensors", tensors, config=config,
                      metadata='{"accuracy": 0.5}', fmt="vit_tutorial/1")
    loaded, meta = load_checkpoint(path)
    assert meta == {"accuracy": 0.5}
    ck.upgrade_checkpoint(path)
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert json.loads(path.read_bytes()[8 : 8 + n])["__metadata__"]["format"] == ck.FORMAT
    again, meta2 = load_checkpoint(path)
    assert meta2 == meta
    for (k, a), b in zip(loaded.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_files_get_the_umask_permissions(model, tmp_path):
    old = os.umask(0o027)
    try:
        path = save_checkpoint(model, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


def test_remove_stale_temporaries_clears_what_a_kill_left(tmp_path):
    (tmp_path / ".state.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "state.pt").write_bytes(b"whole")
    removed = ck.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".state.pt.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
