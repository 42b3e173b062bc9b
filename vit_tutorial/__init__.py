"""vit_tutorial: the Vision Transformer, built step by step. One module per notebook."""

import importlib

from . import augment, explain
from .attention import MultiHeadAttention, attend, scaled_dot_product_attention
from .checkpoint import load_checkpoint, read_metadata, save_checkpoint
from .data import (
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    load_photo,
    preprocess,
)
from .embeddings import (
    POS_EMBED_TYPES,
    ClassToken,
    LearnedPosEmbed,
    LearnedPosEmbed2D,
    NoPosEmbed,
    RelativePosEmbed,
    RelativePositionLogits,
    SinCosPosEmbed1D,
    SinCosPosEmbed2D,
    build_pos_embed,
    resample_pos_embed,
    sincos_1d_table,
    sincos_2d_table,
)
from .encoder import Block, DropPath, Encoder, Mlp, drop_path
from .hybrid import HybridEmbed, ResNetV2, StdConv2d
from .interop import load_timm_state_dict, to_timm_state_dict
from .patches import (
    LinearPatchEmbed,
    PatchEmbed,
    conv_to_linear_weights,
    linear_to_conv_weights,
    patchify,
    unpatchify,
)
from .presets import PRESETS, create_model, get_config, list_models
from .t2t import T2TModule, TokenPerformer, TokenTransformer, restructurize, soft_split
from .utils import count_parameters, set_seed
from .vit import TOKENIZERS, Tokenizer, VisionTransformer, ViTConfig

__version__ = "0.1.0"

_LAZY = ("plots", "widgets")  # they import matplotlib and ipywidgets: only when asked for


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
