"""Seeing inside a trained ViT: attention, relevance, distances, filters (notebook 09).

Numbers only: every function here returns tensors, and `notebooks/09_seeing_inside.ipynb`
draws them. They work for the three tokenizers (patch, hybrid, T2T), which share one
encoder, on any token grid, on the CPU.

    rollout                  attention rollout: Abnar & Zuidema 2020, "Quantifying
                             Attention Flow in Transformers". A_l = 0.5 W_l + 0.5 I (the
                             residual), rows renormalised, R = A_L ... A_1.
    class_relevance          Chefer, Gur & Wolf 2021 (ICCV), "Generic Attention-model
                             Explainability ...": the self-attention rule
                             R <- R + E_h[(grad A_l * A_l)^+] R, from R = I.
    patch_embed_components   ViT paper (Dosovitskiy et al. 2020) Fig. 7 left: principal
                             components of the patch-embedding filters.
    pos_embed_similarity     Fig. 7 centre: cosine similarity of the position embeddings.
    mean_attention_distance  Fig. 7 right and appendix D.7: how far each head looks.
    deletion_curve,          perturbation tests (the deletion and insertion metrics of
    insertion_curve          Petsiuk et al. 2018, "RISE"; Chefer et al. use the same test):
                             accuracy as the most relevant patches are removed or inserted.

Functions that run a model put it in eval mode (dropout and stochastic depth off) and
restore it afterwards, also when they raise: every module's training flag, every
attention module's `fused` flag and every parameter's requires_grad are as they were, and
no `.grad` is written.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .patches import check_image_batch
from .t2t import restructurize

__all__ = [
    "HEAD_FUSIONS",
    "attention_maps",
    "cls_attention",
    "to_grid",
    "rollout",
    "class_relevance",
    "token_stride",
    "mean_attention_distance",
    "pos_embed_similarity",
    "table_similarity",
    "patch_embed_components",
    "deletion_curve",
    "insertion_curve",
    "random_relevance",
    "curve_area",
    "tokenizer_feature_maps",
]

HEAD_FUSIONS = ("mean", "max", "min")


# ---------------------------------------------------------------------------------------
# Checks and the model guard


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_maps(maps: torch.Tensor) -> tuple[int, int, int, int]:
    """(L, B, H, N) of attention maps shaped (L, B, H, N, N), or a ValueError."""
    if not isinstance(maps, torch.Tensor) or maps.ndim != 5:
        raise ValueError(
            f"expected maps of shape (L, B, H, N, N) as get_attention_maps returns, "
            f"got {_shape(maps)}"
        )
    L, B, H, N, N2 = maps.shape
    if N != N2:
        raise ValueError(
            f"expected maps of shape (L, B, H, N, N) with as many keys as queries, "
            f"got {tuple(maps.shape)} ({N} queries, {N2} keys)"
        )
    if min(L, B, H, N) < 1:
        raise ValueError(
            f"expected non-empty maps of shape (L, B, H, N, N), got {tuple(maps.shape)}"
        )
    return L, B, H, N


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _pair(value, name: str, *, integer: bool = True) -> tuple:
    """An int (or number) or a pair of them, all positive, as a 2-tuple; else a ValueError."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, kind) and not isinstance(value, bool):
        pair = (value, value)
    else:
        try:
            pair = tuple(value)
        except TypeError:
            pair = ()
    ok = len(pair) == 2 and all(
        isinstance(v, kind) and not isinstance(v, bool) and v > 0 for v in pair
    )
    if not ok:
        what = "int" if integer else "number"
        raise ValueError(f"{name} must be a positive {what} or a pair (rows, cols), got {value!r}")
    return tuple(int(v) for v in pair) if integer else tuple(pair)


def _check_prefix(num_prefix_tokens, N: int, *, at_least: int = 0) -> int:
    if not _is_int(num_prefix_tokens) or not at_least <= num_prefix_tokens < N:
        raise ValueError(
            f"num_prefix_tokens must be an int in [{at_least}, N) = [{at_least}, {N}), "
            f"got {num_prefix_tokens!r}"
        )
    return int(num_prefix_tokens)


def _check_images(images: torch.Tensor) -> tuple[int, int, int, int]:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {_shape(images)}")
    return tuple(images.shape)


def _require_class_token(model: nn.Module, what: str) -> None:
    if getattr(model, "cls_token", None) is None or model.num_prefix_tokens < 1:
        cfg = model.config
        raise ValueError(
            f"{what} reads the class token's row, but this model has none "
            f"(class_token={cfg.class_token}, pool={cfg.pool!r}); expected a model with "
            f"class_token=True"
        )


def _float(x: torch.Tensor) -> torch.Tensor:
    """float32 unless already float64: the products below lose too much in half precision."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@contextmanager
def _inspecting(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; every training flag, `fused` flag and requires_grad back after.

    Flags are saved per module, not just the top one, because a model may hold sub-modules
    in different modes (a frozen, eval-mode backbone under a training head).
    """
    modes = [(m, m.training) for m in model.modules()]
    fused = [(m, m.fused) for m in model.modules() if hasattr(m, "fused")]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for m, flag in fused:
            m.fused = flag
        for p, flag in grads:
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------
# Raw attention and attention rollout


def attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Every block's attention weights in eval mode, (L, B, H, N, N), N counting the prefix."""
    _check_images(images)
    with _inspecting(model), torch.no_grad():
        return model.get_attention_maps(images)


@torch.no_grad()
def cls_attention(
    maps: torch.Tensor,
    *,
    layer: int,
    head: int | str | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Raw attention of the class token (query 0) to each patch: (B, N - prefix).

    `head` is an index, or "mean" (also None), "max" or "min" over the heads. `layer` may
    be negative (-1 is the last block). Read it with `to_grid` to plot it over the image.
    """
    L, B, H, N = _check_maps(maps)
    p = _check_prefix(num_prefix_tokens, N, at_least=1)
    if not _is_int(layer) or not -L <= layer < L:
        raise ValueError(f"layer must be an int in [-{L}, {L}) for {L} layers, got {layer!r}")
    w = maps[layer, :, :, 0, p:]  # (B, H, N - prefix)
    if head is None or head == "mean":
        return w.mean(dim=1)
    if head == "max":
        return w.amax(dim=1)
    if head == "min":
        return w.amin(dim=1)
    if _is_int(head) and -H <= head < H:
        return w[:, head]
    raise ValueError(
        f"head must be an int in [-{H}, {H}) for {H} heads or one of {HEAD_FUSIONS} (or None "
        f"for the mean), got {head!r}"
    )


def to_grid(vector: torch.Tensor, grid_size: int | tuple[int, int]) -> torch.Tensor:
    """(..., gh*gw) values in raster order -> (..., gh, gw), to draw over the image."""
    gh, gw = _pair(grid_size, "grid_size")
    if not isinstance(vector, torch.Tensor) or vector.ndim < 1 or vector.shape[-1] != gh * gw:
        raise ValueError(
            f"expected a tensor of shape (..., gh*gw) = (..., {gh * gw}) for the grid "
            f"{gh}x{gw}, got {_shape(vector)}"
        )
    return vector.reshape(*vector.shape[:-1], gh, gw)


def _fuse_heads(maps: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """(L, B, H, N, N) -> (L, B, N, N)."""
    if head_fusion == "mean":
        return maps.mean(dim=2)
    if head_fusion == "max":
        return maps.amax(dim=2)
    return maps.amin(dim=2)


def _discard_weakest(fused: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """Zero the floor(ratio * N^2) weakest of each (layer, sample)'s N x N fused weights.

    The class token's self weight W[0, 0] is never a candidate; every other entry is.
    Ties are broken by the row-major index: the earlier entry goes first.
    """
    L, B, N, _ = fused.shape
    # floor; the epsilon keeps float error (0.29 * 100 = 28.999...) from losing one entry
    k = min(int(discard_ratio * N * N + 1e-6), N * N - 1)
    if k == 0:
        return fused
    flat = fused.reshape(L, B, N * N).clone()  # (L, B, N*N), one row per sample and layer
    keys = flat.clone()
    keys[..., 0] = math.inf  # W[0, 0] sorts last, so it is never among the k weakest
    weakest = keys.argsort(dim=-1, stable=True)[..., :k]  # (L, B, k)
    flat.scatter_(-1, weakest, 0.0)
    return flat.reshape(L, B, N, N)


@torch.no_grad()
def rollout(
    maps: torch.Tensor, *, head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): (L, B, H, N, N) maps -> (B, N, N).

    Per layer, the heads are fused (`head_fusion`: "mean" as in the paper, "max" or
    "min") into W_l; with `discard_ratio` > 0 the weakest floor(discard_ratio * N^2)
    entries of each sample's W_l are zeroed, never W_l[0, 0] (the class token attending to
    itself). Then A_l = 0.5 W_l + 0.5 I for the residual connection, rows renormalised to
    sum to one, and R = A_L ... A_1. R[b, 0, 1:] is the class token's rollout over patches.
    """
    L, B, H, N = _check_maps(maps)
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"unknown head_fusion {head_fusion!r}; expected one of {HEAD_FUSIONS}")
    if not isinstance(discard_ratio, numbers.Real) or not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
    w = _fuse_heads(_float(maps), head_fusion)  # (L, B, N, N)
    if discard_ratio > 0:
        w = _discard_weakest(w, discard_ratio)
    eye = torch.eye(N, dtype=w.dtype, device=w.device)  # (N, N)
    a = 0.5 * w + 0.5 * eye  # (L, B, N, N)
    a = a / a.sum(dim=-1, keepdim=True)  # the diagonal's 0.5 keeps every row sum positive
    r = eye.expand(B, N, N)  # (B, N, N)
    for a_l in a:  # l = 1..L, so that R = A_L ... A_1
        r = a_l @ r
    return r


# ---------------------------------------------------------------------------------------
# Class-specific relevance (Chefer, Gur & Wolf 2021)


def _resolve_target(target, logits: torch.Tensor) -> torch.Tensor:
    B, C = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, device=logits.device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"target must be None, an int or a (B,) tensor of ints, got {target!r}")
    if t.ndim == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(
            f"expected target of shape (B,) = ({B},) for {B} images, got {tuple(t.shape)}"
        )
    if (t < 0).any() or (t >= C).any():
        raise ValueError(f"target classes must be in [0, {C}), got {t.tolist()}")
    return t.long()


def class_relevance(
    model: nn.Module, images: torch.Tensor, *, target: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Relevance of each patch token for the class `target`: (B, gh, gw), non-negative.

    Chefer, Gur & Wolf (ICCV 2021), the rule for self-attention: from R = I (N x N), for
    each layer l = 1..L, A_bar = E_h[(dy_t/dA_l * A_l)^+] (clamp, then mean over heads) and
    R <- R + A_bar R; the result is the class token's row R[0, prefix:] on the grid. y_t is
    the logit of `target`: None (each image's predicted class), an int, or a (B,) tensor.
    The attention weights are recomputed on the written-out path, so `fused` does not matter.
    """
    _require_class_token(model, "class_relevance")
    B = _check_images(images)[0]
    if model.config.num_classes < 1:
        raise ValueError("class_relevance needs a classification head, got num_classes=0")
    if target is not None:  # fail before the forward pass when the shape is already wrong
        _resolve_target(target, torch.zeros(B, model.config.num_classes, device=images.device))
    if torch.is_inference_mode_enabled():
        raise RuntimeError("class_relevance needs autograd; call it outside torch.inference_mode")
    gh, gw = model.patch_embed.grid_size
    p = model.num_prefix_tokens
    with _inspecting(model):
        with torch.no_grad():
            z = model.embed(images)  # (B, prefix + N, D); no gradient needed below the blocks
        with torch.enable_grad():
            # A leaf that requires grad puts every A_l in a graph, even if all weights are frozen;
            # autograd.grad then differentiates towards the A_l only: no parameter gets a .grad.
            x = z.detach().requires_grad_(True)
            weights = []
            for block in model.blocks:
                x, w = block(x, return_attention=True)  # w: (B, H, N, N)
                weights.append(w)
            feats = x if model.config.fc_norm else model.norm(x)  # as forward_features
            logits = model.forward_head(feats)  # (B, num_classes)
            t = _resolve_target(target, logits)  # (B,)
            # Images do not interact in eval mode, so the sum's gradient is every image's own.
            y = logits.gather(1, t[:, None]).sum()
            grads = torch.autograd.grad(y, weights)
        with torch.no_grad():
            N = z.shape[1]
            r = torch.eye(N, dtype=z.dtype, device=z.device).expand(B, N, N)  # (B, N, N)
            for a, g in zip(weights, grads, strict=True):
                a_bar = (g * a).clamp(min=0).mean(dim=1)  # (B, H, N, N) -> (B, N, N)
                r = r + a_bar @ r
    return r[:, 0, p:].reshape(B, gh, gw).detach()  # (B, gh, gw)


# ---------------------------------------------------------------------------------------
# ViT Fig. 7: attention distance, position similarity, patch-embedding filters


def token_stride(model: nn.Module) -> tuple:
    """Input pixels per token, (sh, sw) = img_size / grid_size, for any of the tokenizers.

    4 for all shipped 28-px models and the 56-px fine-tune (patch 4; the hybrid's stride-4
    CNN under 1x1 patches; T2T's 28 -> 14 -> 7 splits). Ints when they divide exactly.
    """
    tok = model.patch_embed
    (H, W), (gh, gw) = tok.img_size, tok.grid_size
    return tuple(s // g if s % g == 0 else s / g for s, g in ((H, gh), (W, gw)))


@torch.no_grad()
def mean_attention_distance(
    maps: torch.Tensor,
    *,
    grid_size: int | tuple[int, int],
    patch_size: int | float | tuple,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Mean attention distance in input pixels per layer and head, (L, H): ViT Fig. 7 right.

    Appendix D.7: for each query patch, the attention-weighted distance between patch
    centres (`patch_size` pixels apart: pass `token_stride(model)`), averaged over the
    queries and the images. Prefix tokens are dropped as queries and as keys, and each
    row is renormalised over the patch keys. Non-square grids and patches are fine.
    """
    L, B, H, N = _check_maps(maps)
    gh, gw = _pair(grid_size, "grid_size")
    ph, pw = _pair(patch_size, "patch_size", integer=False)
    p = _check_prefix(num_prefix_tokens, N)
    n = N - p
    if gh * gw != n:
        raise ValueError(
            f"grid {gh}x{gw} holds {gh * gw} patches, but the maps have "
            f"N - num_prefix_tokens = {N} - {p} = {n}"
        )
    w = _float(maps[..., p:, p:])  # (L, B, H, n, n), patches only
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=w.dtype, device=w.device) * ph,
        torch.arange(gw, dtype=w.dtype, device=w.device) * pw,
        indexing="ij",
    )
    rows, cols = rows.flatten(), cols.flatten()  # (n,) pixel offsets of the patch centres
    dist = torch.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None])  # (n, n)
    per_query = (w * dist).sum(dim=-1)  # (L, B, H, n)
    return per_query.mean(dim=(1, 3))  # (L, H)


@torch.no_grad()
def table_similarity(
    table: torch.Tensor, grid_size: int | tuple[int, int], *, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Cosine similarity of every grid position's embedding with every other: (gh, gw, gh, gw).

    `table` is (1, prefix + N, D) (or (prefix + N, D)), e.g. `model.pos_embed.table()` or a
    resampled table; its first `num_prefix_tokens` rows (the class token) are left out.
    """
    if isinstance(table, torch.Tensor) and table.ndim == 2:
        table = table[None]
    if not isinstance(table, torch.Tensor) or table.ndim != 3 or table.shape[0] != 1:
        raise ValueError(
            f"expected a position table of shape (1, prefix + N, D) or (prefix + N, D), "
            f"got {_shape(table)}"
        )
    gh, gw = _pair(grid_size, "grid_size")
    rows = table.shape[1]
    if not _is_int(num_prefix_tokens) or not 0 <= num_prefix_tokens < rows:
        raise ValueError(
            f"num_prefix_tokens must be an int in [0, {rows}) for a table of {rows} rows, "
            f"got {num_prefix_tokens!r}"
        )
    n = rows - num_prefix_tokens
    if gh * gw != n:
        raise ValueError(
            f"grid {gh}x{gw} holds {gh * gw} positions, but the table has {rows} rows - "
            f"{num_prefix_tokens} prefix = {n}"
        )
    t = F.normalize(_float(table[0, num_prefix_tokens:].detach()), dim=-1)  # (N, D)
    return (t @ t.T).reshape(gh, gw, gh, gw)


@torch.no_grad()
def pos_embed_similarity(model: nn.Module) -> torch.Tensor:
    """ViT Fig. 7 centre for `model`: (gh, gw, gh, gw) cosine similarities, class token excluded.

    Every table the package has: learned 1-D or 2-D, fixed 2-D or 1-D sin-cos, at any grid
    (a model loaded at 56 px has its table resampled to 14x14).
    """
    pe = model.pos_embed
    table = pe.table()  # (1, prefix + N, D) or None
    if table is None:
        raise ValueError(
            f"this model has no position embedding (pos_embed={model.config.pos_embed!r}); "
            f"expected one of 'learn', 'learn2d', 'sincos2d', 'sincos1d'"
        )
    return table_similarity(table, pe.grid_size, num_prefix_tokens=pe.num_prefix_tokens)


@torch.no_grad()
def patch_embed_components(model: nn.Module, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT Fig. 7 left: the first `k` principal components of the patch-embedding filters.

    Centred PCA over the D filters of `patch_embed.proj.weight` (D, C, P, P), each one
    vector of C*P*P values. Returns (components (k, C, P, P), unit norm, each with its
    largest-magnitude entry positive; explained_variance_ratio (k,) of the total variance).
    """
    tokenizer = getattr(getattr(model, "config", None), "tokenizer", None)
    proj = getattr(model.patch_embed, "proj", None)
    if tokenizer != "patch" or not isinstance(proj, nn.Conv2d):
        raise ValueError(
            f"patch_embed_components needs the patch tokenizer (tokenizer='patch', a linear "
            f"map of pixel patches); this model's tokenizer is {tokenizer!r}"
        )
    weight = proj.weight.detach()  # (D, C, ph, pw)
    D, C, ph, pw = weight.shape
    k_max = min(D, C * ph * pw)
    if not _is_int(k) or not 1 <= k <= k_max:
        raise ValueError(
            f"k must be an int in [1, {k_max}] (min(D={D}, C*P*P={C * ph * pw})), got {k!r}"
        )
    x = weight.reshape(D, C * ph * pw).double()  # (D, C*P*P), one filter a row
    x = x - x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # vh: (min(D, CPP), CPP)
    var = s.square()  # proportional to each component's variance
    comps = vh[:int(k)]  # (k, CPP)
    # An eigenvector's sign is arbitrary; fix it so the result does not depend on the solver.
    peak = comps.gather(1, comps.abs().argmax(dim=1, keepdim=True))  # (k, 1)
    comps = comps * torch.where(peak < 0, -1.0, 1.0)
    ratio = var[:int(k)] / var.sum().clamp_min(torch.finfo(var.dtype).tiny)
    return comps.reshape(int(k), C, ph, pw).to(weight.dtype), ratio.to(weight.dtype)


# ---------------------------------------------------------------------------------------
# Perturbation tests: deletion and insertion curves


def _check_relevance(relevance, B: int, grid: tuple[int, int]) -> torch.Tensor:
    gh, gw = grid
    ok = isinstance(relevance, torch.Tensor) and (
        tuple(relevance.shape) in ((B, gh, gw), (B, gh * gw))
    )
    if not ok:
        raise ValueError(
            f"expected relevance of shape (B, gh, gw) = ({B}, {gh}, {gw}) or (B, gh*gw) = "
            f"({B}, {gh * gw}), got {_shape(relevance)}"
        )
    return relevance.reshape(B, gh * gw)


def _perturbation_curve(
    model, images, labels, relevance, *, steps, baseline, batch_size, insert: bool
) -> torch.Tensor:
    B, _, Hi, Wi = _check_images(images)
    gh, gw = model.patch_embed.grid_size
    n = gh * gw
    labels = torch.as_tensor(labels, device=images.device)
    if labels.shape != (B,):
        raise ValueError(
            f"expected labels of shape (B,) = ({B},) for {B} images, got {tuple(labels.shape)}"
        )
    rel = _check_relevance(relevance, B, (gh, gw)).to(images.device)  # (B, n)
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    # Most relevant first; a stable sort puts equal relevances in raster order.
    order = torch.sort(rel, dim=1, descending=True, stable=True).indices  # (B, n)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=order.device).expand(B, n))  # rank of patch
    # Each pixel's token cell: cells are img_size / grid_size pixels (token_stride) wide.
    cell_row = torch.div(torch.arange(Hi, device=rank.device) * gh, Hi, rounding_mode="floor")
    cell_col = torch.div(torch.arange(Wi, device=rank.device) * gw, Wi, rounding_mode="floor")
    pixel_rank = rank[:, cell_row[:, None] * gw + cell_col[None, :]]  # (B, Hi, Wi)
    curve = []
    with _inspecting(model), torch.no_grad():
        for i in range(steps + 1):
            count = (2 * i * n + steps) // (2 * steps)  # round(i * n / steps), halves up
            # deletion: the `count` most relevant are the mean; insertion: all but them
            gone = pixel_rank >= count if insert else pixel_rank < count  # (B, Hi, Wi)
            correct = 0
            for s in range(0, B, batch_size):
                x = images[s : s + batch_size].masked_fill(gone[s : s + batch_size, None], baseline)
                pred = model(x).argmax(dim=1)  # (b,)
                correct += int((pred == labels[s : s + batch_size]).sum())
            curve.append(correct / B)
    return torch.tensor(curve)


def deletion_curve(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    relevance: torch.Tensor,
    *,
    steps: int,
    baseline: float = 0.0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Accuracy as the most relevant patches are removed first: (steps + 1,), from 0 removed.

    Step i replaces the round(i * N / steps) most relevant token cells (in input pixels,
    `token_stride` wide) of each image by `baseline`, the data mean (0 once normalised).
    `relevance` is (B, gh, gw) or (B, gh*gw); ties go in raster order. A good relevance map
    makes the curve fall fast (a low `curve_area`). One forward per step, `batch_size` images
    at a time.
    """
    return _perturbation_curve(
        model, images, labels, relevance,
        steps=steps, baseline=baseline, batch_size=batch_size, insert=False,
    )


def insertion_curve(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    relevance: torch.Tensor,
    *,
    steps: int,
    baseline: float = 0.0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Accuracy as the most relevant patches are inserted first: (steps + 1,), from 0 inserted.

    The reverse of `deletion_curve`: start from images that are all `baseline`, and at step
    i show the round(i * N / steps) most relevant cells. A good map makes it rise fast.
    """
    return _perturbation_curve(
        model, images, labels, relevance,
        steps=steps, baseline=baseline, batch_size=batch_size, insert=True,
    )


def random_relevance(
    batch_size: int,
    grid_size: int | tuple[int, int],
    *,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Uniform random relevance (B, gh, gw): the random-order baseline of the curves."""
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    gh, gw = _pair(grid_size, "grid_size")
    return torch.rand((batch_size, gh, gw), generator=generator, device=device)


def curve_area(curve: torch.Tensor) -> float:
    """Normalised area under a curve of equally spaced points: trapezoid rule over x in [0, 1]."""
    curve = torch.as_tensor(curve)
    if curve.ndim != 1 or curve.shape[0] < 2:
        raise ValueError(
            f"expected a curve of shape (steps + 1,) with steps >= 1, got {_shape(curve)}"
        )
    return float(torch.trapezoid(_float(curve), dx=1.0 / (curve.shape[0] - 1)))


# ---------------------------------------------------------------------------------------
# What the tokenizers see


@torch.no_grad()
def tokenizer_feature_maps(
    model: nn.Module, images: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """The tokenizer's intermediate feature maps as (name, (B, C, h, w)), in order.

    hybrid: "stem", then "stages.0", "stages.1", ... of the ResNet. T2T: the tokens after
    "attention1", "attention2", ... and "project", restructured on `stage_grids`. patch: "proj",
    the patch embeddings on the grid, (B, D, gh, gw).
    """
    B = _check_images(images)[0]
    tokenizer = model.config.tokenizer
    pe = model.patch_embed
    with _inspecting(model):
        if tokenizer == "hybrid":
            check_image_batch(images, in_chans=pe.in_chans, img_size=pe.img_size)
            x = pe.backbone.stem(images)  # (B, width, h, w)
            out = [("stem", x)]
            for name, stage in pe.backbone.stages.named_children():
                x = stage(x)  # (B, C_i, h_i, w_i)
                out.append((f"stages.{name}", x))
            return out
        if tokenizer == "t2t":
            _, stages = pe(images, return_stages=True)  # each (B, N_i, C_i)
            names = [f"attention{i}" for i in range(1, len(pe.kernels))] + ["project"]
            triples = zip(names, stages, pe.stage_grids, strict=True)
            return [(name, restructurize(t, grid)) for name, t, grid in triples]
        tokens = pe(images)  # (B, N, D)
        gh, gw = pe.grid_size
        return [("proj", tokens.transpose(1, 2).reshape(B, -1, gh, gw))]  # (B, D, gh, gw)
