"""The embedded default bundle: generate the shapes world, train, export. `python app.py` calls
`build_default_bundle` when no bundle is in place; the README lists the same steps by hand."""

from __future__ import annotations

import json
from pathlib import Path

# The same settings as the README's step-by-step commands.
SHAPES_ARGS = ["--n-train", "8000", "--n-val", "500", "--n-test", "1000", "--seed", "0"]
TRAIN_ARGS = ["--epochs", "10", "--batch-size", "128", "--cnn-width", "24", "--seed", "0",
              "--threads", "2"]
FUSION_ARGS = ["--epochs", "4", "--seed", "0", "--threads", "2"]


def build_default_bundle(bundle_dir: Path | str, work_dir: Path | str = "runs/default",
                         shapes_args: list[str] | None = None,
                         train_args: list[str] | None = None,
                         fusion_args: list[str] | None = None) -> Path:
    """generate -> train -> train fusion -> export into bundle_dir; work_dir keeps the data and
    the runs, so an interrupted build resumes from its last epoch."""
    from export.onnx import export_bundle
    from training.__main__ import main as train_main
    from training.data.shapes import main as shapes_main
    from training.train_fusion import main as fusion_main

    work = Path(work_dir)
    data, run, fusion = work / "data", work / "run", work / "fusion"
    labels = data / "labels_test.json"
    if not labels.is_file() or "question_kinds" not in json.loads(labels.read_text()):
        print(f"[1/4] generating the shapes world in {data}", flush=True)
        shapes_main(["--out", str(data), *(shapes_args or SHAPES_ARGS)])
    print(f"[2/4] training the dual encoder in {run}", flush=True)
    train_main(["--data", str(data), "--out", str(run), *(train_args or TRAIN_ARGS)])
    print(f"[3/4] training the fusion models in {fusion}", flush=True)
    fusion_main(["--run", str(run), "--out", str(fusion), *(fusion_args or FUSION_ARGS)])
    print(f"[4/4] exporting the bundle to {bundle_dir}", flush=True)
    return export_bundle(run, bundle_dir, fusion_dir=fusion)
