"""The assembled ViT: parameter counts, parity with timm, heads, attention maps, errors."""

import re

import pytest
import torch
from test_t2t_vit import EXPECTED as EXPECTED_PARAMS_T2T

from vit_tutorial import (
    PRESETS,
    VisionTransformer,
    ViTConfig,
    count_parameters,
    create_model,
    get_config,
    list_models,
)
from vit_tutorial.interop import load_timm_state_dict, to_timm_state_dict
from vit_tutorial.vit import POOLS, token_grid

# Exact counts with 1000 classes. The source of each is timm's model of the same name
# (test_counts_equal_timm); the papers only round: ViT Table 1 gives 86M / 307M / 632M for
# Base / Large / Huge, DeiT Table 1 (Touvron et al. 2021) 5M / 22M for Tiny / Small. The
# hybrid is timm's vit_base_r50_s16_224 (tests/test_hybrid.py counts its parts). The
# T2T-ViT counts are pinned, and discussed, in tests/test_t2t_vit.py; the _28 models below
# are ours alone, checked by the formula for patch models and by test_hybrid's for the CNN.
EXPECTED_PARAMS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232,
    "vit_large_patch16_224": 304_326_632,
    "vit_large_patch32_224": 306_535_400,
    "vit_huge_patch14_224": 632_045_800,
    "vit_base_r50_s16_224": 98_659_112,
}


def meta_count(name: str, **overrides) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return count_parameters(create_model(name, **overrides))


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_paper_parameter_counts(name):
    assert meta_count(name) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_counts_equal_timm(timm, name):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
    assert count_parameters(model) == EXPECTED_PARAMS[name]


def backbone_params_by_formula(cfg: ViTConfig, num_patches: int) -> int:
    """Everything but the tokenizer, from the config: eq. 1-4 term by term."""
    D, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    block = (4 * D  # two LayerNorms
             + 3 * D * D + (3 * D if cfg.qkv_bias else 0) + D * D + D  # qkv and proj
             + D * hidden + hidden + hidden * D + D)  # the MLP
    pos = (num_patches + 1) * D if cfg.pos_embed == "learn" else 0  # T2T's table is fixed
    return (D + pos  # x_class and E_pos
            + cfg.depth * block + 2 * D  # the blocks and the final LayerNorm
            + D * cfg.num_classes + cfg.num_classes)  # the head


@pytest.mark.parametrize("name", list_models())
def test_preset_counts_follow_the_formula(name):
    pinned = {**EXPECTED_PARAMS, **EXPECTED_PARAMS_28, **EXPECTED_PARAMS_T2T}[name]
    with torch.device("meta"):
        model = create_model(name)
    cfg, tokenizer = model.config, count_parameters(model.patch_embed)
    if cfg.tokenizer == "patch":  # E is P*P*C -> D with a bias; the others count elsewhere
        assert tokenizer == cfg.patch_size**2 * cfg.in_chans * cfg.embed_dim + cfg.embed_dim
    assert tokenizer + backbone_params_by_formula(cfg, model.patch_embed.num_patches) == pinned


@pytest.mark.parametrize("name", list_models())
def test_every_preset_builds_and_takes_overrides(name):
    # 448 is a multiple of every patch size (4, 14, 16, 32) and of the hybrid's stride.
    with torch.device("meta"):
        model = create_model(name, img_size=448, num_classes=7, in_chans=2, depth=1)
    assert model.config.img_size == (448, 448)
    x = torch.empty(3, 2, 448, 448, device="meta")
    assert model(x).shape == (3, 7)


# The 28x28 Fashion-MNIST models (10 classes); the shipped checkpoints store them in
# float16, and the 12 MB limit a file allows at most 6M parameters.
EXPECTED_PARAMS_28 = {
    "vit_nano_patch4_28": 139_018,
    "vit_mini_patch4_28": 4_019_146,
    "vit_mini_r26_s4_28": 3_642_346,
    "vit_mini_r26_w48_s4_28": 4_764_058,
    "t2t_vit_mini_28": 3_588_412,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS_28))
def test_fashion_mnist_parameter_counts(name):
    assert meta_count(name) == EXPECTED_PARAMS_28[name] <= 6_000_000


def test_every_preset_is_tested_for_its_count():
    # Like vit_jax's models_test: every preset has a pinned parameter count, exactly one.
    tables = [EXPECTED_PARAMS, EXPECTED_PARAMS_28, EXPECTED_PARAMS_T2T]
    pinned = [name for table in tables for name in table]
    assert sorted(pinned) == list_models() == sorted(PRESETS)
    assert {n for n in PRESETS if n.endswith("_28")} == set(EXPECTED_PARAMS_28)


@pytest.mark.parametrize(
    "kw",
    [
        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10),
        dict(img_size=48, patch_size=16, embed_dim=96, depth=3, num_heads=3, num_classes=5),
        dict(img_size=(32, 48), patch_size=8, embed_dim=64, depth=2, num_heads=2),
        dict(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=4,
             num_classes=10, class_token=False, global_pool="avg"),
        dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2,
             num_classes=10, global_pool="avg"),
        # GAP over normalised tokens, as the official code does it (timm: fc_norm=False)
        dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
             num_classes=10, class_token=False, global_pool="avg", fc_norm=False),
    ],
)
def test_logits_equal_timm(timm, kw):
    timm_kw = dict(kw)
    ours_kw = dict(kw)
    if ours_kw.pop("global_pool", "token") == "avg":
        # timm normalises after the pooling unless told fc_norm=False
        ours_kw["pool"], ours_kw["fc_norm"] = "gap", ours_kw.get("fc_norm", True)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_kw).eval()
    ours = VisionTransformer(get_config("vit_base_patch16_224", **ours_kw)).eval()
    load_timm_state_dict(ours, ref.state_dict())
    x = torch.randn(2, kw.get("in_chans", 3), *ours.config.img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours.forward_head(ours.forward_features(x), pre_logits=True),
            ref.forward_head(ref.forward_features(x), pre_logits=True),
            atol=1e-5, rtol=1e-5,
        )
    back = to_timm_state_dict(ours)
    assert back.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(back[k], v), k


def test_hybrid_logits_equal_timm(timm):
    kw = dict(img_size=64, depth=2, num_classes=10)
    ref = timm.create_model("vit_base_r50_s16_224", pretrained=False, **kw).eval()
    ours = create_model("vit_base_r50_s16_224", **kw).eval()
    load_timm_state_dict(ours, ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    back = to_timm_state_dict(ours)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


def test_attention_maps_shape_and_rows():
    model = create_model("vit_nano_patch4_28").eval()
    x = torch.randn(3, 1, 28, 28)
    maps = model.get_attention_maps(x)
    assert maps.shape == (4, 3, 4, 50, 50)  # (depth, B, heads, N, N) with N = 49 + class token
    torch.testing.assert_close(maps.sum(-1), torch.ones(4, 3, 4, 50))
    # asking for maps does not change the (fused) forward pass
    model2 = create_model("vit_nano_patch4_28").eval()
    model2.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), model2(x))
    # map l is block l's attention on its own input, in the order of the blocks
    with torch.no_grad():
        z = model.embed(x)
        for block, weights in zip(model.blocks, maps, strict=True):
            _, expected = block.attn(block.norm1(z), return_attention=True)
            torch.testing.assert_close(weights, expected)
            z = block(z)


def test_forward_written_out_as_eq_1_to_4():
    model = create_model("vit_nano_patch4_28", depth=2).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        patches = x.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, 1, 7, 7, 4, 4)
        patches = patches.reshape(2, 49, 16)  # row by row, each patch flattened
        E = model.patch_embed.proj
        tokens = patches @ E.weight.reshape(64, 16).T + E.bias  # x_p E
        z = torch.cat([model.cls_token.weight.expand(2, 1, 64), tokens], 1)  # eq. 1
        z = z + model.pos_embed.weight
        torch.testing.assert_close(model.embed(x), z, atol=1e-5, rtol=1e-5)
        for block in model.blocks:  # eq. 2-3
            z = block(z)
        y = model.norm(z[:, 0])  # eq. 4: only the class token is read
        torch.testing.assert_close(model(x), model.head(y), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.forward_features(x)[:, 0], y, atol=1e-5, rtol=1e-5)


def test_default_config_is_vit_base_and_overrides_apply():
    with torch.device("meta"):
        model = VisionTransformer()
        small = VisionTransformer(ViTConfig(), depth=2, num_classes=7)
    assert model.config == ViTConfig() == get_config("vit_base_patch16_224")
    assert count_parameters(model) == EXPECTED_PARAMS["vit_base_patch16_224"]
    assert len(small.blocks) == 2 and small.head.out_features == 7
    assert small.config == ViTConfig(depth=2, num_classes=7)


def test_no_head_returns_the_pooled_features():
    model = create_model("vit_nano_patch4_28", num_classes=0).eval()
    assert isinstance(model.head, torch.nn.Identity)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x)[:, 0])
    assert model(x).shape == (2, model.num_features) == (2, 64)


def test_pre_logits_head():
    model = create_model("vit_nano_patch4_28", representation_size=32).eval()
    feats = model.forward_head(model.forward_features(torch.randn(2, 1, 28, 28)), pre_logits=True)
    assert feats.shape == (2, 32) and feats.abs().max() <= 1  # tanh
    assert model.head.in_features == 32
    z = torch.randn(2, 50, 64)  # forward_head on any z_L: tanh(W y + b) of the class token
    linear = model.pre_logits[0]
    expected = torch.tanh(z[:, 0] @ linear.weight.T + linear.bias)
    torch.testing.assert_close(model.forward_head(z, pre_logits=True), expected)
    torch.testing.assert_close(model.forward_head(z), model.head(expected))
    with pytest.raises(ValueError, match="pre-logits"):
        to_timm_state_dict(model)


def test_gap_without_class_token():
    model = create_model("vit_nano_patch4_28", class_token=False, pool="gap").eval()
    assert model.cls_token is None
    assert model.pos_embed.table().shape == (1, 49, 64)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.get_attention_maps(torch.randn(1, 1, 28, 28)).shape == (4, 1, 4, 49, 49)
    # GAP as the official code does it: normalise every token of z_L, then average
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        z = model.blocks(model.patch_embed(x) + model.pos_embed.weight)
        torch.testing.assert_close(model.forward_features(x), model.norm(z))
        torch.testing.assert_close(model(x), model.head(model.norm(z).mean(dim=1)))
    # fc_norm=True (timm's GAP): average z_L, then normalise the average
    fc = create_model("vit_nano_patch4_28", class_token=False, pool="gap", fc_norm=True).eval()
    fc.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fc.forward_features(x), z)
        torch.testing.assert_close(fc(x), fc.head(fc.norm(z.mean(dim=1))))
        assert not torch.allclose(fc(x), model(x), atol=1e-3)  # two different models
    # with a class token too, GAP averages the patch tokens only
    both = create_model("vit_nano_patch4_28", pool="gap").eval()
    z = torch.randn(2, 50, 64)
    torch.testing.assert_close(both.forward_head(z, pre_logits=True), z[:, 1:].mean(dim=1))
    with pytest.raises(ValueError, match='fc_norm=True normalises after pooling.*pool="gap"'):
        ViTConfig(fc_norm=True)


def test_pooling_is_one_table():
    assert set(POOLS) == {"token", "gap"}
    z = torch.randn(2, 5, 3)
    torch.testing.assert_close(POOLS["token"](z, 1), z[:, 0])
    torch.testing.assert_close(POOLS["gap"](z, 1), z[:, 1:].mean(dim=1))
    torch.testing.assert_close(POOLS["gap"](z, 0), z.mean(dim=1))


def test_num_features_is_what_the_head_reads():
    plain = create_model("vit_nano_patch4_28")
    assert plain.num_features == 64 == plain.head.in_features
    rep = create_model("vit_nano_patch4_28", representation_size=32).eval()
    assert rep.num_features == 32 == rep.head.in_features
    z = rep.forward_features(torch.randn(2, 1, 28, 28))
    assert rep.forward_head(z, pre_logits=True).shape == (2, rep.num_features)


@pytest.mark.parametrize("name", list_models())
def test_every_preset_knows_its_grid_without_building(name):
    cfg = get_config(name)
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    assert cfg.grid_size == token_grid(cfg) == tuple(model.patch_embed.grid_size)
    assert model.pos_embed.grid_size == cfg.grid_size


@pytest.mark.parametrize("tokenizer,field,value,reader", [
    ("patch", "hybrid_layers", (3, 4, 9), "'hybrid'"),
    ("patch", "t2t_kernels", ((7, 4, 2),), "'t2t'"),
    ("patch", "hybrid_width", 32, "'hybrid'"),
    ("t2t", "patch_size", 4, "'patch' or 'hybrid'"),
    ("t2t", "hybrid_stem", "small", "'hybrid'"),
    ("hybrid", "t2t_token_dim", 32, "'t2t'"),
])
def test_fields_of_another_tokenizer_are_refused(tokenizer, field, value, reader):
    extra = dict(hybrid_layers=(1,), patch_size=1) if tokenizer == "hybrid" else {}
    extra[field] = value
    with pytest.raises(ValueError, match=rf"tokenizer='{tokenizer}' does not read {field}="
                                         rf".*\(read by tokenizer {reader}\)"):
        ViTConfig(tokenizer=tokenizer, **extra)


def test_a_foreign_field_is_named_once():
    with pytest.raises(ValueError) as err:
        ViTConfig(tokenizer="t2t", patch_size=4)  # read by two tokenizers, named once
    assert str(err.value).count("patch_size=") == 1


def test_head_dropout_acts_in_training_only():
    model = create_model("vit_nano_patch4_28", drop_rate=0.5)
    z = torch.randn(4, 50, 64)
    model.train()
    dropped = model.forward_head(z, pre_logits=True)  # (B, D) after head_drop
    assert 0.3 < (dropped == 0).float().mean() < 0.7
    model.eval()
    torch.testing.assert_close(model.forward_head(z, pre_logits=True), model.pool(z))


def test_hybrid_reads_one_by_one_patches():
    with pytest.raises(ValueError, match="1x1 patches.*patch_size must be 1, got 16"):
        ViTConfig(tokenizer="hybrid", hybrid_layers=(3, 4, 9))
    with pytest.raises(ValueError, match="needs hybrid_layers"):
        ViTConfig(tokenizer="hybrid", patch_size=1)


def test_get_config_lists_the_known_fields_for_a_typo():
    with pytest.raises(ValueError, match=r"unknown ViTConfig fields \['embed_dims'\]; known "
                                         r"fields: \[.*'embed_dim'"):
        get_config("vit_nano_patch4_28", embed_dims=32)


def test_bad_input_errors():
    model = create_model("vit_nano_patch4_28")
    with pytest.raises(ValueError, match="expected 1 input channels, got 3"):
        model(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="does not match the model's 28x28.*resample_pos_embed"):
        model(torch.randn(1, 1, 56, 56))
    with pytest.raises(ValueError, match="not divisible by patch size"):
        create_model("vit_nano_patch4_28", img_size=30)
    with pytest.raises(ValueError, match="embed_dim 100 is not divisible by num_heads 3"):
        create_model("vit_nano_patch4_28", embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match=r"unknown model 'vit_base_patch16'; did you mean "
                                         r"vit_base_patch16_224"):
        create_model("vit_base_patch16")
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        ViTConfig(pool="max")
    with pytest.raises(ValueError, match='pool="token" needs class_token=True'):
        ViTConfig(class_token=False)
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        ViTConfig.from_dict({"depth": 2, "dropout": 0.1})
    with pytest.raises(TypeError):
        ViTConfig(depth=2).replace(layers=3)


def test_load_timm_state_dict_names_bad_keys():
    ours = create_model("vit_nano_patch4_28")
    sd = to_timm_state_dict(ours)
    sd.pop("head.bias")
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    sd["pos_embed"] = torch.zeros(1, 10, 64)
    with pytest.raises(ValueError) as e:
        load_timm_state_dict(ours, sd)
    msg = str(e.value)
    assert "missing keys ['head.bias']" in msg
    assert "unexpected keys ['blocks.0.attn.extra']" in msg
    assert "pos_embed.weight: expected (1, 50, 64), got (1, 10, 64)" in msg
    assert "resample_pos_embed" in msg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(depth=-1), "depth must be an int >= 0, got -1"),
        (dict(mlp_ratio=0), "mlp_ratio must be > 0, with a hidden width int(embed_dim * "
                            "mlp_ratio) >= 1, got 0"),
        (dict(norm_eps=0.0), "norm_eps must be > 0, got 0.0"),
        (dict(img_size=0), "img_size must be positive (height, width), got (0, 0)"),
        (dict(img_size=(-4, 28)), "img_size must be positive (height, width), got (-4, 28)"),
        (dict(hybrid_width=0), "hybrid_width must be a positive int, got 0"),
        (dict(t2t_token_dim=-1), "t2t_token_dim must be a positive int, got -1"),
        (dict(in_chans=0), "in_chans must be a positive int, got 0"),
        (dict(in_chans=-2), "in_chans must be a positive int, got -2"),
        (dict(in_chans=2.5), "in_chans must be a positive int, got 2.5"),
        (dict(num_heads=-3), "num_heads must be a positive int, got -3"),
        (dict(num_heads=0), "num_heads must be a positive int, got 0"),
        (dict(patch_size=0), "patch_size must be a positive int, got 0"),
        (dict(patch_size=-4), "patch_size must be a positive int, got -4"),
        (dict(embed_dim=8, num_heads=1, mlp_ratio=0.1), "int(embed_dim * mlp_ratio) >= 1, got 0.1"),
        (dict(num_classes=-1), "num_classes must be an int >= 0 (0: no head), got -1"),
        (dict(representation_size=-1), "representation_size must be None or an int >= 0, got -1"),
        (dict(drop_path_rate=1.0), "drop_path_rate must be in [0, 1), got 1.0"),
        (dict(attn_drop_rate=-0.1), "attn_drop_rate must be in [0, 1), got -0.1"),
    ],
)
def test_config_refuses_sizes_and_rates_out_of_range(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ViTConfig(**overrides)


def test_config_accepts_the_smallest_sizes():
    cfg = ViTConfig(num_classes=0, embed_dim=4, num_heads=1, mlp_ratio=0.25, depth=0,
                    representation_size=0, drop_rate=0.0, img_size=(16, 32))
    assert (cfg.num_classes, int(cfg.embed_dim * cfg.mlp_ratio)) == (0, 1)
    assert cfg.img_size == (16, 32)


def test_config_names_every_problem_at_once():
    with pytest.raises(ValueError, match=r"embed_dim must be a positive int, got 0; mlp_ratio"):
        ViTConfig(embed_dim=0)
    with pytest.raises(ValueError, match=r"^drop_rate must be in \[0, 1\), got 1; attn_drop_rate "
                                         r".* got 2; drop_path_rate .* got 3$"):
        ViTConfig(drop_rate=1, attn_drop_rate=2, drop_path_rate=3)  # in the fields' order


def test_init_follows_the_reference_code():
    model = create_model("vit_mini_patch4_28")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(not m.bias.any() for m in linears)  # zero biases, not PyTorch's uniform ones
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.std().item() / 0.02 - 1) < 0.05  # trunc_normal_(std=0.02)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
               for m in norms)
    conv = model.patch_embed.proj.weight  # PyTorch's fan-in uniform, bound 1/sqrt(16)
    assert conv.abs().max() <= 0.25 and conv.std() > 0.1


def test_no_weight_decay_names_the_tokens_tables_biases_and_norms():
    model = VisionTransformer(ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=16,
                                        depth=1, num_heads=2, pos_embed="learn2d"))
    skip = model.no_weight_decay()
    assert {"cls_token.weight", "pos_embed.row", "pos_embed.col", "pos_embed.prefix",
            "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias"} <= skip
    assert not {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"} & skip
    assert skip == {n for n, p in model.named_parameters()
                    if p.ndim <= 1 or n.startswith(("cls_token.", "pos_embed."))}
