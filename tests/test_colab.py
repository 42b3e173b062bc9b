"""The notebooks' first cell in a simulated Google Colab: it runs twice, and after a restart.

Colab is simulated: a stand-in `google.colab` module, the course's URL replaced by this
repository (cloned for real with git), a temporary folder in place of `/content`, and pip
replaced by a recorder that makes the clone importable the way `pip install -e` would (a
.pth file in a site folder). The environment's own editable install of `vit_tutorial` is
hidden, so the import can only succeed from the clone.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from notebook_format import repository_url

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(ROOT.glob("notebooks/[0-9]*.ipynb"))
URL = f'REPO_URL = "{repository_url()}"'

SITECUSTOMIZE = '''
import site, sys
# Hide the development install: only the clone may provide vit_tutorial.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in type(f).__module__
                    and "__editable__" not in getattr(f, "__module__", "")]
site.addsitedir({site_dir!r})
'''

RECORDER = '''
import json, os, subprocess, sys
_real_run = subprocess.run

def _run(cmd, *args, **kwargs):
    with open({log!r}, "a") as f:
        f.write(json.dumps(cmd) + "\\n")
    if cmd[1:4] == ["-m", "pip", "install"]:  # pip install -e HOME, as a .pth file
        with open(os.path.join({site_dir!r}, "course.pth"), "w") as f:
            f.write(cmd[-1] + "\\n")
        return subprocess.CompletedProcess(cmd, 0)
    return _real_run(cmd, *args, **kwargs)

subprocess.run = _run
'''


def first_cell(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def test_every_notebook_starts_with_the_same_set_up_cell():
    cells = {nb.name: first_cell(nb) for nb in NOTEBOOKS}
    assert len(set(cells.values())) == 1, sorted(cells)
    cell = next(iter(cells.values()))
    assert URL in cell and 'HOME = "/content/vit-tutorial"' in cell


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    """A fake Colab: google.colab, a site folder, a pip recorder and a /content stand-in."""
    tmp = tmp_path_factory.mktemp("colab")
    fake, site_dir, content = tmp / "fake", tmp / "site", tmp / "content"
    for d in (fake / "google" / "colab", site_dir, content):
        d.mkdir(parents=True)
    (fake / "google" / "__init__.py").write_text("")
    (fake / "google" / "colab" / "__init__.py").write_text("")
    (fake / "sitecustomize.py").write_text(SITECUSTOMIZE.format(site_dir=str(site_dir)))
    log = tmp / "calls.jsonl"
    cell = first_cell(NOTEBOOKS[0])
    assert URL in cell
    cell = cell.replace(URL, f"REPO_URL = {str(ROOT)!r}").replace(
        '"/content/vit-tutorial"', repr(str(content / "vit-tutorial")))
    program = "\n".join([
        RECORDER.format(log=str(log), site_dir=str(site_dir)),
        "import google.colab",
        cell,
        "print('vit_tutorial from', vt.__file__)",
        "print('data from', vt.data.DATA_DIR)",
    ])
    script = tmp / "cell.py"
    script.write_text(program + "\n\n# the same cell again, as a second run in this kernel\n"
                      + cell + "\n")

    def run() -> tuple[str, list[list[str]]]:
        before = log.read_text().splitlines() if log.exists() else []
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp, capture_output=True,
                              text=True, timeout=300,
                              env={"PYTHONPATH": str(fake), "PATH": "/usr/bin:/bin",
                                   "HOME": str(tmp)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        calls = log.read_text().splitlines()[len(before):] if log.exists() else []
        return proc.stdout, [json.loads(c) for c in calls]

    return run, content / "vit-tutorial"


def test_first_run_clones_and_installs_then_reruns_and_restarts_do_nothing(colab):
    run, home = colab
    out, calls = run()  # a fresh Colab kernel, the cell run twice
    assert [c[:2] for c in calls] == [["git", "clone"], [sys.executable, "-m"]]
    assert calls[1][-2:] == ["-e", str(home)]
    assert f"vit_tutorial from {home / 'vit_tutorial' / '__init__.py'}" in out
    assert f"data from {home / 'data'}" in out
    assert (home / "data" / "checkpoints" / "vit.safetensors").is_file()
    out, calls = run()  # "Restart and run all": the clone and the install are kept
    assert calls == []
    assert f"vit_tutorial from {home / 'vit_tutorial' / '__init__.py'}" in out


def test_the_package_does_not_pin_what_colab_ships():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.3"' in pyproject and "torch<" not in pyproject.replace(" ", "")
    assert '"ipywidgets>=7.7"' in pyproject
    assert "torchvision" not in pyproject
