"""The text-to-image generator: gradients reach every parameter, training runs end to end and
resumes, the exported graph matches PyTorch at a new batch size, and R-precision and the oracle
give known answers on hand-built cases."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from training.generator import GeneratorConfig, VAELoss, build_generator

TINY = GeneratorConfig(text_dim=8, latent_dim=4, width=4, cond_dim=16)
TINY_ARGS = ["--epochs", "1", "--batch-size", "16", "--width", "4", "--latent-dim", "4",
             "--cond-dim", "16", "--limit-train", "48", "--limit-val", "8", "--seed", "0",
             "--threads", "1"]


@pytest.mark.parametrize("layout", ["sprites", "dense"])
def test_outputs_and_every_parameter_learns(layout):
    torch.manual_seed(0)
    model = build_generator(GeneratorConfig(**{**TINY.__dict__, "layout": layout})).train()
    x, e = torch.rand(6, 3, 64, 64), torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    x[:, :, 20:30, 20:30] = 0.9  # an object, so the object-weighted term has pixels to weigh
    out = model(x, e)
    assert out["image"].shape == (6, 3, 64, 64)
    assert out["mu"].shape == out["prior_mu"].shape == (6, 4)
    terms = VAELoss(kl_weight=0.5, free_bits=0.0, object_weight=4.0, object_threshold=0.45)(
        out, x)
    assert set(terms) == {"recon", "kl"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"
    model.eval()
    img = model.sample(e, generator=torch.Generator().manual_seed(0))
    assert img.shape == (6, 3, 64, 64) and 0 <= float(img.min()) and float(img.max()) <= 1


def test_match_loss_reaches_the_decoder_and_the_prior():
    """The term on samples from the prior trains what generation uses: the prior and the
    decoder (not the posterior encoder); two rows with the same caption are not negatives."""
    from training.generator import MatchLoss

    torch.manual_seed(0)
    model = build_generator(TINY).train()
    proj = torch.randn(3, 8)

    def encode_image(x):  # a stand-in for the frozen image encoder
        return torch.nn.functional.normalize(x.mean((2, 3)) @ proj, dim=1)

    e = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    e[3] = e[1]  # a caption twice in the batch
    terms = MatchLoss(encode_image, logit_scale=20.0, weight=2.0, samples=4)(model, e)
    assert set(terms) == {"match"} and torch.isfinite(terms["match"])
    terms["match"].backward()
    for part in (model.decoder, model.prior):
        got = [n for n, p in part.named_parameters() if p.grad is not None and p.grad.abs().sum()]
        assert got, f"no gradient reaches {type(part).__name__}"
    assert all(p.grad is None for p in model.encoder.parameters())


def _world():
    from training.data.shapes import COLORS, MARGIN, SHAPES, SIZES
    from training.generator import SlotVocabulary

    return SlotVocabulary(SHAPES, COLORS, SIZES, 64, MARGIN, gap=2.0)


def _targets(vocab, objects, claim, slots=3):
    from mmdemo.oracle import bind

    bound = bind(objects, claim)
    order = bound + [k for k in range(len(objects)) if k not in bound]
    return {k: torch.from_numpy(v)[None] for k, v in
            vocab.targets(objects, claim, order, slots).items()}


def _layers(vocab, drawn, slots=3):
    """Layers (batch of one) that draw `drawn`: (shape, size, color, x, y) per layer, None for
    an empty one."""
    sizes = list(vocab.sizes)
    lay = {"pos": torch.zeros(1, slots, 2), "color": torch.zeros(1, slots, 3),
           "presence": torch.full((1, slots), -30.0), "sprite": torch.full((1, slots, 10), -30.0)}
    for k, d in enumerate(drawn):
        if d is None:
            continue
        shape, size, color, x, y = d
        lay["pos"][0, k] = torch.tensor([x / 32 - 1, y / 32 - 1])
        lay["color"][0, k] = torch.tensor(vocab.colors[color]) / 255
        lay["presence"][0, k] = 30.0
        lay["sprite"][0, k, vocab.shapes.index(shape) * 2 + sizes.index(size)] = 30.0
    return lay


RED = {"shape": "circle", "color": "red", "size": "small", "x": 12.0, "y": 30.0}
BLUE = {"shape": "square", "color": "blue", "size": "large", "x": 44.0, "y": 30.0}


def test_bind_follows_the_relation():
    from mmdemo.oracle import bind

    twins = [dict(RED, x=44.0), dict(RED, shape="square", x=28.0), dict(RED)]  # two red circles
    claim = {"mentions": [{"shape": "circle", "color": "red"}, {"shape": "square",
                                                                "color": "red"}],
             "relation": [0, "left of", 1], "count": None}
    # the first red circle in object order is right of the square: the other one binds
    assert bind(twins, claim) == [2, 1]
    claim["relation"] = [0, "above", 1]  # no binding makes it true
    assert bind(twins, claim) is None


def test_slot_loss_scores_what_the_layers_draw():
    """Layers that draw the scene and the claim score (near) zero in any layer order; a
    wrong color, a broken relation, a size said otherwise, a count exceeded and an overlap each
    cost; a size the caption leaves open may be either."""
    from training.generator import SlotLoss

    vocab = _world()
    loss = SlotLoss(vocab, slot_weight=1.0, claim_weight=1.0, slots=3, sprites=10)
    claim = {"mentions": [{"shape": "square", "color": "blue"},
                          {"shape": "circle", "color": "red", "size": "small"}],
             "relation": [1, "left of", 0], "count": 2}
    t = _targets(vocab, [RED, BLUE], claim)
    good = [("circle", "small", "red", 12, 30), None, ("square", "large", "blue", 44, 30)]

    def cost(drawn, term="claim"):
        lay = _layers(vocab, drawn)
        return float(loss(lay, t, lay, t)[term])

    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        drawn = [good[k] for k in order]
        assert cost(drawn, "slots") < 1e-6 and cost(drawn, "claim") < 1e-6, order
    assert cost([good[0], None, ("square", "small", "blue", 44, 30)]) < 1e-6  # size left open
    wrong = {
        "color": [("circle", "small", "green", 12, 30), None, good[2]],
        "relation": [("circle", "small", "red", 44, 30), None,
                     ("square", "large", "blue", 12, 30)],
        "size said": [("circle", "large", "red", 12, 30), None, good[2]],
        "count": [good[0], ("star", "small", "white", 30, 56), good[2]],
        "overlap": [("circle", "small", "red", 36, 30), None, good[2]],
    }
    for name, drawn in wrong.items():
        assert cost(drawn) > 1.0, name
    assert cost(wrong["color"], "slots") > 1.0 and cost(good[::-1][:2] + [None], "slots") > 1.0


def test_slot_terms_train_what_each_should():
    """The scene term reaches the posterior encoder and the decoder; the claim term the prior
    and the decoder, not the encoder (generation never runs it); the labelled layers' drawing
    reaches the sprites."""
    from training.generator import SlotLoss

    torch.manual_seed(0)
    vocab = _world()
    model = build_generator(GeneratorConfig(**{**TINY.__dict__, "sprites": 10})).train()
    claim = {"mentions": [{"shape": "square", "color": "blue"}], "relation": None,
             "count": None}
    t = {k: v.expand(4, *v.shape[1:]) for k, v in _targets(vocab, [RED, BLUE], claim).items()}
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    loss = SlotLoss(vocab, 1.0, 1.0, slots=3, sprites=10)
    out = model(torch.rand(4, 3, 64, 64), e)
    terms = loss(out["layers"], t, model.prior_layers(e, torch.randn(4, 4)), t)

    def reached(term):
        model.zero_grad()
        term.backward(retain_graph=True)
        return {name for name, part in (("encoder", model.encoder), ("prior", model.prior),
                                        ("decoder", model.decoder))
                if any(p.grad is not None and p.grad.abs().sum() for p in part.parameters())}

    assert reached(terms["slots"]) == {"encoder", "decoder"}
    assert reached(terms["claim"]) == {"prior", "decoder"}
    truth = model.decoder.draw(loss.truth(t, out["layers"]["cond"]))
    model.zero_grad()
    truth.sum().backward()
    assert model.decoder.bank.grad.abs().sum() > 0


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout 'grid'"):
        build_generator(GeneratorConfig(layout="grid"))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_generator(tiny_run, tiny_data, tmp_path_factory):
    """One epoch of a tiny generator, then resumed to a second."""
    from training.train_generator import main

    out = tmp_path_factory.mktemp("generator") / "gen"
    args = ["--run", str(tiny_run), "--data", str(tiny_data), "--out", str(out), *TINY_ARGS]
    assert main(args) == out  # the folder it trained in, for the export to read
    first = {"rows": _rows(out / "metrics.csv"),
             "meta": json.loads((out / "checkpoints" / "last" / "meta.json").read_text()),
             "cache_mtime": (out / "text_embeddings.npz").stat().st_mtime_ns}
    main([*args, "--epochs", "2"])
    return out, first


def test_train_smoke_and_resume(tiny_generator, tiny_run, tiny_data, capsys):
    from training.train_generator import main

    out, first = tiny_generator
    assert [r["epoch"] for r in first["rows"]] == ["1"]
    assert first["meta"]["epoch"] == 1 and first["meta"]["step"] == 3  # 48 images / 16
    assert all(np.isfinite(float(first["rows"][0][k])) for k in  # the shapes world is
               ("train_recon", "train_kl", "train_sprites", "train_slots", "train_claim",
                "val_recon", "val_kl"))  # labelled: the slot terms train too
    rows = _rows(out / "metrics.csv")
    meta = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == first["rows"][0]
    assert meta["epoch"] == 2 and meta["step"] == 6  # continued, not restarted
    # the caption embeddings were computed once, by the first run
    assert (out / "text_embeddings.npz").stat().st_mtime_ns == first["cache_mtime"]
    args = ["--run", str(tiny_run), "--data", str(tiny_data), "--out", str(out), *TINY_ARGS]
    capsys.readouterr()
    main([*args, "--epochs", "2"])  # nothing left to do
    assert "already trained for 2 epochs" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # other settings under the same folder: refused
        main([*args, "--epochs", "3", "--kl-weight", "0.1"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # fewer sprites than kinds of object: refused, said why
        main(["--run", str(tiny_run), "--data", str(tiny_data), "--out",
              str(out.parent / "few"), *TINY_ARGS, "--sprites", "4"])
    assert "--sprites 4: the data has 10 classes" in capsys.readouterr().err


def test_resume_draws_what_an_uninterrupted_run_draws(tiny_generator, tiny_run, tiny_data,
                                                      tmp_path):
    from safetensors.torch import load_file

    from training.train_generator import main

    out, _ = tiny_generator
    straight = tmp_path / "straight"
    main(["--run", str(tiny_run), "--data", str(tiny_data), "--out", str(straight), *TINY_ARGS,
          "--epochs", "2"])
    a = load_file(out / "checkpoints" / "last" / "model.safetensors")
    b = load_file(straight / "checkpoints" / "last" / "model.safetensors")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst == 0.0, f"resumed weights differ from an uninterrupted run's by {worst}"


def _encoders(tiny_run):
    from pathlib import Path

    from mmdemo.preprocess import PreprocessSpec
    from mmdemo.text import TextTokenizer
    from training.train import embed_images, embed_texts, load_run

    spine, meta = load_run(tiny_run)
    tc = meta["tokenizer"]
    tok = TextTokenizer.from_file(Path(tiny_run) / "tokenizer.json", tc["max_length"],
                                  tc["pad_token"])
    return (lambda x: embed_images(spine, torch.from_numpy(x)),
            lambda texts: embed_texts(spine, tok, texts),
            PreprocessSpec.from_dict(meta["preprocess"]))


def test_onnx_parity_at_a_new_batch_size(tiny_generator, tiny_run, tiny_data, tmp_path):
    import onnxruntime as ort

    from export.generator import export_generator
    from export.onnx import ExportError
    from training.data.coco import load_shapes_split
    from training.train_generator import load_generator

    out, _ = tiny_generator
    enc_img, enc_txt, spec = _encoders(tiny_run)
    test = load_shapes_split(tiny_data, "test", limit=12)
    got = export_generator(out, tmp_path, test, spec, enc_img, enc_txt, run_dir=tiny_run)
    entry = got["models"]["image_generator"]
    assert entry["file"] == "image_generator.onnx" and entry["latent_dim"] == 4
    assert [i["name"] for i in entry["inputs"]] == ["text_embedding", "z"]
    assert [o["name"] for o in entry["outputs"]] == ["image"]
    assert entry["inputs"][1]["shape"] == ["batch", 4]
    assert entry["outputs"][0]["shape"] == ["batch", 3, 64, 64]
    assert got["generation"]["latent_dim"] == 4 and got["generation"]["size"] == 64
    m = got["metrics"]
    assert m["prompts"] == 60 and m["parity"]["max_abs_diff"] <= 1e-4
    for k in ("r_precision", "satisfied_single", "satisfied_two"):
        assert 0.0 <= m[k] <= 1.0, (k, m[k])
    # a batch of 7, neither the traced 2 nor the checked 5
    model, _ = load_generator(out)
    sess = ort.InferenceSession(str(tmp_path / "image_generator.onnx"),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    e = rng.standard_normal((7, model.cfg.text_dim)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    z = rng.standard_normal((7, 4)).astype(np.float32)
    ref = model.generate(torch.from_numpy(e), torch.from_numpy(z)).detach().numpy()
    ort_out = sess.run(["image"], {"text_embedding": e, "z": z})[0]
    diff = float(np.abs(ref - ort_out).max())
    assert ort_out.shape == (7, 3, 64, 64) and diff <= 1e-4, f"max abs diff {diff:.2e}"
    with pytest.raises(ExportError, match="text encoder"):  # another run's text encoder
        export_generator(out, tmp_path / "x", test, spec, enc_img,
                         lambda t: np.zeros((len(t), 3), np.float32))


def test_r_precision_known_answer():
    from export.generator import draw_candidates, r_precision

    text = np.eye(4, dtype=np.float32)  # four distinct captions
    cand = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 1]])  # the true caption first
    image = np.array([[1, 0, 0, 0], [0, 0.6, 0, 0.8], [0, 0, 0.7, 0.7]], dtype=np.float32)
    # prompt 0 ranks its caption first; prompt 1 prefers caption 3; prompt 2 ties: a miss
    assert r_precision(image, text, cand) == pytest.approx(1 / 3)
    prompt_image = np.array([0, 0, 1, 1, 2, 2, 3])
    prompt_text = np.array([0, 1, 2, 3, 0, 4, 5])  # text 0 is a caption of images 0 and 2
    c = draw_candidates(prompt_image, prompt_text, 4, np.random.default_rng(0))
    assert c.shape == (7, 4) and (c[:, 0] == prompt_text).all()
    for p in range(7):  # other images' captions, never the prompt's own words
        elsewhere = set(prompt_text[prompt_image != prompt_image[p]].tolist())
        assert prompt_text[p] not in c[p, 1:] and set(c[p, 1:].tolist()) <= elsewhere
    assert 1 not in c[[0, 1], 1:]  # text 1 is only image 0's


def test_metrics_of_a_generator_that_draws_the_truth(tiny_run, tiny_data):
    """A "generator" that returns each prompt's own real scene: the oracle finds every prompt
    satisfied, and R-precision equals that of the real images."""
    from export.generator import generation_metrics
    from training.data.coco import CaptionSet, load_shapes_split
    from training.train_generator import load_uint8

    enc_img, enc_txt, spec = _encoders(tiny_run)
    full = load_shapes_split(tiny_data, "test")
    seen: dict[str, int] = {}
    for caps in full.captions:
        for _, t, _ in caps:
            seen[t] = seen.get(t, 0) + 1
    caps = [[c for c in cs if seen[c[1]] == 1] for cs in full.captions]  # one scene per text
    keep = [i for i, cs in enumerate(caps) if cs]
    data = CaptionSet(full.image_dir, [full.image_ids[i] for i in keep],
                      [full.files[i] for i in keep], [caps[i] for i in keep],
                      [full.objects[i] for i in keep])
    images = load_uint8(data.paths(), 64).astype(np.float32) / 255
    scene = {t: i for i, cs in enumerate(data.captions) for _, t, _ in cs}
    texts = sorted(scene)  # embedded as generation_metrics embeds them: the same bytes
    emb = np.concatenate([enc_txt(texts[s: s + 256]) for s in range(0, len(texts), 256)])
    truth = {e.tobytes(): images[scene[t]] for e, t in zip(emb, texts)}

    def generate(text_embedding, z):
        return np.stack([truth[e.tobytes()] for e in text_embedding])

    m = generation_metrics(generate, enc_img, enc_txt, data, spec, latent_dim=4, candidates=10)
    assert m["satisfied_single"] == 1.0 and m["satisfied_two"] == 1.0
    assert m["prompts_single"] > 0 and m["prompts_two"] > 0
    assert m["r_precision"] == m["r_precision_real_images"]
