"""The optional real-data text backbone on files the test writes itself: a transformers BERT
saved to a local folder (as `--hf-model PATH` takes it) is trained with its own tokenizer,
exported to ONNX and checked against PyTorch at new batch sizes and lengths.

(A whole bundle is not asserted here: a BERT trained from scratch for a few steps embeds every
caption alike, and export rightly refuses a bundle whose recall then hangs on near-ties.)"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_bert(tiny_data, tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from training.data.coco import load_shapes_split

    path = tmp_path_factory.mktemp("bert")
    words = sorted({w for caps in load_shapes_split(tiny_data, "train").captions
                    for _, text, _ in caps for w in text.replace(",", " , ").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)
    return path


def test_bert_text_encoder_trains_and_exports(tiny_data, local_bert, tmp_path):
    import torch

    from export.onnx import TextEncoderOnnx, compare, export_onnx
    from mmdemo.engine import open_session
    from mmdemo.text import TextTokenizer
    from training.__main__ import main as train_main
    from training.train import embed_texts, load_run

    run = train_main(["--data", str(tiny_data), "--out", str(tmp_path / "run"),
                      "--text-encoder", "hf", "--hf-model", str(local_bert), "--epochs", "1",
                      "--batch-size", "32", "--limit-train", "64", "--cnn-width", "8",
                      "--embed-dim", "16"])
    model, meta = load_run(run)
    assert meta["model_config"]["text_encoder"] == "hf"
    assert meta["tokenizer"]["pad_token"] == "[PAD]"
    tok = TextTokenizer.from_file(run / "tokenizer.json", 32, meta["tokenizer"]["pad_token"])
    ids, mask = tok(["a red circle", "the small blue square is left of the large red circle"])
    assert ids[0, 0] == 2 and ids[0, 4] == 3 and mask[0].sum() == 5  # its own [CLS] .. [SEP]
    path = export_onnx(TextEncoderOnnx(model), (torch.from_numpy(ids), torch.from_numpy(mask)),
                       ["input_ids", "attention_mask"],
                       {"input_ids": {0: "batch", 1: "length"},
                        "attention_mask": {0: "batch", 1: "length"}, "embedding": {0: "batch"}},
                       tmp_path / "text_encoder.onnx")
    sess = open_session(path)
    for texts in (["a red circle"] * 3,
                  ["two shapes: a small green triangle and a large white hexagon"] * 5,
                  ["a star", "on the left is a gray hexagon, on the right a red square",
                   "a blue circle", "x"]):
        i, m = tok(texts)
        got = sess.run(None, {"input_ids": i, "attention_mask": m})[0]
        compare("bert text encoder", embed_texts(model, tok, texts), got)  # raises past 1e-4
