"""Bundle writing is atomic; loading checks format version and every hash."""

from __future__ import annotations

import hashlib
import json

import pytest

from mmdemo.bundle import BundleError, atomic_dir, read_manifest, write_manifest


def test_atomic_dir_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    dest = tmp_path / "b"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("one")
        write_manifest(tmp, {"name": "b"})
    assert (dest / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("crash mid-export")
    assert (dest / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary left behind
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("two")
        write_manifest(tmp, {"name": "b"})
    assert (dest / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_read_manifest_names_the_problem(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        read_manifest(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.onnx").write_bytes(b"graph")
    m = write_manifest(tmp_path, {"name": "x"})
    assert m["files"] == {"sub/m.onnx": hashlib.sha256(b"graph").hexdigest()}
    assert read_manifest(tmp_path)["name"] == "x"
    (tmp_path / "sub" / "m.onnx").write_bytes(b"grapH")
    with pytest.raises(BundleError, match="sub/m.onnx has sha256"):
        read_manifest(tmp_path)
    (tmp_path / "sub" / "m.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        read_manifest(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(tmp_path)
