"""Every notebook carries the course map with its Colab link and the one set-up cell, all
built from the repository address written once in pyproject.toml (tests/notebook_format.py)."""

import json

import pytest
from notebook_format import (
    MAP_START,
    ROOT,
    SHORT_NAMES,
    colab_url,
    course_map,
    notebooks,
    repository_url,
    setup_cell,
    with_course_map,
)

PATHS = notebooks()
STEMS = [p.stem for p in PATHS]
FIX = "run `.venv/bin/python tests/notebook_format.py` to rewrite it"


def cells(path):
    return [("".join(c["source"]), c["cell_type"]) for c in json.loads(path.read_text())["cells"]]


def test_the_repository_address_is_written_once_in_pyproject():
    assert repository_url() == "https://github.com/vit-tutorial/vit-tutorial"
    assert (colab_url("01_patching") == "https://colab.research.google.com/github/"
            "vit-tutorial/vit-tutorial/blob/main/notebooks/01_patching.ipynb")
    with pytest.raises(ValueError, match="Colab opens notebooks from GitHub.*gitlab"):
        colab_url("01_patching", "https://gitlab.com/x/y")


def test_every_notebook_has_a_short_name_in_the_map():
    assert STEMS and set(STEMS) <= set(SHORT_NAMES), sorted(set(STEMS) - set(SHORT_NAMES))
    assert list(SHORT_NAMES) == sorted(SHORT_NAMES)  # course order is file order


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_title_cell_carries_the_course_map_and_colab_link(path):
    (title, kind), *_ = cells(path)
    assert kind == "markdown" and title.startswith(f"# {path.stem[:2]} · ")
    heading, block, *_ = title.split("\n\n")
    assert block == course_map(path.stem, STEMS), f"{path.name}: stale course map; {FIX}"
    assert f"**{path.stem[:2]} {SHORT_NAMES[path.stem]}**" in block  # you are here
    assert f"[Open this notebook in Colab]({colab_url(path.stem)})" in block
    for other in STEMS:
        assert other == path.stem or f"({other}.ipynb)" in block


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_first_code_cell_is_the_set_up_cell(path):
    first_code = next(src for src, kind in cells(path) if kind == "code")
    assert first_code == setup_cell(), f"{path.name}: set-up cell differs; {FIX}"
    assert f'REPO_URL = "{repository_url()}"' in first_code


def test_with_course_map_replaces_an_old_map_and_keeps_the_rest():
    title = "# 01 · T\n\n> **Course map:** old  \n> old link\n\n*Question?*\n\nText."
    new = with_course_map(title, f"{MAP_START} new")
    assert new == f"# 01 · T\n\n{MAP_START} new\n\n*Question?*\n\nText."
    assert with_course_map("# 02 · U\n\nText.", "MAP") == "# 02 · U\n\nMAP\n\nText."


def test_readmes_link_every_notebook_to_colab():
    readme = (ROOT / "notebooks" / "README.md").read_text()
    for stem in STEMS:
        assert colab_url(stem) in readme, stem
    assert colab_url(STEMS[0]) in (ROOT / "README.md").read_text()
