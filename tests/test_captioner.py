"""The caption decoder: every parameter learns, training resumes, the exported step carries its
state exactly as PyTorch does, and the Engine decodes with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.captioner import CaptionerModelConfig, build_captioner, caption_loss


def test_every_parameter_learns_and_shapes_hold():
    torch.manual_seed(0)
    model = build_captioner(CaptionerModelConfig(feature_dim=16, grid=(4, 4), vocab_size=30,
                                                 dim=24, embed=8))
    fmap = torch.randn(3, 16, 4, 4)
    tokens = torch.randint(5, 30, (3, 7))
    logits = model(fmap, tokens[:, :-1])
    assert logits.shape == (3, 6, 30) and torch.isfinite(logits).all()
    caption_loss(logits, tokens[:, 1:], pad_id=0)["tokens"].backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not dead, f"no gradient reaches {dead}"
    # a step is the teacher-forced model one token at a time
    memory, h = model.start(fmap)
    model.eval()
    with torch.no_grad():
        full = model(fmap, tokens[:, :3])
        for t in range(3):
            step, h, w = model.step(tokens[:, t], h, memory)
            assert torch.allclose(step, full[:, t], atol=1e-5)
            assert torch.allclose(w.sum(1), torch.ones(3))


def test_padding_is_not_learned():
    logits = torch.randn(2, 4, 10)
    target = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    other = logits.clone()
    other[0, 2:], other[1, 1:] = 100.0, -100.0  # changes only where the target is padding
    assert torch.equal(caption_loss(logits, target, 0)["tokens"],
                       caption_loss(other, target, 0)["tokens"])


def test_whole_scene_captions(tiny_data):
    from training.data.coco import load_shapes_split
    from training.train_captioner import caption_rows

    data = load_shapes_split(tiny_data, "train")
    rows, texts = caption_rows(data, whole_scene=True)
    assert set(rows) == set(range(len(data)))  # no image is left without a caption
    for r, t in zip(rows, texts):
        claim = next(c[2] for c in data.captions[r] if c[1] == t)
        n = len(data.objects[r])
        assert len(claim["mentions"]) == n or all(
            len(c[2]["mentions"]) != n for c in data.captions[r])
    all_rows, _ = caption_rows(data, whole_scene=False)
    assert len(all_rows) == sum(len(c) for c in data.captions) > len(rows)


def test_training_resumes_and_refuses_other_settings(tiny_run, tmp_path, capsys):
    from training.train_captioner import main

    out = tmp_path / "cap"
    args = ["--run", str(tiny_run), "--out", str(out), "--dim", "16", "--embed", "8",
            "--batch-size", "64", "--seed", "0"]
    main([*args, "--epochs", "1"])
    first = (out / "checkpoints" / "last" / "model.safetensors").read_bytes()
    main([*args, "--epochs", "2"])
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert (out / "checkpoints" / "last" / "model.safetensors").read_bytes() != first
    meta = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["epoch"] == 2 and {"BLEU-4", "CIDEr-D", "mention_f1"} <= set(meta["metrics"])
    with pytest.raises(SystemExit):
        main([*args, "--epochs", "3", "--dim", "32"])
    assert "other settings" in capsys.readouterr().err


def test_exported_step_matches_pytorch_over_steps(tiny_bundle, tiny_captioner):
    """Export checked parity already (it refuses a bundle otherwise); here it is done again
    independently, over more steps, on new images, with the state carried through ORT."""
    from mmdemo import Engine
    from mmdemo.decoding import Captioner
    from training.train import load_run
    from training.train_captioner import load_captioner

    e = Engine.load(tiny_bundle)
    c = e.captioning
    cap = Captioner(e.sessions["caption_start"], e.sessions["caption_step"], c["bos_id"],
                    c["eos_id"], c["max_length"])
    decoder, meta = load_captioner(tiny_captioner)
    spine, _ = load_run(meta["spine_run"])
    x = np.random.default_rng(0).normal(size=(5, 3, 64, 64)).astype(np.float32)
    state = cap.start(x)
    tokens = np.random.default_rng(1).integers(5, 30, (10, 5))
    worst = 0.0
    with torch.no_grad():
        memory, h = decoder.start(spine.image_backbone.forward_features(torch.from_numpy(x)))
        for t in range(10):
            logits, h, _ = decoder.step(torch.from_numpy(tokens[t]), h, memory)
            got, state = cap.step(tokens[t], state)
            worst = max(worst, float(np.abs(logits.log_softmax(-1).numpy() - got).max()))
    assert worst < 1e-4, f"ORT and PyTorch differ by {worst:.2e} after carrying the state"
    m = e.manifest["metrics"]["captioning"]
    assert {"greedy", "beam3"} <= set(m) and m["parity_max_abs_diff"] < 1e-4


def test_engine_captions_every_way(tiny_bundle):
    from mmdemo import Engine

    e = Engine.load(tiny_bundle)
    img = e.gallery_image(next(iter(e.gallery)))
    beam = e.caption(img, "beam", width=3)
    greedy = e.caption(img, "greedy")
    assert beam.text and greedy.text and len(beam.nearest) == 2
    a = e.caption(img, "nucleus", top_p=0.9, temperature=1.5, seed=7)
    b = e.caption(img, "nucleus", top_p=0.9, temperature=1.5, seed=7)
    assert a.text == b.text
    short = e.caption(img, "greedy", max_length=2)
    assert short.tokens <= 2
    for bad, msg in (({"method": "sideways"}, "decoding method"), ({"width": 0}, "beam width"),
                     ({"method": "nucleus", "top_p": 0}, "top_p"),
                     ({"max_length": 500}, "max_length")):
        with pytest.raises(ValueError, match=msg):
            e.caption(img, **bad)
