"""What the documentation promises exists: every notebook that a README, a docstring or
another notebook names is in notebooks/, and the notebooks README lists every notebook."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {p.stem for p in ROOT.glob("notebooks/[0-9][0-9]_*.ipynb")}
# "notebooks/06_hybrid.ipynb", "`06_hybrid`", "09_seeing_inside": a two-digit name
NAME = re.compile(r"\b(\d\d_[a-z][a-z0-9_]*[a-z0-9])\b")


def _sources() -> dict[str, str]:
    files = [ROOT / "README.md", *ROOT.glob("*/README.md"), *ROOT.glob("vit_tutorial/*.py"),
             *ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("benchmarks/*.py")]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def test_every_named_notebook_exists():
    missing = {}
    for name, text in _sources().items():
        for stem in set(NAME.findall(text)) - NOTEBOOKS:
            missing.setdefault(stem, set()).add(name)
    assert not missing, f"named but not in notebooks/: {missing}"


def test_the_notebooks_readme_lists_every_notebook():
    readme = (ROOT / "notebooks" / "README.md").read_text()
    assert NOTEBOOKS and all(f"`{stem}`" in readme for stem in NOTEBOOKS), sorted(NOTEBOOKS)
