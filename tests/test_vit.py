"""The assembled ViT: parameter counts, parity with timm, heads, attention maps, errors."""

import re

import pytest
import torch
from conftest import count_params

from vit_tutorial import (
    PRESETS,
    VisionTransformer,
    ViTConfig,
    create_model,
    get_config,
    list_models,
)
from vit_tutorial.interop import load_timm_state_dict, to_timm_state_dict

timm = pytest.importorskip("timm")

# Exact counts with 1000 classes. The ViT numbers equal timm's and the paper's Table 1
# (86M / 307M / 632M, rounded there); the hybrid is timm's vit_base_r50_s16_224.
# T2T-ViT_t counts are discussed in tests/test_t2t_vit.py.
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
        return count_params(create_model(name, **overrides))


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_paper_parameter_counts(name):
    assert meta_count(name) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", ["vit_base_patch32_224", "vit_large_patch32_224"])
def test_counts_equal_timm(name):
    with torch.device("meta"):
        assert count_params(timm.create_model(name, num_classes=1000)) == EXPECTED_PARAMS[name]


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
    # Like vit_jax's models_test: every preset has a pinned parameter count.
    assert {n for n in PRESETS if n.endswith("_224")} <= set(EXPECTED_PARAMS)
    assert {n for n in PRESETS if n.endswith("_28")} == set(EXPECTED_PARAMS_28)


def timm_and_ours(timm_name, our_name, **kw):
    ref = timm.create_model(timm_name, pretrained=False, **kw).eval()
    ours = create_model(our_name, **kw).eval()
    load_timm_state_dict(ours, ref.state_dict())
    return ref, ours


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
    ],
)
def test_logits_equal_timm(kw):
    timm_kw = dict(kw)
    ours_kw = dict(kw)
    if ours_kw.pop("global_pool", "token") == "avg":
        ours_kw["pool"] = "gap"
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


def test_hybrid_logits_equal_timm():
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


def test_pre_logits_head():
    model = create_model("vit_nano_patch4_28", representation_size=32).eval()
    feats = model.forward_head(model.forward_features(torch.randn(2, 1, 28, 28)), pre_logits=True)
    assert feats.shape == (2, 32) and feats.abs().max() <= 1  # tanh
    assert model.head.in_features == 32
    with pytest.raises(ValueError, match="pre-logits"):
        to_timm_state_dict(model)


def test_gap_without_class_token():
    model = create_model("vit_nano_patch4_28", class_token=False, pool="gap").eval()
    assert model.cls_token is None
    assert model.pos_embed.table().shape == (1, 49, 64)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.get_attention_maps(torch.randn(1, 1, 28, 28)).shape == (4, 1, 4, 49, 49)


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
        (dict(in_chans=0), "in_chans must be a positive int, got 0"),
        (dict(num_heads=-3), "num_heads must be a positive int, got -3"),
        (dict(num_heads=0), "num_heads must be a positive int, got 0"),
        (dict(patch_size=0), "patch_size must be a positive int, got 0"),
        (dict(num_classes=-1), "num_classes must be an int >= 0 (0: no head), got -1"),
        (dict(representation_size=-1), "representation_size must be None or an int >= 0, got -1"),
        (dict(drop_path_rate=1.0), "drop_path_rate must be in [0, 1), got 1.0"),
        (dict(attn_drop_rate=-0.1), "attn_drop_rate must be in [0, 1), got -0.1"),
    ],
)
def test_config_refuses_sizes_and_rates_out_of_range(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ViTConfig(**overrides)


def test_config_names_every_problem_at_once():
    with pytest.raises(ValueError, match=r"embed_dim must be a positive int, got 0; mlp_ratio"):
        ViTConfig(embed_dim=0)


def test_no_weight_decay_names_the_tokens_tables_biases_and_norms():
    model = VisionTransformer(ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=16,
                                        depth=1, num_heads=2, pos_embed="learn2d"))
    skip = model.no_weight_decay()
    assert {"cls_token.weight", "pos_embed.row", "pos_embed.col", "pos_embed.prefix",
            "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias"} <= skip
    assert not {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"} & skip
    assert skip == {n for n, p in model.named_parameters()
                    if p.ndim <= 1 or n.startswith(("cls_token.", "pos_embed."))}
