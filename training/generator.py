"""Text to image: a conditional VAE over the frozen dual encoder's text embeddings.

The decoder draws an image from a text embedding e (the joint space's text side) and a latent
z: e says what the caption says, z what it leaves open (where things are, objects the caption
does not name, the background). z comes from a learned prior p(z | e) = N(mu(e), sigma(e)^2),
written as z = mu(e) + sigma(e) * noise so that generation takes standard normal noise; the
encoder q(z | image, e) is used for training only.

Where the data says what each scene holds (the shapes world), SlotLoss tells the sprite
decoder's layers what to draw: from the posterior's z, the scene's objects; from the prior's,
what the caption claims (its objects, a count, a relation), with no overlap.

Two decoders (GeneratorConfig.layout):
- "sprites" (the default): K layers, each one of M learned alpha masks (sprites) in one color
  at a position, over a smooth dark background: made for scenes of a few flat objects (the
  shapes world), where a minute of CPU training leaves a conv decoder drawing blurred blobs.
- "dense": a conv decoder, FiLM-conditioned at every stage, that assumes nothing about the
  pictures (for real photos).

Reads bottom-up: blocks, the decoders, encoder and prior, the model, its losses, slot
supervision, the builder.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- blocks


class FiLM(nn.Module):
    """Feature-wise modulation from a condition vector: x * (1 + scale) + shift per channel."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)  # starts as the identity
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(cond)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return x * (1 + scale) + shift


class UpBlock(nn.Module):
    """Nearest-neighbour x2, then 3x3 conv, BatchNorm, FiLM on the condition, SiLU."""

    def __init__(self, cin: int, cout: int, cond_dim: int, up: bool = True):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.film = FiLM(cond_dim, cout)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.silu(self.film(self.norm(self.conv(x)), cond))


def down_block(cin: int, cout: int) -> nn.Sequential:
    """4x4 conv with stride 2 (halves the side), BatchNorm, SiLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.SiLU())


# ----------------------------------------------------------------------------- decoders


class DenseStem(nn.Module):
    """cond (B, H) -> feature map (B, C, s, s) through one linear map."""

    def __init__(self, cond_dim: int, channels: int, side: int):
        super().__init__()
        self.channels, self.side = channels, side
        self.proj = nn.Linear(cond_dim, channels * side * side)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.proj(cond).view(-1, self.channels, self.side, self.side)


class ImageDecoder(nn.Module):
    """(e (B, T), z (B, Z)) -> image (B, 3, S, S) in [0, 1].

    [e, z] becomes a condition vector that modulates every stage (FiLM) and, through the stem,
    the first feature map; 3x3 convs and nearest-neighbour upsampling bring it to S/2, and a
    sub-pixel conv (pixel shuffle) to S, so no conv runs at full resolution.
    """

    def __init__(self, text_dim: int, latent_dim: int, cond_dim: int, stem: nn.Module,
                 widths: list[int], ups: list[bool]):
        super().__init__()
        self.e_scale = text_dim ** 0.5  # unit vectors to unit-variance components, like z's
        self.cond = nn.Sequential(nn.Linear(text_dim + latent_dim, cond_dim), nn.SiLU(),
                                  nn.Linear(cond_dim, cond_dim), nn.SiLU())
        self.stem = stem
        chans = [stem.channels, *widths]
        self.blocks = nn.ModuleList([UpBlock(a, b, cond_dim, up) for a, b, up
                                     in zip(chans[:-1], chans[1:], ups)])
        self.head = nn.Conv2d(widths[-1], 3 * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cond = self.cond(torch.cat([e * self.e_scale, z], 1))  # (B, cond_dim)
        x = self.stem(cond)  # (B, c, s, s)
        for block in self.blocks:
            x = block(x, cond)  # last: (B, C_last, S/2, S/2)
        return torch.sigmoid(self.shuffle(self.head(x)))  # (B, 3, S, S)


class SpriteDecoder(nn.Module):
    """(e (B, T), z (B, Z)) -> image (B, 3, S, S) in [0, 1], drawn as K layers over a smooth
    background (a 4x4 color map, upsampled, darker than background_max): each layer is one of
    M sprites (alpha masks of P x P pixels, learned from the data like every other weight)
    placed at a position, filled with one color and scaled by a presence. [e, z] sets the
    background and, per layer, the position, color, presence and which sprite; the layers are
    composited in order. Where things are is two numbers per layer and a shape is a mask picked
    whole, so edges stay sharp where a conv decoder trained as briefly still draws blobs.
    """

    def __init__(self, text_dim: int, latent_dim: int, cond_dim: int, image_size: int,
                 slots: int, sprites: int, sprite_size: int, background_max: float):
        super().__init__()
        self.e_scale = text_dim ** 0.5
        self.background_max = background_max
        self.reach = 1 - sprite_size / (2 * image_size)  # centres in [-reach, reach]: a
        # sprite's middle half stays inside the picture
        self.slots, self.sprites, self.size = slots, sprites, image_size
        self.cond = nn.Sequential(nn.Linear(text_dim + latent_dim, cond_dim), nn.SiLU(),
                                  nn.Linear(cond_dim, cond_dim), nn.SiLU())
        # per layer: where (2), color (3), presence (1), sprite logits (M)
        self.layer = nn.Linear(cond_dim, slots * (2 + 3 + 1 + sprites))
        self.background = nn.Linear(cond_dim, 3 * 4 * 4)  # a 4x4 color map, upsampled
        # sprite logits start as discs of varied radius (a little noise tells them apart)
        r = torch.linspace(-1, 1, sprite_size)
        d = (r[None, :] ** 2 + r[:, None] ** 2).sqrt()  # (P, P) distance from the middle
        radius = torch.linspace(0.3, 0.8, sprites)[:, None, None]
        # stored at a tenth of their scale: Adam moves every entry by about lr a step, and a
        # mask's logits need to travel several units to change its outline
        self.bank_scale = 10.0
        self.bank = nn.Parameter(0.8 * (radius - d) + 0.01 * torch.randn(sprites, sprite_size,
                                                                         sprite_size))
        self.extent = sprite_size / image_size  # a sprite's side, as a share of the image's
        c = torch.linspace(-1 + 1 / image_size, 1 - 1 / image_size, image_size)  # pixel centres
        gy, gx = torch.meshgrid(c, c, indexing="ij")
        self.register_buffer("grid", torch.stack([gx, gy], -1), persistent=False)  # (S, S, 2)

    def layers(self, e: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """What each layer draws, before drawing: "pos" (B, K, 2) centres in [-1, 1] (x right,
        y down), "color" (B, K, 3) in [0, 1], "presence" (B, K) logits, "sprite" (B, K, M)
        logits, and "cond" (B, cond_dim) for the background."""
        b, k = e.shape[0], self.slots
        cond = self.cond(torch.cat([e * self.e_scale, z], 1))  # (B, cond_dim)
        p = self.layer(cond).view(b, k, -1)  # (B, K, 2 + 3 + 1 + M)
        return {"pos": torch.tanh(p[..., :2]) * self.reach, "color": torch.sigmoid(p[..., 2:5]),
                "presence": p[..., 5], "sprite": p[..., 6:], "cond": cond}

    def draw(self, lay: dict[str, torch.Tensor]) -> torch.Tensor:
        """The layers composited over the background: image (B, 3, S, S) in [0, 1]. A layer is
        drawn at its presence while training and wholly or not at all (presence above one
        half) otherwise, so a drawn scene holds no faint objects."""
        b, k, s = lay["pos"].shape[0], self.slots, self.size
        pos = lay["pos"].reshape(b * k, 2)
        presence = torch.sigmoid(lay["presence"]).reshape(b * k, 1, 1, 1)
        if not self.training:
            presence = (presence > 0.5).float()
        logits = lay["sprite"].reshape(b * k, -1)  # (B*K, M)
        # one sprite per layer (a mix would blur shapes); while training, gradients reach the
        # choice through the softmax (straight-through)
        weights = (logits == logits.amax(1, keepdim=True)).float()  # (B*K, M) one-hot
        if self.training:
            soft = torch.softmax(logits, dim=1)
            weights = weights + soft - soft.detach()
        bank = torch.sigmoid(self.bank * self.bank_scale).flatten(1)  # (M, P*P)
        masks = (weights @ bank).view(b * k, 1, *self.bank.shape[1:])  # (B*K, 1, P, P)
        # image coordinates -> the sprite's own [-1, 1] frame, then bilinear sampling
        where = (self.grid[None] - pos[:, None, None, :]) / self.extent  # (B*K, S, S, 2)
        alpha = F.grid_sample(masks, where, mode="bilinear", padding_mode="zeros",
                              align_corners=False) * presence  # (B*K, 1, S, S)
        alpha, color = alpha.view(b, k, 1, s, s), lay["color"].view(b, k, 3, 1, 1)
        bg = torch.sigmoid(self.background(lay["cond"])).view(b, 3, 4, 4) * self.background_max
        x = F.interpolate(bg, size=(s, s), mode="bilinear", align_corners=False)
        for i in range(k):
            x = x * (1 - alpha[:, i]) + color[:, i] * alpha[:, i]
        return x  # (B, 3, S, S)

    def forward(self, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.draw(self.layers(e, z))


# ----------------------------------------------------------------------------- encoder, prior


class PosteriorEncoder(nn.Module):
    """q(z | image, e): image (B, 3, S, S) in [0, 1] and e (B, T) -> mean, log-variance (B, Z).
    Two coordinate channels ride along with the image (CoordConv), so where things are is
    easy to read off."""

    def __init__(self, text_dim: int, latent_dim: int, widths: list[int], image_size: int,
                 hidden: int):
        super().__init__()
        chans = [5, *widths]
        self.features = nn.Sequential(*[down_block(a, b) for a, b in zip(chans[:-1], chans[1:])])
        side = image_size // 2 ** len(widths)
        self.e_scale = text_dim ** 0.5
        self.head = nn.Sequential(nn.Linear(widths[-1] * side * side + text_dim, hidden),
                                  nn.SiLU(), nn.Linear(hidden, 2 * latent_dim))
        c = torch.linspace(-1, 1, image_size)
        gy, gx = torch.meshgrid(c, c, indexing="ij")
        self.register_buffer("coords", torch.stack([gx, gy])[None], persistent=False)

    def forward(self, image: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([image * 2 - 1, self.coords.expand(len(image), -1, -1, -1)], 1)
        f = self.features(x).flatten(1)  # (B, C * side * side)
        mu, logvar = self.head(torch.cat([f, e * self.e_scale], 1)).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 6)


class PriorNet(nn.Module):
    """p(z | e): e (B, T) -> mean, log-variance (B, Z). What a caption says about z (which
    colors and shapes to draw) moves into the mean; what it leaves open stays as spread."""

    def __init__(self, text_dim: int, latent_dim: int, hidden: int):
        super().__init__()
        self.e_scale = text_dim ** 0.5
        self.net = nn.Sequential(nn.Linear(text_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * latent_dim))

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(e * self.e_scale).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 6)


# ----------------------------------------------------------------------------- model


class ConditionalVAE(nn.Module):
    """A conditional VAE: encode(image, e) -> (mu, logvar); decode(e, z) -> image."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        w, s = cfg.width, cfg.image_size
        if cfg.layout == "sprites":
            self.decoder = SpriteDecoder(cfg.text_dim, cfg.latent_dim, cfg.cond_dim, s,
                                         cfg.slots, cfg.sprites, cfg.sprite_size,
                                         cfg.background_max)
        elif cfg.layout == "dense":  # sides S/8, S/4, S/2, then pixel shuffle to S
            self.decoder = ImageDecoder(cfg.text_dim, cfg.latent_dim, cfg.cond_dim,
                                        DenseStem(cfg.cond_dim, w, s // 8), [4 * w, 2 * w, w],
                                        [False, True, True])
        else:
            raise ValueError(f"layout {cfg.layout!r}; expected 'sprites' or 'dense'")
        enc = [w, 2 * w, w]  # sides S/2, S/4, S/8
        self.encoder = PosteriorEncoder(cfg.text_dim, cfg.latent_dim, enc, cfg.image_size,
                                        cfg.cond_dim)
        self.prior = PriorNet(cfg.text_dim, cfg.latent_dim, cfg.cond_dim)

    def encode(self, image: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(image, e)

    def decode(self, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(e, z)

    def generate(self, e: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] from text embeddings e (B, T) and standard normal
        noise (B, Z) (times a temperature): z = prior mean + prior std * noise."""
        mu, logvar = self.prior(e)
        return self.decode(e, mu + (0.5 * logvar).exp() * noise)

    def forward(self, image: torch.Tensor, e: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstruction through a reparameterised posterior sample, with the posterior's and
        the prior's parameters: image, mu, logvar, prior_mu, prior_logvar."""
        mu, logvar = self.encode(image, e)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        prior_mu, prior_logvar = self.prior(e)
        out = {"mu": mu, "logvar": logvar, "prior_mu": prior_mu, "prior_logvar": prior_logvar}
        if isinstance(self.decoder, SpriteDecoder):  # the layers too, for SlotLoss
            out["layers"] = self.decoder.layers(e, z)
            out["image"] = self.decoder.draw(out["layers"])
        else:
            out["image"] = self.decode(e, z)
        return out

    def prior_layers(self, e: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sprite decoder's layers (SpriteDecoder.layers) for z drawn from the prior."""
        mu, logvar = self.prior(e)
        return self.decoder.layers(e, mu + (0.5 * logvar).exp() * noise)

    @torch.no_grad()
    def sample(self, e: torch.Tensor, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] for text embeddings e (B, T), noise ~ N(0, t^2)."""
        noise = torch.randn(len(e), self.cfg.latent_dim, generator=generator) * temperature
        return self.generate(e, noise.to(e.device))


# ----------------------------------------------------------------------------- losses


def object_mask(image: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, 1, S, S) 1 where a pixel is brighter than the dark background can be (objects)."""
    return (image.amax(1, keepdim=True) > threshold).float()


class VAELoss(nn.Module):
    """Negative ELBO terms, per image: "recon", squared error summed over pixels with the
    objects' pixels weighted up (the background is dark and easy, and a mean over pixels would
    let the model skip small objects), and "kl", KL(q(z | x, e) || p(z | e)) times kl_weight,
    each latent dimension counted as at least free_bits nats (so z keeps carrying where things
    are instead of collapsing)."""

    def __init__(self, kl_weight: float, free_bits: float, object_weight: float,
                 object_threshold: float):
        super().__init__()
        self.kl_weight, self.free_bits = kl_weight, free_bits
        self.object_weight, self.object_threshold = object_weight, object_threshold

    def reconstruction(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The "recon" term alone: object-weighted squared error, summed per image, mean."""
        w = 1 + self.object_weight * object_mask(target, self.object_threshold)
        return (w * (image - target) ** 2).sum((1, 2, 3)).mean()

    def forward(self, out: dict[str, torch.Tensor], target: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        recon = self.reconstruction(out["image"], target)
        mu, logvar, pmu, plv = out["mu"], out["logvar"], out["prior_mu"], out["prior_logvar"]
        kl = 0.5 * (plv - logvar + (logvar.exp() + (mu - pmu) ** 2) / plv.exp() - 1).mean(0)
        return {"recon": recon, "kl": self.kl_weight * kl.clamp(min=self.free_bits).sum()}


class MatchLoss(nn.Module):
    """AttnGAN's DAMSM term on the joint space: images drawn from the prior for a batch's
    captions, embedded by the frozen dual encoder's image side, must each pick out its own
    caption among the batch's (InfoNCE at the dual encoder's own temperature; rows with the
    same caption are not each other's negatives). It teaches what the reconstruction alone
    teaches slowly: a sample from p(z | e) has to show what e says.

    encode_image: float32 (N, 3, S, S) in [0, 1] -> (N, D) L2-normalised, differentiable (the
    frozen encoder with its preprocessing); only the first `samples` rows of a batch are drawn.
    """

    def __init__(self, encode_image: Callable[[torch.Tensor], torch.Tensor], logit_scale: float,
                 weight: float, samples: int):
        super().__init__()
        self.encode_image, self.logit_scale = encode_image, logit_scale
        self.weight, self.samples = weight, samples

    def forward(self, model: ConditionalVAE, e: torch.Tensor) -> dict[str, torch.Tensor]:
        e = e[: self.samples]
        noise = torch.randn(len(e), model.cfg.latent_dim, device=e.device)
        img = self.encode_image(model.generate(e, noise))  # (n, D)
        logits = self.logit_scale * img @ e.T  # (n, n)
        same = (e @ e.T > 1 - 1e-6) & ~torch.eye(len(e), dtype=torch.bool, device=e.device)
        logits = logits.masked_fill(same, float("-inf"))
        target = torch.arange(len(e), device=e.device)
        return {"match": self.weight * F.cross_entropy(logits, target)}


# ----------------------------------------------------------------------------- slot supervision
# Where a data set says what each scene holds (the shapes world's labels and the claims its
# captions are written from), the sprite decoder's layers are told what to draw. Targets list
# the objects a caption mentions first, in the order it mentions them, then the scene's others
# left to right; SlotLoss lets any layer draw any of them, and layers left over draw nothing.
# A layer's sprite is its object's class, shape and size together: class = shape index *
# len(sizes) + size index.

# relation -> (axis, sign): the relation holds when sign * (b - a) on that axis, in pixels, is
# at least the world's margin (a the first object, b the second; y grows downwards)
RELATION_AXES = {"left of": (0, 1.0), "right of": (0, -1.0), "above": (1, 1.0),
                 "below": (1, -1.0)}


@dataclass
class SlotVocabulary:
    """How a scene's objects become layer targets: the world's shapes, colors (RGB 0-255),
    sizes (circumradius in pixels), picture side, and the relation margin and the gap its
    objects keep (pixels)."""

    shapes: list[str]
    colors: dict[str, tuple[int, int, int]]
    sizes: dict[str, float]
    image_size: int
    margin: float
    gap: float

    @property
    def classes(self) -> int:
        return len(self.shapes) * len(self.sizes)

    def targets(self, objects: list[dict], claim: dict, order: list[int], slots: int
                ) -> dict[str, np.ndarray]:
        """Targets for one (scene, caption): `order` lists the objects, mentioned ones first
        (mmdemo.oracle.bind). Arrays, per layer: scene_class int64 (K,) (-1: draws nothing),
        scene_color float32 (K, 3) in [0, 1], scene_pos float32 (K, 2) in [-1, 1];
        claim_shape, claim_size int64 (K,) (-1: not mentioned / size not said), claim_color
        (K, 3); and claim_count int64 () (-1: none), rel int64 (3,) (a, b, axis; -1: none),
        rel_sign float32 ()."""
        sizes, half = list(self.sizes), self.image_size / 2
        t = {"scene_class": np.full(slots, -1, np.int64),
             "scene_color": np.zeros((slots, 3), np.float32),
             "scene_pos": np.zeros((slots, 2), np.float32),
             "claim_shape": np.full(slots, -1, np.int64),
             "claim_size": np.full(slots, -1, np.int64),
             "claim_color": np.zeros((slots, 3), np.float32),
             "claim_count": np.array(-1, np.int64), "rel": np.full(3, -1, np.int64),
             "rel_sign": np.array(0.0, np.float32)}
        for i, k in enumerate(order[:slots]):
            o = objects[k]
            t["scene_class"][i] = self.shapes.index(o["shape"]) * len(sizes) + sizes.index(
                o["size"])
            t["scene_color"][i] = np.array(self.colors[o["color"]]) / 255
            t["scene_pos"][i] = (o["x"] / half - 1, o["y"] / half - 1)
        for i, m in enumerate(claim["mentions"][:slots]):
            t["claim_shape"][i] = self.shapes.index(m["shape"])
            t["claim_size"][i] = sizes.index(m["size"]) if m.get("size") else -1
            t["claim_color"][i] = np.array(self.colors[m["color"]]) / 255
        if claim.get("count") is not None:
            t["claim_count"] = np.array(claim["count"], np.int64)
        if claim.get("relation"):
            a, rel, b = claim["relation"]
            axis, sign = RELATION_AXES[rel]
            t["rel"], t["rel_sign"] = np.array([a, b, axis]), np.array(sign, np.float32)
        return t


class SlotLoss(nn.Module):
    """Two terms on the sprite decoder's layers (SpriteDecoder.layers):

    - "slots", on the layers decoded from the posterior's z: the layers draw the scene's
      objects (cross-entropy on the sprite, presence, squared color error, Huber position
      error in pixels), one each, the rest nothing;
    - "claim", on layers decoded from z drawn from the prior p(z | e), as at generation: the
      mentioned objects are drawn in their classes and colors (a size the caption leaves open
      may be either), a count draws that many layers, the relation holds by the margin, and no
      two drawn objects overlap or leave the picture. What is not said stays free.

    Which layer draws which object is not fixed: each term takes, per example, the best of
    every assignment of objects to layers. A caption's embedding tells "a red circle and a blue
    square" from "a blue circle and a red square" but hardly from "a blue square and a red
    circle", so a fixed order would ask the decoder for what the embedding does not hold.

    Targets come from SlotVocabulary.targets, stacked along a batch axis.
    """

    def __init__(self, vocab: SlotVocabulary, slot_weight: float, claim_weight: float,
                 slots: int, sprites: int):
        super().__init__()
        self.n_sprites = sprites
        self.vocab, self.slot_weight, self.claim_weight = vocab, slot_weight, claim_weight
        radius = torch.tensor([r for _ in vocab.shapes for r in vocab.sizes.values()])
        self.register_buffer("radius", radius, persistent=False)  # (classes,) pixels
        perms = torch.tensor(list(itertools.permutations(range(slots))))  # (P, K)
        self.register_buffer("perms", perms, persistent=False)  # layer k draws object perm[k]
        self.register_buffer("inverse", perms.argsort(1), persistent=False)  # object -> layer
        self.px = vocab.image_size / 2  # [-1, 1] -> pixels

    def _per_layer(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, ...) per object -> (B, P, K, ...) per layer, under every assignment."""
        return x[:, self.perms]

    def scene(self, lay: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
        cls = self._per_layer(t["scene_class"])  # (B, P, K)
        here = cls >= 0
        b, n_perm, k = cls.shape
        logits = lay["sprite"][:, None].expand(-1, n_perm, -1, -1)
        ce = F.cross_entropy(logits.reshape(b * n_perm * k, -1), cls.clamp(min=0).flatten(),
                             reduction="none").view(b, n_perm, k)
        presence = F.binary_cross_entropy_with_logits(
            lay["presence"][:, None].expand(-1, n_perm, -1), here.float(), reduction="none")
        color = ((lay["color"][:, None] - self._per_layer(t["scene_color"])) ** 2).sum(-1)
        err = (lay["pos"][:, None] - self._per_layer(t["scene_pos"])) * self.px
        pos = F.smooth_l1_loss(err, torch.zeros_like(err), reduction="none").sum(-1)
        per = ((ce + 20 * color + pos) * here + presence).sum(-1)  # (B, P)
        return per.min(1).values.mean()

    def claim(self, lay: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
        b, k = lay["pos"].shape[:2]
        n_perm, n_sizes = len(self.perms), len(self.vocab.sizes)
        logp = F.log_softmax(lay["sprite"], -1)[..., : self.vocab.classes].reshape(
            b, k, len(self.vocab.shapes), n_sizes)[:, None].expand(-1, n_perm, -1, -1, -1)
        shape, size = self._per_layer(t["claim_shape"]), self._per_layer(t["claim_size"])
        said = shape >= 0  # (B, P, K)
        per_shape = logp.gather(3, shape.clamp(min=0)[..., None, None].expand(
            -1, -1, -1, 1, n_sizes)).squeeze(3)  # (B, P, K, sizes)
        nll = torch.where(size >= 0, -per_shape.gather(3, size.clamp(min=0)[..., None])[..., 0],
                          -per_shape.logsumexp(-1))
        color = ((lay["color"][:, None] - self._per_layer(t["claim_color"])) ** 2).sum(-1)
        per = ((nll + 20 * color) * said).sum(-1)  # (B, P)
        # presence: mentioned layers draw; where a count says every object is mentioned, the
        # other layers draw nothing
        count = t["claim_count"][:, None, None]
        judged = said | (count == said.sum(-1, keepdim=True))
        per = per + (F.binary_cross_entropy_with_logits(
            lay["presence"][:, None].expand(-1, n_perm, -1), said.float(), reduction="none")
            * judged).sum(-1)
        pos = lay["pos"] * self.px  # (B, K, 2) pixels from the middle
        rel = t["rel"]
        has = (rel[:, 0] >= 0).float()[:, None]  # (B, 1)
        layer_a = self.inverse[:, rel[:, 0].clamp(min=0)].T  # (B, P): the layer drawing a
        layer_b = self.inverse[:, rel[:, 1].clamp(min=0)].T
        along = pos.gather(2, rel[:, 2].clamp(min=0)[:, None, None].expand(-1, k, 1))[..., 0]
        gap = along.gather(1, layer_b) - along.gather(1, layer_a)  # (B, P) pixels
        per = per + has * F.relu(self.vocab.margin + 2 - gap * t["rel_sign"][:, None])
        loss = per.min(1).values.sum()
        # drawn objects keep apart and inside the picture, at their class's radius
        r = (F.softmax(lay["sprite"][..., : self.vocab.classes], -1) @ self.radius).detach()
        on = torch.sigmoid(lay["presence"]).detach()
        d = (pos[:, :, None] - pos[:, None]).norm(dim=-1)  # (B, K, K)
        need = r[:, :, None] + r[:, None] + self.vocab.gap
        pair = torch.triu(torch.ones(k, k, dtype=torch.bool, device=d.device), 1)
        loss = loss + (on[:, :, None] * on[:, None] * F.relu(need - d))[:, pair].sum()
        edge = pos.abs() + r[..., None] + 1 - self.px
        loss = loss + (on[..., None] * F.relu(edge)).sum()
        return loss / b

    def truth(self, t: dict[str, torch.Tensor], cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layers that draw the scene exactly as labelled (for SpriteDecoder.draw), with the
        background from `cond`: drawn and compared with the picture, they teach the sprites
        their outlines from the first step, before the decoder knows where things are."""
        cls = t["scene_class"]
        sprite = torch.full((*cls.shape, self.n_sprites), -30.0)
        sprite.scatter_(2, cls.clamp(min=0)[..., None], 30.0)
        return {"pos": t["scene_pos"], "color": t["scene_color"],
                "presence": torch.where(cls >= 0, 30.0, -30.0), "sprite": sprite, "cond": cond}

    def forward(self, posterior: dict[str, torch.Tensor], t: dict[str, torch.Tensor],
                prior: dict[str, torch.Tensor], claims: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """posterior: layers of a batch of scenes with targets t; prior: layers drawn from the
        prior for a batch of captions (not drawn, so it can be larger) with targets `claims`."""
        return {"slots": self.slot_weight * self.scene(posterior, t),
                "claim": self.claim_weight * self.claim(prior, claims)}


# ----------------------------------------------------------------------------- builder


@dataclass
class GeneratorConfig:
    text_dim: int = 128  # text embedding size (the dual encoder's joint space)
    latent_dim: int = 32  # z: what the caption leaves open
    image_size: int = 64  # output side in pixels (a multiple of 8)
    width: int = 16  # encoder channels w, 2w, w at sides S/2, S/4, S/8; dense decoder 4w,
    # 2w, w at S/8, S/4, S/2
    cond_dim: int = 256  # width of the condition vector [e, z] -> decoder
    layout: str = "sprites"  # decoder: sprites (learned masks placed and colored) | dense
    slots: int = 3  # sprites: layers (the most objects a scene holds)
    sprites: int = 10  # sprites: learned alpha masks to pick from (the shapes world: one per
    # shape and size, which SlotLoss assigns)
    sprite_size: int = 32  # sprites: a mask's side in pixels
    background_max: float = 0.4  # sprites: the background stays darker than this (the shapes
    # world draws it at 100/255 at most)


def build_generator(cfg: GeneratorConfig) -> ConditionalVAE:
    if cfg.image_size % 8:
        raise ValueError(f"image_size {cfg.image_size} must be a multiple of 8")
    return ConditionalVAE(cfg)
