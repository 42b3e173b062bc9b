import math
import re

import pytest
import torch

import vit_tutorial as vt
from vit_tutorial import (
    POS_EMBED_TYPES,
    ClassToken,
    LearnedPosEmbed,
    LearnedPosEmbed2D,
    MultiHeadAttention,
    RelativePosEmbed,
    RelativePositionLogits,
    SinCosPosEmbed1D,
    SinCosPosEmbed2D,
    build_pos_embed,
    count_parameters,
    create_model,
    resample_pos_embed,
    sincos_1d_table,
    sincos_2d_table,
)
from vit_tutorial.embeddings import relative_offset_index


@pytest.mark.parametrize("kind", POS_EMBED_TYPES)
def test_every_pos_embed_keeps_shape(kind):
    pe = build_pos_embed(kind, grid_size=[3, 4], dim=8, num_prefix_tokens=1)
    assert pe.grid_size == (3, 4) and pe.num_prefix_tokens == 1  # a list comes back a tuple
    x = torch.randn(2, 13, 8)
    assert pe(x).shape == x.shape
    table = pe.table()
    assert (table is None) == (kind in ("none", "relative"))  # relative: in the attention
    if table is not None:
        assert table.shape == (1, 13, 8)
        torch.testing.assert_close(pe(x), x + table)  # eq. 1: the table is added
    else:
        assert torch.equal(pe(x), x)


def test_class_token_is_a_tiny_learned_vector_prepended_to_every_sequence():
    token = ClassToken(8)
    assert [p is token.weight for p in token.parameters()] == [True]
    assert count_parameters(token) == 8
    assert 0 < token.weight.abs().max() < 1e-4  # drawn with std 1e-6, as timm does
    x = torch.randn(3, 5, 8)
    out = token(x)
    assert out.shape == (3, 6, 8)
    torch.testing.assert_close(out[:, 0], token.weight[0].expand(3, 8))
    torch.testing.assert_close(out[:, 1:], x)


def test_unknown_pos_embed():
    with pytest.raises(ValueError, match="unknown pos_embed 'rope'; expected one of"):
        build_pos_embed("rope", grid_size=(2, 2), dim=8)


def test_learned_2d_is_row_and_column_halves():
    pe = build_pos_embed("learn2d", grid_size=(3, 4), dim=8)
    table = pe.table()[0, 1:].reshape(3, 4, 8)
    torch.testing.assert_close(table[2, 1, :4], pe.row[2])
    torch.testing.assert_close(table[2, 1, 4:], pe.col[1])
    assert count_parameters(pe) == 3 * 4 + 4 * 4 + 8  # rows, columns, class token
    torch.testing.assert_close(pe.table()[0, 0], pe.prefix[0, 0])  # the class token's own
    for i in range(3):
        for j in range(4):  # E_pos[i, j] = [row_i; col_j], raster order
            torch.testing.assert_close(pe.table()[0, 1 + 4 * i + j],
                                       torch.cat([pe.row[i], pe.col[j]]))


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


def test_sincos_1d_table_by_hand():
    # Vaswani et al. section 3.5: PE(p, 2i) = sin(p / T^(2i/D)), PE(p, 2i+1) = cos(the same).
    L, D, T = 9, 12, 100.0
    table = sincos_1d_table(L, D, temperature=T)
    expected = [[(math.sin if c % 2 == 0 else math.cos)(p / T ** (2 * (c // 2) / D))
                 for c in range(D)] for p in range(L)]
    assert table.dtype == torch.float32
    torch.testing.assert_close(table, torch.tensor(expected), atol=1e-6, rtol=0)


def test_sincos_2d_table_by_hand():
    # Row r, column c of a 3x5 grid, D/4 = 3 frequencies w_k = T^(-k/3):
    # [sin(r w), cos(r w), sin(c w), cos(c w)], raster order.
    (rows, cols), D, T = (3, 5), 12, 50.0
    table = sincos_2d_table((rows, cols), D, temperature=T)
    w = [T ** (-k / (D // 4)) for k in range(D // 4)]
    expected = [[f(p * wk) for p, f in [(r, math.sin), (r, math.cos), (c, math.sin),
                                         (c, math.cos)] for wk in w]
                for r in range(rows) for c in range(cols)]
    assert table.dtype == torch.float32
    torch.testing.assert_close(table, torch.tensor(expected), atol=1e-6, rtol=0)


def test_sincos_2d_table_matches_timm(timm):
    # timm's layout with interleave_sin_cos=True is ours: [sin h, cos h, sin w, cos w].
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    for grid, dim in [((3, 5), 16), ((7, 7), 64), ((4, 2), 8)]:
        ref = build_sincos2d_pos_embed(list(grid), dim, interleave_sin_cos=True)
        torch.testing.assert_close(sincos_2d_table(grid, dim), ref, atol=1e-5, rtol=1e-5)


def test_fixed_position_modules_hold_the_tables():
    sin2d = SinCosPosEmbed2D(grid_size=(3, 5), dim=8, num_prefix_tokens=2)
    assert sin2d.weight.shape == (1, 17, 8) and "weight" not in sin2d.state_dict()
    torch.testing.assert_close(sin2d.weight[0, :2], torch.zeros(2, 8))  # no grid position
    torch.testing.assert_close(sin2d.weight[0, 2:], sincos_2d_table((3, 5), 8))
    sin1d = SinCosPosEmbed1D(grid_size=(3, 5), dim=8, num_prefix_tokens=1)
    # one sequence of 1 + 15 positions: the class token is position 0, as in T2T-ViT
    torch.testing.assert_close(sin1d.weight[0], sincos_1d_table(16, 8))
    assert count_parameters(sin2d) == count_parameters(sin1d) == 0


@pytest.mark.parametrize(
    "old,new,prefix,mode",
    [((7, 7), (14, 14), 1, "bicubic"), ((7, 7), (10, 13), 1, "bilinear"),
     ((4, 6), (8, 3), 0, "bicubic"), ((14, 14), (7, 7), 1, "bicubic")],
)
def test_resample_matches_timm(timm, old, new, prefix, mode):
    pos = torch.randn(1, prefix + old[0] * old[1], 32)
    ours = resample_pos_embed(pos, new, old_size=old, num_prefix_tokens=prefix, interpolation=mode)
    ref = timm.layers.resample_abs_pos_embed(
        pos, list(new), old_size=list(old), num_prefix_tokens=prefix, interpolation=mode
    )
    torch.testing.assert_close(ours, ref)
    assert ours.shape == (1, prefix + new[0] * new[1], 32)
    torch.testing.assert_close(ours[:, :prefix], pos[:, :prefix])  # class token untouched


def test_resample_identity_dtype_and_errors():
    pos = torch.randn(1, 50, 16)
    assert resample_pos_embed(pos, 7) is pos
    assert resample_pos_embed(pos, [7, 7]) is pos  # lists from JSON configs too
    assert resample_pos_embed(pos, (7, 7), old_size=[7, 7]) is pos
    half = pos.to(torch.bfloat16)
    assert resample_pos_embed(half, 14).dtype == torch.bfloat16
    # interpolated in float32, then rounded once: not computed in bfloat16
    assert torch.equal(resample_pos_embed(half, 14),
                       resample_pos_embed(half.float(), 14).to(torch.bfloat16))
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

    assert POS_EMBED_TYPES == ("learn", "learn2d", "relative", "sincos2d", "sincos1d", "none")
    for kind in POS_EMBED_TYPES:
        if kind == "relative":  # refuses another grid: test_relative_embeddings_refuse_...
            continue
        cls = pos_embed_class(kind)
        module = cls(grid_size=(2, 3), dim=8, num_prefix_tokens=1)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        out = cls.resample_state(state, old_grid=(2, 3), new_grid=(4, 6), num_prefix_tokens=1)
        bigger = cls(grid_size=(4, 6), dim=8, num_prefix_tokens=1)
        assert {k: v.shape for k, v in out.items()} == {
            k: v.shape for k, v in bigger.state_dict().items()}, kind
    with pytest.raises(ValueError, match="unknown pos_embed 'rel'"):
        pos_embed_class("rel")


def test_learned_tables_start_small():
    # std 0.02, as timm's trunc_normal_(std=.02): large enough to tell positions apart,
    # small next to the patch embeddings
    tables = [LearnedPosEmbed(grid_size=(14, 14), dim=64).weight]
    pe2d = LearnedPosEmbed2D(grid_size=(32, 32), dim=64, num_prefix_tokens=16)
    tables += [pe2d.row, pe2d.col, pe2d.prefix]
    for t in tables:
        assert abs(t.std().item() / 0.02 - 1) < 0.1, t.shape


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


def linear_resize(t: torch.Tensor, size: int) -> torch.Tensor:
    """Linear interpolation of the rows of t (n, C) to `size` rows, written out as PyTorch
    does it with align_corners=False: row i samples position (i + 0.5) * n / size - 0.5."""
    n = t.shape[0]
    rows = []
    for i in range(size):
        src = max((i + 0.5) * n / size - 0.5, 0.0)
        lo = min(int(src), n - 1)
        hi, frac = min(lo + 1, n - 1), src - lo
        rows.append((1 - frac) * t[lo] + frac * t[hi])
    return torch.stack(rows)


def test_linear_resize_helper_by_hand():
    t = torch.tensor([[0.0], [4.0]])
    torch.testing.assert_close(linear_resize(t, 4), torch.tensor([[0.0], [1.0], [3.0], [4.0]]))


def test_resample_bilinear_upsampling_by_hand():
    # Upsampling a (2, 3) grid to (4, 5): bilinear is linear along the rows, then the columns.
    # A non-square grid with different factors per axis shows a mix-up of rows and columns.
    D = 3
    pos = torch.randn(1, 1 + 2 * 3, D)
    out = resample_pos_embed(pos, (4, 5), old_size=(2, 3), interpolation="bilinear")
    grid = pos[0, 1:].reshape(2, 3, D)
    by_rows = torch.stack([linear_resize(grid[:, c], 4) for c in range(3)], dim=1)  # (4, 3, D)
    expected = torch.stack([linear_resize(by_rows[r], 5) for r in range(4)])  # (4, 5, D)
    torch.testing.assert_close(out[0, 1:], expected.reshape(20, D))
    torch.testing.assert_close(out[0, 0], pos[0, 0])  # the class token is not interpolated


def test_resample_nearest_repeats_each_position():
    pos = torch.randn(1, 2 + 2 * 3, 4)
    out = resample_pos_embed(pos, (4, 6), old_size=(2, 3), num_prefix_tokens=2,
                             interpolation="nearest")
    grid = pos[0, 2:].reshape(2, 3, 4)
    expected = grid.repeat_interleave(2, dim=0).repeat_interleave(2, dim=1)  # (4, 6, 4)
    torch.testing.assert_close(out[0, 2:], expected.reshape(24, 4))
    torch.testing.assert_close(out[0, :2], pos[0, :2])


def test_learned_1d_state_resamples_in_2d():
    module = LearnedPosEmbed(grid_size=(2, 3), dim=4, num_prefix_tokens=1)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    out = LearnedPosEmbed.resample_state(state, old_grid=(2, 3), new_grid=(4, 5),
                                         num_prefix_tokens=1)
    torch.testing.assert_close(out["weight"], resample_pos_embed(
        state["weight"], (4, 5), old_size=(2, 3), num_prefix_tokens=1))
    assert out["weight"].shape == (1, 21, 4)


def test_learned_2d_resample_changes_both_axes_with_its_own_size():
    # rows 2 -> 5 and columns 4 -> 3, each table linearly on its own axis
    module = LearnedPosEmbed2D(grid_size=(2, 4), dim=6, num_prefix_tokens=1)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    out = LearnedPosEmbed2D.resample_state(state, old_grid=(2, 4), new_grid=(5, 3),
                                           num_prefix_tokens=1)
    torch.testing.assert_close(out["row"], linear_resize(state["row"], 5))
    torch.testing.assert_close(out["col"], linear_resize(state["col"], 3))
    assert torch.equal(out["prefix"], state["prefix"])
    bigger = LearnedPosEmbed2D(grid_size=(5, 3), dim=6, num_prefix_tokens=1)
    bigger.load_state_dict(out)
    torch.testing.assert_close(bigger.table()[0, 1 + 3 * 4 + 2],
                               torch.cat([out["row"][4], out["col"][2]]))
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}
    resampled = LearnedPosEmbed2D.resample_state(half, old_grid=(2, 4), new_grid=(5, 3),
                                                 num_prefix_tokens=1)
    assert {v.dtype for v in resampled.values()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------
# Relative position embeddings (appendix D.4)
# ---------------------------------------------------------------------------------------


def test_relative_offset_index_by_hand():
    # 3 patches behind 1 class token: offsets p_i - p_j + 2 for patches, row 5 for the class token
    expected = torch.tensor([[5, 5, 5, 5],
                             [5, 2, 1, 0],
                             [5, 3, 2, 1],
                             [5, 4, 3, 2]])
    assert torch.equal(relative_offset_index(3, 1), expected)
    assert torch.equal(relative_offset_index(3, 0), expected[1:, 1:])


def test_relative_logits_are_the_query_against_the_offsets_embedding():
    rel = RelativePositionLogits(num_patches=4, head_dim=3, num_prefix_tokens=1)
    q = torch.randn(2, 2, 5, 3)  # (B, H, L, d), L = 1 + 4
    bias = rel(q, 0.5)
    assert bias.shape == (2, 2, 5, 5) and rel.weight.shape == (2 * 4, 3)
    for i in range(5):
        for j in range(5):
            row = 7 if i == 0 or j == 0 else (i - 1) - (j - 1) + 3  # offset p_i - p_j
            torch.testing.assert_close(bias[:, :, i, j], 0.5 * q[:, :, i] @ rel.weight[row])
    with pytest.raises(ValueError, match="built for 5 tokens, got 4"):
        rel(q[:, :, :4], 0.5)


def test_relative_attention_logits_equal_a_written_out_version():
    mha = MultiHeadAttention(12, num_heads=2, logit_bias=RelativePositionLogits(
        num_patches=6, head_dim=6, num_prefix_tokens=0)).eval()
    x = torch.randn(2, 6, 12)
    q, k, v = mha.qkv(x).reshape(2, 6, 3, 2, 6).permute(2, 0, 3, 1, 4)  # each (B, H, N, d)
    r = mha.logit_bias.weight  # (2 * 6, d): one key per offset
    logits = torch.empty(2, 2, 6, 6)
    for i in range(6):
        for j in range(6):  # content + position: q_i . k_j + q_i . r_{i - j}, both scaled
            logits[:, :, i, j] = (q[:, :, i] * (k[:, :, j] + r[i - j + 5])).sum(-1) / math.sqrt(6)
    weights = logits.softmax(dim=-1)
    expected = mha.proj((weights @ v).transpose(1, 2).reshape(2, 6, 12))
    out, w = mha(x, return_attention=True)
    torch.testing.assert_close(w, weights)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mha(x), expected, atol=1e-5, rtol=1e-5)  # the fused path


def test_relative_model_has_a_table_per_block_and_no_absolute_one():
    base = vt.create_model("vit_mini_patch4_28")
    rel = vt.create_model("vit_mini_patch4_28", pos_embed="relative")
    D, L, N, H = 192, 9, 49, 3
    # no (1 + N) x D table; each block: 2N rows (2N - 1 offsets + the class token's) of D/H
    extra = L * 2 * N * (D // H) - (1 + N) * D
    assert vt.count_parameters(rel) == vt.count_parameters(base) + extra == 4_065_994
    assert rel.pos_embed.table() is None
    assert all(f"blocks.{i}.attn.logit_bias.weight" in rel.no_weight_decay() for i in range(L))
    assert base.blocks[0].attn.logit_bias is None


def test_relative_positions_break_the_permutation_symmetry():
    # Without positions, attention is permutation-equivariant; relative offsets are not.
    x = torch.randn(1, 49, 64)
    perm = torch.randperm(49)
    for kind, equivariant in [("none", True), ("relative", False)]:
        model = vt.create_model("vit_nano_patch4_28", pos_embed=kind, class_token=False,
                                pool="gap").eval()
        with torch.no_grad():
            same = torch.allclose(model.blocks(x)[:, perm], model.blocks(x[:, perm]), atol=1e-5)
        assert same == equivariant, kind


def test_relative_embeddings_refuse_another_grid():
    with pytest.raises(ValueError, match=r"7x7 grid, which has no 2-D resampling to 14x14"):
        RelativePosEmbed.resample_state({}, old_grid=(7, 7), new_grid=(14, 14),
                                        num_prefix_tokens=1)
    assert RelativePosEmbed.resample_state({}, old_grid=(7, 7), new_grid=(7, 7),
                                           num_prefix_tokens=1) == {}
