"""Tests for vit_tutorial/plots.py: each figure draws exactly the data it is given, labelled,
in the promised colours and size, and wrong shapes fail with a clear message."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # before pyplot: no window, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from vit_tutorial import plots  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_leaked_figures():
    """Every test closes its figures, and a call that raises leaves none open."""
    plt.close("all")
    yield
    leaked = plt.get_fignums()
    plt.close("all")
    assert leaked == [], f"figures left open: {leaked}"


def overlay(ax):
    """The (image layer, overlay layer) arrays of an attention panel."""
    assert len(ax.images) == 2
    return np.asarray(ax.images[0].get_array()), np.asarray(ax.images[1].get_array())


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def suptitle(fig) -> str:
    """The figure's title (Figure.get_suptitle exists only from matplotlib 3.8)."""
    return fig._suptitle.get_text() if fig._suptitle is not None else ""


def check_size(fig):
    assert fig.get_size_inches()[0] <= 10.0
    assert fig.dpi == matplotlib.rcParams["figure.dpi"]  # no dpi of our own


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def test_to_numpy_accepts_tensors_with_grad_and_low_precision():
    t = torch.rand(2, 3, requires_grad=True)
    a = plots.to_numpy(t)
    assert isinstance(a, np.ndarray) and a.dtype == np.float64
    np.testing.assert_allclose(a, t.detach().numpy(), rtol=1e-6)
    b = plots.to_numpy(torch.ones(4, dtype=torch.bfloat16))
    np.testing.assert_array_equal(b, np.ones(4))
    np.testing.assert_array_equal(plots.to_numpy([[1, 2]]), [[1.0, 2.0]])


def test_upsample_nearest_is_kron_when_sizes_divide():
    m = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(plots.upsample(m, (8, 12)), np.kron(m, np.ones((4, 4))))
    np.testing.assert_array_equal(plots.upsample(torch.tensor(m), 6), np.kron(m, np.ones((3, 2))))


def test_upsample_nearest_matches_torch_when_sizes_do_not_divide():
    m = torch.rand(3, 5, dtype=torch.float64)
    expected = F.interpolate(m[None, None], size=(7, 11), mode="nearest")[0, 0].numpy()
    np.testing.assert_array_equal(plots.upsample(m, (7, 11)), expected)


def test_upsample_bilinear_and_bad_input():
    m = torch.rand(2, 3, dtype=torch.float64)
    expected = F.interpolate(m[None, None], size=(8, 12), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(plots.upsample(m, (8, 12), mode="bilinear"), expected[0, 0])
    with pytest.raises(ValueError, match="'nearest' or 'bilinear'"):
        plots.upsample(m, 8, mode="cubic")
    with pytest.raises(ValueError, match=r"\(gh, gw\) map, got shape \(6,\)"):
        plots.upsample(np.zeros(6), 8)


def test_area_under_curve_is_the_trapezoid_rule_over_0_1():
    assert plots.area_under_curve([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert plots.area_under_curve([1.0, 0.0]) == pytest.approx(0.5)
    # y = x on 5 points: exactly 1/2; y = x^2 on 3 points: (0 + 2 * 0.25 + 1) / 4.
    assert plots.area_under_curve(np.linspace(0, 1, 5)) == pytest.approx(0.5)
    assert plots.area_under_curve([0.0, 0.25, 1.0]) == pytest.approx(0.375)


# ---------------------------------------------------------------------------------------
# show_image, show_attention
# ---------------------------------------------------------------------------------------


def test_show_image_grey_and_colour():
    grey = torch.rand(1, 6, 5)
    fig = plots.show_image(grey, title="a coat")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), grey[0].numpy(), rtol=1e-6)
    assert ax.get_title() == "a coat" and ax.images[0].get_clim() == (0.0, 1.0)
    plt.close(fig)
    rgb = torch.rand(3, 4, 4)
    fig = plots.show_image(rgb)
    np.testing.assert_allclose(
        fig.axes[0].images[0].get_array(), rgb.permute(1, 2, 0).numpy(), rtol=1e-6
    )
    plt.close(fig)


def test_show_attention_draws_the_image_and_the_upsampled_map():
    image = torch.rand(1, 28, 28)
    attention = torch.softmax(torch.randn(49), dim=0)  # a class token's row, 7x7 patches
    fig = plots.show_attention(image, attention, title="layer 6, head 2")
    assert isinstance(fig, matplotlib.figure.Figure)
    check_size(fig)
    ax = fig.axes[0]
    layer, over = overlay(ax)
    np.testing.assert_allclose(layer, image[0].numpy(), rtol=1e-6)
    expected = np.kron(attention.double().reshape(7, 7).numpy(), np.ones((4, 4)))
    np.testing.assert_allclose(over, expected)
    assert ax.images[1].get_cmap().name == "viridis"
    assert ax.images[0].get_cmap().name == "gray"
    assert ax.images[1].get_alpha() == 0.6
    # The map's own values set the colour limits: the colour bar reads attention weights.
    assert ax.images[1].get_clim() == pytest.approx(
        (attention.min().item(), attention.max().item())
    )
    assert ax.get_title() == "layer 6, head 2"
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "attention"  # the colour bar
    plt.close(fig)


@pytest.mark.parametrize("as_vector", [True, False])
def test_show_attention_non_square_grid(as_vector):
    image = torch.rand(8, 12)  # (H, W): a 2x3 grid of 4x4 patches
    grid = torch.arange(6.0).reshape(2, 3)
    fig = plots.show_attention(image, grid.flatten() if as_vector else grid, vmin=0, vmax=10)
    layer, over = overlay(fig.axes[0])
    assert layer.shape == (8, 12)
    np.testing.assert_array_equal(over, np.kron(grid.numpy(), np.ones((4, 4))))
    assert fig.axes[0].images[1].get_clim() == (0, 10)
    plt.close(fig)


def test_show_attention_grid_size_overrides_inference():
    # 12 values on a 12x12 image: no square grid fits, (3, 4) is given explicitly.
    attention = np.arange(12.0)
    fig = plots.show_attention(np.zeros((12, 12)), attention, grid_size=(3, 4), colorbar=False)
    _, over = overlay(fig.axes[0])
    np.testing.assert_array_equal(over, np.kron(attention.reshape(3, 4), np.ones((4, 3))))
    assert len(fig.axes) == 1
    plt.close(fig)


def test_show_attention_colour_image_is_shown_in_grey():
    rgb = torch.rand(3, 4, 4)
    fig = plots.show_attention(rgb, torch.rand(4))
    layer, _ = overlay(fig.axes[0])
    luma = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).numpy()
    np.testing.assert_allclose(layer, luma, rtol=1e-6)
    plt.close(fig)


def test_show_attention_clips_the_image_to_0_1():
    image = torch.tensor([[-0.5, 0.5], [1.5, 0.25]])
    fig = plots.show_attention(image, torch.rand(1))
    layer, _ = overlay(fig.axes[0])
    np.testing.assert_allclose(layer, [[0.0, 0.5], [1.0, 0.25]])
    plt.close(fig)


def test_show_attention_draws_into_a_given_axes():
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(8, 4))
    out = plots.show_attention(torch.rand(28, 28), torch.rand(7, 7), ax=a1, colorbar=False)
    assert out is fig and plt.get_fignums() == [fig.number]
    assert len(a0.images) == 0 and len(a1.images) == 2
    plt.close(fig)


def test_show_attention_bilinear():
    m = torch.rand(2, 2, dtype=torch.float64)
    fig = plots.show_attention(torch.rand(8, 8), m, interpolation="bilinear")
    _, over = overlay(fig.axes[0])
    expected = F.interpolate(m[None, None], size=(8, 8), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(over, expected[0, 0])
    plt.close(fig)


def test_show_attention_rejects_maps_that_do_not_fit():
    image = torch.rand(28, 28)
    with pytest.raises(ValueError, match=r"50 values, expected gh \* gw = 7 \* 7 = 49"):
        plots.show_attention(image, torch.rand(50), grid_size=7)
    with pytest.raises(ValueError, match=r"drop the class token"):
        plots.show_attention(image, torch.rand(50))  # N = 1 + 49 still holds the class token
    with pytest.raises(ValueError, match=r"shape \(6, 6\), expected grid_size \(7, 7\)"):
        plots.show_attention(image, torch.rand(6, 6), grid_size=(7, 7))
    with pytest.raises(ValueError, match=r"\(gh \* gw,\) or \(gh, gw\), got \(1, 7, 7\)"):
        plots.show_attention(image, torch.rand(1, 7, 7))
    with pytest.raises(
        ValueError, match=r"\(H, W\), \(1, H, W\) or \(3, H, W\), got \(2, 28, 28\)"
    ):
        plots.show_attention(torch.rand(2, 28, 28), torch.rand(49))


# ---------------------------------------------------------------------------------------
# attention_grid
# ---------------------------------------------------------------------------------------


def test_attention_grid_rows_are_images_columns_are_maps():
    B = 3
    images = torch.rand(B, 1, 8, 12)  # a non-square 2x3 grid of patches
    maps = {
        "rollout": torch.rand(B, 6),
        "layer 2": torch.rand(B, 2, 3),
        "relevance": torch.rand(B, 6),
    }
    fig = plots.attention_grid(images, maps, row_labels=["Coat", "Bag", "Sandal"])
    check_size(fig)
    axes = np.array(fig.axes).reshape(B, 4)
    assert [ax.get_title() for ax in axes[0]] == ["image", "rollout", "layer 2", "relevance"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["Coat", "Bag", "Sandal"]
    for r in range(B):
        np.testing.assert_allclose(axes[r, 0].images[0].get_array(), images[r, 0], rtol=1e-6)
        for c, m in enumerate(maps.values(), start=1):
            layer, over = overlay(axes[r, c])
            np.testing.assert_allclose(layer, images[r, 0], rtol=1e-6)
            expected = np.kron(m[r].double().reshape(2, 3).numpy(), np.ones((4, 4)))
            np.testing.assert_allclose(over, expected)
            assert axes[r, c].images[1].get_cmap().name == "viridis"
    plt.close(fig)


def test_attention_grid_list_of_maps_with_titles_and_no_image_column():
    images = torch.rand(2, 28, 28)
    maps = [torch.rand(2, 49), torch.rand(2, 49)]
    fig = plots.attention_grid(images, maps, titles=["a", "b"], show_images=False)
    assert len(fig.axes) == 4
    assert [fig.axes[0].get_title(), fig.axes[1].get_title()] == ["a", "b"]
    plt.close(fig)
    fig = plots.attention_grid(images, maps[0])  # one array: one map column
    assert len(fig.axes) == 4 and fig.axes[1].get_title() == "attention"
    assert suptitle(fig) == ""
    plt.close(fig)


def test_attention_grid_title_sits_above_the_column_titles():
    fig = plots.attention_grid(torch.rand(2, 28, 28), {"rollout": torch.rand(2, 49)},
                               title="ViT Fig. 6")
    assert suptitle(fig) == "ViT Fig. 6"
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title_box = fig._suptitle.get_window_extent(renderer)
    column_title = fig.axes[1].title.get_window_extent(renderer)
    assert title_box.y0 >= column_title.y1  # no overlap
    plt.close(fig)


def test_attention_grid_width_stays_on_screen():
    fig = plots.attention_grid(torch.rand(2, 28, 28), [torch.rand(2, 49)] * 9)
    check_size(fig)
    plt.close(fig)


def test_attention_grid_rejects_mismatches():
    images = torch.rand(2, 28, 28)
    with pytest.raises(ValueError, match="got 1 titles for 2 maps"):
        plots.attention_grid(images, [torch.rand(2, 49)] * 2, titles=["only one"])
    with pytest.raises(ValueError, match=r"shape \(3, 49\), expected .* B = 2 images"):
        plots.attention_grid(images, {"rollout": torch.rand(3, 49)})
    with pytest.raises(ValueError, match="got 3 row_labels for 2 images"):
        plots.attention_grid(images, torch.rand(2, 49), row_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(B, H, W\) or \(B, C, H, W\), got \(28, 28\)"):
        plots.attention_grid(images[0], torch.rand(2, 49))
    with pytest.raises(ValueError, match="50 values"):
        plots.attention_grid(images, torch.rand(2, 50), grid_size=7)


# ---------------------------------------------------------------------------------------
# Position-embedding similarity
# ---------------------------------------------------------------------------------------


def cosine_similarity_table(gh: int, gw: int) -> torch.Tensor:
    e = F.normalize(torch.randn(gh * gw, 16), dim=-1)  # (N, D), unit rows
    return (e @ e.T).reshape(gh, gw, gh, gw)


@pytest.mark.parametrize("grid", [(2, 3), (4, 4)])
def test_position_similarity_grid_draws_every_tile_on_one_scale(grid):
    gh, gw = grid
    sim = cosine_similarity_table(gh, gw)
    fig = plots.position_similarity_grid(sim)
    check_size(fig)
    assert len(fig.axes) == gh * gw + 1  # the tiles, then the one colour bar
    for i in range(gh):
        for j in range(gw):
            im = fig.axes[i * gw + j].images[0]
            np.testing.assert_allclose(im.get_array(), sim[i, j].double(), rtol=1e-6)
            assert im.get_cmap().name == "RdBu_r" and im.get_clim() == (-1.0, 1.0)
    assert fig._supxlabel.get_text() == "input patch column"  # get_supxlabel: mpl >= 3.8
    assert fig._supylabel.get_text() == "input patch row"
    assert suptitle(fig) == "Position embedding similarity"
    assert [fig.axes[i * gw].get_ylabel() for i in range(gh)] == [str(i) for i in range(gh)]
    assert [fig.axes[(gh - 1) * gw + j].get_xlabel() for j in range(gw)] == [
        str(j) for j in range(gw)
    ]
    assert fig.axes[-1].get_ylabel() == "cosine similarity"
    plt.close(fig)


def test_position_similarity_grid_fits_its_limits_to_the_data_when_asked():
    sim = 0.5 + 0.4 * cosine_similarity_table(2, 3)  # in [0.1, 0.9]
    fig = plots.position_similarity_grid(sim, limits=None)
    lo, hi = float(sim.min()), float(sim.max())
    assert all(ax.images[0].get_clim() == (lo, hi) for ax in fig.axes[:6])
    plt.close(fig)
    fig = plots.position_similarity_grid(sim, limits=(0.0, 1.0))
    assert fig.axes[0].images[0].get_clim() == (0.0, 1.0)
    plt.close(fig)
    with pytest.raises(ValueError, match=r"limits must be \(low, high\) with low < high, "
                                         r"got \(1.0, 0.0\)"):
        plots.position_similarity_grid(sim, limits=(1.0, 0.0))


def test_position_similarity_grid_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(gh, gw, gh, gw\), got \(6, 6\)"):
        plots.position_similarity_grid(torch.rand(6, 6))
    with pytest.raises(ValueError, match=r"got \(2, 3, 3, 2\)"):
        plots.position_similarity_grid(torch.rand(2, 3, 3, 2))


def test_similarity_map_marks_the_chosen_patch():
    sim = cosine_similarity_table(2, 3)
    fig = plots.similarity_map(sim, 1, 2)
    check_size(fig)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), sim[1, 2].double(), rtol=1e-6)
    assert ax.images[0].get_cmap().name == "RdBu_r" and ax.images[0].get_clim() == (-1, 1)
    (box,) = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert box.get_xy() == (1.5, 0.5) and box.get_width() == box.get_height() == 1
    assert ax.get_xlabel() == "input patch column" and ax.get_ylabel() == "input patch row"
    assert ax.get_title() == "similarity to patch (1, 2)"
    plt.close(fig)
    with pytest.raises(ValueError, match=r"patch \(2, 0\) is outside the 2x3 grid"):
        plots.similarity_map(sim, 2, 0)
    with pytest.raises(ValueError, match=r"\(gh, gw, gh, gw\)"):
        plots.similarity_map(sim[0, 0], 0, 0)


# ---------------------------------------------------------------------------------------
# Mean attention distance
# ---------------------------------------------------------------------------------------


def test_attention_distance_one_collection_per_model():
    models = {"ViT-Ti": torch.rand(3, 2) * 20, "ViT-S": np.random.rand(5, 4) * 20}
    fig = plots.attention_distance(models)
    check_size(fig)
    ax = fig.axes[0]
    collections = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(collections) == 2
    for coll, d in zip(collections, models.values(), strict=True):
        d = plots.to_numpy(d)
        L, H = d.shape
        offsets = np.asarray(coll.get_offsets())
        expected = [(layer + 1, d[layer, h]) for layer in range(L) for h in range(H)]
        np.testing.assert_allclose(offsets, expected)
    assert legend_texts(ax) == ["ViT-Ti", "ViT-S"]
    assert ax.get_xlabel() == "network depth (layer)"
    assert ax.get_ylabel() == "mean attention distance (pixels)"
    assert ax.get_title() == "Mean attention distance per head"
    plt.close(fig)


def test_attention_distance_single_array_labels_and_reference_lines():
    d = torch.rand(4, 3) * 8
    fig = plots.attention_distance(d, labels=["ours"], patch_size=4, image_size=8)
    ax = fig.axes[0]
    assert len(ax.collections) == 1
    # Uniform attention over a 2x2 grid of centres 4 px apart: of the 16 (query, key)
    # pairs, 4 are at 0, 8 at 4 and 4 at 4 * sqrt(2).
    uniform = (8 * 4 + 4 * 4 * math.sqrt(2)) / 16
    assert legend_texts(ax) == ["ours", "one patch (4 px)", f"uniform attention ({uniform:.1f} px)"]
    ys = sorted(line.get_ydata()[0] for line in ax.lines)
    assert ys == pytest.approx([uniform, 4.0])
    plt.close(fig)
    # A non-square stride (ph, pw) = (2, 4) on 4x8 pixels is the same 2x2 grid, squashed.
    fig = plots.attention_distance(d, patch_size=(2, 4), image_size=(4, 8))
    squashed = (4 * 2 + 4 * 4 + 4 * math.sqrt(20)) / 16
    assert legend_texts(fig.axes[0])[1:] == [
        "one patch (2 px)",
        f"uniform attention ({squashed:.1f} px)",
    ]
    plt.close(fig)
    fig = plots.attention_distance([d, d[:2]], labels=["a", "b"])
    assert [len(c.get_offsets()) for c in fig.axes[0].collections] == [12, 6]
    plt.close(fig)


def test_attention_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="got 1 labels for 2 models"):
        plots.attention_distance([torch.rand(2, 2)] * 2, labels=["a"])
    with pytest.raises(ValueError, match=r"expected shape \(L, H\), got \(2, 2, 2\)"):
        plots.attention_distance(torch.rand(2, 2, 2))
    with pytest.raises(ValueError, match="image_size needs patch_size"):
        plots.attention_distance(torch.rand(2, 2), image_size=28)


# ---------------------------------------------------------------------------------------
# Patch-embedding filter components
# ---------------------------------------------------------------------------------------


def test_filter_components_grey_centred_at_zero_with_explained_variance():
    k = 5
    comps = torch.randn(k, 1, 4, 4)
    explained = torch.tensor([0.4, 0.2, 0.1, 0.05, 0.012])
    fig = plots.filter_components(comps, explained, ncols=3)
    check_size(fig)
    assert len(fig.axes) == k  # the sixth cell of the 2x3 grid is removed
    for i, ax in enumerate(fig.axes):
        im = ax.images[0]
        np.testing.assert_allclose(im.get_array(), comps[i, 0].double(), rtol=1e-6)
        v = comps[i].abs().max().item()
        assert im.get_clim() == pytest.approx((-v, v))
        assert im.get_cmap().name == "RdBu_r"
        assert ax.get_title() == f"PC {i + 1}: {100 * explained[i].item():.1f}%"
    assert fig.axes[4].get_title() == "PC 5: 1.2%"
    assert "5 principal components" in suptitle(fig)
    plt.close(fig)


def test_filter_components_colour_and_three_d_input():
    comps = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    fig = plots.filter_components(comps)
    for i, ax in enumerate(fig.axes):
        c = comps[i]
        rgb = ((c - c.min()) / (c.max() - c.min())).permute(1, 2, 0)
        np.testing.assert_allclose(ax.images[0].get_array(), rgb)
        assert ax.get_title() == f"PC {i + 1}"
    plt.close(fig)
    fig = plots.filter_components(np.random.randn(28, 2, 2))  # (k, P, P): 4 rows of 7
    check_size(fig)
    assert len(fig.axes) == 28
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (4, 7)
    plt.close(fig)


def test_filter_components_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"C = 1 or 3.*got \(4, 2, 3, 3\)"):
        plots.filter_components(torch.rand(4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"explained has shape \(3,\), expected \(4,\)"):
        plots.filter_components(torch.rand(4, 1, 3, 3), torch.rand(3))


# ---------------------------------------------------------------------------------------
# Deletion / insertion curves
# ---------------------------------------------------------------------------------------


def test_faithfulness_curves_plot_the_curves_with_their_area():
    curves = {
        "rollout": np.linspace(0.9, 0.1, 11),
        "raw attention": torch.tensor([0.9, 0.7, 0.5, 0.45, 0.3]),
        "random": [0.9, 0.85, 0.6],
    }
    fig = plots.faithfulness_curves(curves, kind="deletion", chance=0.1)
    check_size(fig)
    ax = fig.axes[0]
    texts = legend_texts(ax)
    for line, (name, y) in zip(ax.lines, curves.items(), strict=False):
        y = plots.to_numpy(y)
        x = np.linspace(0, 1, len(y))
        np.testing.assert_allclose(line.get_xdata(), x)
        np.testing.assert_allclose(line.get_ydata(), y)
        area = sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(y) - 1))
        assert f"{name} (AUC {area:.3f})" in texts
    assert "rollout (AUC 0.500)" in texts and "chance (0.1)" in texts
    assert ax.get_xlim() == (0.0, 1.0)
    assert ax.get_xlabel() == "fraction of patches removed" and ax.get_ylabel() == "accuracy"
    assert "lower AUC" in ax.get_title()
    plt.close(fig)


def test_faithfulness_curves_insertion_and_given_areas():
    fig = plots.faithfulness_curves(
        {"relevance": [0.1, 0.8, 0.9], "random": [0.1, 0.3, 0.9]},
        kind="insertion",
        areas={"relevance": 0.654321},
    )
    ax = fig.axes[0]
    assert legend_texts(ax) == ["relevance (AUC 0.654)", "random (AUC 0.400)"]
    assert ax.get_xlabel() == "fraction of patches inserted" and "higher AUC" in ax.get_title()
    plt.close(fig)


def test_faithfulness_curves_reject_bad_input():
    with pytest.raises(ValueError, match="'deletion' or 'insertion', got 'removal'"):
        plots.faithfulness_curves({"a": [1, 0]}, kind="removal")
    with pytest.raises(ValueError, match=r"curve 'a': expected shape \(steps \+ 1,\).*got \(1,\)"):
        plots.faithfulness_curves({"a": [1.0]})
    with pytest.raises(ValueError, match=r"got \(2, 2\)"):
        plots.faithfulness_curves({"a": [0.5, 0.4], "b": np.ones((2, 2))})
    with pytest.raises(ValueError, match="at least one curve"):
        plots.faithfulness_curves({})


# ---------------------------------------------------------------------------------------
# Tokenizer feature maps
# ---------------------------------------------------------------------------------------


def test_feature_maps_one_row_per_stage_first_channels():
    stem = torch.rand(2, 6, 8, 12)  # (B, C, h, w), non-square
    stage = torch.rand(5, 4, 4)  # (C, h, w)
    fig = plots.feature_maps([("stem", stem), ("stage 1", stage)], channels=3, index=1)
    check_size(fig)
    axes = np.array(fig.axes).reshape(2, 4)
    for row, (name, a) in zip(axes, [("stem", stem[1]), ("stage 1", stage)], strict=True):
        C, h, w = a.shape
        np.testing.assert_allclose(row[0].images[0].get_array(), a.mean(0).double(), rtol=1e-6)
        assert row[0].get_title() == f"{name}: mean"
        assert row[0].get_ylabel() == f"(C, h, w) =\n({C}, {h}, {w})"
        for c in range(3):
            np.testing.assert_allclose(row[1 + c].images[0].get_array(), a[c], rtol=1e-6)
            assert row[1 + c].get_title() == f"{name}: ch {c}"
            assert row[1 + c].images[0].get_cmap().name == "viridis"
    plt.close(fig)


def test_feature_maps_strongest_channels_image_row_and_few_channels():
    a = torch.zeros(1, 5, 2, 2)
    a[0, :, 0, 0] = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])  # mean activation order: 1, 3, 2
    image = torch.rand(1, 1, 8, 8)
    fig = plots.feature_maps(
        {"t2t 1": a, "t2t 2": torch.tensor([[[0.0]], [[1.0]]])},
        image=image,
        channels=3,
        order="strongest",
    )
    axes = fig.axes
    assert axes[0].get_title() == "input"
    np.testing.assert_allclose(axes[0].images[0].get_array(), image[0, 0], rtol=1e-6)
    assert [ax.get_title() for ax in axes[1:5]] == [
        "t2t 1: mean",
        "t2t 1: ch 1",
        "t2t 1: ch 3",
        "t2t 1: ch 2",
    ]
    # The second stage has 2 channels for 3 slots: its last cell is removed.
    assert [ax.get_title() for ax in axes[5:]] == ["t2t 2: mean", "t2t 2: ch 1", "t2t 2: ch 0"]
    assert len(axes) == 1 + 4 + 3
    plt.close(fig)


def test_feature_maps_reject_bad_input():
    with pytest.raises(ValueError, match=r"stage 'tokens': expected \(C, h, w\) .* got \(49, 8\)"):
        plots.feature_maps([("tokens", torch.rand(49, 8))])
    with pytest.raises(ValueError, match="index 3 is outside a batch of 2"):
        plots.feature_maps([("stem", torch.rand(2, 3, 4, 4))], index=3)
    with pytest.raises(ValueError, match="'first' or 'strongest'"):
        plots.feature_maps([("stem", torch.rand(3, 4, 4))], order="loudest")
    with pytest.raises(ValueError, match="at least one"):
        plots.feature_maps([])


# ---------------------------------------------------------------------------------------
# Every figure fits a laptop screen, even for the largest inputs the notebooks draw
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "draw",
    [
        lambda: plots.show_attention(torch.rand(3, 224, 224), torch.rand(196)),
        lambda: plots.attention_grid(torch.rand(4, 1, 28, 28), [torch.rand(4, 49)] * 6),
        lambda: plots.position_similarity_grid(torch.rand(7, 7, 7, 7) * 2 - 1),
        lambda: plots.similarity_map(torch.rand(14, 14, 14, 14), 3, 4),
        lambda: plots.attention_distance({"a": torch.rand(12, 12), "b": torch.rand(24, 16)}),
        lambda: plots.filter_components(torch.randn(28, 3, 16, 16), torch.rand(28)),
        lambda: plots.faithfulness_curves({"a": torch.rand(50)}, kind="insertion"),
        lambda: plots.feature_maps([("s", torch.rand(64, 7, 7))] * 3, channels=12),
    ],
    ids=[
        "attention",
        "grid",
        "similarity",
        "one_similarity",
        "distance",
        "filters",
        "curve",
        "features",
    ],
)
def test_every_figure_fits_a_laptop_screen(draw):
    fig = draw()
    assert isinstance(fig, matplotlib.figure.Figure)
    check_size(fig)
    assert fig.get_size_inches()[1] <= 10.0
    plt.close(fig)
