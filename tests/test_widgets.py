"""widgets.py: every control, set as a person would (`w.value = ...`, `button.click()`), draws
what `explain` computes, computed here independently; plus the cache, saving, errors, the
static fallback and the DOM classes that browser tests select by."""

from __future__ import annotations

import base64
import functools
import logging

import matplotlib

matplotlib.use("Agg")  # before pyplot: no window, no display needed

import ipywidgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from IPython.core.formatters import DisplayFormatter  # noqa: E402

import vit_tutorial as vt  # noqa: E402
from vit_tutorial import explain as ex  # noqa: E402
from vit_tutorial import widgets as W  # noqa: E402
from vit_tutorial.evaluate import preprocess  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CKPT_DIR = vt.data.DATA_DIR / "checkpoints"
PNG = b"\x89PNG\r\n\x1a\n"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(autouse=True)
def _no_leaked_figures():
    """The explorers draw outside pyplot, or close what `plots` opened through it."""
    plt.close("all")
    yield
    assert plt.get_fignums() == []


@functools.cache
def shipped(name: str) -> vt.VisionTransformer:
    return vt.load_checkpoint(CKPT_DIR / f"{name}.safetensors")[0].eval()


@functools.cache
def sample_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 40 test images (uint8) and labels: every class, a few times."""
    images, labels = vt.load_fashion_mnist("test")
    return images[:40].clone(), labels[:40].clone()


def nano(**overrides) -> vt.VisionTransformer:
    """An untrained 4-block, 4-head ViT: fast, for what needs no trained weights."""
    return vt.create_model("vit_nano_patch4_28", **overrides).eval()


def explorer(models, **kwargs) -> W.AttentionExplorer:
    images, labels = sample_images()
    return W.AttentionExplorer(models, images=images, labels=labels, **kwargs)


def inputs(index: int, img_size=(28, 28)) -> torch.Tensor:
    return preprocess(sample_images()[0][index : index + 1], img_size)  # (1, 1, H, W)


def close(actual: np.ndarray, expected: torch.Tensor) -> None:
    torch.testing.assert_close(torch.from_numpy(np.asarray(actual)), expected.float())


def walk(widget):
    """Every widget under `widget`, itself included."""
    yield widget
    for child in getattr(widget, "children", ()):
        yield from walk(child)


def classes(widget) -> list[str]:
    return [c for w in walk(widget) for c in w._dom_classes]


# --------------------------------------------------------------------------------------
# AttentionExplorer: each control against explain


def test_raw_attention_of_a_layer_head_and_query_patch():
    model = shipped("vit")
    e = explorer({"vit": model})
    e.index.value = 3
    e.method.value = "attention"
    e.layer.value = 2
    e.head.value = 1
    e.patch_button(2, 3).click()
    maps = ex.attention_maps(model, inputs(3))  # (L, 1, H, N, N)
    close(e.current.map, ex.to_grid(maps[1, 0, 1, 1 + 2 * 7 + 3, 1:], (7, 7)))
    c = e.current
    assert (c.model, c.index, c.method, c.layer, c.head, c.query) == (
        "vit", 3, "attention", 2, 1, (2, 3))
    assert "layer 2" in c.title and "head 1" in c.title and "(2, 3)" in c.title

    e.head.value = "min"  # a fused head, for a patch's row
    close(e.current.map, ex.to_grid(maps[1, 0, :, 1 + 2 * 7 + 3, 1:].amin(dim=0), (7, 7)))
    e.query_cls.click()  # the class token: explain's own cls_attention
    e.head.value = "max"
    e.layer.value = 9
    close(e.current.map, ex.to_grid(ex.cls_attention(maps, layer=8, head="max")[0], (7, 7)))
    assert e.current.query is None and e.layer.max == 9


def test_rollout_row_of_the_query():
    model = shipped("vit")
    e = explorer({"vit": model})
    e.index.value = 3
    e.method.value = "rollout"
    assert e.layer.disabled and not e.head.disabled and e.target.disabled
    maps = ex.attention_maps(model, inputs(3))
    e.head.value = "mean"
    close(e.current.map, ex.to_grid(ex.rollout(maps)[0, 0, 1:], (7, 7)))
    e.patch_button(2, 3).click()
    q = 1 + 2 * 7 + 3
    close(e.current.map, ex.to_grid(ex.rollout(maps)[0, q, 1:], (7, 7)))
    e.head.value = "max"
    close(e.current.map, ex.to_grid(ex.rollout(maps, head_fusion="max")[0, q, 1:], (7, 7)))
    e.head.value = 2  # one head alone through every layer
    close(e.current.map, ex.to_grid(ex.rollout(maps[:, :, 2:3])[0, q, 1:], (7, 7)))


def test_class_relevance_for_a_target_class():
    model = shipped("vit")
    e = explorer({"vit": model})
    e.index.value = 3
    e.patch_button(1, 1).click()
    e.method.value = "relevance"
    assert e.layer.disabled and e.head.disabled and not e.target.disabled
    assert e.patch_button(1, 1).disabled and e.query_cls.disabled
    x = inputs(3)
    close(e.current.map, ex.class_relevance(model, x)[0])  # "predicted"
    e.target.value = 5
    close(e.current.map, ex.class_relevance(model, x, target=5)[0])
    assert e.current.target == 5 and e.current.query is None and "Sandal" in e.current.title
    e.method.value = "attention"  # the query patch comes back
    assert e.current.query == (1, 1) and not e.patch_button(1, 1).disabled


def test_info_names_true_class_prediction_and_probability():
    model = shipped("vit")
    e = explorer({"vit": model})
    images, labels = sample_images()
    for i in (0, 7):
        e.index.value = i
        with torch.no_grad():
            probs = model(inputs(i)).softmax(dim=-1)[0]
        pred = int(probs.argmax())
        info = e.info.value
        assert f"true: {vt.FASHION_MNIST_CLASSES[int(labels[i])]}" in info
        percent = f"{100 * float(probs[pred]):.1f}%"
        assert f"predicted: {vt.FASHION_MNIST_CLASSES[pred]} ({percent})" in info


def test_opacity_changes_the_picture_not_the_map():
    e = explorer({"nano": nano()})
    before, png = e.current.map, bytes(e.image.value)
    e.alpha.value = 0.2
    assert np.array_equal(e.current.map, before) and e.current.alpha == 0.2
    assert bytes(e.image.value) != png and bytes(e.image.value).startswith(PNG)
    assert e._overlay.overlay.get_alpha() == 0.2


def test_the_picture_follows_the_map():
    e = explorer({"nano": nano()})
    seen = {bytes(e.image.value)}
    for act in (lambda: setattr(e.layer, "value", 3), lambda: setattr(e.head, "value", 0),
                lambda: e.patch_button(4, 5).click(), lambda: setattr(e.index, "value", 1),
                lambda: setattr(e.method, "value", "rollout")):
        act()
        png = bytes(e.image.value)
        assert png.startswith(PNG) and png not in seen
        seen.add(png)
        # the overlay holds the map, one patch per token cell
        drawn = e._overlay.overlay.get_array()
        np.testing.assert_array_equal(drawn, np.kron(e.current.map, np.ones((4, 4))))


def test_a_quick_redraw_draws_what_a_full_one_would():
    e = explorer({"nano": nano()})
    e.layer.value, e.head.value, e.alpha.value = 2, 3, 0.4
    e.patch_button(6, 0).click()
    quick = bytes(e.image.value)
    e._overlay.key = None  # forget the figure: plots.show_attention from scratch
    e.patch_button(6, 0).click()
    assert bytes(e.image.value) == quick


def test_class_filter_counts_within_the_class():
    e = explorer({"nano": nano()})
    images, labels = sample_images()
    e.index.value = 2  # a Trouser (label 1)
    assert int(labels[2]) == 1
    e.class_filter.value = 1
    assert e.test_index == 2, "the image shown is of that class: it stays"
    count = int((labels == 1).sum())
    assert e.index.max == count - 1 and f"of {count} Trouser" in e.position.value
    for k in range(count):
        e.index.value = k
        assert int(labels[e.test_index]) == 1 and e.current.index == e.test_index
    e.next_button.click()  # wraps to the first
    assert e.index.value == 0 and int(labels[e.test_index]) == 1
    e.prev_button.click()
    assert e.index.value == count - 1
    e.class_filter.value = 8  # Bag: the image shown is not one, so the first Bag
    assert e.index.value == 0 and e.test_index == int(np.flatnonzero(labels.numpy() == 8)[0])
    e.class_filter.value = "all"
    assert e.index.max == len(images) - 1 and e.index.value == e.test_index


def test_save_writes_the_png_shown(tmp_path, monkeypatch):
    e = explorer({"vit": shipped("vit")}, save_dir=tmp_path)
    e.index.value = 3
    e.save_button.click()
    path = tmp_path / "explorer_vit_3_attention.png"
    assert path.read_bytes() == bytes(e.image.value) and path.read_bytes().startswith(PNG)
    assert str(path) in e.saved.value
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "no temporary left"

    monkeypatch.chdir(tmp_path / ".")
    e2 = explorer({"my model/1": nano()})  # no save_dir: the current folder
    e2.method.value = "rollout"
    e2.save_button.click()
    assert (tmp_path / "explorer_my_model_1_0_rollout.png").read_bytes().startswith(PNG)


def test_errors_land_in_the_status_line(tmp_path, caplog):
    class Broken(torch.nn.Module):  # loads, then fails in every forward
        config = nano().config
        patch_embed = nano().patch_embed
        num_prefix_tokens = 1

        def get_attention_maps(self, x):
            raise RuntimeError("broken on purpose")

    e = explorer({"nano": nano(), "missing": tmp_path / "none.safetensors", "broken": Broken()})
    drawn = e.current
    with caplog.at_level(logging.ERROR, logger="vit_tutorial.widgets"):
        e.model_select.value = "missing"  # no exception reaches the notebook
    assert e.status.value.startswith("error: FileNotFoundError")
    assert isinstance(e.last_error, FileNotFoundError)
    assert e.model_select.value == "nano", "the dropdown goes back to the model shown"
    assert any(r.exc_info for r in caplog.records), "logged with its traceback"
    assert e.current is drawn
    e.model_select.value = "broken"
    assert "RuntimeError: broken on purpose" in e.status.value
    e.model_select.value = "nano"
    e.layer.value = 2  # still usable
    assert e.status.value.startswith("drawn in") and e.current.layer == 2


def test_one_forward_per_model_and_image():
    model = nano()
    calls = []
    model.blocks[0].register_forward_hook(lambda *args: calls.append(1))  # every pass
    e = explorer({"nano": model})
    first = len(calls)  # the attention maps and the logits
    assert first == 2
    e.layer.value = 3
    e.head.value = 2
    e.patch_button(1, 2).click()
    e.alpha.value = 0.3
    e.method.value = "rollout"
    e.head.value = "max"
    assert len(calls) == first, "a change of layer, head, query or opacity only redraws"
    e.method.value = "relevance"
    e.target.value = 4
    assert len(calls) == first + 2  # relevance for the predicted class, then for class 4
    e.target.value = "predicted"
    e.alpha.value = 0.9
    assert len(calls) == first + 2
    e.index.value = 1
    assert len(calls) > first + 2
    n = len(calls)
    e.index.value = 0  # still cached
    assert len(calls) == n


def test_callbacks_compute_on_one_thread_and_restore_the_setting():
    model = nano()
    seen = []
    model.blocks[0].register_forward_hook(lambda *args: seen.append(torch.get_num_threads()))
    torch.set_num_threads(2)
    try:
        e = explorer({"nano": model})
        e.index.value = 1
        e.method.value = "relevance"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert len(seen) == 5 and set(seen) == {1}


def test_models_load_lazily_and_switch_grids():
    big = nano(img_size=56)  # a 14x14 grid
    e = explorer({"vit": shipped("vit"), "t2t": CKPT_DIR / "t2t.safetensors", "big": big})
    assert list(e._models._loaded) == ["vit", "big"], "t2t is loaded only when chosen"
    e.layer.value, e.head.value = 9, 2
    e.patch_button(2, 3).click()
    e.model_select.value = "t2t"
    assert "t2t" in e._models._loaded and e.layer.max == 9
    t2t = shipped("t2t")
    maps = ex.attention_maps(t2t, inputs(0))
    close(e.current.map, ex.to_grid(maps[8, 0, 2, 1 + 2 * 7 + 3, 1:], (7, 7)))

    e.model_select.value = "big"
    assert e.layer.max == 4 and e.layer.value == 4, "the layer is clipped to the depth"
    assert [v for _, v in e.head.options] == [0, 1, 2, 3, "mean", "max", "min"]
    assert e.current.query == (5, 7), "the query moves to the patch under the same place"
    assert e.current.map.shape == (14, 14)
    grid = [w for w in walk(e) if "vt-query-grid" in w._dom_classes]
    assert len(grid) == 1 and len(grid[0].children) == 196
    maps = ex.attention_maps(big, inputs(0, (56, 56)))
    close(e.current.map, ex.to_grid(maps[3, 0, 2, 1 + 5 * 14 + 7, 1:], (14, 14)))
    e.model_select.value = "vit"
    assert len([w for w in walk(e) if "vt-query-grid" in w._dom_classes][0].children) == 49


def test_default_explorer_loads_one_checkpoint_and_the_test_set():
    e = W.AttentionExplorer()
    assert e.model_select.options == W.CHECKPOINTS
    assert list(e._models._loaded) == ["vit"]
    assert e.index.max == 9999 and bytes(e.image.value).startswith(PNG)


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="unknown checkpoints"):
        W.AttentionExplorer(["vit", "resnet"])
    with pytest.raises(ValueError, match="uint8 images"):
        W.AttentionExplorer({"nano": nano()}, images=torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match="labels of shape"):
        W.AttentionExplorer({"nano": nano()}, images=sample_images()[0], labels=torch.zeros(2))


# --------------------------------------------------------------------------------------
# Display: the widget view plus a PNG for pages without a widget manager


@pytest.mark.parametrize("kind", ["attention", "position"])
def test_mimebundle_has_the_widget_view_and_a_png(kind):
    if kind == "attention":
        e = explorer({"nano": nano()})
    else:
        e = W.PosEmbedExplorer({"nano": nano(patch_size=7)})
    data = e._repr_mimebundle_(include=None, exclude=None)  # IPython's call, ipywidgets 8's
    assert {WIDGET_VIEW, "image/png", "text/plain"} <= set(data)
    assert data[WIDGET_VIEW]["model_id"] == e.model_id
    png = base64.b64decode(data["image/png"])
    assert png.startswith(PNG)
    assert type(e).__name__ in data["text/plain"] and "nano" in data["text/plain"]
    if kind == "attention":
        assert png == bytes(e.image.value)
    if not W._WIDGETS_7:  # ipywidgets 7 displays through _ipython_display_: the test below
        assert DisplayFormatter().format(e)[0] == data


def test_display_publishes_the_bundle():
    """IPython.display.display(explorer) in a shell: ipywidgets 8 and 7 take different paths."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.display import display
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()
    e = explorer({"nano": nano()})
    with capture_output() as captured:
        display(e)
    (output,) = captured.outputs
    assert {WIDGET_VIEW, "image/png", "text/plain"} <= set(output.data)


# --------------------------------------------------------------------------------------
# DOM classes for browser tests

ATTENTION_CLASSES = [
    "vt-attention-explorer", "vt-model", "vt-index", "vt-prev", "vt-next", "vt-position",
    "vt-class-filter", "vt-method", "vt-layer", "vt-head", "vt-query-grid", "vt-query-cls",
    "vt-target", "vt-alpha", "vt-save", "vt-saved", "vt-picture", "vt-info", "vt-status",
]
POS_CLASSES = [
    "vt-pos-explorer", "vt-pos-model", "vt-pos-grid", "vt-pos-resolution", "vt-pos-interp",
    "vt-pos-map", "vt-pos-grid-picture", "vt-pos-info", "vt-pos-status", "vt-status",
]


def test_every_control_has_its_dom_class():
    e = explorer({"nano": nano()})
    found = classes(e)
    for c in ATTENTION_CLASSES:
        assert found.count(c) == 1, c
    patches = sorted(c for c in found if c.startswith("vt-patch-"))
    assert patches == sorted(f"vt-patch-{r}-{c}" for r in range(7) for c in range(7))
    assert isinstance(e.image, ipywidgets.Image) and "vt-picture" in e.image._dom_classes
    assert isinstance(e.layer, ipywidgets.IntSlider)  # arrow keys move it

    p = W.PosEmbedExplorer({"nano": nano(patch_size=7)})
    found = classes(p)
    for c in POS_CLASSES:
        assert found.count(c) == 1, c
    assert sorted(c for c in found if c.startswith("vt-pos-patch-")) == sorted(
        f"vt-pos-patch-{r}-{c}" for r in range(4) for c in range(4))


# --------------------------------------------------------------------------------------
# PosEmbedExplorer


def test_pos_explorer_learned_table_at_both_resolutions():
    model = nano(patch_size=7)  # 4x4 at 28 px, 8x8 at 56: quick to draw
    p = W.PosEmbedExplorer({"nano": model})
    close(p.current.sim, ex.pos_embed_similarity(model))
    assert p.interpolation.disabled and p.current.interpolation is None
    p.patch_button(1, 2).click()
    close(p.current.map, ex.pos_embed_similarity(model)[1, 2])
    assert bytes(p.map.value).startswith(PNG)
    assert bytes(p.grid_picture.value).startswith(PNG)

    p.resolution.value = 56
    table = model.pos_embed.table().detach()
    for interp in ("bicubic", "bilinear"):
        p.interpolation.value = interp
        resampled = vt.resample_pos_embed(table, (8, 8), old_size=(4, 4), interpolation=interp)
        close(p.current.sim, ex.table_similarity(resampled, (8, 8)))
        assert p.current.patch == (3, 5) and p.current.interpolation == interp
        assert interp in p.info.value and "resampled" in p.info.value
    assert not p.interpolation.disabled
    assert len(p._pictures) == 3
    pictures = dict(p._pictures)
    p.interpolation.value = "bicubic"  # the grid pictures are cached
    p.resolution.value = 28
    assert p._pictures == pictures
    assert bytes(p.grid_picture.value) == pictures["nano", 28, "bicubic"]


def test_pos_explorer_fixed_table_is_recomputed():
    model = nano(patch_size=7, pos_embed="sincos1d")
    p = W.PosEmbedExplorer({"fixed": model}, whole_grid=False)
    p.resolution.value = 56
    table = vt.build_pos_embed("sincos1d", grid_size=(8, 8), dim=64).table()
    close(p.current.sim, ex.table_similarity(table, (8, 8)))
    assert p.interpolation.disabled and "fixed" in p.info.value and "recomputed" in p.info.value


def test_pos_explorer_vit_hires_at_56_and_28_px():
    model = shipped("vit_hires")
    # The 14x14 grid of grids takes seconds to draw; the 8x8 one is tested above.
    p = W.PosEmbedExplorer({"vit_hires": CKPT_DIR / "vit_hires.safetensors"}, whole_grid=False)
    p.resolution.value = 56
    close(p.current.sim, ex.pos_embed_similarity(model))
    assert p.current.sim.shape == (14, 14, 14, 14) and p.interpolation.disabled
    p.patch_button(13, 13).click()
    assert "vt-pos-patch-13-13" in p.patch_button(13, 13)._dom_classes
    close(p.current.map, ex.pos_embed_similarity(model)[13, 13])
    p.resolution.value = 28  # resampled down
    table = model.pos_embed.table().detach()
    resampled = vt.resample_pos_embed(table, (7, 7), old_size=(14, 14))
    close(p.current.sim, ex.table_similarity(resampled, (7, 7)))
    assert p.current.patch == (6, 6) and "14x14 resampled (bicubic) to 7x7" in p.info.value
    assert bytes(p.grid_picture.value) == b"" and bytes(p._static_png()).startswith(PNG)


def test_pos_explorer_errors_land_in_the_status_line():
    p = W.PosEmbedExplorer({"nano": nano(patch_size=7), "none": nano(pos_embed="none")},
                           whole_grid=False)
    p.model_select.value = "none"
    assert "no position embedding" in p.status.value
    p.model_select.value = "nano"
    assert p.status.value == "" and p.current.model == "nano"
