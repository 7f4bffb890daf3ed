"""Data-parallel training: two CPU processes under torchrun (Gloo) against one process on the
same global batches; gradient accumulation against one full batch; precision options.

The comparisons run in float64 (the worker at the bottom of this file sets the default dtype,
then runs `python -m training`'s main). In float32 the sharded and the single computation of
the same gradient differ by rounding, up to ~4e-5 relative on the smallest gradients, and AdamW
turns those into flipped update signs; in float64 they agree to ~1e-13, so the tolerances here
test the sharding, gathering and gradient scaling, not the rounding.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmdemo.preprocess import PreprocessSpec
from mmdemo.text import TextTokenizer
from tests.conftest import ROOT, TINY_TRAIN, free_port
from training.__main__ import main
from training.data.transforms import load_images
from training.distributed import weights_digest
from training.losses import LOSSES
from training.models import ModelConfig, build_model
from training.tokenizer import train_tokenizer
from training.train import (
    EncodeBoth,
    TrainConfig,
    backward_global_batch,
    epoch_batches,
    load_run,
    load_splits,
)

pytestmark = pytest.mark.slow

RUN = [*TINY_TRAIN, "--limit-train", "64", "--threads", "1"]  # 2 epochs of 2 steps of 32 images


@contextlib.contextmanager
def _float64():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


def _one_process(argv: list[str]) -> Path:
    with _float64():
        return main(argv)


def _torchrun(argv: list[str]) -> str:
    """Two Gloo processes of `python -m training` in float64; returns rank 0's stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                          __file__, *argv], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _losses(run: Path) -> list[float]:
    return [float(r["train_loss"]) for r in csv.DictReader((run / "metrics.csv").open())]


@pytest.mark.parametrize("accum", [1, 2])
def test_two_gloo_processes_match_one_process(tiny_data, tmp_path, accum):
    args = ["--data", str(tiny_data), *RUN, "--grad-accum", str(accum)]
    one = _one_process([*args, "--out", str(tmp_path / "one")])
    two = tmp_path / "two"
    two.mkdir()  # the same tokenizer: training one twice does not give the same vocabulary
    shutil.copy(one / "tokenizer.json", two / "tokenizer.json")
    if accum == 1:  # stopped after epoch 1 and resumed: every rank loads the checkpoint
        _torchrun([*args, "--out", str(two), "--epochs", "1"])
        assert "from epoch 1" in _torchrun([*args, "--out", str(two)])
    else:
        _torchrun([*args, "--out", str(two)])

    meta = json.loads((two / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["epoch"] == 2 and meta["step"] == 4 and meta["world_size"] == 2
    digests = meta["rank_weights_sha256"]  # each rank's own weights, after the last step
    with _float64():
        saved = weights_digest(load_run(two)[0])
    assert digests == [saved, saved], "the ranks ended with different weights"

    ref, got = _losses(one), _losses(two)
    assert len(ref) == len(got) == 2
    loss_diff = max(abs(a - b) for a, b in zip(ref, got))
    assert loss_diff < 1e-9, f"train loss per epoch: one process {ref}, two {got}"
    wa, wb = (load_file(r / "checkpoints" / "last" / "model.safetensors") for r in (one, two))
    assert wa.keys() == wb.keys()
    diff = {k: float((wa[k].double() - wb[k].double()).abs().max()) for k in wa}
    worst = max(diff, key=diff.get)
    assert diff[worst] < 1e-9, f"weights differ by {diff[worst]:.3g} at {worst}"


def _first_step_gradients(data: Path, tmp: Path, accum: int) -> tuple[float, dict]:
    """Loss and gradients of the first global batch of 32, through backward_global_batch with
    `accum` micro-steps; batch norm in eval mode (a per-image function: in train mode each
    micro-step normalises by its own statistics, as with any accumulation)."""
    cfg = TrainConfig(data=str(data), limit_train=32, batch_size=32)
    train_set, _ = load_splits(cfg)
    tok_path = tmp / "tokenizer.json"
    if not tok_path.is_file():
        train_tokenizer([t for caps in train_set.captions for _, t, _ in caps], tok_path)
    tok = TextTokenizer.from_file(tok_path, 32)
    mcfg = ModelConfig(cnn_width=8, text_dim=32, text_layers=1, embed_dim=32,
                       vocab_size=tok.tokenizer.get_vocab_size())
    torch.manual_seed(0)
    model = build_model(mcfg).eval()
    images = load_images(train_set.paths(), PreprocessSpec(64, cfg.mean, cfg.std))

    def encode_texts(texts):
        ids, mask = tok(texts)
        return model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))

    net = EncodeBoth(model, lambda rows: model.encode_image(images[rows]), encode_texts)
    batch = next(epoch_batches(train_set, cfg, 0))
    assert batch[3], "the batch should hold hard negatives"
    loss = backward_global_batch(net, LOSSES["infonce"](), batch, accum)
    return loss, {n: p.grad for n, p in model.named_parameters()}


def test_grad_accumulation_matches_the_full_batch_gradient(tiny_data, tmp_path):
    with _float64():
        loss1, g1 = _first_step_gradients(tiny_data, tmp_path, 1)
        for accum in (2, 3):
            loss, g = _first_step_gradients(tiny_data, tmp_path, accum)
            assert abs(loss - loss1) < 1e-12, (accum, loss, loss1)
            diff = {k: float((g[k] - g1[k]).abs().max() / g1[k].abs().max()) for k in g1}
            worst = max(diff, key=diff.get)
            assert diff[worst] < 1e-9, f"grad_accum {accum}: {worst} off by {diff[worst]:.3g}"


def test_bf16_autocast_trains_on_cpu(tiny_data, tmp_path):
    args = ["--data", str(tiny_data), *RUN, "--epochs", "1", "--limit-train", "32"]
    threads = torch.get_num_threads()
    try:
        fp32 = _losses(main([*args, "--out", str(tmp_path / "fp32")]))[0]
        bf16 = _losses(main([*args, "--out", str(tmp_path / "bf16"), "--precision", "bf16"]))[0]
    finally:
        torch.set_num_threads(threads)
    assert bf16 != fp32, "bf16 gave fp32's loss to the last bit: autocast did nothing"
    assert abs(bf16 - fp32) < 0.02 * fp32, (fp32, bf16)


@pytest.mark.parametrize("argv, msg", [
    (["--precision", "fp16"], "precision 'fp16' needs --device cuda"),
    (["--precision", "fp8"], "precision 'fp8'"),
    (["--grad-accum", "0"], "grad_accum 0"),
    (["--batch-size", "2", "--grad-accum", "3"], "cannot feed 1 processes x grad_accum 3"),
    pytest.param(["--device", "cuda", "--precision", "fp16"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_bad_precision_or_accumulation_exits_with_a_message(tiny_data, tmp_path, capsys, argv,
                                                            msg):
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tiny_data), "--out", str(tmp_path / "r"), *TINY_TRAIN, *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


if __name__ == "__main__":  # a torchrun worker: `python -m training` in float64
    torch.set_default_dtype(torch.float64)
    main(sys.argv[1:])
