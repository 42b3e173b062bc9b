"""explain.py: rollout, relevance, attention distance, position similarity, filter PCA and the
perturbation curves, each against a case worked out by hand, then on the shipped models."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vit_tutorial as vt
from vit_tutorial import explain as ex
from vit_tutorial.evaluate import preprocess

CKPT_DIR = vt.data.DATA_DIR / "checkpoints"
KINDS = ("vit", "hybrid", "t2t", "vit_hires")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def tiny(**overrides) -> vt.VisionTransformer:
    """A one-block ViT on 8x12 images: a non-square 2x3 grid of 4x4 patches, 3 classes."""
    cfg = dict(img_size=(8, 12), patch_size=4, in_chans=1, num_classes=3, embed_dim=16,
               depth=1, num_heads=2, mlp_ratio=2.0)
    return vt.VisionTransformer(vt.ViTConfig(**{**cfg, **overrides}))


def tiny_hybrid() -> vt.VisionTransformer:
    return vt.create_model("vit_mini_r26_s4_28", depth=1, hybrid_width=8, embed_dim=24,
                           num_heads=2)


def tiny_t2t() -> vt.VisionTransformer:
    return vt.create_model("t2t_vit_mini_28", depth=1, embed_dim=24, num_heads=2,
                           t2t_token_dim=8)


@functools.cache
def fashion_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The first four test images (uint8) and their labels."""
    images, labels = vt.load_fashion_mnist("test")
    return images[:4].clone(), labels[:4].clone()


@functools.cache
def shipped(kind: str):
    """(model, normalised images, labels) for a shipped checkpoint; loaded once."""
    model, _ = vt.load_checkpoint(CKPT_DIR / f"{kind}.safetensors")
    images, labels = fashion_images()
    if kind == "vit_hires":  # the slowest: two images are enough
        images, labels = images[:2], labels[:2]
    return model.eval(), preprocess(images, model.config.img_size), labels


def softmax_maps(*shape) -> torch.Tensor:
    return torch.randn(*shape).softmax(dim=-1)


# --------------------------------------------------------------------------------------
# rollout, by hand: 3 tokens, 2 layers, 2 heads

I3 = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]
PERM = [[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]  # token i attends to token i + 1
UNIFORM = [[1 / 3] * 3] * 3
LAST = [[0.0, 0, 1]] * 3  # everyone attends to token 2
HAND_MAPS = torch.tensor([[[I3, PERM]], [[UNIFORM, LAST]]], dtype=torch.float64)  # (2, 1, 2, 3, 3)


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_rollout_mean_by_hand():
    # layer 1: mean = [[.5, .5, 0], ...]; A1 = 0.5 mean + 0.5 I, rows already sum to 1
    a1 = t64([[3 / 4, 1 / 4, 0], [0, 3 / 4, 1 / 4], [1 / 4, 0, 3 / 4]])
    # layer 2: mean = [[1/6, 1/6, 2/3]] * 3
    a2 = t64([[7 / 12, 1 / 12, 4 / 12], [1 / 12, 7 / 12, 4 / 12], [1 / 12, 1 / 12, 10 / 12]])
    r = ex.rollout(HAND_MAPS)
    assert r.shape == (1, 3, 3)
    torch.testing.assert_close(r[0], a2 @ a1)
    torch.testing.assert_close(r[0, 0], t64([25 / 48, 10 / 48, 13 / 48]))  # worked out on paper
    torch.testing.assert_close(ex.rollout(HAND_MAPS, head_fusion="mean"), r)


def test_rollout_max_and_min_by_hand():
    # max: layer 1 fuses to I + PERM, so A1 rows are [1, .5, 0] / 1.5
    a1 = t64([[2 / 3, 1 / 3, 0], [0, 2 / 3, 1 / 3], [1 / 3, 0, 2 / 3]])
    a2 = t64([[1 / 2, 1 / 8, 3 / 8], [1 / 8, 1 / 2, 3 / 8], [1 / 8, 1 / 8, 3 / 4]])
    r = ex.rollout(HAND_MAPS, head_fusion="max")
    torch.testing.assert_close(r[0], a2 @ a1)
    torch.testing.assert_close(r[0, 0], t64([11 / 24, 6 / 24, 7 / 24]))
    # min: layer 1 fuses to zeros (A1 = I), layer 2 to [[0, 0, 1/3]] * 3
    a2 = t64([[3 / 4, 0, 1 / 4], [0, 3 / 4, 1 / 4], [0, 0, 1]])
    torch.testing.assert_close(ex.rollout(HAND_MAPS, head_fusion="min")[0], a2)


def test_rollout_discard_is_per_sample_and_keeps_the_class_self_weight():
    # One layer, one head, two samples whose weakest entries are in different places.
    w0 = [[0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]]
    w1 = [[0.05, 0.55, 0.4], [0.3, 0.3, 0.4], [0.25, 0.25, 0.5]]
    maps = torch.tensor([[[w0], [w1]]], dtype=torch.float64)  # (1, 2, 1, 3, 3)
    # discard 1/3: floor(9 / 3) = 3 entries per sample, never W[0, 0].
    # sample 0 loses 0.1 at [2, 2] and both 0.2s; its W[0, 0] = 0.1 was not a candidate.
    # sample 1 loses both 0.25s and, of the two 0.3s, the first in raster order ([1, 0]);
    # its W[0, 0] = 0.05 is its weakest weight and stays.
    r = ex.rollout(maps, discard_ratio=1 / 3)
    # 0.5 W' + 0.5 I, each row divided by its sum
    r0 = t64([[0.55, 0.3, 0.15], [0, 5 / 8, 3 / 8], [5 / 19, 4 / 19, 10 / 19]])
    r1 = t64([[0.525, 0.275, 0.2], [0, 13 / 17, 4 / 17], [0, 0, 1]])
    torch.testing.assert_close(r[0], r0)
    torch.testing.assert_close(r[1], r1)
    # each sample alone gives the same: the discard never looks at the other sample
    torch.testing.assert_close(ex.rollout(maps[:, 1:], discard_ratio=1 / 3)[0], r1)
    # discard 0 is plain rollout
    plain = 0.5 * t64(w1) + 0.5 * t64(I3)
    torch.testing.assert_close(ex.rollout(maps, discard_ratio=0.0)[1], plain)


def test_rollout_of_one_layer_and_row_sums():
    maps = softmax_maps(1, 2, 4, 5, 5)
    expected = 0.5 * maps[0].mean(dim=1) + 0.5 * torch.eye(5)
    torch.testing.assert_close(ex.rollout(maps), expected)
    maps = softmax_maps(4, 3, 2, 6, 6)
    for fusion in ex.HEAD_FUSIONS:
        for ratio in (0.0, 0.5, 0.9):
            r = ex.rollout(maps, head_fusion=fusion, discard_ratio=ratio)
            assert r.shape == (3, 6, 6) and (r >= 0).all()
            torch.testing.assert_close(r.sum(dim=-1), torch.ones(3, 6))


def test_cls_attention_and_to_grid():
    maps = softmax_maps(2, 3, 4, 7, 7)
    torch.testing.assert_close(ex.cls_attention(maps, layer=-1, head=1), maps[1, :, 1, 0, 1:])
    torch.testing.assert_close(ex.cls_attention(maps, layer=0), maps[0, :, :, 0, 1:].mean(1))
    torch.testing.assert_close(ex.cls_attention(maps, layer=0, head="mean"),
                               ex.cls_attention(maps, layer=0, head=None))
    torch.testing.assert_close(ex.cls_attention(maps, layer=1, head="max"),
                               maps[1, :, :, 0, 1:].amax(1))
    torch.testing.assert_close(ex.cls_attention(maps, layer=1, head="min"),
                               maps[1, :, :, 0, 1:].amin(1))
    v = ex.cls_attention(maps, layer=1, head=0)  # (3, 6)
    grid = ex.to_grid(v, (2, 3))
    assert grid.shape == (3, 2, 3) and grid[2, 1, 0] == v[2, 3]  # raster order


# --------------------------------------------------------------------------------------
# mean attention distance


def offset_maps(grid, targets_per_head, *, prefix=1, cls_share=0.5):
    """(1, 1, H, N, N) maps: head h sends each patch query's weight to targets_per_head[h](r, c)
    (a list of (r, c, weight)), after `cls_share` to the class token; the class token's own
    row points at the farthest patch (it must be ignored)."""
    gh, gw = grid
    n = gh * gw
    share = 1 - cls_share if prefix else 1.0  # what the patch keys get in all
    maps = torch.zeros(1, 1, len(targets_per_head), prefix + n, prefix + n)
    for h, targets in enumerate(targets_per_head):
        if prefix:
            maps[0, 0, h, 0, -1] = 1.0
        for r in range(gh):
            for c in range(gw):
                q = prefix + r * gw + c
                if prefix:
                    maps[0, 0, h, q, 0] = cls_share
                for tr, tc, weight in targets(r, c):
                    maps[0, 0, h, q, prefix + tr * gw + tc] += weight * share
    return maps


def test_mean_attention_distance_fixed_offsets_on_a_non_square_grid():
    grid, (ph, pw) = (2, 3), (2, 5)  # non-square grid, non-square cells

    def side(c):
        return c + 1 if c + 1 < 3 else c - 1

    heads = [
        lambda r, c: [(r, side(c), 1.0)],  # one patch sideways: pw pixels
        lambda r, c: [(1 - r, c, 1.0)],  # the other row: ph pixels
        lambda r, c: [(1 - r, side(c), 1.0)],  # diagonal: hypot(ph, pw)
        lambda r, c: [(r, c, 0.5), (r, side(c), 0.5)],  # half on itself: pw / 2
    ]
    maps = offset_maps(grid, heads)
    d = ex.mean_attention_distance(maps, grid_size=grid, patch_size=(ph, pw))
    torch.testing.assert_close(d, torch.tensor([[5.0, 2.0, math.hypot(2, 5), 2.5]]))
    # two layers, two images: a second image that only attends to itself halves the mean
    still = offset_maps(grid, [lambda r, c: [(r, c, 1.0)]] * 4)
    layers = [torch.cat([maps, still], dim=1), torch.cat([still, still], dim=1)]
    maps2 = torch.cat(layers)  # (2, 2, 4, 7, 7)
    d2 = ex.mean_attention_distance(maps2, grid_size=grid, patch_size=(ph, pw))
    torch.testing.assert_close(d2, torch.stack([d[0] / 2, torch.zeros(4)]))


def test_mean_attention_distance_int_patch_and_no_prefix():
    # 1x4 grid, every patch attends two patches away: distance 2 * 4 pixels
    heads = [lambda r, c: [(0, (c + 2) % 4, 1.0)]]
    maps = offset_maps((1, 4), heads, prefix=0)
    d = ex.mean_attention_distance(maps, grid_size=(1, 4), patch_size=4, num_prefix_tokens=0)
    torch.testing.assert_close(d, torch.tensor([[8.0]]))


def test_token_stride_for_every_tokenizer():
    with torch.device("meta"):  # attributes only, nothing to compute
        assert ex.token_stride(tiny()) == (4, 4)
        assert ex.token_stride(vt.create_model("vit_mini_r26_s4_28")) == (4, 4)
        assert ex.token_stride(vt.create_model("t2t_vit_mini_28")) == (4, 4)
        assert ex.token_stride(vt.create_model("vit_mini_patch4_28", img_size=56)) == (4, 4)
        assert ex.token_stride(vt.create_model("vit_mini_patch4_28", img_size=(28, 56))) == (4, 4)
        # the hybrid's SAME padding gives ceil(30 / 4) = 8 tokens a side: 3.75 pixels each
        assert ex.token_stride(vt.create_model("vit_mini_r26_s4_28", img_size=30)) == (3.75, 3.75)


# --------------------------------------------------------------------------------------
# position-embedding similarity


def test_table_similarity_leaves_out_the_class_row():
    grid = (2, 3)
    table = torch.randn(1, 7, 5)
    table[0, 0] = 100.0  # a distinctive class-token row that must not appear
    sim = ex.table_similarity(table, grid)
    patches = table[0, 1:]
    expected = torch.tensor(
        [[F.cosine_similarity(patches[i], patches[j], dim=0).item() for j in range(6)]
         for i in range(6)]
    )
    assert sim.shape == (2, 3, 2, 3)
    torch.testing.assert_close(sim.reshape(6, 6), expected)
    torch.testing.assert_close(ex.table_similarity(table[0], grid), sim)  # (prefix + N, D)
    # one-hot rows are orthogonal: the identity; two equal rows: similarity 1
    onehot = torch.cat([torch.full((1, 6), 3.0), torch.eye(6)])[None]  # (1, 7, 6)
    torch.testing.assert_close(ex.table_similarity(onehot, grid).reshape(6, 6), torch.eye(6))
    onehot[0, 6] = onehot[0, 2]  # position (1, 2) now equals position (0, 1)
    sim = ex.table_similarity(onehot, grid)
    assert sim[1, 2, 0, 1] == pytest.approx(1.0) and sim[1, 2, 1, 1] == 0
    # no prefix: every row is a position
    torch.testing.assert_close(ex.table_similarity(table[:, 1:], grid, num_prefix_tokens=0),
                               ex.table_similarity(table, grid))


@pytest.mark.parametrize("kind", ["learn", "learn2d", "sincos2d", "sincos1d"])
def test_pos_embed_similarity_of_every_type(kind):
    model = tiny(pos_embed=kind)
    sim = ex.pos_embed_similarity(model)
    assert sim.shape == (2, 3, 2, 3)
    flat = sim.reshape(6, 6)
    torch.testing.assert_close(flat.diagonal(), torch.ones(6))
    torch.testing.assert_close(flat, flat.T)
    assert flat.abs().max() <= 1 + 1e-6
    if kind == "learn2d":  # [row_i; col_j]: dot products add, norms add in quadrature
        row, col = model.pos_embed.row.detach(), model.pos_embed.col.detach()
        i, j = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
        i, j = i.flatten(), j.flatten()
        dots = row[i] @ row[i].T + col[j] @ col[j].T
        norms = (row[i].square().sum(1) + col[j].square().sum(1)).sqrt()
        torch.testing.assert_close(flat, dots / norms[:, None] / norms[None])
    if kind == "sincos2d":  # the fixed 2-D table depends only on the offset between positions
        torch.testing.assert_close(sim[0, 0, 1, 1], sim[0, 1, 1, 2])
        torch.testing.assert_close(sim[0, 0, 0, 2], sim[1, 0, 1, 2])
    if kind == "sincos1d":  # ... and the 1-D table on the offset in raster order
        torch.testing.assert_close(flat[0, 1], flat[3, 4])
        torch.testing.assert_close(flat[0, 4], flat[1, 5])


def test_pos_embed_similarity_of_shipped_and_resampled_tables():
    for kind, grid in [("vit", 7), ("t2t", 7), ("vit_hires", 14)]:
        model = shipped(kind)[0]
        sim = ex.pos_embed_similarity(model)
        assert sim.shape == (grid,) * 4
        torch.testing.assert_close(sim.reshape(grid**2, grid**2).diagonal(), torch.ones(grid**2))
    # the 28-px ViT loaded at 56 px: its table is resampled to the 14x14 grid
    vit = shipped("vit")[0]
    big, _ = vt.load_checkpoint(CKPT_DIR / "vit.safetensors", img_size=56)
    sim = ex.pos_embed_similarity(big)
    assert sim.shape == (14, 14, 14, 14)
    resampled = vt.resample_pos_embed(vit.pos_embed.weight.detach(), (14, 14))
    torch.testing.assert_close(sim, ex.table_similarity(resampled, 14))
    # neighbours of a learned table are more alike than far-apart positions
    assert sim[7, 7, 7, 8] > sim[7, 7, 0, 0]


# --------------------------------------------------------------------------------------
# principal components of the patch-embedding filters


def pca_by_covariance(weight: torch.Tensor, k: int):
    """The same PCA another way: eigenvectors of the (CPP, CPP) covariance matrix."""
    x = weight.reshape(weight.shape[0], -1).double()  # (D, CPP)
    x = x - x.mean(0)
    cov = x.T @ x / (x.shape[0] - 1)  # (CPP, CPP)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    comps = vectors[:, :k].T  # (k, CPP)
    for c in comps:  # the sign rule: the largest-magnitude entry is positive
        if c[c.abs().argmax()] < 0:
            c.neg_()
    return comps, values[:k] / values.sum()


@pytest.mark.parametrize("which", ["tiny", "vit"])
def test_patch_embed_components_match_the_covariance_eigenvectors(which):
    model = tiny(in_chans=2, embed_dim=48) if which == "tiny" else shipped("vit")[0]
    weight = model.patch_embed.proj.weight.detach()  # (D, C, 4, 4)
    k = 6
    comps, ratio = ex.patch_embed_components(model, k)
    assert comps.shape == (k, *weight.shape[1:]) and ratio.shape == (k,)
    exp_comps, exp_ratio = pca_by_covariance(weight, k)
    torch.testing.assert_close(comps.reshape(k, -1).double(), exp_comps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ratio.double(), exp_ratio, atol=1e-6, rtol=1e-5)
    assert (ratio[:-1] >= ratio[1:]).all() and ratio.sum() <= 1
    flat = comps.reshape(k, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(k), atol=1e-5, rtol=0)
    # every component of all of them explains everything together
    full = min(weight.shape[0], weight[0].numel())
    assert ex.patch_embed_components(model, full)[1].sum() == pytest.approx(1.0, abs=1e-5)


def test_patch_embed_components_sign_convention_makes_them_deterministic():
    model = tiny(in_chans=2, embed_dim=48)
    comps, ratio = ex.patch_embed_components(model, 5)
    with torch.no_grad():
        model.patch_embed.proj.weight.neg_()  # the same filters up to sign: the same PCA
    comps2, ratio2 = ex.patch_embed_components(model, 5)
    torch.testing.assert_close(comps2, comps)
    torch.testing.assert_close(ratio2, ratio)
    assert all(c.flatten()[c.abs().argmax()] > 0 for c in comps)


# --------------------------------------------------------------------------------------
# deletion and insertion curves on a model whose answer is known exactly


class OneCellModel(nn.Module):
    """Class 1 while token cell (1, 2) of an 8x12 image (2x3 cells of 4x4) is intact, else 0.

    It records, per forward, how many images it saw and which cells were replaced (checking
    that each cell is all image or all baseline: a cell cut in two would be a geometry bug).
    """

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.img_size, self.patch_embed.grid_size = (8, 12), (2, 3)
        self.batches, self.removed = [], []

    def forward(self, x):
        cells = x.reshape(x.shape[0], 2, 4, 3, 4).transpose(2, 3)  # (B, 2, 3, 4, 4)
        lo, hi = cells.amin(dim=(-2, -1)), cells.amax(dim=(-2, -1))  # (B, 2, 3)
        assert torch.equal(lo, hi)
        self.batches.append(x.shape[0])
        self.removed.append(lo.flatten(1) == 0)  # (B, 6)
        score = cells[:, 1, 2].mean(dim=(-2, -1))  # (B,)
        return torch.stack([torch.full_like(score, 0.5), score], dim=1)  # (B, 2)


def relevance_with_rank(ranks, n=6, key=5):
    """(B, n) relevance where patch `key` is the ranks[b]-th most relevant of image b."""
    rel = torch.zeros(len(ranks), n)
    for b, rank in enumerate(ranks):
        others = [p for p in range(n) if p != key]
        order = others[:rank] + [key] + others[rank:]
        rel[b, order] = torch.arange(n, 0, -1, dtype=torch.float32)
    return rel


def test_deletion_and_insertion_curves_are_exactly_known():
    images, labels = torch.ones(4, 1, 8, 12), torch.ones(4, dtype=torch.long)
    rel = relevance_with_rank([0, 1, 3, 5])
    model = OneCellModel()
    deletion = ex.deletion_curve(model, images, labels, rel.reshape(4, 2, 3), steps=6)
    # the image stays right while its key cell is still there: rank >= number removed
    torch.testing.assert_close(deletion, torch.tensor([1, 0.75, 0.5, 0.5, 0.25, 0.25, 0]))
    assert [int(r.sum(1).max()) for r in model.removed] == list(range(7))
    insertion = ex.insertion_curve(model, images, labels, rel, steps=6)
    torch.testing.assert_close(insertion, torch.tensor([0, 0.25, 0.5, 0.5, 0.75, 0.75, 1]))
    # three steps: 0, 2, 4, 6 cells
    torch.testing.assert_close(ex.deletion_curve(model, images, labels, rel, steps=3),
                               torch.tensor([1, 0.5, 0.25, 0]))
    torch.testing.assert_close(ex.insertion_curve(model, images, labels, rel, steps=3),
                               torch.tensor([0, 0.5, 0.75, 1]))


def test_curves_remove_the_most_relevant_cells_in_chunks_and_break_ties_in_raster_order():
    images, labels = torch.ones(4, 1, 8, 12), torch.ones(4, dtype=torch.long)
    model = OneCellModel()
    rel = torch.randn(4, 6)
    ex.deletion_curve(model, images, labels, rel, steps=4, batch_size=3)
    assert model.batches == [3, 1] * 5  # one forward per step, in chunks of 3
    removed = torch.stack([torch.cat(model.removed[i : i + 2]) for i in range(0, 10, 2)])
    counts = [0, 2, 3, 5, 6]  # round(i * 6 / 4), halves up
    order = rel.argsort(dim=1, descending=True)
    for step, count in enumerate(counts):
        expected = torch.zeros(4, 6, dtype=torch.bool)
        expected.scatter_(1, order[:, :count], True)
        assert torch.equal(removed[step], expected), step
    # all relevances equal: cells go in raster order, so the key cell (the last) goes last
    model = OneCellModel()
    flat = ex.deletion_curve(model, images, labels, torch.zeros(4, 2, 3), steps=6)
    torch.testing.assert_close(flat, torch.tensor([1.0] * 6 + [0.0]))
    for count, seen in enumerate(model.removed):
        assert torch.equal(seen, (torch.arange(6) < count).expand(4, 6))


def test_random_relevance_and_curve_area():
    g = torch.Generator().manual_seed(1)
    a = ex.random_relevance(3, (2, 5), generator=g)
    b = ex.random_relevance(3, (2, 5), generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 2, 5) and torch.equal(a, b)
    assert not torch.equal(a, ex.random_relevance(3, (2, 5), generator=g))
    assert ex.curve_area(torch.tensor([1.0, 0.0])) == pytest.approx(0.5)
    assert ex.curve_area(torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert ex.curve_area(torch.tensor([0.0, 1.0, 1.0])) == pytest.approx(0.75)
    assert ex.curve_area([1.0, 0.5, 0.5, 0.0]) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------
# class relevance (Chefer et al.) against a written-out forward pass


def spread_weights(model: nn.Module) -> nn.Module:
    """float64 and larger random weights, so gradients and logits are far from zero."""
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def written_out_gradients(model, x, target):
    """Attention weights and dy_t/dA by hand: the blocks written out, retain_grad, backward."""
    z = model.embed(x)
    weights = []
    for blk in model.blocks:
        h = blk.norm1(z)
        B, N, D = h.shape
        att = blk.attn
        q, k, v = att.qkv(h).reshape(B, N, 3, att.num_heads, att.head_dim).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(att.head_dim), dim=-1)
        a.retain_grad()
        weights.append(a)
        z = z + att.proj((a @ v).transpose(1, 2).reshape(B, N, D))
        z = z + blk.mlp(blk.norm2(z))
    logits = model.head(model.norm(z)[:, 0])
    logits[torch.arange(len(x)), target].sum().backward()
    model.zero_grad(set_to_none=True)
    return logits.detach(), [(a.detach(), a.grad) for a in weights]


def test_class_relevance_of_one_layer_is_the_class_row_of_grad_times_attention():
    model = spread_weights(tiny(depth=1))
    x = torch.randn(2, 1, 8, 12, dtype=torch.float64)
    target = torch.tensor([0, 2])
    _, [(a, g)] = written_out_gradients(model, x, target)
    # R = I + A_bar: the class row of the identity is zero on the patches
    expected = (g * a).clamp(min=0).mean(dim=1)[:, 0, 1:].reshape(2, 2, 3)
    rel = ex.class_relevance(model, x, target=target)
    assert rel.shape == (2, 2, 3) and rel.dtype == torch.float64
    assert (expected > 0).any() and (rel >= 0).all()
    torch.testing.assert_close(rel, expected, rtol=1e-9, atol=1e-12)


def test_class_relevance_of_two_layers_is_the_product_form():
    model = spread_weights(tiny(depth=2))
    x = torch.randn(3, 1, 8, 12, dtype=torch.float64)
    logits, _ = written_out_gradients(model, x, torch.zeros(3, dtype=torch.long))
    predicted = logits.argmax(1)
    _, [(a1, g1), (a2, g2)] = written_out_gradients(model, x, predicted)
    eye = torch.eye(7, dtype=torch.float64)
    bar1, bar2 = ((g * a).clamp(min=0).mean(dim=1) for a, g in [(a1, g1), (a2, g2)])
    expected = ((eye + bar2) @ (eye + bar1))[:, 0, 1:].reshape(3, 2, 3)  # R_2 = (I + A2)(I + A1)
    rel = ex.class_relevance(model, x)  # target=None: the predicted classes
    torch.testing.assert_close(rel, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ex.class_relevance(model, x, target=predicted), rel)


def test_class_relevance_targets_int_and_tensor_agree_per_sample():
    model = spread_weights(tiny(depth=2))
    x = torch.randn(2, 1, 8, 12, dtype=torch.float64)
    r0 = ex.class_relevance(model, x, target=0)
    r2 = ex.class_relevance(model, x, target=2)
    torch.testing.assert_close(ex.class_relevance(model, x, target=torch.tensor([2, 2])), r2)
    torch.testing.assert_close(ex.class_relevance(model, x, target=torch.tensor(2)), r2)
    mixed = ex.class_relevance(model, x, target=torch.tensor([0, 2]))  # each its own target
    torch.testing.assert_close(mixed, torch.stack([r0[0], r2[1]]))
    assert not torch.allclose(r0, r2)


# --------------------------------------------------------------------------------------
# the model is left as found


def model_state(model):
    return (
        [m.training for m in model.modules()],
        [m.fused for m in model.modules() if hasattr(m, "fused")],
        [p.requires_grad for p in model.parameters()],
    )


CALLS = {
    "attention_maps": lambda m, x: ex.attention_maps(m, x),
    "class_relevance": lambda m, x: ex.class_relevance(m, x),
    "deletion_curve": lambda m, x: ex.deletion_curve(
        m, x, torch.zeros(len(x), dtype=torch.long),
        torch.rand(len(x), *m.patch_embed.grid_size), steps=2),
    "insertion_curve": lambda m, x: ex.insertion_curve(
        m, x, torch.zeros(len(x), dtype=torch.long),
        torch.rand(len(x), *m.patch_embed.grid_size), steps=2),
    "tokenizer_feature_maps": lambda m, x: ex.tokenizer_feature_maps(m, x),
    "pos_embed_similarity": lambda m, x: ex.pos_embed_similarity(m),
    "patch_embed_components": lambda m, x: ex.patch_embed_components(m, 3),
}
MODELS = {"patch": (tiny, (8, 12)), "hybrid": (tiny_hybrid, (28, 28)), "t2t": (tiny_t2t, (28, 28))}


def prepared(build):
    """A model in train mode, one sub-module in eval mode, one attention module unfused and
    some parameters frozen: every flag that must come back unchanged."""
    model = build().train()
    model.blocks[0].mlp.eval()
    model.blocks[-1].attn.fused = False
    model.pos_embed.requires_grad_(False)
    next(model.blocks[0].parameters()).requires_grad_(False)
    return model


CASES = [(name, tok) for name in sorted(CALLS) for tok in sorted(MODELS)
         if name != "patch_embed_components" or tok == "patch"]  # pixel filters: patch only


@pytest.mark.parametrize("name, tokenizer", CASES)
def test_model_is_left_as_found(name, tokenizer):
    build, size = MODELS[tokenizer]
    model = prepared(lambda: build(drop_path_rate=0.5) if tokenizer == "patch" else build())
    before = model_state(model)
    CALLS[name](model, torch.randn(2, 1, *size))
    assert model_state(model) == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["attention_maps", "class_relevance", "deletion_curve",
                                  "tokenizer_feature_maps"])
def test_model_is_left_as_found_when_the_call_raises(name):
    model = prepared(tiny)
    before = model_state(model)
    wrong = torch.randn(2, 1, 8, 8)  # the model reads 8x12: the tokenizer raises mid-call
    with pytest.raises(ValueError, match="does not match the model's 8x12"):
        if name == "deletion_curve":
            ex.deletion_curve(model, wrong, torch.zeros(2, dtype=torch.long),
                              torch.rand(2, 2, 3), steps=1)
        else:
            CALLS[name](model, wrong)
    assert model_state(model) == before
    assert all(p.grad is None for p in model.parameters())


def test_relevance_is_computed_in_eval_mode():
    model = tiny(depth=2, drop_path_rate=0.9, drop_rate=0.5)
    x = torch.randn(2, 1, 8, 12)
    expected = ex.class_relevance(model.eval(), x)
    maps = model.get_attention_maps(x)
    torch.testing.assert_close(ex.class_relevance(model.train(), x), expected)
    torch.testing.assert_close(ex.attention_maps(model, x), maps)
    assert model.training
    # frozen weights (the usual way to explain a model) still give gradients to the maps
    model.requires_grad_(False)
    torch.testing.assert_close(ex.class_relevance(model, x), expected)


# --------------------------------------------------------------------------------------
# the shipped checkpoints


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_checkpoints(kind):
    model, x, labels = shipped(kind)
    B = len(x)
    gh, gw = model.patch_embed.grid_size
    n = gh * gw
    L, H = model.config.depth, model.config.num_heads
    maps = ex.attention_maps(model, x)
    assert maps.shape == (L, B, H, n + 1, n + 1)

    for fusion, ratio in [("mean", 0.0), ("max", 0.9)]:
        r = ex.rollout(maps, head_fusion=fusion, discard_ratio=ratio)
        assert r.shape == (B, n + 1, n + 1) and (r >= 0).all()
        torch.testing.assert_close(r.sum(-1), torch.ones(B, n + 1))
    cls = ex.cls_attention(maps, layer=-1)
    assert cls.shape == (B, n) and (cls.sum(-1) <= 1 + 1e-5).all()

    rel = ex.class_relevance(model, x)
    assert rel.shape == (B, gh, gw) and (rel >= 0).all() and rel.isfinite().all()
    assert (rel.flatten(1).sum(1) > 0).all()
    with torch.no_grad():
        predicted = model(x).argmax(1)
    torch.testing.assert_close(ex.class_relevance(model, x, target=predicted), rel)

    stride = ex.token_stride(model)
    assert stride == (4, 4)
    dist = ex.mean_attention_distance(maps, grid_size=(gh, gw), patch_size=stride)
    far = math.hypot((gh - 1) * stride[0], (gw - 1) * stride[1])
    assert dist.shape == (L, H) and (dist >= 0).all() and (dist <= far).all()

    deletion = ex.deletion_curve(model, x, labels, rel, steps=2)
    insertion = ex.insertion_curve(model, x, labels, rel, steps=2)
    accuracy = (predicted == labels).float().mean()
    assert deletion[0] == insertion[-1] == accuracy
    assert deletion[-1] == insertion[0]  # both: every cell replaced by the mean
    assert 0 <= ex.curve_area(deletion) <= 1


def test_shipped_tokenizer_feature_maps():
    shapes = {
        "vit": [("proj", (192, 7, 7))],
        "hybrid": [("stem", (48, 28, 28)), ("stages.0", (192, 28, 28)),
                   ("stages.1", (384, 14, 14)), ("stages.2", (768, 7, 7))],
        "t2t": [("attention1", (64, 14, 14)), ("attention2", (64, 7, 7)),
                ("project", (192, 7, 7))],
    }
    for kind, expected in shapes.items():
        model, x, _ = shipped(kind)
        maps = ex.tokenizer_feature_maps(model, x[:2])
        assert [(name, tuple(t.shape[1:])) for name, t in maps] == expected
        assert all(t.shape[0] == 2 and not t.requires_grad for _, t in maps)
    # the patch tokenizer's map is the patch embedding itself, laid out on the grid
    model, x, _ = shipped("vit")
    [(_, fmap)] = ex.tokenizer_feature_maps(model, x[:2])
    with torch.no_grad():
        tokens = model.patch_embed(x[:2])  # (2, 49, 192)
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), tokens)


# --------------------------------------------------------------------------------------
# bad input


MAPS = softmax_maps(2, 4, 2, 5, 5)  # L=2, B=4, H=2, N=5
IMAGES, LABELS, REL = torch.ones(4, 1, 8, 12), torch.ones(4, dtype=torch.long), torch.rand(4, 2, 3)
STUB = OneCellModel()

BAD = [
    (lambda: ex.rollout(torch.rand(2, 3, 4, 4)),
     r"expected maps of shape \(L, B, H, N, N\).*got \(2, 3, 4, 4\)"),
    (lambda: ex.rollout(torch.rand(1, 1, 1, 3, 4)),
     r"N, N\) with as many keys as queries, got \(1, 1, 1, 3, 4\) \(3 queries, 4 keys\)"),
    (lambda: ex.rollout(MAPS, head_fusion="median"),
     r"unknown head_fusion 'median'; expected one of \('mean', 'max', 'min'\)"),
    (lambda: ex.rollout(MAPS, discard_ratio=1.0), r"discard_ratio must be in \[0, 1\), got 1.0"),
    (lambda: ex.rollout(MAPS, discard_ratio=-0.1), r"discard_ratio must be in \[0, 1\), got -0.1"),
    (lambda: ex.cls_attention(MAPS, layer=2),
     r"layer must be an int in \[-2, 2\) for 2 layers, got 2"),
    (lambda: ex.cls_attention(MAPS, layer=0, head=2),
     r"head must be an int in \[-2, 2\) for 2 heads or one of \('mean', 'max', 'min'\).*got 2"),
    (lambda: ex.cls_attention(MAPS, layer=0, head="median"), r"heads or one of .*got 'median'"),
    (lambda: ex.cls_attention(MAPS, layer=0, num_prefix_tokens=0),
     r"num_prefix_tokens must be an int in \[1, N\) = \[1, 5\), got 0"),
    (lambda: ex.cls_attention(torch.rand(4, 5, 5), layer=0),
     r"expected maps of shape \(L, B, H, N, N\).*got \(4, 5, 5\)"),
    (lambda: ex.mean_attention_distance(MAPS, grid_size=(3, 3), patch_size=4),
     r"grid 3x3 holds 9 patches, but the maps have N - num_prefix_tokens = 5 - 1 = 4"),
    (lambda: ex.mean_attention_distance(MAPS, grid_size=2, patch_size=0),
     r"patch_size must be a positive number or a pair \(rows, cols\), got 0"),
    (lambda: ex.mean_attention_distance(MAPS, grid_size=(2, 2, 1), patch_size=4),
     r"grid_size must be a positive int or a pair \(rows, cols\), got \(2, 2, 1\)"),
    (lambda: ex.mean_attention_distance(MAPS[0], grid_size=2, patch_size=4),
     r"expected maps of shape \(L, B, H, N, N\).*got \(4, 2, 5, 5\)"),
    (lambda: ex.to_grid(torch.rand(2, 5), (2, 3)),
     r"expected a tensor of shape \(\.\.\., gh\*gw\) = \(\.\.\., 6\) for the grid 2x3, "
     r"got \(2, 5\)"),
    (lambda: ex.table_similarity(torch.rand(7, 4, 2), (2, 3)),
     r"expected a position table of shape \(1, prefix \+ N, D\) or \(prefix \+ N, D\), "
     r"got \(7, 4, 2\)"),
    (lambda: ex.table_similarity(torch.rand(1, 7, 4), (2, 2)),
     r"grid 2x2 holds 4 positions, but the table has 7 rows - 1 prefix = 6"),
    (lambda: ex.pos_embed_similarity(tiny(pos_embed="none")),
     r"no position embedding \(pos_embed='none'\); expected one of 'learn', 'learn2d'"),
    (lambda: ex.class_relevance(tiny(class_token=False, pool="gap"), IMAGES),
     r"class_relevance reads the class token's row, but this model has none "
     r"\(class_token=False, pool='gap'\); expected a model with class_token=True"),
    (lambda: ex.class_relevance(tiny(), IMAGES, target=3),
     r"target classes must be in \[0, 3\), got \[3, 3, 3, 3\]"),
    (lambda: ex.class_relevance(tiny(), IMAGES, target=torch.tensor([0, 1, 2])),
     r"expected target of shape \(B,\) = \(4,\) for 4 images, got \(3,\)"),
    (lambda: ex.class_relevance(tiny(), IMAGES[0]),
     r"expected images of shape \(B, C, H, W\), got \(1, 8, 12\)"),
    (lambda: ex.patch_embed_components(tiny_hybrid(), 2),
     r"needs the patch tokenizer .*; this model's tokenizer is 'hybrid'"),
    (lambda: ex.patch_embed_components(tiny_t2t(), 2),
     r"needs the patch tokenizer .*; this model's tokenizer is 't2t'"),
    (lambda: ex.patch_embed_components(tiny(), 0),
     r"k must be an int in \[1, 16\] \(min\(D=16, C\*P\*P=16\)\), got 0"),
    (lambda: ex.patch_embed_components(tiny(embed_dim=32), 17),
     r"k must be an int in \[1, 16\] \(min\(D=32, C\*P\*P=16\)\), got 17"),
    (lambda: ex.deletion_curve(STUB, IMAGES, LABELS, REL, steps=0),
     r"steps must be an int >= 1, got 0"),
    (lambda: ex.insertion_curve(STUB, IMAGES, LABELS, torch.rand(4, 3, 3), steps=2),
     r"expected relevance of shape \(B, gh, gw\) = \(4, 2, 3\) or \(B, gh\*gw\) = \(4, 6\), "
     r"got \(4, 3, 3\)"),
    (lambda: ex.deletion_curve(STUB, IMAGES, LABELS, torch.rand(3, 6), steps=2),
     r"expected relevance of shape .* = \(4, 6\), got \(3, 6\)"),
    (lambda: ex.deletion_curve(STUB, IMAGES, LABELS[:3], REL, steps=2),
     r"expected labels of shape \(B,\) = \(4,\) for 4 images, got \(3,\)"),
    (lambda: ex.deletion_curve(STUB, IMAGES[:, 0], LABELS, REL, steps=2),
     r"expected images of shape \(B, C, H, W\), got \(4, 8, 12\)"),
    (lambda: ex.curve_area(torch.tensor([1.0])),
     r"expected a curve of shape \(steps \+ 1,\) with steps >= 1, got \(1,\)"),
    (lambda: ex.random_relevance(0, (2, 3)), r"batch_size must be an int >= 1, got 0"),
]


@pytest.mark.parametrize("call, match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_raises_a_value_error_naming_expected_and_received(call, match):
    with pytest.raises(ValueError, match=match):
        call()
