"""Interactive explorers of the trained ViTs, for notebook 09 (`09_seeing_inside`).

Two ipywidgets views, thin over `explain` (the numbers) and `plots` (the figures):

    AttentionExplorer   a model, a test image and a method: one layer's and head's raw
                        attention, attention rollout (Abnar & Zuidema 2020) or class
                        relevance (Chefer et al. 2021); click the query token on a grid that
                        mirrors the patch grid and see its map over the image (ViT Fig. 6).
    PosEmbedExplorer    click a patch and see its position embedding's cosine similarity with
                        every position, beside the whole grid of them (ViT Fig. 7, centre), at
                        28 or 56 px: what bilinear or bicubic resampling keeps of the table.

Only core widgets (no ipympl, no custom JavaScript), so they run in JupyterLab 4, Notebook 7,
VS Code and Colab, on ipywidgets 7.7 or 8. Every picture is a PNG drawn with matplotlib's
Agg (never through pyplot's figure list, so no stray figure shows up in a cell) in an
`ipywidgets.Image`. Where no widget manager runs (GitHub, nbviewer, `nbconvert --to html`),
a displayed explorer shows a PNG of its current state instead.

A callback never raises into the notebook: the error is shown in the status line (DOM class
`vt-status`) and logged to the `vit_tutorial.widgets` logger, which prints nothing unless
the notebook configures logging. Callbacks compute on one torch thread (and restore the
setting): one image is too small to share, and a busy core stalls torch's threads. Each
control has a `vt-` DOM class for browser tests; the explorers' docstrings list them.
"""

from __future__ import annotations

import base64
import functools
import io
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from . import explain, plots
from .checkpoint import atomic_write, load_checkpoint
from .data import DATA_DIR, FASHION_MNIST_CLASSES, denormalize, load_fashion_mnist
from .embeddings import build_pos_embed, resample_pos_embed
from .evaluate import predict, preprocess

__all__ = ["CHECKPOINTS", "AttentionExplorer", "PosEmbedExplorer", "View", "PosView"]

CHECKPOINTS = ("vit", "hybrid", "t2t", "vit_hires")  # data/checkpoints/NAME.safetensors
METHODS = (("raw attention", "attention"), ("rollout", "rollout"), ("class relevance", "relevance"))
FUSIONS = (("mean of heads", "mean"), ("max over heads", "max"), ("min over heads", "min"))

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())  # a library logs; the notebook decides what to print

# ipywidgets 7 displays a widget through `_ipython_display_` (IPython prefers it to
# `_repr_mimebundle_`); ipywidgets 8 through `_repr_mimebundle_` alone.
_WIDGETS_7 = hasattr(widgets.DOMWidget, "_ipython_display_")


# ---------------------------------------------------------------------------------------
# Shared pieces: models, guarded callbacks, PNGs, the static fallback


class _Models:
    """name -> model; a checkpoint path is loaded on first use (construction stays quick)."""

    def __init__(self, models):
        if models is None:
            models = CHECKPOINTS
        if isinstance(models, (str, nn.Module)) or not isinstance(models, (Mapping, Sequence)):
            raise ValueError(
                f"models must be a dict name -> model or checkpoint path, or a list of "
                f"shipped checkpoint names {CHECKPOINTS}, got {type(models).__name__}"
            )
        if not isinstance(models, Mapping):
            unknown = [n for n in models if n not in CHECKPOINTS]
            if unknown:
                raise ValueError(f"unknown checkpoints {unknown}; shipped: {CHECKPOINTS}")
            models = {n: DATA_DIR / "checkpoints" / f"{n}.safetensors" for n in models}
        if not models:
            raise ValueError("expected at least one model, got none")
        for name, m in models.items():
            if not isinstance(m, (nn.Module, str, Path)):
                raise ValueError(f"model {name!r}: expected an nn.Module or a checkpoint path, "
                                 f"got {type(m).__name__}")
        self._specs = dict(models)
        self._loaded = {n: m.eval() for n, m in models.items() if isinstance(m, nn.Module)}

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def __getitem__(self, name: str) -> nn.Module:
        if name not in self._loaded:
            self._loaded[name] = load_checkpoint(self._specs[name])[0].eval()
        return self._loaded[name]


@contextmanager
def _one_thread():
    """Compute on one torch thread, then restore the setting.

    One image is too little work to share: on two cores a second thread gains nothing, and
    when anything else is busy (the browser drawing the page, say) torch's OpenMP barriers
    wait for it. With other processes on both cores, one vit image's attention maps, logits
    and rollout took 1.1 s on two threads against 0.1 s on one (benchmarks/RESULTS.md).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _guarded(method):
    """A callback: computed on one thread; whatever it raises is shown in the status line
    and logged, never raised into the notebook."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            with _one_thread():
                return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001  (a notebook callback must not raise)
            self.last_error = e
            self.status.value = f"error: {type(e).__name__}: {e}"
            logger.error("%s: %s failed", type(self).__name__, method.__name__, exc_info=True)
        return None

    return wrapper


def _agg_figure(figsize, dpi) -> Figure:
    """A figure outside pyplot: it never shows up in a cell by itself and is never closed."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    """The whole figure at its own size and dpi, whatever savefig's rcParams say (fast).

    zlib level 3 rather than PIL's 6: 40% less time to encode, 7% more bytes."""
    buf = io.BytesIO()
    fig.canvas.print_png(buf, pil_kwargs={"compress_level": 3})
    return buf.getvalue()


def _tight_png(fig: Figure, dpi: float) -> bytes:
    """The figure cropped to what it draws (no clipped colour-bar label); slower."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    return buf.getvalue()


def _pyplot_png(fig: Figure, dpi: float) -> bytes:
    """PNG of a figure that `plots` made through pyplot, then closed so no cell shows it."""
    try:
        return _tight_png(fig, dpi)
    finally:
        plt.close(fig)


def _side_by_side(*pngs: bytes) -> bytes:
    """One PNG of several, left to right on white, top-aligned."""
    from PIL import Image  # matplotlib's own dependency

    pictures = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs if p]
    out = Image.new("RGB", (sum(p.width for p in pictures), max(p.height for p in pictures)),
                    "white")
    x = 0
    for p in pictures:
        out.paste(p, (x, 0))
        x += p.width
    buf = io.BytesIO()
    out.save(buf, format="png")
    return buf.getvalue()


def _grid_buttons(grid, prefix: str, on_click, size: str):
    """A GridBox of gh x gw small buttons mirroring the patch grid, and {(r, c): button}."""
    gh, gw = grid
    buttons = {}
    for r in range(gh):
        for c in range(gw):
            b = widgets.Button(description="", tooltip=f"patch ({r}, {c})",
                               layout=widgets.Layout(width=size, height=size, padding="0",
                                                     margin="0"))
            b.add_class(f"{prefix}-{r}-{c}")
            b.on_click(functools.partial(lambda rc, _button: on_click(rc), (r, c)))
            buttons[r, c] = b
    box = widgets.GridBox(list(buttons.values()), layout=widgets.Layout(
        grid_template_columns=f"repeat({gw}, {size})", grid_gap="1px", width="max-content"))
    return box, buttons


def _remap(rc, old, new):
    """Patch (r, c) of grid `old` -> the patch of grid `new` under its centre."""
    return tuple(min(int((x + 0.5) * n / o), n - 1) for x, o, n in zip(rc, old, new, strict=True))


def _labelled(widget, cls: str):
    widget.add_class(cls)
    return widget


class _Explorer(widgets.VBox):
    """A VBox whose display also carries a PNG of its state, for pages without widgets."""

    def _static_png(self) -> bytes:
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self._describe()

    def _repr_mimebundle_(self, **kwargs):
        parent = getattr(super(), "_repr_mimebundle_", None)  # ipywidgets 8
        if parent is not None:
            data = dict(parent(**kwargs) or {})
        else:  # ipywidgets 7: the bundle its `_ipython_display_` publishes
            data = {"application/vnd.jupyter.widget-view+json": {
                "version_major": 2, "version_minor": 0, "model_id": self.model_id}}
        png = self._static_png()
        if png:
            data["image/png"] = base64.b64encode(png).decode("ascii")
        data["text/plain"] = self._describe()
        return data

    if _WIDGETS_7:

        def _ipython_display_(self, **kwargs):
            from IPython.display import display

            display(self._repr_mimebundle_(), raw=True)
            self._handle_displayed(**kwargs)


# ---------------------------------------------------------------------------------------
# AttentionExplorer


@dataclass(frozen=True)
class View:
    """What an AttentionExplorer drew last: the (gh, gw) map and the choices behind it."""

    map: np.ndarray  # (gh, gw), the values under the colour bar
    title: str
    model: str
    index: int  # into the explorer's images (the Fashion-MNIST test set by default)
    method: str  # "attention", "rollout" or "relevance"
    layer: int | None  # 1..L for raw attention, else None
    head: int | str | None  # a head (from 0) or "mean"/"max"/"min"; None for relevance
    query: tuple[int, int] | None  # the query patch (row, col) from 0; None: the class token
    target: int | None  # the class explained by a relevance map, else None
    alpha: float


@dataclass
class _Pass:
    """One forward pass of one model on one image, and what is derived from it on demand."""

    x: torch.Tensor  # (1, C, H, W), the model's input
    picture: np.ndarray  # (C, H, W) pixels in [0, 1], what the model sees
    maps: torch.Tensor  # (L, 1, H, N, N)
    probs: torch.Tensor  # (num_classes,)
    rollouts: dict  # head choice -> (N, N)
    relevance: dict  # target class -> (gh, gw)


class _Overlay:
    """One Agg figure for the map over the image, reused from draw to draw.

    A new picture (model or image) is drawn by `plots.show_attention`; after that only the
    overlay's data, colour limits and alpha, the title and the colour-bar label change, so a
    redraw costs one Agg render and one PNG encoding (benchmarks/redraw.py).
    """

    def __init__(self, figsize, dpi):
        self.fig = _agg_figure(figsize, dpi)
        self.key = None

    def draw(self, key, picture, m, *, alpha, title, label, box) -> bytes:
        if key != self.key:
            self.fig.clear()
            # Fixed margins, not a layout engine: constrained layout triples a redraw's time.
            self.fig.subplots_adjust(left=0.02, right=0.80, bottom=0.02, top=0.86)
            ax = self.fig.add_subplot()
            plots.show_attention(picture, m, alpha=alpha, ax=ax, title=title, label=label)
            self.ax, self.overlay = ax, ax.images[1]
            self.box = ax.add_patch(Rectangle((0, 0), 1, 1, fill=False, edgecolor="red",
                                              linewidth=1.5, visible=False))
            self.key = key
        else:
            self.overlay.set_data(plots.upsample(m, picture.shape[-2:]))
            self.overlay.set_clim(float(m.min()), float(m.max()))
            self.overlay.set_alpha(alpha)
            self.ax.set_title(title)
            self.overlay.colorbar.set_label(label)
        self.box.set_visible(box is not None)
        if box is not None:
            self.box.set_bounds(*box)
        return _png(self.fig)


class AttentionExplorer(_Explorer):
    """Where a trained ViT looks: a map over one test image, for any layer, head and query.

    `models`: a dict name -> model (or name -> checkpoint path, loaded when first chosen),
    or a list of shipped checkpoint names; default `CHECKPOINTS`. Only the model shown is
    loaded. `images` uint8 (N, 28, 28) with `labels` (N,) (or None); default the 10,000
    Fashion-MNIST test images. Models are put in eval mode.

    Controls (attribute, DOM class):
        model_select `vt-model`; class_filter `vt-class-filter` ("all classes" or one);
        index `vt-index`: the image, counted within the filtered class (so with "all
        classes" it is the test-set index; `position` `vt-position` names the test-set
        index), with prev/next buttons `vt-prev`, `vt-next`; method `vt-method`; layer
        `vt-layer` (1..L, raw attention only); head `vt-head` (0..H-1 or a fusion; for
        rollout, a fusion of the heads or one head alone); the query token: a grid of
        buttons `vt-query-grid` mirroring the patch grid, `vt-patch-R-C` (from 0), and
        `vt-query-cls` (class relevance always explains the class token); target
        `vt-target` ("predicted" or a class, relevance only); alpha `vt-alpha` (overlay
        opacity); save_button `vt-save`, which writes `explorer_<model>_<index>_<method>.png`
        into `save_dir` (default: the current folder) and names it in `saved` `vt-saved`.
    Outputs: image `vt-picture` (PNG bytes in `image.value`), info `vt-info` (true class,
    prediction, probability), status `vt-status` (errors, the last redraw's time); the
    explorer itself has `vt-attention-explorer`. `current` is the `View` drawn last.

    Each (model, image) is computed once and cached for the last `cache_size` images: its
    attention maps (`explain.attention_maps`) and class probabilities (`evaluate.predict`),
    a forward pass each; rollout per head choice and relevance per target when first asked
    for. So a change of layer, head, query or opacity only redraws.
    """

    def __init__(self, models=None, *, images=None, labels=None, save_dir=None,
                 figsize=(4.0, 3.6), dpi: int = 80, cache_size: int = 8):
        super().__init__()
        self.add_class("vt-attention-explorer")
        self._models = _Models(models)
        if images is None:
            images, default_labels = load_fashion_mnist("test")
            labels = default_labels if labels is None else labels
        self._images = torch.as_tensor(images)
        if self._images.ndim != 3 or self._images.dtype != torch.uint8 or not len(self._images):
            raise ValueError(f"expected uint8 images of shape (N, 28, 28), got "
                             f"{tuple(self._images.shape)} {self._images.dtype}")
        self._labels = None if labels is None else torch.as_tensor(labels).long()
        if self._labels is not None and self._labels.shape != self._images.shape[:1]:
            raise ValueError(f"expected labels of shape (N,) = ({len(self._images)},), "
                             f"got {tuple(self._labels.shape)}")
        self.save_dir = save_dir
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._overlay = _Overlay(figsize, dpi)
        self._grids: dict = {}
        self._holding = False
        self._query: tuple[int, int] | None = None  # None: the class token
        self._model = self._name = self._grid = self._marked = None
        self.current: View | None = None
        self.last_error: Exception | None = None
        self.last_redraw_s: float | None = None
        self._build()
        self._on_model({"new": self.model_select.value})

    # -- the controls ---------------------------------------------------------------------

    def _build(self):
        wide = {"description_width": "initial"}
        names = self._models.names
        self.model_select = _labelled(widgets.Dropdown(options=names, value=names[0],
                                                       description="model"), "vt-model")
        # "all" and "predicted", not None: to ipywidgets a None value means "nothing selected"
        classes = [("all classes", "all")] + [(n, i) for i, n in enumerate(FASHION_MNIST_CLASSES)]
        self.class_filter = _labelled(widgets.Dropdown(
            options=classes, value="all", description="class", disabled=self._labels is None),
            "vt-class-filter")
        self._subset = np.arange(len(self._images))
        self.index = _labelled(widgets.BoundedIntText(
            value=0, min=0, max=len(self._subset) - 1, description="image",
            layout=widgets.Layout(width="160px")), "vt-index")
        self.prev_button = _labelled(widgets.Button(icon="chevron-left", tooltip="previous image",
                                                    layout=widgets.Layout(width="36px")), "vt-prev")
        self.next_button = _labelled(widgets.Button(icon="chevron-right", tooltip="next image",
                                                    layout=widgets.Layout(width="36px")), "vt-next")
        self.position = _labelled(widgets.Label(), "vt-position")
        self.method = _labelled(widgets.ToggleButtons(options=METHODS, value="attention",
                                                      description="method", style=wide),
                                "vt-method")
        self.layer = _labelled(widgets.IntSlider(value=1, min=1, max=1, description="layer"),
                               "vt-layer")
        self.head = _labelled(widgets.Dropdown(options=FUSIONS, value="mean",
                                               description="head"), "vt-head")
        self.target = _labelled(widgets.Dropdown(description="target"), "vt-target")
        self.query_cls = _labelled(widgets.Button(description="class token",
                                                  tooltip="query: the class token"),
                                   "vt-query-cls")
        self.alpha = _labelled(widgets.FloatSlider(value=0.6, min=0.0, max=1.0, step=0.05,
                                                   description="opacity"), "vt-alpha")
        self.save_button = _labelled(widgets.Button(description="Save PNG", icon="download"),
                                     "vt-save")
        self.saved = _labelled(widgets.Label(), "vt-saved")
        self.image = _labelled(widgets.Image(format="png"), "vt-picture")
        self.info = _labelled(widgets.Label(), "vt-info")
        self.status = _labelled(widgets.Label(), "vt-status")
        self._query_box = widgets.VBox([widgets.Label("query token:"), self.query_cls])

        self.prev_button.on_click(lambda _b: self._step(-1))
        self.next_button.on_click(lambda _b: self._step(+1))
        self.query_cls.on_click(lambda _b: self._set_query(None))
        self.save_button.on_click(lambda _b: self._on_save())
        self.model_select.observe(self._on_model, names="value")
        self.class_filter.observe(self._on_filter, names="value")
        for w in (self.index, self.method, self.layer, self.head, self.target, self.alpha):
            w.observe(self._on_control, names="value")
        self.children = [
            widgets.HBox([self.model_select, self.class_filter]),
            widgets.HBox([self.index, self.prev_button, self.next_button, self.position]),
            self.method,
            widgets.HBox([self.layer, self.head, self.target]),
            widgets.HBox([self.image, self._query_box]),
            widgets.HBox([self.alpha, self.save_button, self.saved]),
            self.info,
            self.status,
        ]

    @property
    def test_index(self) -> int:
        """The image shown, as an index into `images` (the test set by default)."""
        return int(self._subset[self.index.value])

    def patch_button(self, row: int, col: int) -> widgets.Button:
        """The query button of patch (row, col) of the current model's grid."""
        return self._grids[self._grid][1][row, col]

    # -- callbacks ------------------------------------------------------------------------

    @_guarded
    def _on_model(self, change):
        if self._holding:
            return
        try:
            self._select_model(change["new"])
        except Exception:
            if self._name is not None:  # the dropdown goes back to the model still shown
                self._holding = True
                try:
                    self.model_select.value = self._name
                finally:
                    self._holding = False
            raise

    def _select_model(self, name):
        self.status.value = f"loading {name} ..."
        model = self._models[name]
        grid = tuple(model.patch_embed.grid_size)
        cfg = model.config
        self._holding = True
        try:
            self.layer.max = cfg.depth
            heads = [(f"head {h}", h) for h in range(cfg.num_heads)] + list(FUSIONS)
            keep = self.head.value if self.head.value in [v for _, v in heads] else "mean"
            self.head.options, self.head.value = heads, keep
            self._head_names = {v: k for k, v in heads}
            n = cfg.num_classes
            names = FASHION_MNIST_CLASSES if n == len(FASHION_MNIST_CLASSES) else [
                f"class {i}" for i in range(n)]
            targets = [("predicted", "predicted")] + [(c, i) for i, c in enumerate(names)]
            keep = self.target.value if self.target.value in range(n) else "predicted"
            self.target.options, self.target.value = targets, keep
            self._class_names = tuple(names)
            if grid not in self._grids:
                self._grids[grid] = _grid_buttons(grid, "vt-patch", self._set_query,
                                                  "16px" if max(grid) > 8 else "24px")
                self._grids[grid][0].add_class("vt-query-grid")
            if self._query is not None and self._model is not None:
                self._query = _remap(self._query, self._grid, grid)
            if model.num_prefix_tokens == 0 and self._query is None:
                self._query = (0, 0)
            self._grid = grid
            self._query_box.children = [self._query_box.children[0], self.query_cls,
                                        self._grids[grid][0]]
            self._model, self._name = model, name
        finally:
            self._holding = False
        self._redraw()

    @_guarded
    def _on_filter(self, change):
        keep = self.test_index
        cls = change["new"]
        if cls == "all":
            subset = np.arange(len(self._images))
        else:
            subset = np.flatnonzero(self._labels.numpy() == cls)
        if not len(subset):
            raise ValueError(f"no image of class {FASHION_MNIST_CLASSES[cls]!r} here")
        self._holding = True
        try:
            self._subset = subset
            hit = np.flatnonzero(subset == keep)  # stay on the image if it is of that class
            self.index.max = len(self._images) - 1  # so that no bound clips the new value
            self.index.value = int(hit[0]) if len(hit) else 0
            self.index.max = len(subset) - 1
        finally:
            self._holding = False
        self._redraw()

    @_guarded
    def _step(self, delta: int):
        self.index.value = (self.index.value + delta) % len(self._subset)

    @_guarded
    def _set_query(self, rc):
        self._query = rc
        self._redraw()

    @_guarded
    def _on_control(self, change):
        if not self._holding:
            self._redraw()

    @_guarded
    def _on_save(self):
        self.save()

    # -- numbers --------------------------------------------------------------------------

    def _pass(self) -> _Pass:
        key = (self._name, self.test_index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        model, raw = self._model, self._images[self.test_index][None]  # (1, 28, 28) uint8
        x = preprocess(raw, model.config.img_size)  # (1, 1, H, W)
        p = _Pass(x=x, picture=denormalize(x)[0].numpy(), maps=explain.attention_maps(model, x),
                  probs=predict(model, raw)[0].softmax(-1), rollouts={}, relevance={})
        self._cache[key] = p
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return p

    def _map(self, p: _Pass, method, head, target) -> np.ndarray:
        """The (gh, gw) map that `explain` gives for these choices."""
        prefix = self._model.num_prefix_tokens
        q = 0 if self._query is None else prefix + self._query[0] * self._grid[1] + self._query[1]
        if method == "relevance":
            if target not in p.relevance:
                p.relevance[target] = explain.class_relevance(self._model, p.x, target=target)[0]
            return p.relevance[target].numpy()
        if method == "rollout":
            if head not in p.rollouts:
                maps = p.maps if isinstance(head, str) else p.maps[:, :, head : head + 1]
                fusion = head if isinstance(head, str) else "mean"  # one head: itself
                p.rollouts[head] = explain.rollout(maps, head_fusion=fusion)[0]  # (N, N)
            row = p.rollouts[head][q, prefix:]  # (gh*gw,)
        elif q == 0 and prefix:
            row = explain.cls_attention(p.maps, layer=self.layer.value - 1, head=head,
                                        num_prefix_tokens=prefix)[0]
        else:  # a patch's row, fused as cls_attention fuses the class token's
            w = p.maps[self.layer.value - 1, 0, :, q, prefix:]  # (H, gh*gw)
            fuse = {"mean": w.mean, "max": w.amax, "min": w.amin}
            row = fuse[head](dim=0) if isinstance(head, str) else w[head]
        return explain.to_grid(row, self._grid).numpy()

    # -- drawing --------------------------------------------------------------------------

    def _redraw(self):
        if self._holding or self._model is None:
            return
        t0 = time.perf_counter()
        method = self.method.value
        relevance, raw = method == "relevance", method == "attention"
        self.layer.disabled = not raw
        self.head.disabled = relevance
        self.target.disabled = not relevance
        self.query_cls.disabled = relevance or self._model.num_prefix_tokens == 0
        query = None if relevance else self._query
        if self._marked != (self._grid, query, relevance):  # else leave the buttons be
            for rc, b in self._grids[self._grid][1].items():
                b.disabled = relevance
                b.button_style = "info" if rc == query else ""
            self.query_cls.button_style = "info" if query is None else ""
            self._marked = (self._grid, query, relevance)

        p = self._pass()
        names = self._class_names
        pred = int(p.probs.argmax())
        head = None if relevance else self.head.value
        chosen = self.target.value != "predicted"
        target = (self.target.value if chosen else pred) if relevance else None
        m = self._map(p, method, head, target)
        head_text = self._head_names.get(head)
        ask = "class token" if query is None else f"patch {query}"
        if raw:
            title = f"{self._name}: layer {self.layer.value}, {head_text}\nquery: {ask}"
            label = "attention weight"
        elif method == "rollout":
            title = f"{self._name}: rollout, {head_text}\nquery: {ask}"
            label = "rollout weight"
        else:
            which = "chosen" if chosen else "predicted"
            title = f"{self._name}: relevance for\n{names[target]} ({which})"
            label = "relevance"
        box = None
        if query is not None:
            (H, W), (gh, gw) = p.picture.shape[-2:], self._grid
            box = (query[1] * W / gw - 0.5, query[0] * H / gh - 0.5, W / gw, H / gh)
        self.image.value = self._overlay.draw((self._name, self.test_index), p.picture, m,
                                              alpha=self.alpha.value, title=title,
                                              label=label, box=box)
        self.current = View(map=m, title=title, model=self._name, index=self.test_index,
                            method=method, layer=self.layer.value if raw else None, head=head,
                            query=query, target=target, alpha=self.alpha.value)

        i = self.test_index
        of = f"of {len(self._subset)}"
        if self.class_filter.value != "all":
            of += f" {FASHION_MNIST_CLASSES[self.class_filter.value]}: test image {i}"
        self.position.value = of
        true = "?" if self._labels is None else names[int(self._labels[i])]
        self.info.value = (f"test image {i} · true: {true} · predicted: {names[pred]} "
                           f"({100 * float(p.probs[pred]):.1f}%)")
        self.last_redraw_s = time.perf_counter() - t0
        self.status.value = f"drawn in {1000 * self.last_redraw_s:.0f} ms"

    def save(self, path=None) -> Path:
        """Write the picture shown to `path` (default: `save_dir`/explorer_<model>_<index>_
        <method>.png), atomically; returns the path."""
        if self.current is None:
            raise RuntimeError("nothing drawn yet")
        if path is None:
            c = self.current
            name = re.sub(r"[^\w.-]+", "_", f"explorer_{c.model}_{c.index}_{c.method}.png")
            path = Path.cwd() if self.save_dir is None else Path(self.save_dir)
            path = path / name
        png, path = self.image.value, Path(path)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(png))
        self.saved.value = f"saved {path}"
        return path

    def _static_png(self) -> bytes:
        return bytes(self.image.value)

    def _describe(self) -> str:
        c = self.current
        if c is None:
            return "AttentionExplorer(nothing drawn)"
        return (f"AttentionExplorer(model={c.model!r}, index={c.index}, method={c.method!r}, "
                f"layer={c.layer}, head={c.head!r}, query={c.query}, target={c.target})")


# ---------------------------------------------------------------------------------------
# PosEmbedExplorer


@dataclass(frozen=True)
class PosView:
    """What a PosEmbedExplorer drew last."""

    sim: np.ndarray  # (gh, gw, gh, gw) cosine similarities of the table shown
    map: np.ndarray  # (gh, gw) = sim[row, col]
    title: str
    model: str
    resolution: int  # input pixels, 28 or 56
    interpolation: str | None  # None where nothing was interpolated
    patch: tuple[int, int]
    source: str  # how the table was obtained, as the info line says


class PosEmbedExplorer(_Explorer):
    """Which positions a position embedding thinks are alike (ViT Fig. 7, centre).

    `models`: as for `AttentionExplorer` (default: the shipped checkpoints). Pick a model,
    a resolution and a patch: the left picture is that patch's cosine similarity with every
    position (`plots.similarity_map`), the right one the whole grid of them
    (`plots.position_similarity_grid`, cached per model and resolution: it takes seconds at
    14x14; `whole_grid=False` leaves it out).

    Resolution: each model's own table at the size it was trained for; at the other size
    (28 or 56 px, with the model's token stride: 7x7 <-> 14x14) a learned table is resampled
    with `embeddings.resample_pos_embed` (bilinear or bicubic, antialiased), as fine-tuning
    at 56 px does. vit_hires, trained at 56 px, is resampled down for 28 px. A fixed
    sin-cos table (t2t: sincos1d) is not interpolated: it is recomputed for the new grid,
    and the info line says so.

    DOM classes: model_select `vt-pos-model`, resolution `vt-pos-resolution`, interpolation
    `vt-pos-interp`, the patch grid `vt-pos-grid` of buttons `vt-pos-patch-R-C` (from 0),
    map `vt-pos-map`, grid_picture `vt-pos-grid-picture`, info `vt-pos-info`, status
    `vt-status` and `vt-pos-status`; the explorer has `vt-pos-explorer`. `current` is the
    `PosView` drawn last.
    """

    def __init__(self, models=None, *, whole_grid: bool = True, dpi: int = 80):
        super().__init__()
        self.add_class("vt-pos-explorer")
        self._models = _Models(models)
        self._dpi, self._whole_grid = dpi, whole_grid
        self._fig = _agg_figure((4.5, 3.8), dpi)
        self._sims: dict = {}  # (model, resolution, interpolation) -> (sim, source)
        self._pictures: dict = {}  # the same keys -> PNG of the grid of grids
        self._grids: dict = {}
        self._grid = None
        self._patch = (0, 0)
        self._holding = False
        self.current: PosView | None = None
        self.last_error: Exception | None = None
        names = self._models.names
        self.model_select = _labelled(widgets.Dropdown(options=names, value=names[0],
                                                       description="model"), "vt-pos-model")
        self.resolution = _labelled(widgets.ToggleButtons(
            options=[("28 px", 28), ("56 px", 56)], value=28, description="input",
            style={"button_width": "60px"}), "vt-pos-resolution")
        self.interpolation = _labelled(widgets.ToggleButtons(
            options=["bilinear", "bicubic"], value="bicubic", description="resample",
            style={"button_width": "70px"}), "vt-pos-interp")
        self.map = _labelled(widgets.Image(format="png"), "vt-pos-map")
        self.grid_picture = _labelled(widgets.Image(format="png"), "vt-pos-grid-picture")
        if not whole_grid:
            self.grid_picture.layout.display = "none"
        self.info = _labelled(widgets.Label(), "vt-pos-info")
        self.status = _labelled(_labelled(widgets.Label(), "vt-status"), "vt-pos-status")
        self._grid_box = widgets.VBox([widgets.Label("patch:")])
        for w in (self.model_select, self.resolution, self.interpolation):
            w.observe(self._on_control, names="value")
        self.children = [
            widgets.HBox([self.model_select, self.resolution, self.interpolation]),
            self.info,
            widgets.HBox([self._grid_box, self.map, self.grid_picture],
                         layout=widgets.Layout(flex_flow="row wrap")),
            self.status,
        ]
        self._redraw()

    def patch_button(self, row: int, col: int) -> widgets.Button:
        """The button of patch (row, col) of the grid shown."""
        return self._grids[self._grid][1][row, col]

    @_guarded
    def _on_control(self, change):
        if not self._holding:
            self._redraw()

    @_guarded
    def _set_patch(self, rc):
        self._patch = rc
        self._redraw()

    def _similarity(self, name, model, resolution, interpolation):
        """(sim (gh, gw, gh, gw), grid, interpolation used or None, a sentence on the source)."""
        pe, kind = model.pos_embed, model.config.pos_embed
        table = pe.table()  # (1, prefix + N, D) or None
        if table is None:
            raise ValueError(f"{name} has no position embedding (pos_embed={kind!r})")
        old, prefix = tuple(pe.grid_size), pe.num_prefix_tokens
        stride = explain.token_stride(model)
        if any(resolution % s for s in stride):
            raise ValueError(f"{resolution} px is not a whole number of {stride} px tokens")
        grid = tuple(int(resolution // s) for s in stride)
        trained = f"{model.config.img_size[0]} px"
        if grid == old:
            sim = explain.pos_embed_similarity(model)
            return sim, grid, None, f"{name}: its {kind} table, {old[0]}x{old[1]} ({trained})"
        if kind in ("sincos1d", "sincos2d"):
            table = build_pos_embed(kind, grid_size=grid, dim=table.shape[-1],
                                    num_prefix_tokens=prefix).table()
            how, used = "recomputed for", None
            note = "fixed table: nothing to interpolate"
        else:
            table = resample_pos_embed(table.detach(), grid, old_size=old,
                                       num_prefix_tokens=prefix, interpolation=interpolation)
            how, used = f"resampled ({interpolation}) to", interpolation
            note = f"learned at {trained}"
        sim = explain.table_similarity(table, grid, num_prefix_tokens=prefix)
        return sim, grid, used, (f"{name}: {kind} table {old[0]}x{old[1]} {how} "
                                 f"{grid[0]}x{grid[1]} ({note})")

    @_guarded
    def _redraw(self):
        name, res = self.model_select.value, self.resolution.value
        key = (name, res, self.interpolation.value)
        if key not in self._sims:
            self.status.value = f"loading {name} ..."
            self._sims[key] = self._similarity(name, self._models[name], *key[1:])
        sim, grid, used, source = self._sims[key]
        self.interpolation.disabled = used is None
        if grid != self._grid:
            if grid not in self._grids:
                self._grids[grid] = _grid_buttons(grid, "vt-pos-patch", self._set_patch,
                                                  "16px" if max(grid) > 8 else "24px")
                self._grids[grid][0].add_class("vt-pos-grid")
            if self._grid is not None:
                self._patch = _remap(self._patch, self._grid, grid)
            self._grid = grid
            self._grid_box.children = [self._grid_box.children[0], self._grids[grid][0]]
        for rc, b in self._grids[grid][1].items():
            b.button_style = "info" if rc == self._patch else ""
        s = sim.numpy()
        r, c = self._patch
        title = f"{name} at {res} px\nsimilarity to patch ({r}, {c})"
        self._fig.clear()
        plots.similarity_map(s, r, c, ax=self._fig.add_subplot(), title=title)
        self.map.value = _tight_png(self._fig, self._dpi)
        self.info.value = source
        if self._whole_grid and key not in self._pictures:
            self.status.value = f"drawing the {grid[0]}x{grid[1]} grid of similarities ..."
            with plt.ioff():
                fig = plots.position_similarity_grid(
                    s, title=f"{name} at {res} px: position embedding similarity", width=6.0)
            self._pictures[key] = _pyplot_png(fig, self._dpi)
        self.grid_picture.value = self._pictures.get(key, b"")
        self.current = PosView(sim=s, map=s[r, c], title=title, model=name, resolution=res,
                               interpolation=used, patch=(r, c), source=source)
        self.status.value = ""

    def _static_png(self) -> bytes:
        return _side_by_side(bytes(self.map.value), bytes(self.grid_picture.value))

    def _describe(self) -> str:
        c = self.current
        if c is None:
            return "PosEmbedExplorer(nothing drawn)"
        return (f"PosEmbedExplorer(model={c.model!r}, resolution={c.resolution}, "
                f"interpolation={c.interpolation!r}, patch={c.patch})")
