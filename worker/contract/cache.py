"""A byte-bounded LRU of loaded models, keyed by (name, version); the API and workers use it."""

from __future__ import annotations

import threading
from collections import OrderedDict

from engine import Model


class ModelGone(LookupError):
    """The model version a job names is no longer in the store."""


class ModelCache:
    """Keep the most recently used models whose weights fit in max_bytes.

    A model's size is its weights' bytes plus the packed filters its runs have made (engine
    ConvWeights, up to ~1.8x the weights), counted as they appear: the budget is checked again
    whenever a model is fetched. A model bigger than the whole budget is used once and dropped,
    unless keep_latest (the API's choice: it only reads shapes, and would otherwise reload a big
    model on every request).
    """

    def __init__(self, max_bytes: int, *, keep_latest: bool = False):
        self.max_bytes = max_bytes
        self.keep_latest = keep_latest
        self._models: OrderedDict[tuple[str, int], tuple[Model, int]] = OrderedDict()
        self._lock = threading.Lock()  # embedded workers and API threads share one cache
        self.hits = 0

    @property
    def bytes(self) -> int:
        return sum(size + model.packed_bytes for model, size in self._models.values())

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._models

    def keys(self) -> list[tuple[str, int]]:
        """Return the cached (name, version) pairs, least recently used first."""
        with self._lock:
            return list(self._models)

    def get(self, store, name: str, version: int, spec: dict | None = None) -> Model:
        """Return the model, loading it from store on a miss; ModelGone when it was deleted.

        spec, when the caller has read it already, saves one Redis read on a miss.
        """
        key = (name, int(version))
        with self._lock:
            if key in self._models:
                model = self._models[key][0]
                self._models.move_to_end(key)
                self.hits += 1
                self._evict()  # the packs of earlier runs may have grown the cache past it
                return model
        if spec is None:
            spec = store.model_spec(name, version)
        weights = store.model_weights(name, version)
        if spec is None or weights is None:
            raise ModelGone(
                f"model {name!r} version {version} is no longer available "
                "(unloaded or replaced); upload it again and resubmit"
            )
        model = Model.from_bytes(spec, weights, filename="weights.safetensors")
        self.put(key, model, len(weights))
        return model

    def put(self, key: tuple[str, int], model: Model, size: int) -> None:
        """Insert a model and evict the least recently used ones past the byte budget."""
        with self._lock:
            self._models[key] = (model, size)
            self._models.move_to_end(key)
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used models past the budget (the lock is held)."""
        while len(self._models) > 1 and self.bytes > self.max_bytes:
            self._models.popitem(last=False)
        if self.bytes > self.max_bytes and not self.keep_latest:
            self._models.clear()
