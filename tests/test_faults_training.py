"""Faults in training: a run killed with SIGKILL mid-epoch resumes from its last checkpoint and
ends where an uninterrupted run ends; a checkpoint save killed between its renames is repaired."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY_TRAIN
from tests.report import record
from training.train import load_checkpoint, load_run, save_checkpoint, trim_metrics

pytestmark = pytest.mark.slow

# TINY_TRAIN with a wider CNN, smaller batches and one thread: 16 steps of about 0.15 s per
# epoch, long enough to kill a run in the middle of one
KILL_TRAIN = [*TINY_TRAIN, "--epochs", "3", "--batch-size", "16", "--cnn-width", "64",
              "--threads", "1"]
STEPS = 256 // 16


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "training", "--data", str(data), "--out", str(out),
            *KILL_TRAIN]


def _meta(out: Path) -> dict | None:
    try:
        return json.loads((out / "checkpoints" / "last" / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _steps_shown(log: Path, epoch: int) -> int:
    """The last step count tqdm showed for `epoch` (its bar on stderr), 0 if none yet."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    got = [m.group(1) for seg in re.split(r"[\r\n]", text) if seg.startswith(f"epoch {epoch}/")
           if (m := re.search(rf"(\d+)/{STEPS} \[", seg))]
    return int(got[-1]) if got else 0


def _recall(meta: dict) -> dict[str, float]:
    return {k: v for k, v in meta["metrics"].items() if "R@" in k}


def test_sigkill_mid_epoch_resumes_to_the_same_metrics(tiny_data, tmp_path):
    t0 = time.time()
    ref = tmp_path / "uninterrupted"
    subprocess.run(_cmd(tiny_data, ref), env=_env(), check=True, capture_output=True,
                   timeout=300)
    ref_seconds = time.time() - t0

    out, log = tmp_path / "killed", tmp_path / "killed.log"
    with log.open("w") as err:
        proc = subprocess.Popen(_cmd(tiny_data, out), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        deadline = time.time() + 240
        while (m := _meta(out)) is None or m["epoch"] < 1:  # epoch 1's checkpoint is in place
            assert proc.poll() is None and time.time() < deadline, "run ended before epoch 1"
            time.sleep(0.02)
        t_ckpt = time.time()
        # into epoch 2's steps: a quarter of them done, well before its checkpoint
        while _steps_shown(log, 2) < STEPS // 4:
            assert proc.poll() is None and time.time() < deadline, "run ended in epoch 2"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        seconds_in = time.time() - t_ckpt
    finally:
        proc.kill()
        proc.wait()
    steps_done = _steps_shown(log, 2)
    assert proc.returncode == -signal.SIGKILL
    assert _meta(out)["epoch"] == 1, "killed after epoch 2's checkpoint, not in the middle"
    assert 0 < steps_done < STEPS

    model, meta = load_run(out)  # what the kill left behind loads
    assert meta["epoch"] == 1 and meta["step"] == STEPS

    res = subprocess.run(_cmd(tiny_data, out), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stdout and "from epoch 1" in res.stdout
    a, b = _meta(ref), _meta(out)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"] == 3 * STEPS
    ra, rb = _recall(a), _recall(b)
    assert ra and ra.keys() == rb.keys()
    diff = max(abs(ra[k] - rb[k]) for k in ra)
    wa, wb = (load_file(d / "checkpoints" / "last" / "model.safetensors") for d in (ref, out))
    weight_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    epochs = [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]  # the killed epoch is logged once
    record("training_kill", {
        "epochs": 3, "steps_per_epoch": STEPS, "epoch_killed": 2,
        "steps_done_when_killed": steps_done, "seconds_into_epoch": round(seconds_in, 2),
        "uninterrupted_run_seconds": round(ref_seconds, 1),
        "uninterrupted": ra, "resumed": rb, "max_abs_diff": diff,
        "max_abs_weight_diff": weight_diff})
    # as the README says: the resumed run ends with the uninterrupted run's weights, bit for bit
    assert weight_diff == 0.0 and diff == 0.0, (weight_diff, ra, rb)


def _tiny_ckpt(ckpt: Path, value: float) -> None:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    save_checkpoint(ckpt, model, opt, {"epoch": int(value)})


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("killed", ["between_renames", "during_removal", "while_writing"])
def test_checkpoint_save_killed_midway_is_recovered(tmp_path, killed):
    ckpt = tmp_path / "checkpoints" / "last"
    old = ckpt.with_name(".last.old")
    _tiny_ckpt(ckpt, 1.0)
    if killed == "between_renames":  # last -> .last.old done, tmp -> last not
        ckpt.rename(old)
        (tmp_path / "checkpoints" / f".last.tmp-{_dead_pid()}-x").mkdir()
        want = 1
    elif killed == "during_removal":  # new checkpoint in place, .last.old not yet removed
        ckpt.rename(old)
        _tiny_ckpt(ckpt, 2.0)
        want = 2
    else:  # partial files of a dead writer beside an intact checkpoint
        tmp = tmp_path / "checkpoints" / f".last.tmp-{_dead_pid()}-y"
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"partial")
        want = 1
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    meta = load_checkpoint(ckpt, model, opt)
    assert meta["epoch"] == want and len(opt.state) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "model.safetensors",
                                                       "optimizer.safetensors",
                                                       "rng.safetensors"]


def test_training_resumes_from_a_swap_killed_between_renames(tiny_data, tmp_path, capsys):
    from training.__main__ import main

    out = tmp_path / "run"
    args = ["--data", str(tiny_data), "--out", str(out), *TINY_TRAIN, "--limit-train", "64"]
    main([*args, "--epochs", "1"])
    ckpt = out / "checkpoints" / "last"
    ckpt.rename(ckpt.with_name(".last.old"))  # killed after the first rename of a later save
    main([*args, "--epochs", "2"])
    assert "resuming" in capsys.readouterr().out
    assert json.loads((ckpt / "meta.json").read_text())["epoch"] == 2
    assert not ckpt.with_name(".last.old").exists()


def test_rng_state_travels_with_the_checkpoint(tmp_path):
    ckpt = tmp_path / "last"
    torch.manual_seed(123)
    _tiny_ckpt(ckpt, 1.0)
    want = torch.rand(4)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    load_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()))
    assert torch.equal(torch.rand(4), want)


def test_an_epoch_logged_but_not_checkpointed_is_logged_once(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,loss\n1,0.5\n2,0.4\n")  # killed after the row, before the save
    trim_metrics(csv_path, 1)
    assert csv_path.read_text().splitlines() == ["epoch,loss", "1,0.5"]
