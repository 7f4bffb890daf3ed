"""The embedded default bundle: generate the shapes world, train, export. `python app.py` calls
`build_default_bundle` when no bundle is in place; the README lists the same steps by hand."""

from __future__ import annotations

import json
import time
from pathlib import Path

# The same settings as the README's step-by-step commands.
SHAPES_ARGS = ["--n-train", "8000", "--n-val", "500", "--n-test", "1000", "--seed", "0"]
TRAIN_ARGS = ["--epochs", "8", "--batch-size", "128", "--cnn-width", "24", "--seed", "0",
              "--threads", "2"]
FUSION_ARGS = ["--epochs", "4", "--seed", "0", "--threads", "2"]
# Generation is trained on the frozen dual encoder; its epochs are few so that the whole build
# does not grow by more than it must.
CAPTIONER_ARGS = ["--epochs", "2", "--seed", "0", "--threads", "2"]
GENERATOR_ARGS = ["--epochs", "6", "--seed", "0", "--threads", "2"]

# The pretrained preset: ImageNet EfficientNet-Lite0 and the all-MiniLM-L6-v2 sentence encoder,
# both shipped by PyPI packages (no network), frozen; their features are computed once and only
# the projection heads train. Images are upscaled to 128 px (the nets saw 224 px photos; 128 is
# 3.7x cheaper and keeps the build within 10 minutes on 2 cores). No edited hard negatives: a
# frozen text encoder would meet ~16k new texts an epoch for a term it cannot learn from.
PRETRAINED_TRAIN_ARGS = [
    "--image-encoder", "efficientnet_lite0", "--image-weights", "imagenet", "--image-size", "128",
    "--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225",
    "--text-encoder", "hf", "--hf-model", "sentence-transformers/all-MiniLM-L6-v2",
    "--image-tune", "frozen", "--text-tune", "frozen", "--hard-negatives", "0",
    "--epochs", "10", "--batch-size", "128", "--warmup-steps", "50", "--seed", "0",
    "--threads", "2"]
PRESETS = {"default": {"train": TRAIN_ARGS, "fusion": True, "generation": True},
           "pretrained": {"train": PRETRAINED_TRAIN_ARGS, "fusion": False,
                          "generation": False}}


def build_default_bundle(bundle_dir: Path | str, work_dir: Path | str = "runs/default",
                         shapes_args: list[str] | None = None,
                         train_args: list[str] | None = None,
                         fusion_args: list[str] | None = None, preset: str = "default",
                         captioner_args: list[str] | None = None,
                         generator_args: list[str] | None = None) -> Path:
    """generate -> train -> train fusion -> train the caption decoder and the image generator
    -> export into bundle_dir; work_dir keeps the data and the runs, so an interrupted build
    resumes from its last epoch. `preset` picks the settings (PRESETS): "default" (small
    encoders trained from scratch, with fusion and generation) or "pretrained" (frozen
    pretrained encoders, retrieval only)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}; expected one of {sorted(PRESETS)}")
    from export.onnx import export_bundle
    from training.__main__ import main as train_main
    from training.data.shapes import main as shapes_main
    from training.train_captioner import main as captioner_main
    from training.train_fusion import main as fusion_main
    from training.train_generator import main as generator_main

    work = Path(work_dir)
    data, run, fusion = work / "data", work / "run", work / "fusion"
    captioner, generator = work / "captioner", work / "generator"
    p = PRESETS[preset]
    times: dict[str, float] = {}  # seconds per stage, written to work/build_times.json
    clock = time.perf_counter()

    def done(stage: str) -> None:
        nonlocal clock
        times[stage] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    labels = data / "labels_test.json"
    if not labels.is_file() or "question_kinds" not in json.loads(labels.read_text()):
        print(f"[1/5] generating the shapes world in {data}", flush=True)
        shapes_main(["--out", str(data), *(shapes_args or SHAPES_ARGS)])
    done("data")
    print(f"[2/5] training the dual encoder in {run}", flush=True)
    train_main(["--data", str(data), "--out", str(run), *(train_args or p["train"])])
    done("dual_encoder")
    if p["fusion"]:
        print(f"[3/5] training the fusion models in {fusion}", flush=True)
        fusion_main(["--run", str(run), "--out", str(fusion), *(fusion_args or FUSION_ARGS)])
        done("fusion")
    else:
        print("[3/5] no fusion models in this preset", flush=True)
    if p["generation"]:
        print(f"[4/5] training the caption decoder in {captioner} and the image generator "
              f"in {generator}", flush=True)
        captioner_main(["--run", str(run), "--out", str(captioner),
                        *(captioner_args or CAPTIONER_ARGS)])
        done("captioner")
        generator_main(["--run", str(run), "--data", str(data), "--out", str(generator),
                        *(generator_args or GENERATOR_ARGS)])
        done("generator")
    else:
        print("[4/5] no generation models in this preset", flush=True)
    print(f"[5/5] exporting the bundle to {bundle_dir}", flush=True)
    out = export_bundle(run, bundle_dir, fusion_dir=fusion if p["fusion"] else None,
                        captioner_dir=captioner if p["generation"] else None,
                        generator_dir=generator if p["generation"] else None)
    done("export")
    # a resumed build's stages count only what this call did (finished epochs are skipped)
    (work / "build_times.json").write_text(json.dumps(
        {"preset": preset, "stages_s": times, "total_s": round(sum(times.values()), 1)},
        indent=2))
    return out
