"""Write MANIFEST.json for the shipped checkpoints: what each is and how it was made.

    python data/checkpoints/manifest.py          # about 5 minutes on 2 CPU cores

Everything but the test accuracy comes from the metadata that `python -m vit_tutorial.train`
stored in each checkpoint (preset, parent, seed, epochs, the exact command, training time,
GPU). The accuracy is measured here, on the CPU in float32, on all 10,000 test images, as
`python -m vit_tutorial.evaluate FILE` does, so `tests/test_shipped_checkpoints.py` can
demand the same count exactly. The GPU's own count at the end of training (bf16 training,
float32 weights before they were stored in float16) is kept beside it as `gpu_correct`.

It also writes `test_outputs.safetensors`: each model's prediction for every test image
and its logits for the first 1,000 (`vit_tutorial.evaluate.recorded_outputs`). Notebooks
read the predictions instead of spending minutes of CPU on them; `make checkpoints`
re-computes the logits, `make checkpoints-full` every prediction.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # run from a checkout without installing

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import vit_tutorial as vt  # noqa: E402
from vit_tutorial.checkpoint import atomic_write  # noqa: E402
from vit_tutorial.evaluate import RECORDED_FILE, RECORDED_LOGITS, evaluate, predict  # noqa: E402

# file -> kind (issue: `vit`, `hybrid`, `t2t`, `vit_hires`)
CHECKPOINTS = {
    "vit.safetensors": "vit",
    "hybrid.safetensors": "hybrid",
    "t2t.safetensors": "t2t",
    "vit_hires.safetensors": "vit_hires",
}


def entry(file: str, kind: str, outputs: dict) -> dict:
    path = HERE / file
    model, meta = vt.load_checkpoint(path)
    result = evaluate(model)
    images, _ = vt.load_fashion_mnist("test")
    outputs[f"{kind}.predictions"] = result["predictions"].to(torch.uint8)  # (10000,)
    outputs[f"{kind}.logits"] = predict(model, images[:RECORDED_LOGITS])  # (1000, 10)
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
    entries, outputs = [], {}
    for file, kind in CHECKPOINTS.items():
        entries.append(entry(file, kind, outputs))
        e = entries[-1]
        print(f"{file}: accuracy {e['accuracy']:.4f} ({e['correct']}/10000)", flush=True)
    text = json.dumps(entries, indent=1) + "\n"
    atomic_write(HERE / "MANIFEST.json", lambda tmp: Path(tmp).write_text(text))
    tensors = {k: v.contiguous() for k, v in outputs.items()}
    atomic_write(HERE / RECORDED_FILE, lambda tmp: save_file(tensors, tmp))


if __name__ == "__main__":
    main()
