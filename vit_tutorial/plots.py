"""Plots: the figures that show what a trained ViT looks at and what it has learned.

Used mainly by notebook 09 (seeing inside), and by notebooks 06 (hybrid tokenizer feature
maps), 07 (T2T stages) and 08 (fine-tuning). Each function draws one figure from plain
tensors or NumPy arrays (the outputs of `vit_tutorial.explain`, whose `curve_area` it
shares) and recreates, where there is one, a figure of Dosovitskiy et al., "An Image is
Worth 16x16 Words", ICLR 2021:

- `show_attention`, `attention_grid`: attention maps over the input (Fig. 6).
- `filter_components`: principal components of the patch-embedding filters (Fig. 7, left).
- `position_similarity_grid`, `similarity_map`: position-embedding similarity (Fig. 7, centre).
- `attention_distance`: mean attention distance per head against depth (Fig. 7, right).
- `faithfulness_curves`: deletion / insertion curves (Petsiuk et al., RISE, BMVC 2018).
- `feature_maps`: the feature maps of a hybrid CNN or T2T tokenizer, stage by stage.

Conventions, shared by every function:

- Every function returns a `matplotlib.figure.Figure` made with `plt.subplots` (or
  `ax.figure` when given `ax=`). Nothing calls `plt.show()`: write `fig = ...` (or end the
  line with `;`) so Jupyter draws it once, then `plt.show()` or `plt.close(fig)`.
- Images are pixels in [0, 1]: callers undo the normalisation first
  (`vit_tutorial.data.denormalize`). Shapes (H, W), (1, H, W) or (3, H, W); values outside
  [0, 1] are clipped. Under an overlay, a colour image is drawn in grey (luma
  0.299 R + 0.587 G + 0.114 B) so that only the map carries colour.
- A map over the patches is a (gh * gw,) vector in row-major patch order, without the class
  token, or a (gh, gw) array. `upsample` stretches it to the image: by default each patch's
  value fills that patch's pixels (nearest; `np.kron(map, np.ones((H // gh, W // gw)))`
  when the sizes divide).
- Colours: `viridis` for attention and other non-negative maps, `RdBu_r` on [-1, 1] for
  cosine similarities and centred at zero for signed filters. Sizes fit a laptop screen
  (width <= 10 in) at matplotlib's default dpi.
- Wrong shapes raise ValueError with the expected and the received shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .explain import curve_area

__all__ = [
    "to_numpy",
    "upsample",
    "area_under_curve",
    "show_image",
    "show_attention",
    "attention_grid",
    "position_similarity_grid",
    "similarity_map",
    "attention_distance",
    "filter_components",
    "faithfulness_curves",
    "feature_maps",
]

ATTENTION_CMAP = "viridis"  # attention, relevance, feature maps: sequential
SIMILARITY_CMAP = "RdBu_r"  # similarities and signed filters: diverging, centred at zero
MAX_WIDTH = 10.0  # inches; a figure wider than this does not fit a laptop screen

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights, RGB -> grey
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def to_numpy(x) -> np.ndarray:
    """A float64 NumPy copy of a tensor (any device, dtype, requires_grad) or array-like."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _pair(size, name: str) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"{name} must be an int or a pair (rows, cols), got {size!r}")
    return int(size[0]), int(size[1])


def _as_image(image, *, grey: bool) -> np.ndarray:
    """(H, W) or (H, W, 3) pixels in [0, 1] from (H, W), (1, H, W) or (3, H, W)."""
    img = to_numpy(image)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)  # (H, W, 3)
    elif img.ndim != 2:
        raise ValueError(
            f"expected an image of shape (H, W), (1, H, W) or (3, H, W), got {img.shape}"
        )
    if grey and img.ndim == 3:
        img = img @ _LUMA  # (H, W)
    return np.clip(img, 0.0, 1.0)


def _grid_for(n: int, height: int, width: int) -> tuple[int, int] | None:
    """The patch grid (gh, gw) with gh * gw = n and the image's aspect ratio, if any."""
    for gh in range(1, n + 1):
        if n % gh == 0 and gh * width == (n // gh) * height:
            return gh, n // gh
    return None


def _infer_grid(n: int, height: int, width: int) -> tuple[int, int]:
    grid = _grid_for(n, height, width)
    if grid is None:
        hint = " (drop the class token: map[1:])" if _grid_for(n - 1, height, width) else ""
        raise ValueError(
            f"cannot lay a map of {n} values on a grid with the aspect of a {height}x{width} "
            f"image{hint}; pass grid_size=(gh, gw)"
        )
    return grid


def _as_grid_map(attention, grid_size, image_hw: tuple[int, int]) -> np.ndarray:
    """A (gh, gw) map from a (gh * gw,) vector or a (gh, gw) array."""
    a = to_numpy(attention)
    if a.ndim == 2:
        if grid_size is not None and a.shape != _pair(grid_size, "grid_size"):
            raise ValueError(f"map has shape {a.shape}, expected grid_size {grid_size}")
        return a
    if a.ndim != 1:
        raise ValueError(f"expected a map of shape (gh * gw,) or (gh, gw), got {a.shape}")
    if grid_size is None:
        gh, gw = _infer_grid(a.size, *image_hw)
    else:
        gh, gw = _pair(grid_size, "grid_size")
        if gh * gw != a.size:
            hint = " (drop the class token: map[1:])" if a.size == gh * gw + 1 else ""
            raise ValueError(
                f"map has {a.size} values, expected gh * gw = {gh} * {gw} = {gh * gw} "
                f"for grid_size ({gh}, {gw}){hint}"
            )
    return a.reshape(gh, gw)  # row-major, the order of the patch tokens


def upsample(grid_map, size, *, mode: str = "nearest") -> np.ndarray:
    """Stretch a (gh, gw) map to `size` = (H, W) (or an int for a square).

    "nearest": pixel (y, x) takes the value of patch (y * gh // H, x * gw // W), so each
    patch's value fills its patch; when the sizes divide this is
    `np.kron(map, np.ones((H // gh, W // gw)))`. "bilinear": `F.interpolate` with
    align_corners=False, a smooth map for display.
    """
    m = to_numpy(grid_map)
    if m.ndim != 2:
        raise ValueError(f"expected a (gh, gw) map, got shape {m.shape}")
    H, W = _pair(size, "size")
    gh, gw = m.shape
    if mode == "nearest":
        rows = np.arange(H) * gh // H
        cols = np.arange(W) * gw // W
        return m[rows][:, cols]  # (H, W)
    if mode == "bilinear":
        t = torch.from_numpy(m)[None, None]  # (1, 1, gh, gw)
        return F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
    raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")


def area_under_curve(y, x=None) -> float:
    """Trapezoidal area under y; x defaults to `len(y)` evenly spaced points over [0, 1]."""
    if x is None:  # evenly spaced: the rule `explain.curve_area` scores the curves with
        return curve_area(torch.as_tensor(to_numpy(y)))
    y, x = to_numpy(y), to_numpy(x)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def _figure_axes(ax: Axes | None, figsize) -> tuple[Figure, Axes]:
    if ax is None:
        return plt.subplots(figsize=figsize, layout="constrained")
    return ax.figure, ax


def _no_ticks(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_image(ax: Axes, img: np.ndarray) -> None:
    # Fixed range 0..1, so a map of [0, 1] pixels looks the same in every panel.
    ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    _no_ticks(ax)


def _draw_overlay(ax, img, m, alpha, cmap, interpolation, vmin, vmax):
    """The grey image `img`, then the (gh, gw) map `m` upsampled over it."""
    H, W = img.shape[:2]
    _draw_image(ax, img)
    return ax.imshow(
        upsample(m, (H, W), mode=interpolation),
        cmap=cmap,
        alpha=alpha,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
    )


# ---------------------------------------------------------------------------------------
# Attention over the image (ViT Fig. 6)
# ---------------------------------------------------------------------------------------


def show_image(image, *, ax: Axes | None = None, title: str | None = "image") -> Figure:
    """Draw an image of [0, 1] pixels, (H, W), (1, H, W) or (3, H, W); grey or colour."""
    img = _as_image(image, grey=False)
    fig, ax = _figure_axes(ax, (3.5, 3.5))
    _draw_image(ax, img)
    if title:
        ax.set_title(title)
    return fig


def show_attention(
    image,
    attention,
    *,
    grid_size=None,
    alpha: float = 0.6,
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = ATTENTION_CMAP,
    interpolation: str = "nearest",
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    label: str = "attention",
) -> Figure:
    """The image in grey with a map over its patches laid on top (ViT Fig. 6).

    `image`: [0, 1] pixels (denormalise first). `attention`: (gh * gw,) or (gh, gw), e.g. the
    class token's row of a layer's attention without the class token itself, `R[b, 0, 1:]`
    of a rollout, or a relevance map. The grid is inferred from the image's aspect ratio
    unless `grid_size` is given. The map's own values are drawn, not rescaled: the colour
    bar reads in its units (the colour limits are its min and max unless vmin/vmax are set).
    Draws into `ax` when given (images: `ax.images[0]`, the overlay: `ax.images[1]`).
    """
    img = _as_image(image, grey=True)
    H, W = img.shape
    m = _as_grid_map(attention, grid_size, (H, W))  # checked before a figure exists
    fig, ax = _figure_axes(ax, (4.5, max(2.0, 3.8 * H / W)))
    im = _draw_overlay(ax, img, m, alpha, cmap, interpolation, vmin, vmax)
    ax.set_title("attention over the image" if title is None else title)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    return fig


def _map_columns(maps, titles) -> tuple[list[str], list[np.ndarray]]:
    if isinstance(maps, Mapping):
        names, arrays = list(maps), [to_numpy(m) for m in maps.values()]
    elif isinstance(maps, (list, tuple)):
        names, arrays = [f"map {k}" for k in range(len(maps))], [to_numpy(m) for m in maps]
    else:
        names, arrays = ["attention"], [to_numpy(maps)]
    if titles is not None:
        if len(titles) != len(arrays):
            raise ValueError(f"got {len(titles)} titles for {len(arrays)} maps")
        names = list(titles)
    return names, arrays


def attention_grid(
    images,
    maps,
    *,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    show_images: bool = True,
    grid_size=None,
    alpha: float = 0.6,
    cmap: str = ATTENTION_CMAP,
    interpolation: str = "nearest",
    colorbar: bool = False,
    panel_size: float = 2.0,
    title: str | None = None,
) -> Figure:
    """Several images by several maps, as in ViT Fig. 6: one row per image.

    `images`: (B, H, W) or (B, C, H, W) pixels in [0, 1]. `maps`: a dict name -> (B, gh*gw)
    or (B, gh, gw) (the names title the columns), a list of such arrays (titled by
    `titles`, else "map k"), or one such array. The first column shows the image itself
    unless `show_images=False`. `row_labels` (e.g. class names) label the rows. Each panel
    has its own colour limits (methods differ in scale); `colorbar=True` adds one per panel.
    `title` goes above the whole grid.
    """
    imgs = to_numpy(images)
    if imgs.ndim not in (3, 4):
        raise ValueError(f"expected images of shape (B, H, W) or (B, C, H, W), got {imgs.shape}")
    B = imgs.shape[0]
    names, arrays = _map_columns(maps, titles)
    for name, a in zip(names, arrays, strict=True):
        if a.ndim not in (2, 3) or a.shape[0] != B:
            raise ValueError(
                f"map {name!r} has shape {a.shape}, expected (B, gh * gw) or (B, gh, gw) "
                f"with B = {B} images"
            )
    if row_labels is not None and len(row_labels) != B:
        raise ValueError(f"got {len(row_labels)} row_labels for {B} images")
    H, W = imgs.shape[-2:]
    grid_maps = [[_as_grid_map(a[r], grid_size, (H, W)) for a in arrays] for r in range(B)]
    ncols = len(arrays) + int(show_images)
    panel = min(panel_size, MAX_WIDTH / ncols)
    fig, axes = plt.subplots(
        B, ncols, figsize=(panel * ncols, panel * B * H / W + 0.3), squeeze=False
    )
    for r in range(B):
        row = axes[r]
        if show_images:
            _draw_image(row[0], _as_image(imgs[r], grey=False))
        grey = _as_image(imgs[r], grey=True)
        for ax, m in zip(row[int(show_images) :], grid_maps[r], strict=True):
            im = _draw_overlay(ax, grey, m, alpha, cmap, interpolation, None, None)
            if colorbar:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if r == 0:
            for ax, name in zip(row, ["image"] * show_images + names, strict=True):
                ax.set_title(name)
        if row_labels is not None:
            row[0].set_ylabel(row_labels[r])
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()  # after the suptitle, so that the column titles make room for it
    return fig


# ---------------------------------------------------------------------------------------
# Position-embedding similarity (ViT Fig. 7, centre)
# ---------------------------------------------------------------------------------------


def _as_similarity(sim) -> np.ndarray:
    s = to_numpy(sim)
    if s.ndim != 4 or s.shape[:2] != s.shape[2:]:
        raise ValueError(f"expected similarities of shape (gh, gw, gh, gw), got {s.shape}")
    return s


def position_similarity_grid(
    sim,
    *,
    title: str | None = None,
    cmap: str = SIMILARITY_CMAP,
    width: float = 7.0,
    limits: tuple[float, float] | None = (-1.0, 1.0),
) -> Figure:
    """ViT Fig. 7 (centre): tile (i, j) shows the cosine similarity of position (i, j)'s
    embedding with every position's.

    `sim`: (gh, gw, gh, gw) values in [-1, 1] (any grid, square or not). One shared colour
    scale, `RdBu_r` with `limits` (default (-1, 1), the cosine's range; None fits them to
    the data's lowest and highest value, which shows the structure of a trained model whose
    similarities never go far below 0), and one colour bar. Rows and columns are numbered
    from 0 as the tensor is indexed. The tiles are `fig.axes[:gh * gw]`, row-major, then
    the colour bar.
    """
    s = _as_similarity(sim)
    gh, gw = s.shape[:2]
    if limits is None:
        limits = (float(s.min()), float(s.max()))
    elif len(limits) != 2 or not limits[0] < limits[1]:
        raise ValueError(f"limits must be (low, high) with low < high, got {limits!r}")
    width = min(width, MAX_WIDTH)
    # Tiles span 74% of the width and 80% of the height; each tile is gh x gw pixels.
    height = min(max(0.74 * width * (gh / gw) ** 2 / 0.8, 3.0), 9.0)
    fig, axes = plt.subplots(
        gh,
        gw,
        figsize=(width, height),
        squeeze=False,
        gridspec_kw=dict(left=0.1, right=0.84, bottom=0.1, top=0.9, wspace=0.08, hspace=0.08),
    )
    for i in range(gh):
        for j in range(gw):
            ax = axes[i, j]
            im = ax.imshow(s[i, j], cmap=cmap, vmin=limits[0], vmax=limits[1],
                           interpolation="nearest")
            _no_ticks(ax)
            if j == 0:
                ax.set_ylabel(str(i), rotation=0, ha="right", va="center")
            if i == gh - 1:
                ax.set_xlabel(str(j))
    fig.supxlabel("input patch column")
    fig.supylabel("input patch row")
    fig.suptitle("Position embedding similarity" if title is None else title)
    cax = fig.add_axes((0.87, 0.1, 0.025, 0.8))
    fig.colorbar(im, cax=cax, label="cosine similarity")
    return fig


def similarity_map(
    sim,
    row: int,
    col: int,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = SIMILARITY_CMAP,
    colorbar: bool = True,
) -> Figure:
    """One tile of Fig. 7 (centre), large: position (row, col)'s similarity with every
    position, the patch itself outlined. `sim`: (gh, gw, gh, gw); rows and cols from 0."""
    s = _as_similarity(sim)
    gh, gw = s.shape[:2]
    if not (0 <= row < gh and 0 <= col < gw):
        raise ValueError(f"patch ({row}, {col}) is outside the {gh}x{gw} grid")
    fig, ax = _figure_axes(ax, (4.5, max(2.0, 3.8 * gh / gw)))
    im = ax.imshow(s[row, col], cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
    # Pixel (row, col) of imshow covers [col - 0.5, col + 0.5] x [row - 0.5, row + 0.5].
    ax.add_patch(
        Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2)
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(f"similarity to patch ({row}, {col})" if title is None else title)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    return fig


# ---------------------------------------------------------------------------------------
# Mean attention distance (ViT Fig. 7, right)
# ---------------------------------------------------------------------------------------


def _uniform_distance(image_size, patch_size) -> float:
    """Mean distance between patch centres over all (query, key) pairs: what a head that
    attends uniformly to every patch would score. Patches may be non-square or fractional
    (`explain.token_stride` of a hybrid)."""
    H, W = _pair(image_size, "image_size")
    ph, pw = (patch_size, patch_size) if np.isscalar(patch_size) else tuple(patch_size)
    gh, gw = round(H / ph), round(W / pw)
    ys, xs = np.meshgrid(np.arange(gh) * ph, np.arange(gw) * pw, indexing="ij")
    centres = np.stack([ys.ravel(), xs.ravel()], axis=1)  # (n, 2) pixel offsets
    return float(np.linalg.norm(centres[:, None] - centres[None], axis=-1).mean())


def attention_distance(
    distances,
    *,
    labels: Sequence[str] | None = None,
    patch_size=None,
    image_size=None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """ViT Fig. 7 (right): each head's mean attention distance (pixels) against its layer.

    `distances`: one (L, H) array (tensor or ndarray), or a dict name -> (L, H), or a list of
    (L, H) arrays (named by `labels`), one per model; depths may differ. Each model is one
    scatter collection (`ax.collections[k]`) with offsets (layer 1..L, distance), its heads
    in order. `patch_size` (pixels between token centres: a number or (ph, pw)) draws a line at
    one patch (at ph when they differ); with `image_size` (int or (H, W)) too, a line at the
    distance a head attending uniformly to all patches would have.
    """
    if isinstance(distances, Mapping):
        names, arrays = list(distances), [to_numpy(d) for d in distances.values()]
    elif isinstance(distances, (list, tuple)):
        names, arrays = (
            [f"model {k}" for k in range(len(distances))],
            [to_numpy(d) for d in distances],
        )
    else:
        names, arrays = ["heads"], [to_numpy(distances)]
    if labels is not None:
        if len(labels) != len(arrays):
            raise ValueError(f"got {len(labels)} labels for {len(arrays)} models")
        names = list(labels)
    if not arrays:
        raise ValueError("expected at least one (L, H) array of distances, got none")
    for name, d in zip(names, arrays, strict=True):
        if d.ndim != 2:
            raise ValueError(f"distances of {name!r}: expected shape (L, H), got {d.shape}")
    if image_size is not None and patch_size is None:
        raise ValueError("image_size needs patch_size (the uniform line is over patches)")

    fig, ax = _figure_axes(ax, (6.0, 4.0))
    for k, (name, d) in enumerate(zip(names, arrays, strict=True)):
        L, H = d.shape
        x = np.repeat(np.arange(1, L + 1), H)  # (L * H,): layer l's H heads side by side
        ax.scatter(x, d.ravel(), marker=_MARKERS[k % len(_MARKERS)], s=18, alpha=0.75, label=name)
    if patch_size is not None:
        p = patch_size if np.isscalar(patch_size) else patch_size[0]
        ax.axhline(p, color="grey", ls=":", lw=1, label=f"one patch ({p:g} px)")
    if image_size is not None:
        u = _uniform_distance(image_size, patch_size)
        ax.axhline(u, color="grey", ls="--", lw=1, label=f"uniform attention ({u:.1f} px)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_title("Mean attention distance per head" if title is None else title)
    ax.legend(fontsize="small")
    return fig


# ---------------------------------------------------------------------------------------
# Patch-embedding filters (ViT Fig. 7, left)
# ---------------------------------------------------------------------------------------


def filter_components(
    components,
    explained=None,
    *,
    ncols: int | None = None,
    title: str | None = None,
    cmap: str = SIMILARITY_CMAP,
) -> Figure:
    """ViT Fig. 7 (left): the principal components of the patch-embedding filters.

    `components`: (k, C, P, P) with C = 1 or 3, or (k, P, P). One-channel components are
    drawn with `cmap` centred at zero, limits +-max|component| per component; three-channel
    ones as colour images, each rescaled to [0, 1] by its own min and max (their sign is
    arbitrary). `explained`: (k,) explained-variance ratios, shown as percentages in the
    titles. The panels are `fig.axes[:k]`; unused grid cells are removed.
    """
    c = to_numpy(components)
    if c.ndim == 3:
        c = c[:, None]  # (k, 1, P, P)
    if c.ndim != 4 or c.shape[1] not in (1, 3):
        raise ValueError(
            f"expected components of shape (k, C, P, P) with C = 1 or 3, or (k, P, P), "
            f"got {to_numpy(components).shape}"
        )
    k = c.shape[0]
    if explained is not None:
        explained = to_numpy(explained)
        if explained.shape != (k,):
            raise ValueError(f"explained has shape {explained.shape}, expected ({k},)")
    # At most 8 a row, the rows as even as they can be: 28 -> 4 x 7 as in the paper.
    ncols = math.ceil(k / math.ceil(k / 8)) if ncols is None else ncols
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    nrows = math.ceil(k / ncols)
    panel = min(1.3, MAX_WIDTH / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel * ncols, (panel + 0.3) * nrows + 0.5), squeeze=False
    )
    for i, ax in enumerate(axes.ravel()):
        if i >= k:
            ax.remove()
            continue
        if c.shape[1] == 1:
            v = float(np.abs(c[i]).max()) or 1.0
            ax.imshow(c[i, 0], cmap=cmap, vmin=-v, vmax=v, interpolation="nearest")
        else:
            lo, hi = c[i].min(), c[i].max()
            rgb = (c[i] - lo) / (hi - lo) if hi > lo else np.zeros_like(c[i])
            ax.imshow(np.moveaxis(rgb, 0, -1), interpolation="nearest")  # (P, P, 3)
        _no_ticks(ax)
        ax.set_title(
            f"PC {i + 1}" + ("" if explained is None else f": {100 * explained[i]:.1f}%"),
            fontsize="small",
        )
    fig.suptitle(f"Embedding filters: first {k} principal components" if title is None else title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------
# Faithfulness: deletion and insertion curves
# ---------------------------------------------------------------------------------------


def faithfulness_curves(
    curves: Mapping[str, object],
    *,
    kind: str = "deletion",
    areas: Mapping[str, float] | None = None,
    chance: float | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Accuracy against the fraction of patches removed ("deletion") or inserted
    ("insertion"), one line per method, the area under each curve in the legend.

    `curves`: name -> (steps + 1,) accuracies; point s sits at x = s / steps, so x runs over
    [0, 1]. `areas`: name -> area, where given; otherwise `area_under_curve` (trapezoids).
    Deletion: a lower area is more faithful; insertion: a higher one. `chance` draws the
    accuracy of guessing (e.g. 0.1 for ten classes).
    """
    if kind not in ("deletion", "insertion"):
        raise ValueError(f"kind must be 'deletion' or 'insertion', got {kind!r}")
    if not curves:
        raise ValueError("expected at least one curve, got none")
    ys = {name: to_numpy(y) for name, y in curves.items()}
    for name, y in ys.items():
        if y.ndim != 1 or y.size < 2:
            raise ValueError(
                f"curve {name!r}: expected shape (steps + 1,) with steps >= 1, got {y.shape}"
            )
    fig, ax = _figure_axes(ax, (6.0, 4.0))
    for name, y in ys.items():
        area = areas[name] if areas is not None and name in areas else area_under_curve(y)
        ax.plot(
            np.linspace(0.0, 1.0, y.size), y, marker="o", ms=3, label=f"{name} (AUC {area:.3f})"
        )
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:g})")
    verb, better = ("removed", "lower") if kind == "deletion" else ("inserted", "higher")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"fraction of patches {verb}")
    ax.set_ylabel("accuracy")
    default = f"{kind.capitalize()} curve ({better} AUC = more faithful)"
    ax.set_title(default if title is None else title)
    ax.legend(fontsize="small")
    return fig


# ---------------------------------------------------------------------------------------
# Tokenizer feature maps (hybrid CNN, T2T)
# ---------------------------------------------------------------------------------------


def feature_maps(
    stages,
    *,
    image=None,
    channels: int = 4,
    index: int = 0,
    order: str = "first",
    cmap: str = ATTENTION_CMAP,
) -> Figure:
    """The feature maps of a tokenizer, one row per stage, for one image.

    `stages`: a list of (name, (C, h, w) or (B, C, h, w)) or a dict name -> tensor; for a
    batch, image `index` is shown. Each row: the mean over the C channels, then `channels`
    channels: the first ones (`order="first"`) or those with the largest mean activation
    over h x w, largest first (`order="strongest"`). Panels are titled "name: mean" and
    "name: ch c"; the first panel's y label gives (C, h, w). `image` ([0, 1] pixels, (H, W),
    (C, H, W) or a (B, C, H, W) batch) adds a first row with the input. Each panel has its
    own colour limits.
    """
    items = list(stages.items()) if isinstance(stages, Mapping) else list(stages)
    if not items:
        raise ValueError("expected at least one (name, feature map) stage, got none")
    if channels < 1:
        raise ValueError(f"channels must be at least 1, got {channels}")
    if order not in ("first", "strongest"):
        raise ValueError(f"order must be 'first' or 'strongest', got {order!r}")
    maps = []
    for name, t in items:
        a = to_numpy(t)
        if a.ndim == 4:
            if not 0 <= index < a.shape[0]:
                raise ValueError(
                    f"stage {name!r}: index {index} is outside a batch of {a.shape[0]}"
                )
            a = a[index]  # (C, h, w)
        if a.ndim != 3:
            raise ValueError(f"stage {name!r}: expected (C, h, w) or (B, C, h, w), got {a.shape}")
        maps.append((name, a))

    ncols = channels + 1
    nrows = len(maps) + int(image is not None)
    panel = min(1.8, MAX_WIDTH / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel * ncols, panel * nrows + 0.3), squeeze=False
    )
    if image is not None:
        img = to_numpy(image)
        img = img[index] if img.ndim == 4 else img
        _draw_image(axes[0, 0], _as_image(img, grey=False))
        axes[0, 0].set_title("input")
        for ax in axes[0, 1:]:
            ax.remove()
    for row, (name, a) in zip(axes[int(image is not None) :], maps, strict=True):
        C, h, w = a.shape
        if order == "first":
            picked = np.arange(min(channels, C))
        else:
            picked = np.argsort(-a.mean(axis=(1, 2)), kind="stable")[:channels]
        row[0].imshow(a.mean(axis=0), cmap=cmap, interpolation="nearest")
        row[0].set_title(f"{name}: mean", fontsize="small")
        row[0].set_ylabel(f"(C, h, w) =\n({C}, {h}, {w})", fontsize="small")
        for ax, ch in zip(row[1:], picked, strict=False):
            ax.imshow(a[ch], cmap=cmap, interpolation="nearest")
            ax.set_title(f"{name}: ch {ch}", fontsize="small")
        for ax in row[1 + len(picked) :]:
            ax.remove()
        for ax in row[: 1 + len(picked)]:
            _no_ticks(ax)
    fig.tight_layout()
    return fig
