"""Encoders and losses on tiny configs: shapes, finiteness, gradients, the optional backbones."""

from __future__ import annotations

import pytest
import torch

from training.losses import LOSSES
from training.models import ModelConfig, build_model

TINY = dict(cnn_width=8, text_dim=32, text_layers=1, text_heads=4, embed_dim=16, vocab_size=50)


def _batch(b=6, length=9):
    torch.manual_seed(0)
    ids = torch.randint(5, 50, (b, length))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # one padded caption
    return torch.randn(b, 3, 64, 64), ids, mask


def test_shapes_norms_and_padding_invariance():
    model = build_model(ModelConfig(**TINY)).eval()
    x, ids, mask = _batch()
    img, txt = model.encode_image(x), model.encode_text(ids, mask)
    assert img.shape == (6, 16) and txt.shape == (6, 16)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert torch.allclose(img.norm(dim=1), torch.ones(6), atol=1e-5)
    # padding tokens must not change the embedding of the padded caption
    ids2 = ids.clone()
    ids2[0, 5:] = 0
    assert torch.allclose(model.encode_text(ids2, mask)[0], txt[0], atol=1e-6)


def test_word_order_matters():
    model = build_model(ModelConfig(**TINY)).eval()
    ids = torch.tensor([[2, 7, 11, 13, 17, 3], [2, 7, 17, 13, 11, 3]])
    e = model.encode_text(ids, torch.ones_like(ids))
    assert not torch.allclose(e[0], e[1], atol=1e-4)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_parameter_gets_a_gradient(loss):
    model = build_model(ModelConfig(**TINY)).train()
    x, ids, mask = _batch()
    img, txt = model.encode_image(x), model.encode_text(ids, mask)
    neg = (txt[:3].flip(1), torch.tensor([0, 1, 2]))
    txt2 = model.encode_text(ids.flip(1), mask.flip(1))
    terms = LOSSES[loss](0.2)(img, txt, neg, model.logit_scale, txt2=txt2)
    assert {"hard", "t2t"} <= set(terms) and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    for name, p in model.named_parameters():
        if name == "logit_scale" and loss != "infonce":
            continue  # only InfoNCE learns a temperature
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_infonce_prefers_matched_pairs():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    loss = LOSSES["infonce"]()
    scale = torch.tensor(3.0)
    matched = sum(loss(a, a, None, scale).values())
    shuffled = sum(loss(a, a.roll(1, 0), None, scale).values())
    assert matched < shuffled


def test_resnet50_option_builds_without_download():
    model = build_model(ModelConfig(**{**TINY, "image_encoder": "resnet50",
                                       "image_weights": None})).eval()
    with torch.no_grad():
        out = model.encode_image(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_hf_text_encoder_from_local_path(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=40)
    BertModel(cfg).save_pretrained(tmp_path)
    model = build_model(ModelConfig(**{**TINY, "text_encoder": "hf",
                                       "hf_model": str(tmp_path)})).eval()
    _, ids, mask = _batch()
    out = model.encode_text(ids, mask)
    assert out.shape == (6, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("kw, msg", [({"image_encoder": "vit"}, "image_encoder 'vit'"),
                                     ({"text_encoder": "hf"}, "needs hf_model"),
                                     ({"image_size": 60}, "multiple of 8")])
def test_bad_configs_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_model(ModelConfig(**{**TINY, **kw}))
