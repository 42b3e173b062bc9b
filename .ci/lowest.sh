#!/usr/bin/env bash
# The unit tests against the lowest versions that pyproject.toml allows for the package's
# own dependencies (`torch>=2.3` -> torch==2.3, ...), in .venv-lowest. Not part of
# `make test`: it installs a second torch with its CUDA libraries (about 4 GB).
#   bash .ci/lowest.sh            (or: make test-lowest)
# The browser tests are left out: JupyterLab 4 draws widgets with ipywidgets 8 only, and the
# floor of 7.7 is there for Colab, whose own widget manager runs 7.7.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-lowest
pins=$($PY - <<'PYEOF'
import pathlib, re
text = pathlib.Path("pyproject.toml").read_text()
body = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S).group(1)
print("\n".join(s.replace(">=", "==") for s in re.findall(r'"([^"]+)"', body)))
PYEOF
)
echo "lowest versions: $(echo $pins)"
test -x $VENV/bin/python || $PY -m venv $VENV
printf '%s\n' $pins "torchvision==0.18" > $VENV/constraints.txt  # timm's torchvision, for torch 2.3
$VENV/bin/python -m pip install -q --upgrade pip
$VENV/bin/python -m pip install -q -c $VENV/constraints.txt $pins "torchvision==0.18"
$VENV/bin/python -m pip install -q -c $VENV/constraints.txt -e ".[dev]"
$VENV/bin/python -m pip list 2>/dev/null | grep -i -E "^(torch|torchvision|numpy|matplotlib|einops|ipywidgets|safetensors|tqdm|timm) "
$VENV/bin/pytest tests -q -m "not slow and not full" -p no:cacheprovider --deselect tests/test_browser.py
