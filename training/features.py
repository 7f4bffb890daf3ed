"""Features of frozen backbones, computed once and cached on disk.

When a backbone is frozen, its output for an image or a text never changes, so training the
projection heads needs it only once. Image features are keyed by the backbone's weights, the
preprocessing and the image files (path, size, mtime); text features by the weights and the text.
Files are safetensors, written to a temporary name and renamed, so a killed run leaves no half
file. A second run with the same backbone and data reads them back in a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mmdemo.preprocess import PreprocessSpec
from mmdemo.text import TextTokenizer
from training.data.transforms import image_batches
from training.distributed import weights_digest


def weights_key(module: torch.nn.Module) -> str:
    """sha256 over a module's class and its weights (names, shapes, values)."""
    return hashlib.sha256(f"{type(module).__name__}|{weights_digest(module)}".encode()).hexdigest()


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def image_features(backbone: torch.nn.Module, paths: list[Path], spec: PreprocessSpec,
                   cache_dir: Path, desc: str = "image features", batch: int = 64
                   ) -> torch.Tensor:
    """float32 (N, D): the frozen backbone's output for each image file, from the cache when
    the same weights, preprocessing and files were seen before."""
    h = hashlib.sha256(weights_key(backbone).encode())
    h.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"images-{h.hexdigest()[:20]}.safetensors"
    if path.is_file():
        return load_file(path)["features"]
    was_training = backbone.training
    backbone.eval()
    dev = next(backbone.parameters()).device
    chunks = [backbone(x.to(dev)).float().cpu()
              for x in image_batches(paths, spec, batch, desc)]
    backbone.train(was_training)
    feats = torch.cat(chunks) if chunks else torch.zeros(0, backbone.out_dim)
    _save({"features": feats}, path)
    return feats


class TextFeatures:
    """The frozen text backbone's output per distinct text, computed on first use, kept in
    memory and saved to `cache_dir` by `save()` (texts are keyed by their sha256)."""

    def __init__(self, backbone: torch.nn.Module, tok: TextTokenizer, cache_dir: Path,
                 batch: int = 256):
        self.backbone, self.tok, self.batch = backbone, tok, batch
        key = weights_key(backbone)[:20]
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.path = cache_dir / f"texts-{key}.safetensors"
        self.table: dict[str, torch.Tensor] = {}
        if self.path.is_file():
            self.table = load_file(self.path)
        self._new = 0

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        """float32 (N, D) for the texts, in order."""
        missing = list(dict.fromkeys(t for t in texts if self._key(t) not in self.table))
        if missing:
            was_training = self.backbone.training
            self.backbone.eval()
            for i in range(0, len(missing), self.batch):
                part = missing[i: i + self.batch]
                ids, mask = self.tok(part)
                dev = next(self.backbone.parameters()).device
                out = self.backbone(torch.from_numpy(ids).to(dev),
                                    torch.from_numpy(mask).to(dev)).float().cpu()
                for t, f in zip(part, out):
                    self.table[self._key(t)] = f.clone()
            self.backbone.train(was_training)
            self._new += len(missing)
        return torch.stack([self.table[self._key(t)] for t in texts])

    def warm(self, texts: list[str], desc: str = "text features") -> None:
        """Compute the features of many texts at once, with a progress bar."""
        todo = list(dict.fromkeys(t for t in texts if self._key(t) not in self.table))
        for i in tqdm(range(0, len(todo), self.batch * 4), desc=desc, unit="chunk",
                      leave=False):
            self(todo[i: i + self.batch * 4])

    def save(self) -> None:
        if self._new:
            _save(self.table, self.path)
            self._new = 0
