"""The prepared GPU check (`python -m export.device_check`) runs end to end here on the CPU in
its small form: synthetic COCO set, torchrun with DDP on one process, frozen ResNet-50 and BERT
with cached features, export, ONNX Runtime against PyTorch. On a lent GPU it runs unchanged."""

from __future__ import annotations

import json

import pytest

from export.device_check import main

pytestmark = pytest.mark.slow


def test_small_device_check_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    figures = main(["--out", str(tmp_path), "--device", "cpu", "--small"])
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved == json.loads(json.dumps(figures))
    assert set(saved["providers"]) == {"image_encoder", "text_encoder"}
    assert saved["train"]["steps"] >= 10 and saved["train"]["precision"] == "fp32"
    assert (tmp_path / "work" / "run" / "features").is_dir()  # frozen: features were cached
    assert saved["parity"]["image_max_abs_diff"] < 1e-4
    assert saved["parity"]["text_max_abs_diff"] < 1e-4
    for key in ("image_b1", "text_b1", "image_b32", "text_b32"):
        row = saved["latency"][key]
        assert row["torch_p50_ms"] > 0 and row["ort_p50_ms"] > 0
        # (the ratio of the unrounded medians; the rounded ones are shown)
        assert row["speedup"] == pytest.approx(row["torch_p50_ms"] / row["ort_p50_ms"], rel=0.2)
    assert "| image_b1 |" in (tmp_path / "device_check.md").read_text()
