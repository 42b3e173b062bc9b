"""The widgets in a real browser: tests/browser.py drives tests/notebooks/browser_demo.ipynb.

The demo mimics the explorers of vit_tutorial.widgets (a layer slider, a head dropdown, a 3x3
patch grid, an overlay toggle, one PNG image, a state label and a status line). Each action
must redraw the image, update the label from the kernel, and bring no error to the console,
the kernel's messages, the outputs or the status line.
"""

from pathlib import Path

import pytest
from browser import browser_missing, open_notebook

NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"
PNG = b"\x89PNG\r\n\x1a\n"

MISSING = browser_missing()
pytestmark = [pytest.mark.browser, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


def state(layer: int, head: str, patch: tuple[int, int], overlay: bool) -> str:
    """The label the demo shows for a state (its `redraw` writes the same line)."""
    return f"layer={layer} head={head} patch={patch} overlay={overlay}"


def test_demo_widgets_redraw_in_the_browser():
    with open_notebook(NOTEBOOKS / "browser_demo.ipynb") as nb:
        nb.run_all()
        nb.wait_for_text(".vt-state", state(0, "head 0", (0, 0), True))
        src, png = nb.image_src(".vt-image"), nb.image_bytes(".vt-image")
        assert png.startswith(PNG)
        assert nb.by_description("Layer").get_attribute("class").split().count(
            "vt-layer-slider") == 1

        steps = [
            (lambda: nb.press(".vt-layer-slider", "ArrowRight"), state(1, "head 0", (0, 0), True)),
            (lambda: nb.click(".vt-patch-1-2"), state(1, "head 0", (1, 2), True)),
            (lambda: nb.select(".vt-head-dropdown", "mean"), state(1, "mean", (1, 2), True)),
            (lambda: nb.click(".vt-overlay-toggle"), state(1, "mean", (1, 2), False)),
            (lambda: nb.press(".vt-layer-slider", "ArrowRight", times=2),
             state(3, "mean", (1, 2), False)),
        ]
        for act, expected in steps:
            act()
            src = nb.wait_for_image_change(".vt-image", src)
            nb.wait_for_text(".vt-state", expected)
            new = nb.image_bytes(".vt-image")
            assert new.startswith(PNG) and new != png, expected
            png = new
        assert nb.kernel_eval("layer.value, head.value, chosen") == "(3, 'mean', {'patch': (1, 2)})"
        nb.assert_no_errors()

        # The harness catches a broken callback at once: a traceback, or an error in the
        # status line (where the explorers report the errors they catch).
        nb.kernel_exec("layer.observe(lambda change: 1 / 0, names='value')")
        nb.press(".vt-layer-slider", "ArrowLeft")
        with pytest.raises(AssertionError, match="ZeroDivisionError"):
            nb.wait_for_text(".vt-state", "never shown")
        nb.clear_errors()
        nb.kernel_exec("status.value = 'error: ValueError: no such head'")
        with pytest.raises(AssertionError, match="status: error: ValueError: no such head"):
            nb.wait_for_text(".vt-state", "never shown")
        assert any("ipykernel" in " ".join(p.cmdline()) for p in nb.lab.descendants())
    assert nb.lab.survivors() == [], "JupyterLab or a kernel outlived the test"


# ---------------------------------------------------------------------------------------
# The explorers of notebook 09, as a learner uses them
# ---------------------------------------------------------------------------------------

NOTEBOOK_09 = Path(__file__).resolve().parent.parent / "notebooks" / "09_seeing_inside.ipynb"


def _explorer_notebook(tmp_path: Path) -> Path:
    """Notebook 09's set-up cell and its two explorer cells, in a notebook of their own."""
    import nbformat

    nb = nbformat.read(NOTEBOOK_09, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    explorers = [c for c in code if "vt.widgets." in c.source]
    assert len(explorers) == 2, "notebook 09 shows AttentionExplorer and PosEmbedExplorer"
    cells = [nbformat.v4.new_code_cell(c.source) for c in [code[0], *explorers]]
    path = tmp_path / "explorers.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata=nb.metadata), path)
    return path


def test_notebook_09_explorers_follow_every_control(tmp_path):
    pic = ".vt-attention-explorer .vt-picture"
    with open_notebook(_explorer_notebook(tmp_path), timeout=90) as nb:
        nb.run_all()
        src = nb.image_src(pic)
        assert nb.image_bytes(pic).startswith(PNG)

        def method(label):
            return lambda: nb.page.locator(".vt-method button", has_text=label).first.click()

        steps = [  # (what a person does, what the kernel-side view must then say)
            (lambda: nb.press(".vt-layer", "ArrowRight"), "explorer.current.layer", "2"),
            (lambda: nb.click(".vt-attention-explorer .vt-patch-2-3"),
             "explorer.current.query", "(2, 3)"),
            (method("rollout"), "explorer.current.method", "'rollout'"),
            (method("class relevance"), "explorer.current.method", "'relevance'"),
            (lambda: nb.select(".vt-model", "hybrid"), "explorer.current.model", "'hybrid'"),
        ]
        for act, expression, expected in steps:
            act()
            src = nb.wait_for_image_change(pic, src, timeout=60)
            nb.wait_until(lambda e=expression, v=expected: nb.kernel_eval(e) == v,
                          f"{expression} == {expected}", timeout=60)
        # The map drawn is the one explain computes for that view.
        nb.kernel_exec(
            "import numpy as np\n"
            "from vit_tutorial import explain\n"
            "from vit_tutorial.evaluate import preprocess\n"
            "v = explorer.current\n"
            "m = explorer._models[v.model]\n"
            "x = preprocess(explorer._images[v.index][None], m.config.img_size)\n"
            "ok = np.allclose(v.map, explain.class_relevance(m, x, target=None)[0].numpy(),"
            " atol=1e-5)\n")
        assert nb.kernel_eval("ok") == "True"

        grid = ".vt-pos-explorer .vt-pos-map"
        src = nb.image_src(grid)
        nb.click(".vt-pos-patch-1-1")
        src = nb.wait_for_image_change(grid, src, timeout=60)
        nb.page.locator(".vt-pos-resolution button", has_text="56 px").first.click()
        nb.wait_for_image_change(grid, src, timeout=60)
        nb.wait_until(lambda: nb.kernel_eval("pos_explorer.current.resolution") == "56",
                      "pos_explorer.current.resolution == 56", timeout=60)
        # ipykernel logs "No such comm" when the page still talks to a widget the explorer
        # has just replaced (the patch grid of another model): harmless, and not an error.
        errors = [e for e in nb.errors() if "No such comm" not in e]
        assert not errors, "errors reached the browser:\n" + "\n".join(errors)
    assert nb.lab.survivors() == [], "JupyterLab or a kernel outlived the test"
