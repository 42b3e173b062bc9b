"""The repository's promises about itself: environment.yml and pyproject.toml agree."""

import ast
import re
from pathlib import Path

import torch

import vit_tutorial

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def toml_list(name: str) -> set[str]:
    """The strings of a one-level TOML array `name = [...]` (tomllib is Python 3.11+ only)."""
    body = re.search(rf"^{name} = \[(.*?)^\]", PYPROJECT, re.M | re.S).group(1)
    return set(re.findall(r'"([^"]+)"', body))


def test_environment_yml_matches_pyproject():
    wanted = toml_list("dependencies") | toml_list("dev")
    assert "timm>=1.0.21" in wanted and "einops>=0.7" in wanted
    lines = (ROOT / "environment.yml").read_text().splitlines()
    pip_start = lines.index("  - pip:")
    listed = {
        m.group(1)
        for line in lines[pip_start + 1 :]
        if (m := re.fullmatch(r"\s+- (\S+)", line)) and not m.group(1).startswith("-e")
    }
    assert listed == wanted
    assert any(line.strip() == "- -e ." for line in lines[pip_start:])
    assert re.search(r"^name: vit-tutorial$", "\n".join(lines), re.M)


def test_public_api_is_importable_from_the_package():
    for name in ["create_model", "list_models", "VisionTransformer", "ViTConfig",
                 "resample_pos_embed", "MultiHeadAttention", "PatchEmbed", "patchify",
                 "unpatchify", "load_timm_state_dict", "to_timm_state_dict",
                 "save_checkpoint", "load_checkpoint", "HybridEmbed", "ResNetV2", "T2TModule",
                 "load_fashion_mnist", "FASHION_MNIST_CLASSES"]:
        assert hasattr(vit_tutorial, name), name
    assert f'version = "{vit_tutorial.__version__}"' in PYPROJECT


def test_readme_quick_start_is_two_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line for line in block.splitlines()[1:] if line.strip()]
    assert commands == ["make lab", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_set_seed_and_count_parameters():
    vit_tutorial.set_seed(3)
    a = torch.rand(3)
    vit_tutorial.set_seed(3)
    assert torch.equal(a, torch.rand(3))
    lin = torch.nn.Linear(4, 5)
    lin.bias.requires_grad_(False)
    assert vit_tutorial.count_parameters(lin) == 25
    assert vit_tutorial.count_parameters(lin, trainable_only=True) == 20


def test_no_test_module_skips_whole_on_timm():
    # Only the tests that compare with timm need it: they ask for conftest's `timm` fixture,
    # so the rest of a module still runs where timm is not installed.
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for stmt in ast.parse(path.read_text()).body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue  # inside a test or a fixture, a skip is per test
            for node in ast.walk(stmt):
                if (isinstance(node, ast.Call) and getattr(node.func, "attr", None)
                        == "importorskip" and node.args and isinstance(node.args[0], ast.Constant)):
                    assert not node.args[0].value.startswith("timm"), path.name
