"""The V2 classification extension: an output's top-k as "score:index:label" strings.

As Triton does it: each image's values are ranked over all of its elements (for a classifier's
(1, 1, K) output, over the K classes), highest first; k is clamped to the number of elements.
The label is the model's `labels[index]` when the spec carries labels, else the index again.
"""

from __future__ import annotations

import numpy as np

from .errors import BadRequest


def parse_k(value, where: str) -> int:
    """Return the classification count k (a positive integer) or raise a 400 naming where."""
    if type(value) is not int or value < 1:
        raise BadRequest(
            f"{where}.parameters.classification must be a positive integer (the top-k), "
            f"got {value!r}"[:200],
            field="classification",
        )
    return value


def top_k(array: np.ndarray, k: int, labels: list[str] | None = None) -> list[list[str]]:
    """Return, per image of array (N, ...), its k largest values as "score:index:label"."""
    flat = np.asarray(array, dtype=np.float32).reshape(array.shape[0], -1)
    k = min(k, flat.shape[1])
    # argsort of the negated values keeps ties in index order (stable), like a reader expects.
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    rows = []
    for values, indices in zip(flat, order, strict=True):
        row = []
        for i in indices:
            label = labels[i] if labels is not None and i < len(labels) else str(i)
            row.append(f"{values[i]:f}:{i}:{label}")
        rows.append(row)
    return rows
