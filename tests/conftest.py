"""Shared fixtures: a tiny shapes world, a tiny trained run and fusion run, their bundle, and the
default bundle.

Everything runs on the CPU, offline, and binds 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_SHAPES = ["--n-train", "256", "--n-val", "40", "--n-test", "60", "--seed", "3"]
TINY_TRAIN = ["--epochs", "2", "--batch-size", "32", "--cnn-width", "8", "--text-dim", "32",
              "--text-layers", "1", "--embed-dim", "32", "--warmup-steps", "4", "--seed", "0"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from training.data.shapes import main

    return main(["--out", str(tmp_path_factory.mktemp("shapes")), *TINY_SHAPES])


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    from training.__main__ import main

    out = tmp_path_factory.mktemp("run") / "tiny"
    return main(["--data", str(tiny_data), "--out", str(out), *TINY_TRAIN])


TINY_FUSION = ["--epochs", "1", "--batch-images", "32", "--dim", "32", "--heads", "2",
               "--warmup-steps", "2", "--seed", "0"]


@pytest.fixture(scope="session")
def tiny_fusion(tiny_run, tmp_path_factory) -> Path:
    from training.train_fusion import main

    return main(["--run", str(tiny_run), "--out", str(tmp_path_factory.mktemp("fusion")),
                 *TINY_FUSION])


TINY_CAPTIONER = ["--epochs", "1", "--dim", "32", "--embed", "16", "--batch-size", "64",
                  "--seed", "0"]


@pytest.fixture(scope="session")
def tiny_captioner(tiny_run, tmp_path_factory) -> Path:
    from training.train_captioner import main

    return main(["--run", str(tiny_run), "--out", str(tmp_path_factory.mktemp("captioner")),
                 *TINY_CAPTIONER])


TINY_GENERATOR = ["--epochs", "1", "--batch-size", "32", "--width", "4", "--latent-dim", "4",
                  "--cond-dim", "16", "--seed", "0"]


@pytest.fixture(scope="session")
def tiny_generator_run(tiny_run, tiny_data, tmp_path_factory) -> Path:
    from training.train_generator import main

    return main(["--run", str(tiny_run), "--data", str(tiny_data), "--out",
                 str(tmp_path_factory.mktemp("generator") / "gen"), *TINY_GENERATOR])


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tiny_fusion, tiny_captioner, tiny_generator_run,
                tmp_path_factory) -> Path:
    from export.__main__ import main

    return main([str(tiny_run), str(tmp_path_factory.mktemp("bundles") / "tiny"),
                 "--fusion", str(tiny_fusion), "--captioner", str(tiny_captioner),
                 "--generator", str(tiny_generator_run)])


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory) -> Path:
    """The default bundle, built exactly as `python app.py` builds it (fixed seeds).

    MMDEMO_TEST_BUNDLE=PATH reuses a bundle built before (for working on the tests only).
    """
    reuse = os.environ.get("MMDEMO_TEST_BUNDLE")
    if reuse:
        return Path(reuse)
    from export.default import build_default_bundle

    work = tmp_path_factory.mktemp("default")
    return build_default_bundle(work / "bundle", work / "work")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_blocked_env(folder: Path) -> dict[str, str]:
    """Environment for a subprocess in which `import torch` fails (a stub package in `folder`
    shadows it), so serving code proves it never needs torch."""
    (folder / "torch").mkdir(parents=True, exist_ok=True)
    (folder / "torch" / "__init__.py").write_text(
        "raise ImportError('torch is blocked in this test: serving must not need it')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT)])
    return env


@pytest.fixture
def no_torch(tmp_path) -> dict[str, str]:
    return torch_blocked_env(tmp_path / "block")


@contextlib.contextmanager
def serve_app(bundle: Path, folder: Path, args: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """app.py on 127.0.0.1 in a subprocess where `import torch` fails; yields (url, log, process)
    once the page answers, and stops the server afterwards."""
    env = {**torch_blocked_env(folder / "block"), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           **(env or {})}
    port = free_port()
    log = folder / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--bundle", str(bundle),
                                 "--port", str(port), *args], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()}")
            if time.time() > deadline:
                pytest.fail(f"app.py did not answer within 90 s:\n{log.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield url, log, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def copy_bundle(bundle: Path, dest: Path) -> Path:
    """A private copy of a bundle, for tests that add images to it or damage it."""
    shutil.copytree(bundle, dest)
    return dest


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest(tmp_path_factory):
    """gradio_client leaves an empty /tmp/<random> folder behind for every file it downloads;
    in tests they go under pytest's own temporary folder, which pytest rotates."""
    import tempfile

    before = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tmp"))
    yield
    tempfile.tempdir = before
