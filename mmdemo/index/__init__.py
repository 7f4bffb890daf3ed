"""A vector index over L2-normalised embeddings: hnswlib with explicit ids and a sidecar.

The sidecar (`<file>.json`) records dim, count, space, build settings, the sha256 of the index
file and of the encoder that made the vectors. Loading checks all of them, so an index never
silently pairs with another encoder or a damaged file (hnswlib can crash on a corrupted file).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import hnswlib
import numpy as np

from mmdemo import settings
from mmdemo.bundle import BundleError, sha256_file


class VectorIndex:
    """Cosine-similarity search (inner product on unit vectors) with integer ids."""

    def __init__(self, dim: int, max_elements: int, encoder_sha256: str = "", m: int = 16,
                 ef_construction: int = 200, seed: int = 0):
        self.dim, self.encoder_sha256 = dim, encoder_sha256
        self.m, self.ef_construction = m, ef_construction
        self._index = hnswlib.Index(space="ip", dim=dim)
        self._index.init_index(max_elements=max(1, max_elements), M=m,
                               ef_construction=ef_construction, random_seed=seed)
        self._lock = threading.Lock()  # hnswlib writes (add, remove, resize) never overlap reads
        self.deleted: set[int] = set()

    def __len__(self) -> int:
        """Items that searches can return (removed ones excluded)."""
        return self._index.get_current_count() - len(self.deleted)

    def labels(self) -> set[int]:
        """Every id the index has held, removed ones included (hnswlib keeps them as deleted
        elements, so such an id can never be added again)."""
        with self._lock:
            return {int(i) for i in self._index.get_ids_list()}

    def live_ids(self) -> set[int]:
        """The ids searches can return."""
        return self.labels() - self.deleted

    def vectors(self, ids: list[int]) -> np.ndarray:
        """float32 (N, dim): the stored vectors of live ids (for repairing a bundle)."""
        with self._lock:
            return np.asarray(self._index.get_items([int(i) for i in ids]), dtype=np.float32)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add float32 (N, dim) unit vectors under int ids (N,) that the index never held.

        Capacity grows as needed; hnswlib counts removed elements against it, since they stay
        in the graph as deleted.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have shape {vectors.shape}; expected (N, {self.dim})")
        if ids.shape != (len(vectors),):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(set(ids.tolist())) != len(ids):
            raise ValueError("the same id is given twice")
        with self._lock:
            held = set(self._index.get_ids_list()) & set(ids.tolist())
            if held:
                raise ValueError(f"ids the index already holds (or held): {sorted(held)[:10]}")
            need = self._index.get_current_count() + len(vectors)
            if need > self._index.get_max_elements():
                self._index.resize_index(max(need, 2 * self._index.get_max_elements()))
            self._index.add_items(vectors, ids)

    def remove(self, ids) -> None:
        """Take ids out of search results (hnswlib's mark_deleted); unknown, removed or
        repeated ids are a KeyError, and then nothing is removed."""
        ids = [int(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise KeyError("the same id is given twice")
        with self._lock:
            known = set(self._index.get_ids_list()) - self.deleted
            missing = [i for i in ids if i not in known]
            if missing:
                raise KeyError(f"ids not in the index: {missing[:10]}")
            for i in ids:
                self._index.mark_deleted(i)
                self.deleted.add(i)

    def search(self, queries: np.ndarray, k: int, ef: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """ids int64 (Q, k) and cosine scores float32 (Q, k), best first."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dim {queries.shape[1]}; the index has {self.dim}")
        k = min(k, len(self))
        if k < 1:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        with self._lock:
            ef = max(ef or settings.INDEX_EF, k)
            self._index.set_ef(ef)
            try:
                labels, dist = self._index.knn_query(queries, k=k)
            except RuntimeError:  # removed items can leave the graph short of k at this ef
                self._index.set_ef(max(2 * ef, k + len(self.deleted)))
                labels, dist = self._index.knn_query(queries, k=k)
        return labels.astype(np.int64), (1.0 - dist).astype(np.float32)

    def save(self, path: Path | str) -> None:
        path = Path(path)
        with self._lock:
            self._index.save_index(str(path))
            count, deleted = len(self), sorted(self.deleted)
        meta = {"dim": self.dim, "count": count, "space": "ip", "M": self.m,
                "ef_construction": self.ef_construction, "encoder_sha256": self.encoder_sha256,
                "index_sha256": sha256_file(path), "deleted": deleted}
        Path(str(path) + ".json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: Path | str, encoder_sha256: str | None = None) -> VectorIndex:
        path = Path(path)
        side = Path(str(path) + ".json")
        if not path.is_file() or not side.is_file():
            raise BundleError(f"index {path} or its sidecar {side.name} is missing")
        meta = json.loads(side.read_text())
        got = sha256_file(path)
        if got != meta["index_sha256"]:
            raise BundleError(f"index {path.name} has sha256 {got[:12]}..., its sidecar says "
                              f"{meta['index_sha256'][:12]}...")
        if encoder_sha256 is not None and meta["encoder_sha256"] != encoder_sha256:
            raise BundleError(f"index {path.name} was built by encoder "
                              f"{meta['encoder_sha256'][:12]}..., but the bundle's encoder is "
                              f"{encoder_sha256[:12]}...; rebuild the index")
        obj = cls.__new__(cls)
        obj.dim, obj.encoder_sha256 = meta["dim"], meta["encoder_sha256"]
        obj.m, obj.ef_construction = meta["M"], meta["ef_construction"]
        obj._index = hnswlib.Index(space="ip", dim=meta["dim"])
        obj.deleted = {int(i) for i in meta.get("deleted", [])}
        obj._index.load_index(str(path), max_elements=meta["count"] + len(obj.deleted))
        obj._lock = threading.Lock()
        if len(obj) != meta["count"]:
            raise BundleError(f"index {path.name} holds {len(obj)} items; sidecar says "
                              f"{meta['count']}")
        return obj
