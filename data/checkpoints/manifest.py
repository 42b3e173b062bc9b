"""Write MANIFEST.json for the shipped checkpoints: what each is and how it was made.

    python data/checkpoints/manifest.py          # about 4 minutes on 2 CPU cores

Everything but the test accuracy comes from the metadata that `python -m vit_tutorial.train`
stored in each checkpoint (preset, parent, seed, epochs, the exact command, training time,
GPU). The accuracy is measured here, on the CPU in float32, on all 10,000 test images, as
`python -m vit_tutorial.evaluate FILE` does, so `tests/test_shipped_checkpoints.py` can
demand the same count exactly. The GPU's own count at the end of training (bf16 training,
float32 weights before they were stored in float16) is kept beside it as `gpu_correct`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # run from a checkout without installing

import vit_tutorial as vt  # noqa: E402
from vit_tutorial.checkpoint import atomic_write  # noqa: E402
from vit_tutorial.evaluate import evaluate  # noqa: E402

# file -> kind (issue: `vit`, `hybrid`, `t2t`, `vit_hires`)
CHECKPOINTS = {
    "vit.safetensors": "vit",
    "hybrid.safetensors": "hybrid",
    "t2t.safetensors": "t2t",
    "vit_hires.safetensors": "vit_hires",
}


def entry(file: str, kind: str) -> dict:
    path = HERE / file
    model, meta = vt.load_checkpoint(path)
    result = evaluate(model)
    parent = meta.get("parent")
    return {
        "file": file,
        "kind": kind,
        "preset": meta["preset"],
        "parent": Path(parent).name if parent else None,
        "img_size": list(model.config.img_size),
        "parameters": vt.count_parameters(model),
        "accuracy": result["accuracy"],
        "correct": result["correct"],
        "gpu_correct": meta["correct"],
        "seed": meta["seed"],
        "epochs": meta["epochs"],
        "command": meta["command"],
        "train_seconds": meta["seconds"],
        # Runs made before the training command recorded `wall_seconds` have none.
        "wall_seconds": meta.get("wall_seconds"),
        "gpu": meta["device"],
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def main() -> None:
    entries = []
    for file, kind in CHECKPOINTS.items():
        entries.append(entry(file, kind))
        e = entries[-1]
        print(f"{file}: accuracy {e['accuracy']:.4f} ({e['correct']}/10000)", flush=True)
    text = json.dumps(entries, indent=1) + "\n"
    atomic_write(HERE / "MANIFEST.json", lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
