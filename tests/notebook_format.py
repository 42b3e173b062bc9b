"""What every notebook shares, in one place: the course map under the title, with the
"Open in Colab" link, and the set-up cell. `tests/test_notebook_format.py` checks each
notebook against them; after adding a notebook or changing this file, rewrite the headers
and set-up cells of all notebooks with

    .venv/bin/python tests/notebook_format.py

(markdown and the first code cell only: no outputs change, nothing needs re-executing).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"

# The short name of each notebook in the course map, in course order.
SHORT_NAMES = {
    "01_patching": "patches",
    "02_embeddings": "embeddings",
    "03_attention": "attention",
    "04_encoder": "encoder",
    "05_head_and_training": "head and training",
    "06_hybrid": "hybrid",
    "07_t2t": "Tokens-to-Token",
    "08_higher_resolution": "higher resolution",
    "09_seeing_inside": "seeing inside",
    "10_papers_experiments": "the papers' experiments",
}
MAP_START = "> **Course map:**"

SETUP_CELL = '''\
# Set-up. In Google Colab this fetches the course and installs the package (once: running
# it again, or "Restart and run all", reuses both); elsewhere it does nothing (install with
# `make lab`, see README.md).
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess

    REPO_URL = "{url}"  # this course's repository
    HOME = "/content/vit-tutorial"
    if not os.path.exists(os.path.join(HOME, "pyproject.toml")):
        subprocess.run(["git", "clone", "-q", "--depth=1", REPO_URL, HOME], check=True)
    try:
        import vit_tutorial  # noqa: F401
    except ImportError:  # pip keeps Colab's torch and ipywidgets: they meet the requirements
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", HOME], check=True)
        sys.path.insert(0, HOME)

import torch

import vit_tutorial as vt

vt.set_seed(0)
device = torch.device("cpu")  # every notebook runs on a laptop CPU in seconds'''


def repository_url() -> str:
    """The course's repository, written once: `[project.urls] Repository` in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^\[project\.urls\][^\[]*?^Repository\s*=\s*"([^"]+)"', text, re.M | re.S)
    if not match:
        raise ValueError("pyproject.toml has no [project.urls] Repository = \"...\"")
    return match.group(1).rstrip("/")


def colab_url(stem: str, url: str | None = None) -> str:
    """Colab's address of notebook `stem` on the repository's main branch (GitHub only)."""
    url = url or repository_url()
    prefix = "https://github.com/"
    if not url.startswith(prefix):
        raise ValueError(f"Colab opens notebooks from GitHub; the repository is {url}")
    return (f"https://colab.research.google.com/github/{url[len(prefix):]}"
            f"/blob/main/notebooks/{stem}.ipynb")


def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def course_map(stem: str, stems: list[str], url: str | None = None) -> str:
    """The title cell's second paragraph: where this notebook sits, and a Colab link."""
    parts = []
    for other in stems:
        label = f"{other[:2]} {SHORT_NAMES[other]}"
        parts.append(f"**{label}**" if other == stem else f"[{label}]({other}.ipynb)")
    return (f"{MAP_START} {' → '.join(parts)}  \n"
            f"> [Open this notebook in Colab]({colab_url(stem, url)})")


def setup_cell(url: str | None = None) -> str:
    return SETUP_CELL.format(url=url or repository_url())


def _source(cell: dict) -> str:
    s = cell["source"]
    return s if isinstance(s, str) else "".join(s)


def _set_source(cell: dict, text: str) -> None:
    lines = text.split("\n")
    cell["source"] = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def with_course_map(title: str, block: str) -> str:
    """`title` (a title cell's markdown) with its course map replaced, or inserted after
    the heading line."""
    paragraphs = title.split("\n\n")
    paragraphs = [p for p in paragraphs if not p.startswith(MAP_START)]
    return "\n\n".join([paragraphs[0], block, *paragraphs[1:]])


def rewrite(path: Path, stems: list[str], url: str) -> bool:
    """Put the course map and the set-up cell into one notebook; True if it changed."""
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    title = cells[0]
    if title["cell_type"] != "markdown" or not _source(title).startswith("# "):
        raise ValueError(f"{path.name}: the first cell must be the markdown title")
    before = json.dumps(nb)
    _set_source(title, with_course_map(_source(title), course_map(path.stem, stems, url)))
    code = next(c for c in cells if c["cell_type"] == "code")
    _set_source(code, setup_cell(url))
    if json.dumps(nb) == before:
        return False
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return True


def main() -> None:
    paths = notebooks()
    stems = [p.stem for p in paths]
    unknown = sorted(set(stems) - set(SHORT_NAMES))
    if unknown:
        sys.exit(f"error: add a short name for {unknown} to SHORT_NAMES in {__file__}")
    url = repository_url()
    for path in paths:
        if rewrite(path, stems, url):
            print(f"rewrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
