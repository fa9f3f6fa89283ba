"""A byte-bounded LRU of loaded models, keyed by (name, version)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from engine import Model


class ModelGone(LookupError):
    """The model version a job names is no longer in the store."""


class ModelCache:
    """Keep the most recently used models whose weights fit in max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._models: OrderedDict[tuple[str, int], tuple[Model, int]] = OrderedDict()
        self._lock = threading.Lock()  # embedded workers share one cache across threads
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self._models.values())

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._models

    def get(self, store, name: str, version: int) -> Model:
        """Return the model, loading it from store on a miss; ModelGone when it was deleted."""
        key = (name, int(version))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                self.hits += 1
                return self._models[key][0]
        spec = store.model_spec(name, version)
        weights = store.model_weights(name, version)
        if spec is None or weights is None:
            raise ModelGone(f"model {name!r} version {version} is no longer available "
                            "(unloaded or replaced); upload it again and resubmit")
        model = Model.from_bytes(spec, weights, filename="weights.safetensors")
        self.put(key, model, len(weights))
        return model

    def put(self, key: tuple[str, int], model: Model, size: int) -> None:
        """Insert a model and evict the least recently used ones past the byte budget."""
        with self._lock:
            self.misses += 1
            self._models[key] = (model, size)
            self._models.move_to_end(key)
            while len(self._models) > 1 and self.bytes > self.max_bytes:
                self._models.popitem(last=False)
            if self.bytes > self.max_bytes:
                # A model bigger than the whole budget is used once, never kept.
                self._models.pop(key, None)
