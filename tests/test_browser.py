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
