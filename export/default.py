"""The embedded default bundle: generate the shapes world, train, export. `python app.py` calls
`build_default_bundle` when no bundle is in place; the README lists the same steps by hand."""

from __future__ import annotations

from pathlib import Path

# The same settings as the README's step-by-step commands.
SHAPES_ARGS = ["--n-train", "8000", "--n-val", "500", "--n-test", "1000", "--seed", "0"]
TRAIN_ARGS = ["--epochs", "10", "--batch-size", "128", "--cnn-width", "24", "--seed", "0",
              "--threads", "2"]


def build_default_bundle(bundle_dir: Path | str, work_dir: Path | str = "runs/default",
                         shapes_args: list[str] | None = None,
                         train_args: list[str] | None = None) -> Path:
    """generate -> train -> export into bundle_dir; work_dir keeps the data and the run, so an
    interrupted build resumes from its last epoch."""
    from export.onnx import export_bundle
    from training.__main__ import main as train_main
    from training.data.shapes import main as shapes_main

    work = Path(work_dir)
    data, run = work / "data", work / "run"
    if not (data / "captions_test.json").is_file():
        print(f"[1/3] generating the shapes world in {data}", flush=True)
        shapes_main(["--out", str(data), *(shapes_args or SHAPES_ARGS)])
    print(f"[2/3] training the dual encoder in {run}", flush=True)
    train_main(["--data", str(data), "--out", str(run), *(train_args or TRAIN_ARGS)])
    print(f"[3/3] exporting the bundle to {bundle_dir}", flush=True)
    return export_bundle(run, bundle_dir)
