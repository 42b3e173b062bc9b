# Set-up. In Google Colab this fetches the course and installs the package; elsewhere it
# does nothing (install with `make lab`, see README.md).
import sys

if "google.colab" in sys.modules:
    import subprocess

    REPO_URL = "https://github.com/vit-tutorial/vit-tutorial"  # this course's repository
    subprocess.run(["git", "clone", "-q", "--depth=1", REPO_URL, "/content/vit-tutorial"],
                   check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/vit-tutorial"],
                   check=True)
    sys.path.insert(0, "/content/vit-tutorial")

import torch

import vit_tutorial as vt

vt.set_seed(0)
device = torch.device("cpu")  # every notebook runs on a laptop CPU in seconds
