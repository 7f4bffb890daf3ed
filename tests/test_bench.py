"""The benchmark, run whole on the tiny bundle with small settings: every section in the JSON with
sane values, consistent ratios, the tables and plots written. No timing thresholds. And the
serving-side ONNX Runtime settings the bench justifies: graphs optimised offline are used only
where they were made for this CPU, and a CUDA provider that does not load is reported."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import ROOT, copy_bundle

pytestmark = pytest.mark.slow


def _servers_of(bundle: Path) -> list[str]:
    """Command lines of running processes that serve `bundle` with app.py."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process has just exited
            continue
        if any(a.endswith("app.py") for a in args) and str(bundle) in args:
            found.append(" ".join(args))
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a server
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="session")
def bench(tiny_bundle, tiny_run, tiny_fusion, tiny_captioner, tiny_generator_run, tiny_data,
          tmp_path_factory):
    """`python -m mmdemo.bench` on the tiny bundle, its runs laid out as a build leaves them."""
    work = tmp_path_factory.mktemp("work")
    for name, src in (("run", tiny_run), ("fusion", tiny_fusion), ("captioner", tiny_captioner),
                      ("generator", tiny_generator_run), ("data", tiny_data)):
        (work / name).symlink_to(src, target_is_directory=True)
    (work / "build_times.json").write_text(json.dumps({"total_s": 12.5, "stages_s": {}}))
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "mmdemo.bench", "--bundle", str(tiny_bundle), "--out", str(out),
         "--runs", str(work), "--reference-size", "small", "--budget", "0.05",
         "--task-images", "20", "--index-sizes", "3000", "--uniform-sizes", "1000",
         "--efs", "10,100", "--queries", "50", "--calls", "3", "--clients", "1,2",
         "--start-repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), out, proc.stdout


def test_every_model_against_pytorch(bench, tiny_bundle):
    result, _, _ = bench
    roles = set(json.loads((tiny_bundle / "manifest.json").read_text())["models"])
    models = result["sections"]["models"]
    assert set(models) == roles
    for role, r in models.items():
        for side in ("ort", "torch"):
            b1 = r[side]["b1"]
            assert 0 < b1["median_ms"] <= b1["p95_ms"], (role, side)
            assert r[side]["b32"]["items_per_s"] > 0
        # the same network: ONNX Runtime reproduces PyTorch on the bench's own inputs
        assert r["max_abs_diff"] < 1e-3, role
        assert r["speedup_b1"] == pytest.approx(
            r["torch"]["b1"]["median_ms"] / r["ort"]["b1"]["median_ms"])
        assert r["speedup_b32"] == pytest.approx(
            r["ort"]["b32"]["items_per_s"] / r["torch"]["b32"]["items_per_s"])
    refs = result["sections"]["reference"]
    assert set(refs) == {"resnet18_64", "bert_small"}
    assert all(r["max_abs_diff"] < 1e-3 for r in refs.values())


def test_variants_and_the_int8_rule(bench, tiny_bundle):
    result, _, _ = bench
    var = result["sections"]["variants"]
    assert {"image_encoder", "text_encoder", "caption_step", "resnet18_64"} <= set(var)
    for role, v in var.items():
        assert v["online_all"]["create_ms"] > 0 and v["offline_all"]["create_ms"] > 0
        # the bundle's models come with their offline-optimised graph; reference nets do not
        want = "made by the bench" if role in ("resnet18_64", "bert_small") else "bundle"
        assert v["offline_all"]["source"] == want, role
        assert "skipped" in v["fp16_cuda"]  # no GPU here: said, not pretended
    scored = {r: v["int8"] for r, v in var.items() if "loss" in v["int8"]}
    # a task metric for the encoders (Recall@10), the caption decoder (F1) and fusion (accuracy)
    assert {"image_encoder", "text_encoder", "caption_step", "fusion_concat"} <= set(scored)
    for role, q in scored.items():
        assert 0 <= q["value"] <= 1 and 0 <= q["fp32"] <= 1
        assert q["loss"] == pytest.approx(q["fp32"] - q["value"])
        assert q["use"] == (q["loss"] <= 0.01 and q["speedup_b1"] >= 1.2), role
    # the fp32 Recall@10 is the bundle's own, recomputed here by a full sort
    from PIL import Image

    from mmdemo.engine import CPU, Engine

    engine = Engine.load(tiny_bundle, [CPU])
    items = sorted(engine.gallery.values(), key=lambda it: int(it["id"]))[:20]
    img = engine.encode_images([Image.open(tiny_bundle / it["file"]).convert("RGB")
                                for it in items])
    texts = [c for it in items for c in it["captions"]]
    owner = np.array([i for i, it in enumerate(items) for _ in it["captions"]])
    txt = engine.encode_texts(texts)
    sims = txt @ img.T
    t2i = np.mean([o in np.argsort(-row)[:10] for row, o in zip(sims, owner)])
    i2t = np.mean([np.isin(np.argsort(-sims[:, i])[:10], np.flatnonzero(owner == i)).any()
                   for i in range(len(items))])
    assert scored["image_encoder"]["fp32"] == pytest.approx((t2i + i2t) / 2, abs=0.02)


def test_index_serving_start_and_outputs(bench, tiny_bundle):
    result, out, stdout = bench
    s = result["sections"]
    runs = {(r["distribution"], r["n"]): r for r in s["index"]["runs"]}
    assert set(runs) == {("model", 3000), ("uniform", 1000)}
    for r in runs.values():
        recalls = [e["recall@10"] for e in r["sweep"]]
        assert all(0 <= x <= 1 for x in recalls)
        assert recalls[-1] >= recalls[0] - 0.02  # a wider search finds no fewer
    assert runs[("model", 3000)]["sweep"][-1]["recall@10"] >= 0.95
    assert s["index"]["serve_ef"] == result["settings"]["INDEX_EF"]
    ends = s["serving"]["endpoints"]
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    want = {"search_by_text", "search_by_image", "search_captions", "search_composed"}
    want |= {name for name, section in (("classify", "fusion"), ("caption", "captioning"),
                                        ("generate_image", "generator")) if m.get(section)}
    assert want == set(ends) and {"classify", "caption", "generate_image"} <= want
    assert s["serving"]["stopped_early"] is None
    for name, r in ends.items():
        g1, g2, eng = r["gradio"]["1"], r["gradio"]["2"], r["engine"]
        assert g1["calls"] == 3 and g2["calls"] == 6 and eng["calls"] == 3, (name, r)
        for fig, p50 in ((g1, "p50_ms"), (g2, "p50_ms"), (eng, "median_ms")):
            assert fig["p95_ms"] >= fig[p50] > 0, (name, r)
        assert g2["throughput_per_s"] > 0
        assert r["gradio_overhead_ms"] == pytest.approx(g1["p50_ms"] - eng["median_ms"])
    # Gradio's own floor: an endpoint that returns its text, through the client and HTTP
    floor = s["serving"]["floor"]
    assert floor["gradio"]["calls"] == floor["http"]["calls"] == 3
    for fig in (floor["gradio"], floor["http"]):
        assert fig["p95_ms"] >= fig["p50_ms"] > 0
    # the bench stops the servers it starts
    assert not _servers_of(tiny_bundle.resolve()) and _port_free(s["serving"]["port"])
    assert _port_free(floor["port"])
    start = s["start"]
    for k in ("app_start_s", "python_s", "import_gradio_s", "engine_load_s"):
        assert start[k] > 0, (k, start)
    assert start["python_s"] < start["import_gradio_s"]  # gradio's import includes python's
    assert start["default_build"]["total_s"] == 12.5
    names = {t["target"] for t in result["targets"]}
    assert any("hnswlib at 1M" in n for n in names) and any("app start" in n for n in names)
    text = (out / "bench.md").read_text()
    for heading in ("## Models", "## Variants", "## Index", "## Serving", "## Targets"):
        assert heading in text and heading in stdout
    assert "(floor: returns its text)" in text
    assert (out / "models.png").stat().st_size > 1000 and (out / "index.png").stat().st_size > 1000


def test_bad_arguments_are_told_not_traced(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmdemo.bench", "--bundle", str(tmp_path),
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "is not a bundle" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_offline_optimised_graphs_only_on_their_cpu(tiny_bundle, tmp_path):
    from mmdemo.engine import CPU, Engine

    engine = Engine.load(tiny_bundle, [CPU])
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert all(s.get_session_options().graph_optimization_level == off
               for s in engine.sessions.values())
    assert engine.notes == []
    ref = engine.encode_texts(["a red circle", "two blue squares"])

    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for info in manifest["models"].values():
        info["cpu_optimized"]["cpu_flags"] = ["avx512f", "amx_tile", "some_other_cpu"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    other = Engine.load(bundle, [CPU])
    assert all(s.get_session_options().graph_optimization_level != off
               for s in other.sessions.values())
    assert any("another CPU" in n for n in other.notes)
    np.testing.assert_allclose(other.encode_texts(["a red circle", "two blue squares"]), ref,
                               atol=1e-5)
    shutil.rmtree(bundle)


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="this onnxruntime has no CUDA provider to fail")
def test_a_cuda_provider_that_does_not_load_is_reported(tiny_bundle):
    import mmdemo.engine as me

    me._cuda_failed = False
    engine = me.Engine.load(tiny_bundle)
    if engine.provider == me.CUDA:
        pytest.skip("CUDA loads here")
    assert any("did not load" in n for n in engine.notes)
    assert engine.provider == me.CPU
