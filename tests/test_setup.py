"""The install is what the README promises: one ONNX Runtime, pins that match the Space."""

from __future__ import annotations

import importlib.metadata
import re

from tests.conftest import ROOT


def test_exactly_one_onnxruntime_distribution():
    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    found = sorted(n for n in names if n in ("onnxruntime", "onnxruntime-gpu"))
    assert len(found) == 1, found


def test_space_front_matter_matches_pins():
    readme = (ROOT / "README.md").read_text()
    front = readme.split("---")[1]
    sdk = re.search(r"sdk_version:\s*\"?([\d.]+)", front).group(1)
    pinned = re.search(r"^gradio==([\d.]+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert sdk == pinned.group(1) == importlib.metadata.version("gradio")
    assert re.search(r"^sdk:\s*gradio\s*$", front, re.M)
    assert re.search(r"^app_file:\s*app.py\s*$", front, re.M)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", readme, re.S).group(1)
    assert cmd.strip() in ci
