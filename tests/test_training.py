"""python -m training end to end on a tiny shapes world: outputs, resume, config precedence."""

from __future__ import annotations

import csv
import json

import pytest
from safetensors.torch import load_file

from tests.conftest import TINY_TRAIN
from training.__main__ import main, parse


def test_run_writes_checkpoint_metrics_and_curves(tiny_run):
    ckpt = tiny_run / "checkpoints" / "last"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["epoch"] == 2 and meta["step"] == 2 * (256 // 32)
    assert meta["model_config"]["embed_dim"] == 32 and meta["train_config"]["loss"] == "infonce"
    tensors = load_file(ckpt / "model.safetensors")
    assert "logit_scale" in tensors and len(load_file(ckpt / "optimizer.safetensors")) > 0
    rows = list(csv.DictReader((tiny_run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["t2i_R@10"]) <= 1.0 for r in rows)
    assert (tiny_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tiny_run / "tokenizer.json").is_file()


def test_resume_continues_from_the_last_epoch(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data", str(tiny_data), "--out", str(out), *TINY_TRAIN, "--limit-train", "64"]
    main([*args[:-len(TINY_TRAIN)], *[a if a != "2" else "1" for a in TINY_TRAIN],
          "--limit-train", "64"])
    first = (out / "checkpoints" / "last" / "model.safetensors").read_bytes()
    main(args)  # asks for 2 epochs: trains only the second
    assert "resuming" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    meta = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["epoch"] == 2 and meta["step"] == 2 * (64 // 32)
    assert (out / "checkpoints" / "last" / "model.safetensors").read_bytes() != first


def test_flags_win_over_yaml(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 3\nloss: triplet\nembed-dim: 64\nlr: 0.01\n")
    cfg, model_cfg = parse(["--config", str(cfg_file), "--epochs", "5"])
    assert cfg.epochs == 5 and cfg.loss == "triplet" and cfg.lr == 0.01
    assert model_cfg.embed_dim == 64


@pytest.mark.parametrize("argv, msg", [(["--loss", "hinge"], "loss 'hinge'"),
                                       (["--data", "/nonexistent"], "no captions_train.json")])
def test_bad_options_exit_with_a_message(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "r"), "--data", str(tmp_path), *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_unknown_yaml_key_is_an_error(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("epochz: 3\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(tmp_path / "c.yaml")])
    assert "epochz" in capsys.readouterr().err
