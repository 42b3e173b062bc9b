# Set-up. In Google Colab this fetches the course and installs the package (once: running
# it again, or "Restart and run all", reuses both); elsewhere it does nothing (install with
# `make lab`, see README.md).
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess

    REPO_URL = "https://github.com/vit-tutorial/vit-tutorial"  # this course's repository
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
device = torch.device("cpu")  # every notebook runs on a laptop CPU in seconds
