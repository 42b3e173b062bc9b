import re

import pytest
import torch

from vit_tutorial import (
    POS_EMBED_TYPES,
    LearnedPosEmbed2D,
    build_pos_embed,
    create_model,
    resample_pos_embed,
    sincos_1d_table,
    sincos_2d_table,
)

timm_pos = pytest.importorskip("timm.layers.pos_embed")


@pytest.mark.parametrize("kind", POS_EMBED_TYPES)
def test_every_pos_embed_keeps_shape(kind):
    pe = build_pos_embed(kind, grid_size=(3, 4), dim=8, num_prefix_tokens=1)
    x = torch.randn(2, 13, 8)
    assert pe(x).shape == x.shape
    table = pe.table()
    assert (table is None) == (kind == "none")
    if table is not None:
        assert table.shape == (1, 13, 8)


def test_unknown_pos_embed():
    with pytest.raises(ValueError, match="unknown pos_embed 'rope'; expected one of"):
        build_pos_embed("rope", grid_size=(2, 2), dim=8)


def test_learned_2d_is_row_and_column_halves():
    pe = build_pos_embed("learn2d", grid_size=(3, 4), dim=8)
    table = pe.table()[0, 1:].reshape(3, 4, 8)
    torch.testing.assert_close(table[2, 1, :4], pe.row[2])
    torch.testing.assert_close(table[2, 1, 4:], pe.col[1])
    n_params = sum(p.numel() for p in pe.parameters())
    assert n_params == 3 * 4 + 4 * 4 + 8  # rows, columns, class token


def test_sincos_tables():
    t = sincos_1d_table(50, 16)
    torch.testing.assert_close(t[0], torch.tensor([0.0, 1.0] * 8))  # sin(0)=0, cos(0)=1
    torch.testing.assert_close(t[7, 2], torch.tensor(7 / 10000 ** (2 / 16)).sin())
    t2 = sincos_2d_table((3, 5), 16)
    assert t2.shape == (15, 16)
    # tokens in the same row share the row half; the same column shares the column half
    torch.testing.assert_close(t2[5, :8], t2[9, :8])
    torch.testing.assert_close(t2[1, 8:], t2[11, 8:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_table((2, 2), 6)


@pytest.mark.parametrize(
    "old,new,prefix,mode",
    [((7, 7), (14, 14), 1, "bicubic"), ((7, 7), (10, 13), 1, "bilinear"),
     ((4, 6), (8, 3), 0, "bicubic"), ((14, 14), (7, 7), 1, "bicubic")],
)
def test_resample_matches_timm(old, new, prefix, mode):
    pos = torch.randn(1, prefix + old[0] * old[1], 32)
    ours = resample_pos_embed(pos, new, old_size=old, num_prefix_tokens=prefix, interpolation=mode)
    ref = timm_pos.resample_abs_pos_embed(
        pos, list(new), old_size=list(old), num_prefix_tokens=prefix, interpolation=mode
    )
    torch.testing.assert_close(ours, ref)
    assert ours.shape == (1, prefix + new[0] * new[1], 32)
    torch.testing.assert_close(ours[:, :prefix], pos[:, :prefix])  # class token untouched


def test_resample_identity_dtype_and_errors():
    pos = torch.randn(1, 50, 16)
    assert resample_pos_embed(pos, 7) is pos
    half = pos.to(torch.bfloat16)
    assert resample_pos_embed(half, 14).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 13, 8), 4)
    with pytest.raises(ValueError, match="old_size 3x3 holds 9 positions"):
        resample_pos_embed(pos, 14, old_size=3)
    with pytest.raises(ValueError, match=r"\(1, L, D\)"):
        resample_pos_embed(torch.randn(50, 16), 14)


def test_without_position_embeddings_the_model_is_blind_to_patch_order():
    model = create_model("vit_nano_patch4_28", pos_embed="none").eval()
    x = torch.randn(2, 1, 28, 28)
    # shuffle the 7x7 grid of 4x4 patches
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 1, 49, 4, 4)
    perm = torch.randperm(49)
    shuffled = patches[:, :, perm].reshape(2, 1, 7, 7, 4, 4).permute(0, 1, 2, 4, 3, 5)
    shuffled = shuffled.reshape(2, 1, 28, 28)
    torch.testing.assert_close(model(shuffled), model(x), atol=1e-5, rtol=1e-5)
    with_pos = create_model("vit_nano_patch4_28").eval()
    assert not torch.allclose(with_pos(shuffled), with_pos(x), atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(new_size=0), "new_size must be a positive grid (rows, cols), got (0, 0)"),
        (dict(new_size=(3, 0)), "new_size must be a positive grid (rows, cols), got (3, 0)"),
        (dict(new_size=(14, 14), num_prefix_tokens=50),
         "num_prefix_tokens=50 leaves no grid rows in a table of 50 rows"),
    ],
)
def test_resample_pos_embed_refuses_empty_grids(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resample_pos_embed(torch.zeros(1, 50, 8), **kwargs)


def test_every_pos_embed_type_is_a_registered_class_that_resamples_itself():
    from vit_tutorial.embeddings import pos_embed_class

    assert POS_EMBED_TYPES == ("learn", "learn2d", "sincos2d", "sincos1d", "none")
    for kind in POS_EMBED_TYPES:
        cls = pos_embed_class(kind)
        module = cls(grid_size=(2, 3), dim=8, num_prefix_tokens=1)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        out = cls.resample_state(state, old_grid=(2, 3), new_grid=(4, 6), num_prefix_tokens=1)
        bigger = cls(grid_size=(4, 6), dim=8, num_prefix_tokens=1)
        assert {k: v.shape for k, v in out.items()} == {
            k: v.shape for k, v in bigger.state_dict().items()}, kind
    with pytest.raises(ValueError, match="unknown pos_embed 'rel'"):
        pos_embed_class("rel")


def test_learned_2d_rows_and_columns_resample_linearly_per_axis():
    module = LearnedPosEmbed2D(grid_size=(2, 3), dim=4, num_prefix_tokens=1)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    out = LearnedPosEmbed2D.resample_state(state, old_grid=(2, 3), new_grid=(4, 3),
                                           num_prefix_tokens=1)
    row = state["row"]  # (2, 2): with align_corners=False, 4 samples of 2 rows are
    expected = torch.stack([row[0], 0.75 * row[0] + 0.25 * row[1],
                            0.25 * row[0] + 0.75 * row[1], row[1]])
    torch.testing.assert_close(out["row"], expected)
    torch.testing.assert_close(out["col"], state["col"])  # 3 -> 3: unchanged
    torch.testing.assert_close(out["prefix"], state["prefix"])
